//! The ACPI PM1a event/control block and reset register the FADT points at: how a guest
//! with ACPI powers off (SLP_TYP = S5 with SLP_EN) or resets (reset register).

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{ExitSink, GuestExit};

const PM1_STS: u64 = 0;
const PM1_EN: u64 = 2;
const PM1_CNT: u64 = 4;
const RESET_REG: u64 = 8;
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;

/// The PM register block. Port layout and values come from the FADT the boot code writes.
pub struct AcpiPm {
    exit: Arc<dyn ExitSink>,
    s5_type: u16,
    reset_value: u8,
    status: u16,
    enable: u16,
    control: u16,
}

impl AcpiPm {
    /// A block whose S5 sleep type and reset value match the guest's ACPI tables.
    pub fn new(exit: Arc<dyn ExitSink>, s5_type: u16, reset_value: u8) -> Self {
        AcpiPm {
            exit,
            s5_type,
            reset_value,
            status: 0,
            enable: 0,
            control: SCI_EN,
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
            PM1_STS => self.status &= !value, // write 1 to clear
            PM1_EN => self.enable = value,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordingExit;

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
}
