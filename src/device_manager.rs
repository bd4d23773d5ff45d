//! The one place devices are attached: each `attach_*` allocates the device's ports or MMIO
//! window and IRQ, registers its irqfd, puts it on its bus and subscribes its event-loop
//! handler.

use std::sync::{Arc, Mutex};

use boot::layout::{MAX_IRQ, MMIO_DEVICES_START, MMIO_DEVICE_SIZE, MMIO_FIRST_IRQ};
use boot::x86_64::acpi;
use devices::bus::{Bus, BusError};
use devices::disk::{self, DiskError};
use devices::legacy::{
    cmos, debug_exit, i8042, serial, AcpiPm, Cmos, DebugExit, SerialDevice, I8042,
};
use devices::virtio::block::handler::BlockHandler;
use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY};
use devices::virtio::net::handler::NetHandler;
use devices::virtio::net::tap::{self, Tap, TapError};
use devices::virtio::net::{mac_for, Net};
use devices::virtio::{VirtioDevice, VirtioInterrupt};
use devices::{ExitSink, Interrupt};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{DiskConfig, NetBackendConfig, NetConfig};
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
    /// A disk image cannot be used.
    #[error("--disk {path}")]
    Disk {
        /// The image.
        path: String,
        /// Cause.
        #[source]
        source: DiskError,
    },
    /// KVM refused an ioeventfd.
    #[error("KVM refused the ioeventfd at {addr:#x}")]
    Ioeventfd {
        /// The notification address.
        addr: u64,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A tap cannot be used.
    #[error("--net")]
    Tap(#[from] TapError),
    /// A network named by --net network= is unusable.
    #[error("--net network={name}: {message}")]
    Network {
        /// The network.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Setting up a tap failed.
    #[error("--net: cannot set up tap '{name}'")]
    TapSetup {
        /// The tap.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// More MMIO devices than free IRQs.
    #[error("too many devices: no IRQ left for another virtio-mmio device")]
    NoIrq,
}

/// Builds the buses of one VM.
#[derive(Default)]
pub struct DeviceManager {
    pio: Bus,
    mmio: Bus,
    /// Virtio-mmio devices attached so far.
    mmio_devices: u64,
    /// `virtio_mmio.device=` entries for the kernel command line.
    cmdline: Vec<String>,
}

/// Opens the tap behind a --net: by name (created and brought up if it did not exist), a
/// handed-over descriptor, or a new tap plugged into a network's bridge.
fn open_tap(backend: &NetBackendConfig, index: usize) -> Result<Tap, DeviceError> {
    fn setup(name: &str) -> impl FnOnce(std::io::Error) -> DeviceError + '_ {
        move |source| DeviceError::TapSetup {
            name: name.to_string(),
            source,
        }
    }
    match backend {
        NetBackendConfig::Fd(fd) => Ok(Tap::from_fd(*fd)?),
        NetBackendConfig::Tap(name) => {
            let existed = tap::interface_exists(name);
            let t = Tap::open(name)?;
            if !existed {
                tap::set_interface_up(name).map_err(setup(name))?;
            }
            Ok(t)
        }
        NetBackendConfig::Network(net) => {
            let network = crate::net::load(net).map_err(|e| DeviceError::Network {
                name: net.clone(),
                message: e.to_string(),
            })?;
            if !tap::interface_exists(network.bridge()) {
                return Err(DeviceError::Network {
                    name: net.clone(),
                    message: format!(
                        "its bridge '{}' is gone; recreate the network",
                        network.bridge()
                    ),
                });
            }
            // A tap of our own, gone when ember exits.
            let name = format!("em{}n{index}", std::process::id());
            let t = Tap::open(&name)?;
            tap::add_to_bridge(network.bridge(), &name).map_err(setup(&name))?;
            tap::set_interface_up(&name).map_err(setup(&name))?;
            Ok(t)
        }
    }
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

    /// A virtio-blk device for `cfg` on the next MMIO window and IRQ.
    pub fn attach_block(
        &mut self,
        vm: &VmFd,
        events: &mut EventLoop,
        mem: &GuestMemoryMmap,
        cfg: &DiskConfig,
    ) -> Result<(), DeviceError> {
        let opts = disk::OpenOptions {
            format: cfg.format,
            read_only: cfg.read_only,
            cache: cfg.cache,
            force_share: false,
        };
        let image = disk::open_image(&cfg.path, &opts).map_err(|source| DeviceError::Disk {
            path: cfg.path.display().to_string(),
            source,
        })?;
        let block = Arc::new(Mutex::new(Block::new(
            image,
            cfg.read_only,
            cfg.serial.clone(),
        )));
        let queue_evt = self
            .attach_virtio_mmio(vm, mem, block.clone())?
            .pop()
            .ok_or(DeviceError::NoIrq)?;
        events.add_subscriber(Arc::new(Mutex::new(BlockHandler::new(block, queue_evt))));
        Ok(())
    }

    /// A virtio-net device for `cfg` (NIC number `index` of VM `vm_name`).
    pub fn attach_net(
        &mut self,
        vm: &VmFd,
        events: &mut EventLoop,
        mem: &GuestMemoryMmap,
        cfg: &NetConfig,
        index: usize,
        vm_name: &str,
    ) -> Result<(), DeviceError> {
        let tap = open_tap(&cfg.backend, index)?;
        let mac = cfg.mac.unwrap_or_else(|| mac_for(vm_name, index));
        log::debug!("NIC {index}: tap {} mac {mac:02x?}", tap.name());
        let net = Arc::new(Mutex::new(Net::new(tap, mac, cfg.mtu)));
        let mut evts = self.attach_virtio_mmio(vm, mem, net.clone())?;
        let tx = evts.pop().ok_or(DeviceError::NoIrq)?;
        let rx = evts.pop().ok_or(DeviceError::NoIrq)?;
        let handler = NetHandler::new(net, rx, tx).map_err(DeviceError::EventFd)?;
        events.add_subscriber(Arc::new(Mutex::new(handler)));
        Ok(())
    }

    /// Places a virtio device on the MMIO bus: window, IRQ (irqfd), queue ioeventfd,
    /// command-line entry. Returns the eventfds of its queues, in queue order.
    fn attach_virtio_mmio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Vec<EventFd>, DeviceError> {
        let index = self.mmio_devices;
        let irq = MMIO_FIRST_IRQ + index as u32;
        if irq > MAX_IRQ {
            return Err(DeviceError::NoIrq);
        }
        let base = MMIO_DEVICES_START + index * MMIO_DEVICE_SIZE;
        let line: Arc<dyn Interrupt> = Arc::new(irqfd(vm, irq)?);
        let interrupt = Arc::new(VirtioInterrupt::new(line));
        let queues = devices::bus::lock_device(&device, |d| d.queue_max_sizes().len());
        let mut evts = Vec::with_capacity(queues);
        for q in 0..queues {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
            let addr = base + QUEUE_NOTIFY;
            vm.register_ioevent(&evt, &IoEventAddress::Mmio(addr), q as u32)
                .map_err(|source| DeviceError::Ioeventfd { addr, source })?;
            evts.push(evt);
        }
        let ours = evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(DeviceError::EventFd)?;
        let transport = MmioTransport::new(device, interrupt, mem.clone(), evts);
        self.mmio
            .insert(Arc::new(Mutex::new(transport)), base, MMIO_DEVICE_SIZE)?;
        self.cmdline.push(format!(
            "virtio_mmio.device={}K@{base:#x}:{irq}",
            MMIO_DEVICE_SIZE >> 10
        ));
        self.mmio_devices += 1;
        Ok(ours)
    }

    /// Kernel command-line entries for the attached devices.
    pub fn cmdline(&self) -> String {
        self.cmdline.join(" ")
    }

    /// The finished buses, shared by the vCPUs.
    pub fn into_buses(self) -> Buses {
        Buses {
            pio: self.pio,
            mmio: self.mmio,
        }
    }
}
