//! vCPUs at run time: `ember setvcpus` through ACPI CPU hotplug.
//!
//! A VM that may have more than one vCPU gets the CPU hotplug controller
//! ([`devices::legacy::CpuHotplug`]) that the DSDT's `\_SB.CPUS` reads. Growing the VM
//! creates the vCPU (or takes back one unplugged earlier: KVM cannot destroy a vCPU), starts
//! its thread waiting for INIT/SIPI, marks the CPU inserted and raises the CPU hotplug GPE:
//! the guest's ACPI code notifies the CPU, the guest adds it and (the guest kit's init does
//! this) brings it online with INIT/SIPI. Shrinking marks the highest CPUs for removal and
//! raises the GPE: the guest takes them offline and ejects them (`_EJ0`); the controller
//! signals the eject and the VMM ends the vCPU's thread, keeping the vCPU for a later plug.
//!
//! The configuration's `cpus.boot` follows the present count, so a snapshot (which holds one
//! vCPU state per present CPU and the controller's state) describes the VM as it is.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::lock_device;
use devices::legacy::cpu_hotplug::{CpuHotplugError, CpuHotplugState};
use devices::legacy::CpuHotplug;
use devices::persist::Persist;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::Cap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Vmm, VmmError};
use crate::device_manager::{DeviceError, EventLoop};
use crate::run_state::VmState;
use crate::vcpu::{Vcpu, VcpuHandle};

/// How long an unplugged vCPU's thread may take to end.
const PARK_WAIT: Duration = Duration::from_secs(5);

/// Why `setvcpus` cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum SetVcpusError {
    /// A count outside 1..=max.
    #[error("{count} vCPUs: give 1 to {max} (the VM's --cpus max)")]
    OutOfRange {
        /// Asked.
        count: u8,
        /// The VM's maximum.
        max: u8,
    },
    /// The controller refused (a bug in the bookkeeping).
    #[error("CPU hotplug")]
    Controller(#[from] CpuHotplugError),
    /// A vCPU could not be created or started.
    #[error("cannot add vCPU {id}")]
    Vcpu {
        /// The CPU.
        id: u8,
        /// Cause.
        #[source]
        source: Box<VmmError>,
    },
}

impl SetVcpusError {
    /// True when the request was wrong (not the VM).
    pub fn is_user_error(&self) -> bool {
        matches!(self, SetVcpusError::OutOfRange { .. })
    }
}

/// The controller, the eject signal and the unplugged vCPUs.
pub(super) struct CpuHotplugCtl {
    dev: Arc<Mutex<CpuHotplug>>,
    /// Unplugged vCPUs (their threads ended), for the next plug of their CPU.
    parked: Vec<Vcpu>,
}

/// Wakes the event loop when the guest ejects a CPU (the VMM then ends its thread).
struct EjectWatcher(Arc<EventFd>);

impl MutEventSubscriber for EjectWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.as_ref(), EventSet::IN)) {
            log::error!("cannot watch the CPU eject event: {e:?}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.read();
    }
}

impl CpuHotplugCtl {
    /// The controller for up to `max` CPUs, `boot` present, on its ports.
    pub(super) fn attach(
        buses: &crate::vcpu::Buses,
        events: &mut EventLoop,
        max: u8,
        boot: u8,
    ) -> Result<Self, VmmError> {
        let fd =
            EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Device(DeviceError::EventFd(e)))?;
        let fd = Arc::new(fd);
        events.add_subscriber(Arc::new(Mutex::new(EjectWatcher(fd.clone()))));
        let dev = Arc::new(Mutex::new(CpuHotplug::with_signal(max, boot, fd)));
        buses
            .pio
            .insert(
                dev.clone(),
                u64::from(boot::x86_64::acpi::cpus::CPU_HOTPLUG_PORT),
                u64::from(devices::legacy::cpu_hotplug::CPU_HOTPLUG_LEN),
            )
            .map_err(|e| VmmError::Device(DeviceError::from(e)))?;
        Ok(CpuHotplugCtl {
            dev,
            parked: Vec::new(),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut CpuHotplug) -> R) -> R {
        lock_device(&self.dev, f)
    }

    /// The controller's state, for a snapshot.
    pub(super) fn save(&self) -> CpuHotplugState {
        self.with(|d| d.save())
    }

    /// Puts the controller in a saved state.
    pub(super) fn restore(&self, s: &CpuHotplugState) -> Result<(), devices::persist::StateError> {
        self.with(|d| d.restore(s))
    }
}

