//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI learns its CPUs,
//! its IOAPIC and how ISA interrupts reach it.

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START, LOW_HOLE_START, MAX_IRQ};

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    /// More CPUs than the table (which lives in the EBDA) can describe.
    #[error("{0} vCPUs do not fit in the MP table (at most {max})", max = MAX_CPUS)]
    TooManyCpus(u8),
    /// Guest memory does not cover the EBDA.
    #[error("guest memory does not cover the MP table area")]
    Write,
}

/// Most CPUs the table describes.
pub const MAX_CPUS: u8 = 32;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const ENTRY_CPU: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const BUS_ISA: u8 = 0;
/// Family 6 with the FPU and APIC feature bits, as firmware reports it.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// The IOAPIC's ID: one past the last CPU's APIC ID.
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

/// Builds the configuration table (`PCMP`) for `cpus` CPUs.
fn config_table(cpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_CPU, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    let ioapic = ioapic_id(cpus);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    // ISA IRQ 0 arrives through the PIC as ExtINT; every other IRQ n on IOAPIC pin n.
    entries.extend_from_slice(&[ENTRY_INTSRC, INT_TYPE_EXTINT, 0, 0, BUS_ISA, 0, ioapic, 0]);
    for irq in 1..=MAX_IRQ as u8 {
        entries.extend_from_slice(&[ENTRY_INTSRC, INT_TYPE_INT, 0, 0, BUS_ISA, irq, ioapic, irq]);
    }
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, BUS_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, BUS_ISA, 0, 0xff, 1]);

    // CPUs, the bus, the IOAPIC, IRQ 0..=MAX_IRQ, two local interrupt lines.
    let count = cpus as u16 + 2 + (MAX_IRQ as u16 + 1) + 2;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"EMBER   ");
    table.extend_from_slice(b"EMBER-VM    ");
    table.extend_from_slice(&[0; 4]); // OEM table pointer
    table.extend_from_slice(&[0; 2]); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Writes the floating pointer at the EBDA and the configuration table right after it.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let table_addr = EBDA_START + 16;
    let table = config_table(cpus);
    debug_assert!(table_addr + table.len() as u64 <= LOW_HOLE_START);
    let mut mpf = [0u8; 16];
    mpf[0..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = 4; // spec revision 1.4
    mpf[10] = checksum(&mpf);
    mem.write_slice(&mpf, GuestAddress(EBDA_START))
        .and_then(|_| mem.write_slice(&table, GuestAddress(table_addr)))
        .map_err(|_| MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// Number of entries in a config table, from its header.
    fn entry_count(table: &[u8]) -> u16 {
        u16::from_le_bytes([table[34], table[35]])
    }

    fn read_table(mem: &GuestMemoryMmap) -> Vec<u8> {
        let mut mpf = [0u8; 16];
        mem.read_slice(&mut mpf, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&mpf[0..4], b"_MP_");
        assert_eq!(mpf.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let addr = u32::from_le_bytes(mpf[4..8].try_into().unwrap()) as u64;
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        table
    }

    #[test]
    fn table_has_valid_checksums_and_one_entry_per_cpu() {
        let m = mem();
        setup_mptable(&m, 4).unwrap();
        let table = read_table(&m);
        assert_eq!(&table[0..4], b"PCMP");
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        // Walk the entries: CPUs are 20 bytes, the rest 8.
        let (mut off, mut cpus, mut n) = (44, 0, 0);
        while off < table.len() {
            if table[off] == ENTRY_CPU {
                assert_eq!(table[off + 1], cpus);
                assert_eq!(table[off + 3] & CPU_BOOTPROCESSOR != 0, cpus == 0);
                cpus += 1;
                off += 20;
            } else {
                off += 8;
            }
            n += 1;
        }
        assert_eq!(cpus, 4);
        assert_eq!(n, entry_count(&table));
    }

    #[test]
    fn largest_table_fits_below_the_vga_hole() {
        let table = config_table(MAX_CPUS);
        assert!(EBDA_START + 16 + table.len() as u64 <= LOW_HOLE_START);
    }

    #[test]
    fn zero_or_too_many_cpus_is_an_error() {
        assert_eq!(setup_mptable(&mem(), 0), Err(MptableError::TooManyCpus(0)));
        assert_eq!(
            setup_mptable(&mem(), 33),
            Err(MptableError::TooManyCpus(33))
        );
    }
}
