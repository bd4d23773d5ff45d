"""Live migration, ember vs qemu's `migrate`, the same guest on the same machine over loopback.

The guest is the guest kit's Linux (vmlinux + initramfs, 1 vCPU) with two programs started
on its console: a ticker that prints `T n` every few milliseconds (user code, so it runs at
native speed here) and, for the dirtying cases, a program that rewrites a set of 1 MiB
strings at a set rate (MiB/s). For each case and VMM: boot a source, start the programs,
start a destination (`ember run --incoming` / `qemu -incoming`), migrate live with a 300 ms
downtime limit, and measure:

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


def start_workload(c, rate, set_mib):
    deadline = time.monotonic() + 120
    while True:
        c.type("echo BENCH-READY")
        try:
            c.wait_for(lambda l: l.startswith("BENCH-READY"), 5)
            break
        except SystemExit:
            if time.monotonic() > deadline:
                raise
    if rate:
        c.type(dirtier(rate, set_mib))
    c.type(TICKER)
    c.wait_for(lambda l: l == "T 200", 120)
    time.sleep(3)  # the dirtier gets going


def guest_downtime(src, dst):
    """Last source tick to first destination tick, minus the usual gap between ticks."""
    s, d = src.ticks(), dst.ticks()
    if not s or not d:
        return None
    gaps = [b[0] - a[0] for a, b in zip(s[-200:], s[-199:])]
    usual = statistics.median(gaps) if gaps else 0
    return max(0.0, d[0][0] - s[-1][0] - usual) * 1000, d[0][1] - s[-1][1]


class Qmp:
    def __init__(self, path):
        for _ in range(100):
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
            if "return" in r or "error" in r:
                if "error" in r:
                    raise SystemExit(f"qmp {name}: {r['error']}")
                return r["return"]


def ember_case(mem, rate, set_mib, bandwidth, timeout, cmdline, tmp):
    kit = peer.GUEST
    env = dict(os.environ, EMBER_STATE_DIR=os.path.join(tmp, "state"))
    port = free_port()
    src = Console([peer.EMBER, "run", "--name", "bsrc", "--kernel", f"{kit}/vmlinux",
                   "--initrd", f"{kit}/initramfs.cpio", "--memory", f"{mem}M",
                   "--serial", "stdio", "--cmdline", cmdline], env)
    dst = None
    try:
        src.wait_for(lambda l: "init reached" in l, BOOT_LIMIT)
        start_workload(src, rate, set_mib)
        dst = Console([peer.EMBER, "run", "--name", "bdst", "--incoming",
                       f"tcp:127.0.0.1:{port}", "--serial", "stdio"], env)
        time.sleep(1)
        argv = [peer.EMBER, "migrate", "bsrc", f"tcp:127.0.0.1:{port}", "--live",
                "--downtime", "300"]
        if bandwidth:
            argv += ["--bandwidth", str(bandwidth)]
        if timeout:
            argv += ["--timeout", str(timeout)]
        t0 = time.monotonic()
        r = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
        total = time.monotonic() - t0
        out = r.stdout + r.stderr
        if r.returncode != 0:
            time.sleep(1)
            still = src.p.poll() is None and src.ticks()[-1][0] > time.monotonic() - 1
            return {"converged": False, "total_s": total, "source_runs": still,
                    "note": out.strip().splitlines()[-1]}
        m = re.search(r"([\d.]+) MiB sent in (\d+) ms over (\d+) passes, downtime (\d+) ms", out)
        dst.wait_for(lambda l: re.fullmatch(r"T \d+", l) is not None, 60)
        time.sleep(0.5)
        g = guest_downtime(src, dst)
        return {"converged": True, "total_s": total, "guest_ms": g[0], "tick_step": g[1],
                "own_ms": float(m.group(4)), "sent_mib": float(m.group(1)),
                "passes": int(m.group(3))}
    finally:
        src.stop()
        if dst:
            dst.stop()


def qemu_case(mem, rate, set_mib, bandwidth, timeout, cmdline, tmp):
    kit = peer.GUEST
    port = free_port()
    base = peer.qemu_microvm(mem, f"{kit}/vmlinux", f"{kit}/initramfs.cpio")
    src_qmp, dst_qmp = os.path.join(tmp, "src.qmp"), os.path.join(tmp, "dst.qmp")
    src = Console(base + ["-append", cmdline, "-qmp", f"unix:{src_qmp},server=on,wait=off"])
    dst = None
    try:
        src.wait_for(lambda l: "init reached" in l, BOOT_LIMIT)
        start_workload(src, rate, set_mib)
        dst = Console(base + ["-append", cmdline, "-qmp", f"unix:{dst_qmp},server=on,wait=off",
                              "-incoming", f"tcp:127.0.0.1:{port}"])
        q = Qmp(src_qmp)
        params = {"downtime-limit": 300}
        if bandwidth:
            params["max-bandwidth"] = bandwidth << 20
        q.cmd("migrate-set-parameters", **params)
        t0 = time.monotonic()
        q.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            st = q.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            if timeout and time.monotonic() - t0 > timeout:
                q.cmd("migrate_cancel")
                time.sleep(1)
                st = q.cmd("query-migrate")
                return {"converged": False, "total_s": time.monotonic() - t0,
                        "source_runs": q.cmd("query-status")["status"] == "running",
                        "note": f"cancelled after {timeout} s, "
                                f"{st.get('ram', {}).get('dirty-sync-count', '?')} passes"}
            time.sleep(0.05)
        if st["status"] != "completed":
            raise SystemExit(f"qemu migration {st['status']}: {st}")
        dst.wait_for(lambda l: re.fullmatch(r"T \d+", l) is not None, 60)
        time.sleep(0.5)
        g = guest_downtime(src, dst)
        return {"converged": True, "total_s": st["total-time"] / 1000, "guest_ms": g[0],
                "tick_step": g[1], "own_ms": float(st.get("downtime", 0)),
                "sent_mib": st["ram"]["transferred"] / (1 << 20),
                "passes": st["ram"].get("dirty-sync-count", 0)}
    finally:
        src.stop()
        if dst:
            dst.stop()


def row(name, case, mem, r):
    if r["converged"]:
        return (f"{name:6s} {case:22s} {r['total_s']:8.2f} {r['guest_ms']:9.0f} "
                f"{r['own_ms']:8.0f} {r['sent_mib']:9.1f} {r['sent_mib'] / mem:7.2f} "
                f"{r['passes']:6d}  tick +{r['tick_step']}")
    return (f"{name:6s} {case:22s} {r['total_s']:8.2f} {'-':>9s} {'-':>8s} {'-':>9s} "
            f"{'-':>7s} {'-':>6s}  not converged; source runs: {r['source_runs']}; "
            f"{r['note']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="128,1024", help="guest RAM, MiB")
    ap.add_argument("--rate", type=int, default=32, help="dirtying rate, MiB/s")
    ap.add_argument("--set", type=int, default=32, help="dirtied set, MiB")
    ap.add_argument("--vmms", default="ember,qemu")
    args = ap.parse_args()
    for f in ("vmlinux", "initramfs.cpio"):
        if not os.path.isfile(os.path.join(peer.GUEST, f)):
            sys.exit(f"missing {peer.GUEST}/{f}: run tests/guest/build.sh first")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=peer.REPO, check=True)
    cmdline = FLAGS + " ember.end=shell" + peer.clearcpuid(os.path.join(peer.GUEST, "vmlinux"))
    cases = []
    for mem in (int(s) for s in args.sizes.split(",")):
        cases.append((mem, f"{mem} MiB idle", 0, None, None))
        cases.append((mem, f"{mem} MiB dirty {args.rate} MiB/s", args.rate, None, None))
    mem0 = int(args.sizes.split(",")[0])
    cases.append((mem0, f"{mem0} MiB dirty {4 * args.rate}>16 MiB/s", 4 * args.rate, 16, 30))
    runners = {"ember": ember_case, "qemu": qemu_case}
    lines = []
    for mem, case, rate, bw, timeout in cases:
        for name in args.vmms.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                r = runners[name](mem, rate, min(args.set, mem // 4), bw, timeout, cmdline, tmp)
            lines.append(row(name, case, mem, r))
            print(lines[-1], file=sys.stderr, flush=True)
    print("\nlive migration over loopback, guest kit Linux, 1 vCPU, downtime limit 300 ms")
    print(f"{'VMM':6s} {'case':22s} {'total s':>8s} {'guest ms':>9s} {'own ms':>8s} "
          f"{'sent MiB':>9s} {'x RAM':>7s} {'passes':>6s}")
    for l in lines:
        print(l)


if __name__ == "__main__":
    main()
