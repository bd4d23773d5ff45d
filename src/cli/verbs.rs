//! virsh's domain verbs on running VMs: list, shutdown, reboot, reset, destroy, suspend,
//! resume, console, dominfo, domblklist, domiflist, vcpuinfo, domstats.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use super::{finish, get, running, send, Failure};
use crate::api::ShutdownMode;
use crate::{definitions, vmdir};

/// A VM name.
#[derive(Args, Debug)]
pub struct NameArg {
    /// The VM's name
    pub name: String,
}

/// `ember list`.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Also defined VMs that are not running
    #[arg(long)]
    pub all: bool,
    /// Only names
    #[arg(long)]
    pub name: bool,
}

/// `ember shutdown`.
#[derive(Args, Debug)]
pub struct ShutdownArgs {
    /// The VM's name
    pub name: String,
    /// How to ask the guest: acpi (the power button) or ctrl-alt-del
    #[arg(long, value_name = "MODE", default_value = "acpi")]
    pub mode: String,
    /// Wait up to S seconds for the VM to end, and say so plainly if it did not
    #[arg(long, value_name = "S")]
    pub timeout: Option<u64>,
}

/// `ember reboot`.
#[derive(Args, Debug)]
pub struct RebootArgs {
    /// The VM's name
    pub name: String,
    /// How to ask the guest: acpi (the power button) or ctrl-alt-del
    #[arg(long, value_name = "MODE", default_value = "acpi")]
    pub mode: String,
}

/// `ember console`.
#[derive(Args, Debug)]
pub struct ConsoleArgs {
    /// The VM's name
    pub name: String,
    /// Take the console over from another client
    #[arg(long)]
    pub force: bool,
}

/// Prints a virsh-style table.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        outln!(" {}", parts.join("   ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    let total: usize = widths.iter().sum::<usize>() + 3 * widths.len();
    outln!("{}", "-".repeat(total));
    for r in rows {
        line(r.clone());
    }
}

/// `ember list [--all]`.
pub fn list(a: ListArgs) -> ExitCode {
    let mut rows = Vec::new();
    for vm in vmdir::list() {
        let state = crate::api::client::get_json(&vm.api_sock, "/")
            .ok()
            .and_then(|v| v["state"].as_str().map(str::to_string))
            .map(|s| match s.as_str() {
                "Running" => "running".to_string(),
                "Paused" => "paused".to_string(),
                "Not started" => "configuring".to_string(),
                other => other.to_lowercase(),
            })
            .unwrap_or_else(|| "unknown".into());
        rows.push(vec![vm.pid.to_string(), vm.name, state]);
    }
    if a.all {
        for name in definitions::names() {
            if !rows.iter().any(|r| r[1] == name) {
                rows.push(vec!["-".into(), name, "shut off".into()]);
            }
        }
    }
    if a.name {
        for r in rows {
            outln!("{}", r[1]);
        }
    } else {
        print_table(&["Id", "Name", "State"], &rows);
    }
    ExitCode::SUCCESS
}

fn parse_mode(s: &str) -> Result<ShutdownMode, Failure> {
    match s {
        "acpi" => Ok(ShutdownMode::Acpi),
        "ctrl-alt-del" => Ok(ShutdownMode::CtrlAltDel),
        other => Err(Failure::usage(format!(
            "--mode {other}: use acpi or ctrl-alt-del"
        ))),
    }
}

fn action(name: &str, kind: &str, mode: ShutdownMode) -> Result<(), Failure> {
    send(
        name,
        "PUT",
        "/ember/actions",
        json!({"action_type": kind, "mode": mode}),
    )
}

