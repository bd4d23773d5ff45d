//! What an `ember test` run will do: the test files found under the paths given, the cases
//! `--filter` selects (`--repeat` times each), which of them share a boot, and the
//! `ember run` command lines.
//!
//! Cases of one file without their own `cmdline` share its `[boot]`: when the boot has a
//! snapshot point (`ready`, or the guest kit's ready line when a case has a `run`), it is
//! booted once up to there and every such case starts from that snapshot. A case with its
//! own `cmdline`, or one whose boot has no snapshot point, boots on its own.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use regex::Regex;

use super::channel;
use super::testfile::{self, Case, TestFile, TestFileError};

/// Why the run cannot start (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A path given does not exist.
    #[error("{0}: no such file or directory")]
    Missing(String),
    /// A directory holds no test file.
    #[error("{0}: no test files (*.toml) in this directory")]
    Empty(String),
    /// A directory cannot be listed.
    #[error("{path}: cannot list")]
    List {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A test file is malformed.
    #[error(transparent)]
    File(#[from] TestFileError),
    /// A `--filter` pattern is not valid.
    #[error("--filter {0}: {1}")]
    Filter(String, String),
    /// Nothing to run.
    #[error("no case matches --filter {0}")]
    NothingSelected(String),
}

/// A boot shared by cases (booted once, to its snapshot point).
#[derive(Debug, Clone)]
pub struct Group {
    /// Its file (index into [`Plan::files`]).
    pub file: usize,
    /// The snapshot point.
    pub ready: Regex,
    /// Its cases talk to the guest kit's init (`ember.test=serial`).
    pub channel: bool,
}

/// One run of one case.
#[derive(Debug, Clone)]
pub struct Job {
    /// Its file (index into [`Plan::files`]).
    pub file: usize,
    /// Its case (index into the file's cases).
    pub case: usize,
    /// The shared boot it starts from, if any (index into [`Plan::groups`]).
    pub group: Option<usize>,
    /// The command for the guest kit's init, when the case talks to it.
    pub command: Option<String>,
    /// `FILE-STEM/CASE`, with ` [k/N]` under `--repeat N`.
    pub name: String,
    /// Its serial log.
    pub log: PathBuf,
}

/// A test file and where its outputs go.
#[derive(Debug, Clone)]
pub struct FilePlan {
    /// The file.
    pub file: TestFile,
    /// Its name in case names and under `--out` (the file stem, made unique).
    pub stem: String,
    /// `OUT/STEM`: the logs.
    pub dir: PathBuf,
    /// `OUT/STEM/.work`: snapshots and disk overlays, removed at the end.
    pub work: PathBuf,
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The files with selected cases.
    pub files: Vec<FilePlan>,
    /// The shared boots.
    pub groups: Vec<Group>,
    /// The case runs, in order.
    pub jobs: Vec<Job>,
}

/// Every test file under `paths`: files as given, directories searched (recursively) for
/// `*.toml`, sorted.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PlanError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_file() {
            out.push(p.clone());
        } else if p.is_dir() {
            let before = out.len();
            walk(p, &mut out)?;
            if out.len() == before {
                return Err(PlanError::Empty(p.display().to_string()));
            }
        } else {
            return Err(PlanError::Missing(p.display().to_string()));
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PlanError> {
    let list = |source| PlanError::List {
        path: dir.display().to_string(),
        source,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(list)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(list)?;
    entries.sort();
    for e in entries {
        let hidden = e
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if e.is_dir() {
            walk(&e, out)?;
        } else if e.extension().is_some_and(|x| x == "toml") {
            out.push(e);
        }
    }
    Ok(())
}

/// A `--filter` pattern: a glob (`*`, `?`) when it has one, else a substring. It selects a
/// case when it matches the case's name, `STEM/NAME`, or one of its tags.
#[derive(Debug, Clone)]
pub struct Filter {
    text: String,
    glob: Option<Regex>,
}

impl Filter {
    /// Parses a pattern.
    pub fn new(text: &str) -> Result<Self, PlanError> {
        let glob = if text.contains(['*', '?']) {
            let mut re = String::from("^");
            for c in text.chars() {
                match c {
                    '*' => re.push_str(".*"),
                    '?' => re.push('.'),
                    c => re.push_str(&regex::escape(&c.to_string())),
                }
            }
            re.push('$');
            Some(Regex::new(&re).map_err(|e| PlanError::Filter(text.into(), e.to_string()))?)
        } else {
            None
        };
        Ok(Filter {
            text: text.to_string(),
            glob,
        })
    }

    fn is_match(&self, s: &str) -> bool {
        match &self.glob {
            Some(g) => g.is_match(s),
            None => s.contains(&self.text),
        }
    }

    /// Whether the case is selected.
    pub fn selects(&self, stem: &str, case: &Case) -> bool {
        self.is_match(&case.name)
            || self.is_match(&format!("{stem}/{}", case.name))
            || case.tags.iter().any(|t| self.is_match(t))
    }
}

/// Loads the files and lays out the run.
pub fn build(
    paths: &[PathBuf],
    filters: &[Filter],
    repeat: u32,
    out: &Path,
) -> Result<Plan, PlanError> {
    let mut plan = Plan {
        files: Vec::new(),
        groups: Vec::new(),
        jobs: Vec::new(),
    };
    let mut stems = HashSet::new();
    for path in discover(paths)? {
        let file = testfile::load(&path)?;
        let stem = unique_stem(&path, &mut stems);
        let selected: Vec<usize> = (0..file.cases.len())
            .filter(|&i| {
                filters.is_empty() || filters.iter().any(|f| f.selects(&stem, &file.cases[i]))
            })
            .collect();
        if selected.is_empty() {
            continue;
        }
        let dir = out.join(&stem);
        let fi = plan.files.len();
        plan.files.push(FilePlan {
            work: dir.join(".work"),
            dir,
            stem,
            file,
        });
        add_jobs(&mut plan, fi, &selected, repeat.max(1));
    }
    if plan.jobs.is_empty() {
        let shown: Vec<&str> = filters.iter().map(|f| f.text.as_str()).collect();
        return Err(PlanError::NothingSelected(shown.join(" ")));
    }
    Ok(plan)
}

/// The guest kit's ready line as a pattern.
pub fn kit_ready() -> Regex {
    Regex::new(&format!("^{}$", regex::escape(channel::READY_LINE)))
        .unwrap_or_else(|_| unreachable!("an escaped literal is a valid regex"))
}

fn add_jobs(plan: &mut Plan, fi: usize, selected: &[usize], repeat: u32) {
    let fp = &plan.files[fi];
    let cases = &fp.file.cases;
    let shared: Vec<usize> = selected
        .iter()
        .copied()
        .filter(|&i| cases[i].cmdline.is_none())
        .collect();
    let channel = shared.iter().any(|&i| cases[i].run.is_some());
    let group = if !shared.is_empty() && (fp.file.boot.ready.is_some() || channel) {
        plan.groups.push(Group {
            file: fi,
            ready: fp.file.boot.ready.clone().unwrap_or_else(kit_ready),
            channel,
        });
        Some(plan.groups.len() - 1)
    } else {
        None
    };
    let mut jobs = Vec::new();
    for r in 1..=repeat {
        for &ci in selected {
            let case = &cases[ci];
            let g = if case.cmdline.is_none() { group } else { None };
            let talks = match g {
                Some(g) => plan.groups[g].channel,
                None => case.run.is_some(),
            };
            let (name, log) = if repeat > 1 {
                (
                    format!("{}/{} [{r}/{repeat}]", fp.stem, case.name),
                    fp.dir.join(format!("{}.{r}.log", file_safe(&case.name))),
                )
            } else {
                (
                    format!("{}/{}", fp.stem, case.name),
                    fp.dir.join(format!("{}.log", file_safe(&case.name))),
                )
            };
            jobs.push(Job {
                file: fi,
                case: ci,
                group: g,
                command: talks.then(|| case.run.clone().unwrap_or_else(|| "true".into())),
                name,
                log,
            });
        }
    }
    plan.jobs.extend(jobs);
}

/// The file's stem, made unique in this run (`a`, `a-2`, ...) and safe as a directory name.
fn unique_stem(path: &Path, seen: &mut HashSet<String>) -> String {
    let base = file_safe(
        &path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tests".into()),
    );
    let mut stem = base.clone();
    let mut n = 1;
    while !seen.insert(stem.clone()) {
        n += 1;
        stem = format!("{base}-{n}");
    }
    stem
}

/// `s` with everything but letters, digits, `-`, `_` and `.` replaced by `_` (at most 100
/// characters), for file names.
pub fn file_safe(s: &str) -> String {
    let t: String = s
        .chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() || t.starts_with('.') {
        format!("_{t}")
    } else {
        t
    }
}

/// The kernel command line of a boot: the file's, the case's words, and the channel's.
pub fn cmdline(file: &TestFile, case: Option<&Case>, channel: bool) -> String {
    let mut c = file.boot.cmdline.trim().to_string();
    if let Some(extra) = case.and_then(|c| c.cmdline.as_deref()) {
        if !extra.trim().is_empty() {
            c.push(' ');
            c.push_str(extra.trim());
        }
    }
    if channel {
        c.push(' ');
        c.push_str(channel::CMDLINE_WORD);
    }
    c
}

/// `ember run` arguments that boot `file`'s kernel with `cmdline` and the `disks` specs.
pub fn boot_args(file: &TestFile, cmdline: &str, disks: &[String], name: &str) -> Vec<OsString> {
    let b = &file.boot;
    let mut a: Vec<OsString> = vec!["run".into(), "--kernel".into(), absolute(&b.kernel).into()];
    if let Some(i) = &b.initrd {
        a.push("--initrd".into());
        a.push(absolute(i).into());
    }
    for (k, v) in [
        ("--cmdline", cmdline),
        ("--memory", &b.memory),
        ("--cpus", &b.cpus),
        ("--serial", "stdio"),
        ("--name", name),
    ] {
        a.push(k.into());
        a.push(v.into());
    }
    for d in disks {
        a.push("--disk".into());
        a.push(d.into());
    }
    a
}

/// `ember run` arguments that start a VM from the snapshot `state`. The clock is kept as
/// saved: every case starts from the same guest state, and a guest whose clock jumped by
/// the time since the shared boot spends a while catching up (~0.2 s of a case here).
pub fn restore_args(state: &Path, name: &str) -> Vec<OsString> {
    vec![
        "run".into(),
        "--restore".into(),
        state.as_os_str().to_owned(),
        "--keep-clock".into(),
        "--serial".into(),
        "stdio".into(),
        "--name".into(),
        name.into(),
        "--no-api".into(),
    ]
}

/// `p` made absolute against the current directory (as it is when the run starts).
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The first of the boot's files that does not exist: `(what, path)`.
pub fn missing_file(file: &TestFile) -> Option<(&'static str, PathBuf)> {
    let b = &file.boot;
    let mut files = vec![("kernel", b.kernel.clone())];
    files.extend(b.initrd.iter().map(|i| ("initrd", i.clone())));
    files.extend(b.disks.iter().map(|d| ("disk", d.path.clone())));
    files.into_iter().find(|(_, p)| !p.is_file())
}

#[cfg(test)]
mod tests;
