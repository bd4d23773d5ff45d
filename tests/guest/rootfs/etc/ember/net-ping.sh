# Pings ember.peer= (retrying for up to a minute while the peer comes up).
peer=
for arg in $cmdline; do
	case "$arg" in ember.peer=*) peer="${arg#ember.peer=}" ;; esac
done
tries=0
until ping -c 1 -W 2 "$peer" >/dev/null 2>&1; do
	tries=$((tries + 1))
	[ $tries -ge 30 ] && break
done
if [ $tries -lt 30 ]; then
	echo "EMBER-PING ok $(ping -c 3 -W 2 "$peer" 2>&1 | tail -n 1)"
else
	echo "EMBER-PING fail"
fi
