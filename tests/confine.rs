//! Confinement end to end: every feature under the default seccomp filters (the tiny test
//! kernel: boot, exits, raw and qcow2 disks with a backing file, a tap, the API, console
//! attach, pause/resume, save/restore, named snapshots, reset, the Firecracker start flow;
//! one guest-kit Linux boot for disk writes that grow a qcow2 image and for the network),
//! every thread of a running VM filtered (`Seccomp: 2`), and `ember jail`: the jailed
//! process sees only its files, runs as its user, sits in its cgroups and is still found
//! by `ember list` and the verbs. Needs root and /dev/kvm; the Linux test needs the guest
//! kit, iproute2 and qemu-img.

mod common;
#[path = "../examples/tiny_kernel/guest.rs"]
mod guest;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);
/// The unprivileged user and group jailed VMs run as.
const JAIL_ID: u32 = 47_113;

struct Tiny {
    dir: tempfile::TempDir,
    kernel: PathBuf,
}

fn tiny() -> Tiny {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, guest::elf_image()).unwrap();
    Tiny { dir, kernel }
}

/// Where these tests' named snapshots go (not the host's /var/lib/ember).
fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ember-data")
}

/// `ember` with the tests' state, configuration and data directories.
fn em() -> Command {
    let mut c = ember();
    c.env("EMBER_DATA_DIR", data_dir());
    c
}

/// A VM name unique to this test run.
fn vm_name(tag: &str) -> String {
    format!("cf-{tag}-{}", std::process::id())
}

