//! virtio-balloon: the host sets a target (pages the guest should give up), the guest's
//! driver hands page frames over (inflate queue) and takes some back (deflate queue), and
//! every frame handed over leaves the host's memory ([`pages::PageDiscard`]: `madvise` in
//! the VMM). Also the statistics queue (the guest's memory figures, asked for every
//! `stats_period` seconds), deflate-on-OOM (the guest takes pages back by itself under
//! memory pressure) and free page reporting (the guest reports free memory, which leaves
//! the host too).
//!
//! Hostile input: every frame number is checked against guest RAM (frames outside it are
//! counted and skipped, never discarded); each chain's frames are sorted, deduplicated and
//! coalesced into ranges before anything is discarded; one chain carries at most
//! [`MAX_PFNS_PER_CHAIN`] frames (a longer list is refused whole); a statistics buffer is
//! read up to [`stats::MAX_ENTRIES`] entries and unknown tags are ignored; reported ranges
//! are cut to the whole pages of guest RAM they hold. Every pass takes at most one queue's
//! worth of chains; a queue error stops the device until the driver resets it.
//!
//! Memory mapped `MAP_PRIVATE` from a snapshot's file (a restored VM): `MADV_DONTNEED` drops
//! the process's copy of a page, which then reads back from the file rather than as zeroes.
//! The guest does not read pages it gave up, so that is correct; what leaves the host's
//! memory is the pages the guest had written since the restore (private copies), while pages
//! only read stay in the host's page cache (reclaimable, and shared by every VM restored
//! from that file). `MADV_REMOVE` would punch the file, which other restores still need.
//!
//! The transport sees the statistics queue only when the driver accepts it, and the
//! reporting queue only when reporting is offered and accepted: the driver numbers the
//! queues it uses one after the other ([`VirtioDevice::queues_in_use`]).

pub mod handler;
pub mod pages;
pub mod stats;

use std::io::Read;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, Reader};

use super::queue::{DeviceQueue, QueueError, QueuePosition};
use super::{
    device_type, error_chain, features, read_config_bytes, ActivateError, RateLimitedLog,
    VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use crate::persist::{Persist, StateError};
use pages::{clip, coalesce, whole_pages, PageDiscard, PAGE_SHIFT, PAGE_SIZE};
use stats::GuestStats;

/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most page frames one inflate or deflate chain may carry (Linux sends 256).
pub const MAX_PFNS_PER_CHAIN: usize = 4096;
/// Most ranges one free page report may carry (Linux sends up to 32).
pub const MAX_REPORT_RANGES: usize = 256;
/// Longest statistics period, seconds.
pub const MAX_STATS_PERIOD: u16 = u16::MAX;

/// Feature bits.
pub mod feature {
    /// The driver must tell the host before it uses deflated pages (not offered).
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    /// The statistics queue.
    pub const STATS_VQ: u64 = 1 << 1;
    /// The guest deflates by itself when it runs out of memory.
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    /// Free page reporting (its own queue).
    pub const PAGE_REPORTING: u64 = 1 << 5;
}

/// Size of `struct virtio_balloon_config` as far as this device fills it: `num_pages`
/// (the target, host-written) and `actual` (driver-written).
const CONFIG_LEN: usize = 8;
/// Offset of `actual` in the configuration space.
const ACTUAL: u64 = 4;

/// What a queue is for, in the order the driver numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// How the device is set up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonOptions {
    /// Offer deflate-on-OOM.
    pub deflate_on_oom: bool,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
    /// Seconds between statistics requests; 0: no requests.
    pub stats_period: u16,
    /// Pages the guest is asked for from the start.
    pub target_pages: u32,
}

/// A host request the device refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonError {
    /// A target above the guest's RAM.
    #[error("a balloon of {pages} pages is larger than the guest's {max} pages of RAM")]
    TargetTooLarge {
        /// Asked.
        pages: u64,
        /// Guest RAM in pages.
        max: u32,
    },
}

