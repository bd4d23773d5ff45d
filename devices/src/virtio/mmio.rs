//! The virtio-mmio transport, register layout version 2 (virtio 1.x).
//!
//! Register accesses run on the vCPU that made them; queue processing does not: QueueNotify
//! normally never reaches this code (KVM signals the device's ioeventfd directly), and when
//! it does, the write only signals that same eventfd.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{check_layout, QueueConfig, QueuePosition, QueueSetupError};
use super::{
    error_chain, features, status, ActivateError, RateLimitedLog, VirtioDevice, VirtioInterrupt,
};
use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::persist::{Persist, StateError};

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
    queues: Vec<QueueConfig>,
    queue_evts: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    /// Status as the driver wrote it; DEVICE_NEEDS_RESET comes from `interrupt`.
    status: u32,
    config_generation: u32,
    log: RateLimitedLog,
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
            .map(|max| QueueConfig::new(*max))
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
            log: RateLimitedLog::new(),
        }
    }

    fn queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may only change before the driver is done.
    fn queue_config_allowed(&self) -> bool {
        self.status & status::DRIVER_OK == 0 && self.status & status::FEATURES_OK != 0
    }

    /// Driver reset. Only state changes here (this is a vCPU thread); then every queue's
    /// eventfd is signalled so the device's event-loop side can finish what the reset left
    /// owed (virtio-blk flushes there).
    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt.reset();
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = evt.write(1) {
                self.log.warn(format_args!(
                    "virtio-mmio: cannot wake queue {i} after a reset: {e}"
                ));
            }
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set, not the driver's.
        let value = value & !status::DEVICE_NEEDS_RESET;
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
        }
        self.status = value;
        if newly & status::DRIVER_OK != 0 && value & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    /// The driver's queues, checked; the device is started only if all are usable.
    fn activate(&mut self) {
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, c)| c.build(i, &self.mem, event_idx))
            .collect::<Result<Vec<Queue>, QueueSetupError>>()
            .and_then(|q| check_layout(&self.queues).map(|()| q))
            .map_err(ActivateError::BadQueue);
        let result = queues
            .and_then(|q| lock(&self.device).activate(self.mem.clone(), q, self.interrupt.clone()));
        if let Err(e) = result {
            self.log.warn(format_args!(
                "virtio-mmio: device not started at DRIVER_OK, it needs a reset: {}",
                error_chain(&e)
            ));
            self.interrupt.signal_needs_reset();
        }
    }

    fn status_register(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
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
            0x34 => self.queue().map_or(0, |q| u32::from(q.max_size)),
            0x44 => self.queue().map_or(0, |q| u32::from(q.ready)),
            0x60 => self.interrupt.status(),
            0x70 => self.status_register(),
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let allowed = self.queue_config_allowed();
        match offset {
            0x14 => self.device_features_select = value,
            0x20 => match self.driver_features_select {
                0 => QueueConfig::set_half(&mut self.driver_features, value, false),
                1 => QueueConfig::set_half(&mut self.driver_features, value, true),
                _ => {}
            },
            0x24 => self.driver_features_select = value,
            0x30 => self.queue_select = value,
            0x38 if allowed => {
                if let Some(q) = self.queue() {
                    q.size = value;
                }
            }
            0x44 if allowed => {
                if let Some(q) = self.queue() {
                    q.ready = value == 1;
                }
            }
            QUEUE_NOTIFY => {
                // Reached only without an ioeventfd match: signal the same eventfd.
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    if let Err(e) = evt.write(1) {
                        self.log.warn(format_args!(
                            "virtio-mmio: cannot signal queue {value}: {e}"
                        ));
                    }
                }
            }
            0x64 => self.interrupt.ack(value),
            0x70 => self.set_status(value),
            // Addresses are kept as written and checked at DRIVER_OK.
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if allowed => {
                let high = offset & 4 != 0;
                if let Some(q) = self.queue() {
                    let reg = match offset & !4 {
                        0x80 => &mut q.desc_table,
                        0x90 => &mut q.avail_ring,
                        _ => &mut q.used_ring,
                    };
                    QueueConfig::set_half(reg, value, high);
                }
            }
            _ => log::debug!("virtio-mmio: write of {value:#x} to {offset:#x} ignored"),
        }
    }
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

