//! What a VM is made of, as plain serde data: one model for the command line (through
//! [`optparse`]'s `key=value` spellings), definition files (TOML), the API (JSON) and
//! snapshot manifests. Everything here is checked before any KVM object exists, so a bad
//! option costs nothing.

pub mod optparse;
pub mod types;

use std::fs::File;
use std::path::{Path, PathBuf};

use devices::disk::{CacheMode, ImageFormat};
use serde::{Deserialize, Serialize};

pub use types::{parse_size, CpuFeatures, CpusConfig, Mac, SerialMode, Size};

/// Guest RAM when `--memory` is not given.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Most vCPUs a VM may have (what the MP table and the guest kit's kernel describe).
pub const MAX_CPUS: u8 = boot::x86_64::mptable::MAX_CPUS;
/// Most guest RAM accepted.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most disks and NICs together (each takes an IRQ of the IOAPIC).
pub const MAX_DEVICES: usize = 16;
/// The balloon's device id.
pub const BALLOON_ID: &str = "balloon";
/// Command line when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k";

/// A user error: names the option (or file) and says what to do. Exit status 2.
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

/// What a guest reset (reboot) does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RebootAction {
    /// Ember exits with status 0.
    #[default]
    Exit,
    /// The VM starts again from the kernel.
    Restart,
}

/// How a virtio device reaches the guest: `transport=mmio|pci` on a device, or the VM's
/// default (`transport` in a definition or the API).
///
/// The default is virtio-mmio: where guest kernel code is emulated (the hosts Ember is
/// measured on), a PCI host costs the guest kernel its PCI and ACPI root-bridge setup at
/// every boot, far more than the two exits per interrupt MSI-X saves on I/O (the README's
/// "Transports" section has the numbers from `benches/pci.sh`). PCI is for guests without
/// `virtio_mmio.device=` support, and for hotplug.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// virtio-mmio, announced on the kernel command line.
    #[default]
    Mmio,
    /// virtio-pci (modern) on the PCI root bus, with MSI-X.
    Pci,
}

/// A disk image format as spelled in options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Raw.
    Raw,
    /// qcow2.
    Qcow2,
}

impl From<DiskFormat> for ImageFormat {
    fn from(f: DiskFormat) -> Self {
        match f {
            DiskFormat::Raw => ImageFormat::Raw,
            DiskFormat::Qcow2 => ImageFormat::Qcow2,
        }
    }
}

/// Host cache mode, as qemu's `cache=` spells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    /// Through the host page cache.
    #[default]
    Writeback,
    /// O_DIRECT.
    None,
}

impl From<DiskCache> for CacheMode {
    fn from(c: DiskCache) -> Self {
        match c {
            DiskCache::Writeback => CacheMode::Writeback,
            DiskCache::None => CacheMode::None,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// One disk: `--disk path=FILE[,id=vdX][,format=raw|qcow2][,readonly=on][,serial=ID][,cache=..]
/// [,transport=mmio|pci]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Device id (`vda`, `vdb`, ... by position when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The image file.
    #[serde(alias = "file")]
    pub path: PathBuf,
    /// Its format; probed when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// The guest may not write.
    #[serde(default, alias = "ro", skip_serializing_if = "is_false")]
    pub readonly: bool,
    /// What the guest reads as the disk's serial number (up to 20 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Host cache mode.
    #[serde(default, skip_serializing_if = "is_default")]
    pub cache: DiskCache,
    /// Transport; the VM's default when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
}

impl DiskConfig {
    /// Parses a `--disk` spec (a bare first item is the path).
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let d: DiskConfig = optparse::parse("--disk", spec, Some("path"))?;
        d.check("--disk")?;
        Ok(d)
    }

    /// Checks what can be checked without opening the image.
    pub fn check(&self, option: &str) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::new(option, m);
        if self.path.as_os_str().is_empty() {
            return Err(err("names no file; use path=FILE".into()));
        }
        if let Some(s) = &self.serial {
            if s.len() > 20 {
                return Err(err(format!("serial={s}: at most 20 characters")));
            }
        }
        if let Some(id) = &self.id {
            check_id(option, id)?;
        }
        Ok(())
    }

    /// The id, once [`VmConfig::normalize`] assigned one.
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or("")
    }
}

