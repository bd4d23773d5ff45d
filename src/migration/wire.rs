//! The migration stream: a handshake, then framed messages.
//!
//! **Handshake.** The source sends `EMBERMIG`, the protocol version, flags (bit 0: it
//! authenticates) and a 32-byte random nonce. The destination answers with `EMBERMIG`, its
//! version, a status (0 accepted, 1 refused), its own nonce and a reason (UTF-8, empty when
//! accepted). A stream whose first bytes are not `EMBERMIG` is answered with a refusal at
//! once, whatever else it holds. With a shared key (`--auth-key`) both sides then prove
//! they hold it: the source sends HMAC-SHA256(key, "ember-migration source" | nonces), the
//! destination checks it and answers with a status, its own proof (with "destination") and
//! a reason. Fresh nonces on both sides make an old conversation useless to replay.
//!
//! **Messages.** Each is a header (kind: 1 byte, 3 reserved zero bytes, payload length:
//! u32 LE), the payload, a CRC-32 of header and payload, and when authenticated an
//! HMAC-SHA256 of the direction, the message's sequence number, header and payload under a
//! session key derived from the shared key and both nonces. Lengths are bounded per kind;
//! any unknown kind, reserved bit, bad checksum, bad MAC, replayed, reordered or cut message
//! ends the migration with an error that says so.
//!
//! The MAC makes the stream tamper-evident for whoever lacks the key; nothing is encrypted:
//! guest memory crosses the network readable by anyone who can see the traffic.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The first bytes of a migration stream (and of the destination's answer).
pub const MAGIC: &[u8; 8] = b"EMBERMIG";
/// The protocol version this Ember speaks.
pub const VERSION: u32 = 1;
/// Guest page size on the wire.
pub const PAGE: usize = 4096;
/// Most pages in one `Pages` message.
pub const PAGES_PER_MESSAGE: usize = 256;
/// Most disk bytes in one `Disk` message.
pub const DISK_CHUNK: usize = 1 << 20;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a MAC.
const MAC_LEN: usize = 32;
/// Bytes of a message header.
const HEADER_LEN: usize = 8;
/// Longest reason in a refusal.
const MAX_REASON: usize = 4096;
/// Bytes of the fixed part of the source's hello.
const HELLO_LEN: usize = 8 + 4 + 4 + NONCE_LEN;
/// Hello flag: the source authenticates.
const FLAG_AUTH: u32 = 1;
/// Bytes in the header of a `Pages`, `Zero` or `Disk` payload.
pub const RANGE_HEADER: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// Why the stream failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed.
    #[error("the connection failed while {0}")]
    Io(&'static str, #[source] io::Error),
    /// The peer closed the connection.
    #[error("the peer closed the connection while {0}")]
    Closed(&'static str),
    /// The peer does not speak this protocol.
    #[error("not an Ember migration stream ({0})")]
    NotEmber(String),
    /// Another protocol version.
    #[error("the peer speaks migration protocol version {0}; this Ember speaks version {VERSION}")]
    Version(u32),
    /// The peer refused.
    #[error("refused by the peer: {0}")]
    Refused(String),
    /// Authentication failed.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// A message is malformed or damaged.
    #[error("corrupt migration stream: {0}")]
    Corrupt(String),
}

/// A message kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source: what VM comes (JSON [`super::Offer`]).
    Offer = 1,
    /// Destination: it can take it.
    Accept = 2,
    /// Either side: no (UTF-8 reason); the migration ends.
    Refuse = 3,
    /// Source: guest pages (range header, then the pages).
    Pages = 4,
    /// Source: guest pages that are now all zeroes (range header).
    Zero = 5,
    /// Source: bytes of a copied disk (range header, then the bytes).
    Disk = 6,
    /// Source: one pass over memory ended (iteration, bytes left; u64 LE each).
    Iteration = 7,
    /// Source: the VM's state (JSON snapshot state), after the last pages.
    State = 8,
    /// Destination: it has everything and checked it.
    StateOk = 9,
    /// Source: its disks are closed; the destination may open them.
    Released = 10,
    /// Destination: the VM is built and its disks open, waiting for `Go`.
    Ready = 11,
    /// Source: run the VM; the source has ended its copy.
    Go = 12,
    /// Destination: the VM runs.
    Running = 13,
    /// Source (`--verify`): a CRC-32 per MiB of guest memory at the stop (u32 LE each).
    Verify = 14,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        use Kind::*;
        Some(match b {
            1 => Offer,
            2 => Accept,
            3 => Refuse,
            4 => Pages,
            5 => Zero,
            6 => Disk,
            7 => Iteration,
            8 => State,
            9 => StateOk,
            10 => Released,
            11 => Ready,
            12 => Go,
            13 => Running,
            14 => Verify,
            _ => return None,
        })
    }

    /// The longest payload a message of this kind may have.
    fn max_len(self) -> usize {
        match self {
            Kind::Offer => 1 << 20,
            Kind::Refuse => MAX_REASON,
            Kind::Pages => RANGE_HEADER + PAGES_PER_MESSAGE * PAGE,
            Kind::Zero => RANGE_HEADER,
            Kind::Disk => RANGE_HEADER + DISK_CHUNK,
            Kind::Iteration => 16,
            Kind::State => crate::snapshot::format::MAX_PAYLOAD as usize,
            Kind::Verify => 4 << 20,
            Kind::Accept
            | Kind::StateOk
            | Kind::Released
            | Kind::Ready
            | Kind::Go
            | Kind::Running => 0,
        }
    }
}

