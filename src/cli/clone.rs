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

fn default_path(original: &Path, name: &str, linked: bool) -> PathBuf {
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
    original.with_file_name(format!("{stem}-{name}.{ext}"))
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
        if !a.file.is_empty() && a.file.len() != cfg.disks.len() {
            return Err(Failure::usage(format!(
                "{} -f given for {} disks",
                a.file.len(),
                cfg.disks.len()
            )));
        }
        let mut made = Vec::new();
        for (i, d) in cfg.disks.iter_mut().enumerate() {
            let target = a
                .file
                .get(i)
                .cloned()
                .unwrap_or_else(|| default_path(&d.path, &a.name, a.linked));
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
