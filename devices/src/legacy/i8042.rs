//! The i8042 keyboard controller with a PS/2 keyboard behind it and no AUX (mouse) port.
//!
//! Enough of both for Linux's i8042 and atkbd drivers to probe them without a single timeout,
//! for the host to type Ctrl-Alt-Del, and for `reboot=k` to end the VM (command 0xfe).
//!
//! Data flows through one output register: the controller's own replies go first, then the
//! keyboard's bytes (replies and scancodes) while the keyboard interface is enabled. IRQ 1 is
//! raised each time a controller or keyboard byte lands in the register while the command
//! byte enables keyboard interrupts, one byte at a time as the guest reads them.
//!
//! The AUX port is absent the way a controller with a dead AUX line is: an AUX loop or AUX
//! write answers 0xfe with the AUX-data and timeout status bits, and the AUX interface test
//! reports the clock line stuck low, so Linux gives up on the port after two commands.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::persist::{Persist, StateError};
use crate::{ExitSink, GuestExit, Interrupt};

/// Data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The device spans 0x60..=0x64 (data at offset 0, status/command at offset 4).
pub const I8042_LEN: u16 = 5;
/// The keyboard's ISA interrupt.
pub const I8042_KBD_IRQ: u32 = 1;

const OFFSET_DATA: u64 = 0;
const OFFSET_COMMAND: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// "Not inhibited": the keyboard lock switch is off.
const STATUS_UNLOCKED: u8 = 0x10;
const STATUS_AUX_DATA: u8 = 0x20;
const STATUS_TIMEOUT: u8 = 0x40;

const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;
/// What firmware leaves: translation on, AUX off, POST passed, keyboard interrupt on.
const CTR_INITIAL: u8 = CTR_TRANSLATE | CTR_AUX_DISABLED | CTR_SYSTEM_FLAG | CTR_KBD_INT;

const CMD_READ_COMMAND_BYTE: u8 = 0x20;
const CMD_WRITE_COMMAND_BYTE: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
/// AUX interface test result: clock line stuck low.
const AUX_CLOCK_STUCK_LOW: u8 = 0x01;
/// Output port: bit 0 = reset line released, bit 1 = A20 enabled.
const OUTPUT_PORT_RESET_LINE: u8 = 0x01;
const OUTPUT_PORT_A20: u8 = 0x02;

const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5;
const KBD_DEFAULTS: u8 = 0xf6;
const KBD_SET3_KEY_TYPES_FIRST: u8 = 0xf7;
const KBD_SET3_KEY_TYPES_LAST: u8 = 0xfd;
const KBD_RESEND: u8 = 0xfe;
const KBD_RESET: u8 = 0xff;

const KBD_ACK: u8 = 0xfa;
const KBD_NAK: u8 = 0xfe;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_ID: [u8; 2] = [0xab, 0x83];
const BREAK_SET2: u8 = 0xf0;
const EXTENDED: u8 = 0xe0;

/// Bytes the controller holds for the guest, and bytes the keyboard holds for the controller.
const MAX_PENDING: usize = 16;

/// Where a byte in the output register came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// The controller itself, or the keyboard.
    Keyboard,
    /// A (failed) AUX transfer: flagged AUX data with a timeout.
    AuxTimeout,
}

/// What the next byte written to the data port is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataTarget {
    /// A keyboard command or argument.
    Keyboard,
    /// The controller's command byte.
    CommandByte,
    /// The controller's output port.
    OutputPort,
    /// A byte to place in the output buffer as keyboard data.
    KbdOutput,
    /// A byte to place in the output buffer as AUX data.
    AuxOutput,
    /// A byte for the (absent) AUX device.
    Aux,
}

/// A key the host can type, with its codes in scancode sets 1, 2 and 3.
#[derive(Clone, Copy)]
struct Key {
    extended: bool,
    set1: u8,
    set2: u8,
    set3: u8,
}

const LEFT_CTRL: Key = Key {
    extended: false,
    set1: 0x1d,
    set2: 0x14,
    set3: 0x11,
};
const LEFT_ALT: Key = Key {
    extended: false,
    set1: 0x38,
    set2: 0x11,
    set3: 0x19,
};
const DELETE: Key = Key {
    extended: true,
    set1: 0x53,
    set2: 0x71,
    set3: 0x64,
};

