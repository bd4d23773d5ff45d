//! Runs a [`Plan`]: each shared boot once, up to its ready point, frozen with
//! `PUT /ember/save`; then every case as a child `ember run` (`--restore` from its boot's
//! snapshot, or booting on its own), `-j N` at a time. A case that starts from a snapshot
//! reads the boot's output first (it is part of what its guest printed), then its own.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::channel;
use super::disks::{self, DiskError};
use super::plan::{self, Plan};
use super::progress::Progress;
use super::report::{read_log_tail, CaseResult, CaseStatus, RunReport};
use super::verdict::{verdict, Seen};
use super::vm::{Drive, Ended, VmProcess};
use super::watch::{default_fail_on, LogFile, WatchSpec, Watcher};
use crate::snapshot::SnapshotState;

/// How a run is done.
#[derive(Debug, Clone)]
pub struct Options {
    /// VMs at once.
    pub jobs: usize,
    /// The ember binary the VMs run under.
    pub ember: PathBuf,
    /// Bytes of serial output logged per case (and per shared boot).
    pub log_limit: u64,
    /// Draw progress on the terminal.
    pub tty: bool,
    /// Keep snapshots and overlays (`OUT/STEM/.work`).
    pub keep_work: bool,
}

/// What a run gives.
#[derive(Debug)]
pub struct Outcome {
    /// The results, in plan order (cases not run are skipped).
    pub report: RunReport,
    /// Ctrl-C (or SIGTERM/SIGHUP) stopped the run.
    pub interrupted: bool,
}

/// Bytes of the serial log in a failed case's JUnit/JSON record.
const LOG_TAIL: u64 = 64 * 1024;
/// Bytes of the serial log in a passed case's record (thousands of them stay small).
const LOG_TAIL_PASSED: u64 = 8 * 1024;
/// How long a saved VM gets to write its snapshot and exit.
const SAVE_LIMIT: Duration = Duration::from_secs(120);

/// A shared boot's frozen state.
struct Snapshot {
    state_path: PathBuf,
    state: SnapshotState,
    boot_log: PathBuf,
}

enum GroupState {
    Waiting,
    Booting,
    Ready(Arc<Snapshot>),
    Failed(String),
}

#[derive(Clone, Copy)]
enum Work {
    Boot(usize),
    Case(usize),
}

struct Sched {
    queue: VecDeque<Work>,
    groups: Vec<GroupState>,
}

struct Runner<'a> {
    plan: &'a Plan,
    opts: &'a Options,
    sched: Mutex<Sched>,
    wake: Condvar,
    cancel: AtomicBool,
    results: Mutex<Vec<Option<CaseResult>>>,
    progress: Progress,
    vm_seq: AtomicUsize,
    active: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the plan; `name` names the report. Ctrl-C stops every VM and what ran is reported.
