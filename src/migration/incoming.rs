//! The destination: `ember run --incoming tcp:ADDR:PORT` or `PUT /ember/receive-migration`.
//!
//! A `migration` thread listens and takes one connection at a time: the handshake, the
//! offer (checked: vCPUs, CPU features, memory layout, NIC backends, disks), memory
//! straight into a new guest memory, copied disks into new overlays, the state. It says it
//! has everything, waits until the source closed its disks, and hands all of it to the
//! main thread. The main thread (which meanwhile answers the API and signals) builds the
//! VM — this opens the disks — says ready, and runs it on the source's go. A failure at any
//! step drops what was received (and removes new disk copies) and listening goes on.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boot::x86_64::cpuid::FeatureEdits;
use devices::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use super::storage::DiskReceiver;
use super::wire::{
    self, AuthKey, Channel, Kind, Range, WireError, PAGE, PAGES_PER_MESSAGE, RANGE_HEADER,
};
use super::{compat, Endpoint, MigrationError, Offer};
use crate::api::http::Response;
use crate::api::server::ConnId;
use crate::api::{self, ApiRequest};
use crate::config::{DiskConfig, NetConfig, SerialMode, VmConfig};
use crate::device_manager::EventLoop;
use crate::run_state::{Outcome, RunState};
use crate::session::{Session, SessionError};
use crate::snapshot::SnapshotState;
use crate::vmm::Vmm;

/// How long the handshake may take (a peer that says nothing is dropped).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the source may be silent during the transfer.
const SILENCE: Duration = Duration::from_secs(60);
/// How long the source may take to say go once the VM is ready here.
const GO_TIMEOUT: Duration = Duration::from_secs(30);

/// What the destination waits for, and what replaces the source's configuration.
#[derive(Clone, Debug)]
pub struct IncomingSpec {
    /// Where to listen.
    pub endpoint: Endpoint,
    /// The shared key, if migrations must be authenticated.
    pub key: Option<AuthKey>,
    /// NIC backends here, by id.
    pub nets: Vec<NetConfig>,
    /// Disk images here, by id.
    pub disks: Vec<DiskConfig>,
    /// CPU features this side may not offer (`--cpu-features`).
    pub cpu_features: FeatureEdits,
}

/// A VM received, its disks closed on the source, to be built here.
pub struct Received {
    ch: Channel<TcpStream>,
    state: SnapshotState,
    mem: GuestMemoryMmap,
    disks: DiskReceiver,
    peer: String,
}

/// Binds the listening socket.
pub fn listen(endpoint: &Endpoint) -> Result<TcpListener, MigrationError> {
    let mut last = None;
    for addr in endpoint.resolve()? {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(MigrationError::Net {
        what: "cannot listen on",
        addr: endpoint.to_string(),
        source: last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()),
    })
}

/// Applies the destination's NIC and disk choices, the name and the console.
pub fn override_config(
    cfg: &mut VmConfig,
    nets: &[NetConfig],
    disks: &[DiskConfig],
) -> Result<(), String> {
    for n in nets {
        let slot = cfg
            .nets
            .iter_mut()
            .find(|x| x.id == n.id)
            .ok_or_else(|| format!("the VM has no NIC with id {}", n.id()))?;
        slot.tap = n.tap.clone();
        slot.fd = n.fd;
        slot.network = n.network.clone();
    }
    for d in disks {
        let slot = cfg
            .disks
            .iter_mut()
            .find(|x| x.id == d.id)
            .ok_or_else(|| format!("the VM has no disk with id {}", d.id()))?;
        slot.path = d.path.clone();
        slot.format = d.format.or(slot.format);
        slot.cache = d.cache;
    }
    Ok(())
}

