//! `ember img map`

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use devices::disk::qcow2::resolve_backing;
use devices::disk::{CacheMode, Extent, ImageFormat};

use super::{open, open_qcow2_layer, ImgError, ImgResult};

#[derive(Args)]
pub struct MapArgs {
    /// Image format (probed when not given)
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format: human or json
    #[arg(long = "output", value_name = "FMT", default_value = "human")]
    output: String,
    /// Open even when another process uses the image (no locks; the data may be changing)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image
    filename: PathBuf,
}

/// File names of the chain, top first.
fn chain_names(top: &Path, top_is_qcow2: bool, force_share: bool) -> Vec<PathBuf> {
    let mut names = vec![top.to_path_buf()];
    let mut cur = top.to_path_buf();
    let mut qcow2 = top_is_qcow2;
    while qcow2 && names.len() <= devices::disk::MAX_CHAIN_DEPTH {
        let Ok(img) = open_qcow2_layer(&cur, true, force_share) else {
            break;
        };
        let Some(b) = img.header().backing_file.clone() else {
            break;
        };
        qcow2 = img.header().backing_format.as_deref() != Some("raw")
            && devices::disk::probe_format(&resolve_backing(&cur, &b))
                .is_ok_and(|f| f == ImageFormat::Qcow2);
        cur = resolve_backing(&cur, &b);
        names.push(cur.clone());
    }
    names
}

fn same_kind(a: &Extent, b: &Extent, a_start: u64, b_start: u64) -> bool {
    a.depth == b.depth
        && a.zero == b.zero
        && a.present == b.present
        && a.data == b.data
        && a.compressed == b.compressed
        && match (a.offset, b.offset) {
            (Some(x), Some(y)) => x + (b_start - a_start) == y,
            (None, None) => true,
            _ => false,
        }
}

pub fn run(args: MapArgs) -> ImgResult {
    let json = match args.output.as_str() {
        "human" => false,
        "json" => true,
        o => return Err(ImgError::Usage(format!("--output={o}: use human or json"))),
    };
    let mut img = open(
        &args.filename,
        args.format.as_deref(),
        true,
        CacheMode::Writeback,
        args.force_share,
    )?;
    let names = chain_names(
        &args.filename,
        img.format() == ImageFormat::Qcow2,
        args.force_share,
    );
    let size = img.size();
    let mut runs: Vec<(u64, Extent)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let e = img.extent(pos, size - pos).map_err(ImgError::disk(format!(
            "cannot read '{}'",
            args.filename.display()
        )))?;
        let e = Extent {
            len: e.len.max(1).min(size - pos),
            ..e
        };
        match runs.last_mut() {
            Some((start, last)) if same_kind(last, &e, *start, pos) => last.len += e.len,
            _ => runs.push((pos, e)),
        }
        pos += e.len;
    }
    if json {
        let lines: Vec<String> = runs
            .iter()
            .map(|(start, e)| {
                let mut s = format!(
                    "{{ \"start\": {start}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                    e.len, e.depth, e.present, e.zero, e.data, e.compressed
                );
                if let Some(o) = e.offset {
                    s.push_str(&format!(", \"offset\": {o}"));
                }
                s.push('}');
                s
            })
            .collect();
        println!("[{}]", lines.join(",\n"));
    } else {
        println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
        for (start, e) in &runs {
            if let (true, Some(o)) = (e.data, e.offset) {
                let file = names
                    .get(e.depth as usize)
                    .map_or_else(|| "?".to_string(), |p| p.display().to_string());
                println!(
                    "{:<16}{:<16}{:<16}{file}",
                    if *start == 0 {
                        "0".to_string()
                    } else {
                        format!("{start:#x}")
                    },
                    format!("{:#x}", e.len),
                    format!("{o:#x}")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
