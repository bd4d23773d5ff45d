//! The internal snapshot table: read so snapshots are listed by `info` and their clusters
//! are counted by `check` (Ember preserves snapshots; it does not create or apply them).

use super::table::get_be64;
use super::{DiskError, Qcow2Image, QcowError};

/// Most snapshots accepted (qemu's limit).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table accepted.
const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One internal snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Its L1 table.
    pub l1_table_offset: u64,
    /// Entries in its L1 table.
    pub l1_size: u32,
    /// Unique ID.
    pub id: String,
    /// Name.
    pub name: String,
    /// Seconds since the epoch when taken.
    pub date_sec: u32,
    /// Nanoseconds part.
    pub date_nsec: u32,
    /// Guest run time when taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of saved VM state.
    pub vm_state_size: u64,
    /// Virtual disk size when taken (from the extra data, if present).
    pub disk_size: Option<u64>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap_or_default())
}

fn be16(b: &[u8], o: usize) -> usize {
    u16::from_be_bytes(b[o..o + 2].try_into().unwrap_or_default()) as usize
}

impl Qcow2Image {
    /// Reads the snapshot table.
    pub fn snapshots(&mut self) -> Result<Vec<Snapshot>, DiskError> {
        Ok(self.parse_snapshots()?.0)
    }

    /// Bytes the snapshot table occupies (for refcount accounting).
    pub fn snapshot_table_len(&mut self) -> Result<u64, DiskError> {
        Ok(self.parse_snapshots()?.1)
    }

    fn parse_snapshots(&mut self) -> Result<(Vec<Snapshot>, u64), DiskError> {
        let count = self.header.nb_snapshots;
        if count == 0 {
            return Ok((Vec::new(), 0));
        }
        if count > MAX_SNAPSHOTS {
            return Err(QcowError::Corrupt(format!("{count} snapshots")).into());
        }
        let start = self.header.snapshots_offset;
        let avail = self.file_len.saturating_sub(start).min(MAX_TABLE_BYTES);
        let mut table = vec![0u8; avail as usize];
        self.pread(&mut table, start, "reading the snapshot table")?;
        let short = || DiskError::from(QcowError::Corrupt("snapshot table is truncated".into()));
        let mut out = Vec::with_capacity(count as usize);
        let mut at = 0usize;
        for _ in 0..count {
            let fixed = table.get(at..at + 40).ok_or_else(short)?;
            let (id_len, name_len) = (be16(fixed, 12), be16(fixed, 14));
            let extra_len = be32(fixed, 36) as usize;
            let extra = table.get(at + 40..at + 40 + extra_len).ok_or_else(short)?;
            let strings_at = at + 40 + extra_len;
            let id = table
                .get(strings_at..strings_at + id_len)
                .ok_or_else(short)?;
            let name = table
                .get(strings_at + id_len..strings_at + id_len + name_len)
                .ok_or_else(short)?;
            let l1_table_offset = get_be64(fixed, 0);
            let l1_size = be32(fixed, 8);
            if !l1_table_offset.is_multiple_of(self.cluster_size())
                || u64::from(l1_size) * 8 > super::header::MAX_L1_BYTES
            {
                return Err(QcowError::Corrupt("snapshot L1 table is invalid".into()).into());
            }
            out.push(Snapshot {
                l1_table_offset,
                l1_size,
                id: String::from_utf8_lossy(id).into_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
                date_sec: be32(fixed, 16),
                date_nsec: be32(fixed, 20),
                vm_clock_nsec: get_be64(fixed, 3),
                vm_state_size: if extra_len >= 8 {
                    get_be64(extra, 0)
                } else {
                    u64::from(be32(fixed, 32))
                },
                disk_size: (extra_len >= 16).then(|| get_be64(extra, 1)),
            });
            at = (strings_at + id_len + name_len).next_multiple_of(8);
        }
        Ok((out, at as u64))
    }
}
