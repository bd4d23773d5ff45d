# Writes the first 256 KiB of busybox to /dev/vdb (direct I/O, synced), reads them back
# (direct I/O) and prints both checksums: the host compares them with the image file.
if [ -b /dev/vdb ]; then
	dd if=/bin/busybox of=/dev/vdb bs=4k count=64 oflag=direct conv=fsync 2>/dev/null
	set -- $(head -c 262144 /bin/busybox | md5sum)
	wrote=$1
	set -- $(dd if=/dev/vdb bs=4k count=64 iflag=direct 2>/dev/null | md5sum)
	echo "EMBER-BLKRW vdb wrote=$wrote read=$1"
else
	echo "EMBER-BLKRW no /dev/vdb"
fi
