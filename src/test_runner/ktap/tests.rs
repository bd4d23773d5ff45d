use super::*;

/// The sample logs of `tests/data/ktap/` (hand-written in the formats KUnit 6.1, kselftest
/// and the KTAP spec print; `tests/ktap_kunit.rs` checks kunit.py agrees on each).
macro_rules! sample {
    ($name:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/ktap/",
            $name
        ))
    };
}

const SAMPLES: [(&str, &[u8]); 21] = [
    ("crlf_serial_console", sample!("crlf_serial_console.log")),
    ("deep_nesting_50", sample!("deep_nesting_50.log")),
    (
        "empty_suite_and_plan_zero",
        sample!("empty_suite_and_plan_zero.log"),
    ),
    (
        "executor_error_prefix",
        sample!("executor_error_prefix.log"),
    ),
    (
        "hostile_garbage_long_lines",
        sample!("hostile_garbage_long_lines.log"),
    ),
    ("huge_plan_crash", sample!("huge_plan_crash.log")),
    ("kselftest_runner", sample!("kselftest_runner.log")),
    ("ktap_spec_nested", sample!("ktap_spec_nested.log")),
    (
        "kunit_crash_mid_suite",
        sample!("kunit_crash_mid_suite.log"),
    ),
    ("kunit_failure_diag", sample!("kunit_failure_diag.log")),
    (
        "kunit_panic_vfs_marker",
        sample!("kunit_panic_vfs_marker.log"),
    ),
    ("kunit_parameterized", sample!("kunit_parameterized.log")),
    (
        "kunit_printk_all_pass",
        sample!("kunit_printk_all_pass.log"),
    ),
    ("kunit_skip", sample!("kunit_skip.log")),
    ("kunit_timeout_cut", sample!("kunit_timeout_cut.log")),
    ("missing_plans", sample!("missing_plans.log")),
    ("multiple_documents", sample!("multiple_documents.log")),
    ("no_ktap_boot", sample!("no_ktap_boot.log")),
    (
        "same_name_case_ends_suite",
        sample!("same_name_case_ends_suite.log"),
    ),
    ("tap14_subtests", sample!("tap14_subtests.log")),
    (
        "wrong_numbers_and_extra",
        sample!("wrong_numbers_and_extra.log"),
    ),
];

fn parse(input: &[u8]) -> KtapReport {
    let mut p = KtapParser::new();
    p.feed(input);
    p.finish()
}

fn counts(passed: u64, failed: u64, crashed: u64, skipped: u64, errors: u64) -> Counts {
    Counts {
        passed,
        failed,
        crashed,
        skipped,
        errors,
    }
}

fn root(r: &KtapReport) -> &Suite {
    r.root.as_ref().expect("a KTAP document")
}

fn suite(node: &TestNode) -> &Suite {
    match node {
        TestNode::Suite(s) => s,
        TestNode::Case(c) => panic!("{} is a case, not a suite", c.name),
    }
}

fn case(node: &TestNode) -> &TestCase {
    match node {
        TestNode::Case(c) => c,
        TestNode::Suite(s) => panic!("{} is a suite, not a case", s.name),
    }
}

fn sample_named(name: &str) -> &'static [u8] {
    SAMPLES.iter().find(|(n, _)| *n == name).expect("sample").1
}

#[test]
fn kunit_suites_become_a_tree_with_plans_statuses_and_diagnostic_logs() {
    // Act
    let r = parse(sample_named("kunit_failure_diag"));

    // Assert
    assert_eq!(r.counts, counts(3, 2, 0, 0, 0));
    assert_eq!(r.status, Status::Failed);
    assert!(!r.ok());
    let example = suite(&root(&r).tests[0]);
    assert_eq!((example.name.as_str(), example.plan), ("example", Some(3)));
    assert_eq!(example.status, Status::Failed);
    let failing = case(&example.tests[1]);
    assert_eq!(failing.name, "example_failing_test");
    assert_eq!(failing.status, Status::Failed);
    assert_eq!(
        failing.log,
        [
            "    # example_failing_test: initializing",
            "    # example_failing_test: EXPECTATION FAILED at lib/kunit/kunit-example-test.c:31",
            "    Expected 1 + 1 == 3, but",
            "        1 + 1 == 2 (0x2)",
        ]
    );
    assert_eq!(
        example.log,
        [
            "# example: pass:2 fail:1 skip:0 total:3",
            "# Totals: pass:2 fail:1 skip:0 total:3"
        ]
    );
}

