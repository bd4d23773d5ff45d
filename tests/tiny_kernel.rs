//! The run loop end to end with the tiny test kernel (examples/tiny_kernel): serial output
//! and input, debug-exit status, i8042 reset, ACPI power-off, triple fault, CPUID, vCPU
//! threads, signals. Needs /dev/kvm; no Linux guest.

mod common;
#[path = "../examples/tiny_kernel/guest.rs"]
mod guest;

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

struct Tiny {
    _dir: tempfile::TempDir,
    kernel: std::path::PathBuf,
}

fn tiny() -> Tiny {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, guest::elf_image()).unwrap();
    Tiny { _dir: dir, kernel }
}

fn ember_tiny(t: &Tiny, cmdline: &str, extra: &[&str]) -> Command {
    let mut cmd = ember();
    cmd.args(["run", "--kernel"])
        .arg(&t.kernel)
        .args(["--memory", "16M", "--cmdline", cmdline])
        .args(extra);
    cmd
}

#[test]
fn banner_reaches_stdout_and_acpi_poweroff_exits_0() {
    let t = tiny();
    let r = run(ember_tiny(&t, "", &[]), LIMIT);
    assert_eq!(r.code(), Some(0), "{r:?}");
    assert!(
        r.stdout.contains("tiny: hello from the tiny kernel\n"),
        "{r:?}"
    );
    assert!(r.stdout.contains("tiny: powering off"), "{r:?}");
}

#[test]
fn the_pvh_entry_reads_its_command_line_from_the_start_info() {
    // The same code entered through its PVH note (32-bit, paging off, ebx = hvm_start_info):
    // it builds its own page tables and long mode, then parses the same words.
    let t = tiny();
    std::fs::write(&t.kernel, guest::pvh_elf_image()).unwrap();
    let r = run(ember_tiny(&t, "exit=16", &[]), LIMIT);
    assert_eq!(r.code(), Some(33), "{r:?}");
    assert!(
        r.stdout.contains("tiny: hello from the tiny kernel"),
        "{r:?}"
    );
    let r = run(ember_tiny(&t, "", &[]), LIMIT);
    assert_eq!(r.code(), Some(0), "{r:?}");
    assert!(r.stdout.contains("tiny: powering off"), "{r:?}");
}

#[test]
fn debug_exit_status_is_value_shifted_left_or_one() {
    let t = tiny();
    for (value, status) in [(0, 1), (16, 33), (100, 201)] {
        let r = run(ember_tiny(&t, &format!("exit={value}"), &[]), LIMIT);
        assert_eq!(r.code(), Some(status), "exit={value}: {r:?}");
    }
}

