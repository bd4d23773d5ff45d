# Sequential throughput of /dev/vda, the only disk: 32 MiB written (fsync at the end), then
# read back with the guest's page cache dropped first. Debian's busybox dd prints no rate,
# so benches/disk.sh times these markers on the host.
if [ -b /dev/vda ]; then
	echo "EMBER-DD write-start"
	dd if=/dev/zero of=/dev/vda bs=1M count=32 conv=fsync 2>/dev/null
	echo "EMBER-DD write-end $?"
	echo 3 >/proc/sys/vm/drop_caches
	echo "EMBER-DD read-start"
	dd if=/dev/vda of=/dev/null bs=1M count=32 2>/dev/null
	echo "EMBER-DD read-end $?"
else
	echo "EMBER-DD no /dev/vda"
fi
