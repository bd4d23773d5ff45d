//! The event-loop side of virtio-net: queue kicks (ioeventfds), the tap's readiness, and a
//! once-a-second look at the tap's link state. The tap is watched for input only while a
//! received frame can go somewhere, and for output only while a transmit waits for room.
//! A pass that stops at its budget signals its own queue's eventfd, so the rest is done
//! after everything else the event loop has to do (other devices, signals).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{Net, NetBackend, RxState, TxState};

/// How often the tap's link state is read.
const LINK_POLL: Duration = Duration::from_secs(1);

/// Subscriber for one virtio-net device.
pub struct NetHandler<B: NetBackend> {
    device: Arc<Mutex<Net<B>>>,
    rx_evt: EventFd,
    tx_evt: EventFd,
    link_timer: TimerFd,
    tap_fd: i32,
    want_in: bool,
    want_out: bool,
}

impl<B: NetBackend> NetHandler<B> {
    /// Serves `device`, kicked through `rx_evt` (queue 0) and `tx_evt` (queue 1).
    pub fn new(
        device: Arc<Mutex<Net<B>>>,
        rx_evt: EventFd,
        tx_evt: EventFd,
    ) -> std::io::Result<Self> {
        let tap_fd = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .backend()
            .raw_fd();
        let mut link_timer = TimerFd::new()?;
        link_timer.reset(LINK_POLL, Some(LINK_POLL))?;
        Ok(NetHandler {
            device,
            rx_evt,
            tx_evt,
            link_timer,
            tap_fd,
            want_in: true,
            want_out: false,
        })
    }

    fn tap_events(&self) -> Events {
        let mut set = EventSet::empty();
        if self.want_in {
            set |= EventSet::IN;
        }
        if self.want_out {
            set |= EventSet::OUT;
        }
        Events::new_raw(self.tap_fd, set)
    }

    fn rx(&mut self) {
        let state = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .process_rx();
        self.want_in = state == RxState::Drained;
        if state == RxState::Yielded {
            rearm(&self.rx_evt, "receive");
        }
    }

    fn tx(&mut self) {
        let state = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .process_tx();
        self.want_out = state == TxState::Blocked;
        if state == TxState::Yielded {
            rearm(&self.tx_evt, "transmit");
        }
    }
}

/// Signals a queue's own eventfd so its next pass runs on a later turn of the loop.
fn rearm(evt: &EventFd, queue: &str) {
    if let Err(e) = evt.write(1) {
        log::error!("virtio-net: cannot re-arm the {queue} queue: {e}");
    }
}

impl<B: NetBackend + 'static> MutEventSubscriber for NetHandler<B> {
    fn init(&mut self, ops: &mut EventOps) {
        for e in [
            Events::new(&self.rx_evt, EventSet::IN),
            Events::new(&self.tx_evt, EventSet::IN),
            Events::new(&self.link_timer, EventSet::IN),
            self.tap_events(),
        ] {
            if let Err(err) = ops.add(e) {
                log::error!("virtio-net: cannot watch a descriptor: {err:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let (was_in, was_out) = (self.want_in, self.want_out);
        if fd == self.rx_evt.as_raw_fd() {
            let _ = self.rx_evt.read();
            self.rx();
        } else if fd == self.tx_evt.as_raw_fd() {
            let _ = self.tx_evt.read();
            self.tx();
        } else if fd == self.link_timer.as_raw_fd() {
            let _ = self.link_timer.wait();
            self.device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .poll_link();
        } else if fd == self.tap_fd {
            let set = events.event_set();
            if set.contains(EventSet::OUT) {
                self.tx();
            }
            if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                self.rx();
            }
        }
        if (was_in, was_out) != (self.want_in, self.want_out) {
            if let Err(e) = ops.modify(self.tap_events()) {
                log::error!("virtio-net: cannot change the tap's events: {e:?}");
            }
        }
    }
}
