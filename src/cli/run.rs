//! `ember run`: a VM from the command line, from a Firecracker config file, or configured
//! through the API (`--api-sock` without `--kernel`), in the foreground or (`-d`) in the
//! background. `--expect`, `--fail-on`, `--timeout` and `--console-log` make it a one-shot
//! CI check with one exit status per verdict ([`EXIT_STATUS_HELP`]).

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use super::{detach, USAGE_ERROR};
use crate::api::firecracker::{ConfigFile, PendingVm};
use crate::ci_watch::{self, OutputWatch, WatchSpec};
use crate::config::{
    self, parse_name, parse_text, BalloonConfig, ConfigError, DiskConfig, NetConfig, SerialMode,
    VmConfig,
};
use crate::console::{is_terminal, RawTerminal};
use crate::migration::incoming::IncomingSpec;
use crate::migration::wire::AuthKey;
use crate::migration::Endpoint;
use crate::run_state::Outcome;
use crate::session::{self, RestoreSpec, RunRequest, Session};
use crate::{error_chain, signals};

/// The exit-status table, shown by `ember run --help` (and in the README).
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0      the guest powered off or reset (--reboot exit), the console was closed, the VM
         was destroyed, or --stop-on-expect saw the last --expect; with --expect, only
         if all were seen
  odd    the guest wrote V to the debug-exit port (0xf4): (V << 1) | 1, modulo 256
  1      also: the guest cannot go on (triple fault, KVM internal error) or Ember failed
  2      bad command line or configuration
  120    the guest kernel panicked (pvpanic)
  122    a --fail-on pattern matched a line of serial output
  124    --timeout ran out (the last serial lines are printed on stderr)
  126    the run ended (power-off, reset, debug-exit, console closed, VM destroyed)
         before every --expect was seen
  148    a thread made a system call its seccomp filter does not allow (--seccomp on;
         one line on stderr names the thread and the call)
  128+N  Ember was stopped by signal N (130 Ctrl-C, 143 SIGTERM)
Ember's own verdicts are even, so none is taken for a debug-exit status.";

