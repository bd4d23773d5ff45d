//! Any bytes as a qcow2 image: opening, reading, mapping and checking must give errors,
//! never panics, hangs or unbounded memory.
#![no_main]

use std::io::Write;

use devices::disk::qcow2::check::Repair;
use devices::disk::{self, HostFile, ImageFormat, OpenOptions, Qcow2Image};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(data).unwrap();
    let path = f.path().to_path_buf();
    let opts = OpenOptions {
        format: Some(ImageFormat::Qcow2),
        read_only: true,
        ..Default::default()
    };
    if let Ok(mut img) = disk::open_image(&path, &opts) {
        let size = img.size();
        let mut buf = vec![0u8; 65536];
        for off in [0, size / 3, size.saturating_sub(65536)] {
            if off + 65536 <= size {
                let _ = img.read_at(&mut buf, off);
            }
        }
        let mut pos = 0;
        for _ in 0..64 {
            match img.extent(pos, size - pos) {
                Ok(e) if e.len > 0 && pos + e.len < size => pos += e.len,
                _ => break,
            }
        }
    }
    let file = HostFile::open(&path, true, Default::default()).unwrap();
    if let Ok(mut img) = Qcow2Image::from_file(file, &path, true) {
        let _ = img.check(Repair::None);
        let _ = img.snapshots();
    }
});
