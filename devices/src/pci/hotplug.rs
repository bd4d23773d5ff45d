//! The ACPI PCI hotplug controller: the registers the DSDT's `\_SB.PCI0.PCNT` and the
//! slots' `_EJ0` methods reach on I/O ports.
//!
//! Three 32-bit registers, bit n standing for slot n of the root bus:
//!
//! | offset | name | guest access |
//! | --- | --- | --- |
//! | 0 | `PCIU` | read: slots the VMM filled since the last read (reading clears them) |
//! | 4 | `PCID` | read: slots the VMM asks the guest to eject (set until ejected) |
//! | 8 | `PCEJ` | write: the guest released these slots (from `_EJ0`) |
//!
//! The VMM fills a slot ([`PciHotplug::plug`]) or asks for one back
//! ([`PciHotplug::request_unplug`]) and raises the hotplug GPE; the guest's `PCNT` reads
//! `PCIU`/`PCID` and notifies each slot (1: device check, 3: eject request). The guest may
//! also eject a slot nobody asked back (Linux: `echo 0 > /sys/bus/pci/slots/N/power`), as
//! under QEMU, whose ACPI hotplug ejects whatever sits in the slot: the VMM removes the
//! device and a slot without one ignores it. Ejects wait in [`PciHotplug::take_ejected`]
//! and the `wake` trigger tells the VMM to collect them (it removes the device on its own
//! thread, not the vCPU's).
//!
//! Any width at any offset works byte by byte; bytes outside the registers read as zero and
//! ignore writes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::persist::{Persist, StateError};
use crate::Interrupt;

use super::SLOTS;

/// Offset of `PCIU`.
pub const PCIU: u64 = 0;
/// Offset of `PCID`.
pub const PCID: u64 = 4;
/// Offset of `PCEJ`.
pub const PCEJ: u64 = 8;
/// Bytes of the register block.
pub const LEN: u64 = 12;

/// Slot bits that may be set: 1 to 31 (slot 0 is the host bridge).
const SLOT_MASK: u32 = !1;

/// Errors of the VMM's requests.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HotplugError {
    /// Not a hotpluggable slot of the root bus.
    #[error("slot {0} is not a hotplug slot (1 to 31)")]
    BadSlot(u8),
}

/// The controller.
pub struct PciHotplug {
    up: u32,
    down: u32,
    ejected: u32,
    wake: Arc<dyn Interrupt>,
}

fn bit(slot: u8) -> Result<u32, HotplugError> {
    if slot == 0 || slot >= SLOTS {
        return Err(HotplugError::BadSlot(slot));
    }
    Ok(1 << slot)
}

impl PciHotplug {
    /// A controller with nothing pending; `wake` fires when the guest ejects a slot.
    pub fn new(wake: Arc<dyn Interrupt>) -> Self {
        PciHotplug {
            up: 0,
            down: 0,
            ejected: 0,
            wake,
        }
    }

    /// A device went into `slot`: the guest's next scan sends it a device check.
    pub fn plug(&mut self, slot: u8) -> Result<(), HotplugError> {
        let b = bit(slot)?;
        self.up |= b;
        self.down &= !b;
        self.ejected &= !b;
        Ok(())
    }

    /// Asks the guest to give `slot` back: its next scan sends an eject request.
    pub fn request_unplug(&mut self, slot: u8) -> Result<(), HotplugError> {
        let b = bit(slot)?;
        self.down |= b;
        self.up &= !b;
        Ok(())
    }

    /// Whether an unplug of `slot` waits for the guest.
    pub fn unplug_pending(&self, slot: u8) -> bool {
        bit(slot).is_ok_and(|b| self.down & b != 0)
    }

    /// The slots the guest ejected since the last call: asked back or not, occupied or not
    /// (the VMM knows which slots hold a device).
    pub fn take_ejected(&mut self) -> u32 {
        std::mem::take(&mut self.ejected)
    }

