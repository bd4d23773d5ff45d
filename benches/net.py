#!/usr/bin/env python3
"""Network benchmark: the same guest (guest kit, static address) on the same tap in a
network namespace created for the run, under ember and under qemu microvm (virtio-net-device,
no vhost), alternating. For each: ping round trip guest -> host, TCP throughput guest ->
host and host -> guest (4 MiB through busybox nc, timed on the host from the first byte to
the end). Prints a table. Needs root, /dev/kvm and the guest kit.

usage: benches/net.sh [--runs N]
"""

import argparse
import ctypes
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

from peer import EMBER, GUEST, REPO, clearcpuid, qemu_microvm

NS = f"ember-bench-{os.getpid()}"
HOST, GUEST_IP = "10.0.3.1", "10.0.3.2"
BYTES = 4 << 20


def sh(*argv):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout


def enter_netns():
    sh("ip", "netns", "add", NS)
    fd = os.open(f"/run/netns/{NS}", os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        sys.exit("setns failed (needs root)")
    for cmd in ("ip link set lo up", "ip tuntap add dev tap0 mode tap",
                f"ip addr add {HOST}/24 dev tap0", "ip link set tap0 up"):
        sh(*cmd.split())


def serve(results):
    """Port 5003: receive from the guest. Port 5004: send to the guest."""
    def recv():
        s = socket.create_server((HOST, 5003))
        c, _ = s.accept()
        n, t0 = 0, None
        while True:
            b = c.recv(1 << 16)
            if not b:
                break
            if t0 is None:
                t0 = time.monotonic()
            n += len(b)
        results["g2h"] = n / (time.monotonic() - t0) / 1024
        c.close()
        s.close()

    def send():
        s = socket.create_server((HOST, 5004))
        c, _ = s.accept()
        t0 = time.monotonic()
        chunk = b"\x5a" * (1 << 16)
        for _ in range(BYTES // len(chunk)):
            c.sendall(chunk)
        c.shutdown(socket.SHUT_WR)
        while c.recv(1 << 16):
            pass
        results["h2g"] = BYTES / (time.monotonic() - t0) / 1024
        c.close()
        s.close()

    threads = [threading.Thread(target=f, daemon=True) for f in (recv, send)]
    for t in threads:
        t.start()
    return threads


def run_guest(argv):
    results = {}
    threads = serve(results)
    out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=1800).stdout
    for t in threads:
        t.join(timeout=60)
    m = re.search(r"EMBER-BENCH ping .*= ([0-9.]+)/([0-9.]+)/([0-9.]+) ms", out)
    if not m or "g2h" not in results or "h2g" not in results:
        sys.exit(f"incomplete run of {argv[0]}:\n{out[-2000:]}")
    results["ping"] = float(m.group(2))
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=REPO, check=True)
    kernel, initrd = os.path.join(GUEST, "vmlinux"), os.path.join(GUEST, "initramfs.cpio")
    cmdline = (f"console=ttyS0 quiet tsc=reliable no_timer_check ember.ip={GUEST_IP}/24 "
               f"ember.peer={HOST} ember.run=net-static,net-bench ember.end=poweroff")
    qemu_cmdline = cmdline + clearcpuid(kernel)
    enter_netns()
    try:
        vmms = {
            "ember": [EMBER, "run", "--kernel", kernel, "--initrd", initrd, "--memory", "128M",
                      "--net", "tap=tap0", "--cmdline", cmdline],
            "qemu microvm": qemu_microvm(128, kernel, initrd) + [
                             "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
                             "-device", "virtio-net-device,netdev=n0", "-append", qemu_cmdline],
        }
        res = {k: [] for k in vmms}
        for i in range(args.runs):
            for name, argv in vmms.items():
                r = run_guest(argv)
                res[name].append(r)
                print(f"run {i + 1} {name:13s} ping {r['ping']:.1f} ms, guest->host "
                      f"{r['g2h']:.1f} KiB/s, host->guest {r['h2g']:.1f} KiB/s", file=sys.stderr)
    finally:
        subprocess.run(["ip", "netns", "del", NS])
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    print(f"\nnet: guest kit on tap0 in a fresh namespace, 4 MiB TCP each way through busybox "
          f"nc, ping -c 20 guest->host, median of {args.runs} alternating runs")
    print(f"{'VMM':14s} {'ping avg ms':>12s} {'guest->host KiB/s':>18s} {'host->guest KiB/s':>18s}")
    for name, rs in res.items():
        print(f"{name:14s} {med(rs, 'ping'):12.1f} {med(rs, 'g2h'):18.1f} {med(rs, 'h2g'):18.1f}")


if __name__ == "__main__":
    main()
