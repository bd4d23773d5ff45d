//! Any sequence of guest accesses to a virtio-mmio register file with a real virtio-blk
//! device behind it (on a 1 MiB raw temp disk): register and configuration reads and
//! writes at any offset and width, guest memory pokes, device passes, and two shortcuts a
//! fuzzer would take long to find (a driver's whole start-up, and one request pushed on the
//! available ring and notified). Nothing may panic or hang; the identity registers never
//! change, sub-word register reads read 0, InterruptStatus holds only its two bits, a reset
//! reads back as status 0, and the disk file never grows.
//!
//! Input: operations of 8 bytes each: kind, argument byte, little-endian u16 offset or
//! address, little-endian u32 value (see fuzz/README.md).
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::disk::{HostFile, RawImage};
use devices::virtio::block::Block;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::{features, status, VirtioDevice};
use devices::GuestMemoryMmap;
use devices::Interrupt;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: u64 = 0x2_0000;
const DISK: u64 = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Request slot i: header at BUFS + i * 0x1000, data after it, status byte at the end.
const BUFS: u64 = 0x1_0000;

#[derive(Default)]
struct Line(AtomicU64);
impl Interrupt for Line {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

struct Rig {
    mmio: MmioTransport,
    block: Arc<Mutex<Block>>,
    mem: GuestMemoryMmap,
    disk: std::fs::File,
    /// Queue size the start-up shortcut programmed.
    qsize: u16,
}

fn rig() -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let f = tempfile::tempfile().unwrap();
    f.set_len(DISK).unwrap();
    let disk = f.try_clone().unwrap();
    let image = RawImage::from_host_file(HostFile::from_file(f), false, false).unwrap();
    let block = Arc::new(Mutex::new(Block::new(
        Box::new(image),
        false,
        Some("fz".into()),
    )));
    let evts = vec![EventFd::new(EFD_NONBLOCK).unwrap()];
    let mmio = MmioTransport::new(block.clone(), Arc::new(Line::default()), mem.clone(), evts);
    Rig {
        mmio,
        block,
        mem,
        disk,
        qsize: 16,
    }
}

fn w32(rig: &mut Rig, offset: u64, v: u32) {
    rig.mmio.write(offset, &v.to_le_bytes());
}

fn r32(rig: &mut Rig, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    rig.mmio.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// What a driver does from reset to DRIVER_OK, with queue 0 at DESC/AVAIL/USED.
fn start(rig: &mut Rig, arg: u8, value: u32) {
    rig.qsize = 1 << (arg % 9);
    w32(rig, 0x70, 0);
    w32(rig, 0x70, status::ACKNOWLEDGE);
    w32(rig, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    w32(rig, 0x14, 0);
    let low = r32(rig, 0x10) & value;
    w32(rig, 0x24, 0);
    w32(rig, 0x20, low);
    w32(rig, 0x24, 1);
    w32(rig, 0x20, (features::VERSION_1 >> 32) as u32);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    w32(rig, 0x70, s);
    w32(rig, 0x30, 0);
    w32(rig, 0x38, u32::from(rig.qsize));
    for (reg, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
        w32(rig, reg, addr as u32);
        w32(rig, reg + 4, 0);
    }
    w32(rig, 0x44, 1);
    w32(rig, 0x70, s | status::DRIVER_OK);
}

fn put_desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = DESC + u64::from(i) * 16;
    let _ = mem.write_obj(addr, GuestAddress(at));
    let _ = mem.write_obj(len, GuestAddress(at + 8));
    let _ = mem.write_obj(flags, GuestAddress(at + 12));
    let _ = mem.write_obj(next, GuestAddress(at + 14));
}

/// One request of type `arg` (IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES, or the raw
/// byte) on descriptors slot..slot+2, `sectors` long at sector `value`, then a notify.
fn request(rig: &mut Rig, arg: u8, off: u16, value: u32) {
    let kinds = [0u32, 1, 4, 8, 11, 13];
    let kind = kinds
        .get(usize::from(arg & 7))
        .copied()
        .unwrap_or(u32::from(arg));
    let q = rig.qsize.max(1);
    let slot = (off as u8) % 16;
    let sectors = u32::from(off >> 8) % 8 + 1;
    let base = BUFS + u64::from(slot) * 0x1000;
    let mem = rig.mem.clone();
    let _ = mem.write_obj(kind, GuestAddress(base));
    let _ = mem.write_obj(0u32, GuestAddress(base + 4));
    let _ = mem.write_obj(u64::from(value), GuestAddress(base + 8));
    let (h, d, s) = (
        u16::from(slot) % q,
        (u16::from(slot) + 1) % q,
        (u16::from(slot) + 2) % q,
    );
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    put_desc(&mem, h, base, 16, NEXT, d);
    let data = base + 0x10;
    let (len, flags) = match kind {
        0 | 8 => (sectors * 512, WRITE),
        11 | 13 => {
            // One segment: sector, sector count, flags (unmap when arg's bit 3 is set).
            let _ = mem.write_obj(u64::from(value), GuestAddress(data));
            let _ = mem.write_obj(sectors, GuestAddress(data + 8));
            let _ = mem.write_obj(u32::from(arg >> 3 & 1), GuestAddress(data + 12));
            (16, 0)
        }
        _ => (sectors * 512, 0),
    };
    if kind == 4 {
        put_desc(&mem, h, base, 16, NEXT, s);
    } else {
        put_desc(&mem, d, data, len, flags | NEXT, s);
    }
    put_desc(&mem, s, base + 0xfff, 1, WRITE, 0);
    let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap_or(0);
    let entry = AVAIL + 4 + u64::from(idx % q) * 2;
    let _ = mem.write_obj(h, GuestAddress(entry));
    let _ = mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2));
    w32(rig, 0x50, 0);
}