fn ember_ok(args: &[&str]) -> String {
    let out = em().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ember {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn vm_dir(name: &str) -> PathBuf {
    state_dirs().0.join("vms").join(name)
}

fn pid_of(name: &str) -> u32 {
    std::fs::read_to_string(vm_dir(name).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn api(name: &str) -> PathBuf {
    vm_dir(name).join("api.sock")
}

/// Starts the tiny kernel counting in the background as `name`.
fn start(t: &Tiny, name: &str, extra: &[&str]) {
    let kernel = t.kernel.to_str().unwrap();
    let mut args = vec!["run", "-d", "--name", name, "--kernel", kernel, "-m", "16M"];
    args.extend(["--cmdline", "count"]);
    args.extend(extra);
    ember_ok(&args);
}

/// Waits until `f` holds (or fails the test after `LIMIT`).
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + LIMIT;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn console_log(name: &str) -> String {
    std::fs::read_to_string(vm_dir(name).join("console.log")).unwrap_or_default()
}

/// The highest `tick N` in the console log.
fn last_tick(name: &str) -> u32 {
    console_log(name)
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// `(thread name, Seccomp: value)` of every thread of `pid`.
fn seccomp_of_threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let get = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        out.push((get("Name:"), get("Seccomp:")));
    }
    out
}

/// Asserts every thread of VM `name` runs under a filter, with `vcpus` vCPU threads.
fn assert_all_filtered(name: &str, vcpus: usize) {
    let threads = seccomp_of_threads(pid_of(name));
    let named = threads
        .iter()
        .filter(|(n, _)| n.starts_with("vcpu "))
        .count();
    assert_eq!(named, vcpus, "{threads:?}");
    assert!(threads.iter().all(|(_, s)| s == "2"), "{threads:?}");
}

fn destroy(name: &str) {
    ember_ok(&["destroy", name]);
    wait_until("the VM to end", || !vm_dir(name).join("pid").exists());
}

fn qcow2_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    ember_img_ok(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
    ember_overlay(top.to_str().unwrap(), "base.qcow2", "qcow2");
    (base, top)
}

/// A tap in the host's namespace, deleted on drop.
struct HostTap(String);

impl HostTap {
    fn new(tag: &str) -> Self {
        let name = format!("cf{tag}{}", std::process::id() % 10_000);
        tool_ok("ip", &["tuntap", "add", &name, "mode", "tap"]);
        HostTap(name)
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

#[test]
fn every_thread_of_a_vm_with_disks_and_a_nic_is_filtered() {
    let t = tiny();
    let name = vm_name("threads");
    let (_, top) = qcow2_pair(t.dir.path());
    let raw = t.dir.path().join("b.raw");
    ember_img_ok(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "16M"]);
    let tap = HostTap::new("th");
    let disk1 = format!("path={}", top.display());
    let disk2 = format!("path={},format=raw,cache=none", raw.display());
    let nic = format!("tap={}", tap.0);
    let extra = [
        "--cpus", "2", "--disk", &disk1, "--disk", &disk2, "--net", &nic,
    ];
    start(&t, &name, &extra);
    wait_until("ticks", || last_tick(&name) >= 2);
    assert_all_filtered(&name, 2);
    let blk = ember_ok(&["domblklist", &name]);
    assert!(blk.contains("vdb"), "{blk}");
    destroy(&name);
}

#[test]
fn log_mode_filters_and_off_mode_does_not() {
    let t = tiny();
    for (mode, want) in [("log", "2"), ("off", "0")] {
        let name = vm_name(&format!("mode{mode}"));
        start(&t, &name, &["--seccomp", mode]);
        wait_until("ticks", || last_tick(&name) >= 1);
        let threads = seccomp_of_threads(pid_of(&name));
        assert!(
            threads.iter().all(|(_, s)| s == want),
            "{mode}: {threads:?}"
        );
        destroy(&name);
    }
    let r = run(
        {
            let mut c = em();
            c.args(["run", "--kernel"])
                .arg(&t.kernel)
                .args(["--seccomp", "maybe"]);
            c
        },
        LIMIT,
    );
    assert_eq!(r.code(), Some(2), "{r:?}");
}

#[test]
fn api_pause_resume_and_console_attach_work_under_the_filters() {
    let t = tiny();
    let name = vm_name("api");
    start(&t, &name, &[]);
    wait_until("ticks", || last_tick(&name) >= 2);
    ember_ok(&["suspend", &name]);
    let info = ember::api::client::get_json(&api(&name), "/ember/info").unwrap();
    assert_eq!(info["state"], "Paused", "{info}");
    let paused_at = last_tick(&name);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        last_tick(&name) <= paused_at + 1,
        "ticks went on while paused"
    );
    ember_ok(&["resume", &name]);
    wait_until("ticks after resume", || last_tick(&name) > paused_at + 2);
    let counters = ember::api::client::get_json(&api(&name), "/ember/counters").unwrap();
    assert!(
        counters["vcpus"][0]["exits"]["pio_out"].as_u64() > Some(0),
        "{counters}"
    );

    let mut console = em()
        .args(["console", &name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(console.stdout.take().unwrap()).lines();
    let seen_tick = lines.any(|l| l.is_ok_and(|l| l.starts_with("tick ")));
    assert!(seen_tick, "the console showed no ticks");
    console.stdin.as_mut().unwrap().write_all(&[0x1d]).unwrap();
    let st = wait_deadline(&mut console, LIMIT).expect("Ctrl-] detaches");
    assert!(st.success());
    assert_all_filtered(&name, 1);
    destroy(&name);
}

#[test]
fn save_and_restore_go_on_counting_under_the_filters() {
    let t = tiny();
    let name = vm_name("save");
    start(&t, &name, &[]);
    wait_until("ticks", || last_tick(&name) >= 3);
    let file = t.dir.path().join("vm.save");
    ember_ok(&["save", &name, file.to_str().unwrap()]);
    assert!(
        !vm_dir(&name).join("pid").exists(),
        "the saved VM still runs"
    );
    ember_ok(&["restore", file.to_str().unwrap()]);
    wait_until("ticks after restore", || last_tick(&name) >= 5);
    assert!(
        !console_log(&name).contains("tick 1\n"),
        "the guest booted again"
    );
    assert_all_filtered(&name, 1);
    destroy(&name);
}

#[test]
fn named_snapshots_and_disk_only_overlays_work_under_the_filters() {
    let t = tiny();
    let name = vm_name("snap");
    let (_, top) = qcow2_pair(t.dir.path());
    start(&t, &name, &["--disk", &format!("path={}", top.display())]);
    wait_until("ticks", || last_tick(&name) >= 2);
    ember_ok(&["snapshot-create-as", &name, "s1"]);
    wait_until("ticks after the snapshot", || last_tick(&name) >= 5);
    ember_ok(&["snapshot-revert", &name, "s1"]);
    wait_until("the reverted VM", || {
        ember::api::client::get_json(&api(&name), "/ember/info")
            .is_ok_and(|i| i["state"] == "Running")
    });
    ember_ok(&["snapshot-create-as", &name, "s2", "--disk-only"]);
    let list = ember_ok(&["snapshot-list", &name]);
    assert!(list.contains("s1") && list.contains("s2"), "{list}");
    ember_ok(&["snapshot-delete", &name, "s1"]);
    assert_all_filtered(&name, 1);
    destroy(&name);
    assert_qemu_img_clean(&top);
    assert!(t.dir.path().join("top-s2.qcow2").is_file());
}

#[test]
fn reset_rebuilds_the_vm_with_filtered_threads() {
    let t = tiny();
    let name = vm_name("reset");
    start(&t, &name, &["--cpus", "2"]);
    wait_until("ticks", || last_tick(&name) >= 3);
    ember_ok(&["reset", &name]);
    wait_until("the second boot", || {
        console_log(&name).matches("tiny: hello").count() == 2
    });
    wait_until("vCPU threads of the new VM", || {
        seccomp_of_threads(pid_of(&name))
            .iter()
            .filter(|(n, _)| n.starts_with("vcpu "))
            .count()
            == 2
    });
    assert_all_filtered(&name, 2);
    destroy(&name);
}

#[test]
fn the_firecracker_flow_boots_and_snapshots_under_the_filters() {
    let t = tiny();
    let name = vm_name("fc");
    ember_ok(&["run", "-d", "--name", &name]);
    let sock = api(&name);
    let call = |method: &str, path: &str, body: String| {
        ember::api::client::call(&sock, method, path, Some(&body)).unwrap()
    };
    let boot = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"count"}}"#,
        t.kernel.display()
    );
    call("PUT", "/boot-source", boot);
    call(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":16}"#.into(),
    );
    call(
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#.into(),
    );
    wait_until("ticks", || last_tick(&name) >= 2);
    call("PATCH", "/vm", r#"{"state":"Paused"}"#.into());
    let (state, mem) = (t.dir.path().join("fc.state"), t.dir.path().join("fc.mem"));
    let snap = format!(
        r#"{{"snapshot_path":"{}","mem_file_path":"{}"}}"#,
        state.display(),
        mem.display()
    );
    call("PUT", "/snapshot/create", snap);
    assert!(state.is_file() && mem.is_file());
    call("PATCH", "/vm", r#"{"state":"Resumed"}"#.into());
    assert_all_filtered(&name, 1);
    destroy(&name);
}

// ---------------------------------------------------------------------------------------
// ember jail

/// Makes `path` the jail user's.
fn give(path: &Path) {
    std::os::unix::fs::chown(path, Some(JAIL_ID), Some(JAIL_ID)).unwrap();
}

/// A jail's files: the tiny kernel and a qcow2 overlay on a base, the user's to write.
struct JailKit {
    t: Tiny,
    base: tempfile::TempDir,
    top: PathBuf,
}

fn jail_kit() -> JailKit {
    let t = tiny();
    let (base, top) = qcow2_pair(t.dir.path());
    for p in [&base, &top, &t.kernel] {
        give(p);
    }
    std::fs::set_permissions(t.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    JailKit {
        t,
        base: tempfile::tempdir().unwrap(),
        top,
    }
}

fn jail_cmd(k: &JailKit, name: &str, jail_opts: &[&str], run_opts: &[&str]) -> Command {
    let mut c = em();
    let id = JAIL_ID.to_string();
    c.args([
        "jail",
        "--id",
        name,
        "--uid",
        &id,
        "--gid",
        &id,
        "--chroot-base",
    ])
    .arg(k.base.path())
    .args(jail_opts)
    .args(["--", "--kernel"])
    .arg(&k.t.kernel)
    .args(["-m", "16M", "--cmdline", "count", "--disk"])
    .arg(format!("path={}", k.top.display()))
    .args(run_opts);
    c
}

fn jail_daemon(k: &JailKit, name: &str, jail_opts: &[&str], run_opts: &[&str]) {
    let out = jail_cmd(k, name, &[&["--daemonize"], jail_opts].concat(), run_opts)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);
}

/// Every path under `root` (relative), without following links.
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            out.insert(p.strip_prefix(root).unwrap().to_path_buf());
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                todo.push(p);
            }
        }
    }
    out
}

