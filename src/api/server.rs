//! The control socket: an event-loop subscriber that accepts connections, parses requests
//! and queues them for the VMM, which answers between event-loop rounds. It never blocks:
//! sockets are non-blocking, buffers are bounded, connections are capped and idle ones are
//! closed, so a slow or hostile client cannot stall the VM. `GET /ember/console` with
//! `Upgrade: ember-console` hands the connection to the console hub as a raw byte stream.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::http::{self, HttpError, Request, Response};
use crate::console::{AttachError, ConsoleHub};

/// Most connections at once; more are refused with 503.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often idle connections are looked for.
const REAP_EVERY: Duration = Duration::from_secs(5);
/// Input buffered per connection, at most: enough for one whole request, so `parse` must
/// decide by then. A client sending more waits (its socket fills up).
const READ_CAP: usize = http::MAX_HEAD + http::MAX_BODY;
/// Answers waiting for a client that does not read them, at most (roughly: one answer may go
/// over): past this no more of its requests are taken, so a client that pipelines requests
/// and never reads the answers holds a bounded amount of memory.
const MAX_PENDING_OUT: usize = 64 << 10;

/// A connection's number.
pub type ConnId = u64;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket path is in use by a live server.
    #[error("{0}: another process listens on this socket")]
    InUse(String),
    /// Binding failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An eventfd or timerfd failed.
    #[error("cannot create the API server's event descriptors")]
    Fd(#[source] io::Error),
}

struct Conn {
    stream: UnixStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    /// A request of this connection is with the VMM.
    busy: bool,
    close_after_write: bool,
    /// The client shut its sending side (EOF read).
    eof: bool,
    /// The events watched on the socket.
    watching: EventSet,
    last_active: Instant,
}

/// The API server.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    conns: HashMap<ConnId, Conn>,
    by_fd: HashMap<RawFd, ConnId>,
    next_id: ConnId,
    inbox: VecDeque<(ConnId, Request)>,
    /// Written by [`ApiServer::respond`] so the loop flushes outside `process`.
    poke: EventFd,
    reaper: TimerFd,
    console: Option<Arc<ConsoleHub>>,
}

/// Binds `path`, replacing a stale socket (nobody answers on it) but never a live one.
fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let shown = || path.display().to_string();
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(shown()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: shown(),
        source,
    })?;
    let chmod = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    let nonblocking = listener.set_nonblocking(true);
    chmod.and(nonblocking).map_err(|source| ServerError::Bind {
        path: shown(),
        source,
    })?;
    Ok(listener)
}

