//! The device registry of one VM, alive as long as the VM: the one place devices are
//! attached and detached. Attaching takes resources (MMIO window and IRQ for virtio-mmio;
//! slot, BAR space and MSI-X vectors for virtio-pci, see `pci`) from allocators,
//! registers the irqfds and ioeventfds, puts the device on its bus (buses take devices while
//! vCPUs run), subscribes its event-loop handler and records it under its id; detaching
//! undoes each step and gives the resources back.

mod balloon;
mod hotplug;
mod pci;
mod persist;
mod resources;
mod wiring;

use std::sync::{Arc, Mutex};

use boot::x86_64::acpi;
use devices::bus::BusError;
use devices::disk::{self, DiskError};
use devices::legacy::{
    acpi_pm, cmos, debug_exit, i8042, pvpanic, serial, AcpiPm, Cmos, DebugExit, PvPanic,
    SerialDevice, I8042,
};
use devices::virtio::block::handler::BlockHandler;
use devices::virtio::block::Block;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::net::handler::NetHandler;
use devices::virtio::net::tap::{self, Tap, TapError};
use devices::virtio::net::{mac_for, Net};
use devices::virtio::{VirtioDevice, VirtioTransport};
use devices::GuestMemoryMmap;
use devices::{ExitSink, Interrupt, IrqLevel};
use event_manager::{EventManager, MutEventSubscriber, SubscriberId, SubscriberOps};
use kvm_ioctls::VmFd;
use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use balloon::lock as lock_balloon;
pub use hotplug::Plugged;
pub use pci::PciDeviceState;
pub use resources::{ResourceAllocator, Resources};
use wiring::{clone_eventfds, queue_eventfds, register_notifies, unregister_notifies};

use crate::config::{DiskConfig, NetBackendConfig, NetConfig, Transport};
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
    /// A bridge named by --net bridge= does not exist.
    #[error("--net bridge={0}: no such interface on the host")]
    NoBridge(String),
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
    /// A device id already in use.
    #[error("a device with id '{0}' exists already")]
    DuplicateId(String),
    /// No device has this id.
    #[error("no device has id '{0}'")]
    NoSuchDevice(String),
    /// The balloon cannot be made as configured.
    #[error("--balloon: {0}")]
    Balloon(String),
    /// Every slot of the PCI root bus is taken.
    #[error("too many devices: no PCI slot left")]
    NoPciSlot,
    /// The PCI BAR window is full.
    #[error("no room left in the PCI BAR window")]
    NoPciSpace,
    /// Every GSI for MSI-X vectors is taken.
    #[error("no GSI left for MSI-X vectors")]
    NoMsiGsi,
    /// Hotplug needs a PCI host, which this VM was started without.
    #[error(
        "this VM has no PCI bus, so devices cannot be attached or detached while it runs \
         (start it with transport=pci for the VM or for one of its devices)"
    )]
    NoPciBus,
    /// A device on virtio-mmio cannot leave a running VM.
    #[error("device '{0}' is on virtio-mmio: only PCI devices can be detached while the VM runs")]
    NotHotpluggable(String),
    /// A detach of this device waits for the guest already.
    #[error("a detach of device '{0}' is pending: the guest has not released it yet")]
    DetachPending(String),
    /// The hotplug controller refused a slot (a bug).
    #[error("PCI hotplug")]
    Hotplug(#[source] devices::pci::hotplug::HotplugError),
    /// The virtio-pci function cannot be laid out (a bug in the device model).
    #[error("cannot build the virtio-pci function")]
    PciLayout(#[source] devices::virtio::pci::VirtioPciError),
}

/// A virtio device in the registry.
#[derive(Clone)]
pub enum VirtioHandle {
    /// virtio-blk.
    Block(Arc<Mutex<Block>>),
    /// virtio-net.
    Net(Arc<Mutex<Net<Tap>>>),
    /// virtio-balloon.
    Balloon(Arc<Mutex<devices::virtio::balloon::Balloon>>),
}

/// One attached virtio device.
struct DeviceEntry {
    id: String,
    handle: VirtioHandle,
    transport: Arc<Mutex<MmioTransport>>,
    resources: Resources,
    irqfd: EventFd,
    /// Our handles on the queue eventfds (to unregister, and to re-kick on resume).
    queue_evts: Vec<EventFd>,
    subscriber: SubscriberId,
    /// What the user asked for.
    spec: DeviceSpec,
}

/// A virtio device's transport and its descriptors, as wired.
struct Wired {
    irqfd: EventFd,
    evts: Vec<EventFd>,
    transport: Arc<Mutex<MmioTransport>>,
}

/// What a device was made from.
#[derive(Clone, Debug)]
enum DeviceSpec {
    Disk(DiskConfig),
    Net(NetConfig, String),
    Balloon,
}

impl DeviceSpec {
    /// Kind, backend and MAC, as `ember dominfo` shows them.
    fn describe(&self) -> (&'static str, String, Option<String>) {
        match self {
            DeviceSpec::Disk(d) => ("virtio-blk", d.path.display().to_string(), None),
            DeviceSpec::Net(n, tap) => ("virtio-net", tap.clone(), n.mac.map(|m| m.to_string())),
            DeviceSpec::Balloon => ("virtio-balloon", "guest memory".into(), None),
        }
    }
}

/// A device as `ember dominfo` / `GET /ember/info` show it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The id.
    pub id: String,
    /// `virtio-blk`, `virtio-net`, `serial`, ...
    pub kind: &'static str,
    /// `mmio`, `pci` or `pio`.
    pub transport: &'static str,
    /// First address (MMIO window or PCI BAR 0) or port.
    pub address: u64,
    /// IOAPIC pin, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub irq: Option<u32>,
    /// Image path, tap name, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// MAC of a NIC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// PCI address (segment:bus:slot.function) of a PCI device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci: Option<String>,
    /// A detach of this device waits for the guest to release it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub detach_pending: bool,
}

