#!/usr/bin/env python3
"""Start-up benchmark: the smallest case of a CI run, a tiny kernel from exec to exit, under
ember, Firecracker, Cloud Hypervisor and qemu microvm, alternating runs, one table.

Every VMM boots the same file: the tiny test kernel (examples/tiny_kernel) with a PVH note,
1 vCPU, 16 MiB, serial to a pipe. The kernel prints a banner and ends the way each VMM turns
into a process exit: ember and qemu the debug-exit port (`exit=0`), Firecracker an i8042
reset (`reboot`), Cloud Hypervisor the ACPI sleep control register at 0x600 (`sleepctl`).
A run counts only if the banner came out and the status is the expected one.

usage: benches/start.sh [--runs N]
  $FIRECRACKER and $CLOUD_HYPERVISOR name the peers' binaries (default: under target/peers/,
  built as ../shared/PEERS.md says); a missing peer is left out of the table, said so.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from peer import EMBER, REPO

PEERS = os.path.join(REPO, "target", "peers")
FIRECRACKER = os.environ.get("FIRECRACKER",
                             os.path.join(PEERS, "fc-target", "release", "firecracker"))
CLOUD_HYPERVISOR = os.environ.get("CLOUD_HYPERVISOR", os.path.join(
    PEERS, "ch-target", "release", "cloud-hypervisor"))
BANNER = b"tiny: hello from the tiny kernel"
# qemu passes IA32_ARCH_CAPABILITIES through, which a host KVM may refuse (kvm_pvm does).
QEMU_CPU = "host,-arch-capabilities"


def vmms(work, kernel):
    """(name, argv, expected exit status) for each VMM present."""
    fc_config = os.path.join(work, "fc.json")
    with open(fc_config, "w") as f:
        f.write('{"boot-source": {"kernel_image_path": "%s", "boot_args": "reboot"},'
                ' "drives": [], "machine-config": {"vcpu_count": 1, "mem_size_mib": 16}}'
                % kernel)
    qemu = subprocess.run([os.path.join(REPO, "benches", "peers.sh")], check=True,
                          stdout=subprocess.PIPE, text=True).stdout.strip()
    share = os.path.join(os.path.dirname(os.path.dirname(qemu)), "share")
    out = [
        ("ember run", [EMBER, "run", "--kernel", kernel, "--memory", "16M",
                       "--cmdline", "exit=0"], 1),
        ("ember run --no-api", [EMBER, "run", "--kernel", kernel, "--memory", "16M",
                                "--cmdline", "exit=0", "--no-api"], 1),
    ]
    if os.access(FIRECRACKER, os.X_OK):
        out.append(("firecracker --no-api", [FIRECRACKER, "--no-api", "--config-file",
                                             fc_config, "--level", "Error"], 0))
    else:
        print(f"no Firecracker at {FIRECRACKER} ($FIRECRACKER): left out", file=sys.stderr)
    if os.access(CLOUD_HYPERVISOR, os.X_OK):
        out.append(("cloud-hypervisor", [CLOUD_HYPERVISOR, "--kernel", kernel, "--cmdline",
                                         "sleepctl", "--cpus", "boot=1", "--memory",
                                         "size=16M", "--serial", "tty", "--console", "off"], 0))
    else:
        print(f"no Cloud Hypervisor at {CLOUD_HYPERVISOR} ($CLOUD_HYPERVISOR): left out",
              file=sys.stderr)
    out.append(("qemu microvm", [qemu, "-L", os.path.join(share, "qemu"), "-L",
                                 os.path.join(share, "seabios"), "-M",
                                 "microvm,x-option-roms=off", "-enable-kvm", "-cpu", QEMU_CPU,
                                 "-m", "16M", "-nodefaults", "-no-user-config", "-nographic",
                                 "-serial", "stdio", "-device",
                                 "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", kernel,
                                 "-append", "exit=0"], 1))
    return out


def once(argv, status, env):
    start = time.monotonic()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=env, timeout=60)
    took = time.monotonic() - start
    if p.returncode != status or BANNER not in p.stdout:
        raise SystemExit(f"{argv[0]} exited {p.returncode} (expected {status}); stdout "
                         f"{p.stdout[-300:]!r}; stderr {p.stderr[-300:]!r}")
    return took


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=REPO, check=True)
    with tempfile.TemporaryDirectory(prefix="ember-start-bench-") as work:
        kernel = os.path.join(work, "tiny-pvh.elf")
        subprocess.run(["cargo", "run", "--release", "-q", "--example", "tiny_kernel", "--",
                        "write-pvh", kernel], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        env = dict(os.environ, EMBER_STATE_DIR=os.path.join(work, "state"))
        rows = vmms(work, kernel)
        times = {name: [] for name, _, _ in rows}
        load = os.getloadavg()[0]
        for name, argv, status in rows:  # one untimed run each: caches warm
            once(argv, status, env)
        for _ in range(args.runs):
            for name, argv, status in rows:
                times[name].append(once(argv, status, env))
        print(f"\ntiny kernel (PVH ELF, 1 vCPU, 16 MiB) from exec to exit, {args.runs} "
              f"alternating runs each; load average {load:.2f} before, "
              f"{os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)\n")
        print(f"{'VMM':24} {'median ms':>10} {'min ms':>8} {'p90 ms':>8}")
        for name, _, _ in rows:
            t = sorted(times[name])
            p90 = t[min(len(t) - 1, int(len(t) * 0.9))]
            print(f"{name:24} {statistics.median(t) * 1e3:10.1f} {t[0] * 1e3:8.1f} "
                  f"{p90 * 1e3:8.1f}")


if __name__ == "__main__":
    main()
