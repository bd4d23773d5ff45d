//! Live migration between two ember processes on this host (over loopback, and across two
//! network namespaces), with the tiny test kernel counting (`tick N` every 100 ms) and
//! dirtying memory: the ticks go on at the destination without a gap or a repeat. And the
//! faults: the destination killed, the connection cut, the destination refusing, the source
//! killed, garbage on the listening port, a wrong key, a cancel, a guest that dirties
//! memory faster than the link: never two running copies, never a guest lost. `--verify`
//! checks that the destination's memory is the source's at the stop (the ticks live in a
//! register, so they alone would not show a missed page).
//! Needs /dev/kvm (and root for the namespaces); no Linux guest.

mod common;
#[path = "../examples/tiny_kernel/guest.rs"]
mod guest;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

/// A test's files: the kernel, serial logs, a key.
struct Bed {
    dir: tempfile::TempDir,
    kernel: PathBuf,
    tag: String,
}

fn bed(tag: &str) -> Bed {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, guest::elf_image()).unwrap();
    Bed {
        dir,
        kernel,
        tag: format!("{tag}{}", std::process::id() % 100_000),
    }
}

/// A free TCP port on the loopback.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Lines of a file as they appear, with the time each was first seen.
#[derive(Clone)]
struct Lines(Arc<Mutex<Vec<(Instant, String)>>>);

