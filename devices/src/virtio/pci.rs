//! The virtio-pci transport, modern only (virtio 1.x 4.1): a PCI function (vendor 0x1af4,
//! device 0x1040 + type) with one 64-bit memory BAR holding the common configuration, ISR,
//! device configuration and notification regions and the MSI-X table and pending bits,
//! each described by a capability, plus the PCI configuration access capability.
//!
//! Interrupts are MSI-X only (no INTx pin): the driver gives each queue and the
//! configuration change its own vector, and a device's [`VirtioInterruptType::Queue`]
//! becomes that vector's message. Queue notifications land at `NOTIFY + 4 * queue`, one
//! address per queue, so the device manager wires one ioeventfd per queue there.
//!
//! The status and feature logic is [`VirtioCommon`]'s, shared with virtio-mmio.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::queue::QueueConfig;
use super::transport::{CommonState, VirtioCommon};
use super::{
    device_type, InterruptStatus, QueueNotify, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    VirtioTransport, INT_CONFIG, INT_USED_RING,
};
use crate::pci::config::{PciConfigError, PciConfigState, BAR_COUNT};
use crate::pci::msix::{MsiSink, Msix, MsixState, CONTROL_ENABLE, CONTROL_MASK, ENTRY_SIZE};
use crate::pci::{BarKind, BarRegion, PciConfig, PciDevice, PciIds, VENDOR_VIRTIO};
use crate::persist::{Persist, StateError};

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// The BAR every region lives in.
pub const BAR: u8 = 0;
/// Common configuration (`struct virtio_pci_common_cfg`, virtio 1.1 layout).
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
/// ISR status (one byte, read to acknowledge).
const ISR: u64 = 0x1000;
const ISR_LEN: u64 = 0x1000;
/// Device configuration.
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
/// Queue notifications: queue n at `NOTIFY + n * NOTIFY_MULTIPLIER`.
pub const NOTIFY: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// MSI-X table and pending-bit array.
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
/// "No vector" in config_msix_vector and queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;
/// Most queues: with the configuration vector, their MSI-X entries must fit between the
/// table and the pending bits (and their notification addresses fit easily).
const MAX_QUEUES: usize = ((MSIX_PBA - MSIX_TABLE) / ENTRY_SIZE) as usize - 1;

/// Capability IDs and virtio structure types (`cfg_type`).
const CAP_MSIX: u8 = 0x11;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

/// Why a virtio-pci function cannot be built (a device-model bug, not a guest error).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VirtioPciError {
    /// The configuration space layout.
    #[error("cannot lay out the PCI function")]
    Config(#[from] PciConfigError),
    /// More queues than the notification region has addresses for.
    #[error("{0} queues: at most {MAX_QUEUES}")]
    TooManyQueues(usize),
}

/// The virtio-pci interrupt: MSI-X vectors per queue and for configuration changes, and
/// the ISR bits (a queue bit only while MSI-X is off, when nothing else is sent: there is
/// no INTx line).
pub struct PciInterrupt {
    status: InterruptStatus,
    msix: Mutex<Msix>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
}

impl PciInterrupt {
    fn new(queues: usize, sink: Arc<dyn MsiSink>) -> Self {
        PciInterrupt {
            status: InterruptStatus::new(),
            msix: Mutex::new(Msix::new(queues as u16 + 1, sink)),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
        }
    }

    fn msix(&self) -> MutexGuard<'_, Msix> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A vector number the driver wrote, or NO_VECTOR when the table has no such entry.
    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.msix().vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn queue_vector(&self, q: usize) -> u16 {
        self.queue_vectors
            .get(q)
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }

    /// Driver reset: no bits pending, no reset needed, no vectors assigned.
    fn reset(&self) {
        self.status.reset();
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) {
        let (vector, bit) = match kind {
            VirtioInterruptType::Config => {
                // The config bit is set whatever the interrupt mode (virtio 1.x 4.1.4.5).
                self.status.set(INT_CONFIG);
                (self.config_vector.load(Ordering::SeqCst), 0)
            }
            VirtioInterruptType::Queue(q) => (self.queue_vector(usize::from(q)), INT_USED_RING),
        };
        let mut msix = self.msix();
        if !msix.enabled() {
            self.status.set(bit);
            return;
        }
        if vector != NO_VECTOR {
            msix.notify(vector);
        }
    }

