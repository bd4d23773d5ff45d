#!/usr/bin/env python3
"""Disk benchmarks, Ember beside its peers, printed as tables:

1. `ember img bench` vs `qemu-img bench` on the same qcow2 file: 4 KiB "random" (qemu-img
   bench's stepping with a large prime step, so both tools issue the identical offsets) and
   1 MiB sequential, read and write, queue depth 1 and 32.
2. `ember img convert` vs `qemu-img convert` of a 1 GiB image (qcow2 -> raw, raw -> qcow2,
   raw -> compressed qcow2).
3. Guest `dd` through virtio-blk (64 MiB write + fsync, read with the guest's page cache
   dropped) under ember vs qemu microvm, same guest.

usage: benches/disk.sh [--skip-guest | --guest-only] [--runs N]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from peer import EMBER, GUEST, REPO, clearcpuid, qemu_microvm


def sh(*argv, **kw):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kw)


def timed(argv):
    # Dirty pages of the previous run would be written back during this one: not its cost.
    os.sync()
    t = time.monotonic()
    sh(*argv)
    return time.monotonic() - t


def bench_table(workdir, runs):
    img = os.path.join(workdir, "bench.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", img, "1G")
    step4k = str(4096 * 7919)
    cases = [
        ("4K rand read  qd1", ["-c", "20000", "-d", "1", "-s", "4k", "-S", step4k]),
        ("4K rand read  qd32", ["-c", "20000", "-d", "32", "-s", "4k", "-S", step4k]),
        ("4K rand write qd1", ["-w", "-c", "20000", "-d", "1", "-s", "4k", "-S", step4k]),
        ("4K rand write qd32", ["-w", "-c", "20000", "-d", "32", "-s", "4k", "-S", step4k]),
        ("1M seq read   qd1", ["-c", "1000", "-d", "1", "-s", "1M"]),
        ("1M seq read   qd32", ["-c", "1000", "-d", "32", "-s", "1M"]),
        ("1M seq write  qd1", ["-w", "-c", "1000", "-d", "1", "-s", "1M"]),
        ("1M seq write  qd32", ["-w", "-c", "1000", "-d", "32", "-s", "1M"]),
    ]
    print("\n== img bench: 1 GiB qcow2 (preallocation=full), cache=writeback, "
          f"median of {runs} alternating runs")
    print(f"{'case':20s} {'ember MiB/s':>12s} {'qemu-img MiB/s':>15s} {'ember IOPS':>11s} "
          f"{'qemu-img IOPS':>14s}")
    for name, args in cases:
        count = int(args[args.index("-c") + 1])
        size = 4096 if "4k" in args else 1 << 20
        res = {"ember": [], "qemu": []}
        for _ in range(runs):
            res["ember"].append(timed([EMBER, "img", "bench", "-f", "qcow2", *args, img]))
            res["qemu"].append(timed(["qemu-img", "bench", "-f", "qcow2", *args, img]))
        e, q = statistics.median(res["ember"]), statistics.median(res["qemu"])
        mib = lambda t: count * size / t / (1 << 20)
        print(f"{name:20s} {mib(e):12.1f} {mib(q):15.1f} {count / e:11.0f} {count / q:14.0f}")


def convert_table(workdir, runs):
    src = os.path.join(workdir, "src.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", src, "1G")
    cmds = []
    for i in range(0, 1024, 2):  # half the disk: 1 MiB extents with varied patterns
        cmds += ["-c", f"write -P {i % 250 + 1} {i}M 1M"]
    sh("qemu-io", "-f", "qcow2", *cmds, src)
    raw = os.path.join(workdir, "src.raw")
    sh("qemu-img", "convert", "-O", "raw", src, raw)
    out = os.path.join(workdir, "out")
    cases = [("qcow2 -> raw", ["-O", "raw"], src), ("raw -> qcow2", ["-O", "qcow2"], raw),
             ("raw -> qcow2 -c", ["-c", "-O", "qcow2"], raw)]
    print(f"\n== convert: 1 GiB image, 512 MiB of data, default target cache (unsafe: no "
          f"final sync, as qemu-img), median of {runs} alternating runs")
    print(f"{'case':20s} {'ember s':>9s} {'qemu-img s':>11s}")
    for name, args, s in cases:
        e, q = [], []
        for _ in range(runs):
            for tool, acc in ((EMBER, e), ("qemu-img", q)):
                if os.path.exists(out):
                    os.remove(out)
                argv = [EMBER, "img", "convert", *args, s, out] if tool == EMBER else \
                    ["qemu-img", "convert", *args, s, out]
                acc.append(timed(argv))
        print(f"{name:20s} {statistics.median(e):9.2f} {statistics.median(q):11.2f}")


DD_MIB = 32


def timed_markers(argv, prefix):
    """Runs a guest to the end; returns {word: rest, (word, "t"): host time} for each serial
    line `prefix word rest`, and all output lines."""
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    at, out = {}, []
    for line in p.stdout:
        out.append(line)
        if line.startswith(prefix):
            word, _, rest = line[len(prefix):].strip().partition(" ")
            at[word], at[word, "t"] = rest, time.monotonic()
    p.wait(timeout=60)
    return at, out


def guest_dd(workdir, runs):
    kernel = os.path.join(GUEST, "vmlinux")
    initrd = os.path.join(GUEST, "initramfs.cpio")
    disk = os.path.join(workdir, "dd.raw")
    sh("qemu-img", "create", "-q", "-f", "raw", disk, "256M")
    base = "console=ttyS0 quiet tsc=reliable no_timer_check ember.run=dd-bench ember.end=poweroff"
    qemu_cmdline = base + clearcpuid(kernel)
    vmms = {
        "ember": [EMBER, "run", "--kernel", kernel, "--initrd", initrd, "--memory", "128M",
                  "--disk", f"path={disk},format=raw", "--cmdline", base],
        "qemu microvm": qemu_microvm(128, kernel, initrd) + [
                         "-drive", f"id=d0,file={disk},format=raw,if=none,cache=writeback",
                         "-device", "virtio-blk-device,drive=d0", "-append", qemu_cmdline],
    }
    rates = {k: {"write": [], "read": []} for k in vmms}
    for _ in range(runs):
        for name, argv in vmms.items():
            at, out = timed_markers(argv, "EMBER-DD ")
            for kind in ("write", "read"):
                if at.get(f"{kind}-end") != "0" or f"{kind}-start" not in at:
                    sys.exit(f"{name}: no dd {kind} result:\n{''.join(out)[-1500:]}")
                secs = at[f"{kind}-end", "t"] - at[f"{kind}-start", "t"]
                rates[name][kind].append(DD_MIB / secs)
    print(f"\n== guest dd through virtio-blk: {DD_MIB} MiB, bs=1M, write+fsync then read with "
          f"the guest page cache dropped, raw image, timed on the host from the guest's "
          f"markers, median of {runs} runs")
    print(f"{'VMM':14s} {'write MiB/s':>12s} {'read MiB/s':>11s}")
    for name, r in rates.items():
        print(f"{name:14s} {statistics.median(r['write']):12.2f} "
              f"{statistics.median(r['read']):11.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-guest", action="store_true")
    ap.add_argument("--guest-only", action="store_true")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=REPO, check=True)
    with tempfile.TemporaryDirectory(dir=os.path.join(REPO, "target")) as d:
        if not args.guest_only:
            bench_table(d, args.runs)
            convert_table(d, args.runs)
        if not args.skip_guest:
            guest_dd(d, max(1, args.runs // 2))


if __name__ == "__main__":
    main()
