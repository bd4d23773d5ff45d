use std::path::Path;
use std::time::Duration;

use super::*;

const GOOD: &str = r#"
[boot]
kernel = "bzImage"
initrd = "initramfs.cpio.gz"
cmdline = "console=ttyS0"
memory = "128M"
cpus = 1
disks = ["path=root.qcow2"]
timeout = "120s"
ready = "login: $"

[[case]]
name = "boots"
expect = ["Linux version", "login:"]

[[case]]
name = "uname"
cmdline = "quiet"
run = "uname -r"
expect = ["ember"]
fail_on = ["Oops"]
exit_code = 0
timeout = "30s"
tags = ["smoke"]
"#;

fn err(text: &str) -> String {
    parse(Path::new("dir/t.toml"), text)
        .unwrap_err()
        .to_string()
}

#[test]
fn a_file_with_every_key_parses_with_paths_relative_to_it() {
    // Act
    let f = parse(Path::new("suite/linux.toml"), GOOD).unwrap();

    // Assert
    assert_eq!(f.boot.kernel, Path::new("suite/bzImage"));
    assert_eq!(
        f.boot.initrd.as_deref(),
        Some(Path::new("suite/initramfs.cpio.gz"))
    );
    assert_eq!(f.boot.disks[0].path, Path::new("suite/root.qcow2"));
    assert_eq!(f.boot.memory, "128M");
    assert_eq!(f.boot.cpus, "1");
    assert_eq!(f.boot.timeout, Duration::from_secs(120));
    assert_eq!(f.cases.len(), 2);
    assert_eq!(
        f.cases[0].timeout,
        Duration::from_secs(120),
        "the boot's timeout is the default"
    );
    assert_eq!(f.cases[0].line, 12);
    assert_eq!(f.cases[1].timeout, Duration::from_secs(30));
    assert_eq!(f.cases[1].run.as_deref(), Some("uname -r"));
    assert_eq!(f.cases[1].tags, vec!["smoke"]);
    assert!(f.cases[1].default_fail_on);
}

#[test]
fn defaults_fill_what_a_minimal_file_leaves_out() {
    let f = parse(
        Path::new("t.toml"),
        "[boot]\nkernel = \"k\"\n[[case]]\nname = \"a\"\n",
    )
    .unwrap();
    assert_eq!(f.boot.cmdline, crate::config::DEFAULT_CMDLINE);
    assert_eq!(f.boot.memory, "256M");
    assert_eq!(f.cases[0].timeout, DEFAULT_TIMEOUT);
    assert_eq!(f.cases[0].exit_code, 0);
    assert!(f.boot.ready.is_none());
}

#[test]
fn an_unknown_key_names_the_file_its_line_and_the_key() {
    let e = err("[boot]\nkernel = \"k\"\nkernal = \"x\"\n[[case]]\nname = \"a\"\n");
    assert!(
        e.starts_with("dir/t.toml:3: kernal: unknown field `kernal`"),
        "{e}"
    );
}

#[test]
fn a_wrong_type_names_the_line_and_the_key() {
    let e = err("[boot]\nkernel = \"k\"\n[[case]]\nname = \"a\"\nexpect = \"one\"\n");
    assert!(e.starts_with("dir/t.toml:5: expect: invalid type"), "{e}");
}

#[test]
fn a_syntax_error_names_its_line() {
    let e = err("[boot]\nkernel = \"k\n[[case]]\nname = \"a\"\n");
    assert!(e.starts_with("dir/t.toml:2:"), "{e}");
}

#[test]
fn a_bad_duration_names_the_case_and_the_key() {
    let e = err("[boot]\nkernel = \"k\"\n[[case]]\nname = \"slow\"\ntimeout = \"12 parsecs\"\n");
    assert_eq!(
        e,
        "dir/t.toml:5: case \"slow\".timeout: '12 parsecs' is not a duration; use e.g. 30s, 2m, 1h30m, 500ms"
    );
}

#[test]
fn a_bad_regex_names_its_line_and_the_key() {
    let e = err("[boot]\nkernel = \"k\"\n[[case]]\nname = \"r\"\nexpect = [\n  \"ok\",\n  \"(unclosed\",\n]\n");
    assert!(
        e.starts_with("dir/t.toml:7: case \"r\".expect: not a valid regex"),
        "{e}"
    );
}

#[test]
fn missing_boot_kernel_or_case_name_are_named() {
    assert_eq!(
        err("[[case]]\nname = \"a\"\n"),
        "dir/t.toml:1: boot: the file has no [boot] table"
    );
    assert_eq!(
        err("[boot]\nmemory = \"64M\"\n[[case]]\nname = \"a\"\n"),
        "dir/t.toml:1: boot.kernel: missing: name the guest kernel"
    );
    assert_eq!(
        err("[boot]\nkernel = \"k\"\n\n[[case]]\nexpect = [\"x\"]\n"),
        "dir/t.toml:4: case #1.name: missing: every case needs a name"
    );
}

#[test]
fn duplicate_case_names_point_at_both() {
    let e = err("[boot]\nkernel = \"k\"\n[[case]]\nname = \"a\"\n[[case]]\nname = \"a\"\n");
    assert_eq!(
        e,
        "dir/t.toml:5: case \"a\".name: a case of this name is already on line 3"
    );
}

#[test]
fn bad_memory_cpus_disks_and_exit_codes_are_refused() {
    let base = "[boot]\nkernel = \"k\"\n";
    let case = "[[case]]\nname = \"a\"\n";
    assert!(
        err(&format!("{base}memory = \"lots\"\n{case}")).starts_with("dir/t.toml:3: boot.memory:")
    );
    assert!(err(&format!("{base}cpus = 0\n{case}")).starts_with("dir/t.toml:3: boot.cpus:"));
    assert!(err(&format!("{base}disks = [\"format=raw\"]\n{case}"))
        .starts_with("dir/t.toml:3: boot.disks:"));
    assert!(err(&format!("{base}{case}exit_code = 256\n"))
        .starts_with("dir/t.toml:5: case \"a\".exit_code: 256 is not an exit status"));
}

#[test]
fn a_run_command_the_guest_cannot_read_is_refused() {
    let long = "x".repeat(MAX_RUN_LINE + 1);
    let e = err(&format!(
        "[boot]\nkernel = \"k\"\n[[case]]\nname = \"a\"\nrun = \"{long}\"\n"
    ));
    assert!(e.contains("case \"a\".run: a line of 4001 bytes"), "{e}");
    let e = err("[boot]\nkernel = \"k\"\n[[case]]\nname = \"a\"\nrun = \"echo \\u0004\"\n");
    assert!(e.contains("control characters"), "{e}");
}

#[test]
fn durations_take_units_and_bare_seconds() {
    assert_eq!(parse_duration("120s").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
    assert!(parse_duration("5 fortnights").is_err());
    assert!(parse_duration("s").is_err());
    assert!(parse_duration("").is_err());
    assert!(parse_duration("-3s").is_err());
}

#[test]
fn integer_timeouts_are_seconds_and_zero_is_refused() {
    let f = parse(
        Path::new("t.toml"),
        "[boot]\nkernel = \"k\"\ntimeout = 90\n[[case]]\nname = \"a\"\n",
    )
    .unwrap();
    assert_eq!(f.boot.timeout, Duration::from_secs(90));
    let e = err("[boot]\nkernel = \"k\"\ntimeout = \"0s\"\n[[case]]\nname = \"a\"\n");
    assert_eq!(e, "dir/t.toml:3: boot.timeout: must be longer than 0");
}
