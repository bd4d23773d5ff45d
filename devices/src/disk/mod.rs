//! Disk images behind one small trait, shared by virtio-blk and `ember img`: raw files and
//! qcow2 (our own engine), with backing chains. Nothing here knows about virtio.
//!
//! Image files are untrusted input: every offset, size and table read from one is checked
//! before use, and a malformed image gives a [`DiskError`], never a panic.

pub mod file;
pub mod qcow2;
pub mod raw;

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

pub use file::{CacheMode, HostFile, LockConflict};
pub use qcow2::{Qcow2Image, QcowError, Snapshot, SnapshotMeta};
pub use raw::RawImage;

/// Most images in a backing chain (the top one included).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// A plain file, byte for byte the disk.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl ImageFormat {
    /// The name qemu uses.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Parses `raw` / `qcow2`.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

/// Errors of disk images.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A host I/O call failed.
    #[error("{op} failed at offset {offset:#x}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        offset: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A request beyond the end of the disk.
    #[error("request at {offset:#x}+{len:#x} is beyond the {size}-byte disk")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// A write to a read-only image.
    #[error("the image is read-only")]
    ReadOnly,
    /// A write that would change the format a probed raw image is detected as.
    #[error("refusing to write an image header to block 0 of a raw image whose format was probed")]
    ProbedRawHeader,
    /// An image file cannot be opened.
    #[error("cannot open '{path}'")]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Another process (qemu or another Ember) uses the image in a way that excludes us.
    #[error(
        "'{path}' is in use: another process (a VM, qemu-img?) holds or refuses its \
         \"{perm}\" lock; stop that process first (img info/check/map/compare/convert read \
         it anyway with -U)"
    )]
    Locked {
        /// The file.
        path: PathBuf,
        /// The permission in conflict.
        perm: LockConflict,
    },
    /// A backing chain that loops or is too deep.
    #[error("backing chain of '{path}': {reason}")]
    Chain {
        /// The image whose backing file is at fault.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A qcow2 image problem.
    #[error(transparent)]
    Qcow2(#[from] QcowError),
    /// The image format cannot do this (internal snapshots of a raw image).
    #[error("{format} images do not support {what}")]
    Unsupported {
        /// The format.
        format: &'static str,
        /// What was asked.
        what: &'static str,
    },
}

impl DiskError {
    /// An I/O error with context.
    pub fn io(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> DiskError {
        move |source| DiskError::Io { op, offset, source }
    }
}

/// What a range of a disk holds, for `map`, `convert` and `compare`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in the extent.
    pub len: u64,
    /// The layer it comes from: 0 is the top image, 1 its backing file, ...; for ranges
    /// no layer holds, the chain length.
    pub depth: u32,
    /// Reads as zeros.
    pub zero: bool,
    /// Some layer holds data (or an explicit zero) for it.
    pub present: bool,
    /// Backed by data in a file (not a hole, not a zero flag).
    pub data: bool,
    /// Compressed in a qcow2 image.
    pub compressed: bool,
    /// Byte offset in the layer's file, where the data has one.
    pub offset: Option<u64>,
}

/// A disk image: a virtual disk of `size()` bytes.
pub trait DiskImage: Send {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;
    /// Writes `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), DiskError>;
    /// Writes cached metadata to the file without syncing it (for cache=unsafe users).
    fn write_back(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
    /// Says `[offset, offset + len)` is unused; later reads return zeros or older data.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// Makes `[offset, offset + len)` read as zeros, deallocating where `unmap` allows.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError>;
    /// The extent starting at `offset`, at most `max_len` bytes, through the backing chain.
    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent, DiskError>;
    /// The format.
    fn format(&self) -> ImageFormat;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;

    /// The internal snapshots (qcow2); formats without them answer [`DiskError::Unsupported`].
    fn snapshot_list(&mut self) -> Result<Vec<Snapshot>, DiskError> {
        Err(self.unsupported("internal snapshots"))
    }
    /// Takes an internal snapshot of the current disk named `name`.
    fn snapshot_create(&mut self, name: &str, meta: SnapshotMeta) -> Result<Snapshot, DiskError> {
        let _ = (name, meta);
        Err(self.unsupported("internal snapshots"))
    }
    /// Makes the snapshot with ID or name `id_or_name` the current disk; the disk takes the
    /// size it had then, so a caller that exposes [`DiskImage::size`] must read it again.
    fn snapshot_apply(&mut self, id_or_name: &str) -> Result<Snapshot, DiskError> {
        let _ = id_or_name;
        Err(self.unsupported("internal snapshots"))
    }
    /// Deletes the first snapshot named `name`.
    fn snapshot_delete(&mut self, name: &str) -> Result<Snapshot, DiskError> {
        let _ = name;
        Err(self.unsupported("internal snapshots"))
    }
    /// The error for an operation this format lacks.
    fn unsupported(&self, what: &'static str) -> DiskError {
        DiskError::Unsupported {
            format: self.format().name(),
            what,
        }
    }
}

/// Stands in for an image while the one behind a device is being swapped (the guest is
/// paused then): it holds no file, and every I/O fails.
pub struct DetachedDisk {
    size: u64,
    format: ImageFormat,
}

impl DetachedDisk {
    /// A stand-in with the size and format of the image it replaces.
    pub fn like(image: &dyn DiskImage) -> Self {
        Self::like_parts(image.size(), image.format())
    }

    /// A stand-in of this size and format.
    pub fn like_parts(size: u64, format: ImageFormat) -> Self {
        DetachedDisk { size, format }
    }

    fn gone(&self) -> DiskError {
        DiskError::Unsupported {
            format: self.format.name(),
            what: "I/O while the image is being swapped",
        }
    }
}

impl DiskImage for DetachedDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, _: &mut [u8], _: u64) -> Result<(), DiskError> {
        Err(self.gone())
    }
    fn write_at(&mut self, _: &[u8], _: u64) -> Result<(), DiskError> {
        Err(self.gone())
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        Err(self.gone())
    }
    fn discard(&mut self, _: u64, _: u64) -> Result<(), DiskError> {
        Err(self.gone())
    }
    fn write_zeroes(&mut self, _: u64, _: u64, _: bool) -> Result<(), DiskError> {
        Err(self.gone())
    }
    fn extent(&mut self, _: u64, _: u64) -> Result<Extent, DiskError> {
        Err(self.gone())
    }
    fn format(&self) -> ImageFormat {
        self.format
    }
    fn read_only(&self) -> bool {
        true
    }
}

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// The format; probed from the file's magic when None.
    pub format: Option<ImageFormat>,
    /// Refuse writes.
    pub read_only: bool,
    /// Host caching.
    pub cache: CacheMode,
    /// Take no image locks (qemu-img's `-U`): for looking at an image another process uses.
    pub force_share: bool,
}

