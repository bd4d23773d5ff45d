//! ACPI CPU hotplug: the `\_SB.CPUS` processor container of the DSDT and the MADT entries
//! of CPUs that may come later.
//!
//! Every possible CPU (up to the VM's maximum) is a processor device `Cnnn` (`ACPI0007`,
//! `_UID` = its MADT processor UID = its APIC ID) whose `_STA`, `_MAT` and `_EJ0` go through
//! the VMM's CPU hotplug controller at [`CPU_HOTPLUG_PORT`]: a selector, a status byte
//! (present, inserting, removing) and a command byte (inserting seen, removing seen, eject).
//! `CSCN`, which the CPU hotplug GPE's handler calls, walks the CPUs and notifies the guest
//! of those inserted (device check, 1) and of those the host wants back (eject request, 3).
//! The controller's mutex `CLCK` keeps a selector write and the reads after it together.
//!
//! The MADT lists every possible CPU: those present at boot enabled, the others not enabled
//! but online capable (ACPI 6.3), so Linux counts them as possible CPUs and can bring them up
//! when they are inserted (a disabled entry without that flag is ignored by Linux for an MADT
//! of revision 5).

use crate::x86_64::aml::{
    AccessType, Expr, FieldEntry, LogicOp, RegionSpace, Target, Term, UpdateRule,
};

/// First of the controller's I/O ports.
pub const CPU_HOTPLUG_PORT: u16 = 0x0cd8;
/// How many ports it spans.
pub const CPU_HOTPLUG_PORTS: u16 = 4;
/// Command byte: inserting seen.
pub const CMD_CLEAR_INSERTING: u64 = 1;
/// Command byte: removing seen.
pub const CMD_CLEAR_REMOVING: u64 = 2;
/// Command byte: eject the selected CPU.
pub const CMD_EJECT: u64 = 3;

/// MADT Local APIC flag: enabled.
pub const LAPIC_ENABLED: u32 = 1 << 0;
/// MADT Local APIC flag: online capable (may be enabled at run time).
pub const LAPIC_ONLINE_CAPABLE: u32 = 1 << 1;

const CONTAINER: &str = "\\_SB_.CPUS";

/// A MADT Processor Local APIC entry for CPU `cpu` (UID and APIC ID both `cpu`).
pub fn lapic_entry(cpu: u8, flags: u32) -> [u8; 8] {
    let f = flags.to_le_bytes();
    [0, 8, cpu, cpu, f[0], f[1], f[2], f[3]]
}

/// The MADT flags of CPU `cpu` when `present` CPUs are there at boot.
pub fn madt_flags(cpu: u8, present: u8) -> u32 {
    if cpu < present {
        LAPIC_ENABLED
    } else {
        LAPIC_ONLINE_CAPABLE
    }
}

/// The processor device of CPU `cpu`.
fn cpu_device(cpu: u8) -> Term {
    let id = Expr::Int(u64::from(cpu));
    let sta = || Expr::call(&format!("{CONTAINER}.CSTA"), vec![id.clone()]);
    let mat = |flags| Expr::Buffer(lapic_entry(cpu, flags).to_vec());
    Term::device(
        &format!("C{cpu:03X}"),
        vec![
            Term::name("_HID", Expr::string("ACPI0007")),
            Term::name("_UID", id.clone()),
            Term::method("_STA", 0, vec![Term::ret(sta())]),
            Term::method(
                "_MAT",
                0,
                vec![
                    Term::if_then(
                        Expr::logic(LogicOp::LEqual, sta(), Expr::Int(0x0f)),
                        vec![Term::ret(mat(LAPIC_ENABLED))],
                    ),
                    Term::ret(mat(0)),
                ],
            ),
            Term::method(
                "_EJ0",
                1,
                vec![Term::Eval(Expr::call(
                    &format!("{CONTAINER}.CEJ0"),
                    vec![id.clone()],
                ))],
            ),
        ],
    )
}

fn locked(body: Vec<Term>) -> Vec<Term> {
    let mut terms = vec![Term::Eval(Expr::Acquire("CLCK".into(), 0xffff))];
    terms.extend(body);
    terms.push(Term::Release("CLCK".into()));
    terms
}

fn select(cpu: Expr) -> Term {
    Term::store(cpu, Target::Path("CSEL".into()))
}

fn command(cmd: u64) -> Term {
    Term::store(Expr::Int(cmd), Target::Path("CCMD".into()))
}

