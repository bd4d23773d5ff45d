//! ACPI PCI hotplug in the registry: disks and NICs attached and detached while the guest
//! runs, always on PCI.
//!
//! Attaching wires the device like a boot-time PCI device (slot, BAR from the 64-bit
//! window, MSI-X routes, ioeventfds, event-loop handler, the root bus taking it while vCPUs
//! run), then marks the slot in the hotplug controller and raises the hotplug GPE: the
//! guest's `PCNT` sends the slot a device check and Linux scans it. Detaching only asks:
//! the controller marks the slot and the GPE makes the guest send itself an eject request;
//! the guest unbinds its driver and calls `_EJ0`; the controller fires its eventfd and the
//! VMM's thread collects the eject ([`DeviceManager::collect_ejected`]), which takes the
//! device off the bus and the event loop, frees its slot, BAR and GSIs, and flushes and
//! closes its disk.

use std::sync::{Arc, Mutex};

use boot::x86_64::acpi;
use devices::bus::lock_device;
use devices::pci::PciHotplug;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceError, DeviceManager, EventLoop, VirtioHandle};
use crate::config::{DiskConfig, NetConfig, Transport};

/// Wakes the event loop when the guest ejects a slot.
struct EjectWatcher(EventFd);

impl MutEventSubscriber for EjectWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch the PCI hotplug controller: {e:?}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.read();
    }
}

/// Where a hotplugged device went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plugged {
    /// Its slot on the root bus.
    pub slot: u8,
    /// Whether the guest has the hotplug GPE enabled (else it sees the device at its next
    /// scan of the bus, e.g. when it boots).
    pub guest_listening: bool,
}

impl DeviceManager {
    /// The controller on its ports, and the eventfd it fires on an eject.
    pub(super) fn attach_hotplug_controller(
        &mut self,
    ) -> Result<(Arc<Mutex<PciHotplug>>, EventFd), DeviceError> {
        let wake = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let ours = wake.try_clone().map_err(DeviceError::EventFd)?;
        let controller = Arc::new(Mutex::new(PciHotplug::new(Arc::new(wake))));
        self.buses.pio.insert(
            controller.clone(),
            u64::from(acpi::ports::PCI_HOTPLUG),
            u64::from(acpi::ports::PCI_HOTPLUG_LEN),
        )?;
        Ok((controller, ours))
    }

    /// Lets the event loop wake up when the guest ejects a slot (a VM with a PCI host).
    pub fn subscribe_hotplug(&self, events: &mut EventLoop) -> Result<(), DeviceError> {
        if let Some(p) = &self.pci {
            let fd = p.hotplug_wake.try_clone().map_err(DeviceError::EventFd)?;
            events.add_subscriber(Arc::new(Mutex::new(EjectWatcher(fd))));
        }
        Ok(())
    }

    /// Whether devices can be hotplugged (the VM has a PCI host and its ACPI slots).
    pub fn has_hotplug(&self) -> bool {
        self.pci.is_some()
    }

    /// Attaches the disk `cfg` (id set) on PCI while the guest runs and tells the guest.
    pub fn hotplug_disk(
        &mut self,
        events: &mut EventLoop,
        cfg: &DiskConfig,
    ) -> Result<Plugged, DeviceError> {
        self.pci.as_ref().ok_or(DeviceError::NoPciBus)?;
        let cfg = DiskConfig {
            transport: Some(Transport::Pci),
            ..cfg.clone()
        };
        self.attach_block(events, &cfg)?;
        self.announce_plug(cfg.id())
    }

    /// Attaches the NIC `cfg` (id and MAC set) on PCI while the guest runs and tells the
    /// guest.
    pub fn hotplug_net(
        &mut self,
        events: &mut EventLoop,
        cfg: &NetConfig,
    ) -> Result<Plugged, DeviceError> {
        self.pci.as_ref().ok_or(DeviceError::NoPciBus)?;
        let cfg = NetConfig {
            transport: Some(Transport::Pci),
            ..cfg.clone()
        };
        self.attach_net(events, &cfg)?;
        self.announce_plug(cfg.id())
    }

    /// Marks the slot of the new PCI device `id` and raises the hotplug GPE.
    fn announce_plug(&self, id: &str) -> Result<Plugged, DeviceError> {
        let p = self.pci.as_ref().ok_or(DeviceError::NoPciBus)?;
        let entry = p.entries.iter().find(|e| e.id == id);
        let slot = entry.map(|e| e.slot).ok_or_else(|| {
            DeviceError::NoSuchDevice(id.to_string()) // attach_* just put it there
        })?;
        lock_device(&p.hotplug, |h| h.plug(slot)).map_err(DeviceError::Hotplug)?;
        Ok(Plugged {
            slot,
            guest_listening: self.raise_hotplug_gpe(),
        })
    }

    /// Raises the PCI hotplug GPE; whether the guest has it enabled.
    fn raise_hotplug_gpe(&self) -> bool {
        let Some(l) = &self.legacy else {
            return false;
        };
        lock_device(&l.acpi_pm, |pm| pm.raise_gpe(acpi::GPE_PCI_HOTPLUG))
    }

    /// Asks the guest to give PCI device `id` back (again, if asked before); the device
    /// stays until the guest ejects it (see [`DeviceManager::collect_ejected`]). Returns its
    /// slot and whether the guest has the hotplug GPE enabled.
    pub fn request_unplug(&mut self, id: &str) -> Result<Plugged, DeviceError> {
        let p = self.pci.as_ref().ok_or(DeviceError::NoPciBus)?;
        let Some(entry) = p.entries.iter().find(|e| e.id == id) else {
            return Err(match self.entries.iter().any(|e| e.id == id) {
                true => DeviceError::NotHotpluggable(id.to_string()),
                false => DeviceError::NoSuchDevice(id.to_string()),
            });
        };
        let slot = entry.slot;
        // Asking again for a slot already asked back raises the GPE again.
        lock_device(&p.hotplug, |h| h.request_unplug(slot)).map_err(DeviceError::Hotplug)?;
        Ok(Plugged {
            slot,
            guest_listening: self.raise_hotplug_gpe(),
        })
    }

    /// Whether a detach of `id` waits for the guest.
    pub fn unplug_pending(&self, id: &str) -> bool {
        let Some(p) = &self.pci else { return false };
        p.entries
            .iter()
            .find(|e| e.id == id)
            .is_some_and(|e| lock_device(&p.hotplug, |h| h.unplug_pending(e.slot)))
    }

    /// Detaches every device the guest ejected since the last call: off the bus and the
    /// event loop, its slot, BAR and GSIs freed, its disk flushed and closed. Returns their
    /// ids.
    pub fn collect_ejected(&mut self, events: &mut EventLoop) -> Vec<String> {
        let Some(p) = &self.pci else {
            return Vec::new();
        };
        let slots = lock_device(&p.hotplug, |h| h.take_ejected());
        let gone: Vec<(String, VirtioHandle)> = p
            .entries
            .iter()
            .filter(|e| slots & (1 << e.slot) != 0)
            .map(|e| (e.id.clone(), e.handle.clone()))
            .collect();
        let mut out = Vec::new();
        for (id, handle) in gone {
            if !self.detach_pci(events, &id) {
                continue;
            }
            if let VirtioHandle::Block(b) = &handle {
                if let Err(e) = lock_device(b, |b| b.flush_disk()) {
                    log::error!("disk {id}: flush after detach: {}", crate::error_chain(&e));
                }
            }
            log::info!("device {id}: the guest ejected it; detached");
            out.push(id);
        }
        out
    }
}
