//! Answers to the control API while the VM runs (or is paused).

use serde_json::json;

use super::Vmm;
use crate::api::balloon::with_balloon;
use crate::api::firecracker::{self as fc, msg, ActionType, VmStateName};
use crate::api::http::Response;
use crate::api::{self, ApiRequest, EmberAction, EmberActionType, ShutdownMode};
use crate::run_state::{Outcome, VmState};
use crate::session::Session;

/// Requests that change the VM's run state or rebuild it.
fn changes_the_vm(req: &ApiRequest) -> bool {
    match req {
        ApiRequest::PatchVm(_)
        | ApiRequest::EmberSave(_)
        | ApiRequest::SnapshotCreate(_)
        | ApiRequest::SnapshotCreateAs(_)
        | ApiRequest::SnapshotRevert(_)
        | ApiRequest::SnapshotDelete(_)
        | ApiRequest::SetVcpus(_) => true,
        ApiRequest::EmberAction(a) => matches!(
            a.action_type,
            EmberActionType::Reset | EmberActionType::Reboot
        ),
        _ => false,
    }
}

impl Vmm {
    /// Answers every request the API server holds.
    pub(super) fn serve_api(&mut self, session: &Session) {
        let Some(server) = &session.api else {
            return;
        };
        loop {
            let next = server
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .next_request();
            let Some((conn, req)) = next else {
                break;
            };
            let resp = match api::route(&req) {
                Ok(ApiRequest::Migrate(m)) => match self.start_migration(m, conn) {
                    Ok(()) => continue, // answered when the migration ends
                    Err(r) => r,
                },
                Ok(ApiRequest::Hotplug(_)) if self.migration_holds() => Response::fault(
                    409,
                    "a migration of this VM is under way; cancel it first (ember domjobabort)",
                ),
                Ok(ApiRequest::Hotplug(h)) => match self.hotplug(h, conn) {
                    Some(r) => r,
                    None => continue, // answered when the guest released the device
                },
                Ok(r) => self.handle(r, session),
                Err(resp) => resp,
            };
            server
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .respond(conn, resp);
        }
    }

    fn handle(&mut self, req: ApiRequest, session: &Session) -> Response {
        if self.migration_holds() && changes_the_vm(&req) {
            return Response::fault(
                409,
                "a migration of this VM is under way; cancel it first (ember domjobabort)",
            );
        }
        match req {
            ApiRequest::InstanceInfo => session.instance_info(self.state),
            ApiRequest::Version => crate::session::version_response(),
            ApiRequest::VmConfig => {
                let (b, m, d, n) = fc::describe(&self.config);
                let full = fc::full_config(Some(&b), &m, &d, &n);
                Response::json(200, with_balloon(full, &self.config).to_string())
            }
            ApiRequest::GetMachineConfig => Response::json(
                200,
                serde_json::to_string(&fc::machine_of(&self.config)).unwrap_or_default(),
            ),
            ApiRequest::PutMachineConfig(_)
            | ApiRequest::PatchMachineConfig(_)
            | ApiRequest::BootSource(_)
            | ApiRequest::Logger(_)
            | ApiRequest::Metrics(_)
            | ApiRequest::Drive(_)
            | ApiRequest::NetworkInterface(_) => api::bad_request(msg::AFTER_START),
            ApiRequest::PatchVm(change) => {
                let r = match change.state {
                    VmStateName::Paused => self.pause(),
                    VmStateName::Resumed => self.resume(),
                };
                match r {
                    Ok(()) => Response::empty(204),
                    Err(e) => Response::fault(500, &format!("cannot change the VM's state: {e}")),
                }
            }
            ApiRequest::Action(a) => match a.action_type {
                ActionType::InstanceStart => api::bad_request(msg::AFTER_START),
                ActionType::SendCtrlAltDel => self.ctrl_alt_del(),
                ActionType::FlushMetrics => session.flush_metrics(&self.counters()),
            },
            ApiRequest::EmberInfo => Response::json(200, self.info(session).to_string()),
            ApiRequest::EmberCounters => Response::json(200, self.counters().to_string()),
            ApiRequest::EmberAction(a) => self.ember_action(a),
            ApiRequest::SnapshotCreate(c) => self.snapshot_create(&c),
            ApiRequest::SnapshotLoad(_) => api::bad_request(msg::AFTER_START),
            ApiRequest::EmberSave(s) => self.save_and_stop(&s.path),
            ApiRequest::SnapshotCreateAs(s) => {
                match self.snapshot_create_as(&s.name, &s.description, s.disk_only) {
                    Ok(meta) => {
                        Response::json(200, serde_json::to_string(&meta).unwrap_or_default())
                    }
                    Err(e) => api::bad_request(&format!("cannot take snapshot {}: {e}", s.name)),
                }
            }
            ApiRequest::SnapshotRevert(s) => self.revert_to(&s.name),
            ApiRequest::SnapshotDelete(s) => self.delete_named(&s.name),
            ApiRequest::Balloon(b) => self.balloon_request(b),
            ApiRequest::MigrationInfo => self.migration_info(),
            ApiRequest::MigrationAbort => self.abort_migration(),
            ApiRequest::SetVcpus(v) => match self.set_vcpus(v.count) {
                Ok(()) => Response::empty(204),
                Err(e) if e.is_user_error() => api::bad_request(&e.to_string()),
                Err(e) => Response::fault(500, &crate::error_chain(&e)),
            },
            // Answered in serve_api, which holds the connection a detach answers later.
            ApiRequest::Hotplug(_) => Response::fault(500, "hotplug request out of place"),
            ApiRequest::Migrate(_) | ApiRequest::ReceiveMigration(_) => api::bad_request(
                "this VM runs already; receive-migration is for an Ember that waits for one",
            ),
        }
    }

