//! The source's `migration` thread: connect, offer, copy memory while the VM runs, ask the
//! VM's main thread to stop it, send the rest and the state, hand the disks and the VM
//! over.
//!
//! The main thread is asked through [`Request`]s on a channel, and woken through the event
//! loop's eventfd. What it changed (paused, stopped, disks closed) it undoes on
//! [`Request::Failed`]. The thread never touches devices or vCPUs itself.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::storage::DiskSender;
use super::wire::{self, AuthKey, Channel, Kind, Range, PAGE, PAGES_PER_MESSAGE};
use super::{Endpoint, JobInfo, JobState, MigrateRequest, MigrationError, Offer};
use crate::dirty::{DirtyLog, PageSet, Tracker};
use crate::snapshot::SnapshotState;

/// How long connecting may take.
const CONNECT: Duration = Duration::from_secs(10);
/// How long a write may block (a stalled destination).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination may take to answer (it opens disks, taps, builds the VM).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the main thread may take to do what it is asked.
const MAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the thread asks of the VM's main thread.
pub enum Request {
    /// Pause the vCPUs (a migration that is not live, before memory is copied).
    Pause(Sender<Result<(), String>>),
    /// Stop the VM and capture its state; then wait, touching no guest memory and running no
    /// device, until `sent` is dropped (the last pages and the state are out, or failed).
    Stop {
        /// Where the state goes.
        state: Sender<Result<Box<SnapshotState>, String>>,
        /// Dropped by the thread when the main thread may go on.
        sent: Receiver<()>,
    },
    /// The destination has the state: close the disks.
    ReleaseDisks(Sender<Result<(), String>>),
    /// The VM runs on the destination: end here.
    Completed,
    /// The migration failed before the destination was told to run: undo and go on.
    Failed,
    /// The destination was told to run the VM but did not confirm: stay stopped.
    InDoubt,
}

/// What the thread needs.
pub struct Setup {
    /// Where to.
    pub endpoint: Endpoint,
    /// How.
    pub params: MigrateRequest,
    /// The shared key, if any.
    pub key: Option<AuthKey>,
    /// The first message.
    pub offer: Offer,
    /// The VM's dirty log.
    pub dirty: Arc<DirtyLog>,
    /// Its memory.
    pub mem: GuestMemoryMmap,
    /// Disks whose data goes along.
    pub disks: DiskSender,
}

/// The thread's side of the job: its way to the main thread and the shared progress.
pub struct Control {
    /// Requests to the main thread.
    pub requests: Sender<Request>,
    /// Wakes the main thread's event loop.
    pub wake: EventFd,
    /// Progress, read by the API.
    pub info: Arc<Mutex<JobInfo>>,
    /// Set by `ember domjobabort`.
    pub cancel: Arc<AtomicBool>,
}

