//! Where things live in guest physical memory.
//!
//! ```text
//! 0x0000_0500  GDT used at entry (4 entries)        0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH start_info + memory map          0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top                       0x0000_9000  PML4, PDPT, 4 PDs (identity 4 GiB)
//! 0x0002_0000  kernel command line                  0x0009_fc00  EBDA: MP table
//! 0x000e_0000  ACPI: RSDP, then the tables          0x0010_0000  high memory: kernel, initrd, RAM
//! 0xd000_0000  32-bit MMIO gap up to 4 GiB: virtio-mmio windows (1 MiB from 0xd000_0000),
//!              the 32-bit PCI BAR window (0xe000_0000, 256 MiB), PCI ECAM (0xf000_0000,
//!              1 MiB: bus 0), IOAPIC (0xfec0_0000), LAPIC (0xfee0_0000)
//! 0x1_0000_0000  RAM beyond the gap; then, from the next 1 GiB boundary, the 64-bit PCI
//!              BAR window (64 GiB)
//! ```

use vm_memory::GuestAddress;

/// GDT loaded before the first instruction.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT loaded before the first instruction.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table of the identity mapping.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the identity mapping.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories (2 MiB pages) of the identity mapping.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept (Linux x86's COMMAND_LINE_SIZE), NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the legacy VGA/ROM hole (not RAM).
pub const LOW_HOLE_START: u64 = 0xa0000;
/// ACPI tables (RSDP first, found by the guest's scan of 0xe0000..0x100000).
pub const ACPI_START: u64 = 0xe0000;
/// End of the legacy BIOS area.
pub const ACPI_END: u64 = 0x10_0000;
/// First byte of high memory (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// IOAPIC registers (in the MMIO gap, emulated by KVM).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers (in the MMIO gap, emulated by KVM).
pub const APIC_START: u64 = 0xfee0_0000;
/// Address KVM uses for its TSS (three pages, VMX only, must not overlap RAM or devices).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Address KVM uses for its identity map page (VMX real mode).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Where virtio-mmio devices are placed: from here, one 4 KiB window each.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Bytes of the device window given to each MMIO device.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// The 32-bit PCI BAR window (a host-bridge window in the DSDT's `_CRS`).
pub const PCI_MMIO32_START: u64 = 0xe000_0000;
/// Its size.
pub const PCI_MMIO32_SIZE: u64 = 0x1000_0000;
/// The ECAM window (the ACPI MCFG table's): configuration space of PCI bus 0.
pub const PCI_ECAM_START: u64 = 0xf000_0000;
/// Its size: 4 KiB per function, 256 functions of one bus.
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// Size of the 64-bit PCI BAR window above RAM.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// First IRQ given to MMIO devices (0..4 are PIT, keyboard, cascade, COM2; 4 is COM1).
pub const MMIO_FIRST_IRQ: u32 = 5;
/// Last usable IOAPIC pin (KVM's IOAPIC has 24).
pub const MAX_IRQ: u32 = 23;

/// The 64-bit PCI BAR window for `size` bytes of memory: (start, length), from the first
/// 1 GiB boundary at or above the end of RAM (and at or above 4 GiB).
pub fn pci_mmio64_window(size: u64) -> (u64, u64) {
    let ram_end = match ram_regions(size).last() {
        Some((start, len)) => start.0 + len,
        None => 0,
    };
    let start = ram_end.max(MMIO_GAP_END).next_multiple_of(1 << 30);
    (start, PCI_MMIO64_SIZE)
}

// The boot stack grows down from between the zero page and the page tables.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 4096);

/// Smallest guest RAM we accept.
pub const MIN_MEMORY: u64 = 16 << 20;

/// The guest RAM regions for `size` bytes of memory: one below the MMIO gap and, when the
/// memory does not fit there, the rest above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Last byte + 1 of the RAM below the MMIO gap for `size` bytes of memory.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region_from_zero() {
        assert_eq!(ram_regions(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn memory_larger_than_gap_continues_above_4g() {
        let regions = ram_regions(4 << 30);
        assert_eq!(regions[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            regions[1],
            (GuestAddress(1 << 32), (4 << 30) - MMIO_GAP_START)
        );
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn pci_windows_sit_in_the_gap_clear_of_each_other_and_of_ram() {
        let gap = [
            (
                MMIO_DEVICES_START,
                MMIO_DEVICES_START + 256 * MMIO_DEVICE_SIZE,
            ),
            (PCI_MMIO32_START, PCI_MMIO32_START + PCI_MMIO32_SIZE),
            (PCI_ECAM_START, PCI_ECAM_START + PCI_ECAM_SIZE),
            (IOAPIC_START, IOAPIC_START + 0x1000),
            (APIC_START, APIC_START + 0x1000),
            (KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS + 3 * 4096),
        ];
        for (i, a) in gap.iter().enumerate() {
            assert!(a.0 >= MMIO_GAP_START && a.1 <= MMIO_GAP_END, "{a:x?}");
            for b in &gap[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
        for size in [256 << 20, MMIO_GAP_START, 4 << 30, (5 << 30) + 4096] {
            let (start, len) = pci_mmio64_window(size);
            let ram_end = ram_regions(size).last().map(|r| r.0 .0 + r.1).unwrap();
            assert!(start >= ram_end && start >= MMIO_GAP_END, "{size:#x}");
            assert_eq!(start % (1 << 30), 0);
            assert!(len > 0);
        }
        assert_eq!(pci_mmio64_window(256 << 20).0, 1 << 32);
    }

    #[test]
    fn fixed_boot_structures_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, BOOT_IDT_START),
            (BOOT_IDT_START, BOOT_IDT_START + 8),
            (PVH_INFO_START, ZERO_PAGE_START),
            (ZERO_PAGE_START, ZERO_PAGE_START + 4096),
            (PML4_START, PDE_START + 4 * 4096),
            (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            (EBDA_START, LOW_HOLE_START),
            (ACPI_START, ACPI_END),
        ];
        for (i, a) in areas.iter().enumerate() {
            assert!(a.0 < a.1);
            for b in &areas[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
    }
}
