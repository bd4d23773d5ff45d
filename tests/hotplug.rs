//! PCI hotplug's rules and resource freeing through the verbs, with the tiny test kernel:
//! its `ejector` word plays a guest that gives back every slot asked back (so a detach
//! completes), its `idle` word one that never does (so a detach times out and the device
//! stays), its `eject=N` word one that ejects a slot nobody asked back. Needs /dev/kvm.

mod common;
#[path = "../examples/tiny_kernel/guest.rs"]
mod guest;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::require_kvm;
use common::vm::{unique, Host, Said};

fn host() -> (Host, PathBuf) {
    require_kvm();
    let h = Host::new();
    let k = h.kernel(&guest::elf_image());
    (h, k)
}

/// `ember run -d` of the tiny kernel with `words`, and `extra` options.
fn start(h: &Host, name: &str, k: &Path, words: &str, extra: &[&str]) {
    let mut args = vec!["run", "-d", "--name", name, "--kernel", k.to_str().unwrap()];
    args.extend(["--memory", "16M", "--cmdline", words]);
    args.extend(extra);
    h.ok(&args);
}

/// A raw image of 1 MiB.
fn image(h: &Host, name: &str) -> String {
    let p = h.path().join(name);
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    p.display().to_string()
}

fn refused(s: &Said, code: i32, words: &str) {
    assert_eq!(s.code, Some(code), "{s:?}");
    assert!(s.stderr.contains(words), "wanted '{words}': {s:?}");
}

/// The `ember dominfo` device row of `id`.
fn device_row(h: &Host, name: &str, id: &str) -> Option<String> {
    let info = h.ok(&["dominfo", name]).stdout;
    info.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .map(str::to_string)
}

#[test]
fn a_detached_device_frees_its_slot_bar_and_image_for_the_next_one() {
    let (h, k) = host();
    let name = unique("hp-free");
    start(&h, &name, &k, "ejector", &["--transport", "pci"]);
    let (a, b) = (image(&h, "a.raw"), image(&h, "b.raw"));

    let first = h.ok(&["attach-disk", &name, &a]).stdout;
    let second = h.ok(&["attach-disk", &name, &b, "--target", "vdz"]).stdout;
    let a_row = device_row(&h, &name, "vda").expect("vda listed");
    let detached = h.ok(&["detach-disk", &name, "vda"]).stdout;
    let again = h
        .ok(&["attach-disk", &name, &a, "--mode", "readonly"])
        .stdout;

    assert!(
        first.contains("disk vda attached") && first.contains("0000:00:01.0"),
        "{first}"
    );
    assert!(
        second.contains("disk vdz attached") && second.contains("0000:00:02.0"),
        "{second}"
    );
    assert!(detached.contains("disk vda detached"), "{detached}");
    // Same slot, same BAR, and the image's lock was let go.
    assert!(
        again.contains("disk vda attached") && again.contains("0000:00:01.0"),
        "{again}"
    );
    assert_eq!(device_row(&h, &name, "vda"), Some(a_row));
    let list = h.ok(&["domblklist", &name]).stdout;
    assert!(list.contains(&a) && list.contains(&b), "{list}");
    let config = h.ok(&["dumpconfig", &name]).stdout;
    // The VM's default and each attached disk's own (hotplugged devices are always on PCI).
    assert_eq!(config.matches("[[disk]]").count(), 2, "{config}");
    assert_eq!(config.matches("transport = \"pci\"").count(), 3, "{config}");
    h.ok(&["destroy", &name]);
}