/// What the device did since it was created (what `ember domstats` and
/// `GET /ember/balloon` show).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BalloonCounters {
    /// Distinct frames of guest RAM the guest handed over.
    pub inflated_pages: u64,
    /// Frames the guest took back.
    pub deflated_pages: u64,
    /// Bytes given back to the host (inflated and reported).
    pub discarded_bytes: u64,
    /// Bytes of guest RAM reported free.
    pub reported_bytes: u64,
    /// Frames handed over that are not guest RAM (skipped).
    pub refused_pfns: u64,
    /// Malformed requests: chains out of guest memory, frame lists over the limit,
    /// statistics buffers over the limit or with unknown tags, protocol violations.
    pub bad_requests: u64,
    /// Discards the host refused.
    pub discard_errors: u64,
}

/// What one pass over a queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Chains returned to the driver.
    pub used: usize,
    /// The pass stopped at its budget with chains still available: run another.
    pub more: bool,
}

/// A running device: what activation handed over.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<DeviceQueue>,
    roles: Vec<Role>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl Active {
    fn index_of(&self, role: Role) -> Option<usize> {
        self.roles.iter().position(|r| *r == role)
    }
}

/// The statistics protocol: the driver's buffer the device holds until it wants fresh
/// figures, and the latest figures.
#[derive(Default)]
struct StatsSlot {
    head: Option<u16>,
    values: GuestStats,
    last_update: Option<u64>,
}

/// What serving a chain needs besides the queue.
struct Work {
    discard: Box<dyn PageDiscard>,
    counters: BalloonCounters,
    log: RateLimitedLog,
    buf: Vec<u8>,
    pfns: Vec<u32>,
}

