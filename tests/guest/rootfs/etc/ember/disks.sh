# One line per virtio disk: name, size in 512-byte sectors, read-only flag, serial.
for dev in /sys/block/vd*; do
	[ -e "$dev/size" ] || continue
	read -r sectors <"$dev/size"
	read -r ro <"$dev/ro"
	serial=
	[ -e "$dev/serial" ] && read -r serial <"$dev/serial"
	echo "EMBER-BLOCK ${dev##*/} sectors=$sectors ro=$ro serial=$serial"
done
