"""Live migration, ember vs qemu's `migrate`, the same guest on the same machine over loopback.

The guest is the guest kit's Linux (vmlinux + initramfs, 1 vCPU) with two programs started
on its console: a ticker that prints `T n` every few milliseconds (user code, so it runs at
native speed here) and, for the dirtying cases, a program that rewrites a set of 1 MiB
strings at a set rate (MiB/s). For each hop: set the dirtying rate, start a destination
(`ember run --incoming` / `qemu -incoming`), migrate live from the last one with a 300 ms
downtime limit, and measure (one boot per VMM and size; the guest moves on from hop to hop,
one hop per case):

- total time: the migrate command from start to end (ember migrate's wall time; qemu's
  `total-time`);
- downtime as the guest saw it: from the last `T` line the source printed to the first the
  destination printed, minus the median gap between `T` lines; and the VMM's own figure
  (ember: VM stopped to destination confirmed; qemu: `downtime`);
- bytes sent beside guest RAM.

The convergence case dirties memory faster than the link (both capped with their bandwidth
limit): ember gives up at --timeout and the guest stays at the source; qemu iterates until
it is cancelled at the same time. Usage: benches/migrate.sh [--sizes 128,1024] [--rate 32]
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer  # noqa: E402

FLAGS = "console=ttyS0 quiet tsc=reliable no_timer_check"
BOOT_LIMIT = 900
TICKER = ("awk 'BEGIN { for (;;) { for (i = 0; i < 20000; i++) ; print \"T \" ++n; "
          "fflush() } }' &")


def dirtier(rate_mib, set_mib):
    """Rewrites `set_mib` strings of 1 MiB round-robin, `rate_mib` of them per second."""
    return ("awk 'BEGIN { s = \"0123456789abcdef\"; while (length(s) < 1048576) s = s s; "
            f"for (k = 0; k < {set_mib}; k++) a[k] = s; t = systime(); "
            f"for (;;) {{ for (j = 0; j < {rate_mib}; j++) {{ k = (k + 1) % {set_mib}; "
            "a[k] = substr(a[k], 2) (k % 10) } while (systime() == t) ; t = systime() } }' &")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Console:
    """A VMM process whose serial console is its stdio; lines are timestamped."""

    def __init__(self, argv, env=None):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env)
        self.lines = []
        self.err = []
        self.cv = threading.Condition()
        threading.Thread(target=self._read, args=(self.p.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._read, args=(self.p.stderr, self.err), daemon=True).start()

    def _read(self, f, into):
        for raw in iter(f.readline, b""):
            with self.cv:
                into.append((time.monotonic(), raw.decode(errors="replace").rstrip()))
                self.cv.notify_all()

    def type(self, line):
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def wait_for(self, pred, limit):
        end = time.monotonic() + limit
        with self.cv:
            while True:
                for t, l in self.lines:
                    if pred(l):
                        return t
                left = end - time.monotonic()
                if left <= 0 or self.p.poll() is not None and not any(pred(l) for _, l in self.lines):
                    tail = "\n".join(l for _, l in (self.lines + self.err)[-20:])
                    raise SystemExit(f"timed out waiting on the console:\n{tail}")
                self.cv.wait(min(left, 1.0))

    def ticks(self):
        with self.cv:
            return [(t, int(l.split()[1])) for t, l in self.lines
                    if re.fullmatch(r"T \d+", l)]

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def wait_shell(c):
    deadline = time.monotonic() + 300
    while True:
        c.type("echo BENCH-READY")
        try:
            c.wait_for(lambda l: l.startswith("BENCH-READY"), 10)
            return
        except SystemExit:
            if time.monotonic() > deadline:
                raise


def set_dirtier(c, rate, set_mib):
    """Stops the dirtier running in the guest (if any) and starts one at `rate` MiB/s."""
    c.type("[ -f /tmp/d ] && kill $(cat /tmp/d)")
    if rate:
        c.type(dirtier(rate, set_mib) + " echo $! >/tmp/d")
    time.sleep(5)  # it gets going


def guest_downtime(src, dst):
    """Last source tick to first destination tick, minus the usual gap between ticks."""
    s, d = src.ticks(), dst.ticks()
    if not s or not d:
        return None, None
    gaps = [b[0] - a[0] for a, b in zip(s[-200:], s[-199:])]
    usual = statistics.median(gaps) if gaps else 0
    return max(0.0, d[0][0] - s[-1][0] - usual) * 1000, d[0][1] - s[-1][1]


class Qmp:
    def __init__(self, path):
        for _ in range(300):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.1)
        self.f = self.s.makefile("rwb")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "error" in r:
                raise SystemExit(f"qmp {name}: {r['error']}")
            if "return" in r:
                return r["return"]


class Ember:
    """One ember process of a chain of migrations."""
    name = "ember"

    def __init__(self, tmp, mem, cmdline, hop, incoming=None):
        self.env = dict(os.environ, EMBER_STATE_DIR=os.path.join(tmp, "state"))
        self.vm = f"bench{hop}"
        kit = peer.GUEST
        if incoming is None:
            argv = [peer.EMBER, "run", "--name", self.vm, "--kernel", f"{kit}/vmlinux",
                    "--initrd", f"{kit}/initramfs.cpio", "--memory", f"{mem}M",
                    "--serial", "stdio", "--cmdline", cmdline]
        else:
            argv = [peer.EMBER, "run", "--name", self.vm, "--incoming",
                    f"tcp:127.0.0.1:{incoming}", "--serial", "stdio"]
        self.c = Console(argv, self.env)
        end = time.monotonic() + 60
        while incoming is not None and time.monotonic() < end:
            r = subprocess.run([peer.EMBER, "domjobinfo", self.vm], env=self.env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            if "incoming" in r.stdout:
                break
            time.sleep(0.2)

    def migrate(self, port, bandwidth, timeout):
        argv = [peer.EMBER, "migrate", self.vm, f"tcp:127.0.0.1:{port}", "--live",
                "--downtime", "300"]
        if bandwidth:
            argv += ["--bandwidth", str(bandwidth)]
        if timeout:
            argv += ["--timeout", str(timeout)]
        t0 = time.monotonic()
        r = subprocess.run(argv, env=self.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        total = time.monotonic() - t0
        out = r.stdout + r.stderr
        if r.returncode != 0:
            return {"converged": False, "total_s": total, "note": out.strip()}
        m = re.search(r"([\d.]+) MiB sent in (\d+) ms over (\d+) passes, downtime (\d+) ms",
                      out)
        return {"converged": True, "total_s": total, "own_ms": float(m.group(4)),
                "sent_mib": float(m.group(1)), "passes": int(m.group(3))}


class Qemu:
    """One qemu process of a chain of migrations."""
    name = "qemu"

    def __init__(self, tmp, mem, cmdline, hop, incoming=None):
        kit = peer.GUEST
        self.qmp_path = os.path.join(tmp, f"q{hop}.qmp")
        argv = peer.qemu_microvm(mem, f"{kit}/vmlinux", f"{kit}/initramfs.cpio") + [
            "-append", cmdline, "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if incoming is not None:
            argv += ["-incoming", f"tcp:127.0.0.1:{incoming}"]
        self.c = Console(argv)
        self.qmp = Qmp(self.qmp_path)

    def migrate(self, port, bandwidth, timeout):
        params = {"downtime-limit": 300, "max-bandwidth": (bandwidth or 1 << 20) << 20}
        self.qmp.cmd("migrate-set-parameters", **params)
        t0 = time.monotonic()
        self.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            st = self.qmp.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            if timeout and time.monotonic() - t0 > timeout:
                passes = st.get("ram", {}).get("dirty-sync-count", "?")
                self.qmp.cmd("migrate_cancel")
                return {"converged": False, "total_s": time.monotonic() - t0,
                        "note": f"cancelled after {timeout} s, {passes} passes"}
            time.sleep(0.05)
        if st["status"] != "completed":
            return {"converged": False, "total_s": time.monotonic() - t0, "note": str(st)}
        return {"converged": True, "total_s": st["total-time"] / 1000,
                "own_ms": float(st.get("downtime", 0)),
                "sent_mib": st["ram"]["transferred"] / (1 << 20),
                "passes": st["ram"].get("dirty-sync-count", 0)}


def chain(kind, mem, cases, cmdline, set_mib):
    """Boots one guest and migrates it from hop to hop, one hop per case:
    (label, dirtying rate, bandwidth cap, timeout). Returns a result per case."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        vms = [kind(tmp, mem, cmdline, 0)]
        try:
            src = vms[0]
            src.c.wait_for(lambda l: "init reached" in l, BOOT_LIMIT)
            wait_shell(src.c)
            src.c.type(TICKER)
            src.c.wait_for(lambda l: l == "T 200", 120)
            for hop, (label, rate, bw, timeout) in enumerate(cases, 1):
                set_dirtier(src.c, rate, set_mib)
                port = free_port()
                dst = kind(tmp, mem, cmdline, hop, incoming=port)
                vms.append(dst)
                r = src.migrate(port, bw, timeout)
                if r["converged"]:
                    dst.c.wait_for(lambda l: re.fullmatch(r"T \d+", l) is not None, 120)
                    time.sleep(0.5)
                    r["guest_ms"], r["tick_step"] = guest_downtime(src.c, dst.c)
                    src = dst
                else:
                    time.sleep(2)
                    t = src.c.ticks()
                    r["source_runs"] = bool(t) and t[-1][0] > time.monotonic() - 1.5
                    dst.c.stop()
                r["label"] = label
                out.append(r)
                print(row(kind.name, mem, r), file=sys.stderr, flush=True)
        finally:
            for v in vms:
                v.c.stop()
    return out


