#!/usr/bin/env python3
"""Control-API benchmark, ember vs Firecracker, same tiny test kernel (examples/tiny_kernel,
`idle`: it prints a banner and sleeps in hlt), same Firecracker JSON config file for both:

- round trip of `GET /` on one keep-alive connection and on a new connection each time;
- `PATCH /vm` Paused then Resumed, as a pair;
- exec to the API socket answering `GET /` (pre-boot: no kernel yet);
- exec to the guest's first serial output (`--config-file`, no API wait);
- `ember list` wall time with 20 VMs running (Firecracker has no such verb);
- host CPU a VM uses in 10 s, idle and paused.

usage: benches/api.sh [--requests N] [--pairs N] [--starts N] [--vms N] [--cpu-seconds S]
Firecracker: $FIRECRACKER, else /work/main/target/peers/fc-target/release/firecracker.
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBER = os.path.join(REPO, "target", "release", "ember")
FIRECRACKER = os.environ.get(
    "FIRECRACKER", "/work/main/target/peers/fc-target/release/firecracker")
BANNER = b"tiny: hello"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Http:
    """A raw HTTP/1.1 client on a unix socket (keep-alive)."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(path)
        self.buf = b""

    def request(self, method, path, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
        if data:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        self.s.sendall(head.encode() + b"\r\n" + data)
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = self.buf[:end].decode(errors="replace")
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                if len(self.buf) >= end + 4 + length:
                    status = int(head.split(" ")[1])
                    body = self.buf[end + 4:end + 4 + length]
                    self.buf = self.buf[end + 4 + length:]
                    return status, body
            chunk = self.s.recv(65536)
            if not chunk:
                raise RuntimeError(f"{method} {path}: connection closed")
            self.buf += chunk

    def close(self):
        self.s.close()


def call(sock, method, path, body=None):
    c = Http(sock)
    try:
        return c.request(method, path, body)
    finally:
        c.close()


def pct(samples, p):
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def cpu_ms(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / CLK_TCK


class Vmm:
    """One VMM flavour: how to start it with an API socket and/or a config file."""

    def __init__(self, name, work):
        self.name, self.work = name, work
        self.env = dict(os.environ, EMBER_STATE_DIR=os.path.join(work, "state"),
                        EMBER_CONFIG_DIR=os.path.join(work, "config"))
        self.n = 0

    def argv(self, sock, config):
        self.n += 1
        if self.name == "ember":
            a = [EMBER, "run", "--name", f"bench-{os.getpid()}-{self.n}"]
            a += ["--no-api"] if sock is None else ["--api-sock", sock]
        else:
            a = [FIRECRACKER, "--no-seccomp", "--level", "Error", "--id", f"bench{self.n}"]
            a += ["--no-api"] if sock is None else ["--api-sock", sock]
        return a + (["--config-file", config] if config else [])

    def spawn(self, sock=None, config=None):
        if sock and os.path.exists(sock):
            os.unlink(sock)
        return subprocess.Popen(self.argv(sock, config), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=self.env)


def stop(p):
    p.kill()
    p.wait()


def wait_banner(p, limit=20):
    """Seconds from now until the banner is on the VMM's stdout."""
    buf, end = b"", time.monotonic() + limit
    while BANNER not in buf:
        if time.monotonic() > end:
            raise RuntimeError(f"no banner: {buf[-200:]!r}")
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk:
            raise RuntimeError(f"the VMM ended: {buf[-200:]!r}")
        buf += chunk
    # Anything printed after the banner is drained so the pipe never fills up.
    os.set_blocking(p.stdout.fileno(), False)


def wait_api(sock, limit=10):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            if call(sock, "GET", "/")[0] == 200:
                return
        except OSError:
            time.sleep(0.0002)
    raise RuntimeError(f"{sock} never answered")


def booted(vmm, config, sock):
    p = vmm.spawn(sock, config)
    wait_banner(p)
    wait_api(sock)
    return p


def round_trips(sock, n):
    c = Http(sock)
    keep = []
    for _ in range(n):
        t = time.perf_counter()
        status, _ = c.request("GET", "/")
        keep.append(time.perf_counter() - t)
        assert status == 200, status
    c.close()
    fresh = []
    for _ in range(n):
        t = time.perf_counter()
        status, _ = call(sock, "GET", "/")
        fresh.append(time.perf_counter() - t)
        assert status == 200, status
    return keep, fresh


def pause_pairs(sock, n):
    c = Http(sock)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        a, _ = c.request("PATCH", "/vm", {"state": "Paused"})
        b, _ = c.request("PATCH", "/vm", {"state": "Resumed"})
        out.append(time.perf_counter() - t)
        assert (a, b) == (204, 204), (a, b)
    c.close()
    return out


def exec_to_api(vmm, sock, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        p = vmm.spawn(sock)
        try:
            wait_api(sock)
            out.append(time.perf_counter() - t)
        finally:
            stop(p)
    return out


def exec_to_serial(vmm, config, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        p = vmm.spawn(None, config)
        try:
            wait_banner(p)
            out.append(time.perf_counter() - t)
        finally:
            stop(p)
    return out


def cpu_idle_and_paused(vmm, config, sock, seconds):
    p = booted(vmm, config, sock)
    try:
        time.sleep(0.5)
        a = cpu_ms(p.pid)
        time.sleep(seconds)
        idle = cpu_ms(p.pid) - a
        assert call(sock, "PATCH", "/vm", {"state": "Paused"})[0] == 204
        a = cpu_ms(p.pid)
        time.sleep(seconds)
        paused = cpu_ms(p.pid) - a
    finally:
        stop(p)
    return idle, paused


def list_with_vms(kernel, work, vms, runs):
    env = dict(os.environ, EMBER_STATE_DIR=os.path.join(work, "list-state"),
               EMBER_CONFIG_DIR=os.path.join(work, "list-config"))
    names = [f"bench-list-{os.getpid()}-{i}" for i in range(vms)]
    try:
        for n in names:
            subprocess.run([EMBER, "run", "-d", "--name", n, "--kernel", kernel, "--memory",
                            "16M", "--cmdline", "idle"], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = []
        for _ in range(runs):
            t = time.perf_counter()
            r = subprocess.run([EMBER, "list"], env=env, check=True, capture_output=True,
                               text=True)
            out.append(time.perf_counter() - t)
            assert r.stdout.count(" running") == vms, r.stdout
        return out
    finally:
        for n in names:
            subprocess.run([EMBER, "destroy", n], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)


def us(samples):
    return f"{pct(samples, 50) * 1e6:.0f} / {pct(samples, 99) * 1e6:.0f}"


def ms(samples):
    return f"{statistics.median(samples) * 1e3:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--cpu-seconds", type=float, default=10)
    args = ap.parse_args()
    if not os.access(FIRECRACKER, os.X_OK):
        sys.exit(f"no firecracker at {FIRECRACKER}: set $FIRECRACKER")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=REPO, check=True)
    work = tempfile.mkdtemp(prefix="ember-api-bench-")
    try:
        kernel = os.path.join(work, "tiny.elf")
        subprocess.run(["cargo", "run", "--release", "-q", "--example", "tiny_kernel", "--",
                        "write", kernel], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        config = os.path.join(work, "vm.json")
        with open(config, "w") as f:
            json.dump({"boot-source": {"kernel_image_path": kernel,
                                       "boot_args": "console=ttyS0 idle"},
                       "drives": [], "machine-config": {"vcpu_count": 1, "mem_size_mib": 16}},
                      f)
        rows = {}
        for name in ("ember", "firecracker"):
            vmm = Vmm(name, work)
            sock = os.path.join(work, f"{name}.sock")
            print(f"{name}: round trips, pause/resume", file=sys.stderr)
            p = booted(vmm, config, sock)
            try:
                keep, fresh = round_trips(sock, args.requests)
                pairs = pause_pairs(sock, args.pairs)
            finally:
                stop(p)
            print(f"{name}: starts", file=sys.stderr)
            api = exec_to_api(vmm, sock, args.starts)
            serial = exec_to_serial(vmm, config, args.starts)
            print(f"{name}: CPU use", file=sys.stderr)
            idle, paused = cpu_idle_and_paused(vmm, config, sock, args.cpu_seconds)
            rows[name] = [us(keep), us(fresh), us(pairs), ms(api), ms(serial), None,
                          f"{idle:.0f}", f"{paused:.0f}"]
        print("ember: list", file=sys.stderr)
        rows["ember"][5] = ms(list_with_vms(kernel, work, args.vms, 10))
        rows["firecracker"][5] = "n/a"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    labels = [
        f"GET / keep-alive, p50 / p99 us ({args.requests})",
        f"GET / new connection, p50 / p99 us ({args.requests})",
        f"PATCH /vm Paused+Resumed, p50 / p99 us ({args.pairs})",
        f"exec -> API answers GET /, median ms ({args.starts})",
        f"exec -> first guest serial output, median ms ({args.starts})",
        f"ember list with {args.vms} VMs running, median ms (10)",
        f"idle VM, host CPU ms in {args.cpu_seconds:g} s",
        f"paused VM, host CPU ms in {args.cpu_seconds:g} s",
    ]
    print(f"\ncontrol API: tiny kernel (idle), 1 vCPU, 16 MiB, same --config-file JSON")
    print(f"{'':56s} {'ember':>14s} {'firecracker':>14s}")
    for i, label in enumerate(labels):
        print(f"{label:56s} {rows['ember'][i]:>14s} {rows['firecracker'][i]:>14s}")


if __name__ == "__main__":
    main()