impl Vmm {
    /// A new vCPU `id` with this VM's CPUID, waiting for INIT/SIPI.
    pub(super) fn make_vcpu(&self, id: u8) -> Result<Vcpu, VmmError> {
        let tsc_deadline = self.vm.check_extension(Cap::TscDeadlineTimer);
        let fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VmmError::Kvm("KVM_CREATE_VCPU", e))?;
        let max = self.config.cpus.max;
        let cpuid = boot::x86_64::cpuid::for_vcpu(&self.plan.entries, id, max, tsc_deadline);
        Ok(Vcpu::new(
            fd,
            id,
            &cpuid,
            self.devices.buses(),
            self.run_state.clone(),
            self.mem.clone(),
        )?)
    }

    /// The present vCPUs, ascending.
    pub fn present_vcpus(&self) -> Vec<u8> {
        match &self.cpu_hotplug {
            Some(c) => c.with(|d| d.present()),
            None => (0..self.config.cpus.boot).collect(),
        }
    }

    /// Asks for `count` vCPUs: plugs CPUs in or asks the guest to give some back.
    pub fn set_vcpus(&mut self, count: u8) -> Result<(), SetVcpusError> {
        let max = self.config.cpus.max;
        if count == 0 || count > max {
            return Err(SetVcpusError::OutOfRange { count, max });
        }
        let Some(ctl) = &self.cpu_hotplug else {
            return Ok(()); // max is 1: nothing to change
        };
        let (active, present) = ctl.with(|d| (d.active(), d.present()));
        let want = usize::from(count);
        if want < active.len() {
            ctl.with(|d| {
                active[want..]
                    .iter()
                    .rev()
                    .try_for_each(|&id| d.request_remove(id))
            })?;
            self.raise_cpu_hotplug_gpe();
            return Ok(());
        }
        let mut need = want - active.len();
        if need == 0 {
            return Ok(());
        }
        // First withdraw removals the guest has not done yet, lowest CPUs first.
        let leaving: Vec<u8> = present
            .iter()
            .copied()
            .filter(|p| !active.contains(p))
            .take(need)
            .collect();
        for &id in &leaving {
            ctl.with(|d| d.cancel_remove(id))?;
        }
        need -= leaving.len();
        let absent: Vec<u8> = (0..max).filter(|id| !present.contains(id)).collect();
        // Even when a plug fails, the guest hears of those done before it.
        let plugged = absent
            .into_iter()
            .take(need)
            .try_for_each(|id| self.plug(id));
        self.follow_present();
        self.raise_cpu_hotplug_gpe();
        plugged
    }

    /// Starts vCPU `id` (new, or the one unplugged before) and marks its CPU inserted.
    fn plug(&mut self, id: u8) -> Result<(), SetVcpusError> {
        let fail = |e: VmmError| SetVcpusError::Vcpu {
            id,
            source: Box::new(e),
        };
        let parked = self.cpu_hotplug.as_mut().and_then(|c| {
            let at = c.parked.iter().position(|v| v.id() == id)?;
            Some(c.parked.swap_remove(at))
        });
        let vcpu = match parked {
            Some(mut v) => match v.reinit() {
                Ok(()) => v,
                Err(e) => {
                    if let Some(c) = self.cpu_hotplug.as_mut() {
                        c.parked.push(v);
                    }
                    return Err(fail(e.into()));
                }
            },
            None => self.make_vcpu(id).map_err(fail)?,
        };
        let handle = vcpu
            .start(self.state == VmState::Paused)
            .map_err(|e| fail(e.into()))?;
        self.insert_handle(handle);
        if let Some(c) = &self.cpu_hotplug {
            c.with(|d| d.insert(id))?;
        }
        Ok(())
    }

    fn insert_handle(&mut self, h: VcpuHandle) {
        let at = self.handles.partition_point(|x| x.id() < h.id());
        self.handles.insert(at, h);
    }

    /// Ends the threads of the vCPUs the guest ejected, keeping the vCPUs.
    pub(super) fn reap_ejected(&mut self) {
        let Some(ctl) = &self.cpu_hotplug else { return };
        let ejected = ctl.with(|d| d.take_ejected());
        if ejected.is_empty() {
            return;
        }
        for id in ejected {
            let Some(at) = self.handles.iter().position(|h| h.id() == id) else {
                continue;
            };
            let h = self.handles.remove(at);
            match h.take_back(PARK_WAIT) {
                Some(v) => {
                    if let Some(c) = self.cpu_hotplug.as_mut() {
                        c.parked.push(v);
                    }
                    log::info!("vCPU {id} unplugged");
                }
                None => log::error!("vCPU {id} was ejected but its thread did not end"),
            }
        }
        self.follow_present();
    }

    /// The configuration's vCPU count follows the present CPUs.
    fn follow_present(&mut self) {
        let n = self.present_vcpus().len() as u8;
        self.config.cpus.boot = n.max(1);
    }

    /// Tells the guest's ACPI code to look at the CPUs (`\_GPE._E02` calls `CSCN`). A guest
    /// that has not enabled the GPE (no ACPI, or not booted that far) finds the status bit
    /// set when it does.
    fn raise_cpu_hotplug_gpe(&self) {
        let Some(pm) = self.devices.acpi_pm() else {
            return;
        };
        let enabled = lock_device(&pm, |pm| pm.raise_gpe(boot::x86_64::acpi::GPE_CPU_HOTPLUG));
        if !enabled {
            log::info!("CPU hotplug: the guest has not enabled its GPE yet");
        }
    }

    /// The controller's state, for a snapshot.
    pub(super) fn cpu_hotplug_state(&self) -> Option<CpuHotplugState> {
        self.cpu_hotplug.as_ref().map(CpuHotplugCtl::save)
    }
}
