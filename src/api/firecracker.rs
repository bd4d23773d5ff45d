//! Firecracker's API bodies and its pre-boot configuration model, mapped onto Ember's one
//! config model ([`VmConfig`]): `PUT /boot-source`, `/machine-config`, `/drives/{id}`,
//! `/network-interfaces/{id}`, `/logger`, `/metrics`, the `--config-file` JSON, and
//! `GET /vm/config` back out. Field names, defaults and error texts follow Firecracker
//! v1.16 so its clients drive Ember unchanged.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::balloon::BalloonDevice;
use crate::config::{self, DiskCache, DiskConfig, Mac, NetConfig, Size, VmConfig};

/// Firecracker's kernel command line when `boot_args` is not given.
pub const DEFAULT_BOOT_ARGS: &str =
    "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce";

/// `PUT /boot-source`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel.
    pub kernel_image_path: String,
    /// The initrd.
    #[serde(default)]
    pub initrd_path: Option<String>,
    /// The kernel command line (replaces the default).
    #[serde(default)]
    pub boot_args: Option<String>,
}

/// Firecracker's hugepage setting (only "None" is supported).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Normal pages.
    #[default]
    None,
    /// 2 MiB pages.
    #[serde(rename = "2M")]
    Huge2M,
}

/// `PUT /machine-config`, `GET /machine-config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs.
    pub vcpu_count: u8,
    /// RAM in MiB.
    pub mem_size_mib: usize,
    /// Simultaneous multithreading (accepted off only).
    #[serde(default)]
    pub smt: bool,
    /// Static CPU template ("None" only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Dirty-page tracking for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Hugepages.
    #[serde(default)]
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

/// `PATCH /machine-config`: every field optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// vCPUs.
    pub vcpu_count: Option<u8>,
    /// RAM in MiB.
    pub mem_size_mib: Option<usize>,
    /// SMT.
    pub smt: Option<bool>,
    /// CPU template.
    pub cpu_template: Option<String>,
    /// Dirty-page tracking.
    pub track_dirty_pages: Option<bool>,
    /// Hugepages.
    pub huge_pages: Option<HugePages>,
}

/// Firecracker's drive cache types.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes are not passed to the host (Firecracker's default).
    #[default]
    Unsafe,
    /// Flushes reach the disk.
    Writeback,
}

/// Firecracker's I/O engines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Synchronous.
    #[default]
    Sync,
    /// io_uring.
    Async,
}

/// `PUT /drives/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The id.
    pub drive_id: String,
    /// Partition UUID for root=PARTUUID=.
    #[serde(default)]
    pub partuuid: Option<String>,
    /// Root device: first disk, root= on the command line.
    pub is_root_device: bool,
    /// Cache type.
    #[serde(default)]
    pub cache_type: CacheType,
    /// Read-only.
    #[serde(default)]
    pub is_read_only: Option<bool>,
    /// The image.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// A rate limiter (not supported).
    #[serde(default)]
    pub rate_limiter: Option<serde_json::Value>,
    /// I/O engine.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// vhost-user socket (not supported).
    #[serde(default)]
    pub socket: Option<String>,
}

/// `PUT /network-interfaces/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The id.
    pub iface_id: String,
    /// The tap.
    pub host_dev_name: String,
    /// The guest's MAC.
    #[serde(default)]
    pub guest_mac: Option<Mac>,
    /// MTU.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Rate limiters (not supported).
    #[serde(default)]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Rate limiters (not supported).
    #[serde(default)]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// `PUT /logger`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Log file (or FIFO).
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    /// Level.
    #[serde(default)]
    pub level: Option<String>,
    /// Print the level.
    #[serde(default)]
    pub show_level: Option<bool>,
    /// Print the origin.
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    /// Only this module.
    #[serde(default)]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// Where `FlushMetrics` writes.
    pub metrics_path: PathBuf,
}

/// `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateChange {
    /// The state asked for.
    pub state: VmStateName,
}

/// States `PATCH /vm` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum VmStateName {
    /// Pause.
    Paused,
    /// Resume.
    Resumed,
}

/// `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    /// The action.
    pub action_type: ActionType,
}

/// Firecracker's actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    /// Write the metrics.
    FlushMetrics,
    /// Boot the configured VM.
    InstanceStart,
    /// Ctrl-Alt-Del on the i8042.
    SendCtrlAltDel,
}

