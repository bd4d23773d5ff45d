# Prints what the guest sees, one line, for the host-side tests to parse (builtins only).
cpus=0
flags=
while read -r key rest; do
	case "$key" in
	processor) cpus=$((cpus + 1)) ;;
	flags) [ -z "$flags" ] && flags=" ${rest#*: } " ;;
	esac
done </proc/cpuinfo
features=
for f in cx16 xsave smap; do
	case "$flags" in *" $f "*) features="$features$f+" ;; *) features="$features$f-" ;; esac
done
while read -r key value _; do
	[ "$key" = MemTotal: ] && mem_kb=$value
done </proc/meminfo
read -r online </sys/devices/system/cpu/online
read -r release </proc/sys/kernel/osrelease
echo "EMBER-INFO cpus=$cpus online=$online mem_kb=$mem_kb features=$features kernel=$release"