/// `ember run`.
#[derive(Args, Debug, Default)]
#[command(after_help = EXIT_STATUS_HELP)]
pub struct RunArgs {
    /// Guest kernel: ELF vmlinux (PVH or 64-bit entry) or bzImage [qemu: -kernel]; without
    /// it (and without --config-file) the VM waits for its configuration on the API socket,
    /// as firecracker --api-sock does
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk / initramfs [qemu: -initrd]
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [qemu: -append]
    #[arg(long, value_name = "STRING", default_value = config::DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// vCPUs: N, or boot=N,max=M (1 to 32) [qemu: -smp]
    #[arg(long, value_name = "N", default_value = "1")]
    pub cpus: String,
    /// Guest RAM; K/M/G suffixes, a bare number is MiB [qemu: -m]
    #[arg(long, short = 'm', value_name = "SIZE", default_value = "256M")]
    pub memory: String,
    /// Serial console: stdio (Ctrl-] quits), pty, file=PATH, log (the VM's console log and
    /// `ember console`; the default with -d) or none [qemu: -serial]
    #[arg(long, value_name = "MODE")]
    pub serial: Option<String>,
    /// CPU features to hide (-name) or require (+name), /proc/cpuinfo names, e.g. -cx16,+popcnt
    /// [qemu: -cpu host,-cx16]
    #[arg(long, value_name = "LIST", allow_hyphen_values = true)]
    pub cpu_features: Option<String>,
    /// What a guest reboot does: exit (status 0) or restart [qemu: -no-reboot is exit]
    #[arg(long, value_name = "ACTION", default_value = "exit")]
    pub reboot: String,
    /// Block device: path=FILE[,id=vdX][,format=raw|qcow2][,readonly=on][,serial=ID]
    /// [,cache=writeback|none]; repeatable: vda, vdb, ... [qemu: -drive if=virtio]
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<String>,
    /// NIC: tap=NAME|fd=N|network=NAME[,id=ethN][,mac=52:54:00:xx:xx:xx][,mtu=N]; repeatable
    /// [qemu: -netdev tap,ifname=NAME -device virtio-net]
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<String>,
    /// Memory balloon: on|off[,target=SIZE][,deflate_on_oom=on][,free_page_reporting=on]
    /// [,stats_period=S][,transport=mmio|pci]; ember setmem/dommemstat drive it
    /// [qemu: -device virtio-balloon]
    #[arg(long, value_name = "SPEC")]
    pub balloon: Option<String>,
    /// The transport of devices that name none: mmio (default) or pci. With pci the VM has
    /// a PCI bus and its ACPI hotplug slots (ember attach-disk/attach-interface need them)
    #[arg(long, value_name = "mmio|pci")]
    pub transport: Option<String>,
    /// VM name, unique on the host (default ember-PID); default MACs derive from it
    /// [qemu: -name, firecracker: --id]
    #[arg(long, visible_alias = "id", value_name = "NAME")]
    pub name: Option<String>,
    /// Root device, added to the command line as root=DEVICE rw (e.g. /dev/vda)
    #[arg(long, value_name = "DEVICE")]
    pub root: Option<String>,
    /// isa-debug-exit on port 0xf4: a guest write of V exits with status (V << 1) | 1
    #[arg(long, value_name = "on|off", default_value = "on", num_args = 0..=1,
          default_missing_value = "on")]
    pub debug_exit: String,
    /// The API socket's path (default: api.sock in the VM's state directory)
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// No API socket
    #[arg(long)]
    pub no_api: bool,
    /// The VM from a Firecracker JSON config file (boot-source, drives, machine-config, ...)
    #[arg(long, value_name = "FILE", conflicts_with = "kernel")]
    pub config_file: Option<PathBuf>,
    /// Run in the background; prints the VM's name once it runs
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Start from a snapshot state file (memory from FILE.mem) instead of a kernel; --name,
    /// --serial, --net and --disk (matched by id, else by position), --api-sock and -d
    /// replace the saved ones
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "config_file"])]
    pub restore: Option<PathBuf>,
    /// With --restore: start with the vCPUs paused
    #[arg(long, requires = "restore")]
    pub paused: bool,
    /// With --restore: the memory file (default FILE.mem), e.g. a base a Diff snapshot was
    /// merged onto with 'ember snapshot-rebase'
    #[arg(long, value_name = "FILE", requires = "restore")]
    pub mem_file: Option<PathBuf>,
    /// Track the pages the guest writes, so the API's /snapshot/create can take Diff
    /// snapshots (Firecracker's track_dirty_pages), with --kernel, --config-file or
    /// --restore (a snapshot does not keep it, as in Firecracker)
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// With --restore: set the guest's clock as it was saved, not advanced by the time the
    /// VM was away (Firecracker's and QEMU's way; a guest then skips catching up on the
    /// jump, and every restore of one file starts from the same time: what 'ember test'
    /// uses for its cases)
    #[arg(long, requires = "restore")]
    pub keep_clock: bool,
    /// Wait for the VM to come from another Ember by migration ('ember migrate'), listening
    /// on tcp:ADDR:PORT [qemu: -incoming]; --name, --serial, --net and --disk (matched by
    /// id, else by position) replace the source's, and --cpu-features hides features this
    /// side will not offer
    #[arg(long, value_name = "tcp:ADDR:PORT",
          conflicts_with_all = ["kernel", "config_file", "restore"])]
    pub incoming: Option<String>,
    /// With --incoming: take only migrations that authenticate with the shared key in FILE
    /// (HMAC-SHA256 on the handshake and every message; nothing is encrypted)
    #[arg(long, value_name = "FILE", requires = "incoming")]
    pub auth_key: Option<PathBuf>,
    /// End the run after DURATION (30s, 2m, 500ms, 1h; a bare number is seconds), counted
    /// from the start: exit status 124, the last serial lines on stderr
    #[arg(long, value_name = "DURATION", help_heading = "Checks (CI)")]
    pub timeout: Option<String>,
    /// A regular expression the serial output must show; repeatable, seen in order. The run
    /// passes when all were seen and the guest ended on its own (else status 126)
    #[arg(long, value_name = "REGEX", help_heading = "Checks (CI)")]
    pub expect: Vec<String>,
    /// End the VM (status 0) as soon as the last --expect is seen
    #[arg(long, requires = "expect", help_heading = "Checks (CI)")]
    pub stop_on_expect: bool,
    /// A regular expression that ends the run at once (status 122) when a line of serial
    /// output matches; repeatable. With --expect or --fail-on the defaults apply too:
    /// Kernel panic, BUG:, Oops, WARNING:, Call Trace:
    #[arg(long, value_name = "REGEX", help_heading = "Checks (CI)")]
    pub fail_on: Vec<String>,
    /// Leave out the default --fail-on patterns
    #[arg(long, help_heading = "Checks (CI)")]
    pub no_default_fail_on: bool,
    /// Also write the serial output to FILE (created or emptied), whatever --serial is
    #[arg(long, value_name = "FILE", help_heading = "Checks (CI)")]
    pub console_log: Option<PathBuf>,
    /// Seccomp filters per thread: on (a blocked call prints one line and exits 148),
    /// strict (killed at once), log (allowed, logged by the kernel: dmesg) or off
    #[arg(long, value_name = "MODE", default_value = "on")]
    pub seccomp: crate::seccomp::Mode,
}

