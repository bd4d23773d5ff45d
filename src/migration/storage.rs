//! `--copy-storage`: the data of a qcow2 disk's own layer goes along with the VM; its
//! backing file (the base) must already be on the destination.
//!
//! Source: one pass over the layer's allocated ranges while the VM runs, through a handle
//! of our own that takes no locks (the VM's handle goes on writing; what that pass read
//! may be torn), remembering a CRC-32 of each chunk sent. Once the VM is stopped and its
//! disks flushed, a fresh handle reads every range allocated now, and every chunk whose
//! contents differ from what was sent (or that was never sent) goes again. So what the
//! destination ends with is exactly the disk at the stop.
//!
//! Destination: a new qcow2 overlay at the disk's path there (which must not exist), on the
//! same backing file, takes the chunks at their guest offsets. If the migration fails, the
//! new file is removed.

use std::collections::HashMap;
use std::fs::OpenOptions as FsOpen;
use std::net::TcpStream;
use std::path::{Path, PathBuf};

use devices::disk::qcow2::{resolve_backing, CreateOptions, Qcow2Image};
use devices::disk::{self, DiskImage, HostFile, ImageFormat};

use super::source::Control;
use super::wire::{Channel, Kind, Range, WireError, RANGE_HEADER};
use super::{CopiedDisk, MigrationError};
use crate::config::{DiskConfig, DiskFormat};

/// Bytes per chunk compared and sent.
pub const CHUNK: u64 = 64 << 10;

/// Why a disk cannot be copied.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The image cannot be used.
    #[error("disk {id} ({path}): {message}")]
    Image {
        /// The disk's id.
        id: String,
        /// Its image.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A chunk the source sent does not fit.
    #[error("disk data for disk {disk} at {at} ({len} bytes) is outside it")]
    Range {
        /// Disk index.
        disk: u32,
        /// Offset.
        at: u64,
        /// Bytes.
        len: usize,
    },
}

fn image_err(d: &DiskConfig) -> impl Fn(String) -> StorageError + '_ {
    move |message| StorageError::Image {
        id: d.id().to_string(),
        path: d.path.display().to_string(),
        message,
    }
}

fn chain(e: &disk::DiskError) -> String {
    crate::error_chain(e)
}

/// Opens `path` as qcow2 to read, without locks (the VM holds it).
fn open_shared(path: &Path) -> Result<Qcow2Image, disk::DiskError> {
    let opts = disk::OpenOptions {
        format: Some(ImageFormat::Qcow2),
        read_only: true,
        force_share: true,
        ..Default::default()
    };
    Qcow2Image::open(path, &opts)
}

/// What the destination needs to know of a disk to copy: checked here first (qcow2).
pub fn describe(d: &DiskConfig) -> Result<CopiedDisk, StorageError> {
    let err = image_err(d);
    if d.format == Some(DiskFormat::Raw) {
        return Err(err(
            "--copy-storage copies qcow2 disks; put a raw disk on storage both hosts see".into(),
        ));
    }
    let img = open_shared(&d.path).map_err(|e| err(chain(&e)))?;
    let h = img.header();
    Ok(CopiedDisk {
        size: img.size(),
        backing: h.backing_file.clone(),
        backing_format: h.backing_format.clone(),
    })
}

/// One disk the source sends.
struct Outgoing {
    index: u32,
    config: DiskConfig,
    /// CRC-32 of each chunk sent, by offset.
    sent: HashMap<u64, u32>,
}

/// The source's copied disks.
#[derive(Default)]
pub struct DiskSender {
    disks: Vec<Outgoing>,
}

impl DiskSender {
    /// Sends the disks of `disks` whose index is listed.
    pub fn new(disks: Vec<(u32, DiskConfig)>) -> Self {
        DiskSender {
            disks: disks
                .into_iter()
                .map(|(index, config)| Outgoing {
                    index,
                    config,
                    sent: HashMap::new(),
                })
                .collect(),
        }
    }

    /// The pass while the VM runs.
    pub fn precopy(
        &mut self,
        ch: &mut Channel<TcpStream>,
        ctl: &Control,
    ) -> Result<(), MigrationError> {
        for d in &mut self.disks {
            d.pass(ch, ctl, false)?;
        }
        Ok(())
    }

    /// The pass once the VM is stopped and its disks flushed.
    pub fn finish(
        &mut self,
        ch: &mut Channel<TcpStream>,
        ctl: &Control,
    ) -> Result<(), MigrationError> {
        for d in &mut self.disks {
            d.pass(ch, ctl, true)?;
        }
        Ok(())
    }
}

/// The offsets of the chunks the top layer of `img` holds.
fn allocated_chunks(img: &mut Qcow2Image) -> Result<Vec<u64>, disk::DiskError> {
    let size = img.size();
    let mut out = Vec::new();
    let mut at = 0;
    while at < size {
        let e = img.extent(at, size - at)?;
        let len = e.len.max(1);
        if e.depth == 0 && e.present {
            let mut c = at / CHUNK * CHUNK;
            while c < at + len {
                if out.last() != Some(&c) {
                    out.push(c);
                }
                c += CHUNK;
            }
        }
        at += len;
    }
    Ok(out)
}

