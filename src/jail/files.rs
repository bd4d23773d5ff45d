//! What a jail holds: the files `ember run`'s arguments name (kernel, initrd, disks and
//! their qcow2 backing chains, a snapshot's state and memory and the disks it names), each
//! at its own absolute path, so the arguments, relative paths (from the same working
//! directory) and backing file names resolve inside the jail as they do outside.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use devices::disk::qcow2::header::Header;
use devices::disk::qcow2::resolve_backing;
use devices::disk::MAX_CHAIN_DEPTH;

use crate::cli::run::RunArgs;
use crate::config::{DiskConfig, NetBackendConfig, NetConfig};

/// A host file shown in the jail at the same path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailFile {
    /// Its absolute path (no `.` or `..`).
    pub path: PathBuf,
    /// The VM may write it.
    pub writable: bool,
}

/// Why a jail cannot be made for these arguments.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// An `ember run` option that cannot work in a jail.
    #[error("{0}")]
    Unsupported(String),
    /// A bad `ember run` option.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A file cannot be read.
    #[error("{path}")]
    Io {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A qcow2 backing chain loops or is too deep.
    #[error("the backing chain of {0} loops or is deeper than {MAX_CHAIN_DEPTH}")]
    Chain(String),
}

/// `p` made absolute against `cwd`, with `.` and `..` resolved by name.
pub fn absolute_in(cwd: &Path, p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    };
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The qcow2 backing file `path` names, if it is a qcow2 image with one.
fn backing_of(path: &Path) -> Result<Option<PathBuf>, FilesError> {
    let io = |source| FilesError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut head = Vec::new();
    f.by_ref()
        .take(1 << 20)
        .read_to_end(&mut head)
        .map_err(io)?;
    match Header::parse(&head, len) {
        Ok(h) => Ok(h.backing_file.map(|b| resolve_backing(path, &b))),
        Err(_) => Ok(None), // raw (or not an image the VM will accept: it says so itself)
    }
}

/// A list without repeats; a file wanted writable anywhere is writable.
#[derive(Default)]
struct Inventory(Vec<JailFile>);

impl Inventory {
    fn add(&mut self, path: PathBuf, writable: bool) {
        match self.0.iter_mut().find(|f| f.path == path) {
            Some(f) => f.writable |= writable,
            None => self.0.push(JailFile { path, writable }),
        }
    }

    /// A disk image and its backing chain (read-only below the top).
    fn add_disk(&mut self, cwd: &Path, d: &DiskConfig) -> Result<(), FilesError> {
        let top = absolute_in(cwd, &d.path);
        self.add(top.clone(), !d.readonly);
        let mut seen = vec![top.clone()];
        let mut at = top;
        while let Some(next) = backing_of(&at)? {
            let next = absolute_in(cwd, &next);
            if seen.contains(&next) || seen.len() > MAX_CHAIN_DEPTH {
                return Err(FilesError::Chain(d.path.display().to_string()));
            }
            self.add(next.clone(), false);
            seen.push(next.clone());
            at = next;
        }
        Ok(())
    }
}

/// Refuses NICs a jailed (unprivileged) VM cannot open: only existing taps (`tap=NAME`)
/// work, in the jail's network namespace.
fn check_nets(nets: &[NetConfig]) -> Result<Vec<String>, FilesError> {
    nets.iter()
        .map(|n| match n.backend() {
            NetBackendConfig::Tap(name) if !name.is_empty() => Ok(name),
            _ => Err(FilesError::Unsupported(format!(
                "--net {}: a jailed VM can only use an existing tap (tap=NAME, in --netns); \
                 fd= and network= need privileges the jail drops",
                n.id()
            ))),
        })
        .collect()
}

