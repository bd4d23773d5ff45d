//! Refcounts: reading and changing them through the block cache, allocating clusters, new
//! refcount blocks, and growing the refcount table.

use super::table::{get_be64, set_be64};
use super::{io_err, DiskError, Qcow2Image, QcowError};

/// Reads entry `index` of a refcount block with `1 << order`-bit entries.
pub fn get_entry(block: &[u8], order: u32, index: usize) -> u64 {
    let bits = 1usize << order;
    if bits >= 8 {
        let bytes = bits / 8;
        let at = index * bytes;
        block[at..at + bytes]
            .iter()
            .fold(0u64, |v, b| (v << 8) | u64::from(*b))
    } else {
        let byte = block[index * bits / 8];
        let shift = (index * bits) % 8;
        u64::from((byte >> shift) & ((1u8 << bits) - 1))
    }
}

/// Writes entry `index` of a refcount block.
pub fn set_entry(block: &mut [u8], order: u32, index: usize, value: u64) {
    let bits = 1usize << order;
    if bits >= 8 {
        let bytes = bits / 8;
        let at = index * bytes;
        for (i, b) in block[at..at + bytes].iter_mut().enumerate() {
            *b = (value >> (8 * (bytes - 1 - i))) as u8;
        }
    } else {
        let at = index * bits / 8;
        let shift = (index * bits) % 8;
        let mask = ((1u8 << bits) - 1) << shift;
        block[at] = (block[at] & !mask) | (((value as u8) << shift) & mask);
    }
}

impl Qcow2Image {
    fn refcount_order(&self) -> u32 {
        self.header.refcount_order
    }

    /// Clusters one refcount block covers.
    pub(crate) fn refcounts_per_block(&self) -> u64 {
        self.cluster_size() * 8 / u64::from(self.header.refcount_bits())
    }

    pub(super) fn max_refcount(&self) -> u64 {
        match self.header.refcount_bits() {
            64 => u64::MAX,
            b => (1u64 << b) - 1,
        }
    }

    fn load_block(&mut self, offset: u64) -> Result<(), DiskError> {
        if self.refcount_cache.contains(offset) {
            return Ok(());
        }
        if !offset.is_multiple_of(self.cluster_size()) {
            return Err(
                QcowError::Corrupt(format!("refcount block at unaligned {offset:#x}")).into(),
            );
        }
        if let Some((victim, dirty)) = self.refcount_cache.victim() {
            if dirty {
                // Refcounts may always reach the disk early: at worst clusters leak.
                let data = self.refcount_cache.peek(victim).map(<[u8]>::to_vec);
                if let Some(data) = data {
                    self.pwrite(&data, victim, "writing a refcount block")?;
                }
            }
            self.refcount_cache.remove(victim);
        }
        let mut data = vec![0u8; self.cluster_size() as usize];
        self.pread(&mut data, offset, "reading a refcount block")?;
        self.refcount_cache.insert(offset, data, false);
        Ok(())
    }

    /// Writes every dirty refcount block (no sync).
    pub(crate) fn write_back_refcounts(&mut self) -> Result<(), DiskError> {
        for block in self.refcount_cache.dirty() {
            let data = self.refcount_cache.peek(block).map(<[u8]>::to_vec);
            if let Some(data) = data {
                self.pwrite(&data, block, "writing a refcount block")?;
            }
            self.refcount_cache.mark_clean(block);
        }
        Ok(())
    }

    /// The refcount of the host cluster at `offset`.
    pub fn refcount(&mut self, offset: u64) -> Result<u64, DiskError> {
        self.refcount_of(offset >> self.header.cluster_bits)
    }

    pub(super) fn refcount_of(&mut self, cluster: u64) -> Result<u64, DiskError> {
        let per = self.refcounts_per_block();
        let Some(&block) = self.refcount_table.get((cluster / per) as usize) else {
            return Ok(0);
        };
        if block == 0 {
            return Ok(0);
        }
        self.load_block(block)?;
        let order = self.refcount_order();
        Ok(self
            .refcount_cache
            .get(block)
            .map_or(0, |b| get_entry(b, order, (cluster % per) as usize)))
    }

    /// Adds `delta` to the refcount of the host cluster at `offset`.
    pub(crate) fn change_refcount(&mut self, offset: u64, delta: i64) -> Result<(), DiskError> {
        let cluster = offset >> self.header.cluster_bits;
        let now = self.refcount_of(cluster)?;
        let new = now
            .checked_add_signed(delta)
            .filter(|v| *v <= self.max_refcount());
        let Some(new) = new else {
            return Err(QcowError::Corrupt(format!(
                "refcount of cluster {offset:#x} would go from {now} by {delta}"
            ))
            .into());
        };
        if new == 0 {
            self.free_hint = self.free_hint.min(cluster);
            // The cluster may be reused for anything now: no more compressed data goes
            // after what was packed into it.
            let bits = self.header.cluster_bits;
            if self.compressed_cursor.is_some_and(|c| c >> bits == cluster) {
                self.compressed_cursor = None;
            }
        }
        self.set_refcount_of(cluster, new)
    }

