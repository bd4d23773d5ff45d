//! x86_64 machine state at boot: CPU registers, descriptor and page tables, firmware tables
//! (MP table, ACPI) and CPUID.

pub mod acpi;
pub mod aml;
pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod paging;
pub mod regs;
