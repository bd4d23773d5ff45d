//! One virtio-blk request: parsed from a descriptor chain, checked, executed against a
//! disk backend. Everything here is guest-controlled input: the header, the lengths, the
//! segments and the buffer addresses are validated, and failures become a status byte.

use std::io::{Read, Write};

use crate::{GuestReader, GuestWriter};

use crate::disk::{DiskError, DiskImage};

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Serial number.
pub const T_GET_ID: u32 = 8;
/// Discard.
pub const T_DISCARD: u32 = 11;
/// Write zeroes.
pub const T_WRITE_ZEROES: u32 = 13;

/// Status byte values.
pub const S_OK: u8 = 0;
/// I/O error (also for malformed requests).
pub const S_IOERR: u8 = 1;
/// Unsupported request.
pub const S_UNSUPP: u8 = 2;

/// Sector size of the protocol.
pub const SECTOR: u64 = 512;
/// Bytes of the serial number (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;
/// Bytes moved between guest memory and the disk per step.
const CHUNK: usize = 1 << 20;
/// Bytes of one discard/write-zeroes segment.
const SEGMENT: usize = 16;
/// Segments accepted in one discard/write-zeroes request.
pub const MAX_SEGMENTS: u32 = 128;
/// Largest discard/write-zeroes segment, in sectors.
pub const MAX_SEGMENT_SECTORS: u32 = 1 << 22;

/// Why a request failed (logged, rate-limited, and answered with a status).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Too short to hold a header, or no room for the status.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Beyond the end of the disk.
    #[error("request for sector {sector} (+{len} bytes) is beyond the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length.
        len: u64,
    },
    /// A length that is not a whole number of sectors.
    #[error("length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// An unknown or unnegotiated request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Bad discard/write-zeroes flags or counts.
    #[error("bad segment: {0}")]
    BadSegment(&'static str),
    /// Guest memory could not be read or written.
    #[error("guest buffer: {0}")]
    GuestMemory(std::io::Error),
    /// The backend failed.
    #[error(transparent)]
    Disk(#[from] DiskError),
}

impl RequestError {
    /// The status byte for this failure.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::BadSegment(_) => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// What a request may do.
#[derive(Clone, Copy, Debug)]
pub struct Capabilities {
    /// The disk refuses writes.
    pub read_only: bool,
    /// Flush was negotiated.
    pub flush: bool,
    /// Discard was negotiated.
    pub discard: bool,
    /// Write zeroes was negotiated.
    pub write_zeroes: bool,
}

/// The fixed request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Request type.
    pub kind: u32,
    /// First sector.
    pub sector: u64,
}

/// Reads the 16-byte header.
pub fn read_header(reader: &mut GuestReader) -> Result<Header, RequestError> {
    let mut raw = [0u8; 16];
    reader
        .read_exact(&mut raw)
        .map_err(|_| RequestError::Malformed("shorter than the 16-byte header"))?;
    Ok(Header {
        kind: u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
        sector: u64::from_le_bytes(raw[8..16].try_into().unwrap_or_default()),
    })
}

fn byte_range(sector: u64, len: u64, size: u64) -> Result<u64, RequestError> {
    let start = sector
        .checked_mul(SECTOR)
        .filter(|s| s.checked_add(len).is_some_and(|end| end <= size))
        .ok_or(RequestError::OutOfRange { sector, len })?;
    if !len.is_multiple_of(SECTOR) {
        return Err(RequestError::Unaligned(len));
    }
    Ok(start)
}

/// Executes a request whose header was read; `data_out` holds the device-writable data
/// area (everything before the status byte). Returns the bytes written into guest memory
/// before the status byte.
pub fn execute(
    header: Header,
    reader: &mut GuestReader,
    data_out: &mut GuestWriter,
    disk: &mut dyn DiskImage,
    caps: Capabilities,
    serial: &[u8],
    bounce: &mut Vec<u8>,
) -> Result<u32, RequestError> {
    let size = disk.size();
    match header.kind {
        T_IN => {
            let len = data_out.available_bytes() as u64;
            let mut at = byte_range(header.sector, len, size)?;
            let mut left = len as usize;
            while left > 0 {
                let n = left.min(CHUNK);
                bounce.resize(n, 0);
                disk.read_at(&mut bounce[..n], at)?;
                data_out
                    .write_all(&bounce[..n])
                    .map_err(RequestError::GuestMemory)?;
                at += n as u64;
                left -= n;
            }
            Ok(len as u32)
        }
        T_OUT => {
            if caps.read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = reader.available_bytes() as u64;
            let mut at = byte_range(header.sector, len, size)?;
            let mut left = len as usize;
            while left > 0 {
                let n = left.min(CHUNK);
                bounce.resize(n, 0);
                reader
                    .read_exact(&mut bounce[..n])
                    .map_err(RequestError::GuestMemory)?;
                disk.write_at(&bounce[..n], at)?;
                at += n as u64;
                left -= n;
            }
            Ok(0)
        }
        T_FLUSH if caps.flush => {
            disk.flush()?;
            Ok(0)
        }
        T_GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let n = serial.len().min(ID_BYTES);
            id[..n].copy_from_slice(&serial[..n]);
            let n = data_out.available_bytes().min(ID_BYTES);
            data_out
                .write_all(&id[..n])
                .map_err(RequestError::GuestMemory)?;
            Ok(n as u32)
        }
        T_DISCARD if caps.discard => {
            segments(reader, disk, size, caps, false)?;
            Ok(0)
        }
        T_WRITE_ZEROES if caps.write_zeroes => {
            segments(reader, disk, size, caps, true)?;
            Ok(0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Applies the discard or write-zeroes segments that follow the header.
fn segments(
    reader: &mut GuestReader,
    disk: &mut dyn DiskImage,
    size: u64,
    caps: Capabilities,
    zeroes: bool,
) -> Result<(), RequestError> {
    if caps.read_only {
        return Err(RequestError::ReadOnly);
    }
    let bytes = reader.available_bytes();
    if bytes == 0 || !bytes.is_multiple_of(SEGMENT) {
        return Err(RequestError::Malformed(
            "segment list is not a multiple of 16 bytes",
        ));
    }
    let count = bytes / SEGMENT;
    if count > MAX_SEGMENTS as usize {
        return Err(RequestError::BadSegment("too many segments"));
    }
    let mut parsed = Vec::with_capacity(count);
    for _ in 0..count {
        let mut raw = [0u8; SEGMENT];
        reader
            .read_exact(&mut raw)
            .map_err(RequestError::GuestMemory)?;
        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        let unmap = flags & 1 != 0;
        if flags & !1 != 0 || (unmap && !zeroes) {
            return Err(RequestError::BadSegment("unknown flags"));
        }
        if sectors > MAX_SEGMENT_SECTORS {
            return Err(RequestError::BadSegment("segment too large"));
        }
        let len = u64::from(sectors) * SECTOR;
        let at = byte_range(sector, len, size)?;
        parsed.push((at, len, unmap));
    }
    for (at, len, unmap) in parsed {
        if len == 0 {
            continue;
        }
        if zeroes {
            disk.write_zeroes(at, len, unmap)?;
        } else {
            disk.discard(at, len)?;
        }
    }
    Ok(())
}
