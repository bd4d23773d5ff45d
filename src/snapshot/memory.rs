//! Guest memory in a snapshot: its own file, the regions one after the other, pages of
//! zeroes left as holes (the file is sparse). A restore maps the file `MAP_PRIVATE`: pages
//! load when the guest first touches them and its writes stay in this process, so restoring
//! costs the same for any size of guest RAM and one file can start many VMs.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use devices::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::dirty::{PageSet, PAGE};

/// Bytes written per call.
const CHUNK: usize = 1 << 20;

/// Where each region of guest memory is in the memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest physical address.
    pub guest: u64,
    /// Bytes.
    pub len: u64,
    /// Offset in the file.
    pub offset: u64,
}

/// Why memory cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// The file cannot be used.
    #[error("{path}: {op}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file does not hold what the state says.
    #[error("{path}: {what}")]
    Mismatch {
        /// The file.
        path: String,
        /// What does not fit.
        what: String,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> MemoryFileError + 'a {
    move |source| MemoryFileError::Io {
        path: path.display().to_string(),
        op,
        source,
    }
}

/// Where each region of `mem` goes in a memory file: one after the other.
pub fn layout_of(mem: &GuestMemoryMmap) -> Vec<MemoryRegion> {
    let mut offset = 0u64;
    mem.iter()
        .map(|region| {
            let r = MemoryRegion {
                guest: region.start_addr().0,
                len: region.len(),
                offset,
            };
            offset += region.len();
            r
        })
        .collect()
}

/// The bytes of region `index` of `mem`.
fn region_bytes<'m>(
    mem: &'m GuestMemoryMmap,
    index: usize,
    path: &Path,
) -> Result<&'m [u8], MemoryFileError> {
    let no_mapping = || MemoryFileError::Mismatch {
        path: path.display().to_string(),
        what: "a region has no host mapping".into(),
    };
    let region = mem.iter().nth(index).ok_or_else(no_mapping)?;
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|_| no_mapping())?;
    // SAFETY: [host, host + len) is this region's live mapping, owned by `mem`, which the
    // returned slice borrows; the guest is paused, and concurrent device writes would only
    // change bytes, never the mapping.
    Ok(unsafe { std::slice::from_raw_parts(host as *const u8, region.len() as usize) })
}

/// Creates (or empties) `path`, sized for `layout`: all holes.
fn create(path: &Path, layout: &[MemoryRegion]) -> Result<File, MemoryFileError> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(path, "cannot create"))?;
    let total = layout.last().map_or(0, |r| r.offset + r.len);
    f.set_len(total).map_err(io_err(path, "cannot size"))?;
    Ok(f)
}

/// Writes every region of `mem` to a new `path`; returns the layout.
pub fn dump(mem: &GuestMemoryMmap, path: &Path) -> Result<Vec<MemoryRegion>, MemoryFileError> {
    let layout = layout_of(mem);
    let f = create(path, &layout)?;
    for (i, r) in layout.iter().enumerate() {
        let bytes = region_bytes(mem, i, path)?;
        write_sparse(&f, bytes, r.offset).map_err(io_err(path, "cannot write"))?;
    }
    f.sync_all().map_err(io_err(path, "cannot sync"))?;
    Ok(layout)
}

/// Writes only `pages` of `mem` to a new `path` (a Diff snapshot's memory file): the file
/// is as long as a full one and each page is at the same offset, every other page a hole.
/// Each page of the set is written, zeroes too, so merging the file onto a base (copying
/// its data extents, [`super::rebase`]) carries a page the guest cleared.
pub fn dump_pages(
    mem: &GuestMemoryMmap,
    path: &Path,
    pages: &PageSet,
) -> Result<Vec<MemoryRegion>, MemoryFileError> {
    let layout = layout_of(mem);
    let f = create(path, &layout)?;
    for (guest, count) in pages.runs(CHUNK / PAGE) {
        let Some((i, r)) = layout
            .iter()
            .enumerate()
            .find(|(_, r)| guest >= r.guest && guest - r.guest < r.len)
        else {
            continue;
        };
        let bytes = region_bytes(mem, i, path)?;
        let start = (guest - r.guest) as usize;
        let end = (start + count * PAGE).min(bytes.len());
        f.write_all_at(&bytes[start..end], r.offset + start as u64)
            .map_err(io_err(path, "cannot write"))?;
    }
    f.sync_all().map_err(io_err(path, "cannot sync"))?;
    Ok(layout)
}

