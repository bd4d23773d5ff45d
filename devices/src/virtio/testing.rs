//! A split virtqueue in mock guest memory, driven from tests as a guest driver would.

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flag: another follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: points at an indirect table.
pub const F_INDIRECT: u16 = 4;

/// The driver side of one queue.
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
    /// A queue of `size` entries at `at`; returns it and the device's Queue for it.
    pub fn new(mem: &GuestMemoryMmap, at: u64, size: u16) -> (Self, Queue) {
        let mq = MockSplitQueue::create(mem, GuestAddress(at), size);
        let q: Queue = mq.create_queue().unwrap();
        let g = GuestQueue {
            mem: mem.clone(),
            desc_table: mq.desc_table_addr().0,
            avail: mq.avail_addr().0,
            used: mq.used_addr().0,
            size,
            next_desc: 0,
            avail_idx: 0,
        };
        (g, q)
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
            self.desc(*addr, *len, flags, first + k as u16 + 1);
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
