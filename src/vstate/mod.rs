//! The state KVM keeps for a VM and its vCPUs, as serde data, saved and restored in the
//! order KVM needs: the building block of pause/resume, snapshots and migration.
//!
//! Everything here is a free function over a `VmFd` or a `VcpuFd`, so any vCPU thread design
//! can call it: a vCPU's state is read and written while that vCPU is out of `KVM_RUN` (its
//! own thread between runs, or any thread once it is parked), and the VM's state while every
//! vCPU is. The guest memory is not part of this state.
//!
//! Saving, per VM: [`save_vm`]; per vCPU: [`save_vcpu`] with the list of [`msrs_to_save`]
//! (computed once). If the vCPU's last exit was port or MMIO I/O, [`complete_pending_io`]
//! first. Restoring into a new VM of the same shape (irqchip, PIT, memory, vCPUs created):
//! [`restore_vm`], then [`restore_vcpu`] on each vCPU, then run. [`kvmclock_ctrl`] tells a
//! guest that uses kvmclock that it was paused (restore calls it).

mod codec;
mod vcpu;
mod vm;

#[cfg(test)]
mod test_vm;

use kvm_ioctls::VcpuFd;

pub use vcpu::{
    msrs_to_save, restore_vcpu, save_vcpu, FpuRegs, Msr, VcpuState, XsaveArea, MAX_MSRS,
    MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, MSR_KVM_SYSTEM_TIME, MSR_KVM_SYSTEM_TIME_NEW,
    MSR_KVM_WALL_CLOCK, MSR_KVM_WALL_CLOCK_NEW,
};
pub use vm::{restore_vm, save_vm, Irqchip, VmState};

/// Errors saving or restoring VM and vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A vCPU ioctl failed.
    #[error("vCPU {id}: {ioctl} failed")]
    Vcpu {
        /// vCPU index.
        id: u8,
        /// The ioctl.
        ioctl: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A VM or system ioctl failed.
    #[error("{ioctl} failed")]
    Vm {
        /// The ioctl.
        ioctl: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_MSRS refused an MSR of the state: this host or vCPU cannot take it.
    #[error("vCPU {id}: KVM_SET_MSRS refused MSR {index:#x} (value {value:#x})")]
    MsrRefused {
        /// vCPU index.
        id: u8,
        /// The MSR.
        index: u32,
        /// Its saved value.
        value: u64,
    },
    /// The state has more CPUID entries than KVM takes.
    #[error("vCPU {id}: the state has {count} CPUID entries, KVM takes at most {max}")]
    TooManyCpuidEntries {
        /// vCPU index.
        id: u8,
        /// Entries in the state.
        count: usize,
        /// KVM's limit.
        max: usize,
    },
    /// An irqchip of the VM state is not the chip its place says.
    #[error("the state's {slot} holds irqchip {found}, expected {expected}")]
    WrongIrqchip {
        /// Which of the state's irqchips.
        slot: &'static str,
        /// The chip id found.
        found: u32,
        /// The chip id expected there.
        expected: u32,
    },
    /// KVM_RUN with `immediate_exit` set ran the guest instead of returning.
    #[error("vCPU {id}: KVM_RUN meant to complete I/O exited with {exit}")]
    UnexpectedExit {
        /// vCPU index.
        id: u8,
        /// The exit KVM gave.
        exit: String,
    },
}

/// Maps a vCPU ioctl's error into [`StateError::Vcpu`].
fn vcpu_err(id: u8, ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Vcpu { id, ioctl, source }
}

/// Maps a VM or system ioctl's error into [`StateError::Vm`].
fn vm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Vm { ioctl, source }
}

/// `KVM_KVMCLOCK_CTRL`: tells the guest (through its kvmclock page) that the vCPU was
/// paused, so its soft-lockup watchdog does not fire on resume. Call it while the vCPU is
/// out of `KVM_RUN`, before it runs again. A guest that has not enabled kvmclock (KVM
/// answers EINVAL) needs nothing and is fine.
pub fn kvmclock_ctrl(fd: &VcpuFd, id: u8) -> Result<(), StateError> {
    match fd.kvmclock_ctrl() {
        Err(e) if e.errno() == libc::EINVAL => Ok(()),
        r => r.map_err(vcpu_err(id, "KVM_KVMCLOCK_CTRL")),
    }
}