/// The PC devices of every VM.
struct Legacy {
    i8042: Arc<Mutex<I8042>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    cmos: Arc<Mutex<Cmos>>,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    debug_exit: bool,
    pvpanic: Option<Arc<Mutex<PvPanic>>>,
}

/// A level-triggered IOAPIC pin driven with KVM_IRQ_LINE (the ACPI SCI).
struct KvmIrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl IrqLevel for KvmIrqLine {
    fn set_level(&self, high: bool) -> std::io::Result<()> {
        self.vm
            .set_irq_line(self.gsi, high)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// The devices of one VM.
pub struct DeviceManager {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    buses: Arc<Buses>,
    allocator: ResourceAllocator,
    entries: Vec<DeviceEntry>,
    legacy: Option<Legacy>,
    /// The PCI root bus and its devices, when the VM has one.
    pci: Option<pci::PciDevices>,
    /// The transport of devices that do not name one.
    default_transport: Transport,
    /// Taps made for NICs on networks so far (each gets a new name).
    taps_made: usize,
    /// Where PCI devices go when the VM is rebuilt from a snapshot.
    pci_placements: Vec<pci::PciPlacement>,
}

/// Opens the tap behind a --net: by name (created and brought up if it did not exist), a
/// handed-over descriptor, or a new tap plugged into a network's bridge.
fn open_tap(backend: &NetBackendConfig, own_name: &str) -> Result<Tap, DeviceError> {
    fn setup(name: &str) -> impl FnOnce(std::io::Error) -> DeviceError + '_ {
        move |source| DeviceError::TapSetup {
            name: name.to_string(),
            source,
        }
    }
    match backend {
        NetBackendConfig::Fd(fd) => {
            // A copy: the VM's NIC owns and closes it, while the descriptor handed over stays
            // open for the session, so a restart (reset, reboot, revert) can take it again.
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor number; no memory is involved.
            let own = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 0) };
            if own < 0 {
                return Err(tap::TapError::BadFd {
                    fd: *fd,
                    source: std::io::Error::last_os_error(),
                }
                .into());
            }
            Tap::from_fd(own).map_err(|e| {
                // SAFETY: `own` is our copy and from_fd did not take it.
                unsafe { libc::close(own) };
                match e {
                    tap::TapError::BadFd { source, .. } => {
                        tap::TapError::BadFd { fd: *fd, source }.into()
                    }
                    other => other.into(),
                }
            })
        }
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
            own_tap_on(network.bridge(), own_name)
        }
        NetBackendConfig::Bridge(bridge) => {
            if !tap::interface_exists(bridge) {
                return Err(DeviceError::NoBridge(bridge.clone()));
            }
            own_tap_on(bridge, own_name)
        }
    }
}

