//! What a VM is made of, as plain data, and the parsers of the user's spellings.
//! Everything here is checked before any KVM object exists, so a bad option costs nothing.

use std::fs::File;
use std::path::PathBuf;

use boot::x86_64::cpuid::{CpuidError, FeatureEdits};
use devices::disk::{CacheMode, ImageFormat};

/// Guest RAM when `--memory` is not given.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// vCPUs when `--cpus` is not given.
pub const DEFAULT_CPUS: u8 = 1;
/// Most vCPUs a VM may have (what the MP table and the guest kit's kernel describe).
pub const MAX_CPUS: u8 = boot::x86_64::mptable::MAX_CPUS;
/// Most guest RAM accepted.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most `--disk`s (each takes an IRQ of the IOAPIC).
pub const MAX_DISKS: usize = 16;
/// Command line when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k";

/// A user error: names the option and says what to do. Exit status 2.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{option}: {message}")]
pub struct ConfigError {
    /// The option (or file) at fault, as the user spelled it.
    pub option: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl ConfigError {
    /// An error about `option`.
    pub fn new(option: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            option: option.into(),
            message: message.into(),
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// This process's stdin/stdout (raw mode on a terminal; Ctrl-] quits).
    Stdio,
    /// A new pseudo-terminal whose path is printed.
    Pty,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output discarded; no input.
    None,
}

/// What a guest reset (reboot) does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebootAction {
    /// Ember exits with status 0.
    Exit,
    /// The VM starts again from the kernel.
    Restart,
}

/// One `--disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// Its format; probed when None.
    pub format: Option<ImageFormat>,
    /// The guest may not write.
    pub read_only: bool,
    /// What the guest reads as the disk's serial number.
    pub serial: Option<String>,
    /// Host cache mode.
    pub cache: CacheMode,
}

/// Parses `--disk path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID][,cache=writeback|none]`
/// (a bare `FILE` is a path).
pub fn parse_disk(s: &str) -> Result<DiskConfig, ConfigError> {
    let err = |m: String| ConfigError::new("--disk", m);
    let mut disk = DiskConfig {
        path: PathBuf::new(),
        format: None,
        read_only: false,
        serial: None,
        cache: CacheMode::Writeback,
    };
    for (i, item) in s.split(',').enumerate() {
        let (key, value) = match item.split_once('=') {
            Some(kv) => kv,
            None if i == 0 => ("path", item),
            None => return Err(err(format!("'{item}' is not key=value"))),
        };
        match key {
            "path" | "file" => disk.path = PathBuf::from(value),
            "format" => {
                disk.format = Some(
                    ImageFormat::from_name(value)
                        .ok_or_else(|| err(format!("format={value}: use raw or qcow2")))?,
                )
            }
            "readonly" | "ro" => {
                disk.read_only = match value {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(err(format!("readonly={value}: use on or off"))),
                }
            }
            "serial" => {
                if value.len() > 20 {
                    return Err(err(format!("serial={value}: at most 20 characters")));
                }
                disk.serial = Some(value.to_string());
            }
            "cache" => {
                disk.cache = match value {
                    "writeback" => CacheMode::Writeback,
                    "none" => CacheMode::None,
                    _ => return Err(err(format!("cache={value}: use writeback or none"))),
                }
            }
            other => {
                return Err(err(format!(
                    "unknown key '{other}'; use path, format, readonly, serial or cache"
                )))
            }
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err(err(format!("'{s}' names no file; use path=FILE")));
    }
    Ok(disk)
}

/// Where a NIC's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// A tap by name (attached, or created when Ember may).
    Tap(String),
    /// An open tap descriptor handed over by a manager.
    Fd(i32),
    /// A tap Ember creates and plugs into a network made by `ember net create`.
    Network(String),
}

/// One `--net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The backend.
    pub backend: NetBackendConfig,
    /// The MAC; derived from the VM name when None.
    pub mac: Option<[u8; 6]>,
    /// MTU the guest is told.
    pub mtu: u16,
}

