//! virtio-balloon against test guest memory (two RAM regions around a gap) and split queues
//! driven as a driver would: inflate, deflate, statistics, free page reporting, the target
//! and `actual`, hostile frame lists and buffers, and the state round trip.

use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::pages::{GuestRange, Madvise};
use super::*;
use crate::persist::assert_round_trip;
use crate::virtio::testing::{within, GuestQueue, RecordingInterrupt, F_NEXT};
use crate::virtio::transport::VirtioCommon;
use crate::virtio::{status, VirtioInterruptType as Irq};

/// RAM: [0, 8 MiB) and [16 MiB, 24 MiB); the gap between is not RAM.
const LOW: u64 = 8 << 20;
const HIGH: u64 = 16 << 20;
const RAM: u64 = 16 << 20;
/// Where queue i lives.
fn queue_at(i: usize) -> u64 {
    0x10000 + i as u64 * 0x4000
}
/// Page lists and buffers.
const DATA_AT: u64 = 0x40000;

/// Records what it is asked to discard.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<GuestRange>>>);

impl Recorder {
    fn ranges(&self) -> Vec<(u64, u64)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.addr, r.len))
            .collect()
    }
}

impl PageDiscard for Recorder {
    fn discard(&mut self, _mem: &GuestMemoryMmap, range: GuestRange) -> std::io::Result<()> {
        self.0.lock().unwrap().push(range);
        Ok(())
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW as usize),
        (GuestAddress(HIGH), (RAM - LOW) as usize),
    ])
    .unwrap()
}

struct Rig {
    mem: GuestMemoryMmap,
    dev: Balloon,
    qs: Vec<GuestQueue>,
    irq: Arc<RecordingInterrupt>,
    discarded: Recorder,
}

fn rig_with(opts: BalloonOptions, acked: u64) -> Rig {
    let mem = memory();
    let discarded = Recorder::default();
    let mut dev = Balloon::new(RAM, opts, Box::new(discarded.clone())).unwrap();
    dev.ack_features(acked);
    let n = dev.queues_in_use();
    let (qs, queues): (Vec<_>, Vec<_>) = (0..n)
        .map(|i| GuestQueue::new(&mem, queue_at(i), QUEUE_SIZE))
        .unzip();
    let irq = Arc::new(RecordingInterrupt::default());
    dev.activate(mem.clone(), queues, irq.clone()).unwrap();
    Rig {
        mem,
        dev,
        qs,
        irq,
        discarded,
    }
}

fn rig() -> Rig {
    let opts = BalloonOptions {
        free_page_reporting: true,
        ..BalloonOptions::default()
    };
    rig_with(opts, u64::MAX)
}

const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;
const REPORTING: usize = 3;

impl Rig {
    /// Posts `pfns` as one page list on queue `q` (at `at`).
    fn post_pfns(&mut self, q: usize, at: u64, pfns: &[u32]) {
        for (i, p) in pfns.iter().enumerate() {
            self.mem
                .write_obj(*p, GuestAddress(at + 4 * i as u64))
                .unwrap();
        }
        self.qs[q].chain(&[(at, 4 * pfns.len() as u32, false)]);
    }

    fn stats_buffer(&mut self, at: u64, entries: &[(u16, u64)]) {
        for (i, (tag, val)) in entries.iter().enumerate() {
            let e = at + 10 * i as u64;
            self.mem.write_obj(*tag, GuestAddress(e)).unwrap();
            self.mem.write_obj(*val, GuestAddress(e + 2)).unwrap();
        }
        self.qs[STATS].chain(&[(at, 10 * entries.len() as u32, false)]);
    }
}

#[test]
fn inflated_frames_are_coalesced_and_given_back_once() {
    let mut r = rig();
    r.post_pfns(
        INFLATE,
        DATA_AT,
        &[0x200, 0x201, 0x203, 0x202, 0x200, 0x500],
    );

    let served = r.dev.process_queue(INFLATE);

    assert_eq!(
        served,
        Served {
            used: 1,
            more: false
        }
    );
    assert_eq!(
        r.discarded.ranges(),
        vec![(0x20_0000, 4 * PAGE_SIZE), (0x50_0000, PAGE_SIZE)]
    );
    assert_eq!(r.qs[INFLATE].used_idx(), 1);
    assert_eq!(r.irq.kinds(), vec![Irq::Queue(0)]);
    let c = r.dev.counters();
    assert_eq!((c.inflated_pages, c.discarded_bytes), (5, 5 * PAGE_SIZE));
}

