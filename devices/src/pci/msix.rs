//! MSI-X: the vector table and pending-bit array a function exposes in a BAR, and the
//! enable and function-mask bits of its capability. Messages leave through an injected
//! [`MsiSink`] (the VMM: KVM GSI routes and one irqfd per vector), so this knows nothing
//! of KVM. A vector raised while masked sets its pending bit and goes out when unmasked.
//!
//! The guest writes the table: an address outside the x86 interrupt range (0xfeeX_XXXX)
//! is not an interrupt (on hardware it would be a DMA write), so such a vector gets no
//! route and its messages are dropped, with a rate-limited warning.

use serde::{Deserialize, Serialize};

use crate::persist::StateError;
use crate::virtio::RateLimitedLog;

/// Bytes of one table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Most vectors a table may have (the capability's 11-bit field).
pub const MAX_VECTORS: u16 = 2048;
/// Message control: MSI-X enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const CONTROL_MASK: u16 = 1 << 14;
/// Vector control: the vector is masked.
const VECTOR_MASKED: u32 = 1;
/// Where x86 interrupt messages are addressed.
const INTERRUPT_RANGE: std::ops::RangeInclusive<u64> = 0xfee0_0000..=0xfeef_ffff;

/// One MSI message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

impl MsiMessage {
    /// Whether the message is an interrupt (its address in the local APICs' range).
    pub fn is_interrupt(&self) -> bool {
        INTERRUPT_RANGE.contains(&self.address)
    }
}

/// Where a function's MSI-X messages go.
pub trait MsiSink: Send + Sync {
    /// Vector `vector` sends `msg` from now on (None: it has no valid message).
    fn route(&self, vector: u16, msg: Option<MsiMessage>);
    /// Sends vector `vector`'s message (the last one routed).
    fn trigger(&self, vector: u16);
}

/// One table entry as the guest wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    /// Message address (low and high dwords).
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector control.
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        MsixEntry {
            address: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

/// An MSI-X table, its pending bits and the capability's enable and mask bits, as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// The table.
    pub table: Vec<MsixEntry>,
    /// Pending bits, 64 vectors per word.
    pub pending: Vec<u64>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub masked: bool,
}

/// The MSI-X state of one function.
pub struct Msix {
    table: Vec<MsixEntry>,
    pending: Vec<u64>,
    enabled: bool,
    masked: bool,
    /// What each vector was last routed to (None: no route).
    routed: Vec<Option<MsiMessage>>,
    sink: std::sync::Arc<dyn MsiSink>,
    log: RateLimitedLog,
}

