//! The control API: HTTP/1.1 + JSON on a unix socket, Firecracker-compatible where
//! Firecracker has the same thing, with Ember's own endpoints under `/ember/`.
//!
//! [`route`] turns a request into an [`ApiRequest`] (or the error response); the VMM (or,
//! before `InstanceStart`, the pre-boot controller) answers it.

pub mod balloon;
pub mod client;
pub mod firecracker;
pub mod hotplug;
pub mod http;
pub mod server;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use firecracker::{
    BootSource, Drive, InstanceAction, Logger, MachineConfig, MachineConfigUpdate, Metrics,
    NetworkInterface, SnapshotCreate, SnapshotLoad, VmStateChange,
};
use http::{Request, Response};

/// How `ember shutdown` asks the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownMode {
    /// The ACPI power button.
    #[default]
    Acpi,
    /// Ctrl-Alt-Del on the i8042.
    CtrlAltDel,
}

/// Ember's own actions (`PUT /ember/actions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum EmberActionType {
    /// Ask the guest to power off.
    Shutdown,
    /// Ask the guest to power off, then boot it again.
    Reboot,
    /// Hard reset: build and boot the VM again at once.
    Reset,
    /// End the VM at once.
    Destroy,
}

/// `PUT /ember/actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmberAction {
    /// The action.
    pub action_type: EmberActionType,
    /// How to ask the guest (shutdown, reboot).
    #[serde(default)]
    pub mode: ShutdownMode,
}

/// A routed request.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiRequest {
    /// `GET /`.
    InstanceInfo,
    /// `GET /version`.
    Version,
    /// `GET /vm/config`.
    VmConfig,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PATCH /vm`.
    PatchVm(VmStateChange),
    /// `PUT /actions`.
    Action(InstanceAction),
    /// `PUT /boot-source`.
    BootSource(BootSource),
    /// `PUT /drives/{id}`.
    Drive(Drive),
    /// `PUT /network-interfaces/{id}`.
    NetworkInterface(NetworkInterface),
    /// `PUT /logger`.
    Logger(Logger),
    /// `PUT /metrics`.
    Metrics(Metrics),
    /// `GET /ember/info`.
    EmberInfo,
    /// `GET /ember/counters`.
    EmberCounters,
    /// `PUT /ember/actions`.
    EmberAction(EmberAction),
    /// `PUT /snapshot/create`.
    SnapshotCreate(SnapshotCreate),
    /// `PUT /snapshot/load`.
    SnapshotLoad(SnapshotLoad),
    /// `PUT /ember/save`: snapshot, then end the VM (`virsh save`).
    EmberSave(EmberSave),
    /// `PUT /ember/snapshots`: a named snapshot.
    SnapshotCreateAs(NamedSnapshot),
    /// `PUT /ember/snapshots/revert`.
    SnapshotRevert(SnapshotName),
    /// `PUT /ember/snapshots/delete`.
    SnapshotDelete(SnapshotName),
    /// `/balloon`, `/balloon/statistics`, `/ember/balloon`.
    Balloon(balloon::BalloonRequest),
    /// `PUT /ember/migrate`: send the VM away (answered when the migration ends).
    Migrate(crate::migration::MigrateRequest),
    /// `GET /ember/migration`: the migration job's progress.
    MigrationInfo,
    /// `PUT /ember/migration/abort`.
    MigrationAbort,
    /// `PUT /ember/receive-migration`: wait for a VM (before one is configured).
    ReceiveMigration(crate::migration::ReceiveRequest),
    /// `PUT /ember/devices/{disk,net,detach}`: hotplug.
    Hotplug(hotplug::HotplugRequest),
    /// `PUT /ember/vcpus`: plug vCPUs in or out (`virsh setvcpus`).
    SetVcpus(SetVcpus),
}

/// `PUT /ember/vcpus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SetVcpus {
    /// How many vCPUs the VM should have (1 to its `--cpus max`).
    pub count: u8,
}

/// `PUT /ember/snapshots`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamedSnapshot {
    /// The snapshot's name.
    pub name: String,
    /// A description.
    #[serde(default)]
    pub description: String,
    /// Only the disks, as external overlays.
    #[serde(default)]
    pub disk_only: bool,
}

/// A snapshot named in a request.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotName {
    /// The snapshot's name.
    pub name: String,
}

/// `PUT /ember/save`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmberSave {
    /// The state file (memory goes to `PATH.mem`).
    pub path: std::path::PathBuf,
}

/// A 400 with Firecracker's `fault_message`.
pub fn bad_request(msg: &str) -> Response {
    Response::fault(400, msg)
}