#[test]
fn frames_outside_guest_ram_are_skipped_never_discarded() {
    let mut r = rig();
    let last_low = (LOW >> PAGE_SHIFT) as u32 - 1;
    let first_high = (HIGH >> PAGE_SHIFT) as u32;
    let past_end = ((HIGH + RAM - LOW) >> PAGE_SHIFT) as u32;
    // The last low page and the gap after it, the first high page, the end of RAM, 16 TiB.
    let pfns = [
        last_low,
        last_low + 1,
        last_low + 2,
        first_high,
        past_end,
        u32::MAX,
    ];
    r.post_pfns(INFLATE, DATA_AT, &pfns);

    r.dev.process_queue(INFLATE);

    assert_eq!(
        r.discarded.ranges(),
        vec![(LOW - PAGE_SIZE, PAGE_SIZE), (HIGH, PAGE_SIZE)]
    );
    let c = r.dev.counters();
    assert_eq!((c.inflated_pages, c.refused_pfns), (2, 4));
    assert_eq!(r.qs[INFLATE].used_idx(), 1, "the chain still goes back");
}

#[test]
fn an_oversized_page_list_is_refused_whole() {
    let mut r = rig();
    let pfns: Vec<u32> = (0..=MAX_PFNS_PER_CHAIN as u32).collect();
    r.post_pfns(INFLATE, DATA_AT, &pfns);

    let served = r.dev.process_queue(INFLATE);

    assert_eq!(served.used, 1);
    assert!(r.discarded.ranges().is_empty());
    assert_eq!(r.dev.counters().bad_requests, 1);
}

#[test]
fn a_page_list_outside_guest_memory_or_ragged_is_answered_not_followed() {
    let mut r = rig();
    r.qs[INFLATE].chain(&[(LOW + 0x1000, 16, false)]); // in the gap
    r.qs[INFLATE].chain(&[(HIGH + RAM, 4, false)]); // past the end
    r.mem.write_obj(0x300u32, GuestAddress(DATA_AT)).unwrap();
    r.qs[INFLATE].chain(&[(DATA_AT, 6, false)]); // one frame and two stray bytes

    let served = r.dev.process_queue(INFLATE);

    assert_eq!(served.used, 3);
    assert_eq!(r.discarded.ranges(), vec![(0x30_0000, PAGE_SIZE)]);
    assert_eq!(r.dev.counters().bad_requests, 2);
}

#[test]
fn a_descriptor_loop_in_a_page_list_ends() {
    let mut r = rig();
    r.mem.write_obj(0x300u32, GuestAddress(DATA_AT)).unwrap();
    let q = &mut r.qs[INFLATE];
    let head = q.next_index();
    q.desc(DATA_AT, 4, F_NEXT, head); // points at itself
    q.publish(head);
    let mut dev = r.dev;

    let served = within(10, move || dev.process_queue(INFLATE));

    assert_eq!(served.used, 1);
}

#[test]
fn madvise_gives_inflated_pages_back_and_they_read_as_zero() {
    let mem = memory();
    let mut dev = Balloon::new(RAM, BalloonOptions::default(), Box::new(Madvise)).unwrap();
    dev.ack_features(features::VERSION_1);
    let (mut q0, queue0) = GuestQueue::new(&mem, queue_at(0), QUEUE_SIZE);
    let (_q1, queue1) = GuestQueue::new(&mem, queue_at(1), QUEUE_SIZE);
    dev.activate(
        mem.clone(),
        vec![queue0, queue1],
        Arc::new(RecordingInterrupt::default()),
    )
    .unwrap();
    let page = HIGH + 0x10_0000;
    mem.write_obj(0xdead_beef_u64, GuestAddress(page)).unwrap();
    mem.write_obj(0x1234_u64, GuestAddress(page + PAGE_SIZE))
        .unwrap();
    mem.write_obj((page >> PAGE_SHIFT) as u32, GuestAddress(DATA_AT))
        .unwrap();
    q0.chain(&[(DATA_AT, 4, false)]);
    for r in vm_memory::GuestMemoryBackend::iter(&mem) {
        let bitmap: &vm_memory::bitmap::AtomicBitmap = vm_memory::MmapRegion::bitmap(r);
        bitmap.reset();
    }

    dev.process_queue(INFLATE);

    assert_eq!(mem.read_obj::<u64>(GuestAddress(page)).unwrap(), 0);
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
    let region = mem.find_region(GuestAddress(page)).unwrap();
    let offset = (page - region.start_addr().raw_value()) as usize;
    assert!(
        region.bitmap().dirty_at(offset),
        "a discarded page is marked dirty"
    );
    assert!(!region.bitmap().dirty_at(offset + PAGE_SIZE as usize));
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(page + PAGE_SIZE)).unwrap(),
        0x1234,
        "the next page is untouched"
    );
    assert_eq!(dev.counters().discarded_bytes, PAGE_SIZE);
}

