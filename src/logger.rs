//! Ember's log: `ember: [level: ]message` lines on stderr (CRLF on a raw terminal), filtered
//! by `RUST_LOG`, and redirectable at run time to a file or FIFO (Firecracker's
//! `PUT /logger`).

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

use crate::api::firecracker::Logger;
use crate::console::is_terminal;

static SINK: Mutex<Option<File>> = Mutex::new(None);

/// Where log lines go: the file set by `PUT /logger`, else stderr.
struct Sink;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = SINK.lock().unwrap_or_else(|e| e.into_inner());
        match s.as_mut() {
            Some(f) => f.write(buf),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the logger (once, at start).
pub fn init() {
    let crlf = is_terminal(libc::STDERR_FILENO);
    let from_env = std::env::var_os("RUST_LOG").is_some();
    // Ember's own modules pass everything to the global level, which starts at Info and
    // `PUT /logger` can raise or lower; RUST_LOG, when set, decides alone.
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .filter_module("ember", log::LevelFilter::Trace)
        .filter_module("devices", log::LevelFilter::Trace)
        .filter_module("boot", log::LevelFilter::Trace)
        .parse_env("RUST_LOG")
        .target(env_logger::Target::Pipe(Box::new(Sink)))
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
    if !from_env {
        log::set_max_level(log::LevelFilter::Info);
    }
}

fn level(name: &str) -> Option<log::LevelFilter> {
    Some(match name.to_ascii_lowercase().as_str() {
        "off" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warn" | "warning" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        _ => return None,
    })
}

/// `PUT /logger`: the file (opened for appending, non-blocking for FIFOs) and the level.
pub fn configure(l: &Logger) -> Result<(), String> {
    let lvl = match &l.level {
        Some(name) => Some(level(name).ok_or_else(|| {
            format!("Logger error: '{name}' is not a level (off, error, warn, info, debug, trace)")
        })?),
        None => None,
    };
    if let Some(path) = &l.log_path {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| format!("Logger error: Failed to open target file: {e}"))?;
        *SINK.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }
    if let Some(lvl) = lvl {
        log::set_max_level(lvl);
    }
    Ok(())
}
