//! Real Linux guests from the guest kit (tests/guest/build.sh) booted to init. Few boots,
//! many checks each: the guest's init prints what it sees (CPU count, memory, hidden CPU
//! features) and ends the VM. Needs /dev/kvm and the guest kit; where guest kernel code is
//! emulated a boot takes one to three minutes, hence the generous limits.

mod common;

use std::time::Duration;

use common::*;

const BOOT_LIMIT: Duration = Duration::from_secs(900);
const FLAGS: &str = "console=ttyS0 quiet tsc=reliable no_timer_check";

/// Parses `EMBER-INFO key=value ...` from the guest's output.
fn info(stdout: &str) -> Vec<(String, String)> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("EMBER-INFO "))
        .unwrap_or_else(|| panic!("the guest printed no EMBER-INFO line:\n{stdout}"));
    line.split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn get<'a>(info: &'a [(String, String)], key: &str) -> &'a str {
    info.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {info:?}"))
}

#[test]
fn vmlinux_pvh_with_two_cpus_reaches_init_and_powers_off() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let mut cmd = ember();
    cmd.args(["run", "--kernel"])
        .arg(&kit.vmlinux)
        .arg("--initrd")
        .arg(&kit.initramfs)
        .args(["--cpus", "2", "--memory", "128M", "--cmdline"])
        .arg(format!("{FLAGS} ember.run=info ember.end=poweroff"));
    let r = run(cmd, BOOT_LIMIT);
    assert_eq!(r.code(), Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("ember-guest: init reached"));
    let info = info(&r.stdout);
    assert_eq!(get(&info, "cpus"), "2");
    assert_eq!(get(&info, "online"), "0-1");
    let mem_kb: u64 = get(&info, "mem_kb").parse().unwrap();
    assert!(
        (100_000..=131_072).contains(&mem_kb),
        "MemTotal {mem_kb} kB"
    );
    // cx16 is hidden by default where KVM emulates guest kernel code; xsave and smap are
    // hidden through CPUID or, on hosts that force them on, clearcpuid=.
    if ember::host::kvm_emulates_guest_kernel() {
        assert_eq!(get(&info, "features"), "cx16-xsave-smap-");
    }
    assert!(get(&info, "kernel").contains("ember-guest"));
}

#[test]
fn bzimage_boots_and_guest_reboot_exits_0() {
    require_kvm();
    let kit = guest_kit();
    let _heavy = heavy_boot_lock();
    let mut cmd = ember();
    cmd.args(["run", "--kernel"])
        .arg(&kit.bzimage)
        .arg("--initrd")
        .arg(&kit.initramfs)
        .args(["--memory", "96M", "--cmdline"])
        .arg(format!("{FLAGS} reboot=k ember.run=info ember.end=reboot"));
    let r = run(cmd, BOOT_LIMIT);
    assert_eq!(r.code(), Some(0), "{}\n{}", r.stdout, r.stderr);
    let info = info(&r.stdout);
    assert_eq!(get(&info, "cpus"), "1");
    let mem_kb: u64 = get(&info, "mem_kb").parse().unwrap();
    assert!((70_000..=98_304).contains(&mem_kb), "MemTotal {mem_kb} kB");
}