/// What `run` needs in the jail: the files, and the taps it attaches.
pub fn inventory(run: &RunArgs, cwd: &Path) -> Result<(Vec<JailFile>, Vec<String>), FilesError> {
    let unsupported = |m: &str| Err(FilesError::Unsupported(m.to_string()));
    if run.detach {
        return unsupported("-d: give ember jail --daemonize instead");
    }
    if run.api_sock.is_some() {
        return unsupported("--api-sock: a jailed VM's socket is api.sock in its state directory");
    }
    if run.config_file.is_some() {
        return unsupported("--config-file: give the VM's options on the command line");
    }
    if let Some(s) = &run.serial {
        if s == "pty" || s.starts_with("file") {
            return unsupported(
                "--serial: a jailed VM's console is stdio, log (its console.log and \
                 'ember console') or none",
            );
        }
    }
    let mut inv = Inventory::default();
    for p in [&run.kernel, &run.initrd].into_iter().flatten() {
        inv.add(absolute_in(cwd, p), false);
    }
    let overrides: Vec<DiskConfig> = run
        .disk
        .iter()
        .map(|d| DiskConfig::parse(d))
        .collect::<Result<_, _>>()?;
    let mut nets: Vec<NetConfig> = run
        .net
        .iter()
        .map(|n| NetConfig::parse(n))
        .collect::<Result<_, _>>()?;
    if let Some(state) = &run.restore {
        let state = absolute_in(cwd, state);
        let memory = crate::snapshot::memory_path_for(&state);
        let saved: crate::snapshot::SnapshotState = crate::snapshot::format::read_file(&state)
            .map_err(|e| {
                FilesError::Unsupported(format!("--restore: {}", crate::error_chain(&e)))
            })?;
        for (i, d) in saved.config.disks.iter().enumerate() {
            let id = d.id.clone().unwrap_or_else(|| crate::config::disk_id(i));
            let replaced = overrides
                .iter()
                .enumerate()
                .any(|(j, o)| o.id.clone().unwrap_or_else(|| crate::config::disk_id(j)) == id);
            if !replaced {
                inv.add_disk(cwd, d)?;
            }
        }
        if run.net.is_empty() {
            nets = saved.config.nets.clone();
        }
        inv.add(state, false);
        inv.add(memory, false);
    }
    for d in &overrides {
        inv.add_disk(cwd, d)?;
    }
    let taps = check_nets(&nets)?;
    Ok((inv.0, taps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_made_absolute_by_name() {
        let cwd = Path::new("/home/u/vm");
        assert_eq!(
            absolute_in(cwd, Path::new("a.img")),
            Path::new("/home/u/vm/a.img")
        );
        assert_eq!(
            absolute_in(cwd, Path::new("../b/./c")),
            Path::new("/home/u/b/c")
        );
        assert_eq!(absolute_in(cwd, Path::new("/x/../../y")), Path::new("/y"));
    }

    fn qcow2(path: &Path, backing: Option<&str>) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        let opts = devices::disk::qcow2::CreateOptions {
            size: 1 << 20,
            backing_file: backing.map(str::to_string),
            backing_format: backing.map(|_| "qcow2".to_string()),
            ..Default::default()
        };
        devices::disk::qcow2::Qcow2Image::create(&devices::disk::HostFile::from_file(f), &opts)
            .unwrap();
    }

    fn args(list: &[&str]) -> RunArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Line {
            #[command(flatten)]
            run: RunArgs,
        }
        Line::try_parse_from(std::iter::once("run").chain(list.iter().copied()))
            .unwrap()
            .run
    }

    #[test]
    fn disks_bring_their_backing_chains_read_only() {
        let d = tempfile::tempdir().unwrap();
        qcow2(&d.path().join("base.qcow2"), None);
        std::fs::create_dir(d.path().join("sub")).unwrap();
        qcow2(&d.path().join("sub/mid.qcow2"), Some("../base.qcow2"));
        qcow2(&d.path().join("top.qcow2"), Some("sub/mid.qcow2"));
        let run = args(&["--kernel", "k", "--disk", "top.qcow2", "--net", "tap=t0"]);
        let (files, taps) = inventory(&run, d.path()).unwrap();
        let want = |p: &str, w| JailFile {
            path: d.path().join(p),
            writable: w,
        };
        assert_eq!(
            files,
            vec![
                want("k", false),
                want("top.qcow2", true),
                want("sub/mid.qcow2", false),
                want("base.qcow2", false),
            ]
        );
        assert_eq!(taps, vec!["t0".to_string()]);
    }

    #[test]
    fn loops_and_options_a_jail_cannot_serve_are_refused() {
        let d = tempfile::tempdir().unwrap();
        qcow2(&d.path().join("a.qcow2"), Some("b.qcow2"));
        qcow2(&d.path().join("b.qcow2"), Some("a.qcow2"));
        let run = args(&["--kernel", "k", "--disk", "a.qcow2"]);
        assert!(matches!(
            inventory(&run, d.path()),
            Err(FilesError::Chain(_))
        ));
        for bad in [
            &["--kernel", "k", "-d"][..],
            &["--kernel", "k", "--serial", "pty"],
            &["--kernel", "k", "--net", "network=default"],
            &["--kernel", "k", "--api-sock", "/x"],
        ] {
            assert!(
                matches!(
                    inventory(&args(bad), d.path()),
                    Err(FilesError::Unsupported(_))
                ),
                "{bad:?}"
            );
        }
    }
}
