//! Cross-check of the KTAP parser against the kernel's own: on every sample log, the counts
//! (passed, failed, crashed, skipped, errors) must equal what `kunit.py parse` prints.
//!
//! Needs a kernel tree's `tools/testing/kunit` (e.g. extracted from linux-source-6.1:
//! `tar -xJf /usr/src/linux-source-6.1.tar.xz linux-source-6.1/tools/testing/kunit`) and
//! python3. Point `EMBER_KUNIT_PY` at `kunit.py`, its directory, or the tree, then run
//! `cargo test --test ktap_kunit -- --ignored --nocapture`. The samples are ours
//! (`tests/data/ktap/`) plus kunit.py's own `test_data/*.log`, read from that tree.

use std::path::{Path, PathBuf};
use std::process::Command;

use ember::test_runner::ktap::{Counts, KtapParser};

/// Finds kunit.py from `EMBER_KUNIT_PY` (the file, its directory, or a kernel tree).
fn kunit_py() -> PathBuf {
    let Some(given) = std::env::var_os("EMBER_KUNIT_PY") else {
        panic!(
            "EMBER_KUNIT_PY is not set: point it at tools/testing/kunit/kunit.py of a kernel \
             tree (tar -xJf /usr/src/linux-source-6.1.tar.xz linux-source-6.1/tools/testing/kunit)"
        );
    };
    let given = PathBuf::from(given);
    let candidates = [
        given.clone(),
        given.join("kunit.py"),
        given.join("tools/testing/kunit/kunit.py"),
    ];
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!("EMBER_KUNIT_PY={}: no kunit.py there", given.display()),
    }
}

fn logs_in(dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs
}

/// Our counts, feeding the file in small uneven chunks as a serial console would.
fn ours(log: &Path) -> Counts {
    let bytes = std::fs::read(log).expect("read sample");
    let mut parser = KtapParser::new();
    let mut rest = &bytes[..];
    let mut size = 1;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        parser.feed(chunk);
        rest = tail;
        size = size % 13 + 1;
    }
    parser.finish().counts
}

/// kunit.py's counts, from its "Testing complete. Ran N tests: passed: X, ..." line.
fn theirs(kunit: &Path, log: &Path) -> Result<Counts, String> {
    let out = Command::new("python3")
        .arg(kunit)
        .arg("parse")
        .arg(log)
        .env("PYTHONUTF8", "1")
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(summary) = stdout.lines().find_map(|l| {
        l.split_once("Testing complete. ")
            .map(|(_, s)| s.to_string())
    }) else {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "no summary; stderr ends: {}",
            err.lines().last().unwrap_or("")
        ));
    };
    let mut counts = Counts::default();
    let fields = summary.split_once(": ").map_or("", |(_, f)| f);
    for field in fields.split(", ").filter(|f| !f.is_empty()) {
        let (name, n) = field
            .split_once(": ")
            .ok_or_else(|| format!("odd summary '{summary}'"))?;
        let n: u64 = n.parse().map_err(|_| format!("odd summary '{summary}'"))?;
        match name {
            "passed" => counts.passed = n,
            "failed" => counts.failed = n,
            "crashed" => counts.crashed = n,
            "skipped" => counts.skipped = n,
            "errors" => counts.errors = n,
            _ => return Err(format!("unknown count '{name}' in '{summary}'")),
        }
    }
    Ok(counts)
}

fn show(c: &Counts) -> String {
    format!(
        "p{} f{} c{} s{} e{}",
        c.passed, c.failed, c.crashed, c.skipped, c.errors
    )
}

#[test]
#[ignore = "needs kunit.py from a kernel tree: set EMBER_KUNIT_PY and run with --ignored"]
fn ktap_counts_equal_kunit_py_parse_on_every_sample() {
    // Arrange
    let kunit = kunit_py();
    let ours_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ktap");
    let theirs_dir = kunit
        .parent()
        .expect("kunit.py has a directory")
        .join("test_data");
    let mut logs = logs_in(&ours_dir);
    logs.extend(logs_in(&theirs_dir));
    assert!(logs.len() > 20, "too few samples: {logs:?}");

    // Act
    let mut mismatches = Vec::new();
    println!("{:<58} {:<28} kunit.py", "sample", "ours");
    for log in &logs {
        let name = log
            .strip_prefix(&ours_dir)
            .or_else(|_| log.strip_prefix(&theirs_dir));
        let name = format!(
            "{}{}",
            if log.starts_with(&ours_dir) {
                ""
            } else {
                "kunit:"
            },
            name.unwrap_or(log).display()
        );
        let ours = ours(log);
        let theirs = theirs(&kunit, log);
        let verdict = match &theirs {
            Ok(t) if *t == ours => "same",
            _ => "DIFFERENT",
        };
        let theirs_text = theirs.as_ref().map_or_else(|e| e.clone(), show);
        println!("{name:<58} {:<28} {theirs_text:<28} {verdict}", show(&ours));
        if verdict != "same" {
            mismatches.push(name);
        }
    }

    // Assert
    assert!(mismatches.is_empty(), "counts differ on {mismatches:?}");
}

