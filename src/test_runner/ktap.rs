//! Incremental KTAP / TAP parser for the test results a guest prints on its console.
//!
//! Feed the serial output in chunks of any size with [`KtapParser::feed`], then call
//! [`KtapParser::finish`] when the guest is gone (powered off, crashed, timed out). The result
//! is a tree of suites and test cases with pass/fail/skip/crash counts.
//!
//! # Compatibility with kunit.py
//!
//! The counts must equal what the kernel's `tools/testing/kunit/kunit.py parse` reports on the
//! same log, so the grammar follows its parser (Linux 6.1 `kunit_parser.py`), not an idealized
//! TAP 14 reading:
//!
//! - Lines are split like Python's `str.splitlines()` (`\n`, `\r`, `\r\n`, `\v`, `\f`,
//!   `\x1c`-`\x1e`, U+0085, U+2028, U+2029), invalid UTF-8 bytes become `\xNN`, trailing
//!   whitespace is removed.
//! - Output starts at the first line that ends in `KTAP version N` or `TAP version N`; the
//!   characters before it on that line (a printk timestamp, a console prefix) are cut from the
//!   start of every later line, by count. Before that, only `kunit executor: ...` lines count.
//! - Output ends at `List of all partitions:`, `Kernel panic - not syncing: VFS:` or
//!   `reboot: System halted`, or when the top-level plan is satisfied, or at [`KtapParser::finish`].
//! - Nesting is given by a `KTAP version`/`TAP version` line and/or a `# Subtest: name` line,
//!   not by indentation (kselftest's `# `-prefixed nested output is diagnostics).
//! - `ok N name`, `not ok N name`, with `# SKIP` anywhere in the directive meaning skipped
//!   (after `ok` or `not ok`); other directives (`# TODO`, `# TIMEOUT`, `# exit=1`) keep the
//!   ok/not ok verdict, so a failing `# TODO` test counts as failed, as in kunit.py.
//! - Tests a plan promised but that never reported (the guest crashed or timed out) are
//!   counted as crashed, one per missing test; a suite whose own result line never came is
//!   crashed; a suite that ran nothing is "no tests" and an error.
//! - Counts are over leaves only (a suite's own ok/not ok line is not counted when it has
//!   counted subtests), exactly like `TestCounts`.
//!
//! Where kunit.py itself would raise an exception (a stream ending right after a result line
//! inside a suite without a `# Subtest:` name), this parser records a parse error instead.
//!
//! # Hostile input
//!
//! Everything here comes from the guest. Memory is bounded by [`Limits`]: the part of a line
//! past `max_line_bytes` is dropped, nesting deeper than `max_depth` is read as diagnostics,
//! nodes past `max_nodes` and logs past their budgets are counted but not kept, and a plan of
//! `1..4294967295` followed by a crash is one counter, not four billion nodes. Nothing panics.

use serde::Serialize;

use self::text::{LineSplitter, ResultLine};

mod text;

/// Bounds on what a guest's output can make the parser keep in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one line that are looked at; the rest of a longer line is dropped.
    pub max_line_bytes: usize,
    /// Suites nested deeper than this have their version and `# Subtest:` lines read as
    /// diagnostics (kunit.py itself dies of Python's recursion limit near 1,000).
    pub max_depth: usize,
    /// Test nodes kept in the tree; later ones are counted but not kept.
    pub max_nodes: usize,
    /// Diagnostic lines kept per test.
    pub max_log_lines: usize,
    /// Characters kept of one diagnostic line.
    pub max_log_line_chars: usize,
    /// Bytes of diagnostic text kept over the whole tree.
    pub max_log_bytes: usize,
    /// Parse error messages kept (all of them are counted in [`Counts::errors`]).
    pub max_errors: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 64 * 1024,
            max_depth: 64,
            max_nodes: 100_000,
            max_log_lines: 1_000,
            max_log_line_chars: 4 * 1024,
            max_log_bytes: 16 << 20,
            max_errors: 1_000,
        }
    }
}

