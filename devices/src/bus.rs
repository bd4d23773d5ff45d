//! An address space (PIO or MMIO) mapping ranges to devices.
//!
//! Shared by the vCPUs and the device manager: devices can be inserted and removed while
//! vCPUs run (hotplug). A lookup holds the map's read lock only long enough to clone the
//! device's handle; each device sits behind its own mutex, so vCPUs touching different
//! devices never contend.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a device already there.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Start of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A zero-length or wrapping range.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// A shared, lockable bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

type RangeMap = BTreeMap<u64, (u64, SharedDevice)>;

/// Ranges keyed by their start; ranges never overlap.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<RangeMap>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, RangeMap> {
        self.devices.read().unwrap_or_else(|e| e.into_inner())
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, RangeMap> {
        self.devices.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut map = self.map_mut();
        let before = map.range(..end).next_back();
        if before.is_some_and(|(b, (l, _))| b + l > base) {
            return Err(BusError::Overlap { base, len });
        }
        map.insert(base, (len, device));
        Ok(())
    }

    /// Takes the device placed at `base` off the bus.
    pub fn remove(&self, base: u64) -> Option<SharedDevice> {
        self.map_mut().remove(&base).map(|(_, d)| d)
    }

    /// The device covering `addr` and the offset of `addr` in it.
    fn resolve(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let map = self.map();
        let (base, (len, dev)) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < *len).then(|| (dev.clone(), offset))
    }

    /// Routes a read; returns false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(&dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(&dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, going on if a thread panicked while holding it: the device state is
/// plain data and every handler leaves it consistent between statements.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a locked shared device of any kind.
pub fn lock_device<T: ?Sized, R>(dev: &Arc<Mutex<T>>, f: impl FnOnce(&mut T) -> R) -> R {
    f(&mut dev.lock().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn access_is_routed_with_offset_inside_the_range() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0, vec![0x41])));
    }

    #[test]
    fn addresses_outside_every_range_are_not_claimed() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x10, 4)
            .unwrap();
        let mut data = [0u8; 1];
        assert!(!bus.read(0x0f, &mut data));
        assert!(!bus.read(0x14, &mut data));
        assert!(!bus.write(u64::MAX, &[0]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev(), 0x10, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x1f, 1),
            Err(BusError::Overlap { base: 0x1f, len: 1 })
        );
        assert_eq!(
            bus.insert(dev(), 0x8, 0x9),
            Err(BusError::Overlap {
                base: 0x8,
                len: 0x9
            })
        );
        assert!(bus.insert(dev(), 0x8, 0x8).is_ok());
        assert!(bus.insert(dev(), 0x20, 1).is_ok());
        assert!(matches!(
            bus.insert(dev(), 0x30, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }

    #[test]
    fn removed_devices_stop_claiming_and_free_their_range() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(bus.remove(0x100).is_some());
        assert!(!bus.write(0x104, &[1]));
        assert!(bus.remove(0x100).is_none());
        bus.insert(dev, 0x108, 0x10).unwrap();
        assert!(bus.write(0x110, &[1]));
    }
}
