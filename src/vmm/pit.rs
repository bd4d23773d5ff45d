//! The in-kernel PIT (i8254), made on a helper thread while the rest of the VM is built.
//!
//! Two of its costs are waits in the kernel, not work: `KVM_CREATE_PIT2` starts a kernel
//! thread, and a PIT that reinjects lost ticks (KVM's default) registers interrupt notifiers
//! whose removal when the VM ends waits out SRCU grace periods (~16 ms here, measured with
//! `perf trace`: most of the VM fd's close). So the helper creates the PIT while the main
//! thread builds devices and vCPUs (it is waited for before [`super::Vmm::build`] returns);
//! once the vCPUs run ([`PitGo::go`]) it turns reinjection off (`KVM_REINJECT_CONTROL`),
//! paying that wait while the guest runs, not while the VM is set up or restored (the
//! request holds the PIT's lock and slowed vCPU set-up ioctls beside it). Without
//! reinjection the PIT drops the ticks a descheduled guest missed (QEMU's
//! `lost_tick_policy=discard`): guests keep time with kvmclock or the TSC, the PIT only
//! serves calibration and old guests' ticks. It also lifts KVM's APICv/AVIC inhibit for PIT
//! reinjection, so hosts with hardware APIC virtualization keep it.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, kvm_reinject_control, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_io_nr;

use super::VmmError;

ioctl_io_nr!(KVM_REINJECT_CONTROL, kvm_bindings::KVMIO, 0x71);

/// A PIT being made; [`PendingPit::wait`] before the vCPUs run or its state is set.
pub(super) struct PendingPit {
    made: Result<mpsc::Receiver<Result<(), VmmError>>, Result<(), VmmError>>,
    go: mpsc::Sender<Duration>,
    end: mpsc::Sender<()>,
}

/// Tells the helper the vCPUs run; dropped (the VM is gone), it lets the helper end.
#[derive(Default)]
pub(super) struct PitGo {
    go: Option<mpsc::Sender<Duration>>,
    _end: Option<mpsc::Sender<()>>,
}

impl PitGo {
    /// The vCPUs run: turn reinjection off `after` this long if the VM still exists (once).
    /// The request stalls the vCPUs for its SRCU grace period (~15 ms here): a fresh boot
    /// takes it at once, a restored VM — whose first moments are what a restore is timed
    /// by (a CI case, a request) — a second later.
    pub(super) fn go(&mut self, after: Duration) {
        if let Some(tx) = self.go.take() {
            let _ = tx.send(after);
        }
    }
}

fn create(vm: &VmFd) -> Result<(), VmmError> {
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmmError::Kvm("KVM_CREATE_PIT2", e))
}

/// Turns lost-tick reinjection off; on failure the PIT keeps reinjecting (harmless).
fn reinject_off(vm: &VmFd) {
    let ctl = kvm_reinject_control::default();
    // SAFETY: KVM_REINJECT_CONTROL reads a kvm_reinject_control (32 bytes) from the pointer
    // given, which points at one that lives across the call; the fd is a KVM VM's.
    let rc = unsafe { ioctl_with_ref(vm, KVM_REINJECT_CONTROL(), &ctl) };
    if rc < 0 {
        log::debug!("KVM_REINJECT_CONTROL: {}", std::io::Error::last_os_error());
    }
}

impl PendingPit {
    /// Starts making the PIT of `vm` (the irqchip exists); on this thread if no helper
    /// thread can be had (reinjection then stays on).
    pub(super) fn start(vm: &Arc<VmFd>) -> Self {
        let (tx, rx) = mpsc::channel();
        let (go, wait_go) = mpsc::channel::<Duration>();
        let (end, wait_end) = mpsc::channel::<()>();
        let theirs = vm.clone();
        let spawned = std::thread::Builder::new()
            .name("pit".into())
            .spawn(move || {
                let made = create(&theirs);
                let ok = made.is_ok();
                let _ = tx.send(made);
                if !ok {
                    return;
                }
                let Ok(after) = wait_go.recv() else {
                    return; // the VM never ran
                };
                // Nothing is ever sent on `end`: the wait ends at the delay, or early when
                // the VM is dropped (then nothing is left to do).
                if after.is_zero()
                    || wait_end.recv_timeout(after) == Err(mpsc::RecvTimeoutError::Timeout)
                {
                    reinject_off(&theirs);
                }
            });
        let made = match spawned {
            Ok(_) => Ok(rx),
            Err(e) => {
                log::debug!("no thread for the PIT, made here: {e}");
                Err(create(vm))
            }
        };
        PendingPit { made, go, end }
    }

    /// The PIT exists (or why it could not be made); then [`PitGo::go`] once vCPUs run.
    pub(super) fn wait(self) -> Result<PitGo, VmmError> {
        match self.made {
            Ok(rx) => rx.recv().unwrap_or_else(|_| {
                Err(VmmError::Kvm(
                    "KVM_CREATE_PIT2",
                    kvm_ioctls::Error::new(libc::EIO),
                ))
            })?,
            Err(done) => done?,
        }
        Ok(PitGo {
            go: Some(self.go),
            _end: Some(self.end),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reinject_control_request_number_is_the_kernels() {
        // _IO(KVMIO, 0x71), as <linux/kvm.h> defines it.
        assert_eq!(KVM_REINJECT_CONTROL(), 0xae71);
    }
}
