//! virtio-net over a [`NetBackend`] (a tap): MAC, link status, MTU, checksum and
//! segmentation offloads through the virtio-net header, mergeable receive buffers.
//!
//! Back-pressure both ways: a frame read from the tap waits (one at most) until the guest
//! posts receive buffers, and the tap is not read meanwhile; a transmit the tap cannot take
//! stays in the queue until the tap is writable. Nothing buffers without bound, nothing
//! spins: every pass is bounded (one queue's worth of chains, [`FRAMES_PER_PASS`] frames)
//! and says when it stopped early ([`RxState::Yielded`], [`TxState::Yielded`]); a receive
//! buffer the device cannot write into is returned empty at once; a queue error (an
//! available index jump, a chain head out of range, a ring out of reach) stops the whole
//! device, which asks for a reset (DEVICE_NEEDS_RESET) and touches no guest memory until
//! the driver resets it. While stopped or not started, frames from the tap are dropped.

pub mod handler;
pub mod tap;

use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, Reader, Writer};

use super::queue::{DeviceQueue, QueueError, QueuePosition};
use super::{
    device_type, error_chain, features, read_config_bytes, ActivateError, RateLimitedLog,
    VirtioDevice, VirtioInterrupt,
};
use tap::{offload, VNET_HDR_LEN};

/// Where frames go and come from.
pub trait NetBackend: Send {
    /// Reads one frame (virtio-net header first); WouldBlock when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (virtio-net header first) gathered from `parts`.
    fn write_frame(&mut self, parts: &[IoSlice]) -> io::Result<usize>;
    /// Tells the backend which offloads the guest accepts (TUNSETOFFLOAD).
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
    /// Whether the host side of the link is up.
    fn link_up(&self) -> bool;
    /// The descriptor the event loop watches.
    fn raw_fd(&self) -> RawFd;
}

/// Feature bits.
pub mod feature {
    /// Device handles partial checksums from the guest.
    pub const CSUM: u64 = 1 << 0;
    /// Guest handles partial checksums.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// MTU in config space.
    pub const MTU: u64 = 1 << 3;
    /// MAC in config space.
    pub const MAC: u64 = 1 << 5;
    /// Guest takes TSOv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// Guest takes TSOv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// Guest takes UFO.
    pub const GUEST_UFO: u64 = 1 << 10;
    /// Device takes TSOv4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// Device takes TSOv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// Device takes UFO.
    pub const HOST_UFO: u64 = 1 << 14;
    /// Receive frames may span several buffers.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// Link status in config space.
    pub const STATUS: u64 = 1 << 16;
}

/// Link is up (config `status`).
pub const S_LINK_UP: u16 = 1;
/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame: 64 KiB of GSO payload, Ethernet and VLAN headers, and the vnet header.
pub const MAX_FRAME: usize = 65_535 + 14 + 4 + VNET_HDR_LEN;
/// Most frames one receive pass takes from the backend.
pub const FRAMES_PER_PASS: usize = QUEUE_SIZE as usize;
const RX: usize = 0;
const TX: usize = 1;

/// What a receive pass ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxState {
    /// The backend has nothing more.
    Drained,
    /// A frame waits for the guest to post receive buffers.
    NeedBuffers,
    /// The pass reached its budget: run another after the event loop's other work.
    Yielded,
}

/// What a transmit pass ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxState {
    /// Every available frame went out (or was dropped as invalid), or the device is not
    /// running.
    Done,
    /// The backend is full: wait until it is writable.
    Blocked,
    /// The pass reached its budget: run another after the event loop's other work.
    Yielded,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: [DeviceQueue; 2],
    interrupt: Arc<VirtioInterrupt>,
}

/// Frames moved and dropped each way (what `ember domstats` shows); bytes exclude the
/// virtio-net header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetStats {
    /// Frames given to the guest.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames from the tap the guest could not take (no fitting buffer, malformed).
    pub rx_dropped: u64,
    /// Frames the guest sent out.
    pub tx_packets: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames the guest sent that were malformed or the tap refused.
    pub tx_dropped: u64,
}

/// The virtio-net device.
pub struct Net<B: NetBackend> {
    backend: B,
    offered: u64,
    acked: u64,
    config: [u8; 12],
    active: Option<Active>,
    /// A frame read from the backend that no receive buffer could take yet.
    pending: Option<usize>,
    rx_frame: Vec<u8>,
    tx_frame: Vec<u8>,
    log: RateLimitedLog,
    stats: NetStats,
}

