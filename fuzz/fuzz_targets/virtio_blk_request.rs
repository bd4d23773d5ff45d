//! Any bytes as the guest's side of a virtio-blk queue (descriptor table, available ring,
//! request headers and buffers): the device must answer or skip, never panic or hang.
#![no_main]

use std::sync::Arc;

use devices::disk::{HostFile, RawImage};
use devices::virtio::block::Block;
use devices::virtio::mmio::MmioInterrupt;
use devices::virtio::VirtioDevice;
use devices::GuestMemoryMmap;
use devices::Interrupt;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

struct NoIrq;
impl Interrupt for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    // The guest's bytes: descriptor table at 0, available ring at 0x100, the rest anywhere.
    let _ = mem.write_slice(&data[..data.len().min(MEM)], GuestAddress(0));
    let f = tempfile::tempfile().unwrap();
    f.set_len(1 << 20).unwrap();
    let disk = RawImage::from_host_file(HostFile::from_file(f), false, false).unwrap();
    let mut dev = Block::new(Box::new(disk), false, Some("fuzz".into()));
    dev.ack_features(dev.features());
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    let irq = Arc::new(MmioInterrupt::new(Arc::new(NoIrq)));
    if dev.activate(mem, vec![q], irq).is_ok() {
        dev.process_queue();
        dev.process_queue();
    }
});