/// `CSCN`: notify each CPU inserted or asked to leave, and clear its flag.
fn scan_method(max: u8) -> Term {
    let is_set = |field: &str| Expr::logic(LogicOp::LEqual, Expr::path(field), Expr::Int(1));
    let mut body = Vec::new();
    for cpu in 0..max {
        let dev = Target::Path(format!("C{cpu:03X}"));
        body.push(select(Expr::Int(u64::from(cpu))));
        body.push(Term::if_then(
            is_set("CINS"),
            vec![
                Term::Notify(dev.clone(), Expr::Int(1)),
                command(CMD_CLEAR_INSERTING),
            ],
        ));
        body.push(Term::if_then(
            is_set("CRMV"),
            vec![Term::Notify(dev, Expr::Int(3)), command(CMD_CLEAR_REMOVING)],
        ));
    }
    Term::serialized_method("CSCN", 0, locked(body))
}

/// `Device (CPUS)` with a processor device for each of `max` possible CPUs.
pub fn container(max: u8) -> Term {
    let mut terms = vec![
        Term::name("_HID", Expr::string("ACPI0010")),
        Term::name("_CID", Expr::eisa_id("PNP0A05")),
        Term::Mutex("CLCK".into(), 0),
        Term::OpRegion {
            name: "PRST".into(),
            space: RegionSpace::SystemIo,
            offset: Expr::Int(u64::from(CPU_HOTPLUG_PORT)),
            len: Expr::Int(u64::from(CPU_HOTPLUG_PORTS)),
        },
        Term::Field {
            region: "PRST".into(),
            access: AccessType::Byte,
            lock: false,
            update: UpdateRule::WriteAsZeros,
            entries: vec![
                FieldEntry::Named("CSEL".into(), 8),
                FieldEntry::Named("CPEN".into(), 1),
                FieldEntry::Named("CINS".into(), 1),
                FieldEntry::Named("CRMV".into(), 1),
                FieldEntry::Offset(2),
                FieldEntry::Named("CCMD".into(), 8),
            ],
        },
        // CSTA (cpu): 0x0f when present, else 0.
        Term::serialized_method(
            "CSTA",
            1,
            locked(vec![
                select(Expr::Arg(0)),
                Term::store(Expr::Int(0), Target::Local(0)),
                Term::if_then(
                    Expr::logic(LogicOp::LEqual, Expr::path("CPEN"), Expr::Int(1)),
                    vec![Term::store(Expr::Int(0x0f), Target::Local(0))],
                ),
            ])
            .into_iter()
            .chain([Term::ret(Expr::Local(0))])
            .collect(),
        ),
        // CEJ0 (cpu): eject it.
        Term::serialized_method(
            "CEJ0",
            1,
            locked(vec![select(Expr::Arg(0)), command(CMD_EJECT)]),
        ),
        scan_method(max),
    ];
    terms.extend((0..max).map(cpu_device));
    Term::device("CPUS", terms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::aml::{self, tests::walker::Walker};

    #[test]
    fn the_container_names_every_possible_cpu_with_its_methods() {
        let body = aml::to_aml(&[Term::scope("\\_SB", vec![container(3)])]).unwrap();
        let names = Walker::walk(&body).unwrap();
        for n in [
            "CPUS._HID",
            "CPUS.CSCN",
            "CPUS.CSTA",
            "CPUS.CEJ0",
            "CPUS.CSEL",
        ] {
            assert!(names.contains(&format!("\\_SB_.{n}")), "{n}: {names:?}");
        }
        for cpu in ["C000", "C001", "C002"] {
            for m in ["_HID", "_UID", "_STA", "_MAT", "_EJ0"] {
                let n = format!("\\_SB_.CPUS.{cpu}.{m}");
                assert!(names.contains(&n), "{n}: {names:?}");
            }
        }
        assert!(!names.iter().any(|n| n.contains("C003")));
    }

    #[test]
    fn mat_buffers_are_lapic_entries_enabled_or_not() {
        let body = aml::to_aml(&[container(2)]).unwrap();
        let has = |b: &[u8]| body.windows(b.len()).any(|w| w == b);
        assert!(has(&[0, 8, 1, 1, 1, 0, 0, 0]));
        assert!(has(&[0, 8, 1, 1, 0, 0, 0, 0]));
        assert_eq!(madt_flags(0, 1), LAPIC_ENABLED);
        assert_eq!(madt_flags(1, 1), LAPIC_ONLINE_CAPABLE);
    }

    #[test]
    fn the_largest_machine_encodes() {
        assert!(aml::to_aml(&[container(crate::x86_64::mptable::MAX_CPUS)]).is_ok());
    }
}
