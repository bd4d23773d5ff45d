//! What every virtio transport does the same way: feature negotiation, the device status
//! sequence (reset, FEATURES_OK checked against the offer, DRIVER_OK starting the device
//! with queues checked as virtio 1.x asks), queue registers as the driver wrote them, queue
//! notifications, and saving and restoring all of that. The transports (virtio-mmio,
//! virtio-pci) only lay these registers out and deliver interrupts their own way.
//!
//! Runs on the vCPU that accessed the registers; queue processing does not (notifications
//! normally reach the device's eventfds through KVM without coming here).

use std::sync::{Arc, Mutex, MutexGuard};

use crate::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{check_layout, QueueConfig, QueuePosition, QueueSetupError};
use super::{
    error_chain, features, status, ActivateError, RateLimitedLog, VirtioDevice, VirtioInterrupt,
};
use crate::persist::StateError;

/// The registers every transport has, the driver's queue setup and, for a running device,
/// where each queue is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonState {
    /// QueueSel / queue_select.
    pub queue_select: u32,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// The driver's features.
    pub driver_features: u64,
    /// Status as the driver wrote it (DEVICE_NEEDS_RESET is kept apart).
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Each queue's registers.
    pub queues: Vec<QueueConfig>,
    /// Each queue's position, when the device runs.
    pub positions: Vec<QueuePosition>,
}

/// The transport-independent half of a virtio transport.
pub struct VirtioCommon {
    name: &'static str,
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    queues: Vec<QueueConfig>,
    queue_evts: Vec<EventFd>,
    /// QueueSel.
    pub queue_select: u32,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    driver_features: u64,
    /// Status as the driver wrote it; DEVICE_NEEDS_RESET comes from the interrupt.
    status: u32,
    config_generation: u32,
    log: RateLimitedLog,
}

