# Brings up eth0 and asks for a DHCP lease (udhcpc calls udhcpc-script.sh).
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -n -q -t 20 -T 3 -s /etc/ember/udhcpc-script.sh || echo "EMBER-DHCP none"
