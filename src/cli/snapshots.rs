//! virsh's snapshot verbs: snapshot-create-as, snapshot-list, snapshot-info,
//! snapshot-revert, snapshot-delete. A running VM takes them through its API; for a VM
//! that is not running, the disks are handled here directly.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use super::{finish, send, Failure};
use crate::snapshot::store::{self, SnapshotMeta};
use crate::{definitions, vmdir};

/// `ember snapshot-create-as`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The VM's name
    pub name: String,
    /// The snapshot's name
    pub snapshot: String,
    /// A description
    #[arg(long, default_value = "")]
    pub description: String,
    /// Only the disks, as external qcow2 overlays the VM moves onto (raw disks need this)
    #[arg(long)]
    pub disk_only: bool,
}

/// A VM and one of its snapshots.
#[derive(Args, Debug)]
pub struct SnapArgs {
    /// The VM's name
    pub name: String,
    /// The snapshot's name
    pub snapshot: String,
}

/// A VM.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// The VM's name
    pub name: String,
}

fn known_vm(name: &str) -> Result<bool, Failure> {
    if vmdir::find(name).is_some() {
        return Ok(true);
    }
    if definitions::exists(name) || !store::list(name).is_empty() {
        return Ok(false);
    }
    Err(Failure::usage(format!(
        "no VM named '{name}'; see 'ember list --all'"
    )))
}

fn date(secs: u64) -> String {
    let t = secs as libc::time_t;
    // SAFETY: localtime_r fills the tm we own from a plain integer; strftime writes at most
    // the buffer's length into our buffer.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        let mut buf = [0u8; 64];
        let fmt = c"%Y-%m-%d %H:%M:%S %z";
        let n = libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

/// `ember snapshot-create-as NAME SNAP [--description D] [--disk-only]`.
pub fn create(a: CreateArgs) -> ExitCode {
    finish((|| {
        store::check_name(&a.snapshot).map_err(|e| Failure::usage(e.to_string()))?;
        if !known_vm(&a.name)? {
            return Err(Failure::usage(format!(
                "VM '{}' is not running; start it first (snapshots of a shut-off VM are not \
                 supported)",
                a.name
            )));
        }
        let body = json!({
            "name": a.snapshot, "description": a.description, "disk_only": a.disk_only,
        });
        send(&a.name, "PUT", "/ember/snapshots", body)?;
        outln!("Domain snapshot {} created", a.snapshot);
        Ok(())
    })())
}

/// `ember snapshot-list NAME`.
pub fn list(a: ListArgs) -> ExitCode {
    finish((|| {
        known_vm(&a.name)?;
        let rows: Vec<Vec<String>> = store::list(&a.name)
            .into_iter()
            .map(|m| vec![m.name, date(m.created), m.state])
            .collect();
        super::verbs::print_table(&["Name", "Creation Time", "State"], &rows);
        Ok(())
    })())
}

fn load(vm: &str, snap: &str) -> Result<SnapshotMeta, Failure> {
    store::load(vm, snap).map_err(|e| Failure::usage(e.to_string()))
}

/// `ember snapshot-info NAME SNAP`.
pub fn info(a: SnapArgs) -> ExitCode {
    finish((|| {
        known_vm(&a.name)?;
        let m = load(&a.name, &a.snapshot)?;
        let rows = [
            ("Name", m.name.clone()),
            ("Domain", a.name.clone()),
            ("Description", m.description.clone()),
            ("Creation Time", date(m.created)),
            ("State", m.state.clone()),
            ("Memory", if m.has_vm_state { "yes" } else { "no" }.into()),
            (
                "Location",
                if m.has_vm_state {
                    "internal"
                } else {
                    "external"
                }
                .into(),
            ),
        ];
        for (k, v) in rows {
            outln!("{:<16}{v}", format!("{k}:"));
        }
        for d in &m.disks {
            match &d.part {
                store::DiskPart::Internal { image } => {
                    outln!(
                        "Disk {}:       internal snapshot in {}",
                        d.id,
                        image.display()
                    )
                }
                store::DiskPart::External { image, overlay } => outln!(
                    "Disk {}:       {} (frozen), now on {}",
                    d.id,
                    image.display(),
                    overlay.display()
                ),
            }
        }
        Ok(())
    })())
}

/// `ember snapshot-revert NAME SNAP`.
pub fn revert(a: SnapArgs) -> ExitCode {
    let checked = (|| {
        let running = known_vm(&a.name)?;
        let m = load(&a.name, &a.snapshot)?;
        if running {
            send(
                &a.name,
                "PUT",
                "/ember/snapshots/revert",
                json!({ "name": a.snapshot }),
            )?;
            outln!("VM {} reverted to snapshot {}", a.name, a.snapshot);
            return Ok(None);
        }
        crate::snapshot::disks::apply(&m).map_err(Failure::failed)?;
        Ok(Some(m))
    })();
    match checked {
        Ok(Some(m)) if m.has_vm_state => {
            let state = store::state_path(&a.name, &a.snapshot);
            let mut args: Vec<OsString> = vec![
                "run".into(),
                "--restore".into(),
                state.into_os_string(),
                "--name".into(),
                a.name.clone().into(),
            ];
            if m.state == "paused" {
                args.push("--paused".into());
            }
            super::detach::spawn_detached(&args)
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(f) => finish(Err(f)),
    }
}

/// `ember snapshot-delete NAME SNAP`.
pub fn delete(a: SnapArgs) -> ExitCode {
    finish((|| {
        let running = known_vm(&a.name)?;
        let m = load(&a.name, &a.snapshot)?;
        if running {
            send(
                &a.name,
                "PUT",
                "/ember/snapshots/delete",
                json!({ "name": a.snapshot }),
            )?;
        } else {
            crate::snapshot::disks::delete(&m).map_err(Failure::failed)?;
            store::remove(&a.name, &a.snapshot).map_err(|e| Failure::failed(e.to_string()))?;
        }
        outln!("Domain snapshot {} deleted", a.snapshot);
        Ok(())
    })())
}

/// `ember snapshot-rebase`.
#[derive(Args, Debug)]
pub struct RebaseArgs {
    /// The base memory file (a Full snapshot's, or a base earlier diffs were merged onto);
    /// changed in place
    #[arg(long, value_name = "FILE")]
    pub base_file: std::path::PathBuf,
    /// The Diff snapshot's memory file, taken after the base's snapshot
    #[arg(long, value_name = "FILE")]
    pub diff_file: std::path::PathBuf,
}

/// `ember snapshot-rebase --base-file BASE --diff-file DIFF`: merges a Diff snapshot's memory
/// onto its base (Firecracker's `rebase-snap`); the base then loads with the diff's state.
pub fn rebase(a: RebaseArgs) -> ExitCode {
    use crate::snapshot::rebase::{self, RebaseError};
    let r = match rebase::rebase(&a.base_file, &a.diff_file) {
        Ok(m) => {
            outln!(
                "{}: merged {} ({} KiB in {} extents)",
                a.base_file.display(),
                a.diff_file.display(),
                m.bytes >> 10,
                m.extents
            );
            Ok(())
        }
        Err(e @ RebaseError::Mismatch(_)) => Err(Failure::usage(e.to_string())),
        Err(e @ RebaseError::Io { op, .. }) if op.starts_with("cannot open") => {
            Err(Failure::usage(crate::error_chain(&e)))
        }
        Err(e) => Err(Failure::failed(crate::error_chain(&e))),
    };
    finish(r)
}
