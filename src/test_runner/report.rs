//! The results of `ember test` cases, and the files CI systems read: JUnit XML (Jenkins,
//! GitLab, GitHub test reporters) and JSON.
//!
//! Each case is one `<testsuite>`: a `<testcase>` for the case itself (the boot, its exit
//! status, its timeout) carrying the tail of the serial log, then one `<testcase>` per KTAP
//! test the guest reported, flattened as `classname="case.suite.subsuite" name="test"`.
//! The KTAP testcases are exactly the tests kunit.py counts, so their numbers of passes,
//! failures (`<failure>`), crashes (`<error>`) and skips (`<skipped>`) are kunit.py's.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::ktap::{Counts, KtapReport, Status, Suite, TestNode};

/// Errors of writing reports.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The output could not be written.
    #[error("cannot write the report")]
    Write(#[source] io::Error),
    /// The JSON encoder failed.
    #[error("cannot encode the JSON report")]
    Json(#[source] serde_json::Error),
    /// A serial log could not be read.
    #[error("cannot read the log '{}'", path.display())]
    ReadLog {
        /// The log.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// How an `ember test` case ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseStatus {
    /// The guest ran and reported success.
    Passed,
    /// The guest ran and reported failure (exit status, a failed KTAP test, ...).
    Failed,
    /// The case was not run.
    Skipped,
    /// The guest did not finish in time.
    TimedOut,
    /// The case could not be run (bad definition, boot failure, host problem).
    Error,
}

/// One `ember test` case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// The file that defines the case.
    pub file: Option<String>,
    /// How it ended.
    pub status: CaseStatus,
    /// How long it ran.
    #[serde(rename = "duration_secs", serialize_with = "as_secs")]
    pub duration: Duration,
    /// Why it failed, timed out or was skipped.
    pub message: Option<String>,
    /// Where the whole serial log is.
    pub log_path: Option<PathBuf>,
    /// The end of the serial log (see [`read_log_tail`]).
    pub log_tail: String,
    /// What the guest reported in KTAP/TAP, one report per stream parsed.
    pub subtests: Vec<KtapReport>,
    /// For a case that ran a command in the guest: from the case's start to the guest
    /// starting the command.
    #[serde(
        rename = "command_start_secs",
        serialize_with = "opt_as_secs",
        skip_serializing_if = "Option::is_none"
    )]
    pub command_start: Option<Duration>,
}

impl CaseResult {
    /// A case with no message, log or subtests.
    pub fn new(name: impl Into<String>, status: CaseStatus, duration: Duration) -> Self {
        CaseResult {
            name: name.into(),
            file: None,
            status,
            duration,
            message: None,
            log_path: None,
            log_tail: String::new(),
            subtests: Vec::new(),
            command_start: None,
        }
    }

    /// The KTAP counts over all the case's subtests.
    pub fn ktap_counts(&self) -> Counts {
        let mut counts = Counts::default();
        for r in &self.subtests {
            counts.add(&r.counts);
        }
        counts
    }
}

/// How many cases ended how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CaseCounts {
    /// Cases that passed.
    pub passed: u64,
    /// Cases that failed.
    pub failed: u64,
    /// Cases not run.
    pub skipped: u64,
    /// Cases that timed out.
    pub timed_out: u64,
    /// Cases that could not be run.
    pub error: u64,
}

/// A whole `ember test` run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// The run's name (the `<testsuites name=..>`).
    pub name: String,
    /// The cases, in order.
    pub cases: Vec<CaseResult>,
}

impl RunReport {
    /// How many cases ended how.
    pub fn case_counts(&self) -> CaseCounts {
        let mut c = CaseCounts::default();
        for case in &self.cases {
            let n = match case.status {
                CaseStatus::Passed => &mut c.passed,
                CaseStatus::Failed => &mut c.failed,
                CaseStatus::Skipped => &mut c.skipped,
                CaseStatus::TimedOut => &mut c.timed_out,
                CaseStatus::Error => &mut c.error,
            };
            *n += 1;
        }
        c
    }