/// A tap of our own named `name` on `bridge`, up; gone when ember exits.
fn own_tap_on(bridge: &str, name: &str) -> Result<Tap, DeviceError> {
    let setup = |source| DeviceError::TapSetup {
        name: name.to_string(),
        source,
    };
    let t = Tap::open(name)?;
    tap::add_to_bridge(bridge, name).map_err(setup)?;
    tap::set_interface_up(name).map_err(setup)?;
    Ok(t)
}

fn irqfd(vm: &VmFd, irq: u32) -> Result<EventFd, DeviceError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    vm.register_irqfd(&evt, irq)
        .map_err(|source| DeviceError::Irqfd { irq, source })?;
    Ok(evt)
}

impl DeviceManager {
    /// An empty machine for `vm` with guest memory `mem`.
    pub fn new(vm: Arc<VmFd>, mem: GuestMemoryMmap) -> Self {
        DeviceManager {
            vm,
            mem,
            buses: Arc::new(Buses::default()),
            allocator: ResourceAllocator::default(),
            entries: Vec::new(),
            legacy: None,
            pci: None,
            default_transport: Transport::default(),
            taps_made: 0,
            pci_placements: Vec::new(),
        }
    }

    /// The transport of devices whose configuration names none.
    pub fn set_default_transport(&mut self, t: Transport) {
        self.default_transport = t;
    }

    /// The buses, shared with the vCPUs.
    pub fn buses(&self) -> Arc<Buses> {
        self.buses.clone()
    }

    /// The PC's PIO devices: i8042 (keyboard on IRQ 1, reset), CMOS RTC, ACPI PM block
    /// (power button on the SCI), and the debug-exit and pvpanic ports when asked for.
    pub fn attach_legacy(
        &mut self,
        exit: Arc<dyn ExitSink>,
        debug_exit: bool,
        pvpanic: bool,
    ) -> Result<(), DeviceError> {
        let kbd_irq: Arc<dyn Interrupt> = Arc::new(irqfd(&self.vm, i8042::I8042_KBD_IRQ)?);
        let sci: Arc<dyn IrqLevel> = Arc::new(KvmIrqLine {
            vm: self.vm.clone(),
            gsi: u32::from(acpi::SCI_IRQ),
        });
        let pio = &self.buses.pio;
        let kbd = Arc::new(Mutex::new(I8042::with_irq(exit.clone(), kbd_irq)));
        pio.insert(
            kbd.clone(),
            u64::from(i8042::I8042_DATA_PORT),
            u64::from(i8042::I8042_LEN),
        )?;
        let rtc = Arc::new(Mutex::new(Cmos::with_system_clock()));
        pio.insert(
            rtc.clone(),
            u64::from(cmos::CMOS_PORT),
            u64::from(cmos::CMOS_LEN),
        )?;
        let pm = Arc::new(Mutex::new(AcpiPm::with_sci(
            exit.clone(),
            sci,
            acpi::SLP_TYP_S5,
            acpi::RESET_VALUE,
        )));
        // The device's register offsets and the tables' ports describe the same block.
        const _: () = assert!(
            acpi_pm::BLOCK_LEN == acpi::ports::LEN as u64
                && acpi_pm::GPE0_OFFSET == (acpi::ports::GPE0_BLK - acpi::ports::BASE) as u64
        );
        pio.insert(
            pm.clone(),
            u64::from(acpi::ports::BASE),
            u64::from(acpi::ports::LEN),
        )?;
        let panic_dev = if pvpanic {
            let dev = Arc::new(Mutex::new(PvPanic::new(exit.clone())));
            pio.insert(
                dev.clone(),
                u64::from(pvpanic::PVPANIC_PORT),
                u64::from(pvpanic::PVPANIC_LEN),
            )?;
            Some(dev)
        } else {
            None
        };
        if debug_exit {
            let dev = Arc::new(Mutex::new(DebugExit::new(exit)));
            pio.insert(
                dev,
                u64::from(debug_exit::DEBUG_EXIT_PORT),
                u64::from(debug_exit::DEBUG_EXIT_LEN),
            )?;
        }
        self.legacy = Some(Legacy {
            i8042: kbd,
            acpi_pm: pm,
            cmos: rtc,
            serial: None,
            debug_exit,
            pvpanic: panic_dev,
        });
        Ok(())
    }

