//! Engine tests: layouts, round trips at every cluster size and refcount width, a randomized
//! model test, refcount table growth, copy-on-write over backing files, hostile images.

use std::path::{Path, PathBuf};

use super::check::Repair;
use super::*;
use crate::disk::{open_image, CacheMode, DiskImage, OpenOptions};

/// A small xorshift generator: tests must be reproducible from their seed.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn create(dir: &Path, name: &str, opts: &CreateOptions) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    Qcow2Image::create(&HostFile::from_file(file), opts).unwrap();
    path
}

/// A 1 MiB qcow2 image with default options.
fn create_mib(dir: &Path, name: &str) -> PathBuf {
    create(
        dir,
        name,
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
}

fn open_rw(path: &Path) -> Qcow2Image {
    Qcow2Image::open(
        path,
        &OpenOptions {
            format: Some(ImageFormat::Qcow2),
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap()
}

fn assert_clean(img: &mut Qcow2Image) {
    let r = img.check(Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:#?}", r.messages);
}

#[test]
fn new_image_reads_zeros_and_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(
        dir.path(),
        "a.qcow2",
        &CreateOptions {
            size: 10 << 20,
            ..Default::default()
        },
    );
    let mut img = open_rw(&p);
    let mut buf = vec![1u8; 8192];
    img.read_at(&mut buf, 5 << 20).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    assert_eq!(img.size(), 10 << 20);
    assert_clean(&mut img);
}

#[test]
fn every_cluster_size_and_refcount_width_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    for (version, cluster_bits, refcount_bits) in [
        (3, 9, 1),
        (3, 9, 64),
        (3, 12, 2),
        (3, 14, 4),
        (3, 16, 8),
        (3, 16, 16),
        (3, 16, 32),
        (2, 16, 16),
        (2, 9, 16),
        (3, 21, 16),
    ] {
        let name = format!("v{version}-c{cluster_bits}-r{refcount_bits}.qcow2");
        let p = create(
            dir.path(),
            &name,
            &CreateOptions {
                size: 8 << 20,
                cluster_size: 1 << cluster_bits,
                refcount_bits,
                version,
                ..Default::default()
            },
        );
        let mut img = open_rw(&p);
        let mut rng = Rng::new(cluster_bits as u64 * 100 + refcount_bits as u64);
        let mut model = vec![0u8; 8 << 20];
        for _ in 0..40 {
            let len = 1 + rng.below(70_000) as usize;
            let off = rng.below((8 << 20) - len as u64);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            img.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        img.flush().unwrap();
        drop(img);
        let mut img = open_rw(&p);
        let mut back = vec![0u8; 8 << 20];
        img.read_at(&mut back, 0).unwrap();
        assert!(back == model, "{name}: content differs");
        assert_clean(&mut img);
    }
}

/// Applies random operations to the image and to a plain byte model, comparing after each.
fn model_run(seed: u64, opts: &CreateOptions, with_backing: bool, ops: usize) {
    let dir = tempfile::tempdir().unwrap();
    let size = opts.size as usize;
    let mut model = vec![0u8; size];
    let mut rng = Rng::new(seed);
    let mut top_opts = opts.clone();
    if with_backing {
        let base = create(dir.path(), "base.qcow2", opts);
        let mut b = open_rw(&base);
        for _ in 0..20 {
            let len = 1 + rng.below(40_000) as usize;
            let off = rng.below((size - len) as u64) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            b.write_at(&data, off as u64).unwrap();
            model[off..off + len].copy_from_slice(&data);
        }
        drop(b);
        top_opts.backing_file = Some("base.qcow2".into());
        top_opts.backing_format = Some("qcow2".into());
    }
    let top = create(dir.path(), "top.qcow2", &top_opts);
    let mut img = open_rw(&top);
    for step in 0..ops {
        let len = 1 + rng.below(3 * opts.cluster_size) as usize;
        let off = rng.below((size - len) as u64) as usize;
        match rng.below(10) {
            0..=5 => {
                let fill = rng.next() as u8;
                let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
                img.write_at(&data, off as u64).unwrap();
                model[off..off + len].copy_from_slice(&data);
            }
            6 => {
                img.write_zeroes(off as u64, len as u64, rng.below(2) == 0)
                    .unwrap();
                model[off..off + len].fill(0);
            }
            7 => {
                // Discard may leave data or zeros; re-sync the model from what reads back,
                // but only for the discarded range, and only with zeros or old data.
                img.discard(off as u64, len as u64).unwrap();
                let mut now = vec![0u8; len];
                img.read_at(&mut now, off as u64).unwrap();
                for (i, b) in now.iter().enumerate() {
                    assert!(
                        *b == 0 || *b == model[off + i],
                        "seed {seed} step {step}: discard produced garbage"
                    );
                }
                model[off..off + len].copy_from_slice(&now);
            }
            8 => img.flush().unwrap(),
            _ => {
                drop(img);
                img = open_rw(&top);
            }
        }
        let check_at = rng.below((size - 4096) as u64) as usize;
        let mut buf = vec![0u8; 4096];
        img.read_at(&mut buf, check_at as u64).unwrap();
        assert!(
            buf == model[check_at..check_at + 4096],
            "seed {seed} step {step}: mismatch near {check_at:#x}"
        );
    }
    let mut all = vec![0u8; size];
    img.read_at(&mut all, 0).unwrap();
    assert!(all == model, "seed {seed}: final content differs");
    img.flush().unwrap();
    assert_clean(&mut img);
}

#[test]
fn random_operations_match_the_model() {
    for seed in 0..12 {
        let opts = CreateOptions {
            size: 4 << 20,
            cluster_size: [512, 4096, 65536][seed as usize % 3],
            refcount_bits: [16, 1, 64, 8][seed as usize % 4],
            version: 3,
            ..Default::default()
        };
        model_run(seed, &opts, false, 300);
    }
}

#[test]
fn random_operations_over_a_backing_file_match_the_model() {
    for seed in 100..108 {
        let opts = CreateOptions {
            size: 4 << 20,
            cluster_size: [4096, 65536][seed as usize % 2],
            version: if seed % 4 == 0 { 2 } else { 3 },
            ..Default::default()
        };
        model_run(seed, &opts, true, 300);
    }
}

#[test]
fn refcount_table_grows_and_stays_consistent() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters with 64-bit refcounts: one block covers 64 clusters and one table
    // cluster 64 blocks, so 2 MiB of data forces several table growths.
    let p = create(
        dir.path(),
        "grow.qcow2",
        &CreateOptions {
            size: 4 << 20,
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        },
    );
    let mut img = open_rw(&p);
    let before = img.header().refcount_table_clusters;
    let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
    img.write_at(&data, 0).unwrap();
    img.flush().unwrap();
    assert!(img.header().refcount_table_clusters > before);
    drop(img);
    let mut img = open_rw(&p);
    let mut back = vec![0u8; 3 << 20];
    img.read_at(&mut back, 0).unwrap();
    assert!(back == data);
    assert_clean(&mut img);
}

#[test]
fn overlay_writes_never_touch_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions {
        size: 1 << 20,
        ..Default::default()
    };
    let base = create(dir.path(), "base.qcow2", &opts);
    let mut b = open_rw(&base);
    b.write_at(&[7u8; 65536], 0).unwrap();
    drop(b);
    let before = std::fs::read(&base).unwrap();
    let top = create(
        dir.path(),
        "top.qcow2",
        &CreateOptions {
            backing_file: Some(base.display().to_string()),
            ..opts
        },
    );
    let mut t = open_rw(&top);
    t.write_at(b"new", 100).unwrap();
    let mut buf = [0u8; 8];
    t.read_at(&mut buf, 98).unwrap();
    assert_eq!(&buf, &[7, 7, b'n', b'e', b'w', 7, 7, 7]);
    drop(t);
    assert_eq!(std::fs::read(&base).unwrap(), before);
}

#[test]
fn resize_grows_the_l1_table_and_shrink_drops_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(
        dir.path(),
        "r.qcow2",
        &CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
    );
    let mut img = open_rw(&p);
    img.write_at(&[1u8; 4096], 0).unwrap();
    img.resize(64 << 20).unwrap();
    img.write_at(&[2u8; 4096], 60 << 20).unwrap();
    img.resize(8192).unwrap();
    drop(img);
    let mut img = open_rw(&p);
    assert_eq!(img.size(), 8192);
    let mut b = [0u8; 4096];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [1u8; 4096]);
    img.resize(64 << 20).unwrap();
    img.read_at(&mut b, 60 << 20).unwrap();
    assert_eq!(b, [0u8; 4096], "shrink dropped the cluster past the end");
    assert_clean(&mut img);
}

