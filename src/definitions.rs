//! VM definitions: one TOML file per VM in `$EMBER_CONFIG_DIR` (default `/etc/ember/vms`, or
//! `~/.config/ember/vms` for users other than root), named `NAME.toml`, holding the same
//! [`VmConfig`] the command line and the API use; `autostart/NAME` marks the VMs
//! `ember start --autostart` starts.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::{ConfigError, VmConfig};

/// Errors reading or writing definitions.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// A file cannot be read or written.
    #[error("{path}")]
    Io {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A definition does not parse.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong (with line and column).
        message: String,
    },
    /// A definition parses but is not a valid VM.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        #[source]
        source: ConfigError,
    },
}

/// The definitions directory.
pub fn config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EMBER_CONFIG_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/etc/ember/vms");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".config/ember/vms")
}

/// The file of VM `name`.
pub fn path_of(name: &str) -> PathBuf {
    config_dir().join(format!("{name}.toml"))
}

fn autostart_mark(name: &str) -> PathBuf {
    config_dir().join("autostart").join(name)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DefinitionError + '_ {
    move |source| DefinitionError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Whether VM `name` is defined.
pub fn exists(name: &str) -> bool {
    crate::config::parse_name(name).is_ok() && path_of(name).is_file()
}

/// Parses and checks a definition's text (`path` names it in errors).
pub fn parse(text: &str, path: &Path) -> Result<VmConfig, DefinitionError> {
    let shown = path.display().to_string();
    let cfg: VmConfig = toml::from_str(text).map_err(|e| DefinitionError::Parse {
        path: shown.clone(),
        message: e.to_string().trim().replace('\n', " "),
    })?;
    cfg.check().map_err(|source| DefinitionError::Invalid {
        path: shown,
        source,
    })?;
    Ok(cfg)
}

/// Reads the definition of `name`.
pub fn load(name: &str) -> Result<VmConfig, DefinitionError> {
    let path = path_of(name);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    parse(&text, &path)
}

/// The TOML text of `cfg`, with a header saying what the file is.
pub fn to_text(cfg: &VmConfig) -> String {
    let body = toml::to_string(cfg).unwrap_or_default();
    format!(
        "# Ember VM definition (edit with 'ember edit {}'); keys: see 'ember run --help'.\n{body}",
        cfg.name
    )
}

/// Writes the definition of `cfg.name` (atomically: a temporary file renamed over it).
pub fn save(cfg: &VmConfig) -> Result<PathBuf, DefinitionError> {
    let dir = config_dir();
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let path = path_of(&cfg.name);
    let tmp = dir.join(format!(".{}.toml.tmp", cfg.name));
    fs::write(&tmp, to_text(cfg)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(path)
}

/// Removes the definition of `name` and its autostart mark.
pub fn remove(name: &str) -> Result<(), DefinitionError> {
    let path = path_of(name);
    fs::remove_file(&path).map_err(io_err(&path))?;
    let _ = fs::remove_file(autostart_mark(name));
    Ok(())
}

/// Every defined VM's name, sorted.
pub fn names() -> Vec<String> {
    let Ok(entries) = fs::read_dir(config_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let name = n.strip_suffix(".toml")?.to_string();
            crate::config::parse_name(&name).ok()
        })
        .collect();
    out.sort();
    out
}

/// Whether VM `name` starts with `ember start --autostart`.
pub fn autostart(name: &str) -> bool {
    autostart_mark(name).exists()
}

/// Marks (or unmarks) VM `name` for autostart.
pub fn set_autostart(name: &str, on: bool) -> Result<(), DefinitionError> {
    let mark = autostart_mark(name);
    if on {
        let dir = config_dir().join("autostart");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        fs::write(&mark, "").map_err(io_err(&mark))
    } else {
        match fs::remove_file(&mark) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&mark)(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_parse_with_line_numbers_and_check_values() {
        let p = Path::new("web.toml");
        let e = parse("name = \"web\"\nkernel = \"/k\"\ncpus = \"lots\"\n", p).unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        let e = parse("name = \"web\"\nkernel = \"/k\"\nmemory = \"8M\"\n", p).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        let c = parse("name = \"web\"\nkernel = \"/k\"\n", p).unwrap();
        assert_eq!(c.name, "web");
        let again = parse(&to_text(&c), p).unwrap();
        assert_eq!(again, c);
    }
}
