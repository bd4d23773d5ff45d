"""What the guest benchmarks share: where things are, and how to give qemu microvm the same
guest CPU as ember (the same features hidden, and the same `clearcpuid=` on the kernel
command line where the host's KVM shows some of them anyway)."""

import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(REPO, "target", "guest")
EMBER = os.path.join(REPO, "target", "release", "ember")
QEMU_HIDDEN = ("-cx16,-xsave,-smap,-popcnt,-rdrand,-rdseed,-fsgsbase,-invpcid,-pcid,-umip,"
               "-pku,-kvm-pv-ipi,-kvm-pv-unhalt,-kvm-pv-sched-yield,-arch-capabilities")


def qemu_microvm(memory_mib, kernel, initrd):
    """The start of a qemu microvm command line (benches/peers.sh fetches qemu 7.2)."""
    qemu = subprocess.run([os.path.join(REPO, "benches", "peers.sh")], check=True,
                          stdout=subprocess.PIPE, text=True).stdout.strip()
    share = os.path.join(os.path.dirname(os.path.dirname(qemu)), "share")
    return [qemu, "-L", os.path.join(share, "qemu"), "-L", os.path.join(share, "seabios"),
            "-M", "microvm,rtc=on", "-enable-kvm", "-cpu", "host," + QEMU_HIDDEN,
            "-m", str(memory_mib), "-nographic", "-nodefaults", "-no-reboot",
            "-serial", "stdio", "-kernel", kernel, "-initrd", initrd]


def clearcpuid(kernel):
    """' clearcpuid=...' when ember adds it to the guest's command line on this host, else ''.
    Starts ember on the kernel and stops it as soon as it has said what it hides."""
    p = subprocess.Popen([EMBER, "run", "--kernel", kernel, "--memory", "256M", "--serial",
                          "none"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()
    finally:
        p.kill()
        p.wait()
    if p.returncode not in (0, -9):
        raise SystemExit(f"ember run on {kernel} failed: {line.strip()}")
    m = re.search(r"so clearcpuid=(\S+) is added", line)
    return f" clearcpuid={m.group(1)}" if m else ""
