//! `ember img compare`: 0 identical, 1 different, 2 error (as qemu-img).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use devices::disk::{CacheMode, DiskImage};

use super::{open, ImgError, ImgResult};

#[derive(Args)]
pub struct CompareArgs {
    /// Format of the first image
    #[arg(short = 'f', value_name = "FMT")]
    format_a: Option<String>,
    /// Format of the second image
    #[arg(short = 'F', value_name = "FMT")]
    format_b: Option<String>,
    /// Strict: images of different sizes differ
    #[arg(short = 's')]
    strict: bool,
    /// Print nothing; only the exit status tells
    #[arg(short = 'q')]
    quiet: bool,
    /// Open even when another process uses the image (no locks; the data may be changing)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// First image
    a: PathBuf,
    /// Second image
    b: PathBuf,
}

const CHUNK: u64 = 1 << 20;

/// First differing byte offset in `[start, end)`, or None.
fn first_difference(
    a: &mut dyn DiskImage,
    b: &mut dyn DiskImage,
    start: u64,
    end: u64,
) -> Result<Option<u64>, ImgError> {
    let (mut x, mut y) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    let mut pos = start;
    while pos < end {
        let ea = a
            .extent(pos, end - pos)
            .map_err(ImgError::disk("cannot read the first image"))?;
        let eb = b
            .extent(pos, end - pos)
            .map_err(ImgError::disk("cannot read the second image"))?;
        let len = ea.len.min(eb.len).clamp(1, CHUNK);
        if !(ea.zero && eb.zero) {
            let (xa, yb) = (&mut x[..len as usize], &mut y[..len as usize]);
            a.read_at(xa, pos)
                .map_err(ImgError::disk("cannot read the first image"))?;
            b.read_at(yb, pos)
                .map_err(ImgError::disk("cannot read the second image"))?;
            if let Some(i) = xa.iter().zip(yb.iter()).position(|(p, q)| p != q) {
                return Ok(Some(pos + i as u64));
            }
        }
        pos += len;
    }
    Ok(None)
}

/// First non-zero byte of `img` in `[start, end)`.
fn first_nonzero(img: &mut dyn DiskImage, start: u64, end: u64) -> Result<Option<u64>, ImgError> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = start;
    while pos < end {
        let e = img
            .extent(pos, end - pos)
            .map_err(ImgError::disk("cannot read"))?;
        let len = e.len.clamp(1, CHUNK);
        if !e.zero {
            let b = &mut buf[..len as usize];
            img.read_at(b, pos).map_err(ImgError::disk("cannot read"))?;
            if let Some(i) = b.iter().position(|x| *x != 0) {
                return Ok(Some(pos + i as u64));
            }
        }
        pos += len;
    }
    Ok(None)
}

/// Errors are status 2 here: 1 already means "different".
pub fn run(args: CompareArgs) -> ImgResult {
    compare(args).or_else(|e| {
        eprintln!("ember: {}", crate::error_chain(&e));
        Ok(ExitCode::from(2))
    })
}

fn compare(args: CompareArgs) -> ImgResult {
    let mut a = open(
        &args.a,
        args.format_a.as_deref(),
        true,
        CacheMode::Writeback,
        args.force_share,
    )?;
    let mut b = open(
        &args.b,
        args.format_b.as_deref(),
        true,
        CacheMode::Writeback,
        args.force_share,
    )?;
    let (sa, sb) = (a.size(), b.size());
    let say = |m: String| {
        if !args.quiet {
            println!("{m}");
        }
    };
    if sa != sb {
        if args.strict {
            say("Strict mode: Image size mismatch!".into());
            return Ok(ExitCode::from(1));
        }
        say("Warning: Image size mismatch!".into());
    }
    let common = sa.min(sb);
    if let Some(at) = first_difference(a.as_mut(), b.as_mut(), 0, common)? {
        say(format!("Content mismatch at offset {at}!"));
        return Ok(ExitCode::from(1));
    }
    let longer: &mut dyn DiskImage = if sa > sb { a.as_mut() } else { b.as_mut() };
    if let Some(at) = first_nonzero(longer, common, sa.max(sb))? {
        say(format!("Content mismatch at offset {at}!"));
        return Ok(ExitCode::from(1));
    }
    say("Images are identical.".into());
    Ok(ExitCode::SUCCESS)
}
