//! The balloon's endpoints: Firecracker's `PUT`/`GET`/`PATCH /balloon` and
//! `GET`/`PATCH /balloon/statistics` with its bodies and words, and Ember's own
//! `GET`/`PATCH /ember/balloon` (what `ember setmem` and `ember dommemstat` use: sizes in
//! bytes of guest memory rather than MiB of balloon, and the counters).
//!
//! Firecracker sizes the balloon (`amount_mib`: memory taken from the guest); Ember's config
//! keeps the guest's target memory (`target`, virsh's current memory). One is the VM's
//! memory minus the other.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::firecracker::{msg, PendingVm};
use super::http::{Request, Response};
use super::{bad_request, body, unknown, ApiRequest};
use crate::config::{BalloonConfig, Size, VmConfig};

/// `PUT /balloon`, `GET /balloon`: Firecracker's balloon device configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonDevice {
    /// Balloon size (memory taken from the guest), MiB.
    pub amount_mib: u32,
    /// The guest may deflate when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics; 0: none.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting (not supported: must be false).
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Free page reporting.
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `PATCH /balloon`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// Balloon size, MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// Seconds between statistics; 0: none.
    pub stats_polling_interval_s: u16,
}

/// `PATCH /ember/balloon`: either or both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmberBalloonUpdate {
    /// Guest memory to aim at (`"128M"`, or a number of MiB).
    #[serde(default)]
    pub target: Option<Size>,
    /// Seconds between statistics; 0: none.
    #[serde(default)]
    pub stats_period: Option<u16>,
}

/// A routed balloon request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BalloonRequest {
    /// `PUT /balloon` (before the VM starts).
    Put(BalloonDevice),
    /// `GET /balloon`.
    Get,
    /// `PATCH /balloon`.
    Patch(BalloonUpdate),
    /// `GET /balloon/statistics`.
    GetStats,
    /// `PATCH /balloon/statistics`.
    PatchStats(BalloonStatsUpdate),
    /// `GET /ember/balloon`.
    EmberGet,
    /// `PATCH /ember/balloon`.
    EmberPatch(EmberBalloonUpdate),
}

/// Prefix of errors about the device's configuration.
pub const CONFIG_ERROR: &str = "Balloon config error";
/// Prefix of errors about changes to a running balloon.
pub const UPDATE_ERROR: &str = "Balloon update error";
/// A VM without a balloon.
pub const NO_DEVICE: &str = "Balloon config error: No balloon device found.";
/// Hinting asked for.
const NO_HINTING: &str = "free page hinting is not supported by Ember; use free_page_reporting";

fn hinting(req: &Request) -> Response {
    bad_request(&format!(
        "{UPDATE_ERROR}: {NO_HINTING} ({} {})",
        req.method, req.path
    ))
}

/// Routes `/balloon...` (`parts[0]` is `balloon`) and `/ember/balloon`.
pub fn route(req: &Request, parts: &[&str]) -> Result<ApiRequest, Response> {
    let ember = parts.first() == Some(&"ember");
    let sub = parts.get(1).copied();
    let r = match (req.method.as_str(), ember, sub) {
        ("GET", true, _) => BalloonRequest::EmberGet,
        ("PATCH", true, _) => {
            let u: EmberBalloonUpdate = body(req)?;
            if u == EmberBalloonUpdate::default() {
                return Err(bad_request("Empty PATCH request."));
            }
            BalloonRequest::EmberPatch(u)
        }
        ("GET", _, None) => BalloonRequest::Get,
        ("GET", _, Some("statistics")) => BalloonRequest::GetStats,
        ("GET" | "PATCH", _, Some("hinting")) => return Err(hinting(req)),
        ("GET", _, Some(other)) => {
            return Err(bad_request(&format!(
                "Unrecognized GET request path `{other}`."
            )))
        }
        ("PUT", false, None) => BalloonRequest::Put(body(req)?),
        ("PATCH", _, Some("statistics")) => BalloonRequest::PatchStats(body(req)?),
        // Firecracker takes any other PATCH under /balloon as a size update.
        ("PATCH", _, _) => BalloonRequest::Patch(body(req)?),
        _ => return Err(unknown(req, parts.first().copied().unwrap_or(""))),
    };
    Ok(ApiRequest::Balloon(r))
}

