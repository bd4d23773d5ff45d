//! The ACPI PM1a event/control block and reset register the FADT points at: how a guest
//! with ACPI powers off (SLP_TYP = S5 with SLP_EN) or resets (reset register), and the fixed
//! power button the host presses to ask it to shut down.
//!
//! The SCI is a level-triggered line: it is high exactly while some PM1 status bit is set
//! whose enable bit is set too (ACPI 6.4, 4.8.1.1), so it drops when the guest clears the
//! status bit (write 1 to clear) or disables the event.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::persist::{Persist, StateError};
use crate::{ExitSink, GuestExit, IrqLevel};

const PM1_STS: u64 = 0;
const PM1_EN: u64 = 2;
const PM1_CNT: u64 = 4;
const RESET_REG: u64 = 8;
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

    /// Drives the SCI to the level the status and enable registers call for.
    fn update_sci(&mut self) {
        let want = self.status & self.enable != 0;
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

fn le_value(data: &[u8]) -> u16 {
    match data {
        [lo] => u16::from(*lo),
        [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
        [] => 0,
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
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
}

impl Persist for AcpiPm {
    type State = AcpiPmState;

    fn save(&self) -> AcpiPmState {
        AcpiPmState {
            status: self.status,
            enable: self.enable,
            control: self.control,
        }
    }

    fn restore(&mut self, s: &AcpiPmState) -> Result<(), StateError> {
        self.status = s.status;
        self.enable = s.enable;
        self.control = s.control | SCI_EN;
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
}
