//! Hotplug requests of the API: attach a disk or NIC to the running VM (on PCI), and detach
//! one once the guest released it. The VM's configuration follows, so snapshots,
//! migrations, `dumpconfig` and `domblklist`/`domiflist` see what the guest has.
//!
//! A detach is answered later: the request waits (its connection held) until the guest
//! ejects the slot or its time runs out; the event loop wakes at least every
//! [`TICK`] while one waits.

use std::time::{Duration, Instant};

use serde_json::json;

use super::Vmm;
use crate::api::hotplug::{DetachRequest, DeviceKind, HotplugRequest, DEFAULT_DETACH_TIMEOUT_SECS};
use crate::api::http::Response;
use crate::api::server::ConnId;
use crate::config::{disk_id, DiskConfig, Mac, NetConfig, Transport};
use crate::device_manager::{DeviceError, Plugged};
use crate::run_state::VmState;
use crate::session::Session;

/// How often the event loop looks at waiting detaches.
pub(super) const TICK: Duration = Duration::from_millis(100);

/// A detach waiting for the guest.
pub(super) struct PendingDetach {
    conn: ConnId,
    id: String,
    started: Instant,
    deadline: Instant,
}

/// Answers requests that waited (detaches), on the session's API.
fn respond_all(session: &Session, answers: Vec<(ConnId, Response)>) {
    if answers.is_empty() {
        return;
    }
    let Some(server) = &session.api else { return };
    let mut server = server.lock().unwrap_or_else(|e| e.into_inner());
    for (conn, resp) in answers {
        server.respond(conn, resp);
    }
}

fn refused(e: &DeviceError) -> Response {
    let status = match e {
        DeviceError::DuplicateId(_)
        | DeviceError::NoPciSlot
        | DeviceError::NoPciSpace
        | DeviceError::NoMsiGsi
        | DeviceError::DetachPending(_) => 409,
        DeviceError::NoSuchDevice(_) => 404,
        DeviceError::NoPciBus
        | DeviceError::NotHotpluggable(_)
        | DeviceError::Disk { .. }
        | DeviceError::Tap(_)
        | DeviceError::TapSetup { .. }
        | DeviceError::Network { .. }
        | DeviceError::NoBridge(_) => 400,
        _ => 500,
    };
    Response::fault(status, &crate::error_chain(e))
}

fn plugged(id: &str, p: Plugged, config: serde_json::Value) -> Response {
    let body = json!({
        "id": id,
        "slot": p.slot,
        "pci": format!("0000:00:{:02x}.0", p.slot),
        "guest_listening": p.guest_listening,
        "config": config,
    });
    Response::json(200, body.to_string())
}

impl Vmm {
    /// Answers a hotplug request; None when the answer comes later (a detach).
    pub(super) fn hotplug(&mut self, req: HotplugRequest, conn: ConnId) -> Option<Response> {
        match req {
            HotplugRequest::AttachDisk(d) => Some(self.attach_disk(d)),
            HotplugRequest::AttachNet(n) => Some(self.attach_net(n)),
            HotplugRequest::Detach(d) => self.start_detach(d, conn).err(),
        }
    }

    /// Every id the VM's disks and NICs use.
    fn ids_in_use(&self) -> Vec<String> {
        let c = &self.config;
        let disks = c.disks.iter().map(|d| d.id().to_string());
        disks
            .chain(c.nets.iter().map(|n| n.id().to_string()))
            .collect()
    }

    fn attach_disk(&mut self, mut d: DiskConfig) -> Response {
        let used = self.ids_in_use();
        if d.id.is_none() {
            let free = (0..).map(disk_id).find(|id| !used.contains(id));
            d.id = free;
        }
        if !d.path.is_absolute() {
            return Response::fault(400, "disk: give the image's absolute path");
        }
        d.transport = Some(Transport::Pci);
        match self.devices.hotplug_disk(&mut self.events, &d) {
            Ok(p) => {
                self.config.disks.push(d.clone());
                log::info!("disk {} attached in PCI slot {}", d.id(), p.slot);
                plugged(d.id(), p, json!(d))
            }
            Err(e) => refused(&e),
        }
    }

    fn attach_net(&mut self, mut n: NetConfig) -> Response {
        let used = self.ids_in_use();
        if n.id.is_none() {
            n.id = (0..)
                .map(|i| format!("eth{i}"))
                .find(|id| !used.contains(id));
        }
        let macs: Vec<Mac> = self.config.nets.iter().filter_map(|n| n.mac).collect();
        if n.mac.is_some_and(|m| macs.contains(&m)) {
            return Response::fault(409, "net: another NIC of this VM has that MAC");
        }
        if n.mac.is_none() {
            let seed = self.config.name.clone();
            n.mac = (0..)
                .map(|i| Mac(devices::virtio::net::mac_for(&seed, i)))
                .find(|m| !macs.contains(m));
        }
        n.transport = Some(Transport::Pci);
        match self.devices.hotplug_net(&mut self.events, &n) {
            Ok(p) => {
                self.config.nets.push(n.clone());
                log::info!("NIC {} attached in PCI slot {}", n.id(), p.slot);
                plugged(n.id(), p, json!(n))
            }
            Err(e) => refused(&e),
        }
    }

