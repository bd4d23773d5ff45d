//! A defined Linux guest's life through the verbs, in one boot (Linux boots take a minute or
//! more where guest kernel code is emulated): `define`, `start`, `console` into the guest's
//! shell, `shutdown` through the ACPI power button. Needs /dev/kvm and the guest kit
//! (tests/guest/build.sh).

mod common;

use std::io::{Read, Seek, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::vm::{alive, unique, wait_until, Host};
use common::{guest_kit, heavy_boot_lock, require_kvm, wait_deadline};

/// Reaching init takes ~50-90 s here; several times that on a host busy with other guests.
const BOOT: Duration = Duration::from_secs(600);

/// `ember console NAME` with piped stdio; killed when dropped.
struct Console {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Console {
    fn attach(h: &Host, name: &str) -> Console {
        let mut child = h
            .ember()
            .args(["console", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut from = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let into = out.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 1024];
            while let Ok(n) = from.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                into.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Console { child, stdin, out }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Types `line` and a newline until `want` shows up after it (the guest may drop input
    /// that arrives while its shell is not reading yet); fails the test after `limit`.
    fn run(&mut self, line: &str, want: &str, limit: Duration) {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            let before = self.text().len();
            self.stdin
                .write_all(format!("{line}\n").as_bytes())
                .unwrap();
            self.stdin.flush().unwrap();
            if wait_until(Duration::from_secs(20), || {
                self.text()[before..].contains(want)
            }) {
                return;
            }
        }
        panic!("'{line}' did not print '{want}'; console:\n{}", self.text());
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_defined_linux_guest_starts_takes_console_input_and_shuts_down_on_the_power_button() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let h = Host::new();
    let name = unique("lx");
    let def = h.path().join("lx.toml");
    let text = format!(
        "name = \"{name}\"\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory = \"128M\"\n\
         cmdline = \"console=ttyS0 quiet tsc=reliable\"\n",
        kit.vmlinux.display(),
        kit.initramfs.display()
    );
    std::fs::write(&def, text).unwrap();

    h.ok(&["define", def.to_str().unwrap()]);
    let started = h.ok(&["start", &name]);
    assert_eq!(started.stdout.trim(), name);
    let pid = h.pid_of(&name).expect("a started VM has a pid");
    let boot = Instant::now();
    h.wait_console(&name, "ember-guest: init reached", BOOT);
    eprintln!("init reached after {:?}", boot.elapsed());
    // The init starts its input watchers and the shell after this line.
    std::thread::sleep(Duration::from_secs(5));

    let mut console = Console::attach(&h, &name);
    let typed = Instant::now();
    console.run("echo hi-$((6*7))", "hi-42", Duration::from_secs(180));
    eprintln!("the shell answered after {:?}", typed.elapsed());
    console.stdin.write_all(&[0x1d]).unwrap();
    console.stdin.flush().unwrap();
    let detached = wait_deadline(&mut console.child, Duration::from_secs(10));
    assert_eq!(detached.and_then(|s| s.code()), Some(0), "Ctrl-] detaches");
    assert_eq!(h.state_of(&name).as_deref(), Some("running"));

    // The state directory (and its console log) goes with the VM: keep the log open.
    let mut log = std::fs::File::open(h.vm_dir(&name).join("console.log")).unwrap();
    let asked = Instant::now();
    let shutdown = h.say(&["shutdown", &name, "--timeout", "60"]);
    eprintln!("shut off after {:?}", asked.elapsed());
    let mut seen = String::new();
    log.rewind().unwrap();
    log.read_to_string(&mut seen).unwrap();

    assert_eq!(shutdown.code, Some(0), "{shutdown:?}\nconsole:\n{seen}");
    assert_eq!(shutdown.stdout.trim(), format!("VM {name} is shut off"));
    assert!(
        seen.contains("ember-guest: power button"),
        "console:\n{seen}"
    );
    assert!(!alive(pid), "the VM's process is still there");
    assert!(!h.vm_dir(&name).exists());
    assert_eq!(h.state_of(&name).as_deref(), Some("shut off"));
    h.ok(&["undefine", &name]);
}
