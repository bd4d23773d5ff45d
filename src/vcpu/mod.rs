//! vCPUs: configuration, the thread that runs each one, and the handle the VMM drives it
//! through.
//!
//! Each vCPU thread is a small state machine: **Running** (in and out of KVM_RUN, exits
//! handled by [`exit::handle_exit`]) or **Paused** (parked on its request channel, using no
//! CPU); it leaves for good when the VM exits or it is told to finish. The VMM talks to it
//! with [`VcpuEvent`]s on a channel and a kick (a signal that makes KVM_RUN return), and
//! hears back [`VcpuResponse`]s.

pub mod exit;
pub mod report;

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use boot::x86_64::regs::{boot_fpu, boot_msrs, boot_regs, boot_sregs};
use boot::BootState;
use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_cpuid_entry2, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

pub use exit::{handle_exit, Action, Buses, ExitCounters, ExitCounts, StopReason};

use crate::run_state::{Outcome, RunState};
use crate::vstate::{self, VcpuState};

/// Errors configuring or starting a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: {what} failed")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// The ioctl.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than given.
    #[error("vCPU {id}: KVM set {set} of {want} boot MSRs")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many were given.
        want: usize,
    },
    /// The vCPU thread could not be created.
    #[error("cannot start the thread of vCPU {id}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(|p| p.get());
    if !flag.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, set by the vCPU thread for as
        // long as its VcpuFd lives and cleared before the fd is dropped.
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler (once per process is enough; repeating is harmless).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

/// What the VMM asks of a vCPU thread.
#[derive(Debug)]
pub enum VcpuEvent {
    /// Leave the guest and park until resumed.
    Pause,
    /// Enter the guest again.
    Resume,
    /// Report the vCPU's state (only while paused), with these MSRs.
    SaveState(Arc<Vec<u32>>),
    /// End the thread.
    Finish,
}

/// What a vCPU thread answers.
#[derive(Debug)]
pub enum VcpuResponse {
    /// It is parked.
    Paused,
    /// It runs.
    Resumed,
    /// Its state, or why it could not be read.
    State(Box<Result<VcpuState, String>>),
    /// Its thread ended.
    Exited,
}

/// The run state of one vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunMode {
    Running,
    Paused,
    Finished,
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    /// The last exit, for reports: kind and port/address.
    last_exit: (&'static str, u64),
    /// The report generation this vCPU answered last.
    reported: u64,
    buses: Arc<Buses>,
    state: Arc<RunState>,
    mem: GuestMemoryMmap,
    counters: Arc<ExitCounters>,
}

/// The VMM's side of a running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    thread: JoinHandle<Vcpu>,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    counters: Arc<ExitCounters>,
}

fn kvm_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, what, source }
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

impl Vcpu {
    /// Wraps `fd` and sets CPUID, MSRs, FPU and LAPIC LINT pins. Such a vCPU waits for
    /// INIT/SIPI in KVM unless it is given the boot entry ([`Self::set_boot_entry`]).
    pub fn new(
        fd: VcpuFd,
        id: u8,
        cpuid: &[kvm_cpuid_entry2],
        buses: Arc<Buses>,
        state: Arc<RunState>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, VcpuError> {
        let cpuid = CpuId::from_entries(cpuid).map_err(|_| VcpuError::Kvm {
            id,
            what: "building CPUID",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
        Self::set_boot_msrs(&fd, id)?;
        fd.set_fpu(&boot_fpu())
            .map_err(kvm_err(id, "KVM_SET_FPU"))?;
        Self::set_lint_pins(&fd, id)?;
        Ok(Vcpu {
            fd,
            id,
            last_exit: ("none", 0),
            reported: 0,
            buses,
            state,
            mem,
            counters: Arc::new(ExitCounters::default()),
        })
    }

    /// The vCPU's index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Makes an unplugged vCPU (its thread ended) like a new one again: boot MSRs, FPU,
    /// LAPIC LINT pins, and waiting for INIT/SIPI, for the guest to start it as it starts any
    /// hot-added CPU. Its CPUID stays (KVM refuses a different one once a vCPU ran).
    pub fn reinit(&mut self) -> Result<(), VcpuError> {
        let id = self.id;
        Self::set_boot_msrs(&self.fd, id)?;
        self.fd
            .set_fpu(&boot_fpu())
            .map_err(kvm_err(id, "KVM_SET_FPU"))?;
        Self::set_lint_pins(&self.fd, id)?;
        let wait_for_init = kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
        };
        self.fd
            .set_mp_state(wait_for_init)
            .map_err(kvm_err(id, "KVM_SET_MP_STATE"))?;
        self.last_exit = ("none", 0);
        Ok(())
    }

    fn set_boot_msrs(fd: &VcpuFd, id: u8) -> Result<(), VcpuError> {
        let entries = boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Kvm {
            id,
            what: "building MSRs",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                id,
                set,
                want: entries.len(),
            });
        }
        Ok(())
    }

