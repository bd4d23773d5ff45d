# Writes a small file and a 1 MiB blob with its checksum to the root disk, then
# syncs: what the host-side tests look for afterwards (disk-check.sh, or debugfs).
mkdir -p /data
echo "ember-disk-test" >/data/hello.txt
head -c 1048576 /bin/busybox >/data/blob
md5sum /data/blob >/data/blob.md5
sync
echo "EMBER-DISK written"
