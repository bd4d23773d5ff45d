//! The ACPI PM1a event/control block and reset register the FADT points at: how a guest
//! with ACPI powers off (SLP_TYP = S5 with SLP_EN) or resets (reset register), and the fixed
//! power button the host presses to ask it to shut down.
//!
//! The SCI is a level-triggered line: it is high exactly while some PM1 status bit is set
//! whose enable bit is set too (ACPI 6.4, 4.8.1.1), so it drops when the guest clears the
//! status bit (write 1 to clear) or disables the event.
//!
//! The block also holds GPE0 (general-purpose events, ACPI 6.4, 4.8.1.6): 16 status bits
//! (write 1 to clear) then 16 enable bits, which the guest's ACPI code maps to `\_GPE._Exx`
//! methods. The VMM raises a GPE (say, for PCI hotplug) with [`AcpiPm::raise_gpe`]; the SCI is
//! high while `(PM1 status & enable) | (GPE status & enable)` is non-zero.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::persist::{Persist, StateError};
use crate::{ExitSink, GuestExit, IrqLevel};

const PM1_STS: u64 = 0;
const PM1_EN: u64 = 2;
const PM1_CNT: u64 = 4;
const RESET_REG: u64 = 8;
/// Offset of GPE0_BLK from the start of the block (the DSDT/FADT put it at port 0x620 for a
/// block at 0x600): GPE0_STS (2 bytes) then GPE0_EN (2 bytes).
pub const GPE0_OFFSET: u64 = 0x20;
/// Bytes of GPE0_BLK.
pub const GPE0_LEN: u64 = 4;
/// Ports the whole block spans: PM1 event/control, reset register, then GPE0.
pub const BLOCK_LEN: u64 = GPE0_OFFSET + GPE0_LEN;
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
/// PM1_STS.PWRBTN_STS and PM1_EN.PWRBTN_EN.
const PWRBTN: u16 = 1 << 8;

/// The PM register block. Port layout and values come from the FADT the boot code writes.
pub struct AcpiPm {
    exit: Arc<dyn ExitSink>,
    sci: Option<Arc<dyn IrqLevel>>,
    sci_high: bool,
    s5_type: u16,
    reset_value: u8,
    status: u16,
    enable: u16,
    control: u16,
    gpe_status: u16,
    gpe_enable: u16,
}

impl AcpiPm {
    /// A block whose S5 sleep type and reset value match the guest's ACPI tables, with no SCI
    /// wired: events set status bits but interrupt no one.
    pub fn new(exit: Arc<dyn ExitSink>, s5_type: u16, reset_value: u8) -> Self {
        AcpiPm {
            exit,
            sci: None,
            sci_high: false,
            s5_type,
            reset_value,
            status: 0,
            enable: 0,
            control: SCI_EN,
            gpe_status: 0,
            gpe_enable: 0,
        }
    }

    /// Like [`AcpiPm::new`], raising `sci` (the FADT's SCI, a level-triggered line) while an
    /// enabled event is pending.
    pub fn with_sci(
        exit: Arc<dyn ExitSink>,
        sci: Arc<dyn IrqLevel>,
        s5_type: u16,
        reset_value: u8,
    ) -> Self {
        AcpiPm {
            sci: Some(sci),
            ..Self::new(exit, s5_type, reset_value)
        }
    }

    /// Presses the fixed power button: sets PWRBTN_STS. Returns whether the guest has the
    /// event enabled (PWRBTN_EN), i.e. whether an OSPM is listening and got an SCI.
    pub fn press_power_button(&mut self) -> bool {
        self.status |= PWRBTN;
        self.update_sci();
        self.enable & PWRBTN != 0
    }

