//! Positioned I/O on a host file, with `cache=none` (O_DIRECT) handled here once: callers
//! pass any buffer, offset and length; unaligned direct I/O goes through an aligned bounce
//! buffer (read-modify-write for partial blocks).

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Host page cache policy, as qemu's `cache=` spells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Through the host page cache; flush = fdatasync.
    #[default]
    Writeback,
    /// O_DIRECT: bypass the host page cache; flush still = fdatasync.
    None,
    /// Through the host page cache, and never synced (qemu's cache=unsafe, as `convert`
    /// uses by default): fast, but a host crash may lose or tear what was written.
    Unsafe,
}

/// Alignment used for direct I/O (covers 512- and 4096-byte logical blocks).
const DIRECT_ALIGN: usize = 4096;

/// A heap buffer aligned for direct I/O (and page-aligned, which also makes buffered
/// copies to and from the page cache cheaper).
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is uniquely owned heap memory, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to the alignment).
    pub fn new(len: usize) -> Self {
        let len = len.max(1).next_multiple_of(DIRECT_ALIGN);
        let layout = Layout::from_size_align(len, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes and initialized (zeroed); shared borrow.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes, initialized (zeroed), and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: allocated in new() with this very layout.
        unsafe { alloc::dealloc(self.ptr, layout) };
    }
}

/// Lock bytes: qemu's layout, so the two see each other's images as in use.
const LOCK_PERM_BASE: u64 = 100;
const LOCK_SHARED_BASE: u64 = 200;
const PERM_READ: u64 = 0;
const PERM_WRITE: u64 = 1;
const PERM_RESIZE: u64 = 3;

/// The permission another process holds or refuses, so an image cannot be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockConflict {
    /// Reading a consistent image.
    Read,
    /// Writing.
    Write,
    /// Resizing.
    Resize,
}

impl LockConflict {
    fn for_perm(perm: u64) -> Self {
        match perm {
            PERM_READ => LockConflict::Read,
            PERM_WRITE => LockConflict::Write,
            _ => LockConflict::Resize,
        }
    }
}

impl std::fmt::Display for LockConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LockConflict::Read => "read",
            LockConflict::Write => "write",
            LockConflict::Resize => "resize",
        })
    }
}

/// An open image file.
pub struct HostFile {
    file: File,
    direct: bool,
    /// Syncs are skipped (CacheMode::Unsafe).
    no_sync: bool,
}

fn is_aligned(buf: &[u8], offset: u64) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        && buf.len().is_multiple_of(DIRECT_ALIGN)
        && offset.is_multiple_of(DIRECT_ALIGN as u64)
}

