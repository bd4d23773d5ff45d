//! PCI: one root bus (segment 0, bus 0) behind a host bridge, its configuration space
//! reached through ports 0xcf8/0xcfc and through an ECAM window, functions with memory
//! BARs and MSI-X.
//!
//! Nothing here knows KVM. When the guest moves a BAR (or turns decoding on or off) the
//! root tells the function's [`BarMapper`], which the VMM implements by moving the bus
//! range and the ioeventfds; MSI-X messages leave through an [`msix::MsiSink`]. The root
//! hands out slots that devices can be added to and removed from while the guest runs
//! (the ACPI hotplug controller's slots).

pub mod config;
pub mod hotplug;
pub mod msix;
pub mod root;

pub use config::{BarKind, BarRegion, PciConfig, PciIds};
pub use hotplug::PciHotplug;
pub use root::{BarWindow, PciConfigIo, PciEcam, PciRoot};

/// The vendor ID of virtio devices.
pub const VENDOR_VIRTIO: u16 = 0x1af4;
/// Red Hat, Inc.: the host bridge's vendor (the ID guests know from QEMU's PCIe host).
pub const VENDOR_REDHAT: u16 = 0x1b36;
/// The host bridge's device ID.
pub const DEVICE_HOST_BRIDGE: u16 = 0x0008;
/// Class code of a host bridge.
pub const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;
/// Device slots of the root bus (slot 0 is the host bridge).
pub const SLOTS: u8 = 32;
/// Bytes of ECAM space per bus.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// A PCI function on the root bus: its configuration space and its BARs.
pub trait PciDevice: Send {
    /// A guest read of configuration space at `offset` (0 to 4095).
    fn config_read(&mut self, offset: u16, data: &mut [u8]);
    /// A guest write to configuration space at `offset`.
    fn config_write(&mut self, offset: u16, data: &[u8]);
    /// Where each BAR decodes now, by BAR number (None: nowhere).
    fn bar_regions(&self) -> [Option<BarRegion>; config::BAR_COUNT];
    /// A guest read at `offset` into BAR `bar`.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// A guest write at `offset` into BAR `bar`.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
}

/// Where the VMM follows a function's BARs: each call says where BAR `bar` decodes from
/// now on, and the mapper moves its bus range and ioeventfds there (or takes them away
/// for None). The mapper decides what it accepts: a range outside the PCI windows, over
/// RAM or over another device stays unmapped.
pub trait BarMapper: Send + Sync {
    /// BAR `bar` now decodes `region`.
    fn map_bar(&self, bar: u8, region: Option<BarRegion>);
}