#[test]
fn debug_exit_off_leaves_the_port_unclaimed() {
    let t = tiny();
    let mut child = ember_tiny(&t, "exit=16", &["--debug-exit=off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_deadline(&mut child, Duration::from_secs(2)).is_none());
    signal(&child, libc::SIGTERM);
    let status = wait_deadline(&mut child, LIMIT).expect("exits on SIGTERM");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
}

#[test]
fn i8042_reset_exits_0_by_default() {
    let t = tiny();
    let r = run(ember_tiny(&t, "reboot", &[]), LIMIT);
    assert_eq!(r.code(), Some(0), "{r:?}");
    assert_eq!(r.stdout.matches("hello").count(), 1);
}

#[test]
fn reboot_restart_boots_the_guest_again() {
    let t = tiny();
    let mut child = ember_tiny(&t, "reboot", &["--reboot=restart"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let end = Instant::now() + LIMIT;
    let mut buf = [0u8; 256];
    while String::from_utf8_lossy(&seen).matches("hello").count() < 3 {
        assert!(Instant::now() < end, "no restarts seen");
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "output ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    signal(&child, libc::SIGTERM);
    assert_eq!(
        wait_deadline(&mut child, LIMIT).unwrap().code(),
        Some(128 + libc::SIGTERM)
    );
}

#[test]
fn triple_fault_is_one_line_with_rip_and_instruction_bytes() {
    let t = tiny();
    let r = run(ember_tiny(&t, "triple", &[]), LIMIT);
    assert_eq!(r.code(), Some(1), "{r:?}");
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("triple fault"))
        .unwrap_or_else(|| panic!("no triple fault line: {r:?}"));
    assert!(line.contains("vCPU 0 at RIP 0x"), "{line}");
    assert!(line.contains("long mode, CPL0"), "{line}");
    // The tiny kernel faults on ud2 (0f 0b).
    assert!(line.contains("instruction bytes: 0f 0b"), "{line}");
}

fn leaf1_ecx(stdout: &str) -> u32 {
    let hex = stdout
        .split("cpuid.1.ecx=")
        .nth(1)
        .unwrap_or_else(|| panic!("no cpuid line in {stdout}"));
    u32::from_str_radix(&hex[..8], 16).unwrap()
}

#[test]
fn cpu_features_edits_reach_the_guest_cpuid() {
    const CX16: u32 = 1 << 13;
    const HYPERVISOR: u32 = 1 << 31;
    let t = tiny();
    let hidden = run(ember_tiny(&t, "cpuid", &["--cpu-features=-cx16"]), LIMIT);
    assert_eq!(hidden.code(), Some(0), "{hidden:?}");
    let ecx = leaf1_ecx(&hidden.stdout);
    assert_eq!(ecx & CX16, 0, "cx16 still visible: {ecx:#x}");
    assert_ne!(ecx & HYPERVISOR, 0, "no hypervisor bit: {ecx:#x}");
    let shown = run(ember_tiny(&t, "cpuid", &["--cpu-features=+cx16"]), LIMIT);
    assert_eq!(shown.code(), Some(0), "{shown:?}");
    assert_ne!(leaf1_ecx(&shown.stdout) & CX16, 0);
}

#[test]
fn stdin_reaches_the_guest_in_order() {
    let t = tiny();
    let r = run_with_input(ember_tiny(&t, "echo", &[]), b"ember-echo-test q", LIMIT);
    assert_eq!(r.code(), Some(0), "{r:?}");
    assert!(r.stdout.contains("ember-echo-test "), "{r:?}");
}

#[test]
fn input_flood_is_delivered_whole_without_stalling_the_vmm() {
    let t = tiny();
    // Anything but 'q', which ends the guest's echo loop.
    let alphabet = b"0123456789abcdefghijklmnoprstuvwxyz";
    let input: Vec<u8> = (0..4000).map(|i| alphabet[i % alphabet.len()]).collect();
    let mut input = input;
    let expected = String::from_utf8(input.clone()).unwrap();
    input.push(b'q');
    let r = run_with_input(
        ember_tiny(&t, "echo", &[]),
        &input,
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(
        r.stdout.contains(&expected),
        "echo lost or reordered bytes ({} bytes out)",
        r.stdout.len()
    );
}

#[test]
fn serial_file_appends_and_stdout_stays_clean() {
    let t = tiny();
    let log = t._dir.path().join("console.log");
    let arg = format!("--serial=file={}", log.display());
    for _ in 0..2 {
        let r = run(ember_tiny(&t, "", &[&arg]), LIMIT);
        assert_eq!(r.code(), Some(0), "{r:?}");
        assert!(r.stdout.is_empty());
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("tiny: hello").count(), 2, "{text}");
}

#[test]
fn serial_pty_is_announced_and_carries_both_directions() {
    let t = tiny();
    let mut child = ember_tiny(&t, "echo", &["--serial", "pty"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut announced = Vec::new();
    let mut byte = [0u8; 1];
    while !announced.ends_with(b"\n") {
        assert_eq!(stderr.read(&mut byte).unwrap(), 1, "ember said nothing");
        announced.push(byte[0]);
    }
    let line = String::from_utf8(announced).unwrap();
    let path = line
        .trim()
        .strip_prefix("ember: serial console on ")
        .unwrap_or_else(|| panic!("unexpected: {line}"));
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    pty.write_all(b"via-pty q").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 128];
    while !String::from_utf8_lossy(&seen).contains("powering off") {
        let n = pty.read(&mut buf).unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.contains("tiny: hello") && text.contains("via-pty "),
        "{text}"
    );
    assert_eq!(wait_deadline(&mut child, LIMIT).unwrap().code(), Some(0));
}

/// Opens a pty pair: (master, slave).
fn openpty() -> (std::fs::File, std::fs::File) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors, checked below; no name/termios/winsize given.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors are fresh and owned by the returned files.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

#[test]
fn ctrl_bracket_on_a_terminal_leaves_and_stops_the_vm() {
    let t = tiny();
    let (mut master, slave) = openpty();
    let mut child = ember_tiny(&t, "echo", &[])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("echo until q") {
        let n = master.read(&mut buf).unwrap();
        seen.extend_from_slice(&buf[..n]);
    }
    master.write_all(b"xy\x1d").unwrap();
    let status = wait_deadline(&mut child, LIMIT).expect("ember left on Ctrl-]");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn each_vcpu_has_a_named_thread_and_sigusr1_reports_them() {
    let t = tiny();
    let mut child = ember_tiny(&t, "halt", &["--cpus", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let task_dir = format!("/proc/{}/task", child.id());
    let end = Instant::now() + LIMIT;
    let names = loop {
        let mut names: Vec<String> = std::fs::read_dir(&task_dir)
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("comm")).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| s.starts_with("vcpu"))
            .collect();
        names.sort();
        if names.len() == 3 || Instant::now() > end {
            break names;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(names, ["vcpu 0", "vcpu 1", "vcpu 2"]);
    std::thread::sleep(Duration::from_millis(500));
    signal(&child, libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(500));
    signal(&child, libc::SIGTERM);
    let status = wait_deadline(&mut child, LIMIT).unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(stderr.contains("vCPU 0: "), "{stderr}");
    assert!(stderr.contains("vCPU 2: waiting for INIT"), "{stderr}");
    assert!(stderr.contains("stopped by signal 15"), "{stderr}");
}

/// What [`timed_lines`] saw: ember's exit status, its stdout lines with the time each
/// arrived, and its stderr.
struct TimedRun {
    status: std::process::ExitStatus,
    lines: Vec<(Instant, String)>,
    stderr: String,
}

impl TimedRun {
    /// The `tick N` lines, in order, with their arrival times.
    fn ticks(&self) -> Vec<(Instant, &str)> {
        self.lines
            .iter()
            .filter(|(_, l)| l.starts_with("tick "))
            .map(|(t, l)| (*t, l.as_str()))
            .collect()
    }
}

/// Runs `cmd` and timestamps each stdout line as it arrives, until ember exits or
/// `on_line` (given ember's process and the line) returns true: then ember gets SIGTERM.
/// Fails the test after `limit`.
fn timed_lines(
    mut cmd: Command,
    mut on_line: impl FnMut(&std::process::Child, &str) -> bool,
    limit: Duration,
) -> TimedRun {
    use std::io::BufRead;
    use std::sync::mpsc::{channel, RecvTimeoutError};
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let end = Instant::now() + limit;
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let done = on_line(&child, &line.1);
                lines.push(line);
                if done {
                    signal(&child, libc::SIGTERM);
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ember did not finish within {limit:?}: {lines:?}");
            }
        }
    }
    let status = wait_deadline(&mut child, LIMIT).expect("ember exits");
    let stderr = err.join().unwrap();
    TimedRun {
        status,
        lines,
        stderr,
    }
}

fn tick_names(n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("tick {i}")).collect()
}

#[test]
fn count_n_prints_ticks_1_to_n_in_order_then_powers_off() {
    let t = tiny();
    let r = timed_lines(ember_tiny(&t, "count=5", &[]), |_, _| false, LIMIT);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    let ticks: Vec<&str> = r.ticks().iter().map(|(_, l)| *l).collect();
    assert_eq!(ticks, tick_names(5));
    assert_eq!(r.lines.last().unwrap().1, "tiny: powering off");
}

#[test]
fn ticks_are_about_100_ms_of_wall_time_apart() {
    let t = tiny();
    let r = timed_lines(ember_tiny(&t, "count=5", &[]), |_, _| false, LIMIT);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    let ticks = r.ticks();
    assert_eq!(ticks.len(), 5, "{:?}", r.lines);
    // Four periods of 100 ms; loose bounds: a sanity check, not a benchmark.
    let span = ticks[4].0 - ticks[0].0;
    assert!(
        span >= Duration::from_millis(300) && span <= Duration::from_secs(3),
        "tick 1 to tick 5 took {span:?}"
    );
}

#[test]
fn count_forever_with_dirty_memory_still_ticks_on_time() {
    let t = tiny();
    // dirty= before count: the kernel looks it up on the whole line.
    let r = timed_lines(
        ember_tiny(&t, "dirty=64 count", &[]),
        |_, l| l == "tick 4",
        LIMIT,
    );
    assert_eq!(r.status.code(), Some(128 + libc::SIGTERM), "{}", r.stderr);
    let ticks = r.ticks();
    let names: Vec<&str> = ticks.iter().map(|(_, l)| *l).collect();
    assert_eq!(names, tick_names(4));
    let span = ticks[3].0 - ticks[0].0;
    assert!(
        span >= Duration::from_millis(200) && span <= Duration::from_secs(3),
        "tick 1 to tick 4 took {span:?}"
    );
}

#[test]
fn count_goes_on_at_the_next_tick_after_the_vm_was_stopped() {
    let t = tiny();
    let mut resumed = None;
    // SIGSTOP freezes the VMM while the TSC runs on: the guest sees it jump by 1 s.
    let r = timed_lines(
        ember_tiny(&t, "count", &[]),
        |child, l| {
            if l == "tick 2" {
                signal(child, libc::SIGSTOP);
                std::thread::sleep(Duration::from_secs(1));
                resumed = Some(Instant::now());
                signal(child, libc::SIGCONT);
            }
            l == "tick 4"
        },
        LIMIT,
    );
    assert_eq!(r.status.code(), Some(128 + libc::SIGTERM), "{}", r.stderr);
    let ticks = r.ticks();
    let names: Vec<&str> = ticks.iter().map(|(_, l)| *l).collect();
    assert_eq!(names, tick_names(4), "no restart, skip or repeat");
    let resumed = resumed.unwrap();
    let first_after = ticks[2].0.saturating_duration_since(resumed);
    assert!(
        first_after < Duration::from_millis(500),
        "tick 3 came {first_after:?} after the VMM went on"
    );
    // A deadline taken from the TSC after the jump: no burst of catch-up ticks.
    let gap = ticks[3].0 - ticks[2].0;
    assert!(
        gap >= Duration::from_millis(50),
        "tick 3 to tick 4: {gap:?}"
    );
}

/// User plus system CPU time of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn idle_guest_costs_the_host_no_cpu() {
    let t = tiny();
    let mut child = ember_tiny(&t, "idle", &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("tiny: idle\n") {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "output ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(child.id()) - before;
    // Stopped before asserting, so a failure leaves no VM running.
    signal(&child, libc::SIGTERM);
    let status = wait_deadline(&mut child, LIMIT).expect("exits on SIGTERM");
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "idle guest stopped"
    );
    // Clock ticks are 10 ms: 2 s of a busy vCPU would be ~200.
    assert!(
        used <= 5,
        "ember used {used} clock ticks of CPU in 2 s idle"
    );
}
