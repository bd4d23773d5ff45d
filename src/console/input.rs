//! The event-loop side of the console: host input (stdin or the pty, and the attached
//! client's socket) goes to the UART no faster than the guest reads it, and output waiting
//! for the client goes out when its socket takes it. Output queued for the run's checks
//! (`--expect`, `--fail-on`) is matched here, and the `--timeout` timer fires here.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use devices::legacy::SerialDevice;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::{Console, ConsoleError, ConsoleHub, ESCAPE_BYTE};
use crate::ci_watch::WatchTimers;
use crate::run_state::{Outcome, RunState};

/// What a read from an input source did.
enum ReadResult {
    /// Bytes went to the UART (or nothing was there).
    Done,
    /// The UART's FIFO is full: stop watching inputs until the guest reads.
    Full,
    /// The source ended.
    Closed,
}

/// Feeds console input to the UART on the event loop.
pub struct ConsoleInput {
    hub: Arc<ConsoleHub>,
    /// stdin or the pty master.
    input: Option<File>,
    serial: Arc<Mutex<SerialDevice>>,
    rx_space: EventFd,
    state: Arc<RunState>,
    escape: bool,
    /// The attached client this handler watches, and its generation.
    client: Option<(u64, Arc<UnixStream>)>,
    client_wants_out: bool,
    /// Inputs are not watched until the guest makes room in the FIFO.
    waiting_for_room: bool,
    /// The output checks' timers, once the hub has checks.
    timers: Option<WatchTimers>,
}

impl ConsoleInput {
    /// A handler feeding `serial` from `console`'s input and its client; `rx_space` is the
    /// UART's "FIFO drained" signal; on a terminal, Ctrl-] ends the run.
    pub fn new(
        console: &Console,
        serial: Arc<Mutex<SerialDevice>>,
        rx_space: EventFd,
        state: Arc<RunState>,
    ) -> Result<Self, ConsoleError> {
        Ok(ConsoleInput {
            hub: console.hub().clone(),
            input: console.reader()?,
            serial,
            rx_space,
            state,
            escape: console.escape_enabled(),
            client: None,
            client_wants_out: false,
            waiting_for_room: false,
            timers: None,
        })
    }

    fn client_events(&self, stream: &UnixStream) -> Events {
        let mut set = EventSet::IN;
        if self.client_wants_out {
            set |= EventSet::OUT;
        }
        Events::new(stream, set)
    }

    /// Watches the inputs again (or not); errors mean the source is gone or not pollable.
    fn watch_inputs(&mut self, ops: &mut EventOps, on: bool) {
        if let Some(input) = &self.input {
            let r = if on {
                ops.add(Events::new(input, EventSet::IN))
            } else {
                ops.remove(Events::empty(input))
            };
            if let Err(e) = r {
                log::debug!("console: input not (un)watched: {e:?}");
            }
        }
        if let Some((_, c)) = &self.client {
            let r = if on {
                ops.modify(self.client_events(c))
            } else {
                ops.modify(Events::new(&**c, EventSet::empty()))
            };
            if let Err(e) = r {
                log::debug!("console: client not (un)watched: {e:?}");
            }
        }
    }