/// The virtio-balloon device.
pub struct Balloon {
    offered: u64,
    acked: u64,
    sizes: Vec<u16>,
    max_pages: u32,
    target: u32,
    actual: u32,
    stats_period: u16,
    active: Option<Active>,
    stats: StatsSlot,
    work: Work,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Balloon {
    /// A balloon for a guest with `ram` bytes of RAM, giving pages back through `discard`.
    pub fn new(
        ram: u64,
        opts: BalloonOptions,
        discard: Box<dyn PageDiscard>,
    ) -> Result<Self, BalloonError> {
        let max_pages = u32::try_from(ram >> PAGE_SHIFT).unwrap_or(u32::MAX);
        let mut offered = features::VERSION_1 | feature::STATS_VQ;
        let mut queues = 3;
        if opts.deflate_on_oom {
            offered |= feature::DEFLATE_ON_OOM;
        }
        if opts.free_page_reporting {
            offered |= feature::PAGE_REPORTING;
            queues += 1;
        }
        let mut dev = Balloon {
            offered,
            acked: 0,
            sizes: vec![QUEUE_SIZE; queues],
            max_pages,
            target: 0,
            actual: 0,
            stats_period: opts.stats_period,
            active: None,
            stats: StatsSlot::default(),
            work: Work {
                discard,
                counters: BalloonCounters::default(),
                log: RateLimitedLog::new(),
                buf: Vec::new(),
                pfns: Vec::new(),
            },
        };
        dev.set_target(u64::from(opts.target_pages))?;
        Ok(dev)
    }

    /// Guest RAM, in balloon pages.
    pub fn max_pages(&self) -> u32 {
        self.max_pages
    }

    /// Pages the guest is asked to give up.
    pub fn target(&self) -> u32 {
        self.target
    }

    /// Pages the driver says the balloon holds (at most the guest's RAM).
    pub fn actual(&self) -> u32 {
        self.actual.min(self.max_pages)
    }

    /// Asks the guest for `pages` pages (fewer than it holds: it takes some back); the
    /// driver hears of it through a configuration-change interrupt.
    pub fn set_target(&mut self, pages: u64) -> Result<(), BalloonError> {
        let max = self.max_pages;
        let pages = u32::try_from(pages)
            .ok()
            .filter(|p| *p <= max)
            .ok_or(BalloonError::TargetTooLarge { pages, max })?;
        self.target = pages;
        if let Some(a) = &self.active {
            a.interrupt.trigger(VirtioInterruptType::Config);
        }
        Ok(())
    }

    /// Whether the driver runs the device.
    pub fn driver_ready(&self) -> bool {
        self.active.is_some()
    }

    /// Seconds between statistics requests (0: none).
    pub fn stats_period(&self) -> u16 {
        self.stats_period
    }

    /// Sets the statistics period; the event loop's handler re-arms its timer when it next
    /// runs (the VMM kicks the statistics queue for that).
    pub fn set_stats_period(&mut self, secs: u16) {
        self.stats_period = secs;
    }

    /// The latest statistics and when they came (seconds since the epoch).
    pub fn stats(&self) -> (GuestStats, Option<u64>) {
        (self.stats.values, self.stats.last_update)
    }

    /// The counters so far.
    pub fn counters(&self) -> BalloonCounters {
        self.work.counters
    }

    /// Whether the driver negotiated free page reporting.
    pub fn reporting(&self) -> bool {
        self.acked & feature::PAGE_REPORTING != 0
    }

    /// Whether deflate-on-OOM is offered.
    pub fn deflate_on_oom(&self) -> bool {
        self.offered & feature::DEFLATE_ON_OOM != 0
    }

    /// Whether free page reporting is offered.
    pub fn free_page_reporting(&self) -> bool {
        self.offered & feature::PAGE_REPORTING != 0
    }

    /// Returns the statistics buffer the device holds, so the driver fills it again with
    /// fresh figures; false when the device holds none (not running, or the driver has not
    /// given one back yet).
    pub fn request_stats(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let Some(q) = a.index_of(Role::Stats) else {
            return false;
        };
        let Some(head) = self.stats.head.take() else {
            return false;
        };
        let queue = &mut a.queues[q];
        let result = queue
            .add_used(&a.mem, head, 0)
            .and_then(|()| queue.needs_notification(&a.mem));
        match result {
            Ok(notify) => {
                if notify {
                    a.interrupt.trigger(VirtioInterruptType::Queue(q as u16));
                }
                true
            }
            Err(e) => {
                self.stop(&e);
                false
            }
        }
    }

    /// Serves queue `index` (a notification on it); a queue the device does not use is
    /// ignored.
    pub fn process_queue(&mut self, index: usize) -> Served {
        if self
            .active
            .as_ref()
            .is_some_and(|a| a.interrupt.needs_reset())
        {
            self.active = None;
        }
        let Balloon {
            active,
            stats,
            work,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return Served::default();
        };
        let result = match a.roles.get(index) {
            None => return Served::default(),
            Some(Role::Inflate) => pass(a, index, |mem, chain| {
                let head = chain.head_index();
                if read_pfns(mem, chain, work) {
                    give_back(mem, work);
                }
                Some(head)
            }),
            Some(Role::Deflate) => pass(a, index, |mem, chain| {
                let head = chain.head_index();
                if read_pfns(mem, chain, work) {
                    work.counters.deflated_pages += work.pfns.len() as u64;
                }
                Some(head)
            }),
            Some(Role::Stats) => pass(a, index, |mem, chain| take_stats(mem, chain, stats, work)),
            Some(Role::Reporting) => pass(a, index, |mem, chain| {
                let head = chain.head_index();
                report_free(mem, chain, work);
                Some(head)
            }),
        };
        match result {
            Ok(served) => served,
            Err(e) => {
                self.stop(&e);
                Served::default()
            }
        }
    }

    /// A queue error: the device stops until the driver resets it.
    fn stop(&mut self, e: &QueueError) {
        self.work.log.warn(format_args!(
            "virtio-balloon: {}; the device stops until the driver resets it",
            error_chain(e)
        ));
        self.stats.head = None;
        if let Some(a) = self.active.take() {
            a.interrupt.signal_needs_reset();
        }
    }
}

/// One bounded pass over queue `q`: `serve` takes each chain and returns the head to give
/// back now (None: the device keeps the chain).
fn pass(
    a: &mut Active,
    q: usize,
    mut serve: impl FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> Option<u16>,
) -> Result<Served, QueueError> {
    let Active {
        mem,
        queues,
        interrupt,
        ..
    } = a;
    let queue = &mut queues[q];
    queue.begin_pass();
    queue.disable_notification(mem)?;
    let mut served = Served {
        used: 0,
        more: true,
    };
    // Each turn pops a chain or re-checks the ring; pops are capped by the queue's budget.
    for _ in 0..2 * usize::from(queue.size()) {
        let Some(chain) = queue.pop(mem)? else {
            served.more = queue.budget_spent();
            if !served.more && queue.enable_notification(mem)? {
                continue;
            }
            break;
        };
        if let Some(head) = serve(mem, chain) {
            queue.add_used(mem, head, 0)?;
            served.used += 1;
        }
    }
    if served.used > 0 && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.trigger(VirtioInterruptType::Queue(q as u16));
    }
    Ok(served)
}

