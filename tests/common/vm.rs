//! A private host for lifecycle tests: its own state and definitions directories (so
//! `ember list` shows only the test's VMs and names never clash between tests), the VMs it
//! starts killed when it is dropped (a failing test leaves nothing running), and small
//! helpers to read `ember list`, a VM's console log and its process.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A state directory and a definitions directory of one test.
pub struct Host {
    dir: tempfile::TempDir,
}

/// What an `ember` command printed.
#[derive(Debug)]
pub struct Said {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Said {
    fn from(o: Output) -> Self {
        Said {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// One row of `ember list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    pub name: String,
    pub state: String,
}

impl Host {
    /// A fresh host under target/tmp (short paths: the API socket's must fit in 108 bytes).
    pub fn new() -> Self {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("h")
            .tempdir_in(base)
            .unwrap();
        Host { dir }
    }

    /// A scratch directory for the test's files.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `$EMBER_STATE_DIR`.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("s")
    }

    /// `$EMBER_CONFIG_DIR`.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("c")
    }

    /// The state directory of VM `name`.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.state_dir().join("vms").join(name)
    }

    /// The ember binary with this host's directories.
    pub fn ember(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ember"));
        c.env("EMBER_STATE_DIR", self.state_dir())
            .env("EMBER_CONFIG_DIR", self.config_dir())
            .env_remove("EMBER_DETACHED");
        c
    }

    /// Runs `ember ARGS` to its end (it must end within 30 s: these commands are quick).
    pub fn say(&self, args: &[&str]) -> Said {
        let mut cmd = self.ember();
        cmd.args(args);
        let r = super::run(cmd, Duration::from_secs(30));
        Said {
            code: r.code(),
            stdout: r.stdout,
            stderr: r.stderr,
        }
    }

    /// Runs `ember ARGS` and asserts it succeeded.
    pub fn ok(&self, args: &[&str]) -> Said {
        let s = self.say(args);
        assert_eq!(s.code, Some(0), "ember {args:?} failed: {s:?}");
        s
    }

    /// Writes the tiny kernel (`elf`, from examples/tiny_kernel) here; returns its path.
    pub fn kernel(&self, elf: &[u8]) -> PathBuf {
        let path = self.dir.path().join("tiny.elf");
        std::fs::write(&path, elf).unwrap();
        path
    }

    /// `ember run -d --name NAME --kernel KERNEL --memory 16M --cmdline WORDS`, asserted to
    /// start; returns the VM's process id.
    pub fn run_tiny(&self, name: &str, kernel: &Path, words: &str) -> u32 {
        let kernel = kernel.to_str().unwrap();
        let s = self.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--kernel",
            kernel,
            "--memory",
            "16M",
            "--cmdline",
            words,
        ]);
        assert_eq!(s.stdout.trim(), name, "run -d prints the name: {s:?}");
        self.pid_of(name).expect("a started VM has a pid file")
    }

    /// The process id in the state directory of `name`.
    pub fn pid_of(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.vm_dir(name).join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The rows of `ember list ARGS`.
    pub fn list(&self, args: &[&str]) -> Vec<Listed> {
        let mut all = vec!["list"];
        all.extend_from_slice(args);
        let s = self.ok(&all);
        s.stdout
            .lines()
            .skip(2) // header and rule
            .map(|l| {
                let mut words = l.split_whitespace();
                Listed {
                    id: words.next().unwrap_or_default().to_string(),
                    name: words.next().unwrap_or_default().to_string(),
                    state: words.collect::<Vec<_>>().join(" "),
                }
            })
            .collect()
    }

    /// The state `ember list --all` shows for `name`, if listed.
    pub fn state_of(&self, name: &str) -> Option<String> {
        self.list(&["--all"])
            .into_iter()
            .find(|r| r.name == name)
            .map(|r| r.state)
    }

    /// The console log of `name` so far ("" when there is none).
    pub fn console_log(&self, name: &str) -> String {
        let bytes = std::fs::read(self.vm_dir(name).join("console.log")).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Waits until the console log of `name` contains `text`; fails the test with the log
    /// after `limit`.
    pub fn wait_console(&self, name: &str, text: &str, limit: Duration) -> String {
        let mut log = String::new();
        let found = wait_until(limit, || {
            log = self.console_log(name);
            log.contains(text)
        });
        assert!(
            found,
            "'{text}' did not appear within {limit:?}; console log:\n{log}"
        );
        log
    }

    /// The process ids of every VM this host's state directory names.
    fn pids(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(self.state_dir().join("vms")) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read_to_string(e.path().join("pid")).ok())
            .filter_map(|p| p.trim().parse().ok())
            .collect()
    }
}

impl Drop for Host {
    /// Kills what the test left running (only ember processes: a pid file may be stale).
    fn drop(&mut self) {
        for pid in self.pids() {
            if alive(pid) && is_ember(pid) {
                // SAFETY: kill(2) on a process id; no memory is involved.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Whether process `pid` has a thread that is not dead. (Its leader turns zombie first; a
/// vCPU thread still tearing down holds the process's files, its state directory's lock too.)
pub fn alive(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            stat.rfind(')')
                .and_then(|i| stat.get(i + 2..i + 3))
                .is_some_and(|state| state != "Z" && state != "X")
        })
    })
}

fn is_ember(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.file_name().is_some_and(|n| n == "ember"))
        .unwrap_or(false)
}

/// User plus system CPU time of process `pid` so far, in clock ticks (10 ms).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Polls `cond` every 20 ms until it holds (true) or `limit` passes (false).
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A unique VM name for this test process: `PREFIX-PID`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}
