#!/usr/bin/env python3
"""PCI hotplug benchmark: how long a hotplugged device takes to become usable in the guest
kit's Linux, and a detach to be released by it. One boot per run (a PCI bus, nothing on it,
the initramfs running tests/guest/rootfs/etc/ember/hotplug.sh):

- attach-disk: `ember attach-disk` of a qcow2 ext4 image; the command's own time, and the
  time until the guest sees /dev/vda (the guest polls every 0.2 s, so up to 0.2 s is that).
- detach-disk: `ember detach-disk` until it returns (the guest unbinds the driver and
  ejects the slot; Ember then frees it and flushes the image).
- attach-interface / detach-interface: the same for a virtio-net on a tap (the guest sees
  eth0; before the detach it pings the host through it).

usage: benches/hotplug.sh [--runs N] [--limit S]
       EMBER=path/to/ember picks the binary (default: a release build)
"""

import argparse
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.environ.get("EMBER_GUEST_DIR", os.path.join(REPO, "target", "guest"))
FLAGS = "console=ttyS0 quiet tsc=reliable no_timer_check"
NAME = "hotplug-bench"


class Vm:
    """An ember process whose console lines are read on a thread."""

    def __init__(self, cmd, env):
        self.p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
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

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def sh(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def timed(ember, env, *args):
    t = time.monotonic()
    subprocess.run([ember, *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t


def ext4_qcow2(d):
    tree = os.path.join(d, "tree")
    os.makedirs(tree, exist_ok=True)
    with open(os.path.join(tree, "hello.txt"), "w") as f:
        f.write("hello-from-the-host\n")
    raw, img = os.path.join(d, "hot.raw"), os.path.join(d, "hot.qcow2")
    sh("mkfs.ext4", "-q", "-F", "-d", tree, raw, "16M")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
    return img


def one_run(ember, state, ns, limit, rows):
    env = dict(os.environ, EMBER_STATE_DIR=state, EMBER_CONFIG_DIR=os.path.join(state, "c"))
    img = ext4_qcow2(state)
    vm = Vm(["ip", "netns", "exec", ns, ember, "run", "--name", NAME, "--transport", "pci",
             "--memory", "128M", "--kernel", os.path.join(GUEST, "vmlinux"),
             "--initrd", os.path.join(GUEST, "initramfs.cpio"), "--cmdline",
             f"{FLAGS} ember.ip=10.0.6.2/24 ember.peer=10.0.6.1 ember.run=hotplug "
             "ember.end=poweroff"], env)
    try:
        vm.wait_for("EMBER-HP ready", limit)
        t = time.monotonic()
        cmd = timed(ember, env, "attach-disk", NAME, img)
        vm.wait_for("EMBER-HP disk-seen", limit)
        rows.append(("attach-disk: command returns", cmd))
        rows.append(("attach-disk: guest sees /dev/vda", time.monotonic() - t))
        vm.wait_for("EMBER-HP disk-rw", limit)
        rows.append(("detach-disk: guest released it", timed(
            ember, env, "detach-disk", NAME, "vda", "--timeout", str(limit))))
        vm.wait_for("EMBER-HP disk-gone", limit)
        t = time.monotonic()
        cmd = timed(ember, env, "attach-interface", NAME, "--type", "tap", "--source", "tap0")
        vm.wait_for("EMBER-HP nic-seen", limit)
        rows.append(("attach-interface: command returns", cmd))
        rows.append(("attach-interface: guest sees eth0", time.monotonic() - t))
        vm.wait_for("EMBER-HP ping", limit)
        out = subprocess.run([ember, "domiflist", NAME], env=env, check=True,
                             capture_output=True, text=True).stdout
        mac = [ln.split()[-1] for ln in out.splitlines() if "tap0" in ln][0]
        rows.append(("detach-interface: guest released it", timed(
            ember, env, "detach-interface", NAME, "--mac", mac, "--timeout", str(limit))))
        vm.wait_for("EMBER-HP nic-gone", limit)
    finally:
        vm.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1, help="boots")
    ap.add_argument("--limit", type=int, default=600, help="seconds per step")
    a = ap.parse_args()
    for f in ("vmlinux", "initramfs.cpio"):
        if not os.path.isfile(os.path.join(GUEST, f)):
            sys.exit(f"missing {f}: run tests/guest/build.sh first")
    ember = os.environ.get("EMBER")
    if not ember:
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=REPO, check=True)
        ember = os.path.join(REPO, "target", "release", "ember")
    ns = f"ember-hpb-{os.getpid()}"
    sh("ip", "netns", "add", ns)
    rows = []
    try:
        sh("ip", "netns", "exec", ns, "sh", "-c",
           "ip link set lo up && ip tuntap add dev tap0 mode tap && "
           "ip addr add 10.0.6.1/24 dev tap0 && ip link set tap0 up")
        for _ in range(a.runs):
            with tempfile.TemporaryDirectory(prefix="ember-hp-") as state:
                one_run(ember, state, ns, a.limit, rows)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    print(f"\nPCI hotplug: guest kit Linux (initramfs, 128 MiB, 1 vCPU), {a.runs} boot(s)")
    print(f"{'step':40s} {'min s':>8s} {'median s':>9s} {'max s':>8s}")
    names = list(dict.fromkeys(r[0] for r in rows))
    for n in names:
        v = sorted(s for k, s in rows if k == n)
        print(f"{n:40s} {v[0]:8.2f} {v[len(v) // 2]:9.2f} {v[-1]:8.2f}")


if __name__ == "__main__":
    main()
