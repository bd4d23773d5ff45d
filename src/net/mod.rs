//! `ember net`: host networks as `virsh net-*` makes them — a Linux bridge per network,
//! with a gateway address, NAT (masquerade and forwarding, as libvirt's default network) and
//! DHCP from dnsmasq when asked. The kernel objects are made with iproute2 and iptables;
//! the network's description lives in `$EMBER_STATE_DIR/networks/NAME.json` (default
//! /run/ember), so everything can run inside a network namespace and touch nothing else.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::{Args, Subcommand};
use serde_json::json;

/// Exit status for bad input.
const USAGE_ERROR: u8 = 2;

/// `ember net` errors.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Bad input: the option and what to do (status 2).
    #[error("{0}")]
    Usage(String),
    /// A host command failed.
    #[error("{cmd} failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed.
        stderr: String,
    },
    /// A helper program is not installed.
    #[error("{program} is not installed: {hint}")]
    Missing {
        /// The program.
        program: String,
        /// How to get it.
        hint: &'static str,
    },
    /// State file trouble.
    #[error("{context}")]
    State {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// How a network reaches the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A plain bridge (optionally with an uplink), no address, no NAT.
    Bridge,
    /// A bridge with a gateway address, masquerading to the host's routes.
    Nat,
    /// A bridge with a gateway address and no forwarding.
    Isolated,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Bridge => "bridge",
            Mode::Nat => "nat",
            Mode::Isolated => "isolated",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "bridge" => Some(Mode::Bridge),
            "nat" => Some(Mode::Nat),
            "isolated" => Some(Mode::Isolated),
            _ => None,
        }
    }
}

/// A network as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    /// Its name (also the bridge's).
    pub name: String,
    /// Its mode.
    pub mode: Mode,
    /// Subnet address and prefix (not for bridge mode).
    pub subnet: Option<(Ipv4Addr, u8)>,
    /// Whether dnsmasq serves DHCP on it.
    pub dhcp: bool,
    /// A host interface enslaved to the bridge (bridge mode).
    pub uplink: Option<String>,
}

impl Network {
    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.name
    }

    /// The gateway (host) address: the subnet's first host.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.subnet
            .map(|(net, _)| Ipv4Addr::from(u32::from(net) + 1))
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "name": self.name,
            "mode": self.mode.name(),
            "subnet": self.subnet.map(|(a, p)| format!("{a}/{p}")),
            "dhcp": self.dhcp,
            "uplink": self.uplink,
        })
    }

    fn from_json(v: &serde_json::Value) -> Option<Self> {
        Some(Network {
            name: v["name"].as_str()?.to_string(),
            mode: Mode::parse(v["mode"].as_str()?)?,
            subnet: match v["subnet"].as_str() {
                Some(s) => Some(parse_subnet(s).ok()?),
                None => None,
            },
            dhcp: v["dhcp"].as_bool()?,
            uplink: v["uplink"].as_str().map(str::to_string),
        })
    }
}

