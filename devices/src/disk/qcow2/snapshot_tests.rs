//! Internal snapshot tests: create/apply/delete against a byte model at several cluster
//! sizes and refcount widths, every step verified by the engine's own check.

use std::path::{Path, PathBuf};

use super::check::Repair;
use super::tests::Rng;
use super::*;
use crate::disk::{DiskImage, OpenOptions};

fn create(dir: &Path, name: &str, opts: &CreateOptions) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    Qcow2Image::create(&HostFile::from_file(file), opts).unwrap();
    path
}

fn open_rw(path: &Path) -> Qcow2Image {
    let opts = OpenOptions {
        format: Some(ImageFormat::Qcow2),
        ..Default::default()
    };
    Qcow2Image::open(path, &opts).unwrap()
}

fn assert_clean(img: &mut Qcow2Image, when: &str) {
    let r = img.check(Repair::None).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks),
        (0, 0),
        "{when}: {:#?}",
        r.messages
    );
}

fn read_all(img: &mut Qcow2Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

/// Random writes, zeroes, discards and compressed clusters, mirrored in `model`.
fn scribble(img: &mut Qcow2Image, model: &mut [u8], rng: &mut Rng, ops: usize) {
    let cs = img.cluster_size();
    let size = model.len() as u64;
    for _ in 0..ops {
        let len = 1 + rng.below(3 * cs) as usize;
        let off = rng.below(size - len as u64);
        match rng.below(10) {
            0 => {
                img.write_zeroes(off, len as u64, rng.below(2) == 0)
                    .unwrap();
                model[off as usize..off as usize + len].fill(0);
            }
            1 => {
                let guest = rng.below(size / cs) * cs;
                let data: Vec<u8> = (0..cs)
                    .map(|i| (i / 5) as u8 ^ rng.next() as u8 & 1)
                    .collect();
                img.write_compressed(guest, &data).unwrap();
                model[guest as usize..(guest + cs) as usize].copy_from_slice(&data);
            }
            _ => {
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                img.write_at(&data, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
        }
    }
}

#[test]
fn snapshots_round_trip_against_a_model_at_every_geometry() {
    let dir = tempfile::tempdir().unwrap();
    for (version, cluster_bits, refcount_bits) in [
        (3, 9, 16),
        (3, 12, 64),
        (3, 16, 16),
        (3, 16, 4),
        (2, 16, 16),
    ] {
        let name = format!("v{version}-c{cluster_bits}-r{refcount_bits}.qcow2");
        let opts = CreateOptions {
            size: 4 << 20,
            cluster_size: 1 << cluster_bits,
            refcount_bits,
            version,
            ..Default::default()
        };
        let p = create(dir.path(), &name, &opts);
        let mut img = open_rw(&p);
        let mut rng = Rng::new(u64::from(cluster_bits * 7 + refcount_bits));
        let mut model = vec![0u8; 4 << 20];
        scribble(&mut img, &mut model, &mut rng, 30);
        let a = img.snapshot_create("a", SnapshotMeta::default()).unwrap();
        let model_a = model.clone();
        assert_clean(&mut img, &format!("{name} after create a"));
        scribble(&mut img, &mut model, &mut rng, 30);
        img.snapshot_create("b", SnapshotMeta::default()).unwrap();
        let model_b = model.clone();
        scribble(&mut img, &mut model, &mut rng, 30);
        assert_clean(&mut img, &format!("{name} before apply"));

        img.snapshot_apply(&a.id).unwrap();
        assert!(read_all(&mut img) == model_a, "{name}: apply a");
        assert_clean(&mut img, &format!("{name} after apply a"));
        scribble(&mut img, &mut model, &mut rng, 20);
        img.snapshot_apply("b").unwrap();
        assert!(read_all(&mut img) == model_b, "{name}: apply b");
        img.snapshot_delete("a").unwrap();
        assert_clean(&mut img, &format!("{name} after delete a"));
        drop(img);

        let mut img = open_rw(&p);
        assert!(read_all(&mut img) == model_b, "{name}: reopened");
        let mut model = model_b;
        scribble(&mut img, &mut model, &mut rng, 20);
        img.snapshot_delete("b").unwrap();
        assert!(
            read_all(&mut img) == model,
            "{name}: after deleting the last"
        );
        assert_eq!(img.header().nb_snapshots, 0);
        assert_eq!(img.header().snapshots_offset, 0);
        assert_clean(&mut img, &format!("{name} after deleting the last"));
    }
}

#[test]
fn create_clears_copied_flags_and_delete_sets_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(
        dir.path(),
        "f.qcow2",
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    );
    let mut img = open_rw(&p);
    img.write_at(&[7u8; 4096], 0).unwrap();
    let copied = |img: &mut Qcow2Image| match img.map_entry(0).unwrap().0 {
        L2Entry::Normal { copied, .. } => copied && img.l1[0] & COPIED != 0,
        other => panic!("unexpected {other:?}"),
    };
    assert!(copied(&mut img));
    img.snapshot_create("s", SnapshotMeta::default()).unwrap();
    assert!(!copied(&mut img));
    img.snapshot_delete("s").unwrap();
    assert!(copied(&mut img));
    assert_clean(&mut img, "after delete");
}

#[test]
fn writes_after_a_snapshot_leave_the_snapshot_alone() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(
        dir.path(),
        "w.qcow2",
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    );
    let mut img = open_rw(&p);
    img.write_at(&[1u8; 70000], 0).unwrap();
    img.snapshot_create("s", SnapshotMeta::default()).unwrap();
    // Fill the caches, then overwrite in place-looking ways.
    img.write_at(&[2u8; 100], 10).unwrap();
    img.write_zeroes(65536, 65536, true).unwrap();
    img.discard(0, 65536).unwrap();
    img.snapshot_apply("s").unwrap();
    let back = read_all(&mut img);
    assert!(back[..70000].iter().all(|b| *b == 1) && back[70000..].iter().all(|b| *b == 0));
    assert_clean(&mut img, "after apply");
}

#[test]
fn apply_restores_the_disk_size_of_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(
        dir.path(),
        "r.qcow2",
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    );
    let mut img = open_rw(&p);
    img.write_at(&[3u8; 512], 0).unwrap();
    img.snapshot_create("small", SnapshotMeta::default())
        .unwrap();
    img.resize(1 << 30).unwrap();
    img.write_at(&[4u8; 512], 900 << 20).unwrap();
    img.snapshot_create("big", SnapshotMeta::default()).unwrap();
    img.snapshot_apply("small").unwrap();
    assert_eq!(img.size(), 1 << 20);
    assert_clean(&mut img, "after shrinking apply");
    drop(img);
    let mut img = open_rw(&p);
    assert_eq!(img.size(), 1 << 20);
    img.snapshot_apply("big").unwrap();
    assert_eq!(img.size(), 1 << 30);
    let mut buf = [0u8; 512];
    img.read_at(&mut buf, 900 << 20).unwrap();
    assert_eq!(buf, [4u8; 512]);
    assert_clean(&mut img, "after growing apply");
}

