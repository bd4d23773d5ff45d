//! The CPUID each vCPU sees: KVM's supported CPUID, minus the features the user (or the
//! host) hides, plus the topology and hypervisor bits a VMM owns.

use kvm_bindings::kvm_cpuid_entry2;

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// EAX
    Eax,
    /// EBX
    Ebx,
    /// ECX
    Ecx,
    /// EDX
    Edx,
}

/// One CPU feature flag: its `/proc/cpuinfo` name and where CPUID reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    /// Name as Linux prints it in /proc/cpuinfo.
    pub name: &'static str,
    /// CPUID leaf (EAX input).
    pub leaf: u32,
    /// CPUID subleaf (ECX input).
    pub subleaf: u32,
    /// Register holding the bit.
    pub reg: Reg,
    /// Bit number.
    pub bit: u8,
}

/// Errors of feature names and edits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    /// A name not in the feature table.
    #[error("unknown CPU feature '{0}' (names as in /proc/cpuinfo, e.g. cx16, xsave, smap)")]
    UnknownFeature(String),
    /// An edit without a name.
    #[error("empty CPU feature name in the list")]
    EmptyName,
    /// A feature asked for that this host's KVM cannot give.
    #[error("CPU feature '{0}' is not supported by this host's KVM")]
    Unsupported(&'static str),
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

use Reg::{Eax, Ebx, Ecx, Edx};

/// The features `--cpu-features` knows, with Linux's names.
pub const FEATURES: &[Feature] = &[
    f("fpu", 1, 0, Edx, 0),
    f("vme", 1, 0, Edx, 1),
    f("de", 1, 0, Edx, 2),
    f("pse", 1, 0, Edx, 3),
    f("tsc", 1, 0, Edx, 4),
    f("msr", 1, 0, Edx, 5),
    f("pae", 1, 0, Edx, 6),
    f("mce", 1, 0, Edx, 7),
    f("cx8", 1, 0, Edx, 8),
    f("apic", 1, 0, Edx, 9),
    f("sep", 1, 0, Edx, 11),
    f("mtrr", 1, 0, Edx, 12),
    f("pge", 1, 0, Edx, 13),
    f("mca", 1, 0, Edx, 14),
    f("cmov", 1, 0, Edx, 15),
    f("pat", 1, 0, Edx, 16),
    f("pse36", 1, 0, Edx, 17),
    f("clflush", 1, 0, Edx, 19),
    f("mmx", 1, 0, Edx, 23),
    f("fxsr", 1, 0, Edx, 24),
    f("sse", 1, 0, Edx, 25),
    f("sse2", 1, 0, Edx, 26),
    f("ht", 1, 0, Edx, 28),
    f("pni", 1, 0, Ecx, 0),
    f("pclmulqdq", 1, 0, Ecx, 1),
    f("monitor", 1, 0, Ecx, 3),
    f("vmx", 1, 0, Ecx, 5),
    f("ssse3", 1, 0, Ecx, 9),
    f("fma", 1, 0, Ecx, 12),
    f("cx16", 1, 0, Ecx, 13),
    f("pdcm", 1, 0, Ecx, 15),
    f("pcid", 1, 0, Ecx, 17),
    f("sse4_1", 1, 0, Ecx, 19),
    f("sse4_2", 1, 0, Ecx, 20),
    f("x2apic", 1, 0, Ecx, 21),
    f("movbe", 1, 0, Ecx, 22),
    f("popcnt", 1, 0, Ecx, 23),
    f("tsc_deadline_timer", 1, 0, Ecx, 24),
    f("aes", 1, 0, Ecx, 25),
    f("xsave", 1, 0, Ecx, 26),
    f("osxsave", 1, 0, Ecx, 27),
    f("avx", 1, 0, Ecx, 28),
    f("f16c", 1, 0, Ecx, 29),
    f("rdrand", 1, 0, Ecx, 30),
    f("hypervisor", 1, 0, Ecx, 31),
    f("fsgsbase", 7, 0, Ebx, 0),
    f("tsc_adjust", 7, 0, Ebx, 1),
    f("bmi1", 7, 0, Ebx, 3),
    f("hle", 7, 0, Ebx, 4),
    f("avx2", 7, 0, Ebx, 5),
    f("smep", 7, 0, Ebx, 7),
    f("bmi2", 7, 0, Ebx, 8),
    f("erms", 7, 0, Ebx, 9),
    f("invpcid", 7, 0, Ebx, 10),
    f("rtm", 7, 0, Ebx, 11),
    f("mpx", 7, 0, Ebx, 14),
    f("avx512f", 7, 0, Ebx, 16),
    f("avx512dq", 7, 0, Ebx, 17),
    f("rdseed", 7, 0, Ebx, 18),
    f("adx", 7, 0, Ebx, 19),
    f("smap", 7, 0, Ebx, 20),
    f("avx512ifma", 7, 0, Ebx, 21),
    f("clflushopt", 7, 0, Ebx, 23),
    f("clwb", 7, 0, Ebx, 24),
    f("avx512pf", 7, 0, Ebx, 26),
    f("avx512er", 7, 0, Ebx, 27),
    f("avx512cd", 7, 0, Ebx, 28),
    f("sha_ni", 7, 0, Ebx, 29),
    f("avx512bw", 7, 0, Ebx, 30),
    f("avx512vl", 7, 0, Ebx, 31),
    f("avx512vbmi", 7, 0, Ecx, 1),
    f("umip", 7, 0, Ecx, 2),
    f("pku", 7, 0, Ecx, 3),
    f("ospke", 7, 0, Ecx, 4),
    f("waitpkg", 7, 0, Ecx, 5),
    f("avx512_vbmi2", 7, 0, Ecx, 6),
    f("gfni", 7, 0, Ecx, 8),
    f("vaes", 7, 0, Ecx, 9),
    f("vpclmulqdq", 7, 0, Ecx, 10),
    f("avx512_vnni", 7, 0, Ecx, 11),
    f("avx512_bitalg", 7, 0, Ecx, 12),
    f("avx512_vpopcntdq", 7, 0, Ecx, 14),
    f("la57", 7, 0, Ecx, 16),
    f("rdpid", 7, 0, Ecx, 22),
    f("fsrm", 7, 0, Edx, 4),
    f("avx512_vp2intersect", 7, 0, Edx, 8),
    f("md_clear", 7, 0, Edx, 10),
    f("serialize", 7, 0, Edx, 14),
    f("avx512_fp16", 7, 0, Edx, 23),
    f("avx_vnni", 7, 1, Eax, 4),
    f("avx512_bf16", 7, 1, Eax, 5),
    f("xsaveopt", 0xd, 1, Eax, 0),
    f("xsavec", 0xd, 1, Eax, 1),
    f("xgetbv1", 0xd, 1, Eax, 2),
    f("xsaves", 0xd, 1, Eax, 3),
    f("lahf_lm", 0x8000_0001, 0, Ecx, 0),
    f("cmp_legacy", 0x8000_0001, 0, Ecx, 1),
    f("svm", 0x8000_0001, 0, Ecx, 2),
    f("extapic", 0x8000_0001, 0, Ecx, 3),
    f("cr8_legacy", 0x8000_0001, 0, Ecx, 4),
    f("abm", 0x8000_0001, 0, Ecx, 5),
    f("sse4a", 0x8000_0001, 0, Ecx, 6),
    f("misalignsse", 0x8000_0001, 0, Ecx, 7),
    f("3dnowprefetch", 0x8000_0001, 0, Ecx, 8),
    f("osvw", 0x8000_0001, 0, Ecx, 9),
    f("xop", 0x8000_0001, 0, Ecx, 11),
    f("fma4", 0x8000_0001, 0, Ecx, 16),
    f("tbm", 0x8000_0001, 0, Ecx, 21),
    f("topoext", 0x8000_0001, 0, Ecx, 22),
    f("syscall", 0x8000_0001, 0, Edx, 11),
    f("nx", 0x8000_0001, 0, Edx, 20),
    f("mmxext", 0x8000_0001, 0, Edx, 22),
    f("fxsr_opt", 0x8000_0001, 0, Edx, 25),
    f("pdpe1gb", 0x8000_0001, 0, Edx, 26),
    f("rdtscp", 0x8000_0001, 0, Edx, 27),
    f("lm", 0x8000_0001, 0, Edx, 29),
    // KVM's paravirtual features (leaf 0x40000001), with qemu's names.
    f("kvmclock", KVM_FEATURES, 0, Eax, 0),
    f("kvm-nopiodelay", KVM_FEATURES, 0, Eax, 1),
    f("kvmclock2", KVM_FEATURES, 0, Eax, 3),
    f("kvm-asyncpf", KVM_FEATURES, 0, Eax, 4),
    f("kvm-steal-time", KVM_FEATURES, 0, Eax, 5),
    f("kvm-pv-eoi", KVM_FEATURES, 0, Eax, 6),
    f("kvm-pv-unhalt", KVM_FEATURES, 0, Eax, 7),
    f("kvm-pv-tlb-flush", KVM_FEATURES, 0, Eax, 9),
    f("kvm-asyncpf-vmexit", KVM_FEATURES, 0, Eax, 10),
    f("kvm-pv-ipi", KVM_FEATURES, 0, Eax, 11),
    f("kvm-poll-control", KVM_FEATURES, 0, Eax, 12),
    f("kvm-pv-sched-yield", KVM_FEATURES, 0, Eax, 13),
    f("kvm-asyncpf-int", KVM_FEATURES, 0, Eax, 14),
    f("kvm-msi-ext-dest-id", KVM_FEATURES, 0, Eax, 15),
    f("kvmclock-stable-bit", KVM_FEATURES, 0, Eax, 24),
];

/// KVM's paravirtual feature leaf.
pub const KVM_FEATURES: u32 = 0x4000_0001;

/// Hiding the first feature hides the others too (they need it to work).
const DEPENDENTS: &[(&str, &[&str])] = &[
    (
        "xsave",
        &[
            "osxsave", "avx", "xsaveopt", "xsavec", "xgetbv1", "xsaves", "pku", "ospke",
        ],
    ),
    (
        "avx",
        &[
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "vaes",
            "vpclmulqdq",
            "avx_vnni",
        ],
    ),
    (
        "avx512f",
        &[
            "avx512dq",
            "avx512ifma",
            "avx512pf",
            "avx512er",
            "avx512cd",
            "avx512bw",
            "avx512vl",
            "avx512vbmi",
            "avx512_vbmi2",
            "avx512_vnni",
            "avx512_bitalg",
            "avx512_vpopcntdq",
            "avx512_vp2intersect",
            "avx512_fp16",
            "avx512_bf16",
        ],
    ),
    ("pku", &["ospke"]),
];

/// Features hidden by default when the host's KVM runs guest kernel code by emulation: its
/// emulator cannot run the instructions they enable (see the project's KVM-HERE notes), and
/// hypercalls (which the KVM paravirtual IPI, unhalt and yield features use) hang there.
pub const HIDDEN_ON_EMULATING_HOSTS: &[&str] = &[
    "cx16",
    "xsave",
    "smap",
    "popcnt",
    "rdrand",
    "rdseed",
    "fsgsbase",
    "invpcid",
    "pcid",
    "umip",
    "pku",
    "kvm-pv-ipi",
    "kvm-pv-unhalt",
    "kvm-pv-sched-yield",
];

/// Looks a feature up by its /proc/cpuinfo name.
pub fn feature(name: &str) -> Option<&'static Feature> {
    FEATURES.iter().find(|f| f.name == name)
}

