//! One vCPU's state: registers, FPU/XSAVE, LAPIC, MSRs, events, CPUID and TSC frequency.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Deserializer, Serialize};

use super::codec::{self, exact};
use super::{kvmclock_ctrl, vcpu_err, vm_err, StateError};

/// The time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// The LAPIC timer's TSC deadline.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// kvmclock: the guest's wall-clock page (old number).
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
/// kvmclock: the vCPU's time page (old number).
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
/// kvmclock: the guest's wall-clock page.
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// kvmclock: the vCPU's time page.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// MSRs written after all others. KVM arms the TSC-deadline timer by comparing the deadline
/// with the guest's TSC: written before the TSC, the deadline is judged against the new
/// vCPU's TSC and its interrupt can be lost or come early.
const DEFERRED_MSRS: &[u32] = &[MSR_IA32_TSC_DEADLINE];

/// MSRs KVM emulates but leaves out of `KVM_GET_MSR_INDEX_LIST`: the MTRRs (default type,
/// fixed ranges, 8 variable base/mask pairs) and PAT, which a guest kernel programs.
const UNLISTED_MSRS: &[u32] = &[
    0x2ff, 0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f, 0x200,
    0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, 0x208, 0x209, 0x20a, 0x20b, 0x20c, 0x20d,
    0x20e, 0x20f, 0x277,
];

/// The most MSRs a state may hold: four `KVM_SET_MSRS` calls' worth, well above what any
/// KVM lists (a snapshot with more is corrupt or hostile).
pub const MAX_MSRS: usize = 4 * KVM_MAX_MSR_ENTRIES;

/// One MSR and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    /// The MSR's number.
    pub index: u32,
    /// Its value.
    pub value: u64,
}