/// Reads a chain's frame numbers into `work.pfns`; false (counted, logged) when the chain
/// points outside guest memory or carries more than [`MAX_PFNS_PER_CHAIN`] frames.
fn read_pfns(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    w: &mut Work,
) -> bool {
    w.pfns.clear();
    let Ok(mut reader) = Reader::new(mem, chain) else {
        w.counters.bad_requests += 1;
        w.log.warn(format_args!(
            "virtio-balloon: a page list points outside guest memory"
        ));
        return false;
    };
    let len = reader.available_bytes();
    if len / 4 > MAX_PFNS_PER_CHAIN {
        w.counters.bad_requests += 1;
        w.log.warn(format_args!(
            "virtio-balloon: a page list of {} frames is refused (at most {MAX_PFNS_PER_CHAIN})",
            len / 4
        ));
        return false;
    }
    w.buf.resize(len - len % 4, 0);
    if reader.read_exact(&mut w.buf).is_err() {
        w.counters.bad_requests += 1;
        return false;
    }
    w.pfns.extend(
        w.buf
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    );
    true
}

/// Gives the frames in `w.pfns` back to the host: coalesced, clipped to guest RAM.
fn give_back(mem: &GuestMemoryMmap, w: &mut Work) {
    for (start, end) in coalesce(&mut w.pfns) {
        let (ranges, outside) = clip(mem, start, end);
        if outside > 0 {
            w.counters.refused_pfns += outside / PAGE_SIZE;
            w.log.warn(format_args!(
                "virtio-balloon: {} frames from {:#x} are not guest RAM; skipped",
                outside / PAGE_SIZE,
                start >> PAGE_SHIFT
            ));
        }
        for r in ranges {
            w.counters.inflated_pages += r.len / PAGE_SIZE;
            discard(mem, r, w);
        }
    }
}

fn discard(mem: &GuestMemoryMmap, r: pages::GuestRange, w: &mut Work) {
    match w.discard.discard(mem, r) {
        Ok(()) => w.counters.discarded_bytes += r.len,
        Err(e) => {
            w.counters.discard_errors += 1;
            w.log.warn(format_args!(
                "virtio-balloon: cannot give {:#x}+{:#x} back to the host: {e}",
                r.addr, r.len
            ));
        }
    }
}

/// A free page report: each descriptor is a range of free guest memory; its whole pages
/// that are guest RAM go back to the host. At most [`MAX_REPORT_RANGES`] ranges a report.
fn report_free(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>, w: &mut Work) {
    for (i, desc) in chain.enumerate() {
        if i == MAX_REPORT_RANGES {
            w.counters.bad_requests += 1;
            w.log.warn(format_args!(
                "virtio-balloon: a free page report of more than {MAX_REPORT_RANGES} ranges; \
                 the rest is ignored"
            ));
            break;
        }
        let Some((start, end)) = whole_pages(desc.addr().0, u64::from(desc.len())) else {
            continue;
        };
        let (ranges, outside) = clip(mem, start, end);
        if outside > 0 {
            w.counters.bad_requests += 1;
            w.log.warn(format_args!(
                "virtio-balloon: a free page report at {start:#x} is not guest RAM"
            ));
        }
        for r in ranges {
            w.counters.reported_bytes += r.len;
            discard(mem, r, w);
        }
    }
}

