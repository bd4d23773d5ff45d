use std::io::Cursor;
use std::os::unix::net::UnixStream;
use std::thread;

use super::*;

fn key(b: u8) -> AuthKey {
    AuthKey::new(vec![b; 32]).unwrap()
}

/// Both ends of a handshake over a socket pair.
fn pair(
    src_key: Option<AuthKey>,
    dst_key: Option<AuthKey>,
) -> (
    Result<Channel<UnixStream>, WireError>,
    Result<Channel<UnixStream>, WireError>,
) {
    let (a, b) = UnixStream::pair().unwrap();
    let dst = thread::spawn(move || accept(b, dst_key.as_ref()));
    let src = connect(a, src_key.as_ref());
    (src, dst.join().unwrap())
}

#[test]
fn messages_cross_in_order_with_and_without_a_key() {
    for k in [None, Some(key(7))] {
        let (src, dst) = pair(k.clone(), k.clone());
        let (mut src, mut dst) = (src.unwrap(), dst.unwrap());
        assert_eq!(src.authenticated(), k.is_some());
        src.send(Kind::Offer, &[b"{\"a\":", b"1}"]).unwrap();
        src.send(Kind::Go, &[]).unwrap();
        let mut buf = Vec::new();
        dst.expect(Kind::Offer, &mut buf).unwrap();
        assert_eq!(buf, b"{\"a\":1}");
        assert_eq!(dst.recv(&mut buf).unwrap(), Kind::Go);
        assert!(buf.is_empty());
        dst.send(Kind::Running, &[]).unwrap();
        src.expect(Kind::Running, &mut buf).unwrap();
        assert_eq!(src.bytes_out(), dst.bytes_in());
    }
}

#[test]
fn a_wrong_or_missing_key_is_refused_on_both_sides() {
    let (src, dst) = pair(Some(key(1)), Some(key(2)));
    assert!(
        matches!(src, Err(WireError::Auth(_))),
        "{src:?}",
        src = src.err()
    );
    assert!(matches!(dst, Err(WireError::Auth(_))));
    let (src, dst) = pair(None, Some(key(2)));
    let e = src.err().unwrap().to_string();
    assert!(e.contains("authenticated migrations only"), "{e}");
    assert!(dst.is_err());
    let (src, dst) = pair(Some(key(2)), None);
    let e = src.err().unwrap().to_string();
    assert!(e.contains("no --auth-key"), "{e}");
    assert!(dst.is_err());
}

#[test]
fn garbage_gets_a_readable_refusal_at_once() {
    let (mut a, b) = UnixStream::pair().unwrap();
    let dst = thread::spawn(move || accept(b, None));
    a.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let e = dst.join().unwrap().err().unwrap();
    assert!(matches!(e, WireError::NotEmber(_)), "{e}");
    let mut answer = Vec::new();
    a.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("EMBERMIG"), "{text}");
    assert!(
        text.contains("refused: not an Ember migration stream"),
        "{text}"
    );
}

#[test]
fn another_protocol_version_is_refused_with_both_versions() {
    let (mut a, b) = UnixStream::pair().unwrap();
    let dst = thread::spawn(move || accept(b, None));
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&9u32.to_le_bytes());
    hello.extend_from_slice(&[0u8; 4 + NONCE_LEN]);
    a.write_all(&hello).unwrap();
    assert!(matches!(dst.join().unwrap(), Err(WireError::Version(9))));
    let mut answer = Vec::new();
    a.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("version 1, the source 9"), "{text}");
}

/// An in-memory stream: reads from `input`, writes to `output`.
struct Mem {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Mem {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.input.read(b)
    }
}

