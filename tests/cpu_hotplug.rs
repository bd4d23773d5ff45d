//! `ember setvcpus` with the tiny test kernel (no ACPI code runs in it): the count's rules,
//! vCPUs plugged in at run time (threads waiting for INIT/SIPI, shown by `vcpuinfo` and
//! `dominfo`), a guest that does not eject keeping its CPUs, a plug while paused, and the
//! present set surviving `save`/`restore`. The guest side (Linux bringing CPUs online and
//! ejecting them) is tests/cpu_hotplug_guest.rs. Needs /dev/kvm.

mod common;
#[path = "../examples/tiny_kernel/guest.rs"]
mod guest;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::require_kvm;
use common::vm::{unique, Host};

fn host() -> (Host, PathBuf) {
    require_kvm();
    let h = Host::new();
    let k = h.kernel(&guest::elf_image());
    (h, k)
}

/// Starts the tiny kernel idling with `--cpus CPUS`.
fn run_idle(h: &Host, name: &str, kernel: &Path, cpus: &str) {
    let k = kernel.to_str().unwrap();
    h.ok(&[
        "run",
        "-d",
        "--name",
        name,
        "--kernel",
        k,
        "--memory",
        "16M",
        "--cpus",
        cpus,
        "--cmdline",
        "idle",
    ]);
}

/// The vCPU indexes `ember vcpuinfo` lists.
fn vcpus(h: &Host, name: &str) -> Vec<u32> {
    common::vcpuinfo_ids(&h.ok(&["vcpuinfo", name]).stdout)
}

fn one_line_usage_error(s: &common::vm::Said, needle: &str) {
    assert_eq!(s.code, Some(2), "{s:?}");
    assert_eq!(s.stderr.trim().lines().count(), 1, "{s:?}");
    assert!(s.stderr.contains(needle), "{needle}: {s:?}");
}