/// Firecracker's view of Ember's balloon config in a VM of `memory` bytes.
pub fn device_of(b: &BalloonConfig, memory: u64) -> BalloonDevice {
    let target = b.target.map_or(memory, |t| t.0.min(memory));
    BalloonDevice {
        amount_mib: u32::try_from((memory - target) >> 20).unwrap_or(u32::MAX),
        deflate_on_oom: b.deflate_on_oom,
        stats_polling_interval_s: b.stats_period,
        free_page_hinting: false,
        free_page_reporting: b.free_page_reporting,
    }
}

/// Ember's balloon config for Firecracker's, in a VM of `memory` bytes.
pub fn config_of(d: &BalloonDevice, memory: u64) -> BalloonConfig {
    let taken = u64::from(d.amount_mib) << 20;
    BalloonConfig {
        target: (taken > 0).then(|| Size(memory.saturating_sub(taken))),
        deflate_on_oom: d.deflate_on_oom,
        free_page_reporting: d.free_page_reporting,
        stats_period: d.stats_polling_interval_s,
        transport: None,
    }
}

/// `full` (a `GET /vm/config` body) with its `balloon` key filled from `cfg`.
pub fn with_balloon(mut full: Value, cfg: &VmConfig) -> Value {
    if let Some(b) = &cfg.balloon {
        full["balloon"] = json!(device_of(b, cfg.memory.0));
    }
    full
}

/// The machine-config check Firecracker makes against a balloon set before it.
pub fn check_machine_memory(pending: &PendingVm, mem_size_mib: usize) -> Result<(), String> {
    match &pending.balloon {
        Some(b) if b.amount_mib as usize > mem_size_mib => Err(
            "Machine config error: The memory size (MiB) is smaller than the previously set \
             balloon device target size."
                .into(),
        ),
        _ => Ok(()),
    }
}

impl PendingVm {
    /// Checks and records `PUT /balloon` (or a config file's `balloon`).
    pub fn set_balloon(&mut self, d: BalloonDevice) -> Result<(), String> {
        if d.free_page_hinting {
            return Err(format!("{CONFIG_ERROR}: {NO_HINTING}"));
        }
        if d.amount_mib as usize > self.machine.mem_size_mib {
            return Err(format!(
                "{CONFIG_ERROR}: Amount of pages requested is too large."
            ));
        }
        self.balloon = Some(d);
        Ok(())
    }
}

