//! The host end of the serial console: stdio (raw terminal, Ctrl-] to quit), a pty, a log
//! file or nothing; and the event-loop handler that feeds host input to the UART no faster
//! than the guest reads it.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use devices::legacy::SerialDevice;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialMode;
use crate::run_state::{Outcome, RunState};

/// The byte Ctrl-] sends: leaves the console, as in `virsh console` and telnet.
pub const ESCAPE_BYTE: u8 = 0x1d;

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
    /// A pseudo-terminal could not be made.
    #[error("cannot create a pseudo-terminal for --serial pty")]
    Pty(#[source] io::Error),
    /// Duplicating a descriptor failed.
    #[error("cannot duplicate the console's file descriptor")]
    Dup(#[source] io::Error),
}

/// The host side of the console, kept across VM restarts.
pub struct Console {
    output: Option<File>,
    input: Option<File>,
    /// Ctrl-] quits (input is an interactive terminal).
    escape: bool,
    /// Pty slave held open so the master never reports hang-up while nobody is attached.
    _pty_slave: Option<File>,
}

fn dup_file(fd: i32) -> Result<File, ConsoleError> {
    // SAFETY: dup of a descriptor this process has open; the result is checked and owned by
    // the returned File.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(ConsoleError::Dup(io::Error::last_os_error()));
    }
    // SAFETY: `new` is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(new) })
}

/// True when `fd` is a terminal.
pub fn is_terminal(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Puts the terminal on `fd` in raw mode (no echo, no line editing, no signals from keys);
/// the old mode comes back on drop.
pub struct RawTerminal {
    fd: i32,
    saved: libc::termios,
}

/// Makes the terminal on `fd` raw; returns its previous mode.
fn set_raw(fd: i32) -> io::Result<libc::termios> {
    // SAFETY: termios is plain data; tcgetattr fills it and its result is checked.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and pointer to a termios.
    cvt(unsafe { libc::tcgetattr(fd, &mut saved) })?;
    let mut raw = saved;
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut raw) };
    // SAFETY: valid descriptor and termios.
    cvt(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) })?;
    Ok(saved)
}

impl RawTerminal {
    /// Makes `fd` raw until the value is dropped.
    pub fn new(fd: i32) -> io::Result<Self> {
        Ok(RawTerminal {
            fd,
            saved: set_raw(fd)?,
        })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the mode read in new() on the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

fn open_pty() -> Result<(File, File, String), ConsoleError> {
    let err = |_| ConsoleError::Pty(io::Error::last_os_error());
    // SAFETY: posix_openpt returns a new descriptor or -1, checked.
    let master =
        cvt(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })
            .map_err(err)?;
    // SAFETY: `master` is a fresh descriptor owned by the File from here on.
    let master = unsafe { File::from_raw_fd(master) };
    let fd = master.as_raw_fd();
    // SAFETY: grantpt/unlockpt on our pty master; results checked.
    cvt(unsafe { libc::grantpt(fd) }).map_err(err)?;
    // SAFETY: as above.
    cvt(unsafe { libc::unlockpt(fd) }).map_err(err)?;
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: the buffer and its length are valid; the result is checked.
    let rc = unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(ConsoleError::Pty(io::Error::from_raw_os_error(rc)));
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string into `name`.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .map_err(ConsoleError::Pty)?;
    // The guest's output must not be cooked on the way out of the pty.
    set_raw(slave.as_raw_fd()).map_err(ConsoleError::Pty)?;
    // SAFETY: F_SETFL on our own descriptor; a full pty loses output instead of blocking.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) }).map_err(ConsoleError::Pty)?;
    Ok((master, slave, path))
}

impl Console {
    /// Opens the console for `mode`. For a pty, its path is printed on stderr.
    pub fn open(mode: &SerialMode) -> Result<Self, ConsoleError> {
        let mut c = Console {
            output: None,
            input: None,
            escape: false,
            _pty_slave: None,
        };
        match mode {
            SerialMode::Stdio => {
                c.output = Some(dup_file(libc::STDOUT_FILENO)?);
                c.input = Some(dup_file(libc::STDIN_FILENO)?);
                c.escape = is_terminal(libc::STDIN_FILENO);
            }
            SerialMode::Pty => {
                let (master, slave, path) = open_pty()?;
                eprintln!("ember: serial console on {path}");
                c.output = Some(master.try_clone().map_err(ConsoleError::Dup)?);
                c.input = Some(master);
                c._pty_slave = Some(slave);
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
                c.output = Some(file);
            }
            SerialMode::None => {}
        }
        Ok(c)
    }

    /// A writer for the UART's output (a fresh handle per VM run).
    pub fn writer(&self) -> Result<Box<dyn Write + Send>, ConsoleError> {
        Ok(match &self.output {
            Some(f) => Box::new(f.try_clone().map_err(ConsoleError::Dup)?),
            None => Box::new(io::sink()),
        })
    }

    /// A handle on the input, if the console has one.
    pub fn reader(&self) -> Result<Option<File>, ConsoleError> {
        self.input
            .as_ref()
            .map(|f| f.try_clone().map_err(ConsoleError::Dup))
            .transpose()
    }

