//! `ember img`: the qemu-img verbs, with qemu-img's option spellings where they mean the
//! same thing, on Ember's own raw and qcow2 engine.

mod bench;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod info;
mod map;
mod rebase;
mod resize;
mod snapshot;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use devices::disk::{self, CacheMode, DiskError, DiskImage, ImageFormat, OpenOptions};

/// Exit status for bad input.
const USAGE_ERROR: u8 = 2;

/// An `ember img` failure: bad input (status 2) or a failed operation (status 1).
#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    /// The command line is wrong: the option and what to do.
    #[error("{0}")]
    Usage(String),
    /// A disk operation failed.
    #[error("{context}")]
    Disk {
        /// What was being done, naming the file.
        context: String,
        /// Cause.
        #[source]
        source: DiskError,
    },
    /// Anything else (host I/O on files).
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl ImgError {
    fn disk(context: impl Into<String>) -> impl FnOnce(DiskError) -> ImgError {
        let context = context.into();
        move |source| ImgError::Disk { context, source }
    }

    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImgError {
        let context = context.into();
        move |source| ImgError::Io { context, source }
    }

    /// Whether a file the user named is the problem (missing, unreadable, not an image):
    /// then the status is 2, as for other bad input.
    fn is_usage(&self) -> bool {
        match self {
            ImgError::Usage(_) => true,
            ImgError::Disk { source, .. } => matches!(
                source,
                DiskError::Open { .. }
                    | DiskError::Locked { .. }
                    | DiskError::Chain { .. }
                    | DiskError::Qcow2(disk::QcowError::NotQcow2)
            ),
            ImgError::Io { .. } => false,
        }
    }
}

/// Result of a verb: an exit status or an error.
pub type ImgResult = Result<ExitCode, ImgError>;

/// The verbs.
#[derive(Subcommand)]
pub enum ImgCommand {
    /// Create a new image (qemu-img create)
    Create(create::CreateArgs),
    /// Show an image's format, sizes and backing chain (qemu-img info)
    Info(info::InfoArgs),
    /// Copy an image to another format, sparse, optionally compressed (qemu-img convert)
    Convert(convert::ConvertArgs),
    /// Check an image's metadata and repair it (qemu-img check)
    Check(check::CheckArgs),
    /// Change an image's virtual size (qemu-img resize)
    Resize(resize::ResizeArgs),
    /// Change an image's backing file (qemu-img rebase)
    Rebase(rebase::RebaseArgs),
    /// Write an overlay's data into its backing file (qemu-img commit)
    Commit(commit::CommitArgs),
    /// Compare the contents of two images (qemu-img compare)
    Compare(compare::CompareArgs),
    /// Show where an image's data lives (qemu-img map)
    Map(map::MapArgs),
    /// Measure an image's I/O speed (qemu-img bench)
    Bench(bench::BenchArgs),
    /// List, create, apply or delete internal snapshots (qemu-img snapshot)
    Snapshot(snapshot::SnapshotArgs),
}

/// `ember img VERB ...`
#[derive(Args)]
pub struct ImgArgs {
    #[command(subcommand)]
    command: ImgCommand,
}

/// Runs a verb; prints its error as one line.
pub fn run(args: ImgArgs) -> ExitCode {
    let result = match args.command {
        ImgCommand::Create(a) => create::run(a),
        ImgCommand::Info(a) => info::run(a),
        ImgCommand::Convert(a) => convert::run(a),
        ImgCommand::Check(a) => check::run(a),
        ImgCommand::Resize(a) => resize::run(a),
        ImgCommand::Rebase(a) => rebase::run(a),
        ImgCommand::Commit(a) => commit::run(a),
        ImgCommand::Compare(a) => compare::run(a),
        ImgCommand::Map(a) => map::run(a),
        ImgCommand::Bench(a) => bench::run(a),
        ImgCommand::Snapshot(a) => snapshot::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ember: {}", crate::error_chain(&e));
            if e.is_usage() {
                ExitCode::from(USAGE_ERROR)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Parses a size as qemu-img does: bytes, or a number with k/K, M, G, T, P, E (binary);
/// fractions like 1.5G are accepted.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        "P" | "p" => 50,
        "E" | "e" => 60,
        _ => {
            return Err(format!(
                "'{s}' is not a size; use bytes or a K, M, G, T suffix"
            ))
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size; use bytes or a K, M, G, T suffix"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !(0.0..1.8e19).contains(&bytes) {
        return Err(format!("'{s}' is too large"));
    }
    Ok(bytes as u64)
}

/// Human size as qemu prints it: "64 MiB", "1.26 MiB", "0 B".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        return format!("{bytes} B");
    }
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{v:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[u])
}

