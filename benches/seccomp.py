#!/usr/bin/env python3
"""What confinement costs, printed as tables, each mode beside the other in one run:

1. Exit round trip: the tiny kernel's `echo` loop polls the UART's line status register,
   so every iteration is a port-I/O exit to the VMM and back. For `--seccomp off` and `on`
   (alternating runs): exits per second from /ember/counters over a window, and the vCPU
   thread's CPU time per exit (/proc/PID/task/TID/schedstat, nanoseconds).
2. virtio-blk 4 KiB requests: the guest kit's shell runs `dd bs=4k iflag=direct` (reads)
   and `oflag=direct` (writes) on a raw disk, one request in flight; per request, the time
   the guest sees (host-timed from its markers) and the main thread's CPU time (the event
   loop that serves the queue: its syscalls are the filtered ones), requests counted from
   /ember/counters.
3. Jailer start-up: time from starting the command to the tiny kernel's first line on the
   console, `ember run` beside `ember jail` (namespaces, root, cgroup, privilege drop).

usage: benches/seccomp.sh [--runs N] [--skip-guest] [--requests N]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from peer import EMBER, GUEST, REPO

MODES = ("off", "on")


def api(sock, path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: l\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def schedstat_ns(pid, tid):
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def thread_ids(pid, prefix):
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            if f.read().startswith(prefix):
                out.append(tid)
    return out


def wait_for(path, limit=30):
    end = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > end:
            sys.exit(f"{path} did not appear")
        time.sleep(0.05)


def exit_round_trip(workdir, state, runs, window):
    kernel = os.path.join(workdir, "tiny.elf")
    res = {m: {"us": [], "cpu": []} for m in MODES}
    env = dict(os.environ, EMBER_STATE_DIR=state)
    for run in range(runs):
        for mode in MODES if run % 2 == 0 else MODES[::-1]:
            name = f"bench-exit-{mode}"
            subprocess.run([EMBER, "run", "-d", "--name", name, "--seccomp", mode, "--kernel",
                            kernel, "-m", "16M", "--cmdline", "echo", "--serial", "none"],
                           check=True, env=env, stdout=subprocess.DEVNULL)
            vm = os.path.join(state, "vms", name)
            sock = os.path.join(vm, "api.sock")
            wait_for(sock)
            pid = int(open(os.path.join(vm, "pid")).read())
            time.sleep(0.5)
            tid = thread_ids(pid, "vcpu 0")[0]
            c0, t0, s0 = api(sock, "/ember/counters"), time.monotonic(), schedstat_ns(pid, tid)
            time.sleep(window)
            c1, t1, s1 = api(sock, "/ember/counters"), time.monotonic(), schedstat_ns(pid, tid)
            exits = c1["vcpus"][0]["exits"]["pio_in"] - c0["vcpus"][0]["exits"]["pio_in"]
            res[mode]["us"].append((t1 - t0) * 1e6 / exits)
            res[mode]["cpu"].append((s1 - s0) / 1e3 / exits)
            subprocess.run([EMBER, "destroy", name], check=True, env=env,
                           stdout=subprocess.DEVNULL)
    print(f"\n== exit round trip: tiny kernel polling the UART (port-I/O exits), {window} s "
          f"windows, median of {runs} alternating runs")
    print(f"{'--seccomp':10s} {'us per exit':>12s} {'vCPU CPU us per exit':>21s}")
    for m in MODES:
        print(f"{m:10s} {statistics.median(res[m]['us']):12.2f} "
              f"{statistics.median(res[m]['cpu']):21.2f}")


class Shell:
    """The guest kit's shell on the serial console (stdio pipes)."""

    def __init__(self, argv, env):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)

    def until(self, marker, limit=900):
        end = time.monotonic() + limit
        for line in self.p.stdout:
            if marker in line:
                return time.monotonic()
            if time.monotonic() > end:
                break
        sys.exit(f"no '{marker}' from the guest")

    def send(self, text):
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()


