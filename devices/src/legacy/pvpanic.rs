//! QEMU's ISA pvpanic device: one I/O port through which a guest kernel says it panicked.
//!
//! Linux's `pvpanic-mmio` driver binds the ACPI device `QEMU0001` (its `_CRS` gives this port),
//! reads the port once to learn which events the host supports, and from its panic notifier
//! writes one of them: `PANICKED`, or `CRASH_LOADED` when a kdump kernel is loaded.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::persist::{Persist, StateError};
use crate::{ExitSink, GuestExit};

/// The port QEMU's ISA pvpanic device uses (and the DSDT names).
pub const PVPANIC_PORT: u16 = 0x505;
/// The device is one byte wide.
pub const PVPANIC_LEN: u16 = 1;
/// Event bit: the guest kernel panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit: the guest kernel panicked with a crash (kdump) kernel loaded.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
const SUPPORTED: u8 = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;

/// The pvpanic port.
pub struct PvPanic {
    exit: Arc<dyn ExitSink>,
    reported: bool,
}

impl PvPanic {
    /// A device that reports the guest's first panic event to `exit`.
    pub fn new(exit: Arc<dyn ExitSink>) -> Self {
        PvPanic {
            exit,
            reported: false,
        }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (0, Some(first)) = (offset, data.first_mut()) {
            *first = SUPPORTED;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if offset != 0 || value & SUPPORTED == 0 || self.reported {
            return;
        }
        self.reported = true;
        self.exit.guest_exit(GuestExit::Panic(value & SUPPORTED));
    }
}

/// Whether the guest's panic was reported already.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvPanicState {
    /// A panic was reported.
    pub reported: bool,
}

impl Persist for PvPanic {
    type State = PvPanicState;

    fn save(&self) -> PvPanicState {
        PvPanicState {
            reported: self.reported,
        }
    }

    fn restore(&mut self, s: &PvPanicState) -> Result<(), StateError> {
        self.reported = s.reported;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordingExit;

    fn dev() -> (PvPanic, Arc<RecordingExit>) {
        let sink = Arc::new(RecordingExit::default());
        (PvPanic::new(sink.clone()), sink)
    }

    #[test]
    fn read_reports_panicked_and_crash_loaded_as_supported() {
        let (mut d, _) = dev();
        let mut b = [0xffu8];
        d.read(0, &mut b);
        assert_eq!(b[0], 0b11);
    }

    #[test]
    fn panicked_write_reports_a_panic_once() {
        let (mut d, sink) = dev();
        d.write(0, &[PVPANIC_PANICKED]);
        d.write(0, &[PVPANIC_PANICKED]);
        d.write(0, &[PVPANIC_CRASH_LOADED]);
        assert_eq!(sink.taken(), vec![GuestExit::Panic(PVPANIC_PANICKED)]);
    }

    #[test]
    fn crash_loaded_write_reports_its_event_bit() {
        let (mut d, sink) = dev();
        d.write(0, &[PVPANIC_CRASH_LOADED]);
        assert_eq!(sink.taken(), vec![GuestExit::Panic(PVPANIC_CRASH_LOADED)]);
    }

    #[test]
    fn unsupported_bits_are_ignored() {
        let (mut d, sink) = dev();
        d.write(0, &[0xfc]);
        d.write(0, &[]);
        assert!(sink.taken().is_empty());
        d.write(0, &[0xfc | PVPANIC_PANICKED]);
        assert_eq!(sink.taken(), vec![GuestExit::Panic(PVPANIC_PANICKED)]);
    }

    #[test]
    fn wide_reads_return_the_events_in_the_first_byte_only() {
        let (mut d, _) = dev();
        let mut b = [0xffu8; 4];
        d.read(0, &mut b);
        assert_eq!(b, [SUPPORTED, 0, 0, 0]);
    }

    #[test]
    fn a_reported_panic_stays_reported_across_a_restore() {
        let (mut a, _) = dev();
        a.write(0, &[PVPANIC_PANICKED]);
        let (mut b, exit_b) = dev();
        crate::persist::assert_round_trip(&a, &mut b);
        b.write(0, &[PVPANIC_PANICKED]);
        assert!(exit_b.taken().is_empty());
    }
}
