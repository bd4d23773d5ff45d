//! `ember img check`: exit status 0 clean, 2 corruptions, 3 leaks only, 1 failed check,
//! 63 format without checks (as qemu-img).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use devices::disk::qcow2::check::Repair;
use devices::disk::ImageFormat;
use serde_json::json;

use super::{existing_format, open_qcow2_layer, ImgError, ImgResult};

#[derive(Args)]
pub struct CheckArgs {
    /// Image format (probed when not given)
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format: human or json
    #[arg(long = "output", value_name = "FMT", default_value = "human")]
    output: String,
    /// Repair: leaks or all
    #[arg(short = 'r', value_name = "leaks|all")]
    repair: Option<String>,
    /// Print only errors
    #[arg(short = 'q')]
    quiet: bool,
    /// Open even when another process uses the image (no locks; the data may be changing)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image
    filename: PathBuf,
}

pub fn run(args: CheckArgs) -> ImgResult {
    let json = match args.output.as_str() {
        "human" => false,
        "json" => true,
        o => return Err(ImgError::Usage(format!("--output={o}: use human or json"))),
    };
    let repair = match args.repair.as_deref() {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(o) => return Err(ImgError::Usage(format!("-r {o}: use leaks or all"))),
    };
    let format = existing_format(&args.filename, args.format.as_deref())?;
    if format != ImageFormat::Qcow2 {
        eprintln!("ember: This image format does not support checks");
        return Ok(ExitCode::from(63));
    }
    let mut img = open_qcow2_layer(&args.filename, repair == Repair::None, args.force_share)?;
    let r = img.check(repair).map_err(ImgError::disk(format!(
        "check of '{}' failed",
        args.filename.display()
    )))?;
    let corruptions = r.corruptions - r.corruptions_fixed.min(r.corruptions);
    let leaks = r.leaks - r.leaks_fixed.min(r.leaks);
    if json {
        let mut v = json!({
            "image-end-offset": r.image_end_offset,
            "total-clusters": r.total_clusters,
            "check-errors": 0,
            "filename": args.filename.display().to_string(),
            "format": "qcow2",
        });
        for (k, n) in [
            ("leaks", leaks),
            ("corruptions", corruptions),
            ("leaks-fixed", r.leaks_fixed),
            ("corruptions-fixed", r.corruptions_fixed),
            ("allocated-clusters", r.allocated_clusters),
            ("fragmented-clusters", r.fragmented_clusters),
            ("compressed-clusters", r.compressed_clusters),
        ] {
            if n > 0 {
                v[k] = json!(n);
            }
        }
        println!("{}", super::pretty_json(&v));
    } else {
        for m in &r.messages {
            eprintln!("{m}");
        }
        if !args.quiet {
            print_summary(&r, corruptions, leaks);
        }
    }
    Ok(ExitCode::from(if corruptions > 0 {
        2
    } else if leaks > 0 {
        3
    } else {
        0
    }))
}

fn print_summary(r: &devices::disk::qcow2::check::CheckReport, corruptions: u64, leaks: u64) {
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if corruptions == 0 && leaks == 0 {
        println!("No errors were found on the image.");
    } else {
        if corruptions > 0 {
            println!(
                "\n{corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it."
            );
        }
        if leaks > 0 {
            println!(
                "\n{leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data."
            );
        }
    }
    if r.allocated_clusters > 0 {
        let pct = |n: u64| n as f64 * 100.0 / r.total_clusters.max(1) as f64;
        let frag = r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters as f64;
        let comp = r.compressed_clusters as f64 * 100.0 / r.allocated_clusters as f64;
        println!(
            "{}/{} = {:.2}% allocated, {frag:.2}% fragmented, {comp:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters)
        );
    }
    println!("Image end offset: {}", r.image_end_offset);
}