/// Parses `192.168.122.0/24` (host bits must be zero, prefix 8..=30).
pub fn parse_subnet(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("'{s}' is not a subnet like 192.168.122.0/24"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("'{addr}' is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (8..=30).contains(p))
        .ok_or_else(|| format!("prefix /{prefix} must be 8 to 30"))?;
    let host_mask = u32::MAX >> prefix;
    if u32::from(addr) & host_mask != 0 {
        return Err(format!(
            "'{s}' has host bits set; did you mean {}/{prefix}?",
            Ipv4Addr::from(u32::from(addr) & !host_mask)
        ));
    }
    Ok((addr, prefix))
}

/// Where network descriptions live.
pub fn state_dir() -> PathBuf {
    std::env::var_os("EMBER_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/ember"))
        .join("networks")
}

fn state_file(name: &str) -> PathBuf {
    state_dir().join(format!("{name}.json"))
}

/// Reads network `name`'s description.
pub fn load(name: &str) -> Result<Network, NetError> {
    let path = state_file(name);
    let text = std::fs::read_to_string(&path).map_err(|_| {
        NetError::Usage(format!(
            "network '{name}' does not exist (ember net list shows the networks)"
        ))
    })?;
    serde_json::from_str(&text)
        .ok()
        .as_ref()
        .and_then(Network::from_json)
        .ok_or_else(|| NetError::Usage(format!("{}: not a network description", path.display())))
}

fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            NetError::Missing {
                program: program.into(),
                hint: match program {
                    "iptables" => "apt-get install iptables",
                    "dnsmasq" => "apt-get install dnsmasq-base",
                    _ => "apt-get install iproute2",
                },
            }
        } else {
            NetError::Command {
                cmd: format!("{program} {}", args.join(" ")),
                stderr: e.to_string(),
            }
        }
    })?;
    if !out.status.success() {
        return Err(NetError::Command {
            cmd: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The iptables rules of a NAT or isolated network, tagged so destroy finds them.
fn iptables_rules(n: &Network) -> Vec<Vec<String>> {
    let Some((net, prefix)) = n.subnet else {
        return Vec::new();
    };
    let subnet = format!("{net}/{prefix}");
    let tag = format!("ember:{}", n.name);
    let br = n.bridge().to_string();
    let rule = |parts: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
        v.extend(["-m", "comment", "--comment", &tag].map(String::from));
        v
    };
    match n.mode {
        Mode::Nat => vec![
            rule(&[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &subnet,
                "!",
                "-d",
                &subnet,
                "-j",
                "MASQUERADE",
            ]),
            rule(&["-A", "FORWARD", "-i", &br, "-s", &subnet, "-j", "ACCEPT"]),
            rule(&[
                "-A",
                "FORWARD",
                "-o",
                &br,
                "-d",
                &subnet,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ]),
        ],
        Mode::Isolated => vec![
            rule(&["-A", "FORWARD", "-i", &br, "!", "-o", &br, "-j", "REJECT"]),
            rule(&["-A", "FORWARD", "-o", &br, "!", "-i", &br, "-j", "REJECT"]),
        ],
        Mode::Bridge => Vec::new(),
    }
}

fn dnsmasq_pid_file(name: &str) -> PathBuf {
    state_dir().join(format!("{name}.dnsmasq.pid"))
}

fn start_dnsmasq(n: &Network) -> Result<(), NetError> {
    let (Some((net, prefix)), Some(gw)) = (n.subnet, n.gateway()) else {
        return Ok(());
    };
    let first = Ipv4Addr::from(u32::from(net) + 2);
    let last = Ipv4Addr::from(u32::from(net) + (u32::MAX >> prefix) - 1);
    let leases = state_dir().join(format!("{}.leases", n.name));
    let pid = dnsmasq_pid_file(&n.name);
    run(
        "dnsmasq",
        &[
            "--conf-file=/dev/null",
            "--strict-order",
            "--bind-interfaces",
            "--except-interface=lo",
            &format!("--interface={}", n.bridge()),
            &format!("--listen-address={gw}"),
            &format!("--dhcp-range={first},{last},{}", prefix_mask(prefix)),
            "--dhcp-authoritative",
            "--dhcp-no-override",
            "--port=0",
            &format!("--dhcp-leasefile={}", leases.display()),
            &format!("--pid-file={}", pid.display()),
        ],
    )?;
    Ok(())
}

fn prefix_mask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(!(u32::MAX >> prefix))
}

fn stop_dnsmasq(name: &str) {
    let pid_file = dnsmasq_pid_file(name);
    if let Ok(pid) = std::fs::read_to_string(&pid_file) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: kill(2) with a pid dnsmasq wrote for itself.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let _ = std::fs::remove_file(pid_file);
}

/// Creates network `n`: bridge, addresses, NAT rules, DHCP; then records it.
pub fn create(n: &Network) -> Result<(), NetError> {
    if state_file(&n.name).exists() {
        return Err(NetError::Usage(format!(
            "network '{}' already exists",
            n.name
        )));
    }
    std::fs::create_dir_all(state_dir()).map_err(|source| NetError::State {
        context: format!("cannot create {}", state_dir().display()),
        source,
    })?;
    let br = n.bridge();
    run("ip", &["link", "add", br, "type", "bridge"])?;
    let result = (|| {
        if let (Some((_, prefix)), Some(gw)) = (n.subnet, n.gateway()) {
            run("ip", &["addr", "add", &format!("{gw}/{prefix}"), "dev", br])?;
        }
        if let Some(up) = &n.uplink {
            run("ip", &["link", "set", up, "master", br])?;
        }
        run("ip", &["link", "set", br, "up"])?;
        if n.mode == Mode::Nat {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| {
                NetError::State {
                    context: "cannot enable IPv4 forwarding".into(),
                    source,
                }
            })?;
        }
        for r in iptables_rules(n) {
            let args: Vec<&str> = r.iter().map(String::as_str).collect();
            run("iptables", &args)?;
        }
        if n.dhcp {
            start_dnsmasq(n)?;
        }
        std::fs::write(state_file(&n.name), n.to_json().to_string()).map_err(|source| {
            NetError::State {
                context: format!("cannot write {}", state_file(&n.name).display()),
                source,
            }
        })
    })();
    if result.is_err() {
        teardown(n);
    }
    result
}

