//! `ember img convert`

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use clap::Args;
use devices::disk::file::AlignedBuf;
use devices::disk::{DiskImage, ImageFormat, OpenOptions, Qcow2Image};
use indicatif::{ProgressBar, ProgressStyle};

use super::{create, open, parse_cache, parse_format, parse_size, ImgError, ImgResult};

#[derive(Args)]
pub struct ConvertArgs {
    /// Show a progress bar
    #[arg(short = 'p')]
    progress: bool,
    /// Source format (probed when not given)
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format: raw (default) or qcow2
    #[arg(short = 'O', value_name = "OUTPUT_FMT", default_value = "raw")]
    output_format: String,
    /// Compress the output's clusters (qcow2)
    #[arg(short = 'c')]
    compress: bool,
    /// Output format options (as for create)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Write into an existing target instead of creating it
    #[arg(short = 'n')]
    no_create: bool,
    /// Target cache mode: unsafe (default, as qemu-img: no flush at the end), writeback
    /// (flush at the end) or none (O_DIRECT, flush at the end)
    #[arg(short = 't', value_name = "CACHE", default_value = "unsafe")]
    cache: String,
    /// Source cache mode: writeback or none
    #[arg(short = 'T', value_name = "SRC_CACHE", default_value = "writeback")]
    src_cache: String,
    /// Zero runs at least this long (bytes, K, M) stay unallocated in the target
    #[arg(short = 'S', value_name = "SPARSE_SIZE", default_value = "4k")]
    sparse_size: String,
    /// Print nothing
    #[arg(short = 'q')]
    quiet: bool,
    /// Read the source even when another process uses the image (no locks; the data may be changing)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source image
    source: PathBuf,
    /// Target image
    target: PathBuf,
}

/// Writes `data` at `offset`, skipping blocks of `sparse` zero bytes.
fn write_sparse(
    dst: &mut dyn DiskImage,
    data: &[u8],
    offset: u64,
    sparse: usize,
) -> Result<(), ImgError> {
    if sparse == 0 {
        return dst
            .write_at(data, offset)
            .map_err(ImgError::disk("cannot write the target"));
    }
    let mut i = 0;
    while i < data.len() {
        let end = (i + sparse).min(data.len());
        if data[i..end].iter().all(|b| *b == 0) {
            i = end;
            continue;
        }
        // Extend over following non-zero blocks to write them in one go.
        let mut j = end;
        while j < data.len() {
            let e = (j + sparse).min(data.len());
            if data[j..e].iter().all(|b| *b == 0) {
                break;
            }
            j = e;
        }
        dst.write_at(&data[i..j], offset + i as u64)
            .map_err(ImgError::disk("cannot write the target"))?;
        i = j;
    }
    Ok(())
}

