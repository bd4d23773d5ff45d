//! PCI BARs in guest physical memory: an allocator for the two BAR windows (where Ember
//! places BARs as firmware would), and the mapper that follows the guest when it moves a
//! BAR: the bus range and the queue-notification ioeventfds go where the BAR decodes now.
//! A BAR the guest places outside the windows (over RAM, over the LAPIC, ...) or over
//! another device stays unmapped: accesses there reach nothing, as on a machine with a
//! decode conflict, and nothing of Ember's is disturbed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use devices::pci::config::BAR_COUNT;
use devices::pci::{BarMapper, BarRegion, BarWindow, PciDevice};
use devices::virtio::{QueueNotify, RateLimitedLog};
use vmm_sys_util::eventfd::EventFd;

use super::super::wiring::{register_notifies, unregister_notifies, IoEvents};
use crate::vcpu::Buses;

/// Hands out naturally aligned ranges of one window and takes them back.
pub struct BarAllocator {
    start: u64,
    end: u64,
    used: BTreeMap<u64, u64>,
}

impl BarAllocator {
    /// The window `[start, start + len)`.
    pub fn new(start: u64, len: u64) -> Self {
        BarAllocator {
            start,
            end: start.saturating_add(len),
            used: BTreeMap::new(),
        }
    }

    /// The lowest free range of `len` bytes (a power of two), aligned to `len`.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        if !len.is_power_of_two() {
            return None;
        }
        let mut at = self.start.checked_next_multiple_of(len)?;
        for (base, size) in &self.used {
            if at.checked_add(len)? <= *base {
                break;
            }
            at = at.max((base + size).checked_next_multiple_of(len)?);
        }
        if at.checked_add(len)? > self.end {
            return None;
        }
        self.used.insert(at, len);
        Some(at)
    }

    /// Takes `[base, base + len)` (a power of two, aligned to it, inside the window and
    /// free): where a restored device's BAR was placed.
    pub fn alloc_at(&mut self, base: u64, len: u64) -> Option<u64> {
        let end = base.checked_add(len)?;
        if !len.is_power_of_two()
            || !base.is_multiple_of(len)
            || base < self.start
            || end > self.end
        {
            return None;
        }
        let below = self.used.range(..end).next_back();
        if below.is_some_and(|(b, l)| b + l > base) {
            return None;
        }
        self.used.insert(base, len);
        Some(base)
    }

    /// Takes back the range allocated at `base`.
    pub fn free(&mut self, base: u64) {
        self.used.remove(&base);
    }
}

/// Follows one function's BARs for it (see the module documentation).
///
/// It holds the buses weakly: the buses hold the PCI root (config ports, ECAM), the root
/// holds this mapper, and a strong reference back would keep the whole PCI tree (devices,
/// their images and their locks) alive after the VM is gone — a restarted VM could not
/// open its own disks again.
pub struct VmBarMapper {
    io: Arc<dyn IoEvents>,
    buses: Weak<Buses>,
    device: Arc<Mutex<dyn PciDevice>>,
    /// Queue notification addresses, by BAR (`QueueNotify::region`).
    notifies: Vec<QueueNotify>,
    evts: Vec<EventFd>,
    /// Where BARs may decode: the PCI windows.
    windows: Vec<(u64, u64)>,
    mapped: Mutex<[Option<BarRegion>; BAR_COUNT]>,
    name: String,
    log: Mutex<RateLimitedLog>,
}

impl VmBarMapper {
    /// A mapper for `device` (called `name` in logs) that places BARs on `buses` inside
    /// `windows` and wires `notifies` to `evts` through `io`.
    pub fn new(
        io: Arc<dyn IoEvents>,
        buses: Arc<Buses>,
        device: Arc<Mutex<dyn PciDevice>>,
        notifies: Vec<QueueNotify>,
        evts: Vec<EventFd>,
        windows: Vec<(u64, u64)>,
        name: &str,
    ) -> Self {
        VmBarMapper {
            io,
            buses: Arc::downgrade(&buses),
            device,
            notifies,
            evts,
            windows,
            mapped: Mutex::new([None; BAR_COUNT]),
            name: name.to_string(),
            log: Mutex::new(RateLimitedLog::new()),
        }
    }

