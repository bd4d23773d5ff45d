//! Diff snapshots end to end with the tiny test kernel (`count dirty=K` prints `tick N`
//! every 100 ms, N kept in a register, and stores K KiB between ticks): dirty-page tracking
//! from the command line and from Firecracker's `/machine-config` and `/snapshot/load`,
//! `PUT /snapshot/create` Diff, `ember snapshot-rebase` onto the Full base (compared with a
//! Full snapshot taken at the diff), the merged base restored; a reset and a failed live
//! migration in between; hostile rebase inputs. Needs /dev/kvm; no Linux guest.

mod common;
#[path = "../examples/tiny_kernel/guest.rs"]
mod guest;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::require_kvm;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);
const QUIET: &str = "error,ember=error,devices=error,boot=error";

/// A scratch directory with the tiny kernel; the VMs it started are killed with it.
struct Lab {
    dir: tempfile::TempDir,
    kernel: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("tiny.elf");
        std::fs::write(&kernel, guest::elf_image()).unwrap();
        Lab { dir, kernel }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ember(&self) -> Command {
        let mut c = common::ember();
        c.env("EMBER_DATA_DIR", self.path("data"))
            .env("RUST_LOG", QUIET);
        c
    }

    /// `ember run ARGS --serial stdio` in the foreground.
    fn fg<S: AsRef<OsStr>>(&self, args: &[S]) -> Fg {
        let mut cmd = self.ember();
        cmd.arg("run").args(args).args(["--serial", "stdio"]);
        Fg::spawn(cmd)
    }

