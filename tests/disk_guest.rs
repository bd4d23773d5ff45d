//! Linux (guest kit) on virtio-blk: booting from a qcow2 overlay over a qcow2 or raw base,
//! writing files, syncing, powering off; then `qemu-img check` is clean, the base is
//! unchanged and the files are there on the next boot (or, for the raw base, in the image
//! as debugfs reads it). Needs /dev/kvm, the guest kit and qemu-img.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const BOOT_LIMIT: Duration = Duration::from_secs(900);
const FLAGS: &str = "console=ttyS0 quiet tsc=reliable no_timer_check";

fn tool(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (this test needs it installed): {e}"))
}

fn ember_img(args: &[&str]) {
    let out = ember().arg("img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ember img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img_check_clean(path: &Path) {
    let out = tool("qemu-img", &["check", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha(path: &Path) -> Vec<u8> {
    tool("sha256sum", &[path.to_str().unwrap()]).stdout
}

fn boot(kit: &GuestKit, disks: &[String], run: &str) -> Run {
    let mut cmd = ember();
    cmd.args(["run", "--kernel"]).arg(&kit.vmlinux);
    for d in disks {
        cmd.arg("--disk").arg(d);
    }
    cmd.args(["--root", "/dev/vda", "--memory", "128M", "--cmdline"])
        .arg(format!("{FLAGS} ember.run={run} ember.end=poweroff"));
    let r = common::run(cmd, BOOT_LIMIT);
    assert_eq!(r.code(), Some(0), "{}\n{}", r.stdout, r.stderr);
    r
}

#[test]
fn overlay_on_qcow2_base_keeps_guest_writes_and_the_base_intact() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let extra = dir.path().join("extra.raw");
    ember_img(&[
        "convert",
        "-O",
        "qcow2",
        kit.rootfs.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    ember_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    ember_img(&["create", "-q", "-f", "raw", extra.to_str().unwrap(), "8M"]);
    let base_before = sha(&base);
    let disks = [
        format!("path={}", top.display()),
        format!(
            "path={},format=raw,readonly=on,serial=ember-vdb",
            extra.display()
        ),
    ];

    let first = boot(&kit, &disks, "disks,disk-write");
    assert!(
        first.stdout.contains("EMBER-BLOCK vda sectors=131072 ro=0"),
        "{}",
        first.stdout
    );
    assert!(
        first
            .stdout
            .contains("EMBER-BLOCK vdb sectors=16384 ro=1 serial=ember-vdb"),
        "{}",
        first.stdout
    );
    assert!(
        first.stdout.contains("EMBER-DISK written"),
        "{}",
        first.stdout
    );
    qemu_img_check_clean(&top);
    assert_eq!(sha(&base), base_before, "the base image changed");

    let second = boot(&kit, &disks[..1], "disk-check");
    assert!(
        second.stdout.contains("EMBER-DISK present"),
        "{}",
        second.stdout
    );
    qemu_img_check_clean(&top);
    assert_eq!(sha(&base), base_before);
}

#[test]
fn overlay_on_raw_base_holds_the_files_the_guest_synced() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::copy(&kit.rootfs, &base).unwrap();
    let top = dir.path().join("top.qcow2");
    ember_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]);
    let base_before = sha(&base);
    boot(
        &kit,
        &[format!("path={},format=qcow2", top.display())],
        "disk-write",
    );
    qemu_img_check_clean(&top);
    assert_eq!(sha(&base), base_before, "the base image changed");
    // Read the guest's file back out of the flattened image, without booting again.
    let flat = dir.path().join("flat.raw");
    let out = tool(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            top.to_str().unwrap(),
            flat.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    let cat = tool(
        "debugfs",
        &["-R", "cat /data/hello.txt", flat.to_str().unwrap()],
    );
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout).trim(),
        "ember-disk-test"
    );
}
