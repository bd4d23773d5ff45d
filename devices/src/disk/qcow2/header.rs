//! The qcow2 header (v2 and v3), its extensions and the backing file name: parsed with
//! every field checked, and written back whole.

use super::QcowError;

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest and largest cluster sizes we open (512 B .. 2 MiB, as qemu).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table we load (qemu's limit).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table we load (qemu's limit).
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Largest virtual size accepted (what L1/L2 tables can address).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be inconsistent (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// The image is known to be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external file.
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    /// `compression_type` is not zlib.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// Extended L2 entries (subclusters).
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// All bits with a meaning.
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts may be used.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
}

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_EXTERNAL_DATA: u32 = 0x4441_5441;

/// Compressed-cluster algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (qemu's "zlib").
    Zlib,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// The bitmaps header extension (kept so check can account for the bitmap clusters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub count: u32,
    /// Size of the bitmap directory.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
}

/// A parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the fixed header.
    pub header_length: u32,
    /// Compressed-cluster algorithm.
    pub compression: Compression,
    /// Backing file name, as stored.
    pub backing_file: Option<String>,
    /// Backing file format (header extension).
    pub backing_format: Option<String>,
    /// Bitmaps extension, if present.
    pub bitmaps: Option<BitmapsExt>,
    /// Feature names from the feature table: (kind, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// Extensions we do not interpret, kept verbatim when the header is rewritten.
    pub other_extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap_or_default())
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap_or_default())
}

