//! A small HTTP/1.1 request parser and response writer for the control socket.
//!
//! Everything on the socket is hostile: the parser is incremental (bytes arrive in any
//! pieces), bounded (request head and body sizes), never panics, and answers malformed
//! input with a status code rather than a hang. No chunked bodies, no multi-line headers.

use std::fmt::Write as _;

/// Longest request line plus headers.
pub const MAX_HEAD: usize = 8 << 10;
/// Largest body (Firecracker's limit is 50 KiB).
pub const MAX_BODY: usize = 64 << 10;

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, `PATCH`, ...
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body (empty without Content-Length).
    pub body: Vec<u8>,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

impl Request {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request cannot be parsed; each maps to a status code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Malformed request line or header.
    #[error("{0}")]
    BadRequest(String),
    /// Head or body too large.
    #[error("{0}")]
    TooLarge(String),
    /// Not HTTP/1.0 or 1.1.
    #[error("unsupported HTTP version '{0}'")]
    Version(String),
    /// A body without a length (chunked).
    #[error("a request body needs a Content-Length (chunked bodies are not supported)")]
    LengthRequired,
}

impl HttpError {
    /// The status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::TooLarge(_) => 413,
            HttpError::Version(_) => 505,
            HttpError::LengthRequired => 411,
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn token_ok(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

fn parse_request_line(line: &str) -> Result<(String, String, bool), HttpError> {
    let bad = || HttpError::BadRequest(format!("malformed request line '{}'", line.escape_debug()));
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if !token_ok(method) || !method.bytes().all(|b| b.is_ascii_uppercase()) || !token_ok(target) {
        return Err(bad());
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        v if v.starts_with("HTTP/") => return Err(HttpError::Version(v.into())),
        _ => return Err(bad()),
    };
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(bad());
    }
    Ok((method.to_string(), path.to_string(), http11))
}

fn parse_headers(lines: std::str::Split<'_, &str>) -> Result<Vec<(String, String)>, HttpError> {
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or_else(|| {
            HttpError::BadRequest(format!("malformed header '{}'", line.escape_debug()))
        })?;
        if !token_ok(name) {
            return Err(HttpError::BadRequest(format!(
                "malformed header name '{}'",
                name.escape_debug()
            )));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        if headers.len() > 64 {
            return Err(HttpError::TooLarge("more than 64 headers".into()));
        }
    }
    Ok(headers)
}

fn content_length(headers: &[(String, String)]) -> Result<usize, HttpError> {
    let mut lengths = headers.iter().filter(|(n, _)| n == "content-length");
    let len = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some((_, v)), None) => v
            .parse::<usize>()
            .map_err(|_| HttpError::BadRequest(format!("bad Content-Length '{v}'")))?,
        (Some(_), Some(_)) => {
            return Err(HttpError::BadRequest("two Content-Length headers".into()))
        }
    };
    if len > MAX_BODY {
        return Err(HttpError::TooLarge(format!(
            "a {len}-byte body is larger than the {MAX_BODY}-byte limit"
        )));
    }
    Ok(len)
}

/// Parses the first request in `buf`: `Ok(None)` when more bytes are needed, else the request
/// and how many bytes it used.
pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
    // Tolerate empty lines before a request line (RFC 9112 2.2).
    let skip = buf
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    let buf = &buf[skip..];
    // The empty lines count towards the head: an endless stream of them is refused too.
    let too_large = || HttpError::TooLarge("request head larger than 8 KiB".into());
    let Some(head_len) = find_head_end(buf) else {
        if skip + buf.len() > MAX_HEAD {
            return Err(too_large());
        }
        return Ok(None);
    };
    if skip + head_len > MAX_HEAD {
        return Err(too_large());
    }
    let head = std::str::from_utf8(&buf[..head_len - 4])
        .map_err(|_| HttpError::BadRequest("request head is not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let (method, path, http11) = parse_request_line(lines.next().unwrap_or_default())?;
    let headers = parse_headers(lines)?;
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    if find("transfer-encoding").is_some() {
        return Err(HttpError::LengthRequired);
    }
    let body_len = content_length(&headers)?;
    if buf.len() < head_len + body_len {
        return Ok(None);
    }
    let keep_alive = match find("connection").as_deref() {
        Some("close") => false,
        Some("keep-alive") => true,
        _ => http11,
    };
    let body = buf[head_len..head_len + body_len].to_vec();
    let request = Request {
        method,
        path,
        headers,
        body,
        keep_alive,
    };
    Ok(Some((request, skip + head_len + body_len)))
}

/// A response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<String>,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    /// A response with a JSON body.
    pub fn json(status: u16, body: String) -> Self {
        Response {
            status,
            body: Some(body),
            headers: Vec::new(),
        }
    }

    /// A response without a body.
    pub fn empty(status: u16) -> Self {
        Response {
            status,
            body: None,
            headers: Vec::new(),
        }
    }

    /// Firecracker's error body: `{"fault_message": "..."}`.
    pub fn fault(status: u16, message: &str) -> Self {
        let body = serde_json::json!({ "fault_message": message }).to_string();
        Response::json(status, body)
    }

    /// The bytes on the wire; `close` adds `Connection: close`.
    pub fn to_bytes(&self, close: bool) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        head.push_str("Server: Ember API\r\n");
        let _ = write!(
            head,
            "Connection: {}\r\n",
            if close { "close" } else { "keep-alive" }
        );
        for (n, v) in &self.headers {
            let _ = write!(head, "{n}: {v}\r\n");
        }
        match &self.body {
            Some(b) => {
                let _ = write!(
                    head,
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                );
                let mut out = head.into_bytes();
                out.extend_from_slice(b.as_bytes());
                out
            }
            None if self.status == 204 || self.status == 101 => {
                head.push_str("\r\n");
                head.into_bytes()
            }
            None => {
                head.push_str("Content-Length: 0\r\n\r\n");
                head.into_bytes()
            }
        }
    }
}