#[test]
fn compressed_clusters_read_back_and_overwrite_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let p = create_mib(dir.path(), "c.qcow2");
    let mut img = open_rw(&p);
    let a: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
    let b: Vec<u8> = (0..65536u32).map(|i| (i / 13) as u8).collect();
    img.write_compressed(0, &a).unwrap();
    img.write_compressed(65536, &b).unwrap();
    let mut back = vec![0u8; 131072];
    img.read_at(&mut back, 0).unwrap();
    assert!(back[..65536] == a[..] && back[65536..] == b[..]);
    let ext = img.extent(0, 65536).unwrap();
    assert!(ext.compressed);
    img.write_at(b"xyz", 10).unwrap();
    img.flush().unwrap();
    assert_clean(&mut img);
    img.read_at(&mut back[..16], 0).unwrap();
    assert_eq!(&back[10..13], b"xyz");
    assert_eq!(back[..10], a[..10]);
}

/// Found by the qcow2_write fuzz target: the host cluster compressed clusters are packed
/// into was freed (its compressed data all overwritten) and reused for guest data; the next
/// compressed write still packed into it, over the data.
#[test]
fn a_freed_compressed_cluster_is_not_packed_into_after_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let p = create_mib(dir.path(), "c.qcow2");
    let mut img = open_rw(&p);
    let a: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
    img.write_compressed(0, &a).unwrap();
    img.write_zeroes(0, 65536, true).unwrap();
    img.flush().unwrap();
    let data = vec![0x67u8; 65536];
    img.write_at(&data, 65536).unwrap();
    img.write_compressed(131072, &a).unwrap();
    img.flush().unwrap();
    let mut back = vec![0u8; 65536];
    img.read_at(&mut back, 65536).unwrap();
    assert!(
        back == data,
        "guest data overwritten by a compressed cluster"
    );
    img.read_at(&mut back, 131072).unwrap();
    assert!(back == a);
    assert_clean(&mut img);
}

