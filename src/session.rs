//! The life of one `ember run` process around its VM: the state directory (the name's lock),
//! the console, the API server, the wait for Firecracker-style configuration and
//! `InstanceStart`, and the build -> boot -> run loop that starts the VM again after a reset.
//! These outlast any one build of the VM.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use serde_json::json;

use crate::api::firecracker::{self as fc, msg, ActionType, PendingVm};
use crate::api::http::Response;
use crate::api::server::{ApiServer, ConnId, ServerError, SharedServer};
use crate::api::{self, ApiRequest};
use crate::config::{RebootAction, VmConfig};
use crate::console::{Console, ConsoleError};
use crate::device_manager::EventLoop;
use crate::run_state::{Outcome, RunState, VmState};
use crate::vmdir::{VmDir, VmDirError};
use crate::vmm::{Vmm, VmmError};

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The state directory.
    #[error(transparent)]
    Dir(#[from] VmDirError),
    /// The console.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// The API socket.
    #[error(transparent)]
    Api(#[from] ServerError),
    /// Building or running the VM.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The `--api-sock` link in the state directory.
    #[error("cannot link {0} into the state directory")]
    Link(String, #[source] std::io::Error),
    /// The event loop.
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    /// A bad --config-file.
    #[error("--config-file {0}: {1}")]
    ConfigFile(String, String),
    /// The main thread's seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// Waiting for an incoming migration.
    #[error("--incoming")]
    Migration(#[from] crate::migration::MigrationError),
}

impl SessionError {
    /// True for errors the user fixes by changing the command line (exit status 2).
    pub fn is_user_error(&self) -> bool {
        match self {
            SessionError::Dir(VmDirError::InUse { .. })
            | SessionError::Api(ServerError::InUse(_))
            | SessionError::ConfigFile(..)
            | SessionError::Migration(_)
            | SessionError::Console(ConsoleError::File { .. }) => true,
            SessionError::Vmm(e) => e.is_user_error(),
            _ => false,
        }
    }
}

/// Called once the VM (or, pre-boot, the API) is ready.
pub type OnReady = Box<dyn FnOnce(&Session)>;

/// What `ember run` was asked to do.
pub struct RunRequest {
    /// The VM's name.
    pub name: String,
    /// The VM, when given on the command line; else it comes through the API.
    pub config: Option<VmConfig>,
    /// Firecracker-style configuration (`--config-file`), booted at once.
    pub pending: Option<PendingVm>,
    /// `--api-sock PATH` instead of the state directory's socket.
    pub api_sock: Option<PathBuf>,
    /// `--no-api`.
    pub no_api: bool,
    /// The console (for a VM configured through the API).
    pub serial: crate::config::SerialMode,
    /// Called once the VM (or, pre-boot, the API) is ready.
    pub on_ready: Option<OnReady>,
    /// Start from a snapshot (`ember run --restore`) instead of a kernel.
    pub restore: Option<RestoreSpec>,
    /// Wait for the VM to come by migration (`ember run --incoming`).
    pub incoming: Option<crate::migration::incoming::IncomingSpec>,
}

/// A VM to bring back from a snapshot, and what replaces the saved configuration.
#[derive(Clone, Debug, Default)]
pub struct RestoreSpec {
    /// The state file.
    pub state: PathBuf,
    /// The memory file.
    pub memory: PathBuf,
    /// Start paused (`Some(true)`), running, or as saved (`None`).
    pub paused: Option<bool>,
    /// New backends for NICs, by NIC id (a NIC's tap on another host or after a clone).
    pub nets: Vec<crate::config::NetConfig>,
    /// Other images for disks, by disk id (a per-run overlay, a clone's copy).
    pub disks: Vec<crate::config::DiskConfig>,
    /// Track dirty pages (for Diff snapshots); a snapshot does not keep it.
    pub track_dirty_pages: bool,
    /// Set kvmclock as saved: the guest's clock does not jump by the time it was away.
    pub keep_clock: bool,
}

/// How the VM starts.
enum Start {
    /// Boot this configuration's kernel.
    Boot(VmConfig),
    /// Restore a snapshot.
    Restore(RestoreSpec),
    /// Wait for an incoming migration.
    Incoming(crate::migration::ReceiveRequest),
}

/// What lives as long as the process.
pub struct Session {
    /// The VM's name.
    pub name: String,
    /// The console's host side.
    pub console: Console,
    /// The API server.
    pub api: Option<SharedServer>,
    /// The state directory (holds the name).
    pub dir: VmDir,
    /// `PUT /metrics`: where FlushMetrics writes.
    metrics: Mutex<Option<File>>,
    created: Instant,
}

/// `GET /version`.
pub fn version_response() -> Response {
    let v = json!({
        "firecracker_version": "1.16.1",
        "ember_version": env!("CARGO_PKG_VERSION"),
    });
    Response::json(200, v.to_string())
}

impl Session {
    /// `GET /`.
    pub fn instance_info(&self, state: VmState) -> Response {
        let v = json!({
            "id": self.name,
            "state": state,
            "vmm_version": env!("CARGO_PKG_VERSION"),
            "app_name": "Ember",
        });
        Response::json(200, v.to_string())
    }

    /// The API socket's path, if any.
    pub fn api_path(&self) -> Option<PathBuf> {
        self.api.as_ref().map(|a| {
            a.lock()
                .unwrap_or_else(|e| e.into_inner())
                .path()
                .to_path_buf()
        })
    }

    /// `FlushMetrics`: one JSON line of counters to the metrics file.
    pub fn flush_metrics(&self, counters: &serde_json::Value) -> Response {
        let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = m.as_mut() {
            let line = json!({
                "utc_timestamp_ms": std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_default(),
                "uptime_ms": self.created.elapsed().as_millis() as u64,
                "ember": counters,
            });
            if let Err(e) = writeln!(f, "{line}") {
                return Response::fault(400, &format!("Metrics error: cannot write: {e}"));
            }
        }
        Response::empty(204)
    }

    fn set_metrics(&self, path: &Path) -> Result<(), String> {
        let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        if m.is_some() {
            return Err(
                "Metrics error: Cannot initialize the metrics system due to bad user \
                        input: Reinitialization of metrics not allowed."
                    .into(),
            );
        }
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| {
                format!(
                    "Metrics error: Cannot initialize the metrics system due to bad user \
                     input: {e}"
                )
            })?;
        *m = Some(f);
        Ok(())
    }
}

/// Wakes the pre-boot loop when a signal or the exit state asks.
struct Waker(Arc<RunState>);

impl MutEventSubscriber for Waker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.wake_fd(), EventSet::IN)) {
            log::error!("cannot watch the exit event: {e:?}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.wake_fd().read();
    }
}