/// The legacy FPU and SSE registers (`KVM_GET_FPU`), kept as well as XSAVE: the state for a
/// KVM without the XSAVE ioctls, and readable in a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuRegs {
    /// x87 registers ST0-ST7 (80 bits each, in 16-byte slots).
    pub fpr: [[u8; 16]; 8],
    /// x87 control word.
    pub fcw: u16,
    /// x87 status word.
    pub fsw: u16,
    /// Abridged x87 tag word.
    pub ftwx: u8,
    /// Last x87 opcode.
    pub last_opcode: u16,
    /// Last x87 instruction pointer.
    pub last_ip: u64,
    /// Last x87 data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15.
    pub xmm: [[u8; 16]; 16],
    /// SSE control and status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuRegs {
    fn from(f: &kvm_fpu) -> Self {
        FpuRegs {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuRegs> for kvm_fpu {
    fn from(f: &FpuRegs) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The XSAVE area of `KVM_GET_XSAVE`: 4 KiB, the whole state of a guest given no
/// dynamically enabled XSTATE (AMX tiles need `KVM_GET_XSAVE2`; Ember grants none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct XsaveArea(#[serde(with = "exact")] pub [u32; 1024]);

/// Everything KVM holds for one vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given.
    #[serde(serialize_with = "codec::serialize_blobs")]
    #[serde(deserialize_with = "cpuid_entries")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Runnable, halted, waiting for INIT/SIPI.
    #[serde(with = "exact")]
    pub mp_state: kvm_mp_state,
    /// General registers.
    #[serde(with = "exact")]
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    #[serde(with = "exact")]
    pub sregs: kvm_sregs,
    /// x87 and SSE registers.
    pub fpu: FpuRegs,
    /// The XSAVE area (x87, SSE, AVX...), when KVM has the XSAVE ioctls.
    pub xsave: Option<XsaveArea>,
    /// Extended control registers (XCR0); `nr_xcrs` is 0 on a host without XSAVE.
    #[serde(with = "exact")]
    pub xcrs: kvm_xcrs,
    /// The local APIC's registers.
    #[serde(with = "exact")]
    pub lapic: kvm_lapic_state,
    /// MSRs, in the order they are restored.
    #[serde(deserialize_with = "msr_list")]
    pub msrs: Vec<Msr>,
    /// Debug registers.
    #[serde(with = "exact")]
    pub debugregs: kvm_debugregs,
    /// Pending exceptions, interrupts, NMIs, SMIs and the interrupt shadow.
    #[serde(with = "exact")]
    pub vcpu_events: kvm_vcpu_events,
    /// The guest's TSC frequency, if KVM tells it.
    pub tsc_khz: Option<u32>,
}

fn cpuid_entries<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<kvm_cpuid_entry2>, D::Error> {
    codec::bounded_blobs(d, KVM_MAX_CPUID_ENTRIES, "CPUID entries")
}

fn msr_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Msr>, D::Error> {
    codec::bounded_vec(d, MAX_MSRS, "MSRs")
}

/// Reads the MSRs `indices` in chunks KVM takes. KVM_GET_MSRS stops at the first MSR it
/// cannot read (one the vCPU's CPUID does not give the guest): that one is skipped, so
/// the result has the readable ones in order, and the skipped ones are returned too.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<(Vec<Msr>, Vec<u32>), kvm_ioctls::Error> {
    let mut read = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        let n = fd.get_msrs(&mut msrs)?.min(chunk.len());
        read.extend(msrs.as_slice()[..n].iter().map(|e| Msr {
            index: e.index,
            value: e.data,
        }));
        if n < chunk.len() {
            skipped.push(chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok((read, skipped))
}

/// Writes `msrs` in chunks KVM takes; on a refusal, which MSR (its position) KVM stopped at.
fn write_msrs(fd: &VcpuFd, msrs: &[Msr]) -> Result<Result<(), usize>, kvm_ioctls::Error> {
    for (c, chunk) in msrs.chunks(KVM_MAX_MSR_ENTRIES).enumerate() {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            })
            .collect();
        let kvm_msrs =
            Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        let n = fd.set_msrs(&kvm_msrs)?;
        if n < chunk.len() {
            return Ok(Err(c * KVM_MAX_MSR_ENTRIES + n));
        }
    }
    Ok(Ok(()))
}

/// `msrs` with the [`DEFERRED_MSRS`] moved to the end, the rest in their order.
fn restore_order<T: Copy>(msrs: &[T], index: impl Fn(&T) -> u32) -> Vec<T> {
    let (late, early): (Vec<T>, Vec<T>) =
        msrs.iter().partition(|m| DEFERRED_MSRS.contains(&index(m)));
    early.into_iter().chain(late).collect()
}

/// The MSRs a vCPU's state needs: those `KVM_GET_MSR_INDEX_LIST` names, plus the MTRRs and
/// PAT, kept if a probe vCPU (in a scratch VM with an irqchip, given all the CPUID KVM
/// supports) can read them and take their value back. In restore order: the TSC deadline
/// after the TSC. Compute once; [`save_vcpu`] skips any that a vCPU with less CPUID cannot
/// read.
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(vm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut candidates = listed.as_slice().to_vec();
    for extra in UNLISTED_MSRS {
        if !candidates.contains(extra) {
            candidates.push(*extra);
        }
    }
    let vm = kvm
        .create_vm()
        .map_err(vm_err("KVM_CREATE_VM (MSR probe)"))?;
    vm.create_irq_chip()
        .map_err(vm_err("KVM_CREATE_IRQCHIP (MSR probe)"))?;
    let probe = vm
        .create_vcpu(0)
        .map_err(vm_err("KVM_CREATE_VCPU (MSR probe)"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(vm_err("KVM_GET_SUPPORTED_CPUID"))?;
    probe
        .set_cpuid2(&cpuid)
        .map_err(vm_err("KVM_SET_CPUID2 (MSR probe)"))?;
    let (readable, unreadable) =
        read_msrs(&probe, &candidates).map_err(vm_err("KVM_GET_MSRS (MSR probe)"))?;
    let mut keep = Vec::with_capacity(readable.len());
    let mut unsettable = Vec::new();
    for msr in readable {
        match write_msrs(&probe, &[msr]).map_err(vm_err("KVM_SET_MSRS (MSR probe)"))? {
            Ok(()) => keep.push(msr.index),
            Err(_) => unsettable.push(msr.index),
        }
    }
    log::debug!(
        "MSRs to save: {} of {} candidates; unreadable {unreadable:x?}, not settable \
         {unsettable:x?}",
        keep.len(),
        candidates.len()
    );
    Ok(restore_order(&keep, |i| *i))
}

/// The XSAVE area, or None when this KVM has no XSAVE ioctl (the FPU registers then are
/// the whole floating-point state).
fn save_xsave(fd: &VcpuFd, id: u8) -> Result<Option<XsaveArea>, StateError> {
    match fd.get_xsave() {
        Ok(x) => Ok(Some(XsaveArea(x.region))),
        Err(e) if e.errno() == libc::ENOTTY => Ok(None),
        Err(e) => Err(vcpu_err(id, "KVM_GET_XSAVE")(e)),
    }
}

/// Saves vCPU `id`'s state, reading the MSRs `msr_indices` (from [`msrs_to_save`]); those
/// this vCPU cannot read (its CPUID hides their feature) are left out. The vCPU must be out
/// of `KVM_RUN`, with its last I/O completed ([`super::complete_pending_io`]).
pub fn save_vcpu(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
    // First: KVM_GET_MP_STATE lets the LAPIC take a pending INIT or SIPI, which changes
    // the registers and the LAPIC read after it.
    let mp_state = fd
        .get_mp_state()
        .map_err(vcpu_err(id, "KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(vcpu_err(id, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(vcpu_err(id, "KVM_GET_SREGS"))?;
    let fpu = FpuRegs::from(&fd.get_fpu().map_err(vcpu_err(id, "KVM_GET_FPU"))?);
    let xsave = save_xsave(fd, id)?;
    let xcrs = fd.get_xcrs().map_err(vcpu_err(id, "KVM_GET_XCRS"))?;
    let lapic = fd.get_lapic().map_err(vcpu_err(id, "KVM_GET_LAPIC"))?;
    let (msrs, skipped) = read_msrs(fd, msr_indices).map_err(vcpu_err(id, "KVM_GET_MSRS"))?;
    if !skipped.is_empty() {
        log::debug!("vCPU {id}: MSRs {skipped:x?} are not readable here and not saved");
    }
    let debugregs = fd
        .get_debug_regs()
        .map_err(vcpu_err(id, "KVM_GET_DEBUGREGS"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(vcpu_err(id, "KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    // KVM answers an error when the host's TSC is unstable: then there is no frequency to
    // carry over.
    let tsc_khz = fd.get_tsc_khz().ok();
    // Last: the reads above may change what is pending.
    let vcpu_events = fd
        .get_vcpu_events()
        .map_err(vcpu_err(id, "KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        lapic,
        msrs,
        debugregs,
        vcpu_events,
        tsc_khz,
    })
}

fn restore_cpuid(fd: &VcpuFd, id: u8, entries: &[kvm_cpuid_entry2]) -> Result<(), StateError> {
    let cpuid = CpuId::from_entries(entries).map_err(|_| StateError::TooManyCpuidEntries {
        id,
        count: entries.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(vcpu_err(id, "KVM_SET_CPUID2"))
}

/// Gives the vCPU the saved TSC frequency when it differs from what it has (KVM itself
/// accepts one within its tolerance without scaling).
fn restore_tsc_khz(fd: &VcpuFd, id: u8, saved: Option<u32>) -> Result<(), StateError> {
    let Some(khz) = saved else {
        return Ok(());
    };
    if fd.get_tsc_khz().ok() == Some(khz) {
        return Ok(());
    }
    fd.set_tsc_khz(khz).map_err(vcpu_err(id, "KVM_SET_TSC_KHZ"))
}

fn restore_xsave(fd: &VcpuFd, id: u8, area: &XsaveArea) -> Result<(), StateError> {
    // KVM_SET_XSAVE reads as many bytes as this vCPU's XSAVE state has, which is more than
    // kvm_xsave's 4 KiB if the process enabled dynamic XSTATE for guests. KVM_GET_XSAVE
    // refuses (EINVAL) exactly then, so its success right here, after the CPUID that sizes
    // the state was set, proves 4 KiB is what KVM_SET_XSAVE reads.
    let mut xsave: kvm_xsave = fd.get_xsave().map_err(vcpu_err(id, "KVM_GET_XSAVE"))?;
    xsave.region = area.0;
    // SAFETY: `xsave` is a whole kvm_xsave, and KVM reads no more than that (see above).
    unsafe { fd.set_xsave(&xsave) }.map_err(vcpu_err(id, "KVM_SET_XSAVE"))
}

fn restore_msrs(fd: &VcpuFd, id: u8, msrs: &[Msr]) -> Result<(), StateError> {
    let ordered = restore_order(msrs, |m| m.index);
    match write_msrs(fd, &ordered).map_err(vcpu_err(id, "KVM_SET_MSRS"))? {
        Ok(()) => Ok(()),
        Err(at) => Err(StateError::MsrRefused {
            id,
            index: ordered[at].index,
            value: ordered[at].value,
        }),
    }
}

/// Restores vCPU `id` from `state`, in the order KVM needs: CPUID first (it decides which
/// MSRs and XSAVE features exist), the TSC frequency before the TSC, LAPIC after SREGS (the
/// APIC base), MSRs after the LAPIC (the TSC deadline), events last (setting registers
/// drops pending exceptions). Ends with [`kvmclock_ctrl`]: the vCPU is ready to run.
/// The vCPU should be new (KVM takes a CPUID change only before the first run).
pub fn restore_vcpu(fd: &VcpuFd, id: u8, state: &VcpuState) -> Result<(), StateError> {
    restore_cpuid(fd, id, &state.cpuid)?;
    restore_tsc_khz(fd, id, state.tsc_khz)?;
    fd.set_mp_state(state.mp_state)
        .map_err(vcpu_err(id, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs)
        .map_err(vcpu_err(id, "KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(vcpu_err(id, "KVM_SET_SREGS"))?;
    fd.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(vcpu_err(id, "KVM_SET_FPU"))?;
    if let Some(area) = &state.xsave {
        restore_xsave(fd, id, area)?;
    }
    if state.xcrs.nr_xcrs > 0 {
        fd.set_xcrs(&state.xcrs)
            .map_err(vcpu_err(id, "KVM_SET_XCRS"))?;
    }
    fd.set_lapic(&state.lapic)
        .map_err(vcpu_err(id, "KVM_SET_LAPIC"))?;
    restore_msrs(fd, id, &state.msrs)?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(vcpu_err(id, "KVM_SET_DEBUGREGS"))?;
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(vcpu_err(id, "KVM_SET_VCPU_EVENTS"))?;
    kvmclock_ctrl(fd, id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use zerocopy::FromZeros;

    fn sample() -> VcpuState {
        VcpuState {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f8,
                ..Default::default()
            }],
            mp_state: kvm_mp_state::new_zeroed(),
            regs: kvm_regs {
                rax: 48,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            fpu: FpuRegs {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            },
            xsave: Some(XsaveArea([7; 1024])),
            xcrs: kvm_xcrs::default(),
            lapic: kvm_lapic_state::new_zeroed(),
            msrs: vec![Msr {
                index: MSR_IA32_TSC,
                value: 12345,
            }],
            debugregs: kvm_debugregs::default(),
            vcpu_events: kvm_vcpu_events::default(),
            tsc_khz: Some(2_000_000),
        }
    }

    fn parse(value: Value) -> Result<VcpuState, serde_json::Error> {
        serde_json::from_value(value)
    }

    #[test]
    fn vcpu_state_survives_a_json_round_trip() {
        let text = serde_json::to_string(&sample()).unwrap();
        assert_eq!(serde_json::from_str::<VcpuState>(&text).unwrap(), sample());
    }

    #[test]
    fn truncated_or_oversized_lapic_is_refused() {
        let mut value = serde_json::to_value(sample()).unwrap();
        value["lapic"].as_array_mut().unwrap().pop();
        let err = parse(value.clone()).unwrap_err().to_string();
        assert!(err.contains("kvm_lapic_state is 1023 bytes long"), "{err}");

        value["lapic"] = json!(vec![0u8; 1025]);
        let err = parse(value).unwrap_err().to_string();
        assert!(err.contains("longer than 1024"), "{err}");
    }

    #[test]
    fn more_msrs_than_kvm_takes_are_refused() {
        let mut value = serde_json::to_value(sample()).unwrap();
        let msr = json!({ "index": 0x10, "value": 0 });
        value["msrs"] = Value::Array(vec![msr; MAX_MSRS + 1]);
        let err = parse(value).unwrap_err().to_string();
        assert!(err.contains(&format!("more than {MAX_MSRS} MSRs")), "{err}");
    }

    #[test]
    fn more_cpuid_entries_than_kvm_takes_are_refused() {
        let mut value = serde_json::to_value(sample()).unwrap();
        let entry = value["cpuid"][0].clone();
        value["cpuid"] = Value::Array(vec![entry; KVM_MAX_CPUID_ENTRIES + 1]);
        let err = parse(value).unwrap_err().to_string();
        assert!(err.contains("more than 256 CPUID entries"), "{err}");
    }

    #[test]
    fn cpuid_entry_or_xsave_of_the_wrong_length_is_refused() {
        let mut value = serde_json::to_value(sample()).unwrap();
        value["cpuid"][0].as_array_mut().unwrap().truncate(8);
        let err = parse(value).unwrap_err().to_string();
        assert!(err.contains("kvm_cpuid_entry2 is 8 bytes long"), "{err}");

        let mut value = serde_json::to_value(sample()).unwrap();
        value["xsave"].as_array_mut().unwrap().truncate(4000);
        let err = parse(value).unwrap_err().to_string();
        assert!(err.contains("is 4000 bytes long, expected 4096"), "{err}");
    }

    #[test]
    fn truncated_or_mistyped_state_is_an_error() {
        let text = serde_json::to_string(&sample()).unwrap();
        assert!(serde_json::from_str::<VcpuState>(&text[..text.len() / 2]).is_err());
        let mut value = serde_json::to_value(sample()).unwrap();
        value["regs"] = json!("not bytes");
        assert!(parse(value.clone()).is_err());
        value.as_object_mut().unwrap().remove("regs");
        assert!(parse(value).is_err());
    }

    #[test]
    fn tsc_deadline_is_restored_after_everything_else() {
        let msrs = [MSR_IA32_TSC_DEADLINE, 0x174, MSR_IA32_TSC, 0x2ff];
        assert_eq!(
            restore_order(&msrs, |i| *i),
            [0x174, MSR_IA32_TSC, 0x2ff, MSR_IA32_TSC_DEADLINE]
        );
    }
}
