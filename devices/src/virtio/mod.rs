//! Virtio devices over the virtio-mmio transport (virtio 1.x, register layout version 2).
//!
//! Three layers per device: the queue logic, generic over its backend and its interrupt;
//! a thin event-loop adapter holding the queue eventfds; the backend behind a small trait.

pub mod block;
pub mod mmio;
pub mod net;
pub mod queue;
#[cfg(test)]
pub(crate) mod testing;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use virtio_queue::Queue;

use crate::Interrupt;

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
}

/// What a device and its transport share: the interrupt status, which the transport reads
/// and acknowledges on vCPU threads and the device raises on the event loop, and the
/// "needs reset" state (virtio 1.x 2.1.2), which the device (or the transport, refusing
/// DRIVER_OK) sets, the transport reports as DEVICE_NEEDS_RESET, and a driver reset clears.
pub struct VirtioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    line: Arc<dyn Interrupt>,
}

/// InterruptStatus bit: a queue has used buffers.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

impl VirtioInterrupt {
    /// An interrupt raised on `line`.
    pub fn new(line: Arc<dyn Interrupt>) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            line,
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            log::warn!("virtio: cannot raise the interrupt: {e}");
        }
    }

    /// Tells the driver a queue has used buffers.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    /// Tells the driver the configuration space changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The device cannot go on until the driver resets it: DEVICE_NEEDS_RESET is reported
    /// from now on, and the driver gets a configuration-change interrupt (once).
    pub fn signal_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.raise(INT_CONFIG);
        }
    }

    /// Whether the device needs a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Puts back a saved interrupt status and needs-reset state (a restore).
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status
            .store(status & (INT_USED_RING | INT_CONFIG), Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    /// Raises the line again if an interrupt is pending (after a restore: the edge fired
    /// before the snapshot is gone).
    pub fn retrigger(&self) {
        if self.status() != 0 {
            if let Err(e) = self.line.trigger() {
                log::warn!("virtio: cannot raise the interrupt: {e}");
            }
        }
    }

    /// Driver reset (by the transport, after the device's own reset): no interrupt pending,
    /// no reset needed.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
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
        interrupt: Arc<VirtioInterrupt>,
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
