//! The client side of the control socket, for the CLI verbs: one request, one response,
//! with a deadline; and the console attach that turns the connection into a byte stream.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::http::{self, ParsedResponse};

/// How long a request may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking to a VM.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be reached.
    #[error("cannot connect to {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The exchange failed.
    #[error("the API connection failed")]
    Io(#[source] io::Error),
    /// The answer is not HTTP.
    #[error("the VM answered with something that is not HTTP: {0}")]
    Protocol(String),
    /// The VM refused (4xx/5xx): its fault message.
    #[error("{message}")]
    Refused {
        /// Status code.
        status: u16,
        /// The fault message.
        message: String,
    },
}

fn connect(sock: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    let s = UnixStream::connect(sock).map_err(|source| ClientError::Connect {
        path: sock.to_path_buf(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(ClientError::Io)?;
    s.set_write_timeout(Some(timeout))
        .map_err(ClientError::Io)?;
    Ok(s)
}

fn request_bytes(method: &str, path: &str, body: Option<&str>, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (n, v) in extra {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    match body {
        Some(b) => {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ));
        }
        None => head.push_str("\r\n"),
    }
    head.into_bytes()
}

fn read_response(s: &mut UnixStream) -> Result<(ParsedResponse, Vec<u8>), ClientError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((resp, used)) =
            http::parse_response(&buf).map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            return Ok((resp, buf[used..].to_vec()));
        }
        let n = s.read(&mut chunk).map_err(ClientError::Io)?;
        if n == 0 {
            return Err(ClientError::Protocol("the connection closed early".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn check(resp: ParsedResponse) -> Result<ParsedResponse, ClientError> {
    if resp.status < 400 {
        return Ok(resp);
    }
    let message = serde_json::from_str::<serde_json::Value>(&resp.body)
        .ok()
        .and_then(|v| v["fault_message"].as_str().map(str::to_string))
        .unwrap_or_else(|| resp.body.clone());
    Err(ClientError::Refused {
        status: resp.status,
        message,
    })
}

/// Sends one request to the socket at `sock`; 4xx/5xx answers become [`ClientError::Refused`].
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<ParsedResponse, ClientError> {
    call_waiting(sock, method, path, body, TIMEOUT)
}

/// [`call`] for a request whose answer may take up to `timeout` (a detach waits for the
/// guest).
pub fn call_waiting(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<ParsedResponse, ClientError> {
    let mut s = connect(sock, timeout)?;
    s.write_all(&request_bytes(
        method,
        path,
        body,
        &[("Connection", "close")],
    ))
    .map_err(ClientError::Io)?;
    check(read_response(&mut s)?.0)
}

/// `GET` returning parsed JSON.
pub fn get_json(sock: &Path, path: &str) -> Result<serde_json::Value, ClientError> {
    let r = call(sock, "GET", path, None)?;
    serde_json::from_str(&r.body).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Asks for the console; on success the stream carries the console both ways, and the bytes
/// that came after the answer are returned too.
pub fn attach_console(sock: &Path, force: bool) -> Result<(UnixStream, Vec<u8>), ClientError> {
    let mut s = connect(sock, Duration::from_secs(10))?;
    let mut extra = vec![("Upgrade", "ember-console"), ("Connection", "Upgrade")];
    if force {
        extra.push(("X-Ember-Force", "1"));
    }
    s.write_all(&request_bytes("GET", "/ember/console", None, &extra))
        .map_err(ClientError::Io)?;
    let (resp, rest) = read_response(&mut s)?;
    if resp.status != 101 {
        check(resp)?;
        return Err(ClientError::Protocol(
            "the VM did not switch to the console".into(),
        ));
    }
    s.set_read_timeout(None).map_err(ClientError::Io)?;
    s.set_write_timeout(None).map_err(ClientError::Io)?;
    Ok((s, rest))
}