    /// Ends this run so the session brings the VM back as snapshot `name` was.
    fn revert_to(&mut self, name: &str) -> Response {
        match crate::snapshot::store::load(&self.config.name, name) {
            Ok(m) if m.has_vm_state => {
                self.run_state
                    .request_exit(Outcome::Revert(name.to_string()));
                Response::empty(204)
            }
            Ok(_) => api::bad_request(&format!(
                "snapshot {name} is disk-only (external overlays): it has no VM state to \
                 revert to"
            )),
            Err(e) => api::bad_request(&e.to_string()),
        }
    }

    fn delete_named(&mut self, name: &str) -> Response {
        let meta = match crate::snapshot::store::load(&self.config.name, name) {
            Ok(m) => m,
            Err(e) => return api::bad_request(&e.to_string()),
        };
        let was_paused = self.state == VmState::Paused;
        if let Err(e) = self.pause() {
            return Response::fault(500, &format!("cannot pause the VM: {e}"));
        }
        self.delete_disk_snapshots(name, &meta.disks);
        if !was_paused {
            let _ = self.resume();
        }
        match crate::snapshot::store::remove(&self.config.name, name) {
            Ok(()) => Response::empty(204),
            Err(e) => api::bad_request(&crate::error_chain(&e)),
        }
    }

    /// Firecracker's `/snapshot/create`: the VM must be paused, and stays so. A Diff needs
    /// dirty-page tracking, and is refused before any file is touched without it.
    fn snapshot_create(&mut self, c: &fc::SnapshotCreate) -> Response {
        const PREFIX: &str = "Create snapshot error";
        let diff = c.snapshot_type == fc::SnapshotType::Diff;
        if diff && !self.tracks_dirty_pages() {
            return api::bad_request(
                "Diff snapshots are not allowed on uVMs with dirty page tracking disabled. \
                 (Turn it on before boot: PUT /machine-config track_dirty_pages, ember run \
                 --track-dirty-pages; or when loading: enable_diff_snapshots.)",
            );
        }
        if self.state != VmState::Paused {
            return api::bad_request(&format!(
                "{PREFIX}: Cannot save the microVM state: Operation not allowed: save/restore \
                 unavailable while running"
            ));
        }
        let written = match diff {
            true => self.diff_snapshot_to(&c.snapshot_path, &c.mem_file_path, true),
            false => self.snapshot_to(&c.snapshot_path, &c.mem_file_path, true),
        };
        match written {
            Ok(()) => Response::empty(204),
            Err(e) => api::bad_request(&format!("{PREFIX}: {}", crate::error_chain(&e))),
        }
    }