/// The PS/2 keyboard: a command interpreter and its scancode set.
struct Keyboard {
    /// A command waiting for its argument byte.
    awaiting_arg: Option<u8>,
    scanning: bool,
    set: u8,
    leds: u8,
    typematic: u8,
    last_sent: u8,
}

impl Keyboard {
    fn new() -> Self {
        Keyboard {
            awaiting_arg: None,
            scanning: true,
            set: 2,
            leds: 0,
            typematic: 0x2b,
            last_sent: KBD_ACK,
        }
    }

    fn defaults(&mut self) {
        self.set = 2;
        self.typematic = 0x2b;
        self.leds = 0;
    }

    /// Handles one byte from the host; returns the bytes the keyboard answers and whether its
    /// pending output must be dropped first (reset and enable clear the keyboard's buffer).
    fn write(&mut self, byte: u8) -> (Vec<u8>, bool) {
        // An argument never has bit 7 set; such a byte is a new command.
        if let (Some(cmd), true) = (self.awaiting_arg.take(), byte & 0x80 == 0) {
            return (self.argument(cmd, byte), false);
        }
        let mut clear = false;
        let reply = match byte {
            KBD_SET_LEDS | KBD_TYPEMATIC | KBD_SCANCODE_SET => {
                self.awaiting_arg = Some(byte);
                vec![KBD_ACK]
            }
            KBD_ECHO => vec![KBD_ECHO],
            KBD_GET_ID => vec![KBD_ACK, KBD_ID[0], KBD_ID[1]],
            KBD_ENABLE => {
                self.scanning = true;
                clear = true;
                vec![KBD_ACK]
            }
            KBD_DISABLE => {
                self.defaults();
                self.scanning = false;
                vec![KBD_ACK]
            }
            KBD_DEFAULTS => {
                self.defaults();
                self.scanning = true;
                vec![KBD_ACK]
            }
            KBD_SET3_KEY_TYPES_FIRST..=KBD_SET3_KEY_TYPES_LAST => vec![KBD_ACK],
            KBD_RESEND => vec![self.last_sent],
            KBD_RESET => {
                self.defaults();
                self.scanning = true;
                clear = true;
                vec![KBD_ACK, KBD_BAT_OK]
            }
            _ => vec![KBD_NAK],
        };
        if let Some(&last) = reply.last() {
            self.last_sent = last;
        }
        (reply, clear)
    }

    fn argument(&mut self, cmd: u8, arg: u8) -> Vec<u8> {
        match cmd {
            KBD_SET_LEDS => self.leds = arg & 0x07,
            KBD_TYPEMATIC => self.typematic = arg,
            KBD_SCANCODE_SET => match arg {
                0 => return vec![KBD_ACK, self.set],
                1..=3 => self.set = arg,
                _ => return vec![KBD_NAK],
            },
            _ => {}
        }
        vec![KBD_ACK]
    }

    /// The make (`pressed`) or break code of `key` in the set the guest will see.
    fn scancode(&self, key: Key, pressed: bool, translated: bool, out: &mut Vec<u8>) {
        let set = if translated { 1 } else { self.set };
        if key.extended && set != 3 {
            out.push(EXTENDED);
        }
        match (set, pressed) {
            (1, true) => out.push(key.set1),
            (1, false) => out.push(key.set1 | 0x80),
            (3, true) => out.push(key.set3),
            (3, false) => out.extend_from_slice(&[BREAK_SET2, key.set3]),
            (_, true) => out.push(key.set2),
            (_, false) => out.extend_from_slice(&[BREAK_SET2, key.set2]),
        }
    }
}

/// What the 8042 translation turns a keyboard reply byte into. Keyboard replies at or above
/// 0x80 pass unchanged; the few data bytes below it a keyboard sends as replies (its scancode
/// set number) and the ID's second byte are translated as the 8042's table does.
fn translate_reply(byte: u8) -> u8 {
    match byte {
        0x01 => 0x43,
        0x02 | 0x83 => 0x41,
        0x03 => 0x3f,
        other => other,
    }
}

/// The controller.
pub struct I8042 {
    exit: Arc<dyn ExitSink>,
    irq: Option<Arc<dyn Interrupt>>,
    command_byte: u8,
    last_was_command: bool,
    data_target: DataTarget,
    /// The output register: what the next data-port read returns.
    output: Option<(u8, Source)>,
    /// The last byte read, returned again when the register is empty.
    last_read: u8,
    controller_out: VecDeque<(u8, Source)>,
    keyboard_out: VecDeque<u8>,
    keyboard: Keyboard,
}

