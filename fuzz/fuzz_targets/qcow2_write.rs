//! The qcow2 engine's write path: a sequence of guest writes, zero writes, discards,
//! compressed writes, flushes, reopens and internal snapshot creates/applies/deletes on an
//! image the engine created (any cluster size 512 B .. 2 MiB, any refcount width, compat
//! 0.10 or 1.1, with or without a raw backing file), checked against a model of the disk:
//! every read returns what was written (a discard may leave the old bytes or zeros), a
//! snapshot applied brings back what the disk held when it was taken, and the engine's own
//! check finds no corruption and no leak after a reopen and at the end.
//! With bit 6 of byte 1 set, the bytes after the operations are the image instead (a
//! hostile image, opened read-write): then only "no panic, no hang" is checked.
//!
//! Input: byte 0 cluster bits (9 + b % 13), byte 1 refcount order (b % 7), bit 3 backing,
//! bit 4 compat 0.10, bit 6 hostile image; byte 2 the operation count in hostile mode;
//! then operations of 8 bytes: kind, argument, little-endian u16 offset, u32 value.
#![no_main]

use std::io::Write;
use std::path::Path;

use devices::disk::qcow2::check::Repair;
use devices::disk::qcow2::snapshot::SnapshotMeta;
use devices::disk::qcow2::CreateOptions;
use devices::disk::{DiskError, DiskImage, HostFile, ImageFormat, OpenOptions, Qcow2Image};
use libfuzzer_sys::fuzz_target;

const SIZE: u64 = 640 * 1024 + 1536;
const MAX_OPS: usize = 48;

fn open(path: &Path) -> Result<Qcow2Image, DiskError> {
    let opts = OpenOptions {
        format: Some(ImageFormat::Qcow2),
        read_only: false,
        ..Default::default()
    };
    Qcow2Image::open(path, &opts)
}

fn backing_byte(pos: u64) -> u8 {
    (pos / 512 % 251) as u8 + 1
}

struct Model {
    /// None only while it is reopened (the old handle's file lock goes first).
    img: Option<Qcow2Image>,
    disk: Vec<u8>,
    /// (snapshot name, the disk when it was taken).
    snaps: Vec<(String, Vec<u8>)>,
    made: u32,
    v2: bool,
}

/// Offset and length of an operation: byte-granular when the argument's bit 6 is set,
/// else sector-granular; up to 16 KiB, or 256 KiB with bit 7.
fn range(arg: u8, off: u16, value: u32) -> (u64, u64) {
    let fine = arg & 0x40 != 0;
    let mut at = u64::from(off) * 64;
    let mut len = u64::from(value >> 16 & 0x1f) * 512 + 512;
    if arg & 0x80 != 0 {
        len *= 16;
    }
    if fine {
        at += u64::from(value & 0x1ff);
        len = len - 512 + u64::from(value >> 8 & 0xff) + 1;
    } else {
        at &= !511;
    }
    let at = at % SIZE;
    (at, len.min(SIZE - at))
}

fn pattern(fill: u8, at: u64, len: u64) -> Vec<u8> {
    (at..at + len)
        .map(|p| fill ^ (p / 512) as u8 ^ (p % 7) as u8)
        .collect()
}

impl Model {
    fn img(&mut self) -> &mut Qcow2Image {
        self.img.as_mut().expect("an open image")
    }
}

fn verify(m: &mut Model, at: u64, len: u64) {
    let mut buf = vec![0u8; len as usize];
    m.img().read_at(&mut buf, at).expect("read");
    let want = &m.disk[at as usize..(at + len) as usize];
    if let Some(i) = (0..buf.len()).find(|&i| buf[i] != want[i]) {
        panic!(
            "byte {:#x} reads {:#x}, {:#x} was written",
            at + i as u64,
            buf[i],
            want[i]
        );
    }
}

fn check_clean(m: &mut Model) {
    let r = m.img().check(Repair::None).expect("check");
    assert!(
        r.corruptions == 0 && r.leaks == 0,
        "check: {} corruptions, {} leaks: {:?}",
        r.corruptions,
        r.leaks,
        r.messages
    );
}

/// After a refused operation the image is as it was: clean, and `at..at + len` unchanged.
fn refused(m: &mut Model, at: u64, len: u64) {
    check_clean(m);
    verify(m, at, len);
}