    /// COM1 on IRQ 4, writing to the console, fed from its input on the event loop.
    pub fn attach_serial(
        &mut self,
        events: &mut EventLoop,
        console: &Console,
        state: Arc<RunState>,
    ) -> Result<(), DeviceError> {
        let irq: Arc<dyn Interrupt> = Arc::new(irqfd(&self.vm, serial::COM1_IRQ)?);
        let rx_space = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let rx_signal = rx_space.try_clone().map_err(DeviceError::EventFd)?;
        let uart = Arc::new(Mutex::new(SerialDevice::new(
            irq,
            Arc::new(rx_signal),
            console.writer()?,
        )));
        self.buses.pio.insert(
            uart.clone(),
            u64::from(serial::COM1_PORT),
            u64::from(serial::UART_LEN),
        )?;
        let handler = ConsoleInput::new(console, uart.clone(), rx_space, state)?;
        events.add_subscriber(Arc::new(Mutex::new(handler)));
        if let Some(l) = &mut self.legacy {
            l.serial = Some(uart);
        }
        Ok(())
    }

    fn check_new_id(&self, id: &str) -> Result<(), DeviceError> {
        let ids = self.entries.iter().map(|e| &e.id);
        if ids
            .chain(self.pci_entries().iter().map(|e| &e.id))
            .any(|e| e == id)
        {
            return Err(DeviceError::DuplicateId(id.to_string()));
        }
        Ok(())
    }

    /// A virtio-blk device for `cfg` (whose id is set).
    pub fn attach_block(
        &mut self,
        events: &mut EventLoop,
        cfg: &DiskConfig,
    ) -> Result<(), DeviceError> {
        self.check_new_id(cfg.id())?;
        let opts = disk::OpenOptions {
            format: cfg.format.map(Into::into),
            read_only: cfg.readonly,
            cache: cfg.cache.into(),
            force_share: false,
        };
        let image = disk::open_image(&cfg.path, &opts).map_err(|source| DeviceError::Disk {
            path: cfg.path.display().to_string(),
            source,
        })?;
        let block = Arc::new(Mutex::new(Block::new(
            image,
            cfg.readonly,
            cfg.serial.clone(),
        )));
        let b = block.clone();
        let make_handler = move |evts: &[EventFd]| -> Result<Subscriber, DeviceError> {
            let evt = evts[0].try_clone().map_err(DeviceError::EventFd)?;
            Ok(Arc::new(Mutex::new(BlockHandler::new(b, evt))))
        };
        self.attach_virtio(
            events,
            cfg.id(),
            cfg.transport,
            (block.clone(), VirtioHandle::Block(block)),
            DeviceSpec::Disk(cfg.clone()),
            make_handler,
        )
    }

    /// A virtio-net device for `cfg` (whose id and MAC are set).
    pub fn attach_net(
        &mut self,
        events: &mut EventLoop,
        cfg: &NetConfig,
    ) -> Result<(), DeviceError> {
        self.check_new_id(cfg.id())?;
        let own_tap = format!("em{}n{}", std::process::id(), self.taps_made);
        self.taps_made += 1;
        let tap = open_tap(&cfg.backend(), &own_tap)?;
        let mac = cfg.mac.map(|m| m.0).unwrap_or_else(|| mac_for("ember", 0));
        log::debug!("NIC {}: tap {} mac {mac:02x?}", cfg.id(), tap.name());
        let tap_name = tap.name().to_string();
        let net = Arc::new(Mutex::new(Net::new(tap, mac, cfg.mtu)));
        let n = net.clone();
        let make_handler = move |evts: &[EventFd]| -> Result<Subscriber, DeviceError> {
            let rx = evts[0].try_clone().map_err(DeviceError::EventFd)?;
            let tx = evts[1].try_clone().map_err(DeviceError::EventFd)?;
            let handler = NetHandler::new(n, rx, tx).map_err(DeviceError::EventFd)?;
            Ok(Arc::new(Mutex::new(handler)))
        };
        self.attach_virtio(
            events,
            cfg.id(),
            cfg.transport,
            (net.clone(), VirtioHandle::Net(net)),
            DeviceSpec::Net(cfg.clone(), tap_name),
            make_handler,
        )
    }

