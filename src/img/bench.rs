//! `ember img bench`: qemu-img bench's options and request pattern (sequential with a step,
//! wrapping), plus `--pattern rand`. Depth N runs N requests at a time: raw images get one
//! handle per worker; a qcow2 engine is shared by the workers, one request at a time, except
//! that reads of data in the image's own file only take the engine for the mapping and copy
//! the data through the worker's own handle (as qemu's thread pool overlaps its preads).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Args;
use devices::disk::file::AlignedBuf;
use devices::disk::{DiskImage, HostFile, ImageFormat, OpenOptions};

use super::{open, parse_cache, parse_size, ImgError, ImgResult};

#[derive(Args)]
pub struct BenchArgs {
    /// Number of requests
    #[arg(short = 'c', value_name = "COUNT", default_value = "75000")]
    count: u64,
    /// Requests in flight
    #[arg(short = 'd', value_name = "DEPTH", default_value = "64")]
    depth: u64,
    /// Image format (probed when not given)
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Native AIO (accepted for compatibility: I/O here is synchronous per worker)
    #[arg(short = 'n')]
    native: bool,
    /// First offset
    #[arg(short = 'o', value_name = "OFFSET", default_value = "0")]
    offset: String,
    /// Request size
    #[arg(short = 's', value_name = "BUFFER_SIZE", default_value = "4k")]
    size: String,
    /// Distance between sequential requests (default: the request size)
    #[arg(short = 'S', value_name = "STEP_SIZE")]
    step: Option<String>,
    /// Cache mode: writeback or none
    #[arg(short = 't', value_name = "CACHE", default_value = "writeback")]
    cache: String,
    /// Write instead of read
    #[arg(short = 'w')]
    write: bool,
    /// Flush after this many writes (0: never)
    #[arg(long = "flush-interval", value_name = "N", default_value = "0")]
    flush_interval: u64,
    /// Offsets: seq (qemu-img's stepping) or rand (uniform, request-aligned)
    #[arg(long = "pattern", value_name = "seq|rand", default_value = "seq")]
    pattern: String,
    /// Byte written by write requests
    #[arg(long = "pattern-byte", value_name = "BYTE", default_value = "0xa5")]
    pattern_byte: String,
    /// The image
    filename: PathBuf,
}

/// The offset of request `i`.
struct Offsets {
    start: u64,
    step: u64,
    span: u64,
    random: bool,
    bufsize: u64,
}

impl Offsets {
    fn at(&self, i: u64) -> u64 {
        if self.span == 0 {
            return 0;
        }
        if self.random {
            // SplitMix64 of the request number: reproducible, uniform enough.
            let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let slots = (self.span / self.bufsize).max(1);
            return (z % slots) * self.bufsize;
        }
        (self.start + i.wrapping_mul(self.step)) % self.span
    }
}

