//! The two halves of a split virtqueue that every transport and device share.
//!
//! [`QueueConfig`] holds what the driver wrote to a queue's registers, as written: nothing
//! is dropped or corrected on the way. At DRIVER_OK, [`QueueConfig::build`] and
//! [`check_layout`] check it as virtio 1.x asks (size, alignment, ranges in guest memory,
//! no used ring where the device would overwrite the driver's structures) and refuse it
//! clearly otherwise.
//!
//! [`DeviceQueue`] is the device's side once running. Every error virtio-queue can return,
//! and the driver mistakes it does not catch by itself (an available index more than the
//! queue size ahead of the device, a chain head outside the descriptor table), comes back
//! as a [`QueueError`]; a device answers one by stopping and asking for a reset. Each
//! processing pass takes at most one queue's worth of chains ([`DeviceQueue::begin_pass`]),
//! so no pass can run without end whatever the guest writes, concurrently or not.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use crate::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

/// Bytes of one descriptor.
const DESC_SIZE: u64 = 16;
/// Flags, index and the trailing used_event / avail_event field of a ring.
const RING_META: u64 = 6;
/// Bytes of one available-ring entry.
const AVAIL_ELEM: u64 = 2;
/// Bytes of one used-ring entry.
const USED_ELEM: u64 = 8;

/// One of the three areas of a split virtqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The descriptor table (driver-written).
    DescTable,
    /// The available ring (driver-written).
    AvailRing,
    /// The used ring (device-written).
    UsedRing,
}

impl Part {
    /// The alignment virtio 1.x requires of the area (2.7, "Virtqueue Alignment").
    pub fn alignment(self) -> u64 {
        match self {
            Part::DescTable => 16,
            Part::AvailRing => 2,
            Part::UsedRing => 4,
        }
    }

    /// Who may write the area: the device writes only the used ring.
    pub fn access(self) -> Permissions {
        match self {
            Part::UsedRing => Permissions::Write,
            _ => Permissions::Read,
        }
    }

    /// Bytes the area spans for a queue of `size` entries.
    pub fn len(self, size: u16) -> u64 {
        let n = u64::from(size);
        match self {
            Part::DescTable => DESC_SIZE * n,
            Part::AvailRing => RING_META + AVAIL_ELEM * n,
            Part::UsedRing => RING_META + USED_ELEM * n,
        }
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Part::DescTable => "descriptor table",
            Part::AvailRing => "available ring",
            Part::UsedRing => "used ring",
        })
    }
}

/// Why a queue's configuration cannot be used (the device is not started).
#[derive(Debug, thiserror::Error)]
pub enum QueueSetupError {
    /// QueueReady was not set.
    #[error("queue {queue} is not ready")]
    NotReady {
        /// Queue index.
        queue: usize,
    },
    /// Zero, not a power of two, or above the maximum.
    #[error("queue {queue} has size {size}; a power of two from 1 to {max} is required")]
    BadSize {
        /// Queue index.
        queue: usize,
        /// Size written.
        size: u32,
        /// QueueNumMax.
        max: u16,
    },
    /// An address that breaks the alignment virtio 1.x requires.
    #[error("queue {queue}: {part} at {addr:#x} is not {align}-byte aligned")]
    Unaligned {
        /// Queue index.
        queue: usize,
        /// Which area.
        part: Part,
        /// Address written.
        addr: u64,
        /// Alignment required.
        align: u64,
    },
    /// virtio-queue reads an available ring at 0 as "never configured" and serves nothing.
    #[error("queue {queue}: an available ring at guest address 0 is not supported")]
    AvailAtZero {
        /// Queue index.
        queue: usize,
    },
    /// An area not wholly inside guest memory.
    #[error("queue {queue}: {part} at {addr:#x} (+{len:#x}) is outside guest memory")]
    OutsideMemory {
        /// Queue index.
        queue: usize,
        /// Which area.
        part: Part,
        /// Address written.
        addr: u64,
        /// Bytes it spans.
        len: u64,
    },
    /// A used ring over another queue area: the device's writes would change the driver's.
    #[error("queue {queue}: used ring overlaps the {other_part} of queue {other_queue}")]
    Overlap {
        /// Queue whose used ring it is.
        queue: usize,
        /// The queue of the other area.
        other_queue: usize,
        /// The other area.
        other_part: Part,
    },
    /// virtio-queue refused a value that passed the checks above.
    #[error("queue {queue}: virtio-queue refused the configuration")]
    Library {
        /// Queue index.
        queue: usize,
        /// Cause.
        #[source]
        source: virtio_queue::Error,
    },
}

