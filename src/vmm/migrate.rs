//! The VM's side of a migration ([`crate::migration`]): starting the `migration` thread
//! (`PUT /ember/migrate`), doing what it asks between event-loop rounds (pause; stop and
//! capture, then wait while it sends; close the disks; end; or undo), its progress and
//! cancel; and, on the destination, a VM built from received memory and state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::disk::{self, DetachedDisk, DiskImage};
use devices::GuestMemoryMmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{Vmm, VmmError};
use crate::api::http::Response;
use crate::api::server::ConnId;
use crate::device_manager::VirtioHandle;
use crate::migration::source::{self, Control, Request, Setup};
use crate::migration::storage::{self, DiskSender};
use crate::migration::wire::AuthKey;
use crate::migration::{compat, Endpoint, JobInfo, JobState, MigrateRequest, Offer};
use crate::run_state::{Outcome, VmState};
use crate::session::Session;
use crate::snapshot::{SnapshotError, SnapshotState};

/// The longest the main thread waits, stopped, for the last pages and the state to go out
/// (a stalled connection ends sooner: its writes time out).
const FINAL_WAIT: Duration = Duration::from_secs(90);
/// Most event-loop passes spent letting devices finish their work before a capture.
const DRAIN_PASSES: usize = 64;

/// A VM's migration, if one runs or ran.
#[derive(Default)]
pub(super) struct Migration {
    job: Option<Job>,
    /// The progress of the last job that ended.
    last: Option<JobInfo>,
    /// Disks a migration closed that are not open again, by id.
    released: Vec<String>,
}

struct Job {
    requests: Receiver<Request>,
    info: Arc<Mutex<JobInfo>>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The `PUT /ember/migrate` connection, answered when the job ends.
    waiter: Option<ConnId>,
    /// The job paused or stopped the VM.
    paused_by_job: bool,
    /// The VM's user had paused it before the job did.
    user_paused: bool,
}

impl Drop for Migration {
    fn drop(&mut self) {
        if let Some(job) = &self.job {
            job.cancel.store(true, Ordering::SeqCst);
        }
    }
}

