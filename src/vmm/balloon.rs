//! Answers to the balloon's API on a running (or paused) VM: Firecracker's `/balloon`
//! endpoints and Ember's `/ember/balloon` (`ember setmem`, `ember dommemstat`). A new target
//! or statistics period also goes into the VM's configuration, so `GET /vm/config`,
//! `ember dumpconfig` and a snapshot's manifest say what the balloon is doing.

use std::sync::{Arc, Mutex};

use devices::virtio::balloon::pages::PAGE_SHIFT;
use devices::virtio::balloon::stats::{self, GuestStats};
use devices::virtio::balloon::Balloon;
use serde_json::{json, Map, Value};

use super::Vmm;
use crate::api::balloon::{
    BalloonDevice, BalloonRequest, EmberBalloonUpdate, NO_DEVICE, UPDATE_ERROR,
};
use crate::api::firecracker::msg;
use crate::api::http::Response;
use crate::api::{self};
use crate::config::Size;
use crate::device_manager::lock_balloon as lock;

/// The statistics tags under the names Firecracker's `GET /balloon/statistics` uses.
const STAT_NAMES: [(u16, &str); 16] = [
    (stats::SWAP_IN, "swap_in"),
    (stats::SWAP_OUT, "swap_out"),
    (stats::MAJFLT, "major_faults"),
    (stats::MINFLT, "minor_faults"),
    (stats::MEMFREE, "free_memory"),
    (stats::MEMTOT, "total_memory"),
    (stats::AVAIL, "available_memory"),
    (stats::CACHES, "disk_caches"),
    (stats::HTLB_PGALLOC, "hugetlb_allocations"),
    (stats::HTLB_PGFAIL, "hugetlb_failures"),
    (stats::OOM_KILL, "oom_kill"),
    (stats::ALLOC_STALL, "alloc_stall"),
    (stats::ASYNC_SCAN, "async_scan"),
    (stats::DIRECT_SCAN, "direct_scan"),
    (stats::ASYNC_RECLAIM, "async_reclaim"),
    (stats::DIRECT_RECLAIM, "direct_reclaim"),
];

/// Balloon pages in a MiB.
const PAGES_PER_MIB: u64 = 1 << (20 - PAGE_SHIFT);

fn named_stats(s: &GuestStats) -> Map<String, Value> {
    STAT_NAMES
        .iter()
        .filter_map(|(tag, name)| s.get(*tag).map(|v| (name.to_string(), json!(v))))
        .collect()
}

/// This process's resident memory, bytes (VmRSS), if /proc says.
pub fn own_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

fn update_error(what: &str) -> Response {
    api::bad_request(&format!("{UPDATE_ERROR}: {what}"))
}

impl Vmm {
    /// Answers a balloon request.
    pub(super) fn balloon_request(&mut self, r: BalloonRequest) -> Response {
        if let BalloonRequest::EmberGet = r {
            return Response::json(200, self.balloon_view().to_string());
        }
        if let BalloonRequest::Put(_) = r {
            return api::bad_request(msg::AFTER_START);
        }
        let Some(b) = self.devices.balloon() else {
            return api::bad_request(NO_DEVICE);
        };
        match r {
            BalloonRequest::Get => {
                let d = lock(&b);
                let dev = BalloonDevice {
                    amount_mib: (u64::from(d.target()) / PAGES_PER_MIB) as u32,
                    deflate_on_oom: d.deflate_on_oom(),
                    stats_polling_interval_s: d.stats_period(),
                    free_page_hinting: false,
                    free_page_reporting: d.free_page_reporting(),
                };
                Response::json(200, json!(dev).to_string())
            }
            BalloonRequest::Patch(u) => {
                self.set_balloon_pages(&b, u64::from(u.amount_mib) * PAGES_PER_MIB)
            }
            BalloonRequest::GetStats => firecracker_stats(&lock(&b)),
            BalloonRequest::PatchStats(u) => self.set_stats_period(u.stats_polling_interval_s),
            BalloonRequest::EmberPatch(u) => self.ember_patch(&b, u),
            BalloonRequest::Put(_) | BalloonRequest::EmberGet => api::bad_request(msg::AFTER_START),
        }
    }

