//! Ember's qcow2 engine: versions 2 and 3, cluster sizes 512 B to 2 MiB, refcount widths 1
//! to 64 bits, L2 and refcount-block caches, allocation with correct refcounts, refcount
//! table growth, zero clusters, compressed clusters (deflate; zstd on read), discard,
//! backing chains, internal snapshots preserved.
//!
//! Crash safety follows qemu's rules. Refcounts go up before anything references the new
//! cluster, and reach the disk (written and synced) before a dirty L2 table that references
//! them is written back; guest data is written before the L2 entry pointing at it; a new L2
//! table is on disk before the L1 entry pointing at it. Clusters are only freed (refcount
//! down) after the table that dropped them is on disk. So an interrupted write leaves at most
//! leaked clusters, never a reference to a free one; a guest flush makes everything durable.

mod cache;
pub mod check;
pub mod compress;
pub mod header;
mod refcount;
pub mod snapshot;

pub use snapshot::{Snapshot, SnapshotMeta};
pub mod table;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use cache::MetaCache;
use header::{incompat, Compression, Header};
use table::{get_be64, set_be64, Geometry, L2Entry, COPIED};

use super::{
    check_range, open_in_chain, DiskError, DiskImage, Extent, HostFile, ImageFormat, OpenOptions,
};

/// qcow2-specific errors.
#[derive(Debug, thiserror::Error)]
pub enum QcowError {
    /// No qcow2 magic.
    #[error("not a qcow2 image")]
    NotQcow2,
    /// A feature we do not implement.
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(String),
    /// Inconsistent metadata.
    #[error("corrupt qcow2 image: {0}")]
    Corrupt(String),
    /// The image is marked corrupt; it opens read-only only.
    #[error("the image is marked corrupt; repair it with 'ember img check -r all'")]
    MarkedCorrupt,
    /// Bad creation parameters.
    #[error("{0}")]
    InvalidOption(String),
    /// No internal snapshot has that ID or name.
    #[error("snapshot '{0}' not found")]
    NoSnapshot(String),
}

/// L2 tables kept in memory.
const L2_CACHE_TABLES: usize = 64;
/// Refcount blocks kept in memory.
const REFCOUNT_CACHE_BLOCKS: usize = 16;

/// An open qcow2 image.
pub struct Qcow2Image {
    file: HostFile,
    path: PathBuf,
    header: Header,
    geo: Geometry,
    read_only: bool,
    l1: Vec<u64>,
    l2_cache: MetaCache,
    /// Some dirty L2 table references clusters whose refcounts may not be synced yet.
    l2_needs_refcount_sync: bool,
    refcount_table: Vec<u64>,
    refcount_cache: MetaCache,
    /// Where the next free-cluster search starts (cluster index).
    free_hint: u64,
    /// One past the highest cluster ever allocated by this process.
    alloc_end: u64,
    /// Host clusters to release once the tables that dropped them are on disk.
    pending_free: Vec<u64>,
    /// Bytes of the host file (the highest byte written or found).
    file_len: u64,
    backing: Option<Box<dyn DiskImage>>,
    /// The last decompressed cluster: (L2 entry, data).
    decompressed: Option<(u64, Vec<u8>)>,
    /// Cursor of the current host cluster receiving compressed clusters.
    compressed_cursor: Option<u64>,
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> DiskError {
    DiskError::io(op, offset)
}

impl Qcow2Image {
    /// Opens `path` on its own (backing chain included).
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self, DiskError> {
        Self::open_in_chain(path, opts, &mut HashSet::new())
    }

    pub(crate) fn open_in_chain(
        path: &Path,
        opts: &OpenOptions,
        seen: &mut HashSet<PathBuf>,
    ) -> Result<Self, DiskError> {
        let file = super::open_locked(path, opts.read_only, opts.cache, opts.force_share)?;
        let mut img = Self::from_file(file, path, opts.read_only)?;
        if let Some(name) = img.header.backing_file.clone() {
            let backing_path = resolve_backing(path, &name);
            let format = match img.header.backing_format.as_deref() {
                Some(f) => Some(ImageFormat::from_name(f).ok_or_else(|| DiskError::Chain {
                    path: path.to_path_buf(),
                    reason: format!("backing format '{f}' is not raw or qcow2"),
                })?),
                None => None,
            };
            let backing_opts = OpenOptions {
                format,
                read_only: true,
                cache: opts.cache,
                force_share: opts.force_share,
            };
            let backing =
                open_in_chain(&backing_path, &backing_opts, seen).map_err(|e| match e {
                    DiskError::Open { source, .. } => DiskError::Chain {
                        path: path.to_path_buf(),
                        reason: format!(
                            "cannot open backing file '{}': {source}",
                            backing_path.display()
                        ),
                    },
                    other => other,
                })?;
            img.backing = Some(backing);
        }
        Ok(img)
    }

