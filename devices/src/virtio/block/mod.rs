//! virtio-blk over any [`DiskImage`]: read, write, flush, get-ID, discard, write-zeroes,
//! read-only, block size, segment limits.
//!
//! The disk is touched only from [`Block::process_queue`], on the event loop: a driver
//! reset (on a vCPU thread) only records that a flush is owed, and the next pass does it
//! before serving anything else. A broken queue stops the device until the driver resets it.

pub mod handler;
pub mod request;

use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, Reader, Writer};

use super::queue::{DeviceQueue, QueueError, QueuePosition};
use super::{
    device_type, error_chain, features, read_config_bytes, ActivateError, RateLimitedLog,
    VirtioDevice, VirtioInterrupt,
};
use crate::disk::DiskImage;
use request::{Capabilities, RequestError};

/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest segment the driver may use (bytes).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most segments per request (data descriptors; header and status come on top).
pub const SEG_MAX: u32 = (QUEUE_SIZE - 2) as u32;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

/// Size of `struct virtio_blk_config` as we fill it.
const CONFIG_LEN: usize = 0x3c;

/// A running device: what activation handed over.
struct Active {
    mem: GuestMemoryMmap,
    queue: DeviceQueue,
    interrupt: Arc<VirtioInterrupt>,
}

/// What one [`Block::process_queue`] pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Requests completed.
    pub completed: usize,
    /// The pass stopped at its budget with requests still available: run another (after
    /// the event loop served everything else).
    pub more: bool,
}

/// Requests served, by kind, and bytes moved (what `ember domstats` shows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlockStats {
    /// Reads completed.
    pub read_ops: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Writes completed.
    pub write_ops: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flushes completed.
    pub flush_ops: u64,
    /// Discards and write-zeroes completed.
    pub discard_ops: u64,
    /// Requests that failed (I/O error, unsupported, out of range, malformed).
    pub errors: u64,
}

impl BlockStats {
    fn count(&mut self, kind: u32, ok: bool, bytes: u64) {
        if !ok {
            self.errors += 1;
            return;
        }
        match kind {
            request::T_IN => {
                self.read_ops += 1;
                self.read_bytes += bytes;
            }
            request::T_OUT => {
                self.write_ops += 1;
                self.write_bytes += bytes;
            }
            request::T_FLUSH => self.flush_ops += 1,
            request::T_DISCARD | request::T_WRITE_ZEROES => self.discard_ops += 1,
            _ => {}
        }
    }
}

/// The virtio-blk device.
pub struct Block {
    disk: Box<dyn DiskImage>,
    read_only: bool,
    serial: Vec<u8>,
    offered: u64,
    acked: u64,
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
    /// A driver reset happened and its flush has not run yet.
    flush_owed: bool,
    bounce: Vec<u8>,
    log: RateLimitedLog,
    stats: BlockStats,
}

impl Block {
    /// A device serving `disk`; `serial` is what get-ID returns (up to 20 bytes).
    pub fn new(disk: Box<dyn DiskImage>, read_only: bool, serial: Option<String>) -> Self {
        let read_only = read_only || disk.read_only();
        let mut offered = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | F_SIZE_MAX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH;
        if read_only {
            offered |= F_RO;
        } else {
            offered |= F_DISCARD | F_WRITE_ZEROES;
        }
        let mut dev = Block {
            serial: serial.map(String::into_bytes).unwrap_or_default(),
            disk,
            read_only,
            offered,
            acked: 0,
            config: [0; CONFIG_LEN],
            active: None,
            flush_owed: false,
            bounce: Vec::new(),
            log: RateLimitedLog::new(),
            stats: BlockStats::default(),
        };
        dev.fill_config();
        dev
    }

    fn fill_config(&mut self) {
        let c = &mut self.config;
        let put32 =
            |c: &mut [u8], at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        c[0..8].copy_from_slice(&(self.disk.size() / request::SECTOR).to_le_bytes());
        put32(c, 0x08, SIZE_MAX);
        put32(c, 0x0c, SEG_MAX);
        put32(c, 0x14, request::SECTOR as u32); // blk_size
        put32(c, 0x24, request::MAX_SEGMENT_SECTORS); // max_discard_sectors
        put32(c, 0x28, request::MAX_SEGMENTS); // max_discard_seg
        put32(c, 0x2c, 1); // discard_sector_alignment
        put32(c, 0x30, request::MAX_SEGMENT_SECTORS); // max_write_zeroes_sectors
        put32(c, 0x34, request::MAX_SEGMENTS); // max_write_zeroes_seg
        c[0x38] = 1; // write_zeroes_may_unmap
    }

    /// Flushes the disk (before a snapshot, say); also pays a flush a reset left owed.
    pub fn flush_disk(&mut self) -> Result<(), crate::disk::DiskError> {
        self.flush_owed = false;
        self.disk.flush()
    }

    /// The image behind the device (for snapshots; the guest should be paused).
    pub fn disk_mut(&mut self) -> &mut dyn DiskImage {
        self.disk.as_mut()
    }

    /// Puts another image behind the device (the guest is paused): `swap` gets the current
    /// one and returns the new one, or on failure the old one back with the error.
    pub fn swap_disk<E>(
        &mut self,
        swap: impl FnOnce(Box<dyn DiskImage>) -> Result<Box<dyn DiskImage>, (Box<dyn DiskImage>, E)>,
    ) -> Result<(), E> {
        let standin = Box::new(crate::disk::DetachedDisk::like(self.disk.as_ref()));
        let old = std::mem::replace(&mut self.disk, standin);
        match swap(old) {
            Ok(new) => {
                self.disk = new;
                Ok(())
            }
            Err((old, e)) => {
                self.disk = old;
                Err(e)
            }
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.disk.size()
    }

    fn caps(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            flush: self.acked & F_FLUSH != 0,
            discard: self.acked & F_DISCARD != 0,
            write_zeroes: self.acked & F_WRITE_ZEROES != 0,
        }
    }

