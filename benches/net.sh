#!/usr/bin/env bash
# Network benchmark, ember vs qemu microvm on the same tap (see net.py). Needs root.
exec python3 "$(dirname "$0")/net.py" "$@"
