#!/usr/bin/env bash
# Snapshot benchmark, ember vs Firecracker (see state.py). Needs /dev/kvm, strace and a
# Firecracker binary ($FIRECRACKER or --firecracker PATH).
exec python3 "$(dirname "$0")/state.py" "$@"
