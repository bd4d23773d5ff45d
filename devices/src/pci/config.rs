//! The configuration space of one PCI function (header type 0): identity registers, the
//! command register, memory BARs with the sizing protocol, the capability list, and the
//! interrupt line scratch byte. Every register bit the guest may change is in a write
//! mask; everything else is read-only, so no write at any offset or width can change the
//! function's identity, its BAR sizes or the capability chain.

use serde::{Deserialize, Serialize};

use crate::persist::StateError;

/// Bytes of the conventional configuration space (what this model holds; the extended
/// space an ECAM window reaches reads as zero).
pub const CONFIG_SIZE: usize = 256;
/// Dwords of the conventional configuration space.
const DWORDS: usize = CONFIG_SIZE / 4;
/// Offset of the first BAR.
pub const BAR0: usize = 0x10;
/// Number of BARs of a header type 0 function.
pub const BAR_COUNT: usize = 6;
/// Offset of the command register.
pub const COMMAND: usize = 0x04;
/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register bits the guest may change: I/O and memory decoding, bus master, parity
/// and SERR# response, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0547;
/// Status register: a capability list exists.
const STATUS_CAP_LIST: u32 = 1 << 4;
/// Offset of the capabilities pointer.
const CAP_POINTER: usize = 0x34;
/// Where capabilities start (after the standard header).
const FIRST_CAP: usize = 0x40;
/// Offset of the interrupt line (byte) and pin (byte).
const INTERRUPT: usize = 0x3c;

/// Identity of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code: base class, subclass, programming interface (0xBBSSPP).
    pub class: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// A memory BAR's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// A 32-bit memory BAR.
    Memory32,
    /// A 64-bit memory BAR (it takes two BAR slots).
    Memory64,
}

/// A BAR this function implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bar {
    len: u64,
    kind: BarKind,
}

/// Why a function cannot be laid out as asked (a bug in the device model, not the guest).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciConfigError {
    /// A BAR index past the last, a 64-bit BAR in the last slot, or a slot taken.
    #[error("BAR {0} cannot be placed")]
    BarSlot(usize),
    /// A BAR size that is not a power of two of at least 16 bytes (4 GiB at most for a
    /// 32-bit BAR).
    #[error("BAR size {0:#x} is not a valid BAR size")]
    BarSize(u64),
    /// The capabilities do not fit in the configuration space.
    #[error("no room for a {0}-byte capability")]
    CapabilityRoom(usize),
}

/// A memory range a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    /// First guest physical address.
    pub addr: u64,
    /// Length in bytes (the BAR's size).
    pub len: u64,
}

/// The configuration space of one function.
#[derive(Clone, Debug)]
pub struct PciConfig {
    regs: [u32; DWORDS],
    /// Bits the guest may write.
    wmask: [u32; DWORDS],
    bars: [Option<Bar>; BAR_COUNT],
    /// Where the next capability goes.
    next_cap: usize,
    /// Offset of the pointer byte the next capability is linked from.
    last_link: usize,
}

/// The registers of a function, as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    /// The 64 dwords of the conventional configuration space.
    pub regs: Vec<u32>,
}

impl PciConfig {
    /// A function with these identity registers, no BARs and no capabilities.
    pub fn new(ids: PciIds) -> Self {
        let mut c = PciConfig {
            regs: [0; DWORDS],
            wmask: [0; DWORDS],
            bars: [None; BAR_COUNT],
            next_cap: FIRST_CAP,
            last_link: CAP_POINTER,
        };
        c.regs[0] = u32::from(ids.vendor) | u32::from(ids.device) << 16;
        c.regs[2] = u32::from(ids.revision) | (ids.class & 0x00ff_ffff) << 8;
        c.regs[0x2c / 4] = u32::from(ids.subsystem_vendor) | u32::from(ids.subsystem) << 16;
        c.wmask[COMMAND / 4] = COMMAND_WRITABLE;
        // Cache line size and latency timer are scratch registers.
        c.wmask[0x0c / 4] = 0x0000_ffff;
        // Interrupt line is a scratch byte; the pin (0: no INTx) is read-only.
        c.wmask[INTERRUPT / 4] = 0x0000_00ff;
        c
    }

