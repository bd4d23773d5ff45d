# Sequential throughput of /dev/vdb through the guest's page-cache-free path:
# 64 MiB written (O_DIRECT, then fsync) and read back (O_DIRECT). For benches/disk.sh.
echo "EMBER-DD write $(dd if=/dev/zero of=/dev/vdb bs=1M count=64 oflag=direct conv=fsync 2>&1 | tail -n 1)"
echo "EMBER-DD read $(dd if=/dev/vdb of=/dev/null bs=1M count=64 iflag=direct 2>&1 | tail -n 1)"