fn info_of(job: &Job) -> JobInfo {
    job.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Vmm {
    /// `PUT /ember/migrate`: starts the job; `conn` is answered when it ends.
    pub(super) fn start_migration(
        &mut self,
        req: MigrateRequest,
        conn: ConnId,
    ) -> Result<(), Response> {
        if self.migration.job.is_some() {
            return Err(Response::fault(
                409,
                "a migration of this VM is under way; see 'ember domjobinfo'",
            ));
        }
        if !self.migration.released.is_empty() {
            return Err(Response::fault(
                409,
                "a migration left this VM's disks closed; 'ember resume' it first",
            ));
        }
        let bad = |m: String| Response::fault(400, &m);
        let endpoint = Endpoint::parse(&req.url).map_err(|e| bad(e.to_string()))?;
        let key = match &req.auth_key {
            Some(p) => Some(AuthKey::from_file(p).map_err(|e| bad(format!("--auth-key {e}")))?),
            None => None,
        };
        let (offer, disks) = self.offer(&req).map_err(bad)?;
        let info = Arc::new(Mutex::new(JobInfo {
            state: JobState::Setup,
            live: req.live,
            destination: endpoint.to_string(),
            ram_total: self.config.memory.0,
            ..JobInfo::default()
        }));
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let wake = self
            .run_state
            .wake_fd()
            .try_clone()
            .map_err(|e| Response::fault(500, &format!("cannot create an eventfd: {e}")))?;
        let setup = Setup {
            endpoint,
            params: req.clone(),
            key,
            offer,
            dirty: self.dirty.clone(),
            mem: self.mem.clone(),
            disks,
        };
        let ctl = Control {
            requests: tx,
            wake,
            info: info.clone(),
            cancel: cancel.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || source::run(setup, ctl))
            .map_err(|e| Response::fault(500, &format!("cannot start the migration: {e}")))?;
        log::info!("migration of {} to {} started", self.config.name, req.url);
        self.migration.job = Some(Job {
            requests: rx,
            info,
            cancel,
            thread: Some(thread),
            waiter: Some(conn),
            paused_by_job: false,
            user_paused: false,
        });
        Ok(())
    }

    /// The first message, and the disks whose data goes along.
    fn offer(&self, req: &MigrateRequest) -> Result<(Offer, DiskSender), String> {
        let mut copied = Vec::new();
        let mut send = Vec::new();
        for (i, d) in self.config.disks.iter().enumerate() {
            if req.copy_storage && !d.readonly {
                copied.push(Some(storage::describe(d).map_err(|e| e.to_string())?));
                send.push((i as u32, d.clone()));
            } else {
                copied.push(None);
            }
        }
        let offer = Offer {
            ember_version: env!("CARGO_PKG_VERSION").to_string(),
            config: self.config.clone(),
            regions: self
                .mem
                .iter()
                .map(|r| (r.start_addr().0, r.len()))
                .collect(),
            cpu_features: compat::features(&self.plan.entries),
            live: req.live,
            copied,
        };
        Ok((offer, DiskSender::new(send)))
    }

    /// `GET /ember/migration`: the running job's progress, or the last one's.
    pub(super) fn migration_info(&self) -> Response {
        let info = match (&self.migration.job, &self.migration.last) {
            (Some(job), _) => info_of(job),
            (None, Some(last)) => last.clone(),
            (None, None) => JobInfo::default(),
        };
        Response::json(200, serde_json::to_string(&info).unwrap_or_default())
    }

    /// `PUT /ember/migration/abort`.
    pub(super) fn abort_migration(&mut self) -> Response {
        match &self.migration.job {
            Some(job) if !info_of(job).state.is_final() => {
                job.cancel.store(true, Ordering::SeqCst);
                Response::empty(204)
            }
            _ => Response::fault(400, "no migration of this VM is under way"),
        }
    }

    /// Does what the migration thread asks (called each event-loop round).
    pub(super) fn serve_migration(&mut self, session: &Session) {
        loop {
            let Some(job) = &self.migration.job else {
                return;
            };
            let Ok(req) = job.requests.try_recv() else {
                return;
            };
            match req {
                Request::Pause(tx) => {
                    let r = self.pause_for_migration();
                    let _ = tx.send(r);
                }
                Request::Stop { state, sent } => self.stop_for_migration(state, sent),
                Request::ReleaseDisks(tx) => {
                    let _ = tx.send(self.release_disks());
                }
                Request::Completed => self.end_migration(session, Ok(())),
                Request::Failed => {
                    let undo = self.undo_migration();
                    self.end_migration(session, Err((500, undo, true)));
                }
                Request::InDoubt => self.end_migration(session, Err((500, None, false))),
            }
        }
    }

    fn job_mut(&mut self) -> Option<&mut Job> {
        self.migration.job.as_mut()
    }

    fn pause_for_migration(&mut self) -> Result<(), String> {
        let was_paused = self.state == VmState::Paused;
        self.pause()?;
        if let Some(job) = self.job_mut() {
            if !job.paused_by_job {
                job.user_paused = was_paused;
                job.paused_by_job = true;
            }
        }
        Ok(())
    }

    /// Stops the VM, lets the devices finish what the guest gave them, captures the state,
    /// and waits (no device runs, no guest memory changes) until the thread sent it all.
    fn stop_for_migration(
        &mut self,
        reply: mpsc::Sender<Result<Box<SnapshotState>, String>>,
        sent: Receiver<()>,
    ) {
        if let Err(e) = self.pause_for_migration() {
            let _ = reply.send(Err(format!("cannot pause the VM: {e}")));
            return;
        }
        self.drain_devices();
        let user_paused = self.job_mut().is_some_and(|j| j.user_paused);
        let state =
            self.capture(user_paused, Vec::new())
                .map(Box::new)
                .map_err(|e: SnapshotError| {
                    format!("cannot capture the VM's state: {}", crate::error_chain(&e))
                });
        if reply.send(state).is_ok() {
            let _ = sent.recv_timeout(FINAL_WAIT);
        }
    }

    /// Lets the event loop serve what devices hold (requests the guest posted before it
    /// stopped), so the state captured next has nothing half done.
    fn drain_devices(&mut self) {
        for _ in 0..DRAIN_PASSES {
            match self.events.run_with_timeout(0) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => {
                    log::warn!("event loop: {e:?}");
                    return;
                }
            }
        }
        log::warn!("migration: devices were still busy after {DRAIN_PASSES} passes");
    }

    /// Closes every disk image (the destination opens them next): a stand-in with no file
    /// takes each one's place, so the image locks are gone.
    fn release_disks(&mut self) -> Result<(), String> {
        for (id, b) in self.blocks() {
            let mut dev = b.lock().unwrap_or_else(|e| e.into_inner());
            dev.flush_disk()
                .map_err(|e| format!("disk {id}: {}", crate::error_chain(&e)))?;
            dev.swap_disk::<()>(|old| {
                let standin = DetachedDisk::like(old.as_ref());
                drop(old);
                Ok(Box::new(standin))
            })
            .map_err(|()| format!("disk {id}: cannot close it"))?;
            self.migration.released.push(id);
        }
        log::debug!("migration: disks closed");
        Ok(())
    }

    /// Opens again the disks a migration closed.
    pub(super) fn reopen_disks(&mut self) -> Result<(), String> {
        for (id, b) in self.blocks() {
            if !self.migration.released.contains(&id) {
                continue;
            }
            let Some(cfg) = self.config.disks.iter().find(|d| d.id() == id) else {
                return Err(format!("disk {id} is not in the configuration"));
            };
            let opts = disk::OpenOptions {
                format: cfg.format.map(Into::into),
                read_only: cfg.readonly,
                cache: cfg.cache.into(),
                force_share: false,
            };
            let image: Box<dyn DiskImage> = disk::open_image(&cfg.path, &opts)
                .map_err(|e| format!("disk {id}: {}", crate::error_chain(&e)))?;
            b.lock()
                .unwrap_or_else(|e| e.into_inner())
                .swap_disk::<()>(|_standin| Ok(image))
                .map_err(|()| format!("disk {id}: cannot reopen it"))?;
            self.migration.released.retain(|r| *r != id);
        }
        Ok(())
    }

    /// Whether a migration job holds the VM: while one runs, nothing may rebuild it or
    /// change its run state behind the job's back (a resume while the destination takes
    /// over would leave two running copies).
    pub(super) fn migration_holds(&self) -> bool {
        self.migration
            .job
            .as_ref()
            .is_some_and(|j| !info_of(j).state.is_final())
    }

    /// After a failure: disks open again, the VM running if it ran. Returns what could not
    /// be undone.
    fn undo_migration(&mut self) -> Option<String> {
        let mut problem = None;
        if let Err(e) = self.reopen_disks() {
            log::error!("migration failed and the disks cannot be reopened: {e}");
            problem = Some(format!("the disks cannot be reopened: {e}"));
        }
        let resume = self
            .job_mut()
            .is_some_and(|j| j.paused_by_job && !j.user_paused);
        if resume && problem.is_none() {
            if let Err(e) = self.resume() {
                problem = Some(format!("the VM cannot be resumed: {e}"));
            }
        }
        problem
    }

    /// Ends the job: answers its waiter and, when the VM now runs elsewhere, ends it here.
    /// `result`: done, or the answer's status, what could not be undone, and whether the
    /// VM goes on here.
    fn end_migration(
        &mut self,
        session: &Session,
        result: Result<(), (u16, Option<String>, bool)>,
    ) {
        let Some(mut job) = self.migration.job.take() else {
            return;
        };
        if let Some(t) = job.thread.take() {
            let _ = t.join();
        }
        let mut info = info_of(&job);
        let answer = match result {
            Ok(()) => {
                self.run_state
                    .request_exit(Outcome::Migrated(info.destination.clone()));
                Response::json(200, serde_json::to_string(&info).unwrap_or_default())
            }
            Err((status, problem, goes_on)) => {
                let mut text = info.error.clone().unwrap_or_else(|| "failed".into());
                if let Some(p) = problem {
                    text = format!("{text}; and {p}");
                    info.error = Some(text.clone());
                } else if goes_on {
                    text.push_str("; the VM goes on here");
                }
                Response::fault(
                    status,
                    &format!("migration to {}: {text}", info.destination),
                )
            }
        };
        if let (Some(conn), Some(server)) = (job.waiter.take(), &session.api) {
            server
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .respond(conn, answer);
        }
        self.migration.last = Some(info);
    }

    /// Builds the VM a migration delivered: its memory as received, every state applied.
    pub fn restore_with_memory(
        state: &SnapshotState,
        mem: GuestMemoryMmap,
        session: &Session,
    ) -> Result<Self, VmmError> {
        let invalid = |e: SnapshotError| VmmError::Snapshot(Box::new(e));
        state.check().map_err(invalid)?;
        let mut vmm = Self::from_state(state, mem, session)?;
        if state.paused {
            vmm.state = VmState::Paused;
        }
        Ok(vmm)
    }
}