    /// Reads from `src` as much as the UART's FIFO takes.
    fn read_into_uart(&self, mut src: impl Read, escape: bool) -> ReadResult {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.input_capacity();
        if room == 0 {
            return ReadResult::Full;
        }
        let mut buf = [0u8; 64];
        let n = match src.read(&mut buf[..room.min(64)]) {
            Ok(0) => return ReadResult::Closed,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return ReadResult::Done
            }
            Err(e) => {
                log::debug!("console: input closed: {e}");
                return ReadResult::Closed;
            }
        };
        let data = &buf[..n];
        let cut = escape
            .then(|| data.iter().position(|b| *b == ESCAPE_BYTE))
            .flatten();
        serial.queue_input(&data[..cut.unwrap_or(n)]);
        if cut.is_some() {
            self.state.request_exit(Outcome::ConsoleQuit);
        }
        ReadResult::Done
    }

    fn on_result(&mut self, r: ReadResult, ops: &mut EventOps, from_client: bool) {
        match r {
            ReadResult::Done => {}
            ReadResult::Full => {
                self.watch_inputs(ops, false);
                self.waiting_for_room = true;
            }
            ReadResult::Closed if from_client => self.drop_client(ops),
            ReadResult::Closed => {
                if let Some(input) = self.input.take() {
                    let _ = ops.remove(Events::empty(&input));
                }
            }
        }
    }

    fn drop_client(&mut self, ops: &mut EventOps) {
        if let Some((generation, c)) = self.client.take() {
            let _ = ops.remove(Events::empty(&*c));
            self.hub.detach(generation);
        }
        self.client_wants_out = false;
    }

    /// Follows the hub's output checks: their timers are watched once they appear (they may
    /// be set after this handler was made), and queued output is matched.
    fn sync_watch(&mut self, ops: &mut EventOps) {
        if self.timers.is_none() {
            let Some(watch) = self.hub.watch() else {
                return;
            };
            match WatchTimers::new(watch) {
                Ok(t) => {
                    t.register(ops);
                    self.timers = Some(t);
                }
                Err(e) => {
                    let why = crate::error_chain(&e);
                    self.state.request_exit(Outcome::Crash(why));
                    return;
                }
            }
        }
        if let Some(outcome) = self.timers.as_mut().and_then(WatchTimers::on_output) {
            self.state.request_exit(outcome);
        }
    }

    /// Follows the hub: a new client is watched, waiting output is written.
    fn sync_client(&mut self, ops: &mut EventOps) {
        let (generation, current) = self.hub.client();
        if self.client.as_ref().map(|c| c.0) != Some(generation) {
            if let Some((_, old)) = self.client.take() {
                let _ = ops.remove(Events::empty(&*old));
            }
            self.client_wants_out = false;
            if let Some(c) = current {
                if let Err(e) = ops.add(self.client_events(&c)) {
                    log::warn!("console: cannot watch the client: {e:?}");
                }
                self.client = Some((generation, c));
            }
        }
        let wants_out = self.hub.flush_client();
        if wants_out != self.client_wants_out {
            self.client_wants_out = wants_out;
            if let Some((_, c)) = &self.client {
                let _ = ops.modify(self.client_events(c));
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.rx_space, EventSet::IN)) {
            log::error!("console: cannot watch the UART: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(self.hub.poke_fd(), EventSet::IN)) {
            log::error!("console: cannot watch for clients: {e:?}");
        }
        self.sync_watch(ops);
        // Regular files and /dev/null cannot be polled: such input is simply not read.
        if let Some(input) = &self.input {
            if let Err(e) = ops.add(Events::new(input, EventSet::IN)) {
                log::debug!("console: input is not pollable, ignoring it: {e:?}");
                self.input = None;
            }
        }
        self.sync_client(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let set = events.event_set();
        if fd == self.rx_space.as_raw_fd() {
            let _ = self.rx_space.read();
            if self.waiting_for_room {
                self.waiting_for_room = false;
                self.watch_inputs(ops, true);
            }
        } else if fd == self.hub.poke_fd().as_raw_fd() {
            let _ = self.hub.poke_fd().read();
            self.sync_client(ops);
            self.sync_watch(ops);
        } else if let Some(t) = self.timers.as_mut().filter(|t| t.owns(fd)) {
            if let Some(outcome) = t.on_timer(fd) {
                self.state.request_exit(outcome);
            }
        } else if self.input.as_ref().is_some_and(|i| i.as_raw_fd() == fd) {
            let r = match (&self.input, set.contains(EventSet::IN)) {
                (Some(input), true) => self.read_into_uart(input, self.escape),
                _ => ReadResult::Closed,
            };
            self.on_result(r, ops, false);
        } else if let Some((_, c)) = self.client.clone().filter(|(_, c)| c.as_raw_fd() == fd) {
            if set.contains(EventSet::OUT) {
                self.sync_client(ops);
            }
            if set.contains(EventSet::IN) {
                let r = self.read_into_uart(&*c, false);
                self.on_result(r, ops, true);
            } else if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                self.drop_client(ops);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::Interrupt;
    use event_manager::{EventManager, SubscriberOps};
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    struct Fixture {
        host: UnixStream,
        serial: Arc<Mutex<SerialDevice>>,
        state: Arc<RunState>,
        events: Manager,
    }

    fn fixture(escape: bool) -> Fixture {
        let (host, guest_side) = UnixStream::pair().unwrap();
        let rx_space = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq: Arc<dyn Interrupt> = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq,
            Arc::new(rx_space.try_clone().unwrap()),
            Box::new(io::sink()),
        )));
        let state = Arc::new(RunState::new().unwrap());
        let input = ConsoleInput {
            hub: Arc::new(ConsoleHub::new(None, None).unwrap()),
            input: Some(File::from(std::os::fd::OwnedFd::from(guest_side))),
            serial: serial.clone(),
            rx_space,
            state: state.clone(),
            escape,
            client: None,
            client_wants_out: false,
            waiting_for_room: false,
            timers: None,
        };
        let mut events = Manager::new().unwrap();
        events.add_subscriber(Arc::new(Mutex::new(input)));
        Fixture {
            host,
            serial,
            state,
            events,
        }
    }

    fn guest_reads_all(serial: &Arc<Mutex<SerialDevice>>) -> Vec<u8> {
        use devices::bus::BusDevice;
        let mut s = serial.lock().unwrap();
        let mut out = Vec::new();
        loop {
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                return out;
            }
            let mut b = [0u8];
            s.read(0, &mut b);
            out.push(b[0]);
        }
    }

    #[test]
    fn flood_is_taken_only_as_fast_as_the_guest_reads() {
        let mut f = fixture(false);
        let flood = vec![b'z'; 10_000];
        f.host.write_all(&flood).unwrap();
        for _ in 0..10 {
            f.events.run_with_timeout(0).unwrap();
        }
        assert_eq!(f.serial.lock().unwrap().input_capacity(), 0);
        let mut got = guest_reads_all(&f.serial);
        assert_eq!(got.len(), 64, "only one FIFO's worth was read");
        while got.len() < flood.len() {
            f.events.run_with_timeout(100).unwrap();
            f.events.run_with_timeout(0).unwrap();
            let more = guest_reads_all(&f.serial);
            assert!(!more.is_empty(), "input resumed after the guest made room");
            got.extend(more);
        }
        assert_eq!(got, flood);
    }

    #[test]
    fn ctrl_bracket_quits_on_a_terminal_and_passes_through_otherwise() {
        let mut f = fixture(true);
        f.host.write_all(b"ab\x1dcd").unwrap();
        f.events.run_with_timeout(100).unwrap();
        assert_eq!(guest_reads_all(&f.serial), b"ab");
        assert_eq!(f.state.outcome(), Some(Outcome::ConsoleQuit));

        let mut f = fixture(false);
        f.host.write_all(b"ab\x1dcd").unwrap();
        f.events.run_with_timeout(100).unwrap();
        assert_eq!(guest_reads_all(&f.serial), b"ab\x1dcd");
        assert_eq!(f.state.outcome(), None);
    }

    #[test]
    fn input_eof_stops_reading_without_spinning() {
        let mut f = fixture(false);
        drop(f.host);
        f.events.run_with_timeout(100).unwrap();
        // With input unwatched, the loop has nothing ready and times out.
        assert_eq!(f.events.run_with_timeout(50).unwrap(), 0);
    }
}
