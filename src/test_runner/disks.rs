//! Throw-away disks: no case sees what another wrote, and the test file's images are never
//! written. A boot writes to qcow2 overlays over the file's disks (`readonly=on` disks are
//! used as they are); a shared boot's overlays, frozen by its snapshot, become the read-only
//! bases of each case's own overlays.
//!
//! `ember run --restore` reopens the disks the snapshot names and has no `--disk` override
//! yet, so a case that starts from a snapshot with writable disks gets its own copy of the
//! (small) state file naming its overlays, next to a link to the shared memory file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{DiskCache, DiskConfig, DiskFormat};
use crate::snapshot::{self, SnapshotState};

/// Why a disk could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Probing an image's format failed.
    #[error("cannot read disk '{path}'")]
    Probe {
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: devices::disk::DiskError,
    },
    /// `ember img create` failed.
    #[error("cannot create the overlay '{path}': {message}")]
    Overlay {
        /// The overlay.
        path: String,
        /// What ember img said.
        message: String,
    },
    /// The snapshot's state file.
    #[error("cannot use the snapshot state '{path}'")]
    State {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: snapshot::FormatError,
    },
    /// A file in the work directory.
    #[error("cannot write '{path}'")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The `--disk` spec of `d` (commas in the path doubled).
pub fn disk_spec(d: &DiskConfig) -> String {
    let mut s = format!("path={}", d.path.to_string_lossy().replace(',', ",,"));
    if let Some(id) = &d.id {
        s.push_str(&format!(",id={id}"));
    }
    match d.format {
        Some(DiskFormat::Raw) => s.push_str(",format=raw"),
        Some(DiskFormat::Qcow2) => s.push_str(",format=qcow2"),
        None => {}
    }
    if d.readonly {
        s.push_str(",readonly=on");
    }
    if let Some(serial) = &d.serial {
        s.push_str(&format!(",serial={}", serial.replace(',', ",,")));
    }
    if d.cache == DiskCache::None {
        s.push_str(",cache=none");
    }
    s
}

fn format_of(d: &DiskConfig) -> Result<&'static str, DiskError> {
    let format = match d.format {
        Some(f) => f,
        None => match devices::disk::probe_format(&d.path).map_err(|source| DiskError::Probe {
            path: d.path.display().to_string(),
            source,
        })? {
            devices::disk::ImageFormat::Qcow2 => DiskFormat::Qcow2,
            devices::disk::ImageFormat::Raw => DiskFormat::Raw,
        },
    };
    Ok(match format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    })
}

/// Creates the qcow2 overlay `overlay` over `d`'s image with `ember img create`.
fn create_overlay(ember: &Path, d: &DiskConfig, overlay: &Path) -> Result<(), DiskError> {
    let format = format_of(d)?;
    let base = super::plan::absolute(&d.path);
    let args: Vec<OsString> = vec![
        "img".into(),
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-b".into(),
        base.into(),
        "-F".into(),
        format.into(),
        overlay.into(),
    ];
    let failed = |message: String| DiskError::Overlay {
        path: overlay.display().to_string(),
        message,
    };
    let out = Command::new(ember)
        .args(&args)
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(failed(err.trim().to_string()));
    }
    Ok(())
}

/// Disks for a boot: the `--disk` specs and the overlays created (to delete afterwards).
/// Overlays are named `WORK/TAG-N.qcow2`.
pub fn boot_disks(
    ember: &Path,
    disks: &[DiskConfig],
    work: &Path,
    tag: &str,
) -> Result<(Vec<String>, Vec<PathBuf>), DiskError> {
    let mut specs = Vec::new();
    let mut created = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let mut d = d.clone();
        d.path = super::plan::absolute(&d.path);
        if !d.readonly {
            let overlay = work.join(format!("{tag}-{i}.qcow2"));
            create_overlay(ember, &d, &overlay)?;
            created.push(overlay.clone());
            d.path = overlay;
            d.format = Some(DiskFormat::Qcow2);
        }
        specs.push(disk_spec(&d));
    }
    Ok((specs, created))
}

/// Reads a snapshot's state file.
pub fn read_state(path: &Path) -> Result<SnapshotState, DiskError> {
    snapshot::format::read_file(path).map_err(|source| DiskError::State {
        path: path.display().to_string(),
        source,
    })
}

/// The state file a case restores: `state_path` itself when the snapshot has no writable
/// disk, else `WORK/TAG.state` naming the case's overlays over the snapshot's disks (with
/// `WORK/TAG.state.mem` linking to the shared memory file). Also returns the files created.
pub fn case_state(
    ember: &Path,
    state_path: &Path,
    state: &SnapshotState,
    work: &Path,
    tag: &str,
) -> Result<(PathBuf, Vec<PathBuf>), DiskError> {
    if state.config.disks.iter().all(|d| d.readonly) {
        return Ok((state_path.to_path_buf(), Vec::new()));
    }
    let mut state = state.clone();
    let mut created = Vec::new();
    for (i, d) in state.config.disks.iter_mut().enumerate() {
        if d.readonly {
            continue;
        }
        let overlay = work.join(format!("{tag}-{i}.qcow2"));
        create_overlay(ember, d, &overlay)?;
        created.push(overlay.clone());
        d.path = overlay;
        d.format = Some(DiskFormat::Qcow2);
    }
    let path = work.join(format!("{tag}.state"));
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| DiskError::Io { path: p, source }
    };
    snapshot::format::write_file(&path, &state).map_err(|source| DiskError::State {
        path: path.display().to_string(),
        source,
    })?;
    created.push(path.clone());
    let mem = snapshot::memory_path_for(&path);
    let _ = std::fs::remove_file(&mem);
    std::os::unix::fs::symlink(
        super::plan::absolute(&snapshot::memory_path_for(state_path)),
        &mem,
    )
    .map_err(io(&mem))?;
    created.push(mem);
    Ok((path, created))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_spec_round_trips_through_the_option_parser() {
        // Arrange
        let d = DiskConfig::parse(
            "path=/a,,b/root.qcow2,id=vdb,format=qcow2,readonly=on,serial=S1,cache=none",
        )
        .unwrap();

        // Act
        let back = DiskConfig::parse(&disk_spec(&d)).unwrap();

        // Assert
        assert_eq!(back, d);
        assert_eq!(back.path, PathBuf::from("/a,b/root.qcow2"));
    }

    #[test]
    fn boot_disks_put_writable_images_under_overlays_and_keep_read_only_ones() {
        // Arrange: ember img needs the ember binary, which unit tests do not have; read-only
        // disks need no overlay, so a read-only disk is passed through untouched.
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("data.raw");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let d = DiskConfig::parse(&format!("path={},readonly=on", img.display())).unwrap();

        // Act
        let (specs, created) =
            boot_disks(Path::new("/nonexistent/ember"), &[d], dir.path(), "boot").unwrap();

        // Assert
        assert!(created.is_empty());
        assert_eq!(specs, vec![format!("path={},readonly=on", img.display())]);
    }
}
