//! One-shot CI checks on a run's serial output: `ember run --expect`, `--fail-on`,
//! `--timeout` (and the last lines it prints).
//!
//! Guest output arrives on vCPU threads; all they do here is copy it into a bounded queue
//! ([`OutputWatch::push`]) and poke the event loop, which matches it ([`OutputWatch::drain`]).
//! Regular expressions never run on a vCPU thread, so a costly pattern slows the loop's
//! matching, never the guest; a guest that prints faster than the loop matches loses the
//! oldest queued bytes (the line they cut is matched on what was kept), never host memory.
//!
//! Lines end at LF or CR (CRLF is one end, empty lines are skipped). A line is kept up to
//! [`LINE_CAP`] bytes: past that, what was kept is matched and the rest of the line dropped.
//! A line without its end (a `login: ` prompt) is matched once the output pauses for
//! [`QUIET`], so there `$` means "the end of what was printed so far".
//!
//! `--expect` patterns are seen in order, each after the previous one's match (on the same
//! line or a later one). A `--fail-on` match ends the run at once; it is checked before the
//! `--expect` patterns on each line.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use regex::bytes::{Regex, RegexSet};
use vmm_sys_util::timerfd::TimerFd;

use crate::run_state::Outcome;

/// A line is kept (and matched) up to this many bytes.
pub const LINE_CAP: usize = 4 << 10;
/// Output queued for the event loop, at most; older bytes are dropped past it.
pub const PENDING_CAP: usize = 256 << 10;
/// Complete lines kept for the timeout report.
pub const TAIL_LINES: usize = 20;
/// A partial line is matched after the output pauses this long.
pub const QUIET: Duration = Duration::from_millis(100);
/// Bytes matched per turn of the drain (the queue's lock is not held while matching).
const DRAIN_CHUNK: usize = 16 << 10;
/// The `--fail-on` patterns in effect with `--expect` or `--fail-on` unless
/// `--no-default-fail-on`: the lines Linux prints when it is in trouble.
pub const DEFAULT_FAIL_ON: &[&str] = &["Kernel panic", "BUG:", "Oops", "WARNING:", "Call Trace:"];

/// Errors in the CI options.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// A pattern is not a regular expression.
    #[error("{option} '{pattern}': not a valid regular expression ({reason})")]
    Regex {
        /// `--expect` or `--fail-on`.
        option: &'static str,
        /// The pattern.
        pattern: String,
        /// What is wrong, on one line.
        reason: String,
    },
    /// A duration that cannot be read.
    #[error(
        "--timeout '{0}': not a duration above zero; use e.g. 30s, 2m, 500ms, 1h \
         (a bare number is seconds)"
    )]
    Duration(String),
    /// A timerfd for the event loop.
    #[error("cannot create a timer for the output checks")]
    Timer(#[source] std::io::Error),
}

/// Reads `30s`, `2m`, `500ms`, `1h`, `1.5s`; a bare number is seconds; more than zero.
pub fn parse_duration(text: &str) -> Result<Duration, WatchError> {
    let bad = || WatchError::Duration(text.to_string());
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let seconds_per_unit = match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    let seconds = value * seconds_per_unit;
    // A year bounds it well inside what a timerfd and an Instant take.
    if !(seconds > 0.0 && seconds <= 366.0 * 86400.0) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// What the command line asked to check.
#[derive(Clone, Debug, Default)]
pub struct WatchSpec {
    /// `--expect`, in order.
    pub expect: Vec<String>,
    /// `--fail-on`.
    pub fail_on: Vec<String>,
    /// Add [`DEFAULT_FAIL_ON`] (when `expect` or `fail_on` is given).
    pub default_fail_on: bool,
    /// `--stop-on-expect`: end the VM once the last `--expect` is seen.
    pub stop_on_expect: bool,
    /// `--timeout`.
    pub timeout: Option<Duration>,
}

impl WatchSpec {
    /// True when there is anything to watch.
    pub fn is_active(&self) -> bool {
        self.timeout.is_some() || !self.expect.is_empty() || !self.fail_on.is_empty()
    }

    /// The `--fail-on` patterns in effect: (as the user knows it, as a regex). The defaults
    /// apply when the output is judged at all (`--expect` or `--fail-on`).
    pub fn fail_on_patterns(&self) -> Vec<(String, String)> {
        let judging = !self.expect.is_empty() || !self.fail_on.is_empty();
        let defaults = match judging && self.default_fail_on {
            true => DEFAULT_FAIL_ON,
            false => &[],
        };
        defaults
            .iter()
            .map(|p| (p.to_string(), regex::escape(p)))
            .chain(self.fail_on.iter().map(|p| (p.clone(), p.clone())))
            .collect()
    }
}

/// What the output showed that ends the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A `--fail-on` pattern matched `line`.
    FailOn {
        /// The pattern.
        pattern: String,
        /// The line, lossily decoded.
        line: String,
    },
    /// The last `--expect` was seen (reported only with `--stop-on-expect`).
    AllExpected,
}