    /// The tiny kernel counting and storing `dirty` KiB per tick, `mib` of RAM, an API
    /// socket, `extra` options.
    fn counting(&self, name: &str, dirty: u32, extra: &[&str]) -> (Fg, PathBuf) {
        let sock = self.path(&format!("{name}.sock"));
        let mut args: Vec<String> = ["--name", name, "--memory", "32M", "--kernel"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(s(&self.kernel).into());
        args.extend(["--cmdline".into(), format!("count dirty={dirty}")]);
        args.extend(["--api-sock".into(), s(&sock).into()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        (self.fg(&args), sock)
    }

    /// `ember ARGS` to its end: (status, stdout, stderr).
    fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> (ExitStatus, String, String) {
        let mut cmd = self.ember();
        cmd.args(args);
        let r = common::run(cmd, LIMIT);
        (r.status, r.stdout, r.stderr)
    }
}

/// A name no other test uses.
fn unique(what: &str) -> String {
    format!("ds-{what}-{}", std::process::id())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An ember process in the foreground, its stdout collected; killed when dropped.
struct Fg {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    err: Option<JoinHandle<String>>,
}

impl Fg {
    fn spawn(mut cmd: Command) -> Fg {
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
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Waits until the output satisfies `done`; fails if the process ends first.
    fn wait_for(&mut self, done: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + LIMIT;
        loop {
            let text = self.text();
            if done(&text) {
                return text;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                let err = self.finish();
                panic!("ember ended ({status}) having printed:\n{text}\nstderr:\n{err}");
            }
            assert!(
                Instant::now() < end,
                "waited {LIMIT:?}; printed only:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process if it still runs; its stderr.
    fn finish(&mut self) -> String {
        if self.child.try_wait().unwrap().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.err
            .take()
            .map(|e| e.join().unwrap())
            .unwrap_or_default()
    }
}

impl Drop for Fg {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The numbers of the complete `tick N` lines in `text`.
fn ticks(text: &str) -> Vec<u32> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("tick ")?.parse().ok())
        .collect()
}

fn last_tick(text: &str) -> u32 {
    ticks(text).last().copied().unwrap_or(0)
}

/// Asserts that `before` (a counting VM's output up to its snapshot) followed by `after`
/// (what the restored VM printed) is one count, each tick once and in order.
fn assert_one_count(before: &str, after: &str) {
    let header = "TSC cycles\n";
    let at = before.find(header).expect("a counting header") + header.len();
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
}

/// One HTTP/1.1 request on `sock`: (status, body).
fn api(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
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

fn wait_for_api(sock: &Path) {
    let end = Instant::now() + LIMIT;
    while UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < end, "no API on {}", sock.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pause(sock: &Path) {
    assert_eq!(api(sock, "PATCH", "/vm", r#"{"state":"Paused"}"#).0, 204);
}

fn resume(sock: &Path) {
    assert_eq!(api(sock, "PATCH", "/vm", r#"{"state":"Resumed"}"#).0, 204);
}

/// `PUT /snapshot/create` of `kind` to `NAME.snap` and `NAME.mem`: (status, body).
fn create(lab: &Lab, sock: &Path, kind: &str, name: &str) -> (u16, String) {
    let body = json!({"snapshot_type": kind,
                      "snapshot_path": lab.path(&format!("{name}.snap")),
                      "mem_file_path": lab.path(&format!("{name}.mem"))});
    api(sock, "PUT", "/snapshot/create", &body.to_string())
}

/// Bytes the file really holds on disk.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

fn rebase(lab: &Lab, base: &str, diff: &str) {
    let (status, out, err) = lab.run(&[
        "snapshot-rebase",
        "--base-file",
        s(&lab.path(base)),
        "--diff-file",
        s(&lab.path(diff)),
    ]);
    assert!(status.success(), "snapshot-rebase: {status}\n{out}{err}");
}

#[test]
fn a_diff_merged_onto_its_full_base_restores_where_the_diff_was_taken() {
    require_kvm();
    let lab = Lab::new();
    let (a, b) = (unique("a"), unique("b"));
    let (mut run_a, sock) = lab.counting(&a, 128, &["--track-dirty-pages"]);
    // 32 ticks of 128 KiB cover the 4 MiB the kernel stores into.
    run_a.wait_for(|t| last_tick(t) >= 34);
    pause(&sock);
    assert_eq!(create(&lab, &sock, "Full", "base"), (204, String::new()));
    resume(&sock);
    let n = last_tick(&run_a.text());
    run_a.wait_for(|t| last_tick(t) >= n + 3);
    pause(&sock);
    // A Diff that fails gives its pages back: the next one has them (the merge shows it).
    let nowhere = json!({"snapshot_type": "Diff", "snapshot_path": lab.path("x.snap"),
                         "mem_file_path": "/nonexistent/dir/x.mem"});
    let (status, body) = api(&sock, "PUT", "/snapshot/create", &nowhere.to_string());
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("/nonexistent/dir/x.mem"), "{body}");
    assert_eq!(create(&lab, &sock, "Diff", "diff"), (204, String::new()));
    // Nothing ran since: a second diff holds (almost) nothing, and chains on the first.
    assert_eq!(create(&lab, &sock, "Diff", "diff2"), (204, String::new()));
    // What memory is now, to compare the merge with.
    assert_eq!(create(&lab, &sock, "Full", "check"), (204, String::new()));
    std::thread::sleep(Duration::from_millis(200));
    let before = run_a.text();
    run_a.finish();

    let (base, diff, diff2) = (
        lab.path("base.mem"),
        lab.path("diff.mem"),
        lab.path("diff2.mem"),
    );
    for f in [&diff, &diff2] {
        assert_eq!(
            std::fs::metadata(f).unwrap().len(),
            32 << 20,
            "as long as guest RAM"
        );
    }
    let (full_b, diff_b, diff2_b) = (allocated(&base), allocated(&diff), allocated(&diff2));
    assert!(
        full_b >= 4 << 20,
        "the full base holds the stored region: {full_b}"
    );
    assert!(
        diff_b * 4 < full_b && diff_b >= 256 << 10,
        "a diff of ~3 ticks: {diff_b} bytes allocated, the full {full_b}"
    );
    assert!(
        diff2_b <= 64 << 10,
        "a diff of a paused VM: {diff2_b} bytes"
    );

    let check = std::fs::read(lab.path("check.mem")).unwrap();
    assert!(
        std::fs::read(&base).unwrap() != check,
        "the base is memory as it was"
    );
    rebase(&lab, "base.mem", "diff.mem");
    rebase(&lab, "base.mem", "diff2.mem");
    assert!(
        std::fs::read(&base).unwrap() == check,
        "the base with both diffs merged is memory as it is now"
    );
    // A memory file of another size is refused before anything runs.
    let short = lab.path("short.mem");
    std::fs::write(&short, vec![0u8; 1 << 20]).unwrap();
    let snap2 = lab.path("diff2.snap");
    let (status, out, err) = lab.run(&["run", "--restore", s(&snap2), "--mem-file", s(&short)]);
    assert_eq!(status.code(), Some(2), "{out}{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("short.mem"), "{err}");

    // The diff was taken paused, so it comes back paused.
    let (snap, sock_b) = (lab.path("diff2.snap"), lab.path("b.sock"));
    let mut run_b = lab.fg(&[
        "--restore",
        s(&snap),
        "--mem-file",
        s(&base),
        "--name",
        &b,
        "--api-sock",
        s(&sock_b),
    ]);
    wait_for_api(&sock_b);
    resume(&sock_b);
    let after = run_b.wait_for(|t| ticks(t).len() >= 3);
    assert_one_count(&before, &after);
}

#[test]
fn a_loaded_vm_takes_diffs_when_load_asks_and_refuses_them_otherwise() {
    require_kvm();
    let lab = Lab::new();
    let (a, b, c) = (unique("la"), unique("lb"), unique("lc"));
    let (mut run_a, sock_a) = lab.counting(&a, 16, &[]);
    run_a.wait_for(|t| last_tick(t) >= 2);
    pause(&sock_a);
    let (status, body) = create(&lab, &sock_a, "Diff", "refused");
    assert_eq!(status, 400, "{body}");
    let fault: Value = serde_json::from_str(&body).unwrap();
    let msg = fault["fault_message"].as_str().unwrap();
    assert!(
        msg.contains("Diff snapshots are not allowed on uVMs with dirty page tracking disabled"),
        "{msg}"
    );
    assert!(!lab.path("refused.snap").exists() && !lab.path("refused.mem").exists());
    assert_eq!(create(&lab, &sock_a, "Full", "base"), (204, String::new()));
    let before = run_a.text();
    run_a.finish();

    // Loaded with enable_diff_snapshots (Firecracker's older spelling): diffs allowed.
    let load = |sock: &Path, track: bool| {
        let body = json!({"snapshot_path": lab.path("base.snap"),
                          "mem_backend": {"backend_path": lab.path("base.mem"),
                                          "backend_type": "File"},
                          "enable_diff_snapshots": track, "resume_vm": true});
        assert_eq!(api(sock, "PUT", "/snapshot/load", &body.to_string()).0, 204);
    };
    let sock_b = lab.path("b.sock");
    let mut run_b = lab.fg(&["--api-sock", s(&sock_b), "--name", &b]);
    wait_for_api(&sock_b);
    load(&sock_b, true);
    let after_b = run_b.wait_for(|t| ticks(t).len() >= 3);
    assert_one_count(&before, &after_b);
    pause(&sock_b);
    assert_eq!(create(&lab, &sock_b, "Diff", "layer"), (204, String::new()));
    let layer = allocated(&lab.path("layer.mem"));
    // 3+ ticks of 16 KiB and the stack: the pages written since the load, not the base's.
    assert!(
        (48 << 10..256 << 10).contains(&layer),
        "pages written since the load only: {layer}"
    );

    // Loaded without it: refused, as Firecracker (a snapshot does not keep the setting).
    let sock_c = lab.path("c.sock");
    let mut run_c = lab.fg(&["--api-sock", s(&sock_c), "--name", &c]);
    wait_for_api(&sock_c);
    load(&sock_c, false);
    run_c.wait_for(|t| !ticks(t).is_empty());
    pause(&sock_c);
    assert_eq!(create(&lab, &sock_c, "Diff", "no").0, 400);
}

#[test]
fn machine_config_tracking_reaches_the_vm_and_after_a_reset_the_next_diff_is_whole() {
    require_kvm();
    let lab = Lab::new();
    let name = unique("mc");
    let sock = lab.path("mc.sock");
    let mut run = lab.fg(&["--api-sock", s(&sock), "--name", &name]);
    wait_for_api(&sock);
    let boot = json!({"kernel_image_path": lab.kernel, "boot_args": "count dirty=16"});
    assert_eq!(api(&sock, "PUT", "/boot-source", &boot.to_string()).0, 204);
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 32, "track_dirty_pages": true}"#;
    assert_eq!(api(&sock, "PUT", "/machine-config", machine).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(api(&sock, "PUT", "/actions", start).0, 204);
    // More ticks than after the reset below: the first run wrote pages the second did not.
    run.wait_for(|t| last_tick(t) >= 8);
    let (_, got) = api(&sock, "GET", "/machine-config", "");
    let got: Value = serde_json::from_str(&got).unwrap();
    assert_eq!(got["track_dirty_pages"], true, "{got}");
    pause(&sock);
    assert_eq!(create(&lab, &sock, "Diff", "first"), (204, String::new()));
    // The first diff of a booted VM holds what it wrote since boot: the kernel too.
    let first = lab.path("first.mem");
    assert!(allocated(&first) > 0);

    // A reset builds the VM anew in this process: its next diff holds every page, so
    // merged onto the last snapshot it still gives memory as it is.
    resume(&sock);
    let (status, out, err) = lab.run(&["reset", &name]);
    assert!(status.success(), "ember reset: {status}\n{out}{err}");
    run.wait_for(|t| {
        let banner = "tiny: hello from the tiny kernel\n";
        t.matches(banner).count() == 2 && last_tick(&t[t.rfind(banner).unwrap()..]) >= 1
    });
    pause(&sock);
    assert_eq!(create(&lab, &sock, "Diff", "reset"), (204, String::new()));
    assert_eq!(create(&lab, &sock, "Full", "check"), (204, String::new()));
    assert!(allocated(&lab.path("reset.mem")) >= 32 << 20, "every page");
    rebase(&lab, "first.mem", "reset.mem");
    assert!(std::fs::read(&first).unwrap() == std::fs::read(lab.path("check.mem")).unwrap());
}

#[test]
fn hostile_rebase_inputs_are_refused_with_one_line_and_the_base_untouched() {
    let lab = Lab::new();
    let base = lab.path("base.mem");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    let short = lab.path("short.mem");
    std::fs::write(&short, vec![1u8; 4096]).unwrap();
    let long = lab.path("long.mem");
    std::fs::File::create(&long)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let none = lab.path("none");
    let odd = lab.path("odd.mem");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--diff-file", s(&short)], "holds 4096 bytes and the base"),
        (&["--diff-file", s(&long)], "holds 1073741824 bytes"),
        (&["--diff-file", s(&base)], "the same file"),
        (&["--diff-file", s(&none)], "cannot open the diff"),
        (&["--diff-file", s(lab.dir.path())], "not a regular file"),
        (&["--diff-file", s(&odd)], "holds 1000 bytes"),
    ];
    for (args, want) in cases {
        let mut all = vec!["snapshot-rebase", "--base-file", s(&base)];
        all.extend_from_slice(args);
        let (status, out, err) = lab.run(&all);
        assert_eq!(status.code(), Some(2), "{all:?}\n{out}{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {err}");
        assert!(
            lines[0].starts_with("ember: ") && lines[0].contains(want),
            "{err}"
        );
    }
    let (status, _, err) = lab.run(&[
        "snapshot-rebase",
        "--base-file",
        s(&lab.path("nobase")),
        "--diff-file",
        s(&short),
    ]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        std::fs::read(&base).unwrap().iter().all(|b| *b == 7),
        "the base was written"
    );
}

/// Waits until `ember domjobinfo NAME` says the VM waits for an incoming migration.
fn wait_incoming(lab: &Lab, name: &str) {
    let end = Instant::now() + LIMIT;
    loop {
        let (_, out, _) = lab.run(&["domjobinfo", name]);
        if out
            .lines()
            .any(|l| l.starts_with("State:") && l.contains("incoming"))
        {
            return;
        }
        assert!(
            Instant::now() < end,
            "the destination does not listen: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_failed_migration_takes_no_pages_from_the_next_diff() {
    require_kvm();
    let lab = Lab::new();
    let (a, d) = (unique("ma"), unique("md"));
    let sock = lab.path("ma.sock");
    let kernel = s(&lab.kernel).to_string();
    let mut run_a = lab.fg(&[
        "--name",
        &a,
        "--memory",
        "16M",
        "--kernel",
        &kernel,
        "--cmdline",
        "count dirty=1024",
        "--api-sock",
        s(&sock),
        "--track-dirty-pages",
    ]);
    run_a.wait_for(|t| last_tick(t) >= 2);
    pause(&sock);
    assert_eq!(create(&lab, &sock, "Full", "base"), (204, String::new()));
    resume(&sock);

    // A live migration that cannot converge (a 2 MiB/s link, 1 s): it reads and clears
    // KVM's dirty log after its first pass, then gives up and the VM goes on here.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _dest = lab.fg(&["--incoming", &format!("tcp:127.0.0.1:{port}"), "--name", &d]);
    wait_incoming(&lab, &d);
    let url = format!("tcp:127.0.0.1:{port}");
    let (status, out, err) = lab.run(&[
        "migrate",
        &a,
        &url,
        "--live",
        "--bandwidth",
        "2",
        "--timeout",
        "1",
    ]);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(
        format!("{out}{err}").contains("did not converge"),
        "{out}{err}"
    );
    // At once, before the guest rewrites the 4 MiB it stores into.
    pause(&sock);
    assert_eq!(create(&lab, &sock, "Diff", "diff"), (204, String::new()));
    assert_eq!(create(&lab, &sock, "Full", "check"), (204, String::new()));
    run_a.finish();
    rebase(&lab, "base.mem", "diff.mem");
    assert!(
        std::fs::read(lab.path("base.mem")).unwrap()
            == std::fs::read(lab.path("check.mem")).unwrap(),
        "the diff lacks pages the migration's pass took"
    );
}
