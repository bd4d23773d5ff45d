//! A named snapshot's disk part, on images no VM holds open: apply it (revert) or delete it.

use devices::disk::{self, DiskImage};

use super::store::{DiskPart, DiskSnapshot, SnapshotMeta};

fn open(image: &std::path::Path) -> Result<Box<dyn DiskImage>, String> {
    let opts = disk::OpenOptions {
        format: Some(disk::ImageFormat::Qcow2),
        ..Default::default()
    };
    disk::open_image(image, &opts)
        .map_err(|e| format!("{}: {}", image.display(), crate::error_chain(&e)))
}

fn internal(d: &DiskSnapshot) -> Option<&std::path::Path> {
    match &d.part {
        DiskPart::Internal { image } => Some(image),
        DiskPart::External { .. } => None,
    }
}

/// Makes every disk of `meta` what it was when the snapshot was taken.
pub fn apply(meta: &SnapshotMeta) -> Result<(), String> {
    for d in &meta.disks {
        let Some(image) = internal(d) else {
            return Err(format!(
                "disk {} of snapshot {} is an external overlay; revert it by hand",
                d.id, meta.name
            ));
        };
        let mut img = open(image)?;
        img.snapshot_apply(&meta.name)
            .map_err(|e| format!("disk {}: {}", d.id, crate::error_chain(&e)))?;
        img.flush()
            .map_err(|e| format!("disk {}: {}", d.id, crate::error_chain(&e)))?;
    }
    Ok(())
}

/// Deletes the internal snapshots of `meta` from its disks.
pub fn delete(meta: &SnapshotMeta) -> Result<(), String> {
    for d in &meta.disks {
        let Some(image) = internal(d) else { continue };
        let mut img = open(image)?;
        img.snapshot_delete(&meta.name)
            .map_err(|e| format!("disk {}: {}", d.id, crate::error_chain(&e)))?;
        img.flush()
            .map_err(|e| format!("disk {}: {}", d.id, crate::error_chain(&e)))?;
    }
    Ok(())
}
