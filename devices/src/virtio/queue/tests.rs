//! Queue setup checks and the device queue's error and budget rules, on mock guest memory.

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::testing::GuestQueue;

const MEM: usize = 1 << 20;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

fn config(size: u32) -> QueueConfig {
    QueueConfig {
        max_size: 256,
        size,
        ready: true,
        desc_table: 0x1000,
        avail_ring: 0x2000,
        used_ring: 0x3000,
    }
}

#[test]
fn well_formed_queue_builds_even_with_the_descriptor_table_at_zero() {
    let m = mem();
    let mut c = config(16);
    c.desc_table = 0;
    let q = c.build(0, &m, true).unwrap();
    assert_eq!(q.size(), 16);
    assert_eq!(q.desc_table(), 0);
    assert!(q.event_idx_enabled());
}

#[test]
fn unaligned_ring_addresses_are_refused_not_dropped() {
    let m = mem();
    for (part, align, set) in [
        (
            Part::DescTable,
            16,
            (|c: &mut QueueConfig| c.desc_table = 0x1008) as fn(&mut _),
        ),
        (Part::AvailRing, 2, |c: &mut QueueConfig| {
            c.avail_ring = 0x2001
        }),
        (Part::UsedRing, 4, |c: &mut QueueConfig| {
            c.used_ring = 0x3002
        }),
    ] {
        let mut c = config(16);
        set(&mut c);
        let err = c.build(3, &m, false).unwrap_err();
        assert!(
            matches!(err, QueueSetupError::Unaligned { queue: 3, part: p, align: a, .. } if p == part && a == align),
            "{err:?}"
        );
    }
}

#[test]
fn available_ring_at_address_zero_is_refused_clearly() {
    let m = mem();
    let mut c = config(16);
    c.avail_ring = 0;
    assert!(matches!(
        c.build(1, &m, false).unwrap_err(),
        QueueSetupError::AvailAtZero { queue: 1 }
    ));
}

#[test]
fn sizes_must_be_powers_of_two_up_to_the_maximum() {
    let m = mem();
    for size in [0, 3, 100, 512, 0x1_0010] {
        let err = config(size).build(0, &m, false).unwrap_err();
        assert!(matches!(err, QueueSetupError::BadSize { size: s, max: 256, .. } if s == size));
    }
    assert!(config(256).build(0, &m, false).is_ok());
    assert!(config(1).build(0, &m, false).is_ok());
}

#[test]
fn rings_must_lie_inside_guest_memory() {
    let m = mem();
    let mut c = config(256);
    c.used_ring = MEM as u64 - 8; // starts inside, ends outside
    assert!(matches!(
        c.build(0, &m, false).unwrap_err(),
        QueueSetupError::OutsideMemory {
            part: Part::UsedRing,
            ..
        }
    ));
    let mut c = config(16);
    c.desc_table = u64::MAX - 15; // the end overflows
    assert!(matches!(
        c.build(0, &m, false).unwrap_err(),
        QueueSetupError::OutsideMemory {
            part: Part::DescTable,
            ..
        }
    ));
}

#[test]
fn a_queue_not_ready_is_refused() {
    let mut c = config(16);
    c.ready = false;
    assert!(matches!(
        c.build(2, &mem(), false).unwrap_err(),
        QueueSetupError::NotReady { queue: 2 }
    ));
}

#[test]
fn used_ring_over_a_driver_area_of_any_queue_is_refused() {
    let a = config(16);
    let mut b = config(16);
    b.desc_table = 0x4000;
    b.avail_ring = 0x5000;
    b.used_ring = 0x6000;
    assert!(check_layout(&[a, b]).is_ok());
    // Queue 0's used ring over its own available ring (its index included).
    let mut own = a;
    own.used_ring = 0x2000;
    assert!(matches!(
        check_layout(&[own, b]),
        Err(QueueSetupError::Overlap {
            queue: 0,
            other_queue: 0,
            other_part: Part::AvailRing
        })
    ));
    // Queue 1's used ring reaching into queue 0's descriptor table.
    let mut cross = b;
    cross.used_ring = 0x1000 - 8;
    assert!(matches!(
        check_layout(&[a, cross]),
        Err(QueueSetupError::Overlap {
            queue: 1,
            other_queue: 0,
            other_part: Part::DescTable
        })
    ));
}

