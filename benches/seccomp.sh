#!/usr/bin/env bash
# Confinement overhead (see seccomp.py): seccomp filters on vs off, jailer start-up.
exec python3 "$(dirname "$0")/seccomp.py" "$@"