/// Runs `req` to its end.
pub fn run(mut req: RunRequest) -> Result<Outcome, SessionError> {
    let dir = VmDir::claim(&req.name)?;
    let serial = req
        .config
        .as_ref()
        .map(|c| c.serial.clone())
        .unwrap_or_else(|| req.serial.clone());
    let console = Console::open(&serial, Some(&dir.console_log()))?;
    let api = if req.no_api {
        None
    } else {
        let path = req.api_sock.clone().unwrap_or_else(|| dir.api_sock());
        let server = ApiServer::bind(&path, Some(console.hub().clone()))?;
        if req.api_sock.is_some() {
            dir.link_api_sock(&path)
                .map_err(|e| SessionError::Link(path.display().to_string(), e))?;
        }
        Some(Arc::new(Mutex::new(server)))
    };
    dir.publish()?;
    let session = Session {
        name: req.name.clone(),
        console,
        api,
        dir,
        metrics: Mutex::new(None),
        created: Instant::now(),
    };
    // From here the main thread reads the API socket and builds VMs: filtered.
    crate::seccomp::install(crate::seccomp::Role::Vmm, "main")?;
    let on_ready = req.on_ready.take();
    if let Some(spec) = req.restore.take() {
        let (vmm, cfg) = restore_vmm(&session, &spec, &serial)?;
        return run_vm(&session, &cfg, Some(vmm), on_ready);
    }
    if let Some(spec) = req.incoming.take() {
        if let Some(ready) = on_ready {
            ready(&session);
        }
        return incoming(&session, &spec, &serial, None);
    }
    match (req.config.take(), req.pending.take()) {
        (Some(mut c), _) => {
            c.serial = serial;
            run_vm(&session, &c, None, on_ready)
        }
        (None, Some(p)) => {
            let mut c = p
                .to_vm_config(&session.name)
                .map_err(|e| SessionError::ConfigFile(String::new(), e))?;
            c.serial = serial;
            run_vm(&session, &c, None, on_ready)
        }
        (None, None) => {
            if let Some(ready) = on_ready {
                ready(&session);
            }
            start_from_api(&session, serial)
        }
    }
}

