//! Background VMs (`ember run -d`, `ember start`): the command runs again as a child in its
//! own session, with no terminal; the parent relays what the child says on stderr until the
//! child says it is ready (the VM runs) or fails, then prints the VM's name and exits with
//! the child's verdict. After that the child logs to `ember.log` in the VM's state directory.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};

use crate::session::Session;

/// Set in the environment of the detached child.
const ENV: &str = "EMBER_DETACHED";
/// The line the child ends its stderr conversation with.
const READY: &str = "ember-ready ";

/// Whether this process is a detached child.
pub fn is_detached_child() -> bool {
    std::env::var_os(ENV).is_some()
}

/// This process's arguments without `-d` / `--detach`.
pub fn args_without_detach() -> Vec<OsString> {
    std::env::args_os()
        .skip(1)
        .filter(|a| a != "-d" && a != "--detach")
        .collect()
}

/// Starts `ember ARGS` as a detached child and waits until it runs or fails.
pub fn spawn_detached(args: &[OsString]) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ember: cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env(ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no memory; the child gets its own
    // session so the caller's terminal and its signals do not reach the VM.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ember: cannot start the VM process: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut name = None;
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            match line.strip_prefix(READY) {
                Some(n) => {
                    name = Some(n.to_string());
                    break;
                }
                None => eprintln!("{line}"),
            }
        }
    }
    match (name, child.try_wait()) {
        (Some(n), _) => {
            outln!("{n}");
            ExitCode::SUCCESS
        }
        (None, Ok(Some(status))) => ExitCode::from(status.code().unwrap_or(1) as u8),
        (None, _) => match child.wait() {
            Ok(s) => ExitCode::from(s.code().unwrap_or(1) as u8),
            Err(_) => ExitCode::FAILURE,
        },
    }
}

/// Tells the parent the VM runs, then sends this process's stderr to `ember.log`.
pub fn announce_ready(session: &Session) {
    let mut err = std::io::stderr();
    let _ = writeln!(err, "{READY}{}", session.name);
    let _ = err.flush();
    let log = session.dir.path().join("ember.log");
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
    {
        // SAFETY: dup2 of our own open descriptor onto fd 2; the File stays valid during the
        // call and fd 2 then refers to the log.
        Ok(f) => unsafe {
            libc::dup2(f.as_raw_fd(), libc::STDERR_FILENO);
        },
        Err(e) => log::warn!("cannot open {}: {e}", log.display()),
    }
}
