//! The filter tables: which system calls each thread role may make, and with which
//! arguments where the argument is what makes a call dangerous (ioctl requests, executable
//! memory, socket families, clone flags, fcntl commands, signals to other processes).
//!
//! Tables are built from named groups so a new role is a few lines. A thread created by a
//! filtered thread keeps its creator's filter under its own (the kernel runs both, the
//! stricter answer wins), so the main thread's table must include the table of every
//! thread it starts once filtered: [`vmm`] includes [`vcpu`] (vCPU threads started after a
//! reset), and a test checks it. Adding a role:
//!
//! 1. a function here: `base()` plus what the thread does (a migration thread: TCP sockets
//!    of its own, `KVM_GET_DIRTY_LOG` on the VM's fd);
//! 2. a `Role` variant and its line in `super::table`;
//! 3. `vmm` merges the new table (when the main thread starts such threads), and the
//!    thread calls `seccomp::install(Role::X, name)` first thing;
//! 4. run the feature's tests with `--seccomp log` and read `dmesg` for `type=1326` lines
//!    naming the thread in `comm=`: each is a call still missing.
//!
//! A device attached at run time (hotplug) needs nothing new unless it makes calls no
//! device made before: its ioctls go to `ioctls.rs` and the group that makes them.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompRule,
};

use super::ioctls;

/// A table under construction: for each system call, `None` (any arguments) or the rules
/// one of which its arguments must meet.
#[derive(Clone, Debug, Default)]
pub struct Table {
    calls: BTreeMap<i64, Option<Vec<SeccompRule>>>,
}

impl Table {
    /// Allows `calls` with any arguments.
    pub fn allow(&mut self, calls: &[libc::c_long]) -> &mut Self {
        for &nr in calls {
            self.calls.insert(nr, None);
        }
        self
    }

    /// Allows `nr` when one of `rules` holds (added to the rules it has, if any).
    pub fn allow_if(&mut self, nr: libc::c_long, rules: Vec<SeccompRule>) -> &mut Self {
        // A call allowed with any arguments stays so.
        if let Some(have) = self.calls.entry(nr).or_insert_with(|| Some(Vec::new())) {
            have.extend(rules);
        }
        self
    }

    /// Everything `other` allows, allowed here too.
    pub fn merge(&mut self, other: &Table) -> &mut Self {
        for (&nr, rules) in &other.calls {
            match rules {
                None => {
                    self.calls.insert(nr, None);
                }
                Some(r) => {
                    self.allow_if(nr, r.clone());
                }
            }
        }
        self
    }

    /// Whether `nr` is in the table (with any rule).
    pub fn has(&self, nr: libc::c_long) -> bool {
        self.calls.contains_key(&nr)
    }

    /// The system calls in the table.
    pub fn calls(&self) -> impl Iterator<Item = libc::c_long> + '_ {
        self.calls.keys().copied()
    }

    /// The rules seccompiler compiles (an empty list: any arguments).
    pub fn into_rules(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.calls
            .into_iter()
            .map(|(nr, r)| (nr, r.unwrap_or_default()))
            .collect()
    }
}

type Built = Result<Table, BackendError>;

/// Argument `arg` (32 bits) equals `value`.
fn eq(arg: u8, value: u64) -> Result<Cond, BackendError> {
    Cond::new(arg, Len::Dword, Op::Eq, value)
}

/// Argument `arg` (32 bits) has none of the bits of `mask`.
fn none_of(arg: u8, mask: u64) -> Result<Cond, BackendError> {
    Cond::new(arg, Len::Dword, Op::MaskedEq(mask), 0)
}

/// Argument `arg` (32 bits) has all the bits of `mask`.
fn all_of(arg: u8, mask: u64) -> Result<Cond, BackendError> {
    Cond::new(arg, Len::Dword, Op::MaskedEq(mask), mask)
}

fn rule(conds: Vec<Cond>) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(conds)
}

/// One rule per value: argument `arg` is one of `values`.
fn one_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, BackendError> {
    values.iter().map(|&v| rule(vec![eq(arg, v)?])).collect()
}

fn ioctls(requests: &[libc::c_ulong]) -> Result<Vec<SeccompRule>, BackendError> {
    one_of(1, requests)
}