#[test]
fn the_snapshot_table_grows_over_many_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions {
        size: 1 << 20,
        cluster_size: 512,
        ..Default::default()
    };
    let p = create(dir.path(), "t.qcow2", &opts);
    let mut img = open_rw(&p);
    for i in 0..40u8 {
        img.write_at(&[i; 600], u64::from(i) * 1000).unwrap();
        let name = format!("snapshot number {i} with a name long enough to need room");
        let s = img.snapshot_create(&name, SnapshotMeta::default()).unwrap();
        assert_eq!(s.id, (u32::from(i) + 1).to_string());
    }
    assert!(img.snapshot_table_len().unwrap() > 4 * 512);
    assert_clean(&mut img, "40 snapshots");
    img.snapshot_apply("7").unwrap();
    let mut buf = [0u8; 600];
    img.read_at(&mut buf, 6000).unwrap();
    assert_eq!(buf, [6u8; 600]);
    let list = img.snapshots().unwrap();
    assert_eq!(list.len(), 40);
    assert_eq!(
        list[39].name,
        "snapshot number 39 with a name long enough to need room"
    );
    assert_eq!(list[0].disk_size, Some(1 << 20));
    assert_clean(&mut img, "after apply");
}

#[test]
fn refcount_overflow_is_refused_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions {
        size: 1 << 20,
        refcount_bits: 1,
        ..Default::default()
    };
    let p = create(dir.path(), "one.qcow2", &opts);
    let mut img = open_rw(&p);
    img.write_at(&[9u8; 100], 0).unwrap();
    let len = img.file_len();
    let err = img
        .snapshot_create("s", SnapshotMeta::default())
        .unwrap_err();
    assert!(err.to_string().contains("refcount"), "{err}");
    assert_eq!(img.header().nb_snapshots, 0);
    assert_eq!(img.file_len(), len);
    assert_clean(&mut img, "after the refused snapshot");
    img.write_at(&[8u8; 100], 0).unwrap();
}

#[test]
fn unknown_snapshots_and_read_only_images_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(
        dir.path(),
        "u.qcow2",
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    );
    let mut img = open_rw(&p);
    img.snapshot_create("s", SnapshotMeta::default()).unwrap();
    assert!(matches!(
        img.snapshot_apply("nope"),
        Err(DiskError::Qcow2(QcowError::NoSnapshot(_)))
    ));
    // Deletion goes by name only, as qemu-img's.
    assert!(img.snapshot_delete("1").is_err());
    assert!(img
        .snapshot_create(&"x".repeat(256), SnapshotMeta::default())
        .is_err());
    drop(img);
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let mut img = Qcow2Image::open(&p, &ro).unwrap();
    assert!(matches!(img.snapshot_apply("s"), Err(DiskError::ReadOnly)));
    assert_eq!(img.snapshot_list().unwrap().len(), 1);
}

