//! virsh's hotplug verbs: `attach-disk`, `detach-disk`, `attach-interface`,
//! `detach-interface`. Devices come and go on PCI through ACPI hotplug while the VM runs;
//! `--persistent` also changes the VM's definition (for its next start).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use super::{finish, get, running, Failure};
use crate::api::client;
use crate::api::hotplug::{DEFAULT_DETACH_TIMEOUT_SECS, MAX_DETACH_TIMEOUT_SECS};
use crate::config::{self, DiskConfig, Mac, NetConfig, VmConfig};
use crate::definitions;

/// `ember attach-disk`.
#[derive(Args, Debug)]
pub struct AttachDiskArgs {
    /// The VM's name
    pub name: String,
    /// The image (raw or qcow2)
    pub file: PathBuf,
    /// The device's id (vdb, vdc, ...; the first free one when not given). The guest names
    /// its disks in the order it finds them, whatever the id
    #[arg(long)]
    pub target: Option<String>,
    /// `readonly`: the guest may not write
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// The image format (probed when not given)
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Also add the disk to the VM's definition
    #[arg(long)]
    pub persistent: bool,
}

/// Image formats.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    /// Raw.
    Raw,
    /// qcow2.
    Qcow2,
}

/// `ember detach-disk` / `ember detach-interface`'s waiting and persistence.
#[derive(Args, Debug)]
pub struct DetachOpts {
    /// Seconds to wait for the guest to release the device
    #[arg(long, value_name = "S", default_value_t = DEFAULT_DETACH_TIMEOUT_SECS)]
    pub timeout: u32,
    /// Also remove the device from the VM's definition
    #[arg(long)]
    pub persistent: bool,
}

/// `ember detach-disk`.
#[derive(Args, Debug)]
pub struct DetachDiskArgs {
    /// The VM's name
    pub name: String,
    /// The disk's id (as `ember domblklist` shows it)
    pub target: String,
    #[command(flatten)]
    pub opts: DetachOpts,
}

/// virsh's interface types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IfaceType {
    /// A network made by `ember net create` (a tap on its bridge).
    Network,
    /// A host bridge (a tap on it).
    Bridge,
    /// An existing tap (or one Ember may create) by name.
    Tap,
}

/// `ember attach-interface`.
#[derive(Args, Debug)]
pub struct AttachIfaceArgs {
    /// The VM's name
    pub name: String,
    /// What --source names
    #[arg(long = "type", value_enum)]
    pub kind: IfaceType,
    /// The network, bridge or tap
    #[arg(long)]
    pub source: String,
    /// The MAC (derived from the VM's name when not given)
    #[arg(long)]
    pub mac: Option<String>,
    /// Also add the NIC to the VM's definition
    #[arg(long)]
    pub persistent: bool,
}

/// `ember detach-interface`.
#[derive(Args, Debug)]
pub struct DetachIfaceArgs {
    /// The VM's name
    pub name: String,
    /// The NIC's MAC (as `ember domiflist` shows it)
    #[arg(long)]
    pub mac: String,
    #[command(flatten)]
    pub opts: DetachOpts,
}

/// The definition of `name`, for `--persistent`, checked before anything changes.
fn definition(name: &str, persistent: bool) -> Result<Option<VmConfig>, Failure> {
    if !persistent {
        return Ok(None);
    }
    if !definitions::exists(name) {
        return Err(Failure::usage(format!(
            "--persistent: VM '{name}' has no definition (it was started with 'ember run'); \
             leave --persistent out or define it first"
        )));
    }
    definitions::load(name)
        .map(Some)
        .map_err(|e| Failure::usage(crate::error_chain(&e)))
}

fn save_definition(cfg: &VmConfig) -> Result<(), Failure> {
    definitions::save(cfg)
        .map(|_| ())
        .map_err(|e| Failure::failed(crate::error_chain(&e)))
}

/// `PUT path` with `body` on the running VM `name`; the answer's JSON.
fn put(name: &str, path: &str, body: &Value, wait: Duration) -> Result<Value, Failure> {
    let vm = running(name)?;
    let r = client::call_waiting(&vm.api_sock, "PUT", path, Some(&body.to_string()), wait)?;
    serde_json::from_str(&r.body).map_err(|e| Failure::failed(format!("bad answer: {e}")))
}

fn attached(name: &str, what: &str, v: &Value) {
    println!(
        "{what} {} attached to VM {name} in PCI slot {}",
        v["id"].as_str().unwrap_or("?"),
        v["pci"].as_str().unwrap_or("?"),
    );
    if v["guest_listening"] != json!(true) {
        eprintln!(
            "ember: the guest has not enabled ACPI PCI hotplug events (still booting, or no \
             ACPI/CONFIG_HOTPLUG_PCI_ACPI): it finds the device at its next bus scan"
        );
    }
}