/// Runs kunit.py's parser (the code behind `kunit.py parse`: the file read with
/// `errors='backslashreplace'`, `.splitlines()`, `parse_run_tests`) on many files in one
/// Python process. Returns one line per file: its counts, or the exception kunit.py raised.
fn theirs_batch(kunit: &Path, logs: &[PathBuf]) -> Vec<Result<Counts, String>> {
    const DRIVER: &str = r#"
import io, sys
sys.path.insert(0, sys.argv[1])
import kunit_parser, kunit_printer
kunit_printer.stdout._output = io.StringIO()
sys.setrecursionlimit(10000)
for path in sys.argv[2:]:
    kunit_printer.stdout._output = io.StringIO()
    with open(path, 'r', errors='backslashreplace') as f:
        lines = f.read().splitlines()
    try:
        c = kunit_parser.parse_run_tests(lines).counts
        print(c.passed, c.failed, c.crashed, c.skipped, c.errors)
    except Exception as e:
        print('RAISED', type(e).__name__, str(e)[:60].replace('\n', ' '))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(DRIVER)
        .arg(kunit.parent().expect("kunit.py has a directory"))
        .args(logs)
        .env("PYTHONUTF8", "1")
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let results: Vec<Result<Counts, String>> = text
        .lines()
        .map(|l| {
            let n: Vec<u64> = l.split(' ').filter_map(|f| f.parse().ok()).collect();
            match n[..] {
                [passed, failed, crashed, skipped, errors] if !l.starts_with("RAISED") => {
                    Ok(Counts {
                        passed,
                        failed,
                        crashed,
                        skipped,
                        errors,
                    })
                }
                _ => Err(l.to_string()),
            }
        })
        .collect();
    assert_eq!(results.len(), logs.len(), "driver output: {text}");
    results
}

/// A small deterministic generator (xorshift64*), so failures can be replayed by seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Emits one test at `depth`: a case, or a suite in one of the header styles, with plans
/// that are sometimes wrong and results that are sometimes missing or misnumbered.
fn gen_test(rng: &mut Rng, out: &mut Vec<String>, depth: usize, number: u64) {
    let ind = "    ".repeat(depth);
    let names = ["a", "b", "suite", "case", "x y", "dup", ""];
    for _ in 0..rng.below(3) {
        let diag = rng.pick(&[
            "# diag",
            "junk line",
            "",
            "  # a: EXPECTATION FAILED",
            "1..2",
        ]);
        out.push(format!("{ind}{diag}"));
    }
    let name = rng.pick(&names);
    if depth < 4 && rng.below(3) == 0 {
        let header = rng.below(4);
        if header != 1 {
            out.push(format!(
                "{ind}{}",
                rng.pick(&["KTAP version 1", "TAP version 14", "KTAP version 2"])
            ));
        }
        if header != 0 {
            out.push(format!("{ind}# Subtest: {name}"));
        }
        let n = rng.below(4);
        if rng.below(4) != 0 {
            out.push(format!("{ind}1..{}", n + rng.below(2)));
        }
        for i in 1..=n {
            gen_test(rng, out, depth + 1, i);
        }
    }
    if rng.below(12) != 0 {
        let result = rng.pick(&["ok", "not ok", "ok", "ok"]);
        let num = if rng.below(10) == 0 {
            number + 1
        } else {
            number
        };
        let hyphen = rng.pick(&["", "", "- "]);
        let directive = rng.pick(&[
            "",
            "",
            "",
            " # SKIP why",
            " # TODO later",
            " # skip lower",
            " #x",
            " # exit=1",
        ]);
        out.push(format!("{ind}{result} {num} {hyphen}{name}{directive}"));
    }
}

fn gen_log(seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut lines = vec!["boot junk".to_string()];
    lines.push(
        rng.pick(&["KTAP version 1", "TAP version 13", "TAP version 14"])
            .to_string(),
    );
    let n = rng.below(4);
    if rng.below(5) != 0 {
        lines.push(format!("1..{}", n + rng.below(2)));
    }
    for i in 1..=n {
        gen_test(&mut rng, &mut lines, 1, i);
    }
    if rng.below(3) == 0 {
        let cut = rng.below(lines.len() as u64) as usize;
        lines.truncate(cut.max(2));
    }
    let prefix = rng.pick(&["", "", "[    1.234567] ", "<6>[    0.5] \t"]);
    let eol = rng.pick(&["\n", "\n", "\r\n"]);
    let mut bytes = Vec::new();
    for l in &lines {
        bytes.extend_from_slice(prefix.as_bytes());
        bytes.extend_from_slice(l.as_bytes());
        bytes.extend_from_slice(eol.as_bytes());
    }
    bytes
}

#[test]
#[ignore = "needs kunit.py from a kernel tree: set EMBER_KUNIT_PY and run with --ignored"]
fn ktap_counts_equal_kunit_py_parse_on_generated_logs() {
    // Arrange
    let kunit = kunit_py();
    let dir = tempfile::tempdir().expect("tempdir");
    let logs: Vec<PathBuf> = (0..5000u64)
        .map(|seed| {
            let path = dir.path().join(format!("gen-{seed}.log"));
            std::fs::write(&path, gen_log(seed)).expect("write generated log");
            path
        })
        .collect();

    // Act
    let theirs = theirs_batch(&kunit, &logs);

    // Assert
    let (mut same, mut raised, mut differ) = (0, Vec::new(), Vec::new());
    let mut sum = Counts::default();
    for (log, theirs) in logs.iter().zip(&theirs) {
        match theirs {
            Ok(t) if *t == ours(log) => {
                same += 1;
                sum.add(t);
            }
            Ok(t) => differ.push(format!(
                "{}: ours {} kunit.py {}",
                log.display(),
                show(&ours(log)),
                show(t)
            )),
            Err(e) => raised.push(format!("{}: {e}", log.display())),
        }
    }
    println!(
        "generated logs: {same} same (totals {}), {} differ, {} where kunit.py raised",
        show(&sum),
        differ.len(),
        raised.len()
    );
    for r in raised.iter().take(5) {
        println!("  kunit.py raised on {r}");
    }
    assert!(differ.is_empty(), "counts differ:\n{}", differ.join("\n"));
}