    /// `virsh save`: snapshot to `path` (memory to `path.mem`), then end the VM. A failed
    /// save leaves the VM as it was.
    fn save_and_stop(&mut self, path: &std::path::Path) -> Response {
        let was_paused = self.state == VmState::Paused;
        if let Err(e) = self.pause() {
            return Response::fault(500, &format!("cannot pause the VM: {e}"));
        }
        let mem = crate::snapshot::memory_path_for(path);
        match self.snapshot_to(path, &mem, was_paused) {
            Ok(()) => {
                self.run_state
                    .request_exit(Outcome::Saved(path.display().to_string()));
                Response::empty(204)
            }
            Err(e) => {
                if !was_paused {
                    let _ = self.resume();
                }
                api::bad_request(&format!("cannot save the VM: {}", crate::error_chain(&e)))
            }
        }
    }

    fn ember_action(&mut self, a: EmberAction) -> Response {
        match a.action_type {
            EmberActionType::Shutdown => self.ask_guest_to_stop(a.mode),
            EmberActionType::Reboot => {
                self.restart_on_poweroff = true;
                self.ask_guest_to_stop(a.mode)
            }
            EmberActionType::Reset => {
                self.run_state.request_exit(Outcome::Restart);
                Response::empty(204)
            }
            EmberActionType::Destroy => {
                self.run_state.request_exit(Outcome::Destroyed);
                Response::empty(204)
            }
        }
    }

    fn ask_guest_to_stop(&mut self, mode: ShutdownMode) -> Response {
        match mode {
            ShutdownMode::Acpi => self.power_button(),
            ShutdownMode::CtrlAltDel => self.ctrl_alt_del(),
        }
    }

    fn power_button(&mut self) -> Response {
        let pressed = self.devices.acpi_pm().map(|pm| {
            pm.lock()
                .unwrap_or_else(|e| e.into_inner())
                .press_power_button()
        });
        match pressed {
            Some(true) => Response::empty(204),
            Some(false) => Response::fault(
                409,
                "the guest does not listen to the ACPI power button (no ACPI button driver, or \
                 it has not booted that far); try --mode ctrl-alt-del",
            ),
            None => Response::fault(400, "this VM has no ACPI power button"),
        }
    }

    fn ctrl_alt_del(&mut self) -> Response {
        let typed = self.devices.i8042().map(|k| {
            k.lock()
                .unwrap_or_else(|e| e.into_inner())
                .send_ctrl_alt_del()
        });
        match typed {
            Some(true) => Response::empty(204),
            Some(false) => Response::fault(
                409,
                "the guest's keyboard is not enabled (no i8042/atkbd driver, or it has not \
                 booted that far); try --mode acpi",
            ),
            None => Response::fault(400, "this VM has no i8042"),
        }
    }

    /// `GET /ember/info`.
    fn info(&self, session: &Session) -> serde_json::Value {
        let cfg = &self.config;
        json!({
            "name": session.name,
            "state": self.state,
            "pid": std::process::id(),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "vcpus": cfg.cpus.boot,
            "max_vcpus": cfg.cpus.max,
            "present_vcpus": self.present_vcpus(),
            "memory_mib": cfg.memory.0 >> 20,
            "kernel": cfg.kernel,
            "initrd": cfg.initrd,
            "cmdline": cfg.cmdline,
            "api_sock": session.api_path(),
            "console": cfg.serial.to_string(),
            "devices": self.devices.info(),
            "config": cfg,
        })
    }

    /// `GET /ember/counters`.
    pub fn counters(&self) -> serde_json::Value {
        let vcpus: Vec<serde_json::Value> = self
            .handles
            .iter()
            .map(|h| json!({"id": h.id(), "exits": h.counters()}))
            .collect();
        let (disks, nets) = self.devices.counters();
        json!({
            "state": self.state,
            "vcpus": vcpus,
            "disks": disks,
            "nets": nets,
        })
    }

    /// Whether the VM runs (not paused).
    pub fn is_running(&self) -> bool {
        self.state == VmState::Running
    }
}
