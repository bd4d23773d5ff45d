//! A VM's life through the virsh-style verbs, with the tiny test kernel: `run -d`, `list`,
//! `dominfo`, `suspend`/`resume`, `console` (replay, input, Ctrl-], takeover), `reset`,
//! `destroy`, `shutdown`, names in use and stale state, and definitions (`define`,
//! `dumpconfig`, `edit`, `autostart`, `start`, `undefine`). Each test has its own state and
//! definitions directories and kills what it started, even when it fails. Needs /dev/kvm.

mod common;
#[path = "../examples/tiny_kernel/guest.rs"]
mod guest;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::vm::{alive, cpu_ticks, unique, wait_until, Host};
use common::{require_kvm, wait_deadline};

/// How long anything the tiny kernel does may take here (emulated guest code, a busy host).
const SOON: Duration = Duration::from_secs(15);

fn host() -> (Host, PathBuf) {
    require_kvm();
    let h = Host::new();
    let k = h.kernel(&guest::elf_image());
    (h, k)
}

/// The `tick N` numbers in a console log, in order.
fn ticks(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .collect()
}

#[test]
fn a_detached_vm_is_listed_running_and_dominfo_describes_it() {
    let (h, k) = host();
    let name = unique("lc-info");
    let pid = h.run_tiny(&name, &k, "idle");

    let rows = h.list(&[]);
    let info = h.ok(&["dominfo", &name]).stdout;

    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (
            rows[0].id.as_str(),
            rows[0].name.as_str(),
            rows[0].state.as_str()
        ),
        (pid.to_string().as_str(), name.as_str(), "running")
    );
    let field = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {key} in dominfo:\n{info}"))
            .to_string()
    };
    assert_eq!(field("Id"), pid.to_string());
    assert_eq!(field("Name"), name);
    assert_eq!(field("State"), "running");
    assert_eq!(field("CPU(s)"), "1");
    assert_eq!(field("Memory"), "16 MiB");
    assert_eq!(field("Kernel"), k.display().to_string());
    assert_eq!(field("Console"), "log");
    let sock = h.vm_dir(&name).join("api.sock");
    assert_eq!(field("API socket"), sock.display().to_string());
    assert_eq!(field("Persistent"), "no");
    assert_eq!(field("Autostart"), "disable");
    assert!(info.contains("serial0"), "{info}");
}

#[test]
fn destroy_ends_the_process_and_removes_its_state() {
    let (h, k) = host();
    let name = unique("lc-destroy");
    let pid = h.run_tiny(&name, &k, "idle");
    assert!(h.vm_dir(&name).is_dir());

    let s = h.ok(&["destroy", &name]);

    assert_eq!(s.stdout.trim(), format!("VM {name} destroyed"));
    assert!(
        wait_until(SOON, || !alive(pid)),
        "pid {pid} still runs after destroy"
    );
    assert!(!h.vm_dir(&name).exists(), "the state directory is left");
    assert_eq!(h.list(&[]), vec![]);
}

#[test]
fn suspend_stops_ticks_and_cpu_and_resume_goes_on_from_the_next_tick() {
    let (h, k) = host();
    let name = unique("lc-pause");
    let pid = h.run_tiny(&name, &k, "count");
    h.wait_console(&name, "tick 3\n", SOON);

    h.ok(&["suspend", &name]);
    let at_pause = h.console_log(&name);
    let cpu_before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let cpu_used = cpu_ticks(pid) - cpu_before;
    let after_a_second = h.console_log(&name);
    let listed = h.state_of(&name);

    assert_eq!(at_pause, after_a_second, "the guest printed while paused");
    // Clock ticks are 10 ms; the running `count` guest uses ~100 a second.
    assert!(
        cpu_used <= 3,
        "a paused VM used {cpu_used} clock ticks of CPU in 1 s"
    );
    assert_eq!(listed.as_deref(), Some("paused"));

    let last = *ticks(&at_pause).last().expect("ticks before the pause");
    h.ok(&["resume", &name]);
    let log = h.wait_console(&name, &format!("tick {}\n", last + 3), SOON);
    let seen = ticks(&log);
    let expected: Vec<u32> = (1..=seen.len() as u32).collect();
    assert_eq!(seen, expected, "ticks restarted, skipped or repeated");
    assert_eq!(log.matches("tiny: hello").count(), 1, "the guest restarted");
    assert_eq!(h.state_of(&name).as_deref(), Some("running"));
}