/// The CI checks of one run: set on the console once the session is ready, and the judge
/// of its outcome.
#[derive(Default)]
pub struct RunChecks {
    /// `--expect`, `--fail-on`, `--timeout`.
    pub watch: Option<Arc<OutputWatch>>,
    /// `--console-log`.
    pub copy: Option<File>,
}

fn switch(option: &str, s: &str) -> Result<bool, ConfigError> {
    config::optparse::parse_switch(s)
        .ok_or_else(|| ConfigError::new(option, format!("'{s}' is not on or off")))
}

impl RunArgs {
    /// The serial mode: as given, else `log` in the background and `stdio` in front.
    fn serial_mode(&self) -> Result<SerialMode, ConfigError> {
        match &self.serial {
            Some(s) => {
                let mode: SerialMode = parse_text("--serial", s)?;
                if detach::is_detached_child() && mode == SerialMode::Stdio {
                    return Err(ConfigError::new(
                        "--serial",
                        "stdio cannot be used with -d; use log, pty or file=PATH",
                    ));
                }
                Ok(mode)
            }
            None if detach::is_detached_child() => Ok(SerialMode::Log),
            None => Ok(SerialMode::Stdio),
        }
    }

    /// The VM the options describe (`kernel` must be given).
    fn vm_config(&self, name: &str, kernel: PathBuf) -> Result<VmConfig, ConfigError> {
        let mut c = VmConfig::new(name, kernel);
        c.initrd = self.initrd.clone();
        c.cmdline = self.cmdline.clone();
        c.cpus = parse_text("--cpus", &self.cpus)?;
        c.memory = config::parse_memory(&self.memory)?;
        c.serial = self.serial_mode()?;
        if let Some(list) = &self.cpu_features {
            c.cpu_features = parse_text("--cpu-features", list)?;
        }
        c.reboot = match self.reboot.as_str() {
            "exit" => config::RebootAction::Exit,
            "restart" => config::RebootAction::Restart,
            other => {
                return Err(ConfigError::new(
                    "--reboot",
                    format!("'{other}' is not a reboot action; use exit or restart"),
                ))
            }
        };
        c.debug_exit = switch("--debug-exit", &self.debug_exit)?;
        c.disks = self
            .disk
            .iter()
            .map(|d| DiskConfig::parse(d))
            .collect::<Result<_, _>>()?;
        c.nets = self
            .net
            .iter()
            .map(|n| NetConfig::parse(n))
            .collect::<Result<_, _>>()?;
        c.root = self.root.clone();
        c.track_dirty_pages = self.track_dirty_pages;
        if let Some(t) = &self.transport {
            c.transport = match t.as_str() {
                "mmio" => config::Transport::Mmio,
                "pci" => config::Transport::Pci,
                other => {
                    return Err(ConfigError::new(
                        "--transport",
                        format!("'{other}' is not a transport; use mmio or pci"),
                    ))
                }
            };
        }
        if let Some(spec) = &self.balloon {
            c.balloon = BalloonConfig::parse(spec)?;
        }
        // Without --name, MACs derive from "ember" as they always did: stable across runs.
        c.normalize(self.name.as_deref().unwrap_or("ember"));
        c.validate()?;
        Ok(c)
    }