    /// Sets a refcount. The cluster's refcount block must exist: allocation makes sure of
    /// it, and a referenced cluster without one means a corrupt image.
    pub(crate) fn set_refcount_of(&mut self, cluster: u64, value: u64) -> Result<(), DiskError> {
        let per = self.refcounts_per_block();
        let block = self
            .refcount_table
            .get((cluster / per) as usize)
            .copied()
            .unwrap_or(0);
        if block == 0 {
            return Err(
                QcowError::Corrupt(format!("cluster {cluster} has no refcount block")).into(),
            );
        }
        self.load_block(block)?;
        let order = self.refcount_order();
        if let Some(b) = self.refcount_cache.get_mut(block) {
            set_entry(b, order, (cluster % per) as usize, value);
        }
        Ok(())
    }

    /// One past the last cluster that may be in use (file end, or allocated but unwritten).
    fn alloc_limit(&self) -> u64 {
        self.file_len
            .div_ceil(self.cluster_size())
            .max(self.alloc_end)
    }

    /// First run of `count` free clusters below the allocation limit, in ranges that have
    /// a refcount block.
    fn find_free_run(&mut self, count: u64) -> Result<Option<u64>, DiskError> {
        let per = self.refcounts_per_block();
        let end = self.alloc_limit();
        let mut i = self.free_hint.max(1);
        let (mut start, mut run) = (i, 0);
        while i < end {
            let range = (i / per) as usize;
            if self.refcount_table.get(range).is_none_or(|b| *b == 0) {
                i = (range as u64 + 1) * per;
                (start, run) = (i, 0);
                continue;
            }
            if self.refcount_of(i)? == 0 {
                run += 1;
                if run == count {
                    return Ok(Some(start));
                }
            } else {
                (start, run) = (i + 1, 0);
            }
            i += 1;
        }
        Ok(None)
    }

    /// Allocates `count` contiguous clusters with refcount 1; returns the first's offset.
    /// Free space inside the image is reused; otherwise the clusters go past the end, with
    /// any refcount blocks they need right after them.
    pub(crate) fn alloc_clusters(&mut self, count: u64) -> Result<u64, DiskError> {
        let start = match self.find_free_run(count)? {
            Some(s) => {
                for c in s..s + count {
                    self.set_refcount_of(c, 1)?;
                }
                s
            }
            None => self.append_clusters(count)?,
        };
        self.free_hint = start + count;
        self.alloc_end = self.alloc_end.max(start + count);
        Ok(start * self.cluster_size())
    }

    /// Allocates `count` clusters past the end of everything, plus the refcount blocks
    /// missing for them, which follow and describe both.
    fn append_clusters(&mut self, count: u64) -> Result<u64, DiskError> {
        let per = self.refcounts_per_block();
        let cs = self.cluster_size();
        loop {
            let start = self.alloc_limit();
            let mut b = 0u64;
            let missing = loop {
                let last = (start + count + b - 1) / per;
                let missing: Vec<u64> = (start / per..=last)
                    .filter(|r| self.refcount_table.get(*r as usize).is_none_or(|x| *x == 0))
                    .collect();
                if missing.len() as u64 == b {
                    break missing;
                }
                b = missing.len() as u64;
            };
            let end = start + count + b;
            if (end - 1) / per >= self.refcount_table.len() as u64 {
                // Growing moves the end of the image; plan again from there.
                self.grow_refcount_table((end - 1) / per + 1)?;
                continue;
            }
            let order = self.refcount_order();
            for (k, range) in missing.iter().enumerate() {
                let block_at = (start + count + k as u64) * cs;
                let mut data = vec![0u8; cs as usize];
                for c in (start..end).filter(|c| c / per == *range) {
                    set_entry(&mut data, order, (c % per) as usize, 1);
                }
                // The block first, then the table entry pointing at it.
                self.pwrite(&data, block_at, "writing a new refcount block")?;
                let entry_at = self.header.refcount_table_offset + range * 8;
                self.pwrite(
                    &block_at.to_be_bytes(),
                    entry_at,
                    "writing a refcount table entry",
                )?;
                self.refcount_table[*range as usize] = block_at;
            }
            for c in (start..end).filter(|c| !missing.contains(&(c / per))) {
                self.set_refcount_of(c, 1)?;
            }
            self.alloc_end = self.alloc_end.max(end);
            return Ok(start);
        }
    }

