//! `ember img snapshot -l|-c|-a|-d`: internal snapshots of a qcow2 image, with qemu-img's
//! options, listing format, messages and exit status (1 for any failure).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use devices::disk::{
    self, CacheMode, DiskError, ImageFormat, Qcow2Image, QcowError, Snapshot, SnapshotMeta,
};

use super::{human_size, parse_format, ImgError, ImgResult};

#[derive(Args)]
pub struct SnapshotArgs {
    /// Image format (probed when not given)
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// List the snapshots (the default)
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot named SNAPSHOT
    #[arg(short = 'c', value_name = "SNAPSHOT")]
    create: Option<String>,
    /// Apply (revert the disk to) the snapshot with ID or name SNAPSHOT
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Delete the snapshot named SNAPSHOT
    #[arg(short = 'd', value_name = "SNAPSHOT")]
    delete: Option<String>,
    /// Print nothing but errors
    #[arg(short = 'q')]
    quiet: bool,
    /// List even when another process uses the image (no locks; -l only)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image
    filename: PathBuf,
}

enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

fn action(args: &SnapshotArgs) -> Result<Action, ImgError> {
    let mut chosen = Vec::new();
    if args.list {
        chosen.push(Action::List);
    }
    if let Some(n) = &args.create {
        chosen.push(Action::Create(n.clone()));
    }
    if let Some(n) = &args.apply {
        chosen.push(Action::Apply(n.clone()));
    }
    if let Some(n) = &args.delete {
        chosen.push(Action::Delete(n.clone()));
    }
    if chosen.len() > 1 {
        return Err(ImgError::Usage("Cannot mix '-l', '-a', '-c', '-d'".into()));
    }
    let action = chosen.pop().unwrap_or(Action::List);
    if args.force_share && !matches!(action, Action::List) {
        return Err(ImgError::Usage(
            "-U (force-share) only goes with -l: -c, -a and -d change the image".into(),
        ));
    }
    Ok(action)
}

/// Prints `line` as ember's one error line and fails with qemu-img's status 1.
fn fail(line: String) -> ImgResult {
    eprintln!("ember: {line}");
    Ok(ExitCode::FAILURE)
}

/// qemu-img's words for an image that cannot be opened.
fn open_failure(path: &Path, read_only: bool, e: &DiskError) -> String {
    let name = path.display();
    match e {
        DiskError::Locked { perm, .. } => format!(
            "Could not open '{name}': Failed to get {}\"{perm}\" lock\n\
             Is another process using the image [{name}]?",
            if read_only { "shared " } else { "" }
        ),
        DiskError::Open { source, .. } => {
            // The OS's words alone, as qemu prints them ("No such file or directory").
            let text = source.to_string();
            let text = text.split(" (os error ").next().unwrap_or_default();
            format!("Could not open '{name}': Could not open '{name}': {text}")
        }
        other => format!("Could not open '{name}': {}", crate::error_chain(other)),
    }
}

fn open(path: &Path, read_only: bool, force_share: bool) -> Result<Qcow2Image, DiskError> {
    let file = disk::open_locked(path, read_only, CacheMode::Writeback, force_share)?;
    // Snapshots are this layer's metadata: the backing chain is not opened (as qemu-img).
    Qcow2Image::from_file(file, path, read_only)
}

