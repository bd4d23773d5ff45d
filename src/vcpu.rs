//! vCPUs: configuration from the boot state, the thread that runs each one, and exit
//! handling as a plain function over the buses.

use std::cell::Cell;
use std::sync::Arc;
use std::thread::JoinHandle;

use boot::x86_64::regs::{boot_fpu, boot_msrs, boot_regs, boot_sregs};
use boot::BootState;
use devices::bus::Bus;
use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::run_state::{Outcome, RunState};

/// Errors configuring or starting a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: {what} failed")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// The ioctl.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than given.
    #[error("vCPU {id}: KVM set {set} of {want} boot MSRs")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many were given.
        want: usize,
    },
    /// The vCPU thread could not be created.
    #[error("cannot start the thread of vCPU {id}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// The buses a vCPU routes its exits to.
#[derive(Default)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// Why a vCPU stops running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault,
    /// KVM_EXIT_INTERNAL_ERROR.
    InternalError,
    /// KVM_EXIT_FAIL_ENTRY with the hardware reason.
    FailEntry(u64),
    /// A system event asking for power off.
    PowerOff,
    /// A system event asking for reset.
    Reset,
    /// Anything else: its name.
    Unexpected(String),
}

/// What the run loop does after an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Enter the guest again.
    Continue,
    /// Stop this vCPU (and the VM).
    Stop(StopReason),
}

/// Handles one exit: I/O goes to the buses (unclaimed reads see all-ones, as on a PC),
/// anything fatal becomes a stop reason.
pub fn handle_exit(buses: &Buses, exit: VcpuExit) -> Action {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            buses.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                log::debug!("unclaimed MMIO read at {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                log::debug!("unclaimed MMIO write at {addr:#x}");
            }
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        VcpuExit::Shutdown => return Action::Stop(StopReason::TripleFault),
        VcpuExit::InternalError => return Action::Stop(StopReason::InternalError),
        VcpuExit::FailEntry(reason, _) => return Action::Stop(StopReason::FailEntry(reason)),
        VcpuExit::SystemEvent(kind, _) => {
            return Action::Stop(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => StopReason::PowerOff,
                KVM_SYSTEM_EVENT_RESET => StopReason::Reset,
                KVM_SYSTEM_EVENT_CRASH => StopReason::Unexpected("system event: crash".into()),
                other => StopReason::Unexpected(format!("system event {other}")),
            })
        }
        other => return Action::Stop(StopReason::Unexpected(format!("{other:?}"))),
    }
    Action::Continue
}