    /// Sets general-purpose event `bit` (0-15) in GPE0_STS. Returns whether the guest has it
    /// enabled in GPE0_EN (then the SCI is high until the guest clears it); a bit outside the
    /// block is ignored and reported as not enabled.
    pub fn raise_gpe(&mut self, bit: u8) -> bool {
        let Some(mask) = 1u16.checked_shl(u32::from(bit)) else {
            return false;
        };
        self.gpe_status |= mask;
        self.update_sci();
        self.gpe_enable & mask != 0
    }

    /// Drives the SCI to the level the status and enable registers call for.
    fn update_sci(&mut self) {
        let want = (self.status & self.enable) | (self.gpe_status & self.gpe_enable) != 0;
        let Some(sci) = &self.sci else { return };
        if want == self.sci_high {
            return;
        }
        match sci.set_level(want) {
            Ok(()) => self.sci_high = want,
            // Left as it was: the next register access tries again.
            Err(e) => log::error!("ACPI PM: cannot set the SCI level to {want}: {e}"),
        }
    }

    fn write_control(&mut self, value: u16) {
        if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & 0x7 == self.s5_type {
            self.exit.guest_exit(GuestExit::PowerOff);
        }
        // SLP_EN is write-only; SCI_EN stays set (the machine is always in ACPI mode).
        self.control = (value & !SLP_EN) | SCI_EN;
    }
}

/// Replaces byte `i` (0 or 1) of `reg` with `b`.
fn with_byte(reg: u16, i: u64, b: u8) -> u16 {
    let mut bytes = reg.to_le_bytes();
    bytes[i as usize & 1] = b;
    u16::from_le_bytes(bytes)
}

impl AcpiPm {
    /// One byte of GPE0_BLK at `off` (0..4): status low/high, enable low/high.
    fn gpe_byte(&self, off: u64) -> u8 {
        let reg = if off < 2 {
            self.gpe_status
        } else {
            self.gpe_enable
        };
        reg.to_le_bytes()[off as usize & 1]
    }

    /// A byte write to GPE0_BLK at `off` (0..4). ACPICA accesses GPE registers a byte at a
    /// time; wider accesses arrive here byte by byte.
    fn write_gpe_byte(&mut self, off: u64, b: u8) {
        if off < 2 {
            self.gpe_status &= !(u16::from(b) << (8 * off)); // write 1 to clear
        } else {
            self.gpe_enable = with_byte(self.gpe_enable, off, b);
        }
    }
}