pub fn run(args: SnapshotArgs) -> ImgResult {
    let action = action(&args)?;
    let path = &args.filename;
    let format = match &args.format {
        Some(f) => parse_format("-f", f)?,
        None => match disk::probe_format(path) {
            Ok(f) => f,
            Err(e) => return fail(open_failure(path, true, &e)),
        },
    };
    if format == ImageFormat::Raw {
        return raw(path, &action, args.force_share);
    }
    let read_only = matches!(action, Action::List);
    let mut img = match open(path, read_only, args.force_share) {
        Ok(img) => img,
        Err(e) => return fail(open_failure(path, read_only, &e)),
    };
    match action {
        Action::List => {
            let list = img
                .snapshots()
                .map_err(ImgError::disk("cannot read the snapshot table"))?;
            print!("{}", snapshot_list(&list));
        }
        Action::Create(name) => {
            // qemu-img records an instruction count of 0.
            let meta = SnapshotMeta {
                icount: Some(0),
                ..Default::default()
            };
            if let Err(e) = img.snapshot_create(&name, meta) {
                return fail(format!(
                    "Could not create snapshot '{name}': {}",
                    crate::error_chain(&e)
                ));
            }
        }
        Action::Apply(name) => match img.snapshot_apply(&name) {
            Ok(_) => {}
            Err(DiskError::Qcow2(QcowError::NoSnapshot(_))) => {
                return fail(format!(
                    "Could not apply snapshot '{name}': Failed to load snapshot: \
                     No such file or directory"
                ))
            }
            Err(e) => {
                return fail(format!(
                    "Could not apply snapshot '{name}': {}",
                    crate::error_chain(&e)
                ))
            }
        },
        Action::Delete(name) => match img.snapshot_delete(&name) {
            Ok(_) => {}
            Err(DiskError::Qcow2(QcowError::NoSnapshot(_))) => {
                return fail(format!(
                    "Could not delete snapshot '{name}': snapshot not found"
                ))
            }
            Err(e) => {
                return fail(format!(
                    "Could not delete snapshot '{name}': {}",
                    crate::error_chain(&e)
                ))
            }
        },
    }
    let _ = args.quiet; // nothing but the listing is ever printed on success
    Ok(ExitCode::SUCCESS)
}

/// A raw image has no snapshots: an empty listing, and qemu-img's refusals.
fn raw(path: &Path, action: &Action, force_share: bool) -> ImgResult {
    let read_only = matches!(action, Action::List);
    if let Err(e) = disk::open_locked(path, read_only, CacheMode::Writeback, force_share) {
        return fail(open_failure(path, read_only, &e));
    }
    match action {
        Action::List => Ok(ExitCode::SUCCESS),
        Action::Create(n) => fail(format!(
            "Could not create snapshot '{n}': raw images do not support internal snapshots"
        )),
        Action::Apply(n) => fail(format!(
            "Could not apply snapshot '{n}': Block driver does not support snapshots"
        )),
        Action::Delete(n) => fail(format!(
            "Could not delete snapshot '{n}': snapshot not found"
        )),
    }
}

/// The listing qemu-img prints (`snapshot -l`, and `info`): nothing without snapshots.
pub fn snapshot_list(snapshots: &[Snapshot]) -> String {
    if snapshots.is_empty() {
        return String::new();
    }
    let mut s = String::from("Snapshot list:\n");
    s.push_str(&format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    ));
    for sn in snapshots {
        s.push_str(&snapshot_row(sn));
        s.push('\n');
    }
    s
}

/// One row of the listing.
fn snapshot_row(sn: &Snapshot) -> String {
    let secs = sn.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        sn.vm_clock_nsec / 1_000_000 % 1000
    );
    let icount = sn
        .icount
        .map_or_else(|| "--".to_string(), |i| i.to_string());
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        sn.id,
        sn.name,
        human_size(sn.vm_state_size),
        local_date(sn.date_sec),
        clock,
        icount
    )
}

/// "YYYY-MM-DD HH:MM:SS" in the local time zone, as qemu-img prints snapshot dates.
pub fn local_date(sec: u32) -> String {
    let t = libc::time_t::from(sec);
    // SAFETY: all-zero bytes are a valid `tm` (integers and a null zone pointer).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals of the right types; localtime_r writes
    // only into `tm` and is thread-safe.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return format!("{sec}");
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, name: &str) -> Snapshot {
        Snapshot {
            l1_table_offset: 0,
            l1_size: 0,
            id: id.into(),
            name: name.into(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 3_723_004_000_000,
            vm_state_size: 1_323_008,
            ..Default::default()
        }
    }

    #[test]
    fn rows_have_qemu_img_columns_and_long_names_push_them_right() {
        let mut long = snap("12", "a name of twenty chars");
        long.icount = Some(42);
        let out = snapshot_list(&[snap("1", "s1"), long]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "Snapshot list:");
        assert_eq!(
            lines[1],
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
        );
        let date = local_date(0);
        assert_eq!(
            lines[2],
            format!("1       s1               1.26 MiB {date}  0001:02:03.004         --")
        );
        assert_eq!(
            lines[3],
            format!("12      a name of twenty chars 1.26 MiB {date}  0001:02:03.004         42")
        );
    }

    #[test]
    fn no_snapshots_print_nothing() {
        assert_eq!(snapshot_list(&[]), "");
    }
}
