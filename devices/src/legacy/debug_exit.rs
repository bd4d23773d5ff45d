//! QEMU's `isa-debug-exit`: a guest write of `value` ends the VM with exit status
//! `(value << 1) | 1`. How test kernels report pass/fail to CI.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{ExitSink, GuestExit};

/// The conventional port (as with `-device isa-debug-exit,iobase=0xf4`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Ports the device spans (byte, word or dword writes at the base).
pub const DEBUG_EXIT_LEN: u16 = 4;

/// The debug-exit device.
pub struct DebugExit {
    exit: Arc<dyn ExitSink>,
}

impl DebugExit {
    /// A device that reports to `exit`.
    pub fn new(exit: Arc<dyn ExitSink>) -> Self {
        DebugExit { exit }
    }

    /// The process exit status a written value maps to, as QEMU computes it (the OS keeps
    /// the low 8 bits).
    pub fn status_for(value: u32) -> i32 {
        ((value << 1) | 1) as i32 & 0xff
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() || data.len() > 4 {
            return;
        }
        let mut raw = [0u8; 4];
        raw[..data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(raw);
        self.exit
            .guest_exit(GuestExit::DebugExit(Self::status_for(value)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordingExit;

    #[test]
    fn byte_write_exits_with_shifted_status() {
        let sink = Arc::new(RecordingExit::default());
        let mut dev = DebugExit::new(sink.clone());
        dev.write(0, &[0]);
        dev.write(0, &[0x10]);
        assert_eq!(
            sink.taken(),
            vec![GuestExit::DebugExit(1), GuestExit::DebugExit(0x21)]
        );
    }

    #[test]
    fn dword_write_keeps_the_low_byte_of_the_status() {
        let sink = Arc::new(RecordingExit::default());
        let mut dev = DebugExit::new(sink.clone());
        dev.write(0, &0x1_0000_0080u64.to_le_bytes()[..4]);
        assert_eq!(sink.taken(), vec![GuestExit::DebugExit(1)]);
    }

    #[test]
    fn writes_off_the_base_or_oversized_are_ignored() {
        let sink = Arc::new(RecordingExit::default());
        let mut dev = DebugExit::new(sink.clone());
        dev.write(1, &[3]);
        dev.write(0, &[1; 8]);
        dev.write(0, &[]);
        assert!(sink.taken().is_empty());
    }
}