    /// The KTAP counts over all cases.
    pub fn ktap_counts(&self) -> Counts {
        let mut counts = Counts::default();
        for case in &self.cases {
            counts.add(&case.ktap_counts());
        }
        counts
    }

    /// The JUnit XML document.
    pub fn junit_string(&self) -> String {
        let suites: Vec<(&CaseResult, Vec<JunitCase>)> =
            self.cases.iter().map(|c| (c, junit_cases(c))).collect();
        let mut total = Tally::default();
        let mut time = 0.0;
        for (case, cases) in &suites {
            total.add(&Tally::of(cases));
            time += case.duration.as_secs_f64();
        }
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        out.push_str("<testsuites");
        attr(&mut out, "name", &self.name);
        total.write_attrs(&mut out);
        attr(&mut out, "time", &format!("{time:.3}"));
        out.push_str(">\n");
        for (case, cases) in &suites {
            write_suite(&mut out, case, cases);
        }
        out.push_str("</testsuites>\n");
        out
    }

    /// Writes the JUnit XML document.
    pub fn write_junit(&self, out: &mut dyn Write) -> Result<(), ReportError> {
        out.write_all(self.junit_string().as_bytes())
            .map_err(ReportError::Write)
    }

    /// Writes the JSON document: the run's name, case and KTAP counts, and every case with
    /// its own KTAP counts and tree.
    pub fn write_json(&self, out: &mut dyn Write) -> Result<(), ReportError> {
        #[derive(Serialize)]
        struct JsonCase<'a> {
            #[serde(flatten)]
            case: &'a CaseResult,
            ktap_counts: Counts,
        }
        #[derive(Serialize)]
        struct JsonRun<'a> {
            name: &'a str,
            cases_counts: CaseCounts,
            ktap_counts: Counts,
            cases: Vec<JsonCase<'a>>,
        }
        let run = JsonRun {
            name: &self.name,
            cases_counts: self.case_counts(),
            ktap_counts: self.ktap_counts(),
            cases: self
                .cases
                .iter()
                .map(|case| JsonCase {
                    case,
                    ktap_counts: case.ktap_counts(),
                })
                .collect(),
        };
        serde_json::to_writer_pretty(&mut *out, &run).map_err(ReportError::Json)?;
        out.write_all(b"\n").map_err(ReportError::Write)
    }
}

/// The last `max_bytes` of a log file (from the first line that starts inside them),
/// invalid UTF-8 replaced.
pub fn read_log_tail(path: &Path, max_bytes: u64) -> Result<String, ReportError> {
    let err = |source| ReportError::ReadLog {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let len = file.metadata().map_err(err)?.len();
    let start = len.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start)).map_err(err)?;
    let mut bytes = Vec::new();
    file.take(max_bytes).read_to_end(&mut bytes).map_err(err)?;
    let mut text = &bytes[..];
    if start > 0 {
        if let Some(nl) = text.iter().position(|&b| b == b'\n') {
            text = &text[nl + 1..];
        }
    }
    Ok(String::from_utf8_lossy(text).into_owned())
}

fn as_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn opt_as_secs<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// Most of a log tail that goes into `<system-out>`.
const MAX_SYSTEM_OUT: usize = 64 * 1024;
/// Most of a message attribute.
const MAX_MESSAGE_CHARS: usize = 1024;
/// Missing KTAP tests listed one by one per suite; the rest share one testcase.
const MAX_MISSING_LISTED: u64 = 1000;

/// What a `<testcase>` says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Passed,
    Failure,
    Error,
    Skipped,
}

/// One `<testcase>` to write.
#[derive(Debug)]
struct JunitCase {
    classname: String,
    name: String,
    file: Option<String>,
    time: Option<f64>,
    outcome: Outcome,
    kind: &'static str,
    message: String,
    body: String,
    system_out: String,
    system_err: String,
}

