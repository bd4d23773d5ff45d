#!/usr/bin/env bash
# Balloon benchmark: ember's VmRSS before and after inflating (see balloon.py). Needs the
# guest kit and /dev/kvm.
exec python3 "$(dirname "$0")/balloon.py" "$@"
