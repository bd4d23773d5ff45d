//! qcow2 interop with the peer, qemu-img (and qemu-io to write through qemu): images qemu
//! makes read back byte-identically through Ember's engine; images Ember writes pass
//! `qemu-img check` with no errors and no leaks and hold exactly the expected content.
//! Needs qemu-img and qemu-io (Debian's qemu-utils); no /dev/kvm.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use devices::disk::qcow2::CreateOptions;
use devices::disk::{self, DiskImage, HostFile, ImageFormat, OpenOptions, Qcow2Image};

fn qemu_img(args: &[&str]) -> std::process::Output {
    tool_ok("qemu-img", args)
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img.to_str().unwrap());
    tool_ok("qemu-io", &args);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Flattens `img` with both tools and asserts the raw results are identical.
fn assert_reads_like_qemu(img: &Path, dir: &Path) {
    let ours = dir.join("ours.raw");
    let theirs = dir.join("theirs.raw");
    let _ = std::fs::remove_file(&ours);
    let _ = std::fs::remove_file(&theirs);
    ember_img_ok(&["convert", "-O", "raw", s(img), s(&ours)]);
    qemu_img(&["convert", "-O", "raw", s(img), s(&theirs)]);
    let (a, b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    assert_eq!(a.len(), b.len(), "{}: sizes differ", img.display());
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("{}: first difference at byte {i:#x}", img.display());
    }
}

const WRITES: &[&str] = &[
    "write -P 0x11 0 128k",
    "write -P 0x22 300k 5k",
    "write -P 0x33 1M 1M",
    "write -z 1200k 64k",
    "discard 1600k 128k",
    "write -P 0x44 4095k 3k",
    "write -P 0x55 9M 700k",
];

#[test]
fn qemu_made_images_read_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for compat in ["0.10", "1.1"] {
        for cluster in ["512", "4k", "64k", "2M"] {
            for refbits in ["1", "16", "64"] {
                if compat == "0.10" && refbits != "16" {
                    continue;
                }
                for prealloc in ["off", "metadata", "falloc", "full"] {
                    if prealloc != "off" && (cluster == "512" || refbits == "1") {
                        continue;
                    }
                    let img = dir.path().join(format!("q{n}.qcow2"));
                    n += 1;
                    let opts = format!(
                        "compat={compat},cluster_size={cluster},refcount_bits={refbits},preallocation={prealloc}"
                    );
                    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&img), "12M"]);
                    qemu_io(&img, "qcow2", WRITES);
                    assert_reads_like_qemu(&img, dir.path());
                    let check = ember().args(["img", "check", s(&img)]).output().unwrap();
                    assert_eq!(
                        check.status.code(),
                        Some(0),
                        "{opts}: ember img check: {}{}",
                        String::from_utf8_lossy(&check.stdout),
                        String::from_utf8_lossy(&check.stderr)
                    );
                }
            }
        }
    }
    assert!(n > 20);
}

#[test]
fn compressed_images_read_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "6M"]);
    qemu_io(
        &raw,
        "raw",
        WRITES
            .iter()
            .take(4)
            .copied()
            .collect::<Vec<_>>()
            .as_slice(),
    );
    for (i, extra) in [
        "compression_type=zlib",
        "compression_type=zstd",
        "compression_type=zlib,cluster_size=4k",
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("c{i}.qcow2"));
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            extra,
            s(&raw),
            s(&img),
        ]);
        assert_reads_like_qemu(&img, dir.path());
    }
    // And our own compressed output reads back in qemu.
    let ours = dir.path().join("ours-c.qcow2");
    ember_img_ok(&["convert", "-c", "-O", "qcow2", s(&raw), s(&ours)]);
    assert_qemu_img_clean(&ours);
    qemu_img(&["compare", s(&raw), s(&ours)]);
}

#[test]
fn images_with_internal_snapshots_read_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    qemu_io(&img, "qcow2", &["write -P 0x61 0 1M"]);
    qemu_img(&["snapshot", "-c", "one", s(&img)]);
    qemu_io(&img, "qcow2", &["write -P 0x62 512k 1M"]);
    qemu_img(&["snapshot", "-c", "two", s(&img)]);
    assert_reads_like_qemu(&img, dir.path());
    let info = ember_img_ok(&["info", s(&img)]);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("one") && text.contains("two"), "{text}");
}

