//! The host end of a VM's serial console, kept across VM restarts: where guest output goes
//! (stdio, a pty, a file, or nowhere), the VM's console log, the recent output replayed to
//! whoever attaches, and the one interactive client `ember console` attaches.
//!
//! Guest output arrives on a vCPU thread and never waits for a client: it is copied into a
//! bounded buffer that the event loop drains to the client's socket; a slow client loses
//! the oldest bytes, the guest never stalls. The console log rotates at a fixed size.
//!
//! `ember run --console-log FILE` adds a copy of the output to FILE; `--expect`, `--fail-on`
//! and `--timeout` add an [`OutputWatch`]: output is queued for it (bounded) and matched on
//! the event loop by [`ConsoleInput`], never on the vCPU thread.

mod input;
pub mod terminal;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use input::ConsoleInput;
pub use terminal::{is_terminal, RawTerminal};

use crate::ci_watch::OutputWatch;
use crate::config::SerialMode;

/// The byte Ctrl-] sends: leaves the console, as in `virsh console` and telnet.
pub const ESCAPE_BYTE: u8 = 0x1d;
/// Recent output kept for replay to a client that attaches.
pub const REPLAY_BYTES: usize = 64 << 10;
/// Output waiting for a slow client, at most.
pub const CLIENT_BACKLOG: usize = 1 << 20;
/// The console log rotates (to `console.log.1`) at this size.
pub const LOG_ROTATE_BYTES: u64 = 1 << 20;

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The log file cannot be opened.
    #[error("--serial file={path}: cannot open for appending")]
    File {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The console log cannot be opened.
    #[error("cannot open the console log {path}")]
    Log {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A pseudo-terminal could not be made.
    #[error("cannot create a pseudo-terminal for --serial pty")]
    Pty(#[source] io::Error),
    /// Duplicating a descriptor failed.
    #[error("cannot duplicate the console's file descriptor")]
    Dup(#[source] io::Error),
    /// An eventfd could not be made.
    #[error("cannot create an eventfd for the console")]
    EventFd(#[source] io::Error),
}

/// Why a client could not attach.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttachError {
    /// Another client is attached.
    #[error("the console is in use by another client; use --force to take it over")]
    Busy,
}

/// An append-only log that starts over (keeping one old file) past a size.
struct RotatingLog {
    path: PathBuf,
    file: File,
    written: u64,
}

impl RotatingLog {
    fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_path_buf(),
            file,
            written,
        })
    }

    fn write(&mut self, data: &[u8]) {
        if self.written >= LOG_ROTATE_BYTES {
            let old = self.path.with_extension("log.1");
            let reopened = std::fs::rename(&self.path, &old).and_then(|()| {
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
            });
            match reopened {
                Ok(f) => {
                    self.file = f;
                    self.written = 0;
                }
                Err(e) => log::debug!("console log: cannot rotate: {e}"),
            }
        }
        if self.file.write_all(data).is_ok() {
            self.written += data.len() as u64;
        }
    }
}

/// Where output goes and who listens; shared by the UART (vCPU threads) and the event loop.
struct HubInner {
    primary: Option<File>,
    log: Option<RotatingLog>,
    recent: VecDeque<u8>,
    client: Option<Arc<UnixStream>>,
    /// Bumped when the client changes, so the event loop re-watches.
    client_generation: u64,
    backlog: VecDeque<u8>,
    /// Bytes a slow client lost.
    dropped: u64,
    /// `--console-log FILE`.
    copy: Option<File>,
    /// The output checks, matched on the event loop.
    watch: Option<Arc<OutputWatch>>,
}

/// The console's shared state.
pub struct ConsoleHub {
    inner: Mutex<HubInner>,
    /// Written when the client has output waiting or changed.
    poke: EventFd,
}

fn push_bounded(buf: &mut VecDeque<u8>, data: &[u8], cap: usize) -> u64 {
    let data = &data[data.len().saturating_sub(cap)..];
    let over = (buf.len() + data.len()).saturating_sub(cap);
    buf.drain(..over);
    buf.extend(data);
    over as u64
}