#[test]
fn raw_images_say_snapshots_are_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.raw");
    std::fs::write(&p, vec![0u8; 4096]).unwrap();
    let opts = OpenOptions {
        format: Some(ImageFormat::Raw),
        ..Default::default()
    };
    let mut img: Box<dyn DiskImage> = crate::disk::open_image(&p, &opts).unwrap();
    let err = img
        .snapshot_create("s", SnapshotMeta::default())
        .unwrap_err();
    assert!(
        matches!(err, DiskError::Unsupported { format: "raw", .. }),
        "{err}"
    );
    assert!(img.snapshot_list().is_err());
}

#[test]
fn a_snapshot_l1_past_the_end_of_the_file_is_an_error_not_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(
        dir.path(),
        "h.qcow2",
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    );
    let mut img = open_rw(&p);
    img.write_at(&[5u8; 10], 0).unwrap();
    img.snapshot_create("s", SnapshotMeta::default()).unwrap();
    let table = img.header().snapshots_offset;
    drop(img);
    // Point the snapshot's L1 table far past the end of the file.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, &(1u64 << 40).to_be_bytes(), table).unwrap();
    let mut img = open_rw(&p);
    assert!(img.snapshot_apply("s").is_err());
    assert!(img.snapshot_delete("s").is_err());
    let mut buf = [0u8; 10];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [5u8; 10]);
}

#[test]
fn the_table_keeps_unknown_extra_data_and_reads_entries_without_any() {
    let old = Snapshot {
        l1_table_offset: 0x30000,
        l1_size: 1,
        id: "4".into(),
        name: "old".into(),
        date_sec: 5,
        date_nsec: 6,
        vm_clock_nsec: 7,
        vm_state_size: 8,
        disk_size: Some(1 << 20),
        icount: None,
        unknown_extra: vec![1, 2, 3, 4, 5, 6, 7, 8],
        raw_strings: None,
    };
    let bytes = snapshot::serialize_table(std::slice::from_ref(&old), 0);
    let (back, len) = snapshot::parse_table(&bytes, 1, 65536).unwrap();
    assert_eq!(back, vec![old]);
    assert_eq!(len, bytes.len() as u64);
    // A v2-era entry: 40 fixed bytes, no extra data, then ID and name.
    let mut v2 = vec![0u8; 40];
    v2[..8].copy_from_slice(&0x50000u64.to_be_bytes());
    v2[12..14].copy_from_slice(&1u16.to_be_bytes());
    v2[14..16].copy_from_slice(&2u16.to_be_bytes());
    v2[32..36].copy_from_slice(&77u32.to_be_bytes());
    v2.extend_from_slice(b"1ab");
    let (back, _) = snapshot::parse_table(&v2, 1, 65536).unwrap();
    assert_eq!((back[0].vm_state_size, back[0].disk_size), (77, None));
    assert_eq!(
        (back[0].id.as_str(), back[0].name.as_str(), back[0].icount),
        ("1", "ab", None)
    );
    // A name that is not UTF-8 survives a rewrite byte for byte.
    let mut latin = v2.clone();
    latin[42] = 0xe9;
    let (back, _) = snapshot::parse_table(&latin, 1, 65536).unwrap();
    assert_eq!(back[0].name, "a\u{fffd}");
    let again = snapshot::serialize_table(&back, 0);
    let (back2, _) = snapshot::parse_table(&again, 1, 65536).unwrap();
    assert_eq!(
        back2[0].raw_strings,
        Some((b"1".to_vec(), b"a\xe9".to_vec()))
    );
}

#[test]
fn caches_forget_clusters_that_apply_freed() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(
        dir.path(),
        "c.qcow2",
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    );
    let mut img = open_rw(&p);
    img.snapshot_create("empty", SnapshotMeta::default())
        .unwrap();
    let a: Vec<u8> = (0..65536u32).map(|i| (i / 3) as u8).collect();
    img.write_compressed(0, &a).unwrap();
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 0).unwrap();
    // Applying frees the compressed cluster and the L2 table holding it.
    img.snapshot_apply("empty").unwrap();
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|b| *b == 0), "stale data after apply");
    // The freed clusters get reused: nothing may still point into them.
    let data = vec![0x5au8; 3 * 65536];
    img.write_at(&data, 128 << 10).unwrap();
    let b: Vec<u8> = (0..65536u32).map(|i| (i / 11) as u8).collect();
    img.write_compressed(65536, &b).unwrap();
    let mut back = vec![0u8; 5 * 65536];
    img.read_at(&mut back, 0).unwrap();
    assert!(back[..65536].iter().all(|x| *x == 0));
    assert!(back[65536..131072] == b[..]);
    assert!(back[131072..] == data[..]);
    assert_clean(&mut img, "after reuse");
}