impl JunitCase {
    fn new(classname: String, name: String, outcome: Outcome, kind: &'static str) -> Self {
        JunitCase {
            classname,
            name,
            file: None,
            time: None,
            outcome,
            kind,
            message: String::new(),
            body: String::new(),
            system_out: String::new(),
            system_err: String::new(),
        }
    }

    /// A failure's log is the body of its `<failure>`/`<error>`; otherwise the test's output.
    fn set_log(&mut self, log: String) {
        match self.outcome {
            Outcome::Failure | Outcome::Error => self.body = log,
            Outcome::Passed | Outcome::Skipped => self.system_out = log,
        }
    }
}

/// `tests`, `failures`, `errors`, `skipped` of a `<testsuite>`.
#[derive(Debug, Default)]
struct Tally {
    tests: u64,
    failures: u64,
    errors: u64,
    skipped: u64,
}

impl Tally {
    fn of(cases: &[JunitCase]) -> Self {
        let mut t = Tally::default();
        for c in cases {
            t.tests += 1;
            match c.outcome {
                Outcome::Passed => {}
                Outcome::Failure => t.failures += 1,
                Outcome::Error => t.errors += 1,
                Outcome::Skipped => t.skipped += 1,
            }
        }
        t
    }

    fn add(&mut self, o: &Tally) {
        self.tests += o.tests;
        self.failures += o.failures;
        self.errors += o.errors;
        self.skipped += o.skipped;
    }

    fn write_attrs(&self, out: &mut String) {
        let _ = write!(
            out,
            " tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\"",
            self.tests, self.failures, self.errors, self.skipped
        );
    }
}

/// The testcases of one case: the case itself, then its KTAP tests.
fn junit_cases(case: &CaseResult) -> Vec<JunitCase> {
    let (outcome, kind, default_message) = match case.status {
        CaseStatus::Passed => (Outcome::Passed, "", String::new()),
        CaseStatus::Failed => (Outcome::Failure, "failed", "failed".to_string()),
        CaseStatus::Skipped => (Outcome::Skipped, "skipped", "skipped".to_string()),
        CaseStatus::TimedOut => (
            Outcome::Failure,
            "timeout",
            format!("timed out after {:.1} s", case.duration.as_secs_f64()),
        ),
        CaseStatus::Error => (Outcome::Error, "error", "error".to_string()),
    };
    let mut own = JunitCase::new(case.name.clone(), case.name.clone(), outcome, kind);
    own.file = case.file.clone();
    own.time = Some(case.duration.as_secs_f64());
    own.message = case.message.clone().unwrap_or(default_message);
    own.body = own.message.clone();
    if let Some(path) = &case.log_path {
        own.body
            .push_str(&format!("\nserial log: {}", path.display()));
    }
    own.system_out = tail_str(&case.log_tail, MAX_SYSTEM_OUT).to_string();
    for report in &case.subtests {
        for e in &report.errors {
            own.system_err.push_str(&format!("KTAP: {e}\n"));
        }
    }
    let mut cases = vec![own];
    for report in &case.subtests {
        if let Some(root) = &report.root {
            flatten(&mut cases, &case.name, root, case.file.as_deref());
        }
    }
    cases
}

/// Adds the testcases of `suite`'s subtree; `path` is the classname of its tests.
fn flatten(out: &mut Vec<JunitCase>, path: &str, suite: &Suite, file: Option<&str>) {
    let mut kept = Counts::default();
    for node in &suite.tests {
        match node {
            TestNode::Case(c) => {
                let mut j = ktap_case(path, display_name(&c.name, c.number), c.status);
                j.message = describe(c.status, c.directive.as_deref());
                j.set_log(c.log.join("\n"));
                j.file = file.map(str::to_string);
                kept.add_leaf(c.status);
                out.push(j);
            }
            TestNode::Suite(s) => {
                let name = display_name(&s.name, s.number);
                kept.add(&s.counts);
                if s.counted_self {
                    let mut j = ktap_case(path, name, s.status);
                    j.message = describe(s.status, s.directive.as_deref());
                    j.set_log(s.log.join("\n"));
                    j.file = file.map(str::to_string);
                    out.push(j);
                } else {
                    flatten(out, &format!("{path}.{name}"), s, file);
                }
            }
        }
    }
    missing_cases(out, path, suite);
    omitted_case(out, path, suite, &kept);
}

