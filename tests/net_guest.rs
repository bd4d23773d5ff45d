//! Linux guests (guest kit) on virtio-net, inside network namespaces these tests create and
//! remove: a guest on a tap reaches the host, moves data both ways and sees its link go down
//! and up; two guests on a NAT network made by `ember net` get a DHCP lease and reach each
//! other. Needs root, /dev/kvm, the guest kit, iproute2, iptables and dnsmasq.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const BOOT_LIMIT: Duration = Duration::from_secs(900);
const FLAGS: &str = "console=ttyS0 quiet tsc=reliable no_timer_check";

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("ember-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
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

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    fn sh(&self, script: &str) {
        let out = self.cmd("sh").args(["-c", script]).output().unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens live there).
    fn thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only, with a namespace file we hold open.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns");
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Starts ember in `ns`; its stdout lines arrive on the returned channel.
fn start_guest(
    ns: &Netns,
    kit: &GuestKit,
    args: &[&str],
    cmdline: &str,
    state_dir: Option<&std::path::Path>,
) -> (Child, mpsc::Receiver<String>) {
    let mut cmd = ns.cmd(env!("CARGO_BIN_EXE_ember"));
    if let Some(dir) = state_dir {
        cmd.env("EMBER_STATE_DIR", dir);
    }
    let mut child = cmd
        .args(["run", "--kernel"])
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initramfs)
        .args(["--memory", "128M"])
        .args(args)
        .arg("--cmdline")
        .arg(format!("{FLAGS} {cmdline}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for a line containing `what`; returns it. Fails with everything seen on timeout.
fn expect(rx: &mpsc::Receiver<String>, what: &str, seen: &mut Vec<String>) -> String {
    let end = Instant::now() + BOOT_LIMIT;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if line.contains(what) {
                    return line;
                }
            }
            Err(_) => panic!(
                "no '{what}' from the guest; it printed:\n{}",
                seen.join("\n")
            ),
        }
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

#[test]
fn tap_guest_pings_moves_data_both_ways_and_sees_link_changes() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let ns = Netns::new("tap");
    ns.sh("ip tuntap add dev tap0 mode tap && ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up");
    let to_guest: Vec<u8> = (0..(3 << 20) + 12345)
        .map(|i: u32| (i * 7 + i / 251) as u8)
        .collect();
    let to_guest_md5 = md5_hex(&to_guest);
    let sender = ns.thread(move || {
        let l = TcpListener::bind("10.0.2.1:5001").unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&to_guest).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    });
    let receiver = ns.thread(|| {
        let l = TcpListener::bind("10.0.2.1:5002").unwrap();
        let (mut s, _): (TcpStream, _) = l.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let (mut child, rx) = start_guest(
        &ns,
        &kit,
        &["--net", "tap=tap0", "--name", "tap-test"],
        "ember.ip=10.0.2.2/24 ember.peer=10.0.2.1 ember.run=net-static,net-ping,net-xfer,net-link ember.end=poweroff",
        None,
    );
    let mut seen = Vec::new();
    let net = expect(&rx, "EMBER-NET", &mut seen);
    let mac = field(&net, "mac=").to_string();
    assert!(mac.starts_with("52:54:00:"), "{net}");
    let ping = expect(&rx, "EMBER-PING", &mut seen);
    assert!(ping.contains("EMBER-PING ok"), "{ping}");
    let incoming = expect(&rx, "EMBER-XFER in", &mut seen);
    assert_eq!(field(&incoming, "md5="), to_guest_md5, "host -> guest");
    let outgoing = expect(&rx, "EMBER-XFER out", &mut seen);
    let got = receiver.join().unwrap();
    assert_eq!(got.len().to_string(), field(&outgoing, "bytes="));
    assert_eq!(md5_hex(&got), field(&outgoing, "md5="), "guest -> host");
    sender.join().unwrap();
    let watching = expect(&rx, "EMBER-LINK watching", &mut seen);
    assert!(watching.ends_with("carrier=1"), "{watching}");
    ns.sh("ip link set tap0 down");
    expect(&rx, "EMBER-LINK carrier=0", &mut seen);
    ns.sh("ip link set tap0 up");
    expect(&rx, "EMBER-LINK carrier=1", &mut seen);
    let status = wait_deadline(&mut child, BOOT_LIMIT).expect("the guest powers off");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn two_guests_on_a_nat_network_get_a_lease_and_reach_each_other() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let ns = Netns::new("nat");
    let state = tempfile::tempdir().unwrap();
    let ember_net = |args: &[&str]| {
        let out = ns
            .cmd(env!("CARGO_BIN_EXE_ember"))
            .arg("net")
            .args(args)
            .env("EMBER_STATE_DIR", state.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ember net {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ember_net(&[
        "create",
        "lab",
        "--mode",
        "nat",
        "--subnet",
        "192.168.77.0/24",
        "--dhcp",
    ]);
    let list = ember_net(&["list"]);
    assert!(
        list.contains("lab") && list.contains("192.168.77.0/24") && list.contains("active"),
        "{list}"
    );

    let (mut a, rx_a) = start_guest(
        &ns,
        &kit,
        &["--net", "network=lab", "--name", "guest-a"],
        "ember.ip=192.168.77.10/24 ember.run=net-static ember.end=shell",
        Some(state.path()),
    );
    let (mut b, rx_b) = start_guest(
        &ns,
        &kit,
        &["--net", "network=lab", "--name", "guest-b"],
        "ember.peer=192.168.77.10 ember.run=net-dhcp,net-ping ember.end=poweroff",
        Some(state.path()),
    );
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    let net_a = expect(&rx_a, "EMBER-NET", &mut seen_a);
    let lease = expect(&rx_b, "EMBER-DHCP", &mut seen_b);
    let ip = field(&lease, "ip=");
    assert!(ip.starts_with("192.168.77."), "{lease}");
    assert!(
        field(&lease, "router=").starts_with("192.168.77.1"),
        "{lease}"
    );
    let ping = expect(&rx_b, "EMBER-PING", &mut seen_b);
    assert!(ping.contains("EMBER-PING ok"), "{ping}");
    assert_eq!(wait_deadline(&mut b, BOOT_LIMIT).unwrap().code(), Some(0));
    signal(&a, libc::SIGTERM);
    wait_deadline(&mut a, BOOT_LIMIT).unwrap();
    // Distinct MACs from distinct names; the lease is in dnsmasq's file.
    assert_ne!(field(&net_a, "mac="), "");
    let leases = std::fs::read_to_string(state.path().join("networks/lab.leases")).unwrap();
    assert!(leases.contains(ip), "{leases}");
    ember_net(&["destroy", "lab"]);
    let gone = ns.cmd("ip").args(["link", "show", "lab"]).output().unwrap();
    assert!(!gone.status.success(), "the bridge is still there");
    assert!(!ember_net(&["list"]).contains("lab"));
}
