//! The snapshot state file: a fixed header (magic, format version, payload length, CRC-32 of
//! the payload), then the state as JSON. A file is checked before any of it is believed: the
//! magic says whose it is, the version whether this Ember reads it, the length is bounded
//! and must match the file, the checksum catches flipped or cut bytes; only then is the
//! JSON parsed, and the parsed state is checked again by those who apply it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The first bytes of every Ember state file.
pub const MAGIC: &[u8; 8] = b"EMBERSNP";
/// The format version this Ember writes and reads.
pub const VERSION: u32 = 1;
/// Header bytes: magic, version, reserved, payload length, CRC-32, reserved.
pub const HEADER_LEN: usize = 32;
/// Largest payload accepted (a VM's state is tens of KiB per vCPU).
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Why a state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file cannot be read or written.
    #[error("{path}: {op}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Not an Ember state file.
    #[error("{0}: not an Ember snapshot (wrong magic)")]
    Magic(String),
    /// Written by another format version.
    #[error("{path}: snapshot format version {found}; this Ember reads version {VERSION}")]
    Version {
        /// The file.
        path: String,
        /// Its version.
        found: u32,
    },
    /// Length or checksum wrong.
    #[error("{path}: {what}; the file is truncated or corrupted")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The payload does not describe a state.
    #[error("{path}: the snapshot's state does not parse: {message}")]
    Parse {
        /// The file.
        path: String,
        /// serde's message.
        message: String,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> FormatError + 'a {
    move |source| FormatError::Io {
        path: path.display().to_string(),
        op,
        source,
    }
}

/// The header of `payload`.
fn header(payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[24..28].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    h
}

/// Encodes `state` as a complete file image.
pub fn encode<T: Serialize>(state: &T) -> Vec<u8> {
    let payload = serde_json::to_vec(state).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header(&payload));
    out.extend_from_slice(&payload);
    out
}

/// Decodes a file image (`path` names it in errors). Every field of the JSON must be one the
/// state knows, at any depth: a field this Ember would drop (written by a newer one, or
/// made up) is refused rather than lost.
pub fn decode<T: DeserializeOwned + Serialize>(
    bytes: &[u8],
    path: &Path,
) -> Result<T, FormatError> {
    let shown = || path.display().to_string();
    let corrupt = |what: String| FormatError::Corrupt {
        path: shown(),
        what,
    };
    if bytes.len() < HEADER_LEN {
        if bytes.len() >= 8 && &bytes[..8] != MAGIC {
            return Err(FormatError::Magic(shown()));
        }
        return Err(corrupt(format!("only {} bytes", bytes.len())));
    }
    if &bytes[..8] != MAGIC {
        return Err(FormatError::Magic(shown()));
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != VERSION {
        return Err(FormatError::Version {
            path: shown(),
            found: version,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(corrupt(format!("a payload of {len} bytes is announced")));
    }
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(corrupt(format!(
            "{} payload bytes where {len} are announced",
            payload.len()
        )));
    }
    if crc32fast::hash(payload) != word(24) {
        return Err(corrupt("the checksum does not match".into()));
    }
    let parse = |message: String| FormatError::Parse {
        path: shown(),
        message,
    };
    let state: T = serde_json::from_slice(payload).map_err(|e| parse(e.to_string()))?;
    let given: Shape = serde_json::from_slice(payload).map_err(|e| parse(e.to_string()))?;
    let kept: Shape = serde_json::to_vec(&state)
        .and_then(|b| serde_json::from_slice(&b))
        .map_err(|e| parse(e.to_string()))?;
    if let Some(field) = dropped_field(&given, &kept, "") {
        return Err(parse(format!("unknown field `{field}`")));
    }
    Ok(state)
}

/// The shape of a JSON document: its objects' keys, and which array elements are objects
/// or arrays, without the values (an array of numbers costs nothing to keep).
#[derive(Debug, PartialEq)]
enum Shape {
    /// `null`.
    Null,
    /// A number, string or boolean.
    Leaf,
    /// An object's fields.
    Object(Vec<(String, Shape)>),
    /// An array's elements that are not leaves, by index.
    Array(Vec<(usize, Shape)>),
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Leaf)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Leaf)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Leaf)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Leaf)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::Leaf)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Shape, E> {
        Ok(Shape::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        let mut inner = Vec::new();
        let mut i = 0;
        while let Some(v) = seq.next_element::<Shape>()? {
            if !matches!(v, Shape::Leaf | Shape::Null) {
                inner.push((i, v));
            }
            i += 1;
        }
        Ok(Shape::Array(inner))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut fields = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let v = map.next_value::<Shape>()?;
            fields.push((key, v));
        }
        Ok(Shape::Object(fields))
    }
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Shape, D::Error> {
        d.deserialize_any(ShapeVisitor)
    }
}