impl ApiServer {
    /// Listens on `path` (mode 0600); `console` serves console attach requests.
    pub fn bind(path: &Path, console: Option<Arc<ConsoleHub>>) -> Result<Self, ServerError> {
        let listener = bind(path)?;
        let errno = |e: vmm_sys_util::errno::Error| {
            ServerError::Fd(io::Error::from_raw_os_error(e.errno()))
        };
        let mut reaper = TimerFd::new().map_err(errno)?;
        reaper.reset(REAP_EVERY, Some(REAP_EVERY)).map_err(errno)?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            next_id: 1,
            inbox: VecDeque::new(),
            poke: EventFd::new(EFD_NONBLOCK).map_err(ServerError::Fd)?,
            reaper,
            console,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next request waiting for the VMM.
    pub fn next_request(&mut self) -> Option<(ConnId, Request)> {
        self.inbox.pop_front()
    }

    /// Answers the request of `conn` (gone connections are ignored).
    pub fn respond(&mut self, conn: ConnId, response: Response) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.busy = false;
            c.outbuf
                .extend_from_slice(&response.to_bytes(c.close_after_write));
            let _ = self.poke.write(1);
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("API: accept failed: {e}");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                let busy = Response::fault(503, "too many API connections; try again");
                let _ = (&stream).write(&busy.to_bytes(true));
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                log::warn!("API: cannot watch a connection: {e:?}");
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.by_fd.insert(stream.as_raw_fd(), id);
            self.conns.insert(
                id,
                Conn {
                    stream,
                    inbuf: Vec::new(),
                    outbuf: Vec::new(),
                    busy: false,
                    close_after_write: false,
                    eof: false,
                    watching: EventSet::IN,
                    last_active: Instant::now(),
                },
            );
        }
    }

    fn close(&mut self, id: ConnId, ops: &mut EventOps) {
        if let Some(c) = self.conns.remove(&id) {
            self.by_fd.remove(&c.stream.as_raw_fd());
            let _ = ops.remove(Events::empty(&c.stream));
        }
    }

    /// Reads what the client sent, up to [`READ_CAP`] buffered, until EOF (or an error:
    /// the same, nothing more will come).
    fn read(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut buf = [0u8; 4096];
        while !c.eof {
            let room = READ_CAP.saturating_sub(c.inbuf.len()).min(buf.len());
            if room == 0 {
                return; // parse() takes or refuses what is buffered first
            }
            match (&c.stream).read(&mut buf[..room]) {
                Ok(0) => c.eof = true,
                Ok(n) => {
                    c.last_active = Instant::now();
                    c.inbuf.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => c.eof = true,
            }
        }
    }

    /// Moves the next complete request of `id` to the inbox (one at a time per connection).
    /// Once the client has stopped sending and no complete request is left, the connection
    /// closes after its last answer.
    fn parse(&mut self, id: ConnId, ops: &mut EventOps) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.busy || c.close_after_write || c.outbuf.len() > MAX_PENDING_OUT {
            return;
        }
        match http::parse(&c.inbuf) {
            Ok(None) => c.close_after_write = c.eof,
            Ok(Some((req, used))) => {
                c.inbuf.drain(..used);
                c.close_after_write = !req.keep_alive;
                if is_console_upgrade(&req) {
                    self.hand_over_console(id, &req, ops);
                    return;
                }
                c.busy = true;
                self.inbox.push_back((id, req));
            }
            Err(e) => self.refuse(id, &e),
        }
    }

    fn refuse(&mut self, id: ConnId, e: &HttpError) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.inbuf.clear();
            c.close_after_write = true;
            c.outbuf
                .extend_from_slice(&Response::fault(e.status(), &e.to_string()).to_bytes(true));
        }
    }

    /// Gives the connection to the console hub after a 101 answer (or answers 409/503).
    fn hand_over_console(&mut self, id: ConnId, req: &Request, ops: &mut EventOps) {
        let force = req.header("x-ember-force") == Some("1");
        let Some(hub) = self.console.clone() else {
            self.respond(
                id,
                Response::fault(503, "this VM has no console to attach to"),
            );
            return;
        };
        if hub.has_client() && !force {
            let msg = AttachError::Busy.to_string();
            self.respond(id, Response::fault(409, &msg));
            return;
        }
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut ok = Response::empty(101);
        ok.headers.push(("Upgrade", "ember-console".into()));
        let _ = c.stream.set_nonblocking(false);
        let _ = c.stream.set_write_timeout(Some(Duration::from_secs(1)));
        let written = (&c.stream).write_all(&ok.to_bytes(false));
        let _ = c.stream.set_write_timeout(None);
        let Some(c) = self.conns.remove(&id) else {
            return;
        };
        self.by_fd.remove(&c.stream.as_raw_fd());
        let _ = ops.remove(Events::empty(&c.stream));
        if written.is_ok() {
            if let Err(e) = hub.attach(c.stream, force) {
                log::debug!("console attach lost a race: {e}");
            }
        }
    }

    /// Writes waiting output; closes connections that asked for it once written.
    fn flush(&mut self, id: ConnId, ops: &mut EventOps) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        while !c.outbuf.is_empty() {
            match (&c.stream).write(&c.outbuf) {
                Ok(0) => break,
                Ok(n) => {
                    c.outbuf.drain(..n);
                    c.last_active = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(id, ops);
                    return;
                }
            }
        }
        if c.outbuf.is_empty() && c.close_after_write && !c.busy {
            self.close(id, ops);
            return;
        }
        // Input is watched while there is room for it; output while some waits.
        let mut want = EventSet::empty();
        if !c.eof && c.inbuf.len() < READ_CAP {
            want |= EventSet::IN;
        }
        if !c.outbuf.is_empty() {
            want |= EventSet::OUT;
        }
        if want != c.watching {
            c.watching = want;
            let _ = ops.modify(Events::new(&c.stream, want));
        }
    }

    fn flush_all(&mut self, ops: &mut EventOps) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.flush(id, ops);
            self.parse(id, ops);
            self.flush(id, ops);
        }
    }

    fn reap_idle(&mut self, ops: &mut EventOps) {
        let now = Instant::now();
        let idle: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.busy && now.duration_since(c.last_active) > IDLE_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.close(id, ops);
        }
    }
}

fn is_console_upgrade(req: &Request) -> bool {
    req.path == "/ember/console"
        && req
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("ember-console"))
}

