//! `ember img create`

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use devices::disk::qcow2::header::Compression;
use devices::disk::qcow2::{resolve_backing, CreateOptions};
use devices::disk::{CacheMode, HostFile, ImageFormat, Qcow2Image};

use super::{open, parse_format, parse_options, parse_size, ImgError, ImgResult};

#[derive(Args)]
pub struct CreateArgs {
    /// Image format: raw (default) or qcow2
    #[arg(short = 'f', value_name = "FMT", default_value = "raw")]
    format: String,
    /// Format options: cluster_size, refcount_bits, compat (0.10|1.1), lazy_refcounts,
    /// compression_type (zlib|zstd), preallocation (off|metadata|falloc|full)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file (stored as given; relative names resolve against the new image)
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Backing file format (probed when not given)
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Do not open the backing file (its size must then be given)
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Print nothing
    #[arg(short = 'q')]
    quiet: bool,
    /// The new image
    filename: PathBuf,
    /// Virtual size (bytes or K/M/G/T); defaults to the backing file's size
    size: Option<String>,
}

/// A new image's settings from `-o`.
pub(super) struct Plan {
    pub(super) qcow2: CreateOptions,
    pub(super) preallocation: String,
}

/// Reads `-o` options for a new image of `format`.
pub(super) fn plan(options: &[String], format: ImageFormat) -> Result<Plan, ImgError> {
    let mut q = CreateOptions::default();
    let mut preallocation = "off".to_string();
    for (k, v) in parse_options(options)? {
        let bad = |what: &str| ImgError::Usage(format!("-o {k}={v}: {what}"));
        let on_off = |v: &str| match v {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err(bad("expected on or off")),
        };
        match (format, k.as_str()) {
            (_, "preallocation") => match v.as_str() {
                "off" | "metadata" | "falloc" | "full" => preallocation = v.clone(),
                _ => return Err(bad("use off, metadata, falloc or full")),
            },
            (ImageFormat::Qcow2, "cluster_size") => {
                q.cluster_size = parse_size(&v).map_err(|e| bad(&e))?
            }
            (ImageFormat::Qcow2, "refcount_bits") => {
                q.refcount_bits = v.parse().map_err(|_| bad("not a number"))?
            }
            (ImageFormat::Qcow2, "compat") => {
                q.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(bad("use 0.10 or 1.1")),
                }
            }
            (ImageFormat::Qcow2, "lazy_refcounts") => q.lazy_refcounts = on_off(&v)?,
            (ImageFormat::Qcow2, "compression_type") => {
                q.compression = match v.as_str() {
                    "zlib" => Compression::Zlib,
                    "zstd" => Compression::Zstd,
                    _ => return Err(bad("use zlib or zstd")),
                }
            }
            (ImageFormat::Qcow2, "extended_l2") if !on_off(&v)? => {}
            (ImageFormat::Qcow2, "backing_file") => q.backing_file = Some(v.clone()),
            (ImageFormat::Qcow2, "backing_fmt") => q.backing_format = Some(v.clone()),
            _ => return Err(bad(&format!("not an option of {} images", format.name()))),
        }
    }
    if preallocation == "metadata" && format == ImageFormat::Raw {
        return Err(ImgError::Usage(
            "-o preallocation=metadata: raw images take off, falloc or full".into(),
        ));
    }
    Ok(Plan {
        qcow2: q,
        preallocation,
    })
}

pub fn run(args: CreateArgs) -> ImgResult {
    let format = parse_format("-f", &args.format)?;
    let mut p = plan(&args.options, format)?;
    if let Some(b) = &args.backing {
        p.qcow2.backing_file = Some(b.clone());
    }
    if let Some(f) = &args.backing_format {
        parse_format("-F", f)?;
        p.qcow2.backing_format = Some(f.clone());
    }
    if p.qcow2.backing_file.is_some() && format != ImageFormat::Qcow2 {
        return Err(ImgError::Usage("-b: backing files need -f qcow2".into()));
    }
    let size = backing_size_and_format(&args, &mut p)?;
    p.qcow2.size = size;
    if args.filename.exists() && std::fs::metadata(&args.filename).is_ok_and(|m| m.is_dir()) {
        return Err(ImgError::Usage(format!(
            "'{}' is a directory",
            args.filename.display()
        )));
    }
    if !args.quiet {
        println!("{}", describe(&args.filename, format, &p));
    }
    make_image(&args.filename, format, &p)?;
    Ok(ExitCode::SUCCESS)
}

