//! One VM: KVM objects, guest memory, devices and vCPUs ([`Vmm::build`]), a kernel loaded
//! into it ([`Vmm::boot`]), and the event loop that runs on the calling thread until the
//! VM's run ends ([`Vmm::run`]), answering the API between rounds. Building is separate from
//! booting so a VM can also be brought up from saved state.

mod balloon;
mod control;
pub mod cpuid;
mod cpus;
mod hotplug;
mod migrate;
mod named;
mod pit;
mod snapshot;

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boot::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use boot::x86_64::cpuid::{self as boot_cpuid, CpuidError};
use boot::{BootError, BootSpec, LoaderError};
use devices::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::config::{ConfigError, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager, EventLoop};
use crate::dirty::{DirtyLog, Tracker};
use crate::memory::{self, MemoryError};
use crate::run_state::{Outcome, RunState, VmState};
use crate::session::Session;
use crate::signals;
use crate::vcpu::{self, Vcpu, VcpuError, VcpuEvent, VcpuHandle, VcpuResponse};

/// How long a vCPU may take to answer a request.
const VCPU_ANSWER: Duration = Duration::from_secs(2);

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The host's KVM lacks a capability Ember needs.
    #[error("the host's KVM lacks {0}")]
    MissingCap(&'static str),
    /// A VM-level KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// More vCPUs than this host's KVM runs.
    #[error("--cpus: {want} vCPUs asked, this host's KVM allows {max}")]
    TooManyCpus {
        /// Asked.
        want: u8,
        /// Allowed.
        max: usize,
    },
    /// A kernel or initrd file cannot be opened.
    #[error("{option}: cannot open '{path}'")]
    Open {
        /// The option naming the file.
        option: &'static str,
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the kernel or writing boot tables.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// CPUID (`--cpu-features`).
    #[error("--cpu-features: {0}")]
    Cpuid(#[from] CpuidError),
    /// Devices.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// vCPUs.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The event loop.
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    /// A snapshot cannot be used.
    #[error("cannot restore the snapshot")]
    Snapshot(#[source] Box<crate::snapshot::SnapshotError>),
    /// Dirty-page tracking (`--track-dirty-pages`) cannot start.
    #[error("dirty-page tracking")]
    Dirty(#[source] crate::dirty::DirtyError),
}

impl VmmError {
    /// True for errors the user fixes by changing the command line (exit status 2).
    pub fn is_user_error(&self) -> bool {
        match self {
            VmmError::TooManyCpus { .. }
            | VmmError::Open { .. }
            | VmmError::Cpuid(_)
            | VmmError::Config(_) => true,
            VmmError::Device(
                DeviceError::Disk { .. }
                | DeviceError::NoIrq
                | DeviceError::Tap(_)
                | DeviceError::Network { .. }
                | DeviceError::NoBridge(_)
                | DeviceError::DuplicateId(_),
            ) => true,
            VmmError::Boot(BootError::Loader(e)) => !matches!(e, LoaderError::Write(_)),
            // A state or memory file this VM cannot be built from is the file's fault.
            VmmError::Snapshot(e) => !matches!(
                **e,
                crate::snapshot::SnapshotError::Vcpu(_) | crate::snapshot::SnapshotError::Dirty(_)
            ),
            _ => false,
        }
    }
}

/// Handles the event loop's wake-up when the run ends.
struct ExitWatcher(Arc<RunState>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.wake_fd(), EventSet::IN)) {
            log::error!("cannot watch the exit event: {e:?}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.wake_fd().read();
    }
}

/// A built VM.
pub struct Vmm {
    // Field order is drop order: vCPUs and devices go before the VM and the memory they map.
    /// Configured vCPUs, until [`Vmm::run`] starts them.
    vcpus: Vec<Vcpu>,
    /// Started vCPU threads, by index.
    handles: Vec<VcpuHandle>,
    /// CPU hotplug (a VM that may have more than one vCPU), with the unplugged vCPUs.
    cpu_hotplug: Option<cpus::CpuHotplugCtl>,
    devices: DeviceManager,
    events: EventLoop,
    run_state: Arc<RunState>,
    state: VmState,
    config: VmConfig,
    /// A guest power-off after `ember reboot` starts the VM again.
    restart_on_poweroff: bool,
    started: Instant,
    /// Built from a snapshot: queues are kicked when the vCPUs start.
    restored: bool,
    /// The MSRs a vCPU's state holds (computed on the first save).
    msrs: Option<Arc<Vec<u32>>>,
    vm: Arc<VmFd>,
    kvm: Kvm,
    mem: GuestMemoryMmap,
    plan: cpuid::CpuidPlan,
    /// An outgoing migration, if one runs or ran.
    migration: migrate::Migration,
    /// The pages written since the last snapshot, with `track_dirty_pages` (for Diff
    /// snapshots). It holds the log, and the log the VM and its memory, as long as it lives.
    snapshot_dirty: Option<Tracker>,
    /// The VM's dirty-page log (Diff snapshots, live migration).
    dirty: Arc<DirtyLog>,
    /// Detaches waiting for the guest.
    detaches: Vec<hotplug::PendingDetach>,
    /// Tells the PIT's helper when the vCPUs run.
    pit_go: pit::PitGo,
}

fn open(option: &'static str, path: &std::path::Path) -> Result<File, VmmError> {
    File::open(path).map_err(|source| VmmError::Open {
        option,
        path: path.display().to_string(),
        source,
    })
}

fn create_vm(kvm: &Kvm, cfg: &VmConfig) -> Result<VmFd, VmmError> {
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::Pit2, "an in-kernel PIT"),
        (Cap::UserMemory, "user memory slots"),
        (Cap::SetTssAddr, "KVM_SET_TSS_ADDR"),
        (Cap::ImmediateExit, "immediate_exit"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::MissingCap(name));
        }
    }
    let max = kvm.get_max_vcpus();
    if usize::from(cfg.cpus.max) > max {
        return Err(VmmError::TooManyCpus {
            want: cfg.cpus.max,
            max,
        });
    }
    let vm = kvm
        .create_vm()
        .map_err(|e| VmmError::Kvm("KVM_CREATE_VM", e))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(|e| VmmError::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|e| VmmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    Ok(vm)
}

/// The in-kernel interrupt controllers (PIC, IOAPIC, LAPICs); the PIT is [`pit`]'s.
fn create_irqchip(vm: &VmFd) -> Result<(), VmmError> {
    vm.create_irq_chip()
        .map_err(|e| VmmError::Kvm("KVM_CREATE_IRQCHIP", e))
}

impl Vmm {
    /// Builds the VM described by `cfg`: KVM, memory, devices, vCPUs; no kernel yet.
    pub fn build(cfg: &VmConfig, session: &Session) -> Result<Self, VmmError> {
        Self::build_with_memory(cfg, session, None, &[], None)
    }

    /// [`Self::build`], with guest memory given (mapped from a snapshot) or made anew.
    /// PCI devices named in `placed` (a snapshot's) go where they sat; the vCPUs are those
    /// of the CPUs `present` (default: the first `cpus.boot`).
    pub fn build_with_memory(
        cfg: &VmConfig,
        session: &Session,
        mem: Option<GuestMemoryMmap>,
        placed: &[crate::device_manager::PciDeviceState],
        present: Option<&[u8]>,
    ) -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        let plan = cpuid::vm_cpuid(&kvm, &cfg.cpu_features.0)?;
        let vm = Arc::new(create_vm(&kvm, cfg)?);
        let mem = match mem {
            Some(m) => m,
            None => memory::create_guest_memory(cfg.memory.0)?,
        };
        // Memory first: a memory slot added after the irqchip waits out an SRCU grace period.
        memory::register_with_kvm(&vm, &mem)?;
        create_irqchip(&vm)?;
        let pit = pit::PendingPit::start(&vm);
        let dirty = DirtyLog::new(vm.clone(), mem.clone());
        let snapshot_dirty = match cfg.track_dirty_pages {
            true => Some(Tracker::start(&dirty).map_err(VmmError::Dirty)?),
            false => None,
        };

        let run_state =
            Arc::new(RunState::new().map_err(|e| VmmError::Device(DeviceError::EventFd(e)))?);
        let mut events = EventLoop::new().map_err(VmmError::EventLoop)?;
        events.add_subscriber(Arc::new(Mutex::new(ExitWatcher(run_state.clone()))));
        signals::subscribe(&mut events, run_state.clone());
        if let Some(api) = &session.api {
            events.add_subscriber(api.clone());
        }

        let mut devices = DeviceManager::new(vm.clone(), mem.clone());
        devices.attach_legacy(run_state.clone(), cfg.debug_exit, cfg.pvpanic)?;
        devices.attach_serial(&mut events, &session.console, run_state.clone())?;
        devices.place_pci_devices(placed);
        Self::choose_transports(&mut devices, cfg)?;
        devices.subscribe_hotplug(&mut events)?;
        for disk in &cfg.disks {
            devices.attach_block(&mut events, disk)?;
        }
        for net in &cfg.nets {
            devices.attach_net(&mut events, net)?;
        }
        if let Some(b) = &cfg.balloon {
            devices.attach_balloon(&mut events, b)?;
        }
        let cpu_hotplug = match cfg.cpus.max {
            0 | 1 => None,
            max => Some(cpus::CpuHotplugCtl::attach(
                &devices.buses(),
                &mut events,
                max,
                cfg.cpus.boot,
            )?),
        };
        let mut vmm = Vmm {
            vcpus: Vec::new(),
            handles: Vec::new(),
            cpu_hotplug,
            devices,
            events,
            run_state,
            state: VmState::Running,
            config: cfg.clone(),
            restart_on_poweroff: false,
            started: Instant::now(),
            restored: false,
            msrs: None,
            vm,
            kvm,
            mem,
            plan,
            migration: Default::default(),
            snapshot_dirty,
            dirty,
            detaches: Vec::new(),
            pit_go: pit::PitGo::default(),
        };
        let boot: Vec<u8> = (0..cfg.cpus.boot).collect();
        for &id in present.unwrap_or(&boot) {
            let v = vmm.make_vcpu(id)?;
            vmm.vcpus.push(v);
        }
        vmm.pit_go = pit.wait()?;
        Ok(vmm)
    }

    /// The transport of devices that name none, and the PCI host (root bus, config
    /// ports, ECAM) when PCI is that default or some device's transport.
    fn choose_transports(devices: &mut DeviceManager, cfg: &VmConfig) -> Result<(), VmmError> {
        devices.set_default_transport(cfg.transport);
        if cfg.uses_pci() {
            devices.attach_pci_host()?;
        }
        Ok(())
    }

    /// The kernel command line: the user's, `root=`, the devices', `clearcpuid=`.
    fn kernel_cmdline(&self) -> Result<(String, Vec<&'static str>), VmmError> {
        let cfg = &self.config;
        let mut line = cfg.cmdline.clone();
        if let Some(root) = &cfg.root {
            let ro = cfg.disks.first().is_some_and(|d| d.readonly) && root == "/dev/vda";
            line = format!(
                "{} root={root} {}",
                line.trim_end(),
                if ro { "ro" } else { "rw" }
            );
        }
        let device_cmdline = self.devices.cmdline();
        if !device_cmdline.is_empty() {
            line = format!("{} {device_cmdline}", line.trim_end());
        }
        let forced = boot_cpuid::visible(&self.vcpus[0].effective_cpuid()?, &self.plan.hidden);
        Ok(cpuid::guest_cmdline(&line, &forced))
    }

    /// Loads the kernel, initrd and command line and points the boot vCPU at the kernel.
    pub fn boot(&mut self) -> Result<(), VmmError> {
        let (cmdline, cleared) = self.kernel_cmdline()?;
        let mut kernel = open("--kernel", &self.config.kernel)?;
        let mut initrd = match &self.config.initrd {
            Some(p) => Some(open("--initrd", p)?),
            None => None,
        };
        let boot_state = boot::configure_system(
            &self.mem,
            BootSpec {
                kernel: &mut kernel,
                initrd: initrd.as_mut(),
                cmdline: &cmdline,
                cpus: self.config.cpus.boot,
                max_cpus: self.config.cpus.max,
                pvpanic: self.config.pvpanic,
                pci: self.devices.pci_host(),
            },
        )?;
        self.vcpus[0].set_boot_entry(&boot_state)?;
        cpuid::log_host_hiding(&self.plan.host_hidden, &cleared);
        Ok(())
    }

    /// Runs the VM until it ends; returns how. API requests are answered between rounds of
    /// the event loop.
    pub fn run(&mut self, session: &Session) -> Result<Outcome, VmmError> {
        vcpu::install_kick_handler()?;
        let paused = self.state == VmState::Paused;
        for v in self.vcpus.drain(..) {
            match v.start(paused) {
                Ok(h) => self.handles.push(h),
                Err(e) => {
                    self.run_state.request_exit(Outcome::Crash(e.to_string()));
                    break;
                }
            }
        }
        self.started = Instant::now();
        self.pit_go.go(if self.restored {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        });
        if self.restored && !paused {
            self.devices.kick_queues();
        }
        let mut reports = 0;
        while !self.run_state.is_exiting() {
            let ran = match self.hotplug_tick() {
                Some(t) => self.events.run_with_timeout(t.as_millis() as i32),
                None => self.events.run(),
            };
            if let Err(e) = ran {
                self.run_state
                    .request_exit(Outcome::Crash(format!("event loop failed: {e:?}")));
            }
            if self.run_state.report_generation() != reports {
                reports = self.run_state.report_generation();
                self.handles.iter().for_each(VcpuHandle::kick);
            }
            self.reap_ejected();
            // Ejects first: a snapshot or migration then sees the devices the guest has.
            self.serve_hotplug(session);
            self.serve_api(session);
            self.serve_migration(session);
        }
        self.stop_vcpus();
        let outcome = self
            .run_state
            .outcome()
            .unwrap_or_else(|| Outcome::Crash("the VM stopped without a reason".into()));
        Ok(match outcome {
            Outcome::PowerOff | Outcome::Reset if self.restart_on_poweroff => Outcome::Restart,
            other => other,
        })
    }

    /// Ends every vCPU thread (parked ones too) and joins them.
    fn stop_vcpus(&mut self) {
        for h in &self.handles {
            h.send(VcpuEvent::Finish);
        }
        for h in self.handles.drain(..) {
            h.finish(Duration::from_secs(5));
        }
    }

    /// Sends `event()` to every vCPU and collects each one's answer that `want` accepts.
    fn tell_vcpus<T>(
        &mut self,
        event: impl Fn() -> VcpuEvent,
        want: impl Fn(VcpuResponse) -> Option<T>,
    ) -> Result<Vec<T>, String> {
        for h in &self.handles {
            if !h.send(event()) {
                return Err(format!("vCPU {} is gone", h.id()));
            }
        }
        let mut out = Vec::with_capacity(self.handles.len());
        for h in &self.handles {
            let deadline = Instant::now() + VCPU_ANSWER;
            loop {
                match h.response(Duration::from_millis(20)) {
                    Some(VcpuResponse::Exited) => return Err(format!("vCPU {} ended", h.id())),
                    Some(r) => {
                        if let Some(t) = want(r) {
                            out.push(t);
                            break;
                        }
                    }
                    None if Instant::now() > deadline => {
                        return Err(format!("vCPU {} did not answer", h.id()))
                    }
                    // A kick sent before the thread entered KVM_RUN can be missed: resend it.
                    None => h.kick(),
                }
            }
        }
        Ok(out)
    }

    /// Parks every vCPU (no CPU use) and lets devices finish what they hold.
    pub fn pause(&mut self) -> Result<(), String> {
        if self.state == VmState::Paused {
            return Ok(());
        }
        self.tell_vcpus(
            || VcpuEvent::Pause,
            |r| matches!(r, VcpuResponse::Paused).then_some(()),
        )?;
        self.state = VmState::Paused;
        Ok(())
    }

    /// Lets every vCPU run again; queue work posted meanwhile is picked up.
    pub fn resume(&mut self) -> Result<(), String> {
        if self.state == VmState::Running {
            return Ok(());
        }
        self.reopen_disks()?;
        self.tell_vcpus(
            || VcpuEvent::Resume,
            |r| matches!(r, VcpuResponse::Resumed).then_some(()),
        )?;
        self.devices.kick_queues();
        self.state = VmState::Running;
        Ok(())
    }

    /// What the VM is doing.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Its configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }
}
