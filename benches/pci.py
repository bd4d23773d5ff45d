#!/usr/bin/env python3
"""virtio-pci vs virtio-mmio with the guest kit's kernel, one boot per transport: the root
disk (a qcow2 overlay on rootfs.ext4) and a 16 MiB raw disk both on the transport under
test. For each boot: wall time from start to the guest's init marker, then exits to Ember
per 4 KiB virtio-blk request: the guest (etc/ember/blk-exits.sh) runs batches of N direct
reads, then writes, of /dev/vdb, each between two console lines this script answers after
reading Ember's exit counters (`ember domstats`); a batch of 0 requests measures the
handshake itself, which is subtracted. Exits counted are those Ember's vCPU loop sees
(port and MMIO accesses that reach the VMM, and the rest); ioeventfd and irqfd traffic
never leaves KVM. Ember's CPU time until init (the vCPU thread's, where KVM emulates guest
kernel code, counts there) is steadier than wall time on a shared host. Prints a table;
with one run per transport (80 s boots) the boot times are single samples.

usage: benches/pci.sh [--runs N] [--requests N] [--memory MIB]
"""

import argparse
import os
import select
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.environ.get("EMBER_GUEST_DIR", os.path.join(REPO, "target", "guest"))
EMBER = os.environ.get("EMBER_BIN", os.path.join(REPO, "target", "release", "ember"))
FLAGS = "console=ttyS0 quiet tsc=reliable no_timer_check"
MARKER = "ember-guest: init reached"
EXIT_KINDS = ("pio_in", "pio_out", "mmio_read", "mmio_write", "other")


def ember(env, *args):
    return subprocess.run([EMBER, *args], env=env, check=True, capture_output=True,
                          text=True).stdout


def domstats(env, name):
    stats = {}
    for line in ember(env, "domstats", name).splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            stats[key] = value
    return stats


def exits(stats):
    return sum(int(v) for k, v in stats.items()
               if k.startswith("vcpus.") and k.rsplit(".", 1)[-1] in EXIT_KINDS)


def cpu_seconds(pid):
    """User + system CPU time of a process (its vCPU threads' guest time included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disk_ops(stats, index):
    return sum(int(stats.get(f"disks.{index}.stats.{k}", 0)) for k in ("read_ops", "write_ops"))


class Guest:
    """An ember process whose console lines arrive through `line()`."""

    def __init__(self, argv, env, limit):
        self.p = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buf = b""
        self.deadline = time.monotonic() + limit

    def line(self):
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0 or self.p.poll() is not None:
                raise RuntimeError("the guest stopped talking: " + self.buf.decode(errors="replace"))
            r, _, _ = select.select([self.p.stdout], [], [], min(left, 1.0))
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError("ember's console closed")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def expect(self, text):
        while True:
            line = self.line()
            if text in line:
                return line

    def answer(self):
        self.p.stdin.write(b"\n")
        self.p.stdin.flush()


def run_once(transport, args, work):
    env = dict(os.environ, EMBER_STATE_DIR=os.path.join(work, "state"),
               EMBER_CONFIG_DIR=os.path.join(work, "config"))
    top = os.path.join(work, f"{transport}.qcow2")
    extra = os.path.join(work, f"{transport}.raw")
    for f in (top, extra):
        if os.path.exists(f):
            os.unlink(f)
    ember(env, "img", "create", "-q", "-f", "qcow2", "-b", os.path.join(GUEST, "rootfs.ext4"),
          "-F", "raw", top)
    ember(env, "img", "create", "-q", "-f", "raw", extra, "16M")
    name = f"bench-{transport}"
    argv = [EMBER, "run", "--name", name, "--kernel", os.path.join(GUEST, "vmlinux"),
            "--memory", f"{args.memory}M", "--root", "/dev/vda",
            "--disk", f"path={top},transport={transport}",
            "--disk", f"path={extra},format=raw,transport={transport}",
            "--cmdline", f"{FLAGS} ember.n={args.requests} ember.run=blk-exits ember.end=poweroff"]
    start = time.monotonic()
    g = Guest(argv, env, args.limit)
    g.expect(MARKER)
    boot = time.monotonic() - start
    boot_cpu = cpu_seconds(g.p.pid)
    boot_exits = exits(domstats(env, name))
    per = {}
    for op in ("read", "write"):
        costs = {}
        for count in (0, args.requests):
            g.expect(f"EMBER-EXITS {op} {count} ready")
            before = domstats(env, name)
            g.answer()
            g.expect("EMBER-EXITS done")
            after = domstats(env, name)
            g.answer()
            costs[count] = (exits(after) - exits(before), disk_ops(after, 1) - disk_ops(before, 1))
        (base, _), (total, ops) = costs[0], costs[args.requests]
        if ops < args.requests:
            raise RuntimeError(f"{op}: {ops} requests reached the disk, {args.requests} expected")
        per[op] = max(0.0, (total - base) / ops)
    g.p.wait(timeout=120)
    return boot, boot_cpu, boot_exits, per


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="boots per transport (default 1)")
    ap.add_argument("--requests", type=int, default=1000, help="4 KiB requests per batch")
    ap.add_argument("--memory", type=int, default=128, help="guest RAM in MiB")
    ap.add_argument("--limit", type=int, default=900, help="seconds allowed per boot")
    args = ap.parse_args()
    for f in ("vmlinux", "rootfs.ext4"):
        if not os.path.isfile(os.path.join(GUEST, f)):
            sys.exit(f"{GUEST}/{f} is missing: run tests/guest/build.sh")
    if not os.path.isfile(EMBER):
        sys.exit(f"{EMBER} is missing: run cargo build --release")
    results = {"mmio": [], "pci": []}
    with tempfile.TemporaryDirectory() as work:
        # Alternate the transports so slow drift on a shared host hits both alike.
        for _ in range(args.runs):
            for t in ("mmio", "pci"):
                results[t].append(run_once(t, args, work))
                boot, cpu, boot_exits, per = results[t][-1]
                print(f"# {t}: boot {boot:.1f} s ({cpu:.1f} s CPU, {boot_exits} exits), "
                      f"exits/request read {per['read']:.2f} write {per['write']:.2f}",
                      file=sys.stderr)
    print(f"{args.runs} boot(s) per transport, {args.requests} requests per batch, "
          f"{args.memory} MiB, kernel {os.path.join(GUEST, 'vmlinux')}")
    print()
    print("| transport | boot to init (s) | Ember CPU until init (s) | exits until init "
          "| exits per 4 KiB read | exits per 4 KiB write |")
    print("| --- | --- | --- | --- | --- | --- |")
    for t in ("mmio", "pci"):
        rows = results[t]
        mid = len(rows) // 2
        boot, cpu, boot_exits = (sorted(r[i] for r in rows)[mid] for i in range(3))
        rd = sorted(r[3]["read"] for r in rows)[mid]
        wr = sorted(r[3]["write"] for r in rows)[mid]
        print(f"| virtio-{t} | {boot:.1f} | {cpu:.1f} | {boot_exits} | {rd:.2f} | {wr:.2f} |")
    if args.runs > 1:
        print("\n(medians)")


if __name__ == "__main__":
    main()