impl I8042 {
    /// A controller that reports resets to `exit` and raises no interrupt.
    pub fn new(exit: Arc<dyn ExitSink>) -> Self {
        I8042 {
            exit,
            irq: None,
            command_byte: CTR_INITIAL,
            last_was_command: false,
            data_target: DataTarget::Keyboard,
            output: None,
            last_read: 0,
            controller_out: VecDeque::new(),
            keyboard_out: VecDeque::new(),
            keyboard: Keyboard::new(),
        }
    }

    /// A controller that also raises `irq` (IRQ 1, edge) for each byte the keyboard side puts
    /// in the output register while keyboard interrupts are enabled.
    pub fn with_irq(exit: Arc<dyn ExitSink>, irq: Arc<dyn Interrupt>) -> Self {
        I8042 {
            irq: Some(irq),
            ..Self::new(exit)
        }
    }

    /// Types Ctrl-Alt-Del: make codes of Ctrl, Alt and Delete, then their break codes, in
    /// set 1 when the controller translates, else in the keyboard's set. Returns false, and
    /// types nothing, when the keyboard is disabled or its buffer has no room for them.
    pub fn send_ctrl_alt_del(&mut self) -> bool {
        let translated = self.command_byte & CTR_TRANSLATE != 0;
        let mut codes = Vec::with_capacity(12);
        for key in [LEFT_CTRL, LEFT_ALT, DELETE] {
            self.keyboard.scancode(key, true, translated, &mut codes);
        }
        for key in [DELETE, LEFT_ALT, LEFT_CTRL] {
            self.keyboard.scancode(key, false, translated, &mut codes);
        }
        if !self.keyboard.scanning || self.keyboard_out.len() + codes.len() > MAX_PENDING {
            return false;
        }
        self.keyboard_out.extend(codes);
        self.fill_output();
        true
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if self.command_byte & CTR_SYSTEM_FLAG != 0 {
            s |= STATUS_SYSTEM_FLAG;
        }
        if self.last_was_command {
            s |= STATUS_LAST_WAS_COMMAND;
        }
        match self.output {
            Some((_, Source::Keyboard)) => s |= STATUS_OUTPUT_FULL,
            Some((_, Source::AuxTimeout)) => {
                s |= STATUS_OUTPUT_FULL | STATUS_AUX_DATA | STATUS_TIMEOUT
            }
            None => {}
        }
        s
    }

    /// Whether IRQ 1 is asserted: a keyboard-side byte waits with keyboard interrupts on.
    fn irq_line(&self) -> bool {
        self.command_byte & CTR_KBD_INT != 0 && matches!(self.output, Some((_, Source::Keyboard)))
    }