/// Checks the offer against this host and what this side was told; the configuration to
/// build.
fn check_offer(offer: &Offer, spec: &IncomingSpec, name: &str) -> Result<VmConfig, String> {
    let mut cfg = offer.config.clone();
    cfg.name = name.to_string();
    override_config(&mut cfg, &spec.nets, &spec.disks)?;
    cfg.check().map_err(|e| format!("its configuration: {e}"))?;
    let want: Vec<(u64, u64)> = boot::layout::ram_regions(cfg.memory.0)
        .into_iter()
        .map(|(a, l)| (a.0, l))
        .collect();
    if offer.regions != want {
        return Err("its memory layout is not the one this Ember gives that much RAM".into());
    }
    if offer.copied.len() != cfg.disks.len() {
        return Err("the offer's disk list does not match its configuration".into());
    }
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    if usize::from(cfg.cpus.max) > kvm.get_max_vcpus() {
        return Err(format!(
            "it has {} vCPUs; this host's KVM runs at most {}",
            cfg.cpus.max,
            kvm.get_max_vcpus()
        ));
    }
    let plan = crate::vmm::cpuid::vm_cpuid(&kvm, &spec.cpu_features)
        .map_err(|e| format!("this host's CPUID: {e}"))?;
    let missing = compat::missing(&offer.cpu_features, &plan.entries);
    log::debug!(
        "incoming migration: the guest has CPU features {}; missing here: {missing:?}",
        offer.cpu_features.join(",")
    );
    if !missing.is_empty() {
        return Err(compat::refusal(&missing));
    }
    for n in &cfg.nets {
        if n.fd.is_some() && !spec.nets.iter().any(|o| o.id == n.id) {
            return Err(format!(
                "NIC {} uses a tap descriptor (fd=) on the source; give this side its own \
                 with --net id={},tap=NAME",
                n.id(),
                n.id()
            ));
        }
    }
    for (d, copied) in cfg.disks.iter().zip(&offer.copied) {
        if copied.is_none() {
            crate::config::check_readable_file("--disk", &d.path).map_err(|e| {
                format!(
                    "disk {} is not on this host ({e}); share its storage or use --copy-storage",
                    d.id()
                )
            })?;
        }
    }
    Ok(cfg)
}

/// Writes a `Pages` or `Zero` message into guest memory.
pub fn apply_pages(
    mem: &GuestMemoryMmap,
    payload: &[u8],
    zero: bool,
) -> Result<(), MigrationError> {
    let r = Range::parse(payload)?;
    let data = &payload[RANGE_HEADER..];
    let pages = r.count as usize;
    let len = pages * PAGE;
    let bad = |what: &str| MigrationError::Wire(WireError::Corrupt(what.to_string()));
    if pages == 0 || pages > PAGES_PER_MESSAGE || r.disk != 0 || r.at % PAGE as u64 != 0 {
        return Err(bad("a page range with a bad count or address"));
    }
    if (zero && !data.is_empty()) || (!zero && data.len() != len) {
        return Err(bad("a page message's length does not match its range"));
    }
    let fits = r
        .at
        .checked_add(len as u64)
        .is_some_and(|_| mem.check_range(GuestAddress(r.at), len, vm_memory::Permissions::Write));
    if !fits {
        return Err(bad("pages outside guest memory"));
    }
    let result = if zero {
        mem.write_slice(&[0u8; PAGES_PER_MESSAGE * PAGE][..len], GuestAddress(r.at))
    } else {
        mem.write_slice(data, GuestAddress(r.at))
    };
    result.map_err(|_| bad("pages outside guest memory"))
}