/// Firecracker's snapshot kinds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    /// All of memory.
    #[default]
    Full,
    /// Only the pages written since the last snapshot.
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// The memory file.
    pub mem_file_path: PathBuf,
    /// Full or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

/// Where a snapshot's memory comes from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// File (or Uffd, not supported).
    pub backend_type: MemBackendType,
    /// The file.
    pub backend_path: PathBuf,
}

/// Memory backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum MemBackendType {
    /// A memory file, mapped.
    File,
    /// A userfaultfd handler (not supported).
    Uffd,
}

/// A NIC's new tap for a restored VM.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The NIC.
    pub iface_id: String,
    /// Its new tap.
    pub host_dev_name: String,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// The memory file (deprecated spelling).
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    /// The memory backend.
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// Dirty-page tracking.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Dirty-page tracking (deprecated spelling).
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Run the VM once loaded (else it is paused).
    #[serde(default)]
    pub resume_vm: bool,
    /// New taps for the NICs.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
}

impl SnapshotLoad {
    /// The memory file, from exactly one of `mem_backend` (File) or `mem_file_path`.
    pub fn memory_file(&self) -> Result<PathBuf, String> {
        const PREFIX: &str = "An error occurred when deserializing the json body of a request";
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(b), None) if b.backend_type == MemBackendType::File => Ok(b.backend_path.clone()),
            (Some(_), None) => Err("Load snapshot error: the Uffd memory backend is not \
                                    supported; use File"
                .into()),
            (None, Some(p)) => Ok(p.clone()),
            (None, None) => Err(format!(
                "{PREFIX}: missing field: either `mem_backend` or `mem_file_path` is required."
            )),
            (Some(_), Some(_)) => Err(format!(
                "{PREFIX}: too many fields: either `mem_backend` or `mem_file_path` \
                 exclusively is required."
            )),
        }
    }
}

/// The `--config-file` JSON (unknown top-level keys are ignored, as Firecracker does).
#[derive(Clone, Debug, Deserialize)]
pub struct ConfigFile {
    /// Boot source.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// Drives (required, as in Firecracker).
    pub drives: Vec<Drive>,
    /// Machine.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    /// NICs.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// Logger.
    #[serde(default)]
    pub logger: Option<Logger>,
    /// Metrics.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// The balloon.
    #[serde(default)]
    pub balloon: Option<BalloonDevice>,
}

/// Error texts, as Firecracker words them.
pub mod msg {
    /// Operation allowed only after InstanceStart.
    pub const BEFORE_START: &str =
        "The requested operation is not supported before starting the microVM.";
    /// Operation allowed only before InstanceStart.
    pub const AFTER_START: &str =
        "The requested operation is not supported after starting the microVM.";
    /// InstanceStart without a kernel.
    pub const NO_KERNEL: &str =
        "Start microvm error: Cannot start microvm without kernel configuration.";
    /// Bad vCPU count.
    pub const VCPUS: &str = "Machine config error: The number of vCPUs must be greater than 0, \
                             less than 32 and must be 1 or an even number if SMT is enabled.";
    /// Bad memory size.
    pub const MEMORY: &str = "Machine config error: The memory size (MiB) is either 0, or not a \
                              multiple of the configured page size.";
}

/// What the API has configured before `InstanceStart`.
#[derive(Clone, Debug, Default)]
pub struct PendingVm {
    /// Boot source.
    pub boot_source: Option<BootSource>,
    /// Machine.
    pub machine: MachineConfig,
    /// Drives, root first.
    pub drives: Vec<Drive>,
    /// NICs.
    pub nets: Vec<NetworkInterface>,
    /// Logger.
    pub logger: Option<Logger>,
    /// Metrics.
    pub metrics: Option<Metrics>,
    /// The balloon.
    pub balloon: Option<BalloonDevice>,
}

fn fault(prefix: &str, e: impl std::fmt::Display) -> String {
    format!("{prefix}: {e}")
}

impl PendingVm {
    /// Checks and records `PUT /boot-source` (files must be readable now, as Firecracker
    /// opens them at PUT time).
    pub fn set_boot_source(&mut self, b: BootSource) -> Result<(), String> {
        config::check_readable_file("kernel", b.kernel_image_path.as_ref()).map_err(|e| {
            fault(
                "Boot source error: The kernel file cannot be opened",
                e.message,
            )
        })?;
        if let Some(i) = &b.initrd_path {
            config::check_readable_file("initrd", i.as_ref()).map_err(|e| {
                fault(
                    "Boot source error: The initrd file cannot be opened",
                    e.message,
                )
            })?;
        }
        if let Some(args) = &b.boot_args {
            boot::loader::check_cmdline(args, boot::layout::CMDLINE_MAX_SIZE - 1)
                .map_err(|e| fault("Boot source error: The kernel command line is invalid", e))?;
        }
        self.boot_source = Some(b);
        Ok(())
    }

