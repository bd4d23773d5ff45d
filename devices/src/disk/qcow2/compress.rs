//! Compressed clusters: raw deflate (qemu's "zlib") both ways, zstd on read.

use flate2::{Compress, Compression as Level, Decompress, FlushCompress, FlushDecompress, Status};

use super::header::Compression;
use super::QcowError;

/// Decompresses `input` into exactly `out.len()` bytes (one cluster).
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), QcowError> {
    let bad = |why: String| QcowError::Corrupt(format!("compressed cluster: {why}"));
    match kind {
        Compression::Zlib => {
            let mut d = Decompress::new(false);
            match d.decompress(input, out, FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                Ok(Status::BufError) if d.total_out() as usize == out.len() => Ok(()),
                Ok(_) => Err(bad(format!(
                    "inflated to {} bytes, not {}",
                    d.total_out(),
                    out.len()
                ))),
                Err(e) => Err(bad(e.to_string())),
            }
        }
        Compression::Zstd => {
            use std::io::Read;
            let mut dec =
                ruzstd::decoding::StreamingDecoder::new(input).map_err(|e| bad(e.to_string()))?;
            let mut done = 0;
            while done < out.len() {
                match dec.read(&mut out[done..]) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) => return Err(bad(e.to_string())),
                }
            }
            if done != out.len() {
                return Err(bad(format!("zstd gave {done} bytes, not {}", out.len())));
            }
            Ok(())
        }
    }
}

/// Compresses one cluster with raw deflate; None when it does not get smaller.
pub fn compress_deflate(input: &[u8]) -> Option<Vec<u8>> {
    let mut c = Compress::new(Level::default(), false);
    let mut out = vec![0u8; input.len()];
    match c.compress(input, &mut out, FlushCompress::Finish) {
        Ok(Status::StreamEnd) => {
            out.truncate(c.total_out() as usize);
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_round_trips_a_cluster() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        let packed = compress_deflate(&data).unwrap();
        assert!(packed.len() < data.len());
        let mut out = vec![0u8; data.len()];
        decompress(Compression::Zlib, &packed, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn incompressible_data_is_left_alone() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress_deflate(&data).is_none());
    }

    #[test]
    fn garbage_input_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(Compression::Zlib, &[0xff; 100], &mut out).is_err());
        assert!(decompress(Compression::Zstd, &[0xff; 100], &mut out).is_err());
        assert!(decompress(Compression::Zlib, &[], &mut out).is_err());
    }
}
