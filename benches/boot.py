#!/usr/bin/env python3
"""Boot benchmark: the guest kit's kernel + initramfs under ember and under
qemu-system-x86_64 -M microvm -enable-kvm, alternating runs, same guest command line and the
same CPU features hidden. For each run: wall time from start to the guest's init marker, and
the VMM's resident memory beside guest RAM at that moment (RSS minus the resident part of the
guest-RAM mapping), plus the VMM's peak RSS. Prints a table.

usage: benches/boot.sh [--runs N] [--cpus N] [--memory MIB] [--kernel vmlinux|bzImage]
"""

import argparse
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.environ.get("EMBER_GUEST_DIR", os.path.join(REPO, "target", "guest"))
MARKER = b"ember-guest: init reached"
FLAGS = "console=ttyS0 quiet tsc=reliable no_timer_check ember.end=shell"
# What ember hides by default where KVM emulates guest kernel code; qemu gets the same list.
HIDDEN = ["cx16", "xsave", "smap", "popcnt", "rdrand", "rdseed", "fsgsbase", "invpcid",
          "pcid", "umip", "pku"]
KVM_PV_HIDDEN = ["kvm-pv-ipi", "kvm-pv-unhalt", "kvm-pv-sched-yield"]


def guest_ram_rss_kib(pid, mem_mib):
    """Resident KiB of the anonymous mapping(s) at least as large as guest RAM."""
    total, size, anon_big = 0, 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    start, end = (int(x, 16) for x in line.split()[0].split("-"))
                    size = (end - start) // 1024
                    anon_big = size >= mem_mib * 1024 and len(line.split()) < 6
                elif anon_big and line.startswith("Rss:"):
                    total += int(line.split()[1])
    except OSError:
        pass
    return total


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_once(argv, mem_mib, limit):
    start = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    buf, elapsed = b"", None
    try:
        while time.monotonic() - start < limit:
            ready, _, _ = select.select([p.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
                if MARKER in buf:
                    elapsed = time.monotonic() - start
                    break
        rss = status_kib(p.pid, "VmRSS")
        hwm = status_kib(p.pid, "VmHWM")
        guest = guest_ram_rss_kib(p.pid, mem_mib)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    if elapsed is None:
        tail = buf[-600:].decode(errors="replace")
        raise RuntimeError(f"no init marker within {limit}s from {argv[0]}:\n{tail}")
    return elapsed, (rss - guest) / 1024, hwm / 1024, buf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--memory", type=int, default=128, help="MiB")
    ap.add_argument("--kernel", default="vmlinux")
    ap.add_argument("--limit", type=int, default=900)
    args = ap.parse_args()

    kernel = os.path.join(GUEST, args.kernel)
    initrd = os.path.join(GUEST, "initramfs.cpio")
    for f in (kernel, initrd):
        if not os.path.isfile(f):
            sys.exit(f"missing {f}: run tests/guest/build.sh first")
    ember = os.path.join(REPO, "target", "release", "ember")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=REPO, check=True)
    qemu = subprocess.run([os.path.join(REPO, "benches", "peers.sh")], check=True,
                          stdout=subprocess.PIPE, text=True).stdout.strip()
    qemu_share = os.path.join(os.path.dirname(os.path.dirname(qemu)), "share")

    extra = os.environ.get("BOOT_EXTRA_CMDLINE", "")
    cmdline = f"{FLAGS} {extra}".strip()

    ember_argv = [ember, "run", "--kernel", kernel, "--initrd", initrd,
                  "--cpus", str(args.cpus), "--memory", f"{args.memory}M",
                  "--cmdline", cmdline]
    # qemu also passes the host's IA32_ARCH_CAPABILITIES MSR through, which kvm_pvm refuses.
    cpu = "host," + ",".join("-" + f for f in HIDDEN + KVM_PV_HIDDEN + ["arch-capabilities"])
    qemu_argv = [qemu, "-L", os.path.join(qemu_share, "qemu"), "-L",
                 os.path.join(qemu_share, "seabios"),
                 "-M", "microvm,x-option-roms=off,rtc=on", "-enable-kvm", "-cpu", cpu,
                 "-smp", str(args.cpus), "-m", str(args.memory), "-nographic",
                 "-no-reboot", "-nodefaults", "-serial", "stdio",
                 "-kernel", kernel, "-initrd", initrd, "-append", cmdline]

    results = {"ember": [], "qemu microvm": []}
    for i in range(args.runs):
        for name, argv in (("ember", ember_argv), ("qemu microvm", qemu_argv)):
            t, overhead, hwm, out = run_once(argv, args.memory, args.limit)
            # On hosts whose KVM shows some hidden features anyway, ember appends
            # clearcpuid=...; the qemu guest gets the same command line.
            m = re.search(rb"so clearcpuid=(\S+) is added", out)
            if name == "ember" and m and "clearcpuid=" not in qemu_argv[-1]:
                qemu_argv[-1] += " clearcpuid=" + m.group(1).decode()
            results[name].append((t, overhead, hwm))
            print(f"run {i + 1} {name:13s} init after {t:6.1f} s, "
                  f"VMM memory beside guest RAM {overhead:6.1f} MiB, peak RSS {hwm:6.1f} MiB",
                  file=sys.stderr)

    print(f"\nboot to init: {args.kernel} + initramfs, {args.cpus} vCPU, {args.memory} MiB, "
          f"{args.runs} alternating runs each")
    print(f"{'VMM':14s} {'median s':>9s} {'min s':>7s} {'max s':>7s} "
          f"{'RSS-guest MiB':>14s} {'peak RSS MiB':>13s}")
    for name, rs in results.items():
        ts = [r[0] for r in rs]
        print(f"{name:14s} {statistics.median(ts):9.1f} {min(ts):7.1f} {max(ts):7.1f} "
              f"{statistics.median(r[1] for r in rs):14.1f} "
              f"{statistics.median(r[2] for r in rs):13.1f}")


if __name__ == "__main__":
    main()