/// The transport's registers, the driver's queue setup and, for a running device, where
/// each queue is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// QueueSel.
    pub queue_select: u32,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// The driver's features.
    pub driver_features: u64,
    /// Status as the driver wrote it.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The device asked for a reset.
    pub needs_reset: bool,
    /// Each queue's registers.
    pub queues: Vec<QueueConfig>,
    /// Each queue's position, when the device runs.
    pub positions: Vec<QueuePosition>,
}

impl MmioTransport {
    fn restore_queues(&mut self, st: &MmioState) -> Result<Vec<Queue>, StateError> {
        let err = |m: String| StateError::new("virtio-mmio", m);
        if st.positions.len() != self.queues.len() {
            return Err(err(format!(
                "{} queue positions for {} queues",
                st.positions.len(),
                self.queues.len()
            )));
        }
        let event_idx = st.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (c, pos)) in self.queues.iter().zip(&st.positions).enumerate() {
            let mut q = c
                .build(i, &self.mem, event_idx)
                .map_err(|e| err(error_chain(&e)))?;
            q.set_next_avail(pos.next_avail);
            q.set_next_used(pos.next_used);
            queues.push(q);
        }
        check_layout(&self.queues).map_err(|e| err(error_chain(&e)))?;
        Ok(queues)
    }
}

impl Persist for MmioTransport {
    type State = MmioState;

    fn save(&self) -> MmioState {
        MmioState {
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            queues: self.queues.clone(),
            positions: lock(&self.device).queue_positions(),
        }
    }

