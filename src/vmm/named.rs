//! Named snapshots of a running VM (`ember snapshot-create-as`): memory, vCPUs and devices
//! in the snapshot store, and every disk's state in its image — an internal qcow2 snapshot
//! of the same name, or with `--disk-only` an external overlay the VM moves onto.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::disk::qcow2::{CreateOptions, Qcow2Image};
use devices::disk::{self, DiskImage, HostFile, ImageFormat, SnapshotMeta as DiskMeta};
use devices::virtio::block::Block;

use super::Vmm;
use crate::device_manager::VirtioHandle;
use crate::run_state::VmState;
use crate::snapshot::store::{self, DiskPart, DiskSnapshot, SnapshotMeta};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// `image`'s external overlay for snapshot `snap`: `STEM-SNAP.qcow2` beside it.
fn overlay_path(image: &Path, snap: &str) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    image.with_file_name(format!("{stem}-{snap}.qcow2"))
}

/// Makes a new qcow2 overlay at `path` over `base` (no file is opened but the new one).
fn create_overlay(path: &Path, base: &Path, format: ImageFormat, size: u64) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let opts = CreateOptions {
        size,
        backing_file: Some(base.display().to_string()),
        backing_format: Some(format.name().to_string()),
        ..CreateOptions::default()
    };
    Qcow2Image::create(&HostFile::from_file(file), &opts)
        .map_err(|e| format!("{}: {}", path.display(), crate::error_chain(&e)))
}

impl Vmm {
    /// The VM's disks with their ids.
    pub(super) fn blocks(&self) -> Vec<(String, Arc<Mutex<Block>>)> {
        self.devices
            .virtio_devices()
            .filter_map(|(id, h)| match h {
                VirtioHandle::Block(b) => Some((id.to_string(), b.clone())),
                VirtioHandle::Net(_) | VirtioHandle::Balloon(_) => None,
            })
            .collect()
    }

    /// Takes snapshot `name` of this VM (paused meanwhile, then as it was).
    pub fn snapshot_create_as(
        &mut self,
        name: &str,
        description: &str,
        disk_only: bool,
    ) -> Result<SnapshotMeta, String> {
        let was_paused = self.state == VmState::Paused;
        let dir = store::create_dir(&self.config.name, name).map_err(|e| e.to_string())?;
        self.pause()?;
        let result = self.take_named(name, description, disk_only, was_paused, &dir);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        if !was_paused {
            self.resume()?;
        }
        result
    }

    fn take_named(
        &mut self,
        name: &str,
        description: &str,
        disk_only: bool,
        was_paused: bool,
        dir: &Path,
    ) -> Result<SnapshotMeta, String> {
        self.devices.flush_disks()?;
        let disks = if disk_only {
            self.move_onto_overlays(name)?
        } else {
            self.internal_snapshots(name)?
        };
        if !disk_only {
            let state = dir.join("state");
            let mem = crate::snapshot::memory_path_for(&state);
            if let Err(e) = self.snapshot_to(&state, &mem, was_paused) {
                self.delete_disk_snapshots(name, &disks);
                return Err(crate::error_chain(&e));
            }
        }
        let meta = SnapshotMeta {
            name: name.to_string(),
            description: description.to_string(),
            created: now(),
            state: if disk_only {
                "disk-snapshot"
            } else if was_paused {
                "paused"
            } else {
                "running"
            }
            .into(),
            has_vm_state: !disk_only,
            disks,
        };
        store::save(&self.config.name, &meta).map_err(|e| e.to_string())?;
        Ok(meta)
    }

    /// An internal snapshot `name` in every disk; raw disks are refused (as libvirt does).
    fn internal_snapshots(&mut self, name: &str) -> Result<Vec<DiskSnapshot>, String> {
        let blocks = self.blocks();
        for (id, b) in &blocks {
            let format = b
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .disk_mut()
                .format();
            if format != ImageFormat::Qcow2 {
                return Err(format!(
                    "disk {id} is {}, which cannot hold an internal snapshot; use --disk-only \
                     (external qcow2 overlays) or convert it to qcow2",
                    format.name()
                ));
            }
        }
        let mut done = Vec::new();
        for (id, b) in &blocks {
            let meta = DiskMeta {
                vm_state_size: self.config.memory.0,
                vm_clock_nsec: self.started.elapsed().as_nanos() as u64,
                icount: None,
            };
            let r = b
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .disk_mut()
                .snapshot_create(name, meta);
            if let Err(e) = r {
                self.delete_disk_snapshots(name, &done);
                return Err(format!("disk {id}: {}", crate::error_chain(&e)));
            }
            let image = self.disk_path(id);
            done.push(DiskSnapshot {
                id: id.clone(),
                part: DiskPart::Internal { image },
            });
        }
        Ok(done)
    }

    fn disk_path(&self, id: &str) -> PathBuf {
        self.config
            .disks
            .iter()
            .find(|d| d.id() == id)
            .map(|d| d.path.clone())
            .unwrap_or_default()
    }

    /// Deletes the internal snapshots `name` of `disks` through the open images.
    pub fn delete_disk_snapshots(&mut self, name: &str, disks: &[DiskSnapshot]) {
        for d in disks {
            let DiskPart::Internal { .. } = d.part else {
                continue;
            };
            let Some((_, b)) = self.blocks().into_iter().find(|(id, _)| *id == d.id) else {
                continue;
            };
            let r = b
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .disk_mut()
                .snapshot_delete(name);
            if let Err(e) = r {
                log::warn!("disk {}: cannot delete snapshot {name}: {e}", d.id);
            }
        }
    }

    /// `--disk-only`: every disk's image is frozen and the VM moves onto a new overlay.
    fn move_onto_overlays(&mut self, name: &str) -> Result<Vec<DiskSnapshot>, String> {
        let mut done = Vec::new();
        for (id, b) in self.blocks() {
            let Some(cfg) = self.config.disks.iter().find(|d| d.id() == id).cloned() else {
                continue;
            };
            let image = std::path::absolute(&cfg.path).map_err(|e| e.to_string())?;
            let overlay = overlay_path(&image, name);
            let mut dev = b.lock().unwrap_or_else(|e| e.into_inner());
            let (size, format) = (dev.disk_mut().size(), dev.disk_mut().format());
            create_overlay(&overlay, &image, format, size)?;
            let opts = disk::OpenOptions {
                format: Some(ImageFormat::Qcow2),
                read_only: cfg.readonly,
                cache: cfg.cache.into(),
                force_share: false,
            };
            let swapped = dev.swap_disk(|old: Box<dyn DiskImage>| {
                drop(old);
                disk::open_image(&overlay, &opts).map_err(|e| {
                    let back = disk::open_image(
                        &image,
                        &disk::OpenOptions {
                            format: Some(format),
                            ..opts.clone()
                        },
                    );
                    let msg = format!("disk {id}: {}", crate::error_chain(&e));
                    match back {
                        Ok(old) => (old, msg),
                        Err(e2) => (
                            Box::new(disk::DetachedDisk::like_parts(size, format))
                                as Box<dyn DiskImage>,
                            format!("{msg}; reopening the old image failed too: {e2}"),
                        ),
                    }
                })
            });
            drop(dev);
            if let Err(e) = swapped {
                let _ = std::fs::remove_file(&overlay);
                return Err(e);
            }
            if let Some(d) = self.config.disks.iter_mut().find(|d| d.id() == id) {
                d.path = overlay.clone();
                d.format = Some(crate::config::DiskFormat::Qcow2);
            }
            done.push(DiskSnapshot {
                id,
                part: DiskPart::External { image, overlay },
            });
        }
        Ok(done)
    }
}
