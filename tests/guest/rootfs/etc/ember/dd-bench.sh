# Sequential throughput of /dev/vdb: 64 MiB written (fsync at the end), then read back with
# the guest's page cache dropped first. For benches/disk.sh.
echo "EMBER-DD write $(dd if=/dev/zero of=/dev/vdb bs=1M count=64 conv=fsync 2>&1 | tail -n 1)"
echo 3 >/proc/sys/vm/drop_caches
echo "EMBER-DD read $(dd if=/dev/vdb of=/dev/null bs=1M count=64 2>&1 | tail -n 1)"