pub fn run(args: ConvertArgs) -> ImgResult {
    let out_format = parse_format("-O", &args.output_format)?;
    if args.compress && out_format != ImageFormat::Qcow2 {
        return Err(ImgError::Usage("-c: compression needs -O qcow2".into()));
    }
    let src_cache = parse_cache("-T", &args.src_cache)?;
    let dst_cache = parse_cache("-t", &args.cache)?;
    let sparse =
        parse_size(&args.sparse_size).map_err(|e| ImgError::Usage(format!("-S: {e}")))? as usize;
    let mut src = open(
        &args.source,
        args.format.as_deref(),
        true,
        src_cache,
        args.force_share,
    )?;
    let size = src.size();
    if !args.no_create {
        let mut plan = create::plan(&args.options, out_format)?;
        plan.qcow2.size = size;
        create::make_image(&args.target, out_format, &plan)?;
    }
    let dst_opts = OpenOptions {
        format: Some(out_format),
        read_only: false,
        cache: dst_cache,
        force_share: false,
    };
    let open_err = ImgError::disk(format!("cannot open '{}'", args.target.display()));
    let mut dst = if args.compress {
        Target::Compressed(Box::new(
            Qcow2Image::open(&args.target, &dst_opts).map_err(open_err)?,
        ))
    } else {
        Target::Plain(devices::disk::open_image(&args.target, &dst_opts).map_err(open_err)?)
    };
    if dst.image().size() < size {
        return Err(ImgError::Usage(format!(
            "-n: target '{}' ({} bytes) is smaller than the source ({size} bytes)",
            args.target.display(),
            dst.image().size()
        )));
    }
    let bar = (args.progress && !args.quiet).then(|| {
        let b = ProgressBar::new(size);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:40} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    });
    let chunk = match &dst {
        Target::Compressed(q) => q.cluster_size().max(1 << 20),
        Target::Plain(_) => 1 << 20,
    };
    // Raw targets take several writers, each on its own handle (qemu-img keeps several
    // requests in flight too); a qcow2 target has one engine, so one writer.
    let mut targets = vec![dst];
    if out_format == ImageFormat::Raw {
        for _ in 1..RAW_WRITERS {
            let opts = OpenOptions {
                force_share: true, // the first handle holds the locks
                ..dst_opts.clone()
            };
            let extra = devices::disk::open_image(&args.target, &opts).map_err(ImgError::disk(
                format!("cannot open '{}'", args.target.display()),
            ))?;
            targets.push(Target::Plain(extra));
        }
    }
    let source_name = args.source.display().to_string();
    let write = |dst: &mut Target, c: &Chunk| -> Result<(), ImgError> {
        if c.zero {
            if args.no_create {
                dst.image()
                    .write_zeroes(c.pos, c.len, true)
                    .map_err(ImgError::disk("cannot write the target"))?;
            }
        } else {
            copy_chunk(
                dst,
                &args,
                &c.buf.as_slice()[..c.len as usize],
                c.pos,
                sparse,
            )?;
        }
        if let Some(b) = &bar {
            b.inc(c.len);
        }
        Ok(())
    };
    copy_all(
        src.as_mut(),
        &source_name,
        size,
        chunk,
        &mut targets,
        &write,
    )?;
    let mut dst = targets.swap_remove(0);
    if args.cache == "unsafe" {
        // Tables still reach the file (the page cache), without a sync.
        dst.image()
            .write_back()
            .map_err(ImgError::disk("cannot write the target's tables"))?;
    } else {
        dst.image()
            .flush()
            .map_err(ImgError::disk("cannot flush the target"))?;
    }
    if let Some(b) = bar {
        b.finish();
    }
    Ok(ExitCode::SUCCESS)
}

/// A piece of the source on its way to the target.
struct Chunk {
    pos: u64,
    len: u64,
    /// Reads as zeros (nothing was read into `buf`).
    zero: bool,
    /// Page-aligned: the kernel copies to and from such buffers faster.
    buf: AlignedBuf,
}

/// Chunks read ahead of the writers.
const READ_AHEAD: usize = 4;
/// Writer threads (and handles) for a raw target.
const RAW_WRITERS: usize = 4;

