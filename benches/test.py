#!/usr/bin/env python3
"""ember test benchmark: N cases on the guest kit, each running one shell command in the
guest, measured in one run four ways:

  1. ember test, snapshot reset, -j 1: one shared boot to init's ready line, then every case
     restored from that snapshot (measured: all N cases);
  2. the same with -j J (measured: all N cases);
  3. each case as its own cold boot under `ember run` (measured on --cold cases, the total
     for N extrapolated from their mean);
  4. the same under qemu-system-x86_64 -M microvm (measured on --cold cases, extrapolated).

A cold case boots the same kernel, initramfs and command line (plus ember.test=serial),
waits for init's ready line, writes the command, and ends at the result line: the same
protocol `ember test` speaks. For the snapshot runs the table also shows, per case, the time
from the case's start to the guest running its command (JSON `command_start_secs`).

usage: benches/test.sh [--cases N] [--cold K] [--jobs J] [--no-qemu] [--command CMD]
(the guest kit from $EMBER_GUEST_DIR, default target/guest)
"""

import argparse
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from peer import EMBER, REPO, qemu_microvm

GUEST = os.environ.get("EMBER_GUEST_DIR", os.path.join(REPO, "target", "guest"))

FLAGS = "console=ttyS0 quiet tsc=reliable no_timer_check"
READY = b"ember-test: ready"
RESULT = re.compile(rb"ember-test: exit=(\d+)")


def test_file(path, cases, command):
    kernel = os.path.join(GUEST, "vmlinux")
    initrd = os.path.join(GUEST, "initramfs.cpio")
    with open(path, "w") as f:
        f.write(f'[boot]\nkernel = "{kernel}"\ninitrd = "{initrd}"\n'
                f'cmdline = "{FLAGS}"\nmemory = "128M"\ntimeout = "900s"\n')
        for i in range(cases):
            f.write(f'\n[[case]]\nname = "case-{i + 1:03d}"\nrun = {json.dumps(command)}\n'
                    f'expect = ["^case-ok$"]\ntimeout = "120s"\n')


