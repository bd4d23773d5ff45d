//! Internal snapshots: the snapshot table (read, and rewritten to new clusters on every
//! change), and creating, applying and deleting snapshots with qemu's refcount rules.
//!
//! A snapshot is a copy of the active L1 table plus an entry in the table. Every cluster
//! reachable from an L1 table (L2 tables, data, preallocated zero and compressed clusters)
//! holds one reference per L1 table that reaches it, so creating a snapshot adds one to each
//! cluster the active L1 reaches and clears their COPIED flags; applying adds the snapshot's
//! references and drops the old active ones; deleting drops the snapshot's. Ordering, as in
//! the rest of the engine: refcounts up and durable before anything references the
//! clusters, the table written to new clusters before the header points at it, references
//! dropped only after nothing on disk points through them.

use std::time::{SystemTime, UNIX_EPOCH};

use super::table::{compressed_host_clusters, get_be64, set_be64, L2Entry, COPIED};
use super::{DiskError, Qcow2Image, QcowError};

/// Most snapshots accepted (qemu's limit).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table accepted.
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Most extra data bytes per entry (qemu's limit).
const MAX_EXTRA_DATA: usize = 1024;
/// Extra data Ember writes: vm_state_size_large, disk_size, icount.
const EXTRA_DATA_LEN: usize = 24;
/// Longest snapshot name (qemu keeps names in a 256-byte buffer).
pub const MAX_NAME_LEN: usize = 255;
/// Where nb_snapshots and snapshots_offset sit in the header (12 bytes).
const HEADER_SNAPSHOT_FIELDS: u64 = 60;

/// One internal snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    /// Instruction count when taken (record/replay), if recorded.
    pub icount: Option<u64>,
    /// Extra data past the fields we know, kept as found.
    pub unknown_extra: Vec<u8>,
    /// The ID and name bytes as found, when either is not UTF-8 (`id` and `name` then
    /// hold a lossy rendering); a rewritten table keeps these bytes.
    pub raw_strings: Option<(Vec<u8>, Vec<u8>)>,
}

/// What the caller of [`Qcow2Image::snapshot_create`] says about the new snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Bytes of VM state the caller saved in the image's VM-state area (0: disk only).
    pub vm_state_size: u64,
    /// Guest run time, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count (qemu-img records 0; None is shown as "--").
    pub icount: Option<u64>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap_or_default())
}

fn be16(b: &[u8], o: usize) -> usize {
    u16::from_be_bytes(b[o..o + 2].try_into().unwrap_or_default()) as usize
}

/// Parses `count` entries of a snapshot table; returns them and the table's length.
pub(super) fn parse_table(
    table: &[u8],
    count: u32,
    cluster_size: u64,
) -> Result<(Vec<Snapshot>, u64), QcowError> {
    let short = || QcowError::Corrupt("snapshot table is truncated".into());
    let mut out = Vec::with_capacity(count as usize);
    let mut at = 0usize;
    for _ in 0..count {
        at = at.next_multiple_of(8);
        let fixed = table.get(at..at + 40).ok_or_else(short)?;
        let (id_len, name_len) = (be16(fixed, 12), be16(fixed, 14));
        let extra_len = be32(fixed, 36) as usize;
        if extra_len > MAX_EXTRA_DATA {
            return Err(QcowError::Corrupt(format!(
                "snapshot extra data of {extra_len} bytes (at most {MAX_EXTRA_DATA})"
            )));
        }
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
        if !l1_table_offset.is_multiple_of(cluster_size)
            || u64::from(l1_size) * 8 > super::header::MAX_L1_BYTES
        {
            return Err(QcowError::Corrupt("snapshot L1 table is invalid".into()));
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
            icount: (extra_len >= 24)
                .then(|| get_be64(extra, 2))
                .filter(|i| *i != u64::MAX),
            unknown_extra: extra.get(EXTRA_DATA_LEN..).unwrap_or_default().to_vec(),
            raw_strings: (std::str::from_utf8(id).is_err() || std::str::from_utf8(name).is_err())
                .then(|| (id.to_vec(), name.to_vec())),
        });
        at = strings_at + id_len + name_len;
    }
    Ok((out, at as u64))
}

