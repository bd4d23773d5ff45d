//! `ember jail --id NAME --uid U --gid G [...] -- RUN-ARGS`: `ember run RUN-ARGS` in a jail
//! (see [`crate::jail`]).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser};

use super::run::RunArgs;
use super::{detach, Failure, USAGE_ERROR};
use crate::jail::{self, JailSpec};

/// Default RLIMIT_NOFILE in a jail (Firecracker's jailer uses the same).
pub const DEFAULT_NOFILE: u64 = 2048;

/// `ember jail`.
#[derive(Args, Debug)]
pub struct JailArgs {
    /// The VM's name: its state directory, 'ember list', 'ember console ID' [firecracker
    /// jailer: --id]
    #[arg(long, value_name = "NAME")]
    pub id: String,
    /// The user the VM runs as (a number, not 0)
    #[arg(long, value_name = "UID")]
    pub uid: u32,
    /// The group the VM runs as (a number, not 0)
    #[arg(long, value_name = "GID")]
    pub gid: u32,
    /// Jails are made in DIR/ember/ID/root (the host sees an empty directory there)
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base: PathBuf,
    /// A network namespace to run the VM in (e.g. /var/run/netns/NAME); its taps must exist
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// cgroup limits, as cgroup v2 files: FILE=VALUE[,FILE=VALUE...], e.g.
    /// "cpu.max=50000 100000,memory.max=512M,pids.max=64"; repeatable
    #[arg(long, value_name = "LIST")]
    pub cgroup: Vec<String>,
    /// Resource limits: nofile=N (open files, default 2048), fsize=BYTES (largest file the
    /// VM may write, K/M/G suffixes; default none)
    #[arg(long, value_name = "LIST")]
    pub rlimit: Option<String>,
    /// Run in the background; prints the VM's name once it runs
    #[arg(long)]
    pub daemonize: bool,
    /// The options of 'ember run' (after --)
    #[arg(last = true, required = true, value_name = "RUN-ARGS")]
    pub run_args: Vec<OsString>,
}

#[derive(Parser)]
#[command(name = "ember run")]
struct RunLine {
    #[command(flatten)]
    run: RunArgs,
}

fn parse_size(option: &str, s: &str) -> Result<u64, Failure> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| Failure::usage(format!("--rlimit {option}={s}: not a number")))
}

/// `(nofile, fsize)` from `--rlimit`.
fn parse_rlimits(text: Option<&str>) -> Result<(u64, Option<u64>), Failure> {
    let (mut nofile, mut fsize) = (DEFAULT_NOFILE, None);
    for item in text.unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        match item.split_once('=') {
            Some(("nofile", v)) => nofile = parse_size("nofile", v)?,
            Some(("fsize", v)) => fsize = Some(parse_size("fsize", v)?),
            _ => {
                return Err(Failure::usage(format!(
                    "--rlimit: '{item}' is not nofile=N or fsize=BYTES"
                )))
            }
        }
    }
    Ok((nofile, fsize))
}

/// The jail and the run `args` describe.
fn spec_and_run(args: &JailArgs) -> Result<(JailSpec, RunArgs), Failure> {
    let id = crate::config::parse_name(&args.id).map_err(|e| Failure::usage(e.to_string()))?;
    if args.uid == 0 || args.gid == 0 {
        return Err(Failure::usage(
            "--uid and --gid: a jailed VM runs as an unprivileged user and group, not 0",
        ));
    }
    let line = std::iter::once(OsString::from("ember run")).chain(args.run_args.iter().cloned());
    let mut run = RunLine::try_parse_from(line)
        .map_err(|e| Failure::usage(format!("after --: {}", e.kind())))?
        .run;
    match &run.name {
        Some(n) if *n != id => {
            return Err(Failure::usage(format!(
                "--name {n} after -- differs from --id {id}; give --id only"
            )))
        }
        _ => run.name = Some(id.clone()),
    }
    let mut cgroups = Vec::new();
    for c in &args.cgroup {
        cgroups.extend(jail::cgroup::parse_settings(c).map_err(|e| Failure::usage(e.to_string()))?);
    }
    let (nofile, fsize) = parse_rlimits(args.rlimit.as_deref())?;
    let spec = JailSpec {
        id,
        uid: args.uid,
        gid: args.gid,
        chroot_base: std::path::absolute(&args.chroot_base)
            .map_err(|e| Failure::usage(format!("--chroot-base: {e}")))?,
        netns: args.netns.clone(),
        cgroups,
        nofile,
        fsize,
    };
    Ok((spec, run))
}