def ember_test(path, jobs, out):
    """Runs ember test; returns (wall seconds, shared boot seconds, JSON report)."""
    report = os.path.join(out, f"report-j{jobs}.json")
    start = time.monotonic()
    p = subprocess.run([EMBER, "test", path, "-j", str(jobs), "--out",
                        os.path.join(out, f"logs-j{jobs}"), "--json", report],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - start
    with open(report) as f:
        data = json.load(f)
    bad = [c["name"] for c in data["cases"] if c["status"] != "passed"]
    if p.returncode != 0 or bad:
        sys.exit(f"ember test -j {jobs} failed ({p.returncode}): {bad}\n{p.stdout}\n{p.stderr}")
    m = re.search(r"BOOTED\s+([0-9.]+)s", p.stderr)
    if not m:
        sys.exit(f"no BOOTED line from ember test:\n{p.stderr}")
    return wall, float(m.group(1)), data


def cold_case(argv, command, limit):
    """One cold boot speaking the channel; returns seconds from start to the result line."""
    start = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    buf, sent, result = b"", False, None
    try:
        while time.monotonic() - start < limit:
            r, _, _ = select.select([p.stdout], [], [], 1.0)
            if not r:
                continue
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            if not sent and READY in buf:
                p.stdin.write(b"\n" + command.encode() + b"\n\x04")
                p.stdin.flush()
                sent = True
            m = RESULT.search(buf)
            if m:
                result = time.monotonic() - start
                break
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    if result is None or b"case-ok" not in buf:
        tail = buf[-800:].decode(errors="replace")
        raise RuntimeError(f"{argv[0]}: no result within {limit}s:\n{tail}")
    return result


def clearcpuid_of(kernel):
    """' clearcpuid=...' as ember adds it on this host (qemu's guest gets the same)."""
    p = subprocess.Popen([EMBER, "run", "--kernel", kernel, "--memory", "128M", "--serial",
                          "none", "--no-api"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()
    finally:
        p.kill()
        p.wait()
    m = re.search(r"so clearcpuid=(\S+) is added", line)
    return f" clearcpuid={m.group(1)}" if m else ""


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--cold", type=int, default=3, help="cold boots measured per VMM")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--command", default="echo case-ok",
                    help="the shell command each case runs (must print case-ok)")
    ap.add_argument("--limit", type=int, default=1800, help="seconds per cold boot")
    args = ap.parse_args()
    kernel = os.path.join(GUEST, "vmlinux")
    initrd = os.path.join(GUEST, "initramfs.cpio")
    for f in (kernel, initrd):
        if not os.path.isfile(f):
            sys.exit(f"missing {f}: run tests/guest/build.sh first")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=REPO, check=True)
    load_before = os.getloadavg()[0]
    out = tempfile.mkdtemp(prefix="ember-test-bench-")
    path = os.path.join(out, "bench.toml")
    test_file(path, args.cases, args.command)

    rows = {}
    for jobs in (1, args.jobs):
        wall, boot, data = ember_test(path, jobs, out)
        durs = [c["duration_secs"] for c in data["cases"]]
        starts = [c["command_start_secs"] for c in data["cases"]]
        rows[f"ember test -j {jobs} (snapshot reset)"] = (wall, boot, durs, starts)
        print(f"ember test -j {jobs}: {args.cases} cases in {wall:.1f} s "
              f"(shared boot {boot:.1f} s)", file=sys.stderr)

    cmdline = f"{FLAGS} ember.test=serial"
    cold = {"ember run (cold boot each)": [EMBER, "run", "--kernel", kernel, "--initrd",
                                           initrd, "--memory", "128M", "--serial", "stdio",
                                           "--no-api", "--cmdline", cmdline]}
    if not args.no_qemu:
        cold["qemu microvm (cold boot each)"] = (
            qemu_microvm(128, kernel, initrd) + ["-append", cmdline + clearcpuid_of(kernel)])
    cold_times = {name: [] for name in cold}
    for i in range(args.cold):
        for name, argv in cold.items():
            try:
                t = cold_case(argv, args.command, args.limit)
            except RuntimeError as e:
                print(f"cold {i + 1} {name}: FAILED: {e}", file=sys.stderr)
                continue
            cold_times[name].append(t)
            print(f"cold {i + 1} {name}: {t:.1f} s", file=sys.stderr)

    load_after = os.getloadavg()[0]
    print(f"\nember test benchmark: {args.cases} cases on the guest kit (vmlinux + initramfs, "
          f"128 MiB, 1 vCPU), each running `{args.command}`")
    print(f"host load average {load_before:.1f} before, {load_after:.1f} after "
          f"({os.cpu_count()} CPUs)\n")
    print(f"{'how':34s} {'total s':>9s} {'':>13s} {'shared boot s':>14s} "
          f"{'per case s':>11s} {'case start to command s':>24s}")
    for name, (wall, boot, durs, starts) in rows.items():
        print(f"{name:34s} {wall:9.1f} {'(measured)':>13s} {boot:14.1f} {med(durs):11.3f} "
              f"{med(starts):12.3f} (max {max(starts):.3f})")
    if not cold_times["ember run (cold boot each)"]:
        sys.exit("no ember cold boot finished")
    for name, ts in cold_times.items():
        if not ts:
            print(f"{name:34s} {'(no run finished)':>24s}")
            continue
        mean = statistics.mean(ts)
        print(f"{name:34s} {mean * args.cases:9.1f} {f'(est. from {len(ts)})':>13s} "
              f"{'-':>14s} {mean:11.3f}")
    ember_runs = cold_times["ember run (cold boot each)"]
    ember_cold = statistics.mean(ember_runs)
    wall1, _, durs1, _ = rows["ember test -j 1 (snapshot reset)"]
    marginal = med(durs1)
    print(f"\nsnapshot reset: a case costs {marginal:.3f} s (median), "
          f"{100 * marginal / ember_cold:.2f}% of an ember cold boot to the same result "
          f"({ember_cold:.1f} s mean of {len(ember_runs)})")
    wallj, _, _, _ = rows[f"ember test -j {args.jobs} (snapshot reset)"]
    print(f"-j {args.jobs} vs -j 1: {wallj:.1f} s vs {wall1:.1f} s total "
          f"(the shared boot is in both)")


if __name__ == "__main__":
    main()