/// `ember attach-disk NAME FILE [--target vdX] [--mode readonly] [--persistent]`.
pub fn attach_disk(a: AttachDiskArgs) -> ExitCode {
    finish((|| {
        let readonly = match a.mode.as_deref() {
            None => false,
            Some("readonly") => true,
            Some(m) => {
                return Err(Failure::usage(format!(
                    "--mode {m}: only 'readonly' exists"
                )))
            }
        };
        config::check_readable_file("FILE", &a.file).map_err(|e| Failure::usage(e.to_string()))?;
        let path = std::fs::canonicalize(&a.file)
            .map_err(|e| Failure::usage(format!("FILE '{}': {e}", a.file.display())))?;
        let disk: DiskConfig = serde_json::from_value(json!({
            "path": path,
            "id": a.target,
            "readonly": readonly,
            "format": a.format.map(|f| format!("{f:?}").to_lowercase()),
        }))
        .map_err(|e| Failure::usage(e.to_string()))?;
        disk.check("--target")
            .map_err(|e| Failure::usage(e.to_string()))?;
        let mut def = definition(&a.name, a.persistent)?;
        let v = put(
            &a.name,
            "/ember/devices/disk",
            &json!(disk),
            client::TIMEOUT,
        )?;
        attached(&a.name, "disk", &v);
        if let Some(def) = &mut def {
            let cfg: DiskConfig = serde_json::from_value(v["config"].clone())
                .map_err(|e| Failure::failed(format!("bad answer: {e}")))?;
            def.disks.push(cfg);
            save_definition(def)?;
        }
        Ok(())
    })())
}

/// `ember attach-interface NAME --type network|bridge|tap --source SRC [--mac ..]`.
pub fn attach_interface(a: AttachIfaceArgs) -> ExitCode {
    finish((|| {
        let mac: Option<Mac> = match &a.mac {
            Some(m) => Some(
                m.parse()
                    .map_err(|e| Failure::usage(format!("--mac {m}: {e}")))?,
            ),
            None => None,
        };
        let key = match a.kind {
            IfaceType::Network => "network",
            IfaceType::Bridge => "bridge",
            IfaceType::Tap => "tap",
        };
        let mut body = json!({ key: a.source });
        if let Some(m) = mac {
            body["mac"] = json!(m.to_string());
        }
        let net: NetConfig =
            serde_json::from_value(body).map_err(|e| Failure::usage(e.to_string()))?;
        net.check("--source")
            .map_err(|e| Failure::usage(e.to_string()))?;
        let mut def = definition(&a.name, a.persistent)?;
        let v = put(&a.name, "/ember/devices/net", &json!(net), client::TIMEOUT)?;
        attached(&a.name, "interface", &v);
        if let Some(def) = &mut def {
            let cfg: NetConfig = serde_json::from_value(v["config"].clone())
                .map_err(|e| Failure::failed(format!("bad answer: {e}")))?;
            def.nets.push(cfg);
            save_definition(def)?;
        }
        Ok(())
    })())
}

/// Detaches `id` (of `kind`) and waits for the guest; drops it from the definition too with
/// `--persistent`.
fn detach(name: &str, id: &str, kind: &str, o: &DetachOpts) -> Result<(), Failure> {
    if o.timeout == 0 || o.timeout > MAX_DETACH_TIMEOUT_SECS {
        return Err(Failure::usage(format!(
            "--timeout {}: give 1 to {MAX_DETACH_TIMEOUT_SECS} seconds",
            o.timeout
        )));
    }
    let mut def = definition(name, o.persistent)?;
    let body = json!({"id": id, "kind": kind, "timeout_secs": o.timeout});
    let wait = Duration::from_secs(u64::from(o.timeout) + 10);
    let v = put(name, "/ember/devices/detach", &body, wait)?;
    println!(
        "{} {id} detached from VM {name} (the guest released it in {} ms)",
        if kind == "disk" { "disk" } else { "interface" },
        v["guest_ms"].as_u64().unwrap_or(0)
    );
    if let Some(def) = &mut def {
        def.disks.retain(|d| d.id() != id);
        def.nets.retain(|n| n.id() != id);
        save_definition(def)?;
    }
    Ok(())
}

/// `ember detach-disk NAME TARGET`.
pub fn detach_disk(a: DetachDiskArgs) -> ExitCode {
    finish(detach(&a.name, &a.target, "disk", &a.opts))
}

/// `ember detach-interface NAME --mac MAC`.
pub fn detach_interface(a: DetachIfaceArgs) -> ExitCode {
    finish((|| {
        let mac: Mac = a
            .mac
            .parse()
            .map_err(|e| Failure::usage(format!("--mac {}: {e}", a.mac)))?;
        let info = get(&a.name, "/ember/info")?;
        let nics = info["devices"].as_array().cloned().unwrap_or_default();
        let want = mac.to_string();
        let id = nics
            .iter()
            .filter(|d| d["kind"] == "virtio-net")
            .find(|d| {
                d["mac"]
                    .as_str()
                    .is_some_and(|m| m.eq_ignore_ascii_case(&want))
            })
            .and_then(|d| d["id"].as_str().map(str::to_string))
            .ok_or_else(|| {
                Failure::usage(format!("VM {} has no interface with MAC {want}", a.name))
            })?;
        detach(&a.name, &id, "net", &a.opts)
    })())
}