impl Write for Mem {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for Mem {}

fn mem(input: Vec<u8>) -> Mem {
    Mem {
        input: Cursor::new(input),
        output: Vec::new(),
    }
}

/// The bytes a source sends for `msgs` under a session key made from `k`.
fn recorded(k: Option<AuthKey>, msgs: &[(Kind, Vec<u8>)]) -> Vec<u8> {
    let mut ch = Channel::new(mem(Vec::new()), Side::Source, k.map(|k| k.mac(b"s", b"n")));
    for (kind, p) in msgs {
        ch.send(*kind, &[p]).unwrap();
    }
    ch.stream.output
}

/// A destination reading `bytes` under the same session key.
fn reader(bytes: Vec<u8>, k: Option<AuthKey>) -> Channel<Mem> {
    Channel::new(mem(bytes), Side::Destination, k.map(|k| k.mac(b"s", b"n")))
}

fn read_all(ch: &mut Channel<Mem>) -> Result<Vec<Kind>, WireError> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while out.len() < 3 {
        out.push(ch.recv(&mut buf)?);
    }
    Ok(out)
}

fn three() -> Vec<(Kind, Vec<u8>)> {
    vec![
        (Kind::Offer, b"{}".to_vec()),
        (Kind::Iteration, vec![1; 16]),
        (Kind::Released, Vec::new()),
    ]
}

#[test]
fn every_flipped_or_cut_byte_is_an_error_never_a_message() {
    for k in [None, Some(key(3))] {
        let good = recorded(k.clone(), &three());
        assert_eq!(
            read_all(&mut reader(good.clone(), k.clone())).unwrap(),
            [Kind::Offer, Kind::Iteration, Kind::Released]
        );
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(
                read_all(&mut reader(bad, k.clone())).is_err(),
                "flip at {i}"
            );
        }
        for cut in 0..good.len() {
            assert!(read_all(&mut reader(good[..cut].to_vec(), k.clone())).is_err());
        }
    }
}

#[test]
fn with_a_key_a_replayed_or_reordered_message_is_refused() {
    let k = Some(key(5));
    let msgs = three();
    let good = recorded(k.clone(), &msgs);
    let first = recorded(k.clone(), &msgs[..1]).len();
    // The first message twice, then the rest: the second copy has the wrong sequence.
    let mut replay = good[..first].to_vec();
    replay.extend_from_slice(&good);
    let e = read_all(&mut reader(replay, k.clone())).unwrap_err();
    assert!(matches!(e, WireError::Auth(_)), "{e}");
    // Without a key only the CRC guards the stream: a replayed message passes (which is
    // why plain TCP is for trusted networks).
    let plain = recorded(None, &msgs);
    let mut replay = plain[..recorded(None, &msgs[..1]).len()].to_vec();
    replay.extend_from_slice(&plain);
    assert!(read_all(&mut reader(replay, None)).is_ok());
}

#[test]
fn lengths_beyond_a_kinds_limit_are_refused_before_reading() {
    let mut h = vec![Kind::Go as u8, 0, 0, 0];
    h.extend_from_slice(&1u32.to_le_bytes());
    let e = reader(h, None).recv(&mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("Go message of 1 bytes"), "{e}");
    let mut h = vec![Kind::State as u8, 0, 0, 0];
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(reader(h, None).recv(&mut Vec::new()).is_err());
    let e = reader(vec![99, 0, 0, 0, 0, 0, 0, 0], None)
        .recv(&mut Vec::new())
        .unwrap_err();
    assert!(e.to_string().contains("unknown message kind 99"), "{e}");
}

#[test]
fn short_keys_are_refused() {
    assert!(AuthKey::new(vec![1; MIN_KEY - 1]).is_err());
    assert!(AuthKey::new(vec![1; MIN_KEY]).is_ok());
}

#[test]
fn a_rate_limit_paces_sending() {
    let mut ch = Channel::new(mem(Vec::new()), Side::Source, None);
    ch.limit_rate(1 << 20);
    let t = Instant::now();
    let chunk = vec![0u8; 64 << 10];
    for _ in 0..4 {
        ch.send(Kind::Disk, &[&chunk]).unwrap();
    }
    // 256 KiB at 1 MiB/s: about 250 ms.
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
}
