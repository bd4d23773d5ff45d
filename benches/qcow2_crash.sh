#!/usr/bin/env bash
# qcow2 crash-safety campaign: EMBER_CRASH_POINTS (default 1000) kill -9 points of the
# qcow2 writer across cluster sizes (512 B .. 2 MiB), refcount widths (1 .. 64 bits), no
# backing / raw backing / qcow2-over-raw chain, with and without internal snapshots. A
# point fails when `qemu-img check` finds corruption, a flushed write is lost, or a
# snapshot does not hold what the disk held when it was taken. Prints a table per
# configuration: points, failures, points killed inside a snapshot create/delete, and of
# those the ones where `qemu-img check` found only clusters with refcount 1 and COPIED
# clear (the window between clearing the flags and writing the new refcounts; harmless, a
# write copies such a cluster once; qemu's own snapshot creation has a similar window;
# `qemu-img check -r all` must repair them and the data checks still apply).
# Not part of CI (tests/qcow2_crash.rs's default test runs 40 points).
#
#   benches/qcow2_crash.sh                      # 1,000 points, nice'd
#   EMBER_CRASH_POINTS=210 benches/qcow2_crash.sh   # every configuration once
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "qemu-img not found" >&2; exit 2; }
export EMBER_CRASH_POINTS="${EMBER_CRASH_POINTS:-1000}"
export EMBER_CRASH_FIRST_SEED="${EMBER_CRASH_FIRST_SEED:-1000}"
exec nice -n "${NICE:-19}" cargo test --release --test qcow2_crash -- \
    --ignored --exact crash_campaign --nocapture --test-threads=1