/// The outcome of a test, a suite or a whole KTAP document (kunit.py's `TestStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// `ok` without a SKIP directive.
    Passed,
    /// `not ok` without a SKIP directive.
    Failed,
    /// A `# SKIP` directive, or a suite whose tests were all skipped.
    Skipped,
    /// No result: the output ended before the test reported (the guest crashed or timed out),
    /// or a subtest of it crashed.
    Crashed,
    /// A suite that ran no tests.
    NoTests,
    /// No KTAP or TAP output was found at all (only for a whole document).
    NoKtap,
}

/// How many tests (leaves) ended how, and how many parse errors were seen (kunit.py's
/// `TestCounts`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests that never reported, or whose suite crashed under them.
    pub crashed: u64,
    /// Tests that were skipped.
    pub skipped: u64,
    /// Parse errors (missing subtests, wrong numbers, missing result lines, empty suites).
    pub errors: u64,
}

impl Counts {
    /// Number of tests counted (errors are not tests).
    pub fn total(&self) -> u64 {
        self.passed
            .saturating_add(self.failed)
            .saturating_add(self.crashed)
            .saturating_add(self.skipped)
    }

    /// The status these counts add up to: crashes first, then failures, then passes.
    pub fn status(&self) -> Status {
        if self.total() == 0 {
            Status::NoTests
        } else if self.crashed > 0 {
            Status::Crashed
        } else if self.failed > 0 {
            Status::Failed
        } else if self.passed > 0 {
            Status::Passed
        } else {
            Status::Skipped
        }
    }

    /// Adds another set of counts to these.
    pub fn add(&mut self, other: &Counts) {
        self.passed = self.passed.saturating_add(other.passed);
        self.failed = self.failed.saturating_add(other.failed);
        self.crashed = self.crashed.saturating_add(other.crashed);
        self.skipped = self.skipped.saturating_add(other.skipped);
        self.errors = self.errors.saturating_add(other.errors);
    }

    fn add_status(&mut self, status: Status) {
        match status {
            Status::Passed => self.passed += 1,
            Status::Failed => self.failed += 1,
            Status::Skipped => self.skipped += 1,
            Status::NoTests => {}
            Status::Crashed | Status::NoKtap => self.crashed += 1,
        }
    }
}

/// A test without subtests: one result line and the diagnostic lines before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestCase {
    /// Position in its suite, from 1.
    pub number: u64,
    /// The description from the result line (may be empty).
    pub name: String,
    /// `Passed`, `Failed` or `Skipped`.
    pub status: Status,
    /// The text after ` # ` on the result line (`SKIP reason`, `TIMEOUT 45 seconds`, ...).
    pub directive: Option<String>,
    /// Diagnostic lines printed before the result line.
    pub log: Vec<String>,
    /// Diagnostic lines not kept (over a [`Limits`] budget).
    pub log_dropped: u64,
}

/// A test with subtests (a KUnit suite, a parameterized test, a kselftest collection), or
/// the whole document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Suite {
    /// Position in its parent, from 1; 0 for the document.
    pub number: u64,
    /// From its result line, else its `# Subtest:` line; "main" for the document.
    pub name: String,
    /// N of its `1..N` plan line, if it had one.
    pub plan: Option<u64>,
    /// Its own result (`Crashed` when its result line never came or a subtest crashed).
    pub status: Status,
    /// The text after ` # ` on its result line.
    pub directive: Option<String>,
    /// The subtests that reported, in order.
    pub tests: Vec<TestNode>,
    /// Subtests the plan promised that never reported (counted as crashed), numbered
    /// `plan - missing + 1 ..= plan`.
    pub missing: u64,
    /// Subtests that reported and are counted but not kept (over `max_nodes`).
    pub omitted: u64,
    /// Counts over the whole subtree.
    pub counts: Counts,
    /// True when the suite's own status is in `counts` because none of its subtests was
    /// counted (kunit.py counts such a suite as one test).
    pub counted_self: bool,
    /// Diagnostic lines that belong to the suite itself rather than to one subtest.
    pub log: Vec<String>,
    /// Diagnostic lines not kept (over a [`Limits`] budget).
    pub log_dropped: u64,
}

