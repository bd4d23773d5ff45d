//! `ember img commit`: the overlay's clusters are written into its backing file, which
//! grows if the overlay is larger; then the overlay is emptied unless -d.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use devices::disk::qcow2::resolve_backing;
use devices::disk::qcow2::table::L2Entry;
use devices::disk::{CacheMode, DiskImage, ImageFormat, OpenOptions};

use super::{open_qcow2_layer, ImgError, ImgResult};

#[derive(Args)]
pub struct CommitArgs {
    /// Image format (must be qcow2)
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Keep the overlay's data (do not empty it)
    #[arg(short = 'd')]
    keep: bool,
    /// Show a progress bar (accepted for compatibility)
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing
    #[arg(short = 'q')]
    quiet: bool,
    /// The overlay
    filename: PathBuf,
}

pub fn run(args: CommitArgs) -> ImgResult {
    if args.format.as_deref().is_some_and(|f| f != "qcow2") {
        return Err(ImgError::Usage(
            "-f: only qcow2 overlays can be committed".into(),
        ));
    }
    let mut top = open_qcow2_layer(&args.filename, false, false)?;
    let Some(name) = top.header().backing_file.clone() else {
        return Err(ImgError::Usage(format!(
            "'{}' has no backing file to commit into",
            args.filename.display()
        )));
    };
    let base_path = resolve_backing(&args.filename, &name);
    let base_format = top
        .header()
        .backing_format
        .as_deref()
        .and_then(ImageFormat::from_name);
    let mut base = devices::disk::open_image(
        &base_path,
        &OpenOptions {
            format: base_format,
            read_only: false,
            cache: CacheMode::Writeback,
            force_share: false,
        },
    )
    .map_err(ImgError::disk(format!(
        "cannot open '{}' for writing",
        base_path.display()
    )))?;
    let size = top.size();
    if base.size() < size {
        let format = base.format();
        drop(base); // its locks would stand in the way of growing it
        grow(&base_path, format, size)?;
        base = devices::disk::open_image(
            &base_path,
            &OpenOptions {
                format: Some(format),
                read_only: false,
                cache: CacheMode::Writeback,
                force_share: false,
            },
        )
        .map_err(ImgError::disk("cannot reopen the backing file"))?;
    }
    let cs = top.cluster_size();
    let mut buf = vec![0u8; cs as usize];
    let mut pos = 0;
    while pos < size {
        let len = cs.min(size - pos) as usize;
        let (entry, _) = top
            .map_entry(pos)
            .map_err(ImgError::disk("cannot read the overlay"))?;
        match entry {
            L2Entry::Unallocated => {}
            L2Entry::Zero { .. } => base
                .write_zeroes(pos, len as u64, false)
                .map_err(ImgError::disk("cannot write the backing file"))?,
            _ => {
                top.read_at(&mut buf[..len], pos)
                    .map_err(ImgError::disk("cannot read the overlay"))?;
                base.write_at(&buf[..len], pos)
                    .map_err(ImgError::disk("cannot write the backing file"))?;
            }
        }
        pos += len as u64;
    }
    base.flush()
        .map_err(ImgError::disk("cannot flush the backing file"))?;
    drop(base);
    if !args.keep {
        top.make_empty()
            .map_err(ImgError::disk("cannot empty the overlay"))?;
    }
    if !args.quiet {
        println!("Image committed.");
    }
    Ok(ExitCode::SUCCESS)
}

fn grow(path: &std::path::Path, format: ImageFormat, size: u64) -> Result<(), ImgError> {
    match format {
        ImageFormat::Raw => std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(size))
            .map_err(ImgError::io("cannot grow the backing file")),
        ImageFormat::Qcow2 => open_qcow2_layer(path, false, false)?
            .resize(size)
            .map_err(ImgError::disk("cannot grow the backing file")),
    }
}
