//! How a case is judged from what happened: its end (exit, report, timeout, trouble), its
//! `exit_code`, its `expect` patterns in order, and the KTAP results the guest printed.

use super::ktap::KtapReport;
use super::report::CaseStatus;
use super::runner::{colon, exit_code, show_duration, trouble_text};
use super::testfile::Case;
use super::vm::Ended;
use super::watch::Watcher;

/// What was seen of a case's run.
pub struct Seen<'a> {
    /// How the run ended.
    pub ended: &'a Ended,
    /// The console's state at the end.
    pub watcher: &'a Watcher,
    /// The KTAP results, if the guest printed any.
    pub ktap: Option<&'a KtapReport>,
    /// The case talked to the guest kit's init (its `run` status is the exit status).
    pub channel: bool,
    /// The last line of ember's stderr.
    pub stderr: &'a str,
}

/// The case's status and, unless it passed, why.
pub fn verdict(case: &Case, seen: &Seen<'_>) -> (CaseStatus, Option<String>) {
    let w = seen.watcher;
    let failed = |m: String| (CaseStatus::Failed, Some(m));
    match seen.ended {
        Ended::Cancelled => {
            return (
                CaseStatus::Error,
                Some("interrupted: the VM was stopped".into()),
            )
        }
        Ended::TimedOut | Ended::Ready => {
            let mut m = format!("timed out after {}", show_duration(case.timeout));
            if seen.channel && !w.started {
                m.push_str(" (the guest had not started the command)");
            }
            if !w.last_line.is_empty() {
                m.push_str(&format!("; last line: {:?}", w.last_line));
            }
            return (CaseStatus::TimedOut, Some(m));
        }
        Ended::Trouble => return failed(trouble_text(w)),
        Ended::Reported => {
            let code = w.result.unwrap_or(-1);
            if code != case.exit_code {
                return failed(format!(
                    "the command exited with {code}, expected {}",
                    case.exit_code
                ));
            }
        }
        Ended::Exited(status) => {
            let code = exit_code(*status);
            if code == 2 && case.exit_code != 2 {
                return (
                    CaseStatus::Error,
                    Some(format!("ember run failed{}", colon(seen.stderr))),
                );
            }
            if seen.channel {
                return failed(format!(
                    "the guest stopped (ember exit status {code}) before its command reported \
                     an exit status{}",
                    colon(seen.stderr)
                ));
            }
            if code != case.exit_code {
                let why = if code == 1 {
                    colon(seen.stderr)
                } else {
                    String::new()
                };
                return failed(format!(
                    "ember run exited with {code}, expected {}{why}",
                    case.exit_code
                ));
            }
        }
    }
    if let Some((i, re)) = w.missing_expect() {
        return failed(format!(
            "expected /{}/ ({} of {}) not seen",
            re.as_str(),
            i + 1,
            case.expect.len()
        ));
    }
    if let Some(k) = seen.ktap {
        if !k.ok() {
            let c = &k.counts;
            return failed(format!(
                "KTAP: {} failed, {} crashed (of {} tests; {} parse errors)",
                c.failed,
                c.crashed,
                c.total(),
                c.errors
            ));
        }
    }
    (CaseStatus::Passed, None)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;
    use std::time::Duration;

    use regex::Regex;

    use super::*;
    use crate::test_runner::watch::WatchSpec;

    fn case(expect: &[&str], exit_code: i32) -> Case {
        Case {
            name: "c".into(),
            line: 1,
            cmdline: None,
            run: None,
            expect: expect.iter().map(|e| Regex::new(e).unwrap()).collect(),
            fail_on: Vec::new(),
            default_fail_on: true,
            exit_code,
            timeout: Duration::from_secs(30),
            tags: Vec::new(),
        }
    }

    fn watcher(c: &Case, channel: bool, output: &str) -> Watcher {
        let mut w = Watcher::new(WatchSpec {
            expect: c.expect.clone(),
            fail_on: crate::test_runner::watch::default_fail_on(),
            ready: None,
            channel,
            ktap: false,
        });
        w.feed(output.as_bytes());
        w.finish();
        w
    }

    fn judge(c: &Case, ended: Ended, w: &Watcher, channel: bool) -> (CaseStatus, Option<String>) {
        verdict(
            c,
            &Seen {
                ended: &ended,
                watcher: w,
                ktap: None,
                channel,
                stderr: "ember: guest crashed",
            },
        )
    }

    fn exited(code: i32) -> Ended {
        Ended::Exited(ExitStatus::from_raw(code << 8))
    }

    #[test]
    fn an_exit_with_the_expected_status_and_all_patterns_in_order_passes() {
        let c = case(&["tick 1", "tick 3"], 33);
        let w = watcher(&c, false, "tick 1\ntick 2\ntick 3\n");
        assert_eq!(judge(&c, exited(33), &w, false), (CaseStatus::Passed, None));
    }

    #[test]
    fn patterns_out_of_order_fail_naming_the_first_one_missing() {
        let c = case(&["tick 3", "tick 1"], 0);
        let w = watcher(&c, false, "tick 1\ntick 2\ntick 3\n");
        let (status, message) = judge(&c, exited(0), &w, false);
        assert_eq!(status, CaseStatus::Failed);
        assert_eq!(message.unwrap(), "expected /tick 1/ (2 of 2) not seen");
    }

    #[test]
    fn a_wrong_exit_status_fails_and_ember_errors_are_errors() {
        let c = case(&[], 0);
        let w = watcher(&c, false, "");
        let (status, message) = judge(&c, exited(33), &w, false);
        assert_eq!(status, CaseStatus::Failed);
        assert_eq!(message.unwrap(), "ember run exited with 33, expected 0");
        let (status, message) = judge(&c, exited(2), &w, false);
        assert_eq!(status, CaseStatus::Error);
        assert!(message.unwrap().contains("guest crashed"));
    }

    #[test]
    fn a_command_case_is_judged_by_the_reported_status_not_embers() {
        let c = case(&["hello"], 3);
        let w = watcher(&c, true, "hello\nember-test: exit=3\n");
        assert_eq!(judge(&c, Ended::Reported, &w, true).0, CaseStatus::Passed);
        let w = watcher(&c, true, "hello\n");
        let (status, message) = judge(&c, exited(0), &w, true);
        assert_eq!(status, CaseStatus::Failed);
        assert!(message.unwrap().contains("before its command reported"));
    }

    #[test]
    fn kernel_trouble_fails_and_a_timeout_is_its_own_status() {
        let c = case(&[], 0);
        let w = watcher(
            &c,
            false,
            "[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n",
        );
        let (status, message) = judge(&c, Ended::Trouble, &w, false);
        assert_eq!(status, CaseStatus::Failed);
        assert!(message.unwrap().contains("Attempted to kill init"));
        let w = watcher(&c, false, "tick 9\n");
        let (status, message) = judge(&c, Ended::TimedOut, &w, false);
        assert_eq!(status, CaseStatus::TimedOut);
        assert_eq!(
            message.unwrap(),
            "timed out after 30s; last line: \"tick 9\""
        );
    }

    #[test]
    fn failed_ktap_tests_fail_an_otherwise_passing_case() {
        let c = case(&[], 0);
        let w = watcher(&c, false, "");
        let mut p = crate::test_runner::ktap::KtapParser::new();
        p.feed(b"KTAP version 1\n1..2\nok 1 a\nnot ok 2 b\n");
        let k = p.finish();
        let ended = exited(0);
        let (status, message) = verdict(
            &c,
            &Seen {
                ended: &ended,
                watcher: &w,
                ktap: Some(&k),
                channel: false,
                stderr: "",
            },
        );
        assert_eq!(status, CaseStatus::Failed);
        assert_eq!(
            message.unwrap(),
            "KTAP: 1 failed, 0 crashed (of 2 tests; 0 parse errors)"
        );
    }
}