/// Removes what `create` made (best effort: each step is tried).
fn teardown(n: &Network) {
    stop_dnsmasq(&n.name);
    for r in iptables_rules(n) {
        let args: Vec<String> = r
            .into_iter()
            .map(|a| if a == "-A" { "-D".to_string() } else { a })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = run("iptables", &args);
    }
    let _ = run("ip", &["link", "del", n.bridge()]);
}

/// Destroys network `name`.
pub fn destroy(name: &str) -> Result<(), NetError> {
    let n = load(name)?;
    teardown(&n);
    std::fs::remove_file(state_file(name)).map_err(|source| NetError::State {
        context: format!("cannot remove {}", state_file(name).display()),
        source,
    })?;
    let _ = std::fs::remove_file(state_dir().join(format!("{name}.leases")));
    Ok(())
}

/// Every recorded network.
pub fn list() -> Vec<Network> {
    let mut out: Vec<Network> = std::fs::read_dir(state_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            e.path()
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
        })
        .filter_map(|name| load(&name).ok())
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// `ember net VERB ...`
#[derive(Args)]
pub struct NetArgs {
    #[command(subcommand)]
    command: NetCommand,
}

#[derive(Subcommand)]
enum NetCommand {
    /// Create a network: a bridge, with NAT and DHCP as asked (virsh net-create)
    Create(CreateArgs),
    /// List the networks (virsh net-list)
    List,
    /// Remove a network and everything it set up (virsh net-destroy)
    Destroy {
        /// The network
        name: String,
    },
}

#[derive(Args)]
struct CreateArgs {
    /// Name of the network and of its bridge (1 to 15 characters)
    name: String,
    /// bridge (no address), nat (gateway + masquerade) or isolated (gateway only)
    #[arg(long, value_name = "MODE", default_value = "nat")]
    mode: String,
    /// Subnet for nat and isolated networks; the host takes the first address
    #[arg(long, value_name = "CIDR", default_value = "192.168.122.0/24")]
    subnet: String,
    /// Serve DHCP on it (dnsmasq)
    #[arg(long)]
    dhcp: bool,
    /// Host interface to add to a bridge-mode network
    #[arg(long, value_name = "IFACE")]
    uplink: Option<String>,
}