#[test]
fn printk_prefix_of_the_version_line_is_cut_from_every_line() {
    // Act
    let r = parse(sample_named("kunit_printk_all_pass"));

    // Assert
    assert_eq!(r.counts, counts(5, 0, 0, 0, 0));
    assert!(r.ok());
    assert_eq!(r.end_marker.as_deref(), Some("reboot: System halted"));
    let sysctl = suite(&root(&r).tests[1]);
    assert_eq!(sysctl.name, "sysctl_test");
    let second = case(&sysctl.tests[1]);
    assert_eq!(second.name, "sysctl_test_api_dointvec_table_maxlen_unset");
    assert_eq!(second.log, ["random: crng init done"]);
}

#[test]
fn feeding_in_any_chunk_size_gives_the_same_report() {
    for (name, bytes) in SAMPLES {
        // Arrange
        let whole = parse(bytes);

        // Act
        let mut p = KtapParser::new();
        for chunk in bytes.chunks(1) {
            p.feed(chunk);
        }
        let bytewise = p.finish();
        let mut p = KtapParser::new();
        for chunk in bytes.chunks(4093) {
            p.feed(chunk);
        }
        let paged = p.finish();

        // Assert
        assert_eq!(bytewise, whole, "{name}");
        assert_eq!(paged, whole, "{name}");
    }
}

#[test]
fn crash_mid_suite_counts_every_planned_test_left_as_crashed() {
    // Act
    let r = parse(sample_named("kunit_crash_mid_suite"));

    // Assert: crashy ran 1 of 4, the document 2 of 3 suites.
    assert_eq!(r.counts, counts(2, 0, 4, 0, 5));
    assert_eq!(r.status, Status::Crashed);
    let top = root(&r);
    assert_eq!((top.plan, top.missing, top.tests.len()), (Some(3), 1, 2));
    let crashy = suite(&top.tests[1]);
    assert_eq!((crashy.name.as_str(), crashy.missing), ("crashy", 3));
    assert_eq!(crashy.status, Status::Crashed);
    assert!(crashy
        .log
        .iter()
        .any(|l| l.contains("Kernel panic - not syncing: Fatal exception")));
    assert!(r
        .errors
        .contains(&"Test: crashy: missing expected subtest! (x3)".to_string()));
    assert!(r
        .errors
        .contains(&"Test: crashy: missing subtest result line!".to_string()));
}

#[test]
fn output_cut_off_by_a_timeout_reports_missing_result_and_suites() {
    // Act: the last line has no newline; it is still a (complete) result line.
    let r = parse(sample_named("kunit_timeout_cut"));

    // Assert
    assert_eq!(r.counts, counts(3, 0, 1, 0, 2));
    let slow = suite(&root(&r).tests[0]);
    assert_eq!(case(&slow.tests[2]).name, "slo");
    assert_eq!(slow.status, Status::Crashed);
    assert_eq!(root(&r).missing, 1);
}

#[test]
fn vfs_panic_marker_ends_the_output_and_later_lines_are_ignored() {
    // Arrange
    let mut p = KtapParser::new();

    // Act
    p.feed(sample_named("kunit_panic_vfs_marker"));
    let done = p.is_done();
    p.feed(b"ok 3 - after\nok 4 - more\n");
    let r = p.finish();

    // Assert
    assert!(done);
    assert_eq!(
        r.end_marker.as_deref(),
        Some("Kernel panic - not syncing: VFS:")
    );
    assert_eq!(r.counts, counts(2, 0, 2, 0, 3));
}

#[test]
fn completed_top_level_plan_ends_parsing_like_kunit_py() {
    // Arrange
    let mut p = KtapParser::new();

    // Act
    p.feed(sample_named("multiple_documents"));
    let done = p.is_done();
    let r = p.finish();

    // Assert
    assert!(done);
    assert_eq!(r.counts, counts(1, 0, 0, 0, 0));
}

#[test]
fn skip_directive_skips_after_ok_or_not_ok_and_only_in_capitals() {
    // Act
    let r = parse(sample_named("kunit_skip"));

    // Assert
    assert_eq!(r.counts, counts(2, 0, 0, 4, 0));
    let hw = suite(&root(&r).tests[1]);
    assert_eq!(hw.status, Status::Skipped);
    let irq = case(&hw.tests[1]);
    assert_eq!(irq.status, Status::Skipped);
    assert_eq!(irq.directive.as_deref(), Some("SKIP needs an IRQ line"));
    let lower = case(&suite(&root(&r).tests[2]).tests[0]);
    assert_eq!(lower.status, Status::Passed);
    assert!(r.ok());
}