    fn mapped(&self) -> MutexGuard<'_, [Option<BarRegion>; BAR_COUNT]> {
        self.mapped.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn warn(&self, msg: std::fmt::Arguments) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).warn(msg);
    }

    fn notifies_of(&self, bar: u8) -> Vec<QueueNotify> {
        self.notifies
            .iter()
            .filter(|n| n.region == bar)
            .copied()
            .collect()
    }

    /// Whether `r` lies wholly inside one of the PCI windows.
    fn allowed(&self, r: BarRegion) -> bool {
        let Some(end) = r.addr.checked_add(r.len) else {
            return false;
        };
        self.windows
            .iter()
            .any(|(start, len)| r.addr >= *start && end <= start.saturating_add(*len))
    }

    /// Where BAR `bar` is mapped now.
    #[cfg(test)]
    pub fn current(&self, bar: u8) -> Option<BarRegion> {
        self.mapped().get(usize::from(bar)).copied().flatten()
    }

    fn unmap(&self, bar: u8, r: BarRegion) {
        if let Some(buses) = self.buses.upgrade() {
            buses.mmio.remove(r.addr);
        }
        unregister_notifies(self.io.as_ref(), r.addr, &self.notifies_of(bar), &self.evts);
    }

    fn map(&self, bar: u8, r: BarRegion) -> bool {
        if !self.allowed(r) {
            self.warn(format_args!(
                "{}: BAR {bar} at {:#x}+{:#x} is outside the PCI windows; it decodes nothing",
                self.name, r.addr, r.len
            ));
            return false;
        }
        let Some(buses) = self.buses.upgrade() else {
            return false; // the VM is going away
        };
        let window = Arc::new(Mutex::new(BarWindow::new(self.device.clone(), bar)));
        if let Err(e) = buses.mmio.insert(window, r.addr, r.len) {
            self.warn(format_args!(
                "{}: BAR {bar} at {:#x}: {e}; it decodes nothing",
                self.name, r.addr
            ));
            return false;
        }
        // Without ioeventfds notifications still work, through the transport.
        if let Err(e) =
            register_notifies(self.io.as_ref(), r.addr, &self.notifies_of(bar), &self.evts)
        {
            self.warn(format_args!("{}: {}", self.name, crate::error_chain(&e)));
        }
        true
    }
}

