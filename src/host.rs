//! Facts about the host's KVM that change what Ember gives a guest.

use std::path::Path;

/// True when the host's KVM runs guest kernel code by instruction emulation: the `kvm_pvm`
/// module is loaded, or the CPU offers neither VMX nor SVM (KVM nested without
/// hardware-assisted virtualization). Its emulator cannot run some instructions, so some
/// CPU features must be hidden from guests.
pub fn kvm_emulates_guest_kernel() -> bool {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return true;
    }
    match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(info) => !cpuinfo_has_virt_extensions(&info),
        Err(_) => false,
    }
}

/// Whether a `/proc/cpuinfo` text lists `vmx` or `svm`.
pub fn cpuinfo_has_virt_extensions(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmx_or_svm_flag_means_hardware_virtualization() {
        assert!(cpuinfo_has_virt_extensions("flags\t\t: fpu vme vmx sse\n"));
        assert!(cpuinfo_has_virt_extensions("flags\t\t: fpu svm\n"));
        assert!(!cpuinfo_has_virt_extensions(
            "flags\t\t: fpu hypervisor\nvmx flags\t: none\n"
        ));
    }
}
