//! ACPI tables: RSDP, XSDT, FADT (+FACS, DSDT), MADT and, with a PCI host, MCFG.
//!
//! A full (not hardware-reduced) FADT with a PM1a event/control block on I/O ports, so a guest
//! keeps its legacy ISA interrupts, can power off by writing SLP_TYP/SLP_EN and gets a fixed
//! power button (PWRBTN_STS/PWRBTN_EN in PM1, signalled by the SCI), and the reset register
//! for ACPI reboot. The DSDT, built with [`super::aml`], holds the `\_S5` sleep package and
//! the ISA devices Linux should find through ACPI rather than by probing: the PS/2 keyboard
//! controller (PNP0303), QEMU's pvpanic port (QEMU0001) and, when asked, COM1 (PNP0501).
//!
//! A VM with a PCI host also gets the PCI root bridge (`PCI0`, PNP0A08) with its `_CRS`:
//! bus 0, the configuration ports 0xcf8-0xcff and the 32- and 64-bit BAR windows; the MCFG
//! table pointing at the ECAM window; and a motherboard resource (PNP0C02) reserving that
//! window, without which Linux refuses to use it.

pub mod cpus;

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::aml::{self, AddressRange, AmlError, Cacheable, Expr, Resource, Term, Usage};
use crate::layout::{ACPI_END, ACPI_START, APIC_START, IOAPIC_START, PCI_ECAM_SIZE};

/// I/O ports the ACPI PM device answers on (the VMM emulates them).
pub mod ports {
    /// PM1a event block: status (2 bytes) then enable (2 bytes).
    pub const PM1A_EVT: u16 = 0x600;
    /// PM1a control block (2 bytes): SCI_EN, SLP_TYP, SLP_EN.
    pub const PM1A_CNT: u16 = 0x604;
    /// Reset register (1 byte).
    pub const RESET: u16 = 0x608;
    /// General-purpose event block 0: GPE0_STS (2 bytes, write 1 to clear), then GPE0_EN
    /// (2 bytes).
    pub const GPE0_BLK: u16 = 0x620;
    /// Bytes of GPE0_BLK.
    pub const GPE0_BLK_LEN: u8 = 4;
    /// The PCI hotplug controller (`PCIU`, `PCID`, `PCEJ`: 32 bits each, bit n for slot n),
    /// when the VM has a PCI host.
    pub const PCI_HOTPLUG: u16 = 0xae00;
    /// Bytes of the PCI hotplug controller.
    pub const PCI_HOTPLUG_LEN: u16 = 12;
    /// First port of the block.
    pub const BASE: u16 = PM1A_EVT;
    /// Number of ports in the block: PM1, the reset register and GPE0 (0x600-0x623).
    pub const LEN: u16 = GPE0_BLK + GPE0_BLK_LEN as u16 - BASE;
}

/// GPE0 bit the PCI hotplug controller raises; `\_GPE._E01` runs `\_SB.PCI0.PCNT`.
pub const GPE_PCI_HOTPLUG: u8 = 1;
/// GPE0 bit the CPU hotplug controller raises; `\_GPE._E02` runs `\_SB.CPUS.CSCN`.
pub const GPE_CPU_HOTPLUG: u8 = 2;

/// Value that, written to the reset register, resets the machine.
pub const RESET_VALUE: u8 = 0x1;
/// SLP_TYP value of S5 (soft off) given in `\_S5`.
pub const SLP_TYP_S5: u16 = 5;
/// SCI interrupt (ISA IRQ 9, as on PCs).
pub const SCI_IRQ: u8 = 9;
/// The pvpanic device's port (QEMU's ISA pvpanic default).
pub const PVPANIC_PORT: u16 = 0x505;
/// The PS/2 controller's data and command/status ports and its keyboard IRQ.
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
const I8042_KBD_IRQ: u8 = 1;
/// COM1's ports and IRQ.
const COM1_PORT: u16 = 0x3f8;
const COM1_IRQ: u8 = 4;

/// A PCI host bridge: one root bus (segment 0, bus 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHost {
    /// Base of the ECAM window (bus 0: [`PCI_ECAM_SIZE`] bytes), below 4 GiB.
    pub ecam: u64,
    /// The 32-bit BAR window: start and length, below 4 GiB.
    pub mmio32: (u64, u64),
    /// The 64-bit BAR window: start and length.
    pub mmio64: (u64, u64),
}

