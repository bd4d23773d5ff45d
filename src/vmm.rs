//! One VM: KVM objects, guest memory, boot state, devices, vCPU threads, and the event loop
//! that runs on the calling thread until the VM's run ends.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boot::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use boot::x86_64::cpuid::{self, CpuidError, FeatureEdits};
use boot::{BootError, BootSpec, LoaderError};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::console::Console;
use crate::device_manager::{DeviceError, DeviceManager, EventLoop};
use crate::memory::{self, MemoryError};
use crate::run_state::{Outcome, RunState};
use crate::signals;
use crate::vcpu::{self, Vcpu, VcpuError};

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
}

impl VmmError {
    /// True for errors the user fixes by changing the command line (exit status 2).
    pub fn is_user_error(&self) -> bool {
        match self {
            VmmError::TooManyCpus { .. } | VmmError::Open { .. } | VmmError::Cpuid(_) => true,
            VmmError::Device(
                DeviceError::Disk { .. }
                | DeviceError::NoIrq
                | DeviceError::Tap(_)
                | DeviceError::Network { .. },
            ) => true,
            VmmError::Boot(BootError::Loader(e)) => !matches!(e, LoaderError::Write(_)),
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

/// A built VM, ready to run.
pub struct Vmm {
    // Field order is drop order: vCPUs and the VM go before the memory they map.
    vcpus: Vec<Vcpu>,
    events: EventLoop,
    state: Arc<RunState>,
    _vm: VmFd,
    _kvm: Kvm,
    _mem: GuestMemoryMmap,
}

/// The CPUID plan of a VM: KVM's supported CPUID with the host defaults and the user's
/// edits applied, the features asked hidden, and those hidden because of the host.
struct CpuidPlan {
    entries: Vec<kvm_cpuid_entry2>,
    hidden: Vec<&'static str>,
    host_hidden: Vec<&'static str>,
}

fn vm_cpuid(kvm: &Kvm, user: &FeatureEdits) -> Result<CpuidPlan, VmmError> {
    let mut entries = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?
        .as_slice()
        .to_vec();
    let mut defaults = FeatureEdits::default();
    if crate::host::kvm_emulates_guest_kernel() {
        for name in cpuid::HIDDEN_ON_EMULATING_HOSTS {
            defaults.push(name, true);
        }
    }
    let edits = defaults.clone().then(user);
    cpuid::apply_edits(&mut entries, &edits)?;
    // Only the features asked for, not their dependents: a guest drops those itself, and
    // Linux reads at most 127 bytes of clearcpuid=.
    let hidden: Vec<_> = edits
        .hide
        .iter()
        .filter(|n| !edits.show.contains(n))
        .copied()
        .collect();
    let host_hidden = defaults
        .hide
        .iter()
        .filter(|n| hidden.contains(n))
        .copied()
        .collect();
    Ok(CpuidPlan {
        entries,
        hidden,
        host_hidden,
    })
}

/// The command line the guest gets, and the features it names: the user's line plus
/// `clearcpuid=` naming the features that should be hidden but that the host's KVM shows
/// the guest anyway (some hosts override parts of the CPUID a VMM sets). A Linux guest then
/// leaves them alone. Only architectural CPUID bits can be named there.
pub fn guest_cmdline(user: &str, forced: &[&'static str]) -> (String, Vec<&'static str>) {
    let (named, unnamed): (Vec<&'static str>, Vec<&'static str>) = forced
        .iter()
        .partition(|n| cpuid::feature(n).is_some_and(|f| f.leaf < cpuid::KVM_FEATURES - 1));
    if !unnamed.is_empty() {
        log::warn!(
            "host KVM shows hidden features {} to the guest and no command line can hide them",
            unnamed.join(",")
        );
    }
    if named.is_empty() {
        return (user.to_string(), named);
    }
    if user
        .split_whitespace()
        .any(|w| w.starts_with("clearcpuid="))
    {
        log::warn!(
            "host KVM shows hidden CPU features {} to the guest; the command line's \
             clearcpuid= is left as given",
            named.join(",")
        );
        return (user.to_string(), Vec::new());
    }
    let line = format!("{} clearcpuid={}", user.trim_end(), named.join(","));
    (line, named)
}

/// The one line saying what the host made Ember hide.
fn log_host_hiding(host_hidden: &[&str], cleared: &[&str]) {
    if host_hidden.is_empty() {
        return;
    }
    let mut line = format!(
        "host KVM emulates guest kernel code (kvm_pvm or no vmx/svm): hiding CPU features {} \
         (override with --cpu-features +NAME)",
        host_hidden.join(",")
    );
    if !cleared.is_empty() {
        let list = cleared.join(",");
        line.push_str(&format!(
            "; the host shows {list} anyway, so clearcpuid={list} is added to the command line"
        ));
    }
    log::info!("{line}");
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
    if usize::from(cfg.cpus) > max {
        return Err(VmmError::TooManyCpus {
            want: cfg.cpus,
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
    vm.create_irq_chip()
        .map_err(|e| VmmError::Kvm("KVM_CREATE_IRQCHIP", e))?;

    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmmError::Kvm("KVM_CREATE_PIT2", e))?;
    Ok(vm)
}

impl Vmm {
    /// Builds the VM described by `cfg`, its serial console on `console`.
    pub fn new(cfg: &VmConfig, console: &Console) -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        let plan = vm_cpuid(&kvm, &cfg.cpu_features)?;
        let vm = create_vm(&kvm, cfg)?;
        let mem = memory::create_guest_memory(cfg.memory)?;
        memory::register_with_kvm(&vm, &mem)?;

        let state =
            Arc::new(RunState::new().map_err(|e| VmmError::Device(DeviceError::EventFd(e)))?);
        let mut events = EventLoop::new().map_err(VmmError::EventLoop)?;
        events.add_subscriber(Arc::new(Mutex::new(ExitWatcher(state.clone()))));
        signals::subscribe(&mut events, state.clone());

        let mut devices = DeviceManager::new();
        devices.attach_legacy(state.clone(), cfg.debug_exit)?;
        devices.attach_serial(&vm, &mut events, console, state.clone())?;
        for disk in &cfg.disks {
            devices.attach_block(&vm, &mut events, &mem, disk)?;
        }
        for (i, net) in cfg.nets.iter().enumerate() {
            devices.attach_net(&vm, &mut events, &mem, net, i, &cfg.name)?;
        }
        let device_cmdline = devices.cmdline();
        let buses = Arc::new(devices.into_buses());

        let tsc_deadline = vm.check_extension(Cap::TscDeadlineTimer);
        let mut vcpus = Vec::with_capacity(usize::from(cfg.cpus));
        for id in 0..cfg.cpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
            let cpuid = cpuid::for_vcpu(&plan.entries, id, cfg.cpus, tsc_deadline);
            let vcpu = Vcpu::new(fd, id, &cpuid, buses.clone(), state.clone(), mem.clone())?;
            vcpus.push(vcpu);
        }
        let forced = cpuid::visible(&vcpus[0].effective_cpuid()?, &plan.hidden);
        let mut user_cmdline = cfg.cmdline.clone();
        if let Some(root) = &cfg.root {
            user_cmdline.push_str(&format!(" root={root} rw"));
        }
        if !device_cmdline.is_empty() {
            user_cmdline = format!("{} {device_cmdline}", user_cmdline.trim_end());
        }
        let (cmdline, cleared) = guest_cmdline(&user_cmdline, &forced);

        let mut kernel = open("--kernel", &cfg.kernel)?;
        let mut initrd = match &cfg.initrd {
            Some(p) => Some(open("--initrd", p)?),
            None => None,
        };
        let boot_state = boot::configure_system(
            &mem,
            BootSpec {
                kernel: &mut kernel,
                initrd: initrd.as_mut(),
                cmdline: &cmdline,
                cpus: cfg.cpus,
            },
        )?;
        vcpus[0].set_boot_entry(&boot_state)?;
        log_host_hiding(&plan.host_hidden, &cleared);
        Ok(Vmm {
            vcpus,
            events,
            state,
            _vm: vm,
            _kvm: kvm,
            _mem: mem,
        })
    }

    /// Runs the VM until it ends; returns how.
    pub fn run(mut self) -> Result<Outcome, VmmError> {
        vcpu::install_kick_handler()?;
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for v in self.vcpus.drain(..) {
            match v.start() {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.state.request_exit(Outcome::Crash(e.to_string()));
                    break;
                }
            }
        }
        let mut reports = 0;
        while !self.state.is_exiting() {
            if let Err(e) = self.events.run() {
                self.state
                    .request_exit(Outcome::Crash(format!("event loop failed: {e:?}")));
            }
            if self.state.report_generation() != reports {
                reports = self.state.report_generation();
                vcpu::kick_all(&threads);
            }
        }
        stop_vcpus(threads);
        Ok(self
            .state
            .outcome()
            .unwrap_or_else(|| Outcome::Crash("the VM stopped without a reason".into())))
    }
}

/// Kicks the vCPU threads until all have left KVM_RUN, then joins them.
fn stop_vcpus(threads: Vec<JoinHandle<()>>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads.iter().any(|t| !t.is_finished()) {
        if Instant::now() > deadline {
            log::warn!("a vCPU thread did not stop; leaving it behind");
            return;
        }
        vcpu::kick_all(&threads);
        std::thread::sleep(Duration::from_millis(2));
    }
    for t in threads {
        if t.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_unchanged_when_nothing_is_forced() {
        assert_eq!(
            guest_cmdline("console=ttyS0", &[]),
            ("console=ttyS0".to_string(), vec![])
        );
    }

    #[test]
    fn forced_features_are_cleared_on_the_command_line() {
        assert_eq!(
            guest_cmdline("console=ttyS0 ", &["xsave", "smap"]),
            (
                "console=ttyS0 clearcpuid=xsave,smap".to_string(),
                vec!["xsave", "smap"]
            )
        );
    }

    #[test]
    fn user_clearcpuid_is_respected_and_kvm_leaf_bits_are_not_named() {
        assert_eq!(
            guest_cmdline("clearcpuid=avx", &["xsave"]).0,
            "clearcpuid=avx"
        );
        assert_eq!(guest_cmdline("quiet", &["kvm-pv-ipi"]).0, "quiet");
    }
}
