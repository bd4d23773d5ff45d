//! `ember img info`

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use devices::disk::qcow2::header::{compat, incompat};
use devices::disk::qcow2::resolve_backing;
use devices::disk::{probe_format, ImageFormat};
use serde_json::{json, Value};

use super::{
    absolute, allocated_bytes, human_size, open_qcow2_layer, parse_format, ImgError, ImgResult,
};

#[derive(Args)]
pub struct InfoArgs {
    /// Image format (probed when not given)
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format: human or json
    #[arg(long = "output", value_name = "FMT", default_value = "human")]
    output: String,
    /// Show every image of the backing chain
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Open even when another process uses the image (no locks; the data may be changing)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image
    filename: PathBuf,
}

/// Everything info prints about one image.
struct Info {
    path: PathBuf,
    format: ImageFormat,
    virtual_size: u64,
    actual_size: u64,
    file_length: u64,
    qcow2: Option<Qcow2Info>,
}

struct Qcow2Info {
    cluster_size: u64,
    version: u32,
    compression: &'static str,
    lazy_refcounts: bool,
    refcount_bits: u32,
    corrupt: bool,
    dirty: bool,
    backing_file: Option<String>,
    backing_format: Option<String>,
    snapshots: Vec<devices::disk::qcow2::snapshot::Snapshot>,
}

fn gather(path: &Path, format: Option<ImageFormat>, force_share: bool) -> Result<Info, ImgError> {
    let meta = std::fs::metadata(path)
        .map_err(|_| ImgError::Usage(format!("'{}': no such file", path.display())))?;
    let format = match format {
        Some(f) => f,
        None => probe_format(path)
            .map_err(ImgError::disk(format!("cannot open '{}'", path.display())))?,
    };
    let mut info = Info {
        path: path.to_path_buf(),
        format,
        virtual_size: meta.len(),
        actual_size: allocated_bytes(path),
        file_length: meta.len(),
        qcow2: None,
    };
    if format == ImageFormat::Qcow2 {
        let mut img = open_qcow2_layer(path, true, force_share)?;
        let h = img.header().clone();
        info.virtual_size = h.size;
        info.qcow2 = Some(Qcow2Info {
            cluster_size: h.cluster_size(),
            version: h.version,
            compression: h.compression.name(),
            lazy_refcounts: h.compatible_features & compat::LAZY_REFCOUNTS != 0,
            refcount_bits: h.refcount_bits(),
            corrupt: h.incompatible_features & incompat::CORRUPT != 0,
            dirty: h.incompatible_features & incompat::DIRTY != 0,
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            snapshots: img
                .snapshots()
                .map_err(ImgError::disk("cannot read the snapshot table"))?,
        });
    }
    Ok(info)
}

fn human(info: &Info) -> String {
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        info.path.display(),
        info.format.name(),
        human_size(info.virtual_size),
        info.virtual_size,
        human_size(info.actual_size)
    );
    if let Some(q) = &info.qcow2 {
        s.push_str(&format!("cluster_size: {}\n", q.cluster_size));
        if let Some(b) = &q.backing_file {
            s.push_str(&format!("backing file: {b}\n"));
            if let Some(f) = &q.backing_format {
                s.push_str(&format!("backing file format: {f}\n"));
            }
        }
        s.push_str(&super::snapshot::snapshot_list(&q.snapshots));
        s.push_str(&format!(
            "Format specific information:\n    compat: {}\n",
            if q.version == 2 { "0.10" } else { "1.1" }
        ));
        if q.version >= 3 {
            s.push_str(&format!(
                "    compression type: {}\n    lazy refcounts: {}\n    refcount bits: {}\n    \
                 corrupt: {}\n    extended l2: false\n",
                q.compression, q.lazy_refcounts, q.refcount_bits, q.corrupt
            ));
        } else {
            s.push_str(&format!(
                "    compression type: {}\n    refcount bits: {}\n",
                q.compression, q.refcount_bits
            ));
        }
    }
    s.push_str(&format!(
        "Child node '/file':\n    filename: {}\n    protocol type: file\n    file length: {} ({} bytes)\n    disk size: {}\n",
        info.path.display(),
        human_size(info.file_length),
        info.file_length,
        human_size(info.actual_size)
    ));
    s
}