/// Opens `path` as an image file and takes the reader or writer locks unless `force_share`.
pub fn open_locked(
    path: &Path,
    read_only: bool,
    cache: CacheMode,
    force_share: bool,
) -> Result<HostFile, DiskError> {
    let file = HostFile::open(path, read_only, cache).map_err(|source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if !force_share {
        file.lock(!read_only)
            .map_err(DiskError::io("locking the image", 0))?
            .map_err(|perm| DiskError::Locked {
                path: path.to_path_buf(),
                perm,
            })?;
    }
    Ok(file)
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Reads the format from the file's first bytes (qcow2 magic, else raw).
pub fn probe_format(path: &Path) -> Result<ImageFormat, DiskError> {
    let file =
        HostFile::open(path, true, CacheMode::Writeback).map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let mut magic = [0u8; 4];
    file.read_at(&mut magic, 0)
        .map_err(DiskError::io("reading the image magic", 0))?;
    Ok(if &magic == QCOW2_MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// Whether `data`, written at offset 0, would make a raw image look like another format.
pub fn looks_like_image_header(data: &[u8]) -> bool {
    data.len() >= 4 && &data[..4] == QCOW2_MAGIC
}

/// Opens an image and, for qcow2, its backing chain (read-only, bounded, loops refused).
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Box<dyn DiskImage>, DiskError> {
    let mut seen = HashSet::new();
    open_in_chain(path, opts, &mut seen)
}

/// Opens one layer of a chain; `seen` holds the canonical paths of the layers above.
pub(crate) fn open_in_chain(
    path: &Path,
    opts: &OpenOptions,
    seen: &mut HashSet<PathBuf>,
) -> Result<Box<dyn DiskImage>, DiskError> {
    let canonical = path.canonicalize().map_err(|source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if !seen.insert(canonical.clone()) {
        return Err(DiskError::Chain {
            path: path.to_path_buf(),
            reason: format!("'{}' appears twice (a loop)", canonical.display()),
        });
    }
    if seen.len() > MAX_CHAIN_DEPTH {
        return Err(DiskError::Chain {
            path: path.to_path_buf(),
            reason: format!("more than {MAX_CHAIN_DEPTH} images deep"),
        });
    }
    let (format, probed) = match opts.format {
        Some(f) => (f, false),
        None => (probe_format(path)?, true),
    };
    Ok(match format {
        ImageFormat::Raw => {
            if probed && !opts.read_only {
                log::warn!(
                    "image '{}' has no format given and was probed as raw; writes of an image \
                     header to its block 0 are refused (give format=raw to lift this)",
                    path.display()
                );
            }
            let file = open_locked(path, opts.read_only, opts.cache, opts.force_share)?;
            Box::new(RawImage::from_host_file(file, opts.read_only, probed)?)
        }
        ImageFormat::Qcow2 => Box::new(Qcow2Image::open_in_chain(path, opts, seen)?),
    })
}
