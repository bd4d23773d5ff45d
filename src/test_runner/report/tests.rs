use std::io::Write as _;

use super::*;
use crate::test_runner::ktap::KtapParser;

fn ktap(text: &str) -> KtapReport {
    let mut p = KtapParser::new();
    p.feed(text.as_bytes());
    p.finish()
}

const NESTED: &str = "KTAP version 1
1..1
    KTAP version 1
    # Subtest: time
    1..2
        KTAP version 1
        # Subtest: dates
        ok 1 year 1970
        # dates: EXPECTATION FAILED at t.c:9
        not ok 2 year 2038
        ok 3 leap # SKIP not here
    not ok 1 dates
    ok 2 plain
not ok 1 time
";

const CRASHED: &str = "KTAP version 1
1..2
    KTAP version 1
    # Subtest: crashy
    1..4
    ok 1 first
BUG: kernel NULL pointer dereference
";

fn run(cases: Vec<CaseResult>) -> RunReport {
    RunReport {
        name: "ember test".to_string(),
        cases,
    }
}

fn kunit_case(text: &str, status: CaseStatus) -> CaseResult {
    let mut case = CaseResult::new("kunit", status, Duration::from_millis(1500));
    case.file = Some("tests/kunit.toml".to_string());
    case.subtests.push(ktap(text));
    case
}

/// The `<testcase ...>` start tags of a document.
fn testcases(xml: &str) -> Vec<&str> {
    xml.match_indices("<testcase ")
        .map(|(i, _)| {
            let end = xml[i..].find('>').expect("tag end");
            &xml[i..i + end + 1]
        })
        .collect()
}

/// What the elements after a testcase's start tag say, up to its end.
fn body_of<'a>(xml: &'a str, start_tag: &str) -> &'a str {
    let i = xml.find(start_tag).expect("testcase present") + start_tag.len();
    if start_tag.ends_with("/>") {
        return "";
    }
    let end = xml[i..].find("</testcase>").expect("testcase end");
    &xml[i..i + end]
}

