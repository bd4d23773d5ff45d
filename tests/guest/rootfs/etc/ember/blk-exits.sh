# For benches/pci.sh: batches of 4 KiB direct-I/O reads, then writes, of /dev/vdb, each
# between a "ready" and a "done" line that the host answers on the console (a newline),
# so it can read Ember's exit counters around every batch. A batch of 0 requests first
# measures what the handshake itself costs. ember.n=N sets the batch size (default 1000).
n=1000
for arg in $cmdline; do
	case "$arg" in ember.n=*) n="${arg#ember.n=}" ;; esac
done
for op in read write; do
	for count in 0 "$n"; do
		echo "EMBER-EXITS $op $count ready"
		read -r _
		if [ "$op" = read ]; then
			dd if=/dev/vdb of=/dev/null bs=4k count="$count" iflag=direct 2>/dev/null
		else
			dd if=/dev/zero of=/dev/vdb bs=4k count="$count" oflag=direct 2>/dev/null
		fi
		echo "EMBER-EXITS done"
		read -r _
	done
done