    /// What `--restore` asks for, with the NIC overrides.
    fn restore_spec(&self, state: &std::path::Path) -> Result<RestoreSpec, ConfigError> {
        config::check_readable_file("--restore", state)?;
        let memory = match &self.mem_file {
            Some(m) => {
                config::check_readable_file("--mem-file", m)?;
                m.clone()
            }
            None => {
                let m = crate::snapshot::memory_path_for(state);
                config::check_readable_file("--restore (memory file)", &m)?;
                m
            }
        };
        let (nets, disks) = self.device_overrides()?;
        Ok(RestoreSpec {
            state: state.to_path_buf(),
            memory,
            paused: self.paused.then_some(true),
            nets,
            disks,
            track_dirty_pages: self.track_dirty_pages,
            keep_clock: self.keep_clock,
        })
    }

    /// What `--incoming` asks for.
    fn incoming_spec(&self, url: &str) -> Result<IncomingSpec, ConfigError> {
        let (nets, disks) = self.device_overrides()?;
        let key = match &self.auth_key {
            Some(p) => Some(AuthKey::from_file(p).map_err(|e| ConfigError::new("--auth-key", e))?),
            None => None,
        };
        let cpu_features = match &self.cpu_features {
            Some(list) => parse_text::<config::CpuFeatures>("--cpu-features", list)?.0,
            None => Default::default(),
        };
        Ok(IncomingSpec {
            endpoint: Endpoint::parse(url)
                .map_err(|e| ConfigError::new("--incoming", e.to_string()))?,
            key,
            nets,
            disks,
            cpu_features,
        })
    }

