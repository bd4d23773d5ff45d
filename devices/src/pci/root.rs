//! The root bus: a host bridge at 00:00.0 and device slots 1 to 31, each with one
//! function. Configuration accesses arrive through [`PciConfigIo`] (ports 0xcf8-0xcff,
//! "configuration mechanism #1") or [`PciEcam`] (the memory-mapped window the ACPI MCFG
//! table describes); both end in [`PciRoot`], so they always agree.
//!
//! After every configuration write the root compares where the function's BARs decode
//! with what it last told the function's [`BarMapper`], and tells it the differences. The
//! root's lock is held across the write and those calls, so two vCPUs writing one
//! function's BARs cannot leave the mapper out of step.

use std::sync::{Arc, Mutex, MutexGuard};

use super::config::{valid_access, BAR_COUNT};
use super::{
    BarMapper, BarRegion, PciConfig, PciDevice, PciIds, CLASS_HOST_BRIDGE, DEVICE_HOST_BRIDGE,
    SLOTS, VENDOR_REDHAT,
};
use crate::bus::BusDevice;

/// Errors placing devices on the root bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciRootError {
    /// Slot 0 is the host bridge's; there are 32 slots.
    #[error("PCI slot {0} does not exist or is reserved")]
    BadSlot(u8),
    /// The slot holds a device already.
    #[error("PCI slot {0} is taken")]
    SlotTaken(u8),
}

struct Slot {
    device: Arc<Mutex<dyn PciDevice>>,
    mapper: Arc<dyn BarMapper>,
    /// Where the mapper was last told each BAR decodes.
    mapped: [Option<BarRegion>; BAR_COUNT],
}

impl Slot {
    /// Tells the mapper where BARs decode now, where that changed.
    fn sync(&mut self, now: [Option<BarRegion>; BAR_COUNT]) {
        for (i, (was, is)) in self.mapped.iter_mut().zip(now).enumerate() {
            if *was != is {
                self.mapper.map_bar(i as u8, is);
                *was = is;
            }
        }
    }
}

struct Inner {
    host: PciConfig,
    slots: Vec<Option<Slot>>,
}

