//! Virtio devices on PCI: the root bus (host bridge on ports 0xcf8-0xcff and the ECAM
//! window), a slot, a BAR placed in the 64-bit window and an MSI-X vector per queue (and
//! one for configuration changes) for each device. Detaching frees the slot, the BAR space
//! and the vectors, so the ACPI hotplug controller can reuse them.
//!
//! The guest may move a BAR: the device's [`bars::VmBarMapper`] moves the bus range and
//! the queue ioeventfds with it. MSI-X messages go through [`msi::KvmMsiSink`] (KVM GSI
//! routes and one irqfd per vector).

mod bars;
mod msi;

use std::sync::{Arc, Mutex};

use boot::layout::{
    pci_mmio64_window, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START,
};
use boot::x86_64::acpi::PciHost;
use devices::pci::{PciConfigIo, PciDevice, PciEcam, PciHotplug, PciRoot};
use devices::persist::{Persist, StateError};
use devices::virtio::pci::{VirtioPciDevice, VirtioPciState, BAR_SIZE};
use devices::virtio::{VirtioDevice, VirtioTransport};
use devices::GuestMemoryMmap;
use event_manager::{SubscriberId, SubscriberOps};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::wiring::{clone_eventfds, queue_eventfds};
use super::{
    DeviceError, DeviceInfo, DeviceManager, DeviceSpec, EventLoop, Subscriber, VirtioHandle,
};
use bars::{BarAllocator, VmBarMapper};
use msi::{KvmMsiSink, MsiRoutes};

/// Ports of CONFIG_ADDRESS and CONFIG_DATA.
const CONFIG_PORTS: (u64, u64) = (0xcf8, 8);

/// One virtio device on PCI.
pub(super) struct PciEntry {
    pub(super) id: String,
    pub(super) handle: VirtioHandle,
    transport: Arc<Mutex<VirtioPciDevice>>,
    pub(super) slot: u8,
    /// Where Ember placed BAR 0 (its share of the window, whatever the guest did since).
    bar: u64,
    pub(super) queue_evts: Vec<EventFd>,
    msi: Arc<KvmMsiSink>,
    subscriber: SubscriberId,
    pub(super) spec: DeviceSpec,
}

/// The PCI side of a VM.
pub(super) struct PciDevices {
    root: Arc<PciRoot>,
    routes: Arc<MsiRoutes>,
    mmio64: BarAllocator,
    windows: Vec<(u64, u64)>,
    host: PciHost,
    pub(super) entries: Vec<PciEntry>,
    /// The ACPI hotplug controller and the eventfd it fires when the guest ejects a slot.
    pub(super) hotplug: Arc<Mutex<PciHotplug>>,
    pub(super) hotplug_wake: EventFd,
}

/// A device's PCI placement and transport state, as a snapshot keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceState {
    /// Its id.
    pub id: String,
    /// Its slot on bus 0 (must come out the same on restore).
    pub slot: u8,
    /// Where Ember placed BAR 0 (must come out the same on restore).
    pub bar: u64,
    /// The transport, with the device's queues.
    pub transport: VirtioPciState,
}

/// Where a device of a snapshot sat: it goes there again when the VM is rebuilt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciPlacement {
    /// Its id.
    pub id: String,
    /// Its slot.
    pub slot: u8,
    /// Where Ember placed its BAR 0.
    pub bar: u64,
}

/// Where a new device goes: its slot on the root bus, its BAR, the windows BARs may move in.
struct Seat {
    root: Arc<PciRoot>,
    slot: u8,
    bar: u64,
    windows: Vec<(u64, u64)>,
}

/// What wiring a device to PCI made.
struct PciWired {
    transport: Arc<Mutex<VirtioPciDevice>>,
    slot: u8,
    bar: u64,
    evts: Vec<EventFd>,
    msi: Arc<KvmMsiSink>,
}

fn memory_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

