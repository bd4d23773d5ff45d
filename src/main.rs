//! `ember`: command line -> config -> `Vmm::new(cfg)?.run()` -> exit status.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ember::config::{self, ConfigError, RebootAction, SerialMode, VmConfig};
use ember::console::{is_terminal, Console, RawTerminal};
use ember::run_state::Outcome;
use ember::vmm::Vmm;
use ember::{error_chain, signals};

/// Exit status for a mistake on the command line.
const USAGE_ERROR: u8 = 2;

#[derive(Parser)]
#[command(name = "ember", version, about = "A small hypervisor on Linux KVM", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest kernel (like qemu-system-x86_64 -M microvm -kernel ...)
    Run(RunArgs),
    /// Create, inspect, convert and check disk images (like qemu-img)
    Img(ember::img::ImgArgs),
    /// Create, list and destroy host networks: bridges, NAT, DHCP (like virsh net-*)
    Net(ember::net::NetArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Guest kernel: ELF vmlinux (PVH or 64-bit entry) or bzImage [qemu: -kernel]
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,
    /// Initial ramdisk / initramfs [qemu: -initrd]
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line [qemu: -append]
    #[arg(long, value_name = "STRING", default_value = config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs, 1 to 32 [qemu: -smp]
    #[arg(long, value_name = "N", default_value = "1")]
    cpus: String,
    /// Guest RAM; K/M/G suffixes, a bare number is MiB [qemu: -m]
    #[arg(long, short = 'm', value_name = "SIZE", default_value = "256M")]
    memory: String,
    /// Serial console: stdio (Ctrl-] quits), pty, file=PATH or none [qemu: -serial]
    #[arg(long, value_name = "MODE", default_value = "stdio")]
    serial: String,
    /// CPU features to hide (-name) or require (+name), /proc/cpuinfo names, e.g. -cx16,+popcnt
    /// [qemu: -cpu host,-cx16]
    #[arg(long, value_name = "LIST", allow_hyphen_values = true)]
    cpu_features: Option<String>,
    /// What a guest reboot does: exit (status 0) or restart [qemu: -no-reboot is exit]
    #[arg(long, value_name = "ACTION", default_value = "exit")]
    reboot: String,
    /// Block device: path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID][,cache=writeback|none];
    /// repeatable: vda, vdb, ... [qemu: -drive if=virtio]
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// NIC: tap=NAME|fd=N|network=NAME[,mac=52:54:00:xx:xx:xx][,mtu=N]; repeatable: eth0, eth1,
    /// ... [qemu: -netdev tap,ifname=NAME -device virtio-net]
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// VM name (default MACs derive from it) [qemu: -name]
    #[arg(long, value_name = "NAME", default_value = "ember")]
    name: String,
    /// Root device, added to the command line as root=DEVICE rw (e.g. /dev/vda)
    #[arg(long, value_name = "DEVICE")]
    root: Option<String>,
    /// isa-debug-exit on port 0xf4: a guest write of V exits with status (V << 1) | 1
    #[arg(long, value_name = "on|off", default_value = "on", num_args = 0..=1,
          default_missing_value = "on")]
    debug_exit: String,
}

impl RunArgs {
    fn into_config(self) -> Result<VmConfig, ConfigError> {
        let debug_exit = match self.debug_exit.as_str() {
            "on" | "yes" | "true" => true,
            "off" | "no" | "false" => false,
            other => {
                return Err(ConfigError::new(
                    "--debug-exit",
                    format!("'{other}' is not on or off"),
                ))
            }
        };
        Ok(VmConfig {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            cpus: config::parse_cpus(&self.cpus)?,
            memory: config::parse_memory(&self.memory)?,
            serial: config::parse_serial(&self.serial)?,
            cpu_features: match &self.cpu_features {
                Some(list) => config::parse_cpu_features(list)?,
                None => Default::default(),
            },
            reboot: config::parse_reboot(&self.reboot)?,
            debug_exit,
            disks: self
                .disk
                .iter()
                .map(|d| config::parse_disk(d))
                .collect::<Result<_, _>>()?,
            root: self.root,
            nets: self
                .net
                .iter()
                .map(|n| config::parse_net(n))
                .collect::<Result<_, _>>()?,
            name: config::parse_name(&self.name)?,
        })
    }
}

fn init_logging() {
    let crlf = is_terminal(libc::STDERR_FILENO);
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .filter_module("ember", log::LevelFilter::Info)
        .filter_module("devices", log::LevelFilter::Info)
        .filter_module("boot", log::LevelFilter::Info)
        .parse_env("RUST_LOG")
        .format(move |buf, record| {
            let end = if crlf { "\r\n" } else { "\n" };
            match record.level() {
                log::Level::Info => write!(buf, "ember: {}{end}", record.args()),
                level => write!(
                    buf,
                    "ember: {}: {}{end}",
                    level.as_str().to_lowercase(),
                    record.args()
                ),
            }
        })
        .init();
}

/// Clap's multi-line errors folded into the one line Ember prints for bad input.
fn usage_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) || err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    {
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    let text = err.render().to_string();
    let line: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    let line = line.join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    eprintln!("ember: {line} (see 'ember --help')");
    ExitCode::from(USAGE_ERROR)
}

fn report(outcome: &Outcome) {
    match outcome {
        Outcome::Crash(msg) => eprintln!("ember: {msg}"),
        Outcome::Signal(sig) => eprintln!("ember: stopped by signal {sig}"),
        Outcome::ConsoleQuit => eprintln!("ember: console closed (Ctrl-]); VM stopped"),
        Outcome::PowerOff => log::debug!("guest powered off"),
        Outcome::Reset => log::debug!("guest reset"),
        Outcome::DebugExit(code) => log::debug!("guest exited through debug-exit: {code}"),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let cfg = match args.into_config().and_then(|c| c.validate().map(|_| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ember: {e}");
            return ExitCode::from(USAGE_ERROR);
        }
    };
    if let Err(e) = signals::install() {
        eprintln!("ember: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    let console = match Console::open(&cfg.serial) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ember: {}", error_chain(&e));
            return ExitCode::from(USAGE_ERROR);
        }
    };
    let raw = (cfg.serial == SerialMode::Stdio && is_terminal(libc::STDIN_FILENO))
        .then(|| RawTerminal::new(libc::STDIN_FILENO).ok())
        .flatten();
    let result = loop {
        match Vmm::new(&cfg, &console).and_then(Vmm::run) {
            Ok(Outcome::Reset) if cfg.reboot == RebootAction::Restart => {
                log::info!("guest reset; restarting");
            }
            other => break other,
        }
    };
    drop(raw);
    match result {
        Ok(outcome) => {
            report(&outcome);
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

fn main() -> ExitCode {
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    match cli.command {
        Command::Run(args) => run(args),
        Command::Img(args) => ember::img::run(args),
        Command::Net(args) => ember::net::run_command(args),
    }
}
