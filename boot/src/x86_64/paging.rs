//! Identity page tables for a 64-bit entry: the first 4 GiB mapped with 2 MiB pages.

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{PDE_START, PDPTE_START, PML4_START};
use crate::BootError;

/// Number of page directories, one per GiB mapped.
pub const MAPPED_GIB: u64 = 4;

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Writes the identity mapping and returns the value for CR3.
pub fn setup_identity_mapping(mem: &GuestMemoryMmap) -> Result<u64, BootError> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|_| BootError::PageTables)
    };
    write(PDPTE_START | PRESENT_RW, PML4_START)?;
    for gib in 0..MAPPED_GIB {
        let pd = PDE_START + gib * 0x1000;
        write(pd | PRESENT_RW, PDPTE_START + gib * 8)?;
        for entry in 0..512u64 {
            let phys = (gib << 30) | (entry << 21);
            write(phys | PRESENT_RW | PAGE_SIZE_2M, pd + entry * 8)?;
        }
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU does for a 2 MiB mapping.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
        let pml4e = read(cr3 + ((va >> 39) & 0x1ff) * 8);
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = read((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8);
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = read((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8);
        if pde & 1 == 0 || pde & PAGE_SIZE_2M == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff & 0x000f_ffff_ffff_ffff) | (va & 0x1f_ffff))
    }

    #[test]
    fn identity_mapping_covers_first_4g_and_nothing_more() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = setup_identity_mapping(&mem).unwrap();
        for va in [
            0u64,
            0x7000,
            0x100_0000,
            0x3fff_ffff,
            0xd000_0123,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, cr3, va), Some(va), "{va:#x}");
        }
        assert_eq!(translate(&mem, cr3, 1 << 32), None);
    }

    #[test]
    fn memory_too_small_for_tables_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        assert!(setup_identity_mapping(&mem).is_err());
    }
}
