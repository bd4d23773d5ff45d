//! ACPI tables: RSDP, XSDT, FADT (+FACS, DSDT) and MADT.
//!
//! A full (not hardware-reduced) FADT with a PM1a event/control block on I/O ports, so a guest
//! keeps its legacy ISA interrupts and can power off by writing SLP_TYP/SLP_EN, and the reset
//! register for ACPI reboot. The DSDT holds only the `\_S5` sleep package.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{ACPI_END, ACPI_START, APIC_START, IOAPIC_START};

/// I/O ports the ACPI PM device answers on (the VMM emulates them).
pub mod ports {
    /// PM1a event block: status (2 bytes) then enable (2 bytes).
    pub const PM1A_EVT: u16 = 0x600;
    /// PM1a control block (2 bytes): SCI_EN, SLP_TYP, SLP_EN.
    pub const PM1A_CNT: u16 = 0x604;
    /// Reset register (1 byte).
    pub const RESET: u16 = 0x608;
    /// First port of the block.
    pub const BASE: u16 = PM1A_EVT;
    /// Number of ports in the block.
    pub const LEN: u16 = 9;
}

/// Value that, written to the reset register, resets the machine.
pub const RESET_VALUE: u8 = 0x1;
/// SLP_TYP value of S5 (soft off) given in `\_S5`.
pub const SLP_TYP_S5: u16 = 5;
/// SCI interrupt (ISA IRQ 9, as on PCs).
pub const SCI_IRQ: u8 = 9;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// The tables do not fit in the BIOS area.
    #[error("ACPI tables do not fit in guest memory")]
    Write,
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

fn dsdt() -> Vec<u8> {
    // Name (_S5, Package (4) { 5, 5, 0, 0 })
    let s5 = [
        0x08,
        b'_',
        b'S',
        b'5',
        b'_',
        0x12,
        0x08,
        0x04,
        0x0a,
        SLP_TYP_S5 as u8,
        0x0a,
        SLP_TYP_S5 as u8,
        0x00,
        0x00,
    ];
    Sdt::new(b"DSDT", 2).bytes(&s5).finish()
}

fn facs() -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&64u32.to_le_bytes());
    f[32] = 2; // version
    f
}

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut b = vec![0u8; 276 - 36];
    let mut put = |off: usize, v: &[u8]| b[off - 36..off - 36 + v.len()].copy_from_slice(v);
    put(36, &(facs as u32).to_le_bytes());
    put(40, &(dsdt as u32).to_le_bytes());
    put(46, &u16::from(SCI_IRQ).to_le_bytes());
    // SMI_CMD = 0: the machine is always in ACPI mode.
    put(56, &u32::from(ports::PM1A_EVT).to_le_bytes());
    put(64, &u32::from(ports::PM1A_CNT).to_le_bytes());
    put(88, &[4, 2, 0, 0]); // PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN
    put(96, &101u16.to_le_bytes()); // no C2
    put(98, &1001u16.to_le_bytes()); // no C3
                                     // IAPC_BOOT_ARCH: legacy devices, 8042, no VGA, no ASPM control.
    put(
        109,
        &((1u16 << 0) | (1 << 1) | (1 << 2) | (1 << 4)).to_le_bytes(),
    );
    // Flags: WBINVD, power and sleep buttons not fixed, reset register supported.
    put(
        112,
        &((1u32 << 0) | (1 << 4) | (1 << 5) | (1 << 10)).to_le_bytes(),
    );
    put(116, &gas_io(ports::RESET, 1));
    put(128, &[RESET_VALUE]);
    put(131, &[4]); // FADT minor version (6.4)
    put(132, &facs.to_le_bytes());
    put(140, &dsdt.to_le_bytes());
    put(148, &gas_io(ports::PM1A_EVT, 4));
    put(172, &gas_io(ports::PM1A_CNT, 2));
    put(268, b"EMBERVMM");
    Sdt::new(b"FACP", 6).bytes(&b).finish()
}

fn madt(cpus: u8, ioapic_id: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259s
    for cpu in 0..cpus {
        b.extend_from_slice(&[0, 8, cpu, cpu]);
        b.extend_from_slice(&1u32.to_le_bytes()); // enabled
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

/// Writes all tables from [`ACPI_START`]; returns the RSDP's address.
pub fn setup_acpi(mem: &GuestMemoryMmap, cpus: u8, ioapic_id: u8) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI_START;
    let facs_addr = align(rsdp_addr + 36, 64);
    let dsdt_addr = facs_addr + 64;
    let dsdt = dsdt();
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64, 8);
    let fadt = fadt(facs_addr, dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64, 8);
    let madt = madt(cpus, ioapic_id);
    let xsdt_addr = align(madt_addr + madt.len() as u64, 8);
    let xsdt = Sdt::new(b"XSDT", 1)
        .bytes(&fadt_addr.to_le_bytes())
        .bytes(&madt_addr.to_le_bytes())
        .finish();
    if xsdt_addr + xsdt.len() as u64 > ACPI_END {
        return Err(AcpiError::Write);
    }
    for (addr, table) in [
        (rsdp_addr, rsdp(xsdt_addr)),
        (facs_addr, facs()),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (xsdt_addr, xsdt),
    ] {
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
        let t = madt(3, 3);
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
    fn tables_for_32_cpus_fit() {
        assert!(setup_acpi(&mem(), 32, 32).is_ok());
    }
}
