//! Helpers shared by the integration tests: find the ember binary, /dev/kvm and the guest
//! kit (or fail loudly), and run ember with a deadline.
#![allow(dead_code)]

pub mod vm;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The state and definition directories the tests' VMs use (not the host's /run/ember).
pub fn state_dirs() -> (PathBuf, PathBuf) {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    (base.join("ember-state"), base.join("ember-config"))
}

/// The ember binary cargo built for these tests, with the tests' state directories.
pub fn ember() -> Command {
    let (state, config) = state_dirs();
    let mut c = Command::new(env!("CARGO_BIN_EXE_ember"));
    c.env("EMBER_STATE_DIR", state)
        .env("EMBER_CONFIG_DIR", config);
    c
}

/// Panics unless /dev/kvm can be opened: these tests need it and must not pass without it.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm, which cannot be opened here ({e}); run it on a KVM host");
    }
}

/// The guest kit built by tests/guest/build.sh.
pub struct GuestKit {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
}

/// Finds the guest kit (in `$EMBER_GUEST_DIR` or target/guest), or panics saying how to
/// build it.
pub fn guest_kit() -> GuestKit {
    let dir = std::env::var_os("EMBER_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/guest"));
    let kit = GuestKit {
        vmlinux: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        initramfs: dir.join("initramfs.cpio"),
        rootfs: dir.join("rootfs.ext4"),
    };
    for f in [&kit.vmlinux, &kit.bzimage, &kit.initramfs, &kit.rootfs] {
        assert!(
            f.is_file(),
            "guest kit file {} is missing: run tests/guest/build.sh first",
            f.display()
        );
    }
    kit
}

/// Linux boots take a core or two for a minute or more on hosts that emulate guest kernel
/// code: tests that boot Linux hold this lock so they do not run at the same time.
pub fn heavy_boot_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a finished run left.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Starts `cmd` with piped stdio, feeds `input`, and waits up to `limit`; on timeout the
/// process is killed and the test fails with everything it printed.
pub fn run_with_input(mut cmd: Command, input: &[u8], limit: Duration) -> Run {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember");
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
        // Dropping stdin closes it: EOF for the guest's console input.
    });
    let status = wait_deadline(&mut child, limit);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = feeder.join();
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    match status {
        Some(status) => Run {
            status,
            stdout,
            stderr,
        },
        None => {
            panic!("ember did not finish within {limit:?}\nstdout:\n{stdout}\nstderr:\n{stderr}")
        }
    }
}

/// `run_with_input` with no input.
pub fn run(cmd: Command, limit: Duration) -> Run {
    run_with_input(cmd, b"", limit)
}

/// Waits for `child` until `limit`; None on timeout.
pub fn wait_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return Some(s);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to `child`.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill failed");
}

/// The md5 of `data` as md5sum prints it (via the md5sum tool).
pub fn md5_hex(data: &[u8]) -> String {
    let mut p = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(data).unwrap();
    let out = p.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Runs a host tool the test needs (failing loudly when it is not installed).
pub fn tool(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (this test needs it installed): {e}"))
}

/// Runs a host tool the test needs and asserts it succeeded.
pub fn tool_ok(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = tool(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `ember img create -f qcow2 -b BACKING -F FMT OVERLAY`, asserted to succeed (BACKING as
/// the overlay will name it: relative names resolve against the overlay's directory).
pub fn ember_overlay(overlay: &str, backing: &str, backing_fmt: &str) {
    ember_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_fmt,
        overlay,
    ]);
}

/// `ember img ARGS...`, asserted to succeed.
pub fn ember_img_ok(args: &[&str]) -> std::process::Output {
    let out = ember().arg("img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ember img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `qemu-img check` finds no errors and no leaks (exit status 0).
pub fn assert_qemu_img_clean(path: &std::path::Path) {
    let out = tool_ok("qemu-img", &["check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
}

/// Whether some process holds a lock on `path` that a writer would conflict with. Asked
/// with F_OFD_GETLK on a descriptor of our own, which takes no lock: probing with `img info`
/// would take a read lock itself and race the holder's own open.
pub fn locked(path: &str) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a plain C struct; all zeroes is a valid value before the fields are set.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_GETLK reads and writes the flock we pass, which outlives the call.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(
        rc,
        0,
        "F_OFD_GETLK on {path}: {}",
        std::io::Error::last_os_error()
    );
    fl.l_type != libc::F_UNLCK as libc::c_short
}

/// Waits until `path` is locked by `who`, failing if `who` exits first or never locks it.
pub fn wait_locked(path: &str, who: &mut Child, name: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !locked(path) {
        if let Some(st) = who.try_wait().unwrap() {
            panic!("{name} exited ({st}) before it locked {path}");
        }
        assert!(Instant::now() < deadline, "{name} never locked {path}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The vCPU indexes in `ember vcpuinfo`'s output (its `VCPU:` lines).
pub fn vcpuinfo_ids(out: &str) -> Vec<u32> {
    out.lines()
        .filter_map(|l| l.strip_prefix("VCPU:"))
        .map(|v| v.trim().parse().unwrap())
        .collect()
}
