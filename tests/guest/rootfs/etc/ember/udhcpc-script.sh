#!/bin/sh
# udhcpc's hook: applies a lease to the interface.
case "$1" in
bound|renew)
	ip addr flush dev "$interface"
	ip addr add "$ip/$mask" dev "$interface"
	[ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
	echo "EMBER-DHCP ip=$ip mask=$mask router=$router"
	;;
esac