impl From<Verdict> for Outcome {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::FailOn { pattern, line } => Outcome::FailOn { pattern, line },
            Verdict::AllExpected => Outcome::ExpectsMet,
        }
    }
}

/// The regex crate's error on one line: its `error: ...` line, or its first.
fn one_line(e: &regex::Error) -> String {
    let text = e.to_string();
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .or_else(|| text.lines().next())
        .unwrap_or_default();
    line.trim().to_string()
}

fn compile(option: &'static str, pattern: &str) -> Result<Regex, WatchError> {
    Regex::new(pattern).map_err(|e| WatchError::Regex {
        option,
        pattern: pattern.to_string(),
        reason: one_line(&e),
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Splits output into lines and matches them; see the module's documentation.
pub struct LineMatcher {
    expect: Vec<(String, Regex)>,
    /// The next `--expect` to see.
    next: usize,
    fail_on: Vec<String>,
    fail_set: Option<RegexSet>,
    stop_on_expect: bool,
    line: Vec<u8>,
    /// The line passed the cap (or lost bytes): the rest of it is dropped.
    overflow: bool,
    /// Where in `line` the next `--expect` may match.
    from: usize,
    /// The length of `line` when it was last matched.
    checked: usize,
    tail: VecDeque<Vec<u8>>,
    /// The verdict, once given: nothing more is matched, and it is given again to whoever
    /// asks (a guest exit may have beaten it to the run state, or the VM restarted).
    verdict: Option<Verdict>,
}

impl LineMatcher {
    /// A matcher for `spec`.
    pub fn new(spec: &WatchSpec) -> Result<Self, WatchError> {
        let expect = spec
            .expect
            .iter()
            .map(|p| Ok((p.clone(), compile("--expect", p)?)))
            .collect::<Result<Vec<_>, WatchError>>()?;
        let (shown, fail_on): (Vec<String>, Vec<String>) =
            spec.fail_on_patterns().into_iter().unzip();
        // Each pattern alone first, so an error names the one at fault.
        for p in &spec.fail_on {
            compile("--fail-on", p)?;
        }
        let fail_set = match fail_on.is_empty() {
            true => None,
            false => Some(RegexSet::new(&fail_on).map_err(|e| WatchError::Regex {
                option: "--fail-on",
                pattern: shown.join(" | "),
                reason: one_line(&e),
            })?),
        };
        Ok(LineMatcher {
            expect,
            next: 0,
            fail_on: shown,
            fail_set,
            stop_on_expect: spec.stop_on_expect,
            line: Vec::new(),
            overflow: false,
            from: 0,
            checked: 0,
            tail: VecDeque::new(),
            verdict: None,
        })
    }

    /// Matches `data`, the output that follows what was fed before; the verdict, if one
    /// was given (now or before).
    pub fn feed(&mut self, mut data: &[u8]) -> Option<Verdict> {
        while !data.is_empty() && self.verdict.is_none() {
            let end = data.iter().position(|b| *b == b'\n' || *b == b'\r');
            self.append(&data[..end.unwrap_or(data.len())]);
            let Some(end) = end else { break };
            self.end_line();
            data = &data[end + 1..];
        }
        self.verdict.clone()
    }

    /// Matches the line not yet ended (the output paused); the verdict, if any.
    pub fn check_partial(&mut self) -> Option<Verdict> {
        if self.has_unchecked_partial() {
            self.check();
        }
        self.verdict.clone()
    }

    /// True when a partial line waits to be matched.
    pub fn has_unchecked_partial(&self) -> bool {
        self.verdict.is_none() && !self.overflow && self.line.len() > self.checked
    }

    /// Output was lost before what comes next: the line so far is matched as it stands and
    /// the fragment that follows, up to the next line end, is dropped.
    pub fn gap(&mut self) {
        if self.has_unchecked_partial() {
            self.check();
        }
        self.overflow = true;
    }

    /// The output ended: the last line is matched as a whole line; the verdict, if any.
    pub fn finish(&mut self) -> Option<Verdict> {
        if self.verdict.is_none() {
            self.end_line();
        }
        self.verdict.clone()
    }

    /// The verdict, if one was given.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.verdict.as_ref()
    }

    /// The first `--expect` pattern not seen yet.
    pub fn missing(&self) -> Option<&str> {
        self.expect.get(self.next).map(|(p, _)| p.as_str())
    }

    /// The last complete lines and the line being printed, oldest first.
    pub fn tail(&self) -> Vec<String> {
        let partial = (!self.line.is_empty()).then_some(&self.line);
        self.tail.iter().chain(partial).map(|l| text(l)).collect()
    }

    fn append(&mut self, part: &[u8]) {
        if self.overflow || part.is_empty() {
            return;
        }
        let room = LINE_CAP - self.line.len();
        self.line.extend_from_slice(&part[..part.len().min(room)]);
        if part.len() > room {
            self.overflow = true;
            if self.checked != self.line.len() {
                self.check();
            }
        }
    }

    fn end_line(&mut self) {
        if self.line.is_empty() {
            self.overflow = false;
            return;
        }
        if self.checked != self.line.len() {
            self.check();
        }
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(std::mem::take(&mut self.line));
        (self.overflow, self.from, self.checked) = (false, 0, 0);
    }

    /// Matches the line as it stands: `--fail-on` first, then the `--expect` patterns due.
    fn check(&mut self) {
        self.checked = self.line.len();
        if let Some(set) = &self.fail_set {
            if let Some(i) = set.matches(&self.line).iter().next() {
                self.verdict = Some(Verdict::FailOn {
                    pattern: self.fail_on[i].clone(),
                    line: text(&self.line),
                });
                return;
            }
        }
        while let Some((_, re)) = self.expect.get(self.next) {
            let Some(m) = re.find_at(&self.line, self.from) else {
                break;
            };
            self.from = m.end();
            self.next += 1;
            if self.next == self.expect.len() && self.stop_on_expect {
                self.verdict = Some(Verdict::AllExpected);
                return;
            }
        }
    }
}

/// Output waiting for the event loop.
#[derive(Default)]
struct Pending {
    bytes: VecDeque<u8>,
    /// Bytes were dropped since the loop last drained.
    gap: bool,
    lost: u64,
}

/// The loop's side: the matcher and a buffer reused for each chunk.
struct Matching {
    matcher: LineMatcher,
    chunk: Vec<u8>,
}

/// The checks of one `ember run`, shared by the console hub (vCPU threads), the event loop
/// of each VM the session builds, and the command that judges the outcome at the end.
pub struct OutputWatch {
    pending: Mutex<Pending>,
    matching: Mutex<Matching>,
    deadline: Option<Instant>,
    timeout: Option<Duration>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl OutputWatch {
    /// The checks `spec` asks for; the timeout counts from now.
    pub fn new(spec: &WatchSpec) -> Result<Self, WatchError> {
        Ok(OutputWatch {
            pending: Mutex::new(Pending::default()),
            matching: Mutex::new(Matching {
                matcher: LineMatcher::new(spec)?,
                chunk: Vec::new(),
            }),
            deadline: spec.timeout.map(|t| Instant::now() + t),
            timeout: spec.timeout,
        })
    }

    /// Guest output (a vCPU thread): queued for the loop. True when the queue was empty, so
    /// the loop must be woken.
    pub fn push(&self, data: &[u8]) -> bool {
        let mut p = lock(&self.pending);
        let was_empty = p.bytes.is_empty();
        let cut = data.len().saturating_sub(PENDING_CAP);
        let data = &data[cut..];
        let over = (p.bytes.len() + data.len()).saturating_sub(PENDING_CAP);
        if over + cut > 0 {
            p.bytes.drain(..over);
            p.gap = true;
            p.lost += (over + cut) as u64;
        }
        p.bytes.extend(data);
        was_empty
    }

    /// Matches everything queued (the event loop); the verdict, if one was given (now or
    /// before: it is given again until the run ends).
    pub fn drain(&self) -> Option<Verdict> {
        let mut guard = lock(&self.matching);
        let Matching { matcher, chunk } = &mut *guard;
        loop {
            if let Some(v) = matcher.verdict() {
                return Some(v.clone());
            }
            let gap = {
                let mut p = lock(&self.pending);
                let (front, _) = p.bytes.as_slices();
                let n = front.len().min(DRAIN_CHUNK);
                if n == 0 {
                    return None;
                }
                chunk.clear();
                chunk.extend_from_slice(&front[..n]);
                p.bytes.drain(..n);
                std::mem::take(&mut p.gap)
            };
            if gap {
                matcher.gap();
            }
            matcher.feed(chunk);
        }
    }

    /// Matches the partial line after a pause; the verdict, if any.
    pub fn check_partial(&self) -> Option<Verdict> {
        lock(&self.matching).matcher.check_partial()
    }

    /// True when a partial line waits for a pause to be matched.
    pub fn has_unchecked_partial(&self) -> bool {
        lock(&self.matching).matcher.has_unchecked_partial()
    }

    /// When `--timeout` runs out.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// `--timeout` as given.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Bytes dropped because the loop fell behind.
    pub fn lost(&self) -> u64 {
        lock(&self.pending).lost
    }

    /// The last lines of output (everything queued is matched first).
    pub fn tail(&self) -> Vec<String> {
        let _ = self.drain();
        lock(&self.matching).matcher.tail()
    }

    /// The run's verdict given how the VM ended: output the loop did not get to is matched
    /// (the last line as a whole line); a `--fail-on` match (even one a guest exit beat to
    /// the run state) or a missing `--expect` turns an outcome the guest chose into a
    /// failure. Other outcomes (crash, panic, timeout, signal) stand: they say more.
    pub fn judge(&self, outcome: Outcome) -> Outcome {
        let verdict = self
            .drain()
            .or_else(|| lock(&self.matching).matcher.finish());
        if !outcome.is_judged_by_output() {
            return outcome;
        }
        if let Some(Verdict::FailOn { pattern, line }) = verdict {
            return Outcome::FailOn { pattern, line };
        }
        match lock(&self.matching).matcher.missing() {
            Some(p) => Outcome::ExpectNotMet {
                pattern: p.to_string(),
                ended: Box::new(outcome),
            },
            None => outcome,
        }
    }
}

fn errno(e: vmm_sys_util::errno::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// A timerfd, non-blocking, so a read after a re-arm never stalls the loop.
fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(errno)?;
    // SAFETY: fcntl on a descriptor this function owns; no memory is passed.
    let rc = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(timer)
}

/// The event loop's part of an [`OutputWatch`]: the `--timeout` timer and the pause timer
/// that has a partial line matched. Lives in the console's event-loop handler.
pub struct WatchTimers {
    watch: std::sync::Arc<OutputWatch>,
    deadline: Option<TimerFd>,
    quiet: TimerFd,
    quiet_armed: bool,
}

impl WatchTimers {
    /// Timers for `watch`; the deadline timer is armed.
    pub fn new(watch: std::sync::Arc<OutputWatch>) -> Result<Self, WatchError> {
        let deadline = match watch.deadline() {
            Some(at) => {
                let mut t = nonblocking_timer().map_err(WatchError::Timer)?;
                // A zero duration would disarm: a deadline already past fires at once.
                let left = at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1));
                t.reset(left, None)
                    .map_err(|e| WatchError::Timer(errno(e)))?;
                Some(t)
            }
            None => None,
        };
        Ok(WatchTimers {
            watch,
            deadline,
            quiet: nonblocking_timer().map_err(WatchError::Timer)?,
            quiet_armed: false,
        })
    }

    /// Registers the timers with the loop.
    pub fn register(&self, ops: &mut EventOps) {
        for t in self.deadline.iter().chain([&self.quiet]) {
            if let Err(e) = ops.add(Events::new(t, EventSet::IN)) {
                log::error!("output watch: cannot watch a timer: {e:?}");
            }
        }
    }

    /// True when `fd` is one of these timers.
    pub fn owns(&self, fd: i32) -> bool {
        fd == self.quiet.as_raw_fd() || self.deadline.as_ref().is_some_and(|t| t.as_raw_fd() == fd)
    }

    /// New output was queued: matches it; an outcome ends the run.
    pub fn on_output(&mut self) -> Option<Outcome> {
        if let Some(v) = self.watch.drain() {
            return Some(v.into());
        }
        if self.watch.has_unchecked_partial() {
            // Every batch pushes the pause further out.
            if let Err(e) = self.quiet.reset(QUIET, None) {
                log::warn!("output watch: cannot arm the pause timer: {e}");
            }
            self.quiet_armed = true;
        }
        None
    }

    /// One of the timers fired.
    pub fn on_timer(&mut self, fd: i32) -> Option<Outcome> {
        if let Some(t) = self.deadline.as_mut().filter(|t| t.as_raw_fd() == fd) {
            let _ = t.wait();
            return Some(Outcome::Timeout);
        }
        let _ = self.quiet.wait();
        if !std::mem::take(&mut self.quiet_armed) {
            return None;
        }
        self.watch
            .drain()
            .or_else(|| self.watch.check_partial())
            .map(Outcome::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(expect: &[&str], fail_on: &[&str]) -> WatchSpec {
        WatchSpec {
            expect: expect.iter().map(|s| s.to_string()).collect(),
            fail_on: fail_on.iter().map(|s| s.to_string()).collect(),
            default_fail_on: true,
            stop_on_expect: true,
            timeout: None,
        }
    }

    fn matcher(expect: &[&str], fail_on: &[&str]) -> LineMatcher {
        LineMatcher::new(&spec(expect, fail_on)).unwrap()
    }

    #[test]
    fn durations_take_units_and_bare_seconds() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in [
            "", "0", "-1s", "5x", "s", "1e9", "10 s", "inf", "NaN", "9999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn expects_are_seen_in_order_across_writes_split_mid_line() {
        let mut m = matcher(&["tick 2", "tick 3"], &[]);
        assert_eq!(m.feed(b"tick 1\r\ntick 2\r\nti"), None);
        assert_eq!(m.missing(), Some("tick 3"));
        assert_eq!(m.feed(b"ck 3\r\n"), Some(Verdict::AllExpected));
    }

    #[test]
    fn an_expect_seen_before_the_previous_one_does_not_count() {
        let mut m = matcher(&["second", "first"], &[]);
        assert_eq!(m.feed(b"first\nsecond\n"), None);
        assert_eq!(m.missing(), Some("first"));
    }

    #[test]
    fn two_expects_may_match_one_line_in_order_only() {
        let mut m = matcher(&["a", "b"], &[]);
        assert_eq!(m.feed(b"a b\n"), Some(Verdict::AllExpected));
        let mut m = matcher(&["b", "a"], &[]);
        assert_eq!(m.feed(b"a b\n"), None);
        assert_eq!(m.missing(), Some("a"));
    }

    #[test]
    fn fail_on_defaults_match_kernel_trouble_and_name_the_pattern_and_line() {
        let mut m = matcher(&["never"], &[]);
        let v = m.feed(b"ok\n[ 1.0] BUG: unable to handle page fault\n");
        assert_eq!(
            v,
            Some(Verdict::FailOn {
                pattern: "BUG:".into(),
                line: "[ 1.0] BUG: unable to handle page fault".into()
            })
        );
        let again = m.feed(b"Kernel panic\n");
        assert!(
            matches!(again, Some(Verdict::FailOn { pattern, .. }) if pattern == "BUG:"),
            "the first verdict stands and is given again"
        );
    }

    #[test]
    fn defaults_can_be_dropped_and_apply_only_when_output_is_judged() {
        let mut s = spec(&["x"], &[]);
        s.default_fail_on = false;
        let mut m = LineMatcher::new(&s).unwrap();
        assert_eq!(m.feed(b"Kernel panic - not syncing\n"), None);
        let timeout_only = WatchSpec {
            default_fail_on: true,
            timeout: Some(Duration::from_secs(1)),
            ..WatchSpec::default()
        };
        assert!(timeout_only.fail_on_patterns().is_empty());
        let judged = spec(&[], &["mine"]);
        assert_eq!(judged.fail_on_patterns().len(), DEFAULT_FAIL_ON.len() + 1);
    }

    #[test]
    fn fail_on_wins_over_an_expect_on_the_same_line() {
        let mut m = matcher(&["done"], &["FAIL"]);
        assert!(matches!(
            m.feed(b"done FAIL\n"),
            Some(Verdict::FailOn { .. })
        ));
    }

    #[test]
    fn a_partial_line_is_matched_only_when_asked_after_a_pause() {
        let mut m = matcher(&["login: $"], &[]);
        assert_eq!(m.feed(b"buildroot login: "), None);
        assert!(m.has_unchecked_partial());
        assert_eq!(m.check_partial(), Some(Verdict::AllExpected));
    }

    #[test]
    fn a_line_matched_while_partial_is_not_matched_twice_for_the_next_expect() {
        let mut m = matcher(&["ab", "ab"], &[]);
        m.feed(b"xab");
        assert_eq!(m.check_partial(), None);
        assert_eq!(m.missing(), Some("ab"));
        assert_eq!(m.feed(b"\n"), None, "the same match does not count twice");
        assert_eq!(m.feed(b"ab\n"), Some(Verdict::AllExpected));
    }

    #[test]
    fn long_lines_are_capped_and_matched_on_what_is_kept() {
        let mut m = matcher(&["never"], &["TAIL"]);
        let mut long = vec![b'x'; LINE_CAP - 4];
        long.extend_from_slice(b"HEADTAIL and more");
        assert_eq!(m.feed(&long), None, "TAIL lies past the cap");
        assert_eq!(m.line.len(), LINE_CAP);
        assert_eq!(m.feed(&vec![b'y'; 1 << 20]), None);
        assert_eq!(m.line.len(), LINE_CAP, "the line buffer stays capped");
        assert!(matches!(m.feed(b"\nTAIL\n"), Some(Verdict::FailOn { .. })));
        assert_eq!(m.tail().len(), 2);
    }

    #[test]
    fn crlf_and_bare_cr_end_lines_and_empty_lines_are_skipped() {
        let mut s = spec(&["^two$"], &[]);
        s.stop_on_expect = false;
        let mut m = LineMatcher::new(&s).unwrap();
        m.feed(b"one\r\n\r\n\rtwo\rthree\n");
        assert_eq!(m.missing(), None);
        assert_eq!(m.tail(), vec!["one", "two", "three"]);
    }

    #[test]
    fn the_tail_keeps_the_last_lines_and_the_partial_one() {
        let mut m = matcher(&[], &[]);
        for i in 0..50 {
            m.feed(format!("line {i}\n").as_bytes());
        }
        m.feed(b"prompt> ");
        let tail = m.tail();
        assert_eq!(tail.len(), TAIL_LINES + 1);
        assert_eq!(tail[0], "line 30");
        assert_eq!(tail[TAIL_LINES], "prompt> ");
    }

    #[test]
    fn bad_patterns_are_reported_with_their_option() {
        let e = LineMatcher::new(&spec(&["("], &[])).err().unwrap();
        assert!(e.to_string().contains("--expect '('"), "{e}");
        assert!(e.to_string().contains("(unclosed group)"), "{e}");
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
        let e = LineMatcher::new(&spec(&[], &["[z-a]"])).err().unwrap();
        assert!(e.to_string().contains("--fail-on '[z-a]'"), "{e}");
    }

    #[test]
    fn non_utf8_output_is_matched_and_shown_lossily() {
        let mut m = matcher(&[], &["boom"]);
        let v = m.feed(b"\xff\xfe boom\n");
        assert_eq!(
            v,
            Some(Verdict::FailOn {
                pattern: "boom".into(),
                line: "\u{fffd}\u{fffd} boom".into()
            })
        );
    }

    fn watch(expect: &[&str], fail_on: &[&str]) -> OutputWatch {
        let mut s = spec(expect, fail_on);
        s.stop_on_expect = false;
        OutputWatch::new(&s).unwrap()
    }

    #[test]
    fn the_queue_is_bounded_under_a_flood_and_a_gap_never_joins_two_fragments() {
        let w = watch(&[], &["^azzz$"]);
        assert!(w.push(b"a"));
        assert_eq!(w.drain(), None);
        // 60,000 lines of "zzzz": the queue keeps the last 256 KiB, which start with the
        // tail "zzz\n" of a line whose head was lost.
        let flood = b"zzzz\n".repeat(60_000);
        assert!(w.push(&flood));
        assert!(!w.push(&flood));
        assert_eq!(w.push_len(), PENDING_CAP);
        assert!(w.lost() > 0);
        // "a" + (lost) + "zzz" must not read as the line "azzz".
        assert_eq!(w.drain(), None);
        w.push(b"azzz\n");
        assert!(matches!(w.drain(), Some(Verdict::FailOn { line, .. }) if line == "azzz"));
    }

    #[test]
    fn judging_turns_a_clean_end_with_missing_expects_into_a_failure() {
        let w = watch(&["ready", "done"], &[]);
        w.push(b"ready\n");
        let judged = w.judge(Outcome::PowerOff);
        assert_eq!(
            judged,
            Outcome::ExpectNotMet {
                pattern: "done".into(),
                ended: Box::new(Outcome::PowerOff)
            }
        );
        assert_eq!(judged.exit_code(), 126);
    }

    #[test]
    fn a_verdict_beaten_by_a_guest_exit_still_decides_the_run() {
        let w = watch(&["hello"], &[]);
        w.push(b"hello\nOops: 0002\n");
        assert!(matches!(w.drain(), Some(Verdict::FailOn { .. })));
        // The guest powered off before the loop's exit request landed.
        assert!(matches!(w.judge(Outcome::PowerOff), Outcome::FailOn { .. }));
    }

    #[test]
    fn a_verdict_is_given_again_to_the_loop_of_a_restarted_vm() {
        let mut s = spec(&["hello"], &[]);
        s.stop_on_expect = true;
        let w = std::sync::Arc::new(OutputWatch::new(&s).unwrap());
        w.push(b"hello\n");
        assert_eq!(w.drain(), Some(Verdict::AllExpected));
        let mut timers = WatchTimers::new(w).unwrap();
        assert_eq!(timers.on_output(), Some(Outcome::ExpectsMet));
    }

    #[test]
    fn judging_matches_the_last_line_without_its_end() {
        let w = watch(&["done$"], &[]);
        w.push(b"all done");
        assert_eq!(w.judge(Outcome::DebugExit(33)), Outcome::DebugExit(33));
    }

    #[test]
    fn judging_keeps_crashes_timeouts_and_signals() {
        let w = watch(&["never"], &[]);
        w.push(b"Oops: 0002\n");
        assert_eq!(w.judge(Outcome::Timeout), Outcome::Timeout);
        assert_eq!(w.judge(Outcome::Signal(15)), Outcome::Signal(15));
    }

    #[test]
    fn judging_reports_a_fail_on_line_the_loop_did_not_get_to() {
        let w = watch(&[], &[]);
        let w2 = watch(&["x"], &[]);
        w.push(b"Oops\n");
        assert_eq!(w.judge(Outcome::PowerOff), Outcome::PowerOff, "no defaults");
        w2.push(b"x\nOops: 0002\n");
        assert!(matches!(
            w2.judge(Outcome::PowerOff),
            Outcome::FailOn { .. }
        ));
    }

    #[test]
    fn the_deadline_timer_fires_as_a_timeout() {
        let mut s = spec(&[], &[]);
        s.timeout = Some(Duration::from_millis(20));
        let w = std::sync::Arc::new(OutputWatch::new(&s).unwrap());
        let mut timers = WatchTimers::new(w).unwrap();
        let fd = timers.deadline.as_ref().unwrap().as_raw_fd();
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(timers.on_timer(fd), Some(Outcome::Timeout));
    }

    impl OutputWatch {
        fn push_len(&self) -> usize {
            lock(&self.pending).bytes.len()
        }
    }
}
