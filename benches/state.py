#!/usr/bin/env python3
"""Snapshot benchmark, Ember beside Firecracker, printed as one table.

The guest is the tiny test kernel (examples/tiny_kernel) in `echo` mode: it polls COM1 for
input and echoes each byte, so a restored guest answers as soon as it runs. For 128 MiB and
1 GiB of guest RAM, each VMM boots it, pauses it, and writes a full snapshot through the
Firecracker API (`PATCH /vm` Paused, `PUT /snapshot/create`); then, in fresh processes, the
snapshot is brought back and timed from exec to the echo of a byte written to the VMM's
stdin at exec (the guest's first serial output):

  ember run --restore     Ember's own command line (no API round trips)
  ember API /load         `ember run --api-sock S`, then `PUT /snapshot/load` resume_vm
  firecracker API /load   `firecracker --api-sock S`, then the same request

Ember's own time: `strace -f -T -e trace=execve,ioctl,mmap,openat,read --seccomp-bpf` on
`ember run --restore`, from its execve to the first KVM_RUN: the window minus the time spent
inside /dev/kvm ioctls (KVM_SET_USER_MEMORY_REGION, KVM_SET_* state) is Ember's (strace's
own cost per traced call is included, so this is an upper bound).

Also: snapshot creation time (PUT /snapshot/create, the VM paused) and sizes (state file;
memory file apparent and allocated).

Diff snapshots: the tiny kernel in `count dirty=16` mode (16 KiB, 4 pages, stored per 100 ms
tick) with dirty-page tracking on (`ember run --track-dirty-pages`, Firecracker's
`track_dirty_pages`); after tick 3 a Full snapshot, then DIFF_TICKS ticks on, then a Diff
snapshot, each timed (PUT /snapshot/create, VM paused) and sized; and `ember snapshot-rebase`
of the diff onto the full base, timed. (`--no-diff` leaves this out.) `ember img snapshot` vs `qemu-img snapshot` on a 1 GiB
image is benches/disk.sh's snapshot table (run with --img to print it here too).

usage: benches/state.sh [--runs N] [--firecracker PATH] [--img] [--no-diff | --only-diff]
"""

import argparse
import json
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBER = os.path.join(REPO, "target", "release", "ember")
FIRECRACKER = os.environ.get(
    "FIRECRACKER", os.path.join(REPO, "target", "peers", "fc-target", "release", "firecracker"))
SIZES = (128, 1024)
READY = b"tiny: echo until q"
PROBE = b"~"
LIMIT = 30.0


