#!/usr/bin/env python3
"""Disk benchmarks, Ember beside its peers, printed as tables:

1. `ember img bench` vs `qemu-img bench` on the same qcow2 file: 4 KiB "random" (qemu-img
   bench's stepping with a large prime step, so both tools issue the identical offsets) and
   1 MiB sequential, read and write, queue depth 1 and 32.
2. `ember img convert` vs `qemu-img convert` of a 1 GiB image (qcow2 -> raw, raw -> qcow2,
   raw -> compressed qcow2).
3. `ember img snapshot -c/-a/-d` vs `qemu-img snapshot -c/-a/-d` on one 1 GiB qcow2 holding
   512 MiB of data (each tool in turn creates, applies and deletes a snapshot, so the image
   is back where it started before the other's turn).
4. Guest `dd` through virtio-blk (64 MiB write + fsync, read with the guest's page cache
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


def in_turn(run, pair):
    """The pair in the order for run `run`: who goes first alternates, so neither tool
    always pays for what the other left behind (dirty pages, a freed file's blocks)."""
    return pair if run % 2 == 0 else pair[::-1]


def timed(argv):
    return timed_cpu(argv)[0]


def timed_cpu(argv):
    """(wall seconds, CPU seconds: user + system) of one run. On a shared machine the wall
    time also holds waits for a CPU; the CPU time says what the work itself cost."""
    # Dirty pages of the previous run would be written back during this one: not its cost.
    os.sync()
    before = os.times()
    t = time.monotonic()
    sh(*argv)
    wall = time.monotonic() - t
    after = os.times()
    cpu = (after.children_user - before.children_user) + \
        (after.children_system - before.children_system)
    return wall, cpu


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
          f"one untimed warm-up each, median of {runs} alternating runs")
    print(f"{'case':20s} {'ember MiB/s':>12s} {'qemu-img MiB/s':>15s} {'ember IOPS':>11s} "
          f"{'qemu-img IOPS':>14s}")
    for name, args in cases:
        count = int(args[args.index("-c") + 1])
        size = 4096 if "4k" in args else 1 << 20
        res = {"ember": [], "qemu": []}
        argv = {"ember": [EMBER, "img", "bench"], "qemu": ["qemu-img", "bench"]}
        # One untimed warm-up each: the first run of a case would pay for faulting the
        # image back into the page cache for whichever tool goes first.
        for run in range(-1, runs):
            for tool in in_turn(run, ("ember", "qemu")):
                t = timed([*argv[tool], "-f", "qcow2", *args, img])
                if run >= 0:
                    res[tool].append(t)
        e, q = statistics.median(res["ember"]), statistics.median(res["qemu"])
        mib = lambda t: count * size / t / (1 << 20)
        print(f"{name:20s} {mib(e):12.1f} {mib(q):15.1f} {count / e:11.0f} {count / q:14.0f}")


def half_full_image(path):
    """A 1 GiB qcow2 with 512 MiB of data: 1 MiB extents with varied patterns."""
    sh("qemu-img", "create", "-q", "-f", "qcow2", path, "1G")
    cmds = []
    for i in range(0, 1024, 2):
        cmds += ["-c", f"write -P {i % 250 + 1} {i}M 1M"]
    sh("qemu-io", "-f", "qcow2", *cmds, path)


def convert_table(workdir, runs):
    src = os.path.join(workdir, "src.qcow2")
    half_full_image(src)
    raw = os.path.join(workdir, "src.raw")
    sh("qemu-img", "convert", "-O", "raw", src, raw)
    out = os.path.join(workdir, "out")
    cases = [("qcow2 -> raw", ["-O", "raw"], src), ("raw -> qcow2", ["-O", "qcow2"], raw),
             ("raw -> qcow2 -c", ["-c", "-O", "qcow2"], raw)]
    print(f"\n== convert: 1 GiB image, 512 MiB of data, default target cache (unsafe: no "
          f"final sync, as qemu-img), one untimed warm-up each, median of {runs} "
          f"alternating runs")
    print(f"{'case':20s} {'ember s':>9s} {'qemu-img s':>11s} {'ember cpu s':>12s} "
          f"{'qemu-img cpu s':>15s}")
    for name, args, s in cases:
        res = {EMBER: [], "qemu-img": []}
        # The first reader of a freshly written source pays for it: a warm-up for both.
        for run in range(-1, runs):
            for tool in in_turn(run, (EMBER, "qemu-img")):
                if os.path.exists(out):
                    os.remove(out)
                argv = [EMBER, "img", "convert", *args, s, out] if tool == EMBER else \
                    ["qemu-img", "convert", *args, s, out]
                t = timed_cpu(argv)
                if run >= 0:
                    res[tool].append(t)
        med = lambda tool, i: statistics.median(r[i] for r in res[tool])
        print(f"{name:20s} {med(EMBER, 0):9.2f} {med('qemu-img', 0):11.2f} "
              f"{med(EMBER, 1):12.2f} {med('qemu-img', 1):15.2f}")


def snapshot_table(workdir, runs):
    img = os.path.join(workdir, "snap.qcow2")
    half_full_image(img)
    tools = {"ember": [EMBER, "img", "snapshot"], "qemu-img": ["qemu-img", "snapshot"]}
    ops = (("create (-c)", "-c"), ("apply (-a)", "-a"), ("delete (-d)", "-d"))
    res = {(t, op): [] for t in tools for _, op in ops}
    for run in range(runs):
        for tool in in_turn(run, tuple(tools)):
            for _, op in ops:
                res[tool, op].append(timed([*tools[tool], op, "bench", img]))
    sh("qemu-img", "check", img)
    print(f"\n== snapshot: 1 GiB qcow2 with 512 MiB of data, each tool creates, applies and "
          f"deletes a snapshot in turn, median of {runs} alternating runs")
    print(f"{'case':20s} {'ember ms':>9s} {'qemu-img ms':>12s}")
    for name, op in ops:
        e = statistics.median(res["ember", op]) * 1000
        q = statistics.median(res["qemu-img", op]) * 1000
        print(f"{name:20s} {e:9.1f} {q:12.1f}")


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
            snapshot_table(d, args.runs)
        if not args.skip_guest:
            guest_dd(d, max(1, args.runs // 2))


if __name__ == "__main__":
    main()
