//! Linux (guest kit, initramfs, a PCI bus and nothing on it at boot) takes a disk and a NIC
//! while it runs, in one boot: `ember attach-disk` of a qcow2 image holding an ext4 file
//! system, the guest sees /dev/vda appear without a rescan, reads the host's file, writes
//! its own and reads it back; `ember detach-disk` returns once the guest released it, the
//! disk is gone in the guest, `qemu-img check` finds the image clean and the guest's file is
//! in it; `ember attach-interface` of a tap, the guest pings the host through it;
//! `ember detach-interface`. The default seccomp filters are on. Prints the attach-to-seen
//! latencies (`HOTPLUG-LATENCY`, read by benches/hotplug.sh). Needs root, /dev/kvm, the
//! guest kit, iproute2, e2fsprogs and qemu-img.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::vm::Host;
use common::*;

const BOOT_LIMIT: Duration = Duration::from_secs(900);
const STEP_LIMIT: Duration = Duration::from_secs(300);
const FLAGS: &str = "console=ttyS0 quiet tsc=reliable no_timer_check";
const NAME: &str = "hotplug-test";

/// A network namespace holding tap0 at 10.0.5.1/24, deleted on drop.
struct Netns(String);

impl Netns {
    fn with_tap() -> Self {
        let name = format!("ember-hp-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let made = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("this test needs iproute2 (ip)");
        assert!(
            made.success(),
            "cannot create network namespace {name} (needs root)"
        );
        let ns = Netns(name);
        let script = "ip link set lo up && ip tuntap add dev tap0 mode tap \
                      && ip addr add 10.0.5.1/24 dev tap0 && ip link set tap0 up";
        let out = ns.cmd("sh").args(["-c", script]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ns
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The VM's process, killed on drop; its console lines on a channel.
struct Guest {
    child: Child,
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    fn expect(&mut self, what: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            match self
                .rx
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(what) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no '{what}' from the guest; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

fn start(h: &Host, ns: &Netns, kit: &GuestKit) -> Guest {
    let mut cmd = ns.cmd(env!("CARGO_BIN_EXE_ember"));
    cmd.env("EMBER_STATE_DIR", h.state_dir())
        .env("EMBER_CONFIG_DIR", h.config_dir())
        .args([
            "run",
            "--name",
            NAME,
            "--transport",
            "pci",
            "--memory",
            "128M",
        ])
        .arg("--kernel")
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initramfs)
        .arg("--cmdline")
        .arg(format!(
            "{FLAGS} ember.ip=10.0.5.2/24 ember.peer=10.0.5.1 ember.run=hotplug \
             ember.end=poweroff"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().unwrap();
    let (tx, rx) = mpsc::channel();
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
        rx,
        seen: Vec::new(),
    }
}

/// A qcow2 image of an ext4 file system holding hello.txt.
fn ext4_qcow2(dir: &Path) -> std::path::PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("hello.txt"), "hello-from-the-host\n").unwrap();
    let raw = dir.join("hot.raw");
    let raw_s = raw.to_str().unwrap();
    tool_ok(
        "mkfs.ext4",
        &["-q", "-F", "-d", tree.to_str().unwrap(), raw_s, "16M"],
    );
    let img = dir.join("hot.qcow2");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw_s,
            img.to_str().unwrap(),
        ],
    );
    img
}

/// The contents of `file` in the ext4 file system of the qcow2 image `img`.
fn file_in_image(img: &Path, file: &str) -> Vec<u8> {
    let raw = img.with_extension("check.raw");
    let raw_s = raw.to_str().unwrap();
    tool_ok(
        "qemu-img",
        &["convert", "-O", "raw", img.to_str().unwrap(), raw_s],
    );
    let out = tool_ok("debugfs", &["-R", &format!("cat {file}"), raw_s]);
    out.stdout
}

/// `ember ARGS` that may wait for the guest up to `STEP_LIMIT`, asserted to succeed; its
/// stdout.
fn ember_waiting(h: &Host, args: &[&str]) -> String {
    let mut cmd = h.ember();
    cmd.args(args);
    let r = run(cmd, STEP_LIMIT);
    assert_eq!(
        r.code(),
        Some(0),
        "ember {args:?}: {}{}",
        r.stdout,
        r.stderr
    );
    r.stdout
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

#[test]
fn linux_takes_a_hotplugged_disk_and_nic_and_gives_them_back() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let h = Host::new();
    let img = ext4_qcow2(h.path());
    let ns = Netns::with_tap();
    let mut g = start(&h, &ns, &kit);
    g.expect("EMBER-HP ready", BOOT_LIMIT);

    // A disk appears.
    let t = Instant::now();
    let said = h.ok(&["attach-disk", NAME, img.to_str().unwrap()]);
    let command_ms = t.elapsed().as_millis();
    assert!(said.stdout.contains("disk vda attached"), "{said:?}");
    g.expect("EMBER-HP disk-seen vda", STEP_LIMIT);
    let seen_ms = t.elapsed().as_millis();
    let list = h.ok(&["domblklist", NAME]).stdout;
    assert!(list.contains("hot.qcow2"), "{list}");
    let rw = g.expect("EMBER-HP disk-rw", STEP_LIMIT);
    assert_eq!(field(&rw, "hello="), "hello-from-the-host", "{rw}");
    assert_eq!(field(&rw, "wrote="), field(&rw, "read="), "{rw}");

    // It goes once the guest released it; the image is clean and holds the guest's file.
    let t = Instant::now();
    let said = ember_waiting(&h, &["detach-disk", NAME, "vda", "--timeout", "240"]);
    let detach_ms = t.elapsed().as_millis();
    assert!(said.contains("disk vda detached"), "{said}");
    g.expect("EMBER-HP disk-gone", STEP_LIMIT);
    let list = h.ok(&["domblklist", NAME]).stdout;
    assert!(!list.contains("hot.qcow2"), "{list}");
    assert_qemu_img_clean(&img);
    let written = file_in_image(&img, "/guest.txt");
    assert_eq!(md5_hex(&written), field(&rw, "wrote="));

    // A NIC appears, the guest pings the host through it, and it goes.
    let t = Instant::now();
    let said = h.ok(&[
        "attach-interface",
        NAME,
        "--type",
        "tap",
        "--source",
        "tap0",
    ]);
    assert!(said.stdout.contains("interface eth0 attached"), "{said:?}");
    g.expect("EMBER-HP nic-seen eth0", STEP_LIMIT);
    let nic_ms = t.elapsed().as_millis();
    let ping = g.expect("EMBER-HP ping", STEP_LIMIT);
    assert!(ping.contains("ok"), "{ping}");
    let iflist = h.ok(&["domiflist", NAME]).stdout;
    let mac = iflist
        .lines()
        .find(|l| l.contains("tap0"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("no tap0 NIC in:\n{iflist}"))
        .to_string();
    let said = ember_waiting(
        &h,
        &["detach-interface", NAME, "--mac", &mac, "--timeout", "240"],
    );
    assert!(said.contains("interface eth0 detached"), "{said}");
    g.expect("EMBER-HP nic-gone", STEP_LIMIT);
    assert!(!h.ok(&["domiflist", NAME]).stdout.contains("tap0"));

    // A disk the guest ejects itself (sysfs slot power off): it goes from the VM too.
    let second = h.path().join("second.raw");
    std::fs::write(&second, vec![0u8; 1 << 20]).unwrap();
    let said = h.ok(&["attach-disk", NAME, second.to_str().unwrap()]);
    assert!(said.stdout.contains("disk vda attached"), "{said:?}");
    let line = g.expect("EMBER-HP self-eject", STEP_LIMIT);
    assert!(!line.contains("slot=none"), "{line}");
    assert!(
        common::vm::wait_until(Duration::from_secs(10), || {
            !h.ok(&["domblklist", NAME]).stdout.contains("second.raw")
        }),
        "the guest ejected the disk ({line}) but the VM still lists it"
    );

    let status = wait_deadline(&mut g.child, STEP_LIMIT).expect("the guest powers off");
    assert_eq!(status.code(), Some(0));
    println!(
        "HOTPLUG-LATENCY attach-disk command_ms={command_ms} guest_sees_ms={seen_ms} \
         detach-disk_ms={detach_ms} attach-interface_guest_sees_ms={nic_ms}"
    );
}