    /// Opens an image from an open file, without its backing file (tools that only look at
    /// this layer's metadata use this).
    pub fn from_file(file: HostFile, path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let file_len = file.len().map_err(io_err("reading the file size", 0))?;
        let mut first = vec![0u8; (1usize << header::MAX_CLUSTER_BITS).min(file_len as usize)];
        file.read_at(&mut first, 0)
            .map_err(io_err("reading the header", 0))?;
        let header = Header::parse(&first, file_len)?;
        if !read_only && header.incompatible_features & incompat::CORRUPT != 0 {
            return Err(QcowError::MarkedCorrupt.into());
        }
        let cs = header.cluster_size();
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        file.read_at(&mut l1_bytes, header.l1_table_offset)
            .map_err(io_err("reading the L1 table", header.l1_table_offset))?;
        let l1 = (0..header.l1_size as usize)
            .map(|i| get_be64(&l1_bytes, i))
            .collect();
        let rt_len = (u64::from(header.refcount_table_clusters) * cs) as usize;
        let mut rt_bytes = vec![0u8; rt_len];
        file.read_at(&mut rt_bytes, header.refcount_table_offset)
            .map_err(io_err(
                "reading the refcount table",
                header.refcount_table_offset,
            ))?;
        let refcount_table = (0..rt_len / 8).map(|i| get_be64(&rt_bytes, i)).collect();
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            version: header.version,
        };
        let mut img = Qcow2Image {
            file,
            path: path.to_path_buf(),
            header,
            geo,
            read_only,
            l1,
            l2_cache: MetaCache::new(L2_CACHE_TABLES),
            l2_needs_refcount_sync: false,
            refcount_table,
            refcount_cache: MetaCache::new(REFCOUNT_CACHE_BLOCKS),
            free_hint: 0,
            alloc_end: 0,
            pending_free: Vec::new(),
            file_len,
            backing: None,
            decompressed: None,
            compressed_cursor: None,
        };
        if !read_only {
            img.prepare_for_writing()?;
        }
        Ok(img)
    }