/// Parses `-f`/`-O`/`-F` format names.
fn parse_format(option: &str, name: &str) -> Result<ImageFormat, ImgError> {
    ImageFormat::from_name(name).ok_or_else(|| {
        ImgError::Usage(format!("{option} {name}: unknown format; use raw or qcow2"))
    })
}

/// The format of the existing image `path`: `-f` when given, else probed.
fn existing_format(path: &Path, format: Option<&str>) -> Result<ImageFormat, ImgError> {
    if !path.exists() {
        return Err(ImgError::Usage(format!(
            "'{}': no such file",
            path.display()
        )));
    }
    match format {
        Some(f) => parse_format("-f", f),
        None => disk::probe_format(path)
            .map_err(ImgError::disk(format!("cannot open '{}'", path.display()))),
    }
}

/// Parses `-t`/`-T` cache modes.
fn parse_cache(option: &str, name: &str) -> Result<CacheMode, ImgError> {
    match name {
        "writeback" => Ok(CacheMode::Writeback),
        "unsafe" => Ok(CacheMode::Unsafe),
        "none" | "directsync" => Ok(CacheMode::None),
        other => Err(ImgError::Usage(format!(
            "{option} {other}: unknown cache mode; use writeback, unsafe or none"
        ))),
    }
}

/// Opens an image (with its backing chain).
fn open(
    path: &Path,
    format: Option<&str>,
    read_only: bool,
    cache: CacheMode,
    force_share: bool,
) -> Result<Box<dyn DiskImage>, ImgError> {
    let format = format.map(|f| parse_format("-f", f)).transpose()?;
    if !path.exists() {
        return Err(ImgError::Usage(format!(
            "'{}': no such file",
            path.display()
        )));
    }
    disk::open_image(
        path,
        &OpenOptions {
            format,
            read_only,
            cache,
            force_share,
        },
    )
    .map_err(ImgError::disk(format!("cannot open '{}'", path.display())))
}

/// Opens only the qcow2 layer at `path` (no backing chain), for metadata-level tools.
fn open_qcow2_layer(
    path: &Path,
    read_only: bool,
    force_share: bool,
) -> Result<disk::Qcow2Image, ImgError> {
    let file = disk::open_locked(path, read_only, CacheMode::Writeback, force_share)
        .map_err(ImgError::disk(format!("cannot open '{}'", path.display())))?;
    disk::Qcow2Image::from_file(file, path, read_only)
        .map_err(ImgError::disk(format!("cannot open '{}'", path.display())))
}

/// The host bytes a file occupies (st_blocks).
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// An absolute form of `p` (for JSON "full-backing-filename").
fn absolute(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// JSON with qemu-img's four-space indentation.
fn pretty_json(v: &serde_json::Value) -> String {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    if v.serialize(&mut ser).is_err() {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Parses `-o key=value,key=value`.
fn parse_options(list: &[String]) -> Result<Vec<(String, String)>, ImgError> {
    let mut out = Vec::new();
    for item in list
        .iter()
        .flat_map(|l| l.split(','))
        .filter(|s| !s.is_empty())
    {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| ImgError::Usage(format!("-o {item}: expected key=value")))?;
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_qemu_img() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99E").is_err());
    }

    #[test]
    fn human_sizes_look_like_qemu_img() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(64 << 20), "64 MiB");
        assert_eq!(human_size(1_323_008), "1.26 MiB");
        assert_eq!(human_size(200_704), "196 KiB");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(1_572_864), "1.5 MiB");
    }
}