#[test]
fn todo_directive_keeps_the_ok_or_not_ok_verdict() {
    // Act
    let r = parse(sample_named("tap14_subtests"));

    // Assert
    assert_eq!(r.counts, counts(3, 2, 0, 1, 0));
    let parser = suite(&root(&r).tests[0]);
    let todo = case(&parser.tests[1]);
    assert_eq!(todo.name, "parses directives");
    assert_eq!(todo.status, Status::Failed);
    assert_eq!(todo.directive.as_deref(), Some("TODO not implemented yet"));
    assert_eq!(case(&root(&r).tests[2]).name, "standalone check");
}

#[test]
fn kselftest_nested_output_is_diagnostics_and_directives_are_kept() {
    // Act
    let r = parse(sample_named("kselftest_runner"));

    // Assert
    assert_eq!(r.counts, counts(2, 2, 0, 1, 0));
    let top = root(&r);
    assert_eq!(top.tests.len(), 5);
    let first = case(&top.tests[0]);
    assert_eq!(first.name, "selftests: timers: posix_timers");
    assert!(first.log.contains(&"# TAP version 13".to_string()));
    let timeout = case(&top.tests[3]);
    assert_eq!(timeout.status, Status::Failed);
    assert_eq!(timeout.directive.as_deref(), Some("TIMEOUT 45 seconds"));
}

#[test]
fn ktap_spec_nesting_by_version_lines_alone() {
    // Act
    let r = parse(sample_named("ktap_spec_nested"));

    // Assert
    assert_eq!(r.counts, counts(3, 1, 0, 2, 0));
    let main_test = suite(&root(&r).tests[0]);
    assert_eq!(
        (main_test.name.as_str(), main_test.status),
        ("main_test", Status::Failed)
    );
    let third = suite(&main_test.tests[2]);
    assert_eq!(third.name, "example_test_3");
    assert_eq!(case(&third.tests[1]).log, ["    # test_2: FAIL"]);
}

#[test]
fn parameterized_tests_nest_a_third_level_without_a_plan() {
    // Act
    let r = parse(sample_named("kunit_parameterized"));

    // Assert
    assert_eq!(r.counts, counts(2, 1, 0, 1, 1));
    let params = suite(&suite(&root(&r).tests[0]).tests[0]);
    assert_eq!(params.plan, None);
    assert_eq!(params.tests.len(), 4);
    assert_eq!(case(&params.tests[2]).name, "year 2038");
    let empty = suite(&suite(&root(&r).tests[0]).tests[1]);
    assert_eq!(empty.status, Status::NoTests);
    assert!(!empty.counted_self);
}

#[test]
fn no_ktap_output_is_reported_with_one_error() {
    // Act
    let r = parse(sample_named("no_ktap_boot"));

    // Assert
    assert_eq!(r.status, Status::NoKtap);
    assert_eq!(r.counts, counts(0, 0, 0, 0, 1));
    assert!(r.root.is_none());
    assert_eq!(r.errors, ["could not find any KTAP output!"]);
}

#[test]
fn empty_input_and_plan_zero_document_are_not_passes() {
    // Act
    let nothing = parse(b"");
    let zero = parse(b"KTAP version 1\n1..0\n");

    // Assert
    assert_eq!(nothing.status, Status::NoKtap);
    assert_eq!(zero.status, Status::NoTests);
    assert_eq!(zero.counts, counts(0, 0, 0, 0, 1));
    assert!(!zero.ok());
}

#[test]
fn suite_that_ran_nothing_is_no_tests_unless_its_result_says_otherwise() {
    // Act
    let r = parse(sample_named("empty_suite_and_plan_zero"));

    // Assert: "ok 1 empty" becomes no tests (an error, not counted); "not ok 3" stays a
    // failure and is counted as one test.
    assert_eq!(r.counts, counts(1, 1, 0, 0, 1));
    let top = root(&r);
    assert_eq!(suite(&top.tests[0]).status, Status::NoTests);
    let failed = suite(&top.tests[2]);
    assert_eq!(failed.status, Status::Failed);
    assert!(failed.counted_self);
}

#[test]
fn executor_error_before_the_version_line_is_kept_in_the_document_log() {
    // Act
    let r = parse(sample_named("executor_error_prefix"));

    // Assert
    assert_eq!(r.counts, counts(1, 0, 0, 0, 0));
    assert_eq!(
        root(&r).log,
        ["[    0.400000] kunit executor: error filtering suites: -12"]
    );
}