impl BarMapper for VmBarMapper {
    fn map_bar(&self, bar: u8, region: Option<BarRegion>) {
        let mut mapped = self.mapped();
        let Some(slot) = mapped.get_mut(usize::from(bar)) else {
            return;
        };
        if let Some(old) = slot.take() {
            self.unmap(bar, old);
        }
        if let Some(new) = region {
            if self.map(bar, new) {
                *slot = Some(new);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_aligned_to_their_size_and_reused_after_free() {
        let mut a = BarAllocator::new(0x1000, 0x10_0000);
        assert_eq!(a.alloc(0x8000), Some(0x8000));
        assert_eq!(a.alloc(0x1000), Some(0x1000));
        assert_eq!(a.alloc(0x8000), Some(0x10000));
        a.free(0x8000);
        assert_eq!(a.alloc(0x4000), Some(0x4000));
        assert_eq!(a.alloc(0x8000), Some(0x8000), "the freed range");
        assert_eq!(a.alloc(0x3000), None, "not a power of two");
        assert_eq!(a.alloc(0x20_0000), None, "larger than the window");
    }

    #[test]
    fn alloc_at_takes_a_free_aligned_range_inside_the_window_only() {
        let mut a = BarAllocator::new(0x1_0000, 0x10_0000);
        assert_eq!(a.alloc_at(0x2_0000, 0x8000), Some(0x2_0000));
        for (base, len) in [
            (0x2_0000, 0x8000),          // taken
            (0x1_c000, 0x8000),          // misaligned
            (0x1_8000, 0x10000),         // overlaps the taken one from below
            (0x8000, 0x8000),            // below the window
            (0x11_0000, 0x8000),         // past it
            (0x3_0000, 0x3000),          // not a power of two
            (u64::MAX - 0x7fff, 0x8000), // wraps
        ] {
            assert_eq!(a.alloc_at(base, len), None, "{base:#x}+{len:#x}");
        }
        assert_eq!(a.alloc(0x8000), Some(0x1_0000), "alloc works around it");
        assert_eq!(a.alloc(0x8000), Some(0x1_8000));
        assert_eq!(a.alloc(0x8000), Some(0x2_8000));
    }

    #[test]
    fn a_full_window_hands_out_nothing() {
        let mut a = BarAllocator::new(0, 0x10000);
        for _ in 0..2 {
            assert!(a.alloc(0x8000).is_some());
        }
        assert_eq!(a.alloc(0x8000), None);
        assert_eq!(a.alloc(16), None);
    }

    /// Records ioeventfd (un)registrations.
    #[derive(Default)]
    struct RecordingIo(Mutex<Vec<(bool, u64)>>);

    impl IoEvents for RecordingIo {
        fn register(&self, a: u64, _: Option<u32>, _: &EventFd) -> Result<(), kvm_ioctls::Error> {
            self.0.lock().unwrap().push((true, a));
            Ok(())
        }
        fn unregister(&self, a: u64, _: Option<u32>, _: &EventFd) -> Result<(), kvm_ioctls::Error> {
            self.0.lock().unwrap().push((false, a));
            Ok(())
        }
    }

    struct NullFn;
    impl PciDevice for NullFn {
        fn config_read(&mut self, _: u16, d: &mut [u8]) {
            d.fill(0);
        }
        fn config_write(&mut self, _: u16, _: &[u8]) {}
        fn bar_regions(&self) -> [Option<BarRegion>; BAR_COUNT] {
            [None; BAR_COUNT]
        }
        fn bar_read(&mut self, _: u8, _: u64, d: &mut [u8]) {
            d.fill(0x5a);
        }
        fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
    }

    const WINDOW: (u64, u64) = (0x1_0000_0000, 0x1000_0000);

    fn mapper(buses: &Arc<Buses>) -> (VmBarMapper, Arc<RecordingIo>) {
        let io = Arc::new(RecordingIo::default());
        let notifies = (0..2)
            .map(|q| QueueNotify {
                region: 0,
                offset: 0x3000 + 4 * q,
                queue: q as u16,
                datamatch: None,
            })
            .collect();
        let evts = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK_FOR_TESTS).unwrap())
            .collect();
        let m = VmBarMapper::new(
            io.clone(),
            buses.clone(),
            Arc::new(Mutex::new(NullFn)),
            notifies,
            evts,
            vec![(0xe000_0000, 0x1000_0000), WINDOW],
            "test",
        );
        (m, io)
    }

    const EFD_NONBLOCK_FOR_TESTS: i32 = vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn region(addr: u64) -> Option<BarRegion> {
        Some(BarRegion { addr, len: 0x8000 })
    }

    fn claimed(buses: &Buses, addr: u64) -> bool {
        buses.mmio.read(addr, &mut [0u8; 4])
    }

    #[test]
    fn a_mapper_does_not_keep_the_buses_alive_and_maps_nothing_after_them() {
        // The buses hold the PCI root, the root the mapper: a strong reference back leaked
        // every PCI device (and its disk's lock) of a VM that had ended.
        let buses = Arc::new(Buses::default());
        let (m, _io) = mapper(&buses);
        m.map_bar(0, region(WINDOW.0));
        let weak = Arc::downgrade(&buses);
        drop(buses);
        assert!(weak.upgrade().is_none(), "the mapper kept the buses");
        m.map_bar(0, region(WINDOW.0 + 0x10_0000));
        assert_eq!(m.current(0), None);
    }

    #[test]
    fn a_bar_moves_with_its_bus_range_and_ioeventfds() {
        let buses = Arc::new(Buses::default());
        let (m, io) = mapper(&buses);
        m.map_bar(0, region(WINDOW.0));
        assert!(claimed(&buses, WINDOW.0 + 0x10));
        m.map_bar(0, region(WINDOW.0 + 0x10_0000));
        assert!(!claimed(&buses, WINDOW.0 + 0x10), "the old range is free");
        assert!(claimed(&buses, WINDOW.0 + 0x10_0010));
        let calls = io.0.lock().unwrap().clone();
        let base = WINDOW.0;
        let moved = base + 0x10_0000;
        assert_eq!(
            calls,
            [
                (true, base + 0x3000),
                (true, base + 0x3004),
                (false, base + 0x3000),
                (false, base + 0x3004),
                (true, moved + 0x3000),
                (true, moved + 0x3004),
            ]
        );
        m.map_bar(0, None);
        assert!(!claimed(&buses, moved));
        assert_eq!(m.current(0), None);
    }

    #[test]
    fn a_bar_over_ram_or_outside_the_windows_decodes_nothing() {
        let buses = Arc::new(Buses::default());
        let (m, io) = mapper(&buses);
        for addr in [
            0,
            0x10_0000,
            0xd000_0000,
            0xfee0_0000,
            WINDOW.0 + WINDOW.1 - 0x4000,
        ] {
            m.map_bar(0, region(addr));
            assert_eq!(m.current(0), None, "{addr:#x}");
            assert!(!claimed(&buses, addr));
        }
        m.map_bar(
            0,
            Some(BarRegion {
                addr: u64::MAX - 0x10,
                len: 0x8000,
            }),
        );
        m.map_bar(7, region(WINDOW.0)); // no such BAR
        assert!(io.0.lock().unwrap().is_empty());
    }

    #[test]
    fn a_bar_over_another_device_stays_unmapped_and_the_other_keeps_its_range() {
        let buses = Arc::new(Buses::default());
        let (a, _) = mapper(&buses);
        let (b, io_b) = mapper(&buses);
        a.map_bar(0, region(WINDOW.0));
        b.map_bar(0, region(WINDOW.0 + 0x4000));
        assert_eq!(b.current(0), None);
        assert!(io_b.0.lock().unwrap().is_empty());
        assert_eq!(a.current(0), region(WINDOW.0));
        assert!(claimed(&buses, WINDOW.0 + 0x4000));
        // Moved away, it maps again.
        b.map_bar(0, region(WINDOW.0 + 0x8000));
        assert_eq!(b.current(0), region(WINDOW.0 + 0x8000));
    }
}