fn body<T: DeserializeOwned>(req: &Request) -> Result<T, Response> {
    serde_json::from_slice(&req.body).map_err(|e| {
        bad_request(&format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// Firecracker's id rule: letters, digits and `_`.
fn check_path_id(id: Option<&str>) -> Result<String, Response> {
    let id = id
        .filter(|i| !i.is_empty())
        .ok_or_else(|| bad_request("The ID cannot be empty."))?;
    if !id.chars().all(|c| c.is_alphanumeric() || c == '_') || id.len() > 64 {
        return Err(bad_request(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ));
    }
    Ok(id.to_string())
}

fn unknown(req: &Request, first: &str) -> Response {
    bad_request(&format!(
        "Invalid request method and/or path: {} {first}.",
        req.method
    ))
}

/// Routes `req`; the error is the response to send.
pub fn route(req: &Request) -> Result<ApiRequest, Response> {
    let parts: Vec<&str> = req
        .path
        .trim_start_matches('/')
        .split_terminator('/')
        .collect();
    let first = parts.first().copied().unwrap_or("");
    let has_body = !req.body.is_empty();
    match req.method.as_str() {
        "GET" if has_body => Err(bad_request("GET request cannot have a body.")),
        "PUT" if !has_body => Err(bad_request("Empty PUT request.")),
        "GET" => route_get(req, &parts, first),
        "PUT" => route_put(req, &parts, first),
        "PATCH" if !has_body => Err(bad_request("Empty PATCH request.")),
        "PATCH" => match first {
            "vm" => Ok(ApiRequest::PatchVm(body(req)?)),
            "balloon" => balloon::route(req, &parts),
            "ember" if parts.get(1) == Some(&"balloon") => balloon::route(req, &parts),
            "machine-config" => {
                let u: MachineConfigUpdate = body(req)?;
                if u == MachineConfigUpdate::default() {
                    return Err(bad_request("Empty PATCH request."));
                }
                Ok(ApiRequest::PatchMachineConfig(u))
            }
            _ => Err(unknown(req, first)),
        },
        _ => Err(unknown(req, first)),
    }
}

fn route_get(req: &Request, parts: &[&str], first: &str) -> Result<ApiRequest, Response> {
    match (first, parts.get(1).copied()) {
        ("", _) => Ok(ApiRequest::InstanceInfo),
        ("version", _) => Ok(ApiRequest::Version),
        ("vm", Some("config")) => Ok(ApiRequest::VmConfig),
        ("machine-config", _) => Ok(ApiRequest::GetMachineConfig),
        ("ember", Some("info")) => Ok(ApiRequest::EmberInfo),
        ("ember", Some("counters")) => Ok(ApiRequest::EmberCounters),
        ("balloon", _) | ("ember", Some("balloon")) => balloon::route(req, parts),
        ("ember", Some("migration")) => Ok(ApiRequest::MigrationInfo),
        _ => Err(unknown(req, first)),
    }
}

fn route_put(req: &Request, parts: &[&str], first: &str) -> Result<ApiRequest, Response> {
    match first {
        "actions" => Ok(ApiRequest::Action(body(req)?)),
        "boot-source" => Ok(ApiRequest::BootSource(body(req)?)),
        "machine-config" => Ok(ApiRequest::PutMachineConfig(body(req)?)),
        "logger" => Ok(ApiRequest::Logger(body(req)?)),
        "metrics" => Ok(ApiRequest::Metrics(body(req)?)),
        "balloon" => balloon::route(req, parts),
        "drives" => {
            let id = check_path_id(parts.get(1).copied())?;
            let d: Drive = body(req)?;
            if d.drive_id != id {
                return Err(bad_request(
                    "The id from the path does not match the id from the body!",
                ));
            }
            Ok(ApiRequest::Drive(d))
        }
        "network-interfaces" => {
            let id = check_path_id(parts.get(1).copied())?;
            let n: NetworkInterface = body(req)?;
            if n.iface_id != id {
                return Err(bad_request(&format!(
                    "The id from the path [{id}] does not match the id from the body [{}]!",
                    n.iface_id
                )));
            }
            Ok(ApiRequest::NetworkInterface(n))
        }
        "ember" if parts.get(1) == Some(&"actions") => Ok(ApiRequest::EmberAction(body(req)?)),
        "ember" if parts.get(1) == Some(&"save") => Ok(ApiRequest::EmberSave(body(req)?)),
        "ember" if parts.get(1..) == Some(&["vcpus"]) => Ok(ApiRequest::SetVcpus(body(req)?)),
        "ember" if parts.get(1) == Some(&"devices") => hotplug::route(req, parts),
        "ember" if parts.get(1) == Some(&"migrate") => Ok(ApiRequest::Migrate(body(req)?)),
        "ember" if parts.get(1..) == Some(&["migration", "abort"]) => {
            Ok(ApiRequest::MigrationAbort)
        }
        "ember" if parts.get(1) == Some(&"receive-migration") => {
            Ok(ApiRequest::ReceiveMigration(body(req)?))
        }
        "ember" if parts.get(1) == Some(&"snapshots") => match parts.get(2).copied() {
            None => Ok(ApiRequest::SnapshotCreateAs(body(req)?)),
            Some("revert") => Ok(ApiRequest::SnapshotRevert(body(req)?)),
            Some("delete") => Ok(ApiRequest::SnapshotDelete(body(req)?)),
            Some(_) => Err(unknown(req, first)),
        },
        "snapshot" => match parts.get(1).copied() {
            Some("create") => Ok(ApiRequest::SnapshotCreate(body(req)?)),
            Some("load") => Ok(ApiRequest::SnapshotLoad(body(req)?)),
            None => Err(bad_request("Missing snapshot operation type.")),
            Some(other) => Err(bad_request(&format!(
                "Invalid request method and/or path: {} /snapshot/{other}.",
                req.method
            ))),
        },
        _ => Err(unknown(req, first)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            keep_alive: true,
        }
    }

    fn fault_of(r: Response) -> (u16, String) {
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        (r.status, v["fault_message"].as_str().unwrap().to_string())
    }

    #[test]
    fn firecracker_paths_route() {
        assert_eq!(route(&req("GET", "/", "")), Ok(ApiRequest::InstanceInfo));
        assert_eq!(route(&req("GET", "/version", "")), Ok(ApiRequest::Version));
        assert_eq!(
            route(&req("GET", "/vm/config", "")),
            Ok(ApiRequest::VmConfig)
        );
        assert!(matches!(
            route(&req("PATCH", "/vm", "{\"state\":\"Paused\"}")),
            Ok(ApiRequest::PatchVm(_))
        ));
        assert!(matches!(
            route(&req(
                "PUT",
                "/actions",
                "{\"action_type\":\"InstanceStart\"}\n"
            )),
            Ok(ApiRequest::Action(_))
        ));
        assert!(matches!(
            route(&req(
                "PUT",
                "/drives/rootfs",
                "{\"drive_id\":\"rootfs\",\"path_on_host\":\"/x\",\"is_root_device\":true}"
            )),
            Ok(ApiRequest::Drive(_))
        ));
    }

    #[test]
    fn errors_use_firecrackers_words() {
        let cases = [
            (
                req("GET", "/nonexistent", ""),
                "Invalid request method and/or path: GET nonexistent.",
            ),
            (req("PUT", "/nonexistent", ""), "Empty PUT request."),
            (req("GET", "/", "{}"), "GET request cannot have a body."),
            (req("PUT", "/drives/", "{}"), "The ID cannot be empty."),
            (
                req("PUT", "/drives/a-b", "{}"),
                "API Resource IDs can only contain alphanumeric characters and underscores.",
            ),
            (
                req(
                    "PUT",
                    "/drives/a",
                    "{\"drive_id\":\"b\",\"is_root_device\":false}",
                ),
                "The id from the path does not match the id from the body!",
            ),
            (
                req("POST", "/", ""),
                "Invalid request method and/or path: POST .",
            ),
            (
                req("PATCH", "/machine-config", "{}"),
                "Empty PATCH request.",
            ),
        ];
        for (r, want) in cases {
            let (status, msg) = fault_of(route(&r).unwrap_err());
            assert_eq!(
                (status, msg.as_str()),
                (400, want),
                "{} {}",
                r.method,
                r.path
            );
        }
        let (_, msg) = fault_of(route(&req("PUT", "/actions", "{\"action_type\": ")).unwrap_err());
        assert!(
            msg.starts_with("An error occurred when deserializing the json body"),
            "{msg}"
        );
        assert!(msg.ends_with('.'));
    }

    #[test]
    fn migration_endpoints_route() {
        assert_eq!(
            route(&req("GET", "/ember/migration", "")),
            Ok(ApiRequest::MigrationInfo)
        );
        assert_eq!(
            route(&req("PUT", "/ember/migration/abort", "{}")),
            Ok(ApiRequest::MigrationAbort)
        );
        let Ok(ApiRequest::Migrate(m)) = route(&req(
            "PUT",
            "/ember/migrate",
            r#"{"url":"tcp:127.0.0.1:4444","live":true}"#,
        )) else {
            panic!("not routed");
        };
        assert!(m.live);
        assert!(matches!(
            route(&req(
                "PUT",
                "/ember/receive-migration",
                r#"{"url":"tcp:0.0.0.0:4444"}"#
            )),
            Ok(ApiRequest::ReceiveMigration(_))
        ));
        assert!(route(&req("PUT", "/ember/migrate", r#"{"live":true}"#)).is_err());
    }

    #[test]
    fn ember_endpoints_route() {
        assert_eq!(
            route(&req("GET", "/ember/info", "")),
            Ok(ApiRequest::EmberInfo)
        );
        let r = route(&req(
            "PUT",
            "/ember/actions",
            "{\"action_type\":\"Shutdown\",\"mode\":\"ctrl-alt-del\"}",
        ));
        assert_eq!(
            r,
            Ok(ApiRequest::EmberAction(EmberAction {
                action_type: EmberActionType::Shutdown,
                mode: ShutdownMode::CtrlAltDel
            }))
        );
        assert_eq!(
            route(&req("PUT", "/ember/vcpus", "{\"count\":2}")),
            Ok(ApiRequest::SetVcpus(SetVcpus { count: 2 }))
        );
        for bad in ["{\"count\":-1}", "{\"count\":256}", "{\"cpus\":2}", "{}"] {
            assert!(route(&req("PUT", "/ember/vcpus", bad)).is_err(), "{bad}");
        }
        assert!(route(&req("PUT", "/ember/vcpus/2", "{\"count\":2}")).is_err());
    }
}
