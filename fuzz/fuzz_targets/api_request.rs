//! Any bytes as what a client sends on the API socket: the HTTP parser (`api::http::parse`)
//! and the router (`api::route`) must answer or wait for more, never panic, never claim
//! bytes that are not there, and never loop without consuming input.
//!
//! The first byte picks the mode:
//! - even: the rest is one buffer, parsed as the server parses a connection's input after
//!   one read: requests are taken one at a time until the parser wants more bytes or fails;
//! - odd: the rest is a stream fed in pieces, as many small reads would deliver it: each
//!   piece's length is the next byte (0 = 1), and after each piece every complete request is
//!   taken, as the server does.
#![no_main]

use ember::api::http::{self, Request, Response};
use ember::api::route;
use libfuzzer_sys::fuzz_target;

/// Routes `req` and checks the answer a refused request gets is well-formed HTTP.
fn answer(req: &Request) {
    let resp = match route(req) {
        Ok(_) => return,
        Err(resp) => resp,
    };
    check_response(&resp);
}

fn check_response(resp: &Response) {
    assert!((400..600).contains(&resp.status), "{}", resp.status);
    let bytes = resp.to_bytes(false);
    let (parsed, used) = http::parse_response(&bytes)
        .expect("our own response parses")
        .expect("our own response is complete");
    assert_eq!(used, bytes.len());
    assert_eq!(parsed.status, resp.status);
    let v: serde_json::Value = serde_json::from_str(&parsed.body).expect("fault body is JSON");
    assert!(v["fault_message"].is_string());
}

/// Takes every complete request from the front of `buf`; false when the parser refused it
/// (the server then closes the connection).
fn drain(buf: &mut Vec<u8>) -> bool {
    loop {
        match http::parse(buf) {
            Ok(None) => {
                // What the parser waits on is never more than one request may be, and past
                // the head limit only a declared body is waited for: the server's buffer
                // for a connection stays bounded.
                assert!(
                    buf.len() <= http::MAX_HEAD + http::MAX_BODY,
                    "{}",
                    buf.len()
                );
                if buf.len() > http::MAX_HEAD {
                    let text = String::from_utf8_lossy(buf).to_ascii_lowercase();
                    assert!(
                        text.contains("content-length:"),
                        "waits on {} bytes",
                        buf.len()
                    );
                }
                return true;
            }
            Ok(Some((req, used))) => {
                assert!(
                    used > 0 && used <= buf.len(),
                    "used {used} of {}",
                    buf.len()
                );
                assert!(req.body.len() <= http::MAX_BODY);
                answer(&req);
                buf.drain(..used);
            }
            Err(e) => {
                check_response(&Response::fault(e.status(), &e.to_string()));
                return false;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let mut buf = rest.to_vec();
        drain(&mut buf);
        return;
    }
    let mut buf = Vec::new();
    let mut input = rest;
    while let Some((&len, tail)) = input.split_first() {
        let take = usize::from(len.max(1)).min(tail.len());
        buf.extend_from_slice(&tail[..take]);
        input = &tail[take..];
        if !drain(&mut buf) {
            return;
        }
    }
});