/// The answer to a balloon request before the VM starts.
pub fn preboot(pending: &mut PendingVm, r: BalloonRequest) -> Response {
    match r {
        BalloonRequest::Put(d) => match pending.set_balloon(d) {
            Ok(()) => Response::empty(204),
            Err(e) => bad_request(&e),
        },
        BalloonRequest::Get => match &pending.balloon {
            Some(d) => Response::json(200, json!(d).to_string()),
            None => bad_request(NO_DEVICE),
        },
        BalloonRequest::EmberGet => bad_request(msg::BEFORE_START),
        BalloonRequest::Patch(_)
        | BalloonRequest::GetStats
        | BalloonRequest::PatchStats(_)
        | BalloonRequest::EmberPatch(_) => bad_request(msg::BEFORE_START),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::route as route_any;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            keep_alive: true,
        }
    }

    fn routed(method: &str, path: &str, body: &str) -> Result<BalloonRequest, String> {
        match route_any(&req(method, path, body)) {
            Ok(ApiRequest::Balloon(b)) => Ok(b),
            Ok(other) => panic!("{other:?}"),
            Err(r) => Err(r.body.unwrap_or_default()),
        }
    }

    #[test]
    fn firecracker_balloon_paths_and_bodies_route() {
        let put = "{\"amount_mib\":64,\"deflate_on_oom\":true,\"stats_polling_interval_s\":1}";
        assert_eq!(
            routed("PUT", "/balloon", put),
            Ok(BalloonRequest::Put(BalloonDevice {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_polling_interval_s: 1,
                ..BalloonDevice::default()
            }))
        );
        assert_eq!(routed("GET", "/balloon", ""), Ok(BalloonRequest::Get));
        assert_eq!(
            routed("GET", "/balloon/statistics", ""),
            Ok(BalloonRequest::GetStats)
        );
        assert_eq!(
            routed("PATCH", "/balloon", "{\"amount_mib\":10}"),
            Ok(BalloonRequest::Patch(BalloonUpdate { amount_mib: 10 }))
        );
        assert_eq!(
            routed(
                "PATCH",
                "/balloon/statistics",
                "{\"stats_polling_interval_s\":3}"
            ),
            Ok(BalloonRequest::PatchStats(BalloonStatsUpdate {
                stats_polling_interval_s: 3
            }))
        );
        assert_eq!(
            routed("PATCH", "/ember/balloon", "{\"target\":\"128M\"}"),
            Ok(BalloonRequest::EmberPatch(EmberBalloonUpdate {
                target: Some(Size(128 << 20)),
                stats_period: None
            }))
        );
        assert_eq!(
            routed("GET", "/ember/balloon", ""),
            Ok(BalloonRequest::EmberGet)
        );
    }

    #[test]
    fn bad_balloon_requests_are_refused_in_firecrackers_words() {
        let e = routed("GET", "/balloon/bogus", "").unwrap_err();
        assert!(e.contains("Unrecognized GET request path `bogus`."), "{e}");
        let e = routed("PUT", "/balloon", "{\"amount_mib\":1}").unwrap_err();
        assert!(e.contains("missing field `deflate_on_oom`"), "{e}");
        let e = routed("PATCH", "/balloon", "{\"amount_mib\":-1}").unwrap_err();
        assert!(e.contains("deserializing the json body"), "{e}");
        let e = routed("PATCH", "/balloon/statistics", "{}").unwrap_err();
        assert!(
            e.contains("missing field `stats_polling_interval_s`"),
            "{e}"
        );
        let e = routed("PATCH", "/ember/balloon", "{}").unwrap_err();
        assert!(e.contains("Empty PATCH request."), "{e}");
        assert!(routed("GET", "/balloon/hinting/status", "").is_err());
    }

    #[test]
    fn preboot_put_checks_the_size_against_the_machine() {
        let mut p = PendingVm::default();
        p.machine.mem_size_mib = 128;
        let too_big = BalloonDevice {
            amount_mib: 129,
            ..BalloonDevice::default()
        };

        let r = preboot(&mut p, BalloonRequest::Put(too_big));

        assert_eq!(r.status, 400);
        assert!(p.balloon.is_none());
        let ok = BalloonDevice {
            amount_mib: 64,
            ..BalloonDevice::default()
        };
        assert_eq!(preboot(&mut p, BalloonRequest::Put(ok)).status, 204);
        assert!(check_machine_memory(&p, 63).is_err());
        assert_eq!(preboot(&mut p, BalloonRequest::GetStats).status, 400);
    }

    #[test]
    fn firecracker_and_ember_views_convert_both_ways() {
        let d = BalloonDevice {
            amount_mib: 64,
            deflate_on_oom: true,
            stats_polling_interval_s: 2,
            free_page_hinting: false,
            free_page_reporting: true,
        };

        let c = config_of(&d, 256 << 20);

        assert_eq!(c.target, Some(Size(192 << 20)));
        assert_eq!(device_of(&c, 256 << 20), d);
        let empty = config_of(&BalloonDevice::default(), 256 << 20);
        assert_eq!(empty.target, None);
    }
}