    fn signal_needs_reset(&self) {
        if self.status.mark_needs_reset() {
            self.trigger(VirtioInterruptType::Config);
        }
    }

    fn needs_reset(&self) -> bool {
        self.status.needs_reset()
    }
}

/// One virtio device as a PCI function.
pub struct VirtioPciDevice {
    config: PciConfig,
    common: VirtioCommon,
    interrupt: Arc<PciInterrupt>,
    /// The same interrupt, as devices take it.
    device_interrupt: Arc<dyn VirtioInterrupt>,
    msix_cap: usize,
    cfg_cap: usize,
}

/// PCI class code for a virtio device type.
fn class_of(device_type: u32) -> u32 {
    match device_type {
        device_type::NET => 0x02_00_00,
        device_type::BLOCK => 0x01_80_00,
        _ => 0xff_00_00,
    }
}

/// A virtio structure capability (`struct virtio_pci_cap`), `extra` appended.
fn virtio_cap(cfg_type: u8, offset: u64, len: u64, extra: &[u8]) -> Vec<u8> {
    let mut c = vec![
        CAP_VENDOR,
        0,
        16 + extra.len() as u8,
        cfg_type,
        BAR,
        0,
        0,
        0,
    ];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(len as u32).to_le_bytes());
    c.extend_from_slice(extra);
    c
}

