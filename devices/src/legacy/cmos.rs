//! The MC146818 CMOS RTC at ports 0x70/0x71: the wall-clock time (UTC) Linux reads at boot,
//! never "update in progress", plus the 128 bytes of CMOS RAM.

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::persist::{Persist, StateError};

/// Index port; the data port follows it.
pub const CMOS_PORT: u16 = 0x70;
/// Ports the device spans.
pub const CMOS_LEN: u16 = 2;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = 0x32;
const REG_B_BINARY: u8 = 0x04;
const REG_B_24H: u8 = 0x02;

/// Source of the current time, in seconds since the Unix epoch.
pub type Clock = Box<dyn Fn() -> i64 + Send>;

/// The RTC.
pub struct Cmos {
    index: usize,
    ram: [u8; 128],
    clock: Clock,
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

impl Cmos {
    /// An RTC reading time from `clock`.
    pub fn new(clock: Clock) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A] = 0x26; // 32.768 kHz base, 1024 Hz rate, UIP clear
        ram[REG_B] = REG_B_24H;
        ram[REG_D] = 0x80; // RAM and time valid
        Cmos {
            index: 0,
            ram,
            clock,
        }
    }

    /// An RTC on the host's clock.
    pub fn with_system_clock() -> Self {
        Self::new(Box::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        }))
    }

    fn time_register(&self, reg: usize) -> Option<u8> {
        let now = (self.clock)();
        let (days, secs) = (now.div_euclid(86_400), now.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        let value = match reg {
            SECONDS => (secs % 60) as u8,
            MINUTES => (secs / 60 % 60) as u8,
            HOURS => (secs / 3600) as u8,
            WEEKDAY => (days + 4).rem_euclid(7) as u8 + 1,
            DAY => day,
            MONTH => month,
            YEAR => year.rem_euclid(100) as u8,
            CENTURY => year.div_euclid(100).clamp(0, 99) as u8,
            _ => return None,
        };
        Some(if self.ram[REG_B] & REG_B_BINARY != 0 {
            value
        } else {
            bcd(value)
        })
    }

    fn read_data(&self) -> u8 {
        match self.index {
            REG_A => self.ram[REG_A] & 0x7f,
            REG_C => 0,
            REG_D => 0x80,
            i => self.time_register(i).unwrap_or(self.ram[i]),
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index as u8,
            1 => self.read_data(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index is the NMI mask, not part of the index.
            0 => self.index = usize::from(value & 0x7f),
            1 => match self.index {
                REG_C | REG_D => {}
                i if self.time_register(i).is_some() => {} // the clock is the host's
                i => self.ram[i] = value,
            },
            _ => {}
        }
    }
}

/// The RTC's index register and NVRAM (time registers are read from the host clock).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// The selected register.
    pub index: u8,
    /// The 128 bytes of NVRAM.
    pub ram: Vec<u8>,
}

impl Persist for Cmos {
    type State = CmosState;

    fn save(&self) -> CmosState {
        CmosState {
            index: self.index as u8,
            ram: self.ram.to_vec(),
        }
    }

    fn restore(&mut self, s: &CmosState) -> Result<(), StateError> {
        let ram: [u8; 128] = s.ram.as_slice().try_into().map_err(|_| {
            StateError::new("cmos", format!("{} bytes of NVRAM, not 128", s.ram.len()))
        })?;
        self.index = usize::from(s.index & 0x7f);
        self.ram = ram;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    /// 2024-02-29 13:45:56 UTC, a Thursday.
    const LEAP_DAY: i64 = 1_709_214_356;

    #[test]
    fn time_reads_in_bcd_by_default() {
        let mut c = Cmos::new(Box::new(|| LEAP_DAY));
        assert_eq!(read(&mut c, SECONDS as u8), 0x56);
        assert_eq!(read(&mut c, MINUTES as u8), 0x45);
        assert_eq!(read(&mut c, HOURS as u8), 0x13);
        assert_eq!(read(&mut c, DAY as u8), 0x29);
        assert_eq!(read(&mut c, MONTH as u8), 0x02);
        assert_eq!(read(&mut c, YEAR as u8), 0x24);
        assert_eq!(read(&mut c, CENTURY as u8), 0x20);
        assert_eq!(read(&mut c, WEEKDAY as u8), 5);
    }

    #[test]
    fn binary_mode_and_nmi_bit_in_index() {
        let mut c = Cmos::new(Box::new(|| LEAP_DAY));
        c.write(0, &[0x80 | REG_B as u8]);
        c.write(1, &[REG_B_24H | REG_B_BINARY]);
        assert_eq!(read(&mut c, 0x80 | DAY as u8), 29);
    }

    #[test]
    fn update_in_progress_is_never_set() {
        let mut c = Cmos::new(Box::new(|| 0));
        c.write(0, &[REG_A as u8]);
        c.write(1, &[0xff]);
        assert_eq!(read(&mut c, REG_A as u8) & 0x80, 0);
    }

    #[test]
    fn ram_bytes_round_trip() {
        let mut c = Cmos::new(Box::new(|| 0));
        c.write(0, &[0x40]);
        c.write(1, &[0xab]);
        assert_eq!(read(&mut c, 0x40), 0xab);
    }

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(10_957), (2000, 1, 1));
    }

    #[test]
    fn state_round_trips_and_short_nvram_is_refused() {
        let mut a = Cmos::new(Box::new(|| LEAP_DAY));
        a.write(0, &[0x40]);
        a.write(1, &[0x99]);
        let mut b = Cmos::new(Box::new(|| LEAP_DAY));
        crate::persist::assert_round_trip(&a, &mut b);
        assert_eq!(read(&mut b, 0x40), 0x99);
        let bad = CmosState {
            index: 0,
            ram: vec![0; 3],
        };
        assert!(b.restore(&bad).is_err());
    }
}
