//! What a vCPU says about itself when it stops or is asked (SIGUSR1): where it is, in which
//! mode, and the bytes of the instruction there.

use devices::GuestMemoryMmap;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

/// `RIP 0x... (long mode, CPL0)`.
pub fn location(fd: &VcpuFd) -> String {
    let (Ok(regs), Ok(sregs)) = (fd.get_regs(), fd.get_sregs()) else {
        return "an unknown RIP".into();
    };
    let mode = if sregs.cr0 & 1 == 0 {
        "real mode"
    } else if sregs.efer & 0x400 != 0 {
        if sregs.cs.l == 1 {
            "long mode"
        } else {
            "compatibility mode"
        }
    } else {
        "protected mode"
    };
    format!("RIP {:#x} ({mode}, CPL{})", regs.rip, sregs.cs.selector & 3)
}

/// What KVM_GET_MP_STATE says, in words.
pub fn mp_state(fd: &VcpuFd) -> &'static str {
    match fd.get_mp_state().map(|m| m.mp_state) {
        Ok(kvm_bindings::KVM_MP_STATE_RUNNABLE) => "runnable",
        Ok(kvm_bindings::KVM_MP_STATE_UNINITIALIZED) => "waiting for INIT",
        Ok(kvm_bindings::KVM_MP_STATE_INIT_RECEIVED) => "waiting for SIPI",
        Ok(kvm_bindings::KVM_MP_STATE_HALTED) => "halted",
        Ok(kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED) => "SIPI received",
        _ => "unknown state",
    }
}

/// Suberror text and, for emulation failures, the instruction bytes KVM reports.
pub fn internal_error(fd: &mut VcpuFd) -> (String, Option<Vec<u8>>) {
    let run = fd.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` (and its alias
    // `emulation_failure`) is the active member of the union; both are plain integers.
    let (sub, ndata, data) = unsafe {
        let i = run.__bindgen_anon_1.internal;
        (i.suberror, i.ndata, i.data)
    };
    let text = match sub {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "event delivery failure",
        4 => "unexpected exit reason",
        _ => "unknown suberror",
    };
    // Emulation failure layout: data[0] = flags (bit 0: bytes valid), then a byte of
    // length and up to 15 instruction bytes.
    let bytes = (sub == 1 && ndata >= 2 && data[0] & 1 == 1).then(|| {
        let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
        let len = usize::from(raw[0]).min(15);
        raw[1..1 + len].to_vec()
    });
    (format!("{text}, suberror {sub}"), bytes)
}

/// Hex of the instruction at RIP: KVM's copy if it gave one, else read from memory.
pub fn instruction_bytes(fd: &VcpuFd, mem: &GuestMemoryMmap, from_kvm: Option<Vec<u8>>) -> String {
    let bytes = from_kvm.or_else(|| {
        let (regs, sregs) = (fd.get_regs().ok()?, fd.get_sregs().ok()?);
        let linear = sregs.cs.base.wrapping_add(regs.rip);
        let tr = fd.translate_gva(linear).ok()?;
        if tr.valid == 0 {
            return None;
        }
        let mut buf = [0u8; 15];
        mem.read_slice(&mut buf, GuestAddress(tr.physical_address))
            .ok()?;
        Some(buf.to_vec())
    });
    match bytes {
        Some(b) if !b.is_empty() => b
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" "),
        _ => "unavailable".into(),
    }
}
