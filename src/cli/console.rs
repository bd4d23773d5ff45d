//! `ember console NAME`: the VM's serial console on this terminal. Recent output is
//! replayed first; Ctrl-] detaches and the VM keeps running.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::Failure;
use crate::api::client;
use crate::console::{is_terminal, RawTerminal, ESCAPE_BYTE};

/// What ended the session.
enum End {
    Detached,
    VmGone,
}

/// Attaches to the console of VM `name` at `sock`.
pub fn attach(name: &str, sock: &Path, force: bool) -> Result<(), Failure> {
    let (stream, early) = client::attach_console(sock, force)?;
    let tty = is_terminal(libc::STDIN_FILENO);
    let nl = if tty { "\r\n" } else { "\n" };
    let raw = tty
        .then(|| RawTerminal::new(libc::STDIN_FILENO).ok())
        .flatten();
    eprint!("Connected to VM {name} (Ctrl-] to detach){nl}");
    let mut out = std::io::stdout();
    let _ = out.write_all(&early);
    let _ = out.flush();
    let end = pump(&stream);
    drop(raw);
    match end {
        Ok(End::Detached) => {
            eprintln!("\nDetached from VM {name}; it keeps running");
            Ok(())
        }
        Ok(End::VmGone) => {
            eprintln!("\nThe console of VM {name} closed");
            Ok(())
        }
        Err(e) => Err(Failure::failed(format!("console of VM {name}: {e}"))),
    }
}

/// Moves bytes both ways until Ctrl-] or the VM's side closes. When input ends (a pipe),
/// output goes on being shown.
fn pump(stream: &UnixStream) -> std::io::Result<End> {
    let mut fds = [
        libc::pollfd {
            fd: libc::STDIN_FILENO,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let mut buf = [0u8; 4096];
    let mut stdin_open = true;
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            let n = (&*stream).read(&mut buf)?;
            if n == 0 {
                return Ok(End::VmGone);
            }
            let mut out = std::io::stdout();
            out.write_all(&buf[..n])?;
            out.flush()?;
        }
        if stdin_open && fds[0].revents != 0 {
            let n = std::io::stdin().read(&mut buf)?;
            if n == 0 {
                // Input ended (a pipe): keep showing output until the VM side closes.
                stdin_open = false;
                fds[0].fd = -1;
                continue;
            }
            let data = &buf[..n];
            let cut = data.iter().position(|b| *b == ESCAPE_BYTE);
            (&*stream).write_all(&data[..cut.unwrap_or(n)])?;
            if cut.is_some() {
                return Ok(End::Detached);
            }
        }
    }
}