impl Lines {
    /// Polls `path` every 5 ms until the test ends.
    fn follow(path: &Path) -> Self {
        let lines = Lines(Arc::default());
        let (out, path) = (lines.clone(), path.to_path_buf());
        std::thread::spawn(move || {
            let mut seen = 0;
            loop {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    let complete: Vec<&str> = text
                        .split_inclusive('\n')
                        .filter(|l| l.ends_with('\n'))
                        .collect();
                    let mut v = out.0.lock().unwrap();
                    for l in &complete[seen.min(complete.len())..] {
                        v.push((Instant::now(), l.trim_end().to_string()));
                    }
                    seen = complete.len();
                }
                if Arc::strong_count(&out.0) == 1 {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        lines
    }

    fn ticks(&self) -> Vec<(Instant, u64)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(t, l)| {
                l.strip_prefix("tick ")
                    .and_then(|n| n.parse().ok())
                    .map(|n| (*t, n))
            })
            .collect()
    }

    fn last_tick(&self) -> Option<u64> {
        self.ticks().last().map(|t| t.1)
    }

    /// Waits until the last tick is at least `n`.
    fn wait_tick(&self, n: u64, what: &str) {
        let end = Instant::now() + LIMIT;
        while self.last_tick().unwrap_or(0) < n {
            assert!(Instant::now() < end, "{what}: no tick {n} within {LIMIT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An `ember run` process and its serial output.
struct Vm {
    name: String,
    child: Child,
    serial: Lines,
}

impl Vm {
    /// Waits for the process to end; its status and stderr.
    fn wait(mut self) -> (Option<i32>, String) {
        let status = wait_deadline(&mut self.child, LIMIT);
        if status.is_none() {
            let _ = self.child.kill();
        }
        let mut err = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
        (status.expect("ember ends").code(), err)
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn stop(mut self) -> String {
        if self.is_running() {
            signal(&self.child, libc::SIGTERM);
        }
        self.wait().1
    }
}

impl Drop for Vm {
    /// A failed test leaves no VM behind.
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn(mut cmd: Command, name: &str, serial: &Path) -> Vm {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember");
    Vm {
        name: name.to_string(),
        child,
        serial: Lines::follow(serial),
    }
}

/// `prefix` (e.g. `ip netns exec A`) then ember.
fn ember_in(prefix: &[&str]) -> Command {
    if prefix.is_empty() {
        return ember();
    }
    let (state, config) = state_dirs();
    let mut c = Command::new(prefix[0]);
    c.args(&prefix[1..])
        .arg(env!("CARGO_BIN_EXE_ember"))
        .env("EMBER_STATE_DIR", state)
        .env("EMBER_CONFIG_DIR", config);
    c
}

impl Bed {
    fn serial(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.serial"))
    }

    fn name(&self, role: &str) -> String {
        format!("{role}-{}", self.tag)
    }

    /// A counting source VM; `cmdline` e.g. `dirty=256 count`.
    fn source_in(&self, prefix: &[&str], cmdline: &str, extra: &[&str]) -> Vm {
        let name = self.name("src");
        let serial = self.serial(&name);
        let mut c = ember_in(prefix);
        c.args(["run", "--name", &name, "--kernel"])
            .arg(&self.kernel)
            .args(["--memory", "64M", "--cmdline", cmdline, "--serial"])
            .arg(format!("file={}", serial.display()))
            .args(extra);
        let vm = spawn(c, &name, &serial);
        vm.serial.wait_tick(2, "source");
        vm
    }

    fn source(&self, cmdline: &str) -> Vm {
        self.source_in(&[], cmdline, &[])
    }

    /// A destination listening on `addr` (`HOST:PORT`), waited for until it listens.
    fn dest_in(&self, prefix: &[&str], role: &str, addr: &str, extra: &[&str]) -> Vm {
        let name = self.name(role);
        let serial = self.serial(&name);
        let mut c = ember_in(prefix);
        c.args([
            "run",
            "--name",
            &name,
            "--incoming",
            &format!("tcp:{addr}"),
            "--serial",
        ])
        .arg(format!("file={}", serial.display()))
        .args(extra);
        let mut vm = spawn(c, &name, &serial);
        let end = Instant::now() + LIMIT;
        loop {
            if job(&name, "State") == "incoming" {
                break;
            }
            assert!(vm.is_running(), "the destination ended: {}", vm.stop());
            assert!(Instant::now() < end, "the destination does not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        vm
    }

    fn dest(&self, port: u16, extra: &[&str]) -> Vm {
        self.dest_in(&[], "dst", &format!("127.0.0.1:{port}"), extra)
    }

    fn key(&self, name: &str, byte: u8) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, [byte; 32]).unwrap();
        p
    }
}

/// `ember migrate NAME tcp:127.0.0.1:PORT ARGS`, in the background.
fn migrate(src: &Vm, url: &str, args: &[&str]) -> Child {
    ember()
        .args(["migrate", &src.name, url])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finished(mut c: Child) -> (Option<i32>, String) {
    let status = wait_deadline(&mut c, LIMIT).expect("ember migrate ends");
    let mut out = String::new();
    let _ = c.stdout.take().unwrap().read_to_string(&mut out);
    let _ = c.stderr.take().unwrap().read_to_string(&mut out);
    (status.code(), out)
}

fn jobinfo(name: &str) -> String {
    let out = ember().args(["domjobinfo", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A field of `ember domjobinfo NAME` ("" when not there).
fn job(name: &str, field: &str) -> String {
    jobinfo(name)
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Waits until `domjobinfo` shows an active job with something sent.
fn wait_active(name: &str) {
    let end = Instant::now() + LIMIT;
    loop {
        if job(name, "State") == "active" && job(name, "Data processed") != "0.0 MiB" {
            return;
        }
        assert!(
            Instant::now() < end,
            "no active migration: {}",
            jobinfo(name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn listed(name: &str) -> bool {
    let out = ember().args(["list", "--name"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == name)
}

/// The ticks of `src` then `dst` form 1, 2, 3, ... with no gap and no repeat, and the
/// first at the destination came soon after the last at the source (a loose bound: a
/// debug build with --verify on a busy 2-core machine; the benchmark measures downtime).
fn assert_continuous(src: &Lines, dst: &Lines) {
    let (s, d) = (src.ticks(), dst.ticks());
    assert!(
        !s.is_empty() && !d.is_empty(),
        "source {s:?} destination {d:?}"
    );
    let all: Vec<u64> = s.iter().chain(&d).map(|t| t.1).collect();
    let want: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(all, want, "ticks across the migration");
    let pause = d[0].0.saturating_duration_since(s.last().unwrap().0);
    assert!(
        pause < Duration::from_secs(5),
        "{pause:?} from the last tick there to the first here"
    );
}

#[test]
fn live_migration_goes_on_counting_without_a_gap_or_a_repeat() {
    let b = bed("live");
    let port = free_port();
    let dst = b.dest(port, &[]);
    let src = b.source("dirty=256 count");
    let (code, out) = finished(migrate(
        &src,
        &format!("tcp:127.0.0.1:{port}"),
        &["--live", "--verify"],
    ));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("migrated to") && out.contains("downtime"),
        "{out}"
    );
    let src_name = src.name.clone();
    let src_lines = src.serial.clone();
    let (code, err) = src.wait();
    assert_eq!(
        code,
        Some(0),
        "the source ends once the destination runs: {err}"
    );
    assert!(err.contains("migrated to tcp:127.0.0.1"), "{err}");
    assert!(!listed(&src_name), "ember list no longer shows the source");
    let last = src_lines.last_tick().unwrap();
    dst.serial.wait_tick(last + 5, "destination");
    assert_continuous(&src_lines, &dst.serial);
    assert!(listed(&dst.name));
    dst.stop();
}

#[test]
fn migration_without_live_pauses_sends_all_and_resumes_there() {
    let b = bed("cold");
    let port = free_port();
    let dst = b.dest(port, &[]);
    let src = b.source("dirty=64 count");
    let (code, out) = finished(migrate(&src, &format!("tcp:127.0.0.1:{port}"), &[]));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("over 1 passes"),
        "one pass when not live: {out}"
    );
    goes_on_there(src, &dst, 3);
    dst.stop();
}

/// The vCPU indexes `ember vcpuinfo NAME` lists.
/// The source ended with status 0 and the destination counts on from its last tick, `more`
/// ticks past it, with no gap or repeat.
fn goes_on_there(src: Vm, dst: &Vm, more: u64) {
    let src_lines = src.serial.clone();
    assert_eq!(src.wait().0, Some(0));
    dst.serial
        .wait_tick(src_lines.last_tick().unwrap() + more, "destination");
    assert_continuous(&src_lines, &dst.serial);
}

fn vcpu_ids(name: &str) -> Vec<u32> {
    let out = ember().args(["vcpuinfo", name]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    vcpuinfo_ids(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn vcpus_plugged_at_run_time_migrate_with_the_vm() {
    let b = bed("cpus");
    let port = free_port();
    let dst = b.dest(port, &[]);
    let src = b.source_in(&[], "count", &["--cpus", "boot=1,max=3"]);
    let out = ember().args(["setvcpus", &src.name, "3"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(vcpu_ids(&src.name), [0, 1, 2]);
    let (code, out) = finished(migrate(&src, &format!("tcp:127.0.0.1:{port}"), &["--live"]));
    assert_eq!(code, Some(0), "{out}");
    goes_on_there(src, &dst, 3);
    assert_eq!(
        vcpu_ids(&dst.name),
        [0, 1, 2],
        "the plugged vCPUs came along"
    );
    dst.stop();
}

#[test]
fn an_authenticated_migration_needs_the_same_key_on_both_sides() {
    let b = bed("auth");
    let port = free_port();
    let good = b.key("good.key", 1);
    let bad = b.key("bad.key", 2);
    let dst = b.dest(port, &["--auth-key", good.to_str().unwrap()]);
    let mut src = b.source("count");
    let url = format!("tcp:127.0.0.1:{port}");
    let (code, out) = finished(migrate(
        &src,
        &url,
        &["--live", "--auth-key", bad.to_str().unwrap()],
    ));
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("authentication failed"), "{out}");
    let (code, out) = finished(migrate(&src, &url, &["--live"]));
    assert_ne!(code, Some(0));
    assert!(out.contains("authenticated migrations only"), "{out}");
    assert!(
        src.is_running(),
        "a refused migration leaves the source running"
    );
    let n = src.serial.last_tick().unwrap();
    src.serial.wait_tick(n + 2, "source after refusals");
    let (code, out) = finished(migrate(
        &src,
        &url,
        &["--live", "--auth-key", good.to_str().unwrap()],
    ));
    assert_eq!(code, Some(0), "{out}");
    goes_on_there(src, &dst, 2);
    dst.stop();
}

#[test]
fn garbage_on_the_listening_port_is_refused_and_the_destination_waits_on() {
    let b = bed("junk");
    let port = free_port();
    let dst = b.dest(port, &[]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"hello there\n").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains("refused: not an Ember migration stream"),
        "{text:?}"
    );
    let src = b.source("count");
    let (code, out) = finished(migrate(&src, &format!("tcp:127.0.0.1:{port}"), &["--live"]));
    assert_eq!(
        code,
        Some(0),
        "the destination still takes a real migration: {out}"
    );
    let src_lines = src.serial.clone();
    src.wait();
    dst.serial
        .wait_tick(src_lines.last_tick().unwrap() + 2, "destination");
    dst.stop();
}

#[test]
fn a_destination_that_cannot_offer_the_guests_cpu_features_refuses_by_name() {
    let b = bed("cpu");
    let port = free_port();
    let dst = b.dest(port, &["--cpu-features", "-sse2"]);
    let mut src = b.source("count");
    let (code, out) = finished(migrate(&src, &format!("tcp:127.0.0.1:{port}"), &["--live"]));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("cannot run the guest") && out.contains("lacks sse2"),
        "{out}"
    );
    assert!(src.is_running());
    let n = src.serial.last_tick().unwrap();
    src.serial.wait_tick(n + 2, "source after the refusal");
    assert!(dst.serial.ticks().is_empty());
    src.stop();
    dst.stop();
}

#[test]
fn the_destination_killed_mid_transfer_leaves_the_source_running() {
    let b = bed("dkill");
    let port = free_port();
    let dst = b.dest(port, &[]);
    let mut src = b.source("dirty=1024 count");
    let m = migrate(
        &src,
        &format!("tcp:127.0.0.1:{port}"),
        &["--live", "--bandwidth", "1"],
    );
    wait_active(&src.name);
    signal(&dst.child, libc::SIGKILL);
    let (code, out) = finished(m);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the VM goes on here"), "{out}");
    assert!(src.is_running());
    let n = src.serial.last_tick().unwrap();
    src.serial
        .wait_tick(n + 3, "source after the destination died");
    assert_eq!(job(&src.name, "State"), "failed", "{}", jobinfo(&src.name));
    dst.wait();
    src.stop();
}

#[test]
fn domjobabort_cancels_and_the_vm_goes_on_here() {
    let b = bed("abort");
    let port = free_port();
    let dst = b.dest(port, &[]);
    let src = b.source("dirty=1024 count");
    let m = migrate(
        &src,
        &format!("tcp:127.0.0.1:{port}"),
        &["--live", "--bandwidth", "1"],
    );
    wait_active(&src.name);
    let out = ember().args(["domjobabort", &src.name]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, out) = finished(m);
    assert_ne!(code, Some(0));
    assert!(out.contains("cancelled"), "{out}");
    assert_eq!(job(&src.name, "State"), "cancelled");
    let n = src.serial.last_tick().unwrap();
    src.serial.wait_tick(n + 2, "source after the cancel");
    // The destination dropped what it had and takes the VM on the next try.
    let (code, out) = finished(migrate(&src, &format!("tcp:127.0.0.1:{port}"), &["--live"]));
    assert_eq!(code, Some(0), "{out}");
    let src_lines = src.serial.clone();
    src.wait();
    dst.serial
        .wait_tick(src_lines.last_tick().unwrap() + 2, "destination");
    assert_continuous(&src_lines, &dst.serial);
    dst.stop();
}

#[test]
fn a_guest_dirtying_faster_than_the_link_times_out_and_stays_here() {
    let b = bed("slow");
    let port = free_port();
    let dst = b.dest(port, &[]);
    // 4 MiB per tick (~40 MiB/s) against a 2 MiB/s link.
    let mut src = b.source("dirty=4096 count");
    let started = Instant::now();
    let m = migrate(
        &src,
        &format!("tcp:127.0.0.1:{port}"),
        &["--live", "--bandwidth", "2", "--timeout", "4"],
    );
    let (code, out) = finished(m);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("did not converge within 4 s"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(job(&src.name, "State"), "failed", "{}", jobinfo(&src.name));
    assert!(src.is_running());
    let n = src.serial.last_tick().unwrap();
    src.serial.wait_tick(n + 2, "source after the timeout");
    src.stop();
    dst.stop();
}

/// Forwards one connection from `listen` to `to` and cuts both sides after `limit` bytes
/// from the source.
fn cutting_proxy(listen: u16, to: u16, limit: usize) -> std::thread::JoinHandle<usize> {
    let l = TcpListener::bind(("127.0.0.1", listen)).unwrap();
    std::thread::spawn(move || {
        let (mut a, _) = l.accept().unwrap();
        let mut b = TcpStream::connect(("127.0.0.1", to)).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
        });
        let mut passed = 0;
        let mut buf = [0u8; 16384];
        while passed < limit {
            match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let n = n.min(limit - passed);
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    passed += n;
                }
            }
        }
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
        passed
    })
}

#[test]
fn a_cut_connection_leaves_the_source_running_and_the_destination_waiting() {
    let b = bed("cut");
    let port = free_port();
    let dst = b.dest(port, &[]);
    let mut src = b.source("dirty=1024 count");
    let proxy_port = free_port();
    let proxy = cutting_proxy(proxy_port, port, 512 << 10);
    let (code, out) = finished(migrate(
        &src,
        &format!("tcp:127.0.0.1:{proxy_port}"),
        &["--live"],
    ));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the VM goes on here"), "{out}");
    assert_eq!(proxy.join().unwrap(), 512 << 10);
    assert!(src.is_running());
    let n = src.serial.last_tick().unwrap();
    src.serial.wait_tick(n + 2, "source after the cut");
    assert!(
        dst.serial.ticks().is_empty(),
        "no guest ran at the destination"
    );
    let (code, out) = finished(migrate(&src, &format!("tcp:127.0.0.1:{port}"), &["--live"]));
    assert_eq!(
        code,
        Some(0),
        "the destination discarded the partial VM and waits: {out}"
    );
    let src_lines = src.serial.clone();
    src.wait();
    dst.serial
        .wait_tick(src_lines.last_tick().unwrap() + 2, "destination");
    assert_continuous(&src_lines, &dst.serial);
    dst.stop();
}

#[test]
fn the_source_killed_mid_transfer_leaves_the_destination_waiting_with_nothing() {
    let b = bed("skill");
    let port = free_port();
    let dst = b.dest(port, &[]);
    let src = b.source("dirty=1024 count");
    let m = migrate(
        &src,
        &format!("tcp:127.0.0.1:{port}"),
        &["--live", "--bandwidth", "1"],
    );
    wait_active(&src.name);
    signal(&src.child, libc::SIGKILL);
    let _ = finished(m);
    let (code, _) = src.wait();
    assert_eq!(code, None, "killed");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(job(&dst.name, "State"), "incoming", "still waiting");
    assert!(
        dst.serial.ticks().is_empty(),
        "no guest ran at the destination"
    );
    // And it takes another VM whole.
    let b2 = Bed {
        tag: format!("{}b", b.tag),
        kernel: b.kernel.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    let src2 = b2.source("count");
    let (code, out) = finished(migrate(
        &src2,
        &format!("tcp:127.0.0.1:{port}"),
        &["--live"],
    ));
    assert_eq!(code, Some(0), "{out}");
    let lines = src2.serial.clone();
    src2.wait();
    dst.serial
        .wait_tick(lines.last_tick().unwrap() + 2, "destination");
    dst.stop();
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct Netns {
    names: [String; 2],
}

impl Netns {
    fn new(tag: &str) -> Self {
        let names = [format!("emA{tag}"), format!("emB{tag}")];
        let run = |args: &[&str]| tool_ok("ip", args);
        for n in &names {
            run(&["netns", "add", n]);
        }
        let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
        run(&[
            "link", "add", &va, "netns", &names[0], "type", "veth", "peer", "name", &vb, "netns",
            &names[1],
        ]);
        for (ns, dev, addr) in [
            (&names[0], &va, "10.211.0.1/24"),
            (&names[1], &vb, "10.211.0.2/24"),
        ] {
            run(&["-n", ns, "addr", "add", addr, "dev", dev]);
            run(&["-n", ns, "link", "set", dev, "up"]);
            run(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Netns { names }
    }

    fn exec(&self, i: usize) -> [&str; 4] {
        ["ip", "netns", "exec", self.names[i].as_str()]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn live_migration_across_two_network_namespaces() {
    let b = bed("ns");
    let ns = Netns::new(&(std::process::id() % 10_000).to_string());
    let dst = b.dest_in(&ns.exec(1), "dst", "10.211.0.2:4444", &[]);
    let src = b.source_in(&ns.exec(0), "dirty=256 count", &[]);
    let (code, out) = finished(migrate(
        &src,
        "tcp:10.211.0.2:4444",
        &["--live", "--verify"],
    ));
    assert_eq!(code, Some(0), "{out}");
    goes_on_there(src, &dst, 3);
    dst.stop();
}

/// Whether a process holds `image` (`ember img info` cannot take its locks).
fn locked(image: &Path) -> bool {
    let out = ember().args(["img", "info"]).arg(image).output().unwrap();
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("in use")
}

#[test]
fn a_shared_disk_passes_to_the_destination_and_a_failed_handover_gives_it_back() {
    let b = bed("disk");
    let ns = Netns::new(&format!("d{}", std::process::id() % 10_000));
    let disk = b.dir.path().join("shared.qcow2");
    ember_img_ok(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "1M"]);
    let disk_arg = format!("path={}", disk.display());
    let mut src = b.source_in(
        &ns.exec(0),
        "count",
        &["--disk", &disk_arg, "--net", "tap=emtap0"],
    );
    assert!(locked(&disk), "the source holds its disk");
    // A destination whose NIC cannot be opened fails after the source closed its disk.
    let bad = b.dest_in(
        &ns.exec(0),
        "bad",
        "127.0.0.1:4445",
        &["--net", "id=eth0,tap=lo"],
    );
    let (code, out) = finished(migrate(&src, "tcp:127.0.0.1:4445", &["--live"]));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("cannot build the VM"), "{out}");
    assert!(src.is_running());
    assert!(locked(&disk), "the source opened its disk again");
    let n = src.serial.last_tick().unwrap();
    src.serial
        .wait_tick(n + 2, "source after the failed handover");
    bad.stop();
    // A destination that can: the disk is its own afterwards.
    let dst = b.dest_in(
        &ns.exec(0),
        "dst",
        "127.0.0.1:4446",
        &["--net", "id=eth0,tap=emtap1"],
    );
    let (code, out) = finished(migrate(&src, "tcp:127.0.0.1:4446", &["--live"]));
    assert_eq!(code, Some(0), "{out}");
    goes_on_there(src, &dst, 2);
    assert!(locked(&disk), "the destination holds the disk");
    dst.stop();
    assert!(!locked(&disk));
}
