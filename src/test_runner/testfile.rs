//! `ember test`'s test files: TOML with one `[boot]` table (the `ember run` options, paths
//! relative to the file) and `[[case]]`s.
//!
//! ```toml
//! [boot]
//! kernel = "bzImage"                 # required
//! initrd = "initramfs.cpio.gz"
//! cmdline = "console=ttyS0"          # default: ember run's
//! memory = "128M"                    # or a number of MiB
//! cpus = 1                           # or "boot=N,max=M"
//! disks = ["path=root.qcow2"]        # --disk specs; each case writes to its own overlay
//! timeout = "120s"                   # each case's default (and the shared boot's limit)
//! ready = "login: $"                 # the snapshot point: cases start from here
//!
//! [[case]]
//! name = "boots"                     # required, unique in the file
//! cmdline = "extra args"             # appended; the case boots on its own
//! run = "uname -r"                   # a shell command for the guest kit's init
//! expect = ["regex", "..."]          # in this order, on the serial output
//! fail_on = ["regex"]                # added to the kernel-trouble defaults
//! exit_code = 0                      # run's status, else ember run's exit status
//! timeout = "30s"
//! tags = ["smoke"]
//! default_fail_on = true             # false: only this case's fail_on (a test that panics)
//! ```
//!
//! Every mistake is reported as `FILE:LINE: KEY: what is wrong`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use toml::Spanned;

use crate::config::{self, DiskConfig};

/// The most a duration may be (a week).
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The default timeout of a case (and of a shared boot): Linux takes a minute or two to boot
/// where guest kernel code is emulated.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest command the guest kit's init reads (one line of a canonical-mode tty holds
/// 4095 bytes).
pub const MAX_RUN_LINE: usize = 4000;
/// The longest command (it goes into an empty pipe at once, which holds 64 KiB).
pub const MAX_RUN_BYTES: usize = 60 * 1024;
/// Compiled size limit of one regex (patterns come from files people write, not from the
/// guest; this only bounds a runaway pattern).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A test file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TestFileError {
    /// The file cannot be read.
    #[error("{path}: cannot read")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A mistake in the file.
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// Where (from 1).
        line: usize,
        /// The key, as `boot.timeout` or `case "name".expect`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The `[boot]` table: how the guest boots.
#[derive(Debug, Clone)]
pub struct Boot {
    /// The kernel (resolved against the file's directory).
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// `--memory`.
    pub memory: String,
    /// `--cpus`.
    pub cpus: String,
    /// `--disk`s (paths resolved).
    pub disks: Vec<DiskConfig>,
    /// Each case's default timeout, and the shared boot's.
    pub timeout: Duration,
    /// Where a shared boot is ready for the cases (the snapshot point).
    pub ready: Option<Regex>,
}

/// One `[[case]]`.
#[derive(Debug, Clone)]
pub struct Case {
    /// Its name.
    pub name: String,
    /// The line of its `[[case]]` header.
    pub line: usize,
    /// Words appended to the boot's command line (the case then boots on its own).
    pub cmdline: Option<String>,
    /// A shell command for the guest kit's init.
    pub run: Option<String>,
    /// Patterns that must appear, in this order.
    pub expect: Vec<Regex>,
    /// Patterns that fail the case (besides the defaults).
    pub fail_on: Vec<Regex>,
    /// The kernel-trouble defaults apply too.
    pub default_fail_on: bool,
    /// The expected exit status.
    pub exit_code: i32,
    /// How long it may take.
    pub timeout: Duration,
    /// Labels `--filter` matches.
    pub tags: Vec<String>,
}

