//! Linux (guest kit) on virtio-blk: booting from a qcow2 overlay over a qcow2 or raw base,
//! writing files, syncing, powering off (or being killed with SIGKILL); then `qemu-img check`
//! finds no errors, the base is unchanged and the files are there on the next boot (or, for
//! the raw base, in the image as debugfs reads it). Needs /dev/kvm, the guest kit and
//! qemu-img.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const BOOT_LIMIT: Duration = Duration::from_secs(900);
const FLAGS: &str = "console=ttyS0 quiet tsc=reliable no_timer_check";

fn sha(path: &Path) -> Vec<u8> {
    tool_ok("sha256sum", &[path.to_str().unwrap()]).stdout
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
    ember_img_ok(&[
        "convert",
        "-O",
        "qcow2",
        kit.rootfs.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    ember_overlay(top.to_str().unwrap(), "base.qcow2", "qcow2");
    ember_img_ok(&["create", "-q", "-f", "raw", extra.to_str().unwrap(), "8M"]);
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
    assert_qemu_img_clean(&top);
    assert_eq!(sha(&base), base_before, "the base image changed");

    let second = boot(&kit, &disks[..1], "disk-check");
    assert!(
        second.stdout.contains("EMBER-DISK present"),
        "{}",
        second.stdout
    );
    assert_qemu_img_clean(&top);
    assert_eq!(sha(&base), base_before);
}

#[test]
fn synced_writes_survive_kill_9_of_ember() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::copy(&kit.rootfs, &base).unwrap();
    let top = dir.path().join("top.qcow2");
    ember_overlay(top.to_str().unwrap(), "base.raw", "raw");
    let base_before = sha(&base);
    // The guest syncs, says so, and stays up: ember is then killed, not shut down.
    let mut child = ember()
        .args(["run", "--kernel"])
        .arg(&kit.vmlinux)
        .arg("--disk")
        .arg(format!("path={},format=qcow2", top.display()))
        .args(["--root", "/dev/vda", "--memory", "128M", "--cmdline"])
        .arg(format!("{FLAGS} ember.run=disk-write ember.end=shell"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let seen = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("EMBER-DISK written"))
    });
    let deadline = std::time::Instant::now() + BOOT_LIMIT;
    while !seen.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never synced"
        );
        assert!(child.try_wait().unwrap().is_none(), "ember ended early");
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(seen.join().unwrap(), "no EMBER-DISK line");
    // An interrupted VMM may leak clusters, never corrupt the image.
    let check = tool("qemu-img", &["check", top.to_str().unwrap()]);
    let code = check.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert_eq!(sha(&base), base_before, "the base image changed");
    // Read the guest's file back out of the flattened image, without booting again.
    let flat = dir.path().join("flat.raw");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            top.to_str().unwrap(),
            flat.to_str().unwrap(),
        ],
    );
    // `sync` made the files durable in ext4's journal; it may not have been checkpointed
    // into place when ember died, and debugfs does not replay journals: e2fsck does, as
    // a mount would (exit 1: it fixed something, which a replay counts as).
    let fsck = tool("e2fsck", &["-fy", flat.to_str().unwrap()]);
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = tool_ok(
        "debugfs",
        &["-R", "cat /data/hello.txt", flat.to_str().unwrap()],
    );
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout).trim(),
        "ember-disk-test"
    );
    let md5 = tool_ok(
        "debugfs",
        &["-R", "cat /data/blob.md5", flat.to_str().unwrap()],
    );
    let blob = tool_ok("debugfs", &["-R", "cat /data/blob", flat.to_str().unwrap()]);
    let want = String::from_utf8_lossy(&md5.stdout);
    let digest = md5_hex(&blob.stdout);
    assert!(
        want.starts_with(&digest),
        "blob checksum {digest} vs {want}"
    );
}
