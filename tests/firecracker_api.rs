//! The control socket as Firecracker's clients use it, with the tiny test kernel: the
//! pre-boot flow byte for byte as firecracker-go-sdk sends it, the getting-started guide's
//! curl lines, `--config-file` with and without `--no-api`, and a hostile or careless client
//! (malformed and oversized requests, pieces and pipelines, too many connections, silent
//! clients, clients that never read) that must not stop the VM or the other clients.
//! Error texts Firecracker also has are compared exactly (see /work/notes/firecracker-api.md).
//! Needs /dev/kvm.

mod common;
#[path = "../examples/tiny_kernel/guest.rs"]
mod guest;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::require_kvm;
use common::vm::{unique, wait_until, Host};

const SOON: Duration = Duration::from_secs(15);
const AFTER_START: &str = "The requested operation is not supported after starting the microVM.";
const BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";

/// An `ember run` in the foreground, killed when dropped.
struct Ember {
    child: Child,
    sock: PathBuf,
    name: String,
}

impl Ember {
    /// `ember run --name NAME --api-sock SOCK ARGS`, once its socket answers.
    fn start(h: &Host, prefix: &str, args: &[&str]) -> Ember {
        let name = unique(prefix);
        let sock = h.path().join(format!("{prefix}.sock"));
        let child = h
            .ember()
            .args(["run", "--name", &name, "--api-sock"])
            .arg(&sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut e = Ember { child, sock, name };
        let up = wait_until(SOON, || UnixStream::connect(&e.sock).is_ok());
        assert!(
            up,
            "the API socket never answered: {:?}",
            e.child.try_wait()
        );
        e
    }

    /// `ember run --kernel TINY --cmdline WORDS` with an API socket.
    fn tiny(h: &Host, kernel: &Path, prefix: &str, words: &str) -> Ember {
        let k = kernel.to_str().unwrap();
        let args = ["--kernel", k, "--memory", "16M", "--cmdline", words];
        Ember::start(h, prefix, &args)
    }

    fn http(&self) -> Http {
        Http::connect(&self.sock)
    }

    /// GET / on a new connection: the VM still answers.
    fn state(&self) -> String {
        let r = self.http().request("GET", "/", None);
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["state"].as_str().unwrap().to_string()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response as it came off the socket.
#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    /// The `fault_message` of an error body (fails the test if there is none).
    fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message: {self:?}"))
            .to_string()
    }
}

/// A raw HTTP/1.1 connection to the API socket (our own reader: not ember's parser).
struct Http {
    s: UnixStream,
    buf: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A request as Go's net/http writes it (firecracker-go-sdk): JSON bodies from
/// json.Encoder end with a newline.
fn go_request(method: &str, path: &str, body: Option<&serde_json::Value>) -> Vec<u8> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: Go-http-client/1.1\r\n"
    );
    let body = body.map(|b| format!("{b}\n")).unwrap_or_default();
    if !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("Accept: application/json\r\n");
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("Accept-Encoding: gzip\r\n\r\n");
    head.push_str(&body);
    head.into_bytes()
}

impl Http {
    fn connect(sock: &Path) -> Http {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(SOON)).unwrap();
        s.set_write_timeout(Some(SOON)).unwrap();
        Http { s, buf: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// The next response; None when the server closed the connection first.
    fn response(&mut self) -> Option<Resp> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("bad status line: {head}"));
                let len: usize = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]);
                    let r = Resp {
                        status,
                        head,
                        body: body.into_owned(),
                    };
                    self.buf.drain(..end + 4 + len);
                    return Some(r);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).expect("the response came in time");
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a Go-style request and returns its response.
    fn request(&mut self, method: &str, path: &str, body: Option<serde_json::Value>) -> Resp {
        self.send(&go_request(method, path, body.as_ref()));
        self.response()
            .unwrap_or_else(|| panic!("{method} {path}: connection closed"))
    }

    /// Whether the server closed the connection (after any response already read), asked
    /// for 300 ms.
    fn closed(&mut self) -> bool {
        self.closed_within(Duration::from_millis(300))
    }

    /// Whether the server closes the connection within `d` (false: still open). A server
    /// that closed with our request unread resets the connection: closed too.
    fn closed_within(&mut self, d: Duration) -> bool {
        self.s.set_read_timeout(Some(d)).unwrap();
        let mut b = [0u8; 64];
        let r = match self.s.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        };
        self.s.set_read_timeout(Some(SOON)).unwrap();
        r
    }
}

