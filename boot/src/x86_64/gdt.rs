//! The flat GDT the boot vCPU starts with, and its segments in KVM's form.

use kvm_bindings::kvm_segment;

/// Flags of a 64-bit code segment (present, DPL 0, execute/read, L=1).
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Flags of a 32-bit code segment (present, DPL 0, execute/read, D=1, G=1).
pub const CODE32_FLAGS: u16 = 0xc09b;
/// Flags of a 32-bit data segment (present, DPL 0, read/write, D=1, G=1).
pub const DATA_FLAGS: u16 = 0xc093;
/// Flags of a 64-bit TSS (present, busy).
pub const TSS_FLAGS: u16 = 0x808b;

/// Selector (index * 8) of the code segment.
pub const CODE_SELECTOR: u16 = 1 << 3;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 2 << 3;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 3 << 3;

/// Encodes one GDT descriptor from its flags (access byte in bits 0..8, flags nibble in
/// bits 12..16), base and 20-bit limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The boot GDT: null, code (64-bit when `long_mode`, else 32-bit), data, TSS.
pub fn boot_gdt(long_mode: bool) -> [u64; 4] {
    let code = if long_mode {
        CODE64_FLAGS
    } else {
        CODE32_FLAGS
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

/// Decodes descriptor `entry`, loaded with `selector`, into the segment KVM takes.
pub fn kvm_segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let granular = (entry >> 55) & 1 == 1;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        // With G=1 the limit counts 4 KiB pages; KVM wants it in bytes.
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_decodes_as_long_mode_ring0() {
        let seg = kvm_segment_from_gdt(gdt_entry(CODE64_FLAGS, 0, 0xfffff), CODE_SELECTOR);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.dpl, 0);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.s, 1);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.selector, 8);
    }

    #[test]
    fn base_and_limit_survive_encoding() {
        let e = gdt_entry(DATA_FLAGS, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from_gdt(e, DATA_SELECTOR);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcd_efff);
        assert_eq!(seg.type_, 3);
    }

    #[test]
    fn known_encodings_match_the_manual() {
        // The classic flat 64-bit code and data descriptors.
        assert_eq!(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(CODE32_FLAGS, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }
}