    /// Whether Ctrl-] leaves.
    pub fn escape_enabled(&self) -> bool {
        self.escape
    }
}

/// Feeds console input to the UART on the event loop.
pub struct ConsoleInput {
    input: File,
    serial: Arc<Mutex<SerialDevice>>,
    rx_space: EventFd,
    state: Arc<RunState>,
    escape: bool,
    /// Input is not watched until the guest makes room in the FIFO.
    waiting_for_room: bool,
}

impl ConsoleInput {
    /// A handler reading `input` into `serial`; `rx_space` is the UART's "FIFO drained"
    /// signal; with `escape`, Ctrl-] ends the run.
    pub fn new(
        input: File,
        serial: Arc<Mutex<SerialDevice>>,
        rx_space: EventFd,
        state: Arc<RunState>,
        escape: bool,
    ) -> Self {
        ConsoleInput {
            input,
            serial,
            rx_space,
            state,
            escape,
            waiting_for_room: false,
        }
    }

    fn stop_watching_input(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.remove(Events::empty(&self.input)) {
            log::debug!("console: cannot unwatch input: {e:?}");
        }
    }

    fn read_input(&mut self, ops: &mut EventOps) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.input_capacity();
        if room == 0 {
            drop(serial);
            self.stop_watching_input(ops);
            self.waiting_for_room = true;
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        let n = match self.input.read(&mut buf[..want]) {
            Ok(0) => {
                drop(serial);
                self.stop_watching_input(ops);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                log::debug!("console: input closed: {e}");
                drop(serial);
                self.stop_watching_input(ops);
                return;
            }
        };
        let data = &buf[..n];
        let cut = if self.escape {
            data.iter().position(|b| *b == ESCAPE_BYTE)
        } else {
            None
        };
        serial.queue_input(&data[..cut.unwrap_or(n)]);
        if cut.is_some() {
            self.state.request_exit(Outcome::ConsoleQuit);
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.rx_space, EventSet::IN)) {
            log::error!("console: cannot watch the UART: {e:?}");
        }
        // Regular files and /dev/null cannot be polled: such input is simply not read.
        if let Err(e) = ops.add(Events::new(&self.input, EventSet::IN)) {
            log::debug!("console: input is not pollable, ignoring it: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.rx_space.as_raw_fd() {
            let _ = self.rx_space.read();
            if self.waiting_for_room {
                self.waiting_for_room = false;
                if let Err(e) = ops.add(Events::new(&self.input, EventSet::IN)) {
                    log::debug!("console: cannot watch input again: {e:?}");
                }
            }
        } else if events.fd() == self.input.as_raw_fd() {
            if events.event_set().contains(EventSet::IN) {
                self.read_input(ops);
            } else {
                // Hang-up or error without data: nothing more will come.
                self.stop_watching_input(ops);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::Interrupt;
    use event_manager::{EventManager, SubscriberOps};
    use std::os::unix::net::UnixStream;

    type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    struct Fixture {
        host: UnixStream,
        serial: Arc<Mutex<SerialDevice>>,
        state: Arc<RunState>,
        events: Manager,
    }

    fn fixture(escape: bool) -> Fixture {
        let (host, guest_side) = UnixStream::pair().unwrap();
        let rx_space = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq: Arc<dyn Interrupt> = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq,
            Arc::new(rx_space.try_clone().unwrap()),
            Box::new(io::sink()),
        )));
        let state = Arc::new(RunState::new().unwrap());
        let input = ConsoleInput::new(
            File::from(std::os::fd::OwnedFd::from(guest_side)),
            serial.clone(),
            rx_space,
            state.clone(),
            escape,
        );
        let mut events = Manager::new().unwrap();
        events.add_subscriber(Arc::new(Mutex::new(input)));
        Fixture {
            host,
            serial,
            state,
            events,
        }
    }

    fn guest_reads_all(serial: &Arc<Mutex<SerialDevice>>) -> Vec<u8> {
        use devices::bus::BusDevice;
        let mut s = serial.lock().unwrap();
        let mut out = Vec::new();
        loop {
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                return out;
            }
            let mut b = [0u8];
            s.read(0, &mut b);
            out.push(b[0]);
        }
    }

    #[test]
    fn flood_is_taken_only_as_fast_as_the_guest_reads() {
        let mut f = fixture(false);
        let flood = vec![b'z'; 10_000];
        f.host.write_all(&flood).unwrap();
        for _ in 0..10 {
            f.events.run_with_timeout(0).unwrap();
        }
        assert_eq!(f.serial.lock().unwrap().input_capacity(), 0);
        let mut got = guest_reads_all(&f.serial);
        assert_eq!(got.len(), 64, "only one FIFO's worth was read");
        while got.len() < flood.len() {
            f.events.run_with_timeout(100).unwrap();
            f.events.run_with_timeout(0).unwrap();
            let more = guest_reads_all(&f.serial);
            assert!(!more.is_empty(), "input resumed after the guest made room");
            got.extend(more);
        }
        assert_eq!(got, flood);
    }

    #[test]
    fn ctrl_bracket_quits_on_a_terminal_and_passes_through_otherwise() {
        let mut f = fixture(true);
        f.host.write_all(b"ab\x1dcd").unwrap();
        f.events.run_with_timeout(100).unwrap();
        assert_eq!(guest_reads_all(&f.serial), b"ab");
        assert_eq!(f.state.outcome(), Some(Outcome::ConsoleQuit));

        let mut f = fixture(false);
        f.host.write_all(b"ab\x1dcd").unwrap();
        f.events.run_with_timeout(100).unwrap();
        assert_eq!(guest_reads_all(&f.serial), b"ab\x1dcd");
        assert_eq!(f.state.outcome(), None);
    }

    #[test]
    fn input_eof_stops_reading_without_spinning() {
        let mut f = fixture(false);
        drop(f.host);
        f.events.run_with_timeout(100).unwrap();
        // With input unwatched, the loop has nothing ready and times out.
        assert_eq!(f.events.run_with_timeout(50).unwrap(), 0);
    }
}