impl HostFile {
    /// Opens `path` for reading, and writing unless `read_only`.
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if cache == CacheMode::None {
            opts.custom_flags(libc::O_DIRECT);
        }
        Ok(HostFile {
            file: opts.open(path)?,
            direct: cache == CacheMode::None,
            no_sync: cache == CacheMode::Unsafe,
        })
    }

    /// Wraps an already open file (buffered I/O).
    pub fn from_file(file: File) -> Self {
        HostFile {
            file,
            direct: false,
            no_sync: false,
        }
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Current length of the file.
    pub fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Sets the file length.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the file read as
    /// zeros (a sparse or short file).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.direct && !is_aligned(buf, offset) {
            return self.read_bounced(buf, offset);
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn bounce_range(buf_len: usize, offset: u64) -> (u64, usize) {
        let start = offset - offset % DIRECT_ALIGN as u64;
        let end = (offset + buf_len as u64).next_multiple_of(DIRECT_ALIGN as u64);
        (start, (end - start) as usize)
    }

    fn read_bounced(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (start, len) = Self::bounce_range(buf.len(), offset);
        let mut bounce = AlignedBuf::new(len);
        let b = bounce.as_mut_slice();
        self.read_at(&mut b[..len], start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&b[skip..skip + buf.len()]);
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.direct && !is_aligned(buf, offset) {
            let (start, len) = Self::bounce_range(buf.len(), offset);
            let mut bounce = AlignedBuf::new(len);
            let b = bounce.as_mut_slice();
            let skip = (offset - start) as usize;
            if skip != 0 || len != buf.len() {
                self.read_at(&mut b[..len], start)?;
            }
            b[skip..skip + buf.len()].copy_from_slice(buf);
            return self.file.write_all_at(&b[..len], start);
        }
        self.file.write_all_at(buf, offset)
    }

    /// Makes written data durable (fdatasync; nothing with CacheMode::Unsafe).
    pub fn sync(&self) -> io::Result<()> {
        if self.no_sync {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Deallocates `[offset, offset + len)`; reads then return zeros.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Makes `[offset, offset + len)` read as zeros, deallocating when `unmap`; falls back
    /// to writing zeros where the file system cannot.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let first = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if self.fallocate(first, offset, len).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on our own descriptor with plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Takes the image locks for a reader (`write` false) or a writer, the way qemu does,
    /// so Ember and qemu exclude each other: open file description (OFD) read locks on
    /// one byte per permission held (100 read, 101 write, 103 resize) and per permission
    /// refused to others (200 + the same); a reader refuses others write and resize, a writer
    /// the same. Returns the conflict, if any, as the permission that cannot be had; the
    /// locks go with the descriptor.
    pub fn lock(&self, write: bool) -> io::Result<Result<(), LockConflict>> {
        let held: &[u64] = if write {
            &[PERM_READ, PERM_WRITE, PERM_RESIZE]
        } else {
            &[PERM_READ]
        };
        let refused = [PERM_WRITE, PERM_RESIZE];
        for &b in held {
            if !self.ofd_lock(LOCK_PERM_BASE + b)? {
                return Ok(Err(LockConflict::for_perm(b)));
            }
        }
        for &b in &refused {
            if !self.ofd_lock(LOCK_SHARED_BASE + b)? {
                return Ok(Err(LockConflict::for_perm(b)));
            }
        }
        // Someone else refusing what we hold, or holding what we refuse.
        for &b in held {
            if self.ofd_locked_by_other(LOCK_SHARED_BASE + b)? {
                return Ok(Err(LockConflict::for_perm(b)));
            }
        }
        for &b in &refused {
            if self.ofd_locked_by_other(LOCK_PERM_BASE + b)? {
                return Ok(Err(LockConflict::for_perm(b)));
            }
        }
        Ok(Ok(()))
    }

    fn flock_at(kind: libc::c_short, byte: u64) -> libc::flock {
        // SAFETY: flock is plain old data; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte as libc::off_t;
        fl.l_len = 1;
        fl
    }

    /// A shared OFD lock on `byte`; false when another holder has it exclusively.
    fn ofd_lock(&self, byte: u64) -> io::Result<bool> {
        let fl = Self::flock_at(libc::F_RDLCK as libc::c_short, byte);
        // SAFETY: fcntl(F_OFD_SETLK) on our own descriptor with a valid flock.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
            _ => Err(e),
        }
    }

    /// Whether another open file description holds any lock on `byte`.
    fn ofd_locked_by_other(&self, byte: u64) -> io::Result<bool> {
        let mut fl = Self::flock_at(libc::F_WRLCK as libc::c_short, byte);
        // SAFETY: fcntl(F_OFD_GETLK) on our own descriptor; it writes into `fl`.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    /// Next data at or after `offset` (SEEK_DATA): None when only a hole follows.
    pub fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.seek_whence(offset, libc::SEEK_DATA)
    }

    /// Next hole at or after `offset` (SEEK_HOLE); the end of the file counts as a hole.
    pub fn next_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        self.seek_whence(offset, libc::SEEK_HOLE)
    }

    fn seek_whence(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek on our own descriptor; the file position is not used elsewhere
        // (all I/O here is positioned).
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(rc as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_exclude_everyone_and_readers_share() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let open = |write: bool| {
            let h = HostFile::open(f.path(), !write, CacheMode::Writeback).unwrap();
            let got = h.lock(write).unwrap();
            (h, got)
        };
        let (r1, ok) = open(false);
        assert_eq!(ok, Ok(()));
        let (_r2, ok) = open(false);
        assert_eq!(ok, Ok(()), "two readers share");
        assert_eq!(
            open(true).1,
            Err(LockConflict::Write),
            "readers refuse writers"
        );
        drop((r1, _r2));
        let (w, ok) = open(true);
        assert_eq!(ok, Ok(()), "locks go with the descriptors");
        assert_eq!(open(true).1, Err(LockConflict::Write));
        assert_eq!(
            open(false).1,
            Err(LockConflict::Write),
            "a writer refuses readers"
        );
        drop(w);
        assert_eq!(open(true).1, Ok(()));
    }

    #[test]
    fn reads_past_end_are_zeros() {
        let f = HostFile::from_file(tempfile::tempfile().unwrap());
        f.write_at(b"abc", 0).unwrap();
        let mut buf = [9u8; 6];
        f.read_at(&mut buf, 1).unwrap();
        assert_eq!(&buf, b"bc\0\0\0\0");
    }

    #[test]
    fn direct_io_handles_unaligned_buffers_and_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; 16384]).unwrap();
        let f = match HostFile::open(&path, false, CacheMode::None) {
            Ok(f) => f,
            // Some file systems (tmpfs) refuse O_DIRECT; nothing to test there.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        };
        f.write_at(b"hello", 4093).unwrap();
        let mut buf = [0u8; 9];
        f.read_at(&mut buf, 4091).unwrap();
        assert_eq!(&buf, b"\x07\x07hello\x07\x07");
        f.sync().unwrap();
    }

    #[test]
    fn punched_hole_reads_zero_and_is_found_by_seek_hole() {
        let f = HostFile::from_file(tempfile::tempfile().unwrap());
        f.write_at(&vec![1u8; 1 << 20], 0).unwrap();
        if f.punch_hole(0, 512 << 10).is_err() {
            return; // file system without hole punching
        }
        let mut buf = [1u8; 16];
        f.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0u8; 16]);
        assert_eq!(f.next_data(0).unwrap(), Some(512 << 10));
        assert_eq!(f.next_hole(512 << 10).unwrap(), Some(1 << 20));
    }

    #[test]
    fn write_zeroes_without_unmap_keeps_size() {
        let f = HostFile::from_file(tempfile::tempfile().unwrap());
        f.write_at(&[5u8; 8192], 0).unwrap();
        f.write_zeroes(100, 1000, false).unwrap();
        let mut buf = [1u8; 1200];
        f.read_at(&mut buf, 0).unwrap();
        assert!(buf[..100].iter().all(|b| *b == 5));
        assert!(buf[100..1100].iter().all(|b| *b == 0));
        assert!(buf[1100..].iter().all(|b| *b == 5));
        assert_eq!(f.len().unwrap(), 8192);
    }
}
