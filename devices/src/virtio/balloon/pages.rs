//! Guest page frames to host memory: frame lists sorted, deduplicated and coalesced into
//! runs, runs clipped to guest RAM region by region, and the ranges that are left given
//! back to the host ([`PageDiscard`]; [`Madvise`] in the VMM).
//!
//! Nothing here trusts a frame number: a run is intersected with each RAM region, so what
//! reaches [`PageDiscard::discard`] lies wholly inside one region, and [`Madvise`] checks
//! that again before it touches the host mapping.

use std::io;

use crate::GuestMemoryMmap;

use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

/// The balloon's page: frame numbers count 4 KiB pages whatever the guest's page size.
pub const PAGE_SHIFT: u32 = 12;
/// Bytes of a balloon page.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// A page-aligned range of guest RAM inside one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    /// Guest physical address.
    pub addr: u64,
    /// Bytes (a multiple of [`PAGE_SIZE`]).
    pub len: u64,
}

/// Sorts and deduplicates `pfns`, and returns the runs of consecutive frames as
/// `(first byte, end byte)` guest address pairs.
pub fn coalesce(pfns: &mut Vec<u32>) -> Vec<(u64, u64)> {
    pfns.sort_unstable();
    pfns.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &pfn in pfns.iter() {
        let start = u64::from(pfn) << PAGE_SHIFT;
        match runs.last_mut() {
            Some((_, end)) if *end == start => *end += PAGE_SIZE,
            _ => runs.push((start, start + PAGE_SIZE)),
        }
    }
    runs
}

/// The part of `[start, end)` that is guest RAM, one range per region it meets, and how many
/// bytes of it are not RAM (the MMIO gap, past the end, ...).
pub fn clip(mem: &GuestMemoryMmap, start: u64, end: u64) -> (Vec<GuestRange>, u64) {
    let mut inside = Vec::new();
    let mut covered = 0;
    for region in mem.iter() {
        let r_start = region.start_addr().raw_value();
        let r_end = r_start.saturating_add(region.len());
        let (s, e) = (start.max(r_start), end.min(r_end));
        if s < e {
            inside.push(GuestRange {
                addr: s,
                len: e - s,
            });
            covered += e - s;
        }
    }
    (inside, end.saturating_sub(start).saturating_sub(covered))
}

/// The whole pages inside `[addr, addr + len)`, or None when there are none (or the range
/// wraps around the address space).
pub fn whole_pages(addr: u64, len: u64) -> Option<(u64, u64)> {
    let end = addr.checked_add(len)? & !(PAGE_SIZE - 1);
    let start = addr.checked_next_multiple_of(PAGE_SIZE)?;
    (start < end).then_some((start, end))
}

/// Where pages the guest no longer uses go back to the host.
pub trait PageDiscard: Send {
    /// Frees the host memory behind `range` (inside one region of `mem`); the guest reads
    /// zeroes there afterwards (or, for memory mapped from a file, the file's bytes).
    fn discard(&mut self, mem: &GuestMemoryMmap, range: GuestRange) -> io::Result<()>;
}

/// Discards with `madvise(MADV_DONTNEED)` on the host mapping of guest memory.
#[derive(Debug, Default)]
pub struct Madvise;

/// The host address of `range`, checked to lie page-aligned inside one region of `mem`.
pub fn host_range(mem: &GuestMemoryMmap, range: GuestRange) -> io::Result<(*mut u8, usize)> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{what}: {:#x}+{:#x} is not a page range of guest RAM",
                range.addr, range.len
            ),
        )
    };
    if range.len == 0
        || !range.addr.is_multiple_of(PAGE_SIZE)
        || !range.len.is_multiple_of(PAGE_SIZE)
    {
        return Err(bad("unaligned"));
    }
    let region = mem
        .find_region(GuestAddress(range.addr))
        .ok_or_else(|| bad("outside"))?;
    let offset = range.addr - region.start_addr().raw_value();
    if offset
        .checked_add(range.len)
        .is_none_or(|e| e > region.len())
    {
        return Err(bad("past its region"));
    }
    let host = region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|_| bad("unmapped"))?;
    let len = usize::try_from(range.len).map_err(|_| bad("too long"))?;
    if !(host as usize).is_multiple_of(PAGE_SIZE as usize) {
        return Err(bad("host mapping unaligned"));
    }
    Ok((host, len))
}

impl PageDiscard for Madvise {
    fn discard(&mut self, mem: &GuestMemoryMmap, range: GuestRange) -> io::Result<()> {
        let (host, len) = host_range(mem, range)?;
        // SAFETY: [host, host + len) is page-aligned and lies inside a live mapping of guest
        // RAM that `mem` owns (checked by host_range). MADV_DONTNEED on it only drops the
        // pages' contents, which Rust never holds references into: guest memory is only
        // accessed with volatile copies, and the guest gave these pages up.
        let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // The pages changed (they read as zeroes now, or as a restored VM's memory file
        // has them): marked, like any write of the VMM's, for dirty-page tracking (Diff
        // snapshots, live migration).
        if let Some(region) = mem.find_region(GuestAddress(range.addr)) {
            let offset = range.addr - region.start_addr().raw_value();
            vm_memory::bitmap::Bitmap::mark_dirty(&region.bitmap(), offset as usize, len);
        }
        Ok(())
    }
}