/// `name` and every feature that depends on it, transitively.
pub fn with_dependents(name: &'static str) -> Vec<&'static str> {
    let mut out = vec![name];
    let mut i = 0;
    while i < out.len() {
        if let Some((_, deps)) = DEPENDENTS.iter().find(|(n, _)| *n == out[i]) {
            for d in deps.iter() {
                if !out.contains(d) {
                    out.push(d);
                }
            }
        }
        i += 1;
    }
    out
}

/// What to change in the supported CPUID: features to hide and features to require.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeatureEdits {
    /// Features cleared (with their dependents).
    pub hide: Vec<&'static str>,
    /// Features set; each must be supported by the host's KVM.
    pub show: Vec<&'static str>,
}

impl FeatureEdits {
    /// Parses `-cx16,+popcnt,xsave` (`-` hides, `+` or no sign shows).
    pub fn parse(list: &str) -> Result<Self, CpuidError> {
        let mut edits = FeatureEdits::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (hide, name) = match item.as_bytes()[0] {
                b'-' => (true, &item[1..]),
                b'+' => (false, &item[1..]),
                _ => (false, item),
            };
            if name.is_empty() {
                return Err(CpuidError::EmptyName);
            }
            let feat = feature(name).ok_or_else(|| CpuidError::UnknownFeature(name.into()))?;
            edits.push(feat.name, hide);
        }
        Ok(edits)
    }

    /// Adds one edit; a later edit of the same feature wins over an earlier one.
    pub fn push(&mut self, name: &'static str, hide: bool) {
        self.hide.retain(|n| *n != name);
        self.show.retain(|n| *n != name);
        if hide {
            self.hide.push(name);
        } else {
            self.show.push(name);
        }
    }

    /// Applies `later` on top of these edits.
    pub fn then(mut self, later: &FeatureEdits) -> Self {
        for n in &later.hide {
            self.push(n, true);
        }
        for n in &later.show {
            self.push(n, false);
        }
        self
    }

    /// The features actually hidden: the `hide` list with dependents, minus what is shown.
    pub fn hidden(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for name in &self.hide {
            for d in with_dependents(name) {
                if !out.contains(&d) && !self.show.contains(&d) {
                    out.push(d);
                }
            }
        }
        out
    }
}