/// Receives memory (into `mem`), copied disks and the state until the state comes. Every
/// message is checked: pages only inside guest memory, disk chunks only inside a copied
/// disk, nothing out of order.
pub fn receive_data<S: wire::Stream>(
    ch: &mut Channel<S>,
    mem: &GuestMemoryMmap,
    disks: &mut DiskReceiver,
    stop: &AtomicBool,
) -> Result<SnapshotState, MigrationError> {
    let mut buf = Vec::with_capacity(RANGE_HEADER + PAGES_PER_MESSAGE * PAGE);
    loop {
        if stop.load(Ordering::SeqCst) {
            return Err(MigrationError::Cancelled);
        }
        match ch.recv(&mut buf)? {
            Kind::Pages => apply_pages(mem, &buf, false)?,
            Kind::Zero => apply_pages(mem, &buf, true)?,
            Kind::Disk => disks.write(&buf)?,
            Kind::Iteration if buf.len() == 16 => log::debug!(
                "incoming migration: pass {} done, {} bytes dirty",
                wire::u64_at(&buf, 0),
                wire::u64_at(&buf, 8)
            ),
            Kind::Verify => {
                let theirs: Vec<u32> = buf
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let ours = super::memory_checksums(mem).map_err(MigrationError::Vm)?;
                if let Some(why) = super::compare_checksums(mem, &theirs, &ours) {
                    ch.refuse(&why);
                    return Err(MigrationError::Refused(why));
                }
                log::info!(
                    "incoming migration: guest memory verified ({} MiB)",
                    ours.len()
                );
            }
            Kind::State => {
                return serde_json::from_slice(&buf).map_err(|e| {
                    MigrationError::Wire(WireError::Corrupt(format!(
                        "the state does not parse: {e}"
                    )))
                })
            }
            Kind::Refuse => {
                return Err(MigrationError::Wire(WireError::Refused(
                    String::from_utf8_lossy(&buf).into_owned(),
                )))
            }
            other => {
                return Err(MigrationError::Wire(WireError::Corrupt(format!(
                    "a {other:?} message during the transfer"
                ))))
            }
        }
    }
}

/// One connection, up to the source's disks closed.
fn receive_one(
    stream: TcpStream,
    spec: &IncomingSpec,
    name: &str,
    stop: &AtomicBool,
) -> Result<Received, MigrationError> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let net = |source| MigrationError::Net {
        what: "cannot set up the connection from",
        addr: peer.clone(),
        source,
    };
    stream.set_nodelay(true).map_err(net)?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(net)?;
    stream.set_write_timeout(Some(SILENCE)).map_err(net)?;
    let mut ch = wire::accept(stream, spec.key.as_ref())?;
    ch.stream().set_read_timeout(Some(SILENCE)).map_err(net)?;
    let mut buf = Vec::new();
    ch.expect(Kind::Offer, &mut buf)?;
    let accepted = serde_json::from_slice::<Offer>(&buf)
        .map_err(|e| format!("the offer does not parse: {e}"))
        .and_then(|offer| Ok((check_offer(&offer, spec, name)?, offer)));
    let (cfg, offer) = match accepted {
        Ok(x) => x,
        Err(why) => {
            ch.refuse(&why);
            return Err(MigrationError::Refused(why));
        }
    };
    let prepared = crate::memory::create_guest_memory(cfg.memory.0)
        .map_err(|e| crate::error_chain(&e))
        .and_then(|m| {
            Ok((
                m,
                DiskReceiver::create(&cfg.disks, &offer.copied).map_err(|e| e.to_string())?,
            ))
        });
    let (mem, mut disks) = match prepared {
        Ok(x) => x,
        Err(why) => {
            ch.refuse(&why);
            return Err(MigrationError::Refused(why));
        }
    };
    ch.send(Kind::Accept, &[])?;
    log::info!(
        "incoming migration from {peer}: VM {} ({} MiB)",
        offer.config.name,
        cfg.memory.0 >> 20
    );
    let mut state = receive_data(&mut ch, &mem, &mut disks, stop)?;
    state.config = cfg;
    if let Err(e) = state
        .check()
        .map_err(|e| crate::error_chain(&e))
        .and_then(|()| disks.close())
    {
        ch.refuse(&format!("the state cannot be used: {e}"));
        return Err(MigrationError::Refused(e));
    }
    ch.send(Kind::StateOk, &[])?;
    ch.expect(Kind::Released, &mut buf)?;
    Ok(Received {
        ch,
        state,
        mem,
        disks,
        peer,
    })
}

