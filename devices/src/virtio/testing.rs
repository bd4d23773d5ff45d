//! A split virtqueue in test guest memory, driven from tests as a guest driver would.

use std::sync::mpsc;
use std::time::Duration;

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Descriptor flag: another follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: points at an indirect table.
pub const F_INDIRECT: u16 = 4;

/// The driver side of one queue.
#[derive(Clone)]
pub struct GuestQueue {
    /// The guest memory the queue lives in.
    pub mem: GuestMemoryMmap,
    desc_table: u64,
    /// Address of the available ring.
    pub avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl GuestQueue {
    /// A queue of `size` entries laid out from `at` as a driver would (descriptor table,
    /// available ring, used ring, each aligned); returns it and the device's Queue for it.
    ///
    /// Not `virtio_queue::mock::MockSplitQueue`'s layout: in virtio-queue 0.18 it ends the
    /// available ring `size` bytes after its entries start instead of `2 * size`, so its used
    /// ring overlaps the second half of the available ring.
    pub fn new(mem: &GuestMemoryMmap, at: u64, size: u16) -> (Self, Queue) {
        let avail = at + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        Self::at(mem, at, avail, used, size)
    }

    /// A queue of `size` entries with its three parts where the caller says, unchecked (an
    /// available ring at 0, parts overlapping: what a hostile driver may set up when no
    /// transport checks it). Addresses must still meet virtio-queue's alignment.
    pub fn at(mem: &GuestMemoryMmap, desc: u64, avail: u64, used: u64, size: u16) -> (Self, Queue) {
        let mut q = Queue::new(size).unwrap();
        q.try_set_size(size).unwrap();
        q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(used)).unwrap();
        q.set_ready(true);
        let g = GuestQueue {
            mem: mem.clone(),
            desc_table: desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
        };
        (g, q)
    }

    /// Writes avail.idx directly (what a hostile driver may do).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Writes a descriptor; returns its index.
    pub fn desc(&mut self, addr: u64, len: u32, flags: u16, next: u16) -> u16 {
        let i = self.next_desc % self.size;
        self.next_desc += 1;
        let at = self.desc_table + u64::from(i) * 16;
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        i
    }

    /// Builds a chain of (addr, len, device-writable) parts and makes it available.
    pub fn chain(&mut self, parts: &[(u64, u32, bool)]) -> u16 {
        let first = self.next_desc % self.size;
        for (k, (addr, len, w)) in parts.iter().enumerate() {
            let last = k + 1 == parts.len();
            let flags = if *w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.desc(*addr, *len, flags, (first + k as u16 + 1) % self.size);
        }
        self.publish(first);
        first
    }

    /// The index the next descriptor gets.
    pub fn next_index(&self) -> u16 {
        self.next_desc % self.size
    }

    /// Chains made available but not yet used.
    pub fn avail_pending(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.used_idx())
    }

    /// Puts descriptor `head` in the available ring.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + u64::from(self.avail_idx % self.size) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// (id, len) of used entry `i`.
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + u64::from(i % self.size) * 8;
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }
}

/// Runs `f` on another thread and returns its result, or fails the test if it takes more
/// than `secs` seconds: a device loop that never ends fails the test instead of hanging it.
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("did not return within {secs} s (a loop without progress?)")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the checked code panicked"),
    }
}
