//! Snapshots of a Linux guest (the guest kit) on a qcow2 root with a NIC, in one boot:
//! `snapshot-create-as` while the guest prints on its console and writes its disk, a file
//! written and synced after it, `snapshot-revert` (the file is gone, the console goes on
//! where it was, the interrupted disk writer finishes, the clock has not gone back, disk
//! I/O and ping work), `qemu-img snapshot -l` / `check`; `ember save` and a restore on a
//! new tap; a full clone restored from a snapshot of the running VM, both running at once
//! on their own disks; `snapshot-delete` of the shut-off VM. Needs root, /dev/kvm, the
//! guest kit, iproute2, qemu-img and e2fsprogs.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const BOOT_LIMIT: Duration = Duration::from_secs(900);
/// One step of typed commands (each fork costs about a second where guest kernel code is
/// emulated, more on a busy host).
const STEP_LIMIT: Duration = Duration::from_secs(600);
const FLAGS: &str = "console=ttyS0 quiet tsc=reliable no_timer_check";
/// How many numbered lines the guest prints while the snapshot is taken.
const LINES: u32 = 60;
/// Only errors logged (Ember's own modules named: a bare `error` leaves them on).
const QUIET: &str = "error,ember=error,devices=error,boot=error";

/// A network namespace with one tap (`tap`, host side 10.0.2.1/24); deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("ember-st-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("this test needs iproute2 (ip)");
        assert!(
            st.success(),
            "cannot create network namespace {name} (needs root)"
        );
        let ns = Netns(name);
        ns.sh("ip link set lo up");
        ns
    }

    fn sh(&self, script: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-c", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A tap named `tap` with the host's address on it.
    fn tap(&self, tap: &str) {
        self.sh(&format!(
            "ip tuntap add dev {tap} mode tap && ip addr add 10.0.2.1/24 dev {tap} && \
             ip link set {tap} up"
        ));
    }

    /// `ember ARGS` inside the namespace (the VM's process opens its taps there).
    fn ember(&self, data: &Path) -> Command {
        let (state, config) = state_dirs();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_ember")])
            .env("EMBER_STATE_DIR", state)
            .env("EMBER_CONFIG_DIR", config)
            .env("EMBER_DATA_DIR", data)
            .env("RUST_LOG", QUIET);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `ember console NAME` with its input on a pipe and its output collected; the console
/// client ends when dropped (the VM runs on).
struct Console {
    child: Child,
    input: ChildStdin,
    out: Arc<Mutex<Vec<u8>>>,
    name: String,
}

impl Console {
    fn attach(data: &Path, name: &str) -> Console {
        let mut child = ember()
            .env("EMBER_DATA_DIR", data)
            .args(["console", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let (sink, mut stdout) = (out.clone(), child.stdout.take().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let input = child.stdin.take().unwrap();
        Console {
            child,
            input,
            out,
            name: name.to_string(),
        }
    }

    /// Everything shown so far (the replay of earlier output first), CRs dropped.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).replace('\r', "")
    }

    /// Where the output is now: `expect` looks only at what comes after.
    fn mark(&self) -> usize {
        self.text().len()
    }

    /// Types `line` and Enter.
    fn send(&mut self, line: &str) {
        self.input
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        self.input.flush().unwrap();
    }

    /// Waits until the output after `from` holds `marker` and the end of its line; returns
    /// the line from the marker on. Markers are printed as `$((..))` sums so the echo of the
    /// typed command never matches (a background job's line may follow a prompt).
    fn expect(&self, from: usize, marker: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            let text = self.text();
            let after = text.get(from..).unwrap_or("");
            if let Some(line) = after
                .find(marker)
                .and_then(|at| after[at..].split_once('\n'))
                .map(|(line, _)| line)
            {
                return line.to_string();
            }
            assert!(
                Instant::now() < end,
                "VM {} printed no '{marker}' within {limit:?}; after the mark:\n{after}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `line` and waits for `marker` after it.
    fn run(&mut self, line: &str, marker: &str) -> String {
        let from = self.mark();
        self.send(line);
        self.expect(from, marker, STEP_LIMIT)
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's VMs and definitions: destroyed and removed when it ends, passed or failed.
struct Vms {
    data: PathBuf,
    names: Vec<String>,
}

impl Vms {
    fn ember(&self) -> Command {
        let mut c = ember();
        c.env("EMBER_DATA_DIR", &self.data).env("RUST_LOG", QUIET);
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.ember().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ember {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_gone(&self, name: &str) {
        let end = Instant::now() + STEP_LIMIT;
        while state_dirs().0.join("vms").join(name).join("lock").exists() {
            assert!(Instant::now() < end, "VM {name} did not end");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Vms {
    fn drop(&mut self) {
        for n in &self.names {
            for verb in ["destroy", "undefine"] {
                let _ = self
                    .ember()
                    .args([verb, n])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The guest's uptime in seconds, read with shell builtins; `n` makes the marker unique.
fn uptime(c: &mut Console, n: u32) -> f64 {
    let line = c.run(
        &format!("read up _ </proc/uptime; echo UP$(({n}+0))=$up"),
        &format!("UP{n}="),
    );
    line.split('=').nth(1).unwrap().trim().parse().unwrap()
}

/// Pings the host side of the guest's tap (forgetting the old tap's MAC first); asserts
/// it answers.
fn ping(c: &mut Console, n: u32) {
    let line = c.run(
        &format!(
            "ip neigh flush dev eth0; t=0; until ping -c 1 -W 3 10.0.2.1 >/dev/null; do \
             t=$((t+1)); [ $t -ge 5 ] && break; done; echo PING$(({n}+0))-$t"
        ),
        &format!("PING{n}-"),
    );
    let tries: u32 = line.rsplit('-').next().unwrap().trim().parse().unwrap();
    assert!(tries < 5, "the guest cannot reach its host: {line}");
}

/// Writes `text` to `/root/FILE` on the guest's root disk, syncs, reads it back.
fn write_file(c: &mut Console, file: &str, text: &str, n: u32) {
    let line = c.run(
        &format!("echo {text} >/root/{file}; sync; read l </root/{file}; echo WR$(({n}+0))=$l"),
        &format!("WR{n}="),
    );
    assert_eq!(line, format!("WR{n}={text}"));
}

/// The numbers of the `line-N` lines in `text`, in order.
fn numbered(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.strip_prefix("line-")?.trim().parse().ok())
        .collect()
}

/// Asserts `nums` is `first..LINES` with nothing lost or doubled.
fn assert_run_of_lines(nums: &[u32], what: &str) {
    let first = *nums.first().unwrap_or_else(|| panic!("{what}: no lines"));
    let want: Vec<u32> = (first..LINES).collect();
    assert_eq!(nums, want, "{what}: the console lost or doubled lines");
}

/// `qemu-img snapshot -l` (the image may be held: -U).
fn qemu_snapshots(image: &Path) -> String {
    let out = tool_ok("qemu-img", &["snapshot", "-l", "-U", s(image)]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of `/root/FILE` in the ext4 of qcow2 `image` (flattened, the journal replayed),
/// or None when the file is not there.
fn file_in_image(image: &Path, file: &str) -> Option<String> {
    let flat = image.with_extension("flat");
    if !flat.exists() {
        tool_ok("qemu-img", &["convert", "-O", "raw", s(image), s(&flat)]);
        let fsck = tool("e2fsck", &["-fy", s(&flat)]);
        assert!(
            matches!(fsck.status.code(), Some(0 | 1)),
            "e2fsck {}: {}",
            image.display(),
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
    let out = tool("debugfs", &["-R", &format!("cat /root/{file}"), s(&flat)]);
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("File not found") {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One request on an API socket; the status.
fn api(sock: &Path, method: &str, path: &str, body: &str) -> u16 {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(STEP_LIMIT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         \r\n{body}",
        body.len()
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

#[test]
fn linux_snapshot_revert_save_restore_on_a_new_tap_and_a_running_clone() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let pid = std::process::id();
    let (a, b) = (format!("st-lin-a-{pid}"), format!("st-lin-b-{pid}"));
    let vms = Vms {
        data: data.clone(),
        names: vec![a.clone(), b.clone()],
    };
    let base = dir.path().join("base.raw");
    std::fs::copy(&kit.rootfs, &base).unwrap();
    let top = dir.path().join("top.qcow2");
    ember_overlay(s(&top), "base.raw", "raw");
    let (ns_a, ns_b) = (Netns::new("a"), Netns::new("b"));
    ns_a.tap("tap0");
    let def = dir.path().join("a.toml");
    std::fs::write(
        &def,
        format!(
            "name = \"{a}\"\nkernel = \"{}\"\nmemory = \"128M\"\nroot = \"/dev/vda\"\n\
             cmdline = \"{FLAGS} ember.ip=10.0.2.2/24 ember.run=net-static ember.end=shell\"\n\
             [[disk]]\npath = \"{}\"\nformat = \"qcow2\"\n[[net]]\ntap = \"tap0\"\n",
            kit.vmlinux.display(),
            top.display()
        ),
    )
    .unwrap();
    vms.ok(&["define", s(&def)]);
    let started = ns_a.ember(&data).args(["start", &a]).output().unwrap();
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );

    // Booted to the shell, network up.
    let mut con = Console::attach(&data, &a);
    con.expect(0, "EMBER-NET eth0", BOOT_LIMIT);
    con.run("echo READY$((1+0))", "READY1");
    ping(&mut con, 2);
    let up_before = uptime(&mut con, 3);

    // A snapshot while the guest prints numbered lines and a disk writer runs.
    let from = con.mark();
    con.send(&format!(
        "(dd if=/dev/zero of=/root/fill bs=64k count=32 conv=fsync 2>/dev/null; \
         echo DD$((4+0))-done) & i=0; while [ $i -lt {LINES} ]; do echo line-$i; \
         i=$((i+1)); done; echo LOOP$((5+0))-done"
    ));
    con.expect(from, "line-5", STEP_LIMIT);
    vms.ok(&["snapshot-create-as", &a, "s1", "--description", "mid-print"]);
    con.expect(from, "LOOP5-done", STEP_LIMIT);
    con.expect(from, "DD4-done", STEP_LIMIT);
    let first_run = con.text()[from..].to_string();
    assert_run_of_lines(&numbered(&first_run), "printing through the snapshot");
    assert!(
        qemu_snapshots(&top).contains(" s1 "),
        "{}",
        qemu_snapshots(&top)
    );
    write_file(&mut con, "after.txt", "after-snapshot", 6);

    // Back to s1: the console goes on mid-loop, the writer finishes, the file is gone.
    let from = con.mark();
    vms.ok(&["snapshot-revert", &a, "s1"]);
    con.expect(from, "LOOP5-done", STEP_LIMIT);
    con.expect(from, "DD4-done", STEP_LIMIT);
    let again = numbered(&con.text()[from..]);
    assert_run_of_lines(&again, "printing after the revert");
    assert!(
        again[0] > 0,
        "the revert went back before the loop: {again:?}"
    );
    let gone = con.run(
        "echo 3 >/proc/sys/vm/drop_caches; [ -e /root/after.txt ] && \
         echo GONE$((7+0))-no || echo GONE$((7+0))-yes",
        "GONE7-",
    );
    assert_eq!(
        gone, "GONE7-yes",
        "a file written after the snapshot survived the revert"
    );
    assert!(
        uptime(&mut con, 8) >= up_before,
        "the guest's clock went back"
    );
    write_file(&mut con, "post-revert.txt", "post-revert", 9);
    ping(&mut con, 10);

    // Saved, then restored on a new tap.
    let up_saved = uptime(&mut con, 11);
    let saved = dir.path().join("a.snap");
    drop(con);
    vms.ok(&["save", &a, s(&saved)]);
    vms.wait_gone(&a);
    ns_a.sh("ip link del tap0");
    ns_a.tap("tap1");
    let restored = ns_a
        .ember(&data)
        .args([
            "run",
            "-d",
            "--restore",
            s(&saved),
            "--name",
            &a,
            "--net",
            "id=eth0,tap=tap1",
        ])
        .output()
        .unwrap();
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let mut con = Console::attach(&data, &a);
    con.run("echo BACK$((12+0))", "BACK12");
    assert!(
        uptime(&mut con, 13) >= up_saved,
        "the guest's clock went back"
    );
    ping(&mut con, 14);
    write_file(&mut con, "restored.txt", "restored", 15);

    // A full clone of the running VM: its state and disk at one paused instant, the
    // original going on, the clone restored on its own disk and tap.
    vms.ok(&["suspend", &a]);
    let (clone_state, clone_disk) = (dir.path().join("b.snap"), dir.path().join("b.qcow2"));
    let sock = state_dirs().0.join("vms").join(&a).join("api.sock");
    let create = format!(
        "{{\"snapshot_path\":\"{}\",\"mem_file_path\":\"{}.mem\"}}",
        clone_state.display(),
        clone_state.display()
    );
    assert_eq!(api(&sock, "PUT", "/snapshot/create", &create), 204);
    vms.ok(&["clone", "-o", &a, "-n", &b, "-f", s(&clone_disk)]);
    vms.ok(&["resume", &a]);
    ns_b.tap("tap2");
    let disk = format!("id=vda,path={}", clone_disk.display());
    let clone = ns_b
        .ember(&data)
        .args(["run", "-d", "--restore", s(&clone_state), "--name", &b])
        .args(["--disk", &disk, "--net", "id=eth0,tap=tap2"])
        .output()
        .unwrap();
    assert!(
        clone.status.success(),
        "{}",
        String::from_utf8_lossy(&clone.stderr)
    );
    vms.ok(&["resume", &b]);
    let mut con_b = Console::attach(&data, &b);
    for (c, who, n) in [(&mut con, "a", 16), (&mut con_b, "b", 17)] {
        write_file(c, "who.txt", who, n);
        ping(c, n + 10);
    }

    // Both shut down; the images are clean and hold what each guest wrote.
    for c in [&mut con, &mut con_b] {
        c.send("sync; poweroff -f");
    }
    vms.wait_gone(&a);
    vms.wait_gone(&b);
    for image in [&top, &clone_disk] {
        assert_qemu_img_clean(image);
    }
    assert!(qemu_snapshots(&top).contains(" s1 "));
    vms.ok(&["snapshot-delete", &a, "s1"]);
    assert!(!qemu_snapshots(&top).contains(" s1 "));
    assert_qemu_img_clean(&top);
    assert_eq!(file_in_image(&top, "who.txt").as_deref(), Some("a"));
    assert_eq!(file_in_image(&clone_disk, "who.txt").as_deref(), Some("b"));
    assert_eq!(file_in_image(&top, "after.txt"), None);
    for image in [&top, &clone_disk] {
        assert_eq!(
            file_in_image(image, "post-revert.txt").as_deref(),
            Some("post-revert")
        );
        assert_eq!(
            file_in_image(image, "restored.txt").as_deref(),
            Some("restored")
        );
    }
}