#[test]
fn backing_chains_of_raw_and_qcow2_flatten_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "8M"]);
    qemu_io(&base, "raw", &["write -P 0x01 0 4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
        "10M",
    ]);
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0x02 1M 1M",
            "write -z 2M 64k",
            "write -P 0x03 9M 64k",
        ],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(&top, "qcow2", &["write -P 0x04 1536k 4k", "discard 3M 1M"]);
    assert_reads_like_qemu(&top, dir.path());
    // The chain seen through map: where each range comes from.
    let ours = ember_img_ok(&["map", "--output=json", s(&top)]);
    let theirs = qemu_img(&["map", "--output=json", s(&top)]);
    let depths = |o: &std::process::Output| -> Vec<(u64, u64, u64)> {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let mut out = Vec::new();
        for e in v.as_array().unwrap() {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            let depth = e["depth"].as_u64().unwrap();
            // Compare at 64 KiB granularity (tools may split ranges differently).
            let mut at = start;
            while at < start + len {
                out.push((at, 65536.min(start + len - at), depth));
                at += 65536;
            }
        }
        out
    };
    let (a, b) = (depths(&ours), depths(&theirs));
    let a_depth: Vec<_> = a.iter().map(|(s, _, d)| (*s, *d)).collect();
    let b_depth: Vec<_> = b.iter().map(|(s, _, d)| (*s, *d)).collect();
    assert_eq!(a_depth, b_depth, "map depths differ");
}

/// Random engine operations against a byte model; returns the model.
fn random_engine_writes(img: &mut dyn DiskImage, seed: u64, ops: usize) -> Vec<u8> {
    let size = img.size() as usize;
    let mut model = vec![0u8; size];
    img.read_at(&mut model, 0).unwrap();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..ops {
        let len = 1 + (next() % 200_000) as usize;
        let off = (next() % (size - len) as u64) as usize;
        match next() % 8 {
            0 => {
                img.write_zeroes(off as u64, len as u64, next() % 2 == 0)
                    .unwrap();
                model[off..off + len].fill(0);
            }
            1 => {
                img.discard(off as u64, len as u64).unwrap();
                let mut now = vec![0u8; len];
                img.read_at(&mut now, off as u64).unwrap();
                model[off..off + len].copy_from_slice(&now);
            }
            2 => img.flush().unwrap(),
            _ => {
                let b = next() as u8;
                let data: Vec<u8> = (0..len).map(|i| b ^ (i as u8)).collect();
                img.write_at(&data, off as u64).unwrap();
                model[off..off + len].copy_from_slice(&data);
            }
        }
    }
    img.flush().unwrap();
    model
}

fn create_ours(path: &Path, opts: &CreateOptions) {
    let f = std::fs::File::create(path).unwrap();
    Qcow2Image::create(&HostFile::from_file(f), opts).unwrap();
}

fn open_rw(path: &Path) -> Box<dyn DiskImage> {
    disk::open_image(
        path,
        &OpenOptions {
            format: Some(ImageFormat::Qcow2),
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn images_our_engine_writes_pass_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    for (seed, (version, cluster, refbits)) in [
        (3, 65536, 16),
        (3, 4096, 1),
        (3, 512, 64),
        (2, 65536, 16),
        (3, 2 << 20, 8),
        (3, 16384, 32),
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.path().join(format!("e{seed}.qcow2"));
        create_ours(
            &img,
            &CreateOptions {
                size: 16 << 20,
                cluster_size: cluster,
                refcount_bits: refbits,
                version,
                ..Default::default()
            },
        );
        let model = random_engine_writes(open_rw(&img).as_mut(), seed as u64, 150);
        assert_qemu_img_clean(&img);
        let expect = dir.path().join("expect.raw");
        std::fs::write(&expect, &model).unwrap();
        qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&expect)]);
    }
}