    /// Before the first write: repair refcounts of a dirty image, clear autoclear bits we
    /// do not maintain.
    fn prepare_for_writing(&mut self) -> Result<(), DiskError> {
        if self.header.incompatible_features & incompat::DIRTY != 0 {
            log::warn!(
                "{}: dirty bit set (lazy refcounts); rebuilding refcounts",
                self.path.display()
            );
            check::rebuild_refcounts(self)?;
            self.header.incompatible_features &= !incompat::DIRTY;
            self.write_header()?;
        }
        if self.header.autoclear_features != 0 {
            // We keep no bitmaps (or anything else autoclear bits guard, such as
            // autoclear::BITMAPS) up to date: clear them all.
            self.header.autoclear_features = 0;
            self.write_header()?;
            self.sync()?;
        }
        Ok(())
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backing image, if any.
    pub fn backing_mut(&mut self) -> Option<&mut Box<dyn DiskImage>> {
        self.backing.as_mut()
    }

    /// Replaces the backing image (rebase, commit).
    pub fn set_backing(&mut self, backing: Option<Box<dyn DiskImage>>) {
        self.backing = backing;
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Size of the host file.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    fn sync(&self) -> Result<(), DiskError> {
        self.file.sync().map_err(io_err("fdatasync", 0))
    }

    fn pwrite(&mut self, data: &[u8], offset: u64, op: &'static str) -> Result<(), DiskError> {
        self.file
            .write_at(data, offset)
            .map_err(io_err(op, offset))?;
        self.file_len = self.file_len.max(offset + data.len() as u64);
        Ok(())
    }

    fn pread(&self, buf: &mut [u8], offset: u64, what: &'static str) -> Result<(), DiskError> {
        if offset.saturating_add(buf.len() as u64) > self.file_len {
            return Err(QcowError::Corrupt(format!(
                "{what} at {offset:#x} lies past the end of the file"
            ))
            .into());
        }
        self.file.read_at(buf, offset).map_err(io_err(what, offset))
    }

    /// Writes the whole header cluster prefix (fields, extensions, backing name).
    pub(crate) fn write_header(&mut self) -> Result<(), DiskError> {
        let bytes = self.header.serialize()?;
        self.pwrite(&bytes, 0, "writing the header")
    }

    /// Splits a guest offset into (L1 index, L2 index, offset in cluster).
    fn split(&self, guest: u64) -> (usize, usize, u64) {
        let cb = self.header.cluster_bits;
        let l2_bits = cb - 3;
        (
            (guest >> (cb + l2_bits)) as usize,
            ((guest >> cb) & ((1 << l2_bits) - 1)) as usize,
            guest & ((1 << cb) - 1),
        )
    }

    // ---- L2 cache -------------------------------------------------------------------

    /// Makes sure the L2 table at `offset` is cached, evicting (and writing back) one.
    fn load_l2(&mut self, offset: u64) -> Result<(), DiskError> {
        if self.l2_cache.contains(offset) {
            return Ok(());
        }
        if !offset.is_multiple_of(self.cluster_size()) {
            return Err(QcowError::Corrupt(format!("L2 table at unaligned {offset:#x}")).into());
        }
        self.make_room_in_l2_cache()?;
        let mut data = vec![0u8; self.cluster_size() as usize];
        self.pread(&mut data, offset, "reading an L2 table")?;
        self.l2_cache.insert(offset, data, false);
        Ok(())
    }

    fn make_room_in_l2_cache(&mut self) -> Result<(), DiskError> {
        if let Some((victim, dirty)) = self.l2_cache.victim() {
            if dirty {
                self.write_back_l2(victim)?;
            }
            self.l2_cache.remove(victim);
        }
        Ok(())
    }

    /// Writes a dirty L2 table, after the refcounts it depends on are durable.
    fn write_back_l2(&mut self, offset: u64) -> Result<(), DiskError> {
        if self.l2_needs_refcount_sync {
            self.write_back_refcounts()?;
            self.sync()?;
            self.l2_needs_refcount_sync = false;
        }
        let data = self.l2_cache.peek(offset).map(<[u8]>::to_vec);
        if let Some(data) = data {
            self.pwrite(&data, offset, "writing an L2 table")?;
            self.l2_cache.mark_clean(offset);
        }
        Ok(())
    }

    fn l2_get(&mut self, table: u64, index: usize) -> Result<u64, DiskError> {
        self.load_l2(table)?;
        Ok(self.l2_cache.get(table).map_or(0, |t| get_be64(t, index)))
    }

    fn l2_entry(&mut self, table: u64, index: usize) -> Result<L2Entry, DiskError> {
        let raw = self.l2_get(table, index)?;
        Ok(self.geo.decode_l2(raw)?)
    }

    fn l2_set(&mut self, table: u64, index: usize, value: u64) -> Result<(), DiskError> {
        self.load_l2(table)?;
        if let Some(t) = self.l2_cache.get_mut(table) {
            set_be64(t, index, value);
        }
        Ok(())
    }

    // ---- mapping ----------------------------------------------------------------------

    /// The L2 entry of the guest cluster holding `guest`.
    fn lookup(&mut self, guest: u64) -> Result<L2Entry, DiskError> {
        let (l1i, l2i, _) = self.split(guest);
        let Some(&l1e) = self.l1.get(l1i) else {
            return Ok(L2Entry::Unallocated);
        };
        let (table, _) = self.geo.decode_l1(l1e)?;
        if table == 0 {
            return Ok(L2Entry::Unallocated);
        }
        let raw = self.l2_get(table, l2i)?;
        Ok(self.geo.decode_l2(raw)?)
    }

    /// Bytes of guest cluster `guest` (whole cluster) as they read now through `entry`.
    fn read_cluster(
        &mut self,
        entry: L2Entry,
        guest_cluster: u64,
        out: &mut [u8],
    ) -> Result<(), DiskError> {
        match entry {
            L2Entry::Zero { .. } => out.fill(0),
            L2Entry::Normal { offset, .. } => self.pread(out, offset, "reading data")?,
            L2Entry::Compressed { offset, len } => {
                self.read_compressed(offset, len, out)?;
            }
            L2Entry::Unallocated => self.read_backing(out, guest_cluster)?,
        }
        Ok(())
    }

    fn read_backing(&mut self, out: &mut [u8], guest: u64) -> Result<(), DiskError> {
        let Some(b) = self.backing.as_mut() else {
            out.fill(0);
            return Ok(());
        };
        let size = b.size();
        let avail = size.saturating_sub(guest).min(out.len() as u64) as usize;
        if avail > 0 {
            b.read_at(&mut out[..avail], guest)?;
        }
        out[avail..].fill(0);
        Ok(())
    }

    fn read_compressed(&mut self, offset: u64, len: u64, out: &mut [u8]) -> Result<(), DiskError> {
        let key = offset ^ (len << 56);
        if let Some((k, data)) = &self.decompressed {
            if *k == key && data.len() == out.len() {
                out.copy_from_slice(data);
                return Ok(());
            }
        }
        // The last sector may run past the end of the file.
        let avail = self.file_len.saturating_sub(offset).min(len);
        if avail == 0 || len > 2 * self.cluster_size() {
            return Err(QcowError::Corrupt(format!(
                "compressed cluster at {offset:#x} (+{len}) is past the end of the file"
            ))
            .into());
        }
        let mut input = vec![0u8; avail as usize];
        self.pread(&mut input, offset, "reading a compressed cluster")?;
        compress::decompress(self.header.compression, &input, out)?;
        self.decompressed = Some((key, out.to_vec()));
        Ok(())
    }

    /// Reads guest bytes, coalescing contiguous data clusters into one host read.
    fn read_range(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = pos % cs;
            let mut n = ((cs - in_cluster) as usize).min(buf.len() - done);
            match self.lookup(pos)? {
                L2Entry::Normal { offset: host, .. } => {
                    // Extend over following clusters that are contiguous on the host.
                    let mut next_host = host + cs;
                    while done + n < buf.len() {
                        let next = pos + n as u64;
                        match self.lookup(next)? {
                            L2Entry::Normal { offset: h, .. } if h == next_host => {
                                n += (cs as usize).min(buf.len() - done - n);
                                next_host += cs;
                            }
                            _ => break,
                        }
                    }
                    self.pread(&mut buf[done..done + n], host + in_cluster, "reading data")?;
                }
                L2Entry::Zero { .. } => buf[done..done + n].fill(0),
                L2Entry::Unallocated => {
                    let (slice, at) = (&mut buf[done..done + n], pos);
                    self.read_backing(slice, at)?;
                }
                e @ L2Entry::Compressed { .. } => {
                    let mut cluster = vec![0u8; cs as usize];
                    self.read_cluster(e, pos - in_cluster, &mut cluster)?;
                    let start = in_cluster as usize;
                    buf[done..done + n].copy_from_slice(&cluster[start..start + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    // ---- writing ----------------------------------------------------------------------

    /// The L2 table for writing guest offset `guest`: allocated if missing, copied if shared
    /// with a snapshot. Returns its offset.
    fn l2_for_write(&mut self, guest: u64) -> Result<u64, DiskError> {
        let (l1i, _, _) = self.split(guest);
        let l1e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| QcowError::Corrupt("guest offset beyond the L1 table".into()))?;
        let (table, copied) = self.geo.decode_l1(l1e)?;
        if table != 0 && copied {
            return Ok(table);
        }
        let content = if table == 0 {
            vec![0u8; self.cluster_size() as usize]
        } else {
            if self.refcount(table)? == 1 {
                // Shared once, not any more: just set the flag.
                self.set_l1(l1i, table | COPIED)?;
                return Ok(table);
            }
            self.load_l2(table)?;
            let data = self.l2_cache.peek(table).map(<[u8]>::to_vec);
            data.unwrap_or_default()
        };
        let new = self.alloc_clusters(1)?;
        self.make_room_in_l2_cache()?;
        self.l2_cache.insert(new, content, true);
        // The table must be on disk (after its refcount) before the L1 entry points at it.
        self.l2_needs_refcount_sync = true;
        self.write_back_l2(new)?;
        self.set_l1(l1i, new | COPIED)?;
        if table != 0 {
            self.pending_free.push(table);
        }
        Ok(new)
    }

    fn set_l1(&mut self, index: usize, value: u64) -> Result<(), DiskError> {
        self.l1[index] = value;
        let at = self.header.l1_table_offset + index as u64 * 8;
        self.pwrite(&value.to_be_bytes(), at, "writing an L1 entry")
    }

    /// Releases what an L2 entry held (after the table dropping it is on disk).
    fn release(&mut self, entry: L2Entry) {
        match entry {
            L2Entry::Normal { offset, .. } => self.pending_free.push(offset),
            L2Entry::Zero {
                prealloc: Some(offset),
                ..
            } => self.pending_free.push(offset),
            L2Entry::Compressed { offset, len } => {
                let (first, count) =
                    table::compressed_host_clusters(offset, len, self.header.cluster_bits);
                for i in 0..count {
                    self.pending_free.push(first + i * self.cluster_size());
                }
            }
            _ => {}
        }
    }

    /// Writes `buf` at guest `offset`.
    fn write_range(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = pos % cs;
            let table = self.l2_for_write(pos)?;
            let (_, l2i, _) = self.split(pos);
            let entry = self.l2_entry(table, l2i)?;
            let n = if let L2Entry::Normal {
                offset: host,
                copied: true,
            } = entry
            {
                let n = self.in_place_run(table, l2i, host, in_cluster, buf.len() - done)?;
                self.pwrite(&buf[done..done + n], host + in_cluster, "writing data")?;
                n
            } else {
                self.write_allocating(table, l2i, &buf[done..], pos)?
            };
            done += n;
        }
        Ok(())
    }

    /// Bytes (up to `max`) writable in place from `in_cluster` of the cluster at entry
    /// `first` of L2 `table` (host `host`): it and the following clusters of the table
    /// that are also ours alone and follow it on the host, so one pwrite covers them.
    fn in_place_run(
        &mut self,
        table: u64,
        first: usize,
        host: u64,
        in_cluster: u64,
        max: usize,
    ) -> Result<usize, DiskError> {
        let cs = self.cluster_size() as usize;
        let mut n = (cs - in_cluster as usize).min(max);
        let mut index = first + 1;
        while n < max && (index as u64) < self.l2_entries() {
            let next_host = host + (index - first) as u64 * cs as u64;
            match self.l2_entry(table, index)? {
                L2Entry::Normal {
                    offset,
                    copied: true,
                } if offset == next_host => n += cs.min(max - n),
                _ => break,
            }
            index += 1;
        }
        Ok(n)
    }

    /// Writes into new clusters from guest `pos`, for as many following clusters of the same
    /// L2 table as also need new clusters and `buf` covers; returns the bytes written.
    fn write_allocating(
        &mut self,
        table: u64,
        first: usize,
        buf: &[u8],
        pos: u64,
    ) -> Result<usize, DiskError> {
        let cs = self.cluster_size();
        let in_cluster = pos % cs;
        let start_guest = pos - in_cluster;
        let wanted = (in_cluster + buf.len() as u64).div_ceil(cs);
        let mut entries = Vec::new();
        for i in 0..wanted.min(self.l2_entries() - first as u64) as usize {
            let e = self.l2_entry(table, first + i)?;
            if i > 0 && matches!(e, L2Entry::Normal { copied: true, .. }) {
                break;
            }
            entries.push(e);
        }
        let count = entries.len() as u64;
        let run_bytes = (count * cs) as usize;
        let n = (run_bytes - in_cluster as usize).min(buf.len());
        let host = if in_cluster == 0 && n == run_bytes {
            // Whole clusters: straight from the caller's buffer.
            let host = self.alloc_clusters(count)?;
            self.pwrite(&buf[..n], host, "writing data")?;
            host
        } else {
            self.write_partial_run(&entries, start_guest, in_cluster, &buf[..n], count)?
        };
        for (i, old) in entries.into_iter().enumerate() {
            let new = L2Entry::Normal {
                offset: host + i as u64 * cs,
                copied: true,
            };
            self.l2_set(table, first + i, self.geo.encode_l2(new))?;
            self.release(old);
        }
        self.l2_needs_refcount_sync = true;
        Ok(n)
    }

    /// Writes `data` at `in_cluster` into `count` new clusters, filling the rest of the
    /// partial first and last clusters from what they read as now (copy-on-write).
    fn write_partial_run(
        &mut self,
        entries: &[L2Entry],
        start_guest: u64,
        in_cluster: u64,
        data: &[u8],
        count: u64,
    ) -> Result<u64, DiskError> {
        let cs = self.cluster_size();
        let mut run = vec![0u8; (count * cs) as usize];
        let end = in_cluster as usize + data.len();
        if in_cluster != 0 || data.len() < cs as usize {
            self.read_cluster(entries[0], start_guest, &mut run[..cs as usize])?;
        }
        if !end.is_multiple_of(cs as usize) && count > 1 {
            let last = (count - 1) as usize;
            let guest = start_guest + last as u64 * cs;
            self.read_cluster(entries[last], guest, &mut run[last * cs as usize..])?;
        }
        run[in_cluster as usize..end].copy_from_slice(data);
        let host = self.alloc_clusters(count)?;
        self.pwrite(&run, host, "writing data")?;
        Ok(host)
    }

    /// Sets guest clusters fully inside `[offset, offset + len)` to `entry` (zero or
    /// unallocated), releasing what they held; partial clusters at the edges are written
    /// with zeros when `zero_edges`.
    fn set_cluster_range(
        &mut self,
        offset: u64,
        len: u64,
        make: L2Entry,
        zero_edges: bool,
    ) -> Result<(), DiskError> {
        let cs = self.cluster_size();
        let first_full = offset.next_multiple_of(cs);
        let end = offset + len;
        // The disk's last cluster may be partial: ending at the disk's end covers it.
        let last_full = if end == self.header.size {
            end.next_multiple_of(cs)
        } else {
            end - end % cs
        };
        if zero_edges {
            let head_end = first_full.min(end);
            if head_end > offset {
                self.write_range(&vec![0u8; (head_end - offset) as usize], offset)?;
            }
            if last_full >= first_full && end > last_full {
                self.write_range(&vec![0u8; (end - last_full) as usize], last_full)?;
            }
        }
        let mut pos = first_full;
        while pos < last_full {
            let (l1i, l2i, _) = self.split(pos);
            let l1e = self.l1.get(l1i).copied().unwrap_or(0);
            let (table_now, _) = self.geo.decode_l1(l1e)?;
            let next_table_start = (pos | ((cs / 8) * cs - 1)) + 1;
            if table_now == 0 && make == L2Entry::Unallocated {
                pos = next_table_start.min(last_full);
                continue;
            }
            let table = self.l2_for_write(pos)?;
            let old = self.l2_entry(table, l2i)?;
            if old != make {
                self.l2_set(table, l2i, self.geo.encode_l2(make))?;
                self.release(old);
            }
            pos += cs;
        }
        Ok(())
    }

    /// Writes back every dirty table, syncs, then frees what is pending.
    fn flush_all(&mut self) -> Result<(), DiskError> {
        for table in self.l2_cache.dirty() {
            self.write_back_l2(table)?;
        }
        self.write_back_refcounts()?;
        self.sync()?;
        self.l2_needs_refcount_sync = false;
        if !self.pending_free.is_empty() {
            let pending = std::mem::take(&mut self.pending_free);
            for cluster in pending {
                self.l2_cache.remove(cluster);
                self.change_refcount(cluster, -1)?;
            }
            self.write_back_refcounts()?;
            self.sync()?;
        }
        Ok(())
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.header.size)
    }

    /// Writes one whole guest cluster compressed (deflate) when that saves space, else
    /// normally. For `convert -c`.
    pub fn write_compressed(&mut self, guest: u64, data: &[u8]) -> Result<(), DiskError> {
        let cs = self.cluster_size();
        self.check_writable(guest, data.len() as u64)?;
        if !guest.is_multiple_of(cs) || data.len() as u64 != cs {
            return Err(QcowError::InvalidOption(
                "compressed writes must cover exactly one cluster".into(),
            )
            .into());
        }
        if self.header.compression != Compression::Zlib {
            return Err(QcowError::Unsupported("writing zstd-compressed clusters".into()).into());
        }
        let Some(packed) = compress::compress_deflate(data).filter(|p| (p.len() as u64) < cs - 512)
        else {
            return self.write_range(data, guest);
        };
        let len = packed.len() as u64;
        // Packed after the previous compressed cluster when it fits and the refcount can
        // count one more user (1-bit refcounts cannot). A freed cluster drops the cursor
        // (see `change_refcount`).
        let fits = match self.compressed_cursor {
            Some(c) if (c % cs) + len <= cs && c % cs != 0 => {
                self.refcount(c - c % cs)? < self.max_refcount()
            }
            _ => false,
        };
        let offset = match self.compressed_cursor {
            Some(c) if fits => {
                self.change_refcount(c - c % cs, 1)?;
                c
            }
            _ => self.alloc_clusters(1)?,
        };
        // The cached decompressed cluster is keyed by where it lies: new compressed data
        // may lie where a freed one did, at the same length.
        self.decompressed = None;
        self.pwrite(&packed, offset, "writing a compressed cluster")?;
        // Byte-granular packing, as qemu: the entry covers whole sectors, the data does not.
        self.compressed_cursor = Some(offset + len);
        let table = self.l2_for_write(guest)?;
        let (_, l2i, _) = self.split(guest);
        let old = self.l2_entry(table, l2i)?;
        let sectors_end = (offset + len).next_multiple_of(512);
        let entry = L2Entry::Compressed {
            offset,
            len: sectors_end - offset,
        };
        self.l2_set(table, l2i, self.geo.encode_l2(entry))?;
        self.l2_needs_refcount_sync = true;
        self.release(old);
        Ok(())
    }

    /// Changes the virtual size. Shrinking drops the clusters past the new end.
    pub fn resize(&mut self, new_size: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        if new_size > header::MAX_VIRTUAL_SIZE {
            return Err(QcowError::InvalidOption(format!("size {new_size} is too large")).into());
        }
        let old = self.header.size;
        if new_size < old {
            let start = new_size.next_multiple_of(self.cluster_size());
            if start < old {
                self.set_cluster_range(start, old - start, L2Entry::Unallocated, false)?;
            }
        }
        let needed = self.header.l1_entries_for(new_size);
        if needed > self.l1.len() as u64 {
            self.grow_l1(needed)?;
        }
        self.flush_all()?;
        self.header.size = new_size;
        self.pwrite(&new_size.to_be_bytes(), 24, "writing the size")?;
        self.sync()
    }

    fn grow_l1(&mut self, entries: u64) -> Result<(), DiskError> {
        if entries * 8 > header::MAX_L1_BYTES {
            return Err(QcowError::InvalidOption("the L1 table would be too large".into()).into());
        }
        let cs = self.cluster_size();
        let clusters = (entries * 8).div_ceil(cs);
        let new = self.alloc_clusters(clusters)?;
        let mut bytes = vec![0u8; (clusters * cs) as usize];
        for (i, e) in self.l1.iter().enumerate() {
            set_be64(&mut bytes, i, *e);
        }
        self.write_back_refcounts()?;
        self.sync()?;
        self.pwrite(&bytes, new, "writing the L1 table")?;
        self.sync()?;
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        fields[4..].copy_from_slice(&new.to_be_bytes());
        self.pwrite(&fields, 36, "writing the L1 location")?;
        self.sync()?;
        let old = self.header.l1_table_offset;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        for i in 0..old_clusters {
            self.change_refcount(old + i * cs, -1)?;
        }
        self.header.l1_table_offset = new;
        self.header.l1_size = entries as u32;
        self.l1.resize(entries as usize, 0);
        Ok(())
    }

    /// Points the image at another backing file (only the header changes).
    pub fn set_backing_file(
        &mut self,
        name: Option<String>,
        format: Option<String>,
    ) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.header.backing_file = name;
        self.header.backing_format = format;
        self.write_header()?;
        self.sync()
    }

    /// The mapping of guest `offset` in this layer: (entry, bytes it covers from offset).
    pub fn map_entry(&mut self, offset: u64) -> Result<(L2Entry, u64), DiskError> {
        let cs = self.cluster_size();
        Ok((self.lookup(offset)?, cs - offset % cs))
    }

    /// Maps every guest cluster to a host cluster (preallocation=metadata), writing zeros
    /// into them too when `write_zeros` (preallocation=full).
    pub fn preallocate(&mut self, write_zeros: bool) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let cs = self.cluster_size();
        let size = self.header.size;
        let mut pos = 0;
        while pos < size {
            let table = self.l2_for_write(pos)?;
            let (_, l2i, _) = self.split(pos);
            let n = (self.l2_entries() - l2i as u64).min((size - pos).div_ceil(cs));
            let host = self.alloc_clusters(n)?;
            for i in 0..n {
                let entry = L2Entry::Normal {
                    offset: host + i * cs,
                    copied: true,
                };
                self.l2_set(table, l2i + i as usize, self.geo.encode_l2(entry))?;
            }
            let end = host + n * cs;
            if write_zeros {
                let zeros = vec![0u8; (1 << 20).min(n * cs) as usize];
                let mut at = host;
                while at < end {
                    let len = (end - at).min(zeros.len() as u64) as usize;
                    self.pwrite(&zeros[..len], at, "preallocating")?;
                    at += len as u64;
                }
            } else if end > self.file_len {
                self.file
                    .set_len(end)
                    .map_err(io_err("extending the file", end))?;
                self.file_len = end;
            }
            self.l2_needs_refcount_sync = true;
            pos += n * cs;
        }
        self.flush_all()
    }

    /// Marks every guest cluster unallocated (commit's "make empty").
    pub fn make_empty(&mut self) -> Result<(), DiskError> {
        let size = self.header.size;
        self.set_cluster_range(0, size, L2Entry::Unallocated, false)?;
        self.flush_all()
    }
}

/// Resolves a backing file name: absolute as is, relative against the overlay's directory.
pub fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        overlay.parent().unwrap_or_else(|| Path::new(".")).join(p)
    }
}

