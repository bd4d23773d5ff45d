//! Consistency check and repair: every cluster the metadata references (header, L1 and L2
//! tables of the active state and of every snapshot, data and compressed clusters, the
//! refcount structures, the snapshot table, bitmaps) is counted and compared with its stored
//! refcount; leaks can be released and refcounts rebuilt.

use super::refcount::set_entry;
use super::table::{compressed_host_clusters, get_be64, set_be64, L2Entry, COPIED};
use super::{DiskError, Qcow2Image, QcowError};

/// What to repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Nothing: report only.
    None,
    /// Release leaked clusters.
    Leaks,
    /// Leaks, wrong refcounts and copied flags (refcounts are rebuilt).
    All,
}

/// The outcome of a check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies that may lose data.
    pub corruptions: u64,
    /// Clusters with a refcount but no reference.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// One line per finding, as qemu-img check prints them.
    pub messages: Vec<String>,
    /// Guest clusters allocated in this layer.
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated clusters not following their predecessor on the host.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// First byte past the last cluster in use.
    pub image_end_offset: u64,
}

/// Reference counts computed from the metadata.
struct Census {
    refs: Vec<u64>,
    report: CheckReport,
    cluster_bits: u32,
    file_clusters: u64,
}

impl Census {
    fn add(&mut self, offset: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = offset
            .checked_add(len - 1)
            .map_or(u64::MAX, |e| e >> self.cluster_bits);
        if last >= self.file_clusters {
            self.report.corruptions += 1;
            self.report.messages.push(format!(
                "ERROR {what} at {offset:#x} lies past the end of the image"
            ));
            return;
        }
        if self.refs.len() <= last as usize {
            self.refs.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            self.refs[c as usize] += 1;
        }
    }

    fn bad(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.report.messages.push(msg);
    }
}

impl Qcow2Image {
    fn read_table(&self, offset: u64, entries: u64) -> Result<Vec<u64>, DiskError> {
        // Check the range before allocating: the sizes come from the image.
        if entries
            .checked_mul(8)
            .and_then(|len| offset.checked_add(len))
            .is_none_or(|end| end > self.file_len)
        {
            return Err(QcowError::Corrupt(format!(
                "table at {offset:#x} ({entries} entries) lies past the end of the file"
            ))
            .into());
        }
        let mut bytes = vec![0u8; (entries * 8) as usize];
        self.pread(&mut bytes, offset, "reading a table")?;
        Ok((0..entries as usize).map(|i| get_be64(&bytes, i)).collect())
    }

    /// Counts an L1 table and everything below it; `active` also gathers statistics.
    fn census_l1(
        &mut self,
        c: &mut Census,
        l1_offset: u64,
        l1: &[u64],
        active: bool,
    ) -> Result<(), DiskError> {
        let cs = self.cluster_size();
        c.add(l1_offset, l1.len() as u64 * 8, "L1 table");
        let mut last_host = None;
        for (i, raw) in l1.iter().enumerate() {
            let (table, _) = match self.geo.decode_l1(*raw) {
                Ok(t) => t,
                Err(e) => {
                    c.bad(format!("ERROR L1 entry {i}: {e}"));
                    continue;
                }
            };
            if table == 0 {
                continue;
            }
            if table + cs > self.file_len {
                c.bad(format!(
                    "ERROR L2 table at {table:#x} lies past the end of the image"
                ));
                continue;
            }
            c.add(table, cs, "L2 table");
            let entries = self.read_table(table, cs / 8)?;
            for (j, raw) in entries.iter().enumerate() {
                let guest = ((i as u64 * (cs / 8)) + j as u64) * cs;
                let entry = match self.geo.decode_l2(*raw) {
                    Ok(e) => e,
                    Err(e) => {
                        c.bad(format!("ERROR L2 entry for guest {guest:#x}: {e}"));
                        continue;
                    }
                };
                match entry {
                    L2Entry::Normal { offset, .. } => {
                        c.add(offset, cs, "data cluster");
                        if active && guest < self.header.size {
                            c.report.allocated_clusters += 1;
                            if last_host.is_some_and(|h: u64| h + cs != offset) {
                                c.report.fragmented_clusters += 1;
                            }
                            last_host = Some(offset);
                        }
                    }
                    L2Entry::Zero {
                        prealloc: Some(offset),
                        ..
                    } => {
                        c.add(offset, cs, "preallocated zero cluster");
                        if active {
                            c.report.allocated_clusters += 1;
                        }
                    }
                    L2Entry::Compressed { offset, len } => {
                        let (first, n) =
                            compressed_host_clusters(offset, len, self.header.cluster_bits);
                        for k in 0..n {
                            c.add(first + k * cs, cs, "compressed cluster");
                        }
                        if active {
                            c.report.allocated_clusters += 1;
                            c.report.compressed_clusters += 1;
                            last_host = None;
                        }
                    }
                    L2Entry::Zero { prealloc: None, .. } => {
                        if active {
                            c.report.allocated_clusters += 1;
                        }
                    }
                    L2Entry::Unallocated => {}
                }
            }
        }
        Ok(())
    }