fn le_value(data: &[u8]) -> u16 {
    match data {
        [lo] => u16::from(*lo),
        [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
        [] => 0,
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= GPE0_OFFSET {
            for (i, b) in data.iter_mut().enumerate() {
                let off = (offset - GPE0_OFFSET).saturating_add(i as u64);
                *b = if off < GPE0_LEN {
                    self.gpe_byte(off)
                } else {
                    0
                };
            }
            return;
        }
        let reg = match offset {
            PM1_STS => self.status,
            PM1_EN => self.enable,
            PM1_CNT => self.control,
            _ => 0,
        };
        data.fill(0);
        for (i, b) in data.iter_mut().take(2).enumerate() {
            *b = reg.to_le_bytes()[i];
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= GPE0_OFFSET {
            for (i, b) in data.iter().enumerate() {
                let off = (offset - GPE0_OFFSET).saturating_add(i as u64);
                if off < GPE0_LEN {
                    self.write_gpe_byte(off, *b);
                }
            }
            self.update_sci();
            return;
        }
        let value = le_value(data);
        match offset {
            PM1_STS => {
                self.status &= !value; // write 1 to clear
                self.update_sci();
            }
            PM1_EN => {
                self.enable = value;
                self.update_sci();
            }
            PM1_CNT if data.len() >= 2 => self.write_control(value),
            // A byte write to the high half of PM1_CNT (where SLP_EN lives).
            5 => self.write_control((self.control & 0xff) | (value << 8)),
            RESET_REG if data.first() == Some(&self.reset_value) => {
                self.exit.guest_exit(GuestExit::Reset)
            }
            _ => {}
        }
    }
}

/// The PM1 registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    /// PM1_STS.
    pub status: u16,
    /// PM1_EN.
    pub enable: u16,
    /// PM1_CNT.
    pub control: u16,
    /// GPE0_STS (absent from snapshots taken before GPE0 existed: then 0).
    #[serde(default)]
    pub gpe_status: u16,
    /// GPE0_EN (absent from older snapshots: then 0).
    #[serde(default)]
    pub gpe_enable: u16,
}

impl Persist for AcpiPm {
    type State = AcpiPmState;

    fn save(&self) -> AcpiPmState {
        AcpiPmState {
            status: self.status,
            enable: self.enable,
            control: self.control,
            gpe_status: self.gpe_status,
            gpe_enable: self.gpe_enable,
        }
    }

    fn restore(&mut self, s: &AcpiPmState) -> Result<(), StateError> {
        self.status = s.status;
        self.enable = s.enable;
        self.control = s.control | SCI_EN;
        self.gpe_status = s.gpe_status;
        self.gpe_enable = s.gpe_enable;
        self.update_sci();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{RecordingExit, RecordingLevel};

    fn dev_with_sci() -> (AcpiPm, Arc<RecordingLevel>) {
        let sci = Arc::new(RecordingLevel::default());
        let pm = AcpiPm::with_sci(Arc::new(RecordingExit::default()), sci.clone(), 5, 1);
        (pm, sci)
    }

    fn read16(pm: &mut AcpiPm, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        pm.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn power_button_with_event_enabled_raises_sci_until_status_is_cleared() {
        let (mut pm, sci) = dev_with_sci();
        pm.write(PM1_EN, &PWRBTN.to_le_bytes());
        assert!(pm.press_power_button());
        assert_eq!(read16(&mut pm, PM1_STS) & PWRBTN, PWRBTN);
        assert!(sci.is_high());
        pm.write(PM1_STS, &PWRBTN.to_le_bytes());
        assert_eq!(read16(&mut pm, PM1_STS) & PWRBTN, 0);
        assert_eq!(sci.levels(), vec![true, false]);
    }

    #[test]
    fn power_button_with_event_disabled_sets_status_but_no_sci() {
        let (mut pm, sci) = dev_with_sci();
        assert!(!pm.press_power_button());
        assert_eq!(read16(&mut pm, PM1_STS), PWRBTN);
        assert!(sci.levels().is_empty());
    }

    #[test]
    fn enabling_a_pending_event_raises_sci_and_disabling_it_lowers_it() {
        let (mut pm, sci) = dev_with_sci();
        pm.press_power_button();
        pm.write(PM1_EN, &PWRBTN.to_le_bytes());
        assert!(sci.is_high());
        pm.write(PM1_EN, &0u16.to_le_bytes());
        assert_eq!(sci.levels(), vec![true, false]);
    }

    #[test]
    fn writing_zero_or_other_bits_to_status_keeps_the_sci_asserted() {
        let (mut pm, sci) = dev_with_sci();
        pm.write(PM1_EN, &PWRBTN.to_le_bytes());
        pm.press_power_button();
        pm.write(PM1_STS, &0u16.to_le_bytes());
        pm.write(PM1_STS, &0x0001u16.to_le_bytes());
        pm.press_power_button();
        assert_eq!(sci.levels(), vec![true]);
    }

    #[test]
    fn enable_register_reads_back_what_the_guest_wrote() {
        let (mut pm, _) = dev_with_sci();
        pm.write(PM1_EN, &(PWRBTN | 1 << 5).to_le_bytes());
        assert_eq!(read16(&mut pm, PM1_EN), PWRBTN | 1 << 5);
    }

    /// A line whose first `fail` level changes fail.
    struct FlakyLevel {
        fail: std::sync::atomic::AtomicUsize,
        inner: RecordingLevel,
    }

    impl IrqLevel for FlakyLevel {
        fn set_level(&self, high: bool) -> std::io::Result<()> {
            use std::sync::atomic::Ordering;
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err(std::io::Error::other("injected"));
            }
            self.inner.set_level(high)
        }
    }

    #[test]
    fn failed_sci_change_is_retried_on_the_next_register_access() {
        let sci = Arc::new(FlakyLevel {
            fail: 1.into(),
            inner: RecordingLevel::default(),
        });
        let mut pm = AcpiPm::with_sci(Arc::new(RecordingExit::default()), sci.clone(), 5, 1);
        pm.write(PM1_EN, &PWRBTN.to_le_bytes());
        pm.press_power_button();
        assert!(sci.inner.levels().is_empty());
        pm.write(PM1_EN, &PWRBTN.to_le_bytes());
        assert_eq!(sci.inner.levels(), vec![true]);
    }

    #[test]
    fn power_button_without_sci_line_only_sets_status() {
        let (mut pm, _) = dev();
        pm.write(PM1_EN, &PWRBTN.to_le_bytes());
        assert!(pm.press_power_button());
        assert_eq!(read16(&mut pm, PM1_STS), PWRBTN);
    }

    fn dev() -> (AcpiPm, Arc<RecordingExit>) {
        let sink = Arc::new(RecordingExit::default());
        (AcpiPm::new(sink.clone(), 5, 1), sink)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut pm, sink) = dev();
        pm.write(PM1_CNT, &((5 << 10) | SLP_EN).to_le_bytes());
        assert_eq!(sink.taken(), vec![GuestExit::PowerOff]);
    }

    #[test]
    fn other_sleep_states_or_missing_slp_en_do_nothing() {
        let (mut pm, sink) = dev();
        pm.write(PM1_CNT, &(5u16 << 10).to_le_bytes());
        pm.write(PM1_CNT, &((3 << 10) | SLP_EN).to_le_bytes());
        assert!(sink.taken().is_empty());
    }

    #[test]
    fn sci_en_reads_set_so_the_guest_sees_acpi_mode() {
        let (mut pm, _) = dev();
        pm.write(PM1_CNT, &0u16.to_le_bytes());
        let mut b = [0u8; 2];
        pm.read(PM1_CNT, &mut b);
        assert_eq!(u16::from_le_bytes(b) & SCI_EN, SCI_EN);
    }

    #[test]
    fn reset_register_resets_only_with_the_reset_value() {
        let (mut pm, sink) = dev();
        pm.write(RESET_REG, &[2]);
        assert!(sink.taken().is_empty());
        pm.write(RESET_REG, &[1]);
        assert_eq!(sink.taken(), vec![GuestExit::Reset]);
    }

    #[test]
    fn status_bits_are_write_one_to_clear() {
        let (mut pm, _) = dev();
        pm.status = 0x8001;
        pm.write(PM1_STS, &0x0001u16.to_le_bytes());
        assert_eq!(pm.status, 0x8000);
    }

    #[test]
    fn state_round_trips_and_a_pending_power_button_raises_the_sci_again() {
        let (mut a, _) = dev_with_sci();
        a.write(PM1_EN, &PWRBTN.to_le_bytes());
        assert!(a.press_power_button());
        let (mut b, sci_b) = dev_with_sci();
        crate::persist::assert_round_trip(&a, &mut b);
        assert!(sci_b.is_high());
    }

    const GPE_STS: u64 = GPE0_OFFSET;
    const GPE_EN: u64 = GPE0_OFFSET + 2;

    #[test]
    fn enabled_gpe_raises_sci_until_the_guest_clears_its_status() {
        let (mut pm, sci) = dev_with_sci();
        pm.write(GPE_EN, &[0b10]);
        assert!(pm.raise_gpe(1));
        assert!(sci.is_high());
        assert_eq!(read16(&mut pm, GPE_STS), 0b10);
        pm.write(GPE_STS, &[0b10]);
        assert_eq!(read16(&mut pm, GPE_STS), 0);
        assert_eq!(sci.levels(), vec![true, false]);
    }

    #[test]
    fn disabled_gpe_sets_status_without_sci_until_enabled() {
        let (mut pm, sci) = dev_with_sci();
        assert!(!pm.raise_gpe(2));
        assert!(sci.levels().is_empty());
        pm.write(GPE_EN, &[0b100]);
        assert_eq!(sci.levels(), vec![true]);
        pm.write(GPE_EN, &[0]);
        assert_eq!(sci.levels(), vec![true, false]);
    }

    #[test]
    fn gpe_status_is_write_one_to_clear_per_byte_and_word() {
        let (mut pm, _) = dev();
        pm.raise_gpe(1);
        pm.raise_gpe(9);
        pm.write(GPE_STS, &[0]);
        assert_eq!(read16(&mut pm, GPE_STS), 0x0202);
        pm.write(GPE_STS + 1, &[0x02]);
        assert_eq!(read16(&mut pm, GPE_STS), 0x0002);
        pm.raise_gpe(15);
        pm.write(GPE_STS, &0x8002u16.to_le_bytes());
        assert_eq!(read16(&mut pm, GPE_STS), 0);
    }

    #[test]
    fn gpe_sci_and_pm1_sci_share_the_line() {
        let (mut pm, sci) = dev_with_sci();
        pm.write(PM1_EN, &PWRBTN.to_le_bytes());
        pm.write(GPE_EN, &[0b10]);
        pm.press_power_button();
        pm.raise_gpe(1);
        pm.write(PM1_STS, &PWRBTN.to_le_bytes());
        assert!(sci.is_high(), "the GPE still holds the line");
        pm.write(GPE_STS, &[0b10]);
        assert_eq!(sci.levels(), vec![true, false]);
    }

    #[test]
    fn gpe_enable_bytes_read_back_and_odd_accesses_stay_in_the_block() {
        let (mut pm, _) = dev();
        pm.write(GPE_EN + 1, &[0x80]);
        pm.write(GPE_EN, &[0x01]);
        assert_eq!(read16(&mut pm, GPE_EN), 0x8001);
        let mut four = [0xffu8; 4];
        pm.read(GPE_STS, &mut four);
        assert_eq!(four, [0, 0, 0x01, 0x80]);
        // Past the block: ignored on write, zero on read, never a panic.
        pm.write(GPE_EN + 1, &[1, 2, 3, 4, 5, 6, 7, 8]);
        pm.write(u64::MAX, &[0xff; 8]);
        let mut eight = [0xffu8; 8];
        pm.read(GPE_EN, &mut eight);
        assert_eq!(eight, [0x01, 1, 0, 0, 0, 0, 0, 0]);
        pm.read(u64::MAX, &mut eight);
        assert_eq!(eight, [0; 8]);
    }

    #[test]
    fn raising_a_gpe_outside_the_block_is_ignored() {
        let (mut pm, sci) = dev_with_sci();
        pm.write(GPE_EN, &[0xff, 0xff]);
        assert!(!pm.raise_gpe(16));
        assert!(!pm.raise_gpe(255));
        assert_eq!(read16(&mut pm, GPE_STS), 0);
        assert!(sci.levels().is_empty());
    }

    #[test]
    fn gpe_state_round_trips_and_a_pending_gpe_raises_the_sci_again() {
        let (mut a, _) = dev_with_sci();
        a.write(GPE_EN, &[0b10]);
        a.raise_gpe(1);
        let (mut b, sci_b) = dev_with_sci();
        crate::persist::assert_round_trip(&a, &mut b);
        assert!(sci_b.is_high());
        assert_eq!(read16(&mut b, GPE_EN), 0b10);
    }

    #[test]
    fn state_without_gpe_fields_loads_with_gpe_cleared() {
        let s: AcpiPmState =
            serde_json::from_str(r#"{"status":256,"enable":256,"control":1}"#).unwrap();
        assert_eq!((s.gpe_status, s.gpe_enable), (0, 0));
    }
}