/// One NIC: `--net tap=NAME|fd=N|network=NAME|bridge=NAME[,id=ethN][,mac=..][,mtu=N][,transport=mmio|pci]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Device id (`eth0`, `eth1`, ... by position when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A tap by name (opened, or created when Ember may).
    #[serde(default, alias = "ifname", skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// An open tap descriptor handed over by a manager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// A network made by `ember net create`: Ember makes a tap on its bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// An existing host bridge: Ember makes a tap on it (virsh's `--type bridge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// The MAC; derived from the VM name when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
    /// MTU the guest is told.
    #[serde(default = "default_mtu", skip_serializing_if = "is_default_mtu")]
    pub mtu: u16,
    /// Transport; the VM's default when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
}

fn default_mtu() -> u16 {
    1500
}

fn is_default_mtu(m: &u16) -> bool {
    *m == 1500
}

/// Where a NIC's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// A tap by name.
    Tap(String),
    /// An open tap descriptor.
    Fd(i32),
    /// A tap Ember creates on a network's bridge.
    Network(String),
    /// A tap Ember creates on a host bridge.
    Bridge(String),
}

impl NetConfig {
    /// Parses a `--net` spec.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let n: NetConfig = optparse::parse("--net", spec, None)?;
        n.check("--net")?;
        Ok(n)
    }

    /// Checks the backend, MTU and id.
    pub fn check(&self, option: &str) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::new(option, m);
        let given = [
            self.tap.is_some(),
            self.fd.is_some(),
            self.network.is_some(),
            self.bridge.is_some(),
        ];
        match given.iter().filter(|g| **g).count() {
            0 => return Err(err("names no tap=, fd=, network= or bridge=".into())),
            1 => {}
            _ => return Err(err("give one of tap=, fd=, network= or bridge=".into())),
        }
        if let Some(fd) = self.fd {
            if fd <= 2 {
                return Err(err(format!(
                    "fd={fd}: give an open descriptor number above 2"
                )));
            }
        }
        for n in [&self.tap, &self.network, &self.bridge]
            .into_iter()
            .flatten()
        {
            if n.is_empty() || n.len() > 15 || n.contains(['/', ' ']) {
                return Err(err(format!(
                    "'{n}' is not an interface name (1 to 15 characters)"
                )));
            }
        }
        if self.mtu < 68 {
            return Err(err(format!("mtu={}: give 68 to 65535", self.mtu)));
        }
        if let Some(id) = &self.id {
            check_id(option, id)?;
        }
        Ok(())
    }

    /// The backend (the config was checked, so exactly one is set).
    pub fn backend(&self) -> NetBackendConfig {
        match (&self.tap, self.fd, &self.network, &self.bridge) {
            (Some(t), _, _, _) => NetBackendConfig::Tap(t.clone()),
            (_, Some(fd), _, _) => NetBackendConfig::Fd(fd),
            (_, _, Some(n), _) => NetBackendConfig::Network(n.clone()),
            (_, _, _, Some(b)) => NetBackendConfig::Bridge(b.clone()),
            _ => NetBackendConfig::Tap(String::new()),
        }
    }

    /// The id, once [`VmConfig::normalize`] assigned one.
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or("")
    }
}

/// The memory balloon: `--balloon on[,target=SIZE][,deflate_on_oom=on]
/// [,free_page_reporting=on][,stats_period=S][,transport=mmio|pci]` (`off`: none); its id
/// is `balloon`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Guest memory the balloon aims at (virsh's current memory); all of `memory` when not
    /// given. `ember setmem` changes it while the VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Size>,
    /// The guest takes memory back from the balloon when it runs out.
    #[serde(default, skip_serializing_if = "is_false")]
    pub deflate_on_oom: bool,
    /// The guest reports free memory, which leaves the host's RSS.
    #[serde(default, skip_serializing_if = "is_false")]
    pub free_page_reporting: bool,
    /// Seconds between the guest's memory statistics (`ember dommemstat`); 0: none.
    #[serde(default, skip_serializing_if = "is_default")]
    pub stats_period: u16,
    /// Its transport; the VM's default when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
}

impl BalloonConfig {
    /// Parses a `--balloon` spec: `on` or `off` first (`on` when omitted), then keys.
    pub fn parse(spec: &str) -> Result<Option<Self>, ConfigError> {
        const OPT: &str = "--balloon";
        let mut pairs =
            optparse::split_pairs(spec, Some("enabled")).map_err(|m| ConfigError::new(OPT, m))?;
        let mut enabled = true;
        if pairs.first().is_some_and(|(k, _)| k == "enabled") {
            let (_, v) = pairs.remove(0);
            enabled = optparse::parse_switch(&v)
                .ok_or_else(|| ConfigError::new(OPT, format!("'{v}': say on or off first")))?;
        }
        if !enabled {
            if !pairs.is_empty() {
                return Err(ConfigError::new(OPT, "off takes no other keys"));
            }
            return Ok(None);
        }
        let b: BalloonConfig =
            optparse::from_pairs(pairs).map_err(|e| ConfigError::new(OPT, e.to_string()))?;
        Ok(Some(b))
    }