    fn raise_irq(&self) {
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.trigger() {
                log::error!("i8042: cannot raise IRQ {I8042_KBD_IRQ}: {e}");
            }
        }
    }

    /// Moves the next pending byte into an empty output register, raising IRQ 1 for it.
    fn fill_output(&mut self) {
        if self.output.is_some() {
            return;
        }
        self.output = self.controller_out.pop_front().or_else(|| {
            if self.command_byte & CTR_KBD_DISABLED != 0 {
                return None;
            }
            self.keyboard_out.pop_front().map(|b| (b, Source::Keyboard))
        });
        if self.irq_line() {
            self.raise_irq();
        }
    }

    fn reply(&mut self, byte: u8, source: Source) {
        if self.controller_out.len() < MAX_PENDING {
            self.controller_out.push_back((byte, source));
        }
        self.fill_output();
    }

    fn set_command_byte(&mut self, value: u8) {
        let was = self.irq_line();
        self.command_byte = value;
        if !was && self.irq_line() {
            self.raise_irq();
        }
        self.fill_output();
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_command = true;
        self.data_target = DataTarget::Keyboard;
        let ctr = self.command_byte;
        match cmd {
            CMD_READ_COMMAND_BYTE => self.reply(ctr, Source::Keyboard),
            CMD_WRITE_COMMAND_BYTE => self.data_target = DataTarget::CommandByte,
            CMD_AUX_DISABLE => self.set_command_byte(ctr | CTR_AUX_DISABLED),
            CMD_AUX_ENABLE => self.set_command_byte(ctr & !CTR_AUX_DISABLED),
            CMD_AUX_TEST => self.reply(AUX_CLOCK_STUCK_LOW, Source::Keyboard),
            CMD_SELF_TEST => self.reply(SELF_TEST_PASSED, Source::Keyboard),
            CMD_KBD_TEST => self.reply(INTERFACE_OK, Source::Keyboard),
            CMD_KBD_DISABLE => self.set_command_byte(ctr | CTR_KBD_DISABLED),
            CMD_KBD_ENABLE => self.set_command_byte(ctr & !CTR_KBD_DISABLED),
            CMD_READ_OUTPUT_PORT => {
                self.reply(OUTPUT_PORT_RESET_LINE | OUTPUT_PORT_A20, Source::Keyboard)
            }
            CMD_WRITE_OUTPUT_PORT => self.data_target = DataTarget::OutputPort,
            CMD_WRITE_KBD_OUTPUT => self.data_target = DataTarget::KbdOutput,
            CMD_WRITE_AUX_OUTPUT => self.data_target = DataTarget::AuxOutput,
            CMD_WRITE_AUX => self.data_target = DataTarget::Aux,
            CMD_PULSE_RESET => self.exit.guest_exit(GuestExit::Reset),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.last_was_command = false;
        let target = std::mem::replace(&mut self.data_target, DataTarget::Keyboard);
        match target {
            DataTarget::CommandByte => self.set_command_byte(value),
            DataTarget::OutputPort if value & OUTPUT_PORT_RESET_LINE == 0 => {
                self.exit.guest_exit(GuestExit::Reset)
            }
            DataTarget::OutputPort => {}
            DataTarget::KbdOutput => self.reply(value, Source::Keyboard),
            // No AUX port: transfers time out.
            DataTarget::AuxOutput | DataTarget::Aux => self.reply(KBD_NAK, Source::AuxTimeout),
            DataTarget::Keyboard => self.send_to_keyboard(value),
        }
    }

    fn send_to_keyboard(&mut self, value: u8) {
        let (reply, clear) = self.keyboard.write(value);
        if clear {
            self.keyboard_out.clear();
        }
        let translated = self.command_byte & CTR_TRANSLATE != 0;
        for byte in reply {
            if self.keyboard_out.len() < MAX_PENDING {
                let byte = if translated {
                    translate_reply(byte)
                } else {
                    byte
                };
                self.keyboard_out.push_back(byte);
            }
        }
        self.fill_output();
    }

    fn read_data(&mut self) -> u8 {
        if let Some((byte, _)) = self.output.take() {
            self.last_read = byte;
            self.fill_output();
        }
        self.last_read
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            OFFSET_DATA => self.read_data(),
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
            OFFSET_DATA => self.data(value),
            _ => {}
        }
    }
}

/// The controller's and the keyboard's registers and buffers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The command byte.
    pub command_byte: u8,
    /// The last port written was the command port.
    pub last_was_command: bool,
    /// What the next data-port byte is for.
    pub data_target: DataTarget,
    /// The output register.
    pub output: Option<(u8, Source)>,
    /// The last byte read.
    pub last_read: u8,
    /// Controller replies waiting.
    pub controller_out: Vec<(u8, Source)>,
    /// Keyboard bytes waiting.
    pub keyboard_out: Vec<u8>,
    /// A keyboard command waiting for its argument.
    pub kbd_awaiting_arg: Option<u8>,
    /// The keyboard scans (sends keys).
    pub kbd_scanning: bool,
    /// The keyboard's scancode set.
    pub kbd_set: u8,
    /// Its LEDs.
    pub kbd_leds: u8,
    /// Its typematic rate.
    pub kbd_typematic: u8,
    /// The last byte it sent (for resend).
    pub kbd_last_sent: u8,
}

impl Persist for I8042 {
    type State = I8042State;

    fn save(&self) -> I8042State {
        let k = &self.keyboard;
        I8042State {
            command_byte: self.command_byte,
            last_was_command: self.last_was_command,
            data_target: self.data_target,
            output: self.output,
            last_read: self.last_read,
            controller_out: self.controller_out.iter().copied().collect(),
            keyboard_out: self.keyboard_out.iter().copied().collect(),
            kbd_awaiting_arg: k.awaiting_arg,
            kbd_scanning: k.scanning,
            kbd_set: k.set,
            kbd_leds: k.leds,
            kbd_typematic: k.typematic,
            kbd_last_sent: k.last_sent,
        }
    }

