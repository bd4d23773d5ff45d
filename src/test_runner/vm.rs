//! One `ember run` child process with its console on pipes (`--serial stdio`): started,
//! read until it ends, reports, reaches its ready point or runs out of time, and stopped.
//! A child per VM keeps cases apart and makes a timeout a plain kill.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::watch::{LogFile, Watcher};

/// Bytes read from a pipe at once.
const CHUNK: usize = 64 * 1024;
/// Bytes of ember's own stderr kept (its last lines say why it failed).
const STDERR_KEEP: usize = 8 * 1024;
/// How long a stopped VM gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The longest wait between two looks at the clock and the cancel flag.
const TICK: Duration = Duration::from_millis(100);

/// Why [`VmProcess::drive`] returned.
#[derive(Debug)]
pub enum Ended {
    /// The process exited (its console is drained).
    Exited(ExitStatus),
    /// The ready pattern was seen (the VM still runs).
    Ready,
    /// The guest reported its command's exit status (the VM still runs).
    Reported,
    /// A `fail_on` pattern matched (the VM still runs).
    Trouble,
    /// The deadline passed (the VM still runs).
    TimedOut,
    /// The run was cancelled (Ctrl-C; the VM still runs).
    Cancelled,
}

/// What to do while driving a VM.
pub struct Drive<'a> {
    /// Reads the console.
    pub watcher: &'a mut Watcher,
    /// Where the console goes.
    pub log: &'a mut LogFile,
    /// When to give up.
    pub deadline: Instant,
    /// Return [`Ended::Ready`] at the ready pattern.
    pub stop_on_ready: bool,
    /// Written to the console once the ready pattern was seen.
    pub command: Option<Vec<u8>>,
    /// Set when the guest's start line is seen.
    pub started_at: Option<Instant>,
    /// Set from outside to stop everything.
    pub cancel: &'a AtomicBool,
}

/// A running `ember run`.
pub struct VmProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    stderr_tail: Vec<u8>,
    status: Option<ExitStatus>,
}

impl VmProcess {
    /// Starts `ember ARGS...` with its console on pipes.
    pub fn spawn(ember: &Path, args: &[OsString]) -> io::Result<Self> {
        let mut child = Command::new(ember)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(VmProcess {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            child,
            stderr_tail: Vec::new(),
            status: None,
        })
    }