impl Msix {
    /// A table of `vectors` entries (1 to [`MAX_VECTORS`]), all masked, MSI-X disabled.
    pub fn new(vectors: u16, sink: std::sync::Arc<dyn MsiSink>) -> Self {
        let n = usize::from(vectors.clamp(1, MAX_VECTORS));
        Msix {
            table: vec![MsixEntry::default(); n],
            pending: vec![0; n.div_ceil(64)],
            enabled: false,
            masked: false,
            routed: vec![None; n],
            sink,
            log: RateLimitedLog::new(),
        }
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Bytes of the table.
    pub fn table_len(&self) -> u64 {
        self.table.len() as u64 * ENTRY_SIZE
    }

    /// Bytes of the pending-bit array.
    pub fn pba_len(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The capability's enable and function-mask bits changed to these.
    pub fn set_control(&mut self, enabled: bool, masked: bool) {
        self.enabled = enabled;
        self.masked = masked;
        for v in 0..self.vectors() {
            self.update(v);
        }
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.masked && self.table[v].control & VECTOR_MASKED == 0
    }

    fn is_pending(&self, v: usize) -> bool {
        self.pending[v / 64] & (1 << (v % 64)) != 0
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        let bit = 1u64 << (v % 64);
        if on {
            self.pending[v / 64] |= bit;
        } else {
            self.pending[v / 64] &= !bit;
        }
    }

    /// After a change to vector `v` or the function's bits: a deliverable vector gets its
    /// route brought up to date and, if it was pending, its message sent.
    fn update(&mut self, v: u16) {
        let i = usize::from(v);
        if !self.deliverable(i) {
            return;
        }
        let e = self.table[i];
        let msg = MsiMessage {
            address: e.address,
            data: e.data,
        };
        let want = msg.is_interrupt().then_some(msg);
        if want.is_none() {
            self.log.warn(format_args!(
                "msi-x: vector {v} has address {:#x}, not an interrupt; it is dropped",
                e.address
            ));
        }
        if self.routed[i] != want {
            self.routed[i] = want;
            self.sink.route(v, want);
        }
        if self.is_pending(i) {
            self.set_pending(i, false);
            if want.is_some() {
                self.sink.trigger(v);
            }
        }
    }

    /// Raises vector `v`: sent now, or marked pending while masked. Returns false when
    /// MSI-X is disabled or the vector does not exist (nothing happens).
    pub fn notify(&mut self, v: u16) -> bool {
        let i = usize::from(v);
        if !self.enabled || i >= self.table.len() {
            return false;
        }
        if self.deliverable(i) {
            if self.routed[i].is_some() {
                self.sink.trigger(v);
            }
        } else {
            self.set_pending(i, true);
        }
        true
    }

    /// A guest read of the table at `offset`: dwords and qwords, naturally aligned; other
    /// accesses read zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((entry, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = &self.table[entry];
        let words = [
            e.address as u32,
            (e.address >> 32) as u32,
            e.data,
            e.control,
        ];
        for (k, chunk) in data.chunks_mut(4).enumerate() {
            chunk.copy_from_slice(&words[field + k].to_le_bytes());
        }
    }

    /// A guest write to the table at `offset`; only the mask bit of vector control is
    /// writable there.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((entry, field)) = self.locate(offset, data.len()) else {
            return;
        };
        for (k, chunk) in data.chunks(4).enumerate() {
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let e = &mut self.table[entry];
            match field + k {
                0 => e.address = (e.address & !0xffff_ffff) | u64::from(v),
                1 => e.address = (e.address & 0xffff_ffff) | u64::from(v) << 32,
                2 => e.data = v,
                _ => e.control = v & VECTOR_MASKED,
            }
        }
        self.update(entry as u16);
    }

    /// Entry and dword index of a 4- or 8-byte aligned access inside the table.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        let entry = usize::try_from(offset / ENTRY_SIZE).ok()?;
        (entry < self.table.len()).then_some((entry, (offset % ENTRY_SIZE) as usize / 4))
    }

    /// A guest read of the pending-bit array (read-only): dwords and qwords.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        let Some(word) = usize::try_from(offset / 8)
            .ok()
            .and_then(|w| self.pending.get(w))
        else {
            return;
        };
        let bytes = word.to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    /// The table and bits, to save.
    pub fn save(&self) -> MsixState {
        MsixState {
            table: self.table.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            masked: self.masked,
        }
    }

    /// Puts back a saved table and routes every deliverable vector again.
    pub fn restore(&mut self, st: &MsixState) -> Result<(), StateError> {
        if st.table.len() != self.table.len() || st.pending.len() != self.pending.len() {
            return Err(StateError::new(
                "msi-x",
                format!(
                    "a {}-vector table for a {}-vector function",
                    st.table.len(),
                    self.table.len()
                ),
            ));
        }
        self.table = st.table.clone();
        for e in &mut self.table {
            e.control &= VECTOR_MASKED;
        }
        self.pending = st.pending.clone();
        let valid_bits = self.table.len() % 64;
        if valid_bits != 0 {
            if let Some(last) = self.pending.last_mut() {
                *last &= (1 << valid_bits) - 1;
            }
        }
        self.routed = vec![None; self.table.len()];
        self.set_control(st.enabled, st.masked);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A sink that records routes and sent vectors.
    #[derive(Default)]
    pub struct RecordingSink {
        pub routes: Mutex<Vec<(u16, Option<MsiMessage>)>>,
        pub sent: Mutex<Vec<u16>>,
    }

    impl RecordingSink {
        pub fn sent(&self) -> Vec<u16> {
            self.sent.lock().unwrap().clone()
        }
        pub fn routes(&self) -> Vec<(u16, Option<MsiMessage>)> {
            self.routes.lock().unwrap().clone()
        }
    }

    impl MsiSink for RecordingSink {
        fn route(&self, vector: u16, msg: Option<MsiMessage>) {
            self.routes.lock().unwrap().push((vector, msg));
        }
        fn trigger(&self, vector: u16) {
            self.sent.lock().unwrap().push(vector);
        }
    }

    fn msix(n: u16) -> (Msix, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        (Msix::new(n, sink.clone()), sink)
    }

    fn program(m: &mut Msix, v: u64, addr: u64, data: u32, masked: bool) {
        let at = v * ENTRY_SIZE;
        m.write_table(at, &addr.to_le_bytes());
        m.write_table(at + 8, &data.to_le_bytes());
        m.write_table(at + 12, &u32::from(masked).to_le_bytes());
    }

    fn pba(m: &Msix) -> u64 {
        let mut b = [0u8; 8];
        m.read_pba(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn entries_start_masked_and_read_back_what_was_written() {
        let (mut m, _) = msix(3);
        let mut b = [0u8; 4];
        m.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        program(&mut m, 1, 0xfee0_1000, 0x4021, false);
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
        m.read_table(24, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x4021);
        m.write_table(28, &0xffff_fffeu32.to_le_bytes());
        m.read_table(28, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0, "only the mask bit is writable");
    }

    #[test]
    fn an_unmasked_vector_is_routed_and_sent() {
        let (mut m, sink) = msix(2);
        m.set_control(true, false);
        program(&mut m, 0, 0xfee0_0000, 0x31, false);
        assert!(m.notify(0));
        assert_eq!(sink.sent(), [0]);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        };
        assert_eq!(sink.routes().last(), Some(&(0, Some(msg))));
    }

    #[test]
    fn a_masked_vector_is_held_pending_until_unmasked() {
        let (mut m, sink) = msix(2);
        m.set_control(true, false);
        program(&mut m, 1, 0xfee0_0000, 0x32, true);
        assert!(m.notify(1));
        assert!(sink.sent().is_empty());
        assert_eq!(pba(&m), 0b10);
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(sink.sent(), [1]);
        assert_eq!(pba(&m), 0);
    }

    #[test]
    fn the_function_mask_holds_every_vector() {
        let (mut m, sink) = msix(2);
        m.set_control(true, true);
        program(&mut m, 0, 0xfee0_0000, 0x31, false);
        m.notify(0);
        assert!(sink.sent().is_empty());
        m.set_control(true, false);
        assert_eq!(sink.sent(), [0]);
    }

    #[test]
    fn nothing_is_sent_while_msix_is_disabled() {
        let (mut m, sink) = msix(2);
        program(&mut m, 0, 0xfee0_0000, 0x31, false);
        assert!(!m.notify(0));
        assert!(!m.notify(7), "no such vector");
        assert!(sink.sent().is_empty());
        assert_eq!(pba(&m), 0);
    }

    #[test]
    fn garbage_addresses_get_no_route_and_send_nothing() {
        let (mut m, sink) = msix(1);
        m.set_control(true, false);
        program(&mut m, 0, 0x1000, 0x31, false); // guest RAM: a DMA write, not an interrupt
        m.notify(0);
        assert!(sink.sent().is_empty());
        assert!(sink.routes().iter().all(|(_, msg)| msg.is_none()));
        program(&mut m, 0, u64::MAX, u32::MAX, false);
        m.notify(0);
        assert!(sink.sent().is_empty());
    }

    #[test]
    fn odd_accesses_to_table_and_pba_are_ignored() {
        let (mut m, _) = msix(2);
        for off in 0..64 {
            for len in [1usize, 2, 3, 4, 8] {
                m.write_table(off, &vec![0xff; len]);
                let mut b = vec![0u8; len];
                m.read_table(off, &mut b);
                m.read_pba(off, &mut b);
            }
        }
        // Unaligned or narrow writes changed nothing; aligned dword/qword ones did.
        let mut b = [0u8; 4];
        m.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
    }

    #[test]
    fn state_round_trips_and_restores_routes() {
        let (mut a, _) = msix(3);
        a.set_control(true, false);
        program(&mut a, 2, 0xfee0_2000, 0x40, false);
        program(&mut a, 1, 0xfee0_0000, 0x41, true);
        a.notify(1);
        let (mut b, sink) = msix(3);
        b.restore(&a.save()).unwrap();
        assert_eq!(b.save(), a.save());
        let msg = MsiMessage {
            address: 0xfee0_2000,
            data: 0x40,
        };
        assert!(sink.routes().contains(&(2, Some(msg))));
        let (mut c, _) = msix(70);
        assert!(c.restore(&a.save()).is_err());
    }
}