    /// Counts the bitmap directory, bitmap tables and bitmap data clusters.
    fn census_bitmaps(&mut self, c: &mut Census) -> Result<(), DiskError> {
        let Some(bm) = self.header.bitmaps else {
            return Ok(());
        };
        let cs = self.cluster_size();
        if bm.directory_size > 64 << 20 || bm.directory_offset % cs != 0 {
            c.bad("ERROR bitmap directory is invalid".into());
            return Ok(());
        }
        c.add(bm.directory_offset, bm.directory_size, "bitmap directory");
        if bm.directory_offset.saturating_add(bm.directory_size) > self.file_len {
            c.bad("ERROR bitmap directory lies past the end of the image".into());
            return Ok(());
        }
        let mut dir = vec![0u8; bm.directory_size as usize];
        self.pread(
            &mut dir,
            bm.directory_offset,
            "reading the bitmap directory",
        )?;
        let mut at = 0usize;
        for _ in 0..bm.count {
            let Some(e) = dir.get(at..at + 24) else {
                c.bad("ERROR bitmap directory is truncated".into());
                break;
            };
            let table_offset = get_be64(e, 0);
            let table_entries = u64::from(u32::from_be_bytes([e[8], e[9], e[10], e[11]]));
            let name_len = u16::from_be_bytes([e[14], e[15]]) as usize;
            let extra = u32::from_be_bytes([e[16], e[17], e[18], e[19]]) as usize;
            if table_entries * 8 > 64 << 20 {
                c.bad("ERROR bitmap table is too large".into());
                break;
            }
            c.add(table_offset, table_entries * 8, "bitmap table");
            for raw in self.read_table(table_offset, table_entries)? {
                let data = raw & 0x00ff_ffff_ffff_fe00;
                if data != 0 {
                    c.add(data, cs, "bitmap data cluster");
                }
            }
            at = (at + 24 + extra + name_len).next_multiple_of(8);
        }
        Ok(())
    }

    /// Counts every reference; `with_refcount_structures` also counts the refcount table
    /// and blocks (a rebuild replaces them and leaves them out).
    fn census(&mut self, with_refcount_structures: bool) -> Result<Census, DiskError> {
        let cs = self.cluster_size();
        let mut c = Census {
            refs: Vec::new(),
            report: CheckReport::default(),
            cluster_bits: self.header.cluster_bits,
            file_clusters: self.file_len.div_ceil(cs),
        };
        c.report.total_clusters = self.header.size.div_ceil(cs);
        c.add(0, cs, "header");
        let active = self.l1.clone();
        self.census_l1(&mut c, self.header.l1_table_offset, &active, true)?;
        let table_len = self.snapshot_table_len()?;
        c.add(self.header.snapshots_offset, table_len, "snapshot table");
        for s in self.snapshots()? {
            let l1 = self.read_table(s.l1_table_offset, u64::from(s.l1_size))?;
            self.census_l1(&mut c, s.l1_table_offset, &l1, false)?;
        }
        self.census_bitmaps(&mut c)?;
        if with_refcount_structures {
            let rt_len = u64::from(self.header.refcount_table_clusters) * cs;
            c.add(self.header.refcount_table_offset, rt_len, "refcount table");
            for (i, b) in self.refcount_table.clone().into_iter().enumerate() {
                if b == 0 {
                    continue;
                }
                if b % cs != 0 {
                    c.bad(format!("ERROR refcount block {i} is not cluster aligned"));
                    continue;
                }
                c.add(b, cs, "refcount block");
            }
        }
        Ok(c)
    }

