//! Taking a snapshot of a paused VM, and building a VM from one.

use std::path::Path;
use std::sync::Arc;

use super::{Vmm, VmmError};
use crate::run_state::VmState;
use crate::session::Session;
use crate::snapshot::{self, SnapshotError, SnapshotState};
use crate::vcpu::{VcpuEvent, VcpuResponse};
use crate::vstate;

impl Vmm {
    fn msr_list(&mut self) -> Result<Arc<Vec<u32>>, SnapshotError> {
        if let Some(m) = &self.msrs {
            return Ok(m.clone());
        }
        let m = Arc::new(vstate::msrs_to_save(&self.kvm)?);
        self.msrs = Some(m.clone());
        Ok(m)
    }

    /// The state of this paused VM; `user_paused` is whether its user paused it (it comes
    /// back paused). Disks are flushed first.
    pub fn capture(
        &mut self,
        user_paused: bool,
        memory: Vec<snapshot::MemoryRegion>,
    ) -> Result<SnapshotState, SnapshotError> {
        if self.state != VmState::Paused {
            return Err(SnapshotError::Invalid("the VM must be paused".into()));
        }
        self.devices.flush_disks().map_err(SnapshotError::Invalid)?;
        // A CPU the guest ejected since the event loop last looked has no vCPU any more.
        self.reap_ejected();
        let msrs = self.msr_list()?;
        let answers = self
            .tell_vcpus(
                || VcpuEvent::SaveState(msrs.clone()),
                |r| match r {
                    VcpuResponse::State(s) => Some(*s),
                    _ => None,
                },
            )
            .map_err(SnapshotError::Vcpu)?;
        let vcpus = answers
            .into_iter()
            .collect::<Result<Vec<_>, String>>()
            .map_err(SnapshotError::Vcpu)?;
        Ok(SnapshotState {
            ember_version: env!("CARGO_PKG_VERSION").to_string(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            paused: user_paused,
            config: self.config.clone(),
            vm: vstate::save_vm(&self.vm)?,
            vcpus,
            devices: snapshot::DevicesState {
                cpu_hotplug: self.cpu_hotplug_state(),
                ..self.devices.save_state()?
            },
            memory,
        })
    }

    /// Writes a snapshot of this paused VM: the state to `state_path`, memory to `mem_path`.
    pub fn snapshot_to(
        &mut self,
        state_path: &Path,
        mem_path: &Path,
        user_paused: bool,
    ) -> Result<(), SnapshotError> {
        if self.state != VmState::Paused {
            return Err(SnapshotError::Invalid("the VM must be paused".into()));
        }
        let layout = snapshot::memory::dump(&self.mem, mem_path)?;
        let state = self.capture(user_paused, layout)?;
        snapshot::format::write_file(state_path, &state)?;
        Ok(())
    }

    /// Builds the VM a snapshot describes, its memory mapped from `mem_path`, every state
    /// applied. It starts paused as `paused` says, or when not said, as the snapshot was.
    pub fn restore(
        state: &SnapshotState,
        mem_path: &Path,
        session: &Session,
        paused: Option<bool>,
    ) -> Result<Self, VmmError> {
        let invalid = |e: SnapshotError| VmmError::Snapshot(Box::new(e));
        state.check().map_err(invalid)?;
        let mem = snapshot::memory::map(mem_path, &state.memory, state.config.memory.0)
            .map_err(|e| invalid(e.into()))?;
        let mut vmm = Self::from_state(state, mem, session)?;
        if paused.unwrap_or(state.paused) {
            vmm.state = VmState::Paused;
        }
        Ok(vmm)
    }

    /// Builds the VM `state` describes (checked) over `mem`: the vCPUs of the present CPUs,
    /// KVM's, the vCPUs' and the devices' states applied.
    pub(super) fn from_state(
        state: &SnapshotState,
        mem: devices::GuestMemoryMmap,
        session: &Session,
    ) -> Result<Self, VmmError> {
        let invalid = |e: SnapshotError| VmmError::Snapshot(Box::new(e));
        let present = state.present_cpus();
        let mut vmm = Self::build_with_memory(
            &state.config,
            session,
            Some(mem),
            &state.devices.pci,
            Some(&present),
        )?;
        vstate::restore_vm(&vmm.vm, &state.vm).map_err(|e| invalid(e.into()))?;
        for (v, s) in vmm.vcpus.iter().zip(&state.vcpus) {
            v.restore_state(s).map_err(|e| invalid(e.into()))?;
        }
        vmm.devices
            .restore_state(&state.devices)
            .map_err(|e| invalid(e.into()))?;
        if let (Some(ctl), Some(s)) = (&vmm.cpu_hotplug, &state.devices.cpu_hotplug) {
            ctl.restore(s).map_err(|e| invalid(e.into()))?;
        }
        vmm.restored = true;
        Ok(vmm)
    }
}