impl DeviceManager {
    /// The PCI root bus: host bridge, configuration ports and ECAM window. Call before
    /// the first PCI device and before booting (the ACPI tables describe it).
    pub fn attach_pci_host(&mut self) -> Result<(), DeviceError> {
        if self.pci.is_some() {
            return Ok(());
        }
        let root = Arc::new(PciRoot::new());
        let io = Arc::new(Mutex::new(PciConfigIo::new(root.clone())));
        self.buses.pio.insert(io, CONFIG_PORTS.0, CONFIG_PORTS.1)?;
        let ecam = Arc::new(Mutex::new(PciEcam::new(root.clone())));
        if let Err(e) = self.buses.mmio.insert(ecam, PCI_ECAM_START, PCI_ECAM_SIZE) {
            self.buses.pio.remove(CONFIG_PORTS.0);
            return Err(e.into());
        }
        let (hotplug, hotplug_wake) = match self.attach_hotplug_controller() {
            Ok(h) => h,
            Err(e) => {
                self.buses.pio.remove(CONFIG_PORTS.0);
                self.buses.mmio.remove(PCI_ECAM_START);
                return Err(e);
            }
        };
        let mmio64 = pci_mmio64_window(memory_size(&self.mem));
        let mmio32 = (PCI_MMIO32_START, PCI_MMIO32_SIZE);
        self.pci = Some(PciDevices {
            root,
            routes: Arc::new(MsiRoutes::new(self.vm.clone())),
            mmio64: BarAllocator::new(mmio64.0, mmio64.1),
            windows: vec![mmio32, mmio64],
            host: PciHost {
                ecam: PCI_ECAM_START,
                mmio32,
                mmio64,
            },
            entries: Vec::new(),
            hotplug,
            hotplug_wake,
        });
        Ok(())
    }

    /// Puts the PCI devices attached from now on where a snapshot's sat (`states`), by id;
    /// a device without a placement gets the lowest free slot.
    pub fn place_pci_devices(&mut self, states: &[PciDeviceState]) {
        self.pci_placements = states
            .iter()
            .map(|s| PciPlacement {
                id: s.id.clone(),
                slot: s.slot,
                bar: s.bar,
            })
            .collect();
    }

    /// The PCI host for the ACPI tables, if the VM has one.
    pub fn pci_host(&self) -> Option<PciHost> {
        self.pci.as_ref().map(|p| p.host)
    }

    /// Attaches `device` (called `id`) on PCI and subscribes the handler `make_handler`
    /// builds from the queue eventfds.
    pub(super) fn attach_virtio_pci(
        &mut self,
        events: &mut EventLoop,
        id: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        handle: VirtioHandle,
        spec: DeviceSpec,
        make_handler: impl FnOnce(&[EventFd]) -> Result<Subscriber, DeviceError>,
    ) -> Result<(), DeviceError> {
        self.attach_pci_host()?;
        let w = self.wire_virtio_pci(id, device)?;
        let handler = match make_handler(&w.evts) {
            Ok(h) => h,
            Err(e) => {
                self.unwire_pci(w.slot, w.bar, &w.msi);
                return Err(e);
            }
        };
        let subscriber = events.add_subscriber(handler);
        if let Some(p) = &mut self.pci {
            p.entries.push(PciEntry {
                id: id.to_string(),
                handle,
                transport: w.transport,
                slot: w.slot,
                bar: w.bar,
                queue_evts: w.evts,
                msi: w.msi,
                subscriber,
                spec,
            });
        }
        Ok(())
    }

