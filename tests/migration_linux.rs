//! Live migration of the guest kit's Linux (one boot for every check): a guest process keeps
//! dirtying memory and another keeps appending to a file on its qcow2 root disk and syncing
//! while the VM migrates, first on shared storage (the destination reopens the same
//! overlay), then back with --copy-storage onto a new overlay over the same base. The
//! guest's counter goes on without a gap, it pings its host through the destination's own
//! tap, the host reaches it there (the RARP announcement moved its MAC in the bridge), and
//! after it powers off the overlays pass `qemu-img check` and the file holds every line.
//! Needs root, /dev/kvm, the guest kit, iproute2, qemu-img and debugfs.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const BOOT_LIMIT: Duration = Duration::from_secs(900);
const STEP_LIMIT: Duration = Duration::from_secs(300);
const FLAGS: &str = "console=ttyS0 quiet tsc=reliable no_timer_check";

/// A network namespace with a bridge (10.0.2.1/24) and two taps on it.
struct Lan(String);

impl Lan {
    fn new() -> Self {
        let name = format!("ember-mig-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        tool_ok("ip", &["netns", "add", &name]);
        let lan = Lan(name);
        lan.sh("ip link set lo up && ip link add br0 type bridge && \
             ip addr add 10.0.2.1/24 dev br0 && ip link set br0 up && \
             for t in tap0 tap1; do ip tuntap add dev $t mode tap && \
             ip link set $t master br0 && ip link set $t up; done");
        lan
    }

    fn sh(&self, script: &str) -> std::process::Output {
        tool_ok("ip", &["netns", "exec", &self.0, "sh", "-c", script])
    }

    /// Whether this host side reaches `ip` (its ARP answer comes back): a datagram from
    /// inside the namespace makes the kernel ask for it.
    fn reaches(&self, ip: &str) -> bool {
        let path = format!("/run/netns/{}", self.0);
        let target = format!("{ip}:9");
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only, with a namespace file we hold open.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns");
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let _ = s.send_to(b"x", &target);
        })
        .join()
        .unwrap();
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            let neigh = self.sh(&format!("ip neigh show {ip}"));
            let text = String::from_utf8_lossy(&neigh.stdout).into_owned();
            if text.contains("lladdr 52:54:00") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    fn ember(&self) -> Command {
        let (state, config) = state_dirs();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_ember")])
            .env("EMBER_STATE_DIR", state)
            .env("EMBER_CONFIG_DIR", config);
        c
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// An ember process with its console on stdio.
struct Guest {
    child: Child,
    input: ChildStdin,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Guest {
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = Vec::new();
            // Lines, and the part of a line the process printed last (a migration may
            // cut a line between the two consoles).
            while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                if tx.send(text).is_err() {
                    break;
                }
                line.clear();
            }
        });
        Guest {
            input: child.stdin.take().unwrap(),
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Types a line on the console.
    fn type_line(&mut self, line: &str) {
        self.input.write_all(line.as_bytes()).unwrap();
        self.input.write_all(b"\n").unwrap();
        self.input.flush().unwrap();
    }

    /// Waits for a line that starts with `what`.
    fn expect(&mut self, what: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            match self
                .lines
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(what) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no line starting with '{what}'; the console showed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits until the guest's counter reached `n`.
    fn expect_count(&mut self, n: u64) {
        let end = Instant::now() + STEP_LIMIT;
        while self.counters().last().copied().unwrap_or(0) < n {
            match self
                .lines
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("the counter never reached {n}:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Types `echo EMBER-READY` until the shell answers (at most every 10 s: typing ahead
    /// of a busy guest would overflow its tty's input buffer).
    fn wait_for_shell(&mut self) {
        let end = Instant::now() + STEP_LIMIT;
        while Instant::now() < end {
            self.type_line("echo EMBER-READY");
            let retry = Instant::now() + Duration::from_secs(10);
            while let Ok(l) = self
                .lines
                .recv_timeout(retry.saturating_duration_since(Instant::now()))
            {
                self.seen.push(l.clone());
                if l.starts_with("EMBER-READY") {
                    return;
                }
            }
        }
        panic!("no shell on the console:\n{}", self.seen.join("\n"));
    }

    /// Everything printed until the process ended.
    fn drain(&mut self) {
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
    }

    fn counters(&self) -> Vec<u64> {
        numbers(&self.seen, "EMBER-MIG ")
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The numbers after `prefix` wherever it is in a line (a prompt may come first).
fn numbers(lines: &[String], prefix: &str) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| {
            let at = l.find(prefix)? + prefix.len();
            let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A destination in `lan` listening on `port`, with its NIC on `tap` and `extra` options.
fn destination(lan: &Lan, name: &str, port: u16, tap: &str, extra: &[&str]) -> Guest {
    let mut c = lan.ember();
    c.args(["run", "--name", name, "--serial", "stdio", "--incoming"])
        .arg(format!("tcp:127.0.0.1:{port}"))
        .args(["--net", &format!("id=eth0,tap={tap}")])
        .args(extra);
    let g = Guest::start(c);
    let end = Instant::now() + STEP_LIMIT;
    loop {
        let out = ember().args(["domjobinfo", name]).output().unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("incoming") {
            return g;
        }
        assert!(Instant::now() < end, "{name} does not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ember migrate NAME tcp:127.0.0.1:PORT --live --verify ARGS`, which must succeed (the
/// destination compares a checksum of all guest memory with the source's).
fn migrate(name: &str, port: u16, args: &[&str]) -> String {
    let mut c = ember()
        .args([
            "migrate",
            name,
            &format!("tcp:127.0.0.1:{port}"),
            "--live",
            "--verify",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_deadline(&mut c, STEP_LIMIT).expect("ember migrate ends");
    let out = c.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status.success(), "ember migrate {name}: {text}");
    text
}

/// `l` if it holds no counter (a line the switch may have cut).
fn cut(l: Option<&String>) -> Option<&String> {
    l.filter(|l| numbers(&[l.to_string()], "EMBER-MIG ").is_empty())
}

/// The source ended with status 0 after the migration; the counters printed on both
/// consoles run on without a gap or a repeat (the line the switch cut is joined back).
fn assert_handed_over(src: &mut Guest, dst: &mut Guest, next: u64) {
    let status = wait_deadline(&mut src.child, STEP_LIMIT).expect("the source ends");
    assert_eq!(
        status.code(),
        Some(0),
        "the source ends once the destination runs"
    );
    src.drain();
    let last = *src.counters().last().expect("the source counted");
    dst.expect_count(last + 2);
    let mut all = src.counters();
    if let (Some(a), Some(b)) = (cut(src.seen.last()), cut(dst.seen.first())) {
        // A line the switch cut: its start at the source, its end at the destination.
        all.extend(numbers(&[format!("{a}{b}")], "EMBER-MIG "));
    }
    all.extend(dst.counters());
    let want: Vec<u64> = (next..=*all.last().unwrap()).collect();
    let got: Vec<u64> = all.into_iter().filter(|n| *n >= next).collect();
    assert_eq!(
        got,
        want,
        "the guest's counter across the migration; source:\n{}\ndestination:\n{}",
        src.seen.join("\n"),
        dst.seen.join("\n")
    );
}

fn debugfs_cat(image: &Path, file: &str) -> String {
    let raw = image.with_extension("check.raw");
    ember_img_ok(&[
        "convert",
        "-O",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let out = tool_ok(
        "debugfs",
        &["-R", &format!("cat {file}"), raw.to_str().unwrap()],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn linux_migrates_live_while_dirtying_memory_and_writing_its_qcow2_disk() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let lan = Lan::new();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::copy(&kit.rootfs, &base).unwrap();
    let top = dir.path().join("top.qcow2");
    let top2 = dir.path().join("top2.qcow2");
    ember_overlay(top.to_str().unwrap(), "base.raw", "raw");
    let tag = std::process::id();
    let (a, b, c) = (
        format!("lin-a{tag}"),
        format!("lin-b{tag}"),
        format!("lin-c{tag}"),
    );

    // The source boots, pings its host, and starts working.
    let mut cmd = lan.ember();
    cmd.args(["run", "--name", &a, "--kernel"])
        .arg(&kit.vmlinux)
        .arg("--disk")
        .arg(format!("path={},format=qcow2", top.display()))
        .args([
            "--root", "/dev/vda", "--memory", "128M", "--net", "tap=tap0",
        ])
        .args(["--serial", "stdio", "--cmdline"])
        .arg(format!(
            "{FLAGS} ember.ip=10.0.2.2/24 ember.peer=10.0.2.1 ember.run=net-static,net-ping \
             ember.end=shell"
        ));
    let mut src = Guest::start(cmd);
    let ping = src.expect("EMBER-PING", BOOT_LIMIT);
    assert!(ping.starts_with("EMBER-PING ok"), "{ping}");
    src.wait_for_shell();
    // Memory: awk rebuilds a 4 MiB string forever (user code, native speed). Disk: a line
    // per step appended to /data/log and synced; each step prints its number.
    src.type_line(
        "awk 'BEGIN{s=\"0123456789abcdef\"; while (length(s) < 4194304) s = s s; \
         for (;;) { n++; s = substr(s, 2) (n % 10) }}' & echo $! >/tmp/dirty",
    );
    src.type_line(
        "mkdir -p /data; : >/data/log; (n=0; while :; do n=$((n+1)); echo $n >>/data/log; \
         sync; echo EMBER-MIG $n; done) & echo $! >/tmp/writer",
    );
    src.expect_count(3);

    // 1: shared storage; the destination has its own tap on the same bridge.
    let p1 = free_port();
    let mut dst = destination(&lan, &b, p1, "tap1", &[]);
    let out = migrate(&a, p1, &[]);
    assert!(out.contains("downtime"), "{out}");
    assert_handed_over(&mut src, &mut dst, 1);
    // The guest has sent nothing since: only the announcement moved its MAC to tap1.
    let fdb = String::from_utf8_lossy(&lan.sh("bridge fdb show br br0").stdout).into_owned();
    assert!(
        fdb.lines()
            .any(|l| l.starts_with("52:54:00") && l.contains("dev tap1")),
        "the bridge learned the guest's MAC on the destination's tap: {fdb}"
    );
    lan.sh("ip neigh flush dev br0");
    assert!(
        lan.reaches("10.0.2.2"),
        "the host reaches the guest on the destination"
    );
    dst.type_line(
        "ping -c 2 -W 3 10.0.2.1 >/dev/null && echo EMBER-PING2 ok || echo EMBER-PING2 fail",
    );
    let ping = dst.expect("EMBER-PING2", STEP_LIMIT);
    assert_eq!(
        ping, "EMBER-PING2 ok",
        "the guest reaches its host from the destination"
    );

    // 2: back onto tap0, with the disk copied onto a new overlay over the same base.
    let first = *dst.counters().last().unwrap();
    let p2 = free_port();
    let disk = format!("id=vda,path={}", top2.display());
    let mut dst2 = destination(&lan, &c, p2, "tap0", &["--disk", &disk]);
    let out = migrate(&b, p2, &["--copy-storage"]);
    assert!(out.contains("downtime"), "{out}");
    assert_handed_over(&mut dst, &mut dst2, first);

    // The guest stops its work, checks its file and powers off.
    dst2.type_line(
        "kill $(cat /tmp/writer) $(cat /tmp/dirty); sync; \
         awk 'NR != $1 { bad = 1 } END { print (bad ? \"EMBER-SEQ bad \" : \"EMBER-SEQ ok \") NR }' /data/log",
    );
    let seq = dst2.expect("EMBER-SEQ", STEP_LIMIT);
    assert!(seq.starts_with("EMBER-SEQ ok "), "{seq}");
    let lines: u64 = seq.rsplit(' ').next().unwrap().parse().unwrap();
    let counted = *dst2.counters().last().unwrap();
    assert!(lines >= counted, "{lines} lines for {counted} steps");
    dst2.type_line("poweroff -f");
    let status = wait_deadline(&mut dst2.child, STEP_LIMIT).expect("the guest powers off");
    assert_eq!(status.code(), Some(0));

    assert_qemu_img_clean(&top);
    assert_qemu_img_clean(&top2);
    let log = debugfs_cat(&top2, "/data/log");
    let logged: Vec<u64> = log.lines().filter_map(|l| l.trim().parse().ok()).collect();
    let want: Vec<u64> = (1..=logged.len() as u64).collect();
    assert_eq!(logged, want, "every line reached the copied disk");
    assert!(logged.len() as u64 >= counted);
}