    fn restore(&mut self, s: &I8042State) -> Result<(), StateError> {
        if s.controller_out.len() > MAX_PENDING || s.keyboard_out.len() > MAX_PENDING {
            return Err(StateError::new(
                "i8042",
                "more bytes waiting than the buffers hold",
            ));
        }
        if !(1..=3).contains(&s.kbd_set) {
            return Err(StateError::new(
                "i8042",
                format!("scancode set {}", s.kbd_set),
            ));
        }
        self.command_byte = s.command_byte;
        self.last_was_command = s.last_was_command;
        self.data_target = s.data_target;
        self.output = s.output;
        self.last_read = s.last_read;
        self.controller_out = s.controller_out.iter().copied().collect();
        self.keyboard_out = s.keyboard_out.iter().copied().collect();
        let k = &mut self.keyboard;
        k.awaiting_arg = s.kbd_awaiting_arg;
        k.scanning = s.kbd_scanning;
        k.set = s.kbd_set;
        k.leds = s.kbd_leds;
        k.typematic = s.kbd_typematic;
        k.last_sent = s.kbd_last_sent;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{CountingInterrupt, RecordingExit};

    /// Status polls before a driver gives up waiting (Linux's I8042_CTL_TIMEOUT).
    const POLLS: usize = 10_000;

    struct Rig {
        dev: I8042,
        irq: Arc<CountingInterrupt>,
        exit: Arc<RecordingExit>,
    }

    impl Rig {
        fn new() -> Self {
            let irq = Arc::new(CountingInterrupt::default());
            let exit = Arc::new(RecordingExit::default());
            let dev = I8042::with_irq(exit.clone(), irq.clone());
            Rig { dev, irq, exit }
        }

        fn status(&mut self) -> u8 {
            let mut b = [0u8];
            self.dev.read(OFFSET_COMMAND, &mut b);
            b[0]
        }

        fn read_data(&mut self) -> u8 {
            let mut b = [0u8];
            self.dev.read(OFFSET_DATA, &mut b);
            b[0]
        }

        /// Linux's `i8042_wait_read`: polls the status for a full output buffer.
        fn wait_read(&mut self) -> Result<u8, &'static str> {
            for _ in 0..POLLS {
                let s = self.status();
                if s & STATUS_OUTPUT_FULL != 0 {
                    return Ok(s);
                }
            }
            Err("timeout waiting for output")
        }

        /// Linux's `__i8042_command`: command, parameters, then `receive` replies (an AUX
        /// loop reply must carry the AUX-data bit).
        fn command(&mut self, cmd: u8, params: &[u8], receive: usize) -> Result<Vec<u8>, String> {
            assert_eq!(self.status() & 0x02, 0, "input buffer never busy");
            self.dev.write(OFFSET_COMMAND, &[cmd]);
            for p in params {
                self.dev.write(OFFSET_DATA, &[*p]);
            }
            let mut out = Vec::new();
            for _ in 0..receive {
                let s = self.wait_read()?;
                if cmd == CMD_WRITE_AUX_OUTPUT && s & STATUS_AUX_DATA == 0 {
                    return Err("auxerr".into());
                }
                out.push(self.read_data());
            }
            Ok(out)
        }

        /// What the IRQ 1 handler sees: one byte per interrupt, none left behind.
        fn kbd_bytes(&mut self, irqs_before: usize) -> Vec<u8> {
            let mut got = Vec::new();
            while self.status() & STATUS_OUTPUT_FULL != 0 {
                assert_eq!(self.status() & STATUS_AUX_DATA, 0);
                got.push(self.read_data());
                assert!(got.len() <= MAX_PENDING * 2, "endless output");
            }
            assert_eq!(
                self.irq.count() - irqs_before,
                got.len(),
                "one IRQ per byte"
            );
            got
        }

        /// libps2's `ps2_command` from atkbd: each byte sent to the keyboard, then the bytes
        /// that come back by interrupt.
        fn kbd_command(&mut self, bytes: &[u8]) -> Vec<u8> {
            let before = self.irq.count();
            let mut got = Vec::new();
            for b in bytes {
                self.dev.write(OFFSET_DATA, &[*b]);
                got.extend(self.kbd_bytes(before + got.len()));
            }
            got
        }

        fn flush(&mut self) -> usize {
            let mut n = 0;
            while self.status() & STATUS_OUTPUT_FULL != 0 && n < 16 {
                self.read_data();
                n += 1;
            }
            n
        }

        /// i8042_controller_init as Linux 6.1 does it; returns the CTR it read.
        fn controller_init(&mut self) -> u8 {
            assert_eq!(self.flush(), 0, "controller check: nothing queued");
            let a = self.command(CMD_READ_COMMAND_BYTE, &[], 1).unwrap()[0];
            let b = self.command(CMD_READ_COMMAND_BYTE, &[], 1).unwrap()[0];
            assert_eq!(a, b, "stable CTR");
            let ctr = (a | CTR_KBD_DISABLED) & !CTR_KBD_INT;
            assert_ne!(self.status() & STATUS_UNLOCKED, 0, "no keylock warning");
            self.command(CMD_WRITE_COMMAND_BYTE, &[ctr], 0).unwrap();
            assert_eq!(self.flush(), 0);
            ctr
        }
    }

