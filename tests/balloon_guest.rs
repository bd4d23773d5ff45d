//! virtio-balloon end to end. With the tiny kernel (no driver): the API's and the verbs'
//! rules, and the balloon's state through `ember save` / `ember restore`. With a Linux guest
//! (guest kit, one boot): `ember setmem` shrinks the guest (its MemTotal drops by the
//! balloon) and the host's RSS of the VM drops, `ember dommemstat` shows the guest's
//! figures, and `setmem` back gives the memory back. Needs /dev/kvm and the guest kit.

mod common;

#[path = "../examples/tiny_kernel/guest.rs"]
#[allow(dead_code)]
mod guest;

use std::io::{BufRead, BufReader};
use std::process::{Child, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// Booting and filling memory take minutes where guest kernel code is emulated, more on a
/// loaded machine.
const LIMIT: Duration = Duration::from_secs(1800);
/// erms/fsrm hidden: the guest kernel then copies and clears 8 bytes per emulated `rep`
/// iteration instead of one (filling its memory is 8 times faster here).
const CPU: &str = "--cpu-features=-erms,-fsrm";
const FLAGS: &str = "console=ttyS0 quiet tsc=reliable no_timer_check";
/// MiB the guest fills and frees before the balloon inflates.
const FILL_MIB: u64 = 48;
/// The guest's memory, and what `setmem` leaves it.
const MEMORY_MIB: u64 = 256;
const TARGET_MIB: u64 = 192;

fn verb(args: &[&str]) -> Output {
    ember().args(args).output().unwrap()
}

fn verb_ok(args: &[&str]) -> String {
    let out = verb(args);
    assert!(
        out.status.success(),
        "ember {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `dommemstat`'s lines as (name, value).
fn memstat(name: &str) -> Vec<(String, u64)> {
    verb_ok(&["dommemstat", name])
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn stat(lines: &[(String, u64)], key: &str) -> Option<u64> {
    lines.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn wait_gone(name: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end && verb(&["dominfo", name]).status.success() {
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn balloon_rules_and_state_hold_without_a_guest_driver() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, guest::elf_image()).unwrap();
    let name = format!("balloon-tiny-{}", std::process::id());
    let k = kernel.to_str().unwrap();
    let spec = "on,target=48M,stats_period=3";
    let args = [
        "run", "-d", "--name", &name, "--kernel", k, "--memory", "64M",
    ];
    verb_ok(&[&args[..], &["--cmdline", "idle", "--balloon", spec]].concat());

    // A target above the VM's memory, and setmaxmem on a running VM, are refused plainly.
    let out = verb(&["setmem", &name, "65M"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("more than the VM's memory (64M)"));
    let out = verb(&["setmaxmem", &name, "128M"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("cannot change while it runs"));
    // No driver in the guest: the target is kept for when one starts.
    let said = verb_ok(&["setmem", &name, "40M"]);
    assert!(
        said.contains("has not started its balloon driver"),
        "{said}"
    );
    let stats = memstat(&name);
    assert_eq!(stat(&stats, "actual"), Some(65536), "nothing inflated yet");
    assert!(stat(&stats, "rss").is_some_and(|r| r > 0));

    // The target and period come back from a save (memory) in a restored VM.
    let state = dir.path().join("vm.state");
    verb_ok(&["save", &name, state.to_str().unwrap()]);
    wait_gone(&name);
    verb_ok(&["restore", state.to_str().unwrap()]);
    let sock = ember_api_sock(&name);
    let got = curl_json(&sock, "/balloon");
    assert_eq!(got["amount_mib"], 24, "{got}");
    assert_eq!(got["stats_polling_interval_s"], 3);
    verb_ok(&["destroy", &name]);
}

/// The API socket of running VM `name`, from `ember dominfo`.
fn ember_api_sock(name: &str) -> String {
    let info = verb_ok(&["dominfo", name]);
    info.lines()
        .find_map(|l| l.strip_prefix("API socket:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no API socket in {info}"))
}

fn curl_json(sock: &str, path: &str) -> serde_json::Value {
    let out = tool_ok(
        "curl",
        &[
            "-s",
            "--unix-socket",
            sock,
            &format!("http://localhost{path}"),
        ],
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A Linux guest whose console lines arrive on a channel.
struct Guest {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Guest {
    fn start(name: &str, kit: &GuestKit) -> Self {
        let mut child = ember()
            .args(["run", "--name", name, "--kernel"])
            .arg(&kit.vmlinux)
            .arg("--initrd")
            .arg(&kit.initramfs)
            .args(["--memory", &format!("{MEMORY_MIB}M")])
            .args(["--balloon", "on,stats_period=2", CPU])
            .args(["--serial", "stdio", "--cmdline"])
            .arg(format!(
                "{FLAGS} ember.run=balloon ember.fill={FILL_MIB} ember.watch=600"
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guest {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line for which `f` says Some; fails with everything seen on timeout.
    fn until<T>(&mut self, what: &str, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let end = Instant::now() + LIMIT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = f(&line);
                    self.seen.push(line);
                    if let Some(t) = hit {
                        return t;
                    }
                }
                Err(_) => panic!("no {what}; the guest said:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// The next `EMBER-MEM` line for which `ok(total_kib)` holds: (total, available) KiB.
    fn meminfo(&mut self, what: &str, ok: impl Fn(u64) -> bool) -> (u64, u64) {
        self.until(what, |l| {
            let rest = l.strip_prefix("EMBER-MEM total=")?;
            let (total, avail) = rest.split_once(" avail=")?;
            let (total, avail) = (total.parse().ok()?, avail.trim().parse().ok()?);
            ok(total).then_some((total, avail))
        })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn setmem_shrinks_a_linux_guest_and_the_host_rss_then_gives_memory_back() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let name = format!("balloon-linux-{}", std::process::id());
    let mut g = Guest::start(&name, &kit);
    let pid = g.child.id();
    let (total_before, _) = g.meminfo("first meminfo", |_| true);
    g.until("the fill freed", |l| {
        l.contains("EMBER-BALLOON freed").then_some(())
    });
    let rss_high = vm_rss_kib(pid);

    // The balloon takes 64 MiB: inflating runs guest kernel code for every page, which is
    // emulated on hosts like the CI's, so a bigger balloon costs minutes.
    verb_ok(&["setmem", &name, &format!("{TARGET_MIB}M")]);
    let started = Instant::now();
    let (total_small, avail_small) = g.meminfo("MemTotal down by the balloon", |t| {
        t + (MEMORY_MIB - TARGET_MIB) * 1024 <= total_before + 1024
    });
    let inflate_secs = started.elapsed().as_secs_f64();
    let stats = memstat(&name);
    let rss_low = vm_rss_kib(pid);
    eprintln!(
        "balloon: MemTotal {total_before} -> {total_small} KiB (MemAvailable {avail_small}) in \
         {inflate_secs:.0} s; ember VmRSS {rss_high} -> {rss_low} KiB; dommemstat {stats:?}"
    );
    assert_eq!(stat(&stats, "actual"), Some(TARGET_MIB * 1024), "{stats:?}");
    let counters = &curl_json(&ember_api_sock(&name), "/ember/balloon")["counters"];
    let discarded = counters["discarded_bytes"].as_u64().unwrap_or(0);
    assert!(
        discarded >= (MEMORY_MIB - TARGET_MIB) << 20,
        "only {discarded} bytes discarded: {counters}"
    );
    // The balloon takes 64 of the guest's ~240 free MiB, the pages freed last first: some are the pages it
    // filled (host-resident), the rest were never touched (not resident anyway).
    assert!(
        rss_high.saturating_sub(rss_low) >= FILL_MIB * 1024 / 3,
        "the host's RSS went from {rss_high} to {rss_low} KiB only"
    );

    // Statistics come every 2 s: wait for figures taken after the inflation.
    let end = Instant::now() + LIMIT;
    let fresh = loop {
        let s = memstat(&name);
        if stat(&s, "available").is_some_and(|a| a <= total_small + 1024) {
            break s;
        }
        assert!(Instant::now() < end, "no fresh statistics: {s:?}");
        std::thread::sleep(Duration::from_secs(2));
    };
    // (The guest kit's kernel counts no VM events: no swap or fault figures.)
    for key in [
        "unused",
        "available",
        "usable",
        "disk_caches",
        "last_update",
    ] {
        assert!(stat(&fresh, key).is_some(), "{key} missing from {fresh:?}");
    }

    verb_ok(&["setmem", &name, &format!("{MEMORY_MIB}M")]);
    let (total_back, _) = g.meminfo("MemTotal back", |t| t + 1024 >= total_before);
    eprintln!("balloon: deflated, MemTotal {total_back} KiB");
    verb_ok(&["destroy", &name]);
}