/// One testcase per planned test that never reported (crashed, in kunit.py's terms).
fn missing_cases(out: &mut Vec<JunitCase>, path: &str, suite: &Suite) {
    let Some(plan) = suite.plan else {
        return;
    };
    if suite.missing == 0 {
        return;
    }
    let first = plan.saturating_sub(suite.missing).saturating_add(1);
    let listed = suite.missing.min(MAX_MISSING_LISTED);
    let last_listed = first.saturating_add(listed - 1);
    let message = format!(
        "no result: the output ended before this test reported (plan 1..{plan}; crashed or timed out)"
    );
    for n in first..=last_listed {
        let mut j = ktap_case(path, format!("#{n}"), Status::Crashed);
        j.message = message.clone();
        if n == first {
            // What the suite printed last (an oops, a panic) is why; once is enough.
            j.body = suite.log.join("\n");
        }
        out.push(j);
    }
    if suite.missing > listed {
        let rest = suite.missing - listed;
        let name = format!("#{}..#{plan}", last_listed.saturating_add(1));
        let mut j = ktap_case(path, name, Status::Crashed);
        j.message = format!("no result from {rest} more tests: {message}");
        out.push(j);
    }
}

/// One testcase standing for the subtests counted but not kept (parser node limit).
fn omitted_case(out: &mut Vec<JunitCase>, path: &str, suite: &Suite, kept: &Counts) {
    if suite.omitted == 0 {
        return;
    }
    let c = &suite.counts;
    let failed = c.failed.saturating_sub(kept.failed);
    let crashed = c
        .crashed
        .saturating_sub(kept.crashed)
        .saturating_sub(suite.missing);
    let passed = c.passed.saturating_sub(kept.passed);
    let skipped = c.skipped.saturating_sub(kept.skipped);
    let status = Counts {
        passed,
        failed,
        crashed,
        skipped,
        errors: 0,
    }
    .status();
    let mut j = ktap_case(path, format!("{} more results", suite.omitted), status);
    j.message = format!(
        "{} results not kept (parser node limit): passed {passed}, failed {failed}, \
         crashed {crashed}, skipped {skipped}",
        suite.omitted
    );
    j.body = j.message.clone();
    out.push(j);
}

fn ktap_case(path: &str, name: String, status: Status) -> JunitCase {
    let (outcome, kind) = match status {
        Status::Passed | Status::NoTests => (Outcome::Passed, ""),
        Status::Failed => (Outcome::Failure, "failed"),
        Status::Skipped => (Outcome::Skipped, "skipped"),
        Status::Crashed | Status::NoKtap => (Outcome::Error, "crashed"),
    };
    JunitCase::new(path.to_string(), name, outcome, kind)
}

fn describe(status: Status, directive: Option<&str>) -> String {
    let verdict = match status {
        Status::Passed => "ok",
        Status::Failed => "not ok",
        Status::Skipped => "skipped",
        Status::Crashed => "crashed: no result line (the output ended or a subtest crashed)",
        Status::NoTests => "no tests run",
        Status::NoKtap => "no KTAP output",
    };
    match directive {
        Some(d) if status == Status::Skipped => d.to_string(),
        Some(d) => format!("{verdict} # {d}"),
        None => verdict.to_string(),
    }
}