/// A locally administered-looking but stable MAC: 52:54:00 (as libvirt) and three bytes
/// hashed from the VM name and the NIC's index.
pub fn mac_for(name: &str, index: usize) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes().chain(index.to_le_bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

impl<B: NetBackend> Net<B> {
    /// A device on `backend` with this MAC and MTU.
    pub fn new(backend: B, mac: [u8; 6], mtu: u16) -> Self {
        use feature::*;
        let offered = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | MAC
            | STATUS
            | MTU
            | CSUM
            | GUEST_CSUM
            | GUEST_TSO4
            | GUEST_TSO6
            | GUEST_UFO
            | HOST_TSO4
            | HOST_TSO6
            | HOST_UFO
            | MRG_RXBUF;
        let mut config = [0u8; 12];
        config[0..6].copy_from_slice(&mac);
        let status = if backend.link_up() { S_LINK_UP } else { 0 };
        config[6..8].copy_from_slice(&status.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&mtu.to_le_bytes());
        Net {
            backend,
            offered,
            acked: 0,
            config,
            active: None,
            pending: None,
            rx_frame: vec![0u8; MAX_FRAME],
            tx_frame: Vec::with_capacity(MAX_FRAME),
            log: RateLimitedLog::new(),
            stats: NetStats::default(),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The backend (for the event loop's descriptor).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Whether the config says the link is up.
    pub fn link_up(&self) -> bool {
        u16::from_le_bytes([self.config[6], self.config[7]]) & S_LINK_UP != 0
    }

    /// Sets the link status; tells the guest if it changed.
    pub fn set_link(&mut self, up: bool) {
        if self.link_up() == up {
            return;
        }
        let status = if up { S_LINK_UP } else { 0 };
        self.config[6..8].copy_from_slice(&status.to_le_bytes());
        if let Some(a) = &self.active {
            a.interrupt.signal_config_change();
        }
    }

    /// Follows the backend's link state.
    pub fn poll_link(&mut self) {
        let up = self.backend.link_up();
        self.set_link(up);
    }

    fn mergeable(&self) -> bool {
        self.acked & feature::MRG_RXBUF != 0
    }

    /// Stops the device after a queue error: it asks for a reset and drops its queues, so
    /// it touches no guest memory until the driver resets and restarts it.
    fn fail(&mut self, queue: &str, e: &QueueError) {
        self.log.warn(format_args!(
            "virtio-net: {queue} queue: {}; the device stops until the driver resets it",
            error_chain(e)
        ));
        self.pending = None;
        if let Some(a) = self.active.take() {
            a.interrupt.signal_needs_reset();
        }
    }

    /// Drops the queues if the device was told it needs a reset (by either queue, or the
    /// transport): none of them is served until the driver resets it.
    fn stop_if_needs_reset(&mut self) {
        if self
            .active
            .as_ref()
            .is_some_and(|a| a.interrupt.needs_reset())
        {
            self.active = None;
            self.pending = None;
        }
    }

    /// Moves frames from the backend into the guest's receive buffers, at most
    /// [`FRAMES_PER_PASS`] frames and one queue's worth of buffers per pass.
    pub fn process_rx(&mut self) -> RxState {
        self.stop_if_needs_reset();
        if let Some(a) = self.active.as_mut() {
            a.queues[RX].begin_pass();
        }
        let mut delivered = 0usize;
        let mut state = RxState::Yielded;
        for _ in 0..FRAMES_PER_PASS {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.backend.read_frame(&mut self.rx_frame) {
                    Ok(0) => {
                        state = RxState::Drained;
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        state = RxState::Drained;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // EIO while the tap is down, for instance: nothing to read now.
                        self.log
                            .warn(format_args!("virtio-net: tap read failed: {e}"));
                        state = RxState::Drained;
                        break;
                    }
                },
            };
            if len < VNET_HDR_LEN {
                self.stats.rx_dropped += 1;
                continue;
            }
            match self.deliver(len) {
                Ok(Deliver::Done) => {
                    delivered += 1;
                    self.stats.rx_packets += 1;
                    self.stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
                }
                Ok(Deliver::Dropped) => self.stats.rx_dropped += 1,
                Ok(Deliver::NoBuffers) => {
                    self.pending = Some(len);
                    match self.rx_wait_for_buffers() {
                        Ok(Wait::Retry) => continue,
                        Ok(Wait::Yield) => break,
                        Ok(Wait::Kick) => {
                            state = RxState::NeedBuffers;
                            break;
                        }
                        Err(e) => self.fail("receive", &e),
                    }
                }
                Err(e) => self.fail("receive", &e),
            }
        }
        if delivered > 0 {
            self.notify(RX);
        }
        state
    }

    /// After a frame found too few buffers: yield if the pass's budget is what ran out,
    /// else ask for a kick when buffers come and retry if some came meanwhile.
    fn rx_wait_for_buffers(&mut self) -> Result<Wait, QueueError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(Wait::Retry);
        };
        let q = &mut a.queues[RX];
        if q.budget_spent() {
            return Ok(Wait::Yield);
        }
        Ok(if q.enable_notification(&a.mem)? {
            Wait::Retry
        } else {
            Wait::Kick
        })
    }

    /// Whether a frame waits for receive buffers.
    pub fn rx_pending(&self) -> bool {
        self.pending.is_some()
    }

    fn notify(&mut self, q: usize) {
        if let Some(a) = self.active.as_mut() {
            if a.queues[q].needs_notification(&a.mem).unwrap_or(true) {
                a.interrupt.signal_used_queue();
            }
        }
    }

    /// Puts `rx_frame[..len]` into receive buffers (several when mergeable). A buffer the
    /// device cannot write into (read-only, outside guest memory, too small) is returned
    /// empty at once; it cannot be given back, so buffers this frame already holds are
    /// returned empty with it and the frame is dropped. A frame that a whole queue of
    /// buffers cannot hold is dropped, its buffers given back for the next frames.
    fn deliver(&mut self, len: usize) -> Result<Deliver, QueueError> {
        let mergeable = self.mergeable();
        let Net {
            active,
            rx_frame,
            log,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return Ok(Deliver::Dropped);
        };
        let mem = &a.mem;
        let q = &mut a.queues[RX];
        let mut taken: Vec<(u16, crate::GuestWriter, usize, usize)> = Vec::new();
        let mut written = 0usize;
        while written < len {
            let Some(chain) = q.pop(mem)? else {
                // Not enough buffers (or budget): give back what was taken and wait.
                q.give_back(taken.len() as u16);
                return Ok(Deliver::NoBuffers);
            };
            let head = chain.head_index();
            let need = if taken.is_empty() { VNET_HDR_LEN } else { 1 };
            let w = match Writer::new(mem, chain) {
                Ok(w) if w.available_bytes() >= need => w,
                _ => {
                    log.warn(format_args!(
                        "virtio-net: receive buffer {head} is read-only, too small or outside \
                         guest memory: returned empty"
                    ));
                    let held = taken.iter().map(|t| t.0);
                    for h in held.chain([head]) {
                        q.add_used(mem, h, 0)?;
                    }
                    if taken.is_empty() {
                        continue;
                    }
                    return Ok(Deliver::Dropped);
                }
            };
            let room = w.available_bytes();
            let take = room.min(len - written);
            if !mergeable && take < len - written {
                log.warn(format_args!(
                    "virtio-net: {len}-byte frame does not fit a {room}-byte receive buffer"
                ));
                q.add_used(mem, head, 0)?;
                return Ok(Deliver::Dropped);
            }
            taken.push((head, w, written, take));
            written += take;
            if written < len && taken.len() >= usize::from(q.size()) {
                // Never more buffers than that at once: this frame can never fit.
                log.warn(format_args!(
                    "virtio-net: {len}-byte frame does not fit {} receive buffers: dropped",
                    taken.len()
                ));
                q.give_back(taken.len() as u16);
                return Ok(Deliver::Dropped);
            }
        }
        let count = if mergeable { taken.len() as u16 } else { 1 };
        // num_buffers, in the header's last two bytes.
        rx_frame[10..12].copy_from_slice(&count.to_le_bytes());
        for (head, mut w, from, n) in taken {
            if let Err(e) = std::io::Write::write_all(&mut w, &rx_frame[from..from + n]) {
                log.warn(format_args!(
                    "virtio-net: cannot fill a receive buffer: {e}"
                ));
            }
            q.add_used(mem, head, n as u32)?;
        }
        Ok(Deliver::Done)
    }

    /// Sends the guest's frames to the backend, at most one queue's worth per pass.
    pub fn process_tx(&mut self) -> TxState {
        self.stop_if_needs_reset();
        let Net {
            active,
            backend,
            tx_frame,
            log,
            stats,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return TxState::Done;
        };
        let mut sent = 0usize;
        match transmit(a, backend, tx_frame, log, stats, &mut sent) {
            Ok(state) => {
                if sent > 0 {
                    self.notify(TX);
                }
                state
            }
            Err(e) => {
                self.fail("transmit", &e);
                TxState::Done
            }
        }
    }
}

enum Deliver {
    Done,
    Dropped,
    NoBuffers,
}

/// What to do about a frame that found too few receive buffers.
enum Wait {
    /// Buffers came meanwhile (or the device stopped): go on.
    Retry,
    /// The pass's budget ran out.
    Yield,
    /// Wait for the driver's kick.
    Kick,
}

/// One bounded transmit pass; `sent` counts the chains completed.
fn transmit<B: NetBackend>(
    a: &mut Active,
    backend: &mut B,
    frame: &mut Vec<u8>,
    log: &mut RateLimitedLog,
    stats: &mut NetStats,
    sent: &mut usize,
) -> Result<TxState, QueueError> {
    let mem = &a.mem;
    let q = &mut a.queues[TX];
    q.begin_pass();
    // Each turn pops a chain or re-checks the ring; pops are capped by the queue's budget.
    for _ in 0..2 * usize::from(q.size()) {
        let Some(chain) = q.pop(mem)? else {
            if q.budget_spent() {
                return Ok(TxState::Yielded);
            }
            if q.enable_notification(mem)? {
                continue;
            }
            return Ok(TxState::Done);
        };
        let head = chain.head_index();
        if let Err(why) = gather(mem, chain, frame) {
            stats.tx_dropped += 1;
            log.warn(format_args!("virtio-net: dropped a transmit: {why}"));
        } else {
            match backend.write_frame(&[IoSlice::new(frame)]) {
                Ok(_) => {
                    stats.tx_packets += 1;
                    stats.tx_bytes += frame.len().saturating_sub(VNET_HDR_LEN) as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    q.give_back(1);
                    return Ok(TxState::Blocked);
                }
                Err(e) => {
                    stats.tx_dropped += 1;
                    log.warn(format_args!("virtio-net: tap write failed: {e}"))
                }
            }
        }
        q.add_used(mem, head, 0)?;
        *sent += 1;
    }
    Ok(TxState::Yielded)
}

/// Copies a transmit chain (virtio-net header and frame) into `out`.
fn gather<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    out: &mut Vec<u8>,
) -> Result<(), &'static str>
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    let mut r = Reader::new(mem, chain).map_err(|_| "buffer outside guest memory")?;
    let len = r.available_bytes();
    if len < VNET_HDR_LEN {
        return Err("shorter than the virtio-net header");
    }
    if len > MAX_FRAME {
        return Err("longer than the largest frame");
    }
    out.resize(len, 0);
    std::io::Read::read_exact(&mut r, out).map_err(|_| "unreadable buffer")
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(DeviceQueue::position).collect())
            .unwrap_or_default()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
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
        // The MAC is not writable without VIRTIO_NET_F_CTRL_MAC_ADDR.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: 2,
            });
        }
        let mut flags = 0;
        for (f, o) in [
            (feature::GUEST_CSUM, offload::CSUM),
            (feature::GUEST_TSO4, offload::TSO4),
            (feature::GUEST_TSO6, offload::TSO6),
            (feature::GUEST_UFO, offload::UFO),
        ] {
            if self.acked & f != 0 {
                flags |= o;
            }
        }
        // Segmentation offloads need checksum offload.
        if flags & offload::CSUM == 0 {
            flags = 0;
        }
        if let Err(e) = self.backend.set_offload(flags) {
            // Once per driver start, which the guest can repeat: rate-limited.
            self.log.warn(format_args!(
                "virtio-net: TUNSETOFFLOAD {flags:#x} failed: {e}"
            ));
        }
        let [rx, tx]: [Queue; 2] =
            queues
                .try_into()
                .map_err(|q: Vec<Queue>| ActivateError::QueueCount {
                    got: q.len(),
                    want: 2,
                })?;
        self.active = Some(Active {
            mem,
            queues: [DeviceQueue::new(rx), DeviceQueue::new(tx)],
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
        self.pending = None;
    }
}

#[cfg(test)]
mod tests;