/// Reads the source in extents of at most `chunk` bytes on a reader thread while one thread
/// per target handle stores them with `write`, so reading and writing overlap.
fn copy_all(
    src: &mut dyn DiskImage,
    source_name: &str,
    size: u64,
    chunk: u64,
    targets: &mut [Target],
    write: &(dyn Fn(&mut Target, &Chunk) -> Result<(), ImgError> + Sync),
) -> Result<(), ImgError> {
    let (full_tx, full_rx) = mpsc::sync_channel::<Result<Chunk, ImgError>>(READ_AHEAD);
    let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..READ_AHEAD + targets.len() {
        let _ = free_tx.send(AlignedBuf::new(chunk as usize));
    }
    let full_rx = Arc::new(Mutex::new(full_rx));
    let stop_flag = AtomicBool::new(false);
    let stop = &stop_flag;
    std::thread::scope(move |scope| {
        scope.spawn(move || read_chunks(src, source_name, size, chunk, &full_tx, &free_rx));
        let writers: Vec<_> = targets
            .iter_mut()
            .map(|target| {
                let (rx, free_tx) = (full_rx.clone(), free_tx.clone());
                scope.spawn(move || -> Result<(), ImgError> {
                    let result = write_chunks(target, &rx, &free_tx, stop, write);
                    if result.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        // Only the writers hold the channel ends now: when they all stop, the reader's
        // send or its wait for a buffer fails and it stops too.
        drop((full_rx, free_tx));
        let mut first_err = None;
        for w in writers {
            let r = w
                .join()
                .unwrap_or_else(|_| Err(ImgError::Usage("a convert writer panicked".into())));
            if let (Err(e), None) = (r, &first_err) {
                first_err = Some(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    })
}

fn read_chunks(
    src: &mut dyn DiskImage,
    source_name: &str,
    size: u64,
    chunk: u64,
    full_tx: &mpsc::SyncSender<Result<Chunk, ImgError>>,
    free_rx: &mpsc::Receiver<AlignedBuf>,
) {
    let read_err = || ImgError::disk(format!("cannot read '{source_name}'"));
    let mut pos = 0u64;
    while pos < size {
        // Every writer stopped (an error): stop reading.
        let Ok(mut buf) = free_rx.recv() else { return };
        let next = src.extent(pos, chunk.min(size - pos)).map_err(read_err());
        let read = next.and_then(|ext| {
            let len = ext.len.min(chunk - pos % chunk).max(1).min(size - pos);
            if !ext.zero {
                src.read_at(&mut buf.as_mut_slice()[..len as usize], pos)
                    .map_err(read_err())?;
            }
            Ok(Chunk {
                pos,
                len,
                zero: ext.zero,
                buf,
            })
        });
        let failed = read.is_err();
        if let Ok(c) = &read {
            pos += c.len;
        }
        if full_tx.send(read).is_err() || failed {
            return;
        }
    }
}

fn write_chunks(
    target: &mut Target,
    rx: &Mutex<mpsc::Receiver<Result<Chunk, ImgError>>>,
    free_tx: &mpsc::Sender<AlignedBuf>,
    stop: &AtomicBool,
    write: &(dyn Fn(&mut Target, &Chunk) -> Result<(), ImgError> + Sync),
) -> Result<(), ImgError> {
    while !stop.load(Ordering::Relaxed) {
        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(received) = next else { return Ok(()) };
        let c = received?;
        write(target, &c)?;
        let _ = free_tx.send(c.buf);
    }
    Ok(())
}

/// Where converted data goes.
enum Target {
    /// Any image, written plainly.
    Plain(Box<dyn DiskImage>),
    /// A qcow2 image receiving compressed clusters.
    Compressed(Box<Qcow2Image>),
}

impl Target {
    fn image(&mut self) -> &mut dyn DiskImage {
        match self {
            Target::Plain(d) => d.as_mut(),
            Target::Compressed(q) => q.as_mut(),
        }
    }
}

fn copy_chunk(
    dst: &mut Target,
    args: &ConvertArgs,
    data: &[u8],
    pos: u64,
    sparse: usize,
) -> Result<(), ImgError> {
    let img = match dst {
        Target::Plain(d) => {
            let sparse = if args.no_create { 0 } else { sparse };
            return write_sparse(d.as_mut(), data, pos, sparse);
        }
        Target::Compressed(q) => q,
    };
    let cs = img.cluster_size();
    // Whole clusters go compressed; a partial one at the end is written plainly.
    let mut i = 0usize;
    while i < data.len() {
        let at = pos + i as u64;
        let n = ((cs - at % cs) as usize).min(data.len() - i);
        let piece = &data[i..i + n];
        if !piece.iter().all(|b| *b == 0) {
            let written = if at.is_multiple_of(cs) && n as u64 == cs {
                img.write_compressed(at, piece)
            } else {
                img.write_at(piece, at)
            };
            written.map_err(ImgError::disk("cannot write the target"))?;
        }
        i += n;
    }
    Ok(())
}