#[test]
fn a_detach_the_guest_never_answers_times_out_and_the_device_stays() {
    let (h, k) = host();
    let name = unique("hp-idle");
    start(&h, &name, &k, "idle", &["--transport", "pci"]);
    let a = image(&h, "a.raw");
    h.ok(&["attach-disk", &name, &a]);

    let row = device_row(&h, &name, "vda").expect("vda listed");
    assert!(!row.contains("pending"), "{row}");
    let first = h.say(&["detach-disk", &name, "vda", "--timeout", "1"]);
    // While one detach waits, another of the same device is refused.
    let mut waiting = h.ember();
    waiting.args(["detach-disk", &name, "vda", "--timeout", "4"]);
    let waiting = waiting
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(common::vm::wait_until(Duration::from_secs(5), || {
        h.ok(&["dominfo", &name]).stdout.contains("vda")
    }));
    std::thread::sleep(Duration::from_millis(500));
    let concurrent = h.say(&["detach-disk", &name, "vda"]);
    let waited = waiting.wait_with_output().unwrap();

    refused(&first, 1, "did not release device 'vda' within 1 s");
    assert!(first.stderr.contains("stays attached"), "{first:?}");
    let row = device_row(&h, &name, "vda").expect("vda listed");
    assert!(row.ends_with("(detach pending)"), "{row}");
    refused(&concurrent, 2, "a detach of device 'vda' is pending");
    assert_eq!(waited.status.code(), Some(1));
    assert!(h.ok(&["domblklist", &name]).stdout.contains(&a));
    // A reset completes the pending removal, as QEMU's does.
    h.ok(&["reset", &name]);
    assert!(
        common::vm::wait_until(Duration::from_secs(20), || {
            h.console_log(&name).matches("tiny: hello").count() == 2
        }),
        "no second boot"
    );
    assert!(!h.ok(&["domblklist", &name]).stdout.contains(&a));
    h.ok(&["destroy", &name]);
}

#[test]
fn a_device_the_guest_ejects_itself_goes_as_after_a_detach() {
    let (h, k) = host();
    let name = unique("hp-guest");
    let (a, b) = (image(&h, "a.raw"), image(&h, "b.raw"));
    // Slot 1 holds vda, slot 2 vdb; the guest ejects slot 5 (empty) and slot 1, unasked.
    let disks = [format!("path={a}"), format!("path={b}")];
    start(
        &h,
        &name,
        &k,
        "eject=5 eject=1 idle",
        &[
            "--transport",
            "pci",
            "--disk",
            &disks[0],
            "--disk",
            &disks[1],
        ],
    );
    assert!(
        common::vm::wait_until(Duration::from_secs(10), || {
            !h.ok(&["domblklist", &name]).stdout.contains(&a)
        }),
        "vda never went"
    );
    let list = h.ok(&["domblklist", &name]).stdout;
    assert!(list.contains(&b), "vdb stays: {list}");
    let config = h.ok(&["dumpconfig", &name]).stdout;
    assert_eq!(config.matches("[[disk]]").count(), 1, "{config}");
    // The slot and the image's lock are free again.
    let again = h.ok(&["attach-disk", &name, &a]).stdout;
    assert!(again.contains("0000:00:01.0"), "{again}");
    h.ok(&["destroy", &name]);
}

#[test]
fn hotplug_requests_that_cannot_be_met_are_refused_with_the_reason() {
    let (h, k) = host();
    let pci = unique("hp-rules");
    let a = image(&h, "a.raw");
    let mmio_disk = image(&h, "m.raw");
    let spec = format!("path={mmio_disk},transport=mmio");
    start(
        &h,
        &pci,
        &k,
        "idle",
        &["--transport", "pci", "--disk", &spec],
    );
    let plain = unique("hp-mmio");
    start(&h, &plain, &k, "idle", &[]);
    h.ok(&["attach-disk", &pci, &a, "--target", "vdq"]);

    refused(&h.say(&["attach-disk", &plain, &a]), 2, "has no PCI bus");
    refused(&h.say(&["attach-disk", "nosuchvm", &a]), 2, "no VM named");
    refused(
        &h.say(&["attach-disk", &pci, &a, "--target", "vdq"]),
        2,
        "exists already",
    );
    refused(
        &h.say(&["attach-disk", &pci, "/nonexistent.raw"]),
        2,
        "FILE",
    );
    refused(
        &h.say(&["attach-disk", &pci, &a, "--mode", "bogus"]),
        2,
        "--mode bogus",
    );
    refused(
        &h.say(&["attach-disk", &pci, &a, "--target", "a b"]),
        2,
        "id=a b",
    );
    refused(
        &h.say(&["attach-disk", &pci, &a, "--persistent"]),
        2,
        "has no definition",
    );
    refused(&h.say(&["detach-disk", &pci, "vda"]), 2, "virtio-mmio");
    refused(
        &h.say(&["detach-disk", &pci, "vdx"]),
        2,
        "no device has id 'vdx'",
    );
    refused(
        &h.say(&["detach-disk", &pci, "vdq", "--timeout", "0"]),
        2,
        "--timeout 0",
    );
    refused(
        &h.say(&["detach-interface", &pci, "--mac", "52:54:00:00:00:01"]),
        2,
        "no interface with MAC",
    );
    refused(
        &h.say(&[
            "attach-interface",
            &pci,
            "--type",
            "bridge",
            "--source",
            "nobr0",
        ]),
        2,
        "bridge=nobr0",
    );
    // The refusals changed nothing.
    let list = h.ok(&["domblklist", &pci]).stdout;
    assert_eq!(list.matches(".raw").count(), 2, "{list}");
    h.ok(&["destroy", &pci]);
    h.ok(&["destroy", &plain]);
}