/// A parsed test file.
#[derive(Debug, Clone)]
pub struct TestFile {
    /// The file, as it was named.
    pub path: PathBuf,
    /// The boot.
    pub boot: Boot,
    /// The cases, in file order.
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    boot: Option<Spanned<RawBoot>>,
    #[serde(default)]
    case: Vec<Spanned<RawCase>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBoot {
    kernel: Option<Spanned<String>>,
    initrd: Option<Spanned<String>>,
    cmdline: Option<Spanned<String>>,
    memory: Option<Spanned<toml::Value>>,
    cpus: Option<Spanned<toml::Value>>,
    #[serde(default)]
    disks: Vec<Spanned<String>>,
    timeout: Option<Spanned<toml::Value>>,
    ready: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: Option<Spanned<String>>,
    cmdline: Option<Spanned<String>>,
    run: Option<Spanned<String>>,
    #[serde(default)]
    expect: Vec<Spanned<String>>,
    #[serde(default)]
    fail_on: Vec<Spanned<String>>,
    default_fail_on: Option<bool>,
    exit_code: Option<Spanned<i64>>,
    timeout: Option<Spanned<toml::Value>>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
}

/// Reads and checks a test file.
pub fn load(path: &Path) -> Result<TestFile, TestFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TestFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(path, &text)
}

/// Parses a test file's text; `path` names it in errors and anchors relative paths.
pub fn parse(path: &Path, text: &str) -> Result<TestFile, TestFileError> {
    let ctx = Ctx { path, text };
    let raw: RawFile = toml::from_str(text).map_err(|e| ctx.toml_error(&e))?;
    let Some(boot) = raw.boot else {
        return Err(ctx.invalid(1, "boot", "the file has no [boot] table"));
    };
    let boot_line = ctx.header_line(boot.span().start, "[boot]");
    let boot = ctx.boot(boot.into_inner(), boot_line)?;
    if raw.case.is_empty() {
        return Err(ctx.invalid(ctx.line_of(text.len()), "case", "the file has no [[case]]"));
    }
    let mut cases: Vec<Case> = Vec::with_capacity(raw.case.len());
    for (i, c) in raw.case.into_iter().enumerate() {
        let line = ctx.header_line(c.span().start, "[[case]]");
        let case = ctx.case(c.into_inner(), line, i, &boot)?;
        if let Some(first) = cases.iter().find(|x| x.name == case.name) {
            return Err(ctx.invalid(
                line,
                &case_key(&case.name, "name"),
                &format!("a case of this name is already on line {}", first.line),
            ));
        }
        cases.push(case);
    }
    Ok(TestFile {
        path: path.to_path_buf(),
        boot,
        cases,
    })
}

fn case_key(name: &str, key: &str) -> String {
    format!("case \"{name}\".{key}")
}

