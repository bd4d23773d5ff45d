//! Merging a Diff snapshot's memory file onto its base (`ember snapshot-rebase`, as
//! Firecracker's `rebase-snap` / `snapshot-editor edit-memory rebase`): every data extent of
//! the diff (a page the guest wrote since the snapshot before it) is copied to the same
//! offset of the base; the diff's holes leave the base as it is. The base then holds memory
//! as it was when the diff was taken, and loads with the diff's state file.
//!
//! The extents come from `lseek(SEEK_DATA/SEEK_HOLE)`, so the diff must sit on a filesystem
//! that keeps holes (ext4, xfs, btrfs, tmpfs) and must have been copied with them kept
//! (`cp --sparse=always`, `rsync -S`): a diff whose holes were filled would copy its zeroes
//! over the base.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::dirty::PAGE;

/// Bytes copied per read.
const CHUNK: u64 = 1 << 20;

/// Why a diff cannot be merged.
#[derive(Debug, thiserror::Error)]
pub enum RebaseError {
    /// A file cannot be read or written.
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
    /// The files cannot be a base and its diff.
    #[error("{0}")]
    Mismatch(String),
}

/// What a merge copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Data extents of the diff.
    pub extents: u64,
    /// Bytes copied.
    pub bytes: u64,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> RebaseError + 'a {
    move |source| RebaseError::Io {
        path: path.display().to_string(),
        op,
        source,
    }
}

/// Opens both files and checks that they can be a base and its diff: regular files, not the
/// same file, the same length, a whole number of pages.
fn open_pair(base: &Path, diff: &Path) -> Result<(File, File, u64), RebaseError> {
    let d = File::open(diff).map_err(io_err(diff, "cannot open the diff"))?;
    let b = OpenOptions::new()
        .read(true)
        .write(true)
        .open(base)
        .map_err(io_err(base, "cannot open the base for writing"))?;
    let dm = d.metadata().map_err(io_err(diff, "cannot stat"))?;
    let bm = b.metadata().map_err(io_err(base, "cannot stat"))?;
    for (m, p) in [(&dm, diff), (&bm, base)] {
        if !m.is_file() {
            return Err(RebaseError::Mismatch(format!(
                "{}: not a regular file",
                p.display()
            )));
        }
    }
    if (dm.dev(), dm.ino()) == (bm.dev(), bm.ino()) {
        return Err(RebaseError::Mismatch(format!(
            "{} and {} are the same file",
            diff.display(),
            base.display()
        )));
    }
    if dm.len() != bm.len() {
        return Err(RebaseError::Mismatch(format!(
            "{} holds {} bytes and the base {} holds {}: a Diff snapshot's memory file is \
             as long as the guest RAM of its base",
            diff.display(),
            dm.len(),
            base.display(),
            bm.len()
        )));
    }
    if dm.len() % PAGE as u64 != 0 {
        return Err(RebaseError::Mismatch(format!(
            "{} holds {} bytes, not a whole number of {PAGE}-byte pages: not a memory file",
            diff.display(),
            dm.len()
        )));
    }
    Ok((b, d, dm.len()))
}