fn step(m: &mut Model, path: &Path, op: &[u8]) {
    let (kind, arg) = (op[0] % 12, op[1]);
    let off = u16::from_le_bytes([op[2], op[3]]);
    let value = u32::from_le_bytes([op[4], op[5], op[6], op[7]]);
    let (at, len) = range(arg, off, value);
    let span = at as usize..(at + len) as usize;
    match kind {
        0..=2 => {
            let data = pattern(value as u8, at, len);
            m.img().write_at(&data, at).expect("write");
            m.disk[span].copy_from_slice(&data);
        }
        3 => {
            m.img()
                .write_zeroes(at, len, arg & 1 != 0)
                .expect("write_zeroes");
            m.disk[span].fill(0);
        }
        4 => {
            m.img().discard(at, len).expect("discard");
            let mut now = vec![0u8; len as usize];
            m.img().read_at(&mut now, at).expect("read");
            for (i, (b, old)) in now.iter().zip(&m.disk[span.clone()]).enumerate() {
                assert!(
                    *b == 0 || b == old,
                    "discard left {b:#x} at {:#x}",
                    at + i as u64
                );
            }
            m.disk[span].copy_from_slice(&now);
        }
        5 => m.img().flush().expect("flush"),
        6 => verify(m, at, len),
        7 => {
            let cs = m.img().cluster_size();
            let g = at / cs * cs;
            if g + cs <= SIZE && !m.v2 {
                let data = if arg & 1 == 0 {
                    vec![value as u8; cs as usize]
                } else {
                    pattern(value as u8, g, cs)
                };
                match m.img().write_compressed(g, &data) {
                    Ok(()) => m.disk[g as usize..(g + cs) as usize].copy_from_slice(&data),
                    Err(_) => refused(m, g, cs),
                }
            }
        }
        8 if m.snaps.len() < 4 => {
            let name = format!("s{}", m.made);
            m.made += 1;
            // A narrow refcount width cannot count one more reference: a clean refusal.
            match m.img().snapshot_create(&name, SnapshotMeta::default()) {
                Ok(_) => m.snaps.push((name, m.disk.clone())),
                Err(_) => refused(m, at, len),
            }
        }
        9 if !m.snaps.is_empty() => {
            let (name, disk) = m.snaps[usize::from(arg) % m.snaps.len()].clone();
            match m.img().snapshot_apply(&name) {
                Ok(_) => m.disk = disk,
                Err(_) => refused(m, at, len),
            }
        }
        10 if !m.snaps.is_empty() => {
            let (name, _) = m.snaps.remove(usize::from(arg) % m.snaps.len());
            m.img().snapshot_delete(&name).expect("snapshot_delete");
        }
        11 => {
            m.img().flush().expect("flush");
            check_clean(m);
            m.img = None;
            m.img = Some(open(path).expect("reopen"));
            verify(m, at, len);
        }
        _ => {}
    }
}

fn created(data: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.qcow2");
    let flags = data[1];
    let mut opts = CreateOptions {
        size: SIZE,
        cluster_size: 1 << (9 + data[0] % 13),
        refcount_bits: 1 << (flags % 7),
        version: if flags & 0x10 != 0 { 2 } else { 3 },
        ..Default::default()
    };
    let mut disk = vec![0u8; SIZE as usize];
    if flags & 0x08 != 0 {
        let base = dir.path().join("base.raw");
        for (i, b) in disk.iter_mut().enumerate() {
            *b = backing_byte(i as u64);
        }
        std::fs::write(&base, &disk).unwrap();
        opts.backing_file = Some("base.raw".into());
        opts.backing_format = Some("raw".into());
    }
    let f = std::fs::File::create(&path).unwrap();
    if let Err(e) = Qcow2Image::create(&HostFile::from_file(f), &opts) {
        // compat 0.10 has 16-bit refcounts only; anything else must be created.
        assert!(
            opts.version == 2 && opts.refcount_bits != 16,
            "create {opts:?}: {e}"
        );
        return;
    }
    let mut m = Model {
        img: Some(open(&path).expect("open what was created")),
        disk,
        snaps: Vec::new(),
        made: 0,
        v2: opts.version == 2,
    };
    for op in data[2..].chunks_exact(8).take(MAX_OPS) {
        step(&mut m, &path, op);
    }
    let mut at = 0;
    while at < SIZE {
        let n = (SIZE - at).min(256 * 1024);
        verify(&mut m, at, n);
        at += n;
    }
    check_clean(&mut m);
}

/// A hostile image opened read-write: every operation may fail, none may panic.
fn hostile(data: &[u8]) {
    let n = usize::from(data[2] % 16) * 8;
    let Some(ops) = data.get(3..3 + n) else {
        return;
    };
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&data[3 + n..]).unwrap();
    let Ok(mut img) = open(f.path()) else {
        return;
    };
    let size = img.size();
    for op in ops.chunks_exact(8) {
        let off = u64::from(u16::from_le_bytes([op[2], op[3]])) * 512;
        let at = if size == 0 { 0 } else { off % size };
        let len = (u64::from(op[1]) * 512 + 512).min(size - at);
        let _ = match op[0] % 6 {
            0 => img.write_at(&vec![op[4]; len as usize], at),
            1 => img.write_zeroes(at, len, op[5] & 1 != 0),
            2 => img.discard(at, len),
            3 => img.flush(),
            4 => img
                .snapshot_create("x", SnapshotMeta::default())
                .map(|_| ()),
            _ => img.read_at(&mut vec![0u8; len as usize], at),
        };
    }
    let _ = img.check(Repair::None);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    if data[1] & 0x40 != 0 {
        hostile(data);
    } else {
        created(data);
    }
});