/// What the DSDT describes besides the sleep states and the keyboard controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiOptions {
    /// QEMU's pvpanic device (`QEMU0001`) at [`PVPANIC_PORT`]. On by default.
    pub pvpanic: bool,
    /// COM1 (`PNP0501`) at 0x3f8, IRQ 4. Off by default: Linux finds COM1 by probing its
    /// legacy ports anyway, and the PNP driver would probe the console's UART once more.
    pub com1: bool,
    /// The PCI host bridge, when the VM has one (then also the MCFG table).
    pub pci: Option<PciHost>,
    /// CPU hotplug up to this many CPUs: the MADT lists them all (those beyond the boot
    /// CPUs online capable) and the DSDT has `\_SB.CPUS` ([`cpus`]).
    pub cpu_hotplug: Option<u8>,
}

impl Default for AcpiOptions {
    fn default() -> Self {
        AcpiOptions {
            pvpanic: true,
            com1: false,
            pci: None,
            cpu_hotplug: None,
        }
    }
}

/// Errors writing the tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// The tables do not fit in the BIOS area.
    #[error("ACPI tables do not fit in guest memory")]
    Write,
    /// The DSDT's AML cannot be encoded (a bug in what the DSDT asks for).
    #[error("cannot encode the DSDT")]
    Aml(#[source] AmlError),
    /// A PCI window that the tables cannot describe (empty, wrapping, or a 32-bit one
    /// above 4 GiB).
    #[error("PCI window {start:#x}+{len:#x} cannot be described")]
    PciWindow {
        /// Its start.
        start: u64,
        /// Its length.
        len: u64,
    },
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// A system description table under construction: header, then body.
struct Sdt(Vec<u8>);

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8) -> Self {
        let mut h = Vec::with_capacity(64);
        h.extend_from_slice(signature);
        h.extend_from_slice(&[0; 4]); // length, set by finish()
        h.push(revision);
        h.push(0); // checksum, set by finish()
        h.extend_from_slice(b"EMBER ");
        h.extend_from_slice(b"EMBERVM ");
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(b"EMBR");
        h.extend_from_slice(&1u32.to_le_bytes());
        Sdt(h)
    }

    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

/// Generic address structure for an I/O port register of `bytes` width.
fn gas_io(port: u16, bytes: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = bytes * 8;
    g[3] = match bytes {
        1 => 1,
        2 => 2,
        _ => 3,
    };
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// The body of an ISA device: `_HID`, `_UID` when given, and `_CRS` from `resources`.
fn isa_device(hid: Expr, uid: Option<u64>, resources: Vec<Resource>) -> Vec<Term> {
    let mut terms = vec![Term::name("_HID", hid)];
    if let Some(uid) = uid {
        terms.push(Term::name("_UID", Expr::Int(uid)));
    }
    terms.push(Term::name("_CRS", Expr::ResourceTemplate(resources)));
    terms
}

/// The last address of a window, checked to fit `T`.
fn window<T: TryFrom<u64>>((start, len): (u64, u64)) -> Result<(T, T), AcpiError> {
    let bad = AcpiError::PciWindow { start, len };
    let last = start
        .checked_add(len)
        .filter(|_| len > 0)
        .map(|end| end - 1);
    match last.map(|l| (T::try_from(start), T::try_from(l))) {
        Some((Ok(a), Ok(b))) => Ok((a, b)),
        _ => Err(bad),
    }
}

/// A window a bridge decodes for its children, untranslated.
fn producer<T: Default>(min: T, max: T) -> AddressRange<T> {
    AddressRange {
        usage: Usage::Producer,
        min,
        max,
        translation: T::default(),
    }
}

/// The PCI root bridge and the motherboard resource reserving its ECAM window.
fn pci_devices(p: &PciHost) -> Result<Vec<Term>, AcpiError> {
    let (min32, max32) = window::<u32>(p.mmio32)?;
    let (min64, max64) = window::<u64>(p.mmio64)?;
    let (ecam, _) = window::<u32>((p.ecam, PCI_ECAM_SIZE))?;
    let crs = vec![
        Resource::WordBusNumber(producer(0u16, 0u16)),
        Resource::Io {
            min: 0xcf8,
            max: 0xcf8,
            align: 1,
            len: 8,
        },
        Resource::DWordMemory {
            range: producer(min32, max32),
            cacheable: Cacheable::NonCacheable,
            writeable: true,
        },
        Resource::QWordMemory {
            range: producer(min64, max64),
            cacheable: Cacheable::NonCacheable,
            writeable: true,
        },
    ];
    let root = vec![
        Term::name("_HID", Expr::eisa_id("PNP0A08")),
        Term::name("_CID", Expr::eisa_id("PNP0A03")),
        Term::name("_SEG", Expr::Int(0)),
        Term::name("_UID", Expr::Int(0)),
        Term::name("_BBN", Expr::Int(0)),
        Term::name("_CRS", Expr::ResourceTemplate(crs)),
    ];
    let root = [root, hotplug_terms()].concat();
    let reserved = isa_device(
        Expr::eisa_id("PNP0C02"),
        Some(0),
        vec![Resource::Memory32Fixed {
            writeable: true,
            base: ecam,
            len: PCI_ECAM_SIZE as u32,
        }],
    );
    Ok(vec![
        Term::device("PCI0", root),
        Term::device("PRES", reserved),
    ])
}

/// Hotpluggable slots 1-31 of the root bus.
const HOTPLUG_SLOTS: std::ops::Range<u8> = 1..32;

fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}")
}