    /// Checks the saved setup as DRIVER_OK would and starts a device that was running,
    /// its queues where they were; a device that never ran is not touched.
    fn restore(&mut self, st: &MmioState) -> Result<(), StateError> {
        let err = |m: String| StateError::new("virtio-mmio", m);
        let same_queues = st.queues.len() == self.queues.len()
            && st
                .queues
                .iter()
                .zip(&self.queues)
                .all(|(a, b)| a.max_size == b.max_size);
        if !same_queues {
            return Err(err("the saved queues are not this device's".into()));
        }
        lock(&self.device).reset();
        self.queues = st.queues.clone();
        self.queue_select = st.queue_select;
        self.device_features_select = st.device_features_select;
        self.driver_features_select = st.driver_features_select;
        self.driver_features = st.driver_features;
        self.status = st.status & !status::DEVICE_NEEDS_RESET;
        self.config_generation = st.config_generation;
        self.interrupt.restore(st.interrupt_status, st.needs_reset);
        if self.status & status::FEATURES_OK != 0 {
            let offered = lock(&self.device).features();
            if st.driver_features & !offered != 0 || st.driver_features & features::VERSION_1 == 0 {
                return Err(err("the saved features are not this device's".into()));
            }
            lock(&self.device).ack_features(st.driver_features);
        }
        let running = self.status & (status::DRIVER_OK | status::FEATURES_OK)
            == status::DRIVER_OK | status::FEATURES_OK;
        if running && !st.needs_reset {
            let queues = self.restore_queues(st)?;
            lock(&self.device)
                .activate(self.mem.clone(), queues, self.interrupt.clone())
                .map_err(|e| err(error_chain(&e)))?;
        }
        self.interrupt.retrigger();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::CountingInterrupt;
    use crate::virtio::INT_CONFIG;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Dummy {
        acked: u64,
        activated: usize,
        resets: usize,
        interrupt: Option<Arc<VirtioInterrupt>>,
        queues: Vec<Queue>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_positions(&self) -> Vec<crate::virtio::queue::QueuePosition> {
            self.queues
                .iter()
                .map(|q| crate::virtio::queue::QueuePosition {
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect()
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
            interrupt: Arc<VirtioInterrupt>,
        ) -> Result<(), super::super::ActivateError> {
            self.activated = q.len();
            self.interrupt = Some(interrupt);
            self.queues = q;
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.queues.clear();
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

    /// Negotiates VERSION_1 up to FEATURES_OK.
    fn features_ok(t: &mut MmioTransport) {
        wr(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, 0x24, 1);
        wr(t, 0x20, 1);
        wr(
            t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    /// Sets up the queue, applies `tweak` (register, value), and writes DRIVER_OK.
    fn start_with(tweak: Option<(u64, u32)>) -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let (mut t, dev, _) = transport();
        features_ok(&mut t);
        setup_queue(&mut t);
        if let Some((reg, value)) = tweak {
            wr(&mut t, reg, value);
        }
        wr(&mut t, 0x70, ALL_OK);
        (t, dev)
    }

    fn assert_refused(tweak: (u64, u32)) {
        let (mut t, dev) = start_with(Some(tweak));
        assert_eq!(dev.lock().unwrap().activated, 0, "{tweak:x?} was accepted");
        assert_ne!(rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(rd(&mut t, 0x60) & INT_CONFIG, 0);
    }

    #[test]
    fn well_formed_queues_start_the_device() {
        let (mut t, dev) = start_with(None);
        assert_eq!(dev.lock().unwrap().activated, 1);
        assert_eq!(rd(&mut t, 0x70), ALL_OK);
    }

    #[test]
    fn unaligned_ring_addresses_are_refused_at_driver_ok() {
        assert_refused((0x80, 0x1008));
        assert_refused((0x90, 0x2001));
        assert_refused((0xa0, 0x3002));
    }

    #[test]
    fn an_available_ring_at_address_zero_is_refused_at_driver_ok() {
        assert_refused((0x90, 0));
    }

    #[test]
    fn bad_queue_sizes_are_refused_at_driver_ok() {
        assert_refused((0x38, 3));
        assert_refused((0x38, 32)); // above QueueNumMax
        assert_refused((0x38, 0x1_0010)); // 16 once truncated to 16 bits
    }

    #[test]
    fn a_used_ring_over_the_available_ring_is_refused_at_driver_ok() {
        assert_refused((0xa0, 0x2000));
    }

    #[test]
    fn rings_outside_guest_memory_are_refused_at_driver_ok() {
        assert_refused((0x84, 1)); // descriptor table above 4 GiB
    }

    #[test]
    fn device_needing_reset_shows_in_status_until_the_driver_resets() {
        let (mut t, dev) = start_with(None);
        let irq = dev.lock().unwrap().interrupt.clone().unwrap();

        irq.signal_needs_reset();

        assert_eq!(rd(&mut t, 0x70), ALL_OK | status::DEVICE_NEEDS_RESET);
        assert_ne!(rd(&mut t, 0x60) & INT_CONFIG, 0);
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert_eq!(rd(&mut t, 0x60), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        features_ok(&mut t);
        setup_queue(&mut t);
        wr(&mut t, 0x70, ALL_OK);
        assert_eq!(rd(&mut t, 0x70), ALL_OK);
    }

    #[test]
    fn the_driver_cannot_set_device_needs_reset() {
        let (mut t, _, _) = transport();
        wr(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DEVICE_NEEDS_RESET,
        );
        assert_eq!(rd(&mut t, 0x70), status::ACKNOWLEDGE);
    }

    #[test]
    fn a_driver_reset_wakes_every_queue_for_the_event_loop() {
        let (mut t, _, evt) = transport();
        wr(&mut t, 0x70, 0);
        assert_eq!(evt.read().unwrap(), 1);
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

    fn running_transport() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let (mut t, dev, _) = transport();
        wr(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        setup_queue(&mut t);
        wr(&mut t, 0x70, 0xf);
        (t, dev)
    }

    #[test]
    fn a_running_device_restores_running_with_its_queue_positions() {
        let (a, dev_a) = running_transport();
        {
            let mut d = dev_a.lock().unwrap();
            d.queues[0].set_next_avail(5);
            d.queues[0].set_next_used(4);
        }
        let (mut b, dev_b, _) = transport();
        crate::persist::assert_round_trip(&a, &mut b);
        let d = dev_b.lock().unwrap();
        assert_eq!(d.activated, 1);
        assert_eq!(d.acked, features::VERSION_1);
        assert_eq!((d.queues[0].next_avail(), d.queues[0].next_used()), (5, 4));
    }

    #[test]
    fn a_device_that_never_ran_restores_without_starting() {
        let (a, _, _) = transport();
        let (mut b, dev_b, _) = transport();
        crate::persist::assert_round_trip(&a, &mut b);
        assert_eq!(dev_b.lock().unwrap().activated, 0);
    }

    #[test]
    fn hostile_saved_setups_are_refused() {
        let (a, _) = running_transport();
        let good = a.save();
        let mut bad = good.clone();
        bad.queues[0].desc_table = 1 << 40; // outside guest memory
        let (mut b, _, _) = transport();
        assert!(b.restore(&bad).is_err());
        let mut bad = good.clone();
        bad.positions.clear();
        assert!(b.restore(&bad).is_err());
        let mut bad = good.clone();
        bad.driver_features = 1 << 63;
        assert!(b.restore(&bad).is_err());
        let mut bad = good;
        bad.queues.push(bad.queues[0]);
        assert!(b.restore(&bad).is_err());
    }
}
