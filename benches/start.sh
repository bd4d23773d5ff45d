#!/usr/bin/env bash
# Start-up benchmark: a tiny kernel from exec to exit under ember, Firecracker, Cloud
# Hypervisor and qemu microvm (see start.py). Needs /dev/kvm; peers as ../shared/PEERS.md says.
exec python3 "$(dirname "$0")/start.py" "$@"