fn setup() -> (Host, PathBuf) {
    require_kvm();
    let h = Host::new();
    let k = h.kernel(&guest::elf_image());
    (h, k)
}

/// The console log of the VM named `name` waits for `text`.
fn console_shows(h: &Host, name: &str, text: &str) {
    h.wait_console(name, text, SOON);
}

#[test]
fn the_go_sdk_boot_sequence_starts_the_vm_and_runtime_calls_behave_as_firecrackers() {
    use serde_json::json;
    let (h, k) = setup();
    let disk = h.path().join("rootfs.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let metrics = h.path().join("metrics.json");
    let mut vm = Ember::start(&h, "fc-go", &[]);
    let mut c = vm.http();

    // The SDK polls GET /machine-config until it answers, then configures.
    let ready = c.request("GET", "/machine-config", None);
    assert_eq!(ready.status, 200, "{ready:?}");
    assert!(ready.json()["vcpu_count"].is_u64());
    let calls = [
        ("PUT", "/metrics", json!({"metrics_path": metrics})),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 16, "smt": false}),
        ),
    ];
    for (method, path, body) in calls {
        let r = c.request(method, path, Some(body));
        assert_eq!(r.status, 204, "{method} {path}: {r:?}");
    }
    let m = c.request("GET", "/machine-config", None);
    assert_eq!((m.status, &m.json()["mem_size_mib"]), (200, &json!(16)));
    let pre = c.request("PATCH", "/vm", Some(json!({"state": "Paused"})));
    assert_eq!((pre.status, pre.fault()), (400, BEFORE_START.to_string()));
    let calls = [
        (
            "/boot-source",
            json!({"kernel_image_path": k, "boot_args": "console=ttyS0 count"}),
        ),
        (
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": disk, "is_root_device": true,
                   "is_read_only": false}),
        ),
        ("/actions", json!({"action_type": "InstanceStart"})),
    ];
    for (path, body) in calls {
        let r = c.request("PUT", path, Some(body));
        assert_eq!(r.status, 204, "PUT {path}: {r:?}");
    }

    let info = c.request("GET", "/", None);
    assert_eq!(info.json()["state"], "Running", "{info:?}");
    assert_eq!(info.json()["id"], vm.name.as_str());
    console_shows(&h, &vm.name, "tick 2\n");
    for (want, state) in [
        ("Paused", "Paused"),
        ("Paused", "Paused"),
        ("Resumed", "Running"),
        ("Resumed", "Running"),
    ] {
        let r = c.request("PATCH", "/vm", Some(json!({ "state": want })));
        assert_eq!(r.status, 204, "PATCH /vm {want}: {r:?}");
        assert_eq!(c.request("GET", "/", None).json()["state"], state);
    }
    let again = c.request(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(
        (again.status, again.fault()),
        (400, AFTER_START.to_string())
    );
    let late = c.request("PUT", "/boot-source", Some(json!({"kernel_image_path": k})));
    assert_eq!((late.status, late.fault()), (400, AFTER_START.to_string()));
    let flush = c.request(
        "PUT",
        "/actions",
        Some(json!({"action_type": "FlushMetrics"})),
    );
    assert_eq!(flush.status, 204, "{flush:?}");
    let lines = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(lines.lines().count(), 1, "{lines}");
    let line: serde_json::Value = serde_json::from_str(lines.trim()).unwrap();
    assert!(line["utc_timestamp_ms"].is_u64(), "{line}");
    let cad = c.request(
        "PUT",
        "/actions",
        Some(json!({"action_type": "SendCtrlAltDel"})),
    );
    assert_eq!(cad.status, 204, "{cad:?}");
    let cfg = c.request("GET", "/vm/config", None).json();
    assert_eq!(cfg["boot-source"]["kernel_image_path"], json!(k));
    assert_eq!(cfg["drives"][0]["drive_id"], "rootfs");
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 16);
    assert!(vm.running(), "the tiny kernel ignores Ctrl-Alt-Del");
}