#[test]
fn overlay_writes_over_qemu_base_pass_check_and_leave_the_base_alone() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "16M"]);
    qemu_io(&base, "qcow2", &["write -P 0x77 0 16M"]);
    let before = std::fs::read(&base).unwrap();
    let top = dir.path().join("top.qcow2");
    ember_overlay(s(&top), "base.qcow2", "qcow2");
    let model = random_engine_writes(open_rw(&top).as_mut(), 42, 150);
    assert_qemu_img_clean(&top);
    assert_eq!(std::fs::read(&base).unwrap(), before);
    let expect = dir.path().join("expect.raw");
    std::fs::write(&expect, &model).unwrap();
    qemu_img(&["compare", "-F", "raw", s(&top), s(&expect)]);
}

#[test]
fn writes_to_an_image_with_snapshots_keep_the_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&img),
        "8M",
    ]);
    qemu_io(&img, "qcow2", &["write -P 0x21 0 8M"]);
    let at_snapshot = dir.path().join("at-snapshot.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&at_snapshot)]);
    qemu_img(&["snapshot", "-c", "keep", s(&img)]);
    let model = random_engine_writes(open_rw(&img).as_mut(), 7, 120);
    assert_qemu_img_clean(&img);
    let expect = dir.path().join("expect.raw");
    std::fs::write(&expect, &model).unwrap();
    qemu_img(&["compare", "-F", "raw", s(&img), s(&expect)]);
    // Going back to the snapshot shows the old content.
    qemu_img(&["snapshot", "-a", "keep", s(&img)]);
    qemu_img(&["compare", "-F", "raw", s(&img), s(&at_snapshot)]);
    assert_qemu_img_clean(&img);
}

#[test]
fn resize_rebase_and_commit_leave_consistent_images() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    // resize
    ember_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&p("r.qcow2")),
        "1M",
    ]);
    qemu_io(&p("r.qcow2"), "qcow2", &["write -P 0x09 0 1M"]);
    ember_img_ok(&["resize", s(&p("r.qcow2")), "+600M"]);
    assert_qemu_img_clean(&p("r.qcow2"));
    let info = qemu_img(&["info", "--output=json", s(&p("r.qcow2"))]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some((1 << 20) + (600 << 20)));
    qemu_io(
        &p("r.qcow2"),
        "qcow2",
        &["read -P 0x09 0 1M", "read -P 0 1M 4k"],
    );

    // rebase (safe): content through the chain does not change
    qemu_img(&["create", "-q", "-f", "raw", s(&p("b1.raw")), "4M"]);
    qemu_io(&p("b1.raw"), "raw", &["write -P 0x0a 0 4M"]);
    qemu_img(&["create", "-q", "-f", "raw", s(&p("b2.raw")), "4M"]);
    qemu_io(&p("b2.raw"), "raw", &["write -P 0x0b 1M 1M"]);
    ember_overlay(s(&p("t.qcow2")), "b1.raw", "raw");
    qemu_io(&p("t.qcow2"), "qcow2", &["write -P 0x0c 2M 64k"]);
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        s(&p("t.qcow2")),
        s(&p("before.raw")),
    ]);
    ember_img_ok(&["rebase", "-b", "b2.raw", "-F", "raw", s(&p("t.qcow2"))]);
    assert_qemu_img_clean(&p("t.qcow2"));
    qemu_img(&[
        "compare",
        "-F",
        "raw",
        s(&p("t.qcow2")),
        s(&p("before.raw")),
    ]);
    let info = qemu_img(&["info", "--output=json", s(&p("t.qcow2"))]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["backing-filename"].as_str(), Some("b2.raw"));

    // rebase -u only rewrites the header
    ember_img_ok(&[
        "rebase",
        "-u",
        "-b",
        "b1.raw",
        "-F",
        "raw",
        s(&p("t.qcow2")),
    ]);
    assert_qemu_img_clean(&p("t.qcow2"));

    // commit: the base gets the overlay's data, the overlay is emptied
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p("cb.qcow2")), "4M"]);
    qemu_io(&p("cb.qcow2"), "qcow2", &["write -P 0x0d 0 4M"]);
    ember_overlay(s(&p("ct.qcow2")), "cb.qcow2", "qcow2");
    qemu_io(
        &p("ct.qcow2"),
        "qcow2",
        &["write -P 0x0e 1M 100k", "write -z 3M 64k"],
    );
    qemu_img(&["convert", "-O", "raw", s(&p("ct.qcow2")), s(&p("flat.raw"))]);
    ember_img_ok(&["commit", s(&p("ct.qcow2"))]);
    assert_qemu_img_clean(&p("cb.qcow2"));
    assert_qemu_img_clean(&p("ct.qcow2"));
    qemu_img(&["compare", "-F", "raw", s(&p("cb.qcow2")), s(&p("flat.raw"))]);
    qemu_img(&["compare", "-F", "raw", s(&p("ct.qcow2")), s(&p("flat.raw"))]);
    let map = qemu_img(&["map", "--output=json", s(&p("ct.qcow2"))]);
    let v: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|e| e["depth"].as_u64() != Some(0)),
        "the overlay still holds data after commit: {v}"
    );
}