/// What `PCI0` holds for ACPI PCI hotplug: the controller's registers, the scan `PCNT` that
/// `\_GPE._E01` runs (it notifies each slot the VMM filled with a device check and each
/// slot it wants back with an eject request), and a device per slot with its address, its
/// slot number and `_EJ0`, which tells the controller the guest let the slot go.
fn hotplug_terms() -> Vec<Term> {
    use aml::{AccessType, BinaryOp, FieldEntry, RegionSpace, Target, UpdateRule};
    let mut terms = vec![
        Term::OpRegion {
            name: "PCST".into(),
            space: RegionSpace::SystemIo,
            offset: Expr::Int(ports::PCI_HOTPLUG.into()),
            len: Expr::Int(ports::PCI_HOTPLUG_LEN.into()),
        },
        Term::Field {
            region: "PCST".into(),
            access: AccessType::DWord,
            lock: false,
            update: UpdateRule::WriteAsZeros,
            entries: ["PCIU", "PCID", "PCEJ"]
                .map(|n| FieldEntry::Named(n.into(), 32))
                .to_vec(),
        },
    ];
    let mut scan = vec![
        Term::store(Expr::path("PCIU"), Target::Local(0)),
        Term::store(Expr::path("PCID"), Target::Local(1)),
    ];
    for slot in HOTPLUG_SLOTS {
        for (local, event) in [(0, 1), (1, 3)] {
            let mask = Expr::Int(1 << slot);
            scan.push(Term::if_then(
                Expr::binary(BinaryOp::And, Expr::Local(local), mask, Target::Null),
                vec![Term::Notify(
                    Target::Path(slot_name(slot)),
                    Expr::Int(event),
                )],
            ));
        }
    }
    terms.push(Term::method("PCNT", 0, scan));
    for slot in HOTPLUG_SLOTS {
        let eject = Term::store(Expr::Int(1 << slot), Target::Path("PCEJ".into()));
        terms.push(Term::device(
            &slot_name(slot),
            vec![
                Term::name("_ADR", Expr::Int(u64::from(slot) << 16)),
                Term::name("_SUN", Expr::Int(slot.into())),
                Term::method("_EJ0", 1, vec![eject]),
            ],
        ));
    }
    terms
}

/// MCFG: one ECAM allocation, segment 0, bus 0.
fn mcfg(p: &PciHost) -> Vec<u8> {
    let mut b = vec![0u8; 8]; // reserved
    b.extend_from_slice(&p.ecam.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes()); // segment
    b.push(0); // first bus
    b.push((PCI_ECAM_SIZE >> 20) as u8 - 1); // last bus
    b.extend_from_slice(&[0; 4]);
    Sdt::new(b"MCFG", 1).bytes(&b).finish()
}

