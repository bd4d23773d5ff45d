//! The event-loop side of virtio-blk: the queue's eventfd (signalled by KVM when the guest
//! writes QueueNotify, and by the transport after a driver reset) wakes the loop, which
//! serves the queue. A pass that stops at its budget signals the eventfd again, so the rest
//! is served after everything else the loop has to do.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::Block;

/// Subscriber for one virtio-blk device.
pub struct BlockHandler {
    device: Arc<Mutex<Block>>,
    queue_evt: EventFd,
}

impl BlockHandler {
    /// Serves `device` when `queue_evt` fires.
    pub fn new(device: Arc<Mutex<Block>>, queue_evt: EventFd) -> Self {
        BlockHandler { device, queue_evt }
    }
}

impl MutEventSubscriber for BlockHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evt, EventSet::IN)) {
            log::error!("virtio-blk: cannot watch the queue: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != self.queue_evt.as_raw_fd() {
            return;
        }
        let _ = self.queue_evt.read();
        let served = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .process_queue();
        if served.more {
            if let Err(e) = self.queue_evt.write(1) {
                log::error!("virtio-blk: cannot re-arm the queue: {e}");
            }
        }
    }
}
