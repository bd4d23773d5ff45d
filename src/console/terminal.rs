//! Terminals: raw mode for an interactive stdin, and pseudo-terminals for `--serial pty`.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;

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

/// Duplicates `fd` (close-on-exec) into a File of our own.
pub fn dup_file(fd: i32) -> io::Result<File> {
    // SAFETY: dup of a descriptor this process has open; the result is checked and owned by
    // the returned File.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: `new` is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(new) })
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

/// A new pseudo-terminal: master, slave (kept open so the master never sees a hang-up while
/// nobody is attached) and the slave's path.
pub fn open_pty() -> io::Result<(File, File, String)> {
    // SAFETY: posix_openpt returns a new descriptor or -1, checked.
    let master =
        cvt(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: `master` is a fresh descriptor owned by the File from here on.
    let master = unsafe { File::from_raw_fd(master) };
    let fd = master.as_raw_fd();
    // SAFETY: grantpt/unlockpt on our pty master; results checked.
    cvt(unsafe { libc::grantpt(fd) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::unlockpt(fd) })?;
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: the buffer and its length are valid; the result is checked.
    let rc = unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string into `name`.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)?;
    // The guest's output must not be cooked on the way out of the pty.
    set_raw(slave.as_raw_fd())?;
    set_nonblocking(fd)?;
    Ok((master, slave, path))
}

/// Makes `fd` non-blocking.
pub fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; results checked.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}