#[test]
fn info_check_and_map_output_use_qemu_img_keys() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("k.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_io(&img, "qcow2", &["write -P 1 0 64k"]);
    for verb in [
        &["info", "--output=json"][..],
        &["check", "--output=json"][..],
    ] {
        let mut a = verb.to_vec();
        a.push(s(&img));
        let ours: serde_json::Value = serde_json::from_slice(&ember_img_ok(&a).stdout).unwrap();
        let theirs: serde_json::Value = serde_json::from_slice(&qemu_img(&a).stdout).unwrap();
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&ours), keys(&theirs), "{verb:?}");
        for k in [
            "virtual-size",
            "cluster-size",
            "format",
            "image-end-offset",
            "total-clusters",
        ] {
            if theirs.get(k).is_some() {
                assert_eq!(ours[k], theirs[k], "{verb:?} {k}");
            }
        }
    }
    let ours = ember_img_ok(&["map", s(&img)]);
    let theirs = qemu_img(&["map", s(&img)]);
    assert_eq!(ours.stdout, theirs.stdout);
}

#[test]
fn hostile_files_are_clear_errors_from_ember_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("h.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1G"]);
    // Truncate into the L1 table.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(70_000).unwrap();
    drop(f);
    for verb in ["info", "check", "map"] {
        let out = ember()
            .args(["img", verb, "-f", "qcow2", s(&img)])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{verb} accepted a truncated image");
        assert_eq!(err.lines().count(), 1, "{verb}: {err}");
        assert!(err.contains("past the end of the file"), "{verb}: {err}");
    }
}

// ---- internal snapshots, both ways ------------------------------------------------------

/// `TOOL snapshot ARGS FILE` with TOOL "ember" or "qemu-img", asserted to succeed.
fn snapshot(tool_name: &str, args: &[&str], img: &Path) {
    let mut all = vec!["snapshot"];
    all.extend_from_slice(args);
    all.push(s(img));
    if tool_name == "ember" {
        ember_img_ok(&all);
    } else {
        qemu_img(&all);
    }
}

/// Both tools list the same snapshots, byte for byte.
fn assert_lists_agree(img: &Path) {
    let ours = ember_img_ok(&["snapshot", "-l", s(img)]).stdout;
    let theirs = qemu_img(&["snapshot", "-l", s(img)]).stdout;
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&theirs),
        "{}",
        img.display()
    );
}

/// The image's current content as raw bytes, flattened by qemu-img.
fn flat(img: &Path, out: &Path) {
    let _ = std::fs::remove_file(out);
    qemu_img(&["convert", "-O", "raw", s(img), s(out)]);
}

fn assert_same_as(img: &Path, raw: &Path) {
    qemu_img(&["compare", "-F", "raw", s(img), s(raw)]);
}