pub fn run(args: BenchArgs) -> ImgResult {
    let usage = |o: &str, e: String| ImgError::Usage(format!("{o}: {e}"));
    let bufsize = parse_size(&args.size).map_err(|e| usage("-s", e))?;
    let step = match &args.step {
        Some(s) => parse_size(s).map_err(|e| usage("-S", e))?,
        None => bufsize,
    };
    let start = parse_size(&args.offset).map_err(|e| usage("-o", e))?;
    let cache = parse_cache("-t", &args.cache)?;
    let random = match args.pattern.as_str() {
        "seq" => false,
        "rand" => true,
        o => return Err(usage("--pattern", format!("'{o}': use seq or rand"))),
    };
    let byte = u8::from_str_radix(args.pattern_byte.trim_start_matches("0x"), 16)
        .map_err(|_| usage("--pattern-byte", "use a hex byte like 0xa5".into()))?;
    if bufsize == 0 || args.depth == 0 || args.count == 0 {
        return Err(ImgError::Usage("-s, -d and -c must be positive".into()));
    }
    let first = open(
        &args.filename,
        args.format.as_deref(),
        !args.write,
        cache,
        false,
    )?;
    let size = first.size();
    let format = first.format();
    let offsets = Arc::new(Offsets {
        start,
        step,
        span: size.saturating_sub(bufsize),
        random,
        bufsize,
    });
    println!(
        "Sending {} {} requests, {bufsize} bytes each, {} in parallel (starting at offset {start}, {})",
        args.count,
        if args.write { "write" } else { "read" },
        args.depth,
        if random { "random offsets".to_string() } else { format!("step size {step}") }
    );
    let workers = args.depth.min(args.count);
    let shared = Arc::new(Mutex::new(first));
    let next = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..workers {
        // Raw images: a handle per worker, so requests really overlap.
        let own = if format == ImageFormat::Raw {
            Some(
                devices::disk::open_image(
                    &args.filename,
                    &OpenOptions {
                        format: Some(ImageFormat::Raw),
                        read_only: !args.write,
                        cache,
                        // The first handle holds the image's locks for all of them.
                        force_share: true,
                    },
                )
                .map_err(ImgError::disk("cannot open the image"))?,
            )
        } else {
            None
        };
        // qcow2 reads: the worker's own handle on the file, for the data the engine maps.
        let data_file = if format == ImageFormat::Qcow2 && !args.write {
            Some(
                devices::disk::open_locked(&args.filename, true, cache, true)
                    .map_err(ImgError::disk("cannot open the image"))?,
            )
        } else {
            None
        };
        let (shared, next, offsets) = (shared.clone(), next.clone(), offsets.clone());
        let (count, write, flush_every) = (args.count, args.write, args.flush_interval);
        handles.push(std::thread::spawn(move || {
            worker(
                own,
                data_file,
                shared,
                next,
                offsets,
                count,
                write,
                flush_every,
                bufsize,
                byte,
            )
        }));
    }
    for h in handles {
        h.join()
            .map_err(|_| ImgError::Usage("a bench worker panicked".into()))?
            .map_err(ImgError::disk("request failed"))?;
    }
    // As qemu-img bench: the time covers the requests (and any --flush-interval flushes);
    // the final flush is the image's close, after the figures.
    let secs = began.elapsed().as_secs_f64();
    println!("Run completed in {secs:.3} seconds.");
    let bytes = (args.count * bufsize) as f64;
    println!(
        "{:.1} MiB/s, {:.0} requests/s",
        bytes / secs / (1 << 20) as f64,
        args.count as f64 / secs
    );
    if args.write {
        shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush()
            .map_err(ImgError::disk("final flush failed"))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn worker(
    mut own: Option<Box<dyn DiskImage>>,
    data_file: Option<HostFile>,
    shared: Arc<Mutex<Box<dyn DiskImage>>>,
    next: Arc<AtomicU64>,
    offsets: Arc<Offsets>,
    count: u64,
    write: bool,
    flush_every: u64,
    bufsize: u64,
    byte: u8,
) -> Result<(), devices::disk::DiskError> {
    // Page-aligned, as qemu-img's buffers are.
    let mut aligned = AlignedBuf::new(bufsize as usize);
    let buf = &mut aligned.as_mut_slice()[..bufsize as usize];
    buf.fill(byte);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= count {
            return Ok(());
        }
        let at = offsets.at(i);
        if let Some(file) = &data_file {
            let ext = shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extent(at, bufsize)?;
            if let (0, Some(host), true, false) = (ext.depth, ext.offset, ext.data, ext.compressed)
            {
                if ext.len >= bufsize {
                    file.read_at(buf, host)
                        .map_err(devices::disk::DiskError::io("reading data", host))?;
                    continue;
                }
            }
        }
        let mut guard;
        let img: &mut dyn DiskImage = match own.as_mut() {
            Some(d) => d.as_mut(),
            None => {
                guard = shared.lock().unwrap_or_else(|e| e.into_inner());
                guard.as_mut()
            }
        };
        if write {
            img.write_at(buf, at)?;
            if flush_every > 0 && (i + 1).is_multiple_of(flush_every) {
                img.flush()?;
            }
        } else {
            img.read_at(buf, at)?;
        }
    }
}