    fn eject(&mut self, slots: u32) {
        if slots & !self.down != 0 {
            // Guest-chosen values: not worth more than a debug line each.
            log::debug!(
                "PCI hotplug: the guest ejects slots {:#x} nobody asked back",
                slots & !self.down
            );
        }
        let fresh = slots & !self.ejected;
        self.down &= !slots;
        self.up &= !slots;
        self.ejected |= slots;
        if fresh == 0 {
            // Already waiting to be collected: one wake is enough.
            return;
        }
        if let Err(e) = self.wake.trigger() {
            log::error!("PCI hotplug: cannot tell the VMM of an eject: {e}");
        }
    }
}

impl BusDevice for PciHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            let off = offset.saturating_add(i as u64);
            let shift = 8 * (off % 4);
            *out = match off / 4 {
                0 => {
                    let b = (self.up >> shift) as u8;
                    self.up &= !(0xff << shift); // read clears what was read
                    b
                }
                1 => (self.down >> shift) as u8,
                _ => 0,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut slots = 0u32;
        for (i, b) in data.iter().enumerate() {
            let off = offset.saturating_add(i as u64);
            if off / 4 == PCEJ / 4 {
                slots |= u32::from(*b) << (8 * (off % 4));
            }
        }
        if slots != 0 {
            self.eject(slots & SLOT_MASK);
        }
    }
}

/// What the controller holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciHotplugState {
    /// `PCIU`.
    pub up: u32,
    /// `PCID`.
    pub down: u32,
    /// Slots the guest ejected that the VMM had not taken off yet.
    #[serde(default)]
    pub ejected: u32,
}

impl Persist for PciHotplug {
    type State = PciHotplugState;

    fn save(&self) -> PciHotplugState {
        PciHotplugState {
            up: self.up,
            down: self.down,
            ejected: self.ejected,
        }
    }