    #[test]
    fn linux_probe_with_noaux_gets_every_reply_without_timeouts() {
        let mut r = Rig::new();
        let ctr = r.controller_init();
        assert_ne!(ctr & CTR_TRANSLATE, 0, "firmware left translation on");
        // i8042_enable_kbd_port
        let ctr = (ctr & !CTR_KBD_DISABLED) | CTR_KBD_INT;
        r.command(CMD_WRITE_COMMAND_BYTE, &[ctr], 0).unwrap();
        let irqs = r.irq.count();
        // atkbd_connect on a translated port: probe, deactivate, reset_state, activate.
        assert_eq!(r.kbd_command(&[KBD_GET_ID]), [0xfa, 0xab, 0x41]);
        assert_eq!(r.kbd_command(&[KBD_DISABLE]), [0xfa]);
        assert_eq!(r.kbd_command(&[KBD_SET_LEDS, 0]), [0xfa, 0xfa]);
        assert_eq!(r.kbd_command(&[KBD_TYPEMATIC, 0]), [0xfa, 0xfa]);
        assert_eq!(r.kbd_command(&[KBD_ENABLE]), [0xfa]);
        assert_eq!(r.irq.count() - irqs, 9, "one IRQ per byte, nothing more");
        assert!(r.exit.taken().is_empty());
    }

    #[test]
    fn linux_aux_probe_finds_no_aux_port_in_two_commands_and_leaves_nothing_queued() {
        let mut r = Rig::new();
        r.controller_init();
        let irqs = r.irq.count();
        // i8042_check_aux: AUX loop of 0x5a...
        let looped = r.command(CMD_WRITE_AUX_OUTPUT, &[0x5a], 1).unwrap();
        assert_ne!(looped, [0x5a]);
        // ... failed, so the AUX interface test decides, and must report an error.
        let test = r.command(CMD_AUX_TEST, &[], 1).unwrap()[0];
        assert!(test != 0 && test != 0xfa && test != 0xff, "{test:#x}");
        assert_eq!(r.status() & STATUS_OUTPUT_FULL, 0);
        assert_eq!(r.irq.count(), irqs, "keyboard interrupts were off");
    }

    #[test]
    fn aux_enable_and_disable_toggle_the_command_byte_bit() {
        let mut r = Rig::new();
        r.command(CMD_AUX_ENABLE, &[], 0).unwrap();
        let ctr = r.command(CMD_READ_COMMAND_BYTE, &[], 1).unwrap()[0];
        assert_eq!(ctr & CTR_AUX_DISABLED, 0);
        r.command(CMD_AUX_DISABLE, &[], 0).unwrap();
        let ctr = r.command(CMD_READ_COMMAND_BYTE, &[], 1).unwrap()[0];
        assert_ne!(ctr & CTR_AUX_DISABLED, 0);
    }

    #[test]
    fn aux_write_times_out_with_aux_and_timeout_status() {
        let mut r = Rig::new();
        r.dev.write(OFFSET_COMMAND, &[CMD_WRITE_AUX]);
        r.dev.write(OFFSET_DATA, &[0xff]);
        let s = r.status();
        assert_eq!(s & 0x61, 0x61);
        assert_eq!(r.read_data(), 0xfe);
        assert_eq!(r.irq.count(), 0, "AUX data does not raise IRQ 1");
    }

    #[test]
    fn untranslated_keyboard_reports_id_ab83_and_scancode_set_2() {
        let mut r = Rig::new();
        r.command(CMD_WRITE_COMMAND_BYTE, &[CTR_KBD_INT], 0)
            .unwrap();
        assert_eq!(r.kbd_command(&[KBD_GET_ID]), [0xfa, 0xab, 0x83]);
        assert_eq!(r.kbd_command(&[KBD_SCANCODE_SET, 0]), [0xfa, 0xfa, 0x02]);
    }