/// One entry of a suite: a test case or a nested suite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TestNode {
    /// A test without subtests.
    Case(TestCase),
    /// A test with subtests.
    Suite(Suite),
}

impl TestNode {
    /// The node's name.
    pub fn name(&self) -> &str {
        match self {
            TestNode::Case(c) => &c.name,
            TestNode::Suite(s) => &s.name,
        }
    }

    /// The node's status.
    pub fn status(&self) -> Status {
        match self {
            TestNode::Case(c) => c.status,
            TestNode::Suite(s) => s.status,
        }
    }
}

/// Everything parsed from one console stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KtapReport {
    /// The overall verdict, as kunit.py computes it.
    pub status: Status,
    /// Counts over all tests.
    pub counts: Counts,
    /// The document (its subtests are the top-level suites), if any KTAP output was found.
    pub root: Option<Suite>,
    /// The first parse error messages (all of them are counted in `counts.errors`).
    pub errors: Vec<String>,
    /// The kernel message that ended the KTAP output early, if one did.
    pub end_marker: Option<String>,
}

impl KtapReport {
    /// True when kunit.py would call the run a success: everything passed or was skipped.
    pub fn ok(&self) -> bool {
        matches!(self.status, Status::Passed | Status::Skipped)
    }
}

/// Kernel messages after which kunit.py stops reading.
const END_MARKERS: [&str; 3] = [
    "List of all partitions:",
    "Kernel panic - not syncing: VFS:",
    "reboot: System halted",
];

/// The parser. Feed it bytes as they arrive; it keeps only a partial line and the tree.
#[derive(Debug)]
pub struct KtapParser {
    splitter: LineSplitter,
    extract: Extract,
    machine: Machine,
}

/// Where we are in kunit.py's `isolate_ktap_output`.
#[derive(Debug)]
enum Extract {
    /// Before the first version line.
    Waiting,
    /// After it; `prefix_chars` characters are cut from the start of each line.
    Started { prefix_chars: usize },
    /// An end marker was seen; the rest of the input is ignored.
    Ended,
}

impl Default for KtapParser {
    fn default() -> Self {
        Self::new()
    }
}

impl KtapParser {
    /// A parser with the default [`Limits`].
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A parser with the given limits.
    pub fn with_limits(limits: Limits) -> Self {
        KtapParser {
            splitter: LineSplitter::new(limits.max_line_bytes),
            extract: Extract::Waiting,
            machine: Machine::new(limits),
        }
    }

    /// Parses a chunk of console output. Lines may be split across chunks anywhere.
    pub fn feed(&mut self, bytes: &[u8]) {
        let KtapParser {
            splitter,
            extract,
            machine,
        } = self;
        splitter.feed(bytes, |line| Self::line(extract, machine, line));
    }

    /// True once no further input can change the result: the top-level plan is complete or
    /// the kernel printed one of kunit.py's end markers.
    pub fn is_done(&self) -> bool {
        matches!(self.extract, Extract::Ended) || self.machine.root.is_some()
    }

    /// Ends the input (the guest is gone) and returns the results. Tests still missing are
    /// counted as crashed.
    pub fn finish(mut self) -> KtapReport {
        let KtapParser {
            splitter,
            extract,
            machine,
        } = &mut self;
        splitter.finish(|line| Self::line(extract, machine, line));
        self.machine.eof();
        self.machine.into_report()
    }

    fn line(extract: &mut Extract, machine: &mut Machine, raw: &[u8]) {
        let decoded = text::decode_backslashreplace(raw);
        let line = text::rstrip(&decoded);
        match *extract {
            Extract::Waiting => {
                if let Some(prefix_chars) =
                    text::version_search(line, "KTAP").or_else(|| text::version_search(line, "TAP"))
                {
                    *extract = Extract::Started { prefix_chars };
                    machine.feed(text::skip_chars(line, prefix_chars));
                } else if line.contains("kunit executor: ") {
                    machine.feed(line);
                }
            }
            Extract::Started { prefix_chars } => {
                if let Some(marker) = END_MARKERS.iter().find(|m| line.contains(**m)) {
                    *extract = Extract::Ended;
                    machine.end_marker = Some((*marker).to_string());
                    machine.eof();
                } else {
                    machine.feed(text::skip_chars(line, prefix_chars));
                }
            }
            Extract::Ended => {}
        }
    }
}