/// A queue's registers as the driver wrote them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueConfig {
    /// QueueNumMax: the device's largest size.
    pub max_size: u16,
    /// QueueNum.
    pub size: u32,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc.
    pub desc_table: u64,
    /// QueueDriver (available ring).
    pub avail_ring: u64,
    /// QueueDevice (used ring).
    pub used_ring: u64,
}

impl QueueConfig {
    /// Registers after a reset: size at its maximum, addresses 0, not ready.
    pub fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        }
    }

    /// Sets the low or high half of a 64-bit address register.
    pub fn set_half(reg: &mut u64, value: u32, high: bool) {
        *reg = if high {
            (*reg & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (*reg & !0xffff_ffff) | u64::from(value)
        };
    }

    fn parts(&self) -> [(Part, u64); 3] {
        [
            (Part::DescTable, self.desc_table),
            (Part::AvailRing, self.avail_ring),
            (Part::UsedRing, self.used_ring),
        ]
    }

    /// Checks queue `queue`'s registers against virtio 1.x and `mem`, and builds the queue.
    pub fn build(
        &self,
        queue: usize,
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<Queue, QueueSetupError> {
        if !self.ready {
            return Err(QueueSetupError::NotReady { queue });
        }
        let size = u16::try_from(self.size)
            .ok()
            .filter(|s| s.is_power_of_two() && *s <= self.max_size)
            .ok_or(QueueSetupError::BadSize {
                queue,
                size: self.size,
                max: self.max_size,
            })?;
        for (part, addr) in self.parts() {
            let align = part.alignment();
            if !addr.is_multiple_of(align) {
                return Err(QueueSetupError::Unaligned {
                    queue,
                    part,
                    addr,
                    align,
                });
            }
            let len = part.len(size);
            let inside = usize::try_from(len).is_ok_and(|l| {
                addr.checked_add(len).is_some()
                    && mem.check_range(GuestAddress(addr), l, part.access())
            });
            if !inside {
                return Err(QueueSetupError::OutsideMemory {
                    queue,
                    part,
                    addr,
                    len,
                });
            }
        }
        if self.avail_ring == 0 {
            return Err(QueueSetupError::AvailAtZero { queue });
        }
        self.queue(size, event_idx)
            .map_err(|source| QueueSetupError::Library { queue, source })
    }

    fn queue(&self, size: u16, event_idx: bool) -> Result<Queue, virtio_queue::Error> {
        let mut q = Queue::new(self.max_size)?;
        q.try_set_size(size)?;
        q.try_set_desc_table_address(GuestAddress(self.desc_table))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring))?;
        q.try_set_used_ring_address(GuestAddress(self.used_ring))?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        Ok(q)
    }
}

/// Checks that no used ring overlaps any area of any queue (its own other areas included):
/// the device writes used rings, and must not be made to write the driver's structures.
/// Call after every [`QueueConfig::build`] succeeded (sizes are valid then).
pub fn check_layout(queues: &[QueueConfig]) -> Result<(), QueueSetupError> {
    let span = |c: &QueueConfig, part: Part| {
        let start = match part {
            Part::DescTable => c.desc_table,
            Part::AvailRing => c.avail_ring,
            Part::UsedRing => c.used_ring,
        };
        let size = u16::try_from(c.size).unwrap_or(0);
        (start, start.saturating_add(part.len(size)))
    };
    for (i, q) in queues.iter().enumerate() {
        let (start, end) = span(q, Part::UsedRing);
        for (j, other) in queues.iter().enumerate() {
            for part in [Part::DescTable, Part::AvailRing, Part::UsedRing] {
                if i == j && part == Part::UsedRing {
                    continue;
                }
                let (o_start, o_end) = span(other, part);
                if start < o_end && o_start < end {
                    return Err(QueueSetupError::Overlap {
                        queue: i,
                        other_queue: j,
                        other_part: part,
                    });
                }
            }
        }
    }
    Ok(())
}