/// Firecracker's flow: configuration and `InstanceStart` come through the API; a start that
/// fails is answered with the error and the wait goes on.
fn start_from_api(
    session: &Session,
    serial: crate::config::SerialMode,
) -> Result<Outcome, SessionError> {
    let mut pending = PendingVm::default();
    loop {
        let (conn, start) = match wait_for_start(session, &mut pending)? {
            Ok(s) => s,
            Err(ended) => return Ok(ended),
        };
        let (built, prefix) = match start {
            Start::Boot(mut cfg) => {
                cfg.serial = serial.clone();
                let vmm = Vmm::build(&cfg, session)
                    .and_then(|mut v| v.boot().map(|()| v))
                    .map_err(SessionError::from);
                (vmm.map(|v| (v, cfg)), "Start microvm error")
            }
            Start::Restore(spec) => (restore_vmm(session, &spec, &serial), "Load snapshot error"),
            Start::Incoming(r) => match crate::migration::incoming::spec_of(&r) {
                Ok(spec) => return incoming(session, &spec, &serial, Some(conn)),
                Err(e) => (Err(SessionError::Migration(e)), "Receive migration error"),
            },
        };
        let answer = match &built {
            Ok(_) => Response::empty(204),
            Err(e) => api::bad_request(&format!("{prefix}: {}", crate::error_chain(e))),
        };
        if let Some(server) = &session.api {
            server
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .respond(conn, answer);
        }
        if let Ok((vmm, cfg)) = built {
            return run_vm(session, &cfg, Some(vmm), None);
        }
    }
}

/// Waits for the VM to come by migration, then runs it.
fn incoming(
    session: &Session,
    spec: &crate::migration::incoming::IncomingSpec,
    serial: &crate::config::SerialMode,
    conn: Option<ConnId>,
) -> Result<Outcome, SessionError> {
    match crate::migration::incoming::wait_for_vm(session, spec, serial, conn)? {
        Ok((vmm, cfg)) => run_vm(session, &cfg, Some(vmm), None),
        Err(ended) => Ok(ended),
    }
}

/// Builds the VM a snapshot describes, named and wired as this session says.
fn restore_vmm(
    session: &Session,
    spec: &RestoreSpec,
    serial: &crate::config::SerialMode,
) -> Result<(Vmm, VmConfig), SessionError> {
    let load = |e: crate::snapshot::SnapshotError| {
        SessionError::Vmm(crate::vmm::VmmError::Snapshot(Box::new(e)))
    };
    let mut state: crate::snapshot::SnapshotState =
        crate::snapshot::format::read_file(&spec.state).map_err(|e| load(e.into()))?;
    state.config.name = session.name.clone();
    state.config.serial = serial.clone();
    state.config.track_dirty_pages = spec.track_dirty_pages;
    if spec.keep_clock {
        // Without KVM_CLOCK_REALTIME the saved clock is set as it is (vstate::restore_vm).
        state.vm.clock.flags &= !kvm_bindings::KVM_CLOCK_REALTIME;
    }
    for n in &spec.nets {
        let Some(slot) = state.config.nets.iter_mut().find(|x| x.id == n.id) else {
            return Err(load(crate::snapshot::SnapshotError::Invalid(format!(
                "the snapshot has no NIC with id {}",
                n.id()
            ))));
        };
        slot.tap = n.tap.clone();
        slot.fd = n.fd;
        slot.network = n.network.clone();
    }
    for d in &spec.disks {
        let Some(slot) = state.config.disks.iter_mut().find(|x| x.id == d.id) else {
            return Err(load(crate::snapshot::SnapshotError::Invalid(format!(
                "the snapshot has no disk with id {}",
                d.id()
            ))));
        };
        slot.path = d.path.clone();
        slot.format = d.format;
        slot.cache = d.cache;
    }
    let vmm = Vmm::restore(&state, &spec.memory, session, spec.paused)?;
    Ok((vmm, state.config))
}