/// `p` and its ancestors, relative to `/`.
fn with_parents(p: &Path) -> Vec<PathBuf> {
    p.ancestors()
        .filter_map(|a| a.strip_prefix("/").ok())
        .filter(|a| !a.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .collect()
}

#[test]
fn a_jailed_vm_sees_only_its_files_and_runs_as_its_user() {
    let k = jail_kit();
    let name = vm_name("jail");
    jail_daemon(&k, &name, &[], &[]);
    let pid = pid_of(&name);
    let list = ember_ok(&["list"]);
    assert!(
        list.contains(&format!("{pid}")) && list.contains(&name),
        "{list}"
    );
    wait_until("ticks", || last_tick(&name) >= 2);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = format!("{JAIL_ID}\t{JAIL_ID}\t{JAIL_ID}\t{JAIL_ID}");
    assert!(status.contains(&format!("Uid:\t{ids}")), "{status}");
    assert!(status.contains(&format!("Gid:\t{ids}")), "{status}");
    assert!(
        status.contains("NSpid:\t") && status.contains("\t1\n"),
        "{status}"
    );
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert_all_filtered(&name, 1);

    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let seen = tree(&root);
    let data = data_dir();
    let mut want: BTreeSet<PathBuf> = ["dev", "dev/kvm", "dev/null"]
        .iter()
        .map(PathBuf::from)
        .collect();
    for p in [
        &k.t.kernel,
        &k.top,
        &k.t.dir.path().join("base.qcow2"),
        &vm_dir(&name),
    ] {
        want.extend(with_parents(p));
    }
    want.extend(with_parents(&data.join("snapshots").join(&name)));
    want.extend(with_parents(&std::env::current_dir().unwrap()));
    for f in ["lock", "pid", "api.sock", "console.log", "ember.log"] {
        want.insert(
            vm_dir(&name)
                .join(f)
                .strip_prefix("/")
                .unwrap()
                .to_path_buf(),
        );
    }
    let extra: Vec<_> = seen.difference(&want).collect();
    assert!(
        extra.is_empty(),
        "the jail shows more than its files: {extra:?}"
    );
    assert!(!root.join("etc").exists() && !root.join("proc").exists());
    destroy(&name);
    let jail_dir = k.base.path().join("ember").join(&name);
    wait_until("the jailer to remove the jail", || !jail_dir.exists());
}

/// Reads cgroup file `file` of `pid`'s group for `controller` (v1 or v2), if there is one.
fn cgroup_value(pid: u32, controller: &str, file: &str) -> Option<String> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in mounts.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let point = left.split(' ').nth(4).unwrap();
        let mut r = right.split(' ');
        let (fstype, opts) = (r.next().unwrap(), r.nth(1).unwrap_or(""));
        let group = cgroups.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
            let hit = match fstype {
                "cgroup2" => ctrls.is_empty(),
                "cgroup" => {
                    ctrls.split(',').any(|c| c == controller)
                        && opts.split(',').any(|o| o == controller)
                }
                _ => false,
            };
            hit.then(|| path.to_string())
        });
        if let Some(g) = group {
            let p = Path::new(point).join(g.trim_start_matches('/')).join(file);
            if let Ok(v) = std::fs::read_to_string(&p) {
                return Some(v.trim().to_string());
            }
        }
    }
    None
}