    /// `--net` and `--disk` as replacements of a saved or migrated VM's, by id (else
    /// position).
    fn device_overrides(&self) -> Result<(Vec<NetConfig>, Vec<DiskConfig>), ConfigError> {
        let nets = self
            .net
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mut n = NetConfig::parse(n)?;
                n.id.get_or_insert_with(|| format!("eth{i}"));
                Ok(n)
            })
            .collect::<Result<_, ConfigError>>()?;
        let disks = self
            .disk
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut d = DiskConfig::parse(d)?;
                d.id.get_or_insert_with(|| config::disk_id(i));
                Ok(d)
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok((nets, disks))
    }

    /// The checks the options ask for; the timeout starts counting now.
    pub fn checks(&self) -> Result<RunChecks, String> {
        let timeout = self
            .timeout
            .as_deref()
            .map(ci_watch::parse_duration)
            .transpose()
            .map_err(|e| e.to_string())?;
        let spec = WatchSpec {
            expect: self.expect.clone(),
            fail_on: self.fail_on.clone(),
            default_fail_on: !self.no_default_fail_on,
            stop_on_expect: self.stop_on_expect,
            timeout,
        };
        let watch = match spec.is_active() {
            true => Some(Arc::new(
                OutputWatch::new(&spec).map_err(|e| crate::error_chain(&e))?,
            )),
            false => None,
        };
        let copy = match &self.console_log {
            Some(p) => Some(
                File::create(p)
                    .map_err(|e| format!("--console-log {}: cannot create: {e}", p.display()))?,
            ),
            None => None,
        };
        Ok(RunChecks { watch, copy })
    }

    /// The request `ember run` makes of a session.
    pub fn into_request(self) -> Result<RunRequest, ConfigError> {
        let name = match &self.name {
            Some(n) => parse_name(n)?,
            None => format!("ember-{}", std::process::id()),
        };
        if self.no_api
            && self.kernel.is_none()
            && self.config_file.is_none()
            && self.restore.is_none()
            && self.incoming.is_none()
        {
            return Err(ConfigError::new(
                "--no-api",
                "without --kernel or --config-file nothing could configure the VM",
            ));
        }
        if self.track_dirty_pages
            && self.kernel.is_none()
            && self.config_file.is_none()
            && self.restore.is_none()
        {
            return Err(ConfigError::new(
                "--track-dirty-pages",
                "goes with --kernel, --config-file or --restore; through the API say it there \
                 (PUT /machine-config track_dirty_pages, /snapshot/load enable_diff_snapshots); \
                 a migrated VM tracks as its source did",
            ));
        }
        let config = match &self.kernel {
            Some(k) => Some(self.vm_config(&name, k.clone())?),
            None => None,
        };
        let pending = match &self.config_file {
            Some(f) => {
                let mut p = read_config_file(f)?;
                p.machine.track_dirty_pages |= self.track_dirty_pages;
                Some(p)
            }
            None => None,
        };
        let restore = match &self.restore {
            Some(state) => Some(self.restore_spec(state)?),
            None => None,
        };
        let incoming = match &self.incoming {
            Some(url) => Some(self.incoming_spec(url)?),
            None => None,
        };
        Ok(RunRequest {
            restore,
            incoming,
            name,
            config,
            pending,
            serial: self.serial_mode()?,
            api_sock: self.api_sock,
            no_api: self.no_api,
            on_ready: None,
        })
    }
}

fn read_config_file(path: &PathBuf) -> Result<PendingVm, ConfigError> {
    let shown = path.display().to_string();
    let err = |m: String| ConfigError::new(format!("--config-file {shown}"), m);
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let file: ConfigFile =
        serde_json::from_str(&text).map_err(|e| err(format!("invalid JSON: {e}")))?;
    PendingVm::from_file(file).map_err(err)
}

/// How a run ended, in words, for the line that says an --expect was missing.
fn ended(outcome: &Outcome) -> String {
    match outcome {
        Outcome::PowerOff => "the guest powered off".into(),
        Outcome::Reset => "the guest reset".into(),
        Outcome::DebugExit(code) => format!("the guest exited through debug-exit, status {code}"),
        Outcome::ConsoleQuit => "the console was closed".into(),
        Outcome::Destroyed => "the VM was destroyed".into(),
        other => format!("{other:?}"),
    }
}

fn report(outcome: &Outcome, watch: Option<&OutputWatch>) {
    if let Some(lost) = watch.map(OutputWatch::lost).filter(|n| *n > 0) {
        eprintln!("ember: the output checks fell behind a flood and skipped {lost} bytes");
    }
    match outcome {
        Outcome::Timeout => {
            let after = watch.and_then(OutputWatch::timeout).unwrap_or_default();
            eprintln!("ember: timed out after {after:?}; the last serial lines:");
            for line in watch.map(OutputWatch::tail).unwrap_or_default() {
                eprintln!("{line}");
            }
        }
        Outcome::GuestPanic(bits) => {
            eprintln!("ember: the guest kernel panicked (pvpanic event {bits:#x})")
        }
        Outcome::FailOn { pattern, line } => {
            eprintln!("ember: --fail-on '{pattern}' matched the line: {line}")
        }
        Outcome::ExpectNotMet {
            pattern,
            ended: how,
        } => eprintln!(
            "ember: --expect '{pattern}' was not seen before the run ended ({})",
            ended(how)
        ),
        Outcome::ExpectsMet => log::debug!("every --expect was seen; VM stopped"),
        Outcome::Crash(msg) => eprintln!("ember: {msg}"),
        Outcome::Signal(sig) => eprintln!("ember: stopped by signal {sig}"),
        Outcome::ConsoleQuit => eprintln!("ember: console closed (Ctrl-]); VM stopped"),
        Outcome::PowerOff => log::debug!("guest powered off"),
        Outcome::Reset => log::debug!("guest reset"),
        Outcome::Destroyed => log::info!("VM destroyed"),
        Outcome::Saved(path) => log::info!("VM saved to {path}"),
        Outcome::Migrated(to) => eprintln!("ember: the VM migrated to {to}; it runs there now"),
        Outcome::Revert(name) => log::info!("VM reverted to snapshot {name}"),
        Outcome::Restart => log::debug!("VM restarted"),
        Outcome::DebugExit(code) => log::debug!("guest exited through debug-exit: {code}"),
    }
}

