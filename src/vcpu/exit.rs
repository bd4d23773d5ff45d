//! Exit handling as a plain function over the buses, and the per-vCPU exit counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::bus::Bus;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;
use serde::Serialize;

/// The buses a vCPU routes its exits to; devices come and go on them while vCPUs run.
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

/// Exits of one vCPU by kind, counted as they happen (read by `ember domstats`).
#[derive(Default)]
pub struct ExitCounters {
    pio_in: AtomicU64,
    pio_out: AtomicU64,
    mmio_read: AtomicU64,
    mmio_write: AtomicU64,
    interrupted: AtomicU64,
    other: AtomicU64,
}

/// A copy of [`ExitCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExitCounts {
    /// Port reads.
    pub pio_in: u64,
    /// Port writes.
    pub pio_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// Returns to the VMM by a kick or a host signal.
    pub interrupted: u64,
    /// Everything else.
    pub other: u64,
}

impl ExitCounters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a return from KVM_RUN by a signal.
    pub fn interrupted(&self) {
        Self::bump(&self.interrupted);
    }

    /// The counts so far.
    pub fn get(&self) -> ExitCounts {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitCounts {
            pio_in: g(&self.pio_in),
            pio_out: g(&self.pio_out),
            mmio_read: g(&self.mmio_read),
            mmio_write: g(&self.mmio_write),
            interrupted: g(&self.interrupted),
            other: g(&self.other),
        }
    }
}

/// Handles one exit: I/O goes to the buses (unclaimed reads see all-ones, as on a PC),
/// anything fatal becomes a stop reason. Every exit is counted in `counters`.
pub fn handle_exit(buses: &Buses, exit: VcpuExit, counters: &Arc<ExitCounters>) -> Action {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ExitCounters::bump(&counters.pio_in);
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            ExitCounters::bump(&counters.pio_out);
            buses.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            ExitCounters::bump(&counters.mmio_read);
            if !buses.mmio.read(addr, data) {
                log::debug!("unclaimed MMIO read at {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            ExitCounters::bump(&counters.mmio_write);
            if !buses.mmio.write(addr, data) {
                log::debug!("unclaimed MMIO write at {addr:#x}");
            }
        }
        other => {
            ExitCounters::bump(&counters.other);
            return handle_other_exit(other);
        }
    }
    Action::Continue
}

fn handle_other_exit(exit: VcpuExit) -> Action {
    let reason = match exit {
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => return Action::Continue,
        VcpuExit::Shutdown => StopReason::TripleFault,
        VcpuExit::InternalError => StopReason::InternalError,
        VcpuExit::FailEntry(reason, _) => StopReason::FailEntry(reason),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => StopReason::PowerOff,
            KVM_SYSTEM_EVENT_RESET => StopReason::Reset,
            KVM_SYSTEM_EVENT_CRASH => StopReason::Unexpected("system event: crash".into()),
            other => StopReason::Unexpected(format!("system event {other}")),
        },
        other => StopReason::Unexpected(format!("{other:?}")),
    };
    Action::Stop(reason)
}

/// A short name and the port/address of an exit, kept for reports.
pub fn exit_summary(exit: &VcpuExit) -> (&'static str, u64) {
    match exit {
        VcpuExit::IoIn(port, _) => ("port read", u64::from(*port)),
        VcpuExit::IoOut(port, _) => ("port write", u64::from(*port)),
        VcpuExit::MmioRead(addr, _) => ("MMIO read", *addr),
        VcpuExit::MmioWrite(addr, _) => ("MMIO write", *addr),
        _ => ("other", 0),
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
        let buses = Buses::default();
        buses.pio.insert(dev.clone(), port, 1).unwrap();
        (buses, dev)
    }

    fn counters() -> Arc<ExitCounters> {
        Arc::new(ExitCounters::default())
    }

    #[test]
    fn pio_exits_reach_the_device_and_are_counted() {
        let (buses, dev) = buses_with_port(0x3f8);
        let c = counters();
        let mut data = [0u8; 1];
        assert_eq!(
            handle_exit(&buses, VcpuExit::IoIn(0x3f8, &mut data), &c),
            Action::Continue
        );
        assert_eq!(data, [0x42]);
        assert_eq!(
            handle_exit(&buses, VcpuExit::IoOut(0x3f8, b"x"), &c),
            Action::Continue
        );
        assert_eq!(dev.lock().unwrap().1, b"x");
        let n = c.get();
        assert_eq!((n.pio_in, n.pio_out, n.mmio_read), (1, 1, 0));
    }

    #[test]
    fn unclaimed_reads_return_all_ones() {
        let buses = Buses::default();
        let c = counters();
        let mut data = [0u8; 4];
        assert_eq!(
            handle_exit(&buses, VcpuExit::IoIn(0x80, &mut data), &c),
            Action::Continue
        );
        assert_eq!(data, [0xff; 4]);
        let mut data = [0u8; 8];
        handle_exit(&buses, VcpuExit::MmioRead(0xd000_0000, &mut data), &c);
        assert_eq!(data, [0xff; 8]);
        assert_eq!(
            handle_exit(&buses, VcpuExit::MmioWrite(0xd000_0000, &[1]), &c),
            Action::Continue
        );
        assert_eq!(c.get().mmio_write, 1);
    }

    #[test]
    fn fatal_exits_stop_with_their_reason() {
        let buses = Buses::default();
        let c = counters();
        assert_eq!(
            handle_exit(&buses, VcpuExit::Shutdown, &c),
            Action::Stop(StopReason::TripleFault)
        );
        assert_eq!(
            handle_exit(&buses, VcpuExit::InternalError, &c),
            Action::Stop(StopReason::InternalError)
        );
        assert_eq!(
            handle_exit(&buses, VcpuExit::FailEntry(0x21, 0), &c),
            Action::Stop(StopReason::FailEntry(0x21))
        );
        assert_eq!(
            handle_exit(
                &buses,
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]),
                &c
            ),
            Action::Stop(StopReason::Reset)
        );
        assert!(matches!(
            handle_exit(&buses, VcpuExit::Hlt, &c),
            Action::Stop(StopReason::Unexpected(_))
        ));
        assert_eq!(c.get().other, 5);
    }
}