/// What error messages need: the file's name and text.
struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn invalid(&self, line: usize, key: &str, message: &str) -> TestFileError {
        TestFileError::Invalid {
            path: self.path.display().to_string(),
            line,
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    /// The line (from 1) of byte offset `at`.
    fn line_of(&self, at: usize) -> usize {
        let at = at.min(self.text.len());
        1 + self.text.as_bytes()[..at]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    /// The line of a table's header: the last line starting with `header` at or before
    /// the table's span (toml spans a table from its first key).
    fn header_line(&self, at: usize, header: &str) -> usize {
        let at = at.min(self.text.len());
        let line = self.line_of(at);
        let lines: Vec<&str> = self.text.lines().take(line).collect();
        lines
            .iter()
            .rposition(|l| l.trim_start().starts_with(header))
            .map_or(line, |i| i + 1)
    }

    /// A TOML syntax or type error: its line, and the key written on that line.
    fn toml_error(&self, e: &toml::de::Error) -> TestFileError {
        let line = e.span().map_or(1, |s| self.line_of(s.start));
        let key = self
            .text
            .lines()
            .nth(line - 1)
            .and_then(key_on_line)
            .unwrap_or_else(|| "toml".to_string());
        self.invalid(line, &key, e.message().trim())
    }

    fn boot(&self, b: RawBoot, line: usize) -> Result<Boot, TestFileError> {
        let dir = self.path.parent().unwrap_or(Path::new(""));
        let Some(kernel) = b.kernel else {
            return Err(self.invalid(line, "boot.kernel", "missing: name the guest kernel"));
        };
        let kernel = self.path_value(dir, &kernel, "boot.kernel")?;
        let initrd = match &b.initrd {
            Some(i) => Some(self.path_value(dir, i, "boot.initrd")?),
            None => None,
        };
        let cmdline = b
            .cmdline
            .map_or_else(|| config::DEFAULT_CMDLINE.to_string(), Spanned::into_inner);
        let memory = match &b.memory {
            Some(m) => self.memory(m)?,
            None => "256M".to_string(),
        };
        let cpus = match &b.cpus {
            Some(c) => self.cpus(c)?,
            None => "1".to_string(),
        };
        let mut disks = Vec::new();
        for d in &b.disks {
            disks.push(self.disk(dir, d)?);
        }
        let timeout = match &b.timeout {
            Some(t) => self.duration(t, "boot.timeout")?,
            None => DEFAULT_TIMEOUT,
        };
        let ready = match &b.ready {
            Some(r) => Some(self.regex(r, "boot.ready")?),
            None => None,
        };
        Ok(Boot {
            kernel,
            initrd,
            cmdline,
            memory,
            cpus,
            disks,
            timeout,
            ready,
        })
    }

    fn case(
        &self,
        c: RawCase,
        line: usize,
        index: usize,
        boot: &Boot,
    ) -> Result<Case, TestFileError> {
        let Some(name) = c.name else {
            return Err(self.invalid(
                line,
                &format!("case #{}.name", index + 1),
                "missing: every case needs a name",
            ));
        };
        let name_line = self.line_of(name.span().start);
        let name = name.into_inner();
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            return Err(self.invalid(name_line, "case.name", "must be a non-empty line of text"));
        }
        let key = |k: &str| case_key(&name, k);
        let cmdline = c.cmdline.map(Spanned::into_inner);
        let run = match c.run {
            Some(r) => Some(self.run_value(&r, &key("run"))?),
            None => None,
        };
        let expect = self.regexes(&c.expect, &key("expect"))?;
        let fail_on = self.regexes(&c.fail_on, &key("fail_on"))?;
        let exit_code = match &c.exit_code {
            Some(e) if (0..=255).contains(e.get_ref()) => *e.get_ref() as i32,
            Some(e) => {
                return Err(self.invalid(
                    self.line_of(e.span().start),
                    &key("exit_code"),
                    &format!("{} is not an exit status (0 to 255)", e.get_ref()),
                ))
            }
            None => 0,
        };
        let timeout = match &c.timeout {
            Some(t) => self.duration(t, &key("timeout"))?,
            None => boot.timeout,
        };
        let tags = c.tags.into_iter().map(Spanned::into_inner).collect();
        Ok(Case {
            name,
            line,
            cmdline,
            run,
            expect,
            fail_on,
            default_fail_on: c.default_fail_on.unwrap_or(true),
            exit_code,
            timeout,
            tags,
        })
    }

    fn path_value(
        &self,
        dir: &Path,
        v: &Spanned<String>,
        key: &str,
    ) -> Result<PathBuf, TestFileError> {
        if v.get_ref().is_empty() {
            return Err(self.invalid(self.line_of(v.span().start), key, "is empty"));
        }
        Ok(dir.join(v.get_ref()))
    }

    fn memory(&self, v: &Spanned<toml::Value>) -> Result<String, TestFileError> {
        let line = self.line_of(v.span().start);
        let text = match v.get_ref() {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            other => {
                let m = format!("expected a size like \"128M\", found {}", other.type_str());
                return Err(self.invalid(line, "boot.memory", &m));
            }
        };
        config::parse_memory(&text).map_err(|e| self.invalid(line, "boot.memory", &e.message))?;
        Ok(text)
    }

    fn cpus(&self, v: &Spanned<toml::Value>) -> Result<String, TestFileError> {
        let line = self.line_of(v.span().start);
        let text = match v.get_ref() {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            other => {
                let m = format!("expected a number of vCPUs, found {}", other.type_str());
                return Err(self.invalid(line, "boot.cpus", &m));
            }
        };
        let mut probe = config::VmConfig::new("test", PathBuf::from("kernel"));
        probe.cpus = config::parse_text::<config::CpusConfig>("--cpus", &text)
            .map_err(|e| self.invalid(line, "boot.cpus", &e.message))?;
        probe
            .check()
            .map_err(|e| self.invalid(line, "boot.cpus", &e.message))?;
        Ok(text)
    }

    fn disk(&self, dir: &Path, v: &Spanned<String>) -> Result<DiskConfig, TestFileError> {
        let line = self.line_of(v.span().start);
        let mut d = DiskConfig::parse(v.get_ref())
            .map_err(|e| self.invalid(line, "boot.disks", &e.message))?;
        d.path = dir.join(&d.path);
        Ok(d)
    }

    fn duration(&self, v: &Spanned<toml::Value>, key: &str) -> Result<Duration, TestFileError> {
        let line = self.line_of(v.span().start);
        let d = match v.get_ref() {
            toml::Value::String(s) => parse_duration(s),
            toml::Value::Integer(n) if *n > 0 => Ok(Duration::from_secs(*n as u64)),
            toml::Value::Float(f) if *f > 0.0 && f.is_finite() => {
                Duration::try_from_secs_f64(*f).map_err(|e| e.to_string())
            }
            other => Err(format!(
                "expected a duration like \"30s\", found {}",
                other.type_str()
            )),
        };
        match d {
            Ok(d) if d.is_zero() => Err(self.invalid(line, key, "must be longer than 0")),
            Ok(d) if d > MAX_DURATION => Err(self.invalid(line, key, "is over a week")),
            Ok(d) => Ok(d),
            Err(m) => Err(self.invalid(line, key, &m)),
        }
    }

    fn regex(&self, v: &Spanned<String>, key: &str) -> Result<Regex, TestFileError> {
        regex::RegexBuilder::new(v.get_ref())
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| {
                let first = e.to_string();
                let message = format!("not a valid regex: {}", first.lines().last().unwrap_or(""));
                self.invalid(self.line_of(v.span().start), key, &message)
            })
    }

    fn regexes(&self, v: &[Spanned<String>], key: &str) -> Result<Vec<Regex>, TestFileError> {
        v.iter().map(|r| self.regex(r, key)).collect()
    }

    fn run_value(&self, v: &Spanned<String>, key: &str) -> Result<String, TestFileError> {
        let line = self.line_of(v.span().start);
        let run = v.get_ref();
        if run.trim().is_empty() {
            return Err(self.invalid(line, key, "is empty"));
        }
        if run.len() > MAX_RUN_BYTES {
            let m = format!("{} bytes; at most {MAX_RUN_BYTES}", run.len());
            return Err(self.invalid(line, key, &m));
        }
        if let Some(long) = run.lines().find(|l| l.len() > MAX_RUN_LINE) {
            return Err(self.invalid(
                line,
                key,
                &format!(
                    "a line of {} bytes; the guest reads lines of at most {MAX_RUN_LINE}",
                    long.len()
                ),
            ));
        }
        if run
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(self.invalid(line, key, "control characters other than newline and tab"));
        }
        Ok(run.clone())
    }
}

/// The key of a `key = value` line (dotted or quoted keys as written).
fn key_on_line(line: &str) -> Option<String> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c));
    ok.then(|| key.to_string())
}

/// Parses `120s`, `2m`, `1h30m`, `500ms`, `1.5s` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("'{s}' is not a duration; use e.g. 30s, 2m, 1h30m, 500ms");
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = t.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|_| bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let scale = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += Duration::try_from_secs_f64(n * scale).map_err(|_| bad())?;
        rest = tail.trim_start();
    }
    Ok(total)
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests;