impl ConsoleHub {
    fn new(primary: Option<File>, log: Option<RotatingLog>) -> Result<Self, ConsoleError> {
        Ok(ConsoleHub {
            inner: Mutex::new(HubInner {
                primary,
                log,
                recent: VecDeque::new(),
                client: None,
                client_generation: 0,
                backlog: VecDeque::new(),
                dropped: 0,
                copy: None,
                watch: None,
            }),
            poke: EventFd::new(EFD_NONBLOCK).map_err(ConsoleError::EventFd)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HubInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Guest output: to the primary sink, the log, the replay buffer and the client.
    pub fn output(&self, data: &[u8]) {
        let mut h = self.lock();
        if let Some(p) = &mut h.primary {
            // A full pty or a closed pipe loses output, as on a real line.
            let _ = p.write_all(data);
        }
        if let Some(l) = &mut h.log {
            l.write(data);
        }
        if let Some(c) = &mut h.copy {
            let _ = c.write_all(data);
        }
        if h.watch.as_ref().is_some_and(|w| w.push(data)) {
            let _ = self.poke.write(1);
        }
        push_bounded(&mut h.recent, data, REPLAY_BYTES);
        if h.client.is_some() {
            let was_empty = h.backlog.is_empty();
            let lost = push_bounded(&mut h.backlog, data, CLIENT_BACKLOG);
            h.dropped += lost;
            if was_empty {
                let _ = self.poke.write(1);
            }
        }
    }

    /// Attaches `stream` as the interactive client; with `force`, a client already there
    /// is told and dropped. The recent output is replayed to the new client first.
    pub fn attach(&self, stream: UnixStream, force: bool) -> Result<(), AttachError> {
        let mut h = self.lock();
        if let Some(old) = h.client.take() {
            if !force {
                h.client = Some(old);
                return Err(AttachError::Busy);
            }
            let _ = (&*old).write_all(b"\r\n[ember: another client took over the console]\r\n");
            let _ = old.shutdown(std::net::Shutdown::Both);
        }
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("console: cannot make the client's socket non-blocking: {e}");
        }
        h.backlog = h.recent.clone();
        h.dropped = 0;
        h.client = Some(Arc::new(stream));
        h.client_generation += 1;
        drop(h);
        let _ = self.poke.write(1);
        Ok(())
    }

    /// Copies all output from now on to `file` as well (`--console-log`).
    pub fn set_copy(&self, file: File) {
        self.lock().copy = Some(file);
    }

    /// Has the output matched against `watch` from now on; the event loop picks it up.
    pub fn set_watch(&self, watch: Arc<OutputWatch>) {
        self.lock().watch = Some(watch);
        let _ = self.poke.write(1);
    }

    /// The output checks, if any.
    fn watch(&self) -> Option<Arc<OutputWatch>> {
        self.lock().watch.clone()
    }

    /// Whether a client is attached.
    pub fn has_client(&self) -> bool {
        self.lock().client.is_some()
    }

    /// The recent output (what a new client sees first).
    pub fn recent(&self) -> Vec<u8> {
        self.lock().recent.iter().copied().collect()
    }

    /// The eventfd the event loop watches for client changes and waiting output.
    pub fn poke_fd(&self) -> &EventFd {
        &self.poke
    }

    fn client(&self) -> (u64, Option<Arc<UnixStream>>) {
        let h = self.lock();
        (h.client_generation, h.client.clone())
    }

    /// Drops the client of `generation` (it hung up).
    fn detach(&self, generation: u64) {
        let mut h = self.lock();
        if h.client_generation == generation {
            h.client = None;
            h.backlog.clear();
            h.client_generation += 1;
        }
    }

    /// Writes waiting output to the client; true when some is left (socket full).
    fn flush_client(&self) -> bool {
        let mut h = self.lock();
        let Some(client) = h.client.clone() else {
            return false;
        };
        while !h.backlog.is_empty() {
            let (a, _) = h.backlog.as_slices();
            match (&*client).write(a) {
                Ok(0) => break,
                Ok(n) => {
                    h.backlog.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    h.backlog.clear();
                    break;
                }
            }
        }
        false
    }
}

/// A writer into the hub (the UART's output).
struct HubWriter(Arc<ConsoleHub>);

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.output(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The host side of the console.
pub struct Console {
    hub: Arc<ConsoleHub>,
    input: Option<File>,
    /// Ctrl-] quits (input is an interactive terminal).
    escape: bool,
    /// Pty slave held open so the master never reports hang-up while nobody is attached.
    _pty_slave: Option<File>,
}

impl Console {
    /// Opens the console for `mode`, logging to `log` when given. For a pty, its path is
    /// printed on stderr.
    pub fn open(mode: &SerialMode, log: Option<&Path>) -> Result<Self, ConsoleError> {
        let (mut primary, mut input, mut escape, mut slave) = (None, None, false, None);
        match mode {
            SerialMode::Stdio => {
                primary = Some(terminal::dup_file(libc::STDOUT_FILENO).map_err(ConsoleError::Dup)?);
                input = Some(terminal::dup_file(libc::STDIN_FILENO).map_err(ConsoleError::Dup)?);
                escape = is_terminal(libc::STDIN_FILENO);
            }
            SerialMode::Pty => {
                let (master, s, path) = terminal::open_pty().map_err(ConsoleError::Pty)?;
                eprintln!("ember: serial console on {path}");
                primary = Some(master.try_clone().map_err(ConsoleError::Dup)?);
                input = Some(master);
                slave = Some(s);
            }
            SerialMode::File(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ConsoleError::File {
                        path: path.display().to_string(),
                        source,
                    })?;
                primary = Some(file);
            }
            SerialMode::Log | SerialMode::None => {}
        }
        let log = match log {
            Some(p) => Some(RotatingLog::open(p).map_err(|source| ConsoleError::Log {
                path: p.display().to_string(),
                source,
            })?),
            None => None,
        };
        Ok(Console {
            hub: Arc::new(ConsoleHub::new(primary, log)?),
            input,
            escape,
            _pty_slave: slave,
        })
    }

    /// A writer for the UART's output.
    pub fn writer(&self) -> Result<Box<dyn Write + Send>, ConsoleError> {
        Ok(Box::new(HubWriter(self.hub.clone())))
    }

    /// The shared hub.
    pub fn hub(&self) -> &Arc<ConsoleHub> {
        &self.hub
    }

    /// A handle on the input (stdin or the pty), if the console has one.
    pub fn reader(&self) -> Result<Option<File>, ConsoleError> {
        self.input
            .as_ref()
            .map(|f| f.try_clone().map_err(ConsoleError::Dup))
            .transpose()
    }

    /// Whether Ctrl-] on the primary input leaves.
    pub fn escape_enabled(&self) -> bool {
        self.escape
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn hub() -> Arc<ConsoleHub> {
        Arc::new(ConsoleHub::new(None, None).unwrap())
    }

    #[test]
    fn a_new_client_gets_the_recent_output_first() {
        let h = hub();
        h.output(b"boot line\n");
        let (ours, theirs) = UnixStream::pair().unwrap();
        h.attach(ours, false).unwrap();
        h.output(b"after\n");
        assert!(!h.flush_client());
        let mut got = vec![0u8; 64];
        let n = (&theirs).read(&mut got).unwrap();
        assert_eq!(&got[..n], b"boot line\nafter\n");
    }

    #[test]
    fn one_client_at_a_time_unless_forced() {
        let h = hub();
        let (a, a_peer) = UnixStream::pair().unwrap();
        let (b, _b_peer) = UnixStream::pair().unwrap();
        h.attach(a, false).unwrap();
        assert_eq!(
            h.attach(b.try_clone().unwrap(), false),
            Err(AttachError::Busy)
        );
        h.attach(b, true).unwrap();
        let mut text = String::new();
        (&a_peer).read_to_string(&mut text).unwrap();
        assert!(text.contains("took over"), "{text}");
    }

    #[test]
    fn replay_and_backlog_are_bounded() {
        let h = hub();
        let (ours, _theirs) = UnixStream::pair().unwrap();
        h.attach(ours, false).unwrap();
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..40 {
            h.output(&chunk);
        }
        let inner = h.lock();
        assert_eq!(inner.recent.len(), REPLAY_BYTES);
        assert_eq!(inner.backlog.len(), CLIENT_BACKLOG);
        assert!(inner.dropped > 0);
    }

    #[test]
    fn the_copy_gets_all_output_and_the_watch_is_poked_once_per_batch() {
        use crate::ci_watch::{Verdict, WatchSpec};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy.log");
        let h = hub();
        h.set_copy(File::create(&path).unwrap());
        let spec = WatchSpec {
            fail_on: vec!["bad".into()],
            ..WatchSpec::default()
        };
        let w = Arc::new(OutputWatch::new(&spec).unwrap());
        h.set_watch(w.clone());
        assert_eq!(h.poke_fd().read().unwrap(), 1);
        h.output(b"good\n");
        h.output(b"bad\n");
        assert_eq!(
            h.poke_fd().read().unwrap(),
            1,
            "one wake-up for queued output"
        );
        assert!(matches!(w.drain(), Some(Verdict::FailOn { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"good\nbad\n");
    }

    #[test]
    fn the_log_rotates_past_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let c = Console::open(&SerialMode::None, Some(&path)).unwrap();
        let chunk = vec![b'y'; 256 << 10];
        for _ in 0..6 {
            c.hub().output(&chunk);
        }
        let now = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(dir.path().join("console.log.1"))
            .unwrap()
            .len();
        assert!(
            now < LOG_ROTATE_BYTES && old >= LOG_ROTATE_BYTES,
            "{now} {old}"
        );
    }
}
