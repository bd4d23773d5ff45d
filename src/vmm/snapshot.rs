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

    /// Writes a snapshot of this paused VM: the state to `state_path`, all of memory to
    /// `mem_path`. With dirty-page tracking on, the next Diff holds the pages written after.
    pub fn snapshot_to(
        &mut self,
        state_path: &Path,
        mem_path: &Path,
        user_paused: bool,
    ) -> Result<(), SnapshotError> {
        self.write_snapshot(state_path, mem_path, user_paused, false)
    }

    /// Whether Diff snapshots can be taken (dirty-page tracking is on).
    pub fn tracks_dirty_pages(&self) -> bool {
        self.snapshot_dirty.is_some()
    }

    /// A Diff snapshot of this paused VM: the state to `state_path`, and to `mem_path` only
    /// the pages written since the last snapshot (or since the VM was built or loaded), at
    /// the offsets a full memory file has them, holes elsewhere.
    pub fn diff_snapshot_to(
        &mut self,
        state_path: &Path,
        mem_path: &Path,
        user_paused: bool,
    ) -> Result<(), SnapshotError> {
        self.write_snapshot(state_path, mem_path, user_paused, true)
    }

    /// From now on, a Diff holds every page (a VM built again after a reset or revert in
    /// this process: its memory is not what the last snapshot's base holds).
    pub fn mark_all_dirty(&self) {
        if let Some(t) = &self.snapshot_dirty {
            t.mark_all();
        }
    }

    /// Writes a Full or Diff snapshot. The dirty pages are taken first and given back if
    /// the snapshot fails, so a failed snapshot loses none (Firecracker's transactional
    /// diff snapshots).
    fn write_snapshot(
        &mut self,
        state_path: &Path,
        mem_path: &Path,
        user_paused: bool,
        diff: bool,
    ) -> Result<(), SnapshotError> {
        if self.state != VmState::Paused {
            return Err(SnapshotError::Invalid("the VM must be paused".into()));
        }
        let pages = match &self.snapshot_dirty {
            Some(t) => Some(t.take().map_err(SnapshotError::Dirty)?),
            None if diff => {
                return Err(SnapshotError::Invalid(
                    "dirty-page tracking is off: Diff snapshots need it".into(),
                ))
            }
            None => None,
        };
        let written = self.write_memory_and_state(state_path, mem_path, user_paused, diff, &pages);
        if let (Err(_), Some(t), Some(p)) = (&written, &self.snapshot_dirty, &pages) {
            t.put_back(p);
        }
        written
    }

    fn write_memory_and_state(
        &mut self,
        state_path: &Path,
        mem_path: &Path,
        user_paused: bool,
        diff: bool,
        pages: &Option<crate::dirty::PageSet>,
    ) -> Result<(), SnapshotError> {
        let layout = match pages {
            Some(p) if diff => snapshot::memory::dump_pages(&self.mem, mem_path, p)?,
            _ => snapshot::memory::dump(&self.mem, mem_path)?,
        };
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
