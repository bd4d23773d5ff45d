//! Bad input: one line on stderr naming the option or file, exit status 2. And the help and
//! version a qemu user reaches for. The last few need /dev/kvm (the kernel is only parsed
//! once the VM exists).

mod common;
#[path = "../examples/tiny_kernel/guest.rs"]
mod guest;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(30);

/// Runs `ember run ARGS...` and checks the usage-error contract; returns the line.
fn usage_error(args: &[&str], mentions: &str) -> String {
    let mut cmd = ember();
    cmd.arg("run").args(args);
    let r = run(cmd, LIMIT);
    assert_eq!(r.code(), Some(2), "{args:?}: {r:?}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line, got {:?}",
        r.stderr
    );
    assert!(lines[0].starts_with("ember: "), "{}", lines[0]);
    assert!(
        lines[0].contains(mentions),
        "{args:?}: {:?} lacks {mentions:?}",
        lines[0]
    );
    assert!(r.stdout.is_empty());
    lines[0].to_string()
}

fn tiny_file(dir: &tempfile::TempDir) -> String {
    let p = dir.path().join("tiny.elf");
    std::fs::write(&p, guest::elf_image()).unwrap();
    p.display().to_string()
}

#[test]
fn no_kernel_without_an_api_is_a_usage_error() {
    usage_error(&["--no-api"], "--no-api");
}

#[test]
fn kernel_that_does_not_exist_is_named() {
    let line = usage_error(&["--kernel", "/nonexistent/bzImage"], "--kernel");
    assert!(
        line.contains("cannot open '/nonexistent/bzImage'"),
        "{line}"
    );
}

#[test]
fn empty_or_directory_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    usage_error(&["--kernel", empty.to_str().unwrap()], "is empty");
    usage_error(
        &["--kernel", dir.path().to_str().unwrap()],
        "not a regular file",
    );
}

#[test]
fn unreadable_initrd_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_file(&dir);
    usage_error(
        &["--kernel", &k, "--initrd", "/nonexistent.cpio"],
        "--initrd",
    );
}

#[test]
fn bad_sizes_name_the_option_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_file(&dir);
    let line = usage_error(&["--kernel", &k, "--memory", "512Q"], "--memory");
    assert!(line.contains("K, M, G or T"), "{line}");
    usage_error(&["--kernel", &k, "--memory", "4M"], "too small");
    usage_error(&["--kernel", &k, "-m", "lots"], "--memory");
}

#[test]
fn too_many_or_zero_cpus_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_file(&dir);
    usage_error(&["--kernel", &k, "--cpus", "64"], "1 to 32");
    usage_error(&["--kernel", &k, "--cpus", "0"], "--cpus");
}

#[test]
fn bad_console_reboot_and_feature_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_file(&dir);
    usage_error(&["--kernel", &k, "--serial", "tcp:1"], "--serial");
    usage_error(&["--kernel", &k, "--reboot", "sometimes"], "--reboot");
    usage_error(
        &["--kernel", &k, "--cpu-features", "-nosuchflag"],
        "nosuchflag",
    );
    usage_error(&["--kernel", &k, "--debug-exit=maybe"], "--debug-exit");
    usage_error(&["--kernel", &k, "--no-such-option"], "--no-such-option");
}

#[test]
fn serial_log_in_a_missing_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_file(&dir);
    usage_error(
        &["--kernel", &k, "--serial", "file=/nonexistent/dir/log"],
        "--serial file=/nonexistent/dir/log",
    );
}

#[test]
fn overlong_command_line_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_file(&dir);
    let long = "x".repeat(5000);
    usage_error(&["--kernel", &k, "--cmdline", &long], "--cmdline");
}

#[test]
fn version_and_help_exit_0() {
    let mut v = ember();
    v.arg("--version");
    let r = run(v, LIMIT);
    assert_eq!(r.code(), Some(0));
    assert!(r.stdout.starts_with("ember "), "{r:?}");
    let mut h = ember();
    h.args(["run", "--help"]);
    let r = run(h, LIMIT);
    assert_eq!(r.code(), Some(0));
    for opt in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
        "--cpu-features",
        "--reboot",
        "--debug-exit",
        "qemu: -append",
    ] {
        assert!(r.stdout.contains(opt), "help lacks {opt}");
    }
}

// The rest parse the kernel, which happens once the VM exists: they need /dev/kvm.

