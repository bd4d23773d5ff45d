//! virtio-net over a [`NetBackend`] (a tap): MAC, link status, MTU, checksum and
//! segmentation offloads through the virtio-net header, mergeable receive buffers.
//!
//! Back-pressure both ways: a frame read from the tap waits (one at most) until the guest
//! posts receive buffers, and the tap is not read meanwhile; a transmit the tap cannot take
//! stays in the queue until the tap is writable. Nothing buffers without bound, nothing
//! spins.

pub mod handler;
pub mod tap;

use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::{
    device_type, features, read_config_bytes, ActivateError, RateLimitedLog, VirtioDevice,
    VirtioInterrupt,
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
const RX: usize = 0;
const TX: usize = 1;

/// What a receive pass ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxState {
    /// The backend has nothing more.
    Drained,
    /// A frame waits for the guest to post receive buffers.
    NeedBuffers,
}

/// What a transmit pass ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxState {
    /// Every available frame went out (or was dropped as invalid).
    Done,
    /// The backend is full: wait until it is writable.
    Blocked,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
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
        }
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

    /// Moves frames from the backend into the guest's receive buffers.
    pub fn process_rx(&mut self) -> RxState {
        let mut delivered = 0usize;
        let state = loop {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.backend.read_frame(&mut self.rx_frame) {
                    Ok(0) => break RxState::Drained,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxState::Drained,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // EIO while the tap is down, for instance: nothing to read now.
                        self.log
                            .warn(format_args!("virtio-net: tap read failed: {e}"));
                        break RxState::Drained;
                    }
                },
            };
            if len < VNET_HDR_LEN {
                continue;
            }
            match self.deliver(len) {
                Deliver::Done => delivered += 1,
                Deliver::Dropped => {}
                Deliver::NoBuffers => {
                    self.pending = Some(len);
                    // Ask for a kick when buffers come; some may have come meanwhile.
                    if self.rx_enable_notification() {
                        continue;
                    }
                    break RxState::NeedBuffers;
                }
            }
        };
        if delivered > 0 {
            self.notify(RX);
        }
        state
    }

    /// Re-enables receive-queue kicks; true if buffers arrived in the meantime.
    fn rx_enable_notification(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        a.queues[RX].enable_notification(&a.mem).unwrap_or(false)
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

    /// Puts `rx_frame[..len]` into receive buffers (several when mergeable).
    fn deliver(&mut self, len: usize) -> Deliver {
        let mergeable = self.mergeable();
        let Some(a) = self.active.as_mut() else {
            return Deliver::Dropped;
        };
        let mem = a.mem.clone();
        let q = &mut a.queues[RX];
        let mut used: Vec<(u16, u32)> = Vec::new();
        let mut written = 0usize;
        let mut writers = Vec::new();
        while written < len {
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                // Not enough buffers: give back what was taken and wait.
                for _ in 0..used.len() {
                    q.go_to_previous_position();
                }
                return Deliver::NoBuffers;
            };
            let head = chain.head_index();
            let Ok(w) = Writer::new(&mem, chain) else {
                self.log.warn(format_args!(
                    "virtio-net: receive buffer outside guest memory"
                ));
                used.push((head, 0));
                continue;
            };
            let room = w.available_bytes();
            let take = room.min(len - written);
            if (used.is_empty() && room < VNET_HDR_LEN) || take == 0 {
                used.push((head, 0));
                continue;
            }
            if !mergeable && take < len - written {
                self.log.warn(format_args!(
                    "virtio-net: {len}-byte frame does not fit a {room}-byte receive buffer"
                ));
                used.push((head, 0));
                for (h, l) in used {
                    let _ = q.add_used(&mem, h, l);
                }
                return Deliver::Dropped;
            }
            used.push((head, take as u32));
            writers.push((w, written, take));
            written += take;
        }
        let count = used.iter().filter(|(_, l)| *l > 0).count() as u16;
        // num_buffers, in the header's last two bytes.
        self.rx_frame[10..12].copy_from_slice(&(if mergeable { count } else { 1 }).to_le_bytes());
        for (mut w, from, n) in writers {
            if let Err(e) = std::io::Write::write_all(&mut w, &self.rx_frame[from..from + n]) {
                self.log.warn(format_args!(
                    "virtio-net: cannot fill a receive buffer: {e}"
                ));
            }
        }
        for (h, l) in used {
            if let Err(e) = q.add_used(&mem, h, l) {
                self.log.warn(format_args!(
                    "virtio-net: cannot return a receive buffer: {e:?}"
                ));
            }
        }
        Deliver::Done
    }

    /// Sends the guest's frames to the backend.
    pub fn process_tx(&mut self) -> TxState {
        let Some(a) = self.active.as_mut() else {
            return TxState::Done;
        };
        let mem = a.mem.clone();
        let mut sent = 0usize;
        let state = loop {
            let q = &mut a.queues[TX];
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                match q.enable_notification(&mem) {
                    Ok(true) => continue,
                    _ => break TxState::Done,
                }
            };
            let head = chain.head_index();
            match gather(&mem, chain, &mut self.tx_frame) {
                Ok(()) => {}
                Err(why) => {
                    self.log
                        .warn(format_args!("virtio-net: dropped a transmit: {why}"));
                    let _ = q.add_used(&mem, head, 0);
                    sent += 1;
                    continue;
                }
            }
            match self.backend.write_frame(&[IoSlice::new(&self.tx_frame)]) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    q.go_to_previous_position();
                    break TxState::Blocked;
                }
                Err(e) => self
                    .log
                    .warn(format_args!("virtio-net: tap write failed: {e}")),
            }
            let _ = q.add_used(&mem, head, 0);
            sent += 1;
        };
        if sent > 0 {
            self.notify(TX);
        }
        state
    }
}

enum Deliver {
    Done,
    Dropped,
    NoBuffers,
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
            log::warn!("virtio-net: TUNSETOFFLOAD {flags:#x} failed: {e}");
        }
        self.active = Some(Active {
            mem,
            queues,
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