/// Runs `ember run`.
pub fn run(args: RunArgs) -> ExitCode {
    if args.detach && !detach::is_detached_child() {
        return detach::spawn_detached(&detach::args_without_detach());
    }
    crate::seccomp::set_mode(args.seccomp);
    let checks = match args.checks() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ember: {e}");
            return ExitCode::from(USAGE_ERROR);
        }
    };
    let mut req = match args.into_request() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ember: {e}");
            return ExitCode::from(USAGE_ERROR);
        }
    };
    run_checked(&mut req, checks)
}

/// Runs a session for `req` in this process (the foreground, or a detached child).
pub fn run_request(req: &mut RunRequest) -> ExitCode {
    run_checked(req, RunChecks::default())
}

/// Sets the checks on the console once the session is ready, before the guest runs.
fn install_checks(req: &mut RunRequest, checks: RunChecks) -> Option<Arc<OutputWatch>> {
    let watch = checks.watch.clone();
    if checks.watch.is_none() && checks.copy.is_none() {
        return watch;
    }
    let then = req.on_ready.take();
    req.on_ready = Some(Box::new(move |s: &Session| {
        let hub = s.console.hub();
        if let Some(f) = checks.copy {
            hub.set_copy(f);
        }
        if let Some(w) = checks.watch {
            hub.set_watch(w);
        }
        if let Some(then) = then {
            then(s);
        }
    }));
    watch
}

/// `run_request` with CI checks.
fn run_checked(req: &mut RunRequest, checks: RunChecks) -> ExitCode {
    crate::seccomp::set_mode_if_unset(crate::seccomp::Mode::On);
    if let Err(e) = signals::install() {
        eprintln!("ember: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    let interactive = req
        .config
        .as_ref()
        .map(|c| &c.serial)
        .unwrap_or(&req.serial)
        == &SerialMode::Stdio
        && is_terminal(libc::STDIN_FILENO);
    let raw = interactive
        .then(|| RawTerminal::new(libc::STDIN_FILENO).ok())
        .flatten();
    if detach::is_detached_child() {
        req.on_ready = Some(Box::new(|s: &Session| detach::announce_ready(s)));
    }
    let watch = install_checks(req, checks);
    let taken = RunRequest {
        name: req.name.clone(),
        config: req.config.take(),
        pending: req.pending.take(),
        api_sock: req.api_sock.take(),
        no_api: req.no_api,
        serial: req.serial.clone(),
        on_ready: req.on_ready.take(),
        restore: req.restore.take(),
        incoming: req.incoming.take(),
    };
    let result = session::run(taken);
    drop(raw);
    match result {
        Ok(outcome) => {
            let outcome = match &watch {
                Some(w) => w.judge(outcome),
                None => outcome,
            };
            report(&outcome, watch.as_deref());
            ExitCode::from(outcome.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("ember: {}", error_chain(&e));
            if e.is_user_error() {
                ExitCode::from(USAGE_ERROR)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
