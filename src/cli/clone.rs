//! `ember clone -o SRC -n NEW [-f FILE]... [--linked]`, as `virt-clone`: a new definition
//! with a new name, new MACs and new disks — full copies, or qcow2 overlays on the source's
//! images with `--linked`. The source must be shut off or paused.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::Args;

use super::{finish, Failure};
use crate::config::{parse_name, DiskFormat};
use crate::{definitions, vmdir};

/// `ember clone`.
#[derive(Args, Debug)]
pub struct CloneArgs {
    /// The VM to clone (defined; shut off or paused)
    #[arg(short = 'o', long = "original")]
    pub original: String,
    /// The new VM's name
    #[arg(short = 'n', long = "name")]
    pub name: String,
    /// Where each new disk goes, in disk order (default: STEM-NAME.EXT beside the original)
    #[arg(short = 'f', long = "file")]
    pub file: Vec<PathBuf>,
    /// qcow2 overlays on the original's images instead of full copies
    #[arg(long)]
    pub linked: bool,
}

/// Where the clone's copy of disk `id` at `original` goes when no -f says:
/// `STEM-NAME.EXT` beside it (`.qcow2` for a linked clone), or `STEM-NAME-ID.EXT` when an
/// earlier disk of the clone took that name (`a.qcow2` and `a.raw` linked).
fn default_path(original: &Path, id: &str, name: &str, linked: bool, taken: &[PathBuf]) -> PathBuf {
    let stem = original
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    let ext = if linked {
        "qcow2".to_string()
    } else {
        original
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_else(|| "img".into())
    };
    let plain = original.with_file_name(format!("{stem}-{name}.{ext}"));
    if taken.contains(&plain) {
        return original.with_file_name(format!("{stem}-{name}-{id}.{ext}"));
    }
    plain
}

/// Where each disk of `cfg` goes: the -f paths, or the defaults; no two the same.
fn targets(cfg: &crate::config::VmConfig, a: &CloneArgs) -> Result<Vec<PathBuf>, Failure> {
    if !a.file.is_empty() && a.file.len() != cfg.disks.len() {
        return Err(Failure::usage(format!(
            "{} -f given for {} disks",
            a.file.len(),
            cfg.disks.len()
        )));
    }
    let mut out: Vec<PathBuf> = Vec::with_capacity(cfg.disks.len());
    for (i, d) in cfg.disks.iter().enumerate() {
        let target = match a.file.get(i) {
            Some(f) => std::path::absolute(f).map_err(|e| Failure::usage(e.to_string()))?,
            None => default_path(&d.path, d.id(), &a.name, a.linked, &out),
        };
        if out.contains(&target) {
            return Err(Failure::usage(format!(
                "-f {} is given for two disks",
                target.display()
            )));
        }
        out.push(target);
    }
    Ok(out)
}