    /// Attaches a virtio device on its transport (`transport`, or the VM's default) and
    /// subscribes the handler `make_handler` builds from the queue eventfds.
    fn attach_virtio(
        &mut self,
        events: &mut EventLoop,
        id: &str,
        transport: Option<Transport>,
        (device, handle): (Arc<Mutex<dyn VirtioDevice>>, VirtioHandle),
        spec: DeviceSpec,
        make_handler: impl FnOnce(&[EventFd]) -> Result<Subscriber, DeviceError>,
    ) -> Result<(), DeviceError> {
        if transport.unwrap_or(self.default_transport) == Transport::Pci {
            return self.attach_virtio_pci(events, id, device, handle, spec, make_handler);
        }
        let (resources, w) = self.attach_virtio_mmio(device)?;
        let subscriber = events.add_subscriber(make_handler(&w.evts)?);
        self.entries.push(DeviceEntry {
            id: id.to_string(),
            handle,
            transport: w.transport,
            resources,
            irqfd: w.irqfd,
            queue_evts: w.evts,
            subscriber,
            spec,
        });
        Ok(())
    }

    /// Places a virtio device on the MMIO bus: window and IRQ from the allocator, irqfd,
    /// one ioeventfd per queue. Returns the resources, the irqfd and the queue eventfds.
    fn attach_virtio_mmio(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(Resources, Wired), DeviceError> {
        let irq = self.allocator.alloc_irq().ok_or(DeviceError::NoIrq)?;
        let Some((base, len)) = self.allocator.alloc_mmio() else {
            self.allocator.free(Resources {
                mmio: None,
                irq: Some(irq),
            });
            return Err(DeviceError::NoIrq);
        };
        let resources = Resources {
            mmio: Some((base, len)),
            irq: Some(irq),
        };
        match self.wire_virtio_mmio(device, base, len, irq) {
            Ok(w) => Ok((resources, w)),
            Err(e) => {
                self.allocator.free(resources);
                Err(e)
            }
        }
    }

    fn wire_virtio_mmio(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        base: u64,
        len: u64,
        irq: u32,
    ) -> Result<Wired, DeviceError> {
        let line = irqfd(&self.vm, irq)?;
        let ours = line.try_clone().map_err(DeviceError::EventFd)?;
        let queues = devices::bus::lock_device(&device, |d| d.queue_max_sizes().len());
        let evts = queue_eventfds(queues)?;
        let transport_evts = clone_eventfds(&evts)?;
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            Arc::new(line),
            self.mem.clone(),
            transport_evts,
        )));
        let notifies = devices::bus::lock_device(&transport, |t| t.queue_notifies());
        if let Err(e) = register_notifies(self.vm.as_ref(), base, &notifies, &evts) {
            self.unregister_irqfd(&ours, irq);
            return Err(e);
        }
        if let Err(e) = self.buses.mmio.insert(transport.clone(), base, len) {
            unregister_notifies(self.vm.as_ref(), base, &notifies, &evts);
            self.unregister_irqfd(&ours, irq);
            return Err(e.into());
        }
        Ok(Wired {
            irqfd: ours,
            evts,
            transport,
        })
    }

    /// Unregisters a device's irqfd.
    fn unregister_irqfd(&self, irqfd: &EventFd, irq: u32) {
        if let Err(e) = self.vm.unregister_irqfd(irqfd, irq) {
            log::warn!("cannot unregister the irqfd of IRQ {irq}: {e}");
        }
    }

    /// Takes device `id` off its bus and the event loop and frees its resources.
    pub fn detach(&mut self, events: &mut EventLoop, id: &str) -> Result<(), DeviceError> {
        let Some(pos) = self.entries.iter().position(|e| e.id == id) else {
            return match self.detach_pci(events, id) {
                true => Ok(()),
                false => Err(DeviceError::NoSuchDevice(id.to_string())),
            };
        };
        let entry = self.entries.remove(pos);
        if let Some((base, _)) = entry.resources.mmio {
            self.buses.mmio.remove(base);
            let notifies = devices::bus::lock_device(&entry.transport, |t| t.queue_notifies());
            unregister_notifies(self.vm.as_ref(), base, &notifies, &entry.queue_evts);
            self.unregister_irqfd(&entry.irqfd, entry.resources.irq.unwrap_or_default());
        }
        if let Err(e) = events.remove_subscriber(entry.subscriber) {
            log::warn!("device {id}: cannot leave the event loop: {e:?}");
        }
        self.allocator.free(entry.resources);
        Ok(())
    }

    /// Signals every queue of every device, so work the guest posted while the devices
    /// were not looking is picked up (after a resume or a restore).
    pub fn kick_queues(&self) {
        let mmio = self.entries.iter().map(|e| (&e.id, &e.queue_evts));
        let pci = self.pci_entries().iter().map(|e| (&e.id, &e.queue_evts));
        for (id, evts) in mmio.chain(pci) {
            for evt in evts {
                if let Err(err) = evt.write(1) {
                    log::warn!("device {id}: cannot kick a queue: {err}");
                }
            }
        }
    }

    /// Kernel command-line entries announcing the virtio-mmio devices.
    pub fn cmdline(&self) -> String {
        let entries: Vec<String> = self
            .entries
            .iter()
            .filter_map(|e| match (e.resources.mmio, e.resources.irq) {
                (Some((base, len)), Some(irq)) => {
                    Some(format!("virtio_mmio.device={}K@{base:#x}:{irq}", len >> 10))
                }
                _ => None,
            })
            .collect();
        entries.join(" ")
    }

    /// The attached devices, legacy ones first.
    pub fn info(&self) -> Vec<DeviceInfo> {
        let mut out = Vec::new();
        if let Some(l) = &self.legacy {
            let pio = |id: &str, kind, port: u16, irq| DeviceInfo {
                id: id.to_string(),
                kind,
                transport: "pio",
                address: u64::from(port),
                irq,
                backend: None,
                mac: None,
                pci: None,
                detach_pending: false,
            };
            if l.serial.is_some() {
                out.push(pio(
                    "serial0",
                    "serial",
                    serial::COM1_PORT,
                    Some(serial::COM1_IRQ),
                ));
            }
            out.push(pio(
                "i8042",
                "i8042",
                i8042::I8042_DATA_PORT,
                Some(i8042::I8042_KBD_IRQ),
            ));
            out.push(pio("rtc", "cmos-rtc", cmos::CMOS_PORT, None));
            out.push(pio(
                "acpi-pm",
                "acpi-pm",
                acpi::ports::BASE,
                Some(u32::from(acpi::SCI_IRQ)),
            ));
            if l.pvpanic.is_some() {
                out.push(pio("pvpanic", "pvpanic", pvpanic::PVPANIC_PORT, None));
            }
            if l.debug_exit {
                out.push(pio(
                    "debug-exit",
                    "isa-debug-exit",
                    debug_exit::DEBUG_EXIT_PORT,
                    None,
                ));
            }
        }
        for e in &self.entries {
            let (kind, backend, mac) = e.spec.describe();
            out.push(DeviceInfo {
                id: e.id.clone(),
                kind,
                transport: "mmio",
                address: e.resources.mmio.map_or(0, |m| m.0),
                irq: e.resources.irq,
                backend: Some(backend),
                mac,
                pci: None,
                detach_pending: false,
            });
        }
        out.extend(self.pci_info());
        out
    }

    /// The virtio devices with their ids, in attach order.
    pub fn virtio_devices(&self) -> impl Iterator<Item = (&str, &VirtioHandle)> {
        let mmio = self.entries.iter().map(|e| (e.id.as_str(), &e.handle));
        mmio.chain(
            self.pci_entries()
                .iter()
                .map(|e| (e.id.as_str(), &e.handle)),
        )
    }

    /// Per-device I/O counters: (disks, NICs).
    pub fn counters(&self) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
        let (mut disks, mut nets) = (Vec::new(), Vec::new());
        for (id, handle) in self.virtio_devices() {
            match handle {
                VirtioHandle::Block(b) => {
                    let s = devices::bus::lock_device(b, |b| b.stats());
                    disks.push(serde_json::json!({ "id": id, "stats": s }));
                }
                VirtioHandle::Net(n) => {
                    let s = devices::bus::lock_device(n, |n| n.stats());
                    nets.push(serde_json::json!({ "id": id, "stats": s }));
                }
                VirtioHandle::Balloon(_) => {}
            }
        }
        (disks, nets)
    }

    /// The i8042 (Ctrl-Alt-Del).
    pub fn i8042(&self) -> Option<Arc<Mutex<I8042>>> {
        self.legacy.as_ref().map(|l| l.i8042.clone())
    }

    /// The ACPI PM block (power button).
    pub fn acpi_pm(&self) -> Option<Arc<Mutex<AcpiPm>>> {
        self.legacy.as_ref().map(|l| l.acpi_pm.clone())
    }
}
