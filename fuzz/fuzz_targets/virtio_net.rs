//! Any bytes as the guest's side of virtio-net (both queues' descriptor tables and rings,
//! buffers anywhere) plus a few frames waiting on a fake tap: transmit and receive passes
//! must end, each within its budget, and the device must settle in a bounded number of
//! passes, whatever the guest wrote. It never panics (any panic is a finding).
//!
//! Input: byte 0 = flags (bit 0 MRG_RXBUF, bit 1 EVENT_IDX, bit 2 tap full on every other
//! write, bits 4-5 number of frames waiting), then a little-endian u16 length per frame,
//! then guest memory from address 0 (the queues sit at fixed addresses in it).
#![no_main]

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::sync::Arc;

use devices::virtio::mmio::MmioInterrupt;
use devices::virtio::net::{
    feature, Net, NetBackend, RxState, TxState, FRAMES_PER_PASS, MAX_FRAME,
};
use devices::virtio::queue::{check_layout, QueueConfig};
use devices::virtio::{features, VirtioDevice};
use devices::GuestMemoryMmap;
use devices::Interrupt;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

struct NoIrq;
impl Interrupt for NoIrq {
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A tap holding a few frames; counts what the device asked of it.
struct FakeTap {
    frames: VecDeque<Vec<u8>>,
    reads: usize,
    writes: usize,
    block_every_other: bool,
}

impl NetBackend for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads += 1;
        let f = self.frames.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }
    fn write_frame(&mut self, parts: &[IoSlice]) -> io::Result<usize> {
        self.writes += 1;
        if self.block_every_other && self.writes.is_multiple_of(2) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(parts.iter().map(|p| p.len()).sum())
    }
    fn set_offload(&mut self, _: u32) -> io::Result<()> {
        Ok(())
    }
    fn link_up(&self) -> bool {
        true
    }
    fn raw_fd(&self) -> RawFd {
        -1
    }
}

const MEM: usize = 64 << 10;
const QSIZE: u16 = 16;
/// Passes after which a device given no new input must have settled (the fake tap takes
/// at least one frame per pass even when it blocks every other write).
const MAX_PASSES: usize = 256;

fn queue(base: u64) -> QueueConfig {
    QueueConfig {
        max_size: 256,
        size: u32::from(QSIZE),
        ready: true,
        desc_table: base,
        avail_ring: base + 0x100,
        used_ring: base + 0x200,
    }
}

fn frames(data: &[u8], count: usize) -> (VecDeque<Vec<u8>>, &[u8]) {
    let mut out = VecDeque::new();
    let mut rest = data;
    for i in 0..count {
        let Some((len, tail)) = rest.split_first_chunk::<2>() else {
            break;
        };
        rest = tail;
        let len = usize::from(u16::from_le_bytes(*len)).min(MAX_FRAME);
        out.push_back((0..len).map(|b| (b as u8) ^ (i as u8)).collect());
    }
    (out, rest)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (waiting, image) = frames(rest, usize::from((flags >> 4) & 3));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let _ = mem.write_slice(&image[..image.len().min(MEM)], GuestAddress(0));
    let tap = FakeTap {
        frames: waiting,
        reads: 0,
        writes: 0,
        block_every_other: flags & 4 != 0,
    };
    let mut dev = Net::new(tap, [2, 0, 0, 0, 0, 1], 1500);
    let mut acked = dev.features() & !(feature::MRG_RXBUF | features::RING_EVENT_IDX);
    if flags & 1 != 0 {
        acked |= feature::MRG_RXBUF;
    }
    let event_idx = flags & 2 != 0;
    if event_idx {
        acked |= features::RING_EVENT_IDX;
    }
    dev.ack_features(acked);
    // RX at 0x0, TX at 0x400: what a transport accepts.
    let configs = [queue(0), queue(0x400)];
    check_layout(&configs).unwrap();
    let queues = configs
        .iter()
        .enumerate()
        .map(|(i, c)| c.build(i, &mem, event_idx).unwrap())
        .collect();
    let irq = Arc::new(MmioInterrupt::new(Arc::new(NoIrq)));
    dev.activate(mem, queues, irq).unwrap();

    for pass in 0.. {
        assert!(pass < MAX_PASSES, "still busy after {MAX_PASSES} passes");
        let (reads, writes) = (dev.backend().reads, dev.backend().writes);
        let tx = dev.process_tx();
        let rx = dev.process_rx();
        assert!(dev.backend().writes - writes <= usize::from(QSIZE));
        assert!(dev.backend().reads - reads <= FRAMES_PER_PASS);
        // The fake tap is writable again at once: a blocked transmit goes on next pass.
        if tx == TxState::Done && rx != RxState::Yielded {
            break;
        }
    }
    // A driver reset: nothing more is served, and nothing panics.
    dev.reset();
    assert_eq!(dev.process_tx(), TxState::Done);
    let _ = dev.process_rx();
});
