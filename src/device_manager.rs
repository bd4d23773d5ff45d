//! The one place devices are attached: each `attach_*` allocates the device's ports or MMIO
//! window and IRQ, registers its irqfd, puts it on its bus and subscribes its event-loop
//! handler.

use std::sync::{Arc, Mutex};

use boot::x86_64::acpi;
use devices::bus::{Bus, BusError};
use devices::legacy::{
    cmos, debug_exit, i8042, serial, AcpiPm, Cmos, DebugExit, SerialDevice, I8042,
};
use devices::{ExitSink, Interrupt};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::console::{Console, ConsoleError, ConsoleInput};
use crate::run_state::RunState;
use crate::vcpu::Buses;

/// What the event loop holds.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// The VMM's event loop.
pub type EventLoop = EventManager<Subscriber>;

/// Errors attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A bus range clash (a bug in the layout).
    #[error("cannot place a device")]
    Bus(#[from] BusError),
    /// An eventfd could not be made.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM refused an irqfd.
    #[error("KVM refused the irqfd for IRQ {irq}")]
    Irqfd {
        /// The IRQ.
        irq: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The console.
    #[error(transparent)]
    Console(#[from] ConsoleError),
}

/// Builds the buses of one VM.
#[derive(Default)]
pub struct DeviceManager {
    pio: Bus,
    mmio: Bus,
}

fn irqfd(vm: &VmFd, irq: u32) -> Result<EventFd, DeviceError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    vm.register_irqfd(&evt, irq)
        .map_err(|source| DeviceError::Irqfd { irq, source })?;
    Ok(evt)
}

impl DeviceManager {
    /// An empty machine.
    pub fn new() -> Self {
        Self::default()
    }

    /// The PC's interrupt-less PIO devices: i8042 (reset), CMOS RTC, ACPI PM block, and the
    /// debug-exit port when asked for.
    pub fn attach_legacy(
        &mut self,
        exit: Arc<dyn ExitSink>,
        debug_exit: bool,
    ) -> Result<(), DeviceError> {
        let kbd = Arc::new(Mutex::new(I8042::new(exit.clone())));
        self.pio.insert(
            kbd,
            u64::from(i8042::I8042_DATA_PORT),
            u64::from(i8042::I8042_LEN),
        )?;
        let rtc = Arc::new(Mutex::new(Cmos::with_system_clock()));
        self.pio
            .insert(rtc, u64::from(cmos::CMOS_PORT), u64::from(cmos::CMOS_LEN))?;
        let pm = AcpiPm::new(exit.clone(), acpi::SLP_TYP_S5, acpi::RESET_VALUE);
        self.pio.insert(
            Arc::new(Mutex::new(pm)),
            u64::from(acpi::ports::BASE),
            u64::from(acpi::ports::LEN),
        )?;
        if debug_exit {
            let dev = Arc::new(Mutex::new(DebugExit::new(exit)));
            self.pio.insert(
                dev,
                u64::from(debug_exit::DEBUG_EXIT_PORT),
                u64::from(debug_exit::DEBUG_EXIT_LEN),
            )?;
        }
        Ok(())
    }

    /// COM1 on IRQ 4, writing to the console, fed from its input on the event loop.
    pub fn attach_serial(
        &mut self,
        vm: &VmFd,
        events: &mut EventLoop,
        console: &Console,
        state: Arc<RunState>,
    ) -> Result<(), DeviceError> {
        let irq: Arc<dyn Interrupt> = Arc::new(irqfd(vm, serial::COM1_IRQ)?);
        let rx_space = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let rx_signal = rx_space.try_clone().map_err(DeviceError::EventFd)?;
        let uart = Arc::new(Mutex::new(SerialDevice::new(
            irq,
            Arc::new(rx_signal),
            console.writer()?,
        )));
        self.pio.insert(
            uart.clone(),
            u64::from(serial::COM1_PORT),
            u64::from(serial::UART_LEN),
        )?;
        if let Some(input) = console.reader()? {
            let handler = ConsoleInput::new(input, uart, rx_space, state, console.escape_enabled());
            events.add_subscriber(Arc::new(Mutex::new(handler)));
        }
        Ok(())
    }

    /// The finished buses, shared by the vCPUs.
    pub fn into_buses(self) -> Buses {
        Buses {
            pio: self.pio,
            mmio: self.mmio,
        }
    }
}
