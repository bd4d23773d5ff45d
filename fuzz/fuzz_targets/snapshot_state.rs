//! Any bytes as a snapshot state file: `decode` and `SnapshotState::check` must give errors,
//! never panics, hangs or unbounded memory; a state they accept must write back to a file
//! that reads back the same.
//!
//! Byte 0 chooses the form: bit 0 clear, the rest is the whole file (header fuzzing); bit 0
//! set, the rest is the payload and gets a correct header (magic, version, length, CRC-32),
//! so the fuzzer reaches the JSON and the checks behind the checksum.
#![no_main]

use std::path::Path;

use ember::snapshot::format::{self, HEADER_LEN, MAGIC, VERSION};
use ember::snapshot::SnapshotState;
use libfuzzer_sys::fuzz_target;

/// `payload` as a file image with a correct header.
fn with_header(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    out[0..8].copy_from_slice(MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    out[24..28].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    let file = if form & 1 == 1 {
        with_header(rest)
    } else {
        rest.to_vec()
    };
    let path = Path::new("fuzz.snap");
    let Ok(state) = format::decode::<SnapshotState>(&file, path) else {
        return;
    };
    let _ = state.check();
    let written = format::encode(&state);
    let again: SnapshotState = format::decode(&written, path).expect("a state read back");
    assert_eq!(
        format::encode(&again),
        written,
        "a state wrote back differently"
    );
});
