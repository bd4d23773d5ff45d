//! The CPU hotplug controller the DSDT's processor devices read (`\_SB.CPUS`): which of the
//! VM's possible CPUs are present, which were just inserted or are asked to leave, and the
//! eject the guest's `_EJ0` writes once it has taken a CPU offline.
//!
//! Four I/O ports, one byte each (wider accesses act byte by byte):
//!
//! | offset | read | write |
//! | --- | --- | --- |
//! | 0 `SEL` | the selected CPU | selects a CPU (any value; one beyond the VM's CPUs reads as absent) |
//! | 1 `STATUS` | the selected CPU: bit 0 present, bit 1 inserting, bit 2 removing | ignored |
//! | 2 `COMMAND` | 0 | 1: inserting seen, 2: removing seen, 3: eject |
//! | 3 | 0 | ignored |
//!
//! The host inserts a CPU ([`CpuHotplug::insert`]: present and inserting) or asks for its
//! removal ([`CpuHotplug::request_remove`]: removing) and raises the CPU hotplug GPE; the
//! guest's GPE handler walks the CPUs, notifies those inserting (device check) or removing
//! (eject request) and clears the flags. An eject is honoured only for a CPU the host asked to
//! remove: it becomes absent and lands in a list the VMM takes ([`CpuHotplug::take_ejected`],
//! after `signal` fires) to park its vCPU. A guest cannot remove a CPU nobody asked for.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::persist::{Persist, StateError};
use crate::Interrupt;

/// Ports the controller spans.
pub const CPU_HOTPLUG_LEN: u16 = 4;
/// Register: CPU selector.
pub const REG_SELECT: u64 = 0;
/// Register: status of the selected CPU.
pub const REG_STATUS: u64 = 1;
/// Register: command for the selected CPU.
pub const REG_COMMAND: u64 = 2;
/// Status bit: the CPU is present (its `_STA` says so, its `_MAT` entry is enabled).
pub const STATUS_PRESENT: u8 = 1 << 0;
/// Status bit: the CPU was inserted and the guest has not been told yet.
pub const STATUS_INSERTING: u8 = 1 << 1;
/// Status bit: the host asks for the CPU's removal and the guest has not been told yet.
pub const STATUS_REMOVING: u8 = 1 << 2;
/// Command: the guest saw the insertion.
pub const CMD_CLEAR_INSERTING: u8 = 1;
/// Command: the guest saw the removal request.
pub const CMD_CLEAR_REMOVING: u8 = 2;
/// Command: eject the selected CPU (the guest took it offline).
pub const CMD_EJECT: u8 = 3;

/// A request the controller refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuHotplugError {
    /// No such possible CPU.
    #[error("CPU {cpu} is beyond the VM's {max} possible CPUs")]
    NoSuchCpu {
        /// The CPU.
        cpu: u8,
        /// How many the VM may have.
        max: u8,
    },
    /// Inserting a present CPU.
    #[error("CPU {0} is present already")]
    Present(u8),
    /// Removing an absent CPU.
    #[error("CPU {0} is not present")]
    Absent(u8),
}

/// One possible CPU's flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuSlot {
    /// Present (a vCPU exists for it).
    pub present: bool,
    /// Inserted, the guest not told yet.
    pub inserting: bool,
    /// Removal asked, the guest not told yet.
    pub removing: bool,
    /// Removal asked and not yet done: the guest may eject it.
    pub remove_requested: bool,
}

/// The controller.
pub struct CpuHotplug {
    slots: Vec<CpuSlot>,
    selected: u8,
    ejected: Vec<u8>,
    signal: Option<Arc<dyn Interrupt>>,
}

impl CpuHotplug {
    /// `max` possible CPUs, the first `present` of them present, and no eject signal.
    pub fn new(max: u8, present: u8) -> Self {
        let slots = (0..max)
            .map(|i| CpuSlot {
                present: i < present,
                ..Default::default()
            })
            .collect();
        CpuHotplug {
            slots,
            selected: 0,
            ejected: Vec::new(),
            signal: None,
        }
    }