fn img(args: &[&std::ffi::OsStr]) -> Result<(), Failure> {
    let exe = std::env::current_exe().map_err(|e| Failure::failed(e.to_string()))?;
    let out = Command::new(exe)
        .arg("img")
        .args(args)
        .output()
        .map_err(|e| Failure::failed(format!("cannot run ember img: {e}")))?;
    if !out.status.success() {
        return Err(Failure::failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Makes `target` from `source`: a full copy, or an overlay.
fn copy_disk(
    source: &Path,
    format: Option<DiskFormat>,
    target: &Path,
    linked: bool,
) -> Result<(), Failure> {
    if target.exists() {
        return Err(Failure::usage(format!(
            "{} exists already; give another -f",
            target.display()
        )));
    }
    let source = std::path::absolute(source).map_err(|e| Failure::failed(e.to_string()))?;
    let fmt = match format {
        Some(DiskFormat::Raw) => "raw",
        Some(DiskFormat::Qcow2) => "qcow2",
        None => match devices::disk::probe_format(&source) {
            Ok(f) => f.name(),
            Err(e) => return Err(Failure::failed(crate::error_chain(&e))),
        },
    };
    let (s, t) = (source.as_os_str(), target.as_os_str());
    if linked {
        // The original may be paused with its images open: read the size without locking.
        let opts = devices::disk::OpenOptions {
            read_only: true,
            force_share: true,
            ..Default::default()
        };
        let size = devices::disk::open_image(&source, &opts)
            .map_err(|e| Failure::failed(crate::error_chain(&e)))?
            .size()
            .to_string();
        img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            s,
            "-F".as_ref(),
            fmt.as_ref(),
            "-u".as_ref(),
            t,
            size.as_ref(),
        ])
    } else {
        img(&[
            "convert".as_ref(),
            "-U".as_ref(),
            "-f".as_ref(),
            fmt.as_ref(),
            "-O".as_ref(),
            fmt.as_ref(),
            s,
            t,
        ])
    }
}

/// `ember clone`.
pub fn run(a: CloneArgs) -> ExitCode {
    finish((|| {
        parse_name(&a.name).map_err(|e| Failure::usage(e.to_string()))?;
        if definitions::exists(&a.name) || vmdir::find(&a.name).is_some() {
            return Err(Failure::usage(format!(
                "a VM named '{}' exists already",
                a.name
            )));
        }
        let mut cfg = definitions::load(&a.original).map_err(|e| {
            Failure::usage(format!(
                "{}; only defined VMs can be cloned",
                crate::error_chain(&e)
            ))
        })?;
        if let Some(vm) = vmdir::find(&a.original) {
            let state = crate::api::client::get_json(&vm.api_sock, "/")?;
            if state["state"] != "Paused" {
                return Err(Failure::usage(format!(
                    "VM '{}' is running; shut it off or suspend it first",
                    a.original
                )));
            }
        }
        let targets = targets(&cfg, &a)?;
        let mut made = Vec::new();
        for (d, target) in cfg.disks.iter_mut().zip(targets) {
            if let Err(f) = copy_disk(&d.path, d.format, &target, a.linked) {
                for m in &made {
                    let _ = std::fs::remove_file(m);
                }
                return Err(f);
            }
            made.push(target.clone());
            d.path = target;
            if a.linked {
                d.format = Some(DiskFormat::Qcow2);
            }
        }
        cfg.name = a.name.clone();
        for n in &mut cfg.nets {
            n.mac = None;
            if n.network.is_none() && n.fd.is_none() {
                // A tap by name is the original's: leave the clone on the same kind of link
                // but let the user pick its tap (ember edit) if both run at once.
                log::warn!("NIC {} uses tap {:?} like the original", n.id(), n.tap);
            }
        }
        cfg.normalize(&a.name);
        definitions::save(&cfg).map_err(|e| Failure::failed(crate::error_chain(&e)))?;
        outln!("Clone '{}' created successfully.", a.name);
        Ok(())
    })())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, VmConfig};

    fn vm(disks: &[&str]) -> VmConfig {
        let mut cfg = VmConfig::new("web", PathBuf::from("/k"));
        cfg.disks = disks
            .iter()
            .map(|d| DiskConfig::parse(d).unwrap())
            .collect();
        cfg.normalize("web");
        cfg
    }

    fn args(linked: bool, file: &[&str]) -> CloneArgs {
        CloneArgs {
            original: "web".into(),
            name: "copy".into(),
            file: file.iter().map(PathBuf::from).collect(),
            linked,
        }
    }

    #[test]
    fn disks_of_one_stem_get_distinct_default_names() {
        let cfg = vm(&["path=/v/a.qcow2", "path=/v/a.raw,format=raw"]);
        let linked = targets(&cfg, &args(true, &[])).unwrap();
        assert_eq!(
            linked,
            [
                PathBuf::from("/v/a-copy.qcow2"),
                PathBuf::from("/v/a-copy-vdb.qcow2")
            ]
        );
        let full = targets(&cfg, &args(false, &[])).unwrap();
        assert_eq!(
            full,
            [
                PathBuf::from("/v/a-copy.qcow2"),
                PathBuf::from("/v/a-copy.raw")
            ]
        );
    }

    #[test]
    fn one_file_for_two_disks_or_a_wrong_count_is_refused() {
        let cfg = vm(&["path=/v/a.qcow2", "path=/v/b.qcow2"]);
        let twice = targets(&cfg, &args(false, &["/v/c.qcow2", "/v/c.qcow2"]));
        assert!(twice.unwrap_err().message.contains("given for two disks"));
        let short = targets(&cfg, &args(false, &["/v/c.qcow2"]));
        assert_eq!(short.unwrap_err().message, "1 -f given for 2 disks");
    }
}
