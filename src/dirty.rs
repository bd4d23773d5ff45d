//! Which guest pages changed: KVM's dirty log (the guest's writes) OR'ed with the guest
//! memory's own bitmap (Ember's writes through [`GuestMemoryMmap`]: used rings, block reads,
//! received frames).
//!
//! One [`DirtyLog`] per VM owns both sources; each user of it (live migration's passes, diff
//! snapshots) holds a [`Tracker`] with its own set of pages. Reading the sources clears them,
//! so every read hands what it found to every tracker: one user taking its pages never
//! takes them from another. KVM's logging is on while at least one tracker lives.

use std::sync::{Arc, Mutex};

use devices::GuestMemoryMmap;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{self, MemoryError};

/// The page size of the dirty log.
pub const PAGE: usize = 4096;

/// Why dirty pages cannot be tracked.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// Turning logging on or off.
    #[error("cannot switch KVM's dirty-page logging")]
    Switch(#[source] MemoryError),
    /// Reading the log.
    #[error("KVM_GET_DIRTY_LOG failed for memory slot {0}")]
    Read(u32, #[source] kvm_ioctls::Error),
}

/// A set of guest pages, per memory region: one bit per page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageSet {
    /// (guest address, bytes, bitmap words) per region.
    regions: Vec<(u64, u64, Vec<u64>)>,
}

impl PageSet {
    /// No pages of `mem`.
    pub fn empty(mem: &GuestMemoryMmap) -> Self {
        let regions = mem
            .iter()
            .map(|r| {
                let pages = r.len().div_ceil(PAGE as u64);
                (
                    r.start_addr().0,
                    r.len(),
                    vec![0; pages.div_ceil(64) as usize],
                )
            })
            .collect();
        PageSet { regions }
    }

    /// Every page of `mem`.
    pub fn all(mem: &GuestMemoryMmap) -> Self {
        let mut s = Self::empty(mem);
        for (_, len, words) in &mut s.regions {
            let pages = len.div_ceil(PAGE as u64);
            for (i, w) in words.iter_mut().enumerate() {
                let first = i as u64 * 64;
                let n = pages.saturating_sub(first).min(64);
                *w = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
            }
        }
        s
    }

