//! Ember's emulated devices. They know nothing about KVM: each takes an injected interrupt
//! line ([`Interrupt`]) and, where the guest can end the VM, an [`ExitSink`]; the VMM's
//! device manager wires them to irqfds and puts them on a [`bus::Bus`]. So every device here
//! is unit-testable without `/dev/kvm`.
//!
//! Threat model: the guest is hostile. Every value it writes to a port or register, every
//! length and address it hands over, is checked; a device never panics on guest input.
#![deny(missing_docs)]

pub mod bus;
pub mod disk;
pub mod legacy;
pub mod virtio;

use std::io;

/// An interrupt line a device raises (an irqfd in the VMM, a counter in tests).
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt (edge).
    fn trigger(&self) -> io::Result<()>;
}

impl Interrupt for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}

/// Why the guest asked to leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// Reset (i8042 pulse, ACPI reset register).
    Reset,
    /// Power off (ACPI S5).
    PowerOff,
    /// A write to the debug-exit port; the process exit status to use.
    DebugExit(i32),
}

/// Where devices report that the guest wants the VM to end.
pub trait ExitSink: Send + Sync {
    /// Records the request; the VMM stops the vCPUs and leaves.
    fn guest_exit(&self, exit: GuestExit);
}

#[cfg(test)]
pub(crate) mod test_utils {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;

    /// An interrupt that counts how often it was raised.
    #[derive(Default)]
    pub struct CountingInterrupt(pub AtomicUsize);

    impl CountingInterrupt {
        pub fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl Interrupt for CountingInterrupt {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// An exit sink that remembers every request.
    #[derive(Default)]
    pub struct RecordingExit(pub Mutex<Vec<GuestExit>>);

    impl RecordingExit {
        pub fn taken(&self) -> Vec<GuestExit> {
            self.0.lock().unwrap().clone()
        }
    }

    impl ExitSink for RecordingExit {
        fn guest_exit(&self, exit: GuestExit) {
            self.0.lock().unwrap().push(exit);
        }
    }
}