/// A RARP frame announcing `mac` (what QEMU sends after a migration): switches and bridges
/// learn the MAC on the new port. It needs no IP address.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac);
    f[32..38].copy_from_slice(&mac);
    f
}

/// When the announcements go out after the VM starts here (QEMU's: 50 ms, then 100 ms
/// more each time).
const ANNOUNCE_AT_MS: [u64; 5] = [0, 50, 150, 300, 500];

impl Vmm {
    /// Announces every NIC's MAC on its tap, a few times over half a second, from a thread
    /// of its own (one write of one frame each, like any transmit).
    pub fn announce_nics(&self) {
        let mut taps = Vec::new();
        for (id, h) in self.devices.virtio_devices() {
            let VirtioHandle::Net(n) = h else { continue };
            let Some(mac) = self
                .config
                .nets
                .iter()
                .find(|c| c.id() == id)
                .and_then(|c| c.mac)
            else {
                continue;
            };
            let fd = devices::bus::lock_device(n, |n| {
                use devices::virtio::net::NetBackend;
                n.backend().raw_fd()
            });
            // SAFETY: dup of a descriptor the device holds open; the copy is ours to close.
            let own = unsafe { libc::dup(fd) };
            if own >= 0 {
                // SAFETY: `own` is a new descriptor nothing else owns.
                taps.push((
                    unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(own) },
                    mac.0,
                ));
            }
        }
        if taps.is_empty() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("announce".into())
            .spawn(move || {
                let mut last = 0;
                for at in ANNOUNCE_AT_MS {
                    std::thread::sleep(Duration::from_millis(at - last));
                    last = at;
                    for (tap, mac) in &taps {
                        let mut frame = vec![0u8; devices::virtio::net::tap::VNET_HDR_LEN];
                        frame.extend_from_slice(&rarp_frame(*mac));
                        if let Err(e) = std::io::Write::write(&mut &*tap, &frame) {
                            log::debug!("cannot announce the NIC: {e}");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot announce the NICs: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_a_broadcast_rarp_from_the_mac() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!((&f[22..28], &f[32..38]), (&mac[..], &mac[..]));
    }
}