#[test]
fn wrong_test_numbers_and_versions_are_errors_not_failures() {
    // Act
    let r = parse(sample_named("wrong_numbers_and_extra"));

    // Assert
    assert_eq!(r.counts, counts(4, 0, 0, 0, 5));
    assert!(r.ok());
    assert!(r
        .errors
        .contains(&"Test: main: KTAP version higer than expected!".to_string()));
    assert!(r
        .errors
        .contains(&"Test: #2: TAP version lower than expected!".to_string()));
    assert!(r
        .errors
        .contains(&"Test: second_numbered_three: Expected test number 2 but found 3".to_string()));
}

#[test]
fn case_named_like_its_suite_ends_the_suite_as_kunit_py_does() {
    // Act
    let r = parse(sample_named("same_name_case_ends_suite"));

    // Assert
    assert_eq!(r.counts, counts(0, 0, 2, 0, 2));
    assert_eq!(suite(&root(&r).tests[0]).missing, 2);
}

#[test]
fn unnamed_suite_cut_after_a_result_line_is_a_missing_result() {
    // Arrange: kunit.py raises "going past EOF" on this one.
    let input = b"KTAP version 1\n1..1\n  KTAP version 1\n  1..2\n  ok 1 a\n";

    // Act
    let r = parse(input);

    // Assert
    assert_eq!(r.counts, counts(1, 0, 1, 0, 2));
    assert!(r
        .errors
        .contains(&"Test: #1: missing subtest result line!".to_string()));
}

#[test]
fn serial_crlf_ansi_and_binary_garbage_are_read_like_kunit_py() {
    // Act: the first line carries an ANSI reset before the timestamp, so the prefix kunit.py
    // cuts from every line is 19 characters, not the 15 of "[    0.523008] ".
    let r = parse(sample_named("crlf_serial_console"));

    // Assert
    assert_eq!(r.counts, counts(1, 1, 0, 1, 0));
    let serial = suite(&root(&r).tests[0]);
    let second = case(&serial.tests[1]);
    assert_eq!(second.name, "crlf_two");
    assert_eq!(second.log, ["ff\\xfe garbage \\xc3( bytes \u{0} here"]);
    let third = case(&serial.tests[2]);
    assert_eq!(
        third.directive.as_deref(),
        Some("SKIP \u{2713} unicode reason")
    );
}

#[test]
fn absurd_plan_then_crash_is_counted_without_allocating_per_test() {
    // Arrange
    let input =
        b"KTAP version 1\n1..4294967295\n  # Subtest: s\n  1..18446744073709551615\n  ok 1 t\n";

    // Act
    let r = parse(input);

    // Assert
    let top = root(&r);
    assert_eq!(top.missing, 4_294_967_294);
    let s = suite(&top.tests[0]);
    assert_eq!(s.missing, u64::MAX - 1);
    assert_eq!(r.counts.crashed, u64::MAX, "saturates");
    assert_eq!(r.counts.passed, 1);
    assert_eq!(r.status, Status::Crashed);
}

#[test]
fn huge_plan_number_beyond_u64_saturates() {
    // Act
    let r = parse(b"KTAP version 1\n1..999999999999999999999999999\nok 1 a\n");

    // Assert
    assert_eq!(root(&r).plan, Some(u64::MAX));
    assert_eq!(r.counts.crashed, u64::MAX - 1);
}

/// Depth of a tree, iteratively.
fn depth(s: &Suite) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(s, 1)];
    while let Some((s, d)) = stack.pop() {
        deepest = deepest.max(d);
        for t in &s.tests {
            if let TestNode::Suite(c) = t {
                stack.push((c, d + 1));
            }
        }
    }
    deepest
}

#[test]
fn nesting_beyond_the_depth_limit_is_read_flat_without_unbounded_stack() {
    // Arrange: 100,000 nested headers, then results on the way out.
    let levels = 100_000;
    let mut input = String::from("KTAP version 1\n1..1\n");
    for i in 0..levels {
        input.push_str(&format!("KTAP version 1\n# Subtest: l{i}\n1..1\n"));
    }
    input.push_str("ok 1 leaf\n");
    for i in (0..levels).rev() {
        input.push_str(&format!("ok 1 l{i}\n"));
    }

    // Act
    let r = parse(input.as_bytes());

    // Assert
    let limits = Limits::default();
    assert!(
        depth(root(&r)) <= limits.max_depth + 2,
        "{}",
        depth(root(&r))
    );
    assert!(r.counts.total() > 0);
    assert!(serde_json::to_string(&r).is_ok());
}

