//! `ember img resize`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use devices::disk::{CacheMode, ImageFormat};

use super::{existing_format, open_qcow2_layer, parse_size, ImgError, ImgResult};

#[derive(Args)]
pub struct ResizeArgs {
    /// Image format (probed when not given)
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Allow shrinking (data past the new end is lost)
    #[arg(long)]
    shrink: bool,
    /// Print nothing
    #[arg(short = 'q')]
    quiet: bool,
    /// The image
    filename: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one
    #[arg(allow_hyphen_values = true)]
    size: String,
}

fn new_size(current: u64, spec: &str) -> Result<u64, ImgError> {
    let err = |e: String| ImgError::Usage(format!("size: {e}"));
    if let Some(d) = spec.strip_prefix('+') {
        current
            .checked_add(parse_size(d).map_err(err)?)
            .ok_or_else(|| ImgError::Usage("size: too large".into()))
    } else if let Some(d) = spec.strip_prefix('-') {
        current
            .checked_sub(parse_size(d).map_err(err)?)
            .ok_or_else(|| ImgError::Usage("size: the image would have a negative size".into()))
    } else {
        parse_size(spec).map_err(err)
    }
}

pub fn run(args: ResizeArgs) -> ImgResult {
    let format = existing_format(&args.filename, args.format.as_deref())?;
    match format {
        ImageFormat::Raw => {
            let f = devices::disk::open_locked(&args.filename, false, CacheMode::Writeback, false)
                .map_err(ImgError::disk(format!(
                    "cannot open '{}'",
                    args.filename.display()
                )))?;
            let current = f.len().map_err(ImgError::io("cannot read the size"))?;
            let size = new_size(current, &args.size)?;
            if size < current && !args.shrink {
                return Err(ImgError::Usage(
                    "shrinking loses data past the new end; add --shrink to do it".into(),
                ));
            }
            f.set_len(size).map_err(ImgError::io("cannot resize"))?;
        }
        ImageFormat::Qcow2 => {
            let mut img = open_qcow2_layer(&args.filename, false, false)?;
            let current = img.header().size;
            let size = new_size(current, &args.size)?;
            if size < current && !args.shrink {
                return Err(ImgError::Usage(
                    "shrinking loses data past the new end; add --shrink to do it".into(),
                ));
            }
            img.resize(size).map_err(ImgError::disk("cannot resize"))?;
        }
    }
    if !args.quiet {
        println!("Image resized.");
    }
    Ok(ExitCode::SUCCESS)
}
