//! L1/L2 entries: decoding with every offset checked, and encoding.

use super::QcowError;

/// Offset bits of L1 and standard L2 entries (9..55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount is exactly one: the cluster may be written in place.
pub const COPIED: u64 = 1 << 63;
/// A compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Reads as zeros (v3).
pub const ZERO: u64 = 1;
/// Bits of a standard L2 entry that must be zero.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits of an L1 entry that must be zero.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// What a guest cluster maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Nothing here: read the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; may keep a preallocated host cluster.
    Zero {
        /// The preallocated host cluster.
        prealloc: Option<u64>,
        /// Its refcount is exactly one.
        copied: bool,
    },
    /// Data at a host cluster.
    Normal {
        /// Host offset of the cluster.
        offset: u64,
        /// Refcount is exactly one.
        copied: bool,
    },
    /// Compressed data.
    Compressed {
        /// Host byte offset of the compressed data.
        offset: u64,
        /// Bytes of compressed data, up to the end of its last sector.
        len: u64,
    },
}

/// Geometry needed to decode entries.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// qcow2 version.
    pub version: u32,
}

impl Geometry {
    /// Bit where the compressed sector count starts.
    fn compressed_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Decodes an L2 entry; misaligned offsets and reserved bits are corruption.
    pub fn decode_l2(&self, raw: u64) -> Result<L2Entry, QcowError> {
        if raw & COMPRESSED != 0 {
            let shift = self.compressed_shift();
            let offset = raw & ((1u64 << shift) - 1);
            let sectors = ((raw >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            let len = sectors * 512 - (offset & 511);
            if offset == 0 {
                return Err(QcowError::Corrupt("compressed cluster at offset 0".into()));
            }
            return Ok(L2Entry::Compressed { offset, len });
        }
        if raw & L2_RESERVED != 0 {
            return Err(QcowError::Corrupt(format!(
                "L2 entry {raw:#x} has reserved bits set"
            )));
        }
        let offset = raw & OFFSET_MASK;
        let copied = raw & COPIED != 0;
        if offset & ((1 << self.cluster_bits) - 1) != 0 {
            return Err(QcowError::Corrupt(format!(
                "L2 entry {raw:#x} points at an unaligned cluster"
            )));
        }
        if raw & ZERO != 0 {
            if self.version < 3 {
                return Err(QcowError::Corrupt("zero cluster in a v2 image".into()));
            }
            let prealloc = (offset != 0).then_some(offset);
            return Ok(L2Entry::Zero { prealloc, copied });
        }
        if offset == 0 {
            if copied {
                return Err(QcowError::Corrupt(
                    "L2 entry with offset 0 and the copied flag (external data)".into(),
                ));
            }
            return Ok(L2Entry::Unallocated);
        }
        Ok(L2Entry::Normal { offset, copied })
    }

    /// Encodes an L2 entry.
    pub fn encode_l2(&self, e: L2Entry) -> u64 {
        let copied = |c: bool| if c { COPIED } else { 0 };
        match e {
            L2Entry::Unallocated => 0,
            L2Entry::Zero {
                prealloc,
                copied: c,
            } => prealloc.unwrap_or(0) | ZERO | copied(c),
            L2Entry::Normal { offset, copied: c } => offset | copied(c),
            L2Entry::Compressed { offset, len } => {
                let extra_sectors = ((offset + len - 1) >> 9) - (offset >> 9);
                COMPRESSED | (extra_sectors << self.compressed_shift()) | offset
            }
        }
    }

    /// The L2 table offset of an L1 entry (0 if none); misaligned tables are corruption.
    pub fn decode_l1(&self, raw: u64) -> Result<(u64, bool), QcowError> {
        if raw & L1_RESERVED != 0 {
            return Err(QcowError::Corrupt(format!(
                "L1 entry {raw:#x} has reserved bits set"
            )));
        }
        let offset = raw & OFFSET_MASK;
        if offset & ((1 << self.cluster_bits) - 1) != 0 {
            return Err(QcowError::Corrupt(format!(
                "L1 entry {raw:#x} points at an unaligned L2 table"
            )));
        }
        Ok((offset, raw & COPIED != 0))
    }
}

/// Host clusters a compressed cluster's data touches: (first cluster offset, count).
pub fn compressed_host_clusters(offset: u64, len: u64, cluster_bits: u32) -> (u64, u64) {
    let first = offset >> cluster_bits;
    let last = (offset + len - 1) >> cluster_bits;
    (first << cluster_bits, last - first + 1)
}

/// Reads entry `index` of a big-endian u64 table.
pub fn get_be64(table: &[u8], index: usize) -> u64 {
    u64::from_be_bytes(
        table[index * 8..index * 8 + 8]
            .try_into()
            .unwrap_or_default(),
    )
}

/// Writes entry `index` of a big-endian u64 table.
pub fn set_be64(table: &mut [u8], index: usize, value: u64) {
    table[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const G3: Geometry = Geometry {
        cluster_bits: 16,
        version: 3,
    };

    #[test]
    fn entries_round_trip() {
        for e in [
            L2Entry::Unallocated,
            L2Entry::Normal {
                offset: 5 << 16,
                copied: true,
            },
            L2Entry::Normal {
                offset: 7 << 16,
                copied: false,
            },
            L2Entry::Zero {
                prealloc: None,
                copied: false,
            },
            L2Entry::Zero {
                prealloc: Some(9 << 16),
                copied: true,
            },
            L2Entry::Compressed {
                offset: 0x12_3456,
                len: 0x12_3800 + 1024 - 0x12_3456,
            },
        ] {
            assert_eq!(G3.decode_l2(G3.encode_l2(e)).unwrap(), e, "{e:?}");
        }
    }

    #[test]
    fn compressed_length_spans_whole_sectors() {
        // Offset 0x1100 with one additional sector: data up to 0x1400.
        let raw = COMPRESSED | (1 << (62 - 8)) | 0x1100;
        assert_eq!(
            G3.decode_l2(raw).unwrap(),
            L2Entry::Compressed {
                offset: 0x1100,
                len: 0x300
            }
        );
        assert_eq!(compressed_host_clusters(0xfff0, 0x20, 16), (0, 2));
    }

    #[test]
    fn corrupt_entries_are_errors() {
        assert!(G3.decode_l2((5 << 16) | 0x200).is_err()); // unaligned
        assert!(G3.decode_l2((5 << 16) | 0x2).is_err()); // reserved bit
        assert!(G3.decode_l2(COPIED).is_err()); // offset 0 with copied
        let g2 = Geometry {
            cluster_bits: 16,
            version: 2,
        };
        assert!(g2.decode_l2(ZERO).is_err());
        assert!(G3.decode_l1((3 << 16) | 1).is_err());
        assert!(G3.decode_l1(3 << 12).is_err());
        assert_eq!(G3.decode_l1((3 << 16) | COPIED).unwrap(), (3 << 16, true));
    }
}