#[test]
fn very_long_lines_are_cut_and_the_line_buffer_stays_bounded() {
    // Arrange
    let limits = Limits::default();
    let mut p = KtapParser::new();
    p.feed(b"KTAP version 1\n1..1\n  # Subtest: s\n  1..1\n  ok 1 ");
    let chunk = vec![b'n'; 1 << 20];

    // Act
    for _ in 0..64 {
        p.feed(&chunk);
    }
    let buffered = p.splitter.buffered();
    p.feed(b"\nok 1 s\n");
    let r = p.finish();

    // Assert
    assert!(buffered <= limits.max_line_bytes);
    assert_eq!(r.counts, counts(1, 0, 0, 0, 0));
    let name = &case(&suite(&root(&r).tests[0]).tests[0]).name;
    assert_eq!(name.len(), limits.max_line_bytes - "  ok 1 ".len());
}

/// Total bytes of diagnostic text kept in a tree.
fn log_bytes(s: &Suite) -> usize {
    let mut total = s.log.iter().map(String::len).sum();
    for t in &s.tests {
        total += match t {
            TestNode::Case(c) => c.log.iter().map(String::len).sum(),
            TestNode::Suite(c) => log_bytes(c),
        };
    }
    total
}

#[test]
fn diagnostic_logs_are_capped_per_test_and_in_total() {
    // Arrange
    let limits = Limits {
        max_log_lines: 10,
        max_log_bytes: 5_000,
        ..Limits::default()
    };
    let mut p = KtapParser::with_limits(limits);
    p.feed(b"KTAP version 1\n1..3\n");

    // Act
    for n in 1..=3 {
        for _ in 0..1_000 {
            p.feed(&[b'#'; 300]);
            p.feed(b"\n");
        }
        p.feed(format!("ok {n} t{n}\n").as_bytes());
    }
    let r = p.finish();

    // Assert
    assert_eq!(r.counts, counts(3, 0, 0, 0, 0));
    let top = root(&r);
    assert!(log_bytes(top) <= 5_000);
    let first = case(&top.tests[0]);
    assert_eq!((first.log.len(), first.log_dropped), (10, 990));
    assert_eq!(
        case(&top.tests[2]).log_dropped,
        1_000 - case(&top.tests[2]).log.len() as u64
    );
}

#[test]
fn results_over_the_node_limit_are_counted_but_not_kept() {
    // Arrange
    let limits = Limits {
        max_nodes: 100,
        ..Limits::default()
    };
    let mut p = KtapParser::with_limits(limits);
    p.feed(b"KTAP version 1\n");

    // Act
    for n in 1..=200_000u32 {
        let verdict = if n % 1000 == 0 { "not ok" } else { "ok" };
        p.feed(format!("{verdict} {n} t\n").as_bytes());
    }
    let r = p.finish();

    // Assert
    assert_eq!(r.counts, counts(199_800, 200, 0, 0, 0));
    let top = root(&r);
    assert_eq!((top.tests.len(), top.omitted), (100, 199_900));
}

#[test]
fn binary_garbage_never_panics_and_keeps_memory_bounded() {
    // Arrange: a deterministic byte soup, with and without a version line in front.
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut soup = vec![0u8; 4 << 20];
    for b in soup.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let limits = Limits::default();

    for prefix in [
        &b""[..],
        b"KTAP version 1\n",
        b"TAP version 14\n  # Subtest: s\n",
    ] {
        // Act
        let mut p = KtapParser::new();
        p.feed(prefix);
        for chunk in soup.chunks(777) {
            p.feed(chunk);
        }
        let r = p.finish();

        // Assert
        if let Some(top) = &r.root {
            assert!(log_bytes(top) <= limits.max_log_bytes);
        }
        assert!(r.errors.len() <= limits.max_errors + 1);
    }
}

#[test]
fn report_serializes_to_json_with_kinds_and_statuses() {
    // Arrange
    let r = parse(sample_named("kunit_skip"));

    // Act
    let v = serde_json::to_value(&r).expect("serializable");

    // Assert
    assert_eq!(v["status"], "passed");
    assert_eq!(v["counts"]["skipped"], 4);
    let hw = &v["root"]["tests"][1];
    assert_eq!(hw["kind"], "suite");
    assert_eq!(hw["status"], "skipped");
    assert_eq!(hw["tests"][0]["kind"], "case");
    assert_eq!(hw["tests"][0]["directive"], "SKIP no hardware");
}