    /// Like [`CpuHotplug::new`], triggering `signal` on every eject.
    pub fn with_signal(max: u8, present: u8, signal: Arc<dyn Interrupt>) -> Self {
        CpuHotplug {
            signal: Some(signal),
            ..Self::new(max, present)
        }
    }

    /// How many CPUs the VM may have.
    pub fn max(&self) -> u8 {
        self.slots.len() as u8
    }

    fn slot(&mut self, cpu: u8) -> Result<&mut CpuSlot, CpuHotplugError> {
        let max = self.max();
        self.slots
            .get_mut(usize::from(cpu))
            .ok_or(CpuHotplugError::NoSuchCpu { cpu, max })
    }

    /// The present CPUs, ascending.
    pub fn present(&self) -> Vec<u8> {
        (0..self.max())
            .filter(|&i| self.slots[usize::from(i)].present)
            .collect()
    }

    /// The present CPUs not asked to leave, ascending.
    pub fn active(&self) -> Vec<u8> {
        (0..self.max())
            .filter(|&i| {
                let s = self.slots[usize::from(i)];
                s.present && !s.remove_requested
            })
            .collect()
    }

    /// Makes `cpu` present and flags it for the guest (then raise the GPE).
    pub fn insert(&mut self, cpu: u8) -> Result<(), CpuHotplugError> {
        let s = self.slot(cpu)?;
        if s.present {
            return Err(CpuHotplugError::Present(cpu));
        }
        *s = CpuSlot {
            present: true,
            inserting: true,
            ..Default::default()
        };
        Ok(())
    }

    /// Asks the guest to give `cpu` up (then raise the GPE).
    pub fn request_remove(&mut self, cpu: u8) -> Result<(), CpuHotplugError> {
        let s = self.slot(cpu)?;
        if !s.present {
            return Err(CpuHotplugError::Absent(cpu));
        }
        s.removing = true;
        s.remove_requested = true;
        Ok(())
    }

    /// Withdraws a removal request the guest has not acted on.
    pub fn cancel_remove(&mut self, cpu: u8) -> Result<(), CpuHotplugError> {
        let s = self.slot(cpu)?;
        if !s.present {
            return Err(CpuHotplugError::Absent(cpu));
        }
        s.removing = false;
        s.remove_requested = false;
        Ok(())
    }

    /// The CPUs the guest ejected since the last call.
    pub fn take_ejected(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.ejected)
    }

    fn status(&self) -> u8 {
        let Some(s) = self.slots.get(usize::from(self.selected)) else {
            return 0;
        };
        [
            (s.present, STATUS_PRESENT),
            (s.inserting, STATUS_INSERTING),
            (s.removing, STATUS_REMOVING),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .fold(0, |acc, (_, bit)| acc | bit)
    }

    fn command(&mut self, cmd: u8) {
        let cpu = self.selected;
        let Some(s) = self.slots.get_mut(usize::from(cpu)) else {
            log::debug!("CPU hotplug: command {cmd} for CPU {cpu}, which the VM cannot have");
            return;
        };
        match cmd {
            CMD_CLEAR_INSERTING => s.inserting = false,
            CMD_CLEAR_REMOVING => s.removing = false,
            CMD_EJECT if s.present && s.remove_requested => {
                *s = CpuSlot::default();
                self.ejected.push(cpu);
                if let Some(sig) = &self.signal {
                    if let Err(e) = sig.trigger() {
                        log::error!("CPU hotplug: cannot signal the eject of CPU {cpu}: {e}");
                    }
                }
            }
            CMD_EJECT => log::warn!("CPU hotplug: the guest ejects CPU {cpu}, not asked to leave"),
            other => log::debug!("CPU hotplug: unknown command {other}"),
        }
    }

    fn read_reg(&self, offset: u64) -> u8 {
        match offset {
            REG_SELECT => self.selected,
            REG_STATUS => self.status(),
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u8) {
        match offset {
            REG_SELECT => self.selected = value,
            REG_COMMAND => self.command(value),
            _ => {}
        }
    }
}

impl BusDevice for CpuHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .map_or(0, |off| self.read_reg(off));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(off) = offset.checked_add(i as u64) {
                self.write_reg(off, *b);
            }
        }
    }
}