    /// Checks and records `PUT /machine-config`.
    pub fn set_machine(&mut self, m: MachineConfig) -> Result<(), String> {
        check_machine(&m)?;
        super::balloon::check_machine_memory(self, m.mem_size_mib)?;
        self.machine = m;
        Ok(())
    }

    /// Applies `PATCH /machine-config`.
    pub fn patch_machine(&mut self, u: MachineConfigUpdate) -> Result<(), String> {
        let mut m = self.machine.clone();
        m.vcpu_count = u.vcpu_count.unwrap_or(m.vcpu_count);
        m.mem_size_mib = u.mem_size_mib.unwrap_or(m.mem_size_mib);
        m.smt = u.smt.unwrap_or(m.smt);
        m.cpu_template = u.cpu_template.or(m.cpu_template);
        m.track_dirty_pages = u.track_dirty_pages.unwrap_or(m.track_dirty_pages);
        m.huge_pages = u.huge_pages.unwrap_or(m.huge_pages);
        self.set_machine(m)
    }

    /// Checks and records `PUT /drives/{id}` (same id = replace; a root drive goes first).
    pub fn set_drive(&mut self, d: Drive) -> Result<(), String> {
        const PREFIX: &str = "Drive config error: Unable to create the virtio block device";
        if d.socket.is_some() {
            return Err(fault(PREFIX, "vhost-user block devices are not supported"));
        }
        if d.rate_limiter.as_ref().is_some_and(|r| !r.is_null()) {
            return Err(fault(PREFIX, "rate limiters are not supported"));
        }
        let Some(path) = &d.path_on_host else {
            return Err(fault(PREFIX, "Invalid block config."));
        };
        config::check_readable_file("drive", path.as_ref())
            .map_err(|e| fault(PREFIX, e.message))?;
        if d.is_root_device
            && self
                .drives
                .iter()
                .any(|x| x.is_root_device && x.drive_id != d.drive_id)
        {
            return Err("Drive config error: A root block device already exists!".into());
        }
        self.drives.retain(|x| x.drive_id != d.drive_id);
        if d.is_root_device {
            self.drives.insert(0, d);
        } else {
            self.drives.push(d);
        }
        Ok(())
    }

    /// Checks and records `PUT /network-interfaces/{id}`.
    pub fn set_net(&mut self, n: NetworkInterface) -> Result<(), String> {
        const PREFIX: &str = "Network config error";
        let limited = |r: &Option<serde_json::Value>| r.as_ref().is_some_and(|v| !v.is_null());
        if limited(&n.rx_rate_limiter) || limited(&n.tx_rate_limiter) {
            return Err(fault(PREFIX, "rate limiters are not supported"));
        }
        if let Some(mac) = n.guest_mac {
            if self
                .nets
                .iter()
                .any(|x| x.iface_id != n.iface_id && x.guest_mac == Some(mac))
            {
                return Err(fault(
                    PREFIX,
                    format!("The MAC address is already in use: {mac}"),
                ));
            }
        }
        if n.host_dev_name.is_empty() || n.host_dev_name.len() > 15 {
            return Err(fault(PREFIX, "host_dev_name is not an interface name"));
        }
        match self.nets.iter_mut().find(|x| x.iface_id == n.iface_id) {
            Some(x) => *x = n,
            None => self.nets.push(n),
        }
        Ok(())
    }