fn reg_val(e: &kvm_cpuid_entry2, reg: Reg) -> u32 {
    match reg {
        Eax => e.eax,
        Ebx => e.ebx,
        Ecx => e.ecx,
        Edx => e.edx,
    }
}

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Eax => &mut e.eax,
        Ebx => &mut e.ebx,
        Ecx => &mut e.ecx,
        Edx => &mut e.edx,
    }
}

fn find_mut(
    entries: &mut [kvm_cpuid_entry2],
    leaf: u32,
    subleaf: u32,
) -> Option<&mut kvm_cpuid_entry2> {
    entries
        .iter_mut()
        .find(|e| e.function == leaf && e.index == subleaf)
}

/// Applies feature edits to KVM's supported CPUID (shared by all vCPUs).
pub fn apply_edits(
    entries: &mut Vec<kvm_cpuid_entry2>,
    edits: &FeatureEdits,
) -> Result<(), CpuidError> {
    for name in &edits.show {
        let feat = feature(name).ok_or_else(|| CpuidError::UnknownFeature((*name).into()))?;
        let supported = entries
            .iter()
            .find(|e| e.function == feat.leaf && e.index == feat.subleaf)
            .is_some_and(|e| reg_val(e, feat.reg) & (1 << feat.bit) != 0);
        if !supported {
            return Err(CpuidError::Unsupported(feat.name));
        }
    }
    let hidden = edits.hidden();
    for name in &hidden {
        let feat = feature(name).ok_or_else(|| CpuidError::UnknownFeature((*name).into()))?;
        if let Some(e) = find_mut(entries, feat.leaf, feat.subleaf) {
            *reg_mut(e, feat.reg) &= !(1u32 << feat.bit);
        }
    }
    if hidden.contains(&"xsave") {
        // No XSAVE: the state-component leaf describes nothing.
        entries.retain(|e| e.function != 0xd);
    }
    Ok(())
}

