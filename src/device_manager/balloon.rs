//! The memory balloon in the device registry: attached like any virtio device (id
//! `balloon`, after the disks and NICs), found again for the API, and saved and restored
//! with its own state besides its transport's.

use std::sync::{Arc, Mutex, MutexGuard};

use devices::persist::{Persist, StateError};
use devices::virtio::balloon::handler::BalloonHandler;
use devices::virtio::balloon::pages::{Madvise, PAGE_SHIFT};
use devices::virtio::balloon::{Balloon, BalloonOptions, BalloonState};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceError, DeviceManager, DeviceSpec, EventLoop, Subscriber, VirtioHandle};
use crate::config::{BalloonConfig, BALLOON_ID};

/// The balloon's queue that the VMM kicks so the handler notices a new statistics period.
const STATS_QUEUE_KICK: usize = 2;

impl DeviceManager {
    /// Guest RAM, bytes.
    pub fn ram_size(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }

    /// The virtio-balloon for `cfg`, pages given back with `madvise`.
    pub fn attach_balloon(
        &mut self,
        events: &mut EventLoop,
        cfg: &BalloonConfig,
    ) -> Result<(), DeviceError> {
        self.check_new_id(BALLOON_ID)?;
        let ram = self.ram_size();
        let target = cfg.target.map_or(ram, |t| t.0.min(ram));
        let opts = BalloonOptions {
            deflate_on_oom: cfg.deflate_on_oom,
            free_page_reporting: cfg.free_page_reporting,
            stats_period: cfg.stats_period,
            target_pages: u32::try_from((ram - target) >> PAGE_SHIFT).unwrap_or(u32::MAX),
        };
        let balloon = Balloon::new(ram, opts, Box::new(Madvise))
            .map_err(|e| DeviceError::Balloon(e.to_string()))?;
        let balloon = Arc::new(Mutex::new(balloon));
        let b = balloon.clone();
        let make_handler = move |evts: &[EventFd]| -> Result<Subscriber, DeviceError> {
            let evts = evts
                .iter()
                .map(|e| e.try_clone().map_err(DeviceError::EventFd))
                .collect::<Result<_, _>>()?;
            let handler = BalloonHandler::new(b, evts).map_err(DeviceError::EventFd)?;
            Ok(Arc::new(Mutex::new(handler)))
        };
        self.attach_virtio(
            events,
            BALLOON_ID,
            cfg.transport,
            (balloon.clone(), VirtioHandle::Balloon(balloon)),
            DeviceSpec::Balloon,
            make_handler,
        )
    }

    /// The balloon, if the VM has one.
    pub fn balloon(&self) -> Option<Arc<Mutex<Balloon>>> {
        self.virtio_devices().find_map(|(_, h)| match h {
            VirtioHandle::Balloon(b) => Some(b.clone()),
            _ => None,
        })
    }

    /// Sets the balloon's statistics period and wakes its handler to re-arm its timer.
    pub fn set_balloon_stats_period(&self, secs: u16) -> Option<()> {
        lock(&self.balloon()?).set_stats_period(secs);
        let mmio = self.entries.iter().map(|e| (&e.id, &e.queue_evts));
        let pci = self.pci_entries().iter().map(|e| (&e.id, &e.queue_evts));
        let evts = mmio.chain(pci).find(|(id, _)| *id == BALLOON_ID)?.1;
        if let Some(Err(e)) = evts.get(STATS_QUEUE_KICK).map(|e| e.write(1)) {
            log::warn!("balloon: cannot wake the statistics handler: {e}");
        }
        Some(())
    }

    /// The balloon's own state, if the VM has one (for a snapshot).
    pub(super) fn balloon_state(&self) -> Option<BalloonState> {
        self.balloon().map(|b| lock(&b).save())
    }

    /// Puts the balloon's own state back, after its transport's.
    pub(super) fn restore_balloon(&self, st: Option<&BalloonState>) -> Result<(), StateError> {
        match (self.balloon(), st) {
            (Some(b), Some(st)) => lock(&b).restore(st),
            (None, None) => Ok(()),
            _ => Err(StateError::new(
                "virtio-balloon",
                "present in only one of VM and state",
            )),
        }
    }
}

/// Locks the balloon, going on if a thread panicked while holding it.
pub fn lock(b: &Arc<Mutex<Balloon>>) -> MutexGuard<'_, Balloon> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}
