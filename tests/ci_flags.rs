//! `ember run` as a one-shot CI check: `--timeout`, `--expect` (in order, `--stop-on-expect`),
//! `--fail-on` (with its defaults), `--console-log`, and a guest kernel panic reported through
//! pvpanic. The tiny test kernel (examples/tiny_kernel) prints `tick N` every 100 ms with
//! `count`, echoes input with `echo`; one Linux boot from the guest kit panics. Needs /dev/kvm
//! (and the guest kit for the Linux test).

mod common;
#[path = "../examples/tiny_kernel/guest.rs"]
mod guest;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

struct Tiny {
    dir: tempfile::TempDir,
    kernel: std::path::PathBuf,
}

fn tiny() -> Tiny {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, guest::elf_image()).unwrap();
    Tiny { dir, kernel }
}

fn ember_tiny(t: &Tiny, cmdline: &str, extra: &[&str]) -> Command {
    let mut cmd = ember();
    cmd.args(["run", "--kernel"])
        .arg(&t.kernel)
        .args(["--memory", "16M", "--no-api", "--cmdline", cmdline])
        .args(extra);
    cmd
}

/// The tick numbers printed, in order.
fn ticks(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("tick "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

#[test]
fn timeout_exits_124_with_the_last_twenty_serial_lines_on_stderr() {
    let t = tiny();
    let start = Instant::now();
    let r = run(ember_tiny(&t, "count", &["--timeout", "3s"]), LIMIT);
    let took = start.elapsed();
    assert_eq!(r.code(), Some(124), "{r:?}");
    assert!(took >= Duration::from_secs(3), "ended after {took:?}");
    let (_, tail) = r
        .stderr
        .split_once("ember: timed out after 3s; the last serial lines:\n")
        .unwrap_or_else(|| panic!("no timeout report: {}", r.stderr));
    // Twenty whole lines, and the line being printed if the timeout cut one.
    let lines: Vec<&str> = tail.lines().collect();
    assert!(matches!(lines.len(), 20 | 21), "{tail}");
    assert!(lines.iter().all(|l| l.starts_with("tick ")), "{tail}");
    let whole = ticks(&lines[..20].join("\n"));
    assert!(whole.windows(2).all(|w| w[1] == w[0] + 1), "{tail}");
    let printed = ticks(&r.stdout);
    assert!(printed.ends_with(&whole) || printed[..printed.len() - 1].ends_with(&whole));
}

#[test]
fn expects_seen_in_order_pass_and_out_of_order_fail_with_126() {
    let t = tiny();
    let in_order = ["--expect", "^tick 2$", "--expect", "^tick 4$"];
    let r = run(ember_tiny(&t, "count=5", &in_order), LIMIT);
    assert_eq!(r.code(), Some(0), "{r:?}");

    let reversed = ["--expect", "^tick 4$", "--expect", "^tick 2$"];
    let r = run(ember_tiny(&t, "count=5", &reversed), LIMIT);
    assert_eq!(r.code(), Some(126), "{r:?}");
    assert!(
        r.stderr.contains(
            "--expect '^tick 2$' was not seen before the run ended (the guest powered off)"
        ),
        "{}",
        r.stderr
    );
}

#[test]
fn a_debug_exit_status_stands_only_when_every_expect_was_seen() {
    let t = tiny();
    let r = run(ember_tiny(&t, "exit=16", &["--expect", "hello"]), LIMIT);
    assert_eq!(r.code(), Some(33), "{r:?}");
    let r = run(
        ember_tiny(&t, "exit=16", &["--expect", "never printed"]),
        LIMIT,
    );
    assert_eq!(r.code(), Some(126), "{r:?}");
    assert!(r.stderr.contains("debug-exit, status 33"), "{}", r.stderr);
}

#[test]
fn stop_on_expect_ends_a_guest_that_would_run_forever_with_0() {
    let t = tiny();
    let args = [
        "--expect",
        "^tick 3$",
        "--stop-on-expect",
        "--timeout",
        "50s",
    ];
    let r = run(ember_tiny(&t, "count", &args), LIMIT);
    assert_eq!(r.code(), Some(0), "{r:?}");
    let printed = ticks(&r.stdout);
    assert!(printed.contains(&3), "{}", r.stdout);
    // Stopped at once: the next tick is 100 ms away.
    assert!(printed.iter().all(|n| *n <= 4), "{}", r.stdout);
}

#[test]
fn fail_on_ends_the_run_at_once_naming_the_pattern_and_the_line() {
    let t = tiny();
    let args = ["--fail-on", "^tick [4-6]$", "--timeout", "50s"];
    let r = run(ember_tiny(&t, "count", &args), LIMIT);
    assert_eq!(r.code(), Some(122), "{r:?}");
    assert!(
        r.stderr
            .contains("ember: --fail-on '^tick [4-6]$' matched the line: tick 4"),
        "{}",
        r.stderr
    );
    assert!(ticks(&r.stdout).iter().all(|n| *n <= 5), "{}", r.stdout);
}

#[test]
fn default_fail_on_patterns_judge_the_output_unless_dropped() {
    let t = tiny();
    // The guest echoes its input: a line that looks like kernel trouble.
    let input = b"BUG: soft lockup\nq";
    let r = run_with_input(ember_tiny(&t, "echo", &["--expect", "hello"]), input, LIMIT);
    assert_eq!(r.code(), Some(122), "{r:?}");
    assert!(r.stderr.contains("--fail-on 'BUG:'"), "{}", r.stderr);

    let args = ["--expect", "hello", "--no-default-fail-on"];
    let r = run_with_input(ember_tiny(&t, "echo", &args), input, LIMIT);
    assert_eq!(r.code(), Some(0), "{r:?}");

    // Without --expect or --fail-on the output is not judged at all.
    let r = run_with_input(ember_tiny(&t, "echo", &["--timeout", "50s"]), input, LIMIT);
    assert_eq!(r.code(), Some(0), "{r:?}");
}

#[test]
fn a_line_past_the_cap_is_matched_on_what_is_kept_and_the_next_line_still_matches() {
    let t = tiny();
    // 5,000 bytes without a line end, echoed by the guest: only 4 KiB of it is kept, so a
    // pattern for 4,097 x's never matches; the line after it is matched as usual.
    let mut input = vec![b'x'; 5000];
    input.extend_from_slice(b"\nafter-the-long-line\nq");
    let args = ["--fail-on", "x{4097}", "--expect", "^after-the-long-line$"];
    let r = run_with_input(ember_tiny(&t, "echo", &args), &input, LIMIT);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    let args = ["--fail-on", "x{4096}", "--no-default-fail-on"];
    let r = run_with_input(ember_tiny(&t, "echo", &args), &input, LIMIT);
    assert_eq!(r.code(), Some(122), "{}", r.stderr);
}

#[test]
fn console_log_receives_the_output_whatever_serial_is() {
    let t = tiny();
    let log = t.dir.path().join("serial.txt");
    std::fs::write(&log, "old run\n").unwrap();
    let log_arg = log.to_str().unwrap();
    let r = run(
        ember_tiny(
            &t,
            "count=3",
            &["--serial", "none", "--console-log", log_arg],
        ),
        LIMIT,
    );
    assert_eq!(r.code(), Some(0), "{r:?}");
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.starts_with("tiny: hello from the tiny kernel\n"),
        "{text}"
    );
    assert_eq!(ticks(&text), vec![1, 2, 3], "{text}");
    assert!(text.ends_with("tiny: powering off\n"), "{text}");
}

#[test]
fn expects_carry_across_guest_reboots_with_reboot_restart() {
    let t = tiny();
    let hello = "hello from the tiny kernel";
    let args = [
        "--reboot=restart",
        "--expect",
        hello,
        "--expect",
        hello,
        "--expect",
        hello,
        "--stop-on-expect",
    ];
    let r = run(ember_tiny(&t, "reboot", &args), LIMIT);
    assert_eq!(r.code(), Some(0), "{r:?}");
    // The third boot's reset may beat the stop: the next boot is then stopped at once,
    // before or just after its banner.
    let boots = r.stdout.matches(hello).count();
    assert!((3..=4).contains(&boots), "{}", r.stdout);
}

#[test]
fn bad_ci_options_are_bad_input() {
    let t = tiny();
    for args in [
        &["--timeout", "0"][..],
        &["--timeout", "soon"],
        &["--expect", "("],
        &["--fail-on", "[z-a]"],
        &["--stop-on-expect"],
        &["--console-log", "/nonexistent-dir/serial.txt"],
    ] {
        let r = run(ember_tiny(&t, "", args), LIMIT);
        assert_eq!(r.code(), Some(2), "{args:?}: {r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
    }
}

/// Reads `child`'s stdout line by line on a thread; each line arrives with the time it was
/// read.
fn timed_lines(stdout: std::process::ChildStdout) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn a_linux_guest_panic_ends_the_run_through_pvpanic_without_waiting_for_the_timeout() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let mut cmd = ember();
    // No root and no init: the kernel panics once it has tried to mount a root file system.
    cmd.args(["run", "--no-api", "--kernel"])
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initramfs)
        .args(["--memory", "128M", "--timeout", "600s", "--cmdline"])
        .arg("console=ttyS0 tsc=reliable no_timer_check rdinit=/nonexistent init=/nonexistent")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let lines = timed_lines(child.stdout.take().unwrap());
    let mut stderr = child.stderr.take().unwrap();
    let status = wait_deadline(&mut child, Duration::from_secs(900));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let ended = Instant::now();
    let seen: Vec<(Instant, String)> = lines.iter().collect();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
    let out: Vec<&str> = seen.iter().map(|(_, l)| l.as_str()).collect();
    let out = out.join("\n");
    let status = status.unwrap_or_else(|| panic!("still running:\n{out}\n{err}"));

    assert_eq!(status.code(), Some(120), "{out}\n{err}");
    assert!(
        err.contains("the guest kernel panicked (pvpanic event 0x1)"),
        "{err}"
    );
    let (panicked, _) = seen
        .iter()
        .find(|(_, l)| l.contains("Kernel panic - not syncing"))
        .unwrap_or_else(|| panic!("no panic line:\n{out}"));
    let after = ended.duration_since(*panicked);
    assert!(
        after < Duration::from_secs(30),
        "ended {after:?} after the panic line"
    );
}