/// Parses a MAC like 52:54:00:12:34:56.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    (mac[0] & 1 == 0).then_some(mac)
}

/// Parses `--net tap=NAME|fd=N|network=NAME[,mac=52:54:00:xx:xx:xx][,mtu=N]`.
pub fn parse_net(s: &str) -> Result<NetConfig, ConfigError> {
    let err = |m: String| ConfigError::new("--net", m);
    let mut backend = None;
    let mut mac = None;
    let mut mtu = 1500u16;
    for item in s.split(',') {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| err(format!("'{item}' is not key=value")))?;
        let set = |b: &mut Option<NetBackendConfig>, x: NetBackendConfig| {
            if b.is_some() {
                return Err(err("give one of tap=, fd= or network=".into()));
            }
            *b = Some(x);
            Ok(())
        };
        match k {
            "tap" | "ifname" => set(&mut backend, NetBackendConfig::Tap(v.into()))?,
            "network" => set(&mut backend, NetBackendConfig::Network(v.into()))?,
            "fd" => {
                let fd = v.parse::<i32>().ok().filter(|fd| *fd > 2).ok_or_else(|| {
                    err(format!("fd={v}: give an open descriptor number above 2"))
                })?;
                set(&mut backend, NetBackendConfig::Fd(fd))?
            }
            "mac" => {
                mac = Some(parse_mac(v).ok_or_else(|| {
                    err(format!(
                        "mac={v}: give a unicast MAC like 52:54:00:12:34:56"
                    ))
                })?)
            }
            "mtu" => {
                mtu = v
                    .parse::<u16>()
                    .ok()
                    .filter(|m| *m >= 68)
                    .ok_or_else(|| err(format!("mtu={v}: give 68 to 65535")))?
            }
            other => {
                return Err(err(format!(
                    "unknown key '{other}'; use tap, fd, network, mac or mtu"
                )))
            }
        }
    }
    let backend = backend.ok_or_else(|| err(format!("'{s}' names no tap=, fd= or network=")))?;
    if let NetBackendConfig::Tap(n) | NetBackendConfig::Network(n) = &backend {
        if n.is_empty() || n.len() > 15 || n.contains(['/', ' ']) {
            return Err(err(format!(
                "'{n}' is not an interface name (1 to 15 characters)"
            )));
        }
    }
    Ok(NetConfig { backend, mac, mtu })
}

/// Parses `--name`: what logs say and what default MACs derive from.
pub fn parse_name(s: &str) -> Result<String, ConfigError> {
    if s.is_empty()
        || s.len() > 64
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError::new(
            "--name",
            format!("'{s}': use 1 to 64 letters, digits, '-', '_' or '.'"),
        ));
    }
    Ok(s.to_string())
}

/// One VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Initrd / initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count.
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Serial console.
    pub serial: SerialMode,
    /// The user's CPUID edits (applied after the host defaults).
    pub cpu_features: FeatureEdits,
    /// Reset behaviour.
    pub reboot: RebootAction,
    /// Whether the debug-exit port is present.
    pub debug_exit: bool,
    /// Block devices, in guest order (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// Root device added to the command line as `root=... rw` (e.g. /dev/vda).
    pub root: Option<String>,
    /// NICs, in guest order (eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
    /// The VM's name.
    pub name: String,
}

