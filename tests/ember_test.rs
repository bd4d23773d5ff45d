//! `ember test` end to end: the tiny kernel for the runner's behaviour (pass, fail, timeout,
//! expect in order, shared boots restored from a snapshot, directories, --filter, --repeat,
//! -j, Ctrl-C, JUnit read back, exit status), the guest kit for three cases sharing one Linux
//! boot, and a KUnit kernel whose KTAP counts must equal kunit.py's. Needs /dev/kvm.

mod common;
#[path = "../examples/tiny_kernel/guest.rs"]
mod guest;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

/// A directory with the tiny kernel and test files.
struct Suite {
    dir: tempfile::TempDir,
}

impl Suite {
    fn new() -> Self {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tiny.elf"), guest::elf_image()).unwrap();
        Suite { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `ember test ARGS --out OUT --junit OUT/junit.xml --json OUT/report.json`.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = ember();
        c.arg("test")
            .args(args)
            .arg("--out")
            .arg(self.path("out"))
            .arg("--junit")
            .arg(self.path("out/junit.xml"))
            .arg("--json")
            .arg(self.path("out/report.json"));
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        run(self.cmd(args), LIMIT)
    }

    fn json(&self) -> Value {
        let text = std::fs::read_to_string(self.path("out/report.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn junit(&self) -> String {
        std::fs::read_to_string(self.path("out/junit.xml")).unwrap()
    }

    fn log(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path("out").join(rel)).unwrap()
    }
}

/// `(name, status)` of every case in the JSON report.
fn statuses(report: &Value) -> Vec<(String, String)> {
    report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `(tests, failures, errors, skipped)` of a JUnit `<testsuites>`.
type Tally = (u64, u64, u64, u64);

/// The JUnit document parsed: the totals of `<testsuites>`, and each `<testcase>`'s name
/// with the element it holds (`failure`, `error`, `skipped`, or "").
fn parse_junit(xml: &str) -> (Tally, Vec<(String, String)>) {
    let doc = roxmltree::Document::parse(xml).expect("the JUnit report is well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "testsuites");
    let n = |a: &str| root.attribute(a).unwrap().parse::<u64>().unwrap();
    let cases = root
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .map(|c| {
            let kind = c
                .children()
                .find(|k| ["failure", "error", "skipped"].contains(&k.tag_name().name()))
                .map(|k| k.tag_name().name().to_string())
                .unwrap_or_default();
            (c.attribute("name").unwrap().to_string(), kind)
        })
        .collect();
    (
        (n("tests"), n("failures"), n("errors"), n("skipped")),
        cases,
    )
}

const TINY_CASES: &str = r#"
[boot]
kernel = "tiny.elf"
memory = "16M"
cmdline = "tiny"
timeout = "30s"

[[case]]
name = "exit-16-is-33"
cmdline = "exit=16"
exit_code = 33
tags = ["smoke"]

[[case]]
name = "wrong-exit-status"
cmdline = "exit=16"

[[case]]
name = "ticks-in-order"
cmdline = "count=3"
expect = ["^tick 1$", "^tick 3$", "powering off"]

[[case]]
name = "ticks-out-of-order"
cmdline = "count=3"
expect = ["^tick 3$", "^tick 1$"]

[[case]]
name = "hangs"
cmdline = "halt"
timeout = "2s"
"#;

#[test]
fn passes_failures_and_a_hang_are_reported_with_a_failing_exit_status() {
    // Arrange
    let s = Suite::new();
    s.write("tiny.toml", TINY_CASES);
    let start = Instant::now();

    // Act
    let r = s.run(&["-j", "2", s.path("tiny.toml").to_str().unwrap()]);

    // Assert
    assert_eq!(r.code(), Some(1), "{r:?}");
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "the hang was not cut at 2 s"
    );
    let report = s.json();
    let expect = [
        ("tiny/exit-16-is-33", "passed"),
        ("tiny/wrong-exit-status", "failed"),
        ("tiny/ticks-in-order", "passed"),
        ("tiny/ticks-out-of-order", "failed"),
        ("tiny/hangs", "timed_out"),
    ];
    let want: Vec<(String, String)> = expect
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(statuses(&report), want);
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(
        cases[1]["message"], "ember run exited with 33, expected 0",
        "{report:#}"
    );
    assert_eq!(cases[3]["message"], "expected /^tick 1$/ (2 of 2) not seen");
    let hang = cases[4]["duration_secs"].as_f64().unwrap();
    assert!((2.0..10.0).contains(&hang), "the hang took {hang} s");
    let ((tests, failures, errors, skipped), junit_cases) = parse_junit(&s.junit());
    assert_eq!((tests, failures, errors, skipped), (5, 3, 0, 0));
    assert_eq!(
        junit_cases[4],
        ("tiny/hangs".to_string(), "failure".to_string())
    );
    assert!(s.log("tiny/ticks-in-order.log").contains("tick 3\n"));
    assert!(
        r.stdout
            .contains("5 cases: 2 passed, 2 failed, 1 timed out, 0 errors, 0 skipped"),
        "{r:?}"
    );
}

const TINY_SNAPSHOT: &str = r#"
[boot]
kernel = "tiny.elf"
memory = "16M"
cmdline = "count=6"
ready = "^tick 2$"
timeout = "30s"

[[case]]
name = "first"
expect = ["^tick 1$", "^tick 2$", "^tick 3$", "^tick 6$"]

[[case]]
name = "second"
expect = ["^tick 3$", "^tick 6$"]

[[case]]
name = "third"
expect = ["^tick 3$"]

[[case]]
name = "boots-on-its-own"
cmdline = "dirty=64"
expect = ["^tick 1$", "^tick 6$"]
"#;

/// The first `tick N` line of a log.
fn first_tick(log: &str) -> Option<&str> {
    log.lines().find(|l| l.starts_with("tick "))
}

#[test]
fn cases_sharing_a_boot_each_start_from_its_snapshot() {
    // Arrange
    let s = Suite::new();
    s.write("tiny.toml", TINY_SNAPSHOT);

    // Act
    let r = s.run(&["-j", "2", s.path("tiny.toml").to_str().unwrap()]);

    // Assert: the boot ran to tick 2 once; every shared case went on from tick 3 (its
    // expect patterns also see the boot's output); the case with its own cmdline booted.
    assert_eq!(r.code(), Some(0), "{r:?}");
    let boot = s.log("tiny/boot.log");
    assert!(
        boot.contains("tick 2\n") && !boot.contains("tick 3"),
        "{boot}"
    );
    for case in ["first", "second", "third"] {
        let log = s.log(&format!("tiny/{case}.log"));
        assert_eq!(first_tick(&log), Some("tick 3"), "{case}: {log}");
        assert!(
            log.contains("tick 6\n") && !log.contains("counting"),
            "{case}: {log}"
        );
    }
    assert_eq!(
        first_tick(&s.log("tiny/boots-on-its-own.log")),
        Some("tick 1")
    );
    assert!(
        !s.path("out/tiny/.work").exists(),
        "the snapshot and overlays are removed"
    );
    let report = s.json();
    assert!(
        statuses(&report).iter().all(|(_, st)| st == "passed"),
        "{report:#}"
    );
}

#[test]
fn a_directory_runs_every_file_and_filter_and_repeat_select() {
    // Arrange
    let s = Suite::new();
    s.write(
        "suite/a.toml",
        &TINY_CASES.replace("\"tiny.elf\"", "\"../tiny.elf\""),
    );
    s.write(
        "suite/more/b.toml",
        "[boot]\nkernel = \"../../tiny.elf\"\nmemory = \"16M\"\n\
         [[case]]\nname = \"smoke-exit\"\ncmdline = \"exit=0\"\nexit_code = 1\n\
         [[case]]\nname = \"other\"\ncmdline = \"exit=5\"\n",
    );

    // Act
    let r = s.run(&[
        "--filter",
        "smoke*",
        "--repeat",
        "2",
        s.path("suite").to_str().unwrap(),
    ]);

    // Assert: a's case is selected by its tag, b's by its name.
    assert_eq!(r.code(), Some(0), "{r:?}");
    let names: Vec<String> = statuses(&s.json()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        vec![
            "a/exit-16-is-33 [1/2]",
            "a/exit-16-is-33 [2/2]",
            "b/smoke-exit [1/2]",
            "b/smoke-exit [2/2]"
        ]
    );
    assert!(s.path("out/a/exit-16-is-33.2.log").is_file());
}

#[test]
fn a_malformed_file_names_its_line_and_key_and_nothing_runs() {
    // Arrange
    let s = Suite::new();
    let f = s.write(
        "bad.toml",
        "[boot]\nkernel = \"tiny.elf\"\nmemory = \"lots\"\n[[case]]\nname = \"a\"\n",
    );

    // Act
    let r = s.run(&[f.to_str().unwrap()]);

    // Assert
    assert_eq!(r.code(), Some(2), "{r:?}");
    let want = format!("ember test: {}:3: boot.memory:", f.display());
    assert!(r.stderr.starts_with(&want), "{r:?}");
    assert!(!s.path("out/junit.xml").exists());
}

#[test]
fn a_missing_kernel_fails_the_cases_that_need_it_by_name() {
    // Arrange
    let s = Suite::new();
    s.write(
        "gone.toml",
        "[boot]\nkernel = \"no-such-kernel\"\nready = \"x\"\n\
         [[case]]\nname = \"needs-a-kernel\"\ncmdline = \"x\"\n\
         [[case]]\nname = \"shares-a-boot\"\n",
    );
    s.write(
        "fine.toml",
        "[boot]\nkernel = \"tiny.elf\"\nmemory = \"16M\"\n[[case]]\nname = \"ok\"\n",
    );

    // Act
    let r = s.run(&[s.dir.path().to_str().unwrap()]);

    // Assert
    assert_eq!(r.code(), Some(1), "{r:?}");
    let report = s.json();
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases[0]["name"], "fine/ok");
    assert_eq!(cases[0]["status"], "passed");
    assert_eq!(cases[1]["status"], "error");
    let msg = cases[1]["message"].as_str().unwrap();
    assert!(msg.starts_with("case 'needs-a-kernel' ("), "{msg}");
    assert!(
        msg.contains("kernel") && msg.contains("no-such-kernel' does not exist"),
        "{msg}"
    );
    assert_eq!(cases[2]["status"], "error");
    let msg = cases[2]["message"].as_str().unwrap();
    assert!(msg.starts_with("case 'shares-a-boot' ("), "{msg}");
    assert!(msg.contains("the shared boot failed: kernel"), "{msg}");
}

/// The VMs (state directories) of an `ember test` run still there.
fn leftover_vms(pid: u32) -> Vec<String> {
    let (state, _) = state_dirs();
    let prefix = format!("ember-test-{pid}-");
    std::fs::read_dir(state.join("vms"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn ctrl_c_stops_every_vm_and_still_writes_the_partial_junit() {
    // Arrange: three guests that never end, two at a time.
    let s = Suite::new();
    s.write(
        "hang.toml",
        "[boot]\nkernel = \"tiny.elf\"\nmemory = \"16M\"\ntimeout = \"300s\"\n\
         [[case]]\nname = \"a\"\ncmdline = \"idle\"\n\
         [[case]]\nname = \"b\"\ncmdline = \"idle\"\n\
         [[case]]\nname = \"c\"\ncmdline = \"idle\"\n",
    );
    let mut child = s
        .cmd(&["-j", "2", s.path("hang.toml").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while !(s.path("out/hang/a.log").exists() && s.path("out/hang/b.log").exists()) {
        assert!(Instant::now() < end, "the cases did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    while leftover_vms(child.id()).len() < 2 {
        assert!(Instant::now() < end, "the VMs did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Act
    signal(&child, libc::SIGINT);
    let status = wait_deadline(&mut child, Duration::from_secs(30));

    // Assert
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("ember test did not stop after SIGINT")
    });
    assert_eq!(status.code(), Some(130));
    assert_eq!(leftover_vms(child.id()), Vec::<String>::new());
    let ((tests, _, errors, skipped), cases) = parse_junit(&s.junit());
    assert_eq!((tests, errors, skipped), (3, 2, 1), "{cases:?}");
    assert_eq!(cases[2], ("hang/c".to_string(), "skipped".to_string()));
}

// ---- Linux guests ------------------------------------------------------------------------

const KIT_FLAGS: &str = "console=ttyS0 quiet tsc=reliable no_timer_check";

/// Three cases from one boot of the guest kit: each starts from the snapshot taken where
/// init waits for a command; one writes a file in tmpfs and on its disk, the next sees
/// neither; the disk image the file names is never written.
#[test]
fn guest_kit_cases_share_one_boot_and_see_no_leftovers() {
    let _heavy = heavy_boot_lock();
    let s = Suite::new();
    let kit = guest_kit();
    let disk = s.path("data.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let before = md5_hex(&std::fs::read(&disk).unwrap());
    let f = s.write(
        "kit.toml",
        &format!(
            r#"
[boot]
kernel = "{}"
initrd = "{}"
cmdline = "{KIT_FLAGS}"
memory = "128M"
disks = ["path=data.raw,format=raw"]
timeout = "600s"

[[case]]
name = "boots"
run = "echo hello from the guest"
expect = ["ember-guest: init reached", "^hello from the guest$"]
timeout = "120s"

[[case]]
name = "writes"
run = """
echo one >/tmp/mark
echo disk-data >/dev/vda
read -r v </tmp/mark
echo "got $v"
"""
expect = ["^got one$"]
timeout = "120s"

[[case]]
name = "sees-no-leftovers"
run = """
[ -e /tmp/mark ] && exit 9
read -r -n 9 v </dev/vda
[ "$v" = disk-data ] && exit 8
exit 3
"""
exit_code = 3
timeout = "120s"
"#,
            kit.vmlinux.display(),
            kit.initramfs.display()
        ),
    );

    let r = run(s.cmd(&[f.to_str().unwrap()]), Duration::from_secs(1200));

    assert_eq!(r.code(), Some(0), "{r:?}");
    let report = s.json();
    assert!(
        statuses(&report).iter().all(|(_, st)| st == "passed"),
        "{report:#}"
    );
    for c in report["cases"].as_array().unwrap() {
        let secs = c["duration_secs"].as_f64().unwrap();
        let start = c["command_start_secs"].as_f64().unwrap();
        eprintln!(
            "{}: {secs:.2} s, command started after {start:.2} s",
            c["name"]
        );
    }
    assert!(s.log("kit/boot.log").contains("ember-test: ready"));
    assert_eq!(
        md5_hex(&std::fs::read(&disk).unwrap()),
        before,
        "the base disk was written"
    );
}

/// kunit.py from the linux-source-6.1 tarball, extracted once under target/.
fn kunit_py() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kunit-tools");
    let script = dir.join("linux-source-6.1/tools/testing/kunit/kunit.py");
    if !script.is_file() {
        std::fs::create_dir_all(&dir).unwrap();
        tool_ok(
            "tar",
            &[
                "-xJf",
                "/usr/src/linux-source-6.1.tar.xz",
                "-C",
                dir.to_str().unwrap(),
                "linux-source-6.1/tools/testing/kunit",
            ],
        );
    }
    script
}

/// `passed`, `failed`, `crashed`, `skipped`, `errors` from kunit.py's summary line.
fn kunit_py_counts(kunit: &Path, log: &Path) -> [u64; 5] {
    let out = Command::new("python3")
        .arg(kunit)
        .arg("parse")
        .arg(log)
        .output()
        .expect("python3 runs kunit.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| {
            l.split_once("Testing complete. ")
                .map(|(_, s)| s.to_string())
        })
        .unwrap_or_else(|| panic!("no summary from kunit.py: {stdout}"));
    let mut counts = [0u64; 5];
    let fields = line.split_once(": ").map_or("", |(_, f)| f);
    for field in fields.split(", ").filter(|f| !f.is_empty()) {
        let (name, n) = field.split_once(": ").unwrap();
        let i = ["passed", "failed", "crashed", "skipped", "errors"]
            .iter()
            .position(|k| *k == name)
            .unwrap_or_else(|| panic!("unknown count {name} in {line}"));
        counts[i] = n.parse().unwrap();
    }
    counts
}

/// KUnit's own suites and a few library suites, built in (tests/guest/build.sh --kunit),
/// run at boot: ember test's counts and JUnit equal what kunit.py parse reports on the log.
#[test]
#[ignore = "needs the KUnit kernel: run tests/guest/build.sh --kunit, then --ignored"]
fn kunit_results_become_junit_with_kunit_py_counts() {
    let _heavy = heavy_boot_lock();
    let s = Suite::new();
    let kit = guest_kit();
    let kernel = kit.vmlinux.with_file_name("vmlinux-kunit");
    assert!(
        kernel.is_file(),
        "{} is missing: run tests/guest/build.sh --kunit",
        kernel.display()
    );
    let f = s.write(
        "kunit.toml",
        &format!(
            r#"
[boot]
kernel = "{}"
cmdline = "console=ttyS0 tsc=reliable no_timer_check kunit_shutdown=poweroff"
memory = "64M"
timeout = "2400s"

[[case]]
name = "kunit"
"#,
            kernel.display()
        ),
    );

    let r = run(s.cmd(&[f.to_str().unwrap()]), Duration::from_secs(3000));

    let report = s.json();
    let case = &report["cases"][0];
    assert_eq!(r.code(), Some(0), "{r:?}\n{case:#}");
    let ours = &case["ktap_counts"];
    let ours =
        ["passed", "failed", "crashed", "skipped", "errors"].map(|k| ours[k].as_u64().unwrap());
    let theirs = kunit_py_counts(&kunit_py(), &s.path("out/kunit/kunit.log"));
    eprintln!("ember test: {ours:?}, kunit.py parse: {theirs:?} (passed, failed, crashed, skipped, errors)");
    assert_eq!(ours, theirs);
    assert!(ours[0] >= 20 && ours[3] >= 2, "too few results: {ours:?}");
    let ((tests, failures, errors, skipped), cases) = parse_junit(&s.junit());
    assert_eq!(tests, 1 + ours[0] + ours[1] + ours[2] + ours[3]);
    assert_eq!((failures, errors, skipped), (ours[1], ours[2], ours[3]));
    assert!(
        cases.iter().any(|(n, _)| n == "example_simple_test"),
        "{cases:?}"
    );
}
