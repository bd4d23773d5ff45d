//! The CPUID a VM's vCPUs get and the kernel command line that goes with it: KVM's
//! supported CPUID with the host's and the user's edits, and `clearcpuid=` for what a host
//! shows the guest anyway.

use boot::x86_64::cpuid::{self, FeatureEdits};
use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use super::VmmError;

/// The CPUID plan of a VM: KVM's supported CPUID with the host defaults and the user's
/// edits applied, the features asked hidden, and those hidden because of the host.
pub struct CpuidPlan {
    /// The entries.
    pub entries: Vec<kvm_cpuid_entry2>,
    /// Features hidden (asked).
    pub hidden: Vec<&'static str>,
    /// Features hidden because of the host.
    pub host_hidden: Vec<&'static str>,
}

pub fn vm_cpuid(kvm: &Kvm, user: &FeatureEdits) -> Result<CpuidPlan, VmmError> {
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
pub fn log_host_hiding(host_hidden: &[&str], cleared: &[&str]) {
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
