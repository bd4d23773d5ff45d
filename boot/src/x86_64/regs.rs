//! Register state of the boot vCPU at the kernel's entry point.

use crate::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{self, boot_gdt, kvm_segment_from_gdt};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PVH_INFO_START, ZERO_PAGE_START,
};
use crate::BootError;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64(u64),
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh(u64),
}

impl EntryPoint {
    /// The first instruction's address.
    pub fn address(&self) -> u64 {
        match *self {
            EntryPoint::Linux64(a) | EntryPoint::Pvh(a) => a,
        }
    }

    fn long_mode(&self) -> bool {
        matches!(self, EntryPoint::Linux64(_))
    }
}

/// General-purpose registers at entry.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.address(),
        ..Default::default()
    };
    match entry {
        EntryPoint::Linux64(_) => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryPoint::Pvh(_) => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// Writes the boot GDT and the empty IDT into guest memory.
pub fn write_descriptor_tables(mem: &GuestMemoryMmap, entry: EntryPoint) -> Result<(), BootError> {
    for (i, desc) in boot_gdt(entry.long_mode()).iter().enumerate() {
        mem.write_obj(*desc, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| BootError::DescriptorTables)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| BootError::DescriptorTables)
}

/// Segment, control and EFER registers at entry; `cr3` is used in long mode only.
pub fn boot_sregs(mut sregs: kvm_sregs, entry: EntryPoint, cr3: u64) -> kvm_sregs {
    let table = boot_gdt(entry.long_mode());
    let code = kvm_segment_from_gdt(table[1], gdt::CODE_SELECTOR);
    let data = kvm_segment_from_gdt(table[2], gdt::DATA_SELECTOR);
    let mut tss = kvm_segment_from_gdt(table[3], gdt::TSS_SELECTOR);
    if !entry.long_mode() {
        // PVH: a 32-bit busy TSS with base 0 and limit 0x67.
        tss = kvm_segment {
            limit: 0x67,
            g: 0,
            ..tss
        };
    }
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = tss;
    if entry.long_mode() {
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
        sregs.cr3 = cr3;
        sregs.cr4 = X86_CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    sregs
}

/// FPU state at entry: x87 control word and MXCSR at their reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs set on every vCPU before it first runs.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const IA32_TSC: u32 = 0x10;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const MTRR_DEF_TYPE: u32 = 0x2ff;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 0x6;
    [
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux64_entry_has_zero_page_in_rsi_and_a_stack() {
        let regs = boot_regs(EntryPoint::Linux64(0x100_0200));
        assert_eq!(regs.rip, 0x100_0200);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
        assert_eq!(regs.rflags, 2);
    }

    #[test]
    fn pvh_entry_has_start_info_in_rbx() {
        let regs = boot_regs(EntryPoint::Pvh(0x100_0000));
        assert_eq!(regs.rbx, PVH_INFO_START);
        assert_eq!(regs.rsi, 0);
    }

    #[test]
    fn long_mode_sregs_enable_paging_pae_and_lma() {
        let s = boot_sregs(kvm_sregs::default(), EntryPoint::Linux64(0), 0x9000);
        assert_eq!(s.cr3, 0x9000);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.ss.selector, gdt::DATA_SELECTOR);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn pvh_sregs_are_flat_protected_mode_without_paging() {
        let s = boot_sregs(kvm_sregs::default(), EntryPoint::Pvh(0), 0x9000);
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!(s.efer, 0);
        assert_eq!((s.cs.l, s.cs.db), (0, 1));
        assert_eq!(s.cs.limit, 0xffff_ffff);
        assert_eq!(s.tr.limit, 0x67);
    }

    #[test]
    fn descriptor_tables_land_in_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        write_descriptor_tables(&mem, EntryPoint::Linux64(0)).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, gdt::gdt_entry(gdt::CODE64_FLAGS, 0, 0xfffff));
    }
}
