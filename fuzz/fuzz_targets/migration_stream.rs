//! Any bytes as what a migration source sends to the destination: the handshake, then
//! messages (offer, pages, zero ranges, disk chunks, iteration markers, the state) into a
//! small guest memory. The destination must refuse or accept each message without
//! panicking, never write outside guest memory, and stop at the end of the input.
//!
//! Input: the raw stream. Seeds start with a valid hello (`EMBERMIG`, version 1, no
//! flags, a nonce) so the fuzzer reaches the messages.
#![no_main]

use std::io::{self, Cursor, Read, Write};
use std::sync::atomic::AtomicBool;

use ember::migration::incoming::receive_data;
use ember::migration::storage::DiskReceiver;
use ember::migration::wire::{self, Stream};
use libfuzzer_sys::fuzz_target;

/// Reads the input; writes go nowhere.
struct Input(Cursor<Vec<u8>>);

impl Read for Input {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.0.read(b)
    }
}

impl Write for Input {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for Input {}

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = ember::memory::create_guest_memory(2 << 20) else {
        return;
    };
    let Ok(mut ch) = wire::accept(Input(Cursor::new(data.to_vec())), None) else {
        return;
    };
    let mut disks = DiskReceiver::default();
    let _ = receive_data(&mut ch, &mem, &mut disks, &AtomicBool::new(false));
});