impl Outgoing {
    /// Sends every chunk of the layer (first pass) or every chunk that changed since it was
    /// sent (`last`), and in `last` also chunks sent before that the layer no longer holds.
    fn pass(
        &mut self,
        ch: &mut Channel<TcpStream>,
        ctl: &Control,
        last: bool,
    ) -> Result<(), MigrationError> {
        let err = image_err(&self.config);
        let mut img = open_shared(&self.config.path).map_err(|e| err(chain(&e)))?;
        let mut chunks = allocated_chunks(&mut img).map_err(|e| err(chain(&e)))?;
        if last {
            let gone: Vec<u64> = self
                .sent
                .keys()
                .filter(|k| chunks.binary_search(k).is_err())
                .copied()
                .collect();
            chunks.extend(gone);
        }
        let size = img.size();
        let mut buf = vec![0u8; CHUNK as usize];
        for at in chunks {
            ctl.check_cancel()?;
            let len = CHUNK.min(size - at) as usize;
            let data = &mut buf[..len];
            img.read_at(data, at).map_err(|e| err(chain(&e)))?;
            let crc = crc32fast::hash(data);
            if self.sent.get(&at) == Some(&crc) {
                continue;
            }
            let range = Range {
                at,
                count: len as u32,
                disk: self.index,
            };
            ch.send(Kind::Disk, &[&range.bytes(), data])?;
            self.sent.insert(at, crc);
            ctl.update(|i| i.disk_sent += len as u64);
        }
        Ok(())
    }
}

/// One disk the destination receives into a new overlay.
struct Incoming {
    path: PathBuf,
    image: Box<dyn DiskImage>,
}

/// The destination's copied disks, by index; new files are removed unless committed.
#[derive(Default)]
pub struct DiskReceiver {
    disks: Vec<Option<Incoming>>,
    created: Vec<PathBuf>,
}

fn create_overlay(d: &DiskConfig, c: &CopiedDisk) -> Result<(), StorageError> {
    let err = image_err(d);
    if let Some(b) = &c.backing {
        let base = resolve_backing(&d.path, b);
        if !base.is_file() {
            return Err(err(format!(
                "its base image {} is not on this host; --copy-storage expects it on both",
                base.display()
            )));
        }
    }
    let file = FsOpen::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&d.path)
        .map_err(|e| {
            err(format!(
                "cannot create the copy here: {e} (--copy-storage writes a new image; give \
                 --disk id={},path=NEW on this side)",
                d.id()
            ))
        })?;
    let opts = CreateOptions {
        size: c.size,
        backing_file: c.backing.clone(),
        backing_format: c.backing_format.clone(),
        ..CreateOptions::default()
    };
    Qcow2Image::create(&HostFile::from_file(file), &opts).map_err(|e| err(chain(&e)))
}

impl DiskReceiver {
    /// New overlays for the disks of `disks` that `copied` marks.
    pub fn create(
        disks: &[DiskConfig],
        copied: &[Option<CopiedDisk>],
    ) -> Result<Self, StorageError> {
        let mut r = DiskReceiver::default();
        for (d, c) in disks.iter().zip(copied) {
            let Some(c) = c else {
                r.disks.push(None);
                continue;
            };
            create_overlay(d, c)?;
            r.created.push(d.path.clone());
            let opts = disk::OpenOptions {
                format: Some(ImageFormat::Qcow2),
                ..Default::default()
            };
            let image = disk::open_image(&d.path, &opts).map_err(|e| image_err(d)(chain(&e)))?;
            r.disks.push(Some(Incoming {
                path: d.path.clone(),
                image,
            }));
        }
        Ok(r)
    }

    /// Writes a `Disk` message's data.
    pub fn write(&mut self, payload: &[u8]) -> Result<(), MigrationError> {
        let range = Range::parse(payload)?;
        let data = &payload[RANGE_HEADER..];
        let bad = || StorageError::Range {
            disk: range.disk,
            at: range.at,
            len: data.len(),
        };
        if range.count as usize != data.len() {
            return Err(WireError::Corrupt("a disk message's length does not match".into()).into());
        }
        let d = self
            .disks
            .get_mut(range.disk as usize)
            .and_then(Option::as_mut)
            .ok_or_else(bad)?;
        let end = range.at.checked_add(data.len() as u64).ok_or_else(bad)?;
        if end > d.image.size() {
            return Err(bad().into());
        }
        d.image.write_at(data, range.at).map_err(|e| {
            MigrationError::Refused(format!("{}: cannot write: {}", d.path.display(), chain(&e)))
        })
    }

    /// Flushes and closes the copies (the VM opens them next); they are still removed if
    /// the migration fails before [`Self::keep`].
    pub fn close(&mut self) -> Result<(), String> {
        for d in self.disks.iter_mut().flatten() {
            d.image
                .flush()
                .map_err(|e| format!("{}: cannot flush: {}", d.path.display(), chain(&e)))?;
        }
        self.disks.clear();
        Ok(())
    }

    /// The VM runs on the copies: they stay.
    pub fn keep(mut self) {
        self.created.clear();
    }
}

impl Drop for DiskReceiver {
    fn drop(&mut self) {
        self.disks.clear();
        for p in &self.created {
            if let Err(e) = std::fs::remove_file(p) {
                log::warn!("cannot remove the partial copy {}: {e}", p.display());
            }
        }
    }
}
