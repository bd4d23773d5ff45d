//! Crash safety: a writer process drives the qcow2 engine (writes, zero writes, discards,
//! flushes, and in some configurations internal snapshot creates and deletes) and is killed
//! with SIGKILL at random points. Afterwards `qemu-img check` finds no corruption (leaks
//! are allowed: an interrupted allocation may leak), every write the writer had flushed is
//! there, read back by qemu-img, and every snapshot that exists holds what the disk held
//! when it was taken. Needs qemu-img; no /dev/kvm.
//!
//! The default test runs 40 points. `crash_campaign` (ignored; benches/qcow2_crash.sh runs
//! it) runs EMBER_CRASH_POINTS points (1,000 by default) across cluster sizes 512 B .. 2 MiB,
//! refcount widths 1 .. 64 bits, no backing file / a raw one / a qcow2-over-raw chain, with
//! and without internal snapshots, and prints a table of points and failures.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devices::disk::qcow2::CreateOptions;
use devices::disk::{self, DiskImage, HostFile, ImageFormat, OpenOptions, Qcow2Image};

const SLOT: u64 = 4096;
const SLOTS: u64 = 2048; // 8 MiB disk

/// The writer's snapshot schedule (after the flush of op `at`): (op, create?, name).
const SNAPSHOTS: [(u64, bool, &str); 4] = [
    (63, true, "a"),
    (127, true, "b"),
    (191, false, "a"),
    (255, true, "c"),
];

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

/// What lies under the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Backing {
    None,
    /// A raw file.
    Raw,
    /// A qcow2 image (with data of its own) over the raw file.
    Chain,
}