/// Which of `names` are set in `entries` (e.g. read back from a vCPU, to find features a
/// host's KVM turns back on whatever the VMM asks).
pub fn visible(entries: &[kvm_cpuid_entry2], names: &[&'static str]) -> Vec<&'static str> {
    names
        .iter()
        .copied()
        .filter(|name| {
            feature(name).is_some_and(|f| {
                entries
                    .iter()
                    .find(|e| e.function == f.leaf && e.index == f.subleaf)
                    .is_some_and(|e| reg_val(e, f.reg) & (1 << f.bit) != 0)
            })
        })
        .collect()
}

/// The vendor string of leaf 0.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> [u8; 12] {
    let mut v = [0u8; 12];
    if let Some(e) = entries.iter().find(|e| e.function == 0) {
        v[0..4].copy_from_slice(&e.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&e.edx.to_le_bytes());
        v[8..12].copy_from_slice(&e.ecx.to_le_bytes());
    }
    v
}

/// Width in bits of an APIC-ID field that counts `n` things.
fn id_bits(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

/// The CPUID of vCPU `cpu` out of `count` (one core per vCPU, one thread per core, one
/// package): APIC IDs, logical counts, cache sharing, the hypervisor bit.
pub fn for_vcpu(
    shared: &[kvm_cpuid_entry2],
    cpu: u8,
    count: u8,
    tsc_deadline: bool,
) -> Vec<kvm_cpuid_entry2> {
    let mut out = shared.to_vec();
    let (cpu32, count32) = (u32::from(cpu), u32::from(count.max(1)));
    let max_basic = out.iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    let amd = &vendor(&out) == b"AuthenticAMD";
    for e in out.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0xff) | (8 << 8) | ((count32 & 0xff) << 16) | (cpu32 << 24);
                e.ecx |= 1 << 31;
                if tsc_deadline {
                    e.ecx |= 1 << 24;
                }
                if count > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            4 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count32 - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count32 - 1) << 26);
            }
            6 => e.ecx &= !(1 << 3), // no energy-performance bias MSR
            0xa => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0), // no vPMU
            0x8000_0008 if amd => {
                e.ecx = (count32 - 1) | (id_bits(count32) << 12);
            }
            0x8000_001e if amd => {
                (e.eax, e.ebx, e.ecx, e.edx) = (cpu32, cpu32, 0, 0);
            }
            _ => {}
        }
    }
    // Extended topology: rebuilt from scratch (SMT level, core level, end).
    out.retain(|e| e.function != 0xb && e.function != 0x1f);
    if max_basic >= 0xb {
        let shift = id_bits(count32);
        for (index, eax, ebx, ecx) in [
            (0u32, 0u32, 1u32, 1u32 << 8),
            (1, shift, count32, 1 | (2 << 8)),
            (2, 0, 0, 2),
        ] {
            out.push(kvm_cpuid_entry2 {
                function: 0xb,
                index,
                flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax,
                ebx,
                ecx,
                edx: cpu32,
                ..Default::default()
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// A host CPUID with every feature bit set, Intel-like.
    fn host() -> Vec<kvm_cpuid_entry2> {
        let ones = u32::MAX;
        vec![
            entry(0, 0, 0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(1, 0, 0x806c1, 0, ones, ones),
            entry(4, 0, 0x121, 0, 0, 0),
            entry(4, 3, 0x163, 0, 0, 0),
            entry(7, 0, 0, ones, ones, ones),
            entry(0xa, 0, 0x0804_3205, 0, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xd, 0, 7, 0x340, 0x340, 0),
            entry(0xd, 1, ones, 0, 0, 0),
            entry(0x8000_0001, 0, 0, 0, ones, ones),
        ]
    }

    fn bit(entries: &[kvm_cpuid_entry2], name: &str) -> bool {
        let f = feature(name).unwrap();
        let e = entries
            .iter()
            .find(|e| e.function == f.leaf && e.index == f.subleaf);
        e.is_some_and(|e| reg_val(e, f.reg) & (1 << f.bit) != 0)
    }

    #[test]
    fn parse_accepts_signs_and_bare_names() {
        let e = FeatureEdits::parse("-cx16, +popcnt,smap").unwrap();
        assert_eq!(e.hide, vec!["cx16"]);
        assert_eq!(e.show, vec!["popcnt", "smap"]);
    }

    #[test]
    fn parse_rejects_unknown_and_empty_names() {
        assert_eq!(
            FeatureEdits::parse("-cx17"),
            Err(CpuidError::UnknownFeature("cx17".into()))
        );
        assert_eq!(FeatureEdits::parse("+"), Err(CpuidError::EmptyName));
    }

    #[test]
    fn later_edit_of_a_feature_wins() {
        let defaults = FeatureEdits::parse("-cx16,-popcnt").unwrap();
        let user = FeatureEdits::parse("+popcnt").unwrap();
        let all = defaults.then(&user);
        assert_eq!(all.hide, vec!["cx16"]);
        assert_eq!(all.show, vec!["popcnt"]);
    }

    #[test]
    fn hiding_xsave_hides_avx_family_and_state_leaf() {
        let mut cpuid = host();
        apply_edits(&mut cpuid, &FeatureEdits::parse("-xsave").unwrap()).unwrap();
        for name in [
            "xsave", "osxsave", "avx", "avx2", "fma", "avx512f", "avx512vl", "xsaves",
        ] {
            assert!(!bit(&cpuid, name), "{name} still set");
        }
        assert!(cpuid.iter().all(|e| e.function != 0xd));
        assert!(bit(&cpuid, "sse4_2"));
    }

    #[test]
    fn emulating_host_defaults_hide_the_listed_bits_only() {
        let mut cpuid = host();
        let mut edits = FeatureEdits::default();
        for n in HIDDEN_ON_EMULATING_HOSTS {
            edits.push(feature(n).unwrap().name, true);
        }
        apply_edits(&mut cpuid, &edits).unwrap();
        for n in [
            "cx16", "xsave", "smap", "popcnt", "rdrand", "pcid", "umip", "pku",
        ] {
            assert!(!bit(&cpuid, n), "{n}");
        }
        for n in ["sse2", "cx8", "smep", "lm", "nx", "x2apic"] {
            assert!(bit(&cpuid, n), "{n}");
        }
    }

    #[test]
    fn showing_an_unsupported_feature_is_an_error() {
        let mut cpuid = host();
        cpuid[1].ecx &= !(1 << 13);
        assert_eq!(
            apply_edits(&mut cpuid, &FeatureEdits::parse("+cx16").unwrap()),
            Err(CpuidError::Unsupported("cx16"))
        );
    }

    #[test]
    fn vcpu_cpuid_has_apic_id_count_and_hypervisor_bit() {
        let cpuid = for_vcpu(&host(), 2, 4, true);
        let leaf1 = cpuid.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 2);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & (1 << 31), 0);
        assert_ne!(leaf1.ecx & (1 << 24), 0);
        assert_ne!(leaf1.edx & (1 << 28), 0);
        let l3 = cpuid
            .iter()
            .find(|e| e.function == 4 && e.index == 3)
            .unwrap();
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert!(cpuid
            .iter()
            .filter(|e| e.function == 0xa)
            .all(|e| e.eax == 0));
    }

    #[test]
    fn extended_topology_reports_x2apic_id_and_core_count() {
        let cpuid = for_vcpu(&host(), 3, 5, false);
        let leaves: Vec<_> = cpuid.iter().filter(|e| e.function == 0xb).collect();
        assert_eq!(leaves.len(), 3);
        assert!(leaves.iter().all(|e| e.edx == 3));
        let core = leaves.iter().find(|e| e.index == 1).unwrap();
        assert_eq!(core.ebx, 5);
        assert_eq!(core.eax, 3); // 5 cores need 3 bits
        assert_eq!((core.ecx >> 8) & 0xff, 2);
    }

    #[test]
    fn single_vcpu_clears_ht() {
        let cpuid = for_vcpu(&host(), 0, 1, false);
        let leaf1 = cpuid.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.edx & (1 << 28), 0);
    }

    #[test]
    fn visible_reports_only_set_features() {
        let mut cpuid = host();
        apply_edits(&mut cpuid, &FeatureEdits::parse("-cx16").unwrap()).unwrap();
        assert_eq!(visible(&cpuid, &["cx16", "xsave", "nosuch"]), vec!["xsave"]);
    }

    #[test]
    fn every_feature_name_is_unique() {
        for (i, a) in FEATURES.iter().enumerate() {
            assert!(
                FEATURES[i + 1..].iter().all(|b| b.name != a.name),
                "{}",
                a.name
            );
        }
        for (name, deps) in DEPENDENTS {
            assert!(feature(name).is_some());
            assert!(deps.iter().all(|d| feature(d).is_some()), "{name}");
        }
    }
}
