//! Linux (guest kit) with everything on virtio-pci, in one boot: the root disk (a qcow2
//! overlay on the kit's ext4 root), a second raw disk and a NIC on a tap in a network
//! namespace. The guest lists the PCI functions and their drivers, takes MSI-X interrupts
//! per queue, writes files on its root, writes and reads back the second disk, pings the
//! host, and powers off; then `qemu-img check` finds the overlay clean and the raw disk holds
//! what the guest wrote. Needs root, /dev/kvm, the guest kit, iproute2 and qemu-img.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const BOOT_LIMIT: Duration = Duration::from_secs(900);
const FLAGS: &str = "console=ttyS0 quiet tsc=reliable no_timer_check";

/// A network namespace holding a tap at 10.0.3.1/24, deleted on drop.
struct Netns(String);

impl Netns {
    fn with_tap() -> Self {
        let name = format!("ember-pci-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let made = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("this test needs iproute2 (ip)");
        assert!(
            made.success(),
            "cannot create network namespace {name} (needs root)"
        );
        let ns = Netns(name);
        let script = "ip link set lo up && ip tuntap add dev tap0 mode tap \
                      && ip addr add 10.0.3.1/24 dev tap0 && ip link set tap0 up";
        let out = ns.cmd("sh").args(["-c", script]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ns
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The guest's line starting with `prefix` that contains all of `parts`.
fn line_with<'a>(out: &'a str, prefix: &str, parts: &[&str]) -> &'a str {
    out.lines()
        .filter(|l| l.starts_with(prefix))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .unwrap_or_else(|| panic!("no {prefix} line with {parts:?} in:\n{out}"))
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

#[test]
fn linux_runs_its_disks_and_nic_on_virtio_pci_with_msix_and_powers_off_cleanly() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("top.qcow2");
    let extra = dir.path().join("extra.raw");
    ember_overlay(top.to_str().unwrap(), kit.rootfs.to_str().unwrap(), "raw");
    ember_img_ok(&["create", "-q", "-f", "raw", extra.to_str().unwrap(), "8M"]);
    let ns = Netns::with_tap();
    let (state, config) = state_dirs();
    let mut cmd = ns.cmd(env!("CARGO_BIN_EXE_ember"));
    cmd.env("EMBER_STATE_DIR", state)
        .env("EMBER_CONFIG_DIR", config)
        .args(["run", "--name", "pci-test", "--kernel"])
        .arg(&kit.vmlinux)
        .arg("--disk")
        .arg(format!("path={},transport=pci", top.display()))
        .arg("--disk")
        .arg(format!(
            "path={},format=raw,serial=ember-pci-vdb,transport=pci",
            extra.display()
        ))
        .args(["--net", "tap=tap0,transport=pci"])
        .args(["--root", "/dev/vda", "--memory", "128M", "--cmdline"])
        .arg(format!(
            "{FLAGS} ember.ip=10.0.3.2/24 ember.peer=10.0.3.1 \
             ember.run=pci,disks,disk-write,blk-rw,net-static,net-ping ember.end=poweroff"
        ));

    let r = run(cmd, BOOT_LIMIT);

    let out = &r.stdout;
    assert_eq!(r.code(), Some(0), "{out}\n{}", r.stderr);
    line_with(
        out,
        "EMBER-PCI",
        &["0000:00:00.0 0x1b36:0x0008 class=0x060000"],
    );
    for (slot, id, class) in [
        ("01", "0x1042", "0x018000"),
        ("02", "0x1042", "0x018000"),
        ("03", "0x1041", "0x020000"),
    ] {
        let want = format!("0000:00:{slot}.0 0x1af4:{id} class={class} driver=virtio-pci");
        line_with(out, "EMBER-PCI", &[&want]);
    }
    // One MSI-X vector per queue; the root disk's has taken interrupts.
    let req = line_with(out, "EMBER-IRQ", &["PCI-MSI", "virtio0-req.0"]);
    let count = req.split_whitespace().nth(2).unwrap();
    assert_ne!(count, "0", "{req}");
    line_with(out, "EMBER-IRQ", &["PCI-MSI", "-config"]);
    line_with(out, "EMBER-IRQ", &["PCI-MSI", "-input.0"]);
    line_with(out, "EMBER-BLOCK", &["vda sectors=131072 ro=0"]);
    line_with(
        out,
        "EMBER-BLOCK",
        &["vdb sectors=16384 ro=0 serial=ember-pci-vdb"],
    );
    line_with(out, "EMBER-DISK", &["written"]);
    let rw = line_with(out, "EMBER-BLKRW", &["vdb"]);
    let wrote = field(rw, "wrote=");
    assert_eq!(wrote, field(rw, "read="), "{rw}");
    let on_disk = std::fs::read(&extra).unwrap();
    assert_eq!(
        md5_hex(&on_disk[..262_144]),
        wrote,
        "the image holds the guest's write"
    );
    line_with(out, "EMBER-NET", &["eth0 mac=52:54:00:"]);
    line_with(out, "EMBER-PING", &["ok"]);
    assert!(!r.stderr.contains("decodes nothing"), "{}", r.stderr);
    assert_qemu_img_clean(&top);
}