impl Backing {
    /// The byte slot `slot` of the backing chain holds.
    fn byte(self, slot: u64) -> u8 {
        match self {
            Backing::None => 0,
            Backing::Chain if slot.is_multiple_of(5) => 252 + (slot % 3) as u8,
            _ => (slot % 200) as u8 + 1,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Config {
    cluster_size: u64,
    refcount_bits: u32,
    backing: Backing,
    snapshots: bool,
}

/// The backing files, made once: base.raw and mid.qcow2 over it.
struct Bases {
    raw: PathBuf,
    chain: PathBuf,
}

fn make_bases(dir: &Path) -> Bases {
    let raw = dir.join("base.raw");
    let mut b = Vec::with_capacity((SLOTS * SLOT) as usize);
    for s in 0..SLOTS {
        b.extend(std::iter::repeat_n(Backing::Raw.byte(s), SLOT as usize));
    }
    std::fs::write(&raw, b).unwrap();
    let chain = dir.join("mid.qcow2");
    create_image(&chain, 65536, 16, Some((&raw, "raw")));
    let mut mid = open_rw(&chain);
    for s in (0..SLOTS).step_by(5) {
        let data = vec![Backing::Chain.byte(s); SLOT as usize];
        mid.write_at(&data, s * SLOT).unwrap();
    }
    mid.flush().unwrap();
    Bases { raw, chain }
}

fn create_image(
    path: &Path,
    cluster_size: u64,
    refcount_bits: u32,
    backing: Option<(&Path, &str)>,
) {
    let f = std::fs::File::create(path).unwrap();
    let create = CreateOptions {
        size: SLOTS * SLOT,
        cluster_size,
        refcount_bits,
        backing_file: backing.map(|(p, _)| p.display().to_string()),
        backing_format: backing.map(|(_, f)| f.to_string()),
        ..Default::default()
    };
    Qcow2Image::create(&HostFile::from_file(f), &create).unwrap();
}

fn open_rw(path: &Path) -> Box<dyn DiskImage> {
    let opts = OpenOptions {
        format: Some(ImageFormat::Qcow2),
        read_only: false,
        ..Default::default()
    };
    disk::open_image(path, &opts).unwrap()
}

/// The writer: runs only when the parent test sets EMBER_CRASH_IMAGE.
#[test]
#[ignore = "the crash writer; run by crash_test_keeps_flushed_writes and crash_campaign"]
fn crash_writer() {
    let Some(path) = std::env::var_os("EMBER_CRASH_IMAGE") else {
        return;
    };
    let seed: u64 = std::env::var("EMBER_CRASH_SEED").unwrap().parse().unwrap();
    let snapshots = std::env::var_os("EMBER_CRASH_SNAPSHOTS").is_some();
    let mut img = open_rw(Path::new(&path));
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
        let Some(&(_, create, name)) = SNAPSHOTS.iter().find(|s| s.0 == i && snapshots) else {
            continue;
        };
        // A refcount width too narrow for one more reference refuses; the writer goes on.
        println!("SNAPSHOT-BEGIN {name}");
        let r = if create {
            img.snapshot_create(name, Default::default()).map(drop)
        } else {
            img.snapshot_delete(name).map(drop)
        };
        println!(
            "SNAPSHOT {name} {create} {}",
            r.map_or_else(|e| e.to_string(), |()| "ok".into())
        );
    }
}

/// Where the writer was killed.
struct Killed {
    /// The last op it reported flushed.
    flushed: u64,
    /// Inside a snapshot create or delete.
    in_snapshot: bool,
}

/// Runs the writer on `img` and kills it after a seed-dependent number of flushes, mid-way
/// to the next.
fn run_writer(img: &Path, seed: u64, snapshots: bool) -> Result<Killed, String> {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "crash_writer",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("EMBER_CRASH_IMAGE", img)
    .env("EMBER_CRASH_SEED", seed.to_string())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if snapshots {
        cmd.env("EMBER_CRASH_SNAPSHOTS", "1");
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let wanted = 3 + seed % 17;
    let mut flushed = None;
    let mut reached = false;
    let mut in_snapshot = false;
    let deadline = Instant::now() + Duration::from_secs(300);
    while let Some(Ok(line)) = lines.next() {
        in_snapshot = line.starts_with("SNAPSHOT-BEGIN");
        if let Some(n) = line.strip_prefix("FLUSHED ") {
            let n: u64 = n.parse().unwrap();
            flushed = Some(n);
            if n / 16 + 1 >= wanted {
                std::thread::sleep(Duration::from_micros(300 * (seed % 7)));
                reached = true;
                break;
            }
        }
        if Instant::now() > deadline {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The writer runs ahead of what was read: its last report is in the pipe.
    for line in lines.map_while(Result::ok) {
        in_snapshot = line.starts_with("SNAPSHOT-BEGIN");
        if let Some(n) = line.strip_prefix("FLUSHED ") {
            flushed = Some(n.parse().unwrap());
        }
    }
    match flushed {
        Some(flushed) if reached => Ok(Killed {
            flushed,
            in_snapshot,
        }),
        n => Err(format!(
            "writer: stopped or too slow (last flush after op {n:?})"
        )),
    }
}

/// Per slot, the contents it may hold after op `last` (a discard may leave the old data or
/// zeros).
fn states(seed: u64, backing: Backing, last: u64) -> Vec<Vec<u8>> {
    let mut state: Vec<Vec<u8>> = (0..SLOTS).map(|s| vec![backing.byte(s)]).collect();
    for i in 0..=last {
        let slot = op(seed, i).0 as usize;
        state[slot] = apply(seed, &state[slot], i);
    }
    state
}

fn apply(seed: u64, state: &[u8], i: u64) -> Vec<u8> {
    match op(seed, i).1 {
        Some(b) => vec![b],
        None if i.is_multiple_of(2) => vec![0],
        None => {
            let mut s = state.to_vec();
            s.push(0);
            s
        }
    }
}

/// Compares a flat copy of the disk with what each slot may hold. Writes to different
/// clusters land independently, so a slot is uniform only within a cluster.
fn compare(data: &[u8], ok: &[Vec<u8>], granule: u64, what: &str) -> Result<(), String> {
    if data.len() as u64 != SLOTS * SLOT {
        return Err(format!(
            "{what}: {} bytes, not {}",
            data.len(),
            SLOTS * SLOT
        ));
    }
    for (i, bytes) in data.chunks(granule as usize).enumerate() {
        let s = i as u64 * granule / SLOT;
        let first = bytes[0];
        if bytes.iter().any(|b| *b != first) {
            return Err(format!("{what}: slot {s} is torn"));
        }
        if !ok[s as usize].contains(&first) {
            return Err(format!(
                "{what}: slot {s} holds {first:#x}, allowed {:?}",
                ok[s as usize]
            ));
        }
    }
    Ok(())
}

/// `qemu-img convert` of the image (or of one of its snapshots) to raw bytes.
fn flatten(img: &Path, dir: &Path, snapshot: Option<&str>) -> Result<Vec<u8>, String> {
    let flat = dir.join("flat.raw");
    let mut cmd = Command::new("qemu-img");
    cmd.arg("convert");
    if let Some(s) = snapshot {
        cmd.args(["-l", &format!("snapshot.name={s}")]);
    }
    let out = cmd
        .args(["-O", "raw"])
        .arg(img)
        .arg(&flat)
        .output()
        .expect("qemu-img");
    if !out.status.success() {
        return Err(format!(
            "qemu-img convert {snapshot:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let data = std::fs::read(&flat).unwrap();
    std::fs::remove_file(&flat).unwrap();
    Ok(data)
}

/// Names of the image's internal snapshots, from `qemu-img snapshot -l`.
fn snapshot_names(img: &Path) -> Result<Vec<String>, String> {
    let out = Command::new("qemu-img")
        .args(["snapshot", "-l"])
        .arg(img)
        .output()
        .expect("qemu-img");
    if !out.status.success() {
        return Err(format!(
            "qemu-img snapshot -l: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // "ID  TAG  VM SIZE ..." then one line per snapshot.
    Ok(text
        .lines()
        .skip_while(|l| !l.starts_with("ID"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect())
}

/// One crash point: create, write, kill, check. Err names what failed.
fn run_round(dir: &Path, seed: u64, cfg: &Config, bases: &Bases) -> Result<Verdict, String> {
    let img = dir.join(format!("crash{seed}.qcow2"));
    let backing = match cfg.backing {
        Backing::None => None,
        Backing::Raw => Some((bases.raw.as_path(), "raw")),
        Backing::Chain => Some((bases.chain.as_path(), "qcow2")),
    };
    create_image(&img, cfg.cluster_size, cfg.refcount_bits, backing);
    let result = check_round(dir, &img, seed, cfg);
    if result.is_ok() {
        std::fs::remove_file(&img).unwrap();
    }
    result
}

/// How `qemu-img check` found the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Clean, or leaks only.
    Clean,
    /// Clean, or leaks only, though killed inside a snapshot operation.
    CleanInSnapshot,
    /// Killed inside a snapshot operation, and the only errors are clusters with refcount
    /// 1 whose COPIED flag is already clear (a write copies them once; harmless), repaired
    /// by `qemu-img check -r all`.
    FlagsOnly,
}

fn qemu_check(img: &Path, killed: &Killed) -> Result<Verdict, String> {
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(img)
        .output()
        .expect("qemu-img");
    let code = check.status.code();
    if matches!(code, Some(0) | Some(3)) {
        return Ok(Verdict::Clean);
    }
    let out = String::from_utf8_lossy(&check.stdout).to_string()
        + &String::from_utf8_lossy(&check.stderr);
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("ERROR")).collect();
    let harmless = |l: &&str| l.starts_with("ERROR OFLAG_COPIED") && l.ends_with(" refcount=1");
    if code != Some(2) || !killed.in_snapshot || errors.is_empty() || !errors.iter().all(harmless) {
        let head: Vec<&str> = out.lines().take(12).collect();
        return Err(format!("qemu-img check ({code:?}): {}", head.join(" | ")));
    }
    let repair = Command::new("qemu-img")
        .args(["check", "-r", "all"])
        .arg(img)
        .output()
        .expect("qemu-img");
    let again = Command::new("qemu-img")
        .arg("check")
        .arg(img)
        .output()
        .unwrap();
    if !repair.status.success() || again.status.code() != Some(0) {
        return Err(format!(
            "qemu-img check -r all did not repair the COPIED flags: {}",
            String::from_utf8_lossy(&again.stdout).trim()
        ));
    }
    Ok(Verdict::FlagsOnly)
}

fn check_round(dir: &Path, img: &Path, seed: u64, cfg: &Config) -> Result<Verdict, String> {
    let killed = run_writer(img, seed, cfg.snapshots)?;
    let flushed = killed.flushed;
    let verdict = match qemu_check(img, &killed)? {
        Verdict::Clean if killed.in_snapshot => Verdict::CleanInSnapshot,
        v => v,
    };
    let granule = cfg.cluster_size.min(SLOT);
    let data = flatten(img, dir, None)?;
    // Flushed state, or any later op (it may have landed).
    let mut state = states(seed, cfg.backing, flushed);
    let mut ok = state.clone();
    for i in flushed + 1..flushed + 64 {
        let slot = op(seed, i).0 as usize;
        state[slot] = apply(seed, &state[slot], i);
        ok[slot].extend(state[slot].iter().copied());
    }
    compare(
        &data,
        &ok,
        granule,
        &format!("flushed through op {flushed}"),
    )?;
    if !cfg.snapshots {
        return Ok(verdict);
    }
    for name in snapshot_names(img)? {
        let Some(&(at, ..)) = SNAPSHOTS.iter().find(|s| s.2 == name && s.1) else {
            return Err(format!("a snapshot named {name:?} that was never made"));
        };
        let data = flatten(img, dir, Some(&name))?;
        compare(
            &data,
            &states(seed, cfg.backing, at),
            granule,
            &format!("snapshot {name}"),
        )?;
    }
    Ok(verdict)
}

#[test]
fn crash_test_keeps_flushed_writes() {
    let dir = tempfile::tempdir().unwrap();
    let bases = make_bases(dir.path());
    for seed in 0..40u64 {
        let cfg = Config {
            cluster_size: [65536, 4096, 16384][seed as usize % 3],
            refcount_bits: [16, 1, 64][seed as usize % 3],
            backing: if seed % 2 == 1 {
                Backing::Raw
            } else {
                Backing::None
            },
            snapshots: false,
        };
        match run_round(dir.path(), seed, &cfg, &bases) {
            Ok(v) => assert_eq!(v, Verdict::Clean, "seed {seed}, {cfg:?}"),
            Err(e) => panic!("seed {seed}, {cfg:?}: {e}"),
        }
    }
}

const CLUSTERS: [u64; 5] = [512, 4096, 65536, 256 * 1024, 2 * 1024 * 1024];
const BACKINGS: [Backing; 3] = [Backing::None, Backing::Raw, Backing::Chain];

/// Point `p`'s configuration: every combination of cluster size (5), refcount width (7),
/// backing (3) and snapshots (2) once per 210 points.
fn campaign_config(p: u64) -> Config {
    Config {
        cluster_size: CLUSTERS[(p % 5) as usize],
        refcount_bits: 1 << ((p / 5) % 7),
        backing: BACKINGS[((p / 35) % 3) as usize],
        snapshots: (p / 105) % 2 == 1,
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

#[derive(Default)]
struct Row {
    points: u64,
    failures: u64,
    flags_only: u64,
    in_snapshot: u64,
    refcount_bits: std::collections::BTreeSet<u32>,
}

fn print_table(rows: &BTreeMap<(u64, Backing, bool), Row>, widths: &BTreeMap<u32, (u64, u64)>) {
    println!(
        "{:>9} {:>7} {:>9} {:>6} {:>8} {:>11} {:>10}  refcount bits",
        "cluster", "backing", "snapshots", "points", "failures", "in-snapshot", "flags-only"
    );
    for ((cs, b, s), r) in rows {
        let bits: Vec<String> = r.refcount_bits.iter().map(u32::to_string).collect();
        println!(
            "{cs:>9} {:>7} {:>9} {:>6} {:>8} {:>11} {:>10}  {}",
            format!("{b:?}"),
            if *s { "yes" } else { "no" },
            r.points,
            r.failures,
            r.in_snapshot,
            r.flags_only,
            bits.join(",")
        );
    }
    println!("{:>13} {:>6} {:>8}", "refcount bits", "points", "failures");
    for (w, (p, f)) in widths {
        println!("{w:>13} {p:>6} {f:>8}");
    }
}

/// The benchmark-style run (benches/qcow2_crash.sh): EMBER_CRASH_POINTS points (default
/// 1,000) from point EMBER_CRASH_FIRST_POINT (default 0; point p has seed
/// EMBER_CRASH_FIRST_SEED + p, default 1,000 + p); failures are listed and fail the test at
/// the end, their images kept.
#[test]
#[ignore = "about an hour; run by benches/qcow2_crash.sh"]
fn crash_campaign() {
    let points = env_u64("EMBER_CRASH_POINTS", 1000);
    let first = env_u64("EMBER_CRASH_FIRST_SEED", 1000);
    let skip = env_u64("EMBER_CRASH_FIRST_POINT", 0);
    let dir = tempfile::tempdir().unwrap();
    let bases = make_bases(dir.path());
    let mut rows: BTreeMap<(u64, Backing, bool), Row> = BTreeMap::new();
    let mut widths: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut flags_only = 0;
    let start = Instant::now();
    for p in skip..skip + points {
        let cfg = campaign_config(p);
        let seed = first + p;
        let result = run_round(dir.path(), seed, &cfg, &bases);
        let row = rows
            .entry((cfg.cluster_size, cfg.backing, cfg.snapshots))
            .or_default();
        row.points += 1;
        row.refcount_bits.insert(cfg.refcount_bits);
        let w = widths.entry(cfg.refcount_bits).or_default();
        w.0 += 1;
        if result == Ok(Verdict::FlagsOnly) {
            row.flags_only += 1;
            flags_only += 1;
        }
        if matches!(result, Ok(Verdict::FlagsOnly | Verdict::CleanInSnapshot)) {
            row.in_snapshot += 1;
        }
        if let Err(e) = result {
            row.failures += 1;
            w.1 += 1;
            eprintln!("FAIL seed {seed} {cfg:?}: {e}");
            failures.push(format!("seed {seed} {cfg:?}: {e}"));
        }
        if (p + 1) % 50 == 0 {
            eprintln!(
                "{} points, {} failures, {:.0?}",
                p + 1,
                failures.len(),
                start.elapsed()
            );
        }
    }
    print_table(&rows, &widths);
    let in_snapshot: u64 = rows.values().map(|r| r.in_snapshot).sum();
    println!(
        "{points} crash points, {} failures; {in_snapshot} killed inside a snapshot create or \
         delete, {flags_only} of them with only harmless COPIED-flag errors (repaired by \
         qemu-img check -r all); {:.0?}",
        failures.len(),
        start.elapsed()
    );
    if !failures.is_empty() {
        // The failed points' images stay for a look.
        panic!(
            "{}\nimages in {}",
            failures.join("\n"),
            dir.keep().display()
        );
    }
}
