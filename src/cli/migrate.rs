//! `ember migrate NAME tcp:HOST:PORT` (virsh migrate), `ember domjobinfo NAME` and
//! `ember domjobabort NAME`.
//!
//! `migrate` asks the VM with `PUT /ember/migrate`, which is answered when the migration
//! ends, and meanwhile shows its progress (`GET /ember/migration`) on a terminal. Ctrl-C
//! cancels it (the VM goes on here).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use serde_json::json;

use super::{finish, get, running, send, Failure};
use crate::api::http;
use crate::console::is_terminal;
use crate::migration::{JobInfo, JobState, MigrateRequest, DEFAULT_DOWNTIME_MS};

/// `ember migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The VM's name
    pub name: String,
    /// Where to: tcp:HOST:PORT, an 'ember run --incoming' there
    pub url: String,
    /// Copy memory while the guest runs (pre-copy); without it the VM is paused, all of it
    /// is sent, and it resumes there
    #[arg(long)]
    pub live: bool,
    /// The longest pause allowed at the switch-over, in ms (live)
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_DOWNTIME_MS)]
    pub downtime: u64,
    /// Give up after S seconds if the pages left never fit --downtime (the VM goes on
    /// here)
    #[arg(long, value_name = "S")]
    pub timeout: Option<u64>,
    /// Also send each qcow2 disk's own clusters (its base must be on the destination; the
    /// destination writes a new image at its --disk path)
    #[arg(long)]
    pub copy_storage: bool,
    /// Authenticate with the shared key in FILE (the destination has the same); messages
    /// carry HMAC-SHA256 MACs, nothing is encrypted
    #[arg(long, value_name = "FILE")]
    pub auth_key: Option<std::path::PathBuf>,
    /// Send at most this many MiB per second
    #[arg(long, value_name = "MIB")]
    pub bandwidth: Option<u64>,
    /// Check the copy: a CRC-32 of every MiB of guest memory at the stop goes along and the
    /// destination refuses the VM if its memory differs (costs downtime)
    #[arg(long)]
    pub verify: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_interrupt() {
    let handler: extern "C" fn(libc::c_int) = on_interrupt;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
}