    /// Declares memory BAR `index` of `len` bytes (a power of two) at `addr` (as firmware
    /// would have placed it; 0 to leave it unassigned). A 64-bit BAR also takes
    /// `index + 1`.
    pub fn add_bar(
        &mut self,
        index: usize,
        len: u64,
        kind: BarKind,
        addr: u64,
    ) -> Result<(), PciConfigError> {
        let slots = match kind {
            BarKind::Memory32 => 1,
            BarKind::Memory64 => 2,
        };
        let free = |i: usize| i < BAR_COUNT && self.bars[i].is_none() && !self.is_upper_half(i);
        if !(index..index + slots).all(free) {
            return Err(PciConfigError::BarSlot(index));
        }
        let max = match kind {
            BarKind::Memory32 => 1 << 32,
            BarKind::Memory64 => 1 << 63,
        };
        if !len.is_power_of_two() || len < 16 || len > max {
            return Err(PciConfigError::BarSize(len));
        }
        let mask = !(len - 1);
        let reg = BAR0 / 4 + index;
        let type_bits = match kind {
            BarKind::Memory32 => 0,
            BarKind::Memory64 => 0b100,
        };
        self.regs[reg] = (addr as u32 & mask as u32) | type_bits;
        self.wmask[reg] = mask as u32 & !0xf;
        if kind == BarKind::Memory64 {
            self.regs[reg + 1] = ((addr & mask) >> 32) as u32;
            self.wmask[reg + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(Bar { len, kind });
        Ok(())
    }

    /// Whether BAR slot `i` holds the upper half of a 64-bit BAR.
    fn is_upper_half(&self, i: usize) -> bool {
        i > 0 && matches!(self.bars[i - 1], Some(b) if b.kind == BarKind::Memory64)
    }

    /// Appends a capability: `bytes[0]` is its ID, `bytes[1]` (the next pointer) is filled
    /// in here; the bits set in `writable` (same length) are the guest's to change. Returns
    /// the capability's offset.
    pub fn add_capability(
        &mut self,
        bytes: &[u8],
        writable: &[u8],
    ) -> Result<usize, PciConfigError> {
        let at = self.next_cap;
        let len = bytes.len();
        if len < 2 || writable.len() != len || at + len > CONFIG_SIZE {
            return Err(PciConfigError::CapabilityRoom(len));
        }
        for (i, (b, w)) in bytes.iter().zip(writable).enumerate() {
            let v = if i == 1 { 0 } else { *b };
            self.set_byte(at + i, v);
            // The ID and the next pointer are never writable.
            let w = if i < 2 { 0 } else { *w };
            self.set_mask_byte(at + i, w);
        }
        self.set_byte(self.last_link, at as u8);
        self.last_link = at + 1;
        self.next_cap = (at + len).next_multiple_of(4);
        self.regs[COMMAND / 4] |= STATUS_CAP_LIST << 16;
        Ok(at)
    }

    fn set_byte(&mut self, at: usize, v: u8) {
        let shift = (at % 4) * 8;
        let r = &mut self.regs[at / 4];
        *r = (*r & !(0xff << shift)) | u32::from(v) << shift;
    }

    fn set_mask_byte(&mut self, at: usize, v: u8) {
        let shift = (at % 4) * 8;
        let r = &mut self.wmask[at / 4];
        *r = (*r & !(0xff << shift)) | u32::from(v) << shift;
    }

    /// Sets bytes of the space directly, whatever the write mask (for the device model's
    /// own registers inside its capabilities).
    pub fn set_bytes(&mut self, at: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            if at + i < CONFIG_SIZE {
                self.set_byte(at + i, *b);
            }
        }
    }

    /// `len` bytes at `at` (as a little-endian value), whatever their width; bytes past
    /// the space read as zero.
    pub fn get(&self, at: usize, len: usize) -> u64 {
        (0..len.min(8)).fold(0, |v, i| {
            let b = self.byte(at + i);
            v | u64::from(b) << (8 * i)
        })
    }

    fn byte(&self, at: usize) -> u8 {
        if at >= CONFIG_SIZE {
            return 0;
        }
        (self.regs[at / 4] >> ((at % 4) * 8)) as u8
    }

    /// A guest read of `data.len()` bytes at `offset`: 1, 2 or 4 bytes within one dword
    /// (other accesses read all-ones, as an aborted access would); the extended space
    /// (256 to 4095) reads as zero.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        if !valid_access(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.byte(offset + i);
        }
    }

    /// A guest write: only the bits of the write mask change; accesses [`Self::read`]
    /// would refuse are dropped. Returns whether the write changed anything.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> bool {
        if !valid_access(offset, data.len()) || offset >= CONFIG_SIZE {
            return false;
        }
        let shift = (offset % 4) * 8;
        let mut value = 0u32;
        let mut lanes = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << (shift + 8 * i);
            lanes |= 0xff << (shift + 8 * i);
        }
        let reg = offset / 4;
        let mask = self.wmask[reg] & lanes;
        let old = self.regs[reg];
        self.regs[reg] = (old & !mask) | (value & mask);
        self.regs[reg] != old
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[COMMAND / 4] as u16
    }

    /// The address BAR `index` holds now (whether decoding is on or not); None for a BAR
    /// this function does not implement.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let reg = BAR0 / 4 + index;
        let low = u64::from(self.regs[reg] & !0xf);
        Some(match bar.kind {
            BarKind::Memory32 => low,
            BarKind::Memory64 => low | u64::from(self.regs[reg + 1]) << 32,
        })
    }

    /// The size of BAR `index`.
    pub fn bar_len(&self, index: usize) -> Option<u64> {
        self.bars.get(index).copied().flatten().map(|b| b.len)
    }

    /// Where each BAR decodes now: memory decoding on and an address assigned (not 0,
    /// not wrapping). Indexed by BAR number; None for BARs that decode nothing.
    pub fn bar_regions(&self) -> [Option<BarRegion>; BAR_COUNT] {
        let mut out = [None; BAR_COUNT];
        if self.command() & COMMAND_MEMORY == 0 {
            return out;
        }
        for (i, slot) in out.iter_mut().enumerate() {
            let (Some(addr), Some(len)) = (self.bar_address(i), self.bar_len(i)) else {
                continue;
            };
            if addr != 0 && addr.checked_add(len).is_some() {
                *slot = Some(BarRegion { addr, len });
            }
        }
        out
    }

    /// The registers, to save.
    pub fn save(&self) -> PciConfigState {
        PciConfigState {
            regs: self.regs.to_vec(),
        }
    }

    /// Puts back saved registers; only the bits the guest could have written are taken,
    /// so a state file cannot change the function's identity or layout.
    pub fn restore(&mut self, st: &PciConfigState) -> Result<(), StateError> {
        if st.regs.len() != DWORDS {
            return Err(StateError::new(
                "pci",
                format!("{} configuration dwords for {DWORDS}", st.regs.len()),
            ));
        }
        for ((r, m), s) in self.regs.iter_mut().zip(&self.wmask).zip(&st.regs) {
            *r = (*r & !m) | (s & m);
        }
        Ok(())
    }
}

