# Prints what the guest sees, one line, for the host-side tests to parse.
flags=$(grep -m1 '^flags' /proc/cpuinfo)
hidden=
for f in cx16 xsave smap; do
	case " ${flags#*:} " in *" $f "*) hidden="$hidden$f+" ;; *) hidden="$hidden$f-" ;; esac
done
echo "EMBER-INFO cpus=$(grep -c ^processor /proc/cpuinfo)" \
	"online=$(cat /sys/devices/system/cpu/online)" \
	"mem_kb=$(awk '/^MemTotal/ {print $2}' /proc/meminfo)" \
	"features=$hidden" \
	"kernel=$(uname -r)"