    #[test]
    fn translated_scancode_set_query_answers_the_translated_set_number() {
        let mut r = Rig::new();
        assert_eq!(r.kbd_command(&[KBD_SCANCODE_SET, 0]), [0xfa, 0xfa, 0x41]);
    }

    #[test]
    fn keyboard_reset_echo_and_unknown_commands_answer_as_hardware_does() {
        let mut r = Rig::new();
        assert_eq!(r.kbd_command(&[KBD_RESET]), [0xfa, 0xaa]);
        assert_eq!(r.kbd_command(&[KBD_ECHO]), [0xee]);
        assert_eq!(r.kbd_command(&[KBD_DEFAULTS]), [0xfa]);
        assert_eq!(r.kbd_command(&[0x5a]), [0xfe]);
        assert_eq!(r.kbd_command(&[KBD_RESEND]), [0xfe]);
        assert_eq!(r.kbd_command(&[KBD_SCANCODE_SET, 7]), [0xfa, 0xfe]);
    }

    #[test]
    fn command_byte_written_before_its_argument_starts_a_new_command() {
        let mut r = Rig::new();
        assert_eq!(r.kbd_command(&[KBD_SET_LEDS, KBD_ECHO]), [0xfa, 0xee]);
        assert_eq!(r.dev.keyboard.awaiting_arg, None);
    }

