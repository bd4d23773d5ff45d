//! Where running VMs are found: `$EMBER_STATE_DIR/vms/NAME/` (default `/run/ember`, or
//! `$XDG_RUNTIME_DIR/ember` for other users than root) holds the VM's `lock` (an flock held
//! for the life of the ember process that runs it: names are unique per host, and a VM
//! killed with -9 leaves a lock nobody holds, so its directory is known stale and cleaned),
//! `pid`, `api.sock` (mode 0600, or a symlink to the `--api-sock` path) and `console.log`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Errors claiming or finding a VM's directory.
#[derive(Debug, thiserror::Error)]
pub enum VmDirError {
    /// Another process runs a VM of this name.
    #[error("a VM named '{name}' is already running (pid {pid}); pick another --name")]
    InUse {
        /// The name.
        name: String,
        /// Its process.
        pid: String,
    },
    /// The directory cannot be made or used.
    #[error("cannot use the state directory {path}")]
    Io {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// The root of the state directories.
pub fn state_root() -> PathBuf {
    if let Some(d) = std::env::var_os("EMBER_STATE_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/run/ember");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("ember"),
        // SAFETY: as above.
        None => std::env::temp_dir().join(format!("ember-{}", unsafe { libc::geteuid() })),
    }
}

/// The directory of VM `name`.
pub fn path_of(name: &str) -> PathBuf {
    state_root().join("vms").join(name)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> VmDirError + '_ {
    move |source| VmDirError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Tries to take the lock file's flock without waiting.
fn try_lock(file: &File) -> bool {
    // SAFETY: flock on a descriptor we own; no memory is involved.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// A claimed VM directory: the lock is held until this is dropped, then the directory goes.
pub struct VmDir {
    name: String,
    path: PathBuf,
    _lock: File,
}

impl VmDir {
    /// Claims the directory of `name` for this process, cleaning what a dead VM left.
    pub fn claim(name: &str) -> Result<Self, VmDirError> {
        let path = path_of(name);
        let lock = loop {
            let lock = Self::lock_file(&path)?;
            if !try_lock(&lock) {
                let pid = fs::read_to_string(path.join("pid")).unwrap_or_default();
                return Err(VmDirError::InUse {
                    name: name.to_string(),
                    pid: pid.trim().to_string(),
                });
            }
            // Someone cleaning a stale directory may have removed the file we locked.
            if same_file(&lock, &path.join("lock")) {
                break lock;
            }
        };
        for stale in [
            "api.sock",
            "pid",
            "console.log",
            "console.log.1",
            "ember.log",
        ] {
            let _ = fs::remove_file(path.join(stale));
        }
        Ok(VmDir {
            name: name.to_string(),
            path,
            _lock: lock,
        })
    }

    fn lock_file(path: &Path) -> Result<File, VmDirError> {
        fs::create_dir_all(path).map_err(io_err(path))?;
        let lock_path = path.join("lock");
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))
    }

    /// Makes the VM visible to `ember list` and the verbs (its API socket is up): writes
    /// the pid file.
    pub fn publish(&self) -> Result<(), VmDirError> {
        let pid_path = self.path.join("pid");
        let tmp = self.path.join("pid.tmp");
        // In a jail, the PID the host sees.
        let pid = crate::jail::host_pid();
        fs::write(&tmp, format!("{pid}\n")).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &pid_path).map_err(io_err(&pid_path))
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the API socket is (or links to).
    pub fn api_sock(&self) -> PathBuf {
        self.path.join("api.sock")
    }

    /// The console log.
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }

    /// Makes `api.sock` point at a socket elsewhere (`--api-sock`).
    pub fn link_api_sock(&self, target: &Path) -> io::Result<()> {
        let link = self.api_sock();
        let _ = fs::remove_file(&link);
        let target = std::path::absolute(target)?;
        std::os::unix::fs::symlink(target, link)
    }
}

impl Drop for VmDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            log::debug!("cannot remove {}: {e}", self.path.display());
        }
    }
}

fn same_file(open: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (open.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// A VM found in the state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    /// Its name.
    pub name: String,
    /// Its process.
    pub pid: u32,
    /// Its API socket.
    pub api_sock: PathBuf,
}

/// What the directory of `name` says: `Some` when a live process holds it. A directory
/// whose lock nobody holds is removed (its VM died).
pub fn find(name: &str) -> Option<Running> {
    let path = path_of(name);
    let lock = OpenOptions::new()
        .write(true)
        .open(path.join("lock"))
        .ok()?;
    if try_lock(&lock) {
        // Without a pid file the directory may be in the middle of being claimed.
        if path.join("pid").exists() {
            let _ = fs::remove_dir_all(&path);
        }
        return None;
    }
    let mut pid = String::new();
    File::open(path.join("pid"))
        .and_then(|mut f| f.read_to_string(&mut pid))
        .ok()?;
    Some(Running {
        name: name.to_string(),
        pid: pid.trim().parse().ok()?,
        api_sock: path.join("api.sock"),
    })
}

/// Every running VM, by name.
pub fn list() -> Vec<Running> {
    let Ok(entries) = fs::read_dir(state_root().join("vms")) else {
        return Vec::new();
    };
    let mut out: Vec<Running> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| find(&n))
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests here change EMBER_STATE_DIR: one at a time.
    fn with_root<T>(f: impl FnOnce(&Path) -> T) -> T {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("EMBER_STATE_DIR", dir.path());
        let r = f(dir.path());
        std::env::remove_var("EMBER_STATE_DIR");
        r
    }

    #[test]
    fn a_name_is_claimed_once_and_freed_on_drop() {
        with_root(|_| {
            let a = VmDir::claim("web").unwrap();
            assert!(find("web").is_none(), "not listed before it is published");
            a.publish().unwrap();
            assert!(matches!(VmDir::claim("web"), Err(VmDirError::InUse { .. })));
            let found = find("web").unwrap();
            assert_eq!(found.pid, std::process::id());
            assert_eq!(list(), vec![found]);
            drop(a);
            assert!(find("web").is_none());
            assert!(VmDir::claim("web").is_ok());
        });
    }

    #[test]
    fn a_directory_left_by_a_dead_vm_is_cleaned() {
        with_root(|root| {
            let d = root.join("vms/ghost");
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("lock"), "").unwrap();
            fs::write(d.join("pid"), "999999\n").unwrap();
            fs::write(d.join("api.sock"), "").unwrap();
            assert!(find("ghost").is_none());
            assert!(!d.exists());
            assert!(list().is_empty());
        });
    }
}
