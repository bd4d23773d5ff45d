#!/usr/bin/env bash
# Live migration benchmark, ember vs qemu's migrate (see migrate.py). Needs the guest kit,
# /dev/kvm, and qemu from benches/peers.sh.
exec python3 "$(dirname "$0")/migrate.py" "$@"