/// Completes the instruction of the vCPU's last exit without running guest code: KVM
/// finishes a port or MMIO access only on the next `KVM_RUN`, and the state read before that
/// is not consistent (KVM's API documentation). Runs with `immediate_exit` set, which
/// returns EINTR once the pending access is done. Harmless when nothing is pending.
pub fn complete_pending_io(fd: &mut VcpuFd, id: u8) -> Result<(), StateError> {
    fd.set_kvm_immediate_exit(1);
    let result = fd.run().map(|exit| format!("{exit:?}"));
    fd.set_kvm_immediate_exit(0);
    match result {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(vcpu_err(id, "KVM_RUN (immediate exit)")(e)),
        Ok(exit) => Err(StateError::UnexpectedExit { id, exit }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use kvm_bindings::{KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER};

    use super::test_vm::{kvm, TestVm, OUT_END, STEP};
    use super::*;
    use zerocopy::IntoBytes;

    /// Runs `t` to its `n`th write, checking each one, and completes the last.
    fn run_writes(t: &mut TestVm, n: u64) {
        for i in 1..=n {
            assert_eq!(u64::from(t.run_to_out()), i * STEP);
        }
        complete_pending_io(&mut t.vcpu, 0).unwrap();
    }

    #[test]
    fn msrs_to_save_keep_the_tsc_deadline_after_the_tsc_and_the_kvmclock_msrs() {
        let kvm = kvm();
        let listed = kvm.get_msr_index_list().unwrap();
        let msrs = msrs_to_save(&kvm).unwrap();
        eprintln!("KVM_GET_MSR_INDEX_LIST: {:x?}", listed.as_slice());
        eprintln!("msrs_to_save ({}): {msrs:x?}", msrs.len());

        for needed in [
            MSR_IA32_TSC,
            MSR_KVM_SYSTEM_TIME,
            MSR_KVM_WALL_CLOCK,
            MSR_KVM_SYSTEM_TIME_NEW,
            MSR_KVM_WALL_CLOCK_NEW,
        ] {
            assert!(msrs.contains(&needed), "{needed:#x} missing");
        }
        let at = |index| msrs.iter().position(|&i| i == index);
        if let Some(deadline) = at(MSR_IA32_TSC_DEADLINE) {
            assert!(deadline > at(MSR_IA32_TSC).unwrap());
        }
        let mut unique = msrs.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), msrs.len());
    }

    #[test]
    fn restored_vcpu_counts_on_from_where_the_saved_one_stopped() {
        let kvm = kvm();
        let msrs = msrs_to_save(&kvm).unwrap();
        let mut a = TestVm::new(&kvm);
        run_writes(&mut a, 3);

        let start = Instant::now();
        let vm_state = save_vm(&a.vm).unwrap();
        let vcpu_state = save_vcpu(&a.vcpu, 0, &msrs).unwrap();
        let saved_in = start.elapsed();
        drop(a);
        let mut b = TestVm::blank(&kvm);
        let start = Instant::now();
        restore_vm(&b.vm, &vm_state).unwrap();
        restore_vcpu(&b.vcpu, 0, &vcpu_state).unwrap();
        let restored_in = start.elapsed();

        assert_eq!(vcpu_state.regs.rax, 3 * STEP);
        assert_eq!(vcpu_state.regs.rip, OUT_END);
        assert_eq!(u64::from(b.run_to_out()), 4 * STEP);
        assert_eq!(b.vcpu.get_regs().unwrap().rax, 4 * STEP);
        eprintln!(
            "one vCPU ({} MSRs) + VM: save {saved_in:?}, restore {restored_in:?}",
            vcpu_state.msrs.len()
        );
    }

    /// Asserts `second` (saved from a VM restored from `first`) equals `first` field by
    /// field but for what moves on its own: the TSC and kvmclock (forwards only) and the
    /// PIT channels' load times (host timestamps, set anew by KVM_SET_PIT2).
    fn assert_same_but_time(first: &(VmState, VcpuState), second: &(VmState, VcpuState)) {
        let ((vm1, cpu1), (vm2, cpu2)) = (first, second);
        let VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            lapic,
            msrs,
            debugregs,
            vcpu_events,
            tsc_khz,
        } = cpu1;
        assert!(*cpuid == cpu2.cpuid, "CPUID differs");
        assert_eq!(*mp_state, cpu2.mp_state);
        assert_eq!(*regs, cpu2.regs);
        assert_eq!(*sregs, cpu2.sregs);
        assert_eq!(*fpu, cpu2.fpu);
        assert!(*xsave == cpu2.xsave, "XSAVE area differs");
        assert_eq!(*xcrs, cpu2.xcrs);
        assert!(*lapic == cpu2.lapic, "LAPIC differs");
        assert_eq!(*debugregs, cpu2.debugregs);
        assert_eq!(*vcpu_events, cpu2.vcpu_events);
        assert_eq!(*tsc_khz, cpu2.tsc_khz);
        assert_eq!(msrs.len(), cpu2.msrs.len());
        for (m1, m2) in msrs.iter().zip(&cpu2.msrs) {
            assert_eq!(m1.index, m2.index);
            if m1.index == MSR_IA32_TSC {
                assert!(m2.value >= m1.value, "the TSC went backwards");
            } else {
                assert_eq!(m1.value, m2.value, "MSR {:#x} differs", m1.index);
            }
        }

        let VmState {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
        } = vm1;
        assert_eq!(*pic_master, vm2.pic_master);
        assert_eq!(*pic_slave, vm2.pic_slave);
        assert_eq!(*ioapic, vm2.ioapic);
        let mut pit2 = vm2.pit;
        for (ch2, ch1) in pit2.channels.iter_mut().zip(pit.channels) {
            ch2.count_load_time = ch1.count_load_time;
        }
        assert_eq!(*pit, pit2);
        assert!(vm2.clock.clock >= clock.clock, "kvmclock went backwards");
        assert_eq!(clock.flags, vm2.clock.flags);
    }

    fn set_msr(t: &TestVm, index: u32, data: u64) {
        let entry = kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let msrs = kvm_bindings::Msrs::from_entries(&[entry]).unwrap();
        assert_eq!(t.vcpu.set_msrs(&msrs).unwrap(), 1);
    }

    /// Leaves marks in `t`'s vCPU and devices that a fresh VM does not have: an XMM
    /// register, debug registers, a pending NMI, an armed (masked) TSC-deadline timer,
    /// kvmclock on (time page at 0x8000), a PIC mask, a loaded PIT channel.
    fn mark(t: &TestVm) {
        set_msr(t, MSR_KVM_SYSTEM_TIME_NEW, 0x8001);
        let mut lapic = t.vcpu.get_lapic().unwrap();
        // LVT timer: TSC-deadline mode, masked, vector 0xec.
        let lvtt = 0x4_0000u32 | 0x1_0000 | 0xec;
        for (dst, src) in lapic.regs[0x320..0x324].iter_mut().zip(lvtt.to_le_bytes()) {
            *dst = src as libc::c_char;
        }
        t.vcpu.set_lapic(&lapic).unwrap();
        let mut tsc = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }])
        .unwrap();
        t.vcpu.get_msrs(&mut tsc).unwrap();
        let deadline = tsc.as_slice()[0].data + 1_000_000_000_000;
        set_msr(t, MSR_IA32_TSC_DEADLINE, deadline);
        let mut fpu = t.vcpu.get_fpu().unwrap();
        fpu.xmm[3] = *b"sixteen bytes!!!";
        t.vcpu.set_fpu(&fpu).unwrap();
        let debugregs = kvm_bindings::kvm_debugregs {
            db: [0x1000, 0x2000, 0, 0],
            ..t.vcpu.get_debug_regs().unwrap()
        };
        t.vcpu.set_debug_regs(&debugregs).unwrap();
        t.vcpu.nmi().unwrap();
        let mut pic = kvm_bindings::kvm_irqchip {
            chip_id: KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        t.vm.get_irqchip(&mut pic).unwrap();
        // kvm_pic_state.imr, after the chip id and padding.
        pic.as_mut_bytes()[8 + 2] = 0xfb;
        t.vm.set_irqchip(&pic).unwrap();
        // Channel 2 (the speaker's, gate low): loaded but raises no interrupt.
        let mut pit = t.vm.get_pit2().unwrap();
        pit.channels[2].count = 0x1234;
        t.vm.set_pit2(&pit).unwrap();
    }

    #[test]
    fn save_restore_save_gives_the_same_state_but_the_clocks() {
        let kvm = kvm();
        let msrs = msrs_to_save(&kvm).unwrap();
        let mut a = TestVm::new(&kvm);
        run_writes(&mut a, 2);
        mark(&a);
        let first = (
            save_vm(&a.vm).unwrap(),
            save_vcpu(&a.vcpu, 0, &msrs).unwrap(),
        );
        assert_eq!(first.1.vcpu_events.nmi.pending, 1);
        assert_eq!(first.1.fpu.xmm[3], *b"sixteen bytes!!!");
        assert_eq!(first.0.pit.channels[2].count, 0x1234);
        let value = |index| {
            first
                .1
                .msrs
                .iter()
                .find(|m| m.index == index)
                .unwrap()
                .value
        };
        assert_ne!(value(MSR_IA32_TSC_DEADLINE), 0);
        assert_eq!(value(MSR_KVM_SYSTEM_TIME_NEW), 0x8001);

        let b = TestVm::blank(&kvm);
        restore_vm(&b.vm, &first.0).unwrap();
        restore_vcpu(&b.vcpu, 0, &first.1).unwrap();
        let second = (
            save_vm(&b.vm).unwrap(),
            save_vcpu(&b.vcpu, 0, &msrs).unwrap(),
        );

        assert_same_but_time(&first, &second);
    }

    #[test]
    fn saved_states_survive_a_json_round_trip() {
        let kvm = kvm();
        let msrs = msrs_to_save(&kvm).unwrap();
        let mut a = TestVm::new(&kvm);
        run_writes(&mut a, 1);
        let vm_state = save_vm(&a.vm).unwrap();
        let vcpu_state = save_vcpu(&a.vcpu, 0, &msrs).unwrap();

        let vm_json = serde_json::to_string(&vm_state).unwrap();
        let vcpu_json = serde_json::to_string(&vcpu_state).unwrap();

        assert_eq!(serde_json::from_str::<VmState>(&vm_json).unwrap(), vm_state);
        assert_eq!(
            serde_json::from_str::<VcpuState>(&vcpu_json).unwrap(),
            vcpu_state
        );
    }

    #[test]
    fn restored_clock_advances_by_the_time_the_vm_was_away() {
        let kvm = kvm();
        let a = TestVm::new(&kvm);
        let mut state = save_vm(&a.vm).unwrap();
        assert_ne!(state.clock.flags & KVM_CLOCK_REALTIME, 0);
        let away = Duration::from_secs(10).as_nanos() as u64;
        state.clock.realtime -= away;

        let b = TestVm::blank(&kvm);
        restore_vm(&b.vm, &state).unwrap();

        let clock = b.vm.get_clock().unwrap().clock;
        assert!(
            clock >= state.clock.clock + away,
            "clock {clock} < saved {} + 10 s",
            state.clock.clock
        );
    }

    #[test]
    fn irqchips_in_the_wrong_place_are_refused() {
        let kvm = kvm();
        let a = TestVm::new(&kvm);
        let mut state = save_vm(&a.vm).unwrap();
        std::mem::swap(&mut state.pic_master, &mut state.ioapic);

        let err = restore_vm(&a.vm, &state).unwrap_err();

        assert!(matches!(
            err,
            StateError::WrongIrqchip {
                found: KVM_IRQCHIP_IOAPIC,
                expected: KVM_IRQCHIP_PIC_MASTER,
                ..
            }
        ));
    }

    #[test]
    fn msr_the_host_refuses_names_itself() {
        let kvm = kvm();
        let a = TestVm::new(&kvm);
        let mut state = save_vcpu(&a.vcpu, 0, &[MSR_IA32_TSC]).unwrap();
        state.msrs.push(Msr {
            index: 0xdead_0000,
            value: 1,
        });

        let b = TestVm::blank(&kvm);
        let err = restore_vcpu(&b.vcpu, 0, &state).unwrap_err();

        assert!(
            matches!(
                err,
                StateError::MsrRefused {
                    id: 0,
                    index: 0xdead_0000,
                    value: 1
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn completing_pending_io_puts_the_port_read_in_the_register() {
        let kvm = kvm();
        let mut a = TestVm::new(&kvm);
        // in al, 0x12
        a.jump_to(0x2000, &[0xe4, 0x12]);
        match a.vcpu.run() {
            Ok(kvm_ioctls::VcpuExit::IoIn(0x12, data)) => data[0] = 0x5a,
            other => panic!("expected a read of port 0x12, got {other:?}"),
        }
        assert_ne!(a.vcpu.get_regs().unwrap().rax & 0xff, 0x5a);

        complete_pending_io(&mut a.vcpu, 0).unwrap();

        let regs = a.vcpu.get_regs().unwrap();
        assert_eq!(regs.rax & 0xff, 0x5a);
        assert_eq!(regs.rip, 0x2002);
    }

    #[test]
    fn kvmclock_ctrl_is_fine_with_and_without_guest_kvmclock() {
        let kvm = kvm();
        let mut a = TestVm::new(&kvm);
        kvmclock_ctrl(&a.vcpu, 0).unwrap();

        // The guest turns kvmclock on: its time page at 0x8000.
        set_msr(&a, MSR_KVM_SYSTEM_TIME_NEW, 0x8001);
        run_writes(&mut a, 1);

        kvmclock_ctrl(&a.vcpu, 0).unwrap();
        assert_eq!(
            a.vcpu.kvmclock_ctrl().map_err(|e| e.errno()),
            Ok(()),
            "KVM_KVMCLOCK_CTRL itself fails with guest kvmclock on"
        );
    }
}