/// What the state machine is given: the next line, or the end of the input.
#[derive(Clone, Copy)]
enum Input<'a> {
    Line(&'a str),
    Eof,
}

/// What a step did with its input.
enum Flow {
    /// The line was used up; wait for the next one.
    Consumed,
    /// The state changed without using the line; step again.
    Next,
    /// The document is complete; nothing more to do.
    Idle,
}

/// Where a suite's parse is (the statements of kunit.py's `parse_test`, in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pc {
    /// Diagnostic lines before the test.
    PreDiag,
    /// An optional `KTAP version`/`TAP version` line.
    Version,
    /// An optional `# Subtest: name` line (subtests only).
    SubtestHeader,
    /// A subtest with a version or header line is a suite; otherwise a test case.
    DecideParent,
    /// An optional `1..N` plan line.
    Plan,
    /// Whether to look for another subtest.
    LoopCheck,
    /// Diagnostic lines before the next subtest.
    LoopDiag,
    /// The next subtest starts here, or the suite ends.
    LoopDecide,
    /// Diagnostic lines before the suite's own result line.
    PostDiag,
    /// The suite's or case's result line.
    ResultLine,
    /// Compute the counts and hand the node to the parent.
    Finalize,
}

/// One open test (kunit.py's `Test` while `parse_test` runs on it).
#[derive(Debug)]
struct Frame {
    number: u64,
    is_subtest: bool,
    parent: bool,
    had_version: bool,
    had_header: bool,
    name: String,
    plan: Option<u64>,
    status: Status,
    directive: Option<String>,
    tests: Vec<TestNode>,
    missing: u64,
    omitted: u64,
    counts: Counts,
    log: Log,
    pending: Log,
    test_num: u64,
    pc: Pc,
}

impl Frame {
    fn new(number: u64, is_subtest: bool, log: Log) -> Self {
        Frame {
            number,
            is_subtest,
            parent: !is_subtest,
            had_version: false,
            had_header: false,
            name: if is_subtest {
                String::new()
            } else {
                "main".to_string()
            },
            plan: None,
            status: Status::Crashed,
            directive: None,
            tests: Vec::new(),
            missing: 0,
            omitted: 0,
            counts: Counts::default(),
            log,
            pending: Log::default(),
            test_num: 1,
            pc: Pc::PreDiag,
        }
    }
}

/// Diagnostic lines kept for one test, and how many were dropped.
#[derive(Debug, Default)]
struct Log {
    lines: Vec<String>,
    dropped: u64,
}

/// State shared by all frames: limits and budgets, error messages.
#[derive(Debug)]
struct Shared {
    limits: Limits,
    errors: Vec<String>,
    log_bytes_left: usize,
    nodes: usize,
    last_line_was_result: bool,
}

impl Shared {
    /// Records a parse error on `frame` (counted `times` times, one message kept).
    fn error(&mut self, frame: &mut Frame, message: &str, times: u64) {
        frame.counts.errors = frame.counts.errors.saturating_add(times);
        if self.errors.len() < self.limits.max_errors {
            let name = if frame.name.is_empty() {
                format!("#{}", frame.number)
            } else {
                frame.name.clone()
            };
            let mut text = format!("Test: {name}: {message}");
            if times > 1 {
                text.push_str(&format!(" (x{times})"));
            }
            self.errors.push(text);
        }
    }

    /// Keeps a diagnostic line in `log` if the budgets allow.
    fn keep(&mut self, log: &mut Log, line: &str) {
        let line = text::truncate_chars(line, self.limits.max_log_line_chars);
        if log.lines.len() < self.limits.max_log_lines && line.len() <= self.log_bytes_left {
            self.log_bytes_left -= line.len();
            log.lines.push(line.to_string());
        } else {
            log.dropped = log.dropped.saturating_add(1);
        }
    }

