//! Crash safety: a writer process drives the qcow2 engine (writes, zero writes, discards,
//! flushes) and is killed with SIGKILL at random points. Afterwards `qemu-img check` finds
//! no corruption (leaks are allowed: an interrupted allocation may leak) and every write
//! the writer had flushed is there, read back by qemu-img. Needs qemu-img; no /dev/kvm.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devices::disk::qcow2::CreateOptions;
use devices::disk::{self, HostFile, ImageFormat, OpenOptions, Qcow2Image};

const SLOT: u64 = 4096;
const SLOTS: u64 = 2048; // 8 MiB disk

fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// What op `i` does: (slot, Some(fill byte) for a write, None for zeroing).
fn op(seed: u64, i: u64) -> (u64, Option<u8>) {
    let mut x = (seed << 32 | i).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let slot = next(&mut x) % SLOTS;
    let zero = next(&mut x).is_multiple_of(8);
    (slot, (!zero).then(|| (i % 251) as u8 + 1))
}

/// The writer: runs only when the parent test sets EMBER_CRASH_IMAGE.
#[test]
#[ignore = "the crash writer; run by crash_test_keeps_flushed_writes"]
fn crash_writer() {
    let Some(path) = std::env::var_os("EMBER_CRASH_IMAGE") else {
        return;
    };
    let seed: u64 = std::env::var("EMBER_CRASH_SEED").unwrap().parse().unwrap();
    let mut img = disk::open_image(
        Path::new(&path),
        &OpenOptions {
            format: Some(ImageFormat::Qcow2),
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0.. {
        let (slot, fill) = op(seed, i);
        match fill {
            Some(b) => img.write_at(&vec![b; SLOT as usize], slot * SLOT).unwrap(),
            None if i.is_multiple_of(2) => img.write_zeroes(slot * SLOT, SLOT, true).unwrap(),
            None => img.discard(slot * SLOT, SLOT).unwrap(),
        }
        if i % 16 == 15 {
            img.flush().unwrap();
            println!("FLUSHED {i}");
        }
    }
}

fn run_round(dir: &Path, seed: u64, opts: &CreateOptions, backing: Option<&Path>) {
    let img = dir.join(format!("crash{seed}.qcow2"));
    let f = std::fs::File::create(&img).unwrap();
    let mut create = opts.clone();
    if let Some(b) = backing {
        create.backing_file = Some(b.display().to_string());
        create.backing_format = Some("raw".into());
    }
    Qcow2Image::create(&HostFile::from_file(f), &create).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "crash_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("EMBER_CRASH_IMAGE", &img)
        .env("EMBER_CRASH_SEED", seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Kill after a seed-dependent number of flushes, mid-way to the next.
    let wanted = 3 + seed % 17;
    let mut flushed = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Some(Ok(line)) = lines.next() {
        if let Some(n) = line.strip_prefix("FLUSHED ") {
            let n: u64 = n.parse().unwrap();
            flushed = Some(n);
            if n / 16 + 1 >= wanted {
                std::thread::sleep(Duration::from_micros(300 * (seed % 7)));
                break;
            }
        }
        assert!(Instant::now() < deadline, "writer too slow");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The writer runs ahead of what was read: its last report is in the pipe.
    for line in lines.map_while(Result::ok) {
        if let Some(n) = line.strip_prefix("FLUSHED ") {
            flushed = Some(n.parse().unwrap());
        }
    }
    let flushed = flushed.expect("the writer flushed nothing");

    let check = Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .expect("qemu-img");
    let code = check.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "seed {seed}: corruption after the crash: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let flat = dir.join("flat.raw");
    let out = Command::new("qemu-img")
        .args([
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            flat.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let data = std::fs::read(&flat).unwrap();
    // Per slot, the contents it may hold: the state after the last flushed op, or after
    // any later op (it may have landed). A discard may leave the old data or zeros.
    let base_byte = |slot: u64| backing.map_or(0, |_| (slot % 200) as u8 + 1);
    let apply = |state: &Vec<u8>, i: u64| -> Vec<u8> {
        match op(seed, i).1 {
            Some(b) => vec![b],
            None if i.is_multiple_of(2) => vec![0],
            None => {
                let mut s = state.clone();
                s.push(0);
                s
            }
        }
    };
    let mut state: Vec<Vec<u8>> = (0..SLOTS).map(|s| vec![base_byte(s)]).collect();
    for i in 0..=flushed {
        let slot = op(seed, i).0 as usize;
        state[slot] = apply(&state[slot], i);
    }
    let mut ok = state.clone();
    for i in flushed + 1..flushed + 64 {
        let slot = op(seed, i).0 as usize;
        state[slot] = apply(&state[slot], i);
        ok[slot].extend(state[slot].iter().copied());
    }
    for s in 0..SLOTS {
        let bytes = &data[(s * SLOT) as usize..((s + 1) * SLOT) as usize];
        let first = bytes[0];
        assert!(
            bytes.iter().all(|b| *b == first),
            "seed {seed}: slot {s} is torn"
        );
        assert!(
            ok[s as usize].contains(&first),
            "seed {seed}: slot {s} holds {first:#x}, flushed state allows {:?} (flushed through op {flushed})",
            ok[s as usize]
        );
    }
}

#[test]
fn crash_test_keeps_flushed_writes() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mut b = Vec::with_capacity((SLOTS * SLOT) as usize);
    for s in 0..SLOTS {
        b.extend(std::iter::repeat_n((s % 200) as u8 + 1, SLOT as usize));
    }
    std::fs::write(&base, b).unwrap();
    for seed in 0..40u64 {
        let opts = CreateOptions {
            size: SLOTS * SLOT,
            cluster_size: [65536, 4096, 16384][seed as usize % 3],
            refcount_bits: [16, 1, 64][seed as usize % 3],
            ..Default::default()
        };
        let backing = (seed % 2 == 1).then_some(base.as_path());
        run_round(dir.path(), seed, &opts, backing);
    }
}