impl DiskImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.header.size)?;
        self.read_range(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.check_writable(offset, buf.len() as u64)?;
        self.write_range(buf, offset)
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        self.flush_all()
    }

    fn write_back(&mut self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        // Refcounts first, then tables, in that write order but without syncs: the file
        // is consistent for anything but a power loss before the page cache is written.
        self.write_back_refcounts()?;
        for table in self.l2_cache.dirty() {
            let data = self.l2_cache.peek(table).map(<[u8]>::to_vec);
            if let Some(data) = data {
                self.pwrite(&data, table, "writing an L2 table")?;
                self.l2_cache.mark_clean(table);
            }
        }
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_writable(offset, len)?;
        let make = if self.backing.is_some() {
            if self.header.version < 3 {
                // Unallocating would expose the backing file's data: keep the data.
                return Ok(());
            }
            L2Entry::Zero {
                prealloc: None,
                copied: false,
            }
        } else {
            L2Entry::Unallocated
        };
        self.set_cluster_range(offset, len, make, false)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        self.check_writable(offset, len)?;
        if self.header.version < 3 {
            if self.backing.is_none() && unmap {
                return self.set_cluster_range(offset, len, L2Entry::Unallocated, true);
            }
            let zeros = vec![0u8; self.cluster_size().min(len) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                self.write_range(&zeros[..n], offset + done)?;
                done += n as u64;
            }
            return Ok(());
        }
        let _ = unmap; // zero clusters never keep their old data, unmapped or not
        let make = L2Entry::Zero {
            prealloc: None,
            copied: false,
        };
        self.set_cluster_range(offset, len, make, true)
    }

    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent, DiskError> {
        let cs = self.cluster_size();
        let end = offset.saturating_add(max_len).min(self.header.size);
        let first = self.lookup(offset)?;
        let kind = |e: &L2Entry| std::mem::discriminant(e);
        // Extend over clusters of the same kind (contiguous on the host for data).
        let mut len = (cs - offset % cs).min(end - offset);
        while offset + len < end {
            let next = self.lookup(offset + len)?;
            let contiguous = match (first, next) {
                (L2Entry::Normal { offset: a, .. }, L2Entry::Normal { offset: b, .. }) => {
                    b == a + (offset + len) - (offset - offset % cs)
                }
                (L2Entry::Compressed { .. }, _) => false,
                _ => kind(&first) == kind(&next),
            };
            if !contiguous {
                break;
            }
            len = (len + cs).min(end - offset);
        }
        let base = Extent {
            len,
            depth: 0,
            zero: false,
            present: true,
            data: true,
            compressed: false,
            offset: None,
        };
        Ok(match first {
            L2Entry::Normal { offset: h, .. } => Extent {
                offset: Some(h + offset % cs),
                ..base
            },
            L2Entry::Compressed { .. } => Extent {
                compressed: true,
                ..base
            },
            L2Entry::Zero { .. } => Extent {
                zero: true,
                data: false,
                ..base
            },
            L2Entry::Unallocated => match self.backing.as_mut() {
                Some(b) if offset < b.size() => {
                    let inner = b.extent(offset, len.min(b.size() - offset))?;
                    Extent {
                        depth: inner.depth + 1,
                        ..inner
                    }
                }
                // Past the backing file's end nothing below holds data: like qemu, the
                // depth stays at this layer.
                _ => Extent {
                    depth: 0,
                    zero: true,
                    present: false,
                    data: false,
                    ..base
                },
            },
        })
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn snapshot_list(&mut self) -> Result<Vec<Snapshot>, DiskError> {
        self.snapshots()
    }

    fn snapshot_create(&mut self, name: &str, meta: SnapshotMeta) -> Result<Snapshot, DiskError> {
        Qcow2Image::snapshot_create(self, name, meta)
    }

    fn snapshot_apply(&mut self, id_or_name: &str) -> Result<Snapshot, DiskError> {
        Qcow2Image::snapshot_apply(self, id_or_name)
    }

    fn snapshot_delete(&mut self, name: &str) -> Result<Snapshot, DiskError> {
        Qcow2Image::snapshot_delete(self, name)
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if !self.read_only {
            if let Err(e) = self.flush_all() {
                log::error!("{}: final flush failed: {e}", self.path.display());
            }
        }
    }
}

