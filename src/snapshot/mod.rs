//! VM snapshots: everything a VM is at one instant, written as a state file (the VM's
//! configuration, KVM's VM and vCPU state, every device's state) and a memory file. One
//! capture serves `ember save`/`restore`, Firecracker's `/snapshot/create` and `/load`,
//! `ember snapshot-create-as`/`-revert`, clones and `ember test`'s resets.
//!
//! A restore builds the VM its configuration describes (the same devices at the same
//! addresses), maps the memory file, and applies the states.

pub mod disks;
pub mod format;
pub mod memory;
pub mod rebase;
pub mod store;

use std::path::{Path, PathBuf};

use devices::legacy::acpi_pm::AcpiPmState;
use devices::legacy::cmos::CmosState;
use devices::legacy::cpu_hotplug::CpuHotplugState;
use devices::legacy::i8042::I8042State;
use devices::legacy::pvpanic::PvPanicState;
use devices::legacy::serial::SerialDeviceState;
use devices::virtio::balloon::BalloonState;
use devices::virtio::mmio::MmioState;
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::vstate::{VcpuState, VmState};
pub use format::FormatError;
pub use memory::{MemoryFileError, MemoryRegion};

/// One virtio device's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// Its id.
    pub id: String,
    /// Its MMIO window (must come out the same on restore).
    pub mmio_base: u64,
    /// Its IRQ.
    pub irq: u32,
    /// The transport with the device's queues.
    pub transport: MmioState,
}

/// Every device's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialDeviceState,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// The ACPI PM block.
    pub acpi_pm: AcpiPmState,
    /// The RTC.
    pub cmos: CmosState,
    /// pvpanic, when present.
    pub pvpanic: Option<PvPanicState>,
    /// virtio devices in attach order.
    pub virtio: Vec<VirtioState>,
    /// The balloon's own state (its transport's is in `virtio`), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonState>,
    /// virtio-pci devices in attach order (their placement and transport state).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pci: Vec<crate::device_manager::PciDeviceState>,
    /// The CPU hotplug controller (a VM that may have more than one vCPU): which CPUs are
    /// present, so which the saved vCPU states are for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_hotplug: Option<CpuHotplugState>,
    /// The PCI hotplug controller (slots announced or asked back), when the VM has a PCI
    /// bus (absent from older snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_hotplug: Option<devices::pci::hotplug::PciHotplugState>,
}

/// A VM's state (the state file's payload).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    /// The Ember that wrote it.
    pub ember_version: String,
    /// When (seconds since the epoch).
    pub created: u64,
    /// Whether the VM was paused by its user when the snapshot was taken.
    pub paused: bool,
    /// The VM's configuration.
    pub config: VmConfig,
    /// KVM's VM state.
    pub vm: VmState,
    /// KVM's vCPU states, by index.
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: DevicesState,
    /// The memory file's layout.
    pub memory: Vec<MemoryRegion>,
}

/// Why a snapshot cannot be taken or used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The state file.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The memory file.
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    /// KVM state.
    #[error(transparent)]
    Kvm(#[from] crate::vstate::StateError),
    /// A device refused its state.
    #[error("device state")]
    Device(#[from] devices::persist::StateError),
    /// The dirty-page log cannot be read.
    #[error("dirty-page tracking")]
    Dirty(#[source] crate::dirty::DirtyError),
    /// The vCPUs could not be reached.
    #[error("{0}")]
    Vcpu(String),
    /// The state does not describe a VM this Ember can build.
    #[error("{0}")]
    Invalid(String),
}

/// The memory file that goes with state file `state`: `state.mem`.
pub fn memory_path_for(state: &Path) -> PathBuf {
    let mut p = state.as_os_str().to_owned();
    p.push(".mem");
    PathBuf::from(p)
}

impl SnapshotState {
    /// The CPUs the vCPU states are for, ascending.
    pub fn present_cpus(&self) -> Vec<u8> {
        match &self.devices.cpu_hotplug {
            Some(c) => c.present(),
            None => (0..self.config.cpus.boot).collect(),
        }
    }

    /// With a CPU hotplug controller: as many CPUs as the VM may have, one vCPU state per
    /// present CPU.
    fn check_present_cpus(&self) -> Result<(), SnapshotError> {
        let Some(c) = &self.devices.cpu_hotplug else {
            return Ok(());
        };
        let max = self.config.cpus.max;
        if c.cpus.len() != usize::from(max) {
            return Err(SnapshotError::Invalid(format!(
                "CPU hotplug state for {} CPUs, the VM may have {max}",
                c.cpus.len()
            )));
        }
        let present = c.present().len();
        if present != self.vcpus.len() {
            return Err(SnapshotError::Invalid(format!(
                "{} vCPU states for {present} present CPUs",
                self.vcpus.len()
            )));
        }
        Ok(())
    }

    /// Checks what must hold before anything is built from this state.
    pub fn check(&self) -> Result<(), SnapshotError> {
        self.config
            .check()
            .map_err(|e| SnapshotError::Invalid(format!("its configuration: {e}")))?;
        if self.vcpus.len() != usize::from(self.config.cpus.boot) {
            return Err(SnapshotError::Invalid(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.config.cpus.boot
            )));
        }
        self.check_present_cpus()?;
        // A virtio device's transport state is in `virtio` (mmio) or `pci`.
        let devices = self.config.virtio_devices();
        let saved = self.devices.virtio.len() + self.devices.pci.len();
        if saved != devices {
            return Err(SnapshotError::Invalid(format!(
                "{saved} virtio device states for {devices} devices"
            )));
        }
        let ids: Vec<&str> = (self.config.disks.iter().map(|d| d.id()))
            .chain(self.config.nets.iter().map(|n| n.id()))
            .chain(
                self.config
                    .balloon
                    .as_ref()
                    .map(|_| crate::config::BALLOON_ID),
            )
            .collect();
        let saved_ids = (self.devices.virtio.iter().map(|v| v.id.as_str()))
            .chain(self.devices.pci.iter().map(|p| p.id.as_str()));
        for id in saved_ids {
            if !ids.contains(&id) {
                return Err(SnapshotError::Invalid(format!(
                    "virtio device state {id} is for no disk, NIC or balloon of its configuration"
                )));
            }
        }
        if self.devices.pvpanic.is_some() != self.config.pvpanic {
            return Err(SnapshotError::Invalid(
                "pvpanic state and configuration disagree".into(),
            ));
        }
        Ok(())
    }
}
