//! A tiny VM for the state tests: set up like Ember's (irqchip, PIT, TSS, identity map), with
//! 64 KiB of memory and a real-mode loop at [`CODE_ADDR`] that adds 1 to AX [`STEP`] times,
//! then writes AL to port [`PORT`], over and over. Every other byte of memory is code that
//! writes to another port, so a vCPU that loses its place exits instead of spinning.

use boot::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use boot::x86_64::regs::{boot_fpu, boot_msrs};
use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_pit_config, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

/// Where the loop starts.
pub const CODE_ADDR: u64 = 0x1000;
/// The port the loop writes.
pub const PORT: u16 = 0x10;
/// How much AX grows between two writes.
pub const STEP: u64 = 16;
/// Where the loop's `out` is; RIP after it is `OUT_END`.
pub const OUT_END: u64 = CODE_ADDR + 8;

/// `mov cx, 16; l: inc ax; loop l; out 0x10, al; jmp start` (16-bit).
const CODE: [u8; 10] = [0xb9, 0x10, 0x00, 0x40, 0xe2, 0xfd, 0xe6, 0x10, 0xeb, 0xf6];
/// `out 0x11, al`, filling the rest of memory.
const TRAP: [u8; 2] = [0xe6, 0x11];
const MEM_SIZE: usize = 0x10000;

/// /dev/kvm, or a panic saying these tests need it.
pub fn kvm() -> Kvm {
    Kvm::new().unwrap_or_else(|e| {
        panic!("this test is about KVM and needs /dev/kvm, which cannot be opened: {e}")
    })
}

/// A VM with one vCPU. Field order is drop order: the vCPU and VM go before their memory.
pub struct TestVm {
    pub vcpu: VcpuFd,
    pub vm: VmFd,
    mem: GuestMemoryMmap,
}

impl TestVm {
    /// A VM whose vCPU is configured as Ember configures one (CPUID, boot MSRs, FPU, LAPIC
    /// LINT pins) and sits at the loop's start in real mode.
    pub fn new(kvm: &Kvm) -> Self {
        let t = Self::blank(kvm);
        let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        // KVM emulates the TSC-deadline timer but leaves its bit to the VMM, as Ember sets it.
        for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
            e.ecx |= 1 << 24;
        }
        t.vcpu.set_cpuid2(&cpuid).unwrap();
        let entries = boot_msrs();
        let msrs = Msrs::from_entries(&entries).unwrap();
        assert_eq!(t.vcpu.set_msrs(&msrs).unwrap(), entries.len());
        t.vcpu.set_fpu(&boot_fpu()).unwrap();
        set_lint_pins(&t.vcpu);
        let mut sregs = t.vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        t.vcpu.set_sregs(&sregs).unwrap();
        let mut regs = t.vcpu.get_regs().unwrap();
        regs.rip = CODE_ADDR;
        regs.rax = 0;
        regs.rflags = 2;
        t.vcpu.set_regs(&regs).unwrap();
        t
    }

    /// A VM with the same memory and devices and a vCPU as KVM creates it: a restore target.
    pub fn blank(kvm: &Kvm) -> Self {
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(KVM_TSS_ADDRESS as usize).unwrap();
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .unwrap();
        vm.create_irq_chip().unwrap();
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let fill: Vec<u8> = TRAP.iter().copied().cycle().take(MEM_SIZE).collect();
        mem.write_slice(&fill, GuestAddress(0)).unwrap();
        mem.write_slice(&CODE, GuestAddress(CODE_ADDR)).unwrap();
        crate::memory::register_with_kvm(&vm, &mem).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        TestVm { vcpu, vm, mem }
    }

    /// Puts `code` at `addr` and the vCPU's RIP there.
    pub fn jump_to(&self, addr: u64, code: &[u8]) {
        self.mem.write_slice(code, GuestAddress(addr)).unwrap();
        let mut regs = self.vcpu.get_regs().unwrap();
        regs.rip = addr;
        self.vcpu.set_regs(&regs).unwrap();
    }

    /// Runs to the loop's next write and returns the byte written (AL).
    pub fn run_to_out(&mut self) -> u8 {
        for _ in 0..100 {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    assert_eq!(port, PORT, "the guest left the loop");
                    return data[0];
                }
                Err(e) if e.errno() == libc::EINTR => {}
                other => panic!("unexpected exit: {other:?}"),
            }
        }
        panic!("no write to the port in 100 runs");
    }
}

/// LINT0 ExtINT, LINT1 NMI, as src/vcpu.rs sets them.
fn set_lint_pins(fd: &VcpuFd) {
    let mut lapic = fd.get_lapic().unwrap();
    for (offset, mode) in [(0x350usize, 0x7u32), (0x360, 0x4)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let bytes: [u8; 4] = std::array::from_fn(|i| reg[i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (dst, src) in reg.iter_mut().zip(value.to_le_bytes()) {
            *dst = src as libc::c_char;
        }
    }
    fd.set_lapic(&lapic).unwrap();
}