fn create_from_args(a: CreateArgs) -> Result<(), NetError> {
    let usage = |m: String| NetError::Usage(m);
    if a.name.is_empty()
        || a.name.len() > 15
        || !a
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
    {
        return Err(usage(format!(
            "network name '{}': use 1 to 15 letters, digits, '-' or '_'",
            a.name
        )));
    }
    let mode = Mode::parse(&a.mode)
        .ok_or_else(|| usage(format!("--mode {}: use bridge, nat or isolated", a.mode)))?;
    let subnet = match mode {
        Mode::Bridge => None,
        _ => Some(parse_subnet(&a.subnet).map_err(|e| usage(format!("--subnet: {e}")))?),
    };
    if a.dhcp && mode == Mode::Bridge {
        return Err(usage(
            "--dhcp: a bridge-mode network has no address to serve from; use nat or isolated"
                .into(),
        ));
    }
    if a.uplink.is_some() && mode != Mode::Bridge {
        return Err(usage(
            "--uplink: only bridge-mode networks take an uplink".into(),
        ));
    }
    create(&Network {
        name: a.name,
        mode,
        subnet,
        dhcp: a.dhcp,
        uplink: a.uplink,
    })
}

/// Runs `ember net`.
pub fn run_command(args: NetArgs) -> ExitCode {
    let result = match args.command {
        NetCommand::Create(a) => create_from_args(a),
        NetCommand::Destroy { name } => destroy(&name),
        NetCommand::List => {
            println!(
                "{:<16} {:<9} {:<19} {:<5} State",
                "Name", "Mode", "Subnet", "DHCP"
            );
            for n in list() {
                let active = Path::new("/sys/class/net").join(n.bridge()).exists();
                println!(
                    "{:<16} {:<9} {:<19} {:<5} {}",
                    n.name,
                    n.mode.name(),
                    n.subnet
                        .map_or("-".to_string(), |(a, p)| format!("{a}/{p}")),
                    if n.dhcp { "yes" } else { "no" },
                    if active { "active" } else { "inactive" }
                );
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ember: {}", crate::error_chain(&e));
            if matches!(e, NetError::Usage(_)) {
                ExitCode::from(USAGE_ERROR)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_checked() {
        assert_eq!(
            parse_subnet("192.168.122.0/24"),
            Ok((Ipv4Addr::new(192, 168, 122, 0), 24))
        );
        assert!(parse_subnet("192.168.122.1/24")
            .unwrap_err()
            .contains("host bits"));
        assert!(parse_subnet("10.0.0.0/31").is_err());
        assert!(parse_subnet("10.0.0.0").is_err());
        assert!(parse_subnet("x/24").is_err());
    }

    #[test]
    fn descriptions_round_trip_and_gateway_is_first_host() {
        let n = Network {
            name: "lab".into(),
            mode: Mode::Nat,
            subnet: Some((Ipv4Addr::new(10, 9, 0, 0), 16)),
            dhcp: true,
            uplink: None,
        };
        assert_eq!(Network::from_json(&n.to_json()), Some(n.clone()));
        assert_eq!(n.gateway(), Some(Ipv4Addr::new(10, 9, 0, 1)));
        assert_eq!(prefix_mask(16), Ipv4Addr::new(255, 255, 0, 0));
    }

    #[test]
    fn nat_rules_masquerade_the_subnet_and_are_tagged() {
        let n = Network {
            name: "lab".into(),
            mode: Mode::Nat,
            subnet: Some((Ipv4Addr::new(192, 168, 5, 0), 24)),
            dhcp: false,
            uplink: None,
        };
        let rules = iptables_rules(&n);
        assert!(rules[0]
            .join(" ")
            .contains("-t nat -A POSTROUTING -s 192.168.5.0/24 ! -d 192.168.5.0/24 -j MASQUERADE"));
        assert!(rules
            .iter()
            .all(|r| r.join(" ").ends_with("--comment ember:lab")));
        let isolated = Network {
            mode: Mode::Isolated,
            ..n
        };
        assert!(iptables_rules(&isolated)
            .iter()
            .all(|r| r.contains(&"REJECT".to_string())));
    }
}