    #[test]
    fn ctrl_alt_del_is_set_1_when_translating_one_byte_and_irq_per_read() {
        let mut r = Rig::new();
        assert!(r.dev.send_ctrl_alt_del());
        assert_eq!(r.irq.count(), 1, "only the first byte is in the register");
        let got = r.kbd_bytes(0);
        assert_eq!(got, [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
    }

    #[test]
    fn ctrl_alt_del_is_set_2_without_translation() {
        let mut r = Rig::new();
        r.command(CMD_WRITE_COMMAND_BYTE, &[CTR_KBD_INT], 0)
            .unwrap();
        let irqs = r.irq.count();
        assert!(r.dev.send_ctrl_alt_del());
        let got = r.kbd_bytes(irqs);
        assert_eq!(
            got,
            [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
        );
    }

    #[test]
    fn ctrl_alt_del_follows_the_keyboard_set_without_translation() {
        let mut r = Rig::new();
        r.command(CMD_WRITE_COMMAND_BYTE, &[CTR_KBD_INT], 0)
            .unwrap();
        r.kbd_command(&[KBD_SCANCODE_SET, 3]);
        let irqs = r.irq.count();
        assert!(r.dev.send_ctrl_alt_del());
        let got = r.kbd_bytes(irqs);
        assert_eq!(got, [0x11, 0x19, 0x64, 0xf0, 0x64, 0xf0, 0x19, 0xf0, 0x11]);
    }

    #[test]
    fn injection_is_bounded_and_refused_when_the_buffer_is_full() {
        let mut r = Rig::new();
        assert!(r.dev.send_ctrl_alt_del());
        assert!(r.dev.send_ctrl_alt_del());
        assert!(!r.dev.send_ctrl_alt_del());
        for _ in 0..1000 {
            r.dev.send_ctrl_alt_del();
        }
        assert_eq!(r.kbd_bytes(0).len(), 16);
    }

    #[test]
    fn disabled_keyboard_types_nothing() {
        let mut r = Rig::new();
        r.kbd_command(&[KBD_DISABLE]);
        assert!(!r.dev.send_ctrl_alt_del());
        assert_eq!(r.status() & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn keyboard_bytes_wait_while_the_interface_is_disabled() {
        let mut r = Rig::new();
        r.command(CMD_KBD_DISABLE, &[], 0).unwrap();
        r.dev.send_ctrl_alt_del();
        assert_eq!(r.status() & STATUS_OUTPUT_FULL, 0);
        assert_eq!(r.irq.count(), 0);
        r.command(CMD_KBD_ENABLE, &[], 0).unwrap();
        assert_eq!(r.irq.count(), 1);
        assert_eq!(r.kbd_bytes(0).len(), 8);
    }

    #[test]
    fn no_interrupt_until_keyboard_interrupts_are_enabled_with_a_byte_waiting() {
        let mut r = Rig::new();
        r.command(CMD_WRITE_COMMAND_BYTE, &[CTR_TRANSLATE], 0)
            .unwrap();
        r.dev.send_ctrl_alt_del();
        assert_eq!(r.irq.count(), 0);
        assert_ne!(r.status() & STATUS_OUTPUT_FULL, 0);
        r.command(CMD_WRITE_COMMAND_BYTE, &[CTR_TRANSLATE | CTR_KBD_INT], 0)
            .unwrap();
        assert_eq!(r.irq.count(), 1);
    }

    #[test]
    fn reading_an_empty_register_repeats_the_last_byte() {
        let mut r = Rig::new();
        r.command(CMD_SELF_TEST, &[], 1).unwrap();
        assert_eq!(r.read_data(), SELF_TEST_PASSED);
    }

    #[test]
    fn pulse_reset_command_requests_reset() {
        let mut r = Rig::new();
        assert_eq!(r.status() & 0x02, 0, "input buffer empty");
        r.dev.write(OFFSET_COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(r.exit.taken(), vec![GuestExit::Reset]);
    }

    #[test]
    fn output_port_write_with_reset_line_low_resets() {
        let mut r = Rig::new();
        let port = r.command(CMD_READ_OUTPUT_PORT, &[], 1).unwrap()[0];
        r.command(CMD_WRITE_OUTPUT_PORT, &[port], 0).unwrap();
        assert!(r.exit.taken().is_empty());
        r.command(CMD_WRITE_OUTPUT_PORT, &[port & !1], 0).unwrap();
        assert_eq!(r.exit.taken(), vec![GuestExit::Reset]);
    }

    #[test]
    fn command_byte_round_trips_and_self_tests_pass() {
        let mut r = Rig::new();
        r.command(CMD_WRITE_COMMAND_BYTE, &[0x47], 0).unwrap();
        assert_eq!(r.command(CMD_READ_COMMAND_BYTE, &[], 1).unwrap(), [0x47]);
        assert_eq!(r.command(CMD_SELF_TEST, &[], 1).unwrap(), [0x55]);
        assert_eq!(r.command(CMD_KBD_TEST, &[], 1).unwrap(), [0x00]);
        assert_eq!(r.command(CMD_WRITE_KBD_OUTPUT, &[0x99], 1).unwrap(), [0x99]);
        assert_eq!(r.status() & STATUS_OUTPUT_FULL, 0);
        assert!(r.exit.taken().is_empty());
    }

    #[test]
    fn flood_of_commands_keeps_bounded_output() {
        let mut r = Rig::new();
        for _ in 0..10_000 {
            r.dev.write(OFFSET_COMMAND, &[CMD_SELF_TEST]);
            r.dev.write(OFFSET_DATA, &[KBD_GET_ID]);
        }
        assert!(r.dev.controller_out.len() <= MAX_PENDING);
        assert!(r.dev.keyboard_out.len() <= MAX_PENDING);
        r.dev.write(OFFSET_COMMAND, &[]);
        r.dev.write(2, &[CMD_PULSE_RESET]);
        assert!(r.exit.taken().is_empty());
    }

    #[test]
    fn device_without_irq_line_still_answers() {
        let exit = Arc::new(RecordingExit::default());
        let mut d = I8042::new(exit);
        d.write(OFFSET_DATA, &[KBD_ECHO]);
        let mut b = [0u8];
        d.read(OFFSET_DATA, &mut b);
        assert_eq!(b[0], KBD_ECHO);
    }

    #[test]
    fn state_round_trips_with_bytes_waiting_and_hostile_state_is_refused() {
        let mut a = Rig::new();
        a.dev.write(OFFSET_COMMAND, &[0x60]); // the next data byte is the command byte
        a.dev.write(OFFSET_DATA, &[0x47]);
        a.dev.write(OFFSET_DATA, &[0xed]); // LEDs, waiting for its argument
        assert!(a.dev.send_ctrl_alt_del());
        let mut b = Rig::new();
        crate::persist::assert_round_trip(&a.dev, &mut b.dev);
        assert_eq!(a.read_data(), b.read_data());
        let mut bad = a.dev.save();
        bad.keyboard_out = vec![0; 1000];
        assert!(b.dev.restore(&bad).is_err());
        bad = a.dev.save();
        bad.kbd_set = 9;
        assert!(b.dev.restore(&bad).is_err());
    }
}