def row(name, mem, r):
    case = r["label"]
    if r["converged"]:
        guest = "?" if r.get("guest_ms") is None else f"{r['guest_ms']:.0f}"
        return (f"{name:6s} {case:26s} {r['total_s']:8.2f} {guest:>9s} "
                f"{r['own_ms']:8.0f} {r['sent_mib']:9.1f} {r['sent_mib'] / mem:7.2f} "
                f"{r['passes']:6d}")
    note = r["note"].splitlines()[-1] if r["note"] else ""
    return (f"{name:6s} {case:26s} {r['total_s']:8.2f} {'-':>9s} {'-':>8s} {'-':>9s} "
            f"{'-':>7s} {'-':>6s}  gave up; guest runs on at the source: "
            f"{r['source_runs']}; {note}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="128,1024", help="guest RAM, MiB")
    ap.add_argument("--rate", type=int, default=32, help="dirtying rate, MiB/s")
    ap.add_argument("--set", type=int, default=32, help="dirtied set, MiB")
    ap.add_argument("--link", type=int, default=16,
                    help="bandwidth cap (MiB/s) of the convergence case")
    ap.add_argument("--vmms", default="ember,qemu")
    args = ap.parse_args()
    for f in ("vmlinux", "initramfs.cpio"):
        if not os.path.isfile(os.path.join(peer.GUEST, f)):
            sys.exit(f"missing {peer.GUEST}/{f}: run tests/guest/build.sh first")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=peer.REPO, check=True)
    cmdline = FLAGS + " ember.end=shell" + peer.clearcpuid(os.path.join(peer.GUEST, "vmlinux"))
    kinds = {"ember": Ember, "qemu": Qemu}
    lines = []
    for i, mem in enumerate(int(s) for s in args.sizes.split(",")):
        cases = [(f"{mem} MiB idle", 0, None, None),
                 (f"{mem} MiB dirty {args.rate} MiB/s", args.rate, None, None)]
        if i == 0:
            fast = 4 * args.rate
            cases.append((f"{mem} MiB dirty {fast}>{args.link} MiB/s", fast, args.link, 30))
        for name in args.vmms.split(","):
            for r in chain(kinds[name], mem, cases, cmdline, min(args.set, mem // 4)):
                lines.append(row(name, mem, r))
    print("\nlive migration over loopback, guest kit Linux (initramfs), 1 vCPU, downtime "
          "limit 300 ms; guest ms = last tick at the source to the first at the destination, "
          "less one tick gap")
    print(f"{'VMM':6s} {'case':26s} {'total s':>8s} {'guest ms':>9s} {'own ms':>8s} "
          f"{'sent MiB':>9s} {'x RAM':>7s} {'passes':>6s}")
    for l in lines:
        print(l)


if __name__ == "__main__":
    main()
