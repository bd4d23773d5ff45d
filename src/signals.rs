//! SIGTERM, SIGINT and SIGHUP end the run cleanly (the terminal is restored, the exit status
//! is 128 + the signal); SIGUSR1 prints where each vCPU is (RIP, mode, last exit), which is
//! what a hung guest needs. The handler only writes an eventfd the event loop watches.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::register_signal_handler;

use crate::device_manager::EventLoop;
use crate::run_state::{Outcome, RunState};

static SIGNAL_EVT: OnceLock<EventFd> = OnceLock::new();
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);
static REPORTS: AtomicI32 = AtomicI32::new(0);
const HANDLED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1];

extern "C" fn on_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if num == libc::SIGUSR1 {
        REPORTS.fetch_add(1, Ordering::SeqCst);
    } else {
        LAST_SIGNAL.store(num, Ordering::SeqCst);
    }
    if let Some(evt) = SIGNAL_EVT.get() {
        // write(2) on an eventfd is async-signal-safe.
        let _ = evt.write(1);
    }
}

/// The last terminating signal received (0 if none).
pub fn last_signal() -> i32 {
    LAST_SIGNAL.load(Ordering::SeqCst)
}

/// Installs the handlers (idempotent).
pub fn install() -> std::io::Result<()> {
    if SIGNAL_EVT.get().is_none() {
        let _ = SIGNAL_EVT.set(EventFd::new(EFD_NONBLOCK)?);
    }
    for sig in HANDLED {
        register_signal_handler(sig, on_signal)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

struct SignalWatcher(Arc<RunState>);

impl MutEventSubscriber for SignalWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(evt) = SIGNAL_EVT.get() {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("cannot watch for signals: {e:?}");
            }
            // A signal that came before this VM existed still counts.
            if LAST_SIGNAL.load(Ordering::SeqCst) != 0 {
                let _ = evt.write(1);
            }
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        if let Some(evt) = SIGNAL_EVT.get() {
            let _ = evt.read();
        }
        if REPORTS.swap(0, Ordering::SeqCst) > 0 {
            self.0.request_report();
        }
        let sig = LAST_SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            self.0.request_exit(Outcome::Signal(sig));
        }
    }
}

/// Makes the VM's event loop end the run on a handled signal.
pub fn subscribe(events: &mut EventLoop, state: Arc<RunState>) {
    events.add_subscriber(Arc::new(Mutex::new(SignalWatcher(state))));
}