def api(sock, method, path, body=None):
    """One request; (status, body)."""
    data = json.dumps(body).encode() if body is not None else b""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(LIMIT)
    s.connect(sock)
    s.sendall(f"{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(65536)
    head, _, rest = got.partition(b"\r\n\r\n")
    m = re.search(rb"content-length:\s*(\d+)", head, re.I)
    want = int(m.group(1)) if m else 0
    while len(rest) < want:
        rest += s.recv(65536)
    s.close()
    return int(head[9:12]), rest.decode(errors="replace")


def must(sock, method, path, body=None):
    status, text = api(sock, method, path, body)
    if status // 100 != 2:
        sys.exit(f"{method} {path}: {status} {text}")


def wait_sock(sock, p):
    end = time.monotonic() + LIMIT
    while time.monotonic() < end:
        if p.poll() is not None:
            sys.exit(f"{p.args[0]} ended: {p.stderr.read().decode(errors='replace')}")
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.close()
            return
        except OSError:
            time.sleep(0.001)
    sys.exit(f"no API on {sock}")


def read_until(p, want, start, limit=LIMIT):
    """Reads p's stdout until `want` shows; seconds since `start` when it did."""
    buf = b""
    while time.monotonic() - start < limit:
        ready, _, _ = select.select([p.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            if want in buf:
                return time.monotonic() - start
    sys.exit(f"{p.args[0]}: no {want!r} in {buf[-400:]!r}")


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()


def spawn(argv, env=None):
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


def ember_env(work):
    env = dict(os.environ)
    env.update(EMBER_STATE_DIR=os.path.join(work, "state"),
               EMBER_CONFIG_DIR=os.path.join(work, "config"),
               EMBER_DATA_DIR=os.path.join(work, "data"), RUST_LOG="error")
    return env


def sizes(state, mem):
    st = os.stat(mem)
    return os.path.getsize(state), st.st_size, st.st_blocks * 512


def create_ember(work, kernel, mib, snap):
    """Boots; pauses and snapshots through the API (timed, then resumed); saves with
    `ember save` to `snap` (timed: pause, write, end), which the restores use, as a VM saved
    running comes back running. (create seconds, save seconds, sizes of the created one)."""
    sock = os.path.join(work, "create.sock")
    env = ember_env(work)
    p = spawn([EMBER, "run", "--kernel", kernel, "--memory", f"{mib}M", "--cmdline", "echo",
               "--name", "bench-create", "--api-sock", sock, "--serial", "stdio"], env)
    created = snap + ".api"
    try:
        read_until(p, READY, time.monotonic())
        must(sock, "PATCH", "/vm", {"state": "Paused"})
        t = time.monotonic()
        must(sock, "PUT", "/snapshot/create", {"snapshot_path": created,
             "mem_file_path": created + ".mem", "snapshot_type": "Full"})
        took = time.monotonic() - t
        must(sock, "PATCH", "/vm", {"state": "Resumed"})
        t = time.monotonic()
        subprocess.run([EMBER, "save", "bench-create", snap], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        saved = time.monotonic() - t
    finally:
        stop(p)
    return took, saved, sizes(created, created + ".mem")


def create_firecracker(work, kernel, mib, snap):
    sock = os.path.join(work, "fc-create.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    p = spawn([FIRECRACKER, "--api-sock", sock, "--level", "Error"])
    try:
        wait_sock(sock, p)
        must(sock, "PUT", "/boot-source", {"kernel_image_path": kernel, "boot_args": "echo"})
        must(sock, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": mib})
        must(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
        read_until(p, READY, time.monotonic())
        must(sock, "PATCH", "/vm", {"state": "Paused"})
        t = time.monotonic()
        must(sock, "PUT", "/snapshot/create",
             {"snapshot_path": snap, "mem_file_path": snap + ".mem", "snapshot_type": "Full"})
        took = time.monotonic() - t
    finally:
        stop(p)
        if os.path.exists(sock):
            os.unlink(sock)
    return took, sizes(snap, snap + ".mem")


DIFF_CMDLINE = "count dirty=16"
DIFF_TICKS = 5


def timed_create(sock, snap, kind):
    """PUT /snapshot/create of `kind` to `snap` and `snap`.mem, the VM paused; seconds."""
    t = time.monotonic()
    must(sock, "PUT", "/snapshot/create",
         {"snapshot_path": snap, "mem_file_path": snap + ".mem", "snapshot_type": kind})
    return time.monotonic() - t


def full_then_diff(p, sock, snap):
    """After tick 3: pause, Full, resume; DIFF_TICKS ticks on: pause, Diff. (full seconds,
    diff seconds); the files are `snap`-full(.mem) and `snap`-diff(.mem)."""
    read_until(p, b"tick 3\n", time.monotonic())
    must(sock, "PATCH", "/vm", {"state": "Paused"})
    full = timed_create(sock, snap + "-full", "Full")
    must(sock, "PATCH", "/vm", {"state": "Resumed"})
    read_until(p, f"tick {3 + DIFF_TICKS}\n".encode(), time.monotonic())
    must(sock, "PATCH", "/vm", {"state": "Paused"})
    diff = timed_create(sock, snap + "-diff", "Diff")
    return full, diff


def diff_ember(work, kernel, mib, snap):
    """(full s, diff s, rebase s, full sizes, diff sizes) under ember."""
    sock = os.path.join(work, "diff.sock")
    env = ember_env(work)
    p = spawn([EMBER, "run", "--kernel", kernel, "--memory", f"{mib}M", "--cmdline",
               DIFF_CMDLINE, "--name", "bench-diff", "--api-sock", sock, "--serial", "stdio",
               "--track-dirty-pages"], env)
    try:
        full, diff = full_then_diff(p, sock, snap)
    finally:
        stop(p)
    f_sizes = sizes(snap + "-full", snap + "-full.mem")
    d_sizes = sizes(snap + "-diff", snap + "-diff.mem")
    t = time.monotonic()
    subprocess.run([EMBER, "snapshot-rebase", "--base-file", snap + "-full.mem", "--diff-file",
                    snap + "-diff.mem"], env=env, check=True, stdout=subprocess.DEVNULL)
    rebase = time.monotonic() - t
    return full, diff, rebase, f_sizes, d_sizes


def diff_firecracker(work, kernel, mib, snap):
    """(full s, diff s, full sizes, diff sizes) under Firecracker."""
    sock = os.path.join(work, "fc-diff.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    p = spawn([FIRECRACKER, "--api-sock", sock, "--level", "Error"])
    try:
        wait_sock(sock, p)
        must(sock, "PUT", "/boot-source", {"kernel_image_path": kernel,
                                           "boot_args": DIFF_CMDLINE})
        must(sock, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": mib,
                                              "track_dirty_pages": True})
        must(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
        full, diff = full_then_diff(p, sock, snap)
    finally:
        stop(p)
        if os.path.exists(sock):
            os.unlink(sock)
    return (full, diff, sizes(snap + "-full", snap + "-full.mem"),
            sizes(snap + "-diff", snap + "-diff.mem"))


def diff_rows(work, kernel, runs):
    rows = []
    for mib in SIZES:
        r = {k: [] for k in ("e_full", "e_diff", "e_rebase", "f_full", "f_diff")}
        e_snap, f_snap = (os.path.join(work, f"diff-{v}-{mib}") for v in ("e", "f"))
        for _ in range(runs):
            full, diff, rebase, e_fs, e_ds = diff_ember(work, kernel, mib, e_snap)
            r["e_full"].append(full)
            r["e_diff"].append(diff)
            r["e_rebase"].append(rebase)
            full, diff, f_fs, f_ds = diff_firecracker(work, kernel, mib, f_snap)
            r["f_full"].append(full)
            r["f_diff"].append(diff)
        rows.append((mib, r, (e_fs, e_ds), (f_fs, f_ds)))
    return rows


def fmt_best(xs):
    """The median and, in brackets, the best: on a busy host the best is the VMM's own cost."""
    return f"{statistics.median(xs) * 1000:.1f} ({min(xs) * 1000:.1f})"


def report_diff(rows, runs):
    print(f"== Diff snapshots: tiny kernel `{DIFF_CMDLINE}` (4 pages a tick), dirty-page "
          f"tracking on; Full after tick 3, Diff {DIFF_TICKS} ticks later; median (best) of "
          f"{runs}")
    print(f"{'guest RAM':10s} {'':24s} {'ember':>15s} {'firecracker':>15s}")
    for mib, r, (e_fs, e_ds), (f_fs, f_ds) in rows:
        ram = f"{mib} MiB"
        print(f"{ram:10s} {'Full create ms':24s} {fmt_best(r['e_full']):>15s} "
              f"{fmt_best(r['f_full']):>15s}")
        print(f"{'':10s} {'Diff create ms':24s} {fmt_best(r['e_diff']):>15s} "
              f"{fmt_best(r['f_diff']):>15s}")
        print(f"{'':10s} {'snapshot-rebase ms':24s} {fmt_best(r['e_rebase']):>15s} "
              f"{'-':>15s}")
        print(f"{'':10s} {'Full memory alloc. KiB':24s} {e_fs[2] / 1024:15.0f} "
              f"{f_fs[2] / 1024:15.0f}")
        print(f"{'':10s} {'Diff memory alloc. KiB':24s} {e_ds[2] / 1024:15.0f} "
              f"{f_ds[2] / 1024:15.0f}")
        print(f"{'':10s} {'Diff memory file MiB':24s} {e_ds[1] / 2**20:15.0f} "
              f"{f_ds[1] / 2**20:15.0f}")


def restore_cli(work, snap):
    """`ember run --restore`: exec to the echo of the probe byte."""
    start = time.monotonic()
    p = spawn([EMBER, "run", "--restore", snap, "--name", "bench-restore", "--serial", "stdio"],
              ember_env(work))
    try:
        p.stdin.write(PROBE)
        p.stdin.flush()
        return read_until(p, PROBE, start)
    finally:
        stop(p)


def restore_api(work, snap, firecracker):
    """A fresh VMM process, then PUT /snapshot/load: exec to the echo of the probe byte."""
    sock = os.path.join(work, "load.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    start = time.monotonic()
    if firecracker:
        p = spawn([FIRECRACKER, "--api-sock", sock, "--level", "Error"])
    else:
        p = spawn([EMBER, "run", "--api-sock", sock, "--name", "bench-load", "--serial",
                   "stdio"], ember_env(work))
    try:
        p.stdin.write(PROBE)
        p.stdin.flush()
        wait_sock(sock, p)
        must(sock, "PUT", "/snapshot/load",
             {"snapshot_path": snap,
              "mem_backend": {"backend_path": snap + ".mem", "backend_type": "File"},
              "resume_vm": True})
        return read_until(p, PROBE, start)
    finally:
        stop(p)
        if os.path.exists(sock):
            os.unlink(sock)


# `PID SECONDS.MICROS call(args) = result <duration>` (strace -f -ttt -T -o FILE).
STRACE_LINE = re.compile(r"^\d+\s+(\d+\.\d+) (\w+)\((.*)<(\d+\.\d+)>$")


def ember_own_time(work, snap):
    """(window ms from execve to the first KVM_RUN, ms inside /dev/kvm ioctls in it) of
    `ember run --restore` under strace."""
    log = os.path.join(work, "strace.log")
    argv = ["strace", "-f", "-ttt", "-T", "--seccomp-bpf", "-e",
            "trace=execve,ioctl,mmap,openat,read", "-o", log,
            EMBER, "run", "--restore", snap, "--name", "bench-strace", "--serial", "stdio"]
    start = time.monotonic()
    env = ember_env(work)
    p = spawn(argv, env)
    try:
        p.stdin.write(PROBE)
        p.stdin.flush()
        read_until(p, PROBE, start)
    finally:
        # Killing strace would leave its tracee running: end the VM, then strace ends.
        subprocess.run([EMBER, "destroy", "bench-strace"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        try:
            p.wait(timeout=LIMIT)
        except subprocess.TimeoutExpired:
            stop(p)
    t_exec, kvm, end = None, 0.0, None
    with open(log) as f:
        for line in f:
            m = STRACE_LINE.match(line.strip())
            if not m:
                continue
            t, call, args, took = float(m.group(1)), m.group(2), m.group(3), float(m.group(4))
            if call == "execve" and t_exec is None:
                t_exec = t
            elif call == "ioctl" and "KVM_RUN" in args:
                end = t
                break
            elif call == "ioctl" and "KVM_" in args:
                kvm += took
    if t_exec is None or end is None:
        sys.exit(f"strace: no execve or KVM_RUN in {log}")
    return (end - t_exec) * 1000, kvm * 1000


def fmt_ms(xs):
    return f"{statistics.median(xs) * 1000:7.1f}"


def main():
    global FIRECRACKER
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--firecracker", default=FIRECRACKER)
    ap.add_argument("--img", action="store_true", help="also benches/disk.sh's snapshot table")
    ap.add_argument("--no-diff", action="store_true", help="leave out the Diff snapshot table")
    ap.add_argument("--only-diff", action="store_true", help="only the Diff snapshot table")
    args = ap.parse_args()
    FIRECRACKER = args.firecracker
    if not os.access(FIRECRACKER, os.X_OK):
        sys.exit(f"no Firecracker at {FIRECRACKER} (give --firecracker PATH or $FIRECRACKER)")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=REPO, check=True)
    with tempfile.TemporaryDirectory(dir=os.path.join(REPO, "target")) as work:
        kernel = os.path.join(work, "tiny.elf")
        subprocess.run(["cargo", "run", "--release", "-q", "--example", "tiny_kernel", "--",
                        "write", kernel], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        if not args.no_diff:
            diff_table = diff_rows(work, kernel, args.runs)
        rows = []
        for mib in SIZES if not args.only_diff else ():
            res = {k: [] for k in ("e_create", "e_save", "f_create", "e_cli", "e_api",
                                   "f_api", "own", "kvm")}
            e_snap, f_snap = (os.path.join(work, f"{v}-{mib}.snap") for v in ("e", "f"))
            for run in range(args.runs):
                t, saved, e_sizes = create_ember(work, kernel, mib, e_snap)
                res["e_create"].append(t)
                res["e_save"].append(saved)
                t, f_sizes = create_firecracker(work, kernel, mib, f_snap)
                res["f_create"].append(t)
                res["e_cli"].append(restore_cli(work, e_snap))
                res["e_api"].append(restore_api(work, e_snap, False))
                res["f_api"].append(restore_api(work, f_snap, True))
                window, kvm = ember_own_time(work, e_snap)
                res["own"].append(window - kvm)
                res["kvm"].append(kvm)
            rows.append((mib, res, e_sizes, f_sizes))
        if rows:
            report(rows, args.runs)
        if not args.no_diff:
            report_diff(diff_table, args.runs)
    if args.img:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import disk
        with tempfile.TemporaryDirectory(dir=os.path.join(REPO, "target")) as d:
            disk.snapshot_table(d, args.runs)


def report(rows, runs):
    print(f"== snapshots of the tiny kernel (echo), median of {runs} runs; all times in ms")
    print(f"{'guest RAM':10s} {'':24s} {'ember':>9s} {'firecracker':>12s}")
    for mib, r, e, f in rows:
        ram = f"{mib} MiB"
        each = lambda xs: "/".join(f"{x * 1000:.0f}" for x in xs)
        print(f"{ram:10s} {'restore: run --restore':24s} {fmt_ms(r['e_cli']):>9s} {'-':>12s}"
              f"   ({each(r['e_cli'])})")
        print(f"{'':10s} {'restore: API /load':24s} {fmt_ms(r['e_api']):>9s} "
              f"{fmt_ms(r['f_api']):>12s}   ({each(r['e_api'])} | {each(r['f_api'])})")
        own = statistics.median(r["own"])
        kvm = statistics.median(r["kvm"])
        print(f"{'':10s} {'  ember own / in KVM':24s} {own:9.1f} {'-':>12s}   "
              f"(exec to 1st KVM_RUN under strace, minus {kvm:.1f} ms in KVM ioctls)")
        print(f"{'':10s} {'create (paused VM)':24s} {fmt_ms(r['e_create']):>9s} "
              f"{fmt_ms(r['f_create']):>12s}")
        print(f"{'':10s} {'ember save (pause..end)':24s} {fmt_ms(r['e_save']):>9s} "
              f"{'-':>12s}")
        print(f"{'':10s} {'state file KiB':24s} {e[0] / 1024:9.1f} {f[0] / 1024:12.1f}")
        print(f"{'':10s} {'memory file MiB':24s} {e[1] / 2**20:9.0f} {f[1] / 2**20:12.0f}")
        print(f"{'':10s} {'  allocated MiB':24s} {e[2] / 2**20:9.2f} {f[2] / 2**20:12.2f}")


if __name__ == "__main__":
    main()
