//! Ember's hotplug endpoints: disks and NICs attached to and detached from a running VM
//! (always on PCI, through ACPI PCI hotplug).
//!
//! - `PUT /ember/devices/disk`: a [`DiskConfig`] (`path`, and `id`, `format`, `readonly`,
//!   `serial`, `cache` as on `--disk`); answered at once with the device's id, slot and the
//!   configuration recorded for the VM.
//! - `PUT /ember/devices/net`: a [`NetConfig`] (`tap`, `network` or `bridge`, and `id`,
//!   `mac`, `mtu`); the same answer.
//! - `PUT /ember/devices/detach`: a [`DetachRequest`]; answered once the guest released the
//!   device (then it is gone and its resources are free), or when `timeout_secs` ran out
//!   (504: the device stays, its detach pending).

use serde::{Deserialize, Serialize};

use super::http::{Request, Response};
use super::{bad_request, body, unknown, ApiRequest};
use crate::config::{DiskConfig, NetConfig};

/// How long a detach waits for the guest when the request does not say.
pub const DEFAULT_DETACH_TIMEOUT_SECS: u32 = 20;
/// The longest wait a detach may ask for.
pub const MAX_DETACH_TIMEOUT_SECS: u32 = 600;

/// What kind of device a detach means (a check: `detach-disk` never removes a NIC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A virtio-blk disk.
    Disk,
    /// A virtio-net NIC.
    Net,
}

/// `PUT /ember/devices/detach`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetachRequest {
    /// The device's id (`vdb`, `eth1`).
    pub id: String,
    /// Refuse unless the device is of this kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<DeviceKind>,
    /// Seconds to wait for the guest ([`DEFAULT_DETACH_TIMEOUT_SECS`] when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
}

/// A routed hotplug request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HotplugRequest {
    /// Attach a disk.
    AttachDisk(DiskConfig),
    /// Attach a NIC.
    AttachNet(NetConfig),
    /// Detach a device.
    Detach(DetachRequest),
}

/// Routes `PUT /ember/devices/...`.
pub fn route(req: &Request, parts: &[&str]) -> Result<ApiRequest, Response> {
    let r = match parts.get(2).copied() {
        Some("disk") => {
            let d: DiskConfig = body(req)?;
            d.check("disk").map_err(|e| bad_request(&e.to_string()))?;
            HotplugRequest::AttachDisk(d)
        }
        Some("net") => {
            let n: NetConfig = body(req)?;
            n.check("net").map_err(|e| bad_request(&e.to_string()))?;
            HotplugRequest::AttachNet(n)
        }
        Some("detach") => {
            let d: DetachRequest = body(req)?;
            if d.timeout_secs
                .is_some_and(|t| t == 0 || t > MAX_DETACH_TIMEOUT_SECS)
            {
                return Err(bad_request(&format!(
                    "timeout_secs: give 1 to {MAX_DETACH_TIMEOUT_SECS}"
                )));
            }
            HotplugRequest::Detach(d)
        }
        _ => return Err(unknown(req, "ember")),
    };
    if parts.len() > 3 {
        return Err(unknown(req, "ember"));
    }
    Ok(ApiRequest::Hotplug(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(path: &str, body: &str) -> Result<ApiRequest, Response> {
        let req = Request {
            method: "PUT".into(),
            path: path.into(),
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            keep_alive: true,
        };
        super::super::route(&req)
    }

    fn fault(r: Result<ApiRequest, Response>) -> String {
        let r = r.unwrap_err();
        assert_eq!(r.status, 400);
        r.body.unwrap()
    }

    #[test]
    fn attach_and_detach_route_with_the_config_models() {
        let Ok(ApiRequest::Hotplug(HotplugRequest::AttachDisk(d))) = put(
            "/ember/devices/disk",
            r#"{"path":"/x.qcow2","id":"vdc","readonly":true}"#,
        ) else {
            panic!("not routed");
        };
        assert_eq!((d.id(), d.readonly), ("vdc", true));
        let Ok(ApiRequest::Hotplug(HotplugRequest::AttachNet(n))) = put(
            "/ember/devices/net",
            r#"{"tap":"tap0","mac":"52:54:00:00:00:09"}"#,
        ) else {
            panic!("not routed");
        };
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(
            put("/ember/devices/detach", r#"{"id":"vdc","kind":"disk"}"#),
            Ok(ApiRequest::Hotplug(HotplugRequest::Detach(DetachRequest {
                id: "vdc".into(),
                kind: Some(DeviceKind::Disk),
                timeout_secs: None,
            })))
        );
    }

    #[test]
    fn bad_bodies_are_refused_with_the_reason() {
        assert!(fault(put("/ember/devices/disk", r#"{"id":"vdc"}"#)).contains("path"));
        assert!(fault(put("/ember/devices/disk", r#"{"path":"/x","bogus":1}"#)).contains("bogus"));
        assert!(fault(put("/ember/devices/disk", r#"{"path":"/x","id":"a b"}"#)).contains("id="));
        assert!(
            fault(put("/ember/devices/net", r#"{"mac":"52:54:00:00:00:09"}"#))
                .contains("names no tap=")
        );
        assert!(
            fault(put("/ember/devices/net", r#"{"tap":"a","bridge":"b"}"#)).contains("give one of")
        );
        assert!(fault(put(
            "/ember/devices/detach",
            r#"{"id":"x","timeout_secs":0}"#
        ))
        .contains("timeout_secs"));
        assert!(fault(put("/ember/devices/other", "{}")).contains("Invalid request"));
        assert!(fault(put("/ember/devices/disk/x", r#"{"path":"/x"}"#)).contains("Invalid"));
    }
}