impl VirtioPciDevice {
    /// The function for `device`: BAR 0 placed at `bar_addr` (as firmware would have;
    /// decoding stays off until the guest turns it on), MSI-X messages to `msi`, queue i
    /// notified through `queue_evts[i]`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        msi: Arc<dyn MsiSink>,
        mem: GuestMemoryMmap,
        queue_evts: Vec<EventFd>,
        bar_addr: u64,
    ) -> Result<Self, VirtioPciError> {
        let common = VirtioCommon::new("virtio-pci", device, mem, queue_evts);
        let queues = common.queue_count();
        if queues > MAX_QUEUES {
            return Err(VirtioPciError::TooManyQueues(queues));
        }
        let kind = common.device().device_type();
        let mut config = PciConfig::new(PciIds {
            vendor: VENDOR_VIRTIO,
            device: 0x1040 + kind as u16,
            revision: 1,
            class: class_of(kind),
            subsystem_vendor: VENDOR_VIRTIO,
            subsystem: 0x1100,
        });
        config.add_bar(usize::from(BAR), BAR_SIZE, BarKind::Memory64, bar_addr)?;
        let interrupt = Arc::new(PciInterrupt::new(queues, msi));
        let vectors = interrupt.msix().vectors();
        let (msix_cap, cfg_cap) = Self::add_capabilities(&mut config, vectors, queues)?;
        Ok(VirtioPciDevice {
            config,
            common,
            device_interrupt: interrupt.clone(),
            interrupt,
            msix_cap,
            cfg_cap,
        })
    }

    /// The MSI-X capability, the four virtio structures and the configuration access
    /// capability; returns the offsets of the first and the last.
    fn add_capabilities(
        config: &mut PciConfig,
        vectors: u16,
        queues: usize,
    ) -> Result<(usize, usize), PciConfigError> {
        let mut msix = vec![CAP_MSIX, 0];
        msix.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix.extend_from_slice(&(MSIX_TABLE as u32 | u32::from(BAR)).to_le_bytes());
        msix.extend_from_slice(&(MSIX_PBA as u32 | u32::from(BAR)).to_le_bytes());
        // Enable and function mask are the driver's.
        let msix_cap = config.add_capability(&msix, &[0, 0, 0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0])?;
        let notify_len = queues as u64 * u64::from(NOTIFY_MULTIPLIER);
        for cap in [
            virtio_cap(CFG_COMMON, COMMON, COMMON_LEN, &[]),
            virtio_cap(
                CFG_NOTIFY,
                NOTIFY,
                notify_len.max(u64::from(NOTIFY_MULTIPLIER)),
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            virtio_cap(CFG_ISR, ISR, 1, &[]),
            virtio_cap(CFG_DEVICE, DEVICE, DEVICE_LEN, &[]),
        ] {
            config.add_capability(&cap, &vec![0; cap.len()])?;
        }
        let cfg = virtio_cap(CFG_PCI, 0, 0, &[0; 4]);
        // bar, offset, length and the data window are the driver's.
        let mut writable = vec![0u8; cfg.len()];
        writable[4] = 0xff;
        writable[8..20].fill(0xff);
        let cfg_cap = config.add_capability(&cfg, &writable)?;
        Ok((msix_cap, cfg_cap))
    }

    /// The interrupt the device raises.
    pub fn interrupt(&self) -> Arc<dyn VirtioInterrupt> {
        self.device_interrupt.clone()
    }

    /// Number of MSI-X vectors (one per queue and one for configuration changes).
    pub fn msix_vectors(&self) -> u16 {
        self.interrupt.msix().vectors()
    }

    /// Where BAR 0 is now (as the guest last programmed it).
    pub fn bar_address(&self) -> u64 {
        self.config.bar_address(usize::from(BAR)).unwrap_or(0)
    }

    /// Driver reset: device, registers and interrupt state; then every queue's eventfd
    /// is signalled for the device's event-loop side.
    fn reset(&mut self) {
        self.common.reset();
        self.interrupt.reset();
        self.common.wake_queues();
    }

    fn selected_vector(&self) -> u16 {
        self.interrupt
            .queue_vector(self.common.queue_select as usize)
    }

    /// A read of common configuration field `off` of width `len` (64-bit fields also as
    /// two dwords); None for accesses that match no field.
    fn common_read(&self, off: u64, len: usize) -> Option<u64> {
        let c = &self.common;
        let q = c.selected();
        let half = |v: u64, high: bool| if high { v >> 32 } else { v & 0xffff_ffff };
        Some(match (off, len) {
            (0x00, 4) => u64::from(c.device_features_select),
            (0x04, 4) => u64::from(c.device_features_word()),
            (0x08, 4) => u64::from(c.driver_features_select),
            (0x0c, 4) => u64::from(c.driver_features_word()),
            (0x10, 2) => u64::from(self.interrupt.config_vector.load(Ordering::SeqCst)),
            (0x12, 2) => c.queue_count() as u64,
            (0x14, 1) => u64::from(c.status_register(self.interrupt.as_ref()) as u8),
            (0x15, 1) => u64::from(c.config_generation() as u8),
            (0x16, 2) => u64::from(c.queue_select as u16),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size as u16)),
            (0x1a, 2) => u64::from(self.selected_vector()),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.ready)),
            (0x1e, 2) => q.map_or(0, |_| u64::from(c.queue_select as u16)),
            (0x20 | 0x28 | 0x30, 8) => q.map_or(0, |q| queue_address(q, off)),
            (0x20..=0x37, 4) if off.is_multiple_of(4) => {
                q.map_or(0, |q| half(queue_address(q, off & !7), off % 8 == 4))
            }
            _ => return None,
        })
    }

    fn common_write(&mut self, off: u64, len: usize, v: u64) {
        let irq = self.interrupt.clone();
        let c = &mut self.common;
        match (off, len) {
            (0x00, 4) => c.device_features_select = v as u32,
            (0x08, 4) => c.driver_features_select = v as u32,
            (0x0c, 4) => c.set_driver_features_word(v as u32),
            (0x10, 2) => irq
                .config_vector
                .store(irq.valid_vector(v as u16), Ordering::SeqCst),
            (0x14, 1) if v == 0 => self.reset(),
            (0x14, 1) => c.set_status(v as u32, &self.device_interrupt),
            (0x16, 2) => c.queue_select = v as u32,
            (0x18, 2) => {
                if let Some(q) = c.selected_for_write() {
                    q.size = v as u32;
                }
            }
            (0x1a, 2) => {
                if let Some(slot) = irq.queue_vectors.get(c.queue_select as usize) {
                    slot.store(irq.valid_vector(v as u16), Ordering::SeqCst);
                }
            }
            // Only 1 may be written (virtio 1.x 4.1.4.3.2).
            (0x1c, 2) if v == 1 => {
                if let Some(q) = c.selected_for_write() {
                    q.ready = true;
                }
            }
            (0x20 | 0x28 | 0x30, 8) => {
                if let Some(q) = c.selected_for_write() {
                    *queue_address_mut(q, off) = v;
                }
            }
            (0x20..=0x37, 4) if off.is_multiple_of(4) => {
                if let Some(q) = c.selected_for_write() {
                    QueueConfig::set_half(queue_address_mut(q, off & !7), v as u32, off % 8 == 4);
                }
            }
            _ => log::debug!("virtio-pci: common config write {v:#x} at {off:#x} ignored"),
        }
    }

    /// After a configuration write: the MSI-X control bits and the configuration access
    /// window act on what was written.
    fn config_written(&mut self, offset: usize, len: usize) {
        let touches = |at: usize, n: usize| offset < at + n && at < offset + len;
        if touches(self.msix_cap + 2, 2) {
            let control = self.config.get(self.msix_cap + 2, 2) as u16;
            self.interrupt
                .msix()
                .set_control(control & CONTROL_ENABLE != 0, control & CONTROL_MASK != 0);
        }
        if touches(self.cfg_cap + 16, 4) {
            if let Some((off, n)) = self.cfg_window() {
                let data = self.config.get(self.cfg_cap + 16, n).to_le_bytes();
                self.bar_write(BAR, off, &data[..n]);
            }
        }
    }

    /// The BAR offset and width the configuration access capability selects, when valid:
    /// BAR 0, a 1, 2 or 4 byte access, aligned, inside the BAR.
    fn cfg_window(&self) -> Option<(u64, usize)> {
        let c = self.cfg_cap;
        let bar = self.config.get(c + 4, 1) as u8;
        let off = self.config.get(c + 8, 4);
        let len = self.config.get(c + 12, 4) as usize;
        let ok = bar == BAR
            && matches!(len, 1 | 2 | 4)
            && off.is_multiple_of(len as u64)
            && off + len as u64 <= BAR_SIZE;
        ok.then_some((off, len))
    }
}