/// Parses a size: a number with an optional K/M/G/T suffix (binary units, optional `iB`/`B`);
/// a bare number means MiB, as qemu's `-m` does.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("'{s}' is not a size; use e.g. 256M or 2G"));
    }
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "B" => 0,
        other => {
            return Err(format!(
                "unknown size suffix '{other}' in '{s}'; use K, M, G or T"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses `--memory`.
pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    let err = |m: String| ConfigError::new("--memory", m);
    let bytes = parse_size(s).map_err(err)?;
    if bytes < boot::layout::MIN_MEMORY {
        return Err(err(format!(
            "{s} is too small; give at least {}M",
            boot::layout::MIN_MEMORY >> 20
        )));
    }
    if bytes > MAX_MEMORY {
        return Err(err(format!(
            "{s} is too large; at most {}G",
            MAX_MEMORY >> 30
        )));
    }
    if bytes % 4096 != 0 {
        return Err(err(format!("{s} is not a multiple of 4K")));
    }
    Ok(bytes)
}

/// Parses `--cpus`.
pub fn parse_cpus(s: &str) -> Result<u8, ConfigError> {
    let err = |m: String| ConfigError::new("--cpus", m);
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| err(format!("'{s}' is not a number of vCPUs")))?;
    if n == 0 || n > u32::from(MAX_CPUS) {
        return Err(err(format!("{n} vCPUs asked; give 1 to {MAX_CPUS}")));
    }
    Ok(n as u8)
}

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<SerialMode, ConfigError> {
    match s {
        "stdio" => Ok(SerialMode::Stdio),
        "pty" => Ok(SerialMode::Pty),
        "none" | "null" => Ok(SerialMode::None),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(ConfigError::new(
                "--serial",
                format!("'{s}' is not a console; use stdio, pty, file=PATH or none"),
            )),
        },
    }
}

/// Parses `--cpu-features`.
pub fn parse_cpu_features(s: &str) -> Result<FeatureEdits, ConfigError> {
    FeatureEdits::parse(s)
        .map_err(|e: CpuidError| ConfigError::new("--cpu-features", e.to_string()))
}

/// Parses `--reboot`.
pub fn parse_reboot(s: &str) -> Result<RebootAction, ConfigError> {
    match s {
        "exit" => Ok(RebootAction::Exit),
        "restart" => Ok(RebootAction::Restart),
        _ => Err(ConfigError::new(
            "--reboot",
            format!("'{s}' is not a reboot action; use exit or restart"),
        )),
    }
}