#[test]
fn the_getting_started_guides_curl_lines_boot_the_vm() {
    let (h, k) = setup();
    let rootfs = h.path().join("rootfs.ext4");
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
    let logfile = h.path().join("firecracker.log");
    std::fs::write(&logfile, "").unwrap();
    let vm = Ember::start(&h, "fc-curl", &[]);
    let sock = vm.sock.to_str().unwrap();
    // As the guide writes them, multi-line JSON and all (the network interface needs a tap
    // device and root: left out).
    let calls = [
        (
            "logger",
            format!(
                "{{\n        \"log_path\": \"{}\",\n        \"level\": \"Debug\",\n        \
                 \"show_level\": true,\n        \"show_log_origin\": true\n    }}",
                logfile.display()
            ),
        ),
        (
            "boot-source",
            format!(
                "{{\n        \"kernel_image_path\": \"{}\",\n        \"boot_args\": \
                 \"console=ttyS0 reboot=k panic=1 idle\"\n    }}",
                k.display()
            ),
        ),
        (
            "drives/rootfs",
            format!(
                "{{\n        \"drive_id\": \"rootfs\",\n        \"path_on_host\": \"{}\",\n        \
                 \"is_root_device\": true,\n        \"is_read_only\": false\n    }}",
                rootfs.display()
            ),
        ),
        (
            "actions",
            "{\n        \"action_type\": \"InstanceStart\"\n    }".to_string(),
        ),
    ];
    for (path, data) in calls {
        let url = format!("http://localhost/{path}");
        let out = common::tool(
            "curl",
            &[
                "-sS",
                "-w",
                "%{http_code}",
                "-X",
                "PUT",
                "--unix-socket",
                sock,
                "--data",
                &data,
                &url,
            ],
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(said, "204", "curl PUT /{path}: {said} {out:?}");
    }

    console_shows(&h, &vm.name, "tiny: idle");
    assert_eq!(vm.state(), "Running");
    let cfg = vm.http().request("GET", "/vm/config", None).json();
    let args = cfg["boot-source"]["boot_args"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        args.starts_with("console=ttyS0 reboot=k panic=1 idle"),
        "{args}"
    );
}

fn config_file(h: &Host, kernel: &Path, words: &str) -> PathBuf {
    let file = h.path().join("vm.json");
    let cfg = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": format!("console=ttyS0 {words}")},
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 16},
        "not-a-firecracker-key": "ignored, as Firecracker does",
    });
    std::fs::write(&file, cfg.to_string()).unwrap();
    file
}

#[test]
fn a_config_file_boots_at_once_with_the_api_serving() {
    let (h, k) = setup();
    let file = config_file(&h, &k, "idle");

    let vm = Ember::start(&h, "fc-file", &["--config-file", file.to_str().unwrap()]);

    console_shows(&h, &vm.name, "tiny: idle");
    assert_eq!(vm.state(), "Running");
    let m = vm.http().request("GET", "/machine-config", None).json();
    assert_eq!(m["mem_size_mib"], 16);
}

#[test]
fn a_config_file_with_no_api_runs_without_a_socket() {
    let (h, k) = setup();
    let file = config_file(&h, &k, "count=3");
    let name = unique("fc-noapi");

    let mut cmd = h.ember();
    cmd.args(["run", "--name", &name, "--no-api", "--config-file"])
        .arg(&file);
    let r = common::run(cmd, SOON);

    assert_eq!(r.code(), Some(0), "{r:?}");
    assert!(r.stdout.contains("tick 3\ntiny: powering off"), "{r:?}");

    // And while it runs there is no socket (an idle guest, stopped by the test).
    let file = config_file(&h, &k, "idle");
    let mut child = h
        .ember()
        .args(["run", "--name", &name, "--no-api", "--config-file"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let log = h.vm_dir(&name).join("console.log");
    let booted = wait_until(SOON, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("tiny: idle"))
    });
    let sock_exists = h.vm_dir(&name).join("api.sock").exists();
    let _ = child.kill();
    let _ = child.wait();
    assert!(booted, "the idle guest did not boot");
    assert!(!sock_exists, "--no-api made a socket");
}