fn corrupt(msg: impl Into<String>) -> QcowError {
    QcowError::Corrupt(msg.into())
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Names of incompatible bits set in `bits` (from the image's own table when it has one).
    fn incompatible_names(&self, bits: u64) -> String {
        (0..64)
            .filter(|b| bits & (1 << b) != 0)
            .map(|b| {
                self.feature_names
                    .iter()
                    .find(|(k, bit, _)| *k == 0 && u32::from(*bit) == b)
                    .map_or_else(|| format!("bit {b}"), |(_, _, n)| n.clone())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Parses the first cluster of an image (`buf`, at least the header's cluster), checking
    /// every field against the spec and against `file_len`.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, QcowError> {
        if buf.len() < 72 || be32(buf, 0) != MAGIC {
            return Err(QcowError::NotQcow2);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(QcowError::Unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} is outside 9..=21"
            )));
        }
        if be32(buf, 32) != 0 {
            return Err(QcowError::Unsupported("encrypted images".into()));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression: Compression::Zlib,
            backing_file: None,
            backing_format: None,
            bitmaps: None,
            feature_names: Vec::new(),
            other_extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(corrupt("v3 header is truncated"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104
                || !h.header_length.is_multiple_of(8)
                || u64::from(h.header_length) > h.cluster_size()
                || h.header_length as usize > buf.len()
            {
                return Err(corrupt(format!("bad header_length {}", h.header_length)));
            }
            if h.refcount_order > 6 {
                return Err(corrupt(format!("refcount_order {} > 6", h.refcount_order)));
            }
            if h.header_length > 104 {
                h.compression = match buf[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    t => return Err(QcowError::Unsupported(format!("compression type {t}"))),
                };
            }
        }
        h.parse_extensions(buf)?;
        h.parse_backing_name(buf)?;
        h.check_features()?;
        h.check_layout(file_len)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<(), QcowError> {
        let cs = self.cluster_size().min(buf.len() as u64) as usize;
        let mut off = self.header_length as usize;
        let backing_at = self.backing_name_offset(buf).unwrap_or(cs);
        while off + 8 <= cs.min(backing_at) {
            let (kind, len) = (be32(buf, off), be32(buf, off + 4) as usize);
            off += 8;
            if kind == EXT_END {
                return Ok(());
            }
            let end = off
                .checked_add(len)
                .filter(|e| *e <= cs)
                .ok_or_else(|| corrupt("header extension runs past the first cluster"))?;
            let data = &buf[off..end];
            match kind {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned())
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name = e[2..].split(|b| *b == 0).next().unwrap_or(&[]);
                        let name = String::from_utf8_lossy(name).into_owned();
                        self.feature_names.push((e[0], e[1], name));
                    }
                }
                EXT_BITMAPS if data.len() >= 24 => {
                    self.bitmaps = Some(BitmapsExt {
                        count: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    })
                }
                EXT_EXTERNAL_DATA => {
                    return Err(QcowError::Unsupported("external data files".into()))
                }
                other => self.other_extensions.push((other, data.to_vec())),
            }
            off = end.next_multiple_of(8);
        }
        Ok(())
    }

    fn backing_name_offset(&self, buf: &[u8]) -> Option<usize> {
        let off = be64(buf, 8);
        (off != 0).then_some(off.min(usize::MAX as u64) as usize)
    }

    fn parse_backing_name(&mut self, buf: &[u8]) -> Result<(), QcowError> {
        let Some(off) = self.backing_name_offset(buf) else {
            return Ok(());
        };
        let len = be32(buf, 16);
        if len == 0 {
            return Ok(());
        }
        if len > MAX_BACKING_NAME {
            return Err(corrupt(format!("backing file name of {len} bytes")));
        }
        let end = off
            .checked_add(len as usize)
            .filter(|e| *e as u64 <= self.cluster_size() && *e <= buf.len())
            .ok_or_else(|| corrupt("backing file name lies outside the first cluster"))?;
        let name = String::from_utf8(buf[off..end].to_vec())
            .map_err(|_| corrupt("backing file name is not UTF-8"))?;
        self.backing_file = Some(name);
        Ok(())
    }

    fn check_features(&self) -> Result<(), QcowError> {
        let unknown = self.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            return Err(QcowError::Unsupported(format!(
                "incompatible features {}",
                self.incompatible_names(unknown)
            )));
        }
        if self.incompatible_features & incompat::EXTERNAL_DATA != 0 {
            return Err(QcowError::Unsupported("external data files".into()));
        }
        if self.incompatible_features & incompat::EXTENDED_L2 != 0 {
            return Err(QcowError::Unsupported(
                "extended L2 entries (subclusters)".into(),
            ));
        }
        let typed = self.incompatible_features & incompat::COMPRESSION_TYPE != 0;
        if typed != (self.compression != Compression::Zlib) {
            return Err(corrupt(
                "compression type bit and compression_type field disagree",
            ));
        }
        Ok(())
    }

    fn check_layout(&self, file_len: u64) -> Result<(), QcowError> {
        let cs = self.cluster_size();
        let aligned = |o: u64| o.is_multiple_of(cs);
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(corrupt(format!("virtual size {} is too large", self.size)));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table of {} entries is too large",
                self.l1_size
            )));
        }
        if u64::from(self.l1_size) < self.l1_entries_for(self.size) {
            return Err(corrupt("L1 table is too small for the virtual size"));
        }
        if !aligned(self.l1_table_offset) || (self.l1_size > 0 && self.l1_table_offset == 0) {
            return Err(corrupt("L1 table offset is not cluster aligned"));
        }
        if self.l1_table_offset.saturating_add(l1_bytes) > file_len {
            return Err(corrupt("L1 table lies past the end of the file"));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if self.refcount_table_clusters == 0 || rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table of {} clusters",
                self.refcount_table_clusters
            )));
        }
        if !aligned(self.refcount_table_offset) || self.refcount_table_offset == 0 {
            return Err(corrupt("refcount table offset is not cluster aligned"));
        }
        if self.refcount_table_offset.saturating_add(rt_bytes) > file_len {
            return Err(corrupt("refcount table lies past the end of the file"));
        }
        if self.nb_snapshots > 0
            && (!aligned(self.snapshots_offset) || self.snapshots_offset >= file_len)
        {
            return Err(corrupt("snapshot table offset is invalid"));
        }
        Ok(())
    }

    /// L1 entries needed for a virtual size.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let per_l2 = self.cluster_size() / 8 * self.cluster_size();
        size.div_ceil(per_l2)
    }

    /// The first cluster as written: header, extensions, backing name.
    pub fn serialize(&self) -> Result<Vec<u8>, QcowError> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; self.header_length as usize];
        let put32 = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let put64 = |b: &mut [u8], o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            if self.header_length > 104 {
                b[104] = (self.compression == Compression::Zstd) as u8;
            }
        }
        let mut ext = |kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        };
        if let Some(fmt) = &self.backing_format {
            ext(EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        if self.version >= 3 {
            ext(EXT_FEATURE_TABLE, &feature_table());
        }
        if let Some(bm) = self.bitmaps {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&bm.count.to_be_bytes());
            d.extend_from_slice(&[0; 4]);
            d.extend_from_slice(&bm.directory_size.to_be_bytes());
            d.extend_from_slice(&bm.directory_offset.to_be_bytes());
            ext(EXT_BITMAPS, &d);
        }
        for (kind, data) in &self.other_extensions {
            ext(*kind, data);
        }
        ext(EXT_END, &[]);
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(QcowError::Unsupported(format!(
                    "backing file name longer than {MAX_BACKING_NAME} bytes"
                )));
            }
            let off = b.len() as u64;
            b.extend_from_slice(name.as_bytes());
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        }
        if b.len() > cs {
            return Err(QcowError::Unsupported(
                "header, extensions and backing name do not fit in one cluster".into(),
            ));
        }
        Ok(b)
    }
}

