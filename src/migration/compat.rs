//! Can this host run the guest that is offered? Its CPU features against what this host's
//! KVM offers (with this side's `--cpu-features` edits), its vCPU count against KVM's limit.

use boot::x86_64::cpuid::{self, FEATURES};
use kvm_bindings::kvm_cpuid_entry2;

/// Feature bits KVM computes per vCPU as the guest runs (from CR4, the APIC, the
/// hypervisor): not features a host has or lacks.
const DYNAMIC: &[&str] = &[
    "osxsave",
    "ospke",
    "tsc_deadline_timer",
    "hypervisor",
    "x2apic",
];

/// The named CPU features set in `entries`.
pub fn features(entries: &[kvm_cpuid_entry2]) -> Vec<String> {
    let names: Vec<&'static str> = FEATURES.iter().map(|f| f.name).collect();
    cpuid::visible(entries, &names)
        .into_iter()
        .filter(|n| !DYNAMIC.contains(n))
        .map(str::to_string)
        .collect()
}

/// The features of `wanted` that `here` lacks.
pub fn missing(wanted: &[String], here: &[kvm_cpuid_entry2]) -> Vec<String> {
    let have = features(here);
    wanted
        .iter()
        .filter(|w| !DYNAMIC.contains(&w.as_str()) && !have.contains(w))
        .cloned()
        .collect()
}

/// The refusal for a guest that uses `missing` features.
pub fn refusal(missing: &[String]) -> String {
    format!(
        "this host cannot run the guest: its CPU (as this host's KVM and --cpu-features \
         offer it) lacks {} which the guest was given",
        missing.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf1(ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: 1,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn features_are_named_and_dynamic_bits_left_out() {
        // SSE3 (pni) is ECX bit 0, OSXSAVE ECX bit 27, FPU EDX bit 0.
        let f = features(&[leaf1(1 | 1 << 27, 1)]);
        assert!(f.contains(&"pni".to_string()), "{f:?}");
        assert!(f.contains(&"fpu".to_string()), "{f:?}");
        assert!(!f.contains(&"osxsave".to_string()), "{f:?}");
    }

    #[test]
    fn a_feature_the_host_lacks_is_named() {
        let wanted = features(&[leaf1(1 | 1 << 28, 1)]); // pni, avx, fpu
        let here = [leaf1(1, 1)];
        assert_eq!(missing(&wanted, &here), vec!["avx".to_string()]);
        assert!(missing(&wanted, &[leaf1(1 | 1 << 28, 1)]).is_empty());
        assert!(refusal(&["avx".into()]).contains("lacks avx"));
    }
}
