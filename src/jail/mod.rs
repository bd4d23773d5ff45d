//! `ember jail`: runs `ember run` confined, as Firecracker's jailer does, adapted.
//!
//! The jailer (root) checks the run's options, prepares the VM's state directory
//! (`$EMBER_STATE_DIR/vms/ID`, owned by the jail's user) and snapshot store, creates the
//! cgroups, and forks the VM process into a new PID namespace (it is PID 1 there). That
//! process enters new mount, IPC and UTS namespaces (and `--netns`), builds a root holding
//! only what the VM needs ([`inside`]), pivots into it, sets rlimits, becomes `UID:GID`,
//! and runs `ember run` there. Paths are the same inside as outside, so the state
//! directory (lock, pid, `api.sock`, `console.log`) is the host's own: `ember list`,
//! `ember console ID` and every other verb find the jailed VM as any other, and its pid
//! file holds its host PID ([`host_pid`]). The jailer waits for the VM, passes on
//! SIGTERM/SIGINT/SIGHUP, and removes the cgroups and the jail directory once it ends;
//! its exit status is the VM's.

pub mod cgroup;
pub mod files;
pub mod inside;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::cli::run::RunArgs;

/// Set in the jailed process: its PID as the host sees it.
const HOST_PID_ENV: &str = "EMBER_HOST_PID";

/// Errors making a jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The run's files or options.
    #[error(transparent)]
    Files(#[from] files::FilesError),
    /// The cgroups.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    /// A file the VM needs is missing.
    #[error("{0}: no such file (the jail needs it)")]
    Missing(String),
    /// The name is taken.
    #[error("a VM named '{0}' is already running")]
    InUse(String),
    /// A step of the set-up failed.
    #[error("{0}")]
    Setup(String),
    /// A system call failed.
    #[error("{0}")]
    Os(String, #[source] std::io::Error),
}

/// What `ember jail` was asked for.
#[derive(Clone, Debug)]
pub struct JailSpec {
    /// The VM's name (`--id`).
    pub id: String,
    /// The user the VM runs as.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// Jails live in `CHROOT_BASE/ember/ID/root`.
    pub chroot_base: PathBuf,
    /// A network namespace to enter.
    pub netns: Option<PathBuf>,
    /// cgroup limits.
    pub cgroups: Vec<cgroup::Setting>,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_FSIZE, if any.
    pub fsize: Option<u64>,
}

/// This process's PID as the host sees it: the jailer's word in a jail, else our own.
pub fn host_pid() -> u32 {
    std::env::var(HOST_PID_ENV)
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(std::process::id)
}

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |e| JailError::Os(what, e)
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(os(format!("chown {}", path.display())))
}

/// What the jailer prepared for the VM process.
struct Prepared {
    layout: inside::Layout,
    jail_dir: PathBuf,
    groups: Vec<cgroup::Group>,
    state_root: PathBuf,
    data_dir: PathBuf,
}

/// Checks the run and makes the host-side directories and cgroups.
fn prepare(spec: &JailSpec, run: &RunArgs) -> Result<Prepared, JailError> {
    let cwd = std::env::current_dir().map_err(os("the working directory"))?;
    let (files, taps) = files::inventory(run, &cwd)?;
    for f in &files {
        if !f.path.is_file() {
            return Err(JailError::Missing(f.path.display().to_string()));
        }
    }
    if crate::vmdir::find(&spec.id).is_some() {
        return Err(JailError::InUse(spec.id.clone()));
    }
    let state_root = crate::vmdir::state_root();
    let data_dir = crate::snapshot::store::data_dir();
    let vm_dir = crate::vmdir::path_of(&spec.id);
    let snapshots = data_dir.join("snapshots").join(&spec.id);
    for d in [&vm_dir, &snapshots] {
        std::fs::create_dir_all(d).map_err(os(format!("mkdir {}", d.display())))?;
        chown(d, spec.uid, spec.gid)?;
    }
    let jail_dir = spec.chroot_base.join("ember").join(&spec.id);
    let root = jail_dir.join("root");
    std::fs::create_dir_all(&root).map_err(os(format!("mkdir {}", root.display())))?;
    let mut devices = vec![PathBuf::from("/dev/kvm"), PathBuf::from("/dev/null")];
    if !taps.is_empty() {
        devices.push(PathBuf::from("/dev/net/tun"));
    }
    let groups = cgroup::plan_here(&spec.id, &spec.cgroups)?;
    cgroup::create(&groups)?;
    Ok(Prepared {
        layout: inside::Layout {
            root,
            files,
            dirs: vec![vm_dir, snapshots],
            devices,
            taps,
            cwd,
            uid: spec.uid,
            gid: spec.gid,
        },
        jail_dir,
        groups,
        state_root,
        data_dir,
    })
}