/// The driver's statistics buffer: the figures are read and the buffer kept until the
/// device wants fresh ones. A driver that posts a second buffer gets the first back.
fn take_stats(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    slot: &mut StatsSlot,
    w: &mut Work,
) -> Option<u16> {
    let head = chain.head_index();
    let Ok(mut reader) = Reader::new(mem, chain) else {
        w.counters.bad_requests += 1;
        w.log.warn(format_args!(
            "virtio-balloon: a statistics buffer points outside guest memory"
        ));
        return Some(head);
    };
    let want = (stats::MAX_ENTRIES + 1) * stats::ENTRY_LEN;
    let len = reader.available_bytes().min(want);
    w.buf.resize(len, 0);
    if reader.read_exact(&mut w.buf).is_ok() {
        let parsed = slot.values.update(&w.buf);
        slot.last_update = Some(now_secs());
        if parsed.unknown > 0 || parsed.truncated {
            w.counters.bad_requests += 1;
        }
    }
    let previous = slot.head.replace(head);
    if previous.is_some() {
        w.counters.bad_requests += 1;
        w.log.warn(format_args!(
            "virtio-balloon: the driver posted a second statistics buffer; the first goes back"
        ));
    }
    previous
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn queues_in_use(&self) -> usize {
        roles(self.acked).len()
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.offered;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[..4].copy_from_slice(&self.target.to_le_bytes());
        config[4..].copy_from_slice(&self.actual.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    /// Only `actual` is the driver's to write; other bytes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut actual = self.actual.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|o| o.checked_sub(ACTUAL));
            if let Some(slot) = at
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| actual.get_mut(o))
            {
                *slot = *b;
            }
        }
        self.actual = u32::from_le_bytes(actual);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let roles = roles(self.acked);
        if queues.len() != roles.len() {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: roles.len(),
            });
        }
        self.active = Some(Active {
            mem,
            queues: queues.into_iter().map(DeviceQueue::new).collect(),
            roles,
            interrupt,
        });
        Ok(())
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(DeviceQueue::position).collect())
            .unwrap_or_default()
    }

    /// The balloon is empty again for the next driver (the target stays: it is the host's).
    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
        self.actual = 0;
        self.stats = StatsSlot::default();
    }
}

/// The queues the driver sets up for `acked` features, in its order.
fn roles(acked: u64) -> Vec<Role> {
    let mut r = vec![Role::Inflate, Role::Deflate];
    if acked & feature::STATS_VQ != 0 {
        r.push(Role::Stats);
    }
    if acked & feature::PAGE_REPORTING != 0 {
        r.push(Role::Reporting);
    }
    r
}

/// The balloon's own state (the transport keeps the queues'): the target, what the driver
/// said it holds, the statistics period, the statistics buffer held and the latest figures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    /// Target, pages.
    pub target_pages: u32,
    /// `actual` as the driver wrote it.
    pub actual_pages: u32,
    /// Seconds between statistics requests.
    pub stats_period: u16,
    /// Head of the statistics buffer the device holds.
    pub stats_head: Option<u16>,
    /// The latest statistics.
    pub stats: GuestStats,
    /// When they came (seconds since the epoch).
    pub stats_updated: Option<u64>,
}

impl Persist for Balloon {
    type State = BalloonState;

    fn save(&self) -> BalloonState {
        BalloonState {
            target_pages: self.target,
            actual_pages: self.actual,
            stats_period: self.stats_period,
            stats_head: self.stats.head,
            stats: self.stats.values,
            stats_updated: self.stats.last_update,
        }
    }

    /// Restored after the transport (which restarts a running device): a held statistics
    /// buffer must belong to the running device's statistics queue.
    fn restore(&mut self, st: &BalloonState) -> Result<(), StateError> {
        let err = |m: String| StateError::new("virtio-balloon", m);
        if st.target_pages > self.max_pages {
            return Err(err(format!(
                "a target of {} pages for {} pages of RAM",
                st.target_pages, self.max_pages
            )));
        }
        if let Some(head) = st.stats_head {
            let size = self
                .active
                .as_ref()
                .and_then(|a| a.index_of(Role::Stats).map(|q| a.queues[q].size()));
            if size.is_none_or(|s| head >= s) {
                return Err(err(format!(
                    "statistics buffer {head} does not fit the device's statistics queue"
                )));
            }
        }
        self.target = st.target_pages;
        self.actual = st.actual_pages;
        self.stats_period = st.stats_period;
        self.stats = StatsSlot {
            head: st.stats_head,
            values: st.stats,
            last_update: st.stats_updated,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests;
