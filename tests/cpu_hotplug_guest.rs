//! `ember setvcpus` with a Linux guest (the guest kit), in one boot with `--cpus
//! boot=1,max=2`: setvcpus 2 and the guest brings CPU 1 online by itself (its init onlines
//! hot-added CPUs), `vcpuinfo` shows two vCPUs; `ember save` and `restore` keep both, online;
//! setvcpus 1 and the guest offlines and ejects CPU 1, `vcpuinfo` shows one; setvcpus 2 again
//! plugs the same vCPU back in. The guest's online CPUs are read from
//! /sys/devices/system/cpu/online through the serial console. Runs under the default seccomp
//! filters. Needs /dev/kvm and the guest kit.

mod common;

use std::io::Write;
use std::process::{Child, ChildStdin, Stdio};
use std::time::{Duration, Instant};

use common::vm::{unique, wait_until, Host};
use common::{guest_kit, heavy_boot_lock, require_kvm};

/// Booting and starting a CPU take minutes where guest kernel code is emulated, more on a
/// loaded machine.
const BOOT_LIMIT: Duration = Duration::from_secs(900);
const STEP_LIMIT: Duration = Duration::from_secs(300);
const FLAGS: &str = "console=ttyS0 quiet tsc=reliable no_timer_check";

/// The VM's console: typed into through `ember console`, read from its console log.
struct Console<'a> {
    host: &'a Host,
    name: String,
    client: Child,
    input: ChildStdin,
    polls: u32,
}

impl<'a> Console<'a> {
    fn attach(host: &'a Host, name: &str) -> Self {
        let mut client = host
            .ember()
            .args(["console", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let input = client.stdin.take().unwrap();
        Console {
            host,
            name: name.to_string(),
            client,
            input,
            polls: 0,
        }
    }

    fn log(&self) -> String {
        self.host.console_log(&self.name).replace('\r', "")
    }

    /// Waits until the log holds `text`; returns when it saw it.
    fn expect(&self, text: &str, limit: Duration) -> Instant {
        let mut log = String::new();
        let seen = wait_until(limit, || {
            log = self.log();
            log.contains(text)
        });
        assert!(seen, "no '{text}' within {limit:?}; console log:\n{log}");
        Instant::now()
    }

    /// How many times `text` is in the log.
    fn count(&self, text: &str) -> usize {
        self.log().matches(text).count()
    }

    /// The guest's online CPUs (`0`, `0-1`), asked until it answers `want` or `limit`
    /// passes. The answer's marker is a `$((..))` sum so the echo of the typed line never
    /// matches.
    fn online_cpus(&mut self, want: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            self.polls += 1;
            let n = self.polls;
            let line = format!(
                "read -r o </sys/devices/system/cpu/online; echo \"ONLINE-$((1000+{n})) $o\""
            );
            writeln!(self.input, "{line}").unwrap();
            self.input.flush().unwrap();
            let marker = format!("ONLINE-{} ", 1000 + n);
            let mut answer = None;
            wait_until(Duration::from_secs(20), || {
                let log = self.log();
                answer = log
                    .find(&marker)
                    .and_then(|at| log[at + marker.len()..].lines().next())
                    .map(|s| s.trim().to_string());
                answer.is_some()
            });
            if let Some(a) = answer {
                if a == want || Instant::now() > end {
                    return a;
                }
            } else {
                assert!(Instant::now() < end, "the guest shell does not answer");
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

impl Drop for Console<'_> {
    fn drop(&mut self) {
        let _ = self.client.kill();
        let _ = self.client.wait();
    }
}

/// The vCPU indexes `ember vcpuinfo` lists.
fn vcpus(h: &Host, name: &str) -> Vec<u32> {
    common::vcpuinfo_ids(&h.ok(&["vcpuinfo", name]).stdout)
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[test]
fn setvcpus_plugs_a_cpu_the_linux_guest_brings_online_and_takes_it_back() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let h = Host::new();
    let name = unique("cpuhp-linux");
    let started = Instant::now();
    h.ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--kernel",
        kit.vmlinux.to_str().unwrap(),
        "--initrd",
        kit.initramfs.to_str().unwrap(),
        "--memory",
        "128M",
        "--cpus",
        "boot=1,max=2",
        "--cmdline",
        FLAGS,
    ]);
    let mut con = Console::attach(&h, &name);
    con.expect("ember-guest: init reached", BOOT_LIMIT);
    assert_eq!(con.online_cpus("0", STEP_LIMIT), "0");
    eprintln!("cpu hotplug: boot to a shell {}", secs(started.elapsed()));

    // Plug: the guest's init onlines the new CPU without being told.
    let asked = Instant::now();
    h.ok(&["setvcpus", &name, "2"]);
    assert_eq!(vcpus(&h, &name), [0, 1]);
    let online_at = con.expect("ember-guest: cpu 1 online", STEP_LIMIT);
    let plug = online_at - asked;
    assert_eq!(con.online_cpus("0-1", STEP_LIMIT), "0-1");
    eprintln!(
        "cpu hotplug: setvcpus 2 -> CPU 1 online in the guest {}",
        secs(plug)
    );

    // A save and restore keeps both vCPUs, the second one online.
    let t = Instant::now();
    let file = h.path().join("two.state");
    h.ok(&["save", &name, file.to_str().unwrap()]);
    drop(con);
    h.ok(&["restore", file.to_str().unwrap()]);
    let mut con = Console::attach(&h, &name);
    assert_eq!(vcpus(&h, &name), [0, 1]);
    assert_eq!(con.online_cpus("0-1", STEP_LIMIT), "0-1");
    eprintln!(
        "cpu hotplug: save + restore with 2 vCPUs {}",
        secs(t.elapsed())
    );

    // Unplug: the guest offlines and ejects CPU 1; its vCPU thread ends.
    let asked = Instant::now();
    let s = h.ok(&["setvcpus", &name, "1"]);
    assert!(s.stdout.contains("give back 1"), "{s:?}");
    let gone = wait_until(STEP_LIMIT, || vcpus(&h, &name) == [0]);
    assert!(gone, "vCPU 1 still present: {:?}", vcpus(&h, &name));
    let unplug = asked.elapsed();
    assert_eq!(con.online_cpus("0", STEP_LIMIT), "0");
    let info = h.ok(&["dominfo", &name]).stdout;
    assert!(
        info.lines()
            .any(|l| l.starts_with("CPU(s):") && l.ends_with(" 1")),
        "{info}"
    );
    eprintln!("cpu hotplug: setvcpus 1 -> CPU 1 ejected {}", secs(unplug));

    // Plug again: the vCPU kept from the eject comes back.
    let before = con.count("ember-guest: cpu 1 online");
    let asked = Instant::now();
    h.ok(&["setvcpus", &name, "2"]);
    let again = wait_until(STEP_LIMIT, || {
        con.count("ember-guest: cpu 1 online") > before
    });
    assert!(again, "CPU 1 did not come online again:\n{}", con.log());
    let replug = asked.elapsed();
    assert_eq!(con.online_cpus("0-1", STEP_LIMIT), "0-1");
    assert_eq!(vcpus(&h, &name), [0, 1]);
    eprintln!(
        "cpu hotplug: setvcpus 2 again -> CPU 1 online {}",
        secs(replug)
    );
    eprintln!("cpu hotplug: all phases {}", secs(started.elapsed()));
    h.ok(&["destroy", &name]);
}
