//! Named snapshots of a VM (`ember snapshot-create-as`): kept under
//! `$EMBER_DATA_DIR/snapshots/VM/SNAP/` (default `/var/lib/ember`, or
//! `~/.local/share/ember` for users other than root) as `meta.json` (what it is, which disks
//! hold what), `state` and `state.mem` (the VM's state and memory, unless disk-only). The
//! disks' part lives in the images: an internal qcow2 snapshot of the same name, or (disk-only)
//! an external overlay the VM moved onto.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where a disk's part of a snapshot is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskPart {
    /// An internal qcow2 snapshot of the snapshot's name in this image.
    Internal {
        /// The image.
        image: PathBuf,
    },
    /// The image was frozen; the VM writes to a new overlay from then on.
    External {
        /// The frozen image (the snapshot).
        image: PathBuf,
        /// The overlay the VM moved onto.
        overlay: PathBuf,
    },
}

/// One disk of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshot {
    /// The disk's id.
    pub id: String,
    /// Where its state is.
    pub part: DiskPart,
}

/// What a named snapshot is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Its name.
    pub name: String,
    /// The user's description.
    #[serde(default)]
    pub description: String,
    /// When (seconds since the epoch).
    pub created: u64,
    /// The VM's state when it was taken: "running" or "paused" ("disk-snapshot" without
    /// memory).
    pub state: String,
    /// Whether `state`/`state.mem` hold the VM's memory and devices.
    pub has_vm_state: bool,
    /// The disks.
    pub disks: Vec<DiskSnapshot>,
}

/// Errors of the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file cannot be used.
    #[error("{path}")]
    Io {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// No snapshot of this name.
    #[error("VM {vm} has no snapshot named '{name}'; see 'ember snapshot-list {vm}'")]
    NotFound {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
    /// The name is in use.
    #[error("VM {vm} already has a snapshot named '{name}'")]
    Exists {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
    /// A bad name or a bad meta file.
    #[error("{0}")]
    Invalid(String),
}

/// The data directory.
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EMBER_DATA_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/ember");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".local/share/ember")
}

/// The directory of snapshot `snap` of VM `vm`.
pub fn dir_of(vm: &str, snap: &str) -> PathBuf {
    data_dir().join("snapshots").join(vm).join(snap)
}

/// Its state file (memory: [`super::memory_path_for`] of it).
pub fn state_path(vm: &str, snap: &str) -> PathBuf {
    dir_of(vm, snap).join("state")
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Checks a snapshot name: as a VM name (it becomes a directory and a qcow2 tag).
pub fn check_name(name: &str) -> Result<(), StoreError> {
    crate::config::parse_name(name)
        .map(|_| ())
        .map_err(|e| StoreError::Invalid(format!("snapshot name {}", e.message)))
}

/// Makes the directory of a new snapshot.
pub fn create_dir(vm: &str, snap: &str) -> Result<PathBuf, StoreError> {
    check_name(snap)?;
    let dir = dir_of(vm, snap);
    if dir.join("meta.json").exists() {
        return Err(StoreError::Exists {
            vm: vm.into(),
            name: snap.into(),
        });
    }
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    Ok(dir)
}

/// Records `meta` (last: a snapshot without it does not exist).
pub fn save(vm: &str, meta: &SnapshotMeta) -> Result<(), StoreError> {
    let path = dir_of(vm, &meta.name).join("meta.json");
    let text = serde_json::to_string_pretty(meta).unwrap_or_default();
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Reads snapshot `snap` of VM `vm`.
pub fn load(vm: &str, snap: &str) -> Result<SnapshotMeta, StoreError> {
    check_name(snap)?;
    let path = dir_of(vm, snap).join("meta.json");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::NotFound {
                vm: vm.into(),
                name: snap.into(),
            })
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    serde_json::from_str(&text).map_err(|e| StoreError::Invalid(format!("{}: {e}", path.display())))
}

/// Every snapshot of VM `vm`, oldest first.
pub fn list(vm: &str) -> Vec<SnapshotMeta> {
    let Ok(entries) = fs::read_dir(data_dir().join("snapshots").join(vm)) else {
        return Vec::new();
    };
    let mut out: Vec<SnapshotMeta> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| load(vm, &n).ok())
        .collect();
    out.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    out
}

/// Removes snapshot `snap`'s files.
pub fn remove(vm: &str, snap: &str) -> Result<(), StoreError> {
    check_name(snap)?;
    let dir = dir_of(vm, snap);
    fs::remove_dir_all(&dir).map_err(io_err(&dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_are_created_listed_loaded_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("EMBER_DATA_DIR", dir.path());
        create_dir("web", "s1").unwrap();
        let meta = SnapshotMeta {
            name: "s1".into(),
            description: "first".into(),
            created: 5,
            state: "running".into(),
            has_vm_state: true,
            disks: vec![DiskSnapshot {
                id: "vda".into(),
                part: DiskPart::Internal {
                    image: "/x.qcow2".into(),
                },
            }],
        };
        save("web", &meta).unwrap();
        assert!(matches!(
            create_dir("web", "s1"),
            Err(StoreError::Exists { .. })
        ));
        assert_eq!(load("web", "s1").unwrap(), meta);
        assert_eq!(list("web"), vec![meta]);
        assert!(matches!(
            load("web", "s2"),
            Err(StoreError::NotFound { .. })
        ));
        assert!(check_name("../etc").is_err());
        remove("web", "s1").unwrap();
        assert!(list("web").is_empty());
        std::env::remove_var("EMBER_DATA_DIR");
    }
}