/// What every thread of a running VM does: memory that is never executable, locks,
/// signal returns, time, reads and writes on descriptors it has, and exiting.
pub fn base() -> Built {
    use libc::*;
    let mut t = Table::default();
    t.allow(&[
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_close,
        SYS_brk,
        SYS_munmap,
        SYS_mremap,
        SYS_madvise,
        SYS_futex,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_gettid,
        SYS_getpid,
        SYS_rt_sigreturn,
        SYS_rt_sigprocmask,
        SYS_sigaltstack,
        SYS_restart_syscall,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_getrandom,
        SYS_exit,
        SYS_exit_group,
    ]);
    // No page is ever made executable: code cannot be brought in at run time.
    let no_exec = || rule(vec![none_of(2, PROT_EXEC as u64)?]);
    t.allow_if(SYS_mmap, vec![no_exec()?]);
    t.allow_if(SYS_mprotect, vec![no_exec()?]);
    // Debug builds check a descriptor is open before closing it.
    t.allow_if(SYS_fcntl, one_of(1, &[F_GETFD as u64])?);
    // The SIGSYS handler asks for the thread's name.
    t.allow_if(SYS_prctl, one_of(0, &[PR_GET_NAME as u64])?);
    Ok(t)
}

/// A vCPU thread: `base`, KVM_RUN and the reads of its own state, and what its exits reach
/// in the devices: the serial console's output (and the console log's rotation, which
/// reopens the log for appending), eventfd writes (interrupts, the exit request), a tap's
/// offloads (virtio-net starting), and the VM's interrupt and notification wiring a guest's
/// device programming changes.
pub fn vcpu() -> Built {
    use libc::*;
    let mut t = base()?;
    let mut requests = ioctls::kvm_vcpu_thread();
    requests.extend(ioctls::tap_activation());
    t.allow_if(SYS_ioctl, ioctls(&requests)?);
    t.allow(&[SYS_rename]);
    let append = (O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC) as u64;
    t.allow_if(SYS_openat, one_of(2, &[append])?);
    Ok(t)
}

/// Files: disk images (positioned and vectored I/O, flushes, holes, locks), snapshots
/// (write, fsync, rename), the snapshot store and state directory (mkdir, remove).
fn files(t: &mut Table) -> Result<(), BackendError> {
    use libc::*;
    t.allow(&[
        SYS_openat,
        SYS_newfstatat,
        SYS_fstat,
        SYS_statx,
        SYS_lseek,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_preadv2,
        SYS_pwritev2,
        SYS_fsync,
        SYS_fdatasync,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_flock,
        SYS_getdents64,
        SYS_mkdir,
        SYS_mkdirat,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
        SYS_unlink,
        SYS_unlinkat,
        SYS_rmdir,
        SYS_readlink,
        SYS_readlinkat,
        SYS_getcwd,
        SYS_access,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_dup,
        SYS_dup2,
        SYS_dup3,
    ]);
    let fcntl_cmds = [
        F_GETFD,
        F_SETFD,
        F_GETFL,
        F_SETFL,
        F_DUPFD_CLOEXEC,
        F_OFD_GETLK,
        F_OFD_SETLK,
        F_OFD_SETLKW,
    ]
    .map(|c| c as u64);
    t.allow_if(SYS_fcntl, one_of(1, &fcntl_cmds)?);
    Ok(())
}

/// The event loop: epoll, eventfds, timerfds; the API socket's connections (accepted,
/// read, answered, shut down, handed to the console).
fn events(t: &mut Table) {
    use libc::*;
    t.allow(&[
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_eventfd2,
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_timerfd_gettime,
        SYS_poll,
        SYS_ppoll,
        SYS_accept4,
        SYS_recvfrom,
        SYS_recvmsg,
        SYS_sendto,
        SYS_sendmsg,
        SYS_shutdown,
        SYS_setsockopt,
        SYS_getsockopt,
    ]);
}

