#!/usr/bin/env bash
# PCI hotplug latency: attach-disk to /dev/vdX usable in the guest, detach-disk to the
# guest's release, the same for a NIC (see hotplug.py). Needs root (a tap in a netns).
exec python3 "$(dirname "$0")/hotplug.py" "$@"
