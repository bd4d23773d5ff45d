#!/usr/bin/env bash
# Control-API benchmark, ember vs Firecracker, with the tiny test kernel (see api.py).
# Needs /dev/kvm and a firecracker binary ($FIRECRACKER).
exec python3 "$(dirname "$0")/api.py" "$@"