#[test]
fn cgroup_and_rlimits_are_applied_to_a_jailed_vm() {
    let k = jail_kit();
    let name = vm_name("cg");
    let limits = "cpu.max=50000 100000,memory.max=256M,pids.max=64";
    jail_daemon(
        &k,
        &name,
        &["--cgroup", limits, "--rlimit", "nofile=512"],
        &[],
    );
    let pid = pid_of(&name);
    wait_until("ticks", || last_tick(&name) >= 1);
    // cgroup v2 files where the controller is on v2, else their v1 forms (this host may be
    // either; hybrid hosts keep cpu and memory on v1).
    let v1_cpu = || {
        let q = cgroup_value(pid, "cpu", "cpu.cfs_quota_us")?;
        let p = cgroup_value(pid, "cpu", "cpu.cfs_period_us")?;
        Some(format!("{q} {p}"))
    };
    let cpu = cgroup_value(pid, "cpu", "cpu.max").or_else(v1_cpu);
    assert_eq!(cpu.as_deref(), Some("50000 100000"));
    let mem = cgroup_value(pid, "memory", "memory.max")
        .or_else(|| cgroup_value(pid, "memory", "memory.limit_in_bytes"));
    assert_eq!(mem, Some((256u64 << 20).to_string()));
    assert_eq!(cgroup_value(pid, "pids", "pids.max").as_deref(), Some("64"));
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(nofile.split_whitespace().nth(3), Some("512"), "{nofile}");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    destroy(&name);
    let leaf = cgroups
        .lines()
        .find_map(|l| l.rsplit(':').next().filter(|p| p.ends_with(&name)));
    assert!(leaf.is_some(), "{cgroups}");
}