/// Waits until `listener` has a connection or `stop` is set.
fn next_connection(listener: &TcpListener, stop: &AtomicBool) -> Option<TcpStream> {
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 200) };
        if n <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((s, _)) => return Some(s),
            Err(e) => {
                log::warn!("incoming migration: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    None
}

/// The thread's body: connections one after the other until one delivers.
fn serve(
    listener: Arc<TcpListener>,
    spec: IncomingSpec,
    name: String,
    stop: Arc<AtomicBool>,
    out: Sender<Received>,
    wake: EventFd,
) {
    while let Some(stream) = next_connection(&listener, &stop) {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        match receive_one(stream, &spec, &name, &stop) {
            Ok(r) => {
                let _ = out.send(r);
                let _ = wake.write(1);
                return;
            }
            Err(e) => log::warn!(
                "incoming migration from {peer} failed: {}; waiting for another",
                crate::error_chain(&e)
            ),
        }
    }
}

/// Wakes the wait loop (the thread's deliveries, signals).
struct Waker(Arc<RunState>);

impl MutEventSubscriber for Waker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.wake_fd(), EventSet::IN)) {
            log::error!("cannot watch the wake event: {e:?}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.wake_fd().read();
    }
}

/// The listening thread and how to reach it.
struct Listening {
    stop: Arc<AtomicBool>,
    rx: Receiver<Received>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listening {
    fn start(
        listener: Arc<TcpListener>,
        spec: &IncomingSpec,
        name: &str,
        state: &RunState,
    ) -> Result<Self, SessionError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let wake = state
            .wake_fd()
            .try_clone()
            .map_err(|e| SessionError::Link("eventfd".into(), e))?;
        let (l, s, sp, n) = (
            listener.clone(),
            stop.clone(),
            spec.clone(),
            name.to_string(),
        );
        let thread = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || serve(l, sp, n, s, tx, wake))
            .map_err(|e| SessionError::Link("the migration thread".into(), e))?;
        Ok(Listening {
            stop,
            rx,
            thread: Some(thread),
        })
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers the API while waiting: what this Ember is doing, and no configuration.
fn answer(session: &Session, endpoint: &Endpoint, state: &RunState, req: ApiRequest) -> Response {
    use crate::run_state::VmState;
    match req {
        ApiRequest::EmberAction(a) if a.action_type == api::EmberActionType::Destroy => {
            state.request_exit(Outcome::Destroyed);
            Response::empty(204)
        }
        ApiRequest::InstanceInfo => session.instance_info(VmState::NotStarted),
        ApiRequest::Version => crate::session::version_response(),
        ApiRequest::EmberInfo => Response::json(
            200,
            serde_json::json!({"name": session.name, "state": VmState::NotStarted,
                               "pid": std::process::id(), "incoming": endpoint.to_string()})
            .to_string(),
        ),
        ApiRequest::MigrationInfo => Response::json(
            200,
            serde_json::json!({"state": "incoming", "destination": endpoint.to_string()})
                .to_string(),
        ),
        _ => api::bad_request(&format!(
            "this Ember waits for an incoming migration on {endpoint}; it takes no other \
             configuration"
        )),
    }
}

fn serve_api(session: &Session, endpoint: &Endpoint, state: &RunState) {
    let Some(server) = &session.api else {
        return;
    };
    loop {
        let next = server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_request();
        let Some((conn, req)) = next else {
            return;
        };
        let resp = match api::route(&req) {
            Ok(r) => answer(session, endpoint, state, r),
            Err(resp) => resp,
        };
        server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .respond(conn, resp);
    }
}

/// Builds the VM received, says ready, and waits for go. On any failure the VM is dropped
/// (its disks closed) and the copies made for it removed.
fn start(
    session: &Session,
    r: Received,
    serial: &SerialMode,
) -> Result<(Vmm, VmConfig), MigrationError> {
    let Received {
        mut ch,
        mut state,
        mem,
        disks,
        peer,
    } = r;
    state.config.serial = serial.clone();
    let vmm = match Vmm::restore_with_memory(&state, mem, session) {
        Ok(v) => v,
        Err(e) => {
            let why = format!(
                "the destination cannot build the VM: {}",
                crate::error_chain(&e)
            );
            ch.refuse(&why);
            return Err(MigrationError::Refused(why));
        }
    };
    ch.send(Kind::Ready, &[])?;
    let _ = ch.stream().set_read_timeout(Some(GO_TIMEOUT));
    ch.expect(Kind::Go, &mut Vec::new())?;
    // The source has ended its copy: this one runs whatever comes next.
    if let Err(e) = ch.send(Kind::Running, &[]) {
        log::warn!("incoming migration: cannot confirm to the source: {e}");
    }
    disks.keep();
    vmm.announce_nics();
    log::info!("incoming migration from {peer}: the VM runs here");
    Ok((vmm, state.config))
}

/// Waits for a VM to come (answering the API and signals meanwhile); `conn` (a
/// `receive-migration` request) is answered once it runs. `Err(outcome)` when a signal or
/// `ember destroy` ended the wait.
pub fn wait_for_vm(
    session: &Session,
    spec: &IncomingSpec,
    serial: &SerialMode,
    mut conn: Option<ConnId>,
) -> Result<Result<(Vmm, VmConfig), Outcome>, SessionError> {
    let listener = Arc::new(listen(&spec.endpoint)?);
    let shown = listener
        .local_addr()
        .map(|a| Endpoint {
            host: a.ip().to_string(),
            port: a.port(),
        })
        .unwrap_or_else(|_| spec.endpoint.clone());
    log::info!(
        "VM {}: waiting for an incoming migration on {shown}",
        session.name
    );
    let state = Arc::new(RunState::new().map_err(|e| SessionError::Link("eventfd".into(), e))?);
    let mut events = EventLoop::new().map_err(SessionError::EventLoop)?;
    events.add_subscriber(Arc::new(Mutex::new(Waker(state.clone()))));
    crate::signals::subscribe(&mut events, state.clone());
    if let Some(server) = &session.api {
        events.add_subscriber(server.clone());
    }
    let mut listening = Listening::start(listener.clone(), spec, &session.name, &state)?;
    loop {
        events.run().map_err(SessionError::EventLoop)?;
        serve_api(session, &shown, &state);
        if state.is_exiting() {
            let signal = Outcome::Signal(crate::signals::last_signal());
            return Ok(Err(state.outcome().unwrap_or(signal)));
        }
        let Ok(received) = listening.rx.try_recv() else {
            continue;
        };
        drop(listening);
        match start(session, received, serial) {
            Ok(built) => {
                if let (Some(c), Some(server)) = (conn.take(), &session.api) {
                    server
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .respond(c, Response::empty(204));
                }
                return Ok(Ok(built));
            }
            Err(e) => log::warn!(
                "incoming migration failed: {}; waiting for another",
                crate::error_chain(&e)
            ),
        }
        listening = Listening::start(listener.clone(), spec, &session.name, &state)?;
    }
}

/// What a `receive-migration` request asks for (NICs and disks without an id are matched by
/// position).
pub fn spec_of(r: &super::ReceiveRequest) -> Result<IncomingSpec, MigrationError> {
    let key = match &r.auth_key {
        Some(p) => Some(AuthKey::from_file(p).map_err(MigrationError::Refused)?),
        None => None,
    };
    let mut nets = r.net.clone();
    for (i, n) in nets.iter_mut().enumerate() {
        n.id.get_or_insert_with(|| format!("eth{i}"));
    }
    let mut disks = r.disk.clone();
    for (i, d) in disks.iter_mut().enumerate() {
        d.id.get_or_insert_with(|| crate::config::disk_id(i));
    }
    Ok(IncomingSpec {
        endpoint: Endpoint::parse(&r.url)?,
        key,
        nets,
        disks,
        cpu_features: FeatureEdits::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read, Write};

    /// A source's bytes to read; answers go nowhere.
    struct Input(Cursor<Vec<u8>>);

    impl Read for Input {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }

    impl Write for Input {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl wire::Stream for Input {}

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind as u8, 0, 0, 0];
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        let crc = crc32fast::hash(&f);
        f.extend_from_slice(&crc.to_le_bytes());
        f
    }

    /// What the fuzz target does with its input.
    fn receive(bytes: Vec<u8>, mem: &GuestMemoryMmap) -> Result<SnapshotState, MigrationError> {
        let mut ch = wire::accept(Input(Cursor::new(bytes)), None)?;
        receive_data(
            &mut ch,
            mem,
            &mut DiskReceiver::default(),
            &AtomicBool::new(false),
        )
    }

    fn hello() -> Vec<u8> {
        let mut h = wire::MAGIC.to_vec();
        h.extend_from_slice(&wire::VERSION.to_le_bytes());
        h.extend_from_slice(&[0u8; 4 + wire::NONCE_LEN]);
        h
    }

    #[test]
    fn a_stream_fills_memory_until_its_state_which_must_parse() {
        let mem = crate::memory::create_guest_memory(2 << 20).unwrap();
        let mut s = hello();
        s.extend(frame(Kind::Pages, &msg(0x1000, 1, &[9u8; PAGE])));
        s.extend(frame(Kind::Iteration, &[0u8; 16]));
        s.extend(frame(Kind::State, b"{}"));
        let e = receive(s, &mem).unwrap_err();
        assert!(e.to_string().contains("the state does not parse"), "{e}");
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(0x1fff)).unwrap();
        assert_eq!(b, [9]);
    }