/// Sends `raw` on a new connection; the response (None if closed without one) and whether
/// the server then closed the connection.
fn exchange(vm: &Ember, raw: &[u8]) -> (Resp, bool) {
    let mut c = vm.http();
    c.send(raw);
    let r = c
        .response()
        .unwrap_or_else(|| panic!("no answer to {:?}", String::from_utf8_lossy(raw)));
    (r, c.closed())
}

#[test]
fn malformed_requests_get_a_status_and_a_fault_message_and_the_server_goes_on() {
    let (h, k) = setup();
    let vm = Ember::tiny(&h, &k, "fc-bad", "idle");
    let big = format!(
        "PUT /machine-config HTTP/1.1\r\nContent-Length: 70000\r\n\r\n{}",
        "x".repeat(70000)
    );
    // (request, status, the exact fault message or a part of it, connection closed after)
    let cases: Vec<(Vec<u8>, u16, &str, bool)> = vec![
        (
            b"PUT /actions HTTP/1.1\r\nContent-Length: 16\r\n\r\n{\"action_type\": ".to_vec(),
            400,
            "An error occurred when deserializing the json body of a request: EOF while \
             parsing a value at line 1 column 16.",
            false,
        ),
        (
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: 43\r\n\r\n\
              {\"vcpu_count\":1,\"mem_size_mib\":128,\"foo\":1}"
                .to_vec(),
            400,
            "An error occurred when deserializing the json body of a request: unknown field \
             `foo`, expected one of `vcpu_count`, `mem_size_mib`, `smt`, `cpu_template`, \
             `track_dirty_pages`, `huge_pages` at line 1 column 40.",
            false,
        ),
        (
            b"GET /nonexistent HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "Invalid request method and/or path: GET nonexistent.",
            false,
        ),
        (
            b"GET /vm HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "Invalid request method and/or path: GET vm.",
            false,
        ),
        (
            b"DELETE /machine-config HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "Invalid request method and/or path: DELETE machine-config.",
            false,
        ),
        (
            b"GET / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            400,
            "GET request cannot have a body.",
            false,
        ),
        (
            // No Content-Length: no body, as Firecracker reads it.
            b"PUT /machine-config HTTP/1.1\r\nContent-Type: application/json\r\n\r\n".to_vec(),
            400,
            "Empty PUT request.",
            false,
        ),
        (big.into_bytes(), 413, "larger than", true),
        (
            b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            411,
            "Content-Length",
            true,
        ),
        (b"GET / HTTP/2.0\r\n\r\n".to_vec(), 505, "HTTP/2.0", true),
        (b"GARBAGE\r\n\r\n".to_vec(), 400, "GARBAGE", true),
        (
            b"\x00\x01\x02\xff\xfe binary \x7f\r\n\r\n".to_vec(),
            400,
            "not UTF-8",
            true,
        ),
        (
            b"GET / HTTP/1.1\r\nNoColonHere\r\n\r\n".to_vec(),
            400,
            "NoColonHere",
            true,
        ),
    ];
    for (raw, status, text, closes) in cases {
        let shown = String::from_utf8_lossy(&raw[..raw.len().min(60)]).into_owned();

        let (r, closed) = exchange(&vm, &raw);

        assert_eq!(r.status, status, "{shown:?}: {r:?}");
        let fault = r.fault();
        if closes {
            assert!(fault.contains(text), "{shown:?}: {fault}");
        } else {
            assert_eq!(fault, text, "{shown:?}");
        }
        assert_eq!(closed, closes, "{shown:?}: connection closed?");
        assert_eq!(
            r.head.contains("Connection: close"),
            closes,
            "{shown:?}: {r:?}"
        );
        assert_eq!(vm.state(), "Running", "after {shown:?}");
    }
}

#[test]
fn requests_in_pieces_and_pipelined_requests_are_answered_in_order() {
    let (h, k) = setup();
    let vm = Ember::tiny(&h, &k, "fc-pieces", "idle");

    let mut c = vm.http();
    let raw = go_request(
        "PATCH",
        "/vm",
        Some(&serde_json::json!({"state": "Resumed"})),
    );
    for b in &raw {
        c.send(std::slice::from_ref(b));
        std::thread::sleep(Duration::from_millis(1));
    }
    let pieces = c.response().expect("an answer");
    c.send(
        b"GET /version HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n\
          GET /nonexistent HTTP/1.1\r\n\r\nGET /machine-config HTTP/1.1\r\n\r\n",
    );
    let answers: Vec<Resp> = (0..4).map(|_| c.response().expect("an answer")).collect();

    assert_eq!(pieces.status, 204, "{pieces:?}");
    let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 400, 200]);
    assert_eq!(answers[0].json()["firecracker_version"], "1.16.1");
    assert_eq!(answers[1].json()["state"], "Running");
    assert!(answers[2].fault().contains("nonexistent"));
    assert_eq!(answers[3].json()["mem_size_mib"], 16);
    assert!(!c.closed_within(Duration::from_millis(200)));
}