    /// Serves the available requests, at most one queue's worth per pass, and raises the
    /// interrupt if the driver wants one. A flush owed by a reset runs first. A queue error
    /// stops the device (DEVICE_NEEDS_RESET) until the driver resets it.
    pub fn process_queue(&mut self) -> Served {
        if std::mem::take(&mut self.flush_owed) {
            if let Err(e) = self.disk.flush() {
                self.log
                    .warn(format_args!("virtio-blk: flush after a reset failed: {e}"));
            }
        }
        if self
            .active
            .as_ref()
            .is_some_and(|a| a.interrupt.needs_reset())
        {
            self.active = None;
        }
        let caps = self.caps();
        let Block {
            active,
            disk,
            serial,
            bounce,
            log,
            stats,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return Served::default();
        };
        let mut served = Served::default();
        let mut ctx = Ctx {
            disk: disk.as_mut(),
            caps,
            serial,
            bounce,
            log,
            stats,
        };
        match serve_pass(a, &mut ctx, &mut served) {
            Ok(()) => {
                if served.completed > 0 && a.queue.needs_notification(&a.mem).unwrap_or(true) {
                    a.interrupt.signal_used_queue();
                }
            }
            Err(e) => {
                self.log.warn(format_args!(
                    "virtio-blk: {}; the device stops until the driver resets it",
                    error_chain(&e)
                ));
                if let Some(a) = self.active.take() {
                    a.interrupt.signal_needs_reset();
                }
            }
        }
        served
    }
}

/// What serving a request needs besides the queue.
struct Ctx<'a> {
    disk: &'a mut dyn DiskImage,
    caps: Capabilities,
    serial: &'a [u8],
    bounce: &'a mut Vec<u8>,
    log: &'a mut RateLimitedLog,
    stats: &'a mut BlockStats,
}

/// One bounded pass over the queue; `served` counts as it goes.
fn serve_pass(a: &mut Active, ctx: &mut Ctx, served: &mut Served) -> Result<(), QueueError> {
    let mem = &a.mem;
    let q = &mut a.queue;
    q.begin_pass();
    q.disable_notification(mem)?;
    // Each turn pops a chain or re-checks the ring; pops are capped by the queue's budget.
    for _ in 0..2 * usize::from(q.size()) {
        let Some(chain) = q.pop(mem)? else {
            if q.budget_spent() {
                served.more = true;
                return Ok(());
            }
            if q.enable_notification(mem)? {
                continue;
            }
            return Ok(());
        };
        let head = chain.head_index();
        let used = serve(mem, chain, ctx);
        q.add_used(mem, head, used)?;
        served.completed += 1;
    }
    served.more = true;
    Ok(())
}

/// Serves one descriptor chain; returns the bytes written into guest memory (data and the
/// status byte), as the used ring reports them.
fn serve<M>(mem: &GuestMemoryMmap, chain: virtio_queue::DescriptorChain<M>, ctx: &mut Ctx) -> u32
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    let (mut reader, mut writer) = match (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
    {
        (Ok(r), Ok(w)) => (r, w),
        _ => {
            ctx.stats.errors += 1;
            ctx.log.warn(format_args!(
                "virtio-blk: descriptor chain points outside guest memory"
            ));
            return 0;
        }
    };
    let writable = writer.available_bytes();
    if writable == 0 {
        ctx.stats.errors += 1;
        ctx.log.warn(format_args!(
            "virtio-blk: request without room for a status byte"
        ));
        return 0;
    }
    let mut status_writer = match writer.split_at(writable - 1) {
        Ok(s) => s,
        Err(_) => return 0,
    };
    let mut kind = None;
    let mut out_len = 0;
    let result = request::read_header(&mut reader).and_then(|h| {
        kind = Some(h.kind);
        out_len = reader.available_bytes() as u64;
        request::execute(
            h,
            &mut reader,
            &mut writer,
            ctx.disk,
            ctx.caps,
            ctx.serial,
            ctx.bounce,
        )
    });
    let (status, data_len) = match result {
        Ok(n) => (request::S_OK, n),
        Err(e) => {
            if !matches!(e, RequestError::Unsupported(_)) {
                ctx.log.warn(format_args!("virtio-blk: {e}"));
            }
            (e.status(), writer.bytes_written() as u32)
        }
    };
    let k = kind.unwrap_or(u32::MAX);
    let bytes = if k == request::T_OUT {
        out_len
    } else {
        u64::from(data_len)
    };
    ctx.stats.count(k, status == request::S_OK, bytes);
    match status_writer.write_obj(status) {
        Ok(()) => data_len + 1,
        Err(_) => data_len,
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.active
            .as_ref()
            .map(|a| vec![a.queue.position()])
            .unwrap_or_default()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.offered;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in virtio-blk's config space is writable without CONFIG_WCE.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: 1,
            });
        }
        let queue = DeviceQueue::new(queues.remove(0));
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    /// State only (a vCPU thread): the flush a reset owes runs at the next
    /// [`Block::process_queue`], before any new request.
    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
        self.flush_owed = true;
    }
}

#[cfg(test)]
mod tests;