/// A short name and the port/address of an exit, kept for reports.
fn exit_summary(exit: &VcpuExit) -> (&'static str, u64) {
    match exit {
        VcpuExit::IoIn(port, _) => ("port read", u64::from(*port)),
        VcpuExit::IoOut(port, _) => ("port write", u64::from(*port)),
        VcpuExit::MmioRead(addr, _) => ("MMIO read", *addr),
        VcpuExit::MmioWrite(addr, _) => ("MMIO write", *addr),
        _ => ("other", 0),
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(|p| p.get());
    if !flag.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, set by the vCPU thread for as
        // long as its VcpuFd lives and cleared before the fd is dropped.
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler (once per process is enough; repeating is harmless).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    /// The last exit, for reports: kind and port/address.
    last_exit: (&'static str, u64),
    /// The report generation this vCPU answered last.
    reported: u64,
    buses: Arc<Buses>,
    state: Arc<RunState>,
    mem: GuestMemoryMmap,
}

fn kvm_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, what, source }
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

impl Vcpu {
    /// Wraps `fd` and sets CPUID, MSRs, FPU and LAPIC LINT pins. Such a vCPU waits for
    /// INIT/SIPI in KVM unless it is given the boot entry ([`Self::set_boot_entry`]).
    pub fn new(
        fd: VcpuFd,
        id: u8,
        cpuid: &[kvm_cpuid_entry2],
        buses: Arc<Buses>,
        state: Arc<RunState>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, VcpuError> {
        let cpuid = CpuId::from_entries(cpuid).map_err(|_| VcpuError::Kvm {
            id,
            what: "building CPUID",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
        let entries = boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Kvm {
            id,
            what: "building MSRs",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                id,
                set,
                want: entries.len(),
            });
        }
        fd.set_fpu(&boot_fpu())
            .map_err(kvm_err(id, "KVM_SET_FPU"))?;
        Self::set_lint_pins(&fd, id)?;
        Ok(Vcpu {
            fd,
            id,
            last_exit: ("none", 0),
            reported: 0,
            buses,
            state,
            mem,
        })
    }

    /// Makes this the boot vCPU: registers at the kernel's entry point.
    pub fn set_boot_entry(&self, boot: &BootState) -> Result<(), VcpuError> {
        let id = self.id;
        self.fd
            .set_regs(&boot_regs(boot.entry))
            .map_err(kvm_err(id, "KVM_SET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&boot_sregs(sregs, boot.entry, boot.cr3))
            .map_err(kvm_err(id, "KVM_SET_SREGS"))
    }

    /// The CPUID KVM actually gives this vCPU (a host may not honour every masked bit).
    pub fn effective_cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>, VcpuError> {
        self.fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map(|c| c.as_slice().to_vec())
            .map_err(kvm_err(self.id, "KVM_GET_CPUID2"))
    }

    /// LINT0 delivers ExtINT (the PIC), LINT1 NMI, as firmware leaves them.
    fn set_lint_pins(fd: &VcpuFd, id: u8) -> Result<(), VcpuError> {
        let mut lapic = fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
        for (offset, mode) in [
            (APIC_LVT_LINT0, APIC_MODE_EXTINT),
            (APIC_LVT_LINT1, APIC_MODE_NMI),
        ] {
            let reg = &mut lapic.regs[offset..offset + 4];
            let bytes: [u8; 4] = std::array::from_fn(|i| reg[i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (dst, src) in reg.iter_mut().zip(value.to_le_bytes()) {
                *dst = src as libc::c_char;
            }
        }
        fd.set_lapic(&lapic).map_err(kvm_err(id, "KVM_SET_LAPIC"))
    }

    /// Starts the thread `vcpu N` running this vCPU until the VM exits.
    pub fn start(self) -> Result<JoinHandle<()>, VcpuError> {
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("vcpu {id}"))
            .spawn(move || self.run())
            .map_err(|source| VcpuError::Spawn { id, source })
    }

    fn run(mut self) {
        let flag: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(flag));
        while !self.state.is_exiting() {
            let action = match self.fd.run() {
                Ok(exit) => {
                    self.last_exit = exit_summary(&exit);
                    handle_exit(&self.buses, exit)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    self.report_if_asked();
                    Action::Continue
                }
                Err(e) => Action::Stop(StopReason::Unexpected(format!("KVM_RUN failed: {e}"))),
            };
            if let Action::Stop(reason) = action {
                let outcome = self.outcome_for(reason);
                self.state.request_exit(outcome);
                break;
            }
        }
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    }

    fn outcome_for(&mut self, reason: StopReason) -> Outcome {
        let (id, at) = (self.id, self.location());
        match reason {
            StopReason::PowerOff => Outcome::PowerOff,
            StopReason::Reset => Outcome::Reset,
            StopReason::TripleFault => Outcome::Crash(format!(
                "guest triple fault on vCPU {id} at {at}; instruction bytes: {}",
                self.instruction_bytes(None)
            )),
            StopReason::InternalError => {
                let (text, kvm_bytes) = self.internal_error();
                Outcome::Crash(format!(
                    "KVM internal error ({text}) on vCPU {id} at {at}; instruction bytes: {}",
                    self.instruction_bytes(kvm_bytes)
                ))
            }
            StopReason::FailEntry(r) => Outcome::Crash(format!(
                "KVM could not enter the guest (hardware reason {r:#x}) on vCPU {id} at {at}"
            )),
            StopReason::Unexpected(what) => {
                Outcome::Crash(format!("unexpected vCPU exit {what} on vCPU {id} at {at}"))
            }
        }
    }

    /// Prints where this vCPU is when a report was asked for (SIGUSR1).
    fn report_if_asked(&mut self) {
        let generation = self.state.report_generation();
        if generation == self.reported {
            return;
        }
        self.reported = generation;
        let mp = match self.fd.get_mp_state().map(|m| m.mp_state) {
            Ok(kvm_bindings::KVM_MP_STATE_RUNNABLE) => "runnable",
            Ok(kvm_bindings::KVM_MP_STATE_UNINITIALIZED) => "waiting for INIT",
            Ok(kvm_bindings::KVM_MP_STATE_INIT_RECEIVED) => "waiting for SIPI",
            Ok(kvm_bindings::KVM_MP_STATE_HALTED) => "halted",
            Ok(kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED) => "SIPI received",
            _ => "unknown state",
        };
        let (kind, at) = self.last_exit;
        log::warn!(
            "vCPU {}: {mp} at {}; last exit: {kind} {at:#x}; instruction bytes: {}",
            self.id,
            self.location(),
            self.instruction_bytes(None)
        );
    }

    /// `RIP 0x... (long mode, CPL0)`.
    fn location(&self) -> String {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return "an unknown RIP".into();
        };
        let mode = if sregs.cr0 & 1 == 0 {
            "real mode"
        } else if sregs.efer & 0x400 != 0 {
            if sregs.cs.l == 1 {
                "long mode"
            } else {
                "compatibility mode"
            }
        } else {
            "protected mode"
        };
        format!("RIP {:#x} ({mode}, CPL{})", regs.rip, sregs.cs.selector & 3)
    }

    /// Suberror text and, for emulation failures, the instruction bytes KVM reports.
    fn internal_error(&mut self) -> (String, Option<Vec<u8>>) {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` (and its alias
        // `emulation_failure`) is the active member of the union; both are plain integers.
        let (sub, ndata, data) = unsafe {
            let i = run.__bindgen_anon_1.internal;
            (i.suberror, i.ndata, i.data)
        };
        let text = match sub {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "event delivery failure",
            4 => "unexpected exit reason",
            _ => "unknown suberror",
        };
        // Emulation failure layout: data[0] = flags (bit 0: bytes valid), then a byte of
        // length and up to 15 instruction bytes.
        let bytes = (sub == 1 && ndata >= 2 && data[0] & 1 == 1).then(|| {
            let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
            let len = usize::from(raw[0]).min(15);
            raw[1..1 + len].to_vec()
        });
        (format!("{text}, suberror {sub}"), bytes)
    }

    /// Hex of the instruction at RIP: KVM's copy if it gave one, else read from memory.
    fn instruction_bytes(&self, from_kvm: Option<Vec<u8>>) -> String {
        let bytes = from_kvm.or_else(|| {
            let (regs, sregs) = (self.fd.get_regs().ok()?, self.fd.get_sregs().ok()?);
            let linear = sregs.cs.base.wrapping_add(regs.rip);
            let tr = self.fd.translate_gva(linear).ok()?;
            if tr.valid == 0 {
                return None;
            }
            let mut buf = [0u8; 15];
            self.mem
                .read_slice(&mut buf, GuestAddress(tr.physical_address))
                .ok()?;
            Some(buf.to_vec())
        });
        match bytes {
            Some(b) if !b.is_empty() => b
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
            _ => "unavailable".into(),
        }
    }
}

/// Kicks every vCPU thread out of KVM_RUN (the run state already says Exiting).
pub fn kick_all(threads: &[JoinHandle<()>]) {
    for t in threads.iter().filter(|t| !t.is_finished()) {
        if let Err(e) = t.kill(kick_signal()) {
            log::debug!("cannot kick a vCPU thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use devices::bus::BusDevice;

    struct Port(u8, Vec<u8>);

    impl BusDevice for Port {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.1.extend_from_slice(data);
        }
    }

    fn buses_with_port(port: u64) -> (Buses, Arc<Mutex<Port>>) {
        let dev = Arc::new(Mutex::new(Port(0x42, Vec::new())));
        let mut buses = Buses::default();
        buses.pio.insert(dev.clone(), port, 1).unwrap();
        (buses, dev)
    }

    #[test]
    fn pio_exits_reach_the_device() {
        let (buses, dev) = buses_with_port(0x3f8);
        let mut data = [0u8; 1];
        assert_eq!(
            handle_exit(&buses, VcpuExit::IoIn(0x3f8, &mut data)),
            Action::Continue
        );
        assert_eq!(data, [0x42]);
        assert_eq!(
            handle_exit(&buses, VcpuExit::IoOut(0x3f8, b"x")),
            Action::Continue
        );
        assert_eq!(dev.lock().unwrap().1, b"x");
    }

    #[test]
    fn unclaimed_reads_return_all_ones() {
        let buses = Buses::default();
        let mut data = [0u8; 4];
        assert_eq!(
            handle_exit(&buses, VcpuExit::IoIn(0x80, &mut data)),
            Action::Continue
        );
        assert_eq!(data, [0xff; 4]);
        let mut data = [0u8; 8];
        handle_exit(&buses, VcpuExit::MmioRead(0xd000_0000, &mut data));
        assert_eq!(data, [0xff; 8]);
        assert_eq!(
            handle_exit(&buses, VcpuExit::MmioWrite(0xd000_0000, &[1])),
            Action::Continue
        );
    }

    #[test]
    fn fatal_exits_stop_with_their_reason() {
        let buses = Buses::default();
        assert_eq!(
            handle_exit(&buses, VcpuExit::Shutdown),
            Action::Stop(StopReason::TripleFault)
        );
        assert_eq!(
            handle_exit(&buses, VcpuExit::InternalError),
            Action::Stop(StopReason::InternalError)
        );
        assert_eq!(
            handle_exit(&buses, VcpuExit::FailEntry(0x21, 0)),
            Action::Stop(StopReason::FailEntry(0x21))
        );
        assert_eq!(
            handle_exit(&buses, VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[])),
            Action::Stop(StopReason::Reset)
        );
        assert!(matches!(
            handle_exit(&buses, VcpuExit::Hlt),
            Action::Stop(StopReason::Unexpected(_))
        ));
    }
}
