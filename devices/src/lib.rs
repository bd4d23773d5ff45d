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
pub mod persist;
pub mod virtio;

use std::io;

/// Guest memory as Ember maps it. Pages the VMM writes through it (virtio used rings, block
/// reads, received frames) are marked in a bitmap beside KVM's own dirty log, so a live
/// migration or a diff snapshot knows every page that changed.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// What a write through [`GuestMemoryMmap`] marks.
pub type MemBitmapSlice<'a> = vm_memory::bitmap::RefSlice<'a, vm_memory::bitmap::AtomicBitmap>;
/// A descriptor chain's readable part in [`GuestMemoryMmap`].
pub type GuestReader<'a> = virtio_queue::Reader<'a, MemBitmapSlice<'a>>;
/// A descriptor chain's writable part in [`GuestMemoryMmap`] (writes mark pages dirty).
pub type GuestWriter<'a> = virtio_queue::Writer<'a, MemBitmapSlice<'a>>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;

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

/// A level-triggered interrupt line (an IOAPIC pin driven with KVM_IRQ_LINE in the VMM, a
/// recorder in tests). The device says what the line's level is; it stays there until the
/// device changes it.
pub trait IrqLevel: Send + Sync {
    /// Drives the line high (asserted) or low.
    fn set_level(&self, high: bool) -> io::Result<()>;
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
    /// The guest kernel panicked and said so through the pvpanic port; the event bits it
    /// wrote (bit 0 panicked, bit 1 crash kernel loaded).
    Panic(u8),
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

    /// A level-triggered line that records every level it is driven to.
    #[derive(Default)]
    pub struct RecordingLevel(pub Mutex<Vec<bool>>);

    impl RecordingLevel {
        /// Every level set, oldest first.
        pub fn levels(&self) -> Vec<bool> {
            self.0.lock().unwrap().clone()
        }

        /// The line's level now (low before any change).
        pub fn is_high(&self) -> bool {
            self.levels().last().copied().unwrap_or(false)
        }
    }

    impl IrqLevel for RecordingLevel {
        fn set_level(&self, high: bool) -> io::Result<()> {
            self.0.lock().unwrap().push(high);
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