/// `lseek(fd, at, whence)`: the offset, or `None` past the last data (ENXIO).
fn seek(f: &File, at: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let at = libc::off_t::try_from(at).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a descriptor `f` owns; it reads no memory of ours.
    let r = unsafe { libc::lseek(f.as_raw_fd(), at, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Copies `[from, to)` of `diff` (at `diff_path`) to the same place in `base`.
fn copy_range(
    (base, base_path): (&File, &Path),
    (diff, diff_path): (&File, &Path),
    (from, to): (u64, u64),
    buf: &mut [u8],
) -> Result<(), RebaseError> {
    let mut at = from;
    while at < to {
        let n = (to - at).min(buf.len() as u64) as usize;
        diff.read_exact_at(&mut buf[..n], at)
            .map_err(io_err(diff_path, "cannot read"))?;
        base.write_all_at(&buf[..n], at)
            .map_err(io_err(base_path, "cannot write"))?;
        at += n as u64;
    }
    Ok(())
}

/// Merges the Diff snapshot memory file `diff` onto `base` (which it changes in place).
pub fn rebase(base: &Path, diff: &Path) -> Result<Merged, RebaseError> {
    let (b, d, len) = open_pair(base, diff)?;
    let mut merged = Merged::default();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut at = 0u64;
    while at < len {
        let Some(start) = seek(&d, at, libc::SEEK_DATA).map_err(io_err(diff, "SEEK_DATA"))? else {
            break;
        };
        if start >= len {
            break;
        }
        let end = seek(&d, start, libc::SEEK_HOLE)
            .map_err(io_err(diff, "SEEK_HOLE"))?
            .unwrap_or(len)
            .clamp(start + 1, len);
        copy_range((&b, base), (&d, diff), (start, end), &mut buf)?;
        merged.extents += 1;
        merged.bytes += end - start;
        at = end;
    }
    b.sync_all().map_err(io_err(base, "cannot sync"))?;
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: u64 = 64 * PAGE as u64;

    /// A file of `LEN` bytes: `fill` everywhere (a base), or holes but for `pages`, each
    /// filled with its own byte (a diff).
    fn file(dir: &Path, name: &str, fill: Option<u8>, pages: &[(u64, u8)]) -> std::path::PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(LEN).unwrap();
        if let Some(b) = fill {
            f.write_all_at(&vec![b; LEN as usize], 0).unwrap();
        }
        for (page, b) in pages {
            f.write_all_at(&[*b; PAGE], page * PAGE as u64).unwrap();
        }
        p
    }

    #[test]
    fn a_diffs_pages_land_on_the_base_and_its_holes_leave_the_base_alone() {
        let dir = tempfile::tempdir().unwrap();
        let base = file(dir.path(), "base", Some(0xbb), &[]);
        // Page 3 cleared by the guest (zeroes, written: data, not a hole), 10-11 a run.
        let diff = file(
            dir.path(),
            "diff",
            None,
            &[(3, 0), (10, 1), (11, 2), (63, 9)],
        );
        let m = rebase(&base, &diff).unwrap();
        assert_eq!(m.bytes, 4 * PAGE as u64, "only the diff's pages are copied");
        let got = std::fs::read(&base).unwrap();
        assert_eq!(got.len() as u64, LEN);
        for (i, page) in got.chunks(PAGE).enumerate() {
            let want = match i {
                3 => 0,
                10 => 1,
                11 => 2,
                63 => 9,
                _ => 0xbb,
            };
            assert!(page.iter().all(|b| *b == want), "page {i}");
        }
    }

    #[test]
    fn layers_merged_in_order_give_the_last_ones_pages() {
        let dir = tempfile::tempdir().unwrap();
        let base = file(dir.path(), "base", Some(0), &[]);
        let one = file(dir.path(), "one", None, &[(1, 1), (2, 1)]);
        let two = file(dir.path(), "two", None, &[(2, 2)]);
        rebase(&base, &one).unwrap();
        rebase(&base, &two).unwrap();
        let got = std::fs::read(&base).unwrap();
        assert_eq!(got[PAGE], 1);
        assert_eq!(got[2 * PAGE], 2);
        assert_eq!(got[0], 0);
    }

    #[test]
    fn an_empty_diff_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let base = file(dir.path(), "base", Some(7), &[]);
        let diff = file(dir.path(), "diff", None, &[]);
        assert_eq!(rebase(&base, &diff).unwrap(), Merged::default());
        assert!(std::fs::read(&base).unwrap().iter().all(|b| *b == 7));
    }

    #[test]
    fn files_that_cannot_be_a_base_and_its_diff_are_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let base = file(dir.path(), "base", Some(5), &[]);
        let short = dir.path().join("short");
        std::fs::write(&short, vec![1u8; PAGE]).unwrap();
        let e = rebase(&base, &short).unwrap_err().to_string();
        assert!(e.contains("holds 4096 bytes and the base"), "{e}");
        let odd = dir.path().join("odd");
        std::fs::write(&odd, vec![1u8; LEN as usize]).unwrap();
        let odd_base = dir.path().join("odd-base");
        std::fs::write(&odd_base, vec![1u8; LEN as usize + 1]).unwrap();
        assert!(rebase(&odd_base, &odd).is_err());
        std::fs::write(&odd, vec![1u8; LEN as usize + 1]).unwrap();
        let e = rebase(&odd_base, &odd).unwrap_err().to_string();
        assert!(e.contains("not a whole number"), "{e}");
        let e = rebase(&base, &base).unwrap_err().to_string();
        assert!(e.contains("the same file"), "{e}");
        let e = rebase(&base, dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = rebase(&base, &dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot open the diff"), "{e}");
        assert!(
            std::fs::read(&base).unwrap().iter().all(|b| *b == 5),
            "a refused merge wrote nothing"
        );
    }
}