fn dsdt_terms(opts: &AcpiOptions) -> Result<Vec<Term>, AcpiError> {
    let s5 = u64::from(SLP_TYP_S5);
    let mut devices = vec![Term::device(
        "PS2K",
        isa_device(
            Expr::eisa_id("PNP0303"),
            None,
            vec![
                Resource::io_fixed(I8042_DATA, 1),
                Resource::io_fixed(I8042_COMMAND, 1),
                Resource::IrqNoFlags(vec![I8042_KBD_IRQ]),
            ],
        ),
    )];
    if opts.pvpanic {
        let mut terms = isa_device(
            Expr::string("QEMU0001"),
            None,
            vec![Resource::io_fixed(PVPANIC_PORT, 1)],
        );
        // Present, enabled, shown in the UI, functioning.
        terms.push(Term::method("_STA", 0, vec![Term::ret(Expr::Int(0x0f))]));
        devices.push(Term::device("PEVT", terms));
    }
    if opts.com1 {
        let terms = isa_device(
            Expr::eisa_id("PNP0501"),
            Some(1),
            vec![
                Resource::io_fixed(COM1_PORT, 8),
                Resource::IrqNoFlags(vec![COM1_IRQ]),
            ],
        );
        devices.push(Term::device("COM1", terms));
    }
    if let Some(p) = &opts.pci {
        devices.extend(pci_devices(p)?);
    }
    if let Some(max) = opts.cpu_hotplug {
        devices.push(cpus::container(max));
    }
    Ok(vec![
        Term::name(
            "_S5",
            Expr::Package(vec![s5.into(), s5.into(), 0.into(), 0.into()]),
        ),
        Term::scope("\\_SB", devices),
        Term::scope("\\_GPE", gpe_methods(opts)),
    ])
}

/// `\_GPE._Exx`: the (edge-triggered) handlers ACPICA runs for an enabled GPE0 bit once it
/// cleared its status; each calls the scan method of the controller that raised it.
fn gpe_methods(opts: &AcpiOptions) -> Vec<Term> {
    let mut terms = Vec::new();
    if opts.pci.is_some() {
        terms.push(Term::method(
            &format!("_E{GPE_PCI_HOTPLUG:02X}"),
            0,
            vec![Term::Eval(Expr::call("\\_SB.PCI0.PCNT", vec![]))],
        ));
    }
    if opts.cpu_hotplug.is_some() {
        terms.push(Term::method(
            &format!("_E{GPE_CPU_HOTPLUG:02X}"),
            0,
            vec![Term::Eval(Expr::call("\\_SB.CPUS.CSCN", vec![]))],
        ));
    }
    terms
}

fn dsdt(opts: &AcpiOptions) -> Result<Vec<u8>, AcpiError> {
    let body = aml::to_aml(&dsdt_terms(opts)?).map_err(AcpiError::Aml)?;
    Ok(Sdt::new(b"DSDT", 2).bytes(&body).finish())
}

fn facs() -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&64u32.to_le_bytes());
    f[32] = 2; // version
    f
}

const FADT_WBINVD: u32 = 1 << 0;
/// Set: the sleep button, if any, is a control-method device (we have none).
const FADT_SLP_BUTTON: u32 = 1 << 5;
const FADT_RESET_REG_SUP: u32 = 1 << 10;

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut b = vec![0u8; 276 - 36];
    let mut put = |off: usize, v: &[u8]| b[off - 36..off - 36 + v.len()].copy_from_slice(v);
    put(36, &(facs as u32).to_le_bytes());
    put(40, &(dsdt as u32).to_le_bytes());
    put(46, &u16::from(SCI_IRQ).to_le_bytes());
    // SMI_CMD = 0: the machine is always in ACPI mode.
    put(56, &u32::from(ports::PM1A_EVT).to_le_bytes());
    put(64, &u32::from(ports::PM1A_CNT).to_le_bytes());
    put(80, &u32::from(ports::GPE0_BLK).to_le_bytes());
    put(88, &[4, 2, 0, 0]); // PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN
    put(92, &[ports::GPE0_BLK_LEN, 0, 0]); // GPE0_BLK_LEN, GPE1_BLK_LEN, GPE1_BASE
    put(96, &101u16.to_le_bytes()); // no C2
    put(98, &1001u16.to_le_bytes()); // no C3
                                     // IAPC_BOOT_ARCH: legacy devices, 8042, no VGA, no ASPM control.
    put(
        109,
        &((1u16 << 0) | (1 << 1) | (1 << 2) | (1 << 4)).to_le_bytes(),
    );
    // Flags: WBINVD, PWR_BUTTON clear (the power button is the fixed-feature one in PM1),
    // SLP_BUTTON set (no sleep button), reset register supported.
    put(
        112,
        &(FADT_WBINVD | FADT_SLP_BUTTON | FADT_RESET_REG_SUP).to_le_bytes(),
    );
    put(116, &gas_io(ports::RESET, 1));
    put(128, &[RESET_VALUE]);
    put(131, &[4]); // FADT minor version (6.4)
    put(132, &facs.to_le_bytes());
    put(140, &dsdt.to_le_bytes());
    put(148, &gas_io(ports::PM1A_EVT, 4));
    put(172, &gas_io(ports::PM1A_CNT, 2));
    // GPE registers are accessed a byte at a time (ACPI 6.4, 4.8.1.6).
    let mut gpe0 = gas_io(ports::GPE0_BLK, ports::GPE0_BLK_LEN);
    gpe0[3] = 1;
    put(220, &gpe0);
    put(268, b"EMBERVMM");
    Sdt::new(b"FACP", 6).bytes(&b).finish()
}