/// Found by the qcow2_write fuzz target: the last decompressed cluster is cached by its
/// host offset and length; a new compressed cluster written where a freed one was, at the
/// same length, read back as the old one's data.
#[test]
fn a_compressed_cluster_written_over_a_freed_one_reads_back_new_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = create_mib(dir.path(), "c.qcow2");
    let mut img = open_rw(&p);
    let a = vec![0xa3u8; 65536];
    let b = vec![0x5cu8; 65536];
    let mut back = vec![0u8; 65536];
    img.write_compressed(0, &a).unwrap();
    img.read_at(&mut back, 0).unwrap();
    img.write_zeroes(0, 65536, true).unwrap();
    img.flush().unwrap();
    img.write_compressed(65536, &b).unwrap();
    img.read_at(&mut back, 65536).unwrap();
    assert!(back == b, "read {:#x}, not {:#x}", back[0], b[0]);
    img.flush().unwrap();
    assert_clean(&mut img);
}

/// With 1-bit refcounts a host cluster holds one compressed cluster: packing a second one
/// into it would need refcount 2.
#[test]
fn one_bit_refcounts_do_not_pack_compressed_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions {
        size: 1 << 20,
        refcount_bits: 1,
        ..Default::default()
    };
    let p = create(dir.path(), "c.qcow2", &opts);
    let mut img = open_rw(&p);
    let a: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
    img.write_compressed(0, &a).unwrap();
    img.write_compressed(65536, &a).unwrap();
    let mut back = vec![0u8; 65536];
    img.read_at(&mut back, 65536).unwrap();
    assert!(back == a);
    img.flush().unwrap();
    assert_clean(&mut img);
}

#[test]
fn leaks_are_found_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let p = create_mib(dir.path(), "l.qcow2");
    let mut img = open_rw(&p);
    let leaked = img.alloc_clusters(3).unwrap();
    img.flush().unwrap();
    let r = img.check(Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 3), "{:?}", r.messages);
    let r = img.check(Repair::Leaks).unwrap();
    assert_eq!(r.leaks_fixed, 3);
    assert_clean(&mut img);
    assert_eq!(img.refcount(leaked).unwrap(), 0);
}

#[test]
fn wrong_refcount_is_a_corruption_and_rebuild_fixes_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = create_mib(dir.path(), "w.qcow2");
    let mut img = open_rw(&p);
    img.write_at(&[5u8; 70_000], 0).unwrap();
    img.flush().unwrap();
    let L2Entry::Normal { offset, .. } = img.lookup(0).unwrap() else {
        panic!("not allocated")
    };
    img.change_refcount(offset, -1).unwrap();
    img.flush().unwrap();
    let r = img.check(Repair::None).unwrap();
    assert!(r.corruptions >= 1, "{:?}", r.messages);
    let r = img.check(Repair::All).unwrap();
    assert!(r.corruptions_fixed >= 1);
    assert_clean(&mut img);
    let mut buf = vec![0u8; 70_000];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|b| *b == 5));
}

// ---- hostile images --------------------------------------------------------------------

