# Reports eth0's carrier as the host takes its tap down and up again (two changes, or
# give up after about two minutes).
read -r carrier </sys/class/net/eth0/carrier
echo "EMBER-LINK watching carrier=$carrier"
changes=0
n=0
while [ $changes -lt 2 ] && [ $n -lt 120 ]; do
	sleep 1
	read -r now </sys/class/net/eth0/carrier
	if [ "$now" != "$carrier" ]; then
		echo "EMBER-LINK carrier=$now"
		carrier=$now
		changes=$((changes + 1))
	fi
	n=$((n + 1))
done