/// Runs the VM (`first`, or one built from `cfg`), and builds and boots it again after each
/// reset asked for.
fn run_vm(
    session: &Session,
    cfg: &VmConfig,
    mut first: Option<Vmm>,
    mut on_ready: Option<OnReady>,
) -> Result<Outcome, SessionError> {
    let mut cfg = cfg.clone();
    let mut rebuilt = false;
    loop {
        let outcome = {
            let mut vmm = match first.take() {
                Some(v) => v,
                None => {
                    let mut v = Vmm::build(&cfg, session)?;
                    v.boot()?;
                    v
                }
            };
            if rebuilt {
                // Its memory is not what the last snapshot of this process holds.
                vmm.mark_all_dirty();
            }
            rebuilt = true;
            if let Some(ready) = on_ready.take() {
                ready(session);
            }
            let outcome = vmm.run(session)?;
            let restarts = match &outcome {
                Outcome::Restart => true,
                Outcome::Reset => cfg.reboot == RebootAction::Restart,
                _ => false,
            };
            // What hotplug changed (devices, vCPUs) stays for a restart, as the machine's.
            (outcome, restarts.then(|| vmm.config_for_restart(session)))
        };
        let (outcome, restart) = outcome;
        if let Some(next) = restart {
            log::info!("VM {} restarts ({outcome:?})", session.name);
            cfg = next;
            continue;
        }
        match outcome {
            Outcome::Revert(snap) => {
                let (vmm, reverted) = revert(session, &snap, &cfg)?;
                log::info!("VM {} reverted to snapshot {snap}", session.name);
                cfg = reverted;
                first = Some(vmm);
            }
            other => return Ok(other),
        }
    }
}

/// Serves the API until `InstanceStart`; returns its connection and the configuration, or
/// `None` when a signal ended the wait.
/// The inner `Err` is how the wait ended without a start (a signal, `ember destroy`).
fn wait_for_start(
    session: &Session,
    pending: &mut PendingVm,
) -> Result<Result<(ConnId, Start), Outcome>, SessionError> {
    let Some(server) = &session.api else {
        return Ok(Err(Outcome::Signal(crate::signals::last_signal())));
    };
    let state = Arc::new(RunState::new().map_err(|e| SessionError::Link("eventfd".into(), e))?);
    let mut events = EventLoop::new().map_err(SessionError::EventLoop)?;
    events.add_subscriber(Arc::new(Mutex::new(Waker(state.clone()))));
    crate::signals::subscribe(&mut events, state.clone());
    events.add_subscriber(server.clone());
    loop {
        events.run().map_err(SessionError::EventLoop)?;
        if state.is_exiting() {
            break;
        }
        if let Some(start) = serve_preboot(session, server, pending, &state) {
            return Ok(Ok(start));
        }
        if state.is_exiting() {
            break;
        }
    }
    let ended = state
        .outcome()
        .unwrap_or_else(|| Outcome::Signal(crate::signals::last_signal()));
    Ok(Err(ended))
}

/// Answers pre-boot requests; returns `InstanceStart`'s connection and configuration (it is
/// answered once the VM is built).
fn serve_preboot(
    session: &Session,
    server: &SharedServer,
    pending: &mut PendingVm,
    state: &RunState,
) -> Option<(ConnId, Start)> {
    loop {
        let next = server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_request();
        let (conn, req) = next?;
        let (resp, start) = match api::route(&req) {
            Ok(ApiRequest::EmberAction(a)) if a.action_type == api::EmberActionType::Destroy => {
                state.request_exit(Outcome::Destroyed);
                (Some(Response::empty(204)), None)
            }
            Ok(r) => preboot_answer(session, pending, r),
            Err(resp) => (Some(resp), None),
        };
        if let Some(resp) = resp {
            server
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .respond(conn, resp);
        }
        if let Some(c) = start {
            return Some((conn, c));
        }
    }
}

fn done(r: Result<(), String>) -> Response {
    match r {
        Ok(()) => Response::empty(204),
        Err(e) => api::bad_request(&e),
    }
}