#[test]
fn the_root_bus_fills_up_and_refuses_the_32nd_device() {
    let (h, k) = host();
    let name = unique("hp-full");
    start(&h, &name, &k, "idle", &["--transport", "pci"]);
    for i in 1..32 {
        let img = image(&h, &format!("d{i}.raw"));
        let said = h.ok(&["attach-disk", &name, &img]).stdout;
        assert!(said.contains(&format!("0000:00:{i:02x}.0")), "{said}");
    }
    let last = image(&h, "last.raw");
    refused(
        &h.say(&["attach-disk", &name, &last]),
        2,
        "no PCI slot left",
    );
    h.ok(&["destroy", &name]);
}

#[test]
fn a_persistent_attach_and_detach_change_the_definition() {
    let (h, k) = host();
    let name = unique("hp-def");
    let file = h.path().join(format!("{name}.toml"));
    let def = format!(
        "name = \"{name}\"\nkernel = \"{}\"\nmemory = \"16M\"\ncmdline = \"ejector\"\n\
         transport = \"pci\"\n",
        k.display()
    );
    std::fs::write(&file, def).unwrap();
    h.ok(&["define", file.to_str().unwrap()]);
    h.ok(&["start", &name]);
    let a = image(&h, "a.raw");

    h.ok(&["attach-disk", &name, &a, "--persistent"]);
    let with = h.ok(&["dumpconfig", &name]).stdout;
    h.ok(&["detach-disk", &name, "vda", "--persistent"]);
    let without = h.ok(&["dumpconfig", &name]).stdout;

    assert!(with.contains(&a), "{with}");
    assert!(!without.contains(&a), "{without}");
    h.ok(&["destroy", &name]);
}

#[test]
fn a_saved_vm_with_a_hole_in_its_slots_restores_with_its_devices_where_they_were() {
    let (h, k) = host();
    let name = unique("hp-save");
    start(&h, &name, &k, "ejector", &["--transport", "pci"]);
    let (a, b) = (image(&h, "a.raw"), image(&h, "b.raw"));
    h.ok(&["attach-disk", &name, &a]);
    h.ok(&["attach-disk", &name, &b]);
    let hole = device_row(&h, &name, "vda").expect("vda listed");
    h.ok(&["detach-disk", &name, "vda"]);
    let before = device_row(&h, &name, "vdb").expect("vdb listed");
    let file = h.path().join("saved.state");

    h.ok(&["save", &name, file.to_str().unwrap()]);
    h.ok(&["restore", file.to_str().unwrap()]);

    let after = device_row(&h, &name, "vdb").expect("vdb listed after the restore");
    // The row shows the BAR: vdb's, not the one vda left free (a rebuild in attach order
    // would have put vdb in slot 1, at vda's BAR).
    assert_eq!(after, before);
    let bar = |row: &str| row.split_whitespace().nth(3).unwrap().to_string();
    assert_ne!(bar(&after), bar(&hole), "{after} / {hole}");
    assert!(device_row(&h, &name, "vda").is_none());
    h.ok(&["destroy", &name]);
}
