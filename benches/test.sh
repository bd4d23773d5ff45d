#!/usr/bin/env bash
# ember test benchmark: snapshot reset vs cold boots (ember, qemu microvm), -j 2 vs -j 1
# (see test.py). Needs the guest kit and /dev/kvm.
exec python3 "$(dirname "$0")/test.py" "$@"