/// Locks a device, going on if a thread panicked while holding it.
pub fn lock(dev: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

impl VirtioCommon {
    /// The common state of `device`, whose queue i is notified through `queue_evts[i]`;
    /// `name` prefixes log lines (`virtio-mmio`, `virtio-pci`).
    pub fn new(
        name: &'static str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .map(|max| QueueConfig::new(*max))
            .collect();
        VirtioCommon {
            name,
            device,
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

    /// The device.
    pub fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        lock(&self.device)
    }

    /// How many queues the device has.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The selected queue's registers, if the selector names one.
    pub fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_select as usize)
    }

    /// The selected queue's registers, for a write: None when the selector names no queue
    /// or queue registers may not change now (before FEATURES_OK or after DRIVER_OK).
    pub fn selected_for_write(&mut self) -> Option<&mut QueueConfig> {
        let allowed =
            self.status & status::DRIVER_OK == 0 && self.status & status::FEATURES_OK != 0;
        if !allowed {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    /// The device features word DeviceFeaturesSel selects.
    pub fn device_features_word(&self) -> u32 {
        let f = self.device().features();
        match self.device_features_select {
            0 => f as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver features word DriverFeaturesSel selects.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// Writes the driver features word DriverFeaturesSel selects; ignored once the
    /// features were accepted (FEATURES_OK), as the device already acted on them.
    pub fn set_driver_features_word(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_select {
            0 => QueueConfig::set_half(&mut self.driver_features, value, false),
            1 => QueueConfig::set_half(&mut self.driver_features, value, true),
            _ => {}
        }
    }

    /// ConfigGeneration.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// Status as the driver reads it.
    pub fn status_register(&self, interrupt: &dyn VirtioInterrupt) -> u32 {
        if interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Driver reset of the device and the registers. Only state changes here (this is a
    /// vCPU thread); the transport then clears its interrupt state and calls
    /// [`Self::wake_queues`].
    pub fn reset(&mut self) {
        self.device().reset();
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
    }

    /// Signals every queue's eventfd, so the device's event-loop side finishes what a reset
    /// left owed (virtio-blk flushes there).
    pub fn wake_queues(&mut self) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = evt.write(1) {
                self.log.warn(format_args!(
                    "{}: cannot wake queue {i} after a reset: {e}",
                    self.name
                ));
            }
        }
    }

    /// A queue notification that reached the transport (no ioeventfd caught it): signals
    /// that queue's eventfd; a queue that does not exist is ignored.
    pub fn notify(&mut self, queue: u32) {
        if let Some(evt) = self.queue_evts.get(queue as usize) {
            if let Err(e) = evt.write(1) {
                self.log.warn(format_args!(
                    "{}: cannot signal queue {queue}: {e}",
                    self.name
                ));
            }
        }
    }

    /// A status write other than 0 (a reset is the transport's, see [`Self::reset`]):
    /// FEATURES_OK is kept only for features the device offers, VERSION_1 included;
    /// DRIVER_OK starts the device.
    pub fn set_status(&mut self, value: u32, interrupt: &Arc<dyn VirtioInterrupt>) {
        // DEVICE_NEEDS_RESET is the device's to set, not the driver's.
        let value = value & !status::DEVICE_NEEDS_RESET;
        let newly = value & !self.status;
        if newly & status::FEATURES_OK != 0 {
            let offered = self.device().features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & features::VERSION_1 != 0;
            if !ok {
                // Leaving FEATURES_OK clear tells the driver the features were refused.
                self.status = value & !status::FEATURES_OK;
                return;
            }
            let f = self.driver_features;
            self.device().ack_features(f);
        }
        self.status = value;
        if newly & status::DRIVER_OK != 0 && value & status::FEATURES_OK != 0 {
            self.activate(interrupt);
        }
    }

    /// The queues the device uses with the accepted features (see
    /// [`VirtioDevice::queues_in_use`]): the first ones; the driver may leave the rest unset.
    fn used_queues(&self) -> &[QueueConfig] {
        let n = self.device().queues_in_use().min(self.queues.len());
        &self.queues[..n]
    }

    /// The driver's queues, checked; the device is started only if all it uses are usable.
    fn activate(&mut self, interrupt: &Arc<dyn VirtioInterrupt>) {
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let used = self.used_queues();
        let queues = used
            .iter()
            .enumerate()
            .map(|(i, c)| c.build(i, &self.mem, event_idx))
            .collect::<Result<Vec<Queue>, QueueSetupError>>()
            .and_then(|q| check_layout(used).map(|()| q))
            .map_err(ActivateError::BadQueue);
        let mem = self.mem.clone();
        let result = queues.and_then(|q| self.device().activate(mem, q, interrupt.clone()));
        match result {
            // Buffers a driver made available (and notified) before DRIVER_OK were not
            // served: Linux's virtio-balloon posts its statistics buffer that way.
            Ok(()) => self.wake_queues(),
            Err(e) => {
                self.log.warn(format_args!(
                    "{}: device not started at DRIVER_OK, it needs a reset: {}",
                    self.name,
                    error_chain(&e)
                ));
                interrupt.signal_needs_reset();
            }
        }
    }

    /// The registers and, for a running device, where its queues are.
    pub fn save(&self) -> CommonState {
        CommonState {
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            queues: self.queues.clone(),
            positions: self.device().queue_positions(),
        }
    }

    /// Puts the registers back, checks the saved setup as DRIVER_OK would, and starts a
    /// device that was running with its queues where they were (unless it needed a reset);
    /// a device that never ran is not started. The transport restores its interrupt state
    /// first.
    pub fn restore(
        &mut self,
        st: &CommonState,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) -> Result<(), StateError> {
        let err = |m: String| StateError::new(self.name, m);
        let same_queues = st.queues.len() == self.queues.len()
            && st
                .queues
                .iter()
                .zip(&self.queues)
                .all(|(a, b)| a.max_size == b.max_size);
        if !same_queues {
            return Err(err("the saved queues are not this device's".into()));
        }
        self.device().reset();
        self.queues = st.queues.clone();
        self.queue_select = st.queue_select;
        self.device_features_select = st.device_features_select;
        self.driver_features_select = st.driver_features_select;
        self.driver_features = st.driver_features;
        self.status = st.status & !status::DEVICE_NEEDS_RESET;
        self.config_generation = st.config_generation;
        if self.status & status::FEATURES_OK != 0 {
            let offered = self.device().features();
            if st.driver_features & !offered != 0 || st.driver_features & features::VERSION_1 == 0 {
                return Err(err("the saved features are not this device's".into()));
            }
            self.device().ack_features(st.driver_features);
        }
        let running = self.status & (status::DRIVER_OK | status::FEATURES_OK)
            == status::DRIVER_OK | status::FEATURES_OK;
        if running && !interrupt.needs_reset() {
            let queues = self.restore_queues(st)?;
            let mem = self.mem.clone();
            self.device()
                .activate(mem, queues, interrupt.clone())
                .map_err(|e| err(error_chain(&e)))?;
        }
        Ok(())
    }

    fn restore_queues(&self, st: &CommonState) -> Result<Vec<Queue>, StateError> {
        let err = |m: String| StateError::new(self.name, m);
        let used = self.used_queues();
        if st.positions.len() != used.len() {
            return Err(err(format!(
                "{} queue positions for {} queues",
                st.positions.len(),
                used.len()
            )));
        }
        let event_idx = st.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(used.len());
        for (i, (c, pos)) in used.iter().zip(&st.positions).enumerate() {
            let mut q = c
                .build(i, &self.mem, event_idx)
                .map_err(|e| err(error_chain(&e)))?;
            q.set_next_avail(pos.next_avail);
            q.set_next_used(pos.next_used);
            queues.push(q);
        }
        check_layout(used).map_err(|e| err(error_chain(&e)))?;
        Ok(queues)
    }
}
