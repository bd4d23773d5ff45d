//! How a VM's run ends, and the shared flag that tells every vCPU to stop.
//!
//! States: Running until the first exit request (a device, a vCPU that hit a fatal exit, the
//! console, a signal); then Exiting: the first outcome is kept, the event loop is woken, the
//! vCPUs are kicked out of KVM_RUN and join.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use devices::{ExitSink, GuestExit};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why a VM's run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PowerOff,
    /// The guest reset (reboot).
    Reset,
    /// The guest wrote the debug-exit port; the exit status.
    DebugExit(i32),
    /// The guest cannot go on (triple fault, KVM internal error...): one line saying why.
    Crash(String),
    /// The user left the console (Ctrl-]).
    ConsoleQuit,
    /// Ember got a terminating signal.
    Signal(i32),
    /// `ember destroy` (or the API) ended the VM.
    Destroyed,
    /// `ember save` wrote the VM to this file and ended it.
    Saved(String),
    /// The VM is to be brought back as its named snapshot was.
    Revert(String),
    /// The VM is to be built and booted again (`ember reset`, `ember reboot`, a guest
    /// reboot with `--reboot restart`).
    Restart,
}

impl Outcome {
    /// The process exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::PowerOff
            | Outcome::Reset
            | Outcome::ConsoleQuit
            | Outcome::Destroyed
            | Outcome::Saved(_)
            | Outcome::Revert(_)
            | Outcome::Restart => 0,
            Outcome::DebugExit(code) => *code,
            Outcome::Crash(_) => 1,
            Outcome::Signal(sig) => 128 + sig,
        }
    }
}

impl From<GuestExit> for Outcome {
    fn from(e: GuestExit) -> Self {
        match e {
            GuestExit::Reset => Outcome::Reset,
            GuestExit::PowerOff => Outcome::PowerOff,
            GuestExit::DebugExit(code) => Outcome::DebugExit(code),
            GuestExit::Panic(ev) => {
                Outcome::Crash(format!("guest kernel panic (pvpanic event {ev:#x})"))
            }
        }
    }
}

/// What the VM is doing, as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum VmState {
    /// Configured through the API, waiting for `InstanceStart`.
    #[serde(rename = "Not started")]
    NotStarted,
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
}

impl VmState {
    /// How `ember list` prints it (virsh's words).
    pub fn virsh_name(self) -> &'static str {
        match self {
            VmState::NotStarted => "configuring",
            VmState::Running => "running",
            VmState::Paused => "paused",
        }
    }
}

/// Shared by the event loop, the vCPUs and the devices of one VM.
pub struct RunState {
    exiting: AtomicBool,
    /// Bumped on each request to report where the vCPUs are (SIGUSR1).
    report: AtomicU64,
    outcome: Mutex<Option<Outcome>>,
    wake: EventFd,
}

impl RunState {
    /// A running VM's state.
    pub fn new() -> std::io::Result<Self> {
        Ok(RunState {
            exiting: AtomicBool::new(false),
            report: AtomicU64::new(0),
            outcome: Mutex::new(None),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Asks the VM to end with `outcome`; the first request wins.
    pub fn request_exit(&self, outcome: Outcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.exiting.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.write(1) {
            log::error!("cannot wake the event loop: {e}");
        }
    }

    /// True once an exit was requested.
    pub fn is_exiting(&self) -> bool {
        self.exiting.load(Ordering::SeqCst)
    }

    /// The outcome, once there is one.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks every vCPU to print where it is (they must then be kicked).
    pub fn request_report(&self) {
        self.report.fetch_add(1, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    /// How many reports were asked for so far.
    pub fn report_generation(&self) -> u64 {
        self.report.load(Ordering::SeqCst)
    }

    /// The eventfd the event loop watches.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }
}

impl ExitSink for RunState {
    fn guest_exit(&self, exit: GuestExit) {
        self.request_exit(exit.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_request_wins_and_wakes_the_loop() {
        let s = RunState::new().unwrap();
        assert!(!s.is_exiting());
        s.guest_exit(GuestExit::DebugExit(7));
        s.request_exit(Outcome::Crash("later".into()));
        assert!(s.is_exiting());
        assert_eq!(s.outcome(), Some(Outcome::DebugExit(7)));
        assert_eq!(s.wake_fd().read().unwrap(), 2);
    }

    #[test]
    fn exit_codes_follow_the_outcome() {
        assert_eq!(Outcome::PowerOff.exit_code(), 0);
        assert_eq!(Outcome::Reset.exit_code(), 0);
        assert_eq!(Outcome::DebugExit(33).exit_code(), 33);
        assert_eq!(Outcome::Crash(String::new()).exit_code(), 1);
        assert_eq!(Outcome::Signal(15).exit_code(), 143);
    }
}