#[test]
fn connections_past_the_cap_get_503_and_the_vm_runs_on() {
    let (h, k) = setup();
    let mut vm = Ember::tiny(&h, &k, "fc-many", "count");
    console_shows(&h, &vm.name, "tick 1\n");

    let mut conns: Vec<Http> = (0..40).map(|_| vm.http()).collect();
    let started = Instant::now();
    let mut ok = 0;
    let mut busy = 0;
    for c in &mut conns {
        // A refused connection may be closed already (EPIPE): its 503 is still there to read.
        let _ = c.s.write_all(b"GET / HTTP/1.1\r\n\r\n");
    }
    for c in &mut conns {
        let r = c.response().expect("an answer");
        match r.status {
            200 => ok += 1,
            503 => {
                assert!(r.fault().contains("too many"), "{r:?}");
                assert!(c.closed(), "a refused connection is closed");
                busy += 1;
            }
            other => panic!("status {other}: {r:?}"),
        }
    }

    assert_eq!((ok, busy), (32, 8));
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(conns);
    assert!(vm.running());
    assert_eq!(vm.state(), "Running");
    let last = h.console_log(&vm.name).matches("tick ").count();
    console_shows(&h, &vm.name, &format!("tick {}\n", last + 2));
}

#[test]
fn a_silent_client_or_a_half_sent_request_blocks_nobody() {
    let (h, k) = setup();
    let vm = Ember::tiny(&h, &k, "fc-silent", "idle");
    let _silent = vm.http();
    let mut half = vm.http();
    half.send(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu");

    let started = Instant::now();
    let state = vm.state();

    assert_eq!(state, "Running");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_client_that_never_reads_its_answers_blocks_nobody_and_holds_bounded_memory() {
    let (h, k) = setup();
    let vm = Ember::tiny(&h, &k, "fc-deaf", "idle");
    let pid = vm.child.id();
    let rss_before = rss_kib(pid);
    let flood = UnixStream::connect(&vm.sock).unwrap();
    flood.set_nonblocking(true).unwrap();
    let requests = b"GET / HTTP/1.1\r\n\r\n".repeat(1000);

    // Pipelined requests, answers never read, for two seconds; others are served meanwhile.
    let mut sent = 0usize;
    let mut served = 0;
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        match (&flood).write(&requests) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let t = Instant::now();
                assert_eq!(vm.state(), "Running");
                assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
                served += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    }
    let grown = rss_kib(pid).saturating_sub(rss_before);

    assert!(served > 5, "only {served} requests of others were answered");
    // Socket buffers plus ember's bounded buffers: well under the 2 s of flooding.
    assert!(
        sent < 4 << 20,
        "ember took {sent} bytes from a client that reads nothing"
    );
    assert!(grown < 16 << 10, "ember grew by {grown} KiB");
    drop(flood);
    assert_eq!(vm.state(), "Running");
}