/// The reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// A parsed response (for the client side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedResponse {
    /// Status code.
    pub status: u16,
    /// Body text.
    pub body: String,
}

/// Parses the first response in `buf` (client side): `Ok(None)` when more bytes are needed.
pub fn parse_response(buf: &[u8]) -> Result<Option<(ParsedResponse, usize)>, HttpError> {
    let Some(head_len) = find_head_end(buf) else {
        if buf.len() > MAX_HEAD {
            return Err(HttpError::TooLarge(
                "response head larger than 8 KiB".into(),
            ));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_len - 4])
        .map_err(|_| HttpError::BadRequest("response head is not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| HttpError::BadRequest(format!("bad status line '{status_line}'")))?;
    let headers = parse_headers(lines)?;
    let len = if status == 101 {
        0
    } else {
        content_length(&headers)?
    };
    if buf.len() < head_len + len {
        return Ok(None);
    }
    let body = String::from_utf8_lossy(&buf[head_len..head_len + len]).into_owned();
    Ok(Some((ParsedResponse { status, body }, head_len + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(raw: &str) -> Result<Option<(Request, usize)>, HttpError> {
        parse(raw.as_bytes())
    }

    #[test]
    fn a_put_with_a_body_parses_whole_and_in_pieces() {
        let raw = "PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Type: \
                   application/json\r\nContent-Length: 17\r\n\r\n{\"vcpu_count\": 2}";
        let (req, used) = one(raw).unwrap().unwrap();
        assert_eq!(used, raw.len());
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/machine-config");
        assert_eq!(req.body, b"{\"vcpu_count\": 2}");
        assert!(req.keep_alive);
        assert_eq!(req.header("host"), Some("localhost"));
        for cut in 0..raw.len() {
            assert_eq!(parse(&raw.as_bytes()[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn pipelined_requests_are_taken_one_at_a_time() {
        let raw = b"GET / HTTP/1.1\r\n\r\nGET /version HTTP/1.0\r\n\r\n";
        let (a, used) = parse(raw).unwrap().unwrap();
        assert_eq!(a.path, "/");
        let (b, _) = parse(&raw[used..]).unwrap().unwrap();
        assert_eq!(b.path, "/version");
        assert!(!b.keep_alive, "HTTP/1.0 closes by default");
    }

    #[test]
    fn query_strings_are_dropped_from_the_path() {
        let (r, _) = one("GET /vm/config?x=1 HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.path, "/vm/config");
    }

    #[test]
    fn malformed_requests_get_their_status() {
        for (raw, status) in [
            ("GARBAGE\r\n\r\n", 400),
            ("GET / HTTP/1.1 extra\r\n\r\n", 400),
            ("get / HTTP/1.1\r\n\r\n", 400),
            ("GET noslash HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\n\r\n", 505),
            ("GET / FTP/1.0\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
            ("PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
            (
                "PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
                400,
            ),
            ("PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
            ("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        ] {
            let e = one(raw).unwrap_err();
            assert_eq!(e.status(), status, "{raw:?}: {e}");
        }
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(one(&huge).unwrap_err().status(), 413);
        assert_eq!(parse(&[0xff; 100]), Ok(None));

        assert!(parse(b"\xff\xfe\r\n\r\n").is_err());
    }

    #[test]
    fn blank_lines_before_a_request_count_towards_the_head_limit() {
        assert_eq!(parse(&[b'\n'; 100]), Ok(None));
        let (r, used) = one("\r\n\r\nGET / HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!((r.path.as_str(), used), ("/", 22));
        // An endless stream of them must not be buffered forever.
        let blank = "\r\n".repeat(MAX_HEAD);
        assert_eq!(one(&blank).unwrap_err().status(), 413);
        let late = format!("{}GET / HTTP/1.1\r\n\r\n", "\r\n".repeat(MAX_HEAD / 2));
        assert_eq!(one(&late).unwrap_err().status(), 413);
    }

    #[test]
    fn responses_round_trip_through_the_client_parser() {
        let r = Response::fault(400, "bad \"thing\"");
        let bytes = r.to_bytes(false);
        let (p, used) = parse_response(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(p.status, 400);
        let v: serde_json::Value = serde_json::from_str(&p.body).unwrap();
        assert_eq!(v["fault_message"], "bad \"thing\"");
        let e = Response::empty(204).to_bytes(true);
        let text = String::from_utf8(e.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert!(text.contains("Connection: close"));
        assert_eq!(parse_response(&e).unwrap().unwrap().0.status, 204);
    }
}
