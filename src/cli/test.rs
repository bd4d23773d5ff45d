//! `ember test`: runs boot tests described in TOML files and writes what CI systems read.
//! Exit status: 0 when every case passed, 1 when one did not, 2 for bad input (a malformed
//! test file, a bad option), 130 when interrupted (after writing the partial reports).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::USAGE_ERROR;
use crate::test_runner::plan::{self, Filter};
use crate::test_runner::progress::summary;
use crate::test_runner::report::RunReport;
use crate::test_runner::runner::{self, Options};

/// `ember test`.
#[derive(Args, Debug)]
pub struct TestArgs {
    /// Test files (TOML: a [boot] table and [[case]]s) or directories searched for *.toml
    #[arg(value_name = "PATH", required = true)]
    pub paths: Vec<PathBuf>,
    /// VMs run at once (each case in its own VM; cases of a shared boot start from the same
    /// snapshot)
    #[arg(short = 'j', long = "jobs", value_name = "N", default_value = "1")]
    pub jobs: usize,
    /// Write a JUnit XML report (Jenkins, GitLab, GitHub test reporters)
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Write a JSON report
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Run only cases whose name, FILE-STEM/NAME or a tag matches: a glob with * and ?, else a
    /// substring; repeatable (any matches)
    #[arg(long, value_name = "PATTERN")]
    pub filter: Vec<String>,
    /// Run every case N times
    #[arg(long, value_name = "N", default_value = "1")]
    pub repeat: u32,
    /// Where the serial logs go: DIR/FILE-STEM/CASE.log and DIR/FILE-STEM/boot.log
    #[arg(long, value_name = "DIR", default_value = "ember-test-out")]
    pub out: PathBuf,
    /// Keep the shared boots' snapshots and the cases' disk overlays (DIR/FILE-STEM/.work)
    #[arg(long)]
    pub keep: bool,
    /// Serial output logged per case at most (K/M/G); the rest is counted, not kept
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    pub log_limit: String,
}

fn usage(message: String) -> ExitCode {
    eprintln!("ember test: {message}");
    ExitCode::from(USAGE_ERROR)
}

/// Runs `ember test`.
pub fn test(a: TestArgs) -> ExitCode {
    if !(1..=64).contains(&a.jobs) {
        return usage(format!("-j {}: give 1 to 64", a.jobs));
    }
    if !(1..=10_000).contains(&a.repeat) {
        return usage(format!("--repeat {}: give 1 to 10000", a.repeat));
    }
    let log_limit = match crate::img::parse_size(&a.log_limit) {
        Ok(n) if n >= 4096 => n,
        Ok(_) => return usage(format!("--log-limit {}: at least 4K", a.log_limit)),
        Err(e) => return usage(format!("--log-limit {}: {e}", a.log_limit)),
    };
    let filters = match a
        .filter
        .iter()
        .map(|f| Filter::new(f))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(f) => f,
        Err(e) => return usage(e.to_string()),
    };
    let plan = match plan::build(&a.paths, &filters, a.repeat, &a.out) {
        Ok(p) => p,
        Err(e) => return usage(crate::error_chain(&e)),
    };
    let ember = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ember test: cannot find the ember binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = crate::signals::install() {
        eprintln!("ember test: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    let opts = Options {
        jobs: a.jobs,
        ember,
        log_limit,
        tty: crate::console::is_terminal(libc::STDERR_FILENO),
        keep_work: a.keep,
    };
    let outcome = match runner::run(&plan, &opts, "ember test") {
        Ok(o) => o,
        Err(e) => {
            eprintln!(
                "ember test: cannot create the output directories under {}: {e}",
                a.out.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let wrote = write_reports(&outcome.report, a.junit.as_ref(), a.json.as_ref());
    print!("{}", summary(&outcome.report));
    println!("logs: {}", a.out.display());
    if outcome.interrupted {
        eprintln!("ember test: interrupted; the reports cover what ran");
        return ExitCode::from(130);
    }
    let c = outcome.report.case_counts();
    if wrote && c.passed as usize == outcome.report.cases.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Writes the JUnit and JSON reports; false (after a message) when one could not be.
fn write_reports(report: &RunReport, junit: Option<&PathBuf>, json: Option<&PathBuf>) -> bool {
    let mut ok = true;
    let mut write =
        |path: &PathBuf, what: &str, f: &dyn Fn(&mut std::fs::File) -> Result<(), String>| {
            let r = std::fs::File::create(path)
                .map_err(|e| e.to_string())
                .and_then(|mut file| f(&mut file));
            if let Err(e) = r {
                eprintln!(
                    "ember test: cannot write the {what} report {}: {e}",
                    path.display()
                );
                ok = false;
            }
        };
    if let Some(p) = junit {
        write(p, "JUnit", &|f| {
            report.write_junit(f).map_err(|e| crate::error_chain(&e))
        });
    }
    if let Some(p) = json {
        write(p, "JSON", &|f| {
            report.write_json(f).map_err(|e| crate::error_chain(&e))
        });
    }
    ok
}