    /// Grows the refcount table to at least `min_entries` entries: a new, larger table and
    /// the blocks covering it go past the end of the image, then the header switches over.
    fn grow_refcount_table(&mut self, min_entries: u64) -> Result<(), DiskError> {
        let cs = self.cluster_size();
        let per = self.refcounts_per_block();
        let old_entries = self.refcount_table.len() as u64;
        let mut entries = min_entries.max(old_entries * 2).max(cs / 8);
        let end_cluster = self.file_len.div_ceil(cs).max(self.alloc_end);
        let (table_clusters, blocks) = loop {
            let t = (entries * 8).div_ceil(cs);
            // New blocks for ranges covering [end, end + t + b) that have none yet.
            let mut b = 0u64;
            let missing = loop {
                let first = end_cluster / per;
                let last = (end_cluster + t + b - 1) / per;
                let missing: Vec<u64> = (first..=last)
                    .filter(|r| self.refcount_table.get(*r as usize).is_none_or(|x| *x == 0))
                    .collect();
                if missing.len() as u64 == b {
                    break missing;
                }
                b = missing.len() as u64;
            };
            let top = (end_cluster + t + b) / per + 1;
            if top <= entries {
                break (t, missing);
            }
            entries = top;
        };
        if entries * 8 > super::header::MAX_REFCOUNT_TABLE_BYTES {
            return Err(
                QcowError::Unsupported("the refcount table would exceed 8 MiB".into()).into(),
            );
        }
        let table_at = end_cluster * cs;
        let blocks_at = end_cluster + table_clusters;
        let mut table = self.refcount_table.clone();
        table.resize((table_clusters * cs / 8) as usize, 0);
        let order = self.refcount_order();
        let new_clusters = end_cluster..blocks_at + blocks.len() as u64;
        for (i, range) in blocks.iter().enumerate() {
            let block_at = (blocks_at + i as u64) * cs;
            table[*range as usize] = block_at;
            let mut data = vec![0u8; cs as usize];
            for c in new_clusters.clone().filter(|c| c / per == *range) {
                set_entry(&mut data, order, (c % per) as usize, 1);
            }
            self.pwrite(&data, block_at, "writing a new refcount block")?;
        }
        // Clusters of the new area covered by blocks that already exist.
        self.refcount_table = table.clone();
        for c in new_clusters
            .clone()
            .filter(|c| !blocks.contains(&(c / per)))
        {
            self.set_refcount_of(c, 1)?;
        }
        let mut bytes = vec![0u8; (table_clusters * cs) as usize];
        for (i, e) in table.iter().enumerate() {
            set_be64(&mut bytes, i, *e);
        }
        self.pwrite(&bytes, table_at, "writing the refcount table")?;
        self.write_back_refcounts()?;
        self.sync()?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_at.to_be_bytes());
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.pwrite(&fields, 48, "writing the refcount table location")?;
        self.sync()?;
        let old_at = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.header.refcount_table_offset = table_at;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.free_hint = self.free_hint.max(new_clusters.end);
        self.alloc_end = self.alloc_end.max(new_clusters.end);
        for i in 0..old_clusters {
            self.change_refcount(old_at + i * cs, -1)?;
        }
        Ok(())
    }

    /// Reads the refcount table from disk again (after a rebuild replaced it).
    pub(crate) fn reload_refcount_table(&mut self) -> Result<(), DiskError> {
        let cs = self.cluster_size();
        let len = (u64::from(self.header.refcount_table_clusters) * cs) as usize;
        let mut bytes = vec![0u8; len];
        self.file
            .read_at(&mut bytes, self.header.refcount_table_offset)
            .map_err(io_err(
                "reading the refcount table",
                self.header.refcount_table_offset,
            ))?;
        self.refcount_table = (0..len / 8).map(|i| get_be64(&bytes, i)).collect();
        self.refcount_cache = super::MetaCache::new(super::REFCOUNT_CACHE_BLOCKS);
        self.free_hint = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width_round_trip_without_touching_neighbours() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                set_entry(&mut block, order, i, (i as u64 * 7) & max);
            }
            set_entry(&mut block, order, 3, max);
            for i in 0..n {
                let want = if i == 3 { max } else { (i as u64 * 7) & max };
                assert_eq!(get_entry(&block, order, i), want, "order {order} entry {i}");
            }
        }
    }

    #[test]
    fn sixteen_bit_entries_are_big_endian() {
        let mut block = vec![0u8; 8];
        set_entry(&mut block, 4, 1, 0x0102);
        assert_eq!(block[2..4], [1, 2]);
    }
}