fn queue_address(q: &QueueConfig, off: u64) -> u64 {
    match off {
        0x20 => q.desc_table,
        0x28 => q.avail_ring,
        _ => q.used_ring,
    }
}

fn queue_address_mut(q: &mut QueueConfig, off: u64) -> &mut u64 {
    match off {
        0x20 => &mut q.desc_table,
        0x28 => &mut q.avail_ring,
        _ => &mut q.used_ring,
    }
}

/// `data` as a little-endian value (up to 8 bytes).
fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0, |v, (i, b)| v | u64::from(*b) << (8 * i))
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        let offset = usize::from(offset);
        let at = self.cfg_cap + 16;
        if offset < at + 4 && at < offset + data.len() {
            if let Some((off, n)) = self.cfg_window() {
                let mut buf = [0u8; 4];
                self.bar_read(BAR, off, &mut buf[..n]);
                self.config.set_bytes(at, &buf[..n]);
            }
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        let offset = usize::from(offset);
        self.config.write(offset, data);
        self.config_written(offset, data.len());
    }

    fn bar_regions(&self) -> [Option<BarRegion>; BAR_COUNT] {
        self.config.bar_regions()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != BAR {
            return;
        }
        let len = data.len();
        let end = offset.saturating_add(len as u64);
        let inside = |start: u64, n: u64| offset >= start && end <= start + n;
        if inside(COMMON, COMMON_LEN) {
            if let Some(v) = self.common_read(offset - COMMON, len) {
                data.copy_from_slice(&v.to_le_bytes()[..len]);
            }
        } else if inside(ISR, ISR_LEN) {
            if offset == ISR {
                data[0] = self.interrupt.status.take() as u8;
            }
        } else if inside(DEVICE, DEVICE_LEN) {
            self.common.device().read_config(offset - DEVICE, data);
        } else if inside(MSIX_TABLE, self.interrupt.msix().table_len()) {
            self.interrupt.msix().read_table(offset - MSIX_TABLE, data);
        } else if inside(MSIX_PBA, self.interrupt.msix().pba_len()) {
            self.interrupt.msix().read_pba(offset - MSIX_PBA, data);
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != BAR {
            return;
        }
        let len = data.len();
        let end = offset.saturating_add(len as u64);
        let inside = |start: u64, n: u64| offset >= start && end <= start + n;
        if inside(COMMON, COMMON_LEN) {
            self.common_write(offset - COMMON, len, le_value(data));
        } else if inside(DEVICE, DEVICE_LEN) {
            self.common.device().write_config(offset - DEVICE, data);
        } else if inside(NOTIFY, NOTIFY_LEN) {
            // Reached only without an ioeventfd match: signal the same eventfd.
            let rel = offset - NOTIFY;
            if rel.is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) {
                self.common
                    .notify((rel / u64::from(NOTIFY_MULTIPLIER)) as u32);
            }
        } else if inside(MSIX_TABLE, self.interrupt.msix().table_len()) {
            self.interrupt.msix().write_table(offset - MSIX_TABLE, data);
        }
    }
}

