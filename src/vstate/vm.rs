//! The VM-wide state: the in-kernel PICs, IOAPIC and PIT, and the kvmclock.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use zerocopy::IntoBytes;

use super::codec::exact;
use super::{vm_err, StateError};

/// One in-kernel interrupt controller's state (`KVM_GET_IRQCHIP`).
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Irqchip(#[serde(with = "exact")] pub kvm_irqchip);

impl PartialEq for Irqchip {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl fmt::Debug for Irqchip {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let bytes = self.0.as_bytes();
        write!(f, "Irqchip {{ chip_id: {}, bytes: ", self.0.chip_id)?;
        for b in &bytes[8..] {
            write!(f, "{b:02x}")?;
        }
        write!(f, " }}")
    }
}

/// Everything KVM holds for a VM besides its vCPUs and memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259 PIC.
    pub pic_master: Irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: Irqchip,
    /// The IOAPIC.
    pub ioapic: Irqchip,
    /// The 8254 PIT.
    #[serde(with = "exact")]
    pub pit: kvm_pit_state2,
    /// kvmclock, with the host's wall-clock time it was read at (`realtime`, flag
    /// `KVM_CLOCK_REALTIME`) so a restore can advance it by the time the VM was away.
    #[serde(with = "exact")]
    pub clock: kvm_clock_data,
}

const CHIPS: [(&str, u32); 3] = [
    ("PIC master", KVM_IRQCHIP_PIC_MASTER),
    ("PIC slave", KVM_IRQCHIP_PIC_SLAVE),
    ("IOAPIC", KVM_IRQCHIP_IOAPIC),
];

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Saves the VM's interrupt controllers, PIT and clock. Every vCPU must be out of
/// `KVM_RUN`.
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    let mut chips = [Irqchip(kvm_irqchip::default()); 3];
    for (chip, (_, chip_id)) in chips.iter_mut().zip(CHIPS) {
        chip.0.chip_id = chip_id;
        vm.get_irqchip(&mut chip.0)
            .map_err(vm_err("KVM_GET_IRQCHIP"))?;
    }
    let pit = vm.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?;
    let mut clock = vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?;
    // KVM before 5.16 (or on a host whose clocksource is not the TSC) gives no wall-clock
    // time with the clock: take ours, a few microseconds later.
    if clock.flags & KVM_CLOCK_REALTIME == 0 {
        clock.realtime = now_ns();
        clock.flags |= KVM_CLOCK_REALTIME;
    }
    let [pic_master, pic_slave, ioapic] = chips;
    Ok(VmState {
        pic_master,
        pic_slave,
        ioapic,
        pit,
        clock,
    })
}

/// Sets kvmclock so the guest's clock goes on from the saved value plus the wall-clock time
/// since it was saved (never backwards). KVM_CLOCK_REALTIME asks KVM to add that time
/// itself; the other flags KVM_GET_CLOCK reports (TSC_STABLE, HOST_TSC) mean nothing to
/// KVM_SET_CLOCK, and a KVM before 5.16 refuses any flag, so there the time is added here.
fn restore_clock(vm: &VmFd, saved: &kvm_clock_data) -> Result<(), StateError> {
    let mut clock = kvm_clock_data {
        clock: saved.clock,
        flags: saved.flags & KVM_CLOCK_REALTIME,
        realtime: saved.realtime,
        ..Default::default()
    };
    match vm.set_clock(&clock) {
        Err(e) if e.errno() == libc::EINVAL && clock.flags != 0 => {
            clock.clock = clock
                .clock
                .saturating_add(now_ns().saturating_sub(clock.realtime));
            clock.flags = 0;
            clock.realtime = 0;
            vm.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))
        }
        r => r.map_err(vm_err("KVM_SET_CLOCK")),
    }
}

/// Restores the VM's interrupt controllers, PIT and clock into a VM created with the same
/// in-kernel irqchip and PIT, before its vCPUs are restored and run.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), StateError> {
    let chips = [&state.pic_master, &state.pic_slave, &state.ioapic];
    for (chip, (slot, expected)) in chips.into_iter().zip(CHIPS) {
        if chip.0.chip_id != expected {
            return Err(StateError::WrongIrqchip {
                slot,
                found: chip.0.chip_id,
                expected,
            });
        }
    }
    for chip in chips {
        vm.set_irqchip(&chip.0).map_err(vm_err("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&state.pit).map_err(vm_err("KVM_SET_PIT2"))?;
    restore_clock(vm, &state.clock)
}