/// Writes `bytes` at `at`, skipping pages of zeroes (they stay holes).
fn write_sparse(f: &File, bytes: &[u8], at: u64) -> io::Result<()> {
    for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
        let base = at + (i * CHUNK) as u64;
        let mut run: Option<usize> = None;
        for (p, page) in chunk.chunks(PAGE).enumerate() {
            let zero = page.iter().all(|b| *b == 0);
            match (zero, run) {
                (false, None) => run = Some(p),
                (true, Some(start)) => {
                    f.write_all_at(&chunk[start * PAGE..p * PAGE], base + (start * PAGE) as u64)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            f.write_all_at(&chunk[start * PAGE..], base + (start * PAGE) as u64)?;
        }
    }
    Ok(())
}

/// Checks that the memory file at `path` holds the `layout` a snapshot recorded for
/// `expected` bytes of guest RAM (what [`map`] checks before it maps anything).
pub fn check_file(
    path: &Path,
    layout: &[MemoryRegion],
    expected: u64,
) -> Result<(), MemoryFileError> {
    open_checked(path, layout, expected).map(drop)
}

/// Opens `path` and checks it against `layout` and `expected`.
fn open_checked(
    path: &Path,
    layout: &[MemoryRegion],
    expected: u64,
) -> Result<File, MemoryFileError> {
    let mismatch = |what: String| MemoryFileError::Mismatch {
        path: path.display().to_string(),
        what,
    };
    let f = File::open(path).map_err(io_err(path, "cannot open"))?;
    let size = f.metadata().map_err(io_err(path, "cannot stat"))?.len();
    let want: Vec<(GuestAddress, u64)> = boot::layout::ram_regions(expected);
    let same = layout.len() == want.len()
        && layout
            .iter()
            .zip(&want)
            .all(|(r, (g, l))| r.guest == g.0 && r.len == *l);
    if !same {
        return Err(mismatch(format!(
            "the snapshot's memory layout does not match the {} MiB of guest RAM its \
             configuration says",
            expected >> 20
        )));
    }
    for r in layout {
        let end = r.offset.checked_add(r.len).filter(|e| *e <= size);
        if end.is_none() || r.offset % PAGE as u64 != 0 {
            return Err(mismatch(format!(
                "the memory file holds {size} bytes; the snapshot needs {} at offset {}",
                r.len, r.offset
            )));
        }
    }
    Ok(f)
}

/// Maps `path` as guest memory with the `layout` a snapshot recorded, privately (writes do
/// not reach the file). `expected` is the guest RAM the VM's configuration says.
pub fn map(
    path: &Path,
    layout: &[MemoryRegion],
    expected: u64,
) -> Result<GuestMemoryMmap, MemoryFileError> {
    let mismatch = |what: String| MemoryFileError::Mismatch {
        path: path.display().to_string(),
        what,
    };
    let f = open_checked(path, layout, expected)?;
    let mut regions = Vec::with_capacity(layout.len());
    for r in layout {
        let file = f.try_clone().map_err(io_err(path, "cannot duplicate"))?;
        let bitmap = <vm_memory::bitmap::AtomicBitmap as vm_memory::bitmap::NewBitmap>::with_len(
            r.len as usize,
        );
        let region = MmapRegionBuilder::new_with_bitmap(r.len as usize, bitmap)
            .with_file_offset(FileOffset::new(file, r.offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| mismatch(format!("cannot map: {e}")))?;
        let region = devices::GuestRegionMmap::new(region, GuestAddress(r.guest))
            .ok_or_else(|| mismatch("a region wraps the address space".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| mismatch(format!("bad regions: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_round_trips_sparse_and_private() {
        let mem = crate::memory::create_guest_memory(32 << 20).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0xaa; 8192], GuestAddress(20 << 20))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mem");
        let layout = dump(&mem, &p).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 32 << 20);
        assert!(meta.blocks() * 512 < 1 << 20, "zero pages are holes");
        let back = map(&p, &layout, 32 << 20).unwrap();
        let mut buf = [0u8; 5];
        back.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"hello");
        back.write_slice(b"bye", GuestAddress(0x1000)).unwrap();
        let again = map(&p, &layout, 32 << 20).unwrap();
        again.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"hello", "writes stay private");
    }

    #[test]
    fn a_diff_holds_only_the_marked_pages_at_their_full_file_offsets() {
        use std::os::unix::fs::MetadataExt;
        let mem = crate::memory::create_guest_memory(32 << 20).unwrap();
        mem.write_slice(&[0xaa; 4096], GuestAddress(0x5000))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (full, diff) = (dir.path().join("full"), dir.path().join("diff"));
        let layout = dump(&mem, &full).unwrap();
        let mut pages = PageSet::empty(&mem);
        crate::dirty::take_vmm_dirty(&mem, &mut pages);
        // After the full snapshot: one page rewritten, one cleared, a run of three.
        mem.write_slice(&[0xbb; 4096], GuestAddress(0x5000))
            .unwrap();
        mem.write_slice(&[0; 4096], GuestAddress(0x9000)).unwrap();
        mem.write_slice(&[0xcc; 3 * 4096], GuestAddress(20 << 20))
            .unwrap();
        let mut pages = PageSet::empty(&mem);
        crate::dirty::take_vmm_dirty(&mem, &mut pages);
        assert_eq!(dump_pages(&mem, &diff, &pages).unwrap(), layout);
        let meta = std::fs::metadata(&diff).unwrap();
        assert_eq!(meta.len(), 32 << 20, "as long as a full memory file");
        assert_eq!(meta.blocks() * 512, 5 * 4096, "the five pages, no more");
        let bytes = std::fs::read(&diff).unwrap();
        assert!(bytes[0x5000..0x6000].iter().all(|b| *b == 0xbb));
        assert!(bytes[(20 << 20)..(20 << 20) + 3 * 4096]
            .iter()
            .all(|b| *b == 0xcc));
        // Merged onto the full one, it is what a full snapshot of memory now would be.
        super::super::rebase::rebase(&full, &diff).unwrap();
        let now = dir.path().join("now");
        dump(&mem, &now).unwrap();
        assert!(std::fs::read(&full).unwrap() == std::fs::read(&now).unwrap());
    }

    #[test]
    fn a_short_file_or_other_size_is_refused() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mem");
        let layout = dump(&mem, &p).unwrap();
        assert!(map(&p, &layout, 32 << 20).is_err());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        assert!(map(&p, &layout, 16 << 20).is_err());
    }
}