/// The feature name table we write into v3 images.
fn feature_table() -> Vec<u8> {
    let entries: [(u8, u8, &str); 7] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
    ];
    let mut t = Vec::with_capacity(entries.len() * 48);
    for (kind, bit, name) in entries {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        t.extend_from_slice(&e);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(version: u32) -> Header {
        Header {
            version,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: if version == 3 { 112 } else { 72 },
            compression: Compression::Zlib,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            bitmaps: None,
            feature_names: Vec::new(),
            other_extensions: vec![(0x1234_5678, vec![1, 2, 3])],
        }
    }

    fn cluster(h: &Header) -> Vec<u8> {
        let mut c = h.serialize().unwrap();
        c.resize(h.cluster_size() as usize, 0);
        c
    }

    #[test]
    fn v2_and_v3_headers_round_trip() {
        for v in [2, 3] {
            let h = sample(v);
            let mut parsed = Header::parse(&cluster(&h), 1 << 20).unwrap();
            parsed.feature_names.clear();
            assert_eq!(parsed, h, "version {v}");
        }
    }

    #[test]
    fn unknown_incompatible_bit_is_refused_by_name() {
        let mut h = sample(3);
        h.incompatible_features = 1 << 9;
        let err = Header::parse(&cluster(&h), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("bit 9"), "{err}");
    }

    #[test]
    fn hostile_fields_are_refused() {
        let base = cluster(&sample(3));
        let mut cases: Vec<(usize, Vec<u8>)> = vec![
            (20, 8u32.to_be_bytes().to_vec()),  // cluster_bits too small
            (20, 30u32.to_be_bytes().to_vec()), // cluster_bits too large
            (32, 1u32.to_be_bytes().to_vec()),  // encrypted
            (36, 0xffff_ffffu32.to_be_bytes().to_vec()), // absurd L1
            (40, 12345u64.to_be_bytes().to_vec()), // unaligned L1
            (48, (1u64 << 40).to_be_bytes().to_vec()), // refcount table past EOF
            (56, 0u32.to_be_bytes().to_vec()),  // empty refcount table
            (96, 7u32.to_be_bytes().to_vec()),  // refcount_order 7
            (100, 99u32.to_be_bytes().to_vec()), // header_length
            (16, 5000u32.to_be_bytes().to_vec()), // backing name too long
            (4, 4u32.to_be_bytes().to_vec()),   // version 4
        ];
        cases.push((24, u64::MAX.to_be_bytes().to_vec())); // absurd size
        for (off, bytes) in cases {
            let mut c = base.clone();
            c[off..off + bytes.len()].copy_from_slice(&bytes);
            assert!(
                Header::parse(&c, 1 << 20).is_err(),
                "field at {off} accepted"
            );
        }
        assert!(matches!(
            Header::parse(&[0u8; 100], 100),
            Err(QcowError::NotQcow2)
        ));
        assert!(Header::parse(&base[..50], 1 << 20).is_err());
    }

    #[test]
    fn extension_running_past_the_cluster_is_refused() {
        let h = sample(3);
        let mut c = cluster(&h);
        let at = h.header_length as usize;
        c[at + 4..at + 8].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        assert!(Header::parse(&c, 1 << 20).is_err());
    }
}