impl Drop for ApiServer {
    /// Answers already given (`ember destroy`'s, say) still reach their clients.
    fn drop(&mut self) {
        for c in self.conns.values_mut().filter(|c| !c.outbuf.is_empty()) {
            let _ = c.stream.set_nonblocking(false);
            let _ = c.stream.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = (&c.stream).write_all(&c.outbuf);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        for e in [
            Events::new(&self.listener, EventSet::IN),
            Events::new(&self.poke, EventSet::IN),
            Events::new(&self.reaper, EventSet::IN),
        ] {
            if let Err(err) = ops.add(e) {
                log::error!("API: cannot watch the socket: {err:?}");
            }
        }
        // A server moved to a new event loop (a VM restart) watches its connections again.
        for c in self.conns.values() {
            if let Err(err) = ops.add(Events::new(&c.stream, c.watching)) {
                log::warn!("API: cannot watch a connection: {err:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if fd == self.poke.as_raw_fd() {
            let _ = self.poke.read();
            self.flush_all(ops);
        } else if fd == self.reaper.as_raw_fd() {
            let _ = self.reaper.wait();
            self.reap_idle(ops);
        } else if let Some(&id) = self.by_fd.get(&fd) {
            self.serve_connection(id, events.event_set(), ops);
        }
    }
}

impl ApiServer {
    /// Reads, takes the next request and writes what waits, for one ready connection.
    fn serve_connection(&mut self, id: ConnId, set: EventSet, ops: &mut EventOps) {
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.read(id);
        }
        self.flush(id, ops);
        self.parse(id, ops);
        self.flush(id, ops);
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // Hung up both ways: nobody can read an answer. A request already taken is
            // still carried out, its answer dropped.
            self.close(id, ops);
        }
    }
}

/// An [`ApiServer`] shared by the event loop and the VMM.
pub type SharedServer = Arc<Mutex<ApiServer>>;

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};

    type Loop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    fn server() -> (tempfile::TempDir, SharedServer, Loop) {
        let dir = tempfile::tempdir().unwrap();
        let server = Arc::new(Mutex::new(
            ApiServer::bind(&dir.path().join("api.sock"), None).unwrap(),
        ));
        let mut events: Loop = EventManager::new().unwrap();
        events.add_subscriber(server.clone());
        (dir, server, events)
    }

    /// One round of the VMM's loop: events, then every queued request answered.
    fn round(server: &SharedServer, events: &mut Loop) -> usize {
        events.run_with_timeout(10).unwrap();
        let mut s = server.lock().unwrap();
        let mut answered = 0;
        while let Some((conn, _)) = s.next_request() {
            s.respond(conn, Response::json(200, "{\"state\":\"Running\"}".into()));
            answered += 1;
        }
        answered
    }

    #[test]
    fn a_client_that_never_reads_holds_bounded_buffers_and_others_are_served() {
        let (dir, server, mut events) = server();
        let flood = UnixStream::connect(dir.path().join("api.sock")).unwrap();
        flood.set_nonblocking(true).unwrap();
        let requests = b"GET / HTTP/1.1\r\n\r\n".repeat(500);
        let mut sent = 0;
        for _ in 0..300 {
            if let Ok(n) = (&flood).write(&requests) {
                sent += n;
            }
            round(&server, &mut events);
        }
        let held: Vec<(usize, usize)> = server
            .lock()
            .unwrap()
            .conns
            .values()
            .map(|c| (c.inbuf.len(), c.outbuf.len()))
            .collect();

        assert_eq!(held.len(), 1);
        let (inbuf, outbuf) = held[0];
        assert!(inbuf <= READ_CAP, "{inbuf} bytes of input held");
        assert!(
            outbuf <= MAX_PENDING_OUT + 4096,
            "{outbuf} bytes of output held"
        );
        assert!(
            sent < 4 << 20,
            "took {sent} bytes from a client that reads nothing"
        );

        let mut other = UnixStream::connect(dir.path().join("api.sock")).unwrap();
        other.set_nonblocking(true).unwrap();
        other.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        for _ in 0..50 {
            round(&server, &mut events);
            let mut buf = [0u8; 256];
            if let Ok(n) = other.read(&mut buf) {
                answer.extend_from_slice(&buf[..n]);
                break;
            }
        }
        assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "{answer:?}");
    }

    #[test]
    fn a_client_that_half_closes_gets_every_pipelined_answer_then_eof() {
        let (dir, server, mut events) = server();
        let mut client = UnixStream::connect(dir.path().join("api.sock")).unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n")
            .unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        client.set_nonblocking(true).unwrap();
        let mut answers = Vec::new();
        let mut eof = false;
        for _ in 0..50 {
            round(&server, &mut events);
            let mut buf = [0u8; 4096];
            match client.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => answers.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }

        let text = String::from_utf8_lossy(&answers);
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
        assert!(eof, "the connection stays open after the last answer");
        assert!(server.lock().unwrap().conns.is_empty());
    }

    #[test]
    fn endless_blank_lines_are_refused_not_buffered() {
        let (dir, server, mut events) = server();
        let mut client = UnixStream::connect(dir.path().join("api.sock")).unwrap();
        client.set_nonblocking(true).unwrap();
        let blank = b"\r\n".repeat(4096);
        let mut answer = Vec::new();
        for _ in 0..50 {
            let _ = client.write(&blank);
            round(&server, &mut events);
            let mut buf = [0u8; 512];
            match client.read(&mut buf) {
                Ok(n) if n > 0 => answer.extend_from_slice(&buf[..n]),
                _ => {}
            }
        }
        assert!(
            answer.starts_with(b"HTTP/1.1 413 Payload Too Large\r\n"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
}
