# What the guest sees on PCI, lspci-like from sysfs (builtins only): one line per function
# with its vendor:device, class and driver; then the interrupt lines of virtio devices as
# /proc/interrupts counts them (PCI-MSI ones are MSI-X vectors).
for dev in /sys/bus/pci/devices/*; do
	[ -e "$dev/vendor" ] || continue
	read -r vendor <"$dev/vendor"
	read -r device <"$dev/device"
	read -r class <"$dev/class"
	driver=none
	for drv in /sys/bus/pci/drivers/*; do
		[ -e "$drv/${dev##*/}" ] && driver=${drv##*/}
	done
	echo "EMBER-PCI ${dev##*/} $vendor:$device class=$class driver=$driver"
done
while read -r line; do
	case "$line" in *virtio*) echo "EMBER-IRQ $line" ;; esac
done </proc/interrupts
