//! How a VM's run ends, and the shared flag that tells every vCPU to stop.
//!
//! States: Running until the first exit request (a device, a vCPU that hit a fatal exit, the
//! console, a signal); then Exiting: the first outcome is kept, the event loop is woken, the
//! vCPUs are kicked out of KVM_RUN and join.
//!
//! Each outcome has one process exit status (the table in the README and `ember run --help`):
//! Ember's own verdicts are even, so they never collide with the guest's debug-exit statuses,
//! which are all odd.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use devices::legacy::pvpanic::PVPANIC_PANICKED;
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
    /// The guest kernel panicked and said so through pvpanic; the event bits it wrote.
    GuestPanic(u8),
    /// `--timeout` ran out.
    Timeout,
    /// A `--fail-on` pattern matched a line of serial output.
    FailOn {
        /// The pattern, as given.
        pattern: String,
        /// The line (as much of it as is kept).
        line: String,
    },
    /// The last `--expect` pattern was seen and `--stop-on-expect` ended the VM.
    ExpectsMet,
    /// The run ended (`ended`) before every `--expect` pattern was seen.
    ExpectNotMet {
        /// The first pattern not seen.
        pattern: String,
        /// How the run ended otherwise.
        ended: Box<Outcome>,
    },
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
    /// The VM runs on at this migration destination now; it ended here.
    Migrated(String),
    /// The VM is to be built and booted again (`ember reset`, `ember reboot`, a guest
    /// reboot with `--reboot restart`).
    Restart,
}

/// Exit status: the guest kernel panicked (pvpanic).
pub const EXIT_GUEST_PANIC: i32 = 120;
/// Exit status: a `--fail-on` pattern matched.
pub const EXIT_FAIL_ON: i32 = 122;
/// Exit status: `--timeout` ran out (as GNU `timeout`).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status: the run ended before every `--expect` pattern was seen.
pub const EXIT_EXPECT_NOT_MET: i32 = 126;

impl Outcome {
    /// The process exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::PowerOff
            | Outcome::Reset
            | Outcome::ConsoleQuit
            | Outcome::Destroyed
            | Outcome::Saved(_)
            | Outcome::Migrated(_)
            | Outcome::Revert(_)
            | Outcome::Restart
            | Outcome::ExpectsMet => 0,
            Outcome::DebugExit(code) => *code,
            Outcome::Crash(_) => 1,
            Outcome::GuestPanic(_) => EXIT_GUEST_PANIC,
            Outcome::FailOn { .. } => EXIT_FAIL_ON,
            Outcome::Timeout => EXIT_TIMEOUT,
            Outcome::ExpectNotMet { .. } => EXIT_EXPECT_NOT_MET,
            Outcome::Signal(sig) => 128 + sig,
        }
    }

    /// True when the guest itself chose how the run ended, or the user ended it: the
    /// outcomes that output checks (`--expect`, `--fail-on`) may still turn into a failure.
    pub fn is_judged_by_output(&self) -> bool {
        matches!(
            self,
            Outcome::PowerOff
                | Outcome::Reset
                | Outcome::DebugExit(_)
                | Outcome::ConsoleQuit
                | Outcome::Destroyed
        )
    }
}

impl From<GuestExit> for Outcome {
    fn from(e: GuestExit) -> Self {
        match e {
            GuestExit::Reset => Outcome::Reset,
            GuestExit::PowerOff => Outcome::PowerOff,
            GuestExit::DebugExit(code) => Outcome::DebugExit(code),
            GuestExit::Panic(ev) => Outcome::GuestPanic(ev),
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
    /// The pvpanic bits of a panic with a crash (kdump) kernel loaded: the guest runs on to
    /// save its dump, and the power-off or reset that follows ends the run as a panic.
    crash_loaded: AtomicU8,
    wake: EventFd,
}

impl RunState {
    /// A running VM's state.
    pub fn new() -> std::io::Result<Self> {
        Ok(RunState {
            exiting: AtomicBool::new(false),
            report: AtomicU64::new(0),
            outcome: Mutex::new(None),
            crash_loaded: AtomicU8::new(0),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Asks the VM to end with `outcome`; the first request wins.
    pub fn request_exit(&self, outcome: Outcome) {
        let outcome = match (outcome, self.crash_loaded.load(Ordering::SeqCst)) {
            (Outcome::PowerOff | Outcome::Reset, bits) if bits != 0 => Outcome::GuestPanic(bits),
            (o, _) => o,
        };
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
        match exit {
            // Linux writes CRASH_LOADED instead of PANICKED when a kdump kernel will take
            // over: as QEMU does, the guest is left running so the dump gets written.
            GuestExit::Panic(bits) if bits & PVPANIC_PANICKED == 0 => {
                log::warn!(
                    "guest kernel panicked with a crash kernel loaded (pvpanic {bits:#x}); \
                     left running for the dump"
                );
                self.crash_loaded.store(bits, Ordering::SeqCst);
            }
            other => self.request_exit(other.into()),
        }
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
        assert_eq!(Outcome::GuestPanic(1).exit_code(), 120);
        assert_eq!(Outcome::Timeout.exit_code(), 124);
        assert_eq!(Outcome::ExpectsMet.exit_code(), 0);
    }

    #[test]
    fn ember_verdicts_are_even_so_they_never_look_like_a_debug_exit() {
        let verdicts = [
            Outcome::GuestPanic(1),
            Outcome::FailOn {
                pattern: String::new(),
                line: String::new(),
            },
            Outcome::Timeout,
            Outcome::ExpectNotMet {
                pattern: String::new(),
                ended: Box::new(Outcome::PowerOff),
            },
        ];
        for v in verdicts {
            assert_eq!(v.exit_code() % 2, 0, "{v:?}");
        }
    }

    #[test]
    fn a_pvpanic_panic_ends_the_run_with_its_bits() {
        let s = RunState::new().unwrap();
        s.guest_exit(GuestExit::Panic(PVPANIC_PANICKED));
        assert_eq!(s.outcome(), Some(Outcome::GuestPanic(PVPANIC_PANICKED)));
    }

    #[test]
    fn a_panic_with_a_crash_kernel_runs_on_and_its_reset_ends_as_a_panic() {
        use devices::legacy::pvpanic::PVPANIC_CRASH_LOADED;
        let s = RunState::new().unwrap();
        s.guest_exit(GuestExit::Panic(PVPANIC_CRASH_LOADED));
        assert!(!s.is_exiting(), "the crash kernel must get to run");
        s.guest_exit(GuestExit::Reset);
        assert_eq!(s.outcome(), Some(Outcome::GuestPanic(PVPANIC_CRASH_LOADED)));
    }
}