#[test]
fn snapshots_made_by_either_tool_apply_under_the_other() {
    let dir = tempfile::tempdir().unwrap();
    for (n, opts) in [
        "compat=1.1,cluster_size=64k",
        "compat=1.1,cluster_size=512,refcount_bits=64",
        "compat=0.10,cluster_size=4k",
        "compat=1.1,cluster_size=2M,refcount_bits=8",
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("x{n}.qcow2"));
        let (at_q, at_e) = (dir.path().join("q.raw"), dir.path().join("e.raw"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&img), "12M"]);
        qemu_io(&img, "qcow2", WRITES);
        // A compressed cluster too.
        qemu_io(&img, "qcow2", &["write -c -P 0x66 6M 2M"]);
        flat(&img, &at_q);
        snapshot("qemu-img", &["-c", "by-qemu"], &img);
        random_engine_writes(open_rw(&img).as_mut(), n as u64, 60);
        flat(&img, &at_e);
        snapshot("ember", &["-c", "by-ember"], &img);
        assert_qemu_img_clean(&img);
        assert_lists_agree(&img);
        qemu_io(&img, "qcow2", &["write -P 0x99 0 3M", "write -z 8M 1M"]);

        snapshot("ember", &["-a", "by-qemu"], &img);
        assert_qemu_img_clean(&img);
        assert_same_as(&img, &at_q);
        snapshot("qemu-img", &["-a", "by-ember"], &img);
        assert_qemu_img_clean(&img);
        assert_same_as(&img, &at_e);
        snapshot("ember", &["-a", "1"], &img); // by ID
        assert_same_as(&img, &at_q);
        assert_reads_like_qemu(&img, dir.path());

        snapshot("ember", &["-d", "by-ember"], &img);
        assert_qemu_img_clean(&img);
        assert_lists_agree(&img);
        snapshot("qemu-img", &["-a", "by-qemu"], &img);
        snapshot("qemu-img", &["-d", "by-qemu"], &img);
        assert_qemu_img_clean(&img);
        assert_same_as(&img, &at_q);
        let list = ember_img_ok(&["snapshot", "-l", s(&img)]).stdout;
        assert!(list.is_empty(), "{}", String::from_utf8_lossy(&list));
    }
}

#[test]
fn sixteen_snapshots_at_several_cluster_sizes_and_refcount_widths() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in ["512", "64k", "2M"] {
        for refbits in ["16", "64"] {
            let img = dir.path().join(format!("m-{cluster}-{refbits}.qcow2"));
            let opts = format!("cluster_size={cluster},refcount_bits={refbits}");
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&img), "8M"]);
            for i in 0..16u32 {
                let cmd = format!("write -P {} {}k 600k", i + 1, i * 300);
                qemu_io(&img, "qcow2", &[cmd.as_str()]);
                let tool_name = if i % 2 == 0 { "ember" } else { "qemu-img" };
                snapshot(tool_name, &["-c", &format!("s{i}")], &img);
            }
            assert_qemu_img_clean(&img);
            assert_lists_agree(&img);
            for i in [3u32, 15, 0, 8] {
                let tool_name = if i % 2 == 0 { "qemu-img" } else { "ember" };
                snapshot(tool_name, &["-a", &format!("s{i}")], &img);
                let check = format!("read -P {} {}k 600k", i + 1, i * 300);
                let out = tool_ok("qemu-io", &["-f", "qcow2", "-c", &check, s(&img)]);
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(!text.contains("fail"), "{cluster}/{refbits} s{i}: {text}");
                assert_qemu_img_clean(&img);
            }
            for i in (0..16u32).rev().step_by(3) {
                snapshot("ember", &["-d", &format!("s{i}")], &img);
            }
            assert_qemu_img_clean(&img);
            assert_lists_agree(&img);
        }
        // One-bit refcounts cannot count a second reference: refused, image untouched.
        let img = dir.path().join(format!("one-{cluster}.qcow2"));
        let opts = format!("cluster_size={cluster},refcount_bits=1");
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&img), "8M"]);
        qemu_io(&img, "qcow2", &["write -P 1 0 1M"]);
        let out = ember()
            .args(["img", "snapshot", "-c", "s", s(&img)])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("ember: Could not create snapshot 's': "),
            "{err}"
        );
        assert_qemu_img_clean(&img);
    }
}

