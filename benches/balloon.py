#!/usr/bin/env python3
"""Balloon benchmark: what ember's virtio-balloon gives back to the host, as the VMM
process's resident memory (VmRSS) before and after, with the guest kit's Linux guest.

Boot 1: the guest fills a tmpfs with FILL MiB and frees it (the host holds those pages, the
guest has them free); `ember setmem` to TARGET inflates the balloon; RSS before/after and
the time until the driver reports the balloon full; `setmem` back deflates. Then the VM is
saved and restored (guest memory mapped MAP_PRIVATE from the memory file): RSS right after
the restore; the guest fills and frees again (private copies of the file's pages), and the
balloon inflates once more.
Boot 2: free page reporting instead of a balloon target: RSS before the guest frees its
fill, and once the reports stop.

usage: benches/balloon.sh [--memory MIB] [--fill MIB] [--target MIB] [--limit S]
       EMBER=path/to/ember picks the binary (default: a release build)
"""

import argparse
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.environ.get("EMBER_GUEST_DIR", os.path.join(REPO, "target", "guest"))
FLAGS = "console=ttyS0 quiet tsc=reliable no_timer_check"
# The guest kernel clears and copies 8 bytes per emulated rep iteration instead of one.
CPU = "--cpu-features=-erms,-fsrm"


class Vm:
    """An ember process whose console lines are read on a thread."""

    def __init__(self, ember, env, args):
        self.p = subprocess.Popen([ember, *args], env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.put(line.decode(errors="replace").rstrip())

    def wait_for(self, text, limit):
        end = time.monotonic() + limit
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.p.poll() is not None:
                    break
                continue
            self.seen.append(line)
            if text in line:
                return line
        tail = "\n".join(self.seen[-20:])
        raise RuntimeError(f"no '{text}' within {limit}s; the guest said:\n{tail}")

    def send(self, text):
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def rss_mib(self):
        with open(f"/proc/{self.p.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def api(state, name, path):
    """GET path on the VM's API socket; the JSON answer."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(state, "vms", name, "api.sock"))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def until(what, limit, f):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        v = f()
        if v is not None:
            return v
        time.sleep(1)
    raise RuntimeError(f"timed out waiting for {what}")


def inflate(ember, env, state, name, target_mib, limit):
    """setmem to target; seconds until the driver says the balloon holds it."""
    start = time.monotonic()
    subprocess.run([ember, "setmem", name, f"{target_mib}M"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    want = target_mib << 20
    until("the balloon", limit,
          lambda: True if abs(api(state, name, "/ember/balloon")["actual"] - want) <= 1 << 20
          else None)
    return time.monotonic() - start


def boot_args(kit, name, a, balloon, script):
    return ["run", "--name", name, "--kernel", kit["vmlinux"], "--initrd", kit["initrd"],
            "--memory", f"{a.memory}M", "--balloon", balloon, CPU, "--serial", "stdio",
            "--cmdline", f"{FLAGS} ember.run=balloon ember.fill={a.fill} {script}"]


def balloon_runs(ember, env, state, kit, a, rows):
    name = "bench-balloon"
    vm = Vm(ember, env, boot_args(kit, name, a, "on,stats_period=2", "ember.rounds=2"))
    try:
        vm.wait_for("EMBER-BALLOON freed 1", a.limit)
        time.sleep(3)
        before = vm.rss_mib()
        secs = inflate(ember, env, state, name, a.target, a.limit)
        time.sleep(2)
        after = vm.rss_mib()
        rows.append((f"inflate {a.memory}M -> {a.target}M, fresh boot", before, after, secs))
        secs = inflate(ember, env, state, name, a.memory, a.limit)
        rows.append((f"deflate {a.target}M -> {a.memory}M", after, vm.rss_mib(), secs))
        saved = os.path.join(state, "vm.state")
        subprocess.run([ember, "save", name, saved], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        vm.p.wait(timeout=60)
    finally:
        vm.kill()
    vm = Vm(ember, env, ["run", "--restore", saved, "--name", name, "--serial", "stdio"])
    try:
        until("the restored VM", 60, lambda: api(state, name, "/ember/balloon"))
        time.sleep(2)
        restored = vm.rss_mib()
        vm.send("go\n")
        vm.wait_for("EMBER-BALLOON freed 2", a.limit)
        time.sleep(3)
        before = vm.rss_mib()
        secs = inflate(ember, env, state, name, a.target, a.limit)
        time.sleep(2)
        rows.append(("restored (RSS right after the restore)", restored, restored, 0.0))
        rows.append((f"inflate {a.memory}M -> {a.target}M, restored, refilled", before,
                     vm.rss_mib(), secs))
    finally:
        vm.kill()


def reporting_run(ember, env, state, kit, a, rows):
    name = "bench-reporting"
    vm = Vm(ember, env, boot_args(kit, name, a, "on,free_page_reporting=on", ""))
    try:
        vm.wait_for("EMBER-BALLOON filled", a.limit)
        before = vm.rss_mib()
        vm.wait_for("EMBER-BALLOON freed 1", a.limit)
        start, last, still = time.monotonic(), -1, 0
        while time.monotonic() - start < a.limit and still < 10:
            reported = api(state, name, "/ember/balloon")["counters"]["reported_bytes"]
            still = still + 1 if reported == last else 0
            last = reported
            time.sleep(1)
        rows.append((f"free page reporting ({last >> 20} MiB reported)", before,
                     vm.rss_mib(), time.monotonic() - start - still))
    finally:
        vm.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", type=int, default=256, help="guest RAM, MiB")
    ap.add_argument("--fill", type=int, default=96, help="MiB the guest fills and frees")
    ap.add_argument("--target", type=int, default=128, help="setmem target, MiB")
    ap.add_argument("--limit", type=int, default=1800, help="seconds per step")
    a = ap.parse_args()
    kit = {"vmlinux": os.path.join(GUEST, "vmlinux"),
           "initrd": os.path.join(GUEST, "initramfs.cpio")}
    for f in kit.values():
        if not os.path.isfile(f):
            sys.exit(f"missing {f}: run tests/guest/build.sh first")
    ember = os.environ.get("EMBER")
    if not ember:
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=REPO, check=True)
        ember = os.path.join(REPO, "target", "release", "ember")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ember-balloon-") as state:
        env = dict(os.environ, EMBER_STATE_DIR=state,
                   EMBER_CONFIG_DIR=os.path.join(state, "config"))
        balloon_runs(ember, env, state, kit, a, rows)
        reporting_run(ember, env, state, kit, a, rows)
    print(f"\nballoon: guest kit Linux, {a.memory} MiB, {a.fill} MiB filled and freed by the "
          f"guest; ember VmRSS")
    print(f"{'case':48s} {'before MiB':>10s} {'after MiB':>10s} {'change':>8s} {'s':>6s}")
    for case, before, after, secs in rows:
        print(f"{case:48s} {before:10.1f} {after:10.1f} {after - before:8.1f} {secs:6.0f}")


if __name__ == "__main__":
    main()