    /// Moves the lines of `from` to the end of `to`, within `to`'s line budget.
    fn append(&mut self, to: &mut Log, from: Log) {
        let room = self.limits.max_log_lines.saturating_sub(to.lines.len());
        let excess = from.lines.len().saturating_sub(room);
        let mut lines = from.lines;
        for dropped in lines.drain(lines.len() - excess..) {
            self.log_bytes_left += dropped.len();
        }
        to.lines.extend(lines);
        to.dropped = to
            .dropped
            .saturating_add(from.dropped)
            .saturating_add(excess as u64);
    }
}

/// Runs kunit.py's recursive-descent `parse_test` as a push-down automaton, one line at a
/// time: each frame is one `parse_test` call, `pc` is where it stands.
#[derive(Debug)]
struct Machine {
    stack: Vec<Frame>,
    shared: Shared,
    root: Option<Suite>,
    yielded_any: bool,
    end_marker: Option<String>,
}

/// Steps without consuming a line after which the line is dropped. The automaton needs a
/// dozen per nesting level; this only guards against a bug turning into a hang.
const STEP_GUARD: usize = 100_000;

impl Machine {
    fn new(limits: Limits) -> Self {
        Machine {
            stack: Vec::new(),
            shared: Shared {
                limits,
                errors: Vec::new(),
                log_bytes_left: limits.max_log_bytes,
                nodes: 0,
                last_line_was_result: false,
            },
            root: None,
            yielded_any: false,
            end_marker: None,
        }
    }

    /// One line of KTAP output (prefix already removed).
    fn feed(&mut self, line: &str) {
        if self.root.is_some() {
            return;
        }
        if !self.yielded_any {
            self.yielded_any = true;
            self.stack.push(Frame::new(0, false, Log::default()));
        }
        let mut steps = 0;
        while let Flow::Next = self.step(Input::Line(line)) {
            steps += 1;
            if steps > STEP_GUARD {
                if let Some(frame) = self.stack.last_mut() {
                    self.shared
                        .error(frame, "parser made no progress; line dropped", 1);
                }
                break;
            }
        }
        self.shared.last_line_was_result = ResultLine::parse(line).is_some();
    }

    /// The end of the input: close every open frame.
    fn eof(&mut self) {
        let mut steps = 0;
        while let Flow::Next = self.step(Input::Eof) {
            steps += 1;
            if steps > STEP_GUARD {
                break;
            }
        }
    }

    fn into_report(self) -> KtapReport {
        let mut errors = self.shared.errors;
        let Some(root) = self.root else {
            errors.push("could not find any KTAP output!".to_string());
            return KtapReport {
                status: Status::NoKtap,
                counts: Counts {
                    errors: 1,
                    ..Counts::default()
                },
                root: None,
                errors,
                end_marker: self.end_marker,
            };
        };
        let status = if root.status == Status::NoTests {
            Status::NoTests
        } else {
            root.counts.status()
        };
        KtapReport {
            status,
            counts: root.counts,
            root: Some(root),
            errors,
            end_marker: self.end_marker,
        }
    }

    /// Advances the top frame by one statement of `parse_test`.
    fn step(&mut self, input: Input<'_>) -> Flow {
        let depth = self.stack.len().saturating_sub(1);
        let capped = depth >= self.shared.limits.max_depth;
        let Some(frame) = self.stack.last_mut() else {
            return Flow::Idle;
        };
        let shared = &mut self.shared;
        match frame.pc {
            Pc::PreDiag => match input {
                Input::Line(l) if text::is_diagnostic(l, false) => {
                    shared.keep(&mut frame.log, l);
                    Flow::Consumed
                }
                _ => goto(frame, Pc::Version),
            },
            Pc::Version => version_line(frame, shared, input),
            Pc::SubtestHeader | Pc::DecideParent | Pc::Plan => header_step(frame, input),
            Pc::LoopCheck => {
                let more = frame.parent && frame.plan.is_none_or(|n| frame.test_num <= n);
                let next = match (more, frame.is_subtest) {
                    (true, _) => Pc::LoopDiag,
                    (false, true) => Pc::PostDiag,
                    (false, false) => Pc::Finalize,
                };
                goto(frame, next)
            }
            Pc::LoopDiag => match input {
                Input::Line(l) if text::is_diagnostic(l, capped) => {
                    shared.keep(&mut frame.pending, l);
                    Flow::Consumed
                }
                _ => goto(frame, Pc::LoopDecide),
            },
            Pc::LoopDecide => self.loop_decide(input),
            Pc::PostDiag => match input {
                Input::Line(l) if text::is_diagnostic(l, capped) => {
                    shared.keep(&mut frame.log, l);
                    Flow::Consumed
                }
                _ => goto(frame, Pc::ResultLine),
            },
            Pc::ResultLine => self.result_line(input),
            Pc::Finalize => {
                self.finalize();
                Flow::Next
            }
        }
    }

