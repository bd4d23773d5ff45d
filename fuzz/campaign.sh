#!/usr/bin/env bash
# One fuzzing campaign: each target named (default: all nine) for MINUTES (default 15)
# wall-clock minutes, nice'd, at most JOBS (default 3) at once. New units go to
# $OUT/corpus/<target> (seeded from corpus/<target>), crashes to $OUT/artifacts/<target>/,
# logs to $OUT/<target>.log; a summary line per target ends each log
# (libFuzzer's "Done N runs" and final stats).
#
#   fuzz/campaign.sh                      # everything, 15 minutes each
#   MINUTES=1 fuzz/campaign.sh qcow2_write virtio_mmio
set -euo pipefail
cd "$(dirname "$0")"
MINUTES="${MINUTES:-15}"
JOBS="${JOBS:-3}"
OUT="${OUT:-/tmp/ember-fuzz}"
# The targets make temporary images and disks: in memory when it can.
[ -w /dev/shm ] && export TMPDIR="${TMPDIR:-/dev/shm}"
ALL=(qcow2_write virtio_mmio qcow2_image virtio_blk_request virtio_net api_request
     pci_config snapshot_state migration_stream)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${ALL[@]}")

args_for() {
    case "$1" in
        qcow2_image) echo "-max_len=131072" ;;
        qcow2_write|snapshot_state|migration_stream) echo "-max_len=65536 -rss_limit_mb=2048" ;;
        virtio_blk_request|api_request) echo "-max_len=16384" ;;
        virtio_net) echo "-max_len=8192" ;;
        *) echo "-max_len=4096" ;;
    esac
}

if [ ${#targets[@]} -eq 1 ]; then
    RUSTC_BOOTSTRAP=1 nice -n 19 cargo fuzz build -O "${targets[0]}"
else
    RUSTC_BOOTSTRAP=1 nice -n 19 cargo fuzz build -O
fi
run() {
    local t="$1"
    mkdir -p "$OUT/corpus/$t" "$OUT/artifacts/$t"
    # shellcheck disable=SC2046
    nice -n 19 "target/x86_64-unknown-linux-gnu/release/$t" "$OUT/corpus/$t" "corpus/$t" \
        -max_total_time=$((MINUTES * 60)) -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$OUT/artifacts/$t/" $(args_for "$t") >"$OUT/$t.log" 2>&1 || true
    echo "$t: $(grep -E '^Done [0-9]+ runs' "$OUT/$t.log" || echo 'stopped early (crash?)'); " \
         "$(grep -E 'average_exec_per_sec' "$OUT/$t.log" | tr -s ' ')" \
         "crashes: $(ls "$OUT/artifacts/$t" | wc -l)"
}
mkdir -p "$OUT"
running=0
for t in "${targets[@]}"; do
    run "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
        wait -n
        running=$((running - 1))
    fi
done
wait