    fn kind_of(&self, id: &str) -> Option<DeviceKind> {
        if self.config.disks.iter().any(|d| d.id() == id) {
            Some(DeviceKind::Disk)
        } else if self.config.nets.iter().any(|n| n.id() == id) {
            Some(DeviceKind::Net)
        } else {
            None
        }
    }

    fn start_detach(&mut self, d: DetachRequest, conn: ConnId) -> Result<(), Response> {
        let kind = self.kind_of(&d.id);
        if kind.is_none() {
            return Err(refused(&DeviceError::NoSuchDevice(d.id)));
        }
        if d.kind.is_some() && d.kind != kind {
            let what = if kind == Some(DeviceKind::Disk) {
                "a disk"
            } else {
                "a NIC"
            };
            return Err(Response::fault(
                400,
                &format!("device '{}' is {what}", d.id),
            ));
        }
        if self.detaches.iter().any(|p| p.id == d.id) {
            return Err(refused(&DeviceError::DetachPending(d.id)));
        }
        if self.state == VmState::Paused {
            return Err(Response::fault(
                409,
                "the VM is paused: its guest cannot release the device; resume it first",
            ));
        }
        let p = self
            .devices
            .request_unplug(&d.id)
            .map_err(|e| refused(&e))?;
        if !p.guest_listening {
            log::warn!(
                "detach {}: the guest has not enabled PCI hotplug events (no ACPI, or it is \
                 still booting); waiting anyway",
                d.id
            );
        }
        let secs = d.timeout_secs.unwrap_or(DEFAULT_DETACH_TIMEOUT_SECS);
        let now = Instant::now();
        self.detaches.push(PendingDetach {
            conn,
            id: d.id,
            started: now,
            deadline: now + Duration::from_secs(secs.into()),
        });
        Ok(())
    }

    /// Collects the guest's ejects (the devices go, the configuration follows) and answers
    /// the detaches they end or whose time ran out.
    pub(super) fn serve_hotplug(&mut self, session: &Session) {
        // While a migration runs the destination is built from the devices offered at its
        // start: a guest's eject waits (in the controller's state, which migrates) till after.
        let gone = if self.migration_holds() {
            Vec::new()
        } else {
            self.devices.collect_ejected(&mut self.events)
        };
        for id in &gone {
            self.config.disks.retain(|d| d.id() != id);
            self.config.nets.retain(|n| n.id() != id);
        }
        let now = Instant::now();
        let mut answers = Vec::new();
        self.detaches.retain(|p| {
            if gone.contains(&p.id) {
                let ms = now.duration_since(p.started).as_millis() as u64;
                let body = json!({"id": p.id, "detached": true, "guest_ms": ms});
                answers.push((p.conn, Response::json(200, body.to_string())));
                false
            } else if now >= p.deadline {
                let msg = format!(
                    "the guest did not release device '{}' within {} s; it stays attached \
                     and its detach pending (if the guest releases it later, it goes then)",
                    p.id,
                    p.deadline.duration_since(p.started).as_secs()
                );
                answers.push((p.conn, Response::fault(504, &msg)));
                false
            } else {
                true
            }
        });
        respond_all(session, answers);
    }

    /// The configuration a restart (reset, reboot) builds from. As QEMU completes pending
    /// removals on a reset, a device whose detach waited for the guest goes now, and the
    /// detach requests still waiting are answered.
    pub fn config_for_restart(&mut self, session: &Session) -> crate::config::VmConfig {
        let pending = |id: &str| self.devices.unplug_pending(id);
        let mut gone: Vec<String> = self
            .config
            .disks
            .iter()
            .map(|d| d.id().to_string())
            .collect();
        gone.extend(self.config.nets.iter().map(|n| n.id().to_string()));
        gone.retain(|id| pending(id));
        let mut cfg = self.config.clone();
        cfg.disks.retain(|d| !gone.iter().any(|g| g == d.id()));
        cfg.nets.retain(|n| !gone.iter().any(|g| g == n.id()));
        let answers: Vec<(ConnId, Response)> = self
            .detaches
            .drain(..)
            .map(|p| {
                let body = json!({"id": p.id, "detached": true, "on_reset": true});
                (p.conn, Response::json(200, body.to_string()))
            })
            .collect();
        respond_all(session, answers);
        cfg
    }

    /// How long the event loop may sleep: [`TICK`] while a detach waits, else forever.
    pub(super) fn hotplug_tick(&self) -> Option<Duration> {
        (!self.detaches.is_empty()).then_some(TICK)
    }
}
