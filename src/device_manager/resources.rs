//! Guest resources handed to devices — virtio-mmio windows and IOAPIC pins — from pools
//! that take them back when a device goes away.

use std::collections::BTreeSet;

use boot::layout::{MAX_IRQ, MMIO_DEVICES_START, MMIO_DEVICE_SIZE, MMIO_FIRST_IRQ};

/// Most virtio-mmio windows (the pool spans 1 MiB of the MMIO gap).
pub const MMIO_SLOTS: u64 = 256;

/// What one device holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// MMIO window: base and length.
    pub mmio: Option<(u64, u64)>,
    /// IOAPIC pin.
    pub irq: Option<u32>,
}

/// The free pools.
pub struct ResourceAllocator {
    free_slots: BTreeSet<u64>,
    free_irqs: BTreeSet<u32>,
}

impl Default for ResourceAllocator {
    fn default() -> Self {
        ResourceAllocator {
            free_slots: (0..MMIO_SLOTS).collect(),
            free_irqs: (MMIO_FIRST_IRQ..=MAX_IRQ).collect(),
        }
    }
}

impl ResourceAllocator {
    /// The lowest free MMIO window: (base, length).
    pub fn alloc_mmio(&mut self) -> Option<(u64, u64)> {
        let slot = self.free_slots.pop_first()?;
        Some((
            MMIO_DEVICES_START + slot * MMIO_DEVICE_SIZE,
            MMIO_DEVICE_SIZE,
        ))
    }

    /// The lowest free IOAPIC pin for devices.
    pub fn alloc_irq(&mut self) -> Option<u32> {
        self.free_irqs.pop_first()
    }

    /// Takes back what a device held.
    pub fn free(&mut self, r: Resources) {
        if let Some((base, _)) = r.mmio {
            if let Some(slot) = base.checked_sub(MMIO_DEVICES_START) {
                let slot = slot / MMIO_DEVICE_SIZE;
                if slot < MMIO_SLOTS {
                    self.free_slots.insert(slot);
                }
            }
        }
        if let Some(irq) = r.irq {
            if (MMIO_FIRST_IRQ..=MAX_IRQ).contains(&irq) {
                self.free_irqs.insert(irq);
            }
        }
    }

    /// IOAPIC pins still free.
    pub fn free_irqs(&self) -> usize {
        self.free_irqs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_resources_are_handed_out_again_lowest_first() {
        let mut a = ResourceAllocator::default();
        let first = a.alloc_mmio().unwrap();
        let second = a.alloc_mmio().unwrap();
        assert_eq!(first.0, MMIO_DEVICES_START);
        assert_eq!(second.0, MMIO_DEVICES_START + MMIO_DEVICE_SIZE);
        let irq = a.alloc_irq().unwrap();
        assert_eq!(irq, MMIO_FIRST_IRQ);
        a.free(Resources {
            mmio: Some(first),
            irq: Some(irq),
        });
        assert_eq!(a.alloc_mmio(), Some(first));
        assert_eq!(a.alloc_irq(), Some(irq));
    }

    #[test]
    fn pools_run_dry_without_panicking() {
        let mut a = ResourceAllocator::default();
        let pins = (MAX_IRQ - MMIO_FIRST_IRQ + 1) as usize;
        assert_eq!(a.free_irqs(), pins);
        for _ in 0..pins {
            assert!(a.alloc_irq().is_some());
        }
        assert_eq!(a.alloc_irq(), None);
        // Foreign values are ignored, not inserted.
        a.free(Resources {
            mmio: Some((0, 0x1000)),
            irq: Some(2),
        });
        assert_eq!(a.alloc_irq(), None);
    }
}
