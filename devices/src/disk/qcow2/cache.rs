//! A small LRU cache of metadata clusters (L2 tables, refcount blocks) with dirty tracking.
//! Write-back is the owner's job, because the order in which dirty tables reach the disk is
//! what keeps an interrupted image consistent.

/// One cached cluster.
struct Entry {
    offset: u64,
    data: Vec<u8>,
    dirty: bool,
    used: u64,
}

/// Clusters keyed by host offset.
pub struct MetaCache {
    entries: Vec<Entry>,
    capacity: usize,
    tick: u64,
}

impl MetaCache {
    /// A cache of at most `capacity` clusters.
    pub fn new(capacity: usize) -> Self {
        MetaCache {
            entries: Vec::with_capacity(capacity),
            capacity: capacity.max(2),
            tick: 0,
        }
    }

    fn position(&self, offset: u64) -> Option<usize> {
        self.entries.iter().position(|e| e.offset == offset)
    }

    fn touch(&mut self, i: usize) {
        self.tick += 1;
        self.entries[i].used = self.tick;
    }

    /// Whether `offset` is cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.position(offset).is_some()
    }

    /// The cached cluster at `offset`.
    pub fn get(&mut self, offset: u64) -> Option<&[u8]> {
        let i = self.position(offset)?;
        self.touch(i);
        Some(&self.entries[i].data)
    }

    /// The cached cluster at `offset`, marked dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut [u8]> {
        let i = self.position(offset)?;
        self.touch(i);
        self.entries[i].dirty = true;
        Some(&mut self.entries[i].data)
    }

    /// The entry that must leave before another can be added: (offset, data, dirty).
    pub fn victim(&self) -> Option<(u64, bool)> {
        if self.entries.len() < self.capacity {
            return None;
        }
        self.entries
            .iter()
            .min_by_key(|e| e.used)
            .map(|e| (e.offset, e.dirty))
    }

    /// Adds a cluster; the caller made room first (see [`Self::victim`]).
    pub fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool) {
        if let Some(i) = self.position(offset) {
            self.entries[i].data = data;
            self.entries[i].dirty |= dirty;
            self.touch(i);
            return;
        }
        self.tick += 1;
        self.entries.push(Entry {
            offset,
            data,
            dirty,
            used: self.tick,
        });
    }

    /// Removes a cluster (after it was written back, or because it was freed).
    pub fn remove(&mut self, offset: u64) -> Option<Vec<u8>> {
        let i = self.position(offset)?;
        Some(self.entries.swap_remove(i).data)
    }

    /// Offsets of dirty clusters, in offset order.
    pub fn dirty(&self) -> Vec<u64> {
        let mut d: Vec<u64> = self
            .entries
            .iter()
            .filter(|e| e.dirty)
            .map(|e| e.offset)
            .collect();
        d.sort_unstable();
        d
    }

    /// The data of a cached cluster without touching its age (for write-back).
    pub fn peek(&self, offset: u64) -> Option<&[u8]> {
        self.position(offset)
            .map(|i| self.entries[i].data.as_slice())
    }

    /// Marks a cluster clean once it is on disk.
    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(i) = self.position(offset) {
            self.entries[i].dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_entry_is_the_victim() {
        let mut c = MetaCache::new(2);
        c.insert(0, vec![0], false);
        c.insert(64, vec![1], true);
        assert_eq!(c.victim(), Some((0, false)));
        c.get(0);
        assert_eq!(c.victim(), Some((64, true)));
    }

    #[test]
    fn dirty_tracking_and_removal() {
        let mut c = MetaCache::new(4);
        c.insert(128, vec![0; 4], false);
        c.get_mut(128).unwrap()[0] = 9;
        c.insert(64, vec![1], true);
        assert_eq!(c.dirty(), vec![64, 128]);
        c.mark_clean(128);
        assert_eq!(c.dirty(), vec![64]);
        assert_eq!(c.remove(128), Some(vec![9, 0, 0, 0]));
        assert!(!c.contains(128));
        assert_eq!(c.victim(), None);
    }
}