/// A pipe (both ends close on exec).
fn pipe() -> Result<(OwnedFd, OwnedFd), JailError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(JailError::Os(
            "pipe".into(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both descriptors are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The VM process, for the jailer's signal handler.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn pass_on(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Runs `run` jailed as `spec` says; returns the VM's exit status.
pub fn run(spec: &JailSpec, run: RunArgs) -> Result<ExitCode, JailError> {
    let prep = prepare(spec, &run)?;
    let (go_rx, go_tx) = pipe()?;
    // SAFETY: unshare(2) with CLONE_NEWPID only changes where our next child is born.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } < 0 {
        cleanup(&prep);
        return Err(JailError::Os(
            "unshare(pid)".into(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: this process has one thread (nothing has started another), so the child
    // may run on after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        cleanup(&prep);
        return Err(JailError::Os(
            "fork".into(),
            std::io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        drop(go_tx);
        return Ok(in_jail(spec, &prep, go_rx, run));
    }
    drop(go_rx);
    if crate::cli::detach::is_detached_child() {
        // Our stderr is the pipe `ember jail --daemonize` reads until the VM is ready; the
        // VM holds its own copy and says what goes wrong (its exit status is ours).
        quiet_stderr();
    }
    CHILD.store(pid, Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let _ = vmm_sys_util::signal::register_signal_handler(sig, pass_on);
    }
    let entered = cgroup::enter(&prep.groups, pid as u32);
    let mut go = std::fs::File::from(go_tx);
    let word = if entered.is_ok() { pid } else { -1 };
    let _ = go.write_all(&word.to_ne_bytes());
    drop(go);
    let status = wait_for(pid);
    cleanup(&prep);
    entered?;
    Ok(status)
}

/// Sends this process's stderr to /dev/null.
fn quiet_stderr() {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 of a descriptor we hold onto fd 2.
        unsafe { libc::dup2(f.as_raw_fd(), libc::STDERR_FILENO) };
    }
}

/// Waits for `pid`; its exit status (128 + signal when killed).
fn wait_for(pid: libc::pid_t) -> ExitCode {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our child with a live status word.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return ExitCode::FAILURE;
        }
    }
    if libc::WIFEXITED(status) {
        ExitCode::from(libc::WEXITSTATUS(status) as u8)
    } else {
        ExitCode::from((128 + libc::WTERMSIG(status)) as u8)
    }
}

/// Removes what the jailer made that the VM's end leaves behind.
fn cleanup(prep: &Prepared) {
    cgroup::remove(&prep.groups);
    let _ = std::fs::remove_dir(&prep.layout.root);
    let _ = std::fs::remove_dir(&prep.jail_dir);
    // The VM removes its state directory's contents; the directory was a mount point.
    if let Some(vm_dir) = prep.layout.dirs.first() {
        let _ = std::fs::remove_dir(vm_dir);
    }
}

/// The VM process: waits for the jailer's go, confines itself, runs the VM.
fn in_jail(spec: &JailSpec, prep: &Prepared, go: OwnedFd, run: RunArgs) -> ExitCode {
    let mut word = [0u8; 4];
    let got = std::fs::File::from(go).read_exact(&mut word);
    let host = i32::from_ne_bytes(word);
    if got.is_err() || host <= 0 {
        let _ = writeln!(
            std::io::stderr(),
            "ember jail: the jailer could not set up the cgroups"
        );
        return ExitCode::FAILURE;
    }
    // Nothing the jailer's caller left open reaches the VM: only stdin, stdout, stderr.
    // SAFETY: close_range(2) on descriptors this process owns and no longer uses.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if let Err(e) = confine(spec, prep, host) {
        let _ = writeln!(std::io::stderr(), "ember jail: {}", crate::error_chain(&e));
        return ExitCode::FAILURE;
    }
    crate::cli::run::run(run)
}

fn confine(spec: &JailSpec, prep: &Prepared, host: i32) -> Result<(), JailError> {
    inside::enter_namespaces(&spec.id, spec.netns.as_deref())?;
    inside::check_taps(&prep.layout.taps)?;
    inside::build_root(&prep.layout)?;
    inside::pivot(&prep.layout.root, &prep.layout.cwd)?;
    // The VM's paths are the host's: the same state and data directories, found without
    // root's defaults once the user changes.
    std::env::set_var("EMBER_STATE_DIR", &prep.state_root);
    std::env::set_var("EMBER_DATA_DIR", &prep.data_dir);
    std::env::set_var(HOST_PID_ENV, host.to_string());
    std::env::set_var("HOME", "/");
    inside::set_rlimits(spec.nofile, spec.fsize)?;
    inside::drop_privileges(spec.uid, spec.gid)
}