fn preboot_answer(
    session: &Session,
    pending: &mut PendingVm,
    req: ApiRequest,
) -> (Option<Response>, Option<Start>) {
    let r = match req {
        ApiRequest::InstanceInfo => session.instance_info(VmState::NotStarted),
        ApiRequest::Version => version_response(),
        ApiRequest::VmConfig => {
            let mut full = fc::full_config(
                pending.boot_source.as_ref(),
                &pending.machine,
                &pending.drives,
                &pending.nets,
            );
            full["balloon"] = json!(pending.balloon);
            Response::json(200, full.to_string())
        }
        ApiRequest::GetMachineConfig => Response::json(
            200,
            serde_json::to_string(&pending.machine).unwrap_or_default(),
        ),
        ApiRequest::PutMachineConfig(m) => done(pending.set_machine(m)),
        ApiRequest::PatchMachineConfig(u) => done(pending.patch_machine(u)),
        ApiRequest::BootSource(b) => done(pending.set_boot_source(b)),
        ApiRequest::Drive(d) => done(pending.set_drive(d)),
        ApiRequest::NetworkInterface(n) => done(pending.set_net(n)),
        ApiRequest::Logger(l) => done(crate::logger::configure(&l)),
        ApiRequest::Metrics(m) => done(session.set_metrics(&m.metrics_path)),
        ApiRequest::Balloon(b) => api::balloon::preboot(pending, b),
        ApiRequest::Action(a) if a.action_type == ActionType::InstanceStart => {
            return match pending.to_vm_config(&session.name) {
                Ok(c) => (None, Some(Start::Boot(c))),
                Err(e) => (Some(api::bad_request(&e)), None),
            }
        }
        ApiRequest::SnapshotLoad(l) => {
            return match snapshot_load(pending, &l) {
                Ok(spec) => (None, Some(Start::Restore(spec))),
                Err(e) => (Some(api::bad_request(&e)), None),
            }
        }
        ApiRequest::ReceiveMigration(r) => return (None, Some(Start::Incoming(r))),
        ApiRequest::MigrationInfo => Response::json(200, "{\"state\":\"none\"}".into()),
        ApiRequest::Action(_)
        | ApiRequest::PatchVm(_)
        | ApiRequest::EmberCounters
        | ApiRequest::SnapshotCreate(_)
        | ApiRequest::SnapshotCreateAs(_)
        | ApiRequest::SnapshotRevert(_)
        | ApiRequest::SnapshotDelete(_)
        | ApiRequest::EmberSave(_)
        | ApiRequest::Migrate(_)
        | ApiRequest::MigrationAbort
        | ApiRequest::SetVcpus(_)
        | ApiRequest::Hotplug(_)
        | ApiRequest::EmberAction(_) => api::bad_request(msg::BEFORE_START),
        ApiRequest::EmberInfo => Response::json(
            200,
            json!({"name": session.name, "state": VmState::NotStarted,
                   "pid": std::process::id()})
            .to_string(),
        ),
    };
    (Some(r), None)
}

/// Firecracker's `/snapshot/load`: allowed on a fresh process only.
fn snapshot_load(pending: &PendingVm, l: &fc::SnapshotLoad) -> Result<RestoreSpec, String> {
    let configured = pending.boot_source.is_some()
        || !pending.drives.is_empty()
        || !pending.nets.is_empty()
        || pending.balloon.is_some()
        || pending.machine != fc::MachineConfig::default();
    if configured {
        return Err(
            "Load snapshot error: Loading a microVM snapshot not allowed after \
                    configuring boot-specific resources."
                .into(),
        );
    }
    let memory = l.memory_file()?;
    let nets = l
        .network_overrides
        .iter()
        .map(|o| crate::config::NetConfig {
            id: Some(o.iface_id.clone()),
            tap: Some(o.host_dev_name.clone()),
            fd: None,
            network: None,
            bridge: None,
            mac: None,
            mtu: 1500,
            transport: None,
        })
        .collect();
    Ok(RestoreSpec {
        state: l.snapshot_path.clone(),
        memory,
        paused: Some(!l.resume_vm),
        nets,
        disks: Vec::new(),
        track_dirty_pages: l.track_dirty_pages || l.enable_diff_snapshots,
        keep_clock: false,
    })
}

/// Brings the VM back as its named snapshot `snap` was: its disks first (no VM holds them
/// now), then memory, vCPUs and devices.
fn revert(session: &Session, snap: &str, cfg: &VmConfig) -> Result<(Vmm, VmConfig), SessionError> {
    let fail = |m: String| {
        SessionError::Vmm(crate::vmm::VmmError::Snapshot(Box::new(
            crate::snapshot::SnapshotError::Invalid(m),
        )))
    };
    let meta =
        crate::snapshot::store::load(&session.name, snap).map_err(|e| fail(e.to_string()))?;
    crate::snapshot::disks::apply(&meta).map_err(fail)?;
    let state = crate::snapshot::store::state_path(&session.name, snap);
    let spec = RestoreSpec {
        memory: crate::snapshot::memory_path_for(&state),
        state,
        paused: None,
        nets: cfg.nets.clone(),
        disks: Vec::new(),
        track_dirty_pages: cfg.track_dirty_pages,
        keep_clock: false,
    };
    restore_vmm(session, &spec, &cfg.serial)
}