/// The MADT: `cpus` enabled processors, then up to `max` online-capable ones.
fn madt(cpus: u8, max: u8, ioapic_id: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259s
    for cpu in 0..max.max(cpus) {
        b.extend_from_slice(&cpus::lapic_entry(cpu, cpus::madt_flags(cpu, cpus)));
    }
    b.extend_from_slice(&[1, 12, ioapic_id, 0]);
    b.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
                                              // SCI: ISA IRQ 9 -> GSI 9, level-triggered, active high.
    b.extend_from_slice(&[2, 10, 0, SCI_IRQ]);
    b.extend_from_slice(&u32::from(SCI_IRQ).to_le_bytes());
    b.extend_from_slice(&0x000du16.to_le_bytes());
    // NMI on LINT1 of every processor.
    b.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    Sdt::new(b"APIC", 5).bytes(&b).finish()
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = vec![0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(b"EMBER ");
    r[15] = 2;
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = checksum(&r[0..20]);
    r[32] = checksum(&r);
    r
}

fn align(addr: u64, to: u64) -> u64 {
    addr.div_ceil(to) * to
}

/// Writes all tables from [`ACPI_START`] with the default [`AcpiOptions`]; returns the RSDP's
/// address.
pub fn setup_acpi(mem: &GuestMemoryMmap, cpus: u8, ioapic_id: u8) -> Result<u64, AcpiError> {
    setup_acpi_with(mem, cpus, ioapic_id, &AcpiOptions::default())
}

/// Writes all tables from [`ACPI_START`], the DSDT describing what `opts` asks for; returns
/// the RSDP's address.
pub fn setup_acpi_with(
    mem: &GuestMemoryMmap,
    cpus: u8,
    ioapic_id: u8,
    opts: &AcpiOptions,
) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI_START;
    let facs_addr = align(rsdp_addr + 36, 64);
    let dsdt_addr = facs_addr + 64;
    let dsdt = dsdt(opts)?;
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64, 8);
    let fadt = fadt(facs_addr, dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64, 8);
    let madt = madt(cpus, opts.cpu_hotplug.unwrap_or(cpus), ioapic_id);
    let mut tables = vec![(fadt_addr, fadt), (madt_addr, madt)];
    let mut next = align(madt_addr + tables[1].1.len() as u64, 8);
    if let Some(p) = &opts.pci {
        let t = mcfg(p);
        let len = t.len() as u64;
        tables.push((next, t));
        next = align(next + len, 8);
    }
    let xsdt_addr = next;
    let xsdt = tables
        .iter()
        .fold(Sdt::new(b"XSDT", 1), |x, (addr, _)| {
            x.bytes(&addr.to_le_bytes())
        })
        .finish();
    if xsdt_addr + xsdt.len() as u64 > ACPI_END {
        return Err(AcpiError::Write);
    }
    tables.extend([
        (rsdp_addr, rsdp(xsdt_addr)),
        (facs_addr, facs()),
        (dsdt_addr, dsdt),
        (xsdt_addr, xsdt),
    ]);
    for (addr, table) in tables {
        mem.write_slice(&table, GuestAddress(addr))
            .map_err(|_| AcpiError::Write)?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let hdr = read(mem, addr, 8);
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        let t = read(mem, addr, len);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        t
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn rsdp_leads_to_fadt_and_madt_with_valid_checksums() {
        let m = mem();
        let rsdp_addr = setup_acpi(&m, 2, 2).unwrap();
        let rsdp = read(&m, rsdp_addr, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(rsdp[0..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(rsdp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let xsdt = table(&m, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[0..4], b"XSDT");
        let fadt = table(&m, u64_at(&xsdt, 36));
        assert_eq!(&fadt[0..4], b"FACP");
        assert_eq!(fadt.len(), 276);
        let madt = table(&m, u64_at(&xsdt, 44));
        assert_eq!(&madt[0..4], b"APIC");
        let dsdt = table(&m, u64_at(&fadt, 140));
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert_eq!(&dsdt[37..41], b"_S5_");
        let facs = read(&m, u64_at(&fadt, 132), 64);
        assert_eq!(&facs[0..4], b"FACS");
        assert_eq!(u64_at(&fadt, 132) % 64, 0);
    }

    #[test]
    fn fadt_is_not_hardware_reduced_and_points_at_pm_ports() {
        let f = fadt(0x1000, 0x2000);
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_eq!(flags & (1 << 20), 0);
        assert_eq!(
            u32::from_le_bytes(f[64..68].try_into().unwrap()),
            ports::PM1A_CNT as u32
        );
        assert_eq!(f[89], 2);
        assert_eq!(u64_at(&f, 172 + 4), ports::PM1A_CNT as u64);
        assert_eq!(f[128], RESET_VALUE);
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        let t = madt(3, 3, 3);
        let (mut off, mut cpus, mut ioapics) = (44, 0, 0);
        while off < t.len() {
            match t[off] {
                0 => {
                    assert_eq!(t[off + 3], cpus);
                    cpus += 1;
                }
                1 => {
                    assert_eq!(t[off + 2], 3);
                    ioapics += 1;
                }
                _ => {}
            }
            off += t[off + 1] as usize;
        }
        assert_eq!((cpus, ioapics), (3, 1));
    }

    #[test]
    fn madt_lists_hotpluggable_cpus_online_capable_but_not_enabled() {
        let t = madt(1, 3, 3);
        assert_eq!(t[8], 5, "revision 5: Linux reads the online-capable flag");
        let flags: Vec<u32> = (0..3)
            .map(|i| 44 + i * 8)
            .inspect(|&off| assert_eq!(t[off], 0, "a processor local APIC"))
            .map(|off| u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap()))
            .collect();
        assert_eq!(
            flags,
            [
                cpus::LAPIC_ENABLED,
                cpus::LAPIC_ONLINE_CAPABLE,
                cpus::LAPIC_ONLINE_CAPABLE
            ]
        );
    }

    #[test]
    fn cpu_hotplug_adds_the_processor_container_to_the_dsdt() {
        let names = dsdt_names(&AcpiOptions {
            cpu_hotplug: Some(2),
            ..Default::default()
        });
        assert!(names.contains(&"\\_SB_.CPUS.C001._MAT".to_string()));
        assert!(names.contains(&"\\_GPE._E02".to_string()), "{names:?}");
        assert!(!dsdt_names(&AcpiOptions::default())
            .iter()
            .any(|n| n.contains("CPUS")));
    }

    use crate::x86_64::aml::tests::walker::Walker;

    fn dsdt_names(opts: &AcpiOptions) -> Vec<String> {
        let t = dsdt(opts).unwrap();
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        Walker::walk(&t[36..]).unwrap()
    }

    #[test]
    fn dsdt_parses_and_names_s5_keyboard_and_pvpanic_by_default() {
        let names = dsdt_names(&AcpiOptions::default());
        assert_eq!(
            names,
            [
                "\\_S5_",
                "\\_SB_.PS2K",
                "\\_SB_.PS2K._HID",
                "\\_SB_.PS2K._CRS",
                "\\_SB_.PEVT",
                "\\_SB_.PEVT._HID",
                "\\_SB_.PEVT._CRS",
                "\\_SB_.PEVT._STA",
            ]
        );
    }

    #[test]
    fn pvpanic_can_be_left_out_and_com1_added() {
        let names = dsdt_names(&AcpiOptions {
            pvpanic: false,
            com1: true,
            pci: None,
            cpu_hotplug: None,
        });
        assert!(!names.iter().any(|n| n.contains("PEVT")));
        assert!(names.contains(&"\\_SB_.COM1._UID".to_string()));
    }

    #[test]
    fn keyboard_resources_are_ports_60_and_64_and_irq_1() {
        let t = dsdt(&AcpiOptions::default()).unwrap();
        let crs = [
            0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01, // IO 0x60
            0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01, // IO 0x64
            0x22, 0x02, 0x00, // IRQNoFlags {1}
        ];
        assert!(t.windows(crs.len()).any(|w| w == crs));
        let hid = [b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x03, 0x03];
        assert!(t.windows(hid.len()).any(|w| w == hid));
    }

    #[test]
    fn pvpanic_resource_is_one_port_at_0x505() {
        let t = dsdt(&AcpiOptions::default()).unwrap();
        let crs = [0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01, 0x79];
        assert!(t.windows(crs.len()).any(|w| w == crs));
        assert!(t.windows(10).any(|w| w == b"\x0dQEMU0001\x00"));
    }

    #[test]
    fn fadt_has_a_fixed_power_button_and_no_sleep_button() {
        // Set: the power button, if any, is a control-method device; clear: the fixed one.
        const FADT_PWR_BUTTON: u32 = 1 << 4;
        let f = fadt(0x1000, 0x2000);
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_eq!(flags & FADT_PWR_BUTTON, 0);
        assert_ne!(flags & FADT_SLP_BUTTON, 0);
        // PM1 event block: 4 bytes, status then enable, on the PM ports.
        assert_eq!(f[88], 4);
        assert_eq!(u64_at(&f, 148 + 4), u64::from(ports::PM1A_EVT));
    }

    /// Each table of a 4-CPU machine, by signature.
    fn all_tables() -> Vec<([u8; 4], Vec<u8>)> {
        let m = mem();
        let opts = AcpiOptions {
            pci: Some(PCI),
            cpu_hotplug: Some(6),
            ..Default::default()
        };
        let rsdp = read(&m, setup_acpi_with(&m, 4, 6, &opts).unwrap(), 36);
        let xsdt = table(&m, u64_at(&rsdp, 24));
        let fadt = table(&m, u64_at(&xsdt, 36));
        let madt = table(&m, u64_at(&xsdt, 44));
        let mcfg = table(&m, u64_at(&xsdt, 52));
        let dsdt = table(&m, u64_at(&fadt, 140));
        let facs = read(&m, u64_at(&fadt, 132), 64);
        [rsdp, xsdt, fadt, madt, mcfg, dsdt, facs]
            .into_iter()
            .map(|t| (t[0..4].try_into().unwrap(), t))
            .collect()
    }

    #[test]
    #[ignore = "needs iasl from acpica-tools"]
    fn iasl_disassembles_every_table_without_complaint() {
        let dir = tempfile::tempdir().unwrap();
        // iasl does not read a bare RSDP (no table header); its checksums are tested above.
        for (sig, t) in all_tables().into_iter().filter(|(sig, _)| sig != b"RSD ") {
            let name = format!("{}.dat", String::from_utf8_lossy(&sig).trim());
            std::fs::write(dir.path().join(&name), &t).unwrap();
            if let Ok(keep) = std::env::var("EMBER_ACPI_DUMP") {
                std::fs::write(std::path::Path::new(&keep).join(&name), &t).unwrap();
            }
            crate::x86_64::aml::tests::iasl(dir.path(), &["-d", &name]);
            let dsl = std::fs::read_to_string(dir.path().join(name.replace(".dat", ".dsl")));
            let dsl = dsl.unwrap();
            for bad in ["Incorrect", "Invalid", "Warning", "Error"] {
                assert!(!dsl.contains(bad), "{name}:\n{dsl}");
            }
        }
        // The disassembled DSDT compiles back.
        crate::x86_64::aml::tests::iasl(dir.path(), &["-p", "again", "DSDT.dsl"]);
    }

    const PCI: PciHost = PciHost {
        ecam: 0xf000_0000,
        mmio32: (0xe000_0000, 0x1000_0000),
        mmio64: (1 << 32, 64 << 30),
    };

    #[test]
    fn a_pci_host_adds_the_root_bridge_its_ecam_reservation_and_mcfg() {
        let m = mem();
        let opts = AcpiOptions {
            pci: Some(PCI),
            ..Default::default()
        };
        let rsdp = read(&m, setup_acpi_with(&m, 1, 1, &opts).unwrap(), 36);
        let xsdt = table(&m, u64_at(&rsdp, 24));
        assert_eq!(xsdt.len(), 36 + 3 * 8, "FADT, MADT, MCFG");
        let mcfg = table(&m, u64_at(&xsdt, 52));
        assert_eq!(&mcfg[0..4], b"MCFG");
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(u64_at(&mcfg, 44), 0xf000_0000);
        assert_eq!(&mcfg[52..56], &[0, 0, 0, 0], "segment 0, buses 0-0");

        let names = dsdt_names(&opts);
        for n in [
            "PCI0._HID",
            "PCI0._CID",
            "PCI0._SEG",
            "PCI0._CRS",
            "PRES._CRS",
        ] {
            assert!(names.contains(&format!("\\_SB_.{n}")), "{n}: {names:?}");
        }
    }

    #[test]
    fn pci_root_resources_are_bus_0_the_config_ports_and_both_windows() {
        let t = dsdt(&AcpiOptions {
            pci: Some(PCI),
            ..Default::default()
        })
        .unwrap();
        let has = |b: &[u8]| t.windows(b.len()).any(|w| w == b);
        assert!(
            has(&[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]),
            "IO 0xcf8"
        );
        let mut dword = 0xe000_0000u32.to_le_bytes().to_vec();
        dword.extend_from_slice(&0xefff_ffffu32.to_le_bytes());
        assert!(has(&dword), "32-bit window");
        let mut qword = (1u64 << 32).to_le_bytes().to_vec();
        qword.extend_from_slice(&((1u64 << 32) + (64 << 30) - 1).to_le_bytes());
        assert!(has(&qword), "64-bit window");
        // The ECAM reservation: Memory32Fixed (RW, 0xf0000000, 1 MiB).
        assert!(has(&[0x86, 0x09, 0x00, 0x01, 0, 0, 0, 0xf0, 0, 0, 0x10, 0]));
    }

    #[test]
    fn pci_windows_the_tables_cannot_describe_are_refused() {
        let bad = |p: PciHost| {
            let opts = AcpiOptions {
                pci: Some(p),
                ..Default::default()
            };
            matches!(
                setup_acpi_with(&mem(), 1, 1, &opts),
                Err(AcpiError::PciWindow { .. })
            )
        };
        assert!(bad(PciHost {
            mmio32: (1 << 32, 0x1000),
            ..PCI
        }));
        assert!(bad(PciHost {
            mmio64: (u64::MAX, 2),
            ..PCI
        }));
        assert!(bad(PciHost {
            ecam: 1 << 40,
            ..PCI
        }));
        assert!(bad(PciHost {
            mmio32: (0xe000_0000, 0),
            ..PCI
        }));
    }

    #[test]
    fn fadt_points_at_gpe0_in_both_the_legacy_and_the_extended_fields() {
        let f = fadt(0x1000, 0x2000);
        assert_eq!(
            u32::from_le_bytes(f[80..84].try_into().unwrap()),
            u32::from(ports::GPE0_BLK)
        );
        assert_eq!((f[92], f[93]), (4, 0), "GPE0_BLK_LEN, GPE1_BLK_LEN");
        assert_eq!(&f[220..224], &[1, 32, 0, 1], "I/O, 32 bits, byte access");
        assert_eq!(u64_at(&f, 224), u64::from(ports::GPE0_BLK));
        assert_eq!(
            ports::GPE0_BLK + u16::from(ports::GPE0_BLK_LEN),
            ports::BASE + ports::LEN
        );
    }

    #[test]
    fn gpe_scope_runs_the_pci_hotplug_scan_only_with_a_pci_host() {
        let names = dsdt_names(&AcpiOptions::default());
        assert!(!names.iter().any(|n| n.starts_with("\\_GPE")), "{names:?}");
        let names = dsdt_names(&AcpiOptions {
            pci: Some(PCI),
            ..Default::default()
        });
        assert!(names.contains(&"\\_GPE._E01".to_string()), "{names:?}");
        assert!(names.contains(&"\\_SB_.PCI0.PCNT".to_string()), "{names:?}");
    }

    #[test]
    fn pci_root_has_31_ejectable_slots_and_the_hotplug_registers() {
        let names = dsdt_names(&AcpiOptions {
            pci: Some(PCI),
            ..Default::default()
        });
        for n in [
            "PCST",
            "PCIU",
            "PCID",
            "PCEJ",
            "S01_._ADR",
            "S1F_._SUN",
            "S1F_._EJ0",
        ] {
            assert!(
                names.contains(&format!("\\_SB_.PCI0.{n}")),
                "{n}: {names:?}"
            );
        }
        let slots = names.iter().filter(|n| n.ends_with("._EJ0")).count();
        assert_eq!(slots, 31);
        let t = dsdt(&AcpiOptions {
            pci: Some(PCI),
            ..Default::default()
        })
        .unwrap();
        // OperationRegion (PCST, SystemIO, 0xAE00, 0x0C)
        let region = [
            0x5b, 0x80, b'P', b'C', b'S', b'T', 0x01, 0x0b, 0x00, 0xae, 0x0a, 0x0c,
        ];
        assert!(t.windows(region.len()).any(|w| w == region));
    }

    #[test]
    fn tables_for_32_cpus_fit() {
        assert!(setup_acpi(&mem(), 32, 32).is_ok());
    }
}