    /// Checks the image and repairs what `repair` allows.
    pub fn check(&mut self, repair: Repair) -> Result<CheckReport, DiskError> {
        if !self.read_only {
            self.flush_all()?;
        }
        let mut c = self.census(true)?;
        let cs = self.cluster_size();
        let per = self.refcounts_per_block();
        let mut leaked = Vec::new();
        let mut low = 0u64;
        // Every cluster a refcount block covers (read straight from the block), then every
        // referenced cluster in a range without a block.
        let order = self.header.refcount_order;
        let mut with_block = vec![false; self.refcount_table.len()];
        let table = self.refcount_table.clone();
        for (r, &block) in table.iter().enumerate() {
            if block == 0 || !block.is_multiple_of(cs) || block.saturating_add(cs) > self.file_len {
                continue;
            }
            with_block[r] = true;
            let mut data = vec![0u8; cs as usize];
            self.pread(&mut data, block, "reading a refcount block")?;
            for idx in 0..per {
                let i = r as u64 * per + idx;
                let stored = super::refcount::get_entry(&data, order, idx as usize);
                let computed = c.refs.get(i as usize).copied().unwrap_or(0);
                if stored != computed {
                    Self::compare(&mut c, &mut low, &mut leaked, i, stored, computed);
                }
            }
        }
        for i in 0..c.refs.len() as u64 {
            let covered = with_block.get((i / per) as usize).copied().unwrap_or(false);
            if !covered && c.refs[i as usize] > 0 {
                let computed = c.refs[i as usize];
                Self::compare(&mut c, &mut low, &mut leaked, i, 0, computed);
            }
        }
        c.report.image_end_offset =
            (c.refs.iter().rposition(|r| *r > 0).map_or(0, |p| p + 1) as u64) * cs;
        match repair {
            Repair::None | Repair::Leaks => {
                self.check_copied_flags(&mut c.report, false)?;
            }
            Repair::All => {}
        }
        match repair {
            Repair::None => {}
            Repair::Leaks if low == 0 => {
                for (i, computed) in &leaked {
                    self.set_refcount_of(*i, *computed)?;
                }
                c.report.leaks_fixed = leaked.len() as u64;
                self.flush_all()?;
            }
            Repair::Leaks => {}
            Repair::All => {
                if low > 0 || !leaked.is_empty() {
                    rebuild_refcounts(self)?;
                    c.report.leaks_fixed = c.report.leaks;
                }
                // Copied flags follow the (now right) refcounts.
                let copied_errors = self.check_copied_flags(&mut c.report, true)?;
                c.report.corruptions_fixed = low + copied_errors;
                self.flush_all()?;
            }
        }
        Ok(c.report)
    }

    /// Records one stored/computed refcount mismatch.
    fn compare(
        c: &mut Census,
        low: &mut u64,
        leaked: &mut Vec<(u64, u64)>,
        i: u64,
        stored: u64,
        computed: u64,
    ) {
        if stored < computed {
            *low += 1;
            c.bad(format!(
                "ERROR cluster {i} refcount={stored} reference={computed}"
            ));
        } else {
            c.report.leaks += 1;
            c.report.messages.push(format!(
                "Leaked cluster {i} refcount={stored} reference={computed}"
            ));
            leaked.push((i, computed));
        }
    }

