# For benches/net.sh: ping the host, then 4 MiB to and from it (the host times both).
peer=
for arg in $cmdline; do
	case "$arg" in ember.peer=*) peer="${arg#ember.peer=}" ;; esac
done
ping -c 1 -W 5 "$peer" >/dev/null 2>&1
echo "EMBER-BENCH ping $(ping -c 20 -i 0.2 "$peer" 2>&1 | tail -n 1)"
dd if=/dev/zero bs=64k count=64 2>/dev/null | nc "$peer" 5003
nc "$peer" 5004 </dev/null | dd of=/dev/null bs=64k 2>/dev/null
echo "EMBER-BENCH done"