    /// Ember's own messages (the end of its stderr).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr_tail)
            .trim()
            .to_string()
    }

    /// The last line ember printed on stderr.
    pub fn stderr_last_line(&self) -> String {
        let text = self.stderr_text();
        text.lines().last().unwrap_or("").trim().to_string()
    }

    /// Reads the console into the watcher and the log until something in [`Ended`] happens.
    pub fn drive(&mut self, d: &mut Drive<'_>) -> io::Result<Ended> {
        loop {
            if d.cancel.load(Ordering::SeqCst) {
                return Ok(Ended::Cancelled);
            }
            if d.watcher.ready {
                if let (Some(cmd), Some(stdin)) = (d.command.take(), self.stdin.as_mut()) {
                    // At most a few KiB into an empty pipe: does not block. A VM that is gone
                    // already shows up as its exit below.
                    let _ = stdin.write_all(&cmd).and_then(|()| stdin.flush());
                }
            }
            if d.watcher.started && d.started_at.is_none() {
                d.started_at = Some(Instant::now());
            }
            if d.watcher.trouble.is_some() {
                return Ok(Ended::Trouble);
            }
            if d.watcher.result.is_some() {
                return Ok(Ended::Reported);
            }
            if d.stop_on_ready && d.watcher.ready {
                return Ok(Ended::Ready);
            }
            if self.stdout.is_none() && self.stderr.is_none() {
                return Ok(match self.wait_until(d.deadline, d.cancel)? {
                    Some(s) => Ended::Exited(s),
                    None if d.cancel.load(Ordering::SeqCst) => Ended::Cancelled,
                    None => Ended::TimedOut,
                });
            }
            let now = Instant::now();
            if now >= d.deadline {
                return Ok(Ended::TimedOut);
            }
            self.pump((d.deadline - now).min(TICK), |bytes| {
                d.log.write(bytes)?;
                d.watcher.feed(bytes);
                Ok(())
            })?;
            if self.stdout.is_none() {
                d.watcher.finish();
            }
        }
    }

    /// Reads the console into `log` (and `watcher`) until the process exits or `deadline`.
    pub fn drain(
        &mut self,
        log: &mut LogFile,
        watcher: &mut Watcher,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> io::Result<Option<ExitStatus>> {
        while self.stdout.is_some() || self.stderr.is_some() {
            let now = Instant::now();
            if now >= deadline || cancel.load(Ordering::SeqCst) {
                return Ok(None);
            }
            self.pump((deadline - now).min(TICK), |bytes| {
                log.write(bytes)?;
                watcher.feed(bytes);
                Ok(())
            })?;
        }
        self.wait_until(deadline, cancel)
    }

    /// Waits for one of the pipes to have data (up to `timeout`) and reads it.
    fn pump(
        &mut self,
        timeout: Duration,
        mut on_console: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut fds = Vec::with_capacity(2);
        if let Some(o) = &self.stdout {
            fds.push(libc::pollfd {
                fd: o.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if let Some(e) = &self.stderr {
            fds.push(libc::pollfd {
                fd: e.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ms = timeout.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: `fds` is a valid array of pollfd of the given length, alive for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        let ready = |fd: i32| {
            fds.iter().any(|p| {
                p.fd == fd && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
            })
        };
        let mut buf = vec![0u8; CHUNK];
        if let Some(o) = self.stdout.as_mut() {
            if ready(o.as_raw_fd()) {
                match o.read(&mut buf) {
                    Ok(0) | Err(_) => self.stdout = None,
                    Ok(k) => on_console(&buf[..k])?,
                }
            }
        }
        if let Some(e) = self.stderr.as_mut() {
            if ready(e.as_raw_fd()) {
                match e.read(&mut buf) {
                    Ok(0) | Err(_) => self.stderr = None,
                    Ok(k) => keep_tail(&mut self.stderr_tail, &buf[..k], STDERR_KEEP),
                }
            }
        }
        Ok(())
    }

    /// Waits for the exit until `deadline`; None when it did not come.
    fn wait_until(
        &mut self,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> io::Result<Option<ExitStatus>> {
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline || cancel.load(Ordering::SeqCst) {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Stops the VM: SIGTERM (ember ends the VM and cleans up), then SIGKILL if it is still
    /// there after a grace period. Returns its exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(s)) = self.try_wait() {
            return Some(s);
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child, which has not been reaped (try_wait above
            // found it running), so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let end = Instant::now() + STOP_GRACE;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
        self.status
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.stop();
        }
    }
}

/// Appends `bytes` to `buf`, keeping only its last `keep` bytes.
fn keep_tail(buf: &mut Vec<u8>, bytes: &[u8], keep: usize) {
    buf.extend_from_slice(bytes);
    if buf.len() > keep {
        let cut = buf.len() - keep;
        buf.drain(..cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stderr_tail_keeps_only_the_last_bytes() {
        // Arrange
        let mut buf = Vec::new();

        // Act
        keep_tail(&mut buf, b"0123456789", 4);
        keep_tail(&mut buf, b"ab", 4);

        // Assert
        assert_eq!(buf, b"89ab");
    }

    #[test]
    fn a_process_is_read_to_its_exit_and_its_status_kept() {
        // Arrange: a shell standing in for ember, printing a ready line then exiting 3.
        let cancel = AtomicBool::new(false);
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogFile::create(&dir.path().join("log"), 1 << 20).unwrap();
        let mut watcher = Watcher::new(Default::default());
        let args: Vec<OsString> = ["-c", "echo one; echo two; echo oops >&2; exit 3"]
            .iter()
            .map(OsString::from)
            .collect();
        let mut vm = VmProcess::spawn(Path::new("/bin/sh"), &args).unwrap();

        // Act
        let ended = vm
            .drive(&mut Drive {
                watcher: &mut watcher,
                log: &mut log,
                deadline: Instant::now() + Duration::from_secs(20),
                stop_on_ready: false,
                command: None,
                started_at: None,
                cancel: &cancel,
            })
            .unwrap();
        log.finish().unwrap();

        // Assert
        assert!(
            matches!(ended, Ended::Exited(s) if s.code() == Some(3)),
            "{ended:?}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("log")).unwrap(),
            b"one\ntwo\n"
        );
        assert_eq!(vm.stderr_last_line(), "oops");
        assert_eq!(watcher.lines, 2);
    }

    #[test]
    fn a_console_flood_is_read_to_the_end_with_bounded_log_and_memory() {
        // Arrange: 64 MiB in one line, then a line the case expects.
        let cancel = AtomicBool::new(false);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut log = LogFile::create(&path, 1 << 20).unwrap();
        let mut watcher = Watcher::new(crate::test_runner::watch::WatchSpec {
            expect: vec![regex::Regex::new("^END$").unwrap()],
            ..Default::default()
        });
        let script = "head -c 67108864 /dev/zero | tr '\\0' x; echo; echo END";
        let args: Vec<OsString> = ["-c", script].iter().map(OsString::from).collect();
        let mut vm = VmProcess::spawn(Path::new("/bin/sh"), &args).unwrap();

        // Act
        let ended = vm
            .drive(&mut Drive {
                watcher: &mut watcher,
                log: &mut log,
                deadline: Instant::now() + Duration::from_secs(120),
                stop_on_ready: false,
                command: None,
                started_at: None,
                cancel: &cancel,
            })
            .unwrap();
        let dropped = log.dropped;
        log.finish().unwrap();

        // Assert
        assert!(
            matches!(ended, Ended::Exited(s) if s.success()),
            "{ended:?}"
        );
        assert!(watcher.missing_expect().is_none());
        assert_eq!(dropped, (64 << 20) + 1 + 4 - (1 << 20));
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < (1 << 20) + 200, "{size}");
    }

    #[test]
    fn a_hung_process_times_out_and_is_stopped() {
        // Arrange
        let cancel = AtomicBool::new(false);
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogFile::create(&dir.path().join("log"), 1 << 20).unwrap();
        let mut watcher = Watcher::new(Default::default());
        let args: Vec<OsString> = ["-c", "exec sleep 100"]
            .iter()
            .map(OsString::from)
            .collect();
        let mut vm = VmProcess::spawn(Path::new("/bin/sh"), &args).unwrap();
        let start = Instant::now();

        // Act
        let ended = vm
            .drive(&mut Drive {
                watcher: &mut watcher,
                log: &mut log,
                deadline: Instant::now() + Duration::from_millis(300),
                stop_on_ready: false,
                command: None,
                started_at: None,
                cancel: &cancel,
            })
            .unwrap();
        let status = vm.stop();

        // Assert
        assert!(matches!(ended, Ended::TimedOut), "{ended:?}");
        assert!(status.is_some_and(|s| !s.success()));
        assert!(start.elapsed() < Duration::from_secs(10));
    }
}
