//! virsh's memory verbs: `setmem` (the balloon's target: how much memory the guest keeps),
//! `setmaxmem` (the VM's memory, in its definition: Ember cannot add memory to a running
//! VM) and `dommemstat` (the balloon and the guest's statistics, in virsh's words and KiB).

use std::process::ExitCode;

use clap::Args;
use serde_json::{json, Value};

use super::{finish, get, send, Failure};
use crate::config::{self, parse_size, Size};
use crate::{definitions, vmdir};

/// `ember setmem`.
#[derive(Args, Debug)]
pub struct SetmemArgs {
    /// The VM's name
    pub name: String,
    /// Memory: K/M/G suffixes; a bare number is MiB (virsh takes KiB)
    pub size: String,
}

/// `ember setmaxmem`.
#[derive(Args, Debug)]
pub struct SetmaxmemArgs {
    /// The VM's name
    pub name: String,
    /// Memory: K/M/G suffixes; a bare number is MiB (virsh takes KiB)
    pub size: String,
    /// Change the definition even while the VM runs (it takes effect at the next start)
    #[arg(long)]
    pub config: bool,
}

/// `ember dommemstat`.
#[derive(Args, Debug)]
pub struct DommemstatArgs {
    /// The VM's name
    pub name: String,
    /// Ask the guest for statistics every S seconds from now on (0: stop)
    #[arg(long, value_name = "S")]
    pub period: Option<u16>,
}

fn size_arg(s: &str) -> Result<Size, Failure> {
    parse_size(s)
        .map(Size)
        .map_err(|m| Failure::usage(format!("size: {m}")))
}

/// `ember setmem NAME SIZE`: the guest gives memory back (or takes it again) until it has
/// SIZE; at most the VM's memory.
pub fn setmem(a: SetmemArgs) -> ExitCode {
    finish((|| {
        let size = size_arg(&a.size)?;
        let info = get(&a.name, "/ember/balloon")?;
        if info["balloon"] != json!(true) {
            return Err(Failure::usage(format!(
                "VM {} has no balloon device, so its memory cannot change while it runs; \
                 start it with --balloon on",
                a.name
            )));
        }
        let body = json!({ "target": size.to_string() });
        send(&a.name, "PATCH", "/ember/balloon", body)?;
        if info["driver_ready"] == json!(true) {
            println!(
                "VM {}: memory target set to {size} (the guest gets there at its own pace; \
                 see 'ember dommemstat {}')",
                a.name, a.name
            );
        } else {
            println!(
                "VM {}: memory target set to {size}; the guest has not started its balloon \
                 driver yet, it gets there once it does",
                a.name
            );
        }
        Ok(())
    })())
}

/// `ember setmaxmem NAME SIZE [--config]`: the VM's memory in its definition. A running VM's
/// memory is fixed (Ember has no memory hotplug), so that needs `--config` and takes effect
/// at the next start; a balloon target above the new size comes down with it.
pub fn setmaxmem(a: SetmaxmemArgs) -> ExitCode {
    finish((|| {
        let size = size_arg(&a.size)?;
        config::check_memory(size.0).map_err(|e| Failure::usage(e.message))?;
        let running = vmdir::find(&a.name).is_some();
        if running && !a.config {
            return Err(Failure::usage(format!(
                "VM {name} is running: its maximum memory cannot change while it runs (Ember \
                 has no memory hotplug). Use 'ember setmem {name} SIZE' to change what the \
                 guest uses, up to its maximum, or 'ember setmaxmem {name} {size} --config' to \
                 change its definition for the next start",
                name = a.name,
            )));
        }
        if !definitions::exists(&a.name) {
            return Err(Failure::usage(format!(
                "no VM named '{}' is defined; setmaxmem changes a definition (see 'ember \
                 list --all')",
                a.name
            )));
        }
        let mut cfg =
            definitions::load(&a.name).map_err(|e| Failure::usage(crate::error_chain(&e)))?;
        cfg.memory = size;
        if let Some(b) = &mut cfg.balloon {
            b.target = b.target.filter(|t| t.0 < size.0);
        }
        definitions::save(&cfg).map_err(|e| Failure::failed(crate::error_chain(&e)))?;
        let when = if running {
            "from its next start"
        } else {
            "when it starts"
        };
        println!("VM {}: maximum memory set to {size} {when}", a.name);
        Ok(())
    })())
}

/// The lines `virsh dommemstat` prints for `v` (a `GET /ember/balloon` answer): sizes in
/// KiB, faults as counts, `last_update` in seconds since the epoch.
pub fn dommemstat_lines(v: &Value) -> Vec<(String, u64)> {
    let kib = |x: &Value| x.as_u64().map(|b| b >> 10);
    let mut out = Vec::new();
    let mut push = |name: &str, val: Option<u64>| {
        if let Some(val) = val {
            out.push((name.to_string(), val));
        }
    };
    push("actual", kib(&v["actual"]));
    let s = &v["stats"];
    for (name, key, bytes) in [
        ("swap_in", "swap_in", true),
        ("swap_out", "swap_out", true),
        ("major_fault", "major_faults", false),
        ("minor_fault", "minor_faults", false),
        ("unused", "free_memory", true),
        ("available", "total_memory", true),
        ("usable", "available_memory", true),
    ] {
        push(name, if bytes { kib(&s[key]) } else { s[key].as_u64() });
    }
    if !s.as_object().is_none_or(|m| m.is_empty()) {
        push("last_update", v["last_update"].as_u64());
    }
    push("disk_caches", kib(&s["disk_caches"]));
    push("hugetlb_pgalloc", s["hugetlb_allocations"].as_u64());
    push("hugetlb_pgfail", s["hugetlb_failures"].as_u64());
    push("rss", kib(&v["rss"]));
    out
}

/// `ember dommemstat NAME [--period S]`.
pub fn dommemstat(a: DommemstatArgs) -> ExitCode {
    finish((|| {
        if let Some(p) = a.period {
            send(
                &a.name,
                "PATCH",
                "/ember/balloon",
                json!({ "stats_period": p }),
            )?;
        }
        let v = get(&a.name, "/ember/balloon")?;
        for (name, val) in dommemstat_lines(&v) {
            println!("{name} {val}");
        }
        if v["balloon"] == json!(true) && v["stats_period"] == json!(0) && a.period.is_none() {
            eprintln!(
                "ember: the guest's statistics are off; 'ember dommemstat {} --period 5' turns \
                 them on",
                a.name
            );
        }
        Ok(())
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dommemstat_prints_virshs_names_in_kib() {
        let v = json!({
            "balloon": true,
            "actual": 128u64 << 20,
            "rss": 50u64 << 20,
            "stats": {"swap_in": 0, "major_faults": 3, "total_memory": 130u64 << 20,
                      "available_memory": 100u64 << 20, "free_memory": 90u64 << 20},
            "last_update": 1700000000u64,
        });

        let lines = dommemstat_lines(&v);

        let want: Vec<(String, u64)> = [
            ("actual", 131072),
            ("swap_in", 0),
            ("major_fault", 3),
            ("unused", 92160),
            ("available", 133120),
            ("usable", 102400),
            ("last_update", 1700000000),
            ("rss", 51200),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), *v))
        .collect();
        assert_eq!(lines, want);
    }

    #[test]
    fn without_a_balloon_dommemstat_has_actual_and_rss() {
        let v = json!({"balloon": false, "actual": 256u64 << 20, "rss": 1u64 << 20});

        let lines = dommemstat_lines(&v);

        assert_eq!(
            lines,
            vec![("actual".to_string(), 262144), ("rss".to_string(), 1024)]
        );
    }
}
