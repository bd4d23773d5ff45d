//! Raw images: the file is the disk.

use super::{
    check_range, looks_like_image_header, DiskError, DiskImage, Extent, HostFile, ImageFormat,
};

/// A raw image file.
pub struct RawImage {
    file: HostFile,
    size: u64,
    read_only: bool,
    /// The format was guessed: a write may not turn block 0 into another format's header.
    probed: bool,
}

impl RawImage {
    /// Wraps an open file.
    pub fn from_host_file(
        file: HostFile,
        read_only: bool,
        probed: bool,
    ) -> Result<Self, DiskError> {
        let size = file
            .len()
            .map_err(DiskError::io("reading the image size", 0))?;
        Ok(RawImage {
            file,
            size,
            read_only,
            probed,
        })
    }

    fn writable(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file
            .read_at(buf, offset)
            .map_err(DiskError::io("read", offset))
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.writable(offset, buf.len() as u64)?;
        if self.probed && offset == 0 && looks_like_image_header(buf) {
            return Err(DiskError::ProbedRawHeader);
        }
        self.file
            .write_at(buf, offset)
            .map_err(DiskError::io("write", offset))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync().map_err(DiskError::io("fdatasync", 0))
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.writable(offset, len)?;
        // Discard is advisory: a file system without hole punching keeps the data.
        let _ = self.file.punch_hole(offset, len);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        self.writable(offset, len)?;
        self.file
            .write_zeroes(offset, len, unmap)
            .map_err(DiskError::io("write zeroes", offset))
    }

    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent, DiskError> {
        let end = offset.saturating_add(max_len).min(self.size);
        let data_at = self
            .file
            .next_data(offset)
            .map_err(DiskError::io("SEEK_DATA", offset))?;
        let base = Extent {
            len: 0,
            depth: 0,
            zero: false,
            present: true,
            data: true,
            compressed: false,
            offset: Some(offset),
        };
        Ok(match data_at {
            Some(d) if d <= offset => {
                let hole = self
                    .file
                    .next_hole(offset)
                    .map_err(DiskError::io("SEEK_HOLE", offset))?
                    .unwrap_or(end);
                Extent {
                    len: hole.min(end) - offset,
                    ..base
                }
            }
            next => Extent {
                len: next.unwrap_or(end).min(end) - offset,
                zero: true,
                data: false,
                ..base
            },
        })
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(len: u64, probed: bool) -> RawImage {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        RawImage::from_host_file(HostFile::from_file(f), false, probed).unwrap()
    }

    #[test]
    fn round_trip_and_range_checks() {
        let mut img = raw(1 << 20, false);
        img.write_at(b"data", 4096).unwrap();
        let mut buf = [0u8; 4];
        img.read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"data");
        assert!(matches!(
            img.read_at(&mut buf, (1 << 20) - 2),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            img.write_at(b"x", u64::MAX),
            Err(DiskError::OutOfRange { .. })
        ));
    }

    #[test]
    fn probed_raw_refuses_a_qcow2_header_in_block_0() {
        let mut img = raw(1 << 20, true);
        assert!(matches!(
            img.write_at(b"QFI\xfb\0\0\0\x03", 0),
            Err(DiskError::ProbedRawHeader)
        ));
        img.write_at(b"QFI\xfb", 512).unwrap();
        let mut explicit = raw(1 << 20, false);
        explicit.write_at(b"QFI\xfb", 0).unwrap();
    }

    #[test]
    fn extents_report_data_and_holes() {
        let mut img = raw(4 << 20, false);
        img.write_at(&[1u8; 65536], 1 << 20).unwrap();
        let first = img.extent(0, 4 << 20).unwrap();
        assert!(first.zero && !first.data);
        assert_eq!(first.len, 1 << 20);
        let second = img.extent(1 << 20, 4 << 20).unwrap();
        assert!(second.data);
        assert!(second.len >= 65536);
    }
}