/// A driver mistake found while the device runs: the queue cannot be served any more.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The available index moved more than the queue size past the device.
    #[error("available index {avail} is {} entries past the device's {next} (queue size {size})", avail.wrapping_sub(*next))]
    AvailIndex {
        /// avail.idx as read.
        avail: u16,
        /// The device's next available entry.
        next: u16,
        /// Queue size.
        size: u16,
    },
    /// A chain head outside the descriptor table.
    #[error("descriptor chain head {head} is outside the {size}-entry descriptor table")]
    HeadOutOfRange {
        /// The head index read from the available ring.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// virtio-queue could not read or write a ring.
    #[error("ring access failed")]
    Ring(#[source] virtio_queue::Error),
}

/// Where a running queue is: what a snapshot keeps besides the registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    /// The next available-ring entry the device takes.
    pub next_avail: u16,
    /// The next used-ring entry the device fills.
    pub next_used: u16,
}

/// The device's side of a running split virtqueue; see the module documentation.
pub struct DeviceQueue {
    queue: Queue,
    /// Chains popped in the current pass (including ones given back and popped again).
    popped: u16,
    /// Chains given back with [`Self::give_back`] and not popped again yet.
    held: u16,
}

impl DeviceQueue {
    /// Wraps a queue built by [`QueueConfig::build`].
    pub fn new(queue: Queue) -> Self {
        DeviceQueue {
            queue,
            popped: 0,
            held: 0,
        }
    }

    /// Where the queue is (chains given back are not taken: `give_back` moved it back).
    pub fn position(&self) -> QueuePosition {
        QueuePosition {
            next_avail: self.queue.next_avail(),
            next_used: self.queue.next_used(),
        }
    }

    /// Queue size: also the most chains one pass may pop.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Starts a processing pass: [`Self::pop`] yields at most [`Self::size`] chains until
    /// the next call.
    pub fn begin_pass(&mut self) {
        self.popped = 0;
    }

    /// Whether this pass popped all it may.
    pub fn budget_spent(&self) -> bool {
        self.popped >= self.size()
    }

    /// Chains the driver made available that the device has not taken (given-back ones
    /// included); an error when the available index is more than the queue size ahead.
    pub fn pending(&self, mem: &GuestMemoryMmap) -> Result<u16, QueueError> {
        let avail = self
            .queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(QueueError::Ring)?
            .0;
        let next = self.queue.next_avail();
        let size = self.size();
        let ahead = avail.wrapping_sub(next);
        if ahead > size {
            return Err(QueueError::AvailIndex { avail, next, size });
        }
        Ok(ahead)
    }

    /// The next available chain; None when there is none or this pass's budget is spent.
    pub fn pop<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, QueueError> {
        if self.budget_spent() || self.pending(mem)? == 0 {
            return Ok(None);
        }
        let size = self.size();
        let Some(chain) = self.queue.iter(mem).map_err(QueueError::Ring)?.next() else {
            return Ok(None);
        };
        self.popped += 1;
        self.held = self.held.saturating_sub(1);
        let head = chain.head_index();
        if head >= size {
            return Err(QueueError::HeadOutOfRange { head, size });
        }
        Ok(Some(chain))
    }

    /// Puts the last `n` popped chains back, unused, to be popped again later.
    pub fn give_back(&mut self, n: u16) {
        let n = n.min(self.popped);
        self.queue
            .set_next_avail((Wrapping(self.queue.next_avail()) - Wrapping(n)).0);
        self.held = self.held.saturating_add(n);
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        let size = self.size();
        if head >= size {
            return Err(QueueError::HeadOutOfRange { head, size });
        }
        self.queue
            .add_used(mem, head, len)
            .map_err(QueueError::Ring)
    }

    /// Asks the driver not to notify (a hint; with EVENT_IDX it does nothing).
    pub fn disable_notification(&mut self, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        self.queue
            .disable_notification(mem)
            .map_err(QueueError::Ring)
    }

    /// Asks the driver to notify when it makes new chains available; returns whether some
    /// arrived meanwhile. Chains given back do not count: the notification is asked for
    /// past them, so the driver's next chain is notified even while they wait.
    pub fn enable_notification(&mut self, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let next = self.queue.next_avail();
        self.queue.set_next_avail(next.wrapping_add(self.held));
        let result = self.queue.enable_notification(mem);
        self.queue.set_next_avail(next);
        result.map_err(QueueError::Ring)?;
        Ok(self.pending(mem)? > self.held)
    }

    /// Whether the driver wants an interrupt for the chains used since the last call.
    pub fn needs_notification(&mut self, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        self.queue.needs_notification(mem).map_err(QueueError::Ring)
    }
}

#[cfg(test)]
mod tests;