    /// Slot, BAR space and vectors for `device`, its transport on the root bus.
    fn wire_virtio_pci(
        &mut self,
        id: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<PciWired, DeviceError> {
        let placed = self.pci_placements.iter().find(|p| p.id == id).cloned();
        let p = self.pci.as_mut().ok_or(DeviceError::NoPciSlot)?;
        let (slot, bar) = match placed {
            // Where a snapshot's device sat (so a hole a detach left stays a hole).
            Some(at) => {
                let free = p.root.is_free(at.slot);
                let slot = Some(at.slot)
                    .filter(|_| free)
                    .ok_or(DeviceError::NoPciSlot)?;
                let bar = p.mmio64.alloc_at(at.bar, BAR_SIZE);
                (slot, bar.ok_or(DeviceError::NoPciSpace)?)
            }
            None => {
                let slot = p.root.free_slot().ok_or(DeviceError::NoPciSlot)?;
                (
                    slot,
                    p.mmio64.alloc(BAR_SIZE).ok_or(DeviceError::NoPciSpace)?,
                )
            }
        };
        let seat = Seat {
            root: p.root.clone(),
            slot,
            bar,
            windows: p.windows.clone(),
        };
        let routes = p.routes.clone();
        let queues = devices::bus::lock_device(&device, |d| d.queue_max_sizes().len());
        let built = queue_eventfds(queues).and_then(|evts| {
            let msi = Arc::new(KvmMsiSink::new(self.vm.clone(), routes, queues as u16 + 1)?);
            Ok((evts, msi))
        });
        let (evts, msi) = match built {
            Ok(b) => b,
            Err(e) => {
                self.free_pci_bar(bar);
                return Err(e);
            }
        };
        match self.place_on_root(id, device, seat, &evts, &msi) {
            Ok(transport) => Ok(PciWired {
                transport,
                slot,
                bar,
                evts,
                msi,
            }),
            Err(e) => {
                msi.release();
                self.free_pci_bar(bar);
                Err(e)
            }
        }
    }

    /// The transport for `device` in its seat, its BARs followed by a mapper.
    fn place_on_root(
        &self,
        id: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        seat: Seat,
        evts: &[EventFd],
        msi: &Arc<KvmMsiSink>,
    ) -> Result<Arc<Mutex<VirtioPciDevice>>, DeviceError> {
        let transport = VirtioPciDevice::new(
            device,
            msi.clone(),
            self.mem.clone(),
            clone_eventfds(evts)?,
            seat.bar,
        )
        .map_err(DeviceError::PciLayout)?;
        let notifies = transport.queue_notifies();
        let transport = Arc::new(Mutex::new(transport));
        let as_pci: Arc<Mutex<dyn PciDevice>> = transport.clone();
        let mapper = VmBarMapper::new(
            self.vm.clone(),
            self.buses.clone(),
            as_pci.clone(),
            notifies,
            clone_eventfds(evts)?,
            seat.windows,
            id,
        );
        seat.root
            .add_device(seat.slot, as_pci, Arc::new(mapper))
            .map_err(|_| DeviceError::NoPciSlot)?;
        Ok(transport)
    }

    fn free_pci_bar(&mut self, bar: u64) {
        if let Some(p) = &mut self.pci {
            p.mmio64.free(bar);
        }
    }

    /// Takes a device off the root bus (its BARs unmapped) and frees its resources.
    fn unwire_pci(&mut self, slot: u8, bar: u64, msi: &KvmMsiSink) {
        if let Some(p) = &self.pci {
            p.root.remove_device(slot);
        }
        msi.release();
        self.free_pci_bar(bar);
    }

    /// Detaches PCI device `id`, if there is one; false when no PCI device has that id.
    pub(super) fn detach_pci(&mut self, events: &mut EventLoop, id: &str) -> bool {
        let Some(p) = &mut self.pci else {
            return false;
        };
        let Some(pos) = p.entries.iter().position(|e| e.id == id) else {
            return false;
        };
        let e = p.entries.remove(pos);
        self.unwire_pci(e.slot, e.bar, &e.msi);
        if let Err(err) = events.remove_subscriber(e.subscriber) {
            log::warn!("device {id}: cannot leave the event loop: {err:?}");
        }
        true
    }

    /// The PCI devices.
    pub(super) fn pci_entries(&self) -> &[PciEntry] {
        self.pci.as_ref().map_or(&[], |p| &p.entries)
    }

    /// How `ember dominfo` shows the PCI devices.
    pub(super) fn pci_info(&self) -> Vec<DeviceInfo> {
        self.pci_entries()
            .iter()
            .map(|e| {
                let (kind, backend, mac) = e.spec.describe();
                DeviceInfo {
                    id: e.id.clone(),
                    kind,
                    transport: "pci",
                    address: devices::bus::lock_device(&e.transport, |t| t.bar_address()),
                    irq: None,
                    backend: Some(backend),
                    mac,
                    pci: Some(format!("0000:00:{:02x}.0", e.slot)),
                    detach_pending: self.unplug_pending(&e.id),
                }
            })
            .collect()
    }

    /// Every PCI device's placement and transport state (the vCPUs are paused).
    pub fn save_pci_state(&self) -> Vec<PciDeviceState> {
        self.pci_entries()
            .iter()
            .map(|e| PciDeviceState {
                id: e.id.clone(),
                slot: e.slot,
                bar: e.bar,
                transport: devices::bus::lock_device(&e.transport, |t| t.save()),
            })
            .collect()
    }

    /// Puts every PCI device in its saved state; they must sit where the saved ones did.
    /// BARs decode again where the guest had placed them.
    pub fn restore_pci_state(&self, states: &[PciDeviceState]) -> Result<(), StateError> {
        let entries = self.pci_entries();
        if states.len() != entries.len() {
            return Err(StateError::new(
                "virtio-pci",
                format!("{} saved devices for {}", states.len(), entries.len()),
            ));
        }
        for (e, st) in entries.iter().zip(states) {
            if (st.id.as_str(), st.slot, st.bar) != (e.id.as_str(), e.slot, e.bar) {
                return Err(StateError::new(
                    "virtio-pci",
                    format!("saved device {} is not device {} of this VM", st.id, e.id),
                ));
            }
            devices::bus::lock_device(&e.transport, |t| t.restore(&st.transport))?;
            if let Some(p) = &self.pci {
                p.root.sync_bars(e.slot);
            }
        }
        Ok(())
    }
}