fn open_err(path: &Path) -> String {
    match open_image(path, &OpenOptions::default()) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(x) = src {
                s.push_str(": ");
                s.push_str(&x.to_string());
                src = x.source();
            }
            s
        }
    }
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[test]
fn truncated_and_past_eof_tables_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(
        dir.path(),
        "t.qcow2",
        &CreateOptions {
            size: 1 << 30,
            ..Default::default()
        },
    );
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(70_000).unwrap();
    assert!(open_err(&p).contains("past the end of the file"));
    f.set_len(40).unwrap();
    assert!(open_err(&p).contains("qcow2"), "{}", open_err(&p));
}

#[test]
fn l2_entry_past_eof_fails_the_read_not_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let p = create_mib(dir.path(), "e.qcow2");
    let mut img = open_rw(&p);
    img.write_at(&[1u8; 512], 0).unwrap();
    img.flush().unwrap();
    let (table, _) = img.geo.decode_l1(img.l1[0]).unwrap();
    drop(img);
    patch(&p, table, &((1u64 << 40) | COPIED).to_be_bytes());
    let mut img = open_image(&p, &OpenOptions::default()).unwrap();
    let mut buf = [0u8; 512];
    let err = img.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(err.contains("past the end"), "{err}");
}

#[test]
fn cyclic_and_missing_backing_chains_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let opts = |b: &str| CreateOptions {
        size: 1 << 20,
        backing_file: Some(b.into()),
        ..Default::default()
    };
    let a = create(dir.path(), "a.qcow2", &opts("b.qcow2"));
    create(dir.path(), "b.qcow2", &opts("a.qcow2"));
    assert!(open_err(&a).contains("loop"), "{}", open_err(&a));
    let selfref = create(dir.path(), "s.qcow2", &opts("s.qcow2"));
    assert!(open_err(&selfref).contains("loop"));
    let missing = create(dir.path(), "m.qcow2", &opts("nope.qcow2"));
    assert!(open_err(&missing).contains("cannot open backing file"));
}

#[test]
fn corrupt_bit_allows_read_only_open_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = create_mib(dir.path(), "c.qcow2");
    patch(&p, 72, &header::incompat::CORRUPT.to_be_bytes());
    assert!(open_err(&p).contains("marked corrupt"));
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    assert!(open_image(&p, &ro).is_ok());
}

#[test]
fn dirty_image_gets_its_refcounts_rebuilt_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(
        dir.path(),
        "d.qcow2",
        &CreateOptions {
            size: 1 << 20,
            lazy_refcounts: true,
            ..Default::default()
        },
    );
    let mut img = open_rw(&p);
    img.write_at(&[3u8; 100_000], 0).unwrap();
    img.flush().unwrap();
    // Simulate lazy refcounts: zero the data clusters' refcounts, set the dirty bit.
    let L2Entry::Normal { offset, .. } = img.lookup(0).unwrap() else {
        panic!()
    };
    img.change_refcount(offset, -1).unwrap();
    img.flush().unwrap();
    drop(img);
    patch(&p, 72, &header::incompat::DIRTY.to_be_bytes());
    let mut img = open_rw(&p);
    assert_eq!(
        img.header().incompatible_features & header::incompat::DIRTY,
        0
    );
    assert_clean(&mut img);
}

#[test]
fn random_garbage_never_panics_the_opener() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(
        dir.path(),
        "g.qcow2",
        &CreateOptions {
            size: 16 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
    );
    let mut img = open_rw(&p);
    img.write_at(&[9u8; 300_000], 0).unwrap();
    drop(img);
    let pristine = std::fs::read(&p).unwrap();
    let mut rng = Rng::new(77);
    for _ in 0..300 {
        let mut bytes = pristine.clone();
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(bytes.len().min(20_000) as u64) as usize;
            bytes[at] = rng.next() as u8;
        }
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(mut img) = open_image(
            &p,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        ) {
            let mut buf = vec![0u8; 65536];
            for off in [0u64, 4096, 200_000, (16 << 20) - 65536] {
                let _ = img.read_at(&mut buf, off);
            }
            let _ = img.extent(0, 16 << 20);
        }
    }
}

#[test]
fn absurd_offsets_in_tables_do_not_overflow_the_check() {
    // Found by the qcow2_image fuzz target: a refcount table entry near u64::MAX.
    let dir = tempfile::tempdir().unwrap();
    let p = create_mib(dir.path(), "o.qcow2");
    let img = open_rw(&p);
    let rt = img.header().refcount_table_offset;
    drop(img);
    patch(&p, rt + 8, &0xffff_ffff_ffff_0000u64.to_be_bytes());
    let file = HostFile::open(&p, true, CacheMode::Writeback).unwrap();
    let mut img = Qcow2Image::from_file(file, &p, true).unwrap();
    let r = img.check(Repair::None).unwrap();
    assert_eq!(r.corruptions, 1, "{:?}", r.messages);
    assert!(r.messages[0].contains("refcount block at 0xffffffffffff0000"));
}
