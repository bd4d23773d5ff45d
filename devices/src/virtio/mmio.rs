//! The virtio-mmio transport, register layout version 2 (virtio 1.x).
//!
//! Register accesses run on the vCPU that made them; queue processing does not: QueueNotify
//! normally never reaches this code (KVM signals the device's ioeventfd directly), and when
//! it does, the write only signals that same eventfd.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{features, status, VirtioDevice, VirtioInterrupt};
use crate::bus::BusDevice;

/// "virt"
const MAGIC: u32 = 0x7472_6976;
/// Register layout version 2 (modern devices).
const VERSION: u32 = 2;
/// Vendor ID reported (QEMU's, which guests know).
const VENDOR_ID: u32 = 0x554d_4551;
/// Offset of the notification register (for ioeventfds).
pub const QUEUE_NOTIFY: u64 = 0x50;
/// Offset of the device configuration space.
const CONFIG_SPACE: u64 = 0x100;

/// The transport of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioInterrupt>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device`, signalling `queue_evts[i]` when queue i is notified.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<VirtioInterrupt>,
        mem: GuestMemoryMmap,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .filter_map(|max| Queue::new(*max).ok())
            .collect();
        MmioTransport {
            device,
            interrupt,
            mem,
            queues,
            queue_evts,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
        }
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may only change before the driver is done.
    fn queue_config_allowed(&self) -> bool {
        self.status & status::DRIVER_OK == 0 && self.status & status::FEATURES_OK != 0
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        if newly & status::FEATURES_OK != 0 {
            let offered = lock(&self.device).features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & features::VERSION_1 != 0;
            if !ok {
                // Leaving FEATURES_OK clear tells the driver the features were refused.
                self.status = value & !status::FEATURES_OK;
                return;
            }
            lock(&self.device).ack_features(self.driver_features);
            let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
        }
        self.status = value;
        if newly & status::DRIVER_OK != 0 && value & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() || !q.is_valid(&self.mem) {
                log::warn!("virtio-mmio: queue {i} is not ready or not valid at DRIVER_OK");
                self.fail();
                return;
            }
        }
        let queues = self.queues.iter().map(copy_queue).collect();
        let result = lock(&self.device).activate(self.mem.clone(), queues, self.interrupt.clone());
        if let Err(e) = result {
            log::warn!("virtio-mmio: cannot activate the device: {e}");
            self.fail();
        }
    }

    fn fail(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => lock(&self.device).device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let f = lock(&self.device).features();
                match self.device_features_select {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let allowed = self.queue_config_allowed();
        let set_half = |old: u64, high: bool| -> u64 {
            if high {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            }
        };
        match offset {
            0x14 => self.device_features_select = value,
            0x20 => match self.driver_features_select {
                0 => self.driver_features = set_half(self.driver_features, false),
                1 => self.driver_features = set_half(self.driver_features, true),
                _ => {}
            },
            0x24 => self.driver_features_select = value,
            0x30 => self.queue_select = value,
            0x38 if allowed => {
                if let Some(q) = self.queue() {
                    q.set_size(value as u16);
                }
            }
            0x44 if allowed => {
                if let Some(q) = self.queue() {
                    q.set_ready(value == 1);
                }
            }
            QUEUE_NOTIFY => {
                // Reached only without an ioeventfd match: signal the same eventfd.
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    if let Err(e) = evt.write(1) {
                        log::warn!("virtio-mmio: cannot signal queue {value}: {e}");
                    }
                }
            }
            0x64 => self.interrupt.ack(value),
            0x70 => self.set_status(value),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if allowed => {
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                if let Some(q) = self.queue() {
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(lo, hi),
                        0x90 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => log::debug!("virtio-mmio: write of {value:#x} to {offset:#x} ignored"),
        }
    }
}

/// A queue with the same configuration (Queue is not Clone).
fn copy_queue(q: &Queue) -> Queue {
    let mut c = Queue::new(q.max_size()).unwrap_or_else(|_| {
        // max_size came from a Queue that accepted it: this cannot fail.
        unreachable!("queue max size was valid")
    });
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    c.set_size(q.size());
    let (lo, hi) = split(q.desc_table());
    c.set_desc_table_address(lo, hi);
    let (lo, hi) = split(q.avail_ring());
    c.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(q.used_ring());
    c.set_used_ring_address(lo, hi);
    c.set_event_idx(q.event_idx_enabled());
    c.set_ready(q.ready());
    c
}

fn lock(d: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v = self.read_register(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::CountingInterrupt;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Dummy {
        acked: u64,
        activated: usize,
        resets: usize,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            features::VERSION_1 | 1
        }
        fn ack_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            q: Vec<Queue>,
            _: Arc<VirtioInterrupt>,
        ) -> Result<(), super::super::ActivateError> {
            self.activated = q.len();
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Dummy>>, EventFd) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let irq = Arc::new(VirtioInterrupt::new(Arc::new(CountingInterrupt::default())));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(dev.clone(), irq, mem, vec![evt.try_clone().unwrap()]);
        (t, dev, evt)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport) {
        wr(t, 0x30, 0);
        wr(t, 0x38, 16);
        wr(t, 0x80, 0x1000);
        wr(t, 0x90, 0x2000);
        wr(t, 0xa0, 0x3000);
        wr(t, 0x44, 1);
    }

    #[test]
    fn identity_registers_and_config_space() {
        let (mut t, _, _) = transport();
        assert_eq!(rd(&mut t, 0x00), MAGIC);
        assert_eq!(rd(&mut t, 0x04), 2);
        assert_eq!(rd(&mut t, 0x08), 42);
        assert_eq!(rd(&mut t, 0x34), 16);
        let mut b = [0u8; 1];
        t.read(0x105, &mut b);
        assert_eq!(b, [5]);
    }

    #[test]
    fn negotiation_and_activation_follow_the_status_sequence() {
        let (mut t, dev, _) = transport();
        wr(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1); // VERSION_1
        wr(&mut t, 0x24, 0);
        wr(&mut t, 0x20, 1);
        wr(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
        assert_eq!(dev.lock().unwrap().acked, features::VERSION_1 | 1);
        setup_queue(&mut t);
        wr(&mut t, 0x70, 0xf);
        assert_eq!(dev.lock().unwrap().activated, 1);
        wr(&mut t, 0x70, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(rd(&mut t, 0x44), 0);
    }

    #[test]
    fn features_the_device_lacks_or_legacy_drivers_are_refused() {
        let (mut t, dev, _) = transport();
        wr(&mut t, 0x20, 1 << 5); // not offered, and no VERSION_1
        wr(&mut t, 0x70, status::FEATURES_OK);
        assert_eq!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
        // Without FEATURES_OK, DRIVER_OK activates nothing.
        setup_queue(&mut t);
        wr(&mut t, 0x70, status::DRIVER_OK);
        assert_eq!(dev.lock().unwrap().activated, 0);
    }

    #[test]
    fn queue_notify_without_ioeventfd_signals_the_queue_eventfd() {
        let (mut t, _, evt) = transport();
        wr(&mut t, QUEUE_NOTIFY, 0);
        assert_eq!(evt.read().unwrap(), 1);
        wr(&mut t, QUEUE_NOTIFY, 7); // no such queue: ignored
    }

    #[test]
    fn odd_widths_and_offsets_are_ignored() {
        let (mut t, _, _) = transport();
        let mut b = [1u8; 2];
        t.read(0x00, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(0x70, &[1, 2]);
        t.write(0x71, &[1, 2, 3, 4]);
        assert_eq!(rd(&mut t, 0x70), 0);
        wr(&mut t, 0x30, 99);
        assert_eq!(rd(&mut t, 0x34), 0);
        wr(&mut t, 0x38, 8); // on a queue that does not exist
    }
}