#[test]
fn madvise_refuses_ranges_that_are_not_whole_pages_of_one_region() {
    let mem = memory();
    let mut m = Madvise;
    for (addr, len) in [
        (0x1001, PAGE_SIZE),
        (0, 0x800),
        (LOW - PAGE_SIZE, 2 * PAGE_SIZE),
        (LOW, PAGE_SIZE),
        (!(PAGE_SIZE - 1), PAGE_SIZE),
    ] {
        assert!(
            m.discard(&mem, GuestRange { addr, len }).is_err(),
            "{addr:#x}+{len:#x}"
        );
    }
}

#[test]
fn deflated_frames_are_counted_and_returned_without_discarding() {
    let mut r = rig();
    r.post_pfns(DEFLATE, DATA_AT, &[1, 2, 3]);

    let served = r.dev.process_queue(DEFLATE);

    assert_eq!(served.used, 1);
    assert!(r.discarded.ranges().is_empty());
    assert_eq!(r.dev.counters().deflated_pages, 3);
    assert_eq!(r.irq.kinds(), vec![Irq::Queue(1)]);
}

#[test]
fn the_target_reaches_the_driver_and_actual_comes_back() {
    let mut r = rig();

    r.dev.set_target(1000).unwrap();
    r.dev.write_config(4, &700u32.to_le_bytes());
    r.dev.write_config(0, &5u32.to_le_bytes()); // num_pages is not the driver's
    r.dev.write_config(6, &[0, 0, 0, 0]); // runs past the config space

    let mut cfg = [0u8; 8];
    r.dev.read_config(0, &mut cfg);
    assert_eq!(u32::from_le_bytes(cfg[..4].try_into().unwrap()), 1000);
    assert_eq!(u32::from_le_bytes(cfg[4..].try_into().unwrap()), 700);
    assert_eq!(r.dev.actual(), 700);
    assert_eq!(r.irq.kinds(), vec![Irq::Config]);
}

#[test]
fn a_target_above_guest_ram_is_refused() {
    let mut r = rig();
    let max = r.dev.max_pages();

    let e = r.dev.set_target(u64::from(max) + 1).unwrap_err();

    assert_eq!(
        e,
        BalloonError::TargetTooLarge {
            pages: u64::from(max) + 1,
            max
        }
    );
    assert_eq!(r.dev.target(), 0);
    assert!(r.dev.set_target(u64::from(u32::MAX) + 5).is_err());
    r.dev.set_target(u64::from(max)).unwrap();
}

#[test]
fn statistics_are_read_and_the_buffer_kept_until_asked_again() {
    let mut r = rig();
    r.stats_buffer(
        DATA_AT,
        &[(stats::MEMTOT, 16 << 20), (stats::AVAIL, 9 << 20), (99, 1)],
    );

    let served = r.dev.process_queue(STATS);

    assert_eq!(served.used, 0, "the buffer is held");
    let (s, when) = r.dev.stats();
    assert_eq!(s.get(stats::MEMTOT), Some(16 << 20));
    assert_eq!(s.get(stats::AVAIL), Some(9 << 20));
    assert!(when.is_some());
    assert_eq!(r.dev.counters().bad_requests, 1, "the unknown tag");

    assert!(r.dev.request_stats());
    assert_eq!(r.qs[STATS].used_idx(), 1);
    assert_eq!(r.irq.kinds(), vec![Irq::Queue(2)]);
    assert!(
        !r.dev.request_stats(),
        "nothing held until the driver posts again"
    );
}