/// A KTAP name for display; an empty one becomes its number.
fn display_name(name: &str, number: u64) -> String {
    if name.is_empty() {
        format!("#{number}")
    } else {
        name.to_string()
    }
}

trait AddLeaf {
    fn add_leaf(&mut self, status: Status);
}

impl AddLeaf for Counts {
    fn add_leaf(&mut self, status: Status) {
        let n = match status {
            Status::Passed => &mut self.passed,
            Status::Failed => &mut self.failed,
            Status::Skipped => &mut self.skipped,
            Status::Crashed | Status::NoKtap => &mut self.crashed,
            Status::NoTests => return,
        };
        *n += 1;
    }
}

fn write_suite(out: &mut String, case: &CaseResult, cases: &[JunitCase]) {
    out.push_str("  <testsuite");
    attr(out, "name", &case.name);
    Tally::of(cases).write_attrs(out);
    attr(out, "time", &format!("{:.3}", case.duration.as_secs_f64()));
    if let Some(file) = &case.file {
        attr(out, "file", file);
    }
    out.push_str(">\n");
    for c in cases {
        write_case(out, c);
    }
    out.push_str("  </testsuite>\n");
}

fn write_case(out: &mut String, c: &JunitCase) {
    out.push_str("    <testcase");
    attr(out, "classname", &c.classname);
    attr(out, "name", &c.name);
    if let Some(file) = &c.file {
        attr(out, "file", file);
    }
    if let Some(t) = c.time {
        attr(out, "time", &format!("{t:.3}"));
    }
    if c.outcome == Outcome::Passed && c.system_out.is_empty() && c.system_err.is_empty() {
        out.push_str("/>\n");
        return;
    }
    out.push_str(">\n");
    let element = match c.outcome {
        Outcome::Passed => None,
        Outcome::Failure => Some("failure"),
        Outcome::Error => Some("error"),
        Outcome::Skipped => Some("skipped"),
    };
    if let Some(element) = element {
        let _ = write!(out, "      <{element}");
        attr(out, "message", truncate(&c.message, MAX_MESSAGE_CHARS));
        if element != "skipped" {
            attr(out, "type", c.kind);
        }
        if element == "skipped" || c.body.is_empty() {
            out.push_str("/>\n");
        } else {
            out.push('>');
            escape(out, &c.body, false);
            let _ = writeln!(out, "</{element}>");
        }
    }
    for (tag, text) in [("system-out", &c.system_out), ("system-err", &c.system_err)] {
        if !text.is_empty() {
            let _ = write!(out, "      <{tag}>");
            escape(out, text, false);
            let _ = writeln!(out, "</{tag}>");
        }
    }
    out.push_str("    </testcase>\n");
}

/// ` name="value"`, escaped.
fn attr(out: &mut String, name: &str, value: &str) {
    let _ = write!(out, " {name}=\"");
    escape(out, value, true);
    out.push('"');
}

/// Escapes `s` for XML 1.0 text or attribute values. Characters XML 1.0 forbids even as
/// references (most C0 controls, U+FFFE, U+FFFF) are written as `\xNN` / `\u{NNNN}`; in
/// attributes, tab and line breaks become references so parsers do not fold them.
fn escape(out: &mut String, s: &str, attribute: bool) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if attribute => out.push_str("&quot;"),
            '\'' if attribute => out.push_str("&apos;"),
            '\t' | '\n' | '\r' if attribute => {
                let _ = write!(out, "&#{};", u32::from(c));
            }
            '\t' | '\n' | '\r' => out.push(c),
            '\u{0}'..='\u{1f}' => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            '\u{fffe}' | '\u{ffff}' => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            _ => out.push(c),
        }
    }
}

/// At most `max` characters of `s`.
fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// At most the last `max_bytes` bytes of `s`, cut at a character boundary.
fn tail_str(s: &str, max_bytes: usize) -> &str {
    let mut start = s.len().saturating_sub(max_bytes);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests;
