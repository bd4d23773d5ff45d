//! Seccomp filters, one per thread role, installed by each thread before it runs code a
//! guest or a client can steer: the main thread (event loop, devices, API server, console
//! hub: one role, [`Role::Vmm`]) once the session holds its state directory, console and API
//! socket, and before any request is read or VM built; each vCPU thread ([`Role::Vcpu`])
//! before its first KVM_RUN. Filters are built with rust-vmm's `seccompiler` from the tables
//! in `rules`, which filter the arguments of the dangerous calls (ioctl requests, executable
//! mappings, socket families, clone flags, fcntl commands, signals).
//!
//! Modes (`ember run --seccomp`):
//! - `on` (the default): a blocked call traps (SIGSYS); one line on stderr names the
//!   thread, the call's number and name, and the process exits with status 148
//!   ([`BLOCKED_EXIT_CODE`], Firecracker's number).
//! - `strict`: a blocked call kills the process at once (`SECCOMP_RET_KILL_PROCESS`): no
//!   handler runs, so nothing in the process can catch it; the kernel's audit log names the
//!   call, and the parent sees the process killed by SIGSYS.
//! - `log`: nothing is blocked; each call a filter would block is logged by the kernel
//!   (`SECCOMP_RET_LOG`, visible in `dmesg` / the audit log as `type=1326 ... syscall=N`
//!   with the thread's name in `comm=`): the way to find a call a new feature needs.
//! - `off`: no filter.

mod ioctls;
pub mod names;
pub mod rules;
mod sigsys;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{
    sock_filter, BackendError, BpfProgram, SeccompAction, SeccompFilter, TargetArch,
};

/// The exit status of a VM process that made a blocked call (in the default mode).
pub const BLOCKED_EXIT_CODE: u8 = 148;

/// What a filter does with a call its table does not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Trap: one line naming the call, exit status 148.
    #[default]
    On,
    /// Kill the process at once.
    Strict,
    /// Allow, and have the kernel log it.
    Log,
    /// No filters.
    Off,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Mode::On),
            "strict" => Ok(Mode::Strict),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(format!(
                "'{other}' is not a mode; use on, strict, log or off"
            )),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::On => "on",
            Mode::Strict => "strict",
            Mode::Log => "log",
            Mode::Off => "off",
        })
    }
}

/// A kind of thread, with its own table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The main thread: event loop, devices, API server, console hub, VM (re)building.
    Vmm,
    /// A vCPU thread.
    Vcpu,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Vmm => "vmm",
            Role::Vcpu => "vcpu",
        })
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The table does not compile.
    #[error("cannot build the seccomp filter of the {role} threads")]
    Build {
        /// The role.
        role: Role,
        /// Cause.
        #[source]
        source: BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of the {role} threads")]
    Install {
        /// The role.
        role: Role,
        /// Cause.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler cannot be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

const UNSET: u8 = u8::MAX;
static MODE: AtomicU8 = AtomicU8::new(UNSET);

fn code(m: Mode) -> u8 {
    m as u8
}

/// Sets the mode for this process's threads from now on.
pub fn set_mode(mode: Mode) {
    MODE.store(code(mode), Ordering::SeqCst);
}

/// Sets `mode` unless a mode was set already (`ember start` runs VMs with the default).
pub fn set_mode_if_unset(mode: Mode) {
    let _ = MODE.compare_exchange(UNSET, code(mode), Ordering::SeqCst, Ordering::SeqCst);
}

/// The mode in force; `Off` when none was set (the library used outside `ember run`).
pub fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        m if m == code(Mode::On) => Mode::On,
        m if m == code(Mode::Strict) => Mode::Strict,
        m if m == code(Mode::Log) => Mode::Log,
        _ => Mode::Off,
    }
}

/// The table of `role`, for this process.
pub fn table(role: Role) -> Result<rules::Table, SeccompError> {
    let built = match role {
        Role::Vmm => rules::vmm(std::process::id() as libc::pid_t),
        Role::Vcpu => rules::vcpu(),
    };
    built.map_err(|source| SeccompError::Build { role, source })
}

/// Instructions put before seccompiler's program: each `(call, errno)` answers that errno
/// at once (on x86_64), whatever the table says; every other call goes on to the program.
fn errno_prefix(answers: &[(libc::c_long, u32)]) -> BpfProgram {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const ARCH_OFFSET: u32 = 4;
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    let n = answers.len() as u8;
    let mut p = vec![
        op(LD_W_ABS, 0, 0, ARCH_OFFSET),
        // Another architecture: straight to the program, which refuses it.
        op(JEQ_K, 0, 2 * n + 1, AUDIT_ARCH_X86_64),
        op(LD_W_ABS, 0, 0, 0),
    ];
    for &(nr, errno) in answers {
        p.push(op(JEQ_K, 0, 1, nr as u32));
        p.push(op(RET_K, 0, 0, u32::from(SeccompAction::Errno(errno))));
    }
    p
}

/// The BPF program of `role` in `mode` (`None` when off).
pub fn compile(role: Role, mode: Mode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        Mode::Off => return Ok(None),
        Mode::On => SeccompAction::Trap,
        Mode::Strict => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let rules = table(role)?.into_rules();
    let build = |source| SeccompError::Build { role, source };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(build)?;
    let program: BpfProgram = filter.try_into().map_err(build)?;
    let mut full = errno_prefix(&[(libc::SYS_clone3, libc::ENOSYS as u32)]);
    full.extend(program);
    Ok(Some(full))
}

/// Installs the filter of `role` on the calling thread (named `thread` in the line a
/// blocked call prints), in the process's mode. It stays for the thread's life and is
/// inherited by threads it creates.
pub fn install(role: Role, thread: &str) -> Result<(), SeccompError> {
    let mode = mode();
    let Some(program) = compile(role, mode)? else {
        return Ok(());
    };
    if mode == Mode::On {
        sigsys::install_handler()?;
    }
    sigsys::set_thread_name(thread);
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install { role, source })
}

#[cfg(test)]
mod tests;