    /// The VM `InstanceStart` boots, named `name`.
    pub fn to_vm_config(&self, name: &str) -> Result<VmConfig, String> {
        let b = self.boot_source.as_ref().ok_or(msg::NO_KERNEL)?;
        let mut c = VmConfig::new(name, PathBuf::from(&b.kernel_image_path));
        c.initrd = b.initrd_path.as_ref().map(PathBuf::from);
        c.cmdline = b
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
        c.cpus = config::CpusConfig {
            boot: self.machine.vcpu_count,
            max: self.machine.vcpu_count,
        };
        c.memory = Size((self.machine.mem_size_mib as u64) << 20);
        c.track_dirty_pages = self.machine.track_dirty_pages;
        c.serial = config::SerialMode::Stdio;
        for d in &self.drives {
            c.disks.push(DiskConfig {
                id: Some(d.drive_id.clone()),
                path: PathBuf::from(d.path_on_host.clone().unwrap_or_default()),
                format: None,
                readonly: d.is_read_only.unwrap_or(false),
                serial: None,
                cache: DiskCache::Writeback,
                transport: None,
            });
            if d.is_root_device {
                c.root = Some(match &d.partuuid {
                    Some(u) => format!("PARTUUID={u}"),
                    None => "/dev/vda".into(),
                });
            }
        }
        for n in &self.nets {
            c.nets.push(NetConfig {
                id: Some(n.iface_id.clone()),
                tap: Some(n.host_dev_name.clone()),
                fd: None,
                network: None,
                bridge: None,
                mac: n.guest_mac,
                mtu: n.mtu.unwrap_or(1500),
                transport: None,
            });
        }
        c.balloon = self
            .balloon
            .as_ref()
            .map(|b| super::balloon::config_of(b, c.memory.0));
        c.normalize(name);
        c.check().map_err(|e| format!("Start microvm error: {e}"))?;
        Ok(c)
    }

    /// The pending configuration from a `--config-file`.
    pub fn from_file(f: ConfigFile) -> Result<Self, String> {
        let mut p = PendingVm::default();
        if let Some(l) = f.logger {
            p.logger = Some(l);
        }
        p.metrics = f.metrics;
        if let Some(m) = f.machine_config {
            p.set_machine(m)?;
        }
        p.set_boot_source(f.boot_source)?;
        for d in f.drives {
            p.set_drive(d)?;
        }
        for n in f.network_interfaces {
            p.set_net(n)?;
        }
        if let Some(b) = f.balloon {
            p.set_balloon(b)?;
        }
        Ok(p)
    }
}

fn check_machine(m: &MachineConfig) -> Result<(), String> {
    if m.vcpu_count == 0
        || m.vcpu_count > 32
        || (m.smt && m.vcpu_count > 1 && m.vcpu_count % 2 == 1)
    {
        return Err(msg::VCPUS.into());
    }
    if m.mem_size_mib == 0 || (m.huge_pages == HugePages::Huge2M && m.mem_size_mib % 2 == 1) {
        return Err(msg::MEMORY.into());
    }
    if m.huge_pages != HugePages::None {
        return Err("Machine config error: hugepages are not supported".into());
    }
    if m.cpu_template.as_deref().is_some_and(|t| t != "None") {
        return Err(
            "Machine config error: static CPU templates are not supported; use \
                    --cpu-features"
                .into(),
        );
    }
    config::check_memory((m.mem_size_mib as u64) << 20)
        .map_err(|e| format!("Machine config error: {}", e.message))
}

/// `GET /machine-config` of a configured VM.
pub fn machine_of(c: &VmConfig) -> MachineConfig {
    MachineConfig {
        vcpu_count: c.cpus.boot,
        mem_size_mib: (c.memory.0 >> 20) as usize,
        track_dirty_pages: c.track_dirty_pages,
        ..MachineConfig::default()
    }
}

/// `GET /vm/config`: Firecracker's FullVmConfiguration, every key present.
pub fn full_config(
    boot: Option<&BootSource>,
    machine: &MachineConfig,
    drives: &[Drive],
    nets: &[NetworkInterface],
) -> serde_json::Value {
    let empty = BootSource::default();
    serde_json::json!({
        "balloon": null,
        "drives": drives,
        "boot-source": boot.unwrap_or(&empty),
        "cpu-config": null,
        "logger": null,
        "machine-config": machine,
        "metrics": null,
        "mmds-config": null,
        "network-interfaces": nets,
        "vsock": null,
        "entropy": null,
        "pmem": [],
        "memory-hotplug": null,
    })
}

