# Brings up lo and eth0, with the address in ember.ip=ADDR/PREFIX when given.
addr=
for arg in $cmdline; do
	case "$arg" in ember.ip=*) addr="${arg#ember.ip=}" ;; esac
done
ip link set lo up
ip link set eth0 up
[ -n "$addr" ] && ip addr add "$addr" dev eth0
read -r mac </sys/class/net/eth0/address
echo "EMBER-NET eth0 mac=$mac ip=$addr"
