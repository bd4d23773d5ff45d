#!/usr/bin/env bash
# Boot benchmark, ember vs qemu microvm (see boot.py). Needs the guest kit and /dev/kvm.
exec python3 "$(dirname "$0")/boot.py" "$@"
