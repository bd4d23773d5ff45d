//! The event-loop side of virtio-balloon: each queue's eventfd (signalled by KVM when the
//! guest notifies, by the transport after a reset, by the VMM after a change) and the
//! statistics timer. After every event the timer is brought in line with the device's
//! statistics period, so a period set through the API takes effect once the VMM kicks any
//! queue; a period newly set also asks the guest for fresh figures at once.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::Balloon;

/// Subscriber for the balloon.
pub struct BalloonHandler {
    device: Arc<Mutex<Balloon>>,
    queue_evts: Vec<EventFd>,
    timer: TimerFd,
    /// The period the timer runs with (0: stopped).
    armed: u16,
}

impl BalloonHandler {
    /// Serves `device`, queue i kicked through `queue_evts[i]`.
    pub fn new(device: Arc<Mutex<Balloon>>, queue_evts: Vec<EventFd>) -> std::io::Result<Self> {
        let mut h = BalloonHandler {
            device,
            queue_evts,
            timer: TimerFd::new()?,
            armed: 0,
        };
        h.sync_timer();
        Ok(h)
    }

    fn device(&self) -> MutexGuard<'_, Balloon> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms, re-arms or stops the timer for the device's period.
    fn sync_timer(&mut self) {
        let period = self.device().stats_period();
        if period == self.armed {
            return;
        }
        let done = if period == 0 {
            self.timer.clear()
        } else {
            let every = Duration::from_secs(u64::from(period));
            self.timer.reset(every, Some(every))
        };
        match done {
            Ok(()) => {
                self.armed = period;
                if period != 0 {
                    self.device().request_stats();
                }
            }
            Err(e) => log::error!("virtio-balloon: cannot set the statistics timer: {e}"),
        }
    }
}

impl MutEventSubscriber for BalloonHandler {
    fn init(&mut self, ops: &mut EventOps) {
        let mut events: Vec<Events> = self
            .queue_evts
            .iter()
            .map(|e| Events::new(e, EventSet::IN))
            .collect();
        events.push(Events::new(&self.timer, EventSet::IN));
        for e in events {
            if let Err(err) = ops.add(e) {
                log::error!("virtio-balloon: cannot watch a descriptor: {err:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            self.device().request_stats();
        } else if let Some(i) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            let _ = self.queue_evts[i].read();
            let served = self.device().process_queue(i);
            if served.more {
                if let Err(e) = self.queue_evts[i].write(1) {
                    log::error!("virtio-balloon: cannot re-arm queue {i}: {e}");
                }
            }
        }
        self.sync_timer();
    }
}