impl VirtioTransport for VirtioPciDevice {
    /// One address per queue in BAR 0; any write there is a notification.
    fn queue_notifies(&self) -> Vec<QueueNotify> {
        (0..self.common.queue_count())
            .map(|q| QueueNotify {
                region: BAR,
                offset: NOTIFY + q as u64 * u64::from(NOTIFY_MULTIPLIER),
                queue: q as u16,
                datamatch: None,
            })
            .collect()
    }
}

/// The function's registers, MSI-X table, interrupt state, the driver's queue setup and,
/// for a running device, where each queue is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// Configuration space.
    pub config: PciConfigState,
    /// The registers every virtio transport has, and the queues.
    pub common: CommonState,
    /// ISR bits.
    pub isr: u32,
    /// The device asked for a reset.
    pub needs_reset: bool,
    /// config_msix_vector.
    pub config_vector: u16,
    /// Each queue's queue_msix_vector.
    pub queue_vectors: Vec<u16>,
    /// The MSI-X table and pending bits.
    pub msix: MsixState,
}

impl Persist for VirtioPciDevice {
    type State = VirtioPciState;

    fn save(&self) -> VirtioPciState {
        let irq = &self.interrupt;
        VirtioPciState {
            config: self.config.save(),
            common: self.common.save(),
            isr: irq.status.get(),
            needs_reset: irq.status.needs_reset(),
            config_vector: irq.config_vector.load(Ordering::SeqCst),
            queue_vectors: (0..irq.queue_vectors.len())
                .map(|q| irq.queue_vector(q))
                .collect(),
            msix: irq.msix().save(),
        }
    }

    /// Checks everything before touching the device; then MSI-X (routes come back up),
    /// the interrupt state and the queues (a running device runs again where it was).
    fn restore(&mut self, st: &VirtioPciState) -> Result<(), StateError> {
        let err = |m: &str| StateError::new("virtio-pci", m);
        let irq = self.interrupt.clone();
        let vectors = irq.msix().vectors();
        let valid = |v: u16| v == NO_VECTOR || v < vectors;
        if st.queue_vectors.len() != irq.queue_vectors.len() {
            return Err(err("the saved vectors are not this device's queues"));
        }
        if !valid(st.config_vector) || !st.queue_vectors.iter().all(|v| valid(*v)) {
            return Err(err("a saved vector is not in the MSI-X table"));
        }
        self.config.restore(&st.config)?;
        // MSI-X is on and masked as the restored capability says.
        let control = self.config.get(self.msix_cap + 2, 2) as u16;
        let msix = MsixState {
            enabled: control & CONTROL_ENABLE != 0,
            masked: control & CONTROL_MASK != 0,
            ..st.msix.clone()
        };
        irq.msix().restore(&msix)?;
        irq.config_vector.store(st.config_vector, Ordering::SeqCst);
        for (slot, v) in irq.queue_vectors.iter().zip(&st.queue_vectors) {
            slot.store(*v, Ordering::SeqCst);
        }
        irq.status.restore(st.isr, st.needs_reset);
        self.common.restore(&st.common, &self.device_interrupt)
    }
}

#[cfg(test)]
mod tests;
