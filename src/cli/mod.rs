//! The `ember` command line: argument structs and what each command does. Every failure is
//! one line on stderr; bad input exits 2.

/// `println!` for the verbs' output, which ends quietly when stdout is gone (`ember list |
/// head`): Rust ignores SIGPIPE, and `println!` would panic on the broken pipe.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` that ends quietly when stdout is gone, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

pub mod balloon;
pub mod clone;
pub mod console;
pub mod defs;
pub mod detach;
pub mod hotplug;
pub mod jail;
pub mod migrate;
pub mod run;
pub mod snapshots;
pub mod test;
pub mod vcpus;
pub mod verbs;

use std::process::ExitCode;

use crate::api::client::{self, ClientError};
use crate::vmdir::{self, Running};

/// Exit status for a mistake on the command line (unknown VM, bad option, ...).
pub const USAGE_ERROR: u8 = 2;

/// Clap's multi-line errors folded into the one line Ember prints for bad input.
pub fn usage_error(err: clap::Error) -> ExitCode {
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

/// A command's failure: the line to print and the exit status.
#[derive(Debug)]
pub struct Failure {
    /// One line.
    pub message: String,
    /// Exit status.
    pub code: u8,
}

impl Failure {
    /// A user error (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: USAGE_ERROR,
        }
    }

    /// Anything else (exit 1).
    pub fn failed(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: 1,
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Refused { status, message } if status < 500 => Failure::usage(message),
            other => Failure::failed(crate::error_chain(&other)),
        }
    }
}

/// Prints a failure and turns the result into the exit status.
pub fn finish(r: Result<(), Failure>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("ember: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// The running VM named `name`, or the line that says it is not.
pub fn running(name: &str) -> Result<Running, Failure> {
    if let Some(r) = vmdir::find(name) {
        return Ok(r);
    }
    if crate::definitions::exists(name) {
        return Err(Failure::usage(format!(
            "VM '{name}' is not running; start it with 'ember start {name}'"
        )));
    }
    Err(Failure::usage(format!(
        "no VM named '{name}'; see 'ember list --all'"
    )))
}

/// `GET path` on the VM named `name`.
pub fn get(name: &str, path: &str) -> Result<serde_json::Value, Failure> {
    let vm = running(name)?;
    Ok(client::get_json(&vm.api_sock, path)?)
}

/// A request with a JSON body on the VM named `name`.
pub fn send(name: &str, method: &str, path: &str, body: serde_json::Value) -> Result<(), Failure> {
    let vm = running(name)?;
    client::call(&vm.api_sock, method, path, Some(&body.to_string()))?;
    Ok(())
}
