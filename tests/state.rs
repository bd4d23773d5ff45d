//! Snapshots end to end with the tiny test kernel (examples/tiny_kernel, `count` prints
//! `tick N` every 100 ms with N kept in a register): `ember save` / `restore` /
//! `run --restore`, Firecracker's `/snapshot/create` and `/snapshot/load`, named snapshots
//! on qcow2 and raw disks, clones, and hostile state and memory files. Every VM a test
//! starts is destroyed when the test ends, passed or failed. Needs /dev/kvm and qemu-img;
//! no Linux guest.

mod common;
#[path = "../examples/tiny_kernel/guest.rs"]
mod guest;

use std::cell::RefCell;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{assert_qemu_img_clean, require_kvm, state_dirs, tool, tool_ok, wait_deadline};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);
/// Only errors logged: Ember's modules need naming, as its logger lets them through at any
/// level by default (a bare `RUST_LOG=error` leaves them on).
const QUIET: &str = "error,ember=error,devices=error,boot=error";

/// A test's world: the tiny kernel, a scratch directory (which is also the snapshot store),
/// and the VMs and definitions the test made, destroyed and removed when it ends.
struct Lab {
    dir: tempfile::TempDir,
    kernel: PathBuf,
    tag: String,
    vms: RefCell<Vec<String>>,
    defined: RefCell<Vec<String>>,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("tiny.elf");
        std::fs::write(&kernel, guest::elf_image()).unwrap();
        Lab {
            dir,
            kernel,
            tag: tag.to_string(),
            vms: RefCell::new(Vec::new()),
            defined: RefCell::new(Vec::new()),
        }
    }

    /// A file in the scratch directory.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A VM name no other test uses; the VM is destroyed when the test ends.
    fn name(&self, what: &str) -> String {
        let n = format!("st-{}-{what}-{}", self.tag, std::process::id());
        self.vms.borrow_mut().push(n.clone());
        n
    }

    /// A definition `name` (the tiny kernel counting, 32 MiB, these disks); undefined when
    /// the test ends.
    fn define(&self, name: &str, disks: &[(&Path, &str)]) {
        let mut toml = format!(
            "name = \"{name}\"\nkernel = \"{}\"\ncmdline = \"count\"\nmemory = \"32M\"\n",
            self.kernel.display()
        );
        for (path, format) in disks {
            toml.push_str(&format!(
                "\n[[disk]]\npath = \"{}\"\nformat = \"{format}\"\n",
                path.display()
            ));
        }
        let file = self.path(&format!("{name}.toml"));
        std::fs::write(&file, toml).unwrap();
        self.ok(&["define".as_ref(), file.as_os_str()]);
        self.defined.borrow_mut().push(name.to_string());
    }

    /// `ember` with the tests' state and definition directories, this test's snapshot
    /// store, and only errors logged (not the note on the CPU features hidden on hosts
    /// that emulate guest kernel code), so a refusal is the one line on stderr.
    fn ember(&self) -> Command {
        let mut c = common::ember();
        c.env("EMBER_DATA_DIR", self.path("data"))
            .env("RUST_LOG", QUIET);
        c
    }

    /// Runs `ember ARGS` to its end (within LIMIT): (status, stdout, stderr).
    fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> (ExitStatus, String, String) {
        let mut cmd = self.ember();
        cmd.args(args);
        let r = common::run(cmd, LIMIT);
        (r.status, r.stdout, r.stderr)
    }

    /// `ember ARGS`, asserted to succeed; its stdout.
    fn ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let (status, out, err) = self.run(args);
        let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
        assert!(status.success(), "ember {shown:?}: {status}\n{out}{err}");
        out
    }

    /// `ember ARGS`, asserted to fail with status `code` and one line on stderr; the line.
    fn refused<S: AsRef<OsStr>>(&self, code: i32, args: &[S]) -> String {
        let (status, out, err) = self.run(args);
        let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
        assert_eq!(status.code(), Some(code), "ember {shown:?}\n{out}{err}");
        one_line(&err)
    }

    /// The tiny kernel's arguments for `ember run`.
    fn tiny(&self, cmdline: &str) -> Vec<String> {
        vec![
            "--kernel".into(),
            self.kernel.display().to_string(),
            "--memory".into(),
            "32M".into(),
            "--cmdline".into(),
            cmdline.into(),
        ]
    }

    /// `ember run ARGS` in the foreground (the console on its stdout).
    fn fg<S: AsRef<OsStr>>(&self, args: &[S]) -> Fg {
        let mut cmd = self.ember();
        cmd.args(args).args(["--serial", "stdio"]);
        Fg::spawn(cmd)
    }

    /// Starts the tiny kernel counting in the background as `name`.
    fn start_counting(&self, name: &str, extra: &[&str]) {
        let mut args = vec!["run".to_string(), "-d".into(), "--name".into(), name.into()];
        args.extend(self.tiny("count"));
        args.extend(extra.iter().map(|s| s.to_string()));
        self.ok(&args);
    }

    /// What VM `name` printed on its console so far (this run of its process).
    fn console(&self, name: &str) -> String {
        let log = state_dirs().0.join("vms").join(name).join("console.log");
        std::fs::read_to_string(log).unwrap_or_default()
    }

    /// Waits until VM `name`'s console satisfies `done`; its text.
    fn wait_console(&self, name: &str, done: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + LIMIT;
        loop {
            let text = self.console(name);
            if done(&text) {
                return text;
            }
            assert!(Instant::now() < end, "VM {name} printed only:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The state `ember list` shows for `name`, if it runs.
    fn list_state(&self, name: &str) -> Option<String> {
        self.ok(&["list"]).lines().find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.get(1) == Some(&name)).then(|| cols.get(2).unwrap_or(&"").to_string())
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in self.vms.borrow().iter() {
            let mut cmd = self.ember();
            cmd.args(["destroy", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let _ = cmd.status();
        }
        for name in self.defined.borrow().iter() {
            let mut cmd = self.ember();
            cmd.args(["undefine", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let _ = cmd.status();
        }
    }
}

/// `err` is exactly one line (`ember: ...`); returns it.
fn one_line(err: &str) -> String {
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line on stderr:\n{err}");
    assert!(lines[0].starts_with("ember: "), "{err}");
    lines[0].to_string()
}

/// An ember process in the foreground, its stdout collected as it arrives; killed when
/// dropped.
struct Fg {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    err: Option<JoinHandle<String>>,
    started: Instant,
}

impl Fg {
    fn spawn(mut cmd: Command) -> Fg {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ember");
        let out = Arc::new(Mutex::new(Vec::new()));
        let (sink, mut stdout) = (out.clone(), child.stdout.take().unwrap());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Fg {
            child,
            out,
            reader: Some(reader),
            err: Some(err),
            started,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Waits until the output satisfies `done`; the output. Fails if the process ends first.
    fn wait_for(&mut self, done: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + LIMIT;
        loop {
            let text = self.text();
            if done(&text) {
                return text;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                let (_, err) = self.finish();
                panic!("ember ended ({status}) having printed:\n{text}\nstderr:\n{err}");
            }
            assert!(
                Instant::now() < end,
                "waited {LIMIT:?}; printed only:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to end: (status, stdout, stderr).
    fn wait_exit(&mut self) -> (ExitStatus, String, String) {
        let status = wait_deadline(&mut self.child, LIMIT);
        let (out, err) = self.finish();
        let status = status.unwrap_or_else(|| panic!("ember did not end\n{out}\n{err}"));
        (status, out, err)
    }

    /// Kills the process if it still runs and collects what it printed.
    fn finish(&mut self) -> (String, String) {
        if self.child.try_wait().unwrap().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let err = self
            .err
            .take()
            .map(|e| e.join().unwrap())
            .unwrap_or_default();
        (self.text(), err)
    }
}

impl Drop for Fg {
    fn drop(&mut self) {
        self.finish();
    }
}

// ---- the counter's output ---------------------------------------------------------------

/// The numbers of the complete `tick N` lines in `text`.
fn ticks(text: &str) -> Vec<u32> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("tick ")?.parse().ok())
        .collect()
}

/// The last complete tick in `text` (0 before the first).
fn last_tick(text: &str) -> u32 {
    ticks(text).last().copied().unwrap_or(0)
}

/// Asserts that `before` (a counting VM's whole output, from its banner, up to its
/// snapshot) followed by `after` (what a VM restored from that snapshot printed) is one
/// count: `tick 1`, `tick 2`, ... each once, in order, no byte lost or doubled, even where
/// the snapshot cut a line. Returns the last tick of `before` and of the whole.
fn assert_one_count(before: &str, after: &str) -> (u32, u32) {
    let header = "TSC cycles\n";
    let at = before
        .find(header)
        .unwrap_or_else(|| panic!("no counting header in:\n{before}"))
        + header.len();
    let joined = format!("{}{after}", &before[at..]);
    let mut next = 1;
    for line in joined.split_inclusive('\n') {
        let want = format!("tick {next}\n");
        if line.ends_with('\n') {
            assert_eq!(
                line, want,
                "the count broke:\n--- before\n{before}\n--- after\n{after}"
            );
            next += 1;
        } else {
            assert!(want.starts_with(line), "a cut line went on wrong: {line:?}");
        }
    }
    (last_tick(&before[at..]), next - 1)
}

// ---- Firecracker's API over its socket --------------------------------------------------

/// One HTTP/1.1 request on the unix socket `sock`: (status, body).
fn api(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                let status = text[9..12].parse().unwrap();
                return (status, text[end + 4..end + 4 + len].to_string());
            }
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the API closed the connection after: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Waits until a fresh `ember run --api-sock` answers on `sock`.
fn wait_for_api(sock: &Path) {
    let end = Instant::now() + LIMIT;
    while UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < end, "no API on {}", sock.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A scratch path as the `&str` ember's arguments take.
fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `ember run --name NAME` of the tiny kernel counting, plus `extra`.
fn count_args<'a>(lab: &'a Lab, name: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut args = vec!["run".to_string(), "--name".into(), name.into()];
    args.extend(lab.tiny("count"));
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

// ---- save / restore ---------------------------------------------------------------------

#[test]
fn save_then_two_restores_of_one_file_both_go_on_at_the_next_tick() {
    let lab = Lab::new("save");
    let (a, b) = (lab.name("a"), lab.name("b"));
    let file = lab.path("a.snap");
    let mut run_a = lab.fg(&count_args(&lab, &a, &[]));
    run_a.wait_for(|t| last_tick(t) >= 3);

    lab.ok(&["save", &a, s(&file)]);
    let (status, before, err) = run_a.wait_exit();
    assert_eq!(status.code(), Some(0), "{err}");
    let meta = std::fs::metadata(lab.path("a.snap.mem")).unwrap();
    assert_eq!(meta.len(), 32 << 20, "the memory file is guest RAM long");
    assert!(meta.blocks() * 512 < 8 << 20, "zero pages are holes");

    // The saved name in the background, another name in the foreground, at once.
    assert_eq!(lab.ok(&["restore", s(&file)]).trim(), a);
    let mut run_b = lab.fg(&["run", "--restore", s(&file), "--name", &b]);
    let first = run_b.wait_for(|t| !ticks(t).is_empty());
    let latency = run_b.started.elapsed();
    let after_a = lab.wait_console(&a, |t| ticks(t).len() >= 3);
    let after_b = run_b.wait_for(|t| ticks(t).len() >= 3);

    let (n, _) = assert_one_count(&before, &after_a);
    assert!(n >= 3, "saved after tick {n}");
    assert_one_count(&before, &after_b);
    assert!(ticks(&first)[0] <= n + 2, "restored past tick {n}: {first}");
    assert!(
        latency < Duration::from_secs(5),
        "first tick {latency:?} after exec"
    );
    assert_eq!(lab.list_state(&a).as_deref(), Some("running"));
    let line = lab.refused(2, &["restore", s(&file)]);
    assert!(line.contains("already running"), "{line}");
}

#[test]
fn restore_paused_prints_nothing_until_resumed() {
    let lab = Lab::new("paused");
    let (a, b) = (lab.name("a"), lab.name("b"));
    let file = lab.path("a.snap");
    let mut run_a = lab.fg(&count_args(&lab, &a, &[]));
    run_a.wait_for(|t| last_tick(t) >= 2);
    lab.ok(&["save", &a, s(&file)]);
    let (_, before, _) = run_a.wait_exit();

    assert_eq!(
        lab.ok(&["restore", s(&file), "--name", &b, "--paused"])
            .trim(),
        b
    );
    assert_eq!(lab.list_state(&b).as_deref(), Some("paused"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lab.console(&b), "", "a paused VM printed");

    lab.ok(&["resume", &b]);
    let after = lab.wait_console(&b, |t| ticks(t).len() >= 2);
    assert_eq!(lab.list_state(&b).as_deref(), Some("running"));
    assert_one_count(&before, &after);
}

/// The saved state file's JSON (past the 32-byte header).
fn payload(file: &Path) -> Value {
    let bytes = std::fs::read(file).unwrap();
    serde_json::from_slice(&bytes[32..]).unwrap()
}

/// kvmclock's value in a state file, in seconds (`kvm_clock_data`: `clock` is its first
/// field, little-endian nanoseconds).
fn saved_clock_secs(file: &Path) -> f64 {
    let bytes: Vec<u8> = payload(file)["vm"]["clock"]
        .as_array()
        .expect("the clock's bytes")
        .iter()
        .map(|b| b.as_u64().unwrap() as u8)
        .collect();
    u64::from_le_bytes(bytes[..8].try_into().unwrap()) as f64 / 1e9
}

#[test]
fn keep_clock_restores_the_saved_clock_and_the_default_advances_it() {
    let lab = Lab::new("clock");
    let (a, kept, moved) = (lab.name("a"), lab.name("k"), lab.name("m"));
    let start = |name: &str| {
        let mut args = vec!["run".to_string(), "-d".into(), "--name".into(), name.into()];
        args.extend(lab.tiny("idle"));
        lab.ok(&args);
    };
    start(&a);
    let file = lab.path("a.snap");
    lab.ok(&["save", &a, s(&file)]);
    let saved = saved_clock_secs(&file);
    std::thread::sleep(Duration::from_secs(3));
    let again = |name: &str, extra: &[&str]| {
        let mut args = vec!["run", "-d", "--restore", s(&file), "--name", name];
        args.extend(extra);
        lab.ok(&args);
        let out = lab.path(&format!("{name}.snap"));
        lab.ok(&["save", name, s(&out)]);
        saved_clock_secs(&out) - saved
    };
    let kept_ran = again(&kept, &["--keep-clock"]);
    let moved_ran = again(&moved, &[]);
    // Each ran for well under the 3 s it was away; only the default counts those 3 s.
    assert!((0.0..2.0).contains(&kept_ran), "kept: {kept_ran} s");
    assert!(moved_ran >= 3.0, "advanced: {moved_ran} s");
    let line = lab.refused(2, &["run", "--keep-clock", "--name", "x"]);
    assert!(line.contains("--restore"), "{line}");
}

#[test]
fn a_restored_paused_vm_saves_again_to_the_same_memory_and_devices() {
    // Its disks were never activated by the guest: restoring them must not write guest
    // memory (no ring at address 0), so the memory saved again is the memory restored.
    let lab = Lab::new("same");
    let (a, b) = (lab.name("a"), lab.name("b"));
    let (qcow2, raw) = (lab.path("d.qcow2"), lab.path("d.raw"));
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&qcow2), "16M"],
    );
    tool_ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "16M"]);
    let d1 = format!("path={}", qcow2.display());
    // The second disk on virtio-pci: its slot, BAR and MSI-X state go through the file too.
    let d2 = format!("path={},format=raw,transport=pci", raw.display());
    lab.start_counting(&a, &["--disk", &d1, "--disk", &d2]);
    lab.wait_console(&a, |t| last_tick(t) >= 2);
    lab.ok(&["suspend", &a]);
    let (first, second) = (lab.path("first.snap"), lab.path("second.snap"));
    lab.ok(&["save", &a, s(&first)]);

    // Saved paused, so it comes back paused; saved again at once.
    lab.ok(&["restore", s(&first), "--name", &b]);
    assert_eq!(lab.list_state(&b).as_deref(), Some("paused"));
    lab.ok(&["save", &b, s(&second)]);

    let (m1, m2) = (lab.path("first.snap.mem"), lab.path("second.snap.mem"));
    assert!(
        std::fs::read(m1).unwrap() == std::fs::read(m2).unwrap(),
        "guest memory changed"
    );
    let (s1, s2) = (payload(&first), payload(&second));
    assert_eq!((&s1["paused"], &s2["paused"]), (&json!(true), &json!(true)));
    assert_eq!(s1["devices"], s2["devices"]);
    assert_eq!(s1["devices"]["virtio"].as_array().unwrap().len(), 1);
    assert_eq!(s1["devices"]["pci"].as_array().unwrap().len(), 1);
    let (v1, v2) = (
        s1["vcpus"].as_array().unwrap(),
        s2["vcpus"].as_array().unwrap(),
    );
    for (c1, c2) in v1.iter().zip(v2) {
        assert_eq!(c1["regs"], c2["regs"]);
        assert_eq!(c1["sregs"], c2["sregs"]);
    }
    assert_qemu_img_clean(&qcow2);
}

// ---- Firecracker's API -------------------------------------------------------------------

#[test]
fn firecracker_pause_create_resume_then_load_in_fresh_processes() {
    let lab = Lab::new("fc");
    let (a, b, c) = (lab.name("a"), lab.name("b"), lab.name("c"));
    let (sock_a, sock_b, sock_c) = (lab.path("a.sock"), lab.path("b.sock"), lab.path("c.sock"));
    let (snap, mem) = (lab.path("fc.snap"), lab.path("fc.mem"));
    let mut run_a = lab.fg(&count_args(&lab, &a, &["--api-sock", s(&sock_a)]));
    run_a.wait_for(|t| last_tick(t) >= 2);
    let create =
        json!({"snapshot_path": snap, "mem_file_path": mem, "snapshot_type": "Full"}).to_string();
    let (status, body) = api(&sock_a, "PUT", "/snapshot/create", &create);
    assert_eq!(status, 400, "a running VM cannot be snapshotted: {body}");

    assert_eq!(api(&sock_a, "PATCH", "/vm", r#"{"state":"Paused"}"#).0, 204);
    std::thread::sleep(Duration::from_millis(300));
    let before = run_a.text();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(run_a.text(), before, "a paused VM printed");
    assert_eq!(
        api(&sock_a, "PUT", "/snapshot/create", &create),
        (204, String::new())
    );
    assert_eq!(
        api(&sock_a, "PATCH", "/vm", r#"{"state":"Resumed"}"#).0,
        204
    );
    let n = last_tick(&before);
    let all_a = run_a.wait_for(|t| last_tick(t) >= n + 3);
    assert_one_count(&all_a, "");

    // Loaded and resumed at once.
    let mut run_b = lab.fg(&["run", "--api-sock", s(&sock_b), "--name", &b]);
    wait_for_api(&sock_b);
    let load = |resume: bool| {
        json!({"snapshot_path": snap,
               "mem_backend": {"backend_path": mem, "backend_type": "File"},
               "resume_vm": resume})
        .to_string()
    };
    assert_eq!(api(&sock_b, "PUT", "/snapshot/load", &load(true)).0, 204);
    let after_b = run_b.wait_for(|t| ticks(t).len() >= 3);
    assert_one_count(&before, &after_b);
    let (_, info) = api(&sock_b, "GET", "/", "");
    assert!(info.contains(r#""state":"Running""#), "{info}");

    // Loaded paused: nothing until PATCH /vm Resumed.
    let mut run_c = lab.fg(&["run", "--api-sock", s(&sock_c), "--name", &c]);
    wait_for_api(&sock_c);
    assert_eq!(api(&sock_c, "PUT", "/snapshot/load", &load(false)).0, 204);
    let (_, info) = api(&sock_c, "GET", "/", "");
    assert!(info.contains(r#""state":"Paused""#), "{info}");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(run_c.text(), "", "a VM loaded paused printed");
    assert_eq!(
        api(&sock_c, "PATCH", "/vm", r#"{"state":"Resumed"}"#).0,
        204
    );
    let after_c = run_c.wait_for(|t| ticks(t).len() >= 2);
    assert_one_count(&before, &after_c);
    assert_eq!(
        api(&sock_c, "PUT", "/snapshot/load", &load(true)).0,
        400,
        "loaded twice"
    );
}

// ---- hostile snapshot files --------------------------------------------------------------

/// A state file: Ember's header (magic, version, reserved, length, CRC-32, reserved) and
/// `payload`, with `edit` applied to the header first.
fn state_file(payload: &[u8], edit: impl FnOnce(&mut [u8; 32])) -> Vec<u8> {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(b"EMBERSNP");
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[24..28].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    edit(&mut h);
    [&h[..], payload].concat()
}

/// How a hostile copy of a good snapshot differs from it.
enum Memory {
    /// The good memory file.
    Same,
    /// A memory file of this many bytes.
    Sized(u64),
    /// No memory file.
    Missing,
}

/// One hostile snapshot: its name, state file bytes, memory file, and a piece of the line
/// that refuses it.
struct Hostile {
    name: &'static str,
    bytes: Vec<u8>,
    memory: Memory,
    says: &'static str,
}

/// A good snapshot's state file with its JSON edited by `f` (a correct header around it).
fn edited(good: &Value, f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = good.clone();
    f(&mut v);
    state_file(&serde_json::to_vec(&v).unwrap(), |_| {})
}

/// Hostile variants of the good snapshot at `good` (state file bytes).
fn hostile_files(good: &[u8]) -> Vec<Hostile> {
    let payload = &good[32..];
    let json: Value = serde_json::from_slice(payload).unwrap();
    let h = |name, bytes, says| Hostile {
        name,
        bytes,
        memory: Memory::Same,
        says,
    };
    let mut flipped = payload.to_vec();
    flipped[payload.len() / 3] ^= 0x20;
    let mut out = vec![
        h(
            "magic",
            state_file(payload, |h| h[..8].copy_from_slice(b"QFI\xfbSNAP")),
            "not an Ember snapshot",
        ),
        h(
            "version",
            state_file(payload, |h| h[8] = 2),
            "snapshot format version 2; this Ember reads version 1",
        ),
        h(
            "length-long",
            state_file(payload, |h| h[16] = h[16].wrapping_add(1)),
            "are announced; the file is truncated or corrupted",
        ),
        h(
            "length-absurd",
            state_file(payload, |h| h[16..24].fill(0xff)),
            "a payload of 18446744073709551615 bytes is announced",
        ),
        h(
            "checksum",
            state_file(payload, |h| h[24] ^= 1),
            "the checksum does not match",
        ),
        h(
            "truncated",
            good[..good.len() / 2].to_vec(),
            "payload bytes where",
        ),
        h("header-cut", good[..20].to_vec(), "only 20 bytes"),
        h(
            "flipped",
            state_file(&flipped, |h| {
                h[24..28].copy_from_slice(&crc32fast::hash(payload).to_le_bytes())
            }),
            "the checksum does not match",
        ),
        h(
            "not-json",
            state_file(b"\x00garbage", |_| {}),
            "does not parse",
        ),
        h("not-a-state", state_file(b"{}", |_| {}), "missing field"),
        h(
            "ram-config",
            edited(&json, |v| v["config"]["memory"] = json!("64M")),
            "memory layout does not match the 64 MiB",
        ),
        h(
            "ram-layout",
            edited(&json, |v| v["memory"][0]["len"] = json!(1u64 << 40)),
            "memory layout does not match the 32 MiB",
        ),
        h(
            "ram-offset",
            edited(&json, |v| v["memory"][0]["offset"] = json!(u64::MAX - 4095)),
            "the memory file holds",
        ),
        h(
            "ram-absurd",
            edited(&json, |v| v["config"]["memory"] = json!("4T")),
            "too large",
        ),
        h(
            "vcpus-config",
            edited(&json, |v| v["config"]["cpus"] = json!(2)),
            "1 vCPU states for 2 vCPUs",
        ),
        h(
            "vcpus-states",
            edited(&json, |v| {
                let one = v["vcpus"][0].clone();
                v["vcpus"].as_array_mut().unwrap().push(one);
            }),
            "2 vCPU states for 1 vCPUs",
        ),
        h(
            "vcpus-absurd",
            edited(&json, |v| v["config"]["cpus"] = json!(100000)),
            "too many",
        ),
        h(
            "unknown-field",
            edited(&json, |v| v["bogus"] = json!(1)),
            "unknown field `bogus`",
        ),
        h(
            "unknown-device-field",
            edited(&json, |v| v["devices"]["serial"]["bogus"] = json!(1)),
            "unknown field `devices.serial.bogus`",
        ),
        h(
            "unknown-vcpu-field",
            edited(&json, |v| v["vcpus"][0]["bogus"] = json!(1)),
            "unknown field `vcpus.0.bogus`",
        ),
        h(
            "device-count",
            edited(&json, |v| {
                v["config"]["disk"] = json!([{"id": "vda", "path": "/x.raw"}])
            }),
            "0 virtio device states for 1 devices",
        ),
        h(
            "pvpanic",
            edited(&json, |v| v["devices"]["pvpanic"] = Value::Null),
            "pvpanic state and configuration disagree",
        ),
    ];
    out.push(Hostile {
        name: "memory-short",
        bytes: good.to_vec(),
        memory: Memory::Sized(1 << 20),
        says: "the memory file holds 1048576 bytes",
    });
    out.push(Hostile {
        name: "memory-missing",
        bytes: good.to_vec(),
        memory: Memory::Missing,
        says: "No such file",
    });
    out
}

/// Saves a tiny VM that counted a little; the state file.
fn good_snapshot(lab: &Lab) -> PathBuf {
    let a = lab.name("good");
    let file = lab.path("good.snap");
    let mut run_a = lab.fg(&count_args(lab, &a, &[]));
    run_a.wait_for(|t| last_tick(t) >= 1);
    lab.ok(&["save", &a, s(&file)]);
    assert!(run_a.wait_exit().0.success());
    file
}

/// Writes each hostile snapshot (and its memory file) into the lab; their paths.
fn write_hostile(lab: &Lab, cases: &[Hostile]) -> Vec<PathBuf> {
    let good_mem = lab.path("good.snap.mem");
    cases
        .iter()
        .map(|c| {
            let file = lab.path(&format!("{}.snap", c.name));
            std::fs::write(&file, &c.bytes).unwrap();
            let mem = lab.path(&format!("{}.snap.mem", c.name));
            match c.memory {
                Memory::Same => std::fs::hard_link(&good_mem, &mem).unwrap(),
                Memory::Sized(n) => std::fs::File::create(&mem).unwrap().set_len(n).unwrap(),
                Memory::Missing => {}
            }
            file
        })
        .collect()
}

#[test]
fn hostile_snapshot_files_are_refused_with_one_line_and_status_2() {
    let lab = Lab::new("hostile");
    let good = good_snapshot(&lab);
    let cases = hostile_files(&std::fs::read(&good).unwrap());
    let files = write_hostile(&lab, &cases);
    let name = lab.name("r");
    for (c, file) in cases.iter().zip(&files) {
        let (status, out, err) = lab.run(&["restore", s(file), "--name", &name]);
        assert_eq!(status.code(), Some(2), "{}: {out}{err}", c.name);
        let line = one_line(&err);
        assert!(line.contains(c.says), "{}: {line}", c.name);
        assert_eq!(lab.list_state(&name), None, "{}: a VM runs", c.name);

        // The foreground path refuses the same files, in one line (its status: see below).
        let (status, _, err) = lab.run(&[
            "run",
            "--restore",
            s(file),
            "--name",
            &name,
            "--serial",
            "none",
        ]);
        assert!(
            status.code().is_some_and(|c| c != 0),
            "{}: {status}",
            c.name
        );
        assert!(one_line(&err).contains(c.says), "{}: {err}", c.name);
    }
    // The good one still restores.
    lab.ok(&["restore", s(&good), "--name", &name]);
    lab.wait_console(&name, |t| !ticks(t).is_empty());
}

#[test]
fn hostile_snapshot_files_refused_by_the_vm_process_exit_2() {
    let lab = Lab::new("hostile2");
    let good = good_snapshot(&lab);
    let bytes = std::fs::read(&good).unwrap();
    let json: Value = serde_json::from_slice(&bytes[32..]).unwrap();
    let mut cases = hostile_files(&bytes);
    cases.push(Hostile {
        name: "serial-fifo",
        bytes: edited(&json, |v| {
            v["devices"]["serial"]["in_buffer"] = json!(vec![65; 100000])
        }),
        memory: Memory::Same,
        says: "serial",
    });
    let files = write_hostile(&lab, &cases);
    let name = lab.name("r");
    for (c, file) in cases.iter().zip(&files) {
        let (status, _, err) = lab.run(&[
            "run",
            "--restore",
            s(file),
            "--name",
            &name,
            "--serial",
            "none",
        ]);
        assert_eq!(status.code(), Some(2), "{}: {err}", c.name);
        assert!(one_line(&err).contains(c.says), "{}: {err}", c.name);
    }
    let fifo = files.last().unwrap();
    let (status, _, err) = lab.run(&["restore", s(fifo), "--name", &name]);
    assert_eq!(status.code(), Some(2), "{err}");
}

// ---- named snapshots ---------------------------------------------------------------------

/// `qemu-img snapshot -l` of an image a VM may hold (-U).
fn qemu_snapshots(image: &Path) -> String {
    let out = tool_ok("qemu-img", &["snapshot", "-l", "-U", s(image)]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text VM `name` printed after the first `marker.len()` bytes of its console.
fn console_after(lab: &Lab, name: &str, marker: usize, done: impl Fn(&str) -> bool) -> String {
    let text = lab.wait_console(name, |t| t.len() > marker && done(&t[marker..]));
    text[marker..].to_string()
}

#[test]
fn named_snapshots_on_a_qcow2_disk_create_list_revert_and_delete() {
    let lab = Lab::new("named");
    let a = lab.name("a");
    let qcow2 = lab.path("vm.qcow2");
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&qcow2), "16M"],
    );
    lab.start_counting(&a, &["--disk", &format!("path={}", qcow2.display())]);
    lab.wait_console(&a, |t| last_tick(t) >= 2);

    // s1 while it runs; s2 while it is paused, after tick n exactly.
    let out = lab.ok(&["snapshot-create-as", &a, "s1", "--description", "first one"]);
    assert_eq!(out.trim(), "Domain snapshot s1 created");
    let line = lab.refused(2, &["snapshot-create-as", &a, "s1"]);
    assert!(line.contains("already has a snapshot named 's1'"), "{line}");
    lab.ok(&["suspend", &a]);
    // What it printed up to s2 (perhaps ending in a cut line).
    let at_s2 = lab.console(&a);
    let n = last_tick(&at_s2);
    lab.ok(&["snapshot-create-as", &a, "s2"]);
    assert_eq!(
        lab.list_state(&a).as_deref(),
        Some("paused"),
        "taking it resumed the VM"
    );
    lab.ok(&["resume", &a]);
    lab.wait_console(&a, |t| last_tick(t) >= n + 3);

    let list = lab.ok(&["snapshot-list", &a]);
    let rows: Vec<Vec<&str>> = list
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!(
        (rows[0][0], *rows[0].last().unwrap()),
        ("s1", "running"),
        "{list}"
    );
    assert_eq!(
        (rows[1][0], *rows[1].last().unwrap()),
        ("s2", "paused"),
        "{list}"
    );
    let info = lab.ok(&["snapshot-info", &a, "s1"]);
    for want in [
        "Description:    first one",
        "State:          running",
        "Memory:         yes",
    ] {
        assert!(info.contains(want), "{want}: {info}");
    }
    assert!(
        info.contains(&format!("internal snapshot in {}", qcow2.display())),
        "{info}"
    );
    let tags = qemu_snapshots(&qcow2);
    assert!(tags.contains(" s1 ") && tags.contains(" s2 "), "{tags}");

    // Back to s2: paused as it was, then tick n+1.
    let mark = lab.console(&a).len();
    lab.ok(&["snapshot-revert", &a, "s2"]);
    assert_eq!(lab.list_state(&a).as_deref(), Some("paused"));
    lab.ok(&["resume", &a]);
    let after = console_after(&lab, &a, mark, |t| ticks(t).len() >= 2);
    assert_one_count(&at_s2, &after);

    // Back to s1, taken before s2: running, at a tick before the ones just seen.
    let seen = lab.console(&a);
    lab.ok(&["snapshot-revert", &a, "s1"]);
    let after = console_after(&lab, &a, seen.len(), |t| ticks(t).len() >= 2);
    let back = ticks(&after);
    assert!(back[0] <= n + 1, "s1 was taken before tick {n}: {after}");
    assert!(
        back[0] + 1 < last_tick(&seen) && back[1] == back[0] + 1,
        "after s1: {after}"
    );

    lab.ok(&["snapshot-delete", &a, "s1"]);
    assert!(!qemu_snapshots(&qcow2).contains(" s1 "));
    let line = lab.refused(2, &["snapshot-info", &a, "s1"]);
    assert!(line.contains("has no snapshot named 's1'"), "{line}");
    lab.ok(&["destroy", &a]);
    assert_qemu_img_clean(&qcow2);

    // A shut-off VM: revert starts it from s2 (paused, as s2 was), delete works on the image.
    lab.ok(&["snapshot-revert", &a, "s2"]);
    assert_eq!(lab.list_state(&a).as_deref(), Some("paused"));
    lab.ok(&["resume", &a]);
    let after = lab.wait_console(&a, |t| ticks(t).len() >= 2);
    assert_one_count(&at_s2, &after);
    lab.ok(&["destroy", &a]);
    lab.ok(&["snapshot-delete", &a, "s2"]);
    assert!(!qemu_snapshots(&qcow2).contains(" s2 "));
    // Not defined, not running, no snapshots left: ember knows it no more.
    let line = lab.refused(2, &["snapshot-list", &a]);
    assert!(line.contains("no VM named"), "{line}");
    assert_qemu_img_clean(&qcow2);
}

#[test]
fn a_raw_disk_needs_disk_only_and_the_vm_goes_on_over_an_overlay() {
    let lab = Lab::new("raw");
    let a = lab.name("a");
    let raw = lab.path("vm.raw");
    let overlay = lab.path("vm-s1.qcow2");
    tool_ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "16M"]);
    lab.start_counting(
        &a,
        &["--disk", &format!("path={},format=raw", raw.display())],
    );
    lab.wait_console(&a, |t| last_tick(t) >= 1);

    let line = lab.refused(2, &["snapshot-create-as", &a, "s1"]);
    assert!(
        line.contains("disk vda is raw") && line.contains("--disk-only"),
        "{line}"
    );
    assert_eq!(
        lab.ok(&["snapshot-list", &a]).lines().count(),
        2,
        "a refused snapshot is listed"
    );
    assert!(!overlay.exists());
    let n = last_tick(&lab.console(&a));
    lab.wait_console(&a, |t| last_tick(t) >= n + 2);

    lab.ok(&["snapshot-create-as", &a, "s1", "--disk-only"]);
    let info = tool_ok("qemu-img", &["info", "-U", s(&overlay)]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains(&format!("backing file: {}", raw.display())),
        "{info}"
    );
    assert!(info.contains("backing file format: raw"), "{info}");
    // The VM holds the overlay now (qemu-img cannot take its lock) and keeps counting.
    assert!(
        !tool("qemu-img", &["info", s(&overlay)]).status.success(),
        "nobody holds the overlay"
    );
    let config = lab.ok(&["dumpconfig", &a]);
    assert!(
        config.contains(&format!("path = \"{}\"", overlay.display())),
        "{config}"
    );
    let n = last_tick(&lab.console(&a));
    lab.wait_console(&a, |t| last_tick(t) >= n + 2);
    let snap = lab.ok(&["snapshot-info", &a, "s1"]);
    assert!(
        snap.contains("Memory:         no") && snap.contains("disk-snapshot"),
        "{snap}"
    );
    assert!(
        snap.contains(&format!("now on {}", overlay.display())),
        "{snap}"
    );
    let line = lab.refused(2, &["snapshot-revert", &a, "s1"]);
    assert!(line.contains("disk-only"), "{line}");

    lab.ok(&["destroy", &a]);
    assert_qemu_img_clean(&overlay);
}

// ---- clones ------------------------------------------------------------------------------

#[test]
fn full_and_linked_clones_run_at_once() {
    let lab = Lab::new("clone");
    let (a, full, l1, l2) = (
        lab.name("a"),
        lab.name("full"),
        lab.name("l1"),
        lab.name("l2"),
    );
    let (qcow2, raw) = (lab.path("a.qcow2"), lab.path("a.raw"));
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&qcow2), "16M"],
    );
    tool_ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "16M"]);
    lab.define(&a, &[(&qcow2, "qcow2"), (&raw, "raw")]);
    lab.ok(&["start", &a]);
    lab.wait_console(&a, |t| last_tick(t) >= 1);

    let line = lab.refused(2, &["clone", "-o", &a, "-n", &full]);
    assert!(
        line.contains("is running; shut it off or suspend it first"),
        "{line}"
    );
    lab.ok(&["suspend", &a]);
    let line = lab.refused(2, &["clone", "-o", &a, "-n", &full, "-f", "/tmp/one.qcow2"]);
    assert!(line.contains("1 -f given for 2 disks"), "{line}");
    let (f1, f2) = (lab.path("full.qcow2"), lab.path("full.raw"));
    let out = lab.ok(&["clone", "-o", &a, "-n", &full, "-f", s(&f1), "-f", s(&f2)]);
    assert!(
        out.contains(&format!("Clone '{full}' created successfully.")),
        "{out}"
    );
    lab.defined.borrow_mut().push(full.clone());
    lab.ok(&["resume", &a]);
    let line = lab.refused(2, &["clone", "-o", &a, "-n", &full]);
    assert!(line.contains("exists already"), "{line}");

    // The original and its full clone at once.
    lab.ok(&["start", &full]);
    for vm in [&a, &full] {
        let n = last_tick(&lab.console(vm));
        lab.wait_console(vm, |t| last_tick(t) >= n + 2);
    }
    lab.ok(&["destroy", &a]);
    lab.ok(&["destroy", &full]);

    // Two linked clones at once, over the original's images (which they then hold).
    for l in [&l1, &l2] {
        lab.ok(&["clone", "-o", &a, "-n", l, "--linked"]);
        lab.defined.borrow_mut().push(l.to_string());
    }
    // a.qcow2 and a.raw: the second overlay's name says its disk.
    let tops = [
        lab.path(&format!("a-{l1}.qcow2")),
        lab.path(&format!("a-{l1}-vdb.qcow2")),
    ];
    for ((image, format), top) in [(&qcow2, "qcow2"), (&raw, "raw")].into_iter().zip(&tops) {
        let info = tool_ok("qemu-img", &["info", s(top)]);
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(
            info.contains(&format!("backing file: {}", image.display())),
            "{info}"
        );
        assert!(
            info.contains(&format!("backing file format: {format}")),
            "{info}"
        );
    }
    lab.ok(&["start", &l1]);
    lab.ok(&["start", &l2]);
    for vm in [&l1, &l2] {
        lab.wait_console(vm, |t| last_tick(t) >= 2);
    }
    let (status, _, err) = lab.run(&["start", &a]);
    assert!(
        !status.success() && err.contains("in use"),
        "the original ran under its clones: {err}"
    );
    lab.ok(&["destroy", &l1]);
    lab.ok(&["destroy", &l2]);
    for image in [&qcow2, &f1, &tops[0], &tops[1]] {
        assert_qemu_img_clean(image);
    }
}