/// The first field of `given` (by its dotted path) that did not survive into `kept`, the
/// same state parsed and written again. Fields given as `null` may be left out when
/// written.
fn dropped_field(given: &Shape, kept: &Shape, at: &str) -> Option<String> {
    let inner = |key: &str| {
        if at.is_empty() {
            key.to_string()
        } else {
            format!("{at}.{key}")
        }
    };
    match (given, kept) {
        (Shape::Object(g), Shape::Object(k)) => {
            g.iter()
                .find_map(|(key, v)| match k.iter().find(|(kk, _)| kk == key) {
                    Some((_, kv)) => dropped_field(v, kv, &inner(key)),
                    None if *v == Shape::Null => None,
                    None => Some(inner(key)),
                })
        }
        (Shape::Array(g), Shape::Array(k)) => g.iter().find_map(|(i, gv)| {
            let (_, kv) = k.iter().find(|(ki, _)| ki == i)?;
            dropped_field(gv, kv, &inner(&i.to_string()))
        }),
        _ => None,
    }
}

/// Writes `state` to `path` durably: a temporary file, synced, renamed over `path`.
pub fn write_file<T: Serialize>(path: &Path, state: &T) -> Result<(), FormatError> {
    let bytes = encode(state);
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp, "cannot create"))?;
    f.write_all(&bytes).map_err(io_err(&tmp, "cannot write"))?;
    f.sync_all().map_err(io_err(&tmp, "cannot sync"))?;
    std::fs::rename(&tmp, path).map_err(io_err(path, "cannot rename into place"))
}

/// Reads and checks the state file at `path`.
pub fn read_file<T: DeserializeOwned + Serialize>(path: &Path) -> Result<T, FormatError> {
    let f = File::open(path).map_err(io_err(path, "cannot open"))?;
    let size = f.metadata().map_err(io_err(path, "cannot stat"))?.len();
    if size > MAX_PAYLOAD + HEADER_LEN as u64 {
        return Err(FormatError::Corrupt {
            path: path.display().to_string(),
            what: format!("{size} bytes is larger than any snapshot state"),
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    f.take(MAX_PAYLOAD + HEADER_LEN as u64)
        .read_to_end(&mut bytes)
        .map_err(io_err(path, "cannot read"))?;
    decode(&bytes, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct S {
        a: u32,
        b: String,
    }

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Outer {
        inner: Vec<S>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    }

    /// A file image around `payload`, with a correct header.
    fn image(payload: &[u8]) -> Vec<u8> {
        let mut out = header(payload).to_vec();
        out.extend_from_slice(payload);
        out
    }

    fn sample() -> Vec<u8> {
        encode(&S {
            a: 7,
            b: "x".into(),
        })
    }

    #[test]
    fn a_state_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.snap");
        let s = S {
            a: 7,
            b: "x".into(),
        };
        write_file(&p, &s).unwrap();
        assert_eq!(read_file::<S>(&p).unwrap(), s);
    }

    #[test]
    fn every_cut_and_every_flipped_byte_is_refused() {
        let p = Path::new("t.snap");
        let good = sample();
        for cut in 0..good.len() {
            assert!(decode::<S>(&good[..cut], p).is_err(), "cut at {cut}");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            let reserved = (12..16).contains(&i) || (28..32).contains(&i);
            assert_eq!(decode::<S>(&bad, p).is_err(), !reserved, "flip at {i}");
        }
    }

    #[test]
    fn a_field_unknown_at_any_depth_is_refused_by_its_path() {
        let p = Path::new("t.snap");
        let good = br#"{"inner":[{"a":1,"b":"x"},{"a":2,"b":"y"}]}"#;
        assert_eq!(decode::<Outer>(&image(good), p).unwrap().inner.len(), 2);
        let cases = [
            (&br#"{"inner":[],"extra":0}"#[..], "`extra`"),
            (
                br#"{"inner":[{"a":1,"b":"x"},{"a":2,"b":"y","c":3}]}"#,
                "`inner.1.c`",
            ),
        ];
        for (payload, field) in cases {
            let e = decode::<Outer>(&image(payload), p).unwrap_err();
            assert!(matches!(e, FormatError::Parse { .. }), "{e}");
            assert!(
                e.to_string().ends_with(&format!("unknown field {field}")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_null_for_a_field_written_only_when_set_is_accepted() {
        let p = Path::new("t.snap");
        let payload = br#"{"inner":[],"note":null}"#;
        let s = decode::<Outer>(&image(payload), p).unwrap();
        assert_eq!(s.note, None);
    }

    #[test]
    fn foreign_newer_and_absurd_files_say_so() {
        let p = Path::new("t.snap");
        let mut b = sample();
        b[0] = b'X';
        assert!(matches!(decode::<S>(&b, p), Err(FormatError::Magic(_))));
        let mut b = sample();
        b[8] = 2;
        let e = decode::<S>(&b, p).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        let mut b = sample();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<S>(&b, p),
            Err(FormatError::Corrupt { .. })
        ));
        let e = decode::<S>(b"\x7fELF\x02\x01\x01", p).unwrap_err();
        assert!(matches!(e, FormatError::Corrupt { .. }), "{e}");
    }
}