    /// Adds the pages of `words` to region `index` (bits past its end are ignored).
    fn or_region(&mut self, index: usize, words: &[u64]) {
        let Some((_, len, mine)) = self.regions.get_mut(index) else {
            return;
        };
        for (m, w) in mine.iter_mut().zip(words) {
            *m |= *w;
        }
        let pages = len.div_ceil(PAGE as u64);
        if pages % 64 != 0 {
            if let Some(last) = mine.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
    }

    /// Adds the pages of `other` (a set over the same memory).
    pub fn merge(&mut self, other: &PageSet) {
        for (i, (_, _, words)) in other.regions.iter().enumerate() {
            self.or_region(i, words);
        }
    }

    /// How many pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|(_, _, w)| w.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The pages as runs (guest address, pages) of at most `max` pages each, in address
    /// order.
    pub fn runs(&self, max: usize) -> Vec<(u64, usize)> {
        let mut out: Vec<(u64, usize)> = Vec::new();
        for (start, _, words) in &self.regions {
            let mut run: Option<(u64, usize)> = None;
            for (i, w) in words.iter().enumerate() {
                if *w == 0 {
                    out.extend(run.take());
                    continue;
                }
                for bit in 0..64 {
                    let addr = start + ((i * 64 + bit) * PAGE) as u64;
                    match (&mut run, w & (1 << bit) != 0) {
                        (Some((_, n)), true) if *n < max => *n += 1,
                        (r, true) => {
                            out.extend(r.take());
                            *r = Some((addr, 1));
                        }
                        (r, false) => out.extend(r.take()),
                    }
                }
            }
            out.extend(run);
        }
        out
    }
}

/// Takes and clears the pages Ember wrote through `mem` since the last call.
pub fn take_vmm_dirty(mem: &GuestMemoryMmap, into: &mut PageSet) {
    for (i, r) in mem.iter().enumerate() {
        // The region's own bitmap (the trait's bitmap() is a slice view of it).
        let bitmap: &vm_memory::bitmap::AtomicBitmap = vm_memory::MmapRegion::bitmap(r);
        into.or_region(i, &bitmap.get_and_reset());
    }
}

/// A VM's dirty-page log, shared by its trackers.
pub struct DirtyLog {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    /// Each live tracker's id and the pages it has not taken yet.
    trackers: Mutex<Vec<(u64, PageSet)>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl DirtyLog {
    /// The log of the VM `vm` whose memory is `mem` (slot `i` is region `i`); logging is
    /// off until a tracker starts.
    pub fn new(vm: Arc<VmFd>, mem: GuestMemoryMmap) -> Arc<Self> {
        Arc::new(DirtyLog {
            vm,
            mem,
            trackers: Mutex::new(Vec::new()),
            next_id: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, PageSet)>> {
        self.trackers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads (and clears) KVM's log, when it is on, and Ember's bitmap into every tracker.
    /// A slot whose log cannot be read counts as written whole, and what the others showed
    /// is kept, so an error loses no page; it is still returned.
    fn collect(&self, trackers: &mut [(u64, PageSet)]) -> Result<(), DirtyError> {
        let mut set = PageSet::empty(&self.mem);
        let mut failed = None;
        if !trackers.is_empty() {
            for (slot, r) in self.mem.iter().enumerate() {
                match self.vm.get_dirty_log(slot as u32, r.len() as usize) {
                    Ok(words) => set.or_region(slot, &words),
                    Err(e) => {
                        let pages = r.len().div_ceil(PAGE as u64);
                        set.or_region(slot, &vec![u64::MAX; pages.div_ceil(64) as usize]);
                        failed.get_or_insert(DirtyError::Read(slot as u32, e));
                    }
                }
            }
        }
        take_vmm_dirty(&self.mem, &mut set);
        for (_, pages) in trackers.iter_mut() {
            pages.merge(&set);
        }
        failed.map_or(Ok(()), Err)
    }
}

/// One user's view of a [`DirtyLog`]: the pages written since it started or last took them.
pub struct Tracker {
    log: Arc<DirtyLog>,
    id: u64,
}

impl Tracker {
    /// Starts a tracker on `log`, turning KVM's logging on if it is the first. Its first
    /// [`Tracker::take`] holds the pages written since, and those Ember wrote before that no
    /// tracker took yet (a superset never hurts: a page sent or saved twice is still right).
    pub fn start(log: &Arc<DirtyLog>) -> Result<Self, DirtyError> {
        let mut trackers = log.lock();
        if trackers.is_empty() {
            memory::set_dirty_logging(&log.vm, &log.mem, true).map_err(DirtyError::Switch)?;
        } else {
            log.collect(&mut trackers)?;
        }
        let id = log
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        trackers.push((id, PageSet::empty(&log.mem)));
        Ok(Tracker {
            log: log.clone(),
            id,
        })
    }

    /// The pages written since the last call (or since the start), by the guest or Ember.
    pub fn take(&self) -> Result<PageSet, DirtyError> {
        let mut trackers = self.log.lock();
        self.log.collect(&mut trackers)?;
        let empty = PageSet::empty(&self.log.mem);
        Ok(match trackers.iter_mut().find(|(id, _)| *id == self.id) {
            Some((_, p)) => std::mem::replace(p, empty),
            None => empty,
        })
    }

    /// Gives `pages` back (a snapshot that failed to write them): the next take has them.
    pub fn put_back(&self, pages: &PageSet) {
        let mut trackers = self.log.lock();
        if let Some((_, p)) = trackers.iter_mut().find(|(id, _)| *id == self.id) {
            p.merge(pages);
        }
    }

    /// Marks every page written (the next take holds them all).
    pub fn mark_all(&self) {
        self.put_back(&PageSet::all(&self.log.mem));
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let mut trackers = self.log.lock();
        // What this tracker read on the others' behalf stays with them.
        if let Err(e) = self.log.collect(&mut trackers) {
            log::warn!("cannot read the dirty log: {}", crate::error_chain(&e));
        }
        trackers.retain(|(id, _)| *id != self.id);
        if trackers.is_empty() {
            if let Err(e) = memory::set_dirty_logging(&self.log.vm, &self.log.mem, false) {
                log::warn!(
                    "cannot turn dirty-page logging off: {}",
                    crate::error_chain(&e)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(4 << 20), 130 * 4096),
        ])
        .unwrap()
    }

    #[test]
    fn all_pages_of_each_region_and_no_more() {
        let m = mem();
        let all = PageSet::all(&m);
        assert_eq!(all.count(), 256 + 130);
        assert_eq!(all.runs(1000), vec![(0, 256), (4 << 20, 130)]);
        assert_eq!(all.runs(100).len(), 3 + 2);
        assert_eq!(PageSet::empty(&m).count(), 0);
    }

    #[test]
    fn runs_split_at_gaps_and_at_the_maximum() {
        let m = mem();
        let mut s = PageSet::empty(&m);
        s.or_region(0, &[0b1011, 0, 0, 1 << 63]);
        assert_eq!(s.runs(256), vec![(0, 2), (3 * 4096, 1), (255 * 4096, 1)]);
        assert_eq!(
            s.runs(1),
            vec![(0, 1), (4096, 1), (3 * 4096, 1), (255 * 4096, 1)]
        );
    }

    #[test]
    fn bits_past_a_region_end_are_dropped() {
        let m = mem();
        let mut s = PageSet::empty(&m);
        s.or_region(1, &[u64::MAX, u64::MAX, u64::MAX]);
        assert_eq!(s.count(), 130);
        s.or_region(7, &[1]);
        assert_eq!(s.count(), 130);
    }

    /// A KVM VM with `mem` registered as its slots.
    fn vm_with(m: &GuestMemoryMmap) -> Arc<VmFd> {
        let kvm = kvm_ioctls::Kvm::new()
            .unwrap_or_else(|e| panic!("this test needs /dev/kvm, which cannot be opened: {e}"));
        let vm = Arc::new(kvm.create_vm().unwrap());
        memory::register_with_kvm(&vm, m).unwrap();
        vm
    }

    #[test]
    fn every_tracker_gets_every_page_and_logging_lives_as_long_as_one() {
        let m = mem();
        let vm = vm_with(&m);
        let log = DirtyLog::new(vm.clone(), m.clone());
        let snapshots = Tracker::start(&log).unwrap();
        m.write_slice(&[1u8; 10], GuestAddress(0x3000)).unwrap();
        let migration = Tracker::start(&log).unwrap();
        m.write_slice(&[1u8; 10], GuestAddress(0x8000)).unwrap();
        let pass = migration.take().unwrap();
        assert!(
            pass.runs(256).contains(&(0x8000, 1)),
            "{:?}",
            pass.runs(256)
        );
        drop(migration);
        assert!(
            vm.get_dirty_log(0, 1 << 20).is_ok(),
            "logging stays on while a tracker lives"
        );
        let all = snapshots.take().unwrap();
        assert_eq!(
            all.runs(256),
            vec![(0x3000, 1), (0x8000, 1)],
            "the migration's take did not take the snapshots' pages"
        );
        assert_eq!(snapshots.take().unwrap().count(), 0, "taking clears");
        snapshots.put_back(&all);
        assert_eq!(
            snapshots.take().unwrap(),
            all,
            "pages given back come again"
        );
        snapshots.mark_all();
        assert_eq!(snapshots.take().unwrap(), PageSet::all(&m));
        // A log that cannot be read loses nothing: its slots count as written.
        memory::set_dirty_logging(&vm, &m, false).unwrap();
        assert!(snapshots.take().is_err());
        memory::set_dirty_logging(&vm, &m, true).unwrap();
        assert_eq!(snapshots.take().unwrap(), PageSet::all(&m));
        drop(snapshots);
        assert!(
            vm.get_dirty_log(0, 1 << 20).is_err(),
            "logging is off with the last tracker"
        );
    }

    #[test]
    fn ember_writes_are_taken_once() {
        let m = mem();
        let mut s = PageSet::empty(&m);
        take_vmm_dirty(&m, &mut s);
        assert_eq!(s.count(), 0, "a new memory has nothing marked");
        m.write_slice(&[1u8; 5000], GuestAddress(4 << 20)).unwrap();
        take_vmm_dirty(&m, &mut s);
        assert_eq!(s.runs(256), vec![(4 << 20, 2)]);
        let mut again = PageSet::empty(&m);
        take_vmm_dirty(&m, &mut again);
        assert_eq!(again.count(), 0, "taking clears");
    }
}
