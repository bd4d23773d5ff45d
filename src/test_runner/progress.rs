//! What `ember test` shows while it runs and at the end. On a terminal: a bar with the
//! counts and one line per running case (and shared boot) with its time so far, each
//! finished case printed above them. Elsewhere (a CI log): one line per finished case.
//! At the end, the summary table (on stdout).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::report::{CaseResult, CaseStatus, RunReport};

/// Live progress.
pub struct Progress {
    multi: MultiProgress,
    bar: ProgressBar,
    running: Mutex<HashMap<String, ProgressBar>>,
    counts: Mutex<(u64, u64)>,
    tty: bool,
}

/// The word a status is shown with.
pub fn status_word(s: CaseStatus) -> &'static str {
    match s {
        CaseStatus::Passed => "PASS",
        CaseStatus::Failed => "FAIL",
        CaseStatus::Skipped => "SKIP",
        CaseStatus::TimedOut => "TIMEOUT",
        CaseStatus::Error => "ERROR",
    }
}

impl Progress {
    /// Progress over `total` cases; drawn only when `tty`.
    pub fn new(total: u64, tty: bool) -> Self {
        let target = if tty {
            ProgressDrawTarget::stderr_with_hz(10)
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let bar = multi.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template("{elapsed:>5} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message("cases done");
        if tty {
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        Progress {
            multi,
            bar,
            running: Mutex::new(HashMap::new()),
            counts: Mutex::new((0, 0)),
            tty,
        }
    }

    /// Something (a case, a shared boot) started.
    pub fn started(&self, label: &str) {
        if !self.tty {
            return;
        }
        let line = self.multi.add(ProgressBar::new_spinner());
        line.set_style(
            ProgressStyle::with_template("  {spinner} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        line.set_message(label.to_string());
        line.enable_steady_tick(Duration::from_millis(200));
        self.lock_running().insert(label.to_string(), line);
    }

    /// Something that was not a case (a shared boot) ended, with a line to print.
    pub fn note(&self, label: &str, line: &str) {
        if let Some(l) = self.lock_running().remove(label) {
            l.finish_and_clear();
            self.multi.remove(&l);
        }
        self.print(line);
    }

    /// A case ended.
    pub fn finished(&self, label: &str, result: &CaseResult) {
        if let Some(l) = self.lock_running().remove(label) {
            l.finish_and_clear();
            self.multi.remove(&l);
        }
        let (passed, failed) = {
            let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            if result.status == CaseStatus::Passed {
                c.0 += 1;
            } else {
                c.1 += 1;
            }
            *c
        };
        self.bar
            .set_message(format!("cases done: {passed} passed, {failed} failed"));
        self.bar.inc(1);
        let mut line = format!(
            "{:<7} {:>8} {}",
            status_word(result.status),
            format!("{:.2}s", result.duration.as_secs_f64()),
            result.name
        );
        if let Some(m) = &result.message {
            let _ = write!(line, ": {}", first_line(m));
        }
        self.print(&line);
    }

    /// Removes the live display.
    pub fn done(&self) {
        for (_, l) in self.lock_running().drain() {
            l.finish_and_clear();
        }
        self.bar.finish_and_clear();
        let _ = self.multi.clear();
    }

    fn print(&self, line: &str) {
        if self.tty {
            let _ = self.multi.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, ProgressBar>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// The table printed at the end: one row per case, then the totals.
pub fn summary(report: &RunReport) -> String {
    let width = report
        .cases
        .iter()
        .map(|c| c.name.chars().count())
        .max()
        .unwrap_or(4)
        .clamp(4, 60);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<7} {:>8}  {:<width$}  DETAILS",
        "RESULT", "TIME", "CASE"
    );
    for c in &report.cases {
        let mut details = c
            .message
            .as_deref()
            .map(first_line)
            .unwrap_or("")
            .to_string();
        let k = c.ktap_counts();
        if k.total() > 0 {
            let ktap = format!(
                "KTAP {} passed, {} failed, {} crashed, {} skipped",
                k.passed, k.failed, k.crashed, k.skipped
            );
            details = if details.is_empty() {
                ktap
            } else {
                format!("{details}; {ktap}")
            };
        }
        let _ = writeln!(
            out,
            "{:<7} {:>8}  {:<width$}  {}",
            status_word(c.status),
            format!("{:.2}s", c.duration.as_secs_f64()),
            c.name,
            details.chars().take(160).collect::<String>()
        );
    }
    let n = report.case_counts();
    let _ = writeln!(
        out,
        "\n{} cases: {} passed, {} failed, {} timed out, {} errors, {} skipped",
        report.cases.len(),
        n.passed,
        n.failed,
        n.timed_out,
        n.error,
        n.skipped
    );
    let k = report.ktap_counts();
    if k.total() > 0 {
        let _ = writeln!(
            out,
            "KTAP tests: {} passed, {} failed, {} crashed, {} skipped, {} parse errors",
            k.passed, k.failed, k.crashed, k.skipped, k.errors
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_has_a_row_per_case_and_the_totals() {
        // Arrange
        let mut failed = CaseResult::new(
            "tiny/wrong",
            CaseStatus::Failed,
            Duration::from_millis(1500),
        );
        failed.message = Some("expected /tick 99/ (1 of 1) not seen\nmore".into());
        let report = RunReport {
            name: "ember test".into(),
            cases: vec![
                CaseResult::new("tiny/ok", CaseStatus::Passed, Duration::from_millis(200)),
                failed,
                CaseResult::new("tiny/hang", CaseStatus::TimedOut, Duration::from_secs(2)),
            ],
        };

        // Act
        let table = summary(&report);

        // Assert
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].starts_with("PASS") && lines[1].contains("tiny/ok"));
        assert!(
            lines[2].starts_with("FAIL")
                && lines[2].ends_with("expected /tick 99/ (1 of 1) not seen")
        );
        assert!(lines[3].starts_with("TIMEOUT") && lines[3].contains("2.00s"));
        assert!(table.contains("3 cases: 1 passed, 1 failed, 1 timed out, 0 errors, 0 skipped"));
    }
}