/// Creates the image file `path` as planned.
pub(super) fn make_image(path: &Path, format: ImageFormat, p: &Plan) -> Result<(), ImgError> {
    let size = p.qcow2.size;
    // Lock before truncating: an image a VM is using must not be emptied under it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(ImgError::io(format!("cannot create '{}'", path.display())))?;
    let host = HostFile::from_file(file);
    host.lock(true)
        .map_err(ImgError::io(format!("cannot lock '{}'", path.display())))?
        .map_err(|perm| ImgError::Disk {
            context: format!("cannot create '{}'", path.display()),
            source: devices::disk::DiskError::Locked {
                path: path.to_path_buf(),
                perm,
            },
        })?;
    host.set_len(0).map_err(ImgError::io(format!(
        "cannot truncate '{}'",
        path.display()
    )))?;
    match format {
        ImageFormat::Raw => {
            host.set_len(size)
                .map_err(ImgError::io("cannot size the image"))?;
            match p.preallocation.as_str() {
                "falloc" => host.write_zeroes(0, size, false),
                "full" => write_zeros(&host, 0, size),
                _ => Ok(()),
            }
            .map_err(ImgError::io("cannot preallocate"))?;
            host.sync().map_err(ImgError::io("fdatasync"))?;
        }
        ImageFormat::Qcow2 => {
            Qcow2Image::create(&host, &p.qcow2).map_err(ImgError::disk(format!(
                "cannot create '{}'",
                path.display()
            )))?;
            if p.preallocation != "off" {
                let mut img = Qcow2Image::from_file(host, path, false)
                    .map_err(ImgError::disk("cannot reopen the new image"))?;
                img.preallocate(p.preallocation != "metadata")
                    .map_err(ImgError::disk("cannot preallocate"))?;
            }
        }
    }
    Ok(())
}

fn write_zeros(f: &HostFile, mut at: u64, end: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    while at < end {
        let n = (end - at).min(zeros.len() as u64) as usize;
        f.write_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// The size: given, or the backing file's; fills in a probed backing format.
fn backing_size_and_format(args: &CreateArgs, p: &mut Plan) -> Result<u64, ImgError> {
    let given = args
        .size
        .as_deref()
        .map(|s| parse_size(s).map_err(|e| ImgError::Usage(format!("size: {e}"))))
        .transpose()?;
    let Some(name) = p.qcow2.backing_file.clone() else {
        return given.ok_or_else(|| ImgError::Usage("a size is needed (e.g. 10G)".into()));
    };
    if args.unsafe_backing {
        return given.ok_or_else(|| ImgError::Usage("-u: a size is needed".into()));
    }
    let path = resolve_backing(&args.filename, &name);
    let backing = open(
        &path,
        p.qcow2.backing_format.as_deref(),
        true,
        CacheMode::Writeback,
        // Only its size is read; a base in use by running VMs is the usual case.
        true,
    )
    .map_err(|e| match e {
        ImgError::Usage(m) => ImgError::Usage(format!("-b {name}: {m}")),
        other => other,
    })?;
    if p.qcow2.backing_format.is_none() {
        let probed = backing.format().name().to_string();
        eprintln!("ember: -b {name}: no -F given, using probed format {probed}");
        p.qcow2.backing_format = Some(probed);
    }
    Ok(given.unwrap_or(backing.size()))
}

fn describe(path: &Path, format: ImageFormat, p: &Plan) -> String {
    let q = &p.qcow2;
    match format {
        ImageFormat::Raw => format!("Formatting '{}', fmt=raw size={}", path.display(), q.size),
        ImageFormat::Qcow2 => {
            let mut s = format!(
                "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2=off compression_type={} \
                 size={}",
                path.display(),
                q.cluster_size,
                q.compression.name(),
                q.size
            );
            if let Some(b) = &q.backing_file {
                s.push_str(&format!(" backing_file={b}"));
            }
            if let Some(f) = &q.backing_format {
                s.push_str(&format!(" backing_fmt={f}"));
            }
            if q.version == 2 {
                s.push_str(" compat=0.10");
            }
            s.push_str(&format!(
                " lazy_refcounts={} refcount_bits={}",
                if q.lazy_refcounts { "on" } else { "off" },
                q.refcount_bits
            ));
            if p.preallocation != "off" {
                s.push_str(&format!(" preallocation={}", p.preallocation));
            }
            s
        }
    }
}