    /// Asks the guest for `pages` balloon pages and records the new target.
    fn set_balloon_pages(&mut self, b: &Arc<Mutex<Balloon>>, pages: u64) -> Response {
        let ram = self.devices.ram_size();
        if let Err(e) = lock(b).set_target(pages) {
            return update_error(&format!(
                "{e} ({}); Ember cannot add memory to a running VM",
                Size(ram)
            ));
        }
        if let Some(c) = &mut self.config.balloon {
            let target = ram - (pages << PAGE_SHIFT);
            c.target = (target < ram).then_some(Size(target));
        }
        Response::empty(204)
    }

    fn set_stats_period(&mut self, secs: u16) -> Response {
        if self.devices.set_balloon_stats_period(secs).is_none() {
            return api::bad_request(NO_DEVICE);
        }
        if let Some(c) = &mut self.config.balloon {
            c.stats_period = secs;
        }
        Response::empty(204)
    }

    /// `PATCH /ember/balloon`: a target in bytes of guest memory, a statistics period.
    fn ember_patch(&mut self, b: &Arc<Mutex<Balloon>>, u: EmberBalloonUpdate) -> Response {
        if let Some(target) = u.target {
            let ram = self.devices.ram_size();
            if target.0 > ram {
                return update_error(&format!(
                    "a target of {target} is more than the VM's memory ({}); its maximum \
                     memory cannot change while it runs",
                    Size(ram)
                ));
            }
            if target.0 == 0 {
                return update_error("give a target above 0");
            }
            let r = self.set_balloon_pages(b, (ram - target.0) >> PAGE_SHIFT);
            if r.status != 204 {
                return r;
            }
        }
        match u.stats_period {
            Some(s) => self.set_stats_period(s),
            None => Response::empty(204),
        }
    }

    /// `GET /ember/balloon`: memory (bytes), the balloon's target and actual size as guest
    /// memory, its settings, the guest's latest statistics, this process's RSS and the
    /// device's counters. A VM without a balloon answers with its memory and RSS.
    fn balloon_view(&self) -> Value {
        let ram = self.devices.ram_size();
        let mut v = json!({
            "balloon": false,
            "memory": ram,
            "target": ram,
            "actual": ram,
            "rss": own_rss(),
        });
        let Some(b) = self.devices.balloon() else {
            return v;
        };
        let d = lock(&b);
        let (stats, updated) = d.stats();
        let pages = |p: u32| ram.saturating_sub(u64::from(p) << PAGE_SHIFT);
        v["balloon"] = json!(true);
        v["target"] = json!(pages(d.target()));
        v["actual"] = json!(pages(d.actual()));
        v["driver_ready"] = json!(d.driver_ready());
        v["deflate_on_oom"] = json!(d.deflate_on_oom());
        v["free_page_reporting"] = json!(d.free_page_reporting());
        v["stats_period"] = json!(d.stats_period());
        v["stats"] = Value::Object(named_stats(&stats));
        v["last_update"] = json!(updated);
        v["counters"] = json!(d.counters());
        v
    }
}

/// Firecracker's `GET /balloon/statistics`: sizes in pages and MiB, then what the guest
/// reported; refused while statistics are off, as Firecracker does.
fn firecracker_stats(d: &Balloon) -> Response {
    if d.stats_period() == 0 {
        return update_error(
            "Statistics for the balloon device are not enabled: set \
             stats_polling_interval_s above 0 (PATCH /balloon/statistics)",
        );
    }
    let mut out = Map::new();
    let (target, actual) = (u64::from(d.target()), u64::from(d.actual()));
    out.insert("target_pages".into(), json!(target));
    out.insert("actual_pages".into(), json!(actual));
    out.insert("target_mib".into(), json!(target / PAGES_PER_MIB));
    out.insert("actual_mib".into(), json!(actual / PAGES_PER_MIB));
    out.extend(named_stats(&d.stats().0));
    Response::json(200, Value::Object(out).to_string())
}
