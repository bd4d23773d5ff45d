//! Saving and restoring the state of every device of a VM (for snapshots).

use devices::bus::lock_device;
use devices::persist::{Persist, StateError};

use super::{DeviceManager, VirtioHandle};
use crate::snapshot::{DevicesState, VirtioState};

fn missing(what: &'static str) -> StateError {
    StateError::new(what, "the VM has no such device")
}

impl DeviceManager {
    /// Flushes every disk (before a snapshot): what the guest wrote is on the images.
    pub fn flush_disks(&self) -> Result<(), String> {
        for (id, h) in self.virtio_devices() {
            if let VirtioHandle::Block(b) = h {
                lock_device(b, |b| b.flush_disk())
                    .map_err(|e| format!("disk {id}: {}", crate::error_chain(&e)))?;
            }
        }
        Ok(())
    }

    /// Every device's state (the vCPUs are paused).
    pub fn save_state(&self) -> Result<DevicesState, StateError> {
        let l = self
            .legacy
            .as_ref()
            .ok_or_else(|| missing("legacy devices"))?;
        let serial = l.serial.as_ref().ok_or_else(|| missing("serial"))?;
        Ok(DevicesState {
            serial: lock_device(serial, |d| d.save()),
            i8042: lock_device(&l.i8042, |d| d.save()),
            acpi_pm: lock_device(&l.acpi_pm, |d| d.save()),
            cmos: lock_device(&l.cmos, |d| d.save()),
            pvpanic: l.pvpanic.as_ref().map(|p| lock_device(p, |d| d.save())),
            virtio: self
                .entries
                .iter()
                .map(|e| VirtioState {
                    id: e.id.clone(),
                    mmio_base: e.resources.mmio.map_or(0, |m| m.0),
                    irq: e.resources.irq.unwrap_or_default(),
                    transport: lock_device(&e.transport, |t| t.save()),
                })
                .collect(),
            balloon: self.balloon_state(),
            pci: self.save_pci_state(),
            // The VMM fills it in: the controller is its part.
            cpu_hotplug: None,
            pci_hotplug: self
                .pci
                .as_ref()
                .map(|p| lock_device(&p.hotplug, |h| h.save())),
        })
    }

    /// Puts every device in its saved state; the devices were built from the same
    /// configuration, so they must sit where the saved ones did.
    pub fn restore_state(&self, s: &DevicesState) -> Result<(), StateError> {
        let l = self
            .legacy
            .as_ref()
            .ok_or_else(|| missing("legacy devices"))?;
        let serial = l.serial.as_ref().ok_or_else(|| missing("serial"))?;
        lock_device(serial, |d| d.restore(&s.serial))?;
        lock_device(&l.i8042, |d| d.restore(&s.i8042))?;
        lock_device(&l.acpi_pm, |d| d.restore(&s.acpi_pm))?;
        lock_device(&l.cmos, |d| d.restore(&s.cmos))?;
        match (&l.pvpanic, &s.pvpanic) {
            (Some(p), Some(st)) => lock_device(p, |d| d.restore(st))?,
            (None, None) => {}
            _ => {
                return Err(StateError::new(
                    "pvpanic",
                    "present in only one of VM and state",
                ))
            }
        }
        if s.virtio.len() != self.entries.len() {
            return Err(StateError::new(
                "virtio",
                format!(
                    "{} saved devices for {}",
                    s.virtio.len(),
                    self.entries.len()
                ),
            ));
        }
        for (e, st) in self.entries.iter().zip(&s.virtio) {
            let here = (
                e.resources.mmio.map_or(0, |m| m.0),
                e.resources.irq.unwrap_or(0),
            );
            if st.id != e.id || (st.mmio_base, st.irq) != here {
                return Err(StateError::new(
                    "virtio",
                    format!("saved device {} is not device {} of this VM", st.id, e.id),
                ));
            }
            lock_device(&e.transport, |t| t.restore(&st.transport))?;
        }
        self.restore_pci_state(&s.pci)?;
        if let (Some(p), Some(st)) = (&self.pci, &s.pci_hotplug) {
            lock_device(&p.hotplug, |h| h.restore(st))?;
        }
        self.restore_balloon(s.balloon.as_ref())
    }
}