#[test]
fn available_index_more_than_the_size_ahead_is_an_error() {
    let m = mem();
    let (mut g, q) = GuestQueue::new(&m, 0x1000, 16);
    let mut dq = DeviceQueue::new(q);
    g.set_avail_idx(17);
    assert!(matches!(
        dq.pop(&m),
        Err(QueueError::AvailIndex {
            avail: 17,
            next: 0,
            size: 16
        })
    ));
    // Exactly a queue's worth is fine.
    g.set_avail_idx(16);
    assert!(dq.pop(&m).unwrap().is_some());
}

#[test]
fn chain_head_outside_the_table_is_an_error() {
    let m = mem();
    let (mut g, q) = GuestQueue::new(&m, 0x1000, 16);
    let mut dq = DeviceQueue::new(q);
    g.publish(16);
    assert!(matches!(
        dq.pop(&m),
        Err(QueueError::HeadOutOfRange { head: 16, size: 16 })
    ));
}

#[test]
fn a_pass_pops_at_most_one_queue_worth() {
    let m = mem();
    let (mut g, q) = GuestQueue::new(&m, 0x1000, 4);
    let mut dq = DeviceQueue::new(q);
    for _ in 0..4 {
        g.chain(&[(0x8000, 64, false)]);
    }
    dq.begin_pass();
    for _ in 0..4 {
        assert!(dq.pop(&m).unwrap().is_some());
    }
    // Given back and available again, but this pass has had its share.
    dq.give_back(2);
    assert_eq!(dq.pending(&m).unwrap(), 2);
    assert!(dq.pop(&m).unwrap().is_none());
    assert!(dq.budget_spent());
    dq.begin_pass();
    assert!(dq.pop(&m).unwrap().is_some());
}

#[test]
fn chains_given_back_do_not_count_as_new_but_new_ones_do() {
    let m = mem();
    let (mut g, q) = GuestQueue::new(&m, 0x1000, 16);
    let mut dq = DeviceQueue::new(q);
    g.chain(&[(0x8000, 64, true)]);
    dq.begin_pass();
    assert!(dq.pop(&m).unwrap().is_some());
    dq.give_back(1);
    assert!(!dq.enable_notification(&m).unwrap());
    g.chain(&[(0x9000, 64, true)]);
    assert!(dq.enable_notification(&m).unwrap());
    // Both are popped again, in order.
    assert_eq!(dq.pop(&m).unwrap().unwrap().head_index(), 0);
    assert_eq!(dq.pop(&m).unwrap().unwrap().head_index(), 1);
}

#[test]
fn with_event_idx_the_kick_is_asked_for_past_the_chains_given_back() {
    let m = mem();
    let (mut g, mut q) = GuestQueue::new(&m, 0x1000, 16);
    q.set_event_idx(true);
    let used = q.used_ring();
    let mut dq = DeviceQueue::new(q);
    g.chain(&[(0x8000, 64, true)]);
    dq.begin_pass();
    assert!(dq.pop(&m).unwrap().is_some());
    dq.give_back(1);
    assert!(!dq.enable_notification(&m).unwrap());
    // avail_event sits after the used ring's entries: the driver kicks when it publishes
    // entry 1, the first one the device has not seen.
    let avail_event: u16 = m.read_obj(GuestAddress(used + 4 + 8 * 16)).unwrap();
    assert_eq!(avail_event, 1);
}

#[test]
fn add_used_refuses_a_head_outside_the_table() {
    let m = mem();
    let (_, q) = GuestQueue::new(&m, 0x1000, 16);
    let mut dq = DeviceQueue::new(q);
    assert!(matches!(
        dq.add_used(&m, 16, 0),
        Err(QueueError::HeadOutOfRange { head: 16, size: 16 })
    ));
}