#[test]
fn a_jailed_vm_attaches_its_tap_in_its_network_namespace() {
    let k = jail_kit();
    let name = vm_name("jnet");
    let ns = format!("cf-jail-{}", std::process::id());
    tool_ok("ip", &["netns", "add", &ns]);
    let in_ns = |script: &str| tool_ok("ip", &["netns", "exec", &ns, "sh", "-c", script]);
    in_ns("ip tuntap add tap0 mode tap && ip link set tap0 up");
    let netns = format!("/run/netns/{ns}");
    jail_daemon(&k, &name, &["--netns", &netns], &["--net", "tap=tap0"]);
    wait_until("ticks", || last_tick(&name) >= 1);
    let nics = ember_ok(&["domiflist", &name]);
    assert!(nics.contains("tap0"), "{nics}");
    assert_all_filtered(&name, 1);
    destroy(&name);
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
}

#[test]
fn jail_refuses_what_a_jailed_vm_cannot_use() {
    let k = jail_kit();
    let name = vm_name("jbad");
    for (run_opts, says) in [
        (&["--net", "network=default"][..], "existing tap"),
        (&["--serial", "pty"], "--serial"),
        (&["-d"], "--daemonize"),
    ] {
        let r = run(jail_cmd(&k, &name, &[], run_opts), LIMIT);
        assert_eq!(r.code(), Some(2), "{run_opts:?}: {r:?}");
        assert!(r.stderr.contains(says), "{r:?}");
    }
    let r = run(
        jail_cmd(&k, &name, &[], &["--disk", "/nonexistent.img"]),
        LIMIT,
    );
    assert!(r.stderr.contains("/nonexistent.img"), "{r:?}");
    assert_ne!(r.code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// A Linux guest under the default filters.

/// `refcount_table_clusters` of a qcow2 image (header offset 56).
fn refcount_table_clusters(path: &Path) -> u32 {
    let head = std::fs::read(path).unwrap();
    u32::from_be_bytes(head[56..60].try_into().unwrap())
}

/// A guest's serial console: everything it printed so far, read on a thread.
struct Console {
    seen: std::sync::Arc<std::sync::Mutex<String>>,
    input: std::process::ChildStdin,
}

impl Console {
    fn new(child: &mut std::process::Child) -> Self {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (mut out, sink) = (child.stdout.take().unwrap(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut out, &mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Console {
            seen,
            input: child.stdin.take().unwrap(),
        }
    }

    fn text(&self) -> String {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until the output after byte `from` holds `what`; where it ends.
    fn wait(&self, from: usize, what: &str, limit: Duration) -> usize {
        let end = Instant::now() + limit;
        loop {
            let text = self.text();
            if let Some(at) = text.get(from..).and_then(|t| t.find(what)) {
                return from + at + what.len();
            }
            assert!(Instant::now() < end, "no '{what}' from the guest:\n{text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn send(&mut self, line: &str) {
        self.input
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }
}

/// Run in the guest's shell: writes three copies of busybox (non-zero data, ~6 MB) to
/// /dev/vda with an fsync, drops the page cache, reads them back and compares.
const GUEST_WRITE: &str = "n=$(wc -c </bin/busybox); for i in 1 2 3; do cat /bin/busybox; \
done >/tmp/w; dd if=/tmp/w of=/dev/vda bs=64k conv=fsync 2>/dev/null; \
echo 3 >/proc/sys/vm/drop_caches; a=$(md5sum </tmp/w); \
b=$(head -c $((n * 3)) /dev/vda | md5sum); \
[ \"$a\" = \"$b\" ] && echo EMBER-W ok $n || echo EMBER-W bad";

#[test]
fn linux_boot_disk_writes_that_grow_a_qcow2_and_network_under_default_filters() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let limit = Duration::from_secs(1200);
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    ember_img_ok(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
    // 512-byte clusters with 64-bit refcounts: one refcount table cluster covers 2 MiB of
    // the file, so the guest's ~6 MB of writes make the table grow.
    let opts = "cluster_size=512,refcount_bits=64,backing_file=base.qcow2,backing_fmt=qcow2";
    ember_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        top.to_str().unwrap(),
    ]);
    assert_eq!(refcount_table_clusters(&top), 1);
    let ns = format!("cf-linux-{}", std::process::id());
    tool_ok("ip", &["netns", "add", &ns]);
    let in_ns = |script: &str| tool_ok("ip", &["netns", "exec", &ns, "sh", "-c", script]);
    in_ns("ip link set lo up && ip tuntap add tap0 mode tap && ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_ember"), "run", "--kernel"])
        .env("EMBER_STATE_DIR", state_dirs().0)
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initramfs)
        .args(["--memory", "128M", "--disk"])
        .arg(format!("path={}", top.display()))
        .args(["--net", "tap=tap0", "--cmdline"])
        .arg("console=ttyS0 quiet tsc=reliable no_timer_check ember.ip=10.0.2.2/24 ember.peer=10.0.2.1 ember.run=net-static,net-ping ember.end=shell")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut console = Console::new(&mut child);
    // While the guest runs, every thread of the VM process is filtered.
    wait_until("the vCPU thread", || {
        seccomp_of_threads(pid)
            .iter()
            .any(|(n, _)| n.starts_with("vcpu "))
    });
    let threads = seccomp_of_threads(pid);
    assert!(threads.iter().all(|(_, s)| s == "2"), "{threads:?}");
    let at = console.wait(0, "EMBER-PING", limit);
    let at = console.wait(at, "# ", limit);
    console.send(GUEST_WRITE);
    let at = console.wait(at, "EMBER-W ", limit);
    console.wait(at, "\n", limit);
    console.send("poweroff -f");
    let status = wait_deadline(&mut child, limit);
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let seen = console.text();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{seen}\n{err}");
    assert!(!err.contains("seccomp"), "{err}");
    assert!(seen.contains("EMBER-PING ok"), "{seen}");
    assert!(seen.contains("EMBER-W ok"), "{seen}");
    assert!(
        refcount_table_clusters(&top) > 1,
        "the refcount table did not grow"
    );
    assert_qemu_img_clean(&top);
}