/// Live migration: the source's thread connects to the destination and reads KVM's dirty
/// page bitmaps; the destination listens and accepts one connection. TCP over IPv4 or
/// IPv6 only.
fn migration(t: &mut Table) -> Result<(), BackendError> {
    use libc::*;
    t.allow(&[
        SYS_connect,
        SYS_bind,
        SYS_listen,
        SYS_getsockname,
        SYS_getpeername,
    ]);
    let stream = |family: i32| {
        rule(vec![
            eq(0, family as u64)?,
            Cond::new(1, Len::Dword, Op::MaskedEq(0xf), SOCK_STREAM as u64)?,
        ])
    };
    t.allow_if(SYS_socket, vec![stream(AF_INET)?, stream(AF_INET6)?]);
    t.allow_if(SYS_ioctl, ioctls(&ioctls::kvm_migration())?);
    Ok(())
}

/// The VMM's main thread (event loop, devices, API server, console hub): everything a
/// vCPU does, plus building the VM again in this process (a reset, a revert, a restore
/// through the API: /dev/kvm, memory, vCPUs, disks and taps opened anew, vCPU threads
/// started), snapshots, and the console. `pid` is this process: signals go to its own
/// threads only.
pub fn vmm(pid: libc::pid_t) -> Built {
    use libc::*;
    let mut t = vcpu()?;
    files(&mut t)?;
    events(&mut t);
    migration(&mut t)?;
    t.allow(&[
        SYS_set_robust_list,
        SYS_rseq,
        SYS_rt_sigaction,
        SYS_getuid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getegid,
    ]);
    let mut requests = ioctls::kvm_system();
    requests.extend(ioctls::kvm_vm());
    requests.extend(ioctls::kvm_vcpu_setup());
    requests.extend(ioctls::tap());
    requests.extend(ioctls::net_interface());
    requests.extend(ioctls::terminal());
    t.allow_if(SYS_ioctl, ioctls(&requests)?);
    // Interface ioctls only: an AF_INET datagram socket, never a connection.
    t.allow_if(
        SYS_socket,
        vec![rule(vec![
            eq(0, AF_INET as u64)?,
            Cond::new(1, Len::Dword, Op::MaskedEq(0xf), SOCK_DGRAM as u64)?,
        ])?],
    );
    // Threads, never processes. clone3's flags are out of a filter's sight: it is not in
    // the table, and `super::compile` makes it answer ENOSYS so the C library falls back
    // to clone.
    t.allow_if(
        SYS_clone,
        vec![rule(vec![all_of(0, CLONE_THREAD as u64)?])?],
    );
    // Kicking a vCPU thread of this process out of KVM_RUN.
    let kick = crate::vcpu::kick_signal() as u64;
    t.allow_if(
        SYS_tgkill,
        vec![rule(vec![eq(0, pid as u64)?, eq(2, kick)?])?],
    );
    // Naming new vCPU threads; a new vCPU thread stacking its own filter.
    t.allow_if(
        SYS_prctl,
        one_of(0, &[PR_SET_NAME as u64, PR_SET_NO_NEW_PRIVS as u64])?,
    );
    t.allow_if(
        SYS_seccomp,
        vec![rule(vec![
            eq(0, u64::from(SECCOMP_SET_MODE_FILTER))?,
            eq(1, 0)?,
        ])?],
    );
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_table_allows_every_call_a_vcpu_makes() {
        let (vcpu, vmm) = (vcpu().unwrap(), vmm(1).unwrap());
        for nr in vcpu.calls() {
            assert!(
                vmm.has(nr),
                "{:?} missing from vmm",
                super::super::names::name(nr)
            );
        }
    }

    #[test]
    fn no_table_allows_starting_programs_or_tracing() {
        for t in [base().unwrap(), vcpu().unwrap(), vmm(1).unwrap()] {
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
                libc::SYS_process_vm_writev,
                libc::SYS_mount,
                libc::SYS_setuid,
                libc::SYS_bpf,
            ] {
                assert!(!t.has(nr), "{:?} allowed", super::super::names::name(nr));
            }
        }
        // Only the VMM thread (a migration's source) connects, and only TCP sockets exist
        // for it to connect.
        for t in [base().unwrap(), vcpu().unwrap()] {
            assert!(!t.has(libc::SYS_connect));
        }
    }

    #[test]
    fn merging_keeps_the_wider_rule() {
        let mut a = Table::default();
        a.allow_if(libc::SYS_openat, one_of(2, &[1]).unwrap());
        let mut b = Table::default();
        b.allow(&[libc::SYS_openat]);
        a.merge(&b);
        assert!(a.into_rules()[&libc::SYS_openat].is_empty());
    }
}
