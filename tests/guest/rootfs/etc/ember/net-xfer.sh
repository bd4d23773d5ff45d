# Moves data both ways with the host at ember.peer=: receives from port 5001, sends 4 MiB
# to port 5002, and prints the checksums for the host to compare.
peer=
for arg in $cmdline; do
	case "$arg" in ember.peer=*) peer="${arg#ember.peer=}" ;; esac
done
nc "$peer" 5001 </dev/null >/tmp/in
echo "EMBER-XFER in bytes=$(wc -c </tmp/in) md5=$(md5sum </tmp/in)"
cat /bin/busybox /bin/busybox >/tmp/out
nc "$peer" 5002 </tmp/out
echo "EMBER-XFER out bytes=$(wc -c </tmp/out) md5=$(md5sum </tmp/out)"