/// 1, 2 or 4 bytes, naturally aligned, inside the 4 KiB a function has.
pub fn valid_access(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len) && offset + len <= 4096
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_80_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        }
    }

    fn rd(c: &PciConfig, off: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn wr(c: &mut PciConfig, off: usize, len: usize, v: u32) {
        c.write(off, &v.to_le_bytes()[..len]);
    }

    #[test]
    fn identity_registers_read_as_given() {
        let c = PciConfig::new(ids());
        assert_eq!(rd(&c, 0, 4), 0x1042_1af4);
        assert_eq!(rd(&c, 2, 2), 0x1042);
        assert_eq!(rd(&c, 8, 4), 0x0180_0001);
        assert_eq!(rd(&c, 0x0e, 1), 0, "header type 0, single function");
        assert_eq!(rd(&c, 0x2c, 4), 0x1100_1af4);
        assert_eq!(rd(&c, 0x3d, 1), 0, "no INTx pin");
    }

    #[test]
    fn a_64_bit_bar_sizes_and_moves_as_the_sizing_protocol_says() {
        let mut c = PciConfig::new(ids());
        c.add_bar(0, 0x8000, BarKind::Memory64, 0x1_0000_0000)
            .unwrap();
        assert_eq!(rd(&c, 0x10, 4), 0x4, "64-bit memory, not prefetchable");
        assert_eq!(rd(&c, 0x14, 4), 1);

        wr(&mut c, 0x10, 4, 0xffff_ffff);
        wr(&mut c, 0x14, 4, 0xffff_ffff);
        let size = u64::from(rd(&c, 0x10, 4) & !0xf) | u64::from(rd(&c, 0x14, 4)) << 32;
        assert_eq!(!size + 1, 0x8000);

        wr(&mut c, 0x10, 4, 0xe000_1234);
        wr(&mut c, 0x14, 4, 0x2);
        assert_eq!(c.bar_address(0), Some(0x2_e000_0000));
        assert_eq!(c.bar_regions(), [None; 6], "memory decoding is off");
        wr(&mut c, COMMAND, 2, u32::from(COMMAND_MEMORY));
        assert_eq!(
            c.bar_regions()[0],
            Some(BarRegion {
                addr: 0x2_e000_0000,
                len: 0x8000
            })
        );
    }

    #[test]
    fn unimplemented_bars_and_the_rom_bar_read_zero_after_sizing() {
        let mut c = PciConfig::new(ids());
        c.add_bar(0, 0x1000, BarKind::Memory32, 0).unwrap();
        for off in [0x14, 0x18, 0x1c, 0x20, 0x24, 0x30] {
            wr(&mut c, off, 4, 0xffff_ffff);
            assert_eq!(rd(&c, off, 4), 0, "{off:#x}");
        }
        wr(&mut c, 0x10, 4, 0xffff_ffff);
        assert_eq!(rd(&c, 0x10, 4), 0xffff_f000);
    }

    #[test]
    fn bars_cannot_overlap_slots_or_have_odd_sizes() {
        let mut c = PciConfig::new(ids());
        assert_eq!(
            c.add_bar(5, 0x1000, BarKind::Memory64, 0),
            Err(PciConfigError::BarSlot(5))
        );
        c.add_bar(0, 0x1000, BarKind::Memory64, 0).unwrap();
        assert_eq!(
            c.add_bar(1, 0x1000, BarKind::Memory32, 0),
            Err(PciConfigError::BarSlot(1))
        );
        assert_eq!(
            c.add_bar(2, 0x1800, BarKind::Memory32, 0),
            Err(PciConfigError::BarSize(0x1800))
        );
        assert_eq!(
            c.add_bar(2, 1 << 33, BarKind::Memory32, 0),
            Err(PciConfigError::BarSize(1 << 33))
        );
    }

    #[test]
    fn capabilities_chain_from_the_pointer_and_keep_their_ids() {
        let mut c = PciConfig::new(ids());
        let a = c.add_capability(&[0x11, 0xff, 1, 2], &[0xff; 4]).unwrap();
        let b = c.add_capability(&[0x09, 0, 16, 1, 0, 0], &[0; 6]).unwrap();
        assert_eq!(rd(&c, 6, 2) & 0x10, 0x10, "capability list bit");
        assert_eq!(rd(&c, 0x34, 1), a as u32);
        assert_eq!(rd(&c, a + 1, 1), b as u32);
        assert_eq!(rd(&c, b + 1, 1), 0);
        wr(&mut c, a, 2, 0xffff);
        assert_eq!(rd(&c, a, 2), u32::from(0x11u16 | (b as u16) << 8));
        wr(&mut c, a + 2, 1, 0x55);
        assert_eq!(rd(&c, a + 2, 1), 0x55);
    }

    #[test]
    fn writes_at_every_offset_and_width_change_only_writable_bits() {
        let mut c = PciConfig::new(ids());
        c.add_bar(0, 0x8000, BarKind::Memory64, 0xd000_0000)
            .unwrap();
        c.add_capability(&[0x11, 0, 0, 0], &[0, 0, 0, 0xc0])
            .unwrap();
        let before = c.clone();
        for width in [1usize, 2, 4, 3, 8] {
            for off in 0..4096 {
                let data = vec![0xffu8; width];
                c.write(off, &data);
                let mut back = vec![0u8; width];
                c.read(off, &mut back);
            }
        }
        for (i, (now, was)) in c.regs.iter().zip(&before.regs).enumerate() {
            assert_eq!(now & !c.wmask[i], was & !c.wmask[i], "dword {i:#x}");
        }
        assert_eq!(rd(&c, 0, 4), 0x1042_1af4);
    }

    #[test]
    fn misaligned_or_odd_width_accesses_read_all_ones_and_write_nothing() {
        let mut c = PciConfig::new(ids());
        let mut b = [0u8; 2];
        c.read(1, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        let mut b = [0u8; 8];
        c.read(0, &mut b);
        assert_eq!(b, [0xff; 8]);
        assert!(!c.write(0x3d, &[1, 1]));
        assert!(!c.write(4, &[0xff; 3]));
        assert_eq!(c.command(), 0);
    }

    #[test]
    fn the_extended_space_reads_zero() {
        let c = PciConfig::new(ids());
        assert_eq!(rd(&c, 0x100, 4), 0);
        assert_eq!(rd(&c, 0xffc, 4), 0);
    }

    #[test]
    fn a_restore_takes_only_writable_bits() {
        let mut a = PciConfig::new(ids());
        a.add_bar(0, 0x8000, BarKind::Memory64, 0).unwrap();
        wr(&mut a, 0x10, 4, 0xe000_0000);
        wr(&mut a, COMMAND, 2, 0x6);
        let mut st = a.save();
        st.regs[0] = 0xdead_beef; // identity: not writable
        let mut b = PciConfig::new(ids());
        b.add_bar(0, 0x8000, BarKind::Memory64, 0).unwrap();
        b.restore(&st).unwrap();
        assert_eq!(b.save(), a.save());
        assert!(b.restore(&PciConfigState { regs: vec![0; 3] }).is_err());
    }
}