/// The controller's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuHotplugState {
    /// The selector.
    pub selected: u8,
    /// Every possible CPU's flags, by index.
    pub cpus: Vec<CpuSlot>,
}

impl CpuHotplugState {
    /// The present CPUs, ascending.
    pub fn present(&self) -> Vec<u8> {
        (0..self.cpus.len())
            .filter(|&i| self.cpus[i].present)
            .map(|i| i as u8)
            .collect()
    }
}

impl Persist for CpuHotplug {
    type State = CpuHotplugState;

    fn save(&self) -> CpuHotplugState {
        CpuHotplugState {
            selected: self.selected,
            cpus: self.slots.clone(),
        }
    }

    fn restore(&mut self, s: &CpuHotplugState) -> Result<(), StateError> {
        if s.cpus.len() != self.slots.len() {
            return Err(StateError::new(
                "cpu-hotplug",
                format!(
                    "{} CPUs saved for {} possible",
                    s.cpus.len(),
                    self.slots.len()
                ),
            ));
        }
        if !s.cpus.first().is_some_and(|c| c.present) {
            return Err(StateError::new("cpu-hotplug", "CPU 0 is not present"));
        }
        if let Some(i) = s.cpus.iter().position(|c| {
            !c.present && (c.inserting || c.removing || c.remove_requested)
                || c.removing && !c.remove_requested
        }) {
            return Err(StateError::new(
                "cpu-hotplug",
                format!("CPU {i}: flags {:?} cannot go together", s.cpus[i]),
            ));
        }
        self.selected = s.selected;
        self.slots = s.cpus.clone();
        self.ejected.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::CountingInterrupt;

    fn status_of(dev: &mut CpuHotplug, cpu: u8) -> u8 {
        dev.write(REG_SELECT, &[cpu]);
        let mut b = [0xffu8];
        dev.read(REG_STATUS, &mut b);
        b[0]
    }

    fn command(dev: &mut CpuHotplug, cpu: u8, cmd: u8) {
        dev.write(REG_SELECT, &[cpu]);
        dev.write(REG_COMMAND, &[cmd]);
    }

    #[test]
    fn boot_cpus_are_present_and_the_rest_absent() {
        let mut dev = CpuHotplug::new(4, 2);
        assert_eq!(status_of(&mut dev, 0), STATUS_PRESENT);
        assert_eq!(status_of(&mut dev, 1), STATUS_PRESENT);
        assert_eq!(status_of(&mut dev, 2), 0);
        assert_eq!(dev.present(), [0, 1]);
    }

    #[test]
    fn insert_flags_the_cpu_until_the_guest_acknowledges() {
        let mut dev = CpuHotplug::new(2, 1);
        dev.insert(1).unwrap();
        assert_eq!(status_of(&mut dev, 1), STATUS_PRESENT | STATUS_INSERTING);
        command(&mut dev, 1, CMD_CLEAR_INSERTING);
        assert_eq!(status_of(&mut dev, 1), STATUS_PRESENT);
        assert_eq!(dev.insert(1), Err(CpuHotplugError::Present(1)));
        assert_eq!(
            dev.insert(2),
            Err(CpuHotplugError::NoSuchCpu { cpu: 2, max: 2 })
        );
    }

    #[test]
    fn eject_after_a_removal_request_makes_the_cpu_absent_and_signals() {
        let sig = Arc::new(CountingInterrupt::default());
        let mut dev = CpuHotplug::with_signal(3, 3, sig.clone());
        dev.request_remove(2).unwrap();
        assert_eq!(status_of(&mut dev, 2), STATUS_PRESENT | STATUS_REMOVING);
        assert_eq!(dev.active(), [0, 1]);
        command(&mut dev, 2, CMD_CLEAR_REMOVING);
        assert_eq!(status_of(&mut dev, 2), STATUS_PRESENT);
        command(&mut dev, 2, CMD_EJECT);
        assert_eq!(status_of(&mut dev, 2), 0);
        assert_eq!(sig.count(), 1);
        assert_eq!(dev.take_ejected(), [2]);
        assert!(dev.take_ejected().is_empty());
        assert_eq!(dev.present(), [0, 1]);
    }

    #[test]
    fn a_guest_cannot_eject_a_cpu_nobody_asked_to_remove() {
        let sig = Arc::new(CountingInterrupt::default());
        let mut dev = CpuHotplug::with_signal(2, 2, sig.clone());
        command(&mut dev, 0, CMD_EJECT);
        command(&mut dev, 1, CMD_EJECT);
        assert_eq!(dev.present(), [0, 1]);
        assert_eq!(sig.count(), 0);
        // A cancelled request cannot be ejected either.
        dev.request_remove(1).unwrap();
        dev.cancel_remove(1).unwrap();
        command(&mut dev, 1, CMD_EJECT);
        assert_eq!(dev.present(), [0, 1]);
    }

    #[test]
    fn hostile_selectors_read_absent_and_change_nothing() {
        let mut dev = CpuHotplug::new(2, 1);
        dev.insert(1).unwrap();
        for sel in [2u8, 31, 128, 255] {
            assert_eq!(status_of(&mut dev, sel), 0);
            for cmd in 0..=255u8 {
                command(&mut dev, sel, cmd);
            }
            let mut b = [0u8];
            dev.read(REG_SELECT, &mut b);
            assert_eq!(b[0], sel, "the selector reads back");
        }
        assert_eq!(dev.present(), [0, 1]);
        assert_eq!(status_of(&mut dev, 1), STATUS_PRESENT | STATUS_INSERTING);
    }

    #[test]
    fn odd_widths_and_offsets_act_byte_by_byte() {
        let mut dev = CpuHotplug::new(2, 2);
        dev.request_remove(1).unwrap();
        // A 2-byte write at offset 0 selects CPU 1 and writes nothing to the status.
        dev.write(REG_SELECT, &[1, 0xff]);
        let mut four = [0xaau8; 4];
        dev.read(0, &mut four);
        assert_eq!(four, [1, STATUS_PRESENT | STATUS_REMOVING, 0, 0]);
        let mut eight = [0xaau8; 8];
        dev.read(0, &mut eight);
        assert_eq!(&eight[4..], &[0; 4], "beyond the ports reads as zero");
        // A 4-byte write from the selector: select 1, command 2 (removing seen).
        dev.write(0, &[1, 0, CMD_CLEAR_REMOVING, 0x77]);
        assert_eq!(status_of(&mut dev, 1), STATUS_PRESENT);
        // Offsets near the top of the address space do not wrap.
        let mut b = [0u8; 4];
        dev.read(u64::MAX - 1, &mut b);
        dev.write(u64::MAX - 1, &[CMD_EJECT; 4]);
        assert_eq!(b, [0; 4]);
        assert_eq!(dev.present(), [0, 1]);
    }

    #[test]
    fn state_round_trips_and_nonsense_is_refused() {
        let mut dev = CpuHotplug::new(4, 2);
        dev.insert(3).unwrap();
        dev.request_remove(1).unwrap();
        dev.write(REG_SELECT, &[3]);
        let mut fresh = CpuHotplug::new(4, 1);
        crate::persist::assert_round_trip(&dev, &mut fresh);
        assert_eq!(fresh.present(), [0, 1, 3]);
        assert_eq!(dev.save().present(), [0, 1, 3]);

        let mut other = CpuHotplug::new(2, 1);
        assert!(other.restore(&dev.save()).is_err(), "CPU count differs");
        let mut s = CpuHotplug::new(4, 1).save();
        s.cpus[0].present = false;
        assert!(fresh.restore(&s).is_err(), "no CPU 0");
        let mut s = CpuHotplug::new(4, 1).save();
        s.cpus[2].inserting = true;
        assert!(fresh.restore(&s).is_err(), "an absent CPU inserting");
        let mut s = CpuHotplug::new(4, 2).save();
        s.cpus[1].removing = true;
        assert!(fresh.restore(&s).is_err(), "removing without a request");
    }
}