pub fn run(plan: &Plan, opts: &Options, name: &str) -> Result<Outcome, std::io::Error> {
    for f in &plan.files {
        std::fs::create_dir_all(&f.work)?;
    }
    let mut queue: VecDeque<Work> = (0..plan.groups.len()).map(Work::Boot).collect();
    queue.extend((0..plan.jobs.len()).map(Work::Case));
    let runner = Runner {
        plan,
        opts,
        sched: Mutex::new(Sched {
            queue,
            groups: plan.groups.iter().map(|_| GroupState::Waiting).collect(),
        }),
        wake: Condvar::new(),
        cancel: AtomicBool::new(false),
        results: Mutex::new(vec![None; plan.jobs.len()]),
        progress: Progress::new(plan.jobs.len() as u64, opts.tty),
        vm_seq: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
    };
    let workers = opts.jobs.clamp(1, plan.jobs.len() + plan.groups.len());
    runner.active.store(workers, Ordering::SeqCst);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| runner.worker());
        }
        while runner.active.load(Ordering::SeqCst) > 0 {
            if crate::signals::last_signal() != 0 && !runner.cancel.swap(true, Ordering::SeqCst) {
                runner.wake.notify_all();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    runner.progress.done();
    if !opts.keep_work {
        for f in &plan.files {
            let _ = std::fs::remove_dir_all(&f.work);
        }
    }
    let interrupted = runner.cancel.load(Ordering::SeqCst);
    let results = std::mem::take(&mut *lock(&runner.results));
    let cases = results
        .into_iter()
        .zip(&plan.jobs)
        .map(|(r, job)| {
            r.unwrap_or_else(|| {
                let mut c = CaseResult::new(&job.name, CaseStatus::Skipped, Duration::ZERO);
                c.file = Some(plan.files[job.file].file.path.display().to_string());
                c.message = Some("not run: the run was interrupted".into());
                c
            })
        })
        .collect();
    Ok(Outcome {
        report: RunReport {
            name: name.to_string(),
            cases,
        },
        interrupted,
    })
}

impl Runner<'_> {
    fn worker(&self) {
        while let Some(work) = self.next_work() {
            match work {
                Work::Boot(g) => {
                    let state = self.shared_boot(g);
                    lock(&self.sched).groups[g] = state;
                    self.wake.notify_all();
                }
                Work::Case(j) => {
                    let result = self.case(j);
                    lock(&self.results)[j] = Some(result);
                }
            }
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.wake.notify_all();
    }

    /// The next thing to do: a boot, a case that boots on its own, or a case whose shared
    /// boot is done; waits while only cases of boots still running are left.
    fn next_work(&self) -> Option<Work> {
        let mut s = lock(&self.sched);
        loop {
            if self.cancel.load(Ordering::SeqCst) || s.queue.is_empty() {
                return None;
            }
            let pos = s.queue.iter().position(|w| match *w {
                Work::Boot(_) => true,
                Work::Case(j) => match self.plan.jobs[j].group {
                    None => true,
                    Some(g) => matches!(s.groups[g], GroupState::Ready(_) | GroupState::Failed(_)),
                },
            });
            if let Some(pos) = pos {
                let work = s.queue.remove(pos)?;
                if let Work::Boot(g) = work {
                    s.groups[g] = GroupState::Booting;
                }
                return Some(work);
            }
            s = self
                .wake
                .wait_timeout(s, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn vm_name(&self) -> String {
        let n = self.vm_seq.fetch_add(1, Ordering::SeqCst);
        format!("ember-test-{}-{n}", std::process::id())
    }

    /// Boots group `g` to its ready point and saves it.
    fn shared_boot(&self, g: usize) -> GroupState {
        let fp = &self.plan.files[self.plan.groups[g].file];
        let label = format!("{} (shared boot)", fp.stem);
        self.progress.started(&label);
        let start = Instant::now();
        let r = self.boot_to_snapshot(g);
        let took = start.elapsed().as_secs_f64();
        match r {
            Ok(snap) => {
                let line = format!(
                    "BOOTED  {took:>7.2}s {}: saved at the ready point; boot log {}",
                    fp.stem,
                    snap.boot_log.display()
                );
                self.progress.note(&label, &line);
                GroupState::Ready(Arc::new(snap))
            }
            Err(m) => {
                let line = format!("BOOT    {took:>7.2}s {}: FAILED: {m}", fp.stem);
                self.progress.note(&label, &line);
                GroupState::Failed(m)
            }
        }
    }

    fn boot_to_snapshot(&self, g: usize) -> Result<Snapshot, String> {
        let group = &self.plan.groups[g];
        let fp = &self.plan.files[group.file];
        let file = &fp.file;
        if let Some((what, path)) = plan::missing_file(file) {
            return Err(format!("{what} '{}' does not exist", path.display()));
        }
        let ember = &self.opts.ember;
        let (disk_specs, _) = disks::boot_disks(ember, &file.boot.disks, &fp.work, "boot")
            .map_err(|e| crate::error_chain(&e))?;
        let name = self.vm_name();
        let cmdline = plan::cmdline(file, None, group.channel);
        let args = plan::boot_args(file, &cmdline, &disk_specs, &name);
        let boot_log = fp.dir.join("boot.log");
        let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
        let mut log = LogFile::create(&boot_log, self.opts.log_limit)
            .map_err(|e| io(&format!("cannot create {}", boot_log.display()), e))?;
        let mut watcher = Watcher::new(WatchSpec {
            fail_on: default_fail_on(),
            ready: Some(group.ready.clone()),
            ..WatchSpec::default()
        });
        let mut vm = VmProcess::spawn(ember, &args).map_err(|e| io("cannot start ember", e))?;
        let mut drive = Drive {
            watcher: &mut watcher,
            log: &mut log,
            deadline: Instant::now() + file.boot.timeout,
            stop_on_ready: true,
            command: None,
            started_at: None,
            cancel: &self.cancel,
        };
        let ended = vm
            .drive(&mut drive)
            .map_err(|e| io("reading the console", e))?;
        let ready = group.ready.as_str();
        let failure = match ended {
            Ended::Ready => None,
            Ended::Exited(s) => Some(format!(
                "the boot ended (ember exit status {}) before its ready point /{ready}/{}",
                exit_code(s),
                colon(&vm.stderr_last_line())
            )),
            Ended::TimedOut => Some(format!(
                "no ready point /{ready}/ within the boot's timeout ({}); last line: {:?}",
                show_duration(file.boot.timeout),
                watcher.last_line
            )),
            Ended::Trouble => Some(trouble_text(&watcher)),
            Ended::Cancelled => Some("interrupted".to_string()),
            Ended::Reported => Some("unexpected result line".to_string()),
        };
        if let Some(f) = failure {
            vm.stop();
            let _ = log.finish();
            return Err(format!("{f} (log: {})", boot_log.display()));
        }
        let state_path = plan::absolute(&fp.work.join("boot.state"));
        let sock = crate::vmdir::path_of(&name).join("api.sock");
        let body = serde_json::json!({ "path": state_path }).to_string();
        if let Err(e) = crate::api::client::call(&sock, "PUT", "/ember/save", Some(&body)) {
            vm.stop();
            let _ = log.finish();
            return Err(format!(
                "cannot save the VM at its ready point: {}",
                crate::error_chain(&e)
            ));
        }
        let exited = vm
            .drain(
                &mut log,
                &mut watcher,
                Instant::now() + SAVE_LIMIT,
                &self.cancel,
            )
            .map_err(|e| io("reading the console", e))?;
        log.finish().map_err(|e| io("writing the boot log", e))?;
        if exited.is_none() {
            vm.stop();
            return Err("the VM did not exit after it was saved".into());
        }
        let state = disks::read_state(&state_path).map_err(|e| crate::error_chain(&e))?;
        Ok(Snapshot {
            state_path,
            state,
            boot_log,
        })
    }

    /// Runs job `j` and reports it.
    fn case(&self, j: usize) -> CaseResult {
        let job = &self.plan.jobs[j];
        let fp = &self.plan.files[job.file];
        self.progress.started(&job.name);
        let start = Instant::now();
        let mut result = match self.try_case(j, start) {
            Ok(r) => r,
            Err(message) => {
                let mut r = CaseResult::new(&job.name, CaseStatus::Error, start.elapsed());
                r.message = Some(message);
                r
            }
        };
        result.file = Some(fp.file.path.display().to_string());
        if job.log.is_file() {
            let keep = if result.status == CaseStatus::Passed {
                LOG_TAIL_PASSED
            } else {
                LOG_TAIL
            };
            result.log_tail = read_log_tail(&job.log, keep).unwrap_or_default();
            result.log_path = Some(job.log.clone());
        }
        self.progress.finished(&job.name, &result);
        result
    }

    /// The VM of job `j`: how to start it, the files to delete afterwards, and the boot log
    /// to read first.
    fn case_vm(&self, j: usize, name: &str) -> Result<CaseVm, String> {
        let job = &self.plan.jobs[j];
        let fp = &self.plan.files[job.file];
        let case = &fp.file.cases[job.case];
        let ember = &self.opts.ember;
        let tag = format!("case{j}");
        let chain = |e: DiskError| crate::error_chain(&e);
        if let Some(g) = job.group {
            let snap = match &lock(&self.sched).groups[g] {
                GroupState::Ready(s) => s.clone(),
                GroupState::Failed(m) => {
                    return Err(format!(
                        "case '{}' ({}:{}): the shared boot failed: {m}",
                        case.name,
                        fp.file.path.display(),
                        case.line
                    ))
                }
                GroupState::Waiting | GroupState::Booting => {
                    return Err("the shared boot did not run".into())
                }
            };
            let (state, created) =
                disks::case_state(ember, &snap.state_path, &snap.state, &fp.work, &tag)
                    .map_err(chain)?;
            let args = plan::restore_args(&state, name);
            return Ok(CaseVm {
                args,
                created,
                replay: Some(snap.boot_log.clone()),
            });
        }
        if let Some((what, path)) = plan::missing_file(&fp.file) {
            return Err(format!(
                "case '{}' ({}:{}): {what} '{}' does not exist",
                case.name,
                fp.file.path.display(),
                case.line,
                path.display()
            ));
        }
        let (specs, created) =
            disks::boot_disks(ember, &fp.file.boot.disks, &fp.work, &tag).map_err(chain)?;
        let cmdline = plan::cmdline(&fp.file, Some(case), job.command.is_some());
        let mut args = plan::boot_args(&fp.file, &cmdline, &specs, name);
        args.push("--no-api".into());
        Ok(CaseVm {
            args,
            created,
            replay: None,
        })
    }

    fn try_case(&self, j: usize, start: Instant) -> Result<CaseResult, String> {
        let job = &self.plan.jobs[j];
        let case = &self.plan.files[job.file].file.cases[job.case];
        let name = self.vm_name();
        let CaseVm {
            args,
            created,
            replay,
        } = self.case_vm(j, &name)?;
        let cleanup = Cleanup(created);
        let mut fail_on = case.fail_on.clone();
        if case.default_fail_on {
            fail_on.extend(default_fail_on());
        }
        let talks = job.command.is_some();
        let mut watcher = Watcher::new(WatchSpec {
            expect: case.expect.clone(),
            fail_on,
            ready: talks.then(plan::kit_ready),
            channel: talks,
            ktap: true,
        });
        if let Some(boot_log) = &replay {
            replay_log(&mut watcher, boot_log)
                .map_err(|e| format!("cannot read the boot log {}: {e}", boot_log.display()))?;
        }
        let mut log = LogFile::create(&job.log, self.opts.log_limit)
            .map_err(|e| format!("cannot create {}: {e}", job.log.display()))?;
        let mut vm = VmProcess::spawn(&self.opts.ember, &args)
            .map_err(|e| format!("cannot start ember: {e}"))?;
        let mut drive = Drive {
            watcher: &mut watcher,
            log: &mut log,
            deadline: start + case.timeout,
            stop_on_ready: false,
            command: job.command.as_deref().map(channel::encode),
            started_at: None,
            cancel: &self.cancel,
        };
        let ended = vm
            .drive(&mut drive)
            .map_err(|e| format!("reading the console: {e}"))?;
        let started_at = drive.started_at;
        // On a terminal, Ctrl-C reaches the VMs too: one that died of it was interrupted.
        let ended = match ended {
            Ended::Exited(s)
                if self.cancel.load(Ordering::SeqCst) && [130, 143].contains(&exit_code(s)) =>
            {
                Ended::Cancelled
            }
            other => other,
        };
        if !matches!(ended, Ended::Exited(_)) {
            vm.stop();
            // What the stopped VM printed last is worth keeping in the log.
            let mut rest = Watcher::new(WatchSpec::default());
            let quiet = AtomicBool::new(false);
            let _ = vm.drain(
                &mut log,
                &mut rest,
                Instant::now() + Duration::from_secs(2),
                &quiet,
            );
        }
        let duration = start.elapsed();
        log.finish()
            .map_err(|e| format!("cannot write {}: {e}", job.log.display()))?;
        drop(cleanup);
        let ktap = watcher.take_ktap();
        let (status, message) = verdict(
            case,
            &Seen {
                ended: &ended,
                watcher: &watcher,
                ktap: ktap.as_ref(),
                channel: talks,
                stderr: &vm.stderr_last_line(),
            },
        );
        let mut r = CaseResult::new(&job.name, status, duration);
        r.message = message;
        r.subtests = ktap.into_iter().collect();
        r.command_start = started_at.map(|t| t.saturating_duration_since(start));
        Ok(r)
    }
}

/// How a case's VM starts.
struct CaseVm {
    /// `ember run` arguments.
    args: Vec<std::ffi::OsString>,
    /// Throw-away files (overlays, a state file copy).
    created: Vec<PathBuf>,
    /// The shared boot's log, read before the case's own output.
    replay: Option<PathBuf>,
}

/// Deletes a case's throw-away files when dropped.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Feeds a shared boot's log to a case's watcher: what the guest printed before the
/// snapshot is part of the case's output.
fn replay_log(watcher: &mut Watcher, path: &Path) -> std::io::Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        watcher.feed(&buf[..n]);
    }
}

/// An exit status as a shell shows it (128 + N for signal N).
pub fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

/// `: text`, or nothing when `text` is empty.
pub fn colon(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// `30s`, `1.5s`, `2m`.
pub fn show_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 120.0 && s % 60.0 == 0.0 {
        format!("{}m", s / 60.0)
    } else {
        format!("{s}s")
    }
}

/// What a `fail_on` match says.
pub fn trouble_text(w: &Watcher) -> String {
    match &w.trouble {
        Some((pattern, line)) => format!("fail_on /{pattern}/ matched: {line}"),
        None => "fail_on matched".into(),
    }
}
