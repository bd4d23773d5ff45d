//! Virtio devices (virtio 1.x) and their transports: virtio-mmio (register layout version
//! 2) and virtio-pci (modern, capabilities and MSI-X).
//!
//! Three layers per device: the queue logic, generic over its backend and its interrupt;
//! a thin event-loop adapter holding the queue eventfds; the backend behind a small trait.
//! Transports are a layer the devices do not know: a device signals
//! [`VirtioInterruptType::Config`] or [`VirtioInterruptType::Queue`] through
//! [`VirtioInterrupt`], and a transport lists its notification addresses
//! ([`VirtioTransport`]) for the device manager to wire.

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod queue;
#[cfg(test)]
pub(crate) mod testing;
pub mod transport;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use virtio_queue::Queue;

/// Feature bits common to all devices.
pub mod features {
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x ("modern").
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (set by the driver).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// Device types.
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
}

/// What a device tells its driver through [`VirtioInterrupt::trigger`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The device configuration space changed.
    Config,
    /// Queue n has used buffers.
    Queue(u16),
}

/// How a device signals its driver, whatever the transport: the device says what happened
/// ([`VirtioInterruptType`]) and the transport turns it into its own mechanism (virtio-mmio:
/// an InterruptStatus bit and one line; virtio-pci: an MSI-X vector per queue). Raised on
/// the event loop; the transport reads and acknowledges on vCPU threads.
///
/// It also carries the "needs reset" state (virtio 1.x 2.1.2): the device (or the
/// transport, refusing DRIVER_OK) sets it, the transport reports DEVICE_NEEDS_RESET, and
/// a driver reset clears it.
pub trait VirtioInterrupt: Send + Sync {
    /// Tells the driver about `kind`.
    fn trigger(&self, kind: VirtioInterruptType);
    /// The device cannot go on until the driver resets it: DEVICE_NEEDS_RESET is reported
    /// from now on, and the driver gets a configuration-change interrupt (once).
    fn signal_needs_reset(&self);
    /// Whether the device needs a reset.
    fn needs_reset(&self) -> bool;
}

/// InterruptStatus / ISR bit: a queue has used buffers.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus / ISR bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// The interrupt status bits and needs-reset flag every transport keeps for its device
/// (atomics: written on the event loop, read on vCPU threads).
#[derive(Debug, Default)]
pub struct InterruptStatus {
    bits: AtomicU32,
    needs_reset: AtomicBool,
}

impl InterruptStatus {
    /// No interrupt pending, no reset needed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `bits`.
    pub fn set(&self, bits: u32) {
        self.bits.fetch_or(bits, Ordering::SeqCst);
    }

    /// The bits now.
    pub fn get(&self) -> u32 {
        self.bits.load(Ordering::SeqCst)
    }

    /// Clears `bits` (virtio-mmio InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.bits.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Reads and clears all bits (a virtio-pci ISR read).
    pub fn take(&self) -> u32 {
        self.bits.swap(0, Ordering::SeqCst)
    }

    /// Records that the device needs a reset; true the first time.
    pub fn mark_needs_reset(&self) -> bool {
        !self.needs_reset.swap(true, Ordering::SeqCst)
    }

    /// Whether the device needs a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Puts back saved bits (only the two defined ones) and needs-reset state.
    pub fn restore(&self, bits: u32, needs_reset: bool) {
        self.bits
            .store(bits & (INT_USED_RING | INT_CONFIG), Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    /// Driver reset: no interrupt pending, no reset needed.
    pub fn reset(&self) {
        self.restore(0, false);
    }
}

/// Where the driver writes to notify one queue: `offset` into the transport's region
/// `region` (virtio-mmio: its window, region 0; virtio-pci: the BAR of that index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueNotify {
    /// The transport region (window or BAR index).
    pub region: u8,
    /// Offset of the notification register in it.
    pub offset: u64,
    /// The queue notified.
    pub queue: u16,
    /// The 32-bit value a write must carry to mean this queue; None when any write at
    /// the address does.
    pub datamatch: Option<u32>,
}

/// A virtio transport, as the device manager sees it: it lists where queue notifications
/// arrive, so they can be wired to eventfds (KVM ioeventfds) that reach the device without
/// a trip through the VMM.
pub trait VirtioTransport {
    /// Every queue's notification address.
    fn queue_notifies(&self) -> Vec<QueueNotify>;
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a queue the device cannot use.
    #[error("queue setup refused")]
    BadQueue(#[source] queue::QueueSetupError),
    /// Wrong number of queues.
    #[error("{got} queues given, {want} expected")]
    QueueCount {
        /// Given.
        got: usize,
        /// Expected.
        want: usize,
    },
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// The virtio device type.
    fn device_type(&self) -> u32;
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// How many queues, from the first, the driver sets up with the features it accepted
    /// (asked after [`Self::ack_features`]); queues past them may be left unset and are not
    /// started. All of them, unless a queue exists only with a feature (virtio-balloon's
    /// statistics and free page reporting queues).
    fn queues_in_use(&self) -> usize {
        self.queue_max_sizes().len()
    }
    /// Features the device offers.
    fn features(&self) -> u64;
    /// Features the driver accepted (a subset of [`Self::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues (checked by [`queue::QueueConfig::build`]
    /// and [`queue::check_layout`]). Runs on a vCPU thread.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Where each running queue is, in queue order; empty while the device is not running.
    fn queue_positions(&self) -> Vec<queue::QueuePosition>;
    /// Stops the device (driver reset): queues are dropped, features forgotten.
    ///
    /// Runs on a vCPU thread, so it only changes state: no disk or tap I/O. Work a reset
    /// leaves owed (a flush) is done by the device's event-loop side, which the transport
    /// wakes by signalling every queue's notifier right after this returns.
    fn reset(&mut self);
}

/// Reads `data.len()` bytes at `offset` of a config space held in `config`; bytes past it
/// read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// `err` and its causes, joined by ": " (to print a whole chain once).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Logs guest mistakes at most once per second, counting what it held back.
pub struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimitedLog {
    /// A limiter that has logged nothing yet.
    pub fn new() -> Self {
        RateLimitedLog {
            last: None,
            suppressed: 0,
        }
    }

    /// Logs `msg` unless a line went out less than a second ago.
    pub fn warn(&mut self, msg: std::fmt::Arguments) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::warn!("{msg} ({} similar messages suppressed)", self.suppressed);
        } else {
            log::warn!("{msg}");
        }
        self.last = Some(now);
        self.suppressed = 0;
    }
}