/// The Firecracker view of a running VM's configuration.
pub fn describe(c: &VmConfig) -> (BootSource, MachineConfig, Vec<Drive>, Vec<NetworkInterface>) {
    let boot = BootSource {
        kernel_image_path: c.kernel.display().to_string(),
        initrd_path: c.initrd.as_ref().map(|p| p.display().to_string()),
        boot_args: Some(c.cmdline.clone()),
    };
    let drives = c
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| Drive {
            drive_id: d.id().to_string(),
            partuuid: None,
            is_root_device: i == 0 && c.root.as_deref() == Some("/dev/vda"),
            cache_type: CacheType::Writeback,
            is_read_only: Some(d.readonly),
            path_on_host: Some(d.path.display().to_string()),
            rate_limiter: None,
            io_engine: IoEngine::Sync,
            socket: None,
        })
        .collect();
    let nets = c
        .nets
        .iter()
        .map(|n| NetworkInterface {
            iface_id: n.id().to_string(),
            host_dev_name: n.tap.clone().unwrap_or_default(),
            guest_mac: n.mac,
            mtu: Some(n.mtu),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        })
        .collect();
    (boot, machine_of(c), drives, nets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"\x7fELF").unwrap();
        f
    }

    #[test]
    fn the_go_sdk_sequence_builds_a_vm_config() {
        let k = kernel();
        let disk = kernel();
        let mut p = PendingVm::default();
        let m: MachineConfig =
            serde_json::from_str("{\"vcpu_count\":2,\"mem_size_mib\":256,\"smt\":false}\n")
                .unwrap();
        p.set_machine(m).unwrap();
        let b = BootSource {
            kernel_image_path: k.path().display().to_string(),
            initrd_path: None,
            boot_args: Some("console=ttyS0 reboot=k".into()),
        };
        p.set_boot_source(b).unwrap();
        let d: Drive = serde_json::from_value(serde_json::json!({
            "drive_id": "rootfs", "path_on_host": disk.path(), "is_root_device": true,
            "is_read_only": false}))
        .unwrap();
        p.set_drive(d).unwrap();
        let c = p.to_vm_config("vm1").unwrap();
        assert_eq!(c.cpus.boot, 2);
        assert_eq!(c.memory, Size(256 << 20));
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        assert_eq!(c.disks[0].id(), "rootfs");
        assert_eq!(c.cmdline, "console=ttyS0 reboot=k");
        assert!(!c.track_dirty_pages);
        p.patch_machine(MachineConfigUpdate {
            track_dirty_pages: Some(true),
            ..MachineConfigUpdate::default()
        })
        .unwrap();
        let c = p.to_vm_config("vm1").unwrap();
        assert!(c.track_dirty_pages, "PATCH /machine-config reaches the VM");
        assert!(
            machine_of(&c).track_dirty_pages,
            "and GET /machine-config shows it"
        );
    }

    #[test]
    fn bad_bodies_and_configs_are_refused_with_firecrackers_words() {
        let mut p = PendingVm::default();
        let m = MachineConfig {
            vcpu_count: 0,
            ..MachineConfig::default()
        };
        assert_eq!(p.set_machine(m).unwrap_err(), msg::VCPUS);
        assert_eq!(p.to_vm_config("x").unwrap_err(), msg::NO_KERNEL);
        let e = serde_json::from_str::<MachineConfig>(
            "{\"vcpu_count\":1,\"mem_size_mib\":1,\"foo\":1}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `foo`"));
        let b = BootSource {
            kernel_image_path: "/nonexistent".into(),
            ..BootSource::default()
        };
        assert!(p
            .set_boot_source(b)
            .unwrap_err()
            .starts_with("Boot source error"));
    }

    #[test]
    fn a_second_root_drive_is_refused_and_root_goes_first() {
        let disk = kernel();
        let path = disk.path().display().to_string();
        let drive = |id: &str, root| Drive {
            drive_id: id.into(),
            partuuid: None,
            is_root_device: root,
            cache_type: CacheType::Unsafe,
            is_read_only: None,
            path_on_host: Some(path.clone()),
            rate_limiter: None,
            io_engine: IoEngine::Sync,
            socket: None,
        };
        let mut p = PendingVm::default();
        p.set_drive(drive("data", false)).unwrap();
        p.set_drive(drive("root", true)).unwrap();
        assert_eq!(p.drives[0].drive_id, "root");
        assert!(p
            .set_drive(drive("root2", true))
            .unwrap_err()
            .contains("already exists"));
    }

    #[test]
    fn full_config_has_every_key() {
        let v = full_config(None, &MachineConfig::default(), &[], &[]);
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 13);
        assert_eq!(v["machine-config"]["mem_size_mib"], 128);
        assert_eq!(v["boot-source"]["kernel_image_path"], "");
    }
}