impl Control {
    pub(super) fn update(&self, f: impl FnOnce(&mut JobInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn tell(&self, r: Request) -> bool {
        let sent = self.requests.send(r).is_ok();
        let _ = self.wake.write(1);
        sent
    }

    /// Sends a request that the main thread answers on `rx`.
    fn ask<T>(&self, r: Request, rx: Receiver<Result<T, String>>) -> Result<T, MigrationError> {
        if !self.tell(r) {
            return Err(MigrationError::Vm("the VM is gone".into()));
        }
        match rx.recv_timeout(MAIN_TIMEOUT) {
            Ok(r) => r.map_err(MigrationError::Vm),
            Err(_) => Err(MigrationError::Vm(
                "the VM's main thread did not answer".into(),
            )),
        }
    }

    pub(super) fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }
}

/// How a migration ended, for the thread's last word to the main thread.
enum End {
    /// The destination runs the VM.
    Done,
    /// Failed before Go: the VM goes on here.
    Failed(MigrationError),
    /// Go was sent and not confirmed.
    InDoubt(MigrationError),
}

/// The thread's body.
pub fn run(setup: Setup, ctl: Control) {
    let started = Instant::now();
    let end = migrate(setup, &ctl, started);
    let elapsed = started.elapsed().as_millis() as u64;
    match end {
        End::Done => {
            ctl.update(|i| {
                i.state = JobState::Completed;
                i.elapsed_ms = elapsed;
                i.remaining = 0;
            });
            ctl.tell(Request::Completed);
        }
        End::Failed(e) => {
            let cancelled = matches!(e, MigrationError::Cancelled);
            log::warn!("migration failed: {}", crate::error_chain(&e));
            ctl.update(|i| {
                i.state = if cancelled {
                    JobState::Cancelled
                } else {
                    JobState::Failed
                };
                i.elapsed_ms = elapsed;
                i.error = Some(crate::error_chain(&e));
            });
            ctl.tell(Request::Failed);
        }
        End::InDoubt(e) => {
            let text = format!(
                "the destination was told to run the VM but did not confirm ({}); the VM \
                 stays paused here with its disks closed: run 'ember resume' here only if \
                 the destination does not run it",
                crate::error_chain(&e)
            );
            log::error!("migration: {text}");
            ctl.update(|i| {
                i.state = JobState::Failed;
                i.elapsed_ms = elapsed;
                i.error = Some(text);
            });
            ctl.tell(Request::InDoubt);
        }
    }
}

fn open(endpoint: &Endpoint) -> Result<TcpStream, MigrationError> {
    let mut last = None;
    for addr in endpoint.resolve()? {
        match TcpStream::connect_timeout(&addr, CONNECT) {
            Ok(s) => {
                let net = |what| {
                    move |source| MigrationError::Net {
                        what,
                        addr: endpoint.to_string(),
                        source,
                    }
                };
                s.set_nodelay(true).map_err(net("cannot set up"))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
                    .map_err(net("cannot set up"))?;
                s.set_read_timeout(Some(ANSWER_TIMEOUT))
                    .map_err(net("cannot set up"))?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(MigrationError::Net {
        what: "cannot connect to",
        addr: endpoint.to_string(),
        source: last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()),
    })
}

fn migrate(mut setup: Setup, ctl: &Control, started: Instant) -> End {
    let mut ch = match handshake(&setup, ctl) {
        Ok(ch) => ch,
        Err(e) => return End::Failed(e),
    };
    let state = match precopy(&mut setup, ctl, &mut ch, started) {
        Ok(s) => s,
        Err(e) => {
            ch.refuse(&format!("the source gave up: {}", crate::error_chain(&e)));
            return End::Failed(e);
        }
    };
    handover(ctl, &mut ch, state)
}

fn handshake(setup: &Setup, ctl: &Control) -> Result<Channel<TcpStream>, MigrationError> {
    ctl.update(|i| i.state = JobState::Setup);
    let stream = open(&setup.endpoint)?;
    let mut ch = wire::connect(stream, setup.key.as_ref())?;
    if let Some(mib) = setup.params.bandwidth_mib {
        ch.limit_rate(mib << 20);
    }
    let offer = serde_json::to_vec(&setup.offer).map_err(|e| MigrationError::Vm(e.to_string()))?;
    ch.send(Kind::Offer, &[&offer])?;
    ch.expect(Kind::Accept, &mut Vec::new())?;
    log::info!(
        "migration to {}: accepted{}",
        setup.endpoint,
        if ch.authenticated() {
            " (authenticated)"
        } else {
            ""
        }
    );
    Ok(ch)
}

/// When the VM stopped (its state is out).
struct Stopped {
    at: Instant,
}

/// Copies memory until what is left fits the downtime, stops the VM, sends the rest and
/// the state.
fn precopy(
    setup: &mut Setup,
    ctl: &Control,
    ch: &mut Channel<TcpStream>,
    started: Instant,
) -> Result<Stopped, MigrationError> {
    let tracker = Tracker::start(&setup.dirty).map_err(MigrationError::Dirty)?;
    let live = setup.params.live;
    if !live {
        let (tx, rx) = mpsc::channel();
        ctl.ask(Request::Pause(tx), rx)?;
    }
    ctl.update(|i| i.state = JobState::Active);
    setup.disks.precopy(ch, ctl)?;
    let mut pages = PageSet::all(&setup.mem);
    let mut first = true;
    loop {
        ctl.check_cancel()?;
        let t = Instant::now();
        let out = send_pages(ch, &setup.mem, &pages, first, ctl)?;
        let took = t.elapsed().max(Duration::from_millis(1));
        first = false;
        pages = tracker.take().map_err(MigrationError::Dirty)?;
        let pass = note_pass(ctl, ch, &pages, out, took, started)?;
        if !live || pass.expected <= Duration::from_millis(setup.params.downtime_ms) {
            break;
        }
        if let Some(limit) = setup.params.timeout_s {
            if started.elapsed() >= Duration::from_secs(limit) {
                return Err(MigrationError::Timeout(limit));
            }
        }
    }
    stop_and_send(setup, ctl, ch, &tracker, pages)
}

/// What one pass showed.
struct Pass {
    expected: Duration,
}

fn note_pass(
    ctl: &Control,
    ch: &mut Channel<TcpStream>,
    left: &PageSet,
    out: u64,
    took: Duration,
    started: Instant,
) -> Result<Pass, MigrationError> {
    let remaining = left.count() * PAGE as u64;
    let secs = took.as_secs_f64();
    let bandwidth = ((out as f64 / secs) as u64).max(1);
    let expected = Duration::from_secs_f64(remaining as f64 / bandwidth as f64);
    let mut iteration = 0;
    ctl.update(|i| {
        i.iteration += 1;
        iteration = i.iteration;
        i.remaining = remaining;
        i.dirty_rate = (remaining as f64 / secs) as u64;
        i.bandwidth = bandwidth;
        i.expected_downtime_ms = expected.as_millis() as u64;
        i.bytes_sent = ch.bytes_out();
        i.elapsed_ms = started.elapsed().as_millis() as u64;
    });
    let mut body = [0u8; 16];
    body[..8].copy_from_slice(&iteration.to_le_bytes());
    body[8..].copy_from_slice(&remaining.to_le_bytes());
    ch.send(Kind::Iteration, &[&body])?;
    log::debug!(
        "migration pass {iteration}: {out} bytes in {took:?}, {remaining} bytes dirty, \
         expected downtime {expected:?}"
    );
    Ok(Pass { expected })
}

fn stop_and_send(
    setup: &mut Setup,
    ctl: &Control,
    ch: &mut Channel<TcpStream>,
    tracker: &Tracker,
    mut pages: PageSet,
) -> Result<Stopped, MigrationError> {
    ctl.check_cancel()?;
    let (state_tx, state_rx) = mpsc::channel();
    let (sent_tx, sent_rx) = mpsc::channel::<()>();
    ctl.update(|i| i.state = JobState::Stopping);
    let state = ctl.ask(
        Request::Stop {
            state: state_tx,
            sent: sent_rx,
        },
        state_rx,
    )?;
    let at = Instant::now();
    // The main thread waits (no device runs) until `sent_tx` is dropped, on any return.
    let _hold = sent_tx;
    let last = tracker.take().map_err(MigrationError::Dirty)?;
    pages.merge(&last);
    send_pages(ch, &setup.mem, &pages, false, ctl)?;
    setup.disks.finish(ch, ctl)?;
    if setup.params.verify {
        let sums = super::memory_checksums(&setup.mem).map_err(MigrationError::Vm)?;
        let bytes: Vec<u8> = sums.iter().flat_map(|c| c.to_le_bytes()).collect();
        ch.send(Kind::Verify, &[&bytes])?;
    }
    let body = serde_json::to_vec(&state).map_err(|e| MigrationError::Vm(e.to_string()))?;
    ch.send(Kind::State, &[&body])?;
    ctl.update(|i| {
        i.remaining = 0;
        i.bytes_sent = ch.bytes_out();
    });
    Ok(Stopped { at })
}

/// Sends the pages of `set`: runs of pages with data as `Pages`, runs of zero pages as
/// `Zero` (or not at all on the first pass: the destination's memory starts zeroed).
/// Returns the bytes sent.
fn send_pages(
    ch: &mut Channel<TcpStream>,
    mem: &GuestMemoryMmap,
    set: &PageSet,
    first: bool,
    ctl: &Control,
) -> Result<u64, MigrationError> {
    let before = ch.bytes_out();
    let mut buf = vec![0u8; PAGES_PER_MESSAGE * PAGE];
    let mut since_update = 0u64;
    for (addr, n) in set.runs(PAGES_PER_MESSAGE) {
        ctl.check_cancel()?;
        let data = &mut buf[..n * PAGE];
        mem.read_slice(data, GuestAddress(addr))
            .map_err(|e| MigrationError::Vm(format!("cannot read guest memory: {e}")))?;
        let mut sent = 0u64;
        for (start, len, zero) in split_zero(data) {
            let range = Range {
                at: addr + (start * PAGE) as u64,
                count: len as u32,
                disk: 0,
            };
            if !zero {
                let bytes = &data[start * PAGE..(start + len) * PAGE];
                ch.send(Kind::Pages, &[&range.bytes(), bytes])?;
                sent += bytes.len() as u64;
            } else if !first {
                ch.send(Kind::Zero, &[&range.bytes()])?;
            }
        }
        since_update += sent;
        if since_update >= 8 << 20 || sent == 0 {
            let out = ch.bytes_out();
            ctl.update(|i| {
                i.ram_sent += since_update;
                i.bytes_sent = out;
            });
            since_update = 0;
        }
    }
    ctl.update(|i| {
        i.ram_sent += since_update;
        i.bytes_sent = ch.bytes_out();
    });
    Ok(ch.bytes_out() - before)
}

/// Splits pages into runs of (first page, pages, all zero).
pub fn split_zero(data: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    static ZERO: [u8; PAGE] = [0; PAGE];
    for (i, page) in data.chunks(PAGE).enumerate() {
        // A slice comparison is one memcmp.
        let zero = page == &ZERO[..page.len()];
        match out.last_mut() {
            Some((_, n, z)) if *z == zero => *n += 1,
            _ => out.push((i, 1, zero)),
        }
    }
    out
}

/// The destination checks the state, the source closes its disks, the destination opens
/// them and builds the VM, the source says go.
fn handover(ctl: &Control, ch: &mut Channel<TcpStream>, stopped: Stopped) -> End {
    let mut scratch = Vec::new();
    ctl.update(|i| i.state = JobState::Handover);
    let before_go = (|| {
        ch.expect(Kind::StateOk, &mut scratch)?;
        let (tx, rx) = mpsc::channel();
        ctl.ask(Request::ReleaseDisks(tx), rx)?;
        ch.send(Kind::Released, &[])?;
        ch.expect(Kind::Ready, &mut scratch)?;
        ctl.check_cancel()?;
        ch.send(Kind::Go, &[]).map_err(MigrationError::from)
    })();
    if let Err(e) = before_go {
        if !matches!(e, MigrationError::Wire(wire::WireError::Refused(_))) {
            ch.refuse(&format!("the source gave up: {}", crate::error_chain(&e)));
        }
        return End::Failed(e);
    }
    match ch.expect(Kind::Running, &mut scratch) {
        Ok(()) => {
            let downtime = stopped.at.elapsed().as_millis() as u64;
            ctl.update(|i| {
                i.downtime_ms = Some(downtime);
                i.bytes_sent = ch.bytes_out();
            });
            log::info!("migration: the destination runs the VM; downtime {downtime} ms");
            End::Done
        }
        Err(e) => End::InDoubt(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_data_pages_split_into_runs() {
        let mut d = vec![0u8; 5 * PAGE];
        d[PAGE + 7] = 1;
        d[2 * PAGE] = 9;
        d[5 * PAGE - 1] = 3;
        assert_eq!(
            split_zero(&d),
            vec![(0, 1, true), (1, 2, false), (3, 1, true), (4, 1, false)]
        );
        assert_eq!(split_zero(&[0u8; PAGE]), vec![(0, 1, true)]);
    }
}