#[test]
fn snapshots_of_an_overlay_keep_reading_through_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    qemu_io(&base, "qcow2", &["write -P 0x42 0 8M"]);
    let top = dir.path().join("top.qcow2");
    ember_overlay(s(&top), "base.qcow2", "qcow2");
    qemu_io(&top, "qcow2", &["write -P 0x43 1M 1M"]);
    let before = dir.path().join("before.raw");
    flat(&top, &before);
    snapshot("ember", &["-c", "s"], &top);
    qemu_io(&top, "qcow2", &["write -P 0x44 0 4M", "discard 6M 1M"]);
    snapshot("ember", &["-a", "s"], &top);
    assert_qemu_img_clean(&top);
    assert_same_as(&top, &before);
    assert_reads_like_qemu(&top, dir.path());
}

#[test]
fn applying_a_snapshot_restores_its_disk_size_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    qemu_io(&img, "qcow2", &["write -P 7 0 1M", "write -P 8 60M 1M"]);
    let at = dir.path().join("at.raw");
    flat(&img, &at);
    snapshot("ember", &["-c", "s"], &img);
    qemu_img(&["resize", s(&img), "128M"]);
    qemu_io(&img, "qcow2", &["write -P 9 100M 1M"]);
    snapshot("qemu-img", &["-c", "big"], &img);
    snapshot("ember", &["-a", "s"], &img);
    assert_qemu_img_clean(&img);
    assert_same_as(&img, &at);
    snapshot("qemu-img", &["-a", "big"], &img);
    snapshot("ember", &["-d", "big"], &img);
    qemu_img(&["resize", "--shrink", s(&img), "32M"]);
    snapshot("ember", &["-a", "s"], &img);
    assert_qemu_img_clean(&img);
    assert_same_as(&img, &at);
}

#[test]
fn snapshot_errors_match_qemu_img_messages_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("e.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    snapshot("ember", &["-c", "s"], &img);
    let run = |args: &[&str]| {
        let out = ember()
            .args(["img", "snapshot"])
            .args(args)
            .arg(&img)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(
        run(&["-a", "nope"]),
        (
            Some(1),
            "ember: Could not apply snapshot 'nope': Failed to load snapshot: No such file or \
             directory\n"
                .to_string()
        )
    );
    assert_eq!(
        run(&["-d", "nope"]),
        (
            Some(1),
            "ember: Could not delete snapshot 'nope': snapshot not found\n".to_string()
        )
    );
    // qemu-io holds the image open for writing while it waits for commands.
    let mut holder = std::process::Command::new("qemu-io")
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io is needed");
    common::wait_locked(
        s(&img),
        &mut holder,
        "qemu-io",
        std::time::Duration::from_secs(60),
    );
    let busy = run(&["-c", "t"]);
    let listing = run(&["-l"]);
    drop(holder.stdin.take());
    holder.wait().unwrap();
    let name = s(&img);
    assert_eq!(
        busy,
        (
            Some(1),
            format!(
                "ember: Could not open '{name}': Failed to get \"write\" lock\nIs another \
                 process using the image [{name}]?\n"
            )
        )
    );
    assert_eq!(listing.0, Some(1), "{}", listing.1);
    assert!(
        listing.1.contains("Failed to get shared \"write\" lock"),
        "{}",
        listing.1
    );
    assert_qemu_img_clean(&img);
}

#[test]
fn convert_stops_with_an_error_when_the_source_breaks_midway() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("cut.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    qemu_io(&img, "qcow2", &["write -P 1 0 8M", "write -P 2 40M 8M"]);
    // The second run of data clusters sits at the end of the file: cut it off.
    let len = std::fs::metadata(&img).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(len - (4 << 20)).unwrap();
    drop(f);
    let out_path = dir.path().join("out.raw");
    let out = ember()
        .args(["img", "convert", "-O", "raw", s(&img), s(&out_path)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("past the end of the file"), "{err}");
}

#[test]
fn convert_into_an_existing_raw_target_overwrites_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "24M"]);
    qemu_io(&img, "qcow2", WRITES);
    let target = dir.path().join("old.raw");
    std::fs::write(&target, vec![0xeeu8; 24 << 20]).unwrap();
    ember_img_ok(&["convert", "-n", "-O", "raw", s(&img), s(&target)]);
    qemu_img(&["compare", "-F", "raw", s(&img), s(&target)]);
}