#[test]
fn a_second_statistics_buffer_returns_the_first() {
    let mut r = rig();
    r.stats_buffer(DATA_AT, &[(stats::MEMFREE, 1)]);
    r.stats_buffer(DATA_AT + 0x100, &[(stats::MEMFREE, 2)]);

    let served = r.dev.process_queue(STATS);

    assert_eq!(served.used, 1);
    assert_eq!(r.qs[STATS].used_elem(0).0, 0);
    assert_eq!(r.dev.stats().0.get(stats::MEMFREE), Some(2));
    assert!(r.dev.request_stats());
    assert_eq!(r.qs[STATS].used_elem(1).0, 1);
}

#[test]
fn a_huge_statistics_buffer_is_read_only_up_to_the_limit() {
    let mut r = rig();
    // 64 KiB of entries in one descriptor; only the first MAX_ENTRIES are read.
    let entries: Vec<(u16, u64)> = (0..6553).map(|i| (stats::MINFLT, i)).collect();
    r.stats_buffer(DATA_AT, &entries);

    r.dev.process_queue(STATS);

    assert_eq!(
        r.dev.stats().0.get(stats::MINFLT),
        Some(stats::MAX_ENTRIES as u64 - 1)
    );
    assert_eq!(r.dev.counters().bad_requests, 1);
}

#[test]
fn free_page_reports_give_back_whole_pages_of_guest_ram() {
    let mut r = rig();
    r.qs[REPORTING].chain(&[
        (0x40_0000, 0x20_0000, true),    // 2 MiB, aligned
        (0x60_0800, 0x2000, true),       // one whole page inside
        (LOW - PAGE_SIZE, 0x3000, true), // a page of RAM, then the gap
        (0x70_0000, 0x800, true),        // no whole page
    ]);

    let served = r.dev.process_queue(REPORTING);

    assert_eq!(served.used, 1);
    assert_eq!(
        r.discarded.ranges(),
        vec![
            (0x40_0000, 0x20_0000),
            (0x60_1000, PAGE_SIZE),
            (LOW - PAGE_SIZE, PAGE_SIZE)
        ]
    );
    let c = r.dev.counters();
    assert_eq!(c.reported_bytes, 0x20_0000 + 2 * PAGE_SIZE);
    assert_eq!(c.bad_requests, 1);
}

#[test]
fn the_queues_in_use_follow_the_accepted_features() {
    let opts = BalloonOptions {
        free_page_reporting: true,
        ..BalloonOptions::default()
    };
    let mut dev = Balloon::new(RAM, opts, Box::new(Recorder::default())).unwrap();
    assert_eq!(dev.queue_max_sizes().len(), 4);
    for (acked, n) in [
        (features::VERSION_1, 2),
        (features::VERSION_1 | feature::STATS_VQ, 3),
        (features::VERSION_1 | feature::PAGE_REPORTING, 3),
        (u64::MAX, 4),
    ] {
        dev.ack_features(acked);
        assert_eq!(dev.queues_in_use(), n, "{acked:#x}");
    }
    let plain = Balloon::new(
        RAM,
        BalloonOptions::default(),
        Box::new(Recorder::default()),
    );
    let mut plain = plain.unwrap();
    plain.ack_features(u64::MAX);
    assert_eq!(plain.queues_in_use(), 3, "reporting not offered");
    assert!(plain.features() & feature::DEFLATE_ON_OOM == 0);
}

#[test]
fn without_the_stats_queue_reporting_is_the_third_queue() {
    let opts = BalloonOptions {
        free_page_reporting: true,
        ..BalloonOptions::default()
    };
    let mut r = rig_with(opts, features::VERSION_1 | feature::PAGE_REPORTING);
    r.qs[2].chain(&[(0x40_0000, 0x1000, true)]);

    r.dev.process_queue(2);

    assert_eq!(r.discarded.ranges(), vec![(0x40_0000, PAGE_SIZE)]);
    assert!(!r.dev.request_stats());
    assert_eq!(r.dev.process_queue(3), Served::default(), "no such queue");
}