    /// Verifies (and with `fix`, corrects) the copied flags of the active tables.
    fn check_copied_flags(&mut self, r: &mut CheckReport, fix: bool) -> Result<u64, DiskError> {
        let mut errors = 0;
        for i in 0..self.l1.len() {
            let (table, copied) = match self.geo.decode_l1(self.l1[i]) {
                Ok((t, c)) if t != 0 => (t, c),
                _ => continue,
            };
            if table + self.cluster_size() > self.file_len {
                continue;
            }
            let one = self.refcount(table)? == 1;
            if one != copied {
                errors += 1;
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} refcount={}",
                    self.l1[i],
                    u8::from(one)
                ));
                if fix && one {
                    self.set_l1(i, table | COPIED)?;
                } else if fix {
                    self.set_l1(i, table)?;
                }
            }
            for j in 0..(self.cluster_size() / 8) as usize {
                let raw = self.l2_get(table, j)?;
                let Ok(L2Entry::Normal { offset, copied }) = self.geo.decode_l2(raw) else {
                    continue;
                };
                if offset + self.cluster_size() > self.file_len {
                    continue;
                }
                let one = self.refcount(offset)? == 1;
                if one != copied {
                    errors += 1;
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={}",
                        u8::from(one)
                    ));
                    if fix {
                        let fixed = if one { raw | COPIED } else { raw & !COPIED };
                        self.l2_set(table, j, fixed)?;
                    }
                }
            }
        }
        Ok(errors)
    }
}

/// Replaces the refcount table and blocks with ones computed from the metadata, written
/// past the end of the image; the header then points at them.
pub fn rebuild_refcounts(img: &mut Qcow2Image) -> Result<(), DiskError> {
    img.flush_all_tables()?;
    let cs = img.cluster_size();
    let per = img.refcounts_per_block();
    let census = img.census(false)?;
    let mut refs = census.refs;
    let end = (refs.len() as u64).max(img.file_len.div_ceil(cs));
    let (mut t, mut b) = (1u64, 1u64);
    loop {
        let total = end + t + b;
        let need_b = total.div_ceil(per);
        let need_t = (need_b * 8).div_ceil(cs);
        if need_b <= b && need_t <= t {
            break;
        }
        b = b.max(need_b);
        t = t.max(need_t);
    }
    refs.resize((end + t + b) as usize, 0);
    for c in end..end + t + b {
        refs[c as usize] = 1;
    }
    let order = img.header.refcount_order;
    let mut table = vec![0u8; (t * cs) as usize];
    for blk in 0..b {
        let block_at = (end + t + blk) * cs;
        set_be64(&mut table, blk as usize, block_at);
        let mut data = vec![0u8; cs as usize];
        for k in 0..per {
            let c = blk * per + k;
            if let Some(v) = refs.get(c as usize) {
                set_entry(&mut data, order, k as usize, *v);
            }
        }
        img.pwrite(&data, block_at, "writing a rebuilt refcount block")?;
    }
    let table_at = end * cs;
    img.pwrite(&table, table_at, "writing a rebuilt refcount table")?;
    img.sync()?;
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&table_at.to_be_bytes());
    fields[8..].copy_from_slice(&(t as u32).to_be_bytes());
    img.pwrite(&fields, 48, "writing the refcount table location")?;
    img.sync()?;
    img.header.refcount_table_offset = table_at;
    img.header.refcount_table_clusters = t as u32;
    img.reload_refcount_table()
}

impl Qcow2Image {
    /// Writes back dirty L2 tables and refcount blocks and syncs, without releasing the
    /// pending frees (a rebuild recomputes everything anyway).
    fn flush_all_tables(&mut self) -> Result<(), DiskError> {
        for table in self.l2_cache.dirty() {
            self.write_back_l2(table)?;
        }
        self.write_back_refcounts()?;
        self.pending_free.clear();
        self.sync()
    }
}
