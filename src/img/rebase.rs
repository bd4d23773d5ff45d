//! `ember img rebase`: in safe mode, data that would change under the overlay is copied
//! into it first; with -u only the header changes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use devices::disk::qcow2::resolve_backing;
use devices::disk::qcow2::table::L2Entry;
use devices::disk::{CacheMode, DiskImage, OpenOptions, Qcow2Image};

use super::{open, parse_format, ImgError, ImgResult};

#[derive(Args)]
pub struct RebaseArgs {
    /// Image format (must be qcow2)
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Unsafe: only rewrite the header, copy nothing
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// New backing file ("" for none)
    #[arg(short = 'b', value_name = "BACKING")]
    backing: String,
    /// New backing file format (probed when not given)
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Show a progress bar (accepted for compatibility)
    #[arg(short = 'p')]
    progress: bool,
    /// The overlay
    filename: PathBuf,
}

pub fn run(args: RebaseArgs) -> ImgResult {
    if let Some(f) = &args.format {
        if parse_format("-f", f)? != devices::disk::ImageFormat::Qcow2 {
            return Err(ImgError::Usage(
                "-f: only qcow2 images have a backing file".into(),
            ));
        }
    }
    let new_name = (!args.backing.is_empty()).then(|| args.backing.clone());
    let mut new_format = args.backing_format.clone();
    if let Some(f) = &new_format {
        parse_format("-F", f)?;
    }
    let mut new_backing = match &new_name {
        Some(n) => {
            let path = resolve_backing(&args.filename, n);
            let img = open(
                &path,
                new_format.as_deref(),
                true,
                CacheMode::Writeback,
                false,
            )
            .map_err(|e| match e {
                ImgError::Usage(m) => ImgError::Usage(format!("-b {n}: {m}")),
                other => other,
            })?;
            new_format.get_or_insert_with(|| img.format().name().to_string());
            Some(img)
        }
        None => None,
    };
    let opts = OpenOptions {
        format: Some(devices::disk::ImageFormat::Qcow2),
        read_only: false,
        cache: CacheMode::Writeback,
        force_share: false,
    };
    let mut top = if args.unsafe_mode {
        super::open_qcow2_layer(&args.filename, false, false)?
    } else {
        Qcow2Image::open(&args.filename, &opts).map_err(ImgError::disk(format!(
            "cannot open '{}'",
            args.filename.display()
        )))?
    };
    if !args.unsafe_mode {
        copy_differences(&mut top, &mut new_backing)?;
    }
    top.set_backing_file(new_name, new_format)
        .map_err(ImgError::disk("cannot write the new backing file name"))?;
    Ok(ExitCode::SUCCESS)
}

/// Copies into `top` every cluster it does not hold itself whose old-chain content differs
/// from what `new` (or zeros) would show.
fn copy_differences(
    top: &mut Qcow2Image,
    new: &mut Option<Box<dyn DiskImage>>,
) -> Result<(), ImgError> {
    let size = top.size();
    let cs = top.cluster_size();
    let (mut old_buf, mut new_buf) = (vec![0u8; cs as usize], vec![0u8; cs as usize]);
    let mut pos = 0;
    while pos < size {
        let len = cs.min(size - pos) as usize;
        let (entry, _) = top
            .map_entry(pos)
            .map_err(ImgError::disk("cannot read the overlay"))?;
        if entry == L2Entry::Unallocated {
            top.read_at(&mut old_buf[..len], pos)
                .map_err(ImgError::disk("cannot read the old backing chain"))?;
            new_buf[..len].fill(0);
            if let Some(n) = new.as_mut() {
                let avail = n.size().saturating_sub(pos).min(len as u64) as usize;
                if avail > 0 {
                    n.read_at(&mut new_buf[..avail], pos)
                        .map_err(ImgError::disk("cannot read the new backing file"))?;
                }
            }
            if old_buf[..len] != new_buf[..len] {
                top.write_at(&old_buf[..len], pos)
                    .map_err(ImgError::disk("cannot write the overlay"))?;
            }
        }
        pos += len as u64;
    }
    top.flush()
        .map_err(ImgError::disk("cannot flush the overlay"))
}