    /// The next line either starts a subtest or ends this suite (the input ended, or the
    /// line is this suite's own result). Subtests the plan still promised are crashed.
    fn loop_decide(&mut self, input: Input<'_>) -> Flow {
        let Some(frame) = self.stack.last_mut() else {
            return Flow::Idle;
        };
        let ends = match input {
            Input::Eof => true,
            Input::Line(l) => frame.is_subtest && text::result_name_is(l, &frame.name),
        };
        if !ends {
            let pending = std::mem::take(&mut frame.pending);
            let child = Frame::new(frame.test_num, true, pending);
            frame.test_num = frame.test_num.saturating_add(1);
            frame.pc = Pc::LoopCheck;
            self.stack.push(child);
            return Flow::Next;
        }
        let pending = std::mem::take(&mut frame.pending);
        self.shared.append(&mut frame.log, pending);
        if let Some(plan) = frame.plan {
            // The loop only runs while test_num <= plan; kunit.py adds one crashed subtest
            // (and one error) per remaining number.
            let missing = plan.saturating_sub(frame.test_num).saturating_add(1);
            frame.missing = missing;
            frame.counts.crashed = frame.counts.crashed.saturating_add(missing);
            frame.test_num = plan.saturating_add(1);
            self.shared
                .error(frame, "missing expected subtest!", missing);
        }
        goto(
            frame,
            if frame.is_subtest {
                Pc::PostDiag
            } else {
                Pc::Finalize
            },
        )
    }

    /// A subtest's own result line (kunit.py's `parse_test_result` and the checks before it).
    fn result_line(&mut self, input: Input<'_>) -> Flow {
        let Some(frame) = self.stack.last_mut() else {
            return Flow::Idle;
        };
        frame.pc = Pc::Finalize;
        let line = match input {
            Input::Eof => {
                // kunit.py looks at the last line again here; it reports a missing result
                // for a named suite, and raises for an unnamed one whose last line was a
                // result line. Both are a missing result line.
                if !frame.name.is_empty() || self.shared.last_line_was_result {
                    self.shared.error(frame, "missing subtest result line!", 1);
                }
                return Flow::Next;
            }
            Input::Line(l) => l,
        };
        if !frame.name.is_empty() && !text::result_name_is(line, &frame.name) {
            self.shared.error(frame, "missing subtest result line!", 1);
            return Flow::Next;
        }
        let Some(result) = ResultLine::parse(line) else {
            return Flow::Next;
        };
        frame.name = result.skip_name.unwrap_or(result.name).to_string();
        frame.directive = result.directive.map(str::to_string);
        frame.status = if result.skip_name.is_some() {
            Status::Skipped
        } else if result.ok {
            Status::Passed
        } else {
            Status::Failed
        };
        if text::parse_u64(result.number) != Some(frame.number) {
            let message = format!(
                "Expected test number {} but found {}",
                frame.number,
                text::truncate_chars(result.number, 40)
            );
            self.shared.error(frame, &message, 1);
        }
        self.finalize();
        Flow::Consumed
    }