/// Which end of the stream this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The VM's current host.
    Source,
    /// Where it goes.
    Destination,
}

impl Side {
    fn byte(self) -> u8 {
        match self {
            Side::Source => b'S',
            Side::Destination => b'D',
        }
    }

    fn other(self) -> Self {
        match self {
            Side::Source => Side::Destination,
            Side::Destination => Side::Source,
        }
    }
}

/// A shared secret (`--auth-key FILE`).
#[derive(Clone)]
pub struct AuthKey(Vec<u8>);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthKey({} bytes)", self.0.len())
    }
}

/// Fewest bytes in a key file.
pub const MIN_KEY: usize = 16;

impl AuthKey {
    /// The key in `bytes` (a key file's contents; at least [`MIN_KEY`] bytes).
    pub fn new(bytes: Vec<u8>) -> Result<Self, String> {
        if bytes.len() < MIN_KEY {
            return Err(format!(
                "the key has {} bytes; give at least {MIN_KEY} (e.g. head -c 32 /dev/urandom)",
                bytes.len()
            ));
        }
        Ok(AuthKey(bytes))
    }

    /// Reads a key file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::new(bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn mac(&self, label: &[u8], nonces: &[u8]) -> [u8; MAC_LEN] {
        hmac(&self.0, &[label, nonces])
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    // HMAC takes keys of any length.
    let Ok(mut m) = HmacSha256::new_from_slice(key) else {
        return [0; MAC_LEN];
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Compares MACs in constant time.
fn same_mac(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Random bytes from the kernel.
pub fn random_nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    let mut got = 0;
    while got < n.len() {
        // SAFETY: getrandom writes at most `len` bytes into the buffer we own.
        let r = unsafe { libc::getrandom(n[got..].as_mut_ptr().cast(), n.len() - got, 0) };
        if r > 0 {
            got += r as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // No entropy source at all: fall back to the clock (handshakes still differ).
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
                ^ u128::from(std::process::id());
            n[..16].copy_from_slice(&t.to_le_bytes());
            break;
        }
    }
    n
}

/// A byte stream the protocol runs on.
pub trait Stream: Read + Write {
    /// After a refusal was written: lets the peer read it. A socket closed with unread
    /// input is reset, and a reset can discard what the peer had not read yet; so stop
    /// writing and swallow what the peer still sends, briefly.
    fn linger(&mut self) {}
}

/// Swallows input for at most `limit` or until the peer closes.
fn drain(s: &mut impl Read, set_timeout: impl FnOnce(Duration)) {
    set_timeout(Duration::from_millis(100));
    let end = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

impl Stream for std::net::TcpStream {
    fn linger(&mut self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
        let me = self.try_clone();
        drain(self, |t| {
            if let Ok(m) = me {
                let _ = m.set_read_timeout(Some(t));
            }
        });
    }
}

impl Stream for std::os::unix::net::UnixStream {
    fn linger(&mut self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
        let me = self.try_clone();
        drain(self, |t| {
            if let Ok(m) = me {
                let _ = m.set_read_timeout(Some(t));
            }
        });
    }
}

/// Sends at most a given number of bytes per second.
struct Pacer {
    rate: u64,
    start: Instant,
    sent: u64,
}

impl Pacer {
    fn account(&mut self, bytes: usize) {
        self.sent += bytes as u64;
        let due = Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// One end of an established migration stream.
pub struct Channel<S> {
    stream: S,
    side: Side,
    key: Option<[u8; MAC_LEN]>,
    sent: u64,
    received: u64,
    bytes_out: u64,
    bytes_in: u64,
    pacer: Option<Pacer>,
    out: Vec<u8>,
}

fn read_exact<S: Read>(s: &mut S, buf: &mut [u8], what: &'static str) -> Result<(), WireError> {
    s.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => WireError::Closed(what),
        _ => WireError::Io(what, e),
    })
}

fn write_all<S: Write>(s: &mut S, buf: &[u8], what: &'static str) -> Result<(), WireError> {
    s.write_all(buf)
        .and_then(|()| s.flush())
        .map_err(|e| WireError::Io(what, e))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// A u64 at `at` of `b` (which the caller made long enough).
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The destination's answer to a hello: magic, version, status, nonce, reason.
fn hello_reply(status: u32, nonce: &[u8; NONCE_LEN], reason: &str) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
    let mut r = Vec::with_capacity(HELLO_LEN + 4 + reason.len());
    r.extend_from_slice(MAGIC);
    r.extend_from_slice(&VERSION.to_le_bytes());
    r.extend_from_slice(&status.to_le_bytes());
    r.extend_from_slice(nonce);
    r.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    r.extend_from_slice(reason);
    r
}

/// Reads a status, the fixed bytes after it, and a reason.
fn read_status<S: Read>(s: &mut S, fixed: &mut [u8]) -> Result<(u32, String), WireError> {
    let mut st = [0u8; 4];
    read_exact(s, &mut st, "reading the answer")?;
    read_exact(s, fixed, "reading the answer")?;
    let mut len = [0u8; 4];
    read_exact(s, &mut len, "reading the answer")?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_REASON {
        return Err(WireError::Corrupt(format!("a {len}-byte reason")));
    }
    let mut reason = vec![0u8; len];
    read_exact(s, &mut reason, "reading the answer")?;
    Ok((
        u32::from_le_bytes(st),
        String::from_utf8_lossy(&reason).into_owned(),
    ))
}

/// The source's side of the handshake.
pub fn connect<S: Stream>(mut stream: S, key: Option<&AuthKey>) -> Result<Channel<S>, WireError> {
    let ours = random_nonce();
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    let flags = if key.is_some() { FLAG_AUTH } else { 0 };
    hello.extend_from_slice(&flags.to_le_bytes());
    hello.extend_from_slice(&ours);
    write_all(&mut stream, &hello, "sending the hello")?;
    let mut head = [0u8; 12];
    read_exact(&mut stream, &mut head, "reading the destination's hello")?;
    if &head[..8] != MAGIC {
        return Err(WireError::NotEmber(
            "the destination's answer does not start with EMBERMIG".into(),
        ));
    }
    let mut theirs = [0u8; NONCE_LEN];
    let (status, reason) = read_status(&mut stream, &mut theirs)?;
    if status != 0 {
        return Err(WireError::Refused(reason));
    }
    let version = u32_at(&head, 8);
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let nonces = [ours, theirs].concat();
    let session = match key {
        Some(k) => Some(prove_source(&mut stream, k, &nonces)?),
        None => None,
    };
    Ok(Channel::new(stream, Side::Source, session))
}

fn prove_source<S: Stream>(
    stream: &mut S,
    key: &AuthKey,
    nonces: &[u8],
) -> Result<[u8; MAC_LEN], WireError> {
    write_all(
        stream,
        &key.mac(b"ember-migration source", nonces),
        "sending the key proof",
    )?;
    let mut proof = [0u8; MAC_LEN];
    let (status, reason) = read_status(stream, &mut proof)?;
    if status != 0 {
        return Err(WireError::Auth(reason));
    }
    if !same_mac(&proof, &key.mac(b"ember-migration destination", nonces)) {
        return Err(WireError::Auth(
            "the destination does not hold the same key".into(),
        ));
    }
    Ok(key.mac(b"ember-migration session", nonces))
}

/// Reads the first bytes and refuses at the first one that is not the magic.
fn read_magic<S: Read>(stream: &mut S) -> Result<(), String> {
    let mut got = [0u8; 8];
    let mut n = 0;
    while n < MAGIC.len() {
        match stream.read(&mut got[n..]) {
            Ok(0) => return Err(format!("the stream ended after {n} bytes")),
            Ok(k) => {
                let end = n + k;
                if got[n..end] != MAGIC[n..end] {
                    return Err("the first bytes are not EMBERMIG".into());
                }
                n = end;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("nothing usable came: {e}")),
        }
    }
    Ok(())
}

/// The destination's side of the handshake. A peer that is not an Ember source of this
/// version, or whose authentication does not match `key`, is told why and refused.
pub fn accept<S: Stream>(mut stream: S, key: Option<&AuthKey>) -> Result<Channel<S>, WireError> {
    let ours = random_nonce();
    if let Err(why) = read_magic(&mut stream) {
        let text = format!("refused: not an Ember migration stream ({why})");
        let _ = write_all(&mut stream, &hello_reply(1, &ours, &text), "refusing");
        stream.linger();
        return Err(WireError::NotEmber(why));
    }
    let mut rest = [0u8; HELLO_LEN - 8];
    read_exact(&mut stream, &mut rest, "reading the hello")?;
    let version = u32_at(&rest, 0);
    let flags = u32_at(&rest, 4);
    let refuse = |stream: &mut S, text: String, err: WireError| {
        let _ = write_all(stream, &hello_reply(1, &ours, &text), "refusing");
        stream.linger();
        Err(err)
    };
    if version != VERSION {
        let text = format!("refused: this destination speaks migration protocol version {VERSION}, the source {version}");
        return refuse(&mut stream, text, WireError::Version(version));
    }
    let wants_auth = flags & FLAG_AUTH != 0;
    match (key, wants_auth) {
        (Some(_), false) => {
            let text = "refused: this destination takes authenticated migrations only; give \
                        the source the same --auth-key"
                .to_string();
            return refuse(&mut stream, text.clone(), WireError::Auth(text));
        }
        (None, true) => {
            let text = "refused: the source authenticates but this destination has no \
                        --auth-key"
                .to_string();
            return refuse(&mut stream, text.clone(), WireError::Auth(text));
        }
        _ => {}
    }
    if flags & !FLAG_AUTH != 0 {
        let text = format!("refused: unknown hello flags {flags:#x}");
        return refuse(&mut stream, text.clone(), WireError::Corrupt(text));
    }
    write_all(
        &mut stream,
        &hello_reply(0, &ours, ""),
        "answering the hello",
    )?;
    let nonces = [&rest[8..8 + NONCE_LEN], &ours[..]].concat();
    let session = match key {
        Some(k) => Some(check_source_proof(&mut stream, k, &nonces)?),
        None => None,
    };
    Ok(Channel::new(stream, Side::Destination, session))
}

fn check_source_proof<S: Stream>(
    stream: &mut S,
    key: &AuthKey,
    nonces: &[u8],
) -> Result<[u8; MAC_LEN], WireError> {
    let mut proof = [0u8; MAC_LEN];
    read_exact(stream, &mut proof, "reading the key proof")?;
    let mut answer = Vec::with_capacity(8 + MAC_LEN);
    if !same_mac(&proof, &key.mac(b"ember-migration source", nonces)) {
        let text = "the source does not hold the same key";
        answer.extend_from_slice(&1u32.to_le_bytes());
        answer.extend_from_slice(&[0u8; MAC_LEN]);
        answer.extend_from_slice(&(text.len() as u32).to_le_bytes());
        answer.extend_from_slice(text.as_bytes());
        let _ = write_all(stream, &answer, "refusing");
        stream.linger();
        return Err(WireError::Auth(text.into()));
    }
    answer.extend_from_slice(&0u32.to_le_bytes());
    answer.extend_from_slice(&key.mac(b"ember-migration destination", nonces));
    answer.extend_from_slice(&0u32.to_le_bytes());
    write_all(stream, &answer, "sending the key proof")?;
    Ok(key.mac(b"ember-migration session", nonces))
}

impl<S: Stream> Channel<S> {
    fn new(stream: S, side: Side, key: Option<[u8; MAC_LEN]>) -> Self {
        Channel {
            stream,
            side,
            key,
            sent: 0,
            received: 0,
            bytes_out: 0,
            bytes_in: 0,
            pacer: None,
            out: Vec::new(),
        }
    }

    /// Limits what is sent to `bytes_per_sec` from now on.
    pub fn limit_rate(&mut self, bytes_per_sec: u64) {
        self.pacer = Some(Pacer {
            rate: bytes_per_sec.max(1),
            start: Instant::now(),
            sent: 0,
        });
    }

    /// Bytes sent so far (frames included).
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out
    }

    /// Bytes received so far.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in
    }

    /// Whether messages carry MACs.
    pub fn authenticated(&self) -> bool {
        self.key.is_some()
    }

    /// The stream (to set timeouts).
    pub fn stream(&self) -> &S {
        &self.stream
    }

    fn mac(&self, from: Side, seq: u64, header: &[u8], payload: &[&[u8]]) -> Option<[u8; 32]> {
        let key = self.key.as_ref()?;
        let dir = [from.byte()];
        let seq = seq.to_le_bytes();
        let mut parts: Vec<&[u8]> = vec![&dir, &seq, header];
        parts.extend_from_slice(payload);
        Some(hmac(key, &parts))
    }

    /// Sends a message whose payload is the concatenation of `parts`.
    pub fn send(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), WireError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > kind.max_len() {
            return Err(WireError::Corrupt(format!(
                "a {len}-byte {kind:?} message is too long to send"
            )));
        }
        let mut header = [0u8; HEADER_LEN];
        header[0] = kind as u8;
        header[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        parts.iter().for_each(|p| crc.update(p));
        let mac = self.mac(self.side, self.sent, &header, parts);
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        out.extend_from_slice(&header);
        parts.iter().for_each(|p| out.extend_from_slice(p));
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        if let Some(m) = mac {
            out.extend_from_slice(&m);
        }
        let r = write_all(&mut self.stream, &out, "sending");
        self.bytes_out += out.len() as u64;
        let n = out.len();
        self.out = out;
        r?;
        self.sent += 1;
        if let Some(p) = &mut self.pacer {
            p.account(n);
        }
        Ok(())
    }

    /// Receives the next message into `payload`; returns its kind.
    pub fn recv(&mut self, payload: &mut Vec<u8>) -> Result<Kind, WireError> {
        let mut header = [0u8; HEADER_LEN];
        read_exact(&mut self.stream, &mut header, "waiting for a message")?;
        let kind = Kind::from_byte(header[0])
            .ok_or_else(|| WireError::Corrupt(format!("unknown message kind {}", header[0])))?;
        if header[1..4] != [0, 0, 0] {
            return Err(WireError::Corrupt("reserved header bytes are set".into()));
        }
        let len = u32_at(&header, 4) as usize;
        if len > kind.max_len() {
            return Err(WireError::Corrupt(format!(
                "a {kind:?} message of {len} bytes (at most {})",
                kind.max_len()
            )));
        }
        payload.clear();
        payload.resize(len, 0);
        read_exact(&mut self.stream, payload, "reading a message")?;
        let mut trailer = [0u8; 4 + MAC_LEN];
        let tlen = if self.key.is_some() { 4 + MAC_LEN } else { 4 };
        read_exact(&mut self.stream, &mut trailer[..tlen], "reading a message")?;
        self.bytes_in += (HEADER_LEN + len + tlen) as u64;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.update(payload);
        if crc.finalize() != u32_at(&trailer, 0) {
            return Err(WireError::Corrupt(format!(
                "the checksum of a {kind:?} message does not match"
            )));
        }
        let from = self.side.other();
        if let Some(want) = self.mac(from, self.received, &header, &[payload]) {
            if !same_mac(&want, &trailer[4..4 + MAC_LEN]) {
                return Err(WireError::Auth(format!(
                    "message {} ({kind:?}) does not carry the session's MAC (altered, \
                     replayed or out of order)",
                    self.received
                )));
            }
        }
        self.received += 1;
        Ok(kind)
    }

    /// Receives a message that must be of kind `want` (a `Refuse` becomes its error).
    pub fn expect(&mut self, want: Kind, payload: &mut Vec<u8>) -> Result<(), WireError> {
        match self.recv(payload)? {
            k if k == want => Ok(()),
            Kind::Refuse => Err(WireError::Refused(
                String::from_utf8_lossy(payload).into_owned(),
            )),
            other => Err(WireError::Corrupt(format!(
                "a {other:?} message where {want:?} belongs"
            ))),
        }
    }

    /// Sends a refusal (best effort: the migration ends anyway).
    pub fn refuse(&mut self, reason: &str) {
        let r = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
        if let Err(e) = self.send(Kind::Refuse, &[r]) {
            log::debug!("cannot tell the peer: {e}");
        }
        self.stream.linger();
    }
}

/// The header of a `Pages`, `Zero` or `Disk` payload: where (a guest address or disk
/// offset), how much (pages or bytes) and, for disks, which one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// Guest physical address or disk byte offset.
    pub at: u64,
    /// Pages (memory) or bytes (disk).
    pub count: u32,
    /// Disk index (0 for memory).
    pub disk: u32,
}

impl Range {
    /// Encoded.
    pub fn bytes(&self) -> [u8; RANGE_HEADER] {
        let mut b = [0u8; RANGE_HEADER];
        b[0..8].copy_from_slice(&self.at.to_le_bytes());
        b[8..12].copy_from_slice(&self.count.to_le_bytes());
        b[12..16].copy_from_slice(&self.disk.to_le_bytes());
        b
    }

    /// Decodes the header at the start of `payload`.
    pub fn parse(payload: &[u8]) -> Result<Self, WireError> {
        if payload.len() < RANGE_HEADER {
            return Err(WireError::Corrupt(format!(
                "a {}-byte range message",
                payload.len()
            )));
        }
        Ok(Range {
            at: u64_at(payload, 0),
            count: u32_at(payload, 8),
            disk: u32_at(payload, 12),
        })
    }
}

#[cfg(test)]
mod tests;