#[test]
fn counts_outside_one_to_max_and_vms_not_running_are_refused_in_one_line() {
    let (h, k) = host();
    let name = unique("cpu-range");
    run_idle(&h, &name, &k, "boot=1,max=2");
    for bad in ["0", "3", "-1", "many", "256"] {
        one_line_usage_error(&h.say(&["setvcpus", &name, bad]), "1 to 2");
    }
    assert_eq!(vcpus(&h, &name), [0]);
    one_line_usage_error(&h.say(&["setvcpus", "no-such-vm", "1"]), "no-such-vm");
    // The API says the same to a client that skips the CLI's check.
    let sock = h.vm_dir(&name).join("api.sock");
    let put = |body: &str| {
        let o = std::process::Command::new("curl")
            .args(["-s", "-w", " %{http_code}", "--unix-socket"])
            .arg(&sock)
            .args(["-X", "PUT", "-d", body, "http://localhost/ember/vcpus"])
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    for body in [r#"{"count":5}"#, r#"{"count":0}"#] {
        let answer = put(body);
        assert!(
            answer.ends_with(" 400") && answer.contains("give 1 to 2"),
            "{answer}"
        );
    }
    assert!(put(r#"{"count":"2"}"#).ends_with(" 400"));
    assert_eq!(vcpus(&h, &name), [0]);
    h.ok(&["destroy", &name]);
}

#[test]
fn a_single_cpu_vm_takes_only_one() {
    let (h, k) = host();
    let name = unique("cpu-one");
    run_idle(&h, &name, &k, "1");
    h.ok(&["setvcpus", &name, "1"]);
    one_line_usage_error(&h.say(&["setvcpus", &name, "2"]), "1 to 1");
    h.ok(&["destroy", &name]);
}

#[test]
fn plugged_vcpus_show_in_vcpuinfo_stay_without_an_eject_and_survive_save_and_restore() {
    let (h, k) = host();
    let name = unique("cpu-plug");
    run_idle(&h, &name, &k, "boot=1,max=3");
    assert_eq!(vcpus(&h, &name), [0]);

    let s = h.ok(&["setvcpus", &name, "3"]);
    assert!(s.stdout.contains("3 vCPUs"), "{s:?}");
    assert_eq!(vcpus(&h, &name), [0, 1, 2]);
    let info = h.ok(&["dominfo", &name]).stdout;
    assert!(
        info.lines()
            .any(|l| l.starts_with("CPU(s):") && l.ends_with(" 3")),
        "{info}"
    );

    // The tiny kernel has no ACPI code: asked to give CPUs back, it never ejects them.
    let s = h.ok(&["setvcpus", &name, "1"]);
    assert!(s.stdout.contains("give back 2"), "{s:?}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(vcpus(&h, &name), [0, 1, 2]);
    // Asking for them again withdraws the request; nothing new is created.
    h.ok(&["setvcpus", &name, "3"]);
    assert_eq!(vcpus(&h, &name), [0, 1, 2]);

    let file = h.path().join("plugged.state");
    h.ok(&["save", &name, file.to_str().unwrap()]);
    h.ok(&["restore", file.to_str().unwrap()]);
    assert_eq!(
        vcpus(&h, &name),
        [0, 1, 2],
        "restored with its present vCPUs"
    );
    h.ok(&["destroy", &name]);
}

#[test]
fn plugged_vcpus_and_a_hotplugged_disk_stay_through_a_reset() {
    // As on a PC (and under QEMU): what was plugged in is part of the machine that resets.
    let (h, k) = host();
    let name = unique("cpu-reset");
    let k = k.to_str().unwrap();
    h.ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--kernel",
        k,
        "--memory",
        "16M",
        "--cpus",
        "boot=1,max=3",
        "--transport",
        "pci",
        "--cmdline",
        "idle",
    ]);
    let disk = h.path().join("hot.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    h.ok(&["setvcpus", &name, "3"]);
    h.ok(&["attach-disk", &name, disk.to_str().unwrap()]);
    h.wait_console(&name, "tiny: idle", Duration::from_secs(10));
    h.ok(&["reset", &name]);
    assert!(
        common::vm::wait_until(Duration::from_secs(20), || {
            h.console_log(&name).matches("tiny: hello").count() == 2
        }),
        "the VM never booted again:\n{}",
        h.console_log(&name)
    );
    assert_eq!(vcpus(&h, &name), [0, 1, 2]);
    let list = h.ok(&["domblklist", &name]).stdout;
    assert!(list.contains("hot.raw"), "{list}");
    h.ok(&["destroy", &name]);
}

#[test]
fn setvcpus_config_changes_the_definition_for_the_next_start() {
    let (h, k) = host();
    let name = unique("cpu-def");
    let file = h.path().join(format!("{name}.toml"));
    let def = format!(
        "name = \"{name}\"\nkernel = \"{}\"\nmemory = \"16M\"\ncmdline = \"idle\"\n",
        k.display()
    );
    std::fs::write(&file, def).unwrap();
    h.ok(&["define", file.to_str().unwrap()]);

    one_line_usage_error(&h.say(&["setvcpus", &name, "2"]), "is not running");
    one_line_usage_error(&h.say(&["setvcpus", &name, "2", "--config"]), "1 to 1");
    one_line_usage_error(&h.say(&["setvcpus", &name, "3", "--maximum"]), "--config");
    let both = ["setvcpus", &name, "3", "--maximum", "--config", "--live"];
    one_line_usage_error(&h.say(&both), "--config alone");
    let s = h.ok(&["setvcpus", &name, "4", "--config", "--maximum"]);
    assert!(s.stdout.contains("1 vCPUs at boot, at most 4"), "{s:?}");
    let s = h.ok(&["setvcpus", &name, "3", "--config"]);
    assert!(s.stdout.contains("3 vCPUs at boot, at most 4"), "{s:?}");

    h.ok(&["start", &name]);
    assert_eq!(vcpus(&h, &name), [0, 1, 2]);
    let info = h.ok(&["dominfo", &name]).stdout;
    assert!(
        info.lines()
            .any(|l| l.starts_with("Max CPU(s):") && l.ends_with(" 4")),
        "{info}"
    );
    // Running: --live and --config together change both.
    h.ok(&["setvcpus", &name, "4", "--live", "--config"]);
    assert_eq!(vcpus(&h, &name), [0, 1, 2, 3]);
    let config = h.ok(&["dumpconfig", &name]).stdout;
    // boot = max = 4 is written short.
    assert!(config.contains("cpus = 4"), "{config}");
    h.ok(&["destroy", &name]);
}

#[test]
fn a_vcpu_plugged_while_paused_runs_after_resume() {
    let (h, k) = host();
    let name = unique("cpu-paused");
    run_idle(&h, &name, &k, "boot=1,max=2");
    h.ok(&["suspend", &name]);
    h.ok(&["setvcpus", &name, "2"]);
    assert_eq!(vcpus(&h, &name), [0, 1]);
    h.ok(&["resume", &name]);
    h.ok(&["suspend", &name]);
    h.ok(&["resume", &name]);
    assert_eq!(vcpus(&h, &name), [0, 1]);
    h.ok(&["destroy", &name]);
}
