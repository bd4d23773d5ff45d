//! The guest's memory statistics, as its driver writes them into the statistics buffer:
//! entries of a little-endian `u16` tag and `u64` value, 10 bytes each, packed.
//!
//! A buffer is read up to [`MAX_ENTRIES`] entries; a tag this device does not know is
//! counted and ignored; a partial entry at the end is ignored.

use serde::{Deserialize, Serialize};

/// Bytes of one entry.
pub const ENTRY_LEN: usize = 10;
/// Most entries read from one buffer (Linux 6.12 writes 16).
pub const MAX_ENTRIES: usize = 64;
/// Tags this device knows: 0 to `TAGS - 1`.
pub const TAGS: usize = 16;

/// Bytes swapped in.
pub const SWAP_IN: u16 = 0;
/// Bytes swapped out.
pub const SWAP_OUT: u16 = 1;
/// Major page faults.
pub const MAJFLT: u16 = 2;
/// Minor page faults.
pub const MINFLT: u16 = 3;
/// Free memory, bytes.
pub const MEMFREE: u16 = 4;
/// Total memory the guest sees, bytes.
pub const MEMTOT: u16 = 5;
/// Memory available to new programs without swapping (MemAvailable), bytes.
pub const AVAIL: u16 = 6;
/// Disk caches, bytes.
pub const CACHES: u16 = 7;
/// Hugetlb page allocations.
pub const HTLB_PGALLOC: u16 = 8;
/// Hugetlb page allocation failures.
pub const HTLB_PGFAIL: u16 = 9;
/// OOM killer invocations (Linux 6.12+).
pub const OOM_KILL: u16 = 10;
/// Allocation stalls (Linux 6.12+).
pub const ALLOC_STALL: u16 = 11;
/// Pages scanned by kswapd (Linux 6.12+).
pub const ASYNC_SCAN: u16 = 12;
/// Pages scanned directly (Linux 6.12+).
pub const DIRECT_SCAN: u16 = 13;
/// Pages reclaimed by kswapd (Linux 6.12+).
pub const ASYNC_RECLAIM: u16 = 14;
/// Pages reclaimed directly (Linux 6.12+).
pub const DIRECT_RECLAIM: u16 = 15;

/// The latest value of each known tag; None until the guest reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    values: [Option<u64>; TAGS],
}

/// What one buffer held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Entries with a known tag.
    pub known: usize,
    /// Entries with a tag this device does not know.
    pub unknown: usize,
    /// The buffer held more than [`MAX_ENTRIES`] entries (the rest was not read).
    pub truncated: bool,
}

impl GuestStats {
    /// The value of `tag`, if the guest reported it.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values.get(usize::from(tag)).copied().flatten()
    }

    /// Whether the guest reported anything.
    pub fn is_empty(&self) -> bool {
        self.values.iter().all(Option::is_none)
    }

    /// Updates the values from one buffer's bytes (`bytes` may hold more than the entries
    /// read: only the first [`MAX_ENTRIES`] count).
    pub fn update(&mut self, bytes: &[u8]) -> Parsed {
        let mut p = Parsed {
            truncated: bytes.len() / ENTRY_LEN > MAX_ENTRIES,
            ..Parsed::default()
        };
        for entry in bytes.chunks_exact(ENTRY_LEN).take(MAX_ENTRIES) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&entry[2..]);
            match self.values.get_mut(usize::from(tag)) {
                Some(slot) => {
                    *slot = Some(u64::from_le_bytes(v));
                    p.known += 1;
                }
                None => p.unknown += 1,
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, val: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&val.to_le_bytes());
        e
    }

    #[test]
    fn known_tags_are_kept_and_bogus_ones_counted() {
        let mut bytes = entry(MEMTOT, 256 << 20);
        bytes.extend(entry(0xbeef, 1));
        bytes.extend(entry(AVAIL, 100 << 20));
        bytes.extend([1, 2, 3]); // a partial entry
        let mut s = GuestStats::default();

        let p = s.update(&bytes);

        assert_eq!(
            p,
            Parsed {
                known: 2,
                unknown: 1,
                truncated: false
            }
        );
        assert_eq!(s.get(MEMTOT), Some(256 << 20));
        assert_eq!(s.get(AVAIL), Some(100 << 20));
        assert_eq!(s.get(SWAP_IN), None);
        assert_eq!(s.get(0xbeef), None);
    }

    #[test]
    fn a_huge_buffer_is_read_up_to_the_entry_limit() {
        let mut bytes = Vec::new();
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            bytes.extend(entry(MEMFREE, i));
        }
        let mut s = GuestStats::default();

        let p = s.update(&bytes);

        assert!(p.truncated);
        assert_eq!(p.known, MAX_ENTRIES);
        assert_eq!(s.get(MEMFREE), Some(MAX_ENTRIES as u64 - 1));
    }
}