fn to_json(info: &Info) -> Value {
    let mut v = json!({
        "children": [{
            "name": "file",
            "info": {
                "children": [],
                "virtual-size": info.file_length,
                "filename": info.path.display().to_string(),
                "format": "file",
                "actual-size": info.actual_size,
                "format-specific": {"type": "file", "data": {}},
                "dirty-flag": false
            }
        }],
        "virtual-size": info.virtual_size,
        "filename": info.path.display().to_string(),
        "format": info.format.name(),
        "actual-size": info.actual_size,
        "dirty-flag": info.qcow2.as_ref().is_some_and(|q| q.dirty),
    });
    let Some(q) = &info.qcow2 else {
        return v;
    };
    let mut data = json!({
        "compat": if q.version == 2 { "0.10" } else { "1.1" },
        "compression-type": q.compression,
        "refcount-bits": q.refcount_bits,
    });
    if q.version >= 3 {
        data["lazy-refcounts"] = json!(q.lazy_refcounts);
        data["corrupt"] = json!(q.corrupt);
        data["extended-l2"] = json!(false);
    }
    v["cluster-size"] = json!(q.cluster_size);
    v["format-specific"] = json!({"type": "qcow2", "data": data});
    if let Some(b) = &q.backing_file {
        v["backing-filename"] = json!(b);
        v["full-backing-filename"] = json!(absolute(&resolve_backing(&info.path, b))
            .display()
            .to_string());
        if let Some(f) = &q.backing_format {
            v["backing-filename-format"] = json!(f);
        }
    }
    if !q.snapshots.is_empty() {
        v["snapshots"] = q
            .snapshots
            .iter()
            .map(|s| {
                let mut v = json!({
                    "icount": s.icount,
                    "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                    "name": s.name,
                    "date-sec": s.date_sec,
                    "date-nsec": s.date_nsec,
                    "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
                    "id": s.id,
                    "vm-state-size": s.vm_state_size
                });
                if s.icount.is_none() {
                    // qemu leaves the key out when no count was recorded.
                    v.as_object_mut().map(|o| o.shift_remove("icount"));
                }
                v
            })
            .collect();
    }
    v
}

pub fn run(args: InfoArgs) -> ImgResult {
    let json = match args.output.as_str() {
        "human" => false,
        "json" => true,
        o => return Err(ImgError::Usage(format!("--output={o}: use human or json"))),
    };
    let mut format = args
        .format
        .as_deref()
        .map(|f| parse_format("-f", f))
        .transpose()?;
    let mut chain = Vec::new();
    let mut path = args.filename.clone();
    loop {
        let info = gather(&path, format, args.force_share)?;
        let next = info.qcow2.as_ref().and_then(|q| {
            q.backing_file.as_ref().map(|b| {
                let f = q.backing_format.as_deref().and_then(ImageFormat::from_name);
                (resolve_backing(&path, b), f)
            })
        });
        chain.push(info);
        match next {
            Some((p, f)) if args.backing_chain => {
                if chain.len() > devices::disk::MAX_CHAIN_DEPTH
                    || chain.iter().any(|i| absolute(&i.path) == absolute(&p))
                {
                    return Err(ImgError::Usage(format!(
                        "backing chain of '{}' loops or is too deep",
                        args.filename.display()
                    )));
                }
                path = p;
                format = f;
            }
            _ => break,
        }
    }
    if json {
        let out = if args.backing_chain {
            Value::Array(chain.iter().map(to_json).collect())
        } else {
            to_json(&chain[0])
        };
        println!("{}", super::pretty_json(&out));
    } else {
        let parts: Vec<String> = chain.iter().map(human).collect();
        print!("{}", parts.join("\n"));
    }
    Ok(ExitCode::SUCCESS)
}