/// An `ember console NAME` client with piped stdio, collecting what it prints.
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

/// Collects what `from` gives until it ends.
fn collect(mut from: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let into = buf.clone();
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 1024];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (buf, reader)
}

impl Client {
    fn attach(h: &Host, name: &str, force: bool) -> Client {
        let mut cmd = h.ember();
        cmd.arg("console").arg(name);
        if force {
            cmd.arg("--force");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let (out, out_reader) = collect(child.stdout.take().unwrap());
        let (err, err_reader) = collect(child.stderr.take().unwrap());
        Client {
            child,
            stdin,
            out,
            err,
            readers: vec![out_reader, err_reader],
        }
    }

    fn out(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn err(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits until the client printed `text`.
    fn expect(&self, text: &str) {
        assert!(
            wait_until(SOON, || self.out().contains(text)),
            "the console client did not print '{text}'; it printed:\n{}\nstderr:\n{}",
            self.out(),
            self.err()
        );
    }

    /// Waits for the client to end; its exit status (fails the test, saying what the
    /// client printed, if it does not end or ends with another status than `want`).
    fn end(&mut self, want: i32) {
        let status = wait_deadline(&mut self.child, SOON);
        if status.is_some() {
            // Everything it printed is read once its pipes end.
            self.readers.drain(..).for_each(|r| r.join().unwrap());
        }
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(want),
            "console client ended with {status:?}; stdout:\n{}\nstderr:\n{}",
            self.out(),
            self.err()
        );
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn console_replays_carries_input_detaches_on_ctrl_bracket_and_reattaches() {
    let (h, k) = host();
    let name = unique("lc-console");
    h.run_tiny(&name, &k, "echo");
    h.wait_console(&name, "echo until q", SOON);

    let mut first = Client::attach(&h, &name, false);
    first.expect("tiny: echo until q"); // replayed
    first.send(b"lc-one ");
    first.expect("lc-one ");
    first.send(&[0x1d]);
    first.end(0);

    assert!(first.err().contains("Detached"), "{}", first.err());
    assert_eq!(h.state_of(&name).as_deref(), Some("running"));

    let mut again = Client::attach(&h, &name, false);
    again.expect("lc-one "); // the replay has what was typed before
    again.send(b"lc-two ");
    again.expect("lc-two ");
    again.send(&[0x1d]);
    again.end(0);
    assert!(h.console_log(&name).contains("lc-one lc-two "));
}

#[test]
fn a_second_console_is_refused_unless_forced_and_then_the_first_is_told() {
    let (h, k) = host();
    let name = unique("lc-takeover");
    h.run_tiny(&name, &k, "echo");
    h.wait_console(&name, "echo until q", SOON);
    let mut first = Client::attach(&h, &name, false);
    first.expect("echo until q");

    let refused = h.say(&["console", &name]);

    assert_eq!(refused.code, Some(2), "{refused:?}");
    let lines: Vec<&str> = refused.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{refused:?}");
    assert!(
        lines[0].contains("in use") && lines[0].contains("--force"),
        "{refused:?}"
    );

    let mut second = Client::attach(&h, &name, true);
    second.expect("echo until q");
    first.expect("another client took over the console");
    first.end(0);
    second.send(b"lc-forced ");
    second.expect("lc-forced ");
    second.send(&[0x1d]);
    second.end(0);
    assert_eq!(h.state_of(&name).as_deref(), Some("running"));
}

#[test]
fn reset_boots_the_guest_again_in_the_same_process() {
    let (h, k) = host();
    let name = unique("lc-reset");
    let pid = h.run_tiny(&name, &k, "idle");
    h.wait_console(&name, "tiny: idle", SOON);

    let s = h.ok(&["reset", &name]);

    assert_eq!(s.stdout.trim(), format!("VM {name} was reset"));
    let found = wait_until(SOON, || {
        h.console_log(&name).matches("tiny: idle").count() == 2
    });
    let log = h.console_log(&name);
    assert!(found, "the guest did not start again:\n{log}");
    assert_eq!(log.matches("tiny: hello").count(), 2, "{log}");
    assert_eq!(h.pid_of(&name), Some(pid), "a reset keeps the process");
    assert_eq!(h.state_of(&name).as_deref(), Some("running"));
}

#[test]
fn a_name_in_use_is_refused_with_one_line_naming_it() {
    let (h, k) = host();
    let name = unique("lc-taken");
    let pid = h.run_tiny(&name, &k, "idle");
    let kernel = k.to_str().unwrap();
    let args = ["--name", &name, "--kernel", kernel, "--memory", "16M"];

    for detach in [true, false] {
        let mut all = vec!["run"];
        if detach {
            all.push("-d");
        }
        all.extend_from_slice(&args);
        let s = h.say(&all);

        assert_eq!(s.code, Some(2), "detach {detach}: {s:?}");
        let lines: Vec<&str> = s.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "detach {detach}: {s:?}");
        assert!(
            lines[0].contains(&format!("'{name}'")) && lines[0].contains("already running"),
            "{s:?}"
        );
    }
    assert_eq!(h.pid_of(&name), Some(pid), "the running VM is untouched");
    assert_eq!(h.list(&[]).len(), 1);
}

#[test]
fn state_left_by_a_killed_vm_is_cleaned_and_its_name_reused() {
    let (h, k) = host();
    let name = unique("lc-stale");
    let pid = h.run_tiny(&name, &k, "idle");
    // SAFETY: kill(2) on the VM's process id; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    assert!(
        wait_until(SOON, || !alive(pid)),
        "pid {pid} survived SIGKILL"
    );
    assert!(
        h.vm_dir(&name).join("pid").exists(),
        "SIGKILL leaves the state"
    );

    let rows = h.list(&[]);

    assert_eq!(rows, vec![], "a dead VM is listed");
    assert!(!h.vm_dir(&name).exists(), "the stale directory is left");
    let again = h.run_tiny(&name, &k, "idle");
    assert_ne!(again, pid);
    assert_eq!(h.state_of(&name).as_deref(), Some("running"));
}

#[test]
fn an_unknown_name_is_one_line_naming_it_and_list_all() {
    require_kvm();
    let h = Host::new();
    let name = unique("lc-nosuch");
    for verb in [
        "dominfo",
        "suspend",
        "resume",
        "shutdown",
        "reboot",
        "reset",
        "destroy",
        "console",
        "domstats",
        "vcpuinfo",
        "domblklist",
        "domiflist",
        "dumpconfig",
        "undefine",
        "edit",
        "autostart",
        "start",
    ] {
        let s = h.say(&[verb, &name]);

        assert_eq!(s.code, Some(2), "{verb}: {s:?}");
        let lines: Vec<&str> = s.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{verb}: {s:?}");
        assert!(
            lines[0].contains(&format!("'{name}'")) && lines[0].contains("ember list --all"),
            "{verb}: {s:?}"
        );
        assert!(s.stdout.is_empty(), "{verb}: {s:?}");
    }
}

#[test]
fn shutdown_of_a_guest_that_ignores_it_says_so_and_fails() {
    let (h, k) = host();
    let name = unique("lc-ignore");
    h.run_tiny(&name, &k, "idle");
    h.wait_console(&name, "tiny: idle", SOON);

    // No ACPI driver in the tiny kernel: the power button is refused at once.
    let acpi = h.say(&["shutdown", &name, "--timeout", "2"]);
    // The i8042 takes Ctrl-Alt-Del, which the tiny kernel ignores: the wait runs out.
    let started = std::time::Instant::now();
    let cad = h.say(&[
        "shutdown",
        &name,
        "--mode",
        "ctrl-alt-del",
        "--timeout",
        "2",
    ]);
    let waited = started.elapsed();

    assert_ne!(acpi.code, Some(0), "{acpi:?}");
    assert_eq!(acpi.stderr.lines().count(), 1, "{acpi:?}");
    assert!(acpi.stderr.contains("ACPI power button"), "{acpi:?}");
    assert_eq!(cad.code, Some(1), "{cad:?}");
    assert_eq!(cad.stderr.lines().count(), 1, "{cad:?}");
    assert!(
        cad.stderr
            .contains(&format!("VM {name} is still running after 2 s")),
        "{cad:?}"
    );
    assert!(waited >= Duration::from_secs(2), "gave up after {waited:?}");
    assert_eq!(h.state_of(&name).as_deref(), Some("running"));
}

fn define(h: &Host, name: &str, kernel: &std::path::Path, memory: &str) -> PathBuf {
    let file = h.path().join(format!("{name}.toml"));
    let text = format!(
        "name = \"{name}\"\nkernel = \"{}\"\nmemory = \"{memory}\"\ncmdline = \"idle\"\n",
        kernel.display()
    );
    std::fs::write(&file, text).unwrap();
    file
}

/// An $EDITOR that runs `script` on the file it is given.
fn editor(h: &Host, script: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = h.path().join("editor.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

fn edit(h: &Host, name: &str, script: &str) -> common::vm::Said {
    let mut cmd = h.ember();
    cmd.args(["edit", name])
        .env_remove("VISUAL")
        .env("EDITOR", editor(h, script));
    common::vm::Said::from(cmd.output().unwrap())
}

#[test]
fn define_dumpconfig_edit_autostart_start_and_undefine_round_trip() {
    let (h, k) = host();
    let name = unique("lc-def");
    let file = define(&h, &name, &k, "16M");

    h.ok(&["define", file.to_str().unwrap()]);
    assert_eq!(h.state_of(&name).as_deref(), Some("shut off"));
    let dumped = h.ok(&["dumpconfig", &name]).stdout;
    assert!(dumped.contains("memory = \"16M\""), "{dumped}");
    assert!(dumped.contains(&k.display().to_string()), "{dumped}");

    let edited = edit(
        &h,
        &name,
        "sed -i 's/^memory = .*/memory = \"32M\"/' \"$1\"",
    );
    assert_eq!(edited.code, Some(0), "{edited:?}");
    assert!(h
        .ok(&["dumpconfig", &name])
        .stdout
        .contains("memory = \"32M\""));
    let broken = edit(&h, &name, "echo 'memory = \"lots\"' >> \"$1\"");
    assert_eq!(broken.code, Some(2), "{broken:?}");
    assert!(broken.stderr.contains("unchanged"), "{broken:?}");
    assert!(h
        .ok(&["dumpconfig", &name])
        .stdout
        .contains("memory = \"32M\""));

    h.ok(&["autostart", &name]);
    let started = h.ok(&["start", "--autostart"]);
    assert_eq!(started.stdout.trim(), name);
    assert_eq!(h.state_of(&name).as_deref(), Some("running"));
    let info = h.ok(&["dominfo", &name]).stdout;
    for want in [
        "Memory:         32 MiB",
        "Persistent:     yes",
        "Autostart:      enable",
    ] {
        assert!(info.contains(want), "no '{want}' in:\n{info}");
    }
    let pid = h.pid_of(&name).unwrap();
    h.ok(&["start", "--autostart"]);
    assert_eq!(
        h.pid_of(&name),
        Some(pid),
        "a running VM is not started twice"
    );
    let twice = h.say(&["start", &name]);
    assert_eq!(twice.code, Some(2), "{twice:?}");
    assert!(twice.stderr.contains("already running"), "{twice:?}");

    h.ok(&["destroy", &name]);
    h.ok(&["autostart", &name, "--disable"]);
    h.ok(&["start", "--autostart"]);
    assert_eq!(h.state_of(&name).as_deref(), Some("shut off"));
    h.ok(&["start", &name]);
    assert_eq!(h.state_of(&name).as_deref(), Some("running"));
    h.ok(&["destroy", &name]);

    h.ok(&["undefine", &name]);
    assert_eq!(h.state_of(&name), None);
    assert_eq!(h.say(&["dumpconfig", &name]).code, Some(2));
}

#[test]
fn verbs_printing_into_a_closed_pipe_end_quietly() {
    require_kvm();
    let h = Host::new();
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two-element array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the read end is ours and closed once: every write to the pipe fails (EPIPE).
    unsafe { libc::close(fds[0]) };
    // SAFETY: the write end is ours; the File owns it from here.
    let write_end = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };

    let out = h
        .ember()
        .args(["list", "--all"])
        .stdout(write_end)
        .stderr(Stdio::piped())
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

#[test]
fn destroy_ends_a_vm_still_waiting_for_its_configuration() {
    require_kvm();
    let h = Host::new();
    let name = unique("lc-preboot");
    let sock = h.path().join("pre.sock");
    let mut child = h
        .ember()
        .args(["run", "--name", &name, "--api-sock"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(SOON, || h.state_of(&name).is_some()));
    assert_eq!(h.state_of(&name).as_deref(), Some("configuring"));

    let s = h.say(&["destroy", &name]);
    let ended = wait_deadline(&mut child, Duration::from_secs(5));

    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(s.code, Some(0), "{s:?}");
    assert!(ended.is_some(), "the VM process still runs after destroy");
    assert!(!h.vm_dir(&name).exists());
}