    /// Reads the vCPU's state, after letting KVM finish an I/O exit in progress.
    fn save_state(&mut self, msrs: &[u32]) -> Result<VcpuState, String> {
        let chain = |e: vstate::StateError| crate::error_chain(&e);
        vstate::complete_pending_io(&mut self.fd, self.id).map_err(chain)?;
        vstate::save_vcpu(&self.fd, self.id, msrs).map_err(chain)
    }

    /// Puts the vCPU in a saved state (before its thread starts).
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), vstate::StateError> {
        vstate::restore_vcpu(&self.fd, self.id, state)
    }

    /// Makes this the boot vCPU: registers at the kernel's entry point.
    pub fn set_boot_entry(&self, boot: &BootState) -> Result<(), VcpuError> {
        let id = self.id;
        self.fd
            .set_regs(&boot_regs(boot.entry))
            .map_err(kvm_err(id, "KVM_SET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&boot_sregs(sregs, boot.entry, boot.cr3))
            .map_err(kvm_err(id, "KVM_SET_SREGS"))
    }

    /// The CPUID KVM actually gives this vCPU (a host may not honour every masked bit).
    pub fn effective_cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>, VcpuError> {
        self.fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map(|c| c.as_slice().to_vec())
            .map_err(kvm_err(self.id, "KVM_GET_CPUID2"))
    }

    /// LINT0 delivers ExtINT (the PIC), LINT1 NMI, as firmware leaves them.
    fn set_lint_pins(fd: &VcpuFd, id: u8) -> Result<(), VcpuError> {
        let mut lapic = fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
        for (offset, mode) in [
            (APIC_LVT_LINT0, APIC_MODE_EXTINT),
            (APIC_LVT_LINT1, APIC_MODE_NMI),
        ] {
            let reg = &mut lapic.regs[offset..offset + 4];
            let bytes: [u8; 4] = std::array::from_fn(|i| reg[i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (dst, src) in reg.iter_mut().zip(value.to_le_bytes()) {
                *dst = src as libc::c_char;
            }
        }
        fd.set_lapic(&lapic).map_err(kvm_err(id, "KVM_SET_LAPIC"))
    }

    /// Starts the thread `vcpu N`, running the guest or, with `paused`, parked until the
    /// first [`VcpuEvent::Resume`].
    pub fn start(self, paused: bool) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        let counters = self.counters.clone();
        let (ev_tx, ev_rx) = mpsc::channel();
        let (resp_tx, resp_rx) = mpsc::channel();
        let mode = if paused {
            RunMode::Paused
        } else {
            RunMode::Running
        };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu {id}"))
            .spawn(move || self.run(mode, ev_rx, resp_tx))
            .map_err(|source| VcpuError::Spawn { id, source })?;
        Ok(VcpuHandle {
            id,
            thread,
            events: ev_tx,
            responses: resp_rx,
            counters,
        })
    }

    /// The thread's body; gives the vCPU back when it ends (an unplugged vCPU is kept: KVM
    /// cannot destroy one, and the next plug of that CPU reuses it).
    fn run(
        mut self,
        mut mode: RunMode,
        events: Receiver<VcpuEvent>,
        out: Sender<VcpuResponse>,
    ) -> Self {
        if let Err(e) =
            crate::seccomp::install(crate::seccomp::Role::Vcpu, &format!("vcpu {}", self.id))
        {
            self.state
                .request_exit(Outcome::Crash(crate::error_chain(&e)));
            let _ = out.send(VcpuResponse::Exited);
            return self;
        }
        let flag: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(flag));
        loop {
            mode = match mode {
                RunMode::Running => self.run_until_interrupted(&events, &out),
                RunMode::Paused => match events.recv() {
                    Ok(ev) => self.on_event(ev, RunMode::Paused, &out),
                    Err(_) => RunMode::Finished,
                },
                RunMode::Finished => break,
            };
            if self.state.is_exiting() && mode != RunMode::Paused {
                break;
            }
        }
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        let _ = out.send(VcpuResponse::Exited);
        self
    }

    /// Runs the guest until a kick (then handles the requests waiting) or a fatal exit.
    fn run_until_interrupted(
        &mut self,
        events: &Receiver<VcpuEvent>,
        out: &Sender<VcpuResponse>,
    ) -> RunMode {
        while !self.state.is_exiting() {
            let action = match self.fd.run() {
                Ok(exit) => {
                    self.last_exit = exit::exit_summary(&exit);
                    handle_exit(&self.buses, exit, &self.counters)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    self.counters.interrupted();
                    self.report_if_asked();
                    let mut mode = RunMode::Running;
                    while let Ok(ev) = events.try_recv() {
                        mode = self.on_event(ev, mode, out);
                    }
                    if mode != RunMode::Running {
                        return mode;
                    }
                    Action::Continue
                }
                Err(e) => Action::Stop(StopReason::Unexpected(format!("KVM_RUN failed: {e}"))),
            };
            if let Action::Stop(reason) = action {
                let outcome = self.outcome_for(reason);
                self.state.request_exit(outcome);
                return RunMode::Finished;
            }
        }
        RunMode::Finished
    }

    fn on_event(&mut self, ev: VcpuEvent, mode: RunMode, out: &Sender<VcpuResponse>) -> RunMode {
        match ev {
            VcpuEvent::Pause => {
                if mode == RunMode::Running {
                    // Tells a guest with kvmclock that it was stopped, so its soft-lockup
                    // watchdog does not fire on resume; guests without kvmclock refuse it.
                    if let Err(e) = self.fd.kvmclock_ctrl() {
                        log::debug!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", self.id);
                    }
                }
                let _ = out.send(VcpuResponse::Paused);
                RunMode::Paused
            }
            VcpuEvent::Resume => {
                let _ = out.send(VcpuResponse::Resumed);
                RunMode::Running
            }
            VcpuEvent::SaveState(msrs) => {
                let state = if mode == RunMode::Paused {
                    self.save_state(&msrs)
                } else {
                    Err("the vCPU is not paused".into())
                };
                let _ = out.send(VcpuResponse::State(Box::new(state)));
                mode
            }
            VcpuEvent::Finish => RunMode::Finished,
        }
    }

    fn outcome_for(&mut self, reason: StopReason) -> Outcome {
        let (id, at) = (self.id, report::location(&self.fd));
        match reason {
            StopReason::PowerOff => Outcome::PowerOff,
            StopReason::Reset => Outcome::Reset,
            StopReason::TripleFault => Outcome::Crash(format!(
                "guest triple fault on vCPU {id} at {at}; instruction bytes: {}",
                report::instruction_bytes(&self.fd, &self.mem, None)
            )),
            StopReason::InternalError => {
                let (text, kvm_bytes) = report::internal_error(&mut self.fd);
                Outcome::Crash(format!(
                    "KVM internal error ({text}) on vCPU {id} at {at}; instruction bytes: {}",
                    report::instruction_bytes(&self.fd, &self.mem, kvm_bytes)
                ))
            }
            StopReason::FailEntry(r) => Outcome::Crash(format!(
                "KVM could not enter the guest (hardware reason {r:#x}) on vCPU {id} at {at}"
            )),
            StopReason::Unexpected(what) => {
                Outcome::Crash(format!("unexpected vCPU exit {what} on vCPU {id} at {at}"))
            }
        }
    }

    /// Prints where this vCPU is when a report was asked for (SIGUSR1).
    fn report_if_asked(&mut self) {
        let generation = self.state.report_generation();
        if generation == self.reported {
            return;
        }
        self.reported = generation;
        let (kind, at) = self.last_exit;
        log::warn!(
            "vCPU {}: {} at {}; last exit: {kind} {at:#x}; instruction bytes: {}",
            self.id,
            report::mp_state(&self.fd),
            report::location(&self.fd),
            report::instruction_bytes(&self.fd, &self.mem, None)
        );
    }
}

impl VcpuHandle {
    /// The vCPU's index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Its exit counters.
    pub fn counters(&self) -> ExitCounts {
        self.counters.get()
    }

    /// Kicks the thread out of KVM_RUN (it then reads its requests).
    pub fn kick(&self) {
        if self.thread.is_finished() {
            return;
        }
        if let Err(e) = self.thread.kill(kick_signal()) {
            log::debug!("cannot kick vCPU {}: {e}", self.id);
        }
    }

    /// Sends `event` and kicks the thread so it sees it.
    pub fn send(&self, event: VcpuEvent) -> bool {
        let sent = self.events.send(event).is_ok();
        self.kick();
        sent
    }

    /// Waits up to `timeout` for the thread's next answer.
    pub fn response(&self, timeout: Duration) -> Option<VcpuResponse> {
        self.responses.recv_timeout(timeout).ok()
    }

    /// Whether the thread ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Ends the thread: asks it to finish, waits up to `timeout` for it, and joins it.
    /// Returns false (leaving the thread behind) when it did not end in time.
    pub fn finish(self, timeout: Duration) -> bool {
        self.take_back(timeout).is_some()
    }

    /// Ends the thread like [`Self::finish`] and returns the vCPU it ran (None when the
    /// thread did not end in time or panicked).
    pub fn take_back(self, timeout: Duration) -> Option<Vcpu> {
        self.send(VcpuEvent::Finish);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self
                .responses
                .recv_timeout(left.min(Duration::from_millis(50)))
            {
                Ok(VcpuResponse::Exited) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) if left.is_zero() => {
                    log::warn!("vCPU {} did not stop; leaving it behind", self.id);
                    return None;
                }
                // A kick that landed outside KVM_RUN is not lost (immediate_exit stays
                // set), but one sent before the thread set it up is: kick again.
                Err(RecvTimeoutError::Timeout) => self.kick(),
            }
        }
        match self.thread.join() {
            Ok(vcpu) => Some(vcpu),
            Err(_) => {
                log::error!("vCPU {} thread panicked", self.id);
                None
            }
        }
    }
}