fn access(rig: &mut Rig, write: bool, arg: u8, off: u16, value: u32) {
    let width = [1usize, 2, 4, 8, 3][usize::from(arg % 5)];
    let offset = u64::from(off & 0x1ff);
    let bytes = (u64::from(value) | u64::from(value) << 32).to_le_bytes();
    if write {
        rig.mmio.write(offset, &bytes[..width]);
        if offset == 0x70 && width == 4 && value == 0 {
            assert_eq!(r32(rig, 0x70), 0, "a reset left a status");
        }
        return;
    }
    let mut data = [0xa5u8; 8];
    rig.mmio.read(offset, &mut data[..width]);
    if offset < 0x100 && (width != 4 || offset % 4 != 0) {
        assert!(
            data[..width].iter().all(|b| *b == 0),
            "sub-word read at {offset:#x}"
        );
    }
    if width == 4 && offset < 0x100 {
        let v = u32::from_le_bytes(data[..4].try_into().unwrap());
        match offset {
            0x00 => assert_eq!(v, 0x7472_6976),
            0x04 => assert_eq!(v, 2),
            0x08 => assert_eq!(v, 2),
            0x0c => assert_eq!(v, 0x554d_4551),
            0x60 => assert_eq!(v & !3, 0, "InterruptStatus {v:#x}"),
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut rig = rig();
    for op in data.chunks_exact(8).take(512) {
        let off = u16::from_le_bytes([op[2], op[3]]);
        let value = u32::from_le_bytes([op[4], op[5], op[6], op[7]]);
        match op[0] % 6 {
            0 => access(&mut rig, true, op[1], off, value),
            1 => access(&mut rig, false, op[1], off, value),
            2 => {
                let at = u64::from(off) * 2 % (MEM - 4);
                let _ = rig.mem.write_obj(value, GuestAddress(at));
            }
            3 => {
                rig.block.lock().unwrap().process_queue();
            }
            4 => start(&mut rig, op[1], value),
            _ => request(&mut rig, op[1], off, value),
        }
    }
    rig.block.lock().unwrap().process_queue();
    assert_eq!(
        rig.disk.metadata().unwrap().len(),
        DISK,
        "the disk file changed size"
    );
    // The device type and queue count stay what they are.
    assert_eq!(rig.block.lock().unwrap().device_type(), 2);
});