/// The on-disk table of `snapshots`; entries without a recorded disk size get `disk_size`.
pub(super) fn serialize_table(snapshots: &[Snapshot], disk_size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for s in snapshots {
        out.resize(out.len().next_multiple_of(8), 0);
        let mut fixed = [0u8; 40];
        fixed[..8].copy_from_slice(&s.l1_table_offset.to_be_bytes());
        fixed[8..12].copy_from_slice(&s.l1_size.to_be_bytes());
        let (id, name) = match &s.raw_strings {
            Some((id, name)) => (id.as_slice(), name.as_slice()),
            None => (s.id.as_bytes(), s.name.as_bytes()),
        };
        fixed[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
        fixed[14..16].copy_from_slice(&(name.len() as u16).to_be_bytes());
        fixed[16..20].copy_from_slice(&s.date_sec.to_be_bytes());
        fixed[20..24].copy_from_slice(&s.date_nsec.to_be_bytes());
        fixed[24..32].copy_from_slice(&s.vm_clock_nsec.to_be_bytes());
        // A state too large for 32 bits reads as "disk only" to old readers, not truncated.
        let small_state = u32::try_from(s.vm_state_size).unwrap_or(0);
        fixed[32..36].copy_from_slice(&small_state.to_be_bytes());
        let extra_len = (EXTRA_DATA_LEN + s.unknown_extra.len()) as u32;
        fixed[36..40].copy_from_slice(&extra_len.to_be_bytes());
        out.extend_from_slice(&fixed);
        out.extend_from_slice(&s.vm_state_size.to_be_bytes());
        out.extend_from_slice(&s.disk_size.unwrap_or(disk_size).to_be_bytes());
        out.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&s.unknown_extra);
        out.extend_from_slice(id);
        out.extend_from_slice(name);
    }
    out
}

/// The ID qemu gives a new snapshot: one more than the largest numeric ID.
fn next_id(snapshots: &[Snapshot]) -> String {
    let numeric = |id: &str| -> u64 {
        let digits: String = id.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap_or(0)
    };
    let max = snapshots.iter().map(|s| numeric(&s.id)).max().unwrap_or(0);
    (max.saturating_add(1)).to_string()
}

fn not_found(what: &str) -> DiskError {
    QcowError::NoSnapshot(what.to_string()).into()
}

/// Host clusters an L1 tree references, each as often as it is referenced (sorted).
struct References {
    clusters: Vec<u64>,
}

impl References {
    /// Adds `count` clusters from `offset` (a table that holds the tree), keeping order.
    fn add_clusters(&mut self, offset: u64, count: u64, cluster_bits: u32) {
        self.clusters
            .extend((0..count).map(|i| (offset >> cluster_bits) + i));
        self.clusters.sort_unstable();
    }

