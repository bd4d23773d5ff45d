//! What a blocked call does under the default mode: the filter answers `SECCOMP_RET_TRAP`,
//! the kernel sends SIGSYS to the thread that made the call, and this handler writes one
//! line naming the thread, the call's number and name, then ends the process with
//! [`super::BLOCKED_EXIT_CODE`]. The handler is async-signal-safe: it only reads a
//! thread-local buffer filled when the filter was installed (or asks the kernel for the
//! thread's name) and a static table, formats into a stack buffer, and calls write(2) and
//! _exit(2); every filter allows these calls.

use std::cell::Cell;
use std::sync::Once;

use vmm_sys_util::signal::register_signal_handler;

use super::{names, SeccompError, BLOCKED_EXIT_CODE};

/// Longest thread name kept (Linux keeps 15 bytes of a thread's name).
const NAME_LEN: usize = 32;

thread_local! {
    /// This thread's name and its length, for the handler.
    static THREAD_NAME: Cell<([u8; NAME_LEN], usize)> = const { Cell::new(([0; NAME_LEN], 0)) };
}

/// `si_code` of a SIGSYS that a seccomp filter raised.
const SYS_SECCOMP: libc::c_int = 1;

/// The head of `siginfo_t` for SIGSYS on x86_64 (`_sigsys` of the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// Remembers `name` as this thread's, for the line a blocked call prints.
pub fn set_thread_name(name: &str) {
    let mut buf = [0u8; NAME_LEN];
    let len = name.len().min(NAME_LEN);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    THREAD_NAME.with(|n| n.set((buf, len)));
}

/// A fixed buffer the handler formats into.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The line for a blocked call `nr` on thread `thread`.
fn blocked_line(thread: &[u8], nr: libc::c_long) -> Line {
    let mut l = Line {
        buf: [0; 256],
        len: 0,
    };
    l.push(b"ember: seccomp: thread '");
    l.push(thread);
    l.push(b"' made system call ");
    l.push_number(nr as u64);
    l.push(b" (");
    l.push(names::name(nr).unwrap_or("unknown").as_bytes());
    l.push(b"), which its filter does not allow; the VM is stopped (exit status ");
    l.push_number(u64::from(BLOCKED_EXIT_CODE));
    l.push(b")\n");
    l
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if info.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS, whose head is laid out as
    // SigsysInfo on x86_64; only plain integers are read.
    let (code, nr) = unsafe {
        let i = &*(info as *const SigsysInfo);
        (i.code, i.syscall)
    };
    if code != SYS_SECCOMP {
        return; // a SIGSYS someone sent with kill(2): not ours to act on
    }
    let (mut name, mut len) = THREAD_NAME.with(|n| n.get());
    if len == 0 {
        // A thread that has not installed its own filter yet (it runs under its maker's):
        // the kernel's name for it (PR_GET_NAME is allowed everywhere, for this).
        // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into the buffer.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
        len = name.iter().take(16).position(|&b| b == 0).unwrap_or(0);
    }
    let line = blocked_line(&name[..len], libc::c_long::from(nr));
    // SAFETY: write(2) of a stack buffer to stderr, then _exit(2): both async-signal-safe
    // and allowed by every filter.
    unsafe {
        libc::write(
            libc::STDERR_FILENO,
            line.buf.as_ptr() as *const libc::c_void,
            line.len,
        );
        libc::_exit(libc::c_int::from(BLOCKED_EXIT_CODE));
    }
}

/// Installs the SIGSYS handler (once per process).
pub fn install_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(libc::SIGSYS, on_sigsys)
            .map_err(|e| SeccompError::Handler(std::io::Error::from_raw_os_error(e.errno())));
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blocked_line_names_thread_number_and_call() {
        let l = blocked_line(b"vcpu 0", libc::SYS_socket);
        assert_eq!(
            std::str::from_utf8(&l.buf[..l.len]).unwrap(),
            "ember: seccomp: thread 'vcpu 0' made system call 41 (socket), which its filter \
             does not allow; the VM is stopped (exit status 148)\n"
        );
    }

    #[test]
    fn unknown_numbers_and_long_names_still_make_one_line() {
        let l = blocked_line(&[b'x'; NAME_LEN], 99_999);
        let text = std::str::from_utf8(&l.buf[..l.len]).unwrap();
        assert!(text.contains("call 99999 (unknown)"), "{text}");
        assert!(text.ends_with(")\n"));
    }
}