def blk_requests(workdir, state, runs, count):
    kernel, initrd = os.path.join(GUEST, "vmlinux"), os.path.join(GUEST, "initramfs.cpio")
    disk = os.path.join(workdir, "blk.raw")
    subprocess.run([EMBER, "img", "create", "-q", "-f", "raw", disk, "64M"], check=True)
    env = dict(os.environ, EMBER_STATE_DIR=state)
    res = {m: {k: [] for k in ("read", "write", "read cpu", "write cpu")} for m in MODES}
    for run in range(runs):
        for mode in MODES if run % 2 == 0 else MODES[::-1]:
            name = f"bench-blk-{mode}"
            sh = Shell([EMBER, "run", "--name", name, "--seccomp", mode, "--kernel", kernel,
                        "--initrd", initrd, "--memory", "128M", "--serial", "stdio", "--disk",
                        f"path={disk},format=raw", "--cmdline",
                        "console=ttyS0 quiet tsc=reliable no_timer_check ember.end=shell"],
                       env)
            sh.until("ember-guest: init reached")
            vm = os.path.join(state, "vms", name)
            sock = os.path.join(vm, "api.sock")
            pid = int(open(os.path.join(vm, "pid")).read())
            for kind, dd in (("read", f"dd if=/dev/vda of=/dev/null bs=4k count={count} "
                                      "iflag=direct"),
                             ("write", f"dd if=/dev/zero of=/dev/vda bs=4k count={count} "
                                       "oflag=direct")):
                c0, s0 = api(sock, "/ember/counters"), schedstat_ns(pid, pid)
                sh.send(f"echo EMBER-B {kind}-start; {dd} 2>/dev/null; echo EMBER-B {kind}-end")
                t0 = sh.until(f"EMBER-B {kind}-start")
                t1 = sh.until(f"EMBER-B {kind}-end")
                c1, s1 = api(sock, "/ember/counters"), schedstat_ns(pid, pid)
                key = "read_ops" if kind == "read" else "write_ops"
                reqs = c1["disks"][0]["stats"][key] - c0["disks"][0]["stats"][key]
                res[mode][kind].append((t1 - t0) * 1e6 / count)
                res[mode][kind + " cpu"].append((s1 - s0) / 1e3 / max(reqs, 1))
            sh.send("poweroff -f")
            sh.p.wait(timeout=120)
    print(f"\n== virtio-blk 4 KiB requests (guest dd, O_DIRECT, one in flight, {count} each), "
          f"raw image, median of {runs} alternating runs")
    print(f"{'--seccomp':10s} {'read us/req':>12s} {'write us/req':>13s} "
          f"{'VMM CPU us/read':>16s} {'VMM CPU us/write':>17s}")
    for m in MODES:
        r = {k: statistics.median(v) for k, v in res[m].items()}
        print(f"{m:10s} {r['read']:12.1f} {r['write']:13.1f} {r['read cpu']:16.2f} "
              f"{r['write cpu']:17.2f}")


def first_line_time(argv, env):
    t = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=env, text=True)
    line = p.stdout.readline()
    took = time.monotonic() - t
    p.wait(timeout=60)
    if "tiny:" not in line or p.returncode != 0:
        sys.exit(f"{argv[1]}: no banner (got {line!r}, status {p.returncode})")
    return took


def jail_startup(workdir, state, runs):
    jdir = os.path.join(workdir, "jailed")
    os.makedirs(jdir)
    kernel = os.path.join(jdir, "tiny.elf")
    shutil.copy(os.path.join(workdir, "tiny.elf"), kernel)
    for p in (jdir, kernel):
        os.chown(p, 47113, 47113)
    env = dict(os.environ, EMBER_STATE_DIR=state)
    run_args = ["--kernel", kernel, "-m", "16M", "--serial", "stdio"]
    cmds = {
        "ember run": [EMBER, "run", "--name", "bench-start"] + run_args,
        "ember jail": [EMBER, "jail", "--id", "bench-start", "--uid", "47113", "--gid",
                       "47113", "--chroot-base", os.path.join(workdir, "jails"),
                       "--cgroup", "pids.max=64", "--"] + run_args,
    }
    times = {k: [] for k in cmds}
    for run in range(runs):
        for name in cmds if run % 2 == 0 else list(cmds)[::-1]:
            times[name].append(first_line_time(cmds[name], env))
    print(f"\n== start-up: command to the tiny kernel's first console line, median of {runs} "
          f"alternating runs (default seccomp filters in both)")
    print(f"{'command':12s} {'ms':>8s}")
    for name, t in times.items():
        print(f"{name:12s} {statistics.median(t) * 1e3:8.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--window", type=float, default=3.0)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--skip-guest", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("benches/seccomp.sh needs root (ember jail, /proc of the VMs)")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=REPO, check=True)
    with tempfile.TemporaryDirectory(dir=os.path.join(REPO, "target")) as d:
        os.chmod(d, 0o755)
        state = os.path.join(d, "state")
        subprocess.run(["cargo", "run", "-q", "--release", "--example", "tiny_kernel", "--",
                        "write", os.path.join(d, "tiny.elf")], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
        exit_round_trip(d, state, args.runs, args.window)
        if not args.skip_guest:
            blk_requests(d, state, max(1, args.runs // 2), args.requests)
        jail_startup(d, state, args.runs)


if __name__ == "__main__":
    main()