    /// Runs of (cluster index, references).
    fn counted(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.clusters
            .chunk_by(|a, b| a == b)
            .map(|run| (run[0], run.len() as u64))
    }
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
        Ok(parse_table(&table, count, self.cluster_size())?)
    }

    /// Takes a snapshot of the active state named `name` (names need not be unique; the
    /// new ID is). Returns the new table entry.
    pub fn snapshot_create(
        &mut self,
        name: &str,
        meta: SnapshotMeta,
    ) -> Result<Snapshot, DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(QcowError::InvalidOption(format!(
                "snapshot name is {} bytes long; at most {MAX_NAME_LEN} are kept",
                name.len()
            ))
            .into());
        }
        let mut snapshots = self.snapshots()?;
        if snapshots.len() as u64 >= u64::from(MAX_SNAPSHOTS) {
            return Err(QcowError::InvalidOption(format!(
                "the image already has {MAX_SNAPSHOTS} snapshots"
            ))
            .into());
        }
        self.flush_all()?;
        let active = self.l1.clone();
        let refs = self.collect_references(&active)?;
        self.check_refcount_change(&refs, 1)?;
        // The L1 copy (without COPIED flags: they only mean something in the active table).
        let cs = self.cluster_size();
        let l1_bytes = active.len() as u64 * 8;
        let l1_table_offset = if active.is_empty() {
            0
        } else {
            self.alloc_clusters(l1_bytes.div_ceil(cs))?
        };
        let mut copy = vec![0u8; l1_bytes as usize];
        for (i, e) in active.iter().enumerate() {
            set_be64(&mut copy, i, e & !COPIED);
        }
        if !copy.is_empty() {
            self.pwrite(&copy, l1_table_offset, "writing a snapshot L1 table")?;
        }
        self.apply_refcount_change(&refs, 1)?;
        // Every active cluster is shared now: no COPIED flag may remain on disk before the
        // snapshot exists, or an in-place write would change the snapshot. The flags are
        // cleared before the higher refcounts reach the disk, so COPIED never marks a
        // cluster whose on-disk refcount says it is shared; a crash in between leaves
        // refcount 1 without COPIED (harmless: a write copies the cluster; `qemu-img check`
        // reports it as an OFLAG_COPIED error; qemu's own snapshot creation has a similar
        // window).
        self.update_copied_flags()?;
        let (date_sec, date_nsec) = now();
        let snapshot = Snapshot {
            l1_table_offset,
            l1_size: active.len() as u32,
            id: next_id(&snapshots),
            name: name.to_string(),
            date_sec,
            date_nsec,
            vm_clock_nsec: meta.vm_clock_nsec,
            vm_state_size: meta.vm_state_size,
            disk_size: Some(self.header.size),
            icount: meta.icount,
            unknown_extra: Vec::new(),
            raw_strings: None,
        };
        snapshots.push(snapshot.clone());
        // The flags, the L1 copy and the refcounts are durable before the header commits.
        self.write_snapshot_table(&snapshots)?;
        self.flush_all()?;
        Ok(snapshot)
    }

    /// Makes the snapshot with ID or name `id_or_name` (IDs first, as qemu) the active
    /// state, resizing the disk to the size it had then. Returns the snapshot.
    pub fn snapshot_apply(&mut self, id_or_name: &str) -> Result<Snapshot, DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let snapshots = self.snapshots()?;
        let snapshot = snapshots
            .iter()
            .find(|s| s.id == id_or_name)
            .or_else(|| snapshots.iter().find(|s| s.name == id_or_name))
            .cloned()
            .ok_or_else(|| not_found(id_or_name))?;
        let disk_size = snapshot.disk_size.unwrap_or(self.header.size);
        if disk_size > super::header::MAX_VIRTUAL_SIZE {
            return Err(QcowError::Corrupt(format!("snapshot disk size {disk_size}")).into());
        }
        self.flush_all()?;
        let sn_l1 = self.read_l1_table(snapshot.l1_table_offset, snapshot.l1_size)?;
        let new_refs = self.collect_references(&sn_l1)?;
        self.check_refcount_change(&new_refs, 1)?;
        let old_refs = self.collect_references(&self.l1.clone())?;
        let needed = (u64::from(snapshot.l1_size)).max(self.header.l1_entries_for(disk_size));
        if needed > self.l1.len() as u64 {
            self.grow_l1(needed)?;
            self.flush_all()?;
        }
        // The snapshot's tree gains the active references before the L1 points at it.
        self.apply_refcount_change(&new_refs, 1)?;
        self.write_back_refcounts()?;
        self.sync()?;
        let mut l1 = vec![0u64; self.l1.len()];
        for (dst, src) in l1.iter_mut().zip(&sn_l1) {
            *dst = src & !COPIED;
        }
        self.write_l1(&l1)?;
        self.sync()?;
        // Nothing on disk reaches the old tree through the active L1 any more.
        self.forget_cached_tables();
        self.l1 = l1;
        self.apply_refcount_change(&old_refs, -1)?;
        // As in snapshot_delete: the lower refcounts first, then the flags they allow.
        self.write_back_refcounts()?;
        self.sync()?;
        self.update_copied_flags()?;
        if disk_size != self.header.size {
            self.header.size = disk_size;
            self.pwrite(&disk_size.to_be_bytes(), 24, "writing the size")?;
        }
        self.flush_all()?;
        Ok(snapshot)
    }

    /// Deletes the first snapshot named `name` (by name only, as `qemu-img snapshot -d`),
    /// freeing what only it referenced. Returns the deleted entry.
    pub fn snapshot_delete(&mut self, name: &str) -> Result<Snapshot, DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let mut snapshots = self.snapshots()?;
        let index = snapshots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| not_found(name))?;
        self.flush_all()?;
        let snapshot = snapshots.remove(index);
        let sn_l1 = self.read_l1_table(snapshot.l1_table_offset, snapshot.l1_size)?;
        let mut refs = self.collect_references(&sn_l1)?;
        let cs = self.cluster_size();
        let l1_clusters = (u64::from(snapshot.l1_size) * 8).div_ceil(cs);
        refs.add_clusters(
            snapshot.l1_table_offset,
            l1_clusters,
            self.header.cluster_bits,
        );
        self.check_refcount_change(&refs, -1)?;
        // Out of the table first: from then on nothing reaches its tree.
        self.write_snapshot_table(&snapshots)?;
        self.forget_cached_tables();
        self.apply_refcount_change(&refs, -1)?;
        // Lower refcounts are durable before any COPIED flag they allow: on disk, COPIED
        // never marks a cluster whose refcount says it is shared.
        self.write_back_refcounts()?;
        self.sync()?;
        self.update_copied_flags()?;
        self.flush_all()?;
        Ok(snapshot)
    }

    fn read_l1_table(&self, offset: u64, entries: u32) -> Result<Vec<u64>, DiskError> {
        let mut bytes = vec![0u8; entries as usize * 8];
        if !bytes.is_empty() {
            self.pread(&mut bytes, offset, "reading a snapshot L1 table")?;
        }
        Ok((0..entries as usize).map(|i| get_be64(&bytes, i)).collect())
    }

    /// Writes the whole active L1 table (in place) and remembers it.
    fn write_l1(&mut self, l1: &[u64]) -> Result<(), DiskError> {
        let mut bytes = vec![0u8; l1.len() * 8];
        for (i, e) in l1.iter().enumerate() {
            set_be64(&mut bytes, i, *e);
        }
        let at = self.header.l1_table_offset;
        self.pwrite(&bytes, at, "writing the L1 table")
    }

    /// Every host cluster the L1 table `l1` reaches, once per reference (read from disk:
    /// the caller flushed the caches).
    fn collect_references(&mut self, l1: &[u64]) -> Result<References, DiskError> {
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        let mut clusters = Vec::new();
        let mut table = vec![0u8; cs as usize];
        for raw in l1 {
            let (l2, _) = self.geo.decode_l1(*raw)?;
            if l2 == 0 {
                continue;
            }
            self.pread(&mut table, l2, "reading an L2 table")?;
            clusters.push(l2 >> bits);
            for j in 0..(cs / 8) as usize {
                match self.geo.decode_l2(get_be64(&table, j))? {
                    L2Entry::Normal { offset, .. }
                    | L2Entry::Zero {
                        prealloc: Some(offset),
                        ..
                    } => clusters.push(offset >> bits),
                    L2Entry::Compressed { offset, len } => {
                        let (first, n) = compressed_host_clusters(offset, len, bits);
                        clusters.extend((0..n).map(|k| (first >> bits) + k));
                    }
                    L2Entry::Zero { prealloc: None, .. } | L2Entry::Unallocated => {}
                }
            }
        }
        clusters.sort_unstable();
        Ok(References { clusters })
    }

    /// Refuses (before anything changes) a refcount change that would overflow the refcount
    /// width or go below zero, or that touches clusters past the end of the file.
    fn check_refcount_change(&mut self, refs: &References, sign: i64) -> Result<(), DiskError> {
        let end = self.file_len.div_ceil(self.cluster_size());
        let max = self.max_refcount();
        for (cluster, n) in refs.counted() {
            if cluster >= end {
                return Err(QcowError::Corrupt(format!(
                    "a table references cluster {cluster}, past the end of the file"
                ))
                .into());
            }
            let now = self.refcount_of(cluster)?;
            let ok = if sign > 0 {
                now.checked_add(n).is_some_and(|v| v <= max)
            } else {
                now >= n
            };
            if !ok && sign > 0 {
                return Err(QcowError::InvalidOption(format!(
                    "cluster {cluster} would need refcount {} but {}-bit refcounts stop at \
                     {max}; convert the image with a larger refcount_bits",
                    now.saturating_add(n),
                    self.header.refcount_bits()
                ))
                .into());
            } else if !ok {
                return Err(QcowError::Corrupt(format!(
                    "cluster {cluster} has refcount {now} but {n} references"
                ))
                .into());
            }
        }
        Ok(())
    }

    fn apply_refcount_change(&mut self, refs: &References, sign: i64) -> Result<(), DiskError> {
        let bits = self.header.cluster_bits;
        for (cluster, n) in refs.counted() {
            self.change_refcount(cluster << bits, sign * n as i64)?;
        }
        Ok(())
    }

    /// Sets the COPIED flag of every active L1 and L2 entry whose cluster has refcount
    /// one and clears the others, writing the tables that change (no sync: the caller's
    /// next commit point makes them durable).
    fn update_copied_flags(&mut self) -> Result<(), DiskError> {
        let cs = self.cluster_size();
        let mut table = vec![0u8; cs as usize];
        let mut l1 = self.l1.clone();
        for entry in l1.iter_mut() {
            let (l2, _) = self.geo.decode_l1(*entry)?;
            if l2 == 0 {
                continue;
            }
            self.pread(&mut table, l2, "reading an L2 table")?;
            let mut changed = false;
            for j in 0..(cs / 8) as usize {
                let raw = get_be64(&table, j);
                let host = match self.geo.decode_l2(raw)? {
                    L2Entry::Normal { offset, .. }
                    | L2Entry::Zero {
                        prealloc: Some(offset),
                        ..
                    } => offset,
                    _ => continue,
                };
                let want = if self.refcount(host)? == 1 {
                    raw | COPIED
                } else {
                    raw & !COPIED
                };
                if want != raw {
                    set_be64(&mut table, j, want);
                    changed = true;
                }
            }
            if changed {
                self.l2_cache.remove(l2);
                self.pwrite(&table, l2, "writing an L2 table")?;
            }
            *entry = if self.refcount(l2)? == 1 {
                l2 | COPIED
            } else {
                l2
            };
        }
        if l1 != self.l1 {
            self.write_l1(&l1)?;
            self.l1 = l1;
        }
        Ok(())
    }

    /// Drops cached L2 tables and decompressed data (they were written back; their
    /// clusters may be freed and reused now), so later reads see the new tree.
    fn forget_cached_tables(&mut self) {
        self.l2_cache = super::MetaCache::new(super::L2_CACHE_TABLES);
        self.decompressed = None;
        self.compressed_cursor = None;
    }

    /// Writes `snapshots` as a new table in new clusters, points the header at it, then
    /// frees the old table.
    fn write_snapshot_table(&mut self, snapshots: &[Snapshot]) -> Result<(), DiskError> {
        let cs = self.cluster_size();
        let bytes = serialize_table(snapshots, self.header.size);
        if bytes.len() as u64 > MAX_TABLE_BYTES {
            return Err(
                QcowError::InvalidOption("the snapshot table would exceed 64 MiB".into()).into(),
            );
        }
        let old_offset = self.header.snapshots_offset;
        let old_len = self.snapshot_table_len()?;
        let offset = if bytes.is_empty() {
            0
        } else {
            let at = self.alloc_clusters((bytes.len() as u64).div_ceil(cs))?;
            self.pwrite(&bytes, at, "writing the snapshot table")?;
            at
        };
        // The table and its refcounts are durable before the header points at it.
        self.flush_all()?;
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&(snapshots.len() as u32).to_be_bytes());
        fields[4..].copy_from_slice(&offset.to_be_bytes());
        self.pwrite(
            &fields,
            HEADER_SNAPSHOT_FIELDS,
            "writing the snapshot table location",
        )?;
        self.sync()?;
        self.header.nb_snapshots = snapshots.len() as u32;
        self.header.snapshots_offset = offset;
        for i in 0..old_len.div_ceil(cs) {
            self.change_refcount(old_offset + i * cs, -1)?;
        }
        Ok(())
    }
}

/// Now, as qemu records it: seconds and microseconds (in nanoseconds).
fn now() -> (u32, u32) {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_secs() as u32, t.subsec_micros() * 1000)
}
