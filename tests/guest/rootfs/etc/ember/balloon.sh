# For tests/balloon_guest.rs and benches/balloon.sh: fills a tmpfs with ember.fill= MiB
# (default 96) and removes it, so the host holds those pages while the
# guest has them free; ember.rounds=N does that N times, reading a line from the console
# before each round after the first (the host says when). Then prints MemTotal and
# MemAvailable every 2 s (ember.watch= times, default 300) for the host to follow the
# balloon. Builtins only, apart from mount, dd and sleep.
fill=96
rounds=1
watch=300
for arg in $cmdline; do
	case "$arg" in
	ember.fill=*) fill="${arg#ember.fill=}" ;;
	ember.rounds=*) rounds="${arg#ember.rounds=}" ;;
	ember.watch=*) watch="${arg#ember.watch=}" ;;
	esac
done
meminfo() {
	while read -r key value _; do
		case "$key" in
		MemTotal:) total=$value ;;
		MemAvailable:) avail=$value ;;
		esac
	done </proc/meminfo
	echo "EMBER-MEM total=$total avail=$avail"
}
mkdir -p /mnt/fill
mount -t tmpfs -o size=$((fill + 16))m tmpfs /mnt/fill
meminfo
round=1
while [ $round -le "$rounds" ]; do
	if [ $round -gt 1 ]; then
		echo "EMBER-BALLOON waiting"
		read -r _
	fi
	echo "EMBER-BALLOON filling $fill"
	dd if=/dev/zero of=/mnt/fill/data bs=1M count="$fill" 2>/dev/null
	echo "EMBER-BALLOON filled"
	rm /mnt/fill/data
	echo "EMBER-BALLOON freed $round"
	meminfo
	round=$((round + 1))
done
umount /mnt/fill
n=0
while [ $n -lt "$watch" ]; do
	sleep 2
	meminfo
	n=$((n + 1))
done