    fn restore(&mut self, s: &PciHotplugState) -> Result<(), StateError> {
        self.up = s.up & SLOT_MASK;
        self.down = s.down & SLOT_MASK;
        self.ejected = s.ejected & SLOT_MASK;
        if self.ejected != 0 {
            // The VMM collects them when woken, as after a guest's write.
            if let Err(e) = self.wake.trigger() {
                log::error!("PCI hotplug: cannot tell the VMM of restored ejects: {e}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::CountingInterrupt;

    fn dev() -> (PciHotplug, Arc<CountingInterrupt>) {
        let wake = Arc::new(CountingInterrupt::default());
        (PciHotplug::new(wake.clone()), wake)
    }

    fn read32(d: &mut PciHotplug, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn a_plugged_slot_shows_in_pciu_once() {
        let (mut d, _) = dev();
        d.plug(3).unwrap();
        assert_eq!(read32(&mut d, PCIU), 1 << 3);
        assert_eq!(read32(&mut d, PCIU), 0, "reading clears it");
    }

    #[test]
    fn an_unplug_request_shows_in_pcid_until_the_guest_ejects() {
        let (mut d, wake) = dev();
        d.request_unplug(5).unwrap();
        assert_eq!(read32(&mut d, PCID), 1 << 5);
        assert_eq!(read32(&mut d, PCID), 1 << 5, "reading does not clear it");
        assert!(d.unplug_pending(5));
        d.write(PCEJ, &(1u32 << 5).to_le_bytes());
        assert_eq!(read32(&mut d, PCID), 0);
        assert_eq!(d.take_ejected(), 1 << 5);
        assert_eq!(d.take_ejected(), 0);
        assert_eq!(wake.count(), 1);
    }

    #[test]
    fn the_guest_may_eject_slots_nobody_asked_back_but_never_the_host_bridge() {
        let (mut d, wake) = dev();
        d.plug(2).unwrap();
        d.request_unplug(4).unwrap();
        // A plugged slot, an empty one, the host bridge: all go to the VMM but slot 0.
        for v in [1u32 << 2, 1 << 9, 1] {
            d.write(PCEJ, &v.to_le_bytes());
        }
        assert_eq!(wake.count(), 2, "one wake per eject the VMM must collect");
        assert_eq!(read32(&mut d, PCIU), 0, "an ejected slot is no longer news");
        assert!(d.unplug_pending(4), "slot 4 was not ejected");
        assert_eq!(d.take_ejected(), (1 << 2) | (1 << 9));
        // Ejects the VMM has not collected yet wake it once.
        d.write(PCEJ, &u32::MAX.to_le_bytes());
        d.write(PCEJ, &u32::MAX.to_le_bytes());
        assert_eq!(wake.count(), 3);
        assert!(!d.unplug_pending(4));
        assert_eq!(d.take_ejected(), SLOT_MASK);
    }

    #[test]
    fn byte_and_word_accesses_at_odd_offsets_reach_the_right_bits() {
        let (mut d, _) = dev();
        d.request_unplug(17).unwrap();
        d.plug(9).unwrap();
        let mut b = [0u8; 1];
        d.read(PCID + 2, &mut b);
        assert_eq!(b[0], 1 << 1, "slot 17 is bit 1 of byte 2");
        d.read(PCIU + 1, &mut b);
        assert_eq!(b[0], 1 << 1, "slot 9 is bit 1 of byte 1");
        d.write(PCEJ + 2, &[1 << 1]);
        assert_eq!(d.take_ejected(), 1 << 17);
        // A 2-byte access straddling PCID and PCEJ; an 8-byte one; far past the end.
        d.request_unplug(31).unwrap();
        let mut two = [0u8; 2];
        d.read(PCID + 3, &mut two);
        assert_eq!(two, [0x80, 0]);
        d.write(PCID + 3, &[0xff, 0x00]);
        assert!(d.unplug_pending(31), "writes to PCID do nothing");
        let mut eight = [0xffu8; 8];
        d.read(PCID, &mut eight);
        assert_eq!(eight, [0, 0, 0, 0x80, 0, 0, 0, 0]);
        d.write(PCEJ + 1, &[0xff; 8]);
        assert_eq!(
            d.take_ejected(),
            0xffff_ff00,
            "bytes 1-3 of PCEJ reached, the rest past it"
        );
        d.write(u64::MAX, &[0xff; 8]);
        d.read(u64::MAX - 2, &mut eight);
        assert_eq!(eight, [0; 8]);
    }

    #[test]
    fn a_partial_read_of_pciu_clears_only_the_bytes_read() {
        let (mut d, _) = dev();
        d.plug(1).unwrap();
        d.plug(12).unwrap();
        let mut b = [0u8; 1];
        d.read(PCIU, &mut b);
        assert_eq!(read32(&mut d, PCIU), 1 << 12);
    }

    #[test]
    fn bad_slots_are_refused() {
        let (mut d, _) = dev();
        for s in [0, 32, 255] {
            assert_eq!(d.plug(s), Err(HotplugError::BadSlot(s)));
            assert_eq!(d.request_unplug(s), Err(HotplugError::BadSlot(s)));
            assert!(!d.unplug_pending(s));
        }
    }

    #[test]
    fn plugging_again_cancels_a_pending_unplug() {
        let (mut d, _) = dev();
        d.request_unplug(6).unwrap();
        d.plug(6).unwrap();
        assert!(!d.unplug_pending(6));
        assert_eq!(
            read32(&mut d, PCID),
            0,
            "no eject request for slot 6 any more"
        );
        assert_eq!(read32(&mut d, PCIU), 1 << 6, "but a device check");
    }

    #[test]
    fn state_round_trips_and_drops_the_host_bridge_bit() {
        let (mut a, _) = dev();
        a.plug(2).unwrap();
        a.request_unplug(3).unwrap();
        a.write(PCEJ, &(1u32 << 7).to_le_bytes());
        let (mut b, wake) = dev();
        crate::persist::assert_round_trip(&a, &mut b);
        // An eject the VMM had not collected when the state was taken is collected after.
        assert_eq!(wake.count(), 1);
        assert_eq!(b.take_ejected(), 1 << 7);
        let bridge = PciHotplugState {
            up: 1,
            down: 1,
            ejected: 1,
        };
        b.restore(&bridge).unwrap();
        assert_eq!((read32(&mut b, PCIU), read32(&mut b, PCID)), (0, 0));
        assert_eq!(b.take_ejected(), 0);
    }

    #[test]
    fn an_old_state_without_ejects_reads_as_none() {
        let s: PciHotplugState = serde_json::from_str(r#"{"up": 4, "down": 8}"#).unwrap();
        assert_eq!(s.ejected, 0);
    }
}