/// Checks that `path` (given with `option`) is a readable, non-empty regular file.
pub fn check_readable_file(option: &str, path: &PathBuf) -> Result<(), ConfigError> {
    let shown = path.display();
    let file = File::open(path)
        .map_err(|e| ConfigError::new(option, format!("cannot open '{shown}': {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| ConfigError::new(option, format!("cannot read '{shown}': {e}")))?;
    if !meta.is_file() {
        return Err(ConfigError::new(
            option,
            format!("'{shown}' is not a regular file"),
        ));
    }
    if meta.len() == 0 {
        return Err(ConfigError::new(option, format!("'{shown}' is empty")));
    }
    Ok(())
}

impl VmConfig {
    /// Checks what can be checked before the VM exists: files are readable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_readable_file("--kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_readable_file("--initrd", initrd)?;
        }
        for d in &self.disks {
            check_readable_file("--disk", &d.path)?;
        }
        if self.disks.len() + self.nets.len() > MAX_DISKS {
            return Err(ConfigError::new(
                "--disk",
                format!(
                    "{} disks and NICs given; at most {MAX_DISKS} virtio devices",
                    self.disks.len() + self.nets.len()
                ),
            ));
        }
        boot::loader::check_cmdline(&self.cmdline, boot::layout::CMDLINE_MAX_SIZE - 1)
            .map_err(|e| ConfigError::new("--cmdline", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_suffixes_and_bare_mib() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn sizes_reject_bad_suffix_garbage_and_overflow() {
        assert!(parse_size("12Q")
            .unwrap_err()
            .contains("unknown size suffix 'Q'"));
        assert!(parse_size("M").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-5M").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(parse_size("18446744073709551615G").is_err());
    }

    #[test]
    fn memory_bounds_name_the_option() {
        let e = parse_memory("8M").unwrap_err();
        assert_eq!(e.option, "--memory");
        assert!(e.message.contains("too small"));
        assert!(parse_memory("2T").is_err());
        assert!(parse_memory("100001K").is_err());
        assert_eq!(parse_memory("64M"), Ok(64 << 20));
    }

    #[test]
    fn cpus_are_bounded() {
        assert_eq!(parse_cpus("2"), Ok(2));
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("33").unwrap_err().message.contains("1 to 32"));
        assert!(parse_cpus("two").is_err());
    }

    #[test]
    fn serial_modes_parse() {
        assert_eq!(parse_serial("stdio"), Ok(SerialMode::Stdio));
        assert_eq!(parse_serial("pty"), Ok(SerialMode::Pty));
        assert_eq!(parse_serial("none"), Ok(SerialMode::None));
        assert_eq!(
            parse_serial("file=/tmp/x.log"),
            Ok(SerialMode::File("/tmp/x.log".into()))
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tcp:1234").is_err());
    }

    #[test]
    fn missing_or_empty_files_are_user_errors() {
        let e = check_readable_file("--kernel", &"/nonexistent/bzImage".into()).unwrap_err();
        assert_eq!(e.option, "--kernel");
        assert!(e.message.contains("cannot open '/nonexistent/bzImage'"));
        let empty = tempfile::NamedTempFile::new().unwrap();
        let e = check_readable_file("--initrd", &empty.path().to_path_buf()).unwrap_err();
        assert!(e.message.contains("is empty"));
        let dir = tempfile::tempdir().unwrap();
        let e = check_readable_file("--kernel", &dir.path().to_path_buf()).unwrap_err();
        assert!(e.message.contains("not a regular file"));
    }

    #[test]
    fn disks_parse_all_keys_and_bare_paths() {
        let d = parse_disk("path=a.qcow2,format=qcow2,readonly=on,serial=abc,cache=none").unwrap();
        assert_eq!(d.path, PathBuf::from("a.qcow2"));
        assert_eq!(d.format, Some(ImageFormat::Qcow2));
        assert!(d.read_only);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert_eq!(d.cache, CacheMode::None);
        assert_eq!(
            parse_disk("disk.raw").unwrap().path,
            PathBuf::from("disk.raw")
        );
    }

    #[test]
    fn bad_disk_specs_name_the_option() {
        for bad in [
            "format=qcow2",
            "path=a,format=vmdk",
            "path=a,readonly=maybe",
            "path=a,cache=directsync",
            "path=a,colour=red",
            "path=a,serial=123456789012345678901",
            "path=a,junk",
        ] {
            let e = parse_disk(bad).unwrap_err();
            assert_eq!(e.option, "--disk", "{bad}");
        }
    }

    #[test]
    fn nets_parse_backends_mac_and_mtu() {
        let n = parse_net("tap=tap0,mac=52:54:00:ab:cd:ef,mtu=9000").unwrap();
        assert_eq!(n.backend, NetBackendConfig::Tap("tap0".into()));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!(n.mtu, 9000);
        assert_eq!(parse_net("fd=5").unwrap().backend, NetBackendConfig::Fd(5));
        assert_eq!(
            parse_net("network=default").unwrap().backend,
            NetBackendConfig::Network("default".into())
        );
    }

    #[test]
    fn bad_nets_name_the_option() {
        for bad in [
            "tap=",
            "tap=a,network=b",
            "fd=1",
            "fd=x",
            "tap=t,mac=01:00:5e:00:00:01",
            "tap=t,mac=zz:00:00:00:00:00",
            "tap=t,mtu=10",
            "tap=t,speed=fast",
            "mac=52:54:00:00:00:01",
            "tap=name-much-too-long",
        ] {
            assert_eq!(parse_net(bad).unwrap_err().option, "--net", "{bad}");
        }
        assert!(parse_name("web-1").is_ok());
        assert_eq!(parse_name("a b").unwrap_err().option, "--name");
    }

    #[test]
    fn cpu_features_errors_name_the_option() {
        let e = parse_cpu_features("-nosuch").unwrap_err();
        assert_eq!(e.option, "--cpu-features");
        assert!(parse_cpu_features("-cx16,+popcnt").is_ok());
    }
}