/// Parameters of a new qcow2 image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size.
    pub size: u64,
    /// Cluster size (a power of two, 512 B .. 2 MiB).
    pub cluster_size: u64,
    /// Refcount width (1, 2, 4, ... 64).
    pub refcount_bits: u32,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_format: Option<String>,
    /// Set the lazy-refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Compression algorithm recorded in the header.
    pub compression: Compression,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            backing_file: None,
            backing_format: None,
            lazy_refcounts: false,
            compression: Compression::Zlib,
        }
    }
}

impl Qcow2Image {
    /// Writes a new, empty image into `file` (which should be empty).
    pub fn create(file: &HostFile, opts: &CreateOptions) -> Result<(), DiskError> {
        let bad = |m: String| DiskError::from(QcowError::InvalidOption(m));
        let cs = opts.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(bad(format!(
                "cluster_size {cs} must be a power of two from 512 to 2M"
            )));
        }
        if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
            return Err(bad(format!(
                "refcount_bits {} must be a power of two up to 64",
                opts.refcount_bits
            )));
        }
        if opts.version == 2 && opts.refcount_bits != 16 {
            return Err(bad("compat=0.10 images have 16-bit refcounts".into()));
        }
        if opts.version == 2 && (opts.lazy_refcounts || opts.compression != Compression::Zlib) {
            return Err(bad("lazy_refcounts and zstd need compat=1.1".into()));
        }
        let cluster_bits = cs.trailing_zeros();
        let mut header = Header {
            version: opts.version,
            cluster_bits,
            size: opts.size,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: if opts.compression == Compression::Zstd {
                incompat::COMPRESSION_TYPE
            } else {
                0
            },
            compatible_features: if opts.lazy_refcounts {
                header::compat::LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: 0,
            refcount_order: opts.refcount_bits.trailing_zeros(),
            header_length: if opts.version >= 3 { 112 } else { 72 },
            compression: opts.compression,
            backing_file: opts.backing_file.clone(),
            backing_format: opts.backing_format.clone(),
            bitmaps: None,
            feature_names: Vec::new(),
            other_extensions: Vec::new(),
        };
        if opts.size > header::MAX_VIRTUAL_SIZE {
            return Err(bad(format!("size {} is too large", opts.size)));
        }
        let l1_entries = header.l1_entries_for(opts.size).max(1);
        if l1_entries * 8 > header::MAX_L1_BYTES {
            return Err(bad(
                "the L1 table would be too large for this size and cluster size".into(),
            ));
        }
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let per_block = cs * 8 / u64::from(opts.refcount_bits);
        // Header, refcount table, refcount blocks and L1, all refcounted by the blocks.
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let total = 1 + rt + rb + l1_clusters;
            let need_rb = total.div_ceil(per_block);
            let need_rt = (need_rb * 8).div_ceil(cs);
            if need_rb <= rb && need_rt <= rt {
                break;
            }
            rb = rb.max(need_rb);
            rt = rt.max(need_rt);
        }
        let total = 1 + rt + rb + l1_clusters;
        header.refcount_table_offset = cs;
        header.refcount_table_clusters = rt as u32;
        header.l1_table_offset = (1 + rt + rb) * cs;
        header.l1_size = l1_entries as u32;
        let mut image = vec![0u8; (total * cs) as usize];
        let first = header.serialize()?;
        image[..first.len()].copy_from_slice(&first);
        for b in 0..rb {
            let block_offset = (1 + rt + b) * cs;
            let at = (cs + b * 8) as usize;
            image[at..at + 8].copy_from_slice(&block_offset.to_be_bytes());
        }
        for cluster in 0..total {
            let block = cluster / per_block;
            let block_start = ((1 + rt + block) * cs) as usize;
            let block_data = &mut image[block_start..block_start + cs as usize];
            refcount::set_entry(
                block_data,
                header.refcount_order,
                (cluster % per_block) as usize,
                1,
            );
        }
        file.write_at(&image, 0)
            .map_err(io_err("writing a new image", 0))?;
        file.sync().map_err(io_err("fdatasync", 0))
    }
}

#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod tests;