    /// Closes the top frame: kunit.py's empty-suite check and `bubble_up_test_results`,
    /// then hands the node to the parent (or makes it the root).
    fn finalize(&mut self) {
        let Some(mut f) = self.stack.pop() else {
            return;
        };
        let subtests = (f.tests.len() as u64)
            .saturating_add(f.omitted)
            .saturating_add(f.missing);
        if f.parent && subtests == 0 && matches!(f.status, Status::Crashed | Status::Passed) {
            f.status = Status::NoTests;
            self.shared.error(&mut f, "0 tests run!", 1);
        }
        let counted_self = f.counts.total() == 0;
        if counted_self {
            f.counts.add_status(f.status);
        } else if f.counts.status() == Status::Crashed {
            f.status = Status::Crashed;
        }
        let counts = f.counts;
        let node = into_node(f, counted_self);
        match self.stack.last_mut() {
            Some(parent) => {
                parent.counts.add(&counts);
                if self.shared.nodes < self.shared.limits.max_nodes {
                    self.shared.nodes += 1;
                    parent.tests.push(node);
                } else {
                    parent.omitted = parent.omitted.saturating_add(1);
                }
            }
            None => {
                if let TestNode::Suite(root) = node {
                    self.root = Some(root);
                }
            }
        }
    }
}

/// After the version line: the optional `# Subtest:` line of a subtest (kunit.py's
/// `parse_test_header`), whether it is a suite, and its optional plan (`parse_test_plan`).
fn header_step(frame: &mut Frame, input: Input<'_>) -> Flow {
    let line = match input {
        Input::Line(l) => Some(l),
        Input::Eof => None,
    };
    match frame.pc {
        Pc::SubtestHeader => {
            frame.pc = Pc::DecideParent;
            let Some(name) = line.and_then(text::subtest_header) else {
                return Flow::Next;
            };
            frame.name = name.to_string();
            frame.had_header = true;
            Flow::Consumed
        }
        Pc::DecideParent => {
            frame.parent = frame.had_version || frame.had_header;
            goto(frame, if frame.parent { Pc::Plan } else { Pc::PostDiag })
        }
        _ => {
            frame.pc = Pc::LoopCheck;
            let Some(n) = line.and_then(text::plan) else {
                return Flow::Next;
            };
            frame.plan = Some(n);
            Flow::Consumed
        }
    }
}

/// The optional version line at the start of a test (kunit.py's `parse_ktap_header`).
fn version_line(frame: &mut Frame, shared: &mut Shared, input: Input<'_>) -> Flow {
    frame.pc = if frame.is_subtest {
        Pc::SubtestHeader
    } else {
        Pc::Plan
    };
    let Input::Line(line) = input else {
        return Flow::Next;
    };
    let Some((kind, version)) = text::version_line(line) else {
        return Flow::Next;
    };
    let accepted: &[u64] = if kind == "KTAP" { &[1] } else { &[13, 14] };
    let (low, high) = (accepted[0], accepted[accepted.len() - 1]);
    match version {
        Some(v) if v < low => {
            shared.error(frame, &format!("{kind} version lower than expected!"), 1)
        }
        Some(v) if v <= high => {}
        _ => shared.error(frame, &format!("{kind} version higer than expected!"), 1),
    }
    frame.had_version = true;
    Flow::Consumed
}

fn goto(frame: &mut Frame, pc: Pc) -> Flow {
    frame.pc = pc;
    Flow::Next
}

fn into_node(f: Frame, counted_self: bool) -> TestNode {
    if !f.parent {
        return TestNode::Case(TestCase {
            number: f.number,
            name: f.name,
            status: f.status,
            directive: f.directive,
            log: f.log.lines,
            log_dropped: f.log.dropped,
        });
    }
    TestNode::Suite(Suite {
        number: f.number,
        name: f.name,
        plan: f.plan,
        status: f.status,
        directive: f.directive,
        tests: f.tests,
        missing: f.missing,
        omitted: f.omitted,
        counts: f.counts,
        counted_self: counted_self && f.status != Status::NoTests,
        log: f.log.lines,
        log_dropped: f.log.dropped,
    })
}

#[cfg(test)]
mod tests;