    #[test]
    fn out_of_place_messages_end_the_transfer() {
        let mem = crate::memory::create_guest_memory(2 << 20).unwrap();
        for bad in [
            frame(Kind::Go, &[]),
            frame(Kind::Disk, &msg(0, 4, b"abcd")),
            frame(Kind::Pages, &msg(4 << 20, 1, &[1u8; PAGE])),
            frame(Kind::Refuse, b"no"),
        ] {
            let mut s = hello();
            s.extend(bad);
            assert!(receive(s, &mem).is_err());
        }
        assert!(receive(hello(), &mem).is_err(), "the stream just ends");
    }

    fn msg(at: u64, count: u32, data: &[u8]) -> Vec<u8> {
        let mut m = Range { at, count, disk: 0 }.bytes().to_vec();
        m.extend_from_slice(data);
        m
    }

    #[test]
    fn pages_land_where_they_say_and_nowhere_outside_memory() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        apply_pages(&mem, &msg(0x3000, 1, &[7u8; PAGE]), false).unwrap();
        let mut b = [0u8; 2];
        mem.read_slice(&mut b, GuestAddress(0x3ffe)).unwrap();
        assert_eq!(b, [7, 7]);
        apply_pages(&mem, &msg(0x3000, 1, &[]), true).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x3ffe)).unwrap();
        assert_eq!(b, [0, 0]);
        for bad in [
            msg(16 << 20, 1, &[0u8; PAGE]),                     // past the end
            msg((16 << 20) - PAGE as u64, 2, &[0u8; 2 * PAGE]), // across it
            msg(0x3001, 1, &[0u8; PAGE]),                       // unaligned
            msg(0x3000, 0, &[]),                                // no pages
            msg(0x3000, 2, &[0u8; PAGE]),                       // short
            msg(u64::MAX - 4095, 1, &[0u8; PAGE]),              // wrapping
        ] {
            assert!(apply_pages(&mem, &bad, false).is_err());
        }
        assert!(apply_pages(&mem, &msg(0x3000, 1, &[0u8; PAGE]), true).is_err());
    }
}