#[test]
fn file_that_is_not_a_kernel_is_refused() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    usage_error(&["--kernel", junk.to_str().unwrap()], "not a kernel image");
}

#[test]
fn memory_too_small_for_kernel_and_initrd_is_refused() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_file(&dir);
    let initrd = dir.path().join("big.cpio");
    std::fs::write(&initrd, vec![0u8; 20 << 20]).unwrap();
    let line = usage_error(
        &[
            "--kernel",
            &k,
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "16M",
        ],
        "too small",
    );
    assert!(line.contains("16 MiB"), "{line}");
}

/// Runs `ember img ARGS...`.
fn ember_img(args: &[&str]) -> Run {
    let mut cmd = ember();
    cmd.arg("img").args(args);
    run(cmd, LIMIT)
}

#[test]
fn an_image_in_use_is_refused_by_ember_and_qemu_img_alike() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_file(&dir);
    let path = |n: &str| dir.path().join(n).display().to_string();
    let (base, a, b) = (path("base.qcow2"), path("a.qcow2"), path("b.qcow2"));
    assert_eq!(
        ember_img(&["create", "-f", "qcow2", &base, "8M"]).code(),
        Some(0)
    );
    for o in [&a, &b] {
        let r = ember_img(&["create", "-f", "qcow2", "-b", &base, "-F", "qcow2", o]);
        assert_eq!(r.code(), Some(0), "{r:?}");
    }
    // A VM that stays up with overlay a (over the base) as its disk.
    let mut holder = ember()
        .args(["run", "--kernel", &k, "--memory", "16M", "--serial", "none"])
        .args(["--cmdline", "halt", "--disk"])
        .arg(format!("path={a}"))
        .spawn()
        .unwrap();
    wait_locked(&a, &mut holder, "ember", LIMIT);
    // A second VM on the same overlay: one line, status 2.
    let line = usage_error(
        &[
            "--kernel",
            &k,
            "--memory",
            "16M",
            "--disk",
            &format!("path={a}"),
        ],
        "is in use",
    );
    assert!(line.contains(&a), "{line}");
    // The readers: refused without -U, fine with it; qemu-img sees our locks too.
    let r = ember_img(&["check", &a]);
    assert_eq!(r.code(), Some(2), "{r:?}");
    assert_eq!(ember_img(&["info", "-U", &a]).code(), Some(0));
    assert_eq!(ember_img(&["check", "-U", &a]).code(), Some(0));
    let len = std::fs::metadata(&a).unwrap().len();
    let r = ember_img(&["create", "-f", "raw", &a, "1M"]);
    assert_eq!(r.code(), Some(2), "{r:?}");
    assert!(r.stderr.contains("is in use"), "{r:?}");
    assert_eq!(
        std::fs::metadata(&a).unwrap().len(),
        len,
        "create truncated an image in use"
    );
    let q = std::process::Command::new("qemu-img")
        .args(["info", &a])
        .output()
        .expect("qemu-img is needed for this test");
    assert!(
        !q.status.success(),
        "qemu-img opened an image ember is writing"
    );
    assert!(String::from_utf8_lossy(&q.stderr).contains("lock"));
    // The shared base can be read by another VM (through overlay b) but not written.
    let r = {
        let mut cmd = ember();
        cmd.args(["run", "--kernel", &k, "--memory", "16M", "--serial", "none"])
            .args(["--cmdline", "exit=0", "--disk"])
            .arg(format!("path={b}"));
        run(cmd, LIMIT)
    };
    assert_eq!(r.code(), Some(1), "{r:?}");
    usage_error(
        &[
            "--kernel",
            &k,
            "--memory",
            "16M",
            "--disk",
            &format!("path={base}"),
        ],
        "\"write\" lock",
    );
    signal(&holder, libc::SIGTERM);
    wait_deadline(&mut holder, LIMIT).unwrap();
    // Now free: qemu-io writing it excludes ember in turn.
    let mut qemu = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", &a])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io is needed for this test");
    wait_locked(&a, &mut qemu, "qemu-io", LIMIT);
    usage_error(
        &[
            "--kernel",
            &k,
            "--memory",
            "16M",
            "--disk",
            &format!("path={a}"),
        ],
        "is in use",
    );
    drop(qemu.stdin.take());
    qemu.wait().unwrap();
    assert_eq!(ember_img(&["check", &a]).code(), Some(0));
}