/// This process's arguments without `--daemonize` (before `--`).
fn args_without_daemonize() -> Vec<OsString> {
    let mut before = true;
    std::env::args_os()
        .skip(1)
        .filter(|a| {
            if a == "--" {
                before = false;
            }
            !(before && a == "--daemonize")
        })
        .collect()
}

/// Runs `ember jail`.
pub fn run(args: JailArgs) -> ExitCode {
    let (spec, run) = match spec_and_run(&args) {
        Ok(x) => x,
        Err(f) => {
            eprintln!("ember jail: {}", f.message);
            return ExitCode::from(f.code);
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("ember jail: must run as root (it makes namespaces, mounts and cgroups)");
        return ExitCode::from(USAGE_ERROR);
    }
    if args.daemonize && !detach::is_detached_child() {
        return detach::spawn_detached(&args_without_daemonize());
    }
    match jail::run(&spec, run) {
        Ok(code) => code,
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "ember jail: {}", crate::error_chain(&e));
            let user = matches!(
                e,
                jail::JailError::Files(_) | jail::JailError::InUse(_) | jail::JailError::Cgroup(_)
            );
            ExitCode::from(if user { USAGE_ERROR } else { 1 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail_args(list: &[&str]) -> Result<JailArgs, clap::Error> {
        #[derive(Parser)]
        struct Line {
            #[command(flatten)]
            jail: JailArgs,
        }
        Line::try_parse_from(std::iter::once("jail").chain(list.iter().copied())).map(|l| l.jail)
    }

    #[test]
    fn the_run_options_follow_the_double_dash_and_take_the_id_as_name() {
        let a = jail_args(&[
            "--id",
            "web",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--cgroup",
            "pids.max=64",
            "--rlimit",
            "nofile=100,fsize=1G",
            "--",
            "--kernel",
            "k",
            "-m",
            "64M",
        ])
        .unwrap();
        let (spec, run) = spec_and_run(&a).unwrap();
        assert_eq!(run.name.as_deref(), Some("web"));
        assert_eq!(run.memory, "64M");
        assert_eq!((spec.nofile, spec.fsize), (100, Some(1 << 30)));
        assert_eq!(spec.cgroups[0].file, "pids.max");
        assert_eq!(spec.chroot_base, PathBuf::from("/srv/jailer"));
    }

    #[test]
    fn root_ids_other_names_and_bad_limits_are_usage_errors() {
        for bad in [
            &[
                "--id", "a", "--uid", "0", "--gid", "1", "--", "--kernel", "k",
            ][..],
            &[
                "--id", "a", "--uid", "1", "--gid", "1", "--", "--kernel", "k", "--name", "b",
            ],
            &[
                "--id", "a", "--uid", "1", "--gid", "1", "--rlimit", "core=1", "--", "--kernel",
                "k",
            ],
            &[
                "--id", "a/b", "--uid", "1", "--gid", "1", "--", "--kernel", "k",
            ],
        ] {
            let a = jail_args(bad).unwrap();
            assert_eq!(spec_and_run(&a).unwrap_err().code, USAGE_ERROR, "{bad:?}");
        }
        assert!(jail_args(&["--id", "a", "--uid", "1", "--gid", "1"]).is_err());
    }
}
