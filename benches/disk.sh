#!/usr/bin/env bash
# Disk benchmarks, ember vs qemu-img / qemu microvm (see disk.py).
exec python3 "$(dirname "$0")/disk.py" "$@"