    fn check(&self, memory: u64) -> Result<(), ConfigError> {
        if let Some(t) = self.target {
            if t.0 == 0 || t.0 > memory || !t.0.is_multiple_of(4096) {
                return Err(ConfigError::new(
                    "--balloon",
                    format!(
                        "target={t}: give a multiple of 4K above 0, at most --memory ({})",
                        Size(memory)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a device id: 1 to 32 letters, digits, `-` or `_`.
pub fn check_id(option: &str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty()
        || id.len() > 32
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
    {
        return Err(ConfigError::new(
            option,
            format!("id={id}: use 1 to 32 letters, digits, '-' or '_'"),
        ));
    }
    Ok(())
}

/// Checks a VM name: what `ember VERB NAME` uses, the state directory's and the definition
/// file's name.
pub fn parse_name(s: &str) -> Result<String, ConfigError> {
    if s.is_empty()
        || s.len() > 64
        || s.starts_with('.')
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError::new(
            "--name",
            format!("'{s}': use 1 to 64 letters, digits, '-', '_' or '.' (not first)"),
        ));
    }
    Ok(s.to_string())
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

fn default_memory() -> Size {
    Size(DEFAULT_MEMORY)
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_default_cmdline(s: &str) -> bool {
    s == DEFAULT_CMDLINE
}

/// One VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The VM's name (unique per host).
    pub name: String,
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Initrd / initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(
        default = "default_cmdline",
        skip_serializing_if = "is_default_cmdline"
    )]
    pub cmdline: String,
    /// vCPUs.
    #[serde(default)]
    pub cpus: CpusConfig,
    /// Guest RAM.
    #[serde(default = "default_memory")]
    pub memory: Size,
    /// Serial console.
    #[serde(default, skip_serializing_if = "is_default")]
    pub serial: SerialMode,
    /// CPUID edits (applied after the host's defaults).
    #[serde(default, skip_serializing_if = "CpuFeatures::is_empty")]
    pub cpu_features: CpuFeatures,
    /// What a guest reset does.
    #[serde(default, skip_serializing_if = "is_default")]
    pub reboot: RebootAction,
    /// QEMU's isa-debug-exit on port 0xf4.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub debug_exit: bool,
    /// QEMU's ISA pvpanic on port 0x505: a guest panic ends the run.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub pvpanic: bool,
    /// Root device added to the command line as `root=... rw` (e.g. /dev/vda).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// Block devices, in guest order.
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// NICs, in guest order.
    #[serde(default, rename = "net", skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// The transport of devices that do not name one.
    #[serde(default, skip_serializing_if = "is_default")]
    pub transport: Transport,
    /// The memory balloon (attached after the disks and NICs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// Dirty-page tracking from the start, for Diff snapshots (Firecracker's
    /// `track_dirty_pages`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub track_dirty_pages: bool,
}

/// Checks that `path` (given with `option`) is a readable, non-empty regular file.
pub fn check_readable_file(option: &str, path: &Path) -> Result<(), ConfigError> {
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
    /// A VM with the defaults and this kernel.
    pub fn new(name: &str, kernel: PathBuf) -> Self {
        VmConfig {
            name: name.to_string(),
            kernel,
            initrd: None,
            cmdline: default_cmdline(),
            cpus: CpusConfig::default(),
            memory: default_memory(),
            serial: SerialMode::default(),
            cpu_features: CpuFeatures::default(),
            reboot: RebootAction::default(),
            debug_exit: true,
            pvpanic: true,
            root: None,
            disks: Vec::new(),
            nets: Vec::new(),
            transport: Transport::default(),
            balloon: None,
            track_dirty_pages: false,
        }
    }

    /// Whether the VM has a PCI host: PCI is its default transport or a device's.
    pub fn uses_pci(&self) -> bool {
        let pci = Some(Transport::Pci);
        self.transport == Transport::Pci
            || self.disks.iter().any(|d| d.transport == pci)
            || self.nets.iter().any(|n| n.transport == pci)
            || self.balloon.as_ref().is_some_and(|b| b.transport == pci)
    }

    /// Gives every device an id (vda.., eth0..) and every NIC a MAC derived from
    /// `mac_seed` (the VM's name, or what the name defaulted from), so that what is stored
    /// (definitions, snapshots) is complete.
    pub fn normalize(&mut self, mac_seed: &str) {
        for (i, d) in self.disks.iter_mut().enumerate() {
            d.id.get_or_insert_with(|| disk_id(i));
        }
        for (i, n) in self.nets.iter_mut().enumerate() {
            n.id.get_or_insert_with(|| format!("eth{i}"));
            n.mac
                .get_or_insert_with(|| Mac(devices::virtio::net::mac_for(mac_seed, i)));
        }
    }

    /// Checks what can be checked without touching files: names, sizes, counts, ids.
    pub fn check(&self) -> Result<(), ConfigError> {
        parse_name(&self.name)?;
        let cpus = self.cpus;
        if cpus.boot == 0 || cpus.boot > MAX_CPUS || cpus.max < cpus.boot || cpus.max > MAX_CPUS {
            return Err(ConfigError::new(
                "--cpus",
                format!(
                    "boot={} max={}: give 1 to {MAX_CPUS} vCPUs, max at least boot",
                    cpus.boot, cpus.max
                ),
            ));
        }
        check_memory(self.memory.0)?;
        for d in &self.disks {
            d.check("--disk")?;
        }
        for n in &self.nets {
            n.check("--net")?;
        }
        if let Some(b) = &self.balloon {
            b.check(self.memory.0)?;
        }
        if self.virtio_devices() > MAX_DEVICES {
            return Err(ConfigError::new(
                "--disk",
                format!(
                    "{} disks, NICs and balloon given; at most {MAX_DEVICES} virtio devices",
                    self.virtio_devices()
                ),
            ));
        }
        let mut ids: Vec<&str> = self.disks.iter().filter_map(|d| d.id.as_deref()).collect();
        ids.extend(self.nets.iter().filter_map(|n| n.id.as_deref()));
        if self.balloon.is_some() {
            ids.push(BALLOON_ID);
        }
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::new(
                "--disk/--net",
                format!("two devices have id={}; ids must be unique", w[0]),
            ));
        }
        boot::loader::check_cmdline(&self.cmdline, boot::layout::CMDLINE_MAX_SIZE - 1)
            .map_err(|e| ConfigError::new("--cmdline", e.to_string()))
    }

    /// How many virtio devices the VM has (each takes an IRQ).
    pub fn virtio_devices(&self) -> usize {
        self.disks.len() + self.nets.len() + usize::from(self.balloon.is_some())
    }

    /// [`Self::check`], then that the files are readable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check()?;
        check_readable_file("--kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_readable_file("--initrd", initrd)?;
        }
        for d in &self.disks {
            check_readable_file("--disk", &d.path)?;
        }
        Ok(())
    }
}

/// `vda`, `vdb`, ... `vdz`, `vdaa`, ...
pub fn disk_id(index: usize) -> String {
    let mut suffix = String::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        suffix.insert(0, (b'a' + (n % 26) as u8) as char);
        n /= 26;
    }
    format!("vd{suffix}")
}

/// Checks a guest RAM size.
pub fn check_memory(bytes: u64) -> Result<(), ConfigError> {
    let err = |m: String| ConfigError::new("--memory", m);
    let shown = Size(bytes);
    if bytes < boot::layout::MIN_MEMORY {
        return Err(err(format!(
            "{shown} is too small; give at least {}M",
            boot::layout::MIN_MEMORY >> 20
        )));
    }
    if bytes > MAX_MEMORY {
        return Err(err(format!(
            "{shown} is too large; at most {}G",
            MAX_MEMORY >> 30
        )));
    }
    if !bytes.is_multiple_of(4096) {
        return Err(err(format!("{shown} is not a multiple of 4K")));
    }
    Ok(())
}

/// Parses `--memory`.
pub fn parse_memory(s: &str) -> Result<Size, ConfigError> {
    let bytes = parse_size(s).map_err(|m| ConfigError::new("--memory", m))?;
    check_memory(bytes)?;
    Ok(Size(bytes))
}

/// Parses a value of `option` through its text form.
pub fn parse_text<T: std::str::FromStr<Err = String>>(
    option: &str,
    s: &str,
) -> Result<T, ConfigError> {
    s.parse().map_err(|m| ConfigError::new(option, m))
}

#[cfg(test)]
mod tests;
