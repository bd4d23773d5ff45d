//! Ember's x86_64 boot: the guest physical memory layout, loading an ELF `vmlinux` or a
//! `bzImage` (with linux-loader), and everything a kernel expects to find at its entry point —
//! zero page or PVH start info with the e820 map, command line, initrd, identity page tables,
//! GDT, MP table, ACPI tables — plus the vCPU register state and CPUID. Nothing here touches
//! KVM: the VMM applies the returned state through its vCPU file descriptors.
#![deny(missing_docs)]

/// Guest memory as the VMM maps it (with a dirty-page bitmap; the same type the devices use).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

pub mod layout;
pub mod loader;
pub mod x86_64;

use std::fs::File;

pub use loader::{LoadedInitrd, LoadedKernel, LoaderError};
pub use x86_64::regs::EntryPoint;

/// Errors of building the guest's boot state.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] x86_64::mptable::MptableError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] x86_64::acpi::AcpiError),
    /// Guest memory does not hold the page tables.
    #[error("guest memory does not hold the boot page tables")]
    PageTables,
    /// Guest memory does not hold the GDT/IDT.
    #[error("guest memory does not hold the boot descriptor tables")]
    DescriptorTables,
}

/// What a VM is booted with.
pub struct BootSpec<'a> {
    /// The kernel image.
    pub kernel: &'a mut File,
    /// An optional initrd / initramfs.
    pub initrd: Option<&'a mut File>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// Number of vCPUs at boot.
    pub cpus: u8,
    /// Most vCPUs the VM may have; above 1, the ACPI tables describe CPU hotplug
    /// ([`x86_64::acpi::cpus`]).
    pub max_cpus: u8,
    /// Whether the ACPI tables describe the pvpanic device.
    pub pvpanic: bool,
    /// The PCI host bridge the ACPI tables describe, when the VM has one.
    pub pci: Option<x86_64::acpi::PciHost>,
}

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootState {
    /// The kernel's entry point.
    pub entry: EntryPoint,
    /// CR3 for a long-mode entry.
    pub cr3: u64,
}

/// Loads kernel, initrd and command line into `mem` and writes every table the kernel reads
/// at entry. Returns where the boot vCPU starts.
pub fn configure_system(mem: &GuestMemoryMmap, spec: BootSpec) -> Result<BootState, BootError> {
    let kernel = loader::load_kernel(mem, spec.kernel)?;
    loader::load_cmdline(mem, &kernel, spec.cmdline)?;
    let initrd = match spec.initrd {
        Some(f) => Some(loader::load_initrd(mem, &kernel, f)?),
        None => None,
    };
    x86_64::mptable::setup_mptable(mem, spec.cpus)?;
    let max_cpus = spec.max_cpus.max(spec.cpus);
    // Clear of every APIC ID a CPU may have (the MP table's describes the boot CPUs only).
    let ioapic_id = x86_64::mptable::ioapic_id(max_cpus);
    let acpi = x86_64::acpi::AcpiOptions {
        pvpanic: spec.pvpanic,
        pci: spec.pci,
        cpu_hotplug: (max_cpus > 1).then_some(max_cpus),
        ..Default::default()
    };
    let rsdp = x86_64::acpi::setup_acpi_with(mem, spec.cpus, ioapic_id, &acpi)?;
    match kernel.entry {
        EntryPoint::Linux64(_) => {
            loader::write_zero_page(mem, &kernel, initrd, spec.cmdline.len(), rsdp)?
        }
        EntryPoint::Pvh(_) => loader::write_pvh_start_info(mem, initrd, rsdp)?,
    }
    x86_64::regs::write_descriptor_tables(mem, kernel.entry)?;
    let cr3 = x86_64::paging::setup_identity_mapping(mem)?;
    Ok(BootState {
        entry: kernel.entry,
        cr3,
    })
}