/// Waits until VM `name` no longer runs.
fn wait_gone(name: &str, pid: u32, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if vmdir::find(name).is_none_or(|r| r.pid != pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `ember shutdown NAME [--mode acpi|ctrl-alt-del] [--timeout S]`.
pub fn shutdown(a: ShutdownArgs) -> ExitCode {
    finish((|| {
        let mode = parse_mode(&a.mode)?;
        let vm = running(&a.name)?;
        action(&a.name, "Shutdown", mode)?;
        let Some(secs) = a.timeout else {
            outln!("VM {} is being shut down", a.name);
            return Ok(());
        };
        if wait_gone(&a.name, vm.pid, Duration::from_secs(secs)) {
            outln!("VM {} is shut off", a.name);
            Ok(())
        } else {
            Err(Failure::failed(format!(
                "VM {} is still running after {secs} s: its guest ignored the {} request; try \
                 --mode {} or 'ember destroy {}'",
                a.name,
                a.mode,
                if mode == ShutdownMode::Acpi {
                    "ctrl-alt-del"
                } else {
                    "acpi"
                },
                a.name
            )))
        }
    })())
}

/// `ember reboot NAME`.
pub fn reboot(a: RebootArgs) -> ExitCode {
    finish((|| {
        let mode = parse_mode(&a.mode)?;
        action(&a.name, "Reboot", mode)?;
        outln!("VM {} is being rebooted", a.name);
        Ok(())
    })())
}

/// `ember reset NAME`.
pub fn reset(a: NameArg) -> ExitCode {
    finish((|| {
        action(&a.name, "Reset", ShutdownMode::Acpi)?;
        outln!("VM {} was reset", a.name);
        Ok(())
    })())
}

/// `ember destroy NAME`: ends the VM and waits until its process is gone.
pub fn destroy(a: NameArg) -> ExitCode {
    finish((|| {
        let vm = running(&a.name)?;
        action(&a.name, "Destroy", ShutdownMode::Acpi)?;
        if !wait_gone(&a.name, vm.pid, Duration::from_secs(10)) {
            return Err(Failure::failed(format!(
                "VM {} (pid {}) did not end within 10 s",
                a.name, vm.pid
            )));
        }
        outln!("VM {} destroyed", a.name);
        Ok(())
    })())
}

fn set_state(name: &str, state: &str) -> Result<(), Failure> {
    send(name, "PATCH", "/vm", json!({ "state": state }))
}

/// `ember suspend NAME`.
pub fn suspend(a: NameArg) -> ExitCode {
    finish(set_state(&a.name, "Paused").map(|()| outln!("VM {} suspended", a.name)))
}

/// `ember resume NAME`.
pub fn resume(a: NameArg) -> ExitCode {
    finish(set_state(&a.name, "Resumed").map(|()| outln!("VM {} resumed", a.name)))
}

/// `ember console NAME [--force]`.
pub fn console(a: ConsoleArgs) -> ExitCode {
    finish((|| {
        let vm = running(&a.name)?;
        super::console::attach(&a.name, &vm.api_sock, a.force)
    })())
}

fn field(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `ember dominfo NAME`.
pub fn dominfo(a: NameArg) -> ExitCode {
    finish((|| {
        let v = get(&a.name, "/ember/info")?;
        let uptime = v["uptime_ms"].as_u64().unwrap_or(0) / 1000;
        let rows = [
            ("Id", field(&v, "pid")),
            ("Name", field(&v, "name")),
            ("State", field(&v, "state").to_lowercase()),
            ("CPU(s)", field(&v, "vcpus")),
            ("Max CPU(s)", field(&v, "max_vcpus")),
            ("Memory", format!("{} MiB", field(&v, "memory_mib"))),
            ("Uptime", format!("{uptime} s")),
            ("Kernel", field(&v, "kernel")),
            ("Console", field(&v, "console")),
            ("API socket", field(&v, "api_sock")),
            ("Persistent", yes_no(definitions::exists(&a.name))),
            ("Autostart", enable(definitions::autostart(&a.name))),
        ];
        for (k, val) in rows {
            outln!("{:<16}{val}", format!("{k}:"));
        }
        outln!("Devices:");
        let devs = v["devices"].as_array().cloned().unwrap_or_default();
        for d in devs {
            outln!(
                "  {:<12}{:<16}{:<6}{:#x}{}",
                field(&d, "id"),
                field(&d, "kind"),
                field(&d, "transport"),
                d["address"].as_u64().unwrap_or(0),
                d["backend"]
                    .as_str()
                    .map(|b| format!("  {b}"))
                    .unwrap_or_default()
                    + if d["detach_pending"].as_bool() == Some(true) {
                        "  (detach pending)"
                    } else {
                        ""
                    }
            );
        }
        Ok(())
    })())
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

fn enable(b: bool) -> String {
    if b { "enable" } else { "disable" }.into()
}

fn devices_of(name: &str, kind: &str) -> Result<Vec<Value>, Failure> {
    let v = get(name, "/ember/info")?;
    Ok(v["devices"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect())
}

/// `ember domblklist NAME`.
pub fn domblklist(a: NameArg) -> ExitCode {
    finish((|| {
        let rows: Vec<Vec<String>> = devices_of(&a.name, "virtio-blk")?
            .iter()
            .map(|d| vec![field(d, "id"), field(d, "backend")])
            .collect();
        print_table(&["Target", "Source"], &rows);
        Ok(())
    })())
}

/// `ember domiflist NAME`.
pub fn domiflist(a: NameArg) -> ExitCode {
    finish((|| {
        let rows: Vec<Vec<String>> = devices_of(&a.name, "virtio-net")?
            .iter()
            .map(|d| {
                vec![
                    field(d, "id"),
                    "tap".into(),
                    field(d, "backend"),
                    "virtio".into(),
                    field(d, "mac"),
                ]
            })
            .collect();
        print_table(&["Interface", "Type", "Source", "Model", "MAC"], &rows);
        Ok(())
    })())
}

/// Per vCPU thread: (index, last host CPU, CPU seconds, state letter), from /proc.
fn vcpu_threads(pid: u32) -> Vec<(u32, String, f64, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let tick = 100.0; // USER_HZ
    let mut out: Vec<_> = tasks
        .filter_map(Result::ok)
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let idx: u32 = comm.trim().strip_prefix("vcpu ")?.parse().ok()?;
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let after = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = after.split(' ').collect();
            let cpu_time =
                (f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / tick;
            Some((
                idx,
                f.get(36)?.to_string(),
                cpu_time,
                f.first()?.to_string(),
            ))
        })
        .collect();
    out.sort_by_key(|t| t.0);
    out
}

/// `ember vcpuinfo NAME`.
pub fn vcpuinfo(a: NameArg) -> ExitCode {
    finish((|| {
        let vm = running(&a.name)?;
        let info = get(&a.name, "/ember/info")?;
        let vm_state = field(&info, "state").to_lowercase();
        // Unplugged vCPUs have no thread; a thread that is ending may linger a moment.
        let present: Option<Vec<u64>> = info["present_vcpus"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect());
        let threads = vcpu_threads(vm.pid)
            .into_iter()
            .filter(|t| present.as_ref().is_none_or(|p| p.contains(&u64::from(t.0))));
        for (i, (idx, cpu, secs, st)) in threads.enumerate() {
            if i > 0 {
                outln!();
            }
            let state = if vm_state == "paused" {
                "paused".to_string()
            } else if st == "R" {
                "running".to_string()
            } else {
                "idle".to_string()
            };
            outln!("{:<16}{idx}", "VCPU:");
            outln!("{:<16}{cpu}", "CPU:");
            outln!("{:<16}{state}", "State:");
            outln!("{:<16}{secs:.1}s", "CPU time:");
        }
        Ok(())
    })())
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                flatten(&format!("{prefix}.{k}"), x, out);
            }
        }
        Value::Array(a) => {
            out.push((format!("{prefix}.count"), a.len().to_string()));
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{prefix}.{i}"), x, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// `ember domstats NAME`: counters as `key=value` lines, as virsh domstats prints them.
pub fn domstats(a: NameArg) -> ExitCode {
    finish((|| {
        let v = get(&a.name, "/ember/counters")?;
        outln!("Domain: '{}'", a.name);
        let mut out = Vec::new();
        for key in ["state", "vcpus", "disks", "nets"] {
            flatten(key, &v[key], &mut out);
        }
        for (k, val) in out {
            outln!("  {k}={val}");
        }
        Ok(())
    })())
}

/// `ember save`.
#[derive(Args, Debug)]
pub struct SaveArgs {
    /// The VM's name
    pub name: String,
    /// The state file to write (memory goes to FILE.mem)
    pub file: std::path::PathBuf,
}

/// `ember restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// A state file 'ember save' (or a snapshot) wrote
    pub file: std::path::PathBuf,
    /// The restored VM's name (default: the saved one); two VMs can come from one file
    #[arg(long)]
    pub name: Option<String>,
    /// Leave its vCPUs paused
    #[arg(long)]
    pub paused: bool,
    /// Track dirty pages for Diff snapshots (as 'ember run --restore --track-dirty-pages')
    #[arg(long)]
    pub track_dirty_pages: bool,
}

/// `ember save NAME FILE`: the VM is written to FILE and ends.
pub fn save(a: SaveArgs) -> ExitCode {
    finish((|| {
        let vm = running(&a.name)?;
        let path = std::path::absolute(&a.file)
            .map_err(|e| Failure::usage(format!("{}: {e}", a.file.display())))?;
        send(&a.name, "PUT", "/ember/save", json!({ "path": path }))?;
        wait_gone(&a.name, vm.pid, Duration::from_secs(30));
        outln!("VM {} saved to {}", a.name, a.file.display());
        Ok(())
    })())
}

/// Checks the snapshot at `file` as far as it can be without building its VM (the state
/// file, the state, the memory file); returns the saved VM's name.
fn check_restorable(file: &std::path::Path) -> Result<String, Failure> {
    use crate::snapshot::{self, SnapshotError, SnapshotState};
    let refused = |e: SnapshotError| Failure::usage(crate::error_chain(&e));
    let state: SnapshotState = snapshot::format::read_file(file).map_err(|e| refused(e.into()))?;
    state.check().map_err(|e| {
        Failure::usage(format!(
            "{}: cannot be restored: {}",
            file.display(),
            crate::error_chain(&e)
        ))
    })?;
    let memory = snapshot::memory_path_for(file);
    snapshot::memory::check_file(&memory, &state.memory, state.config.memory.0)
        .map_err(|e| refused(e.into()))?;
    Ok(state.config.name)
}

/// `ember restore FILE [--name N] [--paused]`: the VM runs on in the background.
pub fn restore(a: RestoreArgs) -> ExitCode {
    let saved_name = match check_restorable(&a.file) {
        Ok(n) => n,
        Err(f) => return finish(Err(f)),
    };
    let name = match a.name {
        Some(n) => n,
        None => match crate::config::parse_name(&saved_name) {
            Ok(n) => n,
            Err(_) => {
                return finish(Err(Failure::usage(format!(
                    "{}: the saved VM name '{saved_name}' is not a valid name; give --name",
                    a.file.display()
                ))))
            }
        },
    };
    if vmdir::find(&name).is_some() {
        return finish(Err(Failure::usage(format!(
            "a VM named '{name}' is already running; give another --name"
        ))));
    }
    let mut args: Vec<std::ffi::OsString> = vec![
        "run".into(),
        "--restore".into(),
        a.file.into_os_string(),
        "--name".into(),
        name.into(),
    ];
    if a.paused {
        args.push("--paused".into());
    }
    if a.track_dirty_pages {
        args.push("--track-dirty-pages".into());
    }
    super::detach::spawn_detached(&args)
}
