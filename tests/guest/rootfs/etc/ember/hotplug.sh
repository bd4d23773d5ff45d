# PCI hotplug, driven by tests/hotplug_guest.rs: the host attaches a disk (an ext4 image
# holding hello.txt), the guest reads it, writes guest.txt and reads it back, the host
# detaches it; then the host attaches a NIC, the guest pings ember.peer= through it, the
# host detaches it; then the host attaches a second disk and the guest ejects it itself. Each step waits for the device to appear or go (the kernel's ACPI PCI
# hotplug does the work: no rescan here) and prints an EMBER-HP line.
hp_addr= hp_peer=
for arg in $cmdline; do
	case "$arg" in
	ember.ip=*) hp_addr="${arg#ember.ip=}" ;;
	ember.peer=*) hp_peer="${arg#ember.peer=}" ;;
	esac
done
# hp_now: whole seconds of uptime in $hp_s (a builtin read: no fork).
hp_now() { read -r hp_s _ </proc/uptime; hp_s=${hp_s%.*}; }
# A 0.2 s wait without a fork (seconds each where guest kernel code is emulated): a read
# with a timeout on a FIFO nobody writes; a forked sleep if that does not wait.
mkfifo /tmp/.hp-nap
exec 3<>/tmp/.hp-nap
hp_nap() { read -t 0.2 -u 3 _; }
hp_now
hp_t0=$hp_s
for _ in 1 2 3 4 5 6 7 8 9 10; do hp_nap; done
hp_now
if [ $((hp_s - hp_t0)) -lt 1 ]; then
	hp_nap() { sleep 0.2; }
	echo "EMBER-HP nap=sleep"
else
	echo "EMBER-HP nap=fifo"
fi
# hp_wait TEST... : until TEST holds, for at most 10 minutes; false when it never did.
hp_wait() {
	hp_now
	hp_end=$((hp_s + 600))
	until "$@"; do
		hp_now
		[ "$hp_s" -ge $hp_end ] && return 1
		hp_nap
	done
	return 0 # (the loop's status is its last nap's, a timeout)
}
hp_gone() { ! [ -e "$1" ]; }

echo "EMBER-HP ready"
if hp_wait [ -b /dev/vda ]; then
	echo "EMBER-HP disk-seen vda uptime=$hp_s"
	mount -t ext4 /dev/vda /mnt
	read -r hello </mnt/hello.txt
	head -c 65536 /bin/busybox >/mnt/guest.txt
	set -- $(md5sum </mnt/guest.txt)
	wrote=$1
	umount /mnt
	mount -t ext4 -o ro /dev/vda /mnt
	set -- $(md5sum </mnt/guest.txt)
	umount /mnt
	echo "EMBER-HP disk-rw hello=$hello wrote=$wrote read=$1"
	hp_wait hp_gone /dev/vda && echo "EMBER-HP disk-gone uptime=$hp_s"
else
	echo "EMBER-HP disk-never-seen"
fi
if hp_wait [ -e /sys/class/net/eth0 ]; then
	echo "EMBER-HP nic-seen eth0 uptime=$hp_s"
	ip link set eth0 up
	ip addr add "$hp_addr" dev eth0
	tries=0
	until ping -c 1 -W 2 "$hp_peer" >/dev/null 2>&1; do
		tries=$((tries + 1))
		[ $tries -ge 30 ] && break
	done
	if [ $tries -lt 30 ]; then echo "EMBER-HP ping ok"; else echo "EMBER-HP ping fail"; fi
	hp_wait hp_gone /sys/class/net/eth0 && echo "EMBER-HP nic-gone uptime=$hp_s"
else
	echo "EMBER-HP nic-never-seen"
fi
# A second disk, which the guest gives back on its own: the slot's power off in sysfs (ACPI
# _EJ0), as a user of a QEMU guest may do; the host sees the disk go.
if hp_wait [ -b /dev/vda ]; then
	hp_dev=$(readlink -f /sys/block/vda)
	hp_slot=none
	for s in /sys/bus/pci/slots/*; do
		read -r a <"$s/address"
		case "$hp_dev" in */"$a".0/*) hp_slot=${s##*/} ;; esac
	done
	[ "$hp_slot" != none ] && echo 0 >"/sys/bus/pci/slots/$hp_slot/power"
	hp_wait hp_gone /dev/vda && echo "EMBER-HP self-eject slot=$hp_slot uptime=$hp_s"
else
	echo "EMBER-HP disk2-never-seen"
fi
exec 3<&-
