//! A minimal i8042 keyboard controller: enough for a guest to find no keyboard, read and write
//! its command byte, pass the self-test, and reset the machine (command 0xfe), which is how
//! `reboot` with `reboot=k` ends the VM.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{ExitSink, GuestExit};

/// Data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The device spans 0x60..=0x64 (data at offset 0, status/command at offset 4).
pub const I8042_LEN: u16 = 5;

const OFFSET_DATA: u64 = 0;
const OFFSET_COMMAND: u64 = 4;
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const CMD_READ_COMMAND_BYTE: u8 = 0x20;
const CMD_WRITE_COMMAND_BYTE: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_INTERFACE_TEST: u8 = 0xab;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_PULSE_RESET: u8 = 0xfe;
const MAX_PENDING: usize = 16;

/// The controller.
pub struct I8042 {
    exit: Arc<dyn ExitSink>,
    command_byte: u8,
    last_was_command: bool,
    expecting_command_byte: bool,
    output: VecDeque<u8>,
}

impl I8042 {
    /// A controller that reports resets to `exit`.
    pub fn new(exit: Arc<dyn ExitSink>) -> Self {
        I8042 {
            exit,
            command_byte: 0,
            last_was_command: false,
            expecting_command_byte: false,
            output: VecDeque::new(),
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYSTEM_FLAG;
        if !self.output.is_empty() {
            s |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            s |= STATUS_LAST_WAS_COMMAND;
        }
        s
    }

    fn reply(&mut self, byte: u8) {
        if self.output.len() < MAX_PENDING {
            self.output.push_back(byte);
        }
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_command = true;
        match cmd {
            CMD_READ_COMMAND_BYTE => self.reply(self.command_byte),
            CMD_WRITE_COMMAND_BYTE => self.expecting_command_byte = true,
            CMD_SELF_TEST => self.reply(0x55),
            CMD_INTERFACE_TEST => self.reply(0x00),
            CMD_READ_OUTPUT_PORT => self.reply(0x01),
            CMD_PULSE_RESET => self.exit.guest_exit(GuestExit::Reset),
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            OFFSET_DATA => self.output.pop_front().unwrap_or(0),
            OFFSET_COMMAND => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            OFFSET_COMMAND => self.command(value),
            OFFSET_DATA => {
                self.last_was_command = false;
                if self.expecting_command_byte {
                    self.command_byte = value;
                    self.expecting_command_byte = false;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordingExit;

    fn dev() -> (I8042, Arc<RecordingExit>) {
        let sink = Arc::new(RecordingExit::default());
        (I8042::new(sink.clone()), sink)
    }

    fn read(d: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        d.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn pulse_reset_command_requests_reset() {
        let (mut d, sink) = dev();
        assert_eq!(read(&mut d, OFFSET_COMMAND) & 0x02, 0, "input buffer empty");
        d.write(OFFSET_COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(sink.taken(), vec![GuestExit::Reset]);
    }

    #[test]
    fn command_byte_round_trips_and_self_test_passes() {
        let (mut d, sink) = dev();
        d.write(OFFSET_COMMAND, &[CMD_WRITE_COMMAND_BYTE]);
        d.write(OFFSET_DATA, &[0x47]);
        d.write(OFFSET_COMMAND, &[CMD_READ_COMMAND_BYTE]);
        assert_ne!(read(&mut d, OFFSET_COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut d, OFFSET_DATA), 0x47);
        d.write(OFFSET_COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut d, OFFSET_DATA), 0x55);
        assert_eq!(read(&mut d, OFFSET_COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert!(sink.taken().is_empty());
    }

    #[test]
    fn flood_of_commands_keeps_bounded_output() {
        let (mut d, sink) = dev();
        for _ in 0..10_000 {
            d.write(OFFSET_COMMAND, &[CMD_SELF_TEST]);
        }
        assert_eq!(d.output.len(), MAX_PENDING);
        d.write(OFFSET_COMMAND, &[]);
        d.write(2, &[CMD_PULSE_RESET]);
        assert!(sink.taken().is_empty());
    }
}