#[test]
fn junit_flattens_nested_ktap_suites_into_dotted_classnames() {
    // Arrange
    let report = run(vec![kunit_case(NESTED, CaseStatus::Failed)]);

    // Act
    let xml = report.junit_string();

    // Assert
    let tags = testcases(&xml);
    assert_eq!(
        tags,
        [
            r#"<testcase classname="kunit" name="kunit" file="tests/kunit.toml" time="1.500">"#,
            r#"<testcase classname="kunit.time.dates" name="year 1970" file="tests/kunit.toml"/>"#,
            r#"<testcase classname="kunit.time.dates" name="year 2038" file="tests/kunit.toml">"#,
            r#"<testcase classname="kunit.time.dates" name="leap" file="tests/kunit.toml">"#,
            r#"<testcase classname="kunit.time" name="plain" file="tests/kunit.toml"/>"#,
        ]
    );
    let failed = body_of(&xml, tags[2]);
    assert!(
        failed.contains(r#"<failure message="not ok" type="failed">"#),
        "{failed}"
    );
    assert!(failed.contains("# dates: EXPECTATION FAILED at t.c:9"));
    assert!(body_of(&xml, tags[3]).contains(r#"<skipped message="SKIP not here"/>"#));
}

#[test]
fn junit_counts_are_the_ktap_counts_plus_one_per_case() {
    // Arrange
    let report = run(vec![
        kunit_case(NESTED, CaseStatus::Failed),
        kunit_case(CRASHED, CaseStatus::Failed),
    ]);
    let k = report.ktap_counts();

    // Act
    let xml = report.junit_string();

    // Assert
    let expected = format!(
        r#"<testsuites name="ember test" tests="{}" failures="{}" errors="{}" skipped="{}" time="3.000">"#,
        k.total() + 2,
        k.failed + 2,
        k.crashed,
        k.skipped
    );
    assert!(xml.contains(&expected), "{expected}\n{xml}");
    assert_eq!(testcases(&xml).len() as u64, k.total() + 2);
}

#[test]
fn junit_lists_tests_that_never_reported_as_errors_by_number() {
    // Arrange
    let report = run(vec![kunit_case(CRASHED, CaseStatus::Failed)]);

    // Act
    let xml = report.junit_string();

    // Assert
    let names: Vec<&str> = testcases(&xml)
        .iter()
        .map(|t| {
            t.split(" name=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or("")
        })
        .collect();
    assert_eq!(names, ["kunit", "first", "#2", "#3", "#4", "#2"]);
    let missing = testcases(&xml)[2];
    assert!(missing.contains(r#"classname="kunit.crashy""#));
    let body = body_of(&xml, missing);
    assert!(body.contains(r#"<error message="no result: the output ended before this test reported (plan 1..4; crashed or timed out)" type="crashed">"#), "{body}");
    assert!(body.contains("BUG: kernel NULL pointer dereference"));
    let next = body_of(&xml, testcases(&xml)[3]);
    assert!(
        !next.contains("BUG: kernel NULL pointer dereference"),
        "the log is given once"
    );
    let case_body = body_of(&xml, testcases(&xml)[0]);
    assert!(case_body.contains("KTAP: Test: crashy: missing expected subtest! (x3)"));
}

#[test]
fn junit_maps_case_statuses_to_failure_error_and_skipped() {
    // Arrange
    let mut timed_out = CaseResult::new("slow", CaseStatus::TimedOut, Duration::from_secs(30));
    timed_out.log_path = Some(PathBuf::from("/tmp/slow.log"));
    let mut broken = CaseResult::new("broken", CaseStatus::Error, Duration::ZERO);
    broken.message = Some("kernel image not found".to_string());
    let mut skipped = CaseResult::new("skip", CaseStatus::Skipped, Duration::ZERO);
    skipped.message = Some("needs /dev/kvm".to_string());
    let passed = CaseResult::new("fine", CaseStatus::Passed, Duration::from_millis(250));
    let report = run(vec![timed_out, broken, skipped, passed]);

    // Act
    let xml = report.junit_string();

    // Assert
    assert!(xml.contains(
        "<failure message=\"timed out after 30.0 s\" type=\"timeout\">timed out after 30.0 s\nserial log: /tmp/slow.log</failure>"
    ));
    assert!(xml.contains(
        r#"<error message="kernel image not found" type="error">kernel image not found</error>"#
    ));
    assert!(xml.contains(r#"<skipped message="needs /dev/kvm"/>"#));
    assert!(xml.contains(r#"<testcase classname="fine" name="fine" time="0.250"/>"#));
    assert!(xml.contains(r#"tests="4" failures="1" errors="1" skipped="1""#));
}

#[test]
fn junit_escapes_markup_and_replaces_characters_illegal_in_xml() {
    // Arrange
    let mut case = CaseResult::new("a<b>&\"c'", CaseStatus::Failed, Duration::ZERO);
    case.message = Some("bad\u{0}\u{1b}[31mred\u{ffff}\ttab\nline".to_string());
    case.log_tail = "]]> <tag> & \u{8}\u{b}\u{c} ok\r\n".to_string();
    let report = run(vec![case]);

    // Act
    let xml = report.junit_string();

    // Assert
    assert!(
        xml.contains(r#"name="a&lt;b&gt;&amp;&quot;c&apos;""#),
        "{xml}"
    );
    assert!(
        xml.contains(r#"message="bad\x00\x1b[31mred\u{ffff}&#9;tab&#10;line""#),
        "{xml}"
    );
    assert!(
        xml.contains("<system-out>]]&gt; &lt;tag&gt; &amp; \\x08\\x0b\\x0c ok\r\n</system-out>")
    );
    let illegal = xml.chars().any(|c| {
        !matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
    });
    assert!(!illegal);
}

#[test]
fn junit_system_out_keeps_only_the_end_of_a_long_log() {
    // Arrange
    let mut case = CaseResult::new("big", CaseStatus::Passed, Duration::ZERO);
    case.log_tail = format!("{}THE END", "é".repeat(100_000));
    let report = run(vec![case]);

    // Act
    let xml = report.junit_string();

    // Assert
    let out = xml
        .split("<system-out>")
        .nth(1)
        .and_then(|s| s.split("</system-out>").next())
        .expect("system-out");
    assert!(out.len() <= MAX_SYSTEM_OUT && out.len() > MAX_SYSTEM_OUT - 4);
    assert!(out.ends_with("THE END"));
}

#[test]
fn junit_summarizes_absurd_numbers_of_missing_tests_in_one_testcase() {
    // Arrange
    let report = run(vec![kunit_case(
        "KTAP version 1\n1..4294967295\n",
        CaseStatus::Failed,
    )]);

    // Act
    let xml = report.junit_string();

    // Assert
    let tags = testcases(&xml);
    assert_eq!(tags.len() as u64, 1 + MAX_MISSING_LISTED + 1);
    let last = tags[tags.len() - 1];
    assert!(last.contains(r##"name="#1001..#4294967295""##), "{last}");
    assert!(body_of(&xml, last).contains("no result from 4294966295 more tests"));
}

#[test]
fn junit_stands_in_one_testcase_for_results_over_the_node_limit() {
    // Arrange
    let mut text = String::from("KTAP version 1\n");
    for n in 1..=150 {
        let verdict = if n == 140 { "not ok" } else { "ok" };
        text.push_str(&format!("{verdict} {n} t{n}\n"));
    }
    let mut p = KtapParser::with_limits(crate::test_runner::ktap::Limits {
        max_nodes: 100,
        ..Default::default()
    });
    p.feed(text.as_bytes());
    let mut case = CaseResult::new("many", CaseStatus::Failed, Duration::ZERO);
    case.subtests.push(p.finish());
    let report = run(vec![case]);

    // Act
    let xml = report.junit_string();

    // Assert
    let tags = testcases(&xml);
    assert_eq!(tags.len(), 1 + 100 + 1);
    let last = tags[tags.len() - 1];
    assert!(last.contains(r#"name="50 more results""#));
    assert!(body_of(&xml, last).contains("passed 49, failed 1, crashed 0, skipped 0"));
}

#[test]
fn json_carries_the_cases_their_ktap_trees_and_the_counts() {
    // Arrange
    let mut case = kunit_case(CRASHED, CaseStatus::Failed);
    case.log_path = Some(PathBuf::from("/logs/kunit.log"));
    let report = run(vec![
        case,
        CaseResult::new("t", CaseStatus::TimedOut, Duration::from_secs(2)),
    ]);
    let mut out = Vec::new();

    // Act
    report.write_json(&mut out).expect("json written");

    // Assert
    let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
    assert_eq!(v["name"], "ember test");
    assert_eq!(v["cases_counts"]["failed"], 1);
    assert_eq!(v["cases_counts"]["timed_out"], 1);
    assert_eq!(v["ktap_counts"]["passed"], 1);
    assert_eq!(v["ktap_counts"]["crashed"], 4);
    let kunit = &v["cases"][0];
    assert_eq!(kunit["status"], "failed");
    assert_eq!(kunit["duration_secs"], 1.5);
    assert_eq!(kunit["log_path"], "/logs/kunit.log");
    assert_eq!(kunit["ktap_counts"]["errors"], 5);
    let crashy = &kunit["subtests"][0]["root"]["tests"][0];
    assert_eq!(crashy["name"], "crashy");
    assert_eq!(crashy["missing"], 3);
    assert_eq!(v["cases"][1]["subtests"], serde_json::json!([]));
}

#[test]
fn log_tail_starts_at_a_line_boundary_within_the_limit() {
    // Arrange
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    for n in 0..1000 {
        writeln!(file, "line {n}").expect("write");
    }
    file.write_all(b"last \xff\n").expect("write");

    // Act
    let tail = read_log_tail(file.path(), 40).expect("read tail");
    let whole = read_log_tail(file.path(), 1 << 20).expect("read whole");

    // Assert
    assert_eq!(tail, "line 997\nline 998\nline 999\nlast \u{fffd}\n");
    assert!(whole.starts_with("line 0\n"));
}

#[test]
fn log_tail_of_a_missing_file_names_the_file() {
    // Act
    let err = read_log_tail(Path::new("/nonexistent/ember.log"), 10).unwrap_err();

    // Assert
    assert_eq!(
        crate::error_chain(&err),
        "cannot read the log '/nonexistent/ember.log': No such file or directory (os error 2)"
    );
}

#[test]
fn junit_numbers_missing_tests_up_to_the_largest_plan_without_overflow() {
    // Arrange: a suite built by hand, planned to u64::MAX with the last three missing.
    let mut report = ktap("KTAP version 1\n1..1\nok 1 a\n");
    let root = report.root.as_mut().expect("document");
    root.plan = Some(u64::MAX);
    root.missing = 3;
    let mut case = CaseResult::new("edge", CaseStatus::Failed, Duration::ZERO);
    case.subtests.push(report);

    // Act
    let xml = run(vec![case]).junit_string();

    // Assert
    let last = *testcases(&xml).last().expect("testcases");
    assert!(last.contains(&format!("name=\"#{}\"", u64::MAX)), "{last}");
    assert_eq!(testcases(&xml).len(), 1 + 1 + 3);
}
