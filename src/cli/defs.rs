//! Definitions: define, undefine, dumpconfig, edit, autostart, start.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{detach, finish, Failure};
use crate::config::{SerialMode, VmConfig};
use crate::definitions::{self, DefinitionError};
use crate::session::RunRequest;
use crate::vmdir;

/// `ember define`.
#[derive(Args, Debug)]
pub struct DefineArgs {
    /// A TOML definition (see 'ember dumpconfig' for the format)
    pub file: PathBuf,
}

/// `ember autostart`.
#[derive(Args, Debug)]
pub struct AutostartArgs {
    /// The VM's name
    pub name: String,
    /// Stop starting it at boot
    #[arg(long)]
    pub disable: bool,
}

/// `ember start`.
#[derive(Args, Debug)]
pub struct StartArgs {
    /// The VM's name
    #[arg(required_unless_present = "autostart")]
    pub name: Option<String>,
    /// Start every VM marked with 'ember autostart' that is not running
    #[arg(long, conflicts_with = "name")]
    pub autostart: bool,
}

fn def_failure(e: DefinitionError) -> Failure {
    match e {
        DefinitionError::Io { .. } => Failure::failed(crate::error_chain(&e)),
        other => Failure::usage(crate::error_chain(&other)),
    }
}

fn require_defined(name: &str) -> Result<(), Failure> {
    if definitions::exists(name) {
        return Ok(());
    }
    Err(Failure::usage(format!(
        "no VM named '{name}' is defined; see 'ember list --all'"
    )))
}

/// `ember define FILE`.
pub fn define(a: DefineArgs) -> ExitCode {
    finish((|| {
        let text = std::fs::read_to_string(&a.file)
            .map_err(|e| Failure::usage(format!("{}: cannot read: {e}", a.file.display())))?;
        let mut cfg = definitions::parse(&text, &a.file).map_err(def_failure)?;
        cfg.normalize(&cfg.name.clone());
        let path = definitions::save(&cfg).map_err(def_failure)?;
        outln!(
            "VM {} defined from {} ({})",
            cfg.name,
            a.file.display(),
            path.display()
        );
        Ok(())
    })())
}

/// `ember undefine NAME`.
pub fn undefine(a: super::verbs::NameArg) -> ExitCode {
    finish((|| {
        require_defined(&a.name)?;
        definitions::remove(&a.name).map_err(def_failure)?;
        outln!("VM {} has been undefined", a.name);
        Ok(())
    })())
}

/// `ember dumpconfig NAME`: the definition, or a running VM's configuration.
pub fn dumpconfig(a: super::verbs::NameArg) -> ExitCode {
    finish((|| {
        if definitions::exists(&a.name) {
            let cfg = definitions::load(&a.name).map_err(def_failure)?;
            out!("{}", definitions::to_text(&cfg));
            return Ok(());
        }
        let info = super::get(&a.name, "/ember/info")?;
        let cfg: VmConfig = serde_json::from_value(info["config"].clone()).map_err(|e| {
            Failure::failed(format!("the VM sent a configuration I cannot read: {e}"))
        })?;
        out!("{}", definitions::to_text(&cfg));
        Ok(())
    })())
}

/// `ember edit NAME`: $EDITOR on a copy; saved only when it is a valid definition of the
/// same name.
pub fn edit(a: super::verbs::NameArg) -> ExitCode {
    finish((|| {
        require_defined(&a.name)?;
        let path = definitions::path_of(&a.name);
        let original = std::fs::read_to_string(&path)
            .map_err(|e| Failure::failed(format!("{}: {e}", path.display())))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("ember-{}-", a.name))
            .suffix(".toml")
            .tempfile()
            .map_err(|e| Failure::failed(format!("cannot make a temporary file: {e}")))?;
        std::fs::write(tmp.path(), &original)
            .map_err(|e| Failure::failed(format!("{}: {e}", tmp.path().display())))?;
        let editor = std::env::var("VISUAL")
            .or_else(|_| std::env::var("EDITOR"))
            .unwrap_or_else(|_| "vi".into());
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{editor} \"$1\""))
            .arg("sh")
            .arg(tmp.path())
            .status()
            .map_err(|e| Failure::failed(format!("cannot run the editor '{editor}': {e}")))?;
        if !status.success() {
            return Err(Failure::failed(format!(
                "the editor '{editor}' failed ({status}); the definition is unchanged"
            )));
        }
        let edited = std::fs::read_to_string(tmp.path())
            .map_err(|e| Failure::failed(format!("{}: {e}", tmp.path().display())))?;
        if edited == original {
            outln!("VM {} definition not changed", a.name);
            return Ok(());
        }
        let mut cfg = definitions::parse(&edited, &path).map_err(|e| {
            Failure::usage(format!(
                "{}; the definition is unchanged",
                crate::error_chain(&e)
            ))
        })?;
        if cfg.name != a.name {
            return Err(Failure::usage(format!(
                "the edited definition is named '{}', not '{}'; the definition is unchanged",
                cfg.name, a.name
            )));
        }
        cfg.normalize(&a.name);
        definitions::save(&cfg).map_err(def_failure)?;
        outln!("VM {} definition edited", a.name);
        Ok(())
    })())
}

/// `ember autostart NAME [--disable]`.
pub fn autostart(a: AutostartArgs) -> ExitCode {
    finish((|| {
        require_defined(&a.name)?;
        definitions::set_autostart(&a.name, !a.disable).map_err(def_failure)?;
        if a.disable {
            outln!("VM {} unmarked as autostarted", a.name);
        } else {
            outln!("VM {} marked as autostarted", a.name);
        }
        Ok(())
    })())
}

/// `ember start NAME` / `ember start --autostart`.
pub fn start(a: StartArgs) -> ExitCode {
    if a.autostart {
        return start_all();
    }
    let name = a.name.unwrap_or_default();
    if detach::is_detached_child() {
        return start_here(&name);
    }
    let checked = (|| {
        require_defined(&name)?;
        definitions::load(&name).map_err(def_failure)?;
        if vmdir::find(&name).is_some() {
            return Err(Failure::usage(format!("VM '{name}' is already running")));
        }
        Ok(())
    })();
    if let Err(f) = checked {
        return finish(Err(f));
    }
    detach::spawn_detached(&[OsString::from("start"), OsString::from(name)])
}

/// In the detached child: runs the defined VM.
fn start_here(name: &str) -> ExitCode {
    let mut cfg = match definitions::load(name) {
        Ok(c) => c,
        Err(e) => return finish(Err(def_failure(e))),
    };
    if cfg.serial == SerialMode::Stdio {
        cfg.serial = SerialMode::Log;
    }
    if let Err(e) = cfg.validate() {
        return finish(Err(Failure::usage(e.to_string())));
    }
    let mut req = RunRequest {
        name: name.to_string(),
        serial: cfg.serial.clone(),
        config: Some(cfg),
        pending: None,
        api_sock: None,
        no_api: false,
        on_ready: None,
        restore: None,
        incoming: None,
    };
    super::run::run_request(&mut req)
}

fn start_all() -> ExitCode {
    let mut failed = 0;
    for name in definitions::names() {
        if !definitions::autostart(&name) || vmdir::find(&name).is_some() {
            continue;
        }
        let code = detach::spawn_detached(&[OsString::from("start"), OsString::from(&name)]);
        if code != ExitCode::SUCCESS {
            eprintln!("ember: VM {name} did not start");
            failed += 1;
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
