//! `ember setvcpus`: plug vCPUs into a running VM or ask its guest to give some back
//! (ACPI CPU hotplug, within the VM's `--cpus max`).

use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use super::{finish, get, send, Failure};

/// `ember setvcpus`.
#[derive(Args, Debug)]
pub struct SetvcpusArgs {
    /// The VM's name
    pub name: String,
    /// How many vCPUs it should have: 1 to its --cpus max
    #[arg(allow_hyphen_values = true)]
    pub count: String,
    /// Change the VM's definition (its next start); with --live, the running VM too
    #[arg(long)]
    pub config: bool,
    /// Change the running VM (the default without --config)
    #[arg(long)]
    pub live: bool,
    /// With --config: set the most vCPUs the VM may have (--cpus max), not its count
    #[arg(long)]
    pub maximum: bool,
}

/// The count, when it is one the VM can have.
fn count_arg(name: &str, count: &str, max: u64) -> Result<u8, Failure> {
    match count.trim().parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n as u8),
        _ => Err(Failure::usage(format!(
            "setvcpus: '{count}' vCPUs: VM {name} can have 1 to {max} (its --cpus max)"
        ))),
    }
}

/// `ember setvcpus NAME N [--config] [--live] [--maximum]`, as virsh's: the running VM
/// (CPUs are plugged in at once, the guest brings them online; CPUs asked back leave when
/// the guest has taken them offline and ejected them) and/or its definition.
pub fn setvcpus(a: SetvcpusArgs) -> ExitCode {
    finish((|| {
        if a.maximum && (!a.config || a.live) {
            return Err(Failure::usage(format!(
                "setvcpus --maximum: a running VM's maximum is fixed; use --maximum with \
                 --config alone to change VM {}'s definition for its next start",
                a.name
            )));
        }
        let live = a.live || !a.config;
        if live && crate::vmdir::find(&a.name).is_none() {
            return Err(Failure::usage(format!(
                "VM {} is not running: use 'ember setvcpus {} {} --config' to change its \
                 definition",
                a.name, a.name, a.count
            )));
        }
        if a.config {
            set_config(&a)?;
        }
        if live {
            set_live(&a)?;
        }
        Ok(())
    })())
}

/// `--config`: the definition's count at boot, or with `--maximum` its maximum.
fn set_config(a: &SetvcpusArgs) -> Result<(), Failure> {
    if !crate::definitions::exists(&a.name) {
        return Err(Failure::usage(format!(
            "no VM named '{}' is defined; setvcpus --config changes a definition (see 'ember \
             list --all')",
            a.name
        )));
    }
    let mut cfg =
        crate::definitions::load(&a.name).map_err(|e| Failure::usage(crate::error_chain(&e)))?;
    if a.maximum {
        let max = count_arg(&a.name, &a.count, u64::from(crate::config::MAX_CPUS))?;
        cfg.cpus.max = max;
        cfg.cpus.boot = cfg.cpus.boot.min(max);
    } else {
        cfg.cpus.boot = count_arg(&a.name, &a.count, u64::from(cfg.cpus.max))?;
    }
    crate::definitions::save(&cfg).map_err(|e| Failure::failed(crate::error_chain(&e)))?;
    println!(
        "VM {}: its definition has {} vCPUs at boot, at most {} (from its next start)",
        a.name, cfg.cpus.boot, cfg.cpus.max
    );
    Ok(())
}

/// The running VM.
fn set_live(a: &SetvcpusArgs) -> Result<(), Failure> {
    let info = get(&a.name, "/ember/info")?;
    let max = info["max_vcpus"].as_u64().unwrap_or(1);
    let count = count_arg(&a.name, &a.count, max)?;
    let before = info["present_vcpus"].as_array().map_or(0, Vec::len);
    send(&a.name, "PUT", "/ember/vcpus", json!({ "count": count }))?;
    let after = get(&a.name, "/ember/info")?;
    let now = after["present_vcpus"].as_array().map_or(0, Vec::len);
    if usize::from(count) < now {
        println!(
            "VM {}: asked the guest to give back {} of its {now} vCPUs (they leave once \
             it has taken them offline; see 'ember vcpuinfo {}')",
            a.name,
            now - usize::from(count),
            a.name
        );
    } else {
        println!("VM {}: {now} vCPUs (were {before})", a.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_outside_one_to_max_are_refused_in_one_line() {
        assert_eq!(count_arg("vm", "2", 4).unwrap(), 2);
        assert_eq!(count_arg("vm", "4", 4).unwrap(), 4);
        for bad in ["0", "5", "-1", "two", "", "300", "99999999999999999999"] {
            let f = count_arg("vm", bad, 4).unwrap_err();
            assert_eq!(f.code, 2, "{bad}");
            assert!(!f.message.contains('\n'));
            assert!(f.message.contains("1 to 4"), "{}", f.message);
        }
    }
}