#[test]
fn a_driver_that_declines_the_stats_queue_starts_the_device_and_its_queues_are_woken() {
    let mem = memory();
    let dev = Balloon::new(
        RAM,
        BalloonOptions::default(),
        Box::new(Recorder::default()),
    );
    let dev = Arc::new(Mutex::new(dev.unwrap()));
    let evts: Vec<_> = (0..3)
        .map(|_| vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let ours: Vec<_> = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let mut common = VirtioCommon::new("test", dev.clone(), mem.clone(), evts);
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(RecordingInterrupt::default());
    common.set_status(status::ACKNOWLEDGE | status::DRIVER, &irq);
    common.driver_features_select = 1;
    common.set_driver_features_word(1); // VERSION_1 only
    common.set_status(
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        &irq,
    );
    for q in 0..2u32 {
        common.queue_select = q;
        let c = common.selected_for_write().unwrap();
        let at = queue_at(q as usize);
        (c.size, c.desc_table, c.avail_ring) = (u32::from(QUEUE_SIZE), at, at + 0x1000);
        (c.used_ring, c.ready) = (at + 0x2000, true);
    }

    common.set_status(
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        &irq,
    );

    assert!(!irq.needs_reset());
    assert!(dev.lock().unwrap().driver_ready());
    assert_eq!(common.save().positions.len(), 2);
    // Buffers posted before DRIVER_OK (Linux posts its statistics buffer so) get a pass.
    assert!(ours.iter().all(|e| e.read().is_ok()), "every queue woken");
}

#[test]
fn a_queue_error_stops_the_device_until_reset() {
    let mut r = rig();
    r.stats_buffer(DATA_AT, &[(stats::MEMFREE, 1)]);
    r.dev.process_queue(STATS);
    r.qs[INFLATE].set_avail_idx(QUEUE_SIZE + 1);

    let served = r.dev.process_queue(INFLATE);

    assert_eq!(served, Served::default());
    assert!(r.irq.needs_reset());
    assert!(!r.dev.driver_ready());
    assert!(!r.dev.request_stats());
    r.dev.reset();
    assert_eq!(r.dev.actual(), 0);
}

#[test]
fn state_round_trips_with_a_held_statistics_buffer() {
    let mut r = rig();
    r.dev.set_target(1234).unwrap();
    r.dev.write_config(4, &1000u32.to_le_bytes());
    r.dev.set_stats_period(5);
    r.stats_buffer(DATA_AT, &[(stats::MEMTOT, 16 << 20)]);
    r.dev.process_queue(STATS);
    let mut fresh = rig().dev;

    assert_round_trip(&r.dev, &mut fresh);

    assert!(
        fresh.request_stats(),
        "the restored device holds the buffer"
    );
    assert_eq!(fresh.target(), 1234);
}

#[test]
fn a_state_the_device_cannot_be_in_is_refused() {
    let r = rig();
    let good = r.dev.save();
    let mut stopped = Balloon::new(
        RAM,
        BalloonOptions::default(),
        Box::new(Recorder::default()),
    )
    .unwrap();
    let cases = [
        (BalloonState {
            target_pages: r.dev.max_pages() + 1,
            ..good.clone()
        }),
        (BalloonState {
            stats_head: Some(QUEUE_SIZE),
            ..good.clone()
        }),
    ];
    let mut dev = r.dev;
    for st in cases {
        assert!(dev.restore(&st).is_err(), "{st:?}");
    }
    let held = BalloonState {
        stats_head: Some(0),
        ..good
    };
    assert!(
        stopped.restore(&held).is_err(),
        "a stopped device holds nothing"
    );
    assert_eq!(dev.target(), 0, "nothing changed");
}

#[test]
fn a_free_page_report_is_read_up_to_its_range_limit() {
    let mut r = rig();
    // A chain of more ranges than a report may carry, through an indirect table.
    let n = MAX_REPORT_RANGES + 10;
    let table = DATA_AT + 0x10000;
    for i in 0..n {
        let at = table + 16 * i as u64;
        r.mem
            .write_obj(0x40_0000 + (i as u64) * PAGE_SIZE, GuestAddress(at))
            .unwrap();
        r.mem
            .write_obj(PAGE_SIZE as u32, GuestAddress(at + 8))
            .unwrap();
        let flags = crate::virtio::testing::F_WRITE | if i + 1 < n { F_NEXT } else { 0 };
        r.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        r.mem
            .write_obj((i + 1) as u16, GuestAddress(at + 14))
            .unwrap();
    }
    let q = &mut r.qs[REPORTING];
    let head = q.next_index();
    q.desc(table, 16 * n as u32, crate::virtio::testing::F_INDIRECT, 0);
    q.publish(head);

    let served = r.dev.process_queue(REPORTING);

    assert_eq!(served.used, 1);
    assert_eq!(r.discarded.ranges().len(), MAX_REPORT_RANGES);
    assert_eq!(r.dev.counters().bad_requests, 1);
}