/// The root bus.
pub struct PciRoot {
    inner: Mutex<Inner>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

fn lock_dev(d: &Arc<Mutex<dyn PciDevice>>) -> MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciRoot {
    /// A root bus with only its host bridge.
    pub fn new() -> Self {
        let host = PciConfig::new(PciIds {
            vendor: VENDOR_REDHAT,
            device: DEVICE_HOST_BRIDGE,
            revision: 0,
            class: CLASS_HOST_BRIDGE,
            subsystem_vendor: VENDOR_REDHAT,
            subsystem: 0x1100,
        });
        PciRoot {
            inner: Mutex::new(Inner {
                host,
                slots: (0..SLOTS).map(|_| None).collect(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lowest free device slot.
    pub fn free_slot(&self) -> Option<u8> {
        let inner = self.lock();
        (1..SLOTS).find(|s| inner.slots[usize::from(*s)].is_none())
    }

    /// Whether `slot` is a device slot with nothing in it.
    pub fn is_free(&self, slot: u8) -> bool {
        (1..SLOTS).contains(&slot) && self.lock().slots[usize::from(slot)].is_none()
    }

    /// Puts `device` in `slot`; its BARs are followed through `mapper` (told at once of
    /// any BAR that already decodes).
    pub fn add_device(
        &self,
        slot: u8,
        device: Arc<Mutex<dyn PciDevice>>,
        mapper: Arc<dyn BarMapper>,
    ) -> Result<(), PciRootError> {
        if slot == 0 || slot >= SLOTS {
            return Err(PciRootError::BadSlot(slot));
        }
        let mut inner = self.lock();
        let place = &mut inner.slots[usize::from(slot)];
        if place.is_some() {
            return Err(PciRootError::SlotTaken(slot));
        }
        let now = lock_dev(&device).bar_regions();
        let mut s = Slot {
            device,
            mapper,
            mapped: [None; BAR_COUNT],
        };
        s.sync(now);
        *place = Some(s);
        Ok(())
    }

    /// Takes the device out of `slot`, its BARs unmapped first.
    pub fn remove_device(&self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        let mut inner = self.lock();
        let mut s = inner.slots.get_mut(usize::from(slot))?.take()?;
        s.sync([None; BAR_COUNT]);
        Some(s.device)
    }

    /// Tells the mapper of `slot` where its BARs decode (after the device's state was
    /// restored behind the root's back).
    pub fn sync_bars(&self, slot: u8) {
        let mut inner = self.lock();
        if let Some(Some(s)) = inner.slots.get_mut(usize::from(slot)) {
            let now = lock_dev(&s.device).bar_regions();
            s.sync(now);
        }
    }

    /// A configuration read of function `func` of device `dev` on `bus`; what does not
    /// exist reads all-ones.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, offset: u16, data: &mut [u8]) {
        if bus != 0 || func != 0 || !valid_access(usize::from(offset), data.len()) {
            data.fill(0xff);
            return;
        }
        let inner = self.lock();
        match (dev, inner.slots.get(usize::from(dev))) {
            (0, _) => inner.host.read(usize::from(offset), data),
            (_, Some(Some(s))) => lock_dev(&s.device).config_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    /// A configuration write; writes to what does not exist are dropped.
    pub fn config_write(&self, bus: u8, dev: u8, func: u8, offset: u16, data: &[u8]) {
        if bus != 0 || func != 0 || !valid_access(usize::from(offset), data.len()) {
            return;
        }
        let mut inner = self.lock();
        if dev == 0 {
            // The host bridge decodes nothing of its own: its command bits are scratch.
            inner.host.write(usize::from(offset), data);
            return;
        }
        if let Some(Some(s)) = inner.slots.get_mut(usize::from(dev)) {
            let now = {
                let mut d = lock_dev(&s.device);
                d.config_write(offset, data);
                d.bar_regions()
            };
            s.sync(now);
        }
    }
}

/// CONFIG_ADDRESS bits kept: enable, extended register (27:24), bus, device, function,
/// register (dword aligned).
const ADDRESS_MASK: u32 = 0x8fff_fffc;
const ADDRESS_ENABLE: u32 = 1 << 31;

/// Ports 0xcf8-0xcff: CONFIG_ADDRESS (a dword at 0xcf8) and CONFIG_DATA (0xcfc-0xcff).
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    /// The ports of `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// Bus, device, function and register CONFIG_ADDRESS selects, plus `byte` (0-3) of
    /// the data port; None while the enable bit is clear.
    fn target(&self, byte: u64) -> Option<(u8, u8, u8, u16)> {
        let a = self.address;
        if a & ADDRESS_ENABLE == 0 {
            return None;
        }
        let reg = (a & 0xfc) as u16 | ((a >> 16) & 0xf00) as u16;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            reg + byte as u16,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if offset - 4 + data.len() as u64 <= 4 => match self.target(offset - 4) {
                Some((bus, dev, func, reg)) => self.root.config_read(bus, dev, func, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.address = v & ADDRESS_MASK;
            }
            4..=7 if offset - 4 + data.len() as u64 <= 4 => {
                if let Some((bus, dev, func, reg)) = self.target(offset - 4) {
                    self.root.config_write(bus, dev, func, reg, data);
                }
            }
            // Byte and word accesses to 0xcf8-0xcfb are not configuration accesses
            // (0xcfb is probed by Linux's type 1 check, 0xcf9 resets on some chipsets).
            _ => {}
        }
    }
}

/// The ECAM window: 4 KiB of configuration space per function, 1 MiB per bus.
pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl PciEcam {
    /// The window of `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciEcam { root }
    }
}

fn ecam_target(offset: u64) -> (u8, u8, u8, u16) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as u16,
    )
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 1 << 28 {
            data.fill(0xff);
            return;
        }
        let (bus, dev, func, reg) = ecam_target(offset);
        self.root.config_read(bus, dev, func, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 1 << 28 {
            let (bus, dev, func, reg) = ecam_target(offset);
            self.root.config_write(bus, dev, func, reg, data);
        }
    }
}

/// A BAR on a bus: accesses go to the function's BAR handler.
pub struct BarWindow {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: u8,
}

impl BarWindow {
    /// BAR `bar` of `device`.
    pub fn new(device: Arc<Mutex<dyn PciDevice>>, bar: u8) -> Self {
        BarWindow { device, bar }
    }
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock_dev(&self.device).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock_dev(&self.device).bar_write(self.bar, offset, data);
    }
}

#[cfg(test)]
mod tests;