/// One request whose answer may take as long as the migration.
fn call_and_wait(
    sock: &std::path::Path,
    path: &str,
    body: &str,
) -> Result<http::ParsedResponse, String> {
    let mut s = UnixStream::connect(sock)
        .map_err(|e| format!("cannot connect to {}: {e}", sock.display()))?;
    let req = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((resp, _)) = http::parse_response(&buf).map_err(|e| e.to_string())? {
            return Ok(resp);
        }
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the VM closed the API connection without an answer".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// One progress line.
fn progress_line(i: &JobInfo) -> String {
    format!(
        "{:?}: pass {}, {} sent, {} left, dirtying {}/s, {}/s out, expected downtime {} ms",
        i.state,
        i.iteration,
        mib(i.bytes_sent),
        mib(i.remaining),
        mib(i.dirty_rate),
        mib(i.bandwidth),
        i.expected_downtime_ms
    )
}

/// `ember migrate`.
pub fn migrate(a: MigrateArgs) -> ExitCode {
    finish((|| {
        let vm = running(&a.name)?;
        let auth_key = match &a.auth_key {
            Some(p) => Some(
                std::path::absolute(p)
                    .map_err(|e| Failure::usage(format!("--auth-key {}: {e}", p.display())))?,
            ),
            None => None,
        };
        let req = MigrateRequest {
            url: a.url.clone(),
            live: a.live,
            downtime_ms: a.downtime,
            timeout_s: a.timeout,
            copy_storage: a.copy_storage,
            auth_key,
            bandwidth_mib: a.bandwidth,
            verify: a.verify,
        };
        let body = serde_json::to_string(&req).map_err(|e| Failure::failed(e.to_string()))?;
        catch_interrupt();
        let sock = vm.api_sock.clone();
        let waiter = std::thread::spawn(move || call_and_wait(&sock, "/ember/migrate", &body));
        let tty = is_terminal(libc::STDERR_FILENO);
        let mut asked_abort = false;
        while !waiter.is_finished() {
            std::thread::sleep(Duration::from_millis(200));
            if INTERRUPTED.load(Ordering::SeqCst) && !asked_abort {
                asked_abort = true;
                let _ = send(&a.name, "PUT", "/ember/migration/abort", json!({}));
                eprintln!("\rember: cancelling the migration");
            }
            if tty {
                if let Ok(v) = crate::api::client::get_json(&vm.api_sock, "/ember/migration") {
                    if let Ok(i) = serde_json::from_value::<JobInfo>(v) {
                        eprint!("\r\x1b[K{}", progress_line(&i));
                    }
                }
            }
        }
        if tty {
            eprint!("\r\x1b[K");
        }
        let resp = waiter
            .join()
            .map_err(|_| Failure::failed("the request thread failed"))?
            .map_err(Failure::failed)?;
        if resp.status >= 300 {
            let msg = serde_json::from_str::<serde_json::Value>(&resp.body)
                .ok()
                .and_then(|v| v["fault_message"].as_str().map(str::to_string))
                .unwrap_or(resp.body);
            return Err(if resp.status == 400 || resp.status == 409 {
                Failure::usage(msg)
            } else {
                Failure::failed(msg)
            });
        }
        let info: JobInfo = serde_json::from_str(&resp.body).unwrap_or_default();
        println!(
            "VM {} migrated to {}: {} sent in {} ms over {} passes, downtime {} ms",
            a.name,
            a.url,
            mib(info.bytes_sent),
            info.elapsed_ms,
            info.iteration,
            info.downtime_ms.map_or("?".into(), |d| d.to_string())
        );
        Ok(())
    })())
}

/// `ember domjobinfo`.
pub fn domjobinfo(a: super::verbs::NameArg) -> ExitCode {
    finish((|| {
        let v = get(&a.name, "/ember/migration")?;
        let i: JobInfo = serde_json::from_value(v).map_err(|e| Failure::failed(e.to_string()))?;
        let kind = match i.state {
            JobState::None => "None",
            JobState::Incoming => "Incoming",
            s if s.is_final() => "Completed",
            _ => "Unbounded",
        };
        let rows: Vec<(&str, String)> = vec![
            ("Job type", kind.into()),
            (
                "Operation",
                if i.state == JobState::Incoming {
                    "Incoming migration (waiting)"
                } else {
                    "Outgoing migration"
                }
                .into(),
            ),
            ("State", format!("{:?}", i.state).to_lowercase()),
            ("Destination", i.destination.clone()),
            ("Live", if i.live { "yes" } else { "no" }.into()),
            ("Time elapsed", format!("{} ms", i.elapsed_ms)),
            ("Iteration", i.iteration.to_string()),
            ("Data processed", mib(i.bytes_sent)),
            ("Data remaining", mib(i.remaining)),
            ("Memory total", mib(i.ram_total)),
            ("Memory processed", mib(i.ram_sent)),
            ("Dirty rate", format!("{}/s", mib(i.dirty_rate))),
            ("Memory bandwidth", format!("{}/s", mib(i.bandwidth))),
            (
                "Expected downtime",
                format!("{} ms", i.expected_downtime_ms),
            ),
            (
                "Total downtime",
                i.downtime_ms.map_or("-".into(), |d| format!("{d} ms")),
            ),
            ("Disk processed", mib(i.disk_sent)),
            ("Error", i.error.clone().unwrap_or_else(|| "-".into())),
        ];
        for (k, v) in rows {
            println!("{:<19}{v}", format!("{k}:"));
        }
        Ok(())
    })())
}

/// `ember domjobabort`.
pub fn domjobabort(a: super::verbs::NameArg) -> ExitCode {
    finish(send(&a.name, "PUT", "/ember/migration/abort", json!({})))
}
