//! virtio-blk against mock guest memory and a split queue: every request type, and hostile
//! chains that must end in an error status, never a panic or a hang.

use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::request::*;
use super::*;
use crate::disk::{DiskError, Extent, HostFile, ImageFormat, RawImage};
use crate::test_utils::CountingInterrupt;
use crate::virtio::testing::{within, GuestQueue, F_INDIRECT, F_NEXT};
use crate::virtio::INT_CONFIG;

const QUEUE_AT: u64 = 0x1000;
const DATA_AT: u64 = 0x10_0000;
const MEM: usize = 16 << 20;

struct Rig {
    q: GuestQueue,
    mem: GuestMemoryMmap,
    dev: Block,
    irq: Arc<CountingInterrupt>,
    vi: Arc<VirtioInterrupt>,
    disk_file: std::fs::File,
}

fn rig_with(read_only: bool, acked: u64) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let (q, queue) = GuestQueue::new(&mem, QUEUE_AT, QUEUE_SIZE);
    let f = tempfile::tempfile().unwrap();
    f.set_len(1 << 20).unwrap();
    let disk = RawImage::from_host_file(HostFile::from_file(f.try_clone().unwrap()), false, false)
        .unwrap();
    let mut dev = Block::new(
        Box::new(disk),
        read_only,
        Some("ember-serial-0123456789".into()),
    );
    dev.ack_features(acked);
    let irq = Arc::new(CountingInterrupt::default());
    let vi = Arc::new(VirtioInterrupt::new(irq.clone()));
    dev.activate(mem.clone(), vec![queue], vi.clone()).unwrap();
    Rig {
        q,
        mem,
        dev,
        irq,
        vi,
        disk_file: f,
    }
}

fn rig() -> Rig {
    rig_with(false, u64::MAX)
}

impl Rig {
    fn header(&self, at: u64, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn status_at(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// A request header + data + status; returns the status address.
    fn request(&mut self, kind: u32, sector: u64, data: Option<(u64, u32, bool)>) -> u64 {
        let base = DATA_AT + u64::from(self.q.used_idx() + self.q.avail_pending()) * 0x1_0000;
        self.header(base, kind, sector);
        let status = base + 0x100;
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let mut parts = vec![(base, 16, false)];
        parts.extend(data);
        parts.push((status, 1, true));
        self.q.chain(&parts);
        status
    }
}

#[test]
fn write_then_read_round_trips_and_interrupts() {
    let mut r = rig();
    let buf = DATA_AT + 0x80_0000;
    r.mem.write_slice(&[0xab; 4096], GuestAddress(buf)).unwrap();
    let st = r.request(T_OUT, 8, Some((buf, 4096, false)));
    assert_eq!(r.dev.process_queue().completed, 1);
    assert_eq!(r.status_at(st), S_OK);
    assert_eq!(r.q.used_elem(0), (0, 1));
    assert!(r.irq.count() >= 1);
    let mut on_disk = [0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&r.disk_file, &mut on_disk, 8 * 512).unwrap();
    assert_eq!(on_disk, [0xab; 4096]);

    let back = buf + 0x10000;
    let st = r.request(T_IN, 8, Some((back, 4096, true)));
    r.dev.process_queue();
    assert_eq!(r.status_at(st), S_OK);
    assert_eq!(r.q.used_elem(1).1, 4097);
    let mut got = [0u8; 4096];
    r.mem.read_slice(&mut got, GuestAddress(back)).unwrap();
    assert_eq!(got, [0xab; 4096]);
}

#[test]
fn header_split_across_descriptors_is_accepted() {
    let mut r = rig();
    let h = DATA_AT;
    r.header(h, T_IN, 0);
    let st = h + 0x200;
    r.q.chain(&[
        (h, 4, false),
        (h + 4, 12, false),
        (h + 0x1000, 512, true),
        (st, 1, true),
    ]);
    r.dev.process_queue();
    assert_eq!(r.status_at(st), S_OK);
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let mut r = rig();
    let st = r.request(T_FLUSH, 0, None);
    r.dev.process_queue();
    assert_eq!(r.status_at(st), S_OK);

    let id = DATA_AT + 0x80_0000;
    let st = r.request(T_GET_ID, 0, Some((id, 20, true)));
    r.dev.process_queue();
    assert_eq!(r.status_at(st), S_OK);
    let mut got = [0u8; 20];
    r.mem.read_slice(&mut got, GuestAddress(id)).unwrap();
    assert_eq!(&got, b"ember-serial-0123456");

    std::os::unix::fs::FileExt::write_all_at(&r.disk_file, &[7u8; 8192], 0).unwrap();
    let seg = DATA_AT + 0x90_0000;
    r.mem.write_obj(1u64, GuestAddress(seg)).unwrap();
    r.mem.write_obj(2u32, GuestAddress(seg + 8)).unwrap();
    r.mem.write_obj(1u32, GuestAddress(seg + 12)).unwrap(); // unmap
    let st = r.request(T_WRITE_ZEROES, 0, Some((seg, 16, false)));
    r.dev.process_queue();
    assert_eq!(r.status_at(st), S_OK);
    let mut disk = [1u8; 2048];
    std::os::unix::fs::FileExt::read_exact_at(&r.disk_file, &mut disk, 0).unwrap();
    assert!(disk[..512].iter().all(|b| *b == 7));
    assert!(disk[512..1536].iter().all(|b| *b == 0));
    assert!(disk[1536..].iter().all(|b| *b == 7));

    r.mem.write_obj(0u32, GuestAddress(seg + 12)).unwrap();
    let st = r.request(T_DISCARD, 0, Some((seg, 16, false)));
    r.dev.process_queue();
    assert_eq!(r.status_at(st), S_OK);
}

#[test]
fn bad_requests_get_error_statuses() {
    let mut r = rig();
    let buf = DATA_AT + 0x80_0000;
    // Past the end of the 1 MiB disk.
    let st = r.request(T_IN, 2048, Some((buf, 512, true)));
    // Not a multiple of 512.
    let st2 = r.request(T_OUT, 0, Some((buf, 100, false)));
    // Sector number that overflows.
    let st3 = r.request(T_IN, u64::MAX, Some((buf, 512, true)));
    // Unknown type.
    let st4 = r.request(99, 0, None);
    // Discard with the unmap flag (only write-zeroes takes it).
    let seg = DATA_AT + 0x90_0000;
    r.mem.write_obj(0u64, GuestAddress(seg)).unwrap();
    r.mem.write_obj(1u32, GuestAddress(seg + 8)).unwrap();
    r.mem.write_obj(1u32, GuestAddress(seg + 12)).unwrap();
    let st5 = r.request(T_DISCARD, 0, Some((seg, 16, false)));
    // Discard segment list of a wrong length.
    let st6 = r.request(T_DISCARD, 0, Some((seg, 10, false)));
    assert_eq!(r.dev.process_queue().completed, 6);
    assert_eq!(r.status_at(st), S_IOERR);
    assert_eq!(r.status_at(st2), S_IOERR);
    assert_eq!(r.status_at(st3), S_IOERR);
    assert_eq!(r.status_at(st4), S_UNSUPP);
    assert_eq!(r.status_at(st5), S_UNSUPP);
    assert_eq!(r.status_at(st6), S_IOERR);
}

#[test]
fn read_only_disk_refuses_writes_and_offers_ro() {
    let mut r = rig_with(true, u64::MAX);
    assert_ne!(r.dev.features() & F_RO, 0);
    assert_eq!(r.dev.features() & (F_DISCARD | F_WRITE_ZEROES), 0);
    let buf = DATA_AT + 0x80_0000;
    let st = r.request(T_OUT, 0, Some((buf, 512, false)));
    r.dev.process_queue();
    assert_eq!(r.status_at(st), S_IOERR);
}

#[test]
fn unnegotiated_flush_is_unsupported() {
    let mut r = rig_with(false, features::VERSION_1);
    let st = r.request(T_FLUSH, 0, None);
    r.dev.process_queue();
    assert_eq!(r.status_at(st), S_UNSUPP);
}

#[test]
fn hostile_chains_never_panic_or_hang() {
    let mut r = rig();
    // Buffer outside guest memory.
    r.header(DATA_AT, T_IN, 0);
    r.q.chain(&[
        (DATA_AT, 16, false),
        (1 << 40, 512, true),
        (DATA_AT + 0x100, 1, true),
    ]);
    // No writable byte for the status.
    r.q.chain(&[(DATA_AT, 16, false)]);
    // A descriptor whose next points at itself: a loop.
    let me = r.q.next_index();
    r.q.desc(DATA_AT, 16, F_NEXT, me);
    r.q.publish(me);
    // Next index past the table.
    let bad = r.q.next_index();
    r.q.desc(DATA_AT, 16, F_NEXT, 60_000);
    r.q.publish(bad);
    // Zero-length descriptors only.
    r.q.chain(&[(DATA_AT, 0, false), (DATA_AT, 0, true)]);
    // Header shorter than 16 bytes, with a status byte.
    r.q.chain(&[(DATA_AT, 8, false), (DATA_AT + 0x300, 1, true)]);
    // Huge length overflowing the chain total.
    r.q.chain(&[
        (DATA_AT, u32::MAX, false),
        (DATA_AT, u32::MAX, false),
        (DATA_AT + 0x100, 1, true),
    ]);
    // Indirect table pointing outside memory.
    let ind = r.q.next_index();
    r.q.desc(1 << 41, 64, F_INDIRECT, 0);
    r.q.publish(ind);
    let n = r.dev.process_queue().completed;
    assert_eq!(n, 8, "every chain is completed");
    assert_eq!(r.q.used_idx(), 8);
    assert_eq!(r.status_at(DATA_AT + 0x300), S_IOERR);
}

#[test]
fn avail_index_far_ahead_stops_the_device_and_asks_for_a_reset() {
    let mut r = rig();
    r.request(T_FLUSH, 0, None);
    r.q.set_avail_idx(5000);
    assert_eq!(r.dev.process_queue().completed, 0);
    assert!(r.vi.needs_reset());
    assert_ne!(r.vi.status() & INT_CONFIG, 0);
    // Stopped: the request is not served even once avail.idx is sane again.
    r.q.set_avail_idx(1);
    assert_eq!(r.dev.process_queue().completed, 0);
    assert_eq!(r.q.used_idx(), 0);
}

#[test]
fn config_space_reports_capacity_and_limits() {
    let r = rig();
    let mut cap = [0u8; 8];
    r.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (1 << 20) / 512);
    let mut blk = [0u8; 4];
    r.dev.read_config(0x14, &mut blk);
    assert_eq!(u32::from_le_bytes(blk), 512);
    let mut past = [9u8; 4];
    r.dev.read_config(0x1000, &mut past);
    assert_eq!(past, [0; 4]);
    r.dev.read_config(u64::MAX, &mut past);
}

/// What the device asked of the disk, in order.
type Ops = Arc<Mutex<Vec<&'static str>>>;

/// A raw disk that records the requests it gets, and runs `on_write` (a racing guest) on
/// each write.
struct Recording {
    inner: RawImage,
    ops: Ops,
    on_write: Option<Box<dyn FnMut() + Send>>,
}

impl DiskImage for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.ops.lock().unwrap().push("read");
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.ops.lock().unwrap().push("write");
        if let Some(hook) = self.on_write.as_mut() {
            hook();
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.ops.lock().unwrap().push("flush");
        self.inner.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent, DiskError> {
        self.inner.extent(offset, max_len)
    }
    fn format(&self) -> ImageFormat {
        self.inner.format()
    }
    fn read_only(&self) -> bool {
        false
    }
}

/// A rig on a recording disk.
fn recording_rig(on_write: Option<Box<dyn FnMut() + Send>>) -> (Rig, Ops) {
    let mut r = rig();
    let ops = Ops::default();
    let f = r.disk_file.try_clone().unwrap();
    let inner = RawImage::from_host_file(HostFile::from_file(f), false, false).unwrap();
    let disk = Recording {
        inner,
        ops: ops.clone(),
        on_write,
    };
    r.dev = Block::new(Box::new(disk), false, None);
    r.dev.ack_features(u64::MAX);
    let (q, queue) = GuestQueue::new(&r.mem, QUEUE_AT, QUEUE_SIZE);
    r.q = q;
    r.dev
        .activate(r.mem.clone(), vec![queue], r.vi.clone())
        .unwrap();
    (r, ops)
}

#[test]
fn reset_does_no_disk_io_and_the_next_pass_flushes_before_new_requests() {
    let (mut r, ops) = recording_rig(None);
    r.dev.reset();
    assert!(
        ops.lock().unwrap().is_empty(),
        "reset runs on a vCPU thread"
    );
    // The driver starts the device again before the event loop ran.
    let (q, queue) = GuestQueue::new(&r.mem, QUEUE_AT, QUEUE_SIZE);
    r.q = q;
    r.dev.ack_features(u64::MAX);
    r.dev
        .activate(r.mem.clone(), vec![queue], r.vi.clone())
        .unwrap();
    let buf = DATA_AT + 0x80_0000;
    let st = r.request(T_OUT, 0, Some((buf, 512, false)));

    r.dev.process_queue();

    assert_eq!(*ops.lock().unwrap(), vec!["flush", "write"]);
    assert_eq!(r.status_at(st), S_OK);
    r.dev.process_queue();
    assert_eq!(ops.lock().unwrap().len(), 2, "the flush was owed once");
}

#[test]
fn a_pass_is_bounded_while_the_guest_keeps_posting() {
    let guest = Arc::new(Mutex::new(None::<GuestQueue>));
    let hook_q = guest.clone();
    let hook = Box::new(move || {
        if let Some(q) = hook_q.lock().unwrap().as_mut() {
            // Another write request, header and data at DATA_AT, status after them.
            q.chain(&[
                (DATA_AT, 16, false),
                (DATA_AT + 0x1000, 512, false),
                (DATA_AT + 0x2000, 1, true),
            ]);
        }
    });
    let (mut r, ops) = recording_rig(Some(hook));
    r.header(DATA_AT, T_OUT, 0);
    r.q.chain(&[
        (DATA_AT, 16, false),
        (DATA_AT + 0x1000, 512, false),
        (DATA_AT + 0x2000, 1, true),
    ]);
    *guest.lock().unwrap() = Some(r.q.clone());

    let (served, r) = within(5, move || (r.dev.process_queue(), r));

    assert_eq!(served.completed, usize::from(QUEUE_SIZE));
    assert!(served.more, "the handler must come back for the rest");
    assert_eq!(ops.lock().unwrap().len(), usize::from(QUEUE_SIZE));
    assert!(!r.vi.needs_reset());
}

#[test]
fn stats_count_each_kind_its_bytes_and_failures() {
    let mut r = rig();
    let buf = DATA_AT + 0x80_0000;
    r.request(T_OUT, 0, Some((buf, 4096, false)));
    r.request(T_IN, 0, Some((buf, 1024, true)));
    r.request(T_FLUSH, 0, None);
    r.request(T_IN, 1 << 40, Some((buf, 512, true))); // past the end
    r.dev.process_queue();
    let s = r.dev.stats();
    assert_eq!((s.write_ops, s.write_bytes), (1, 4096));
    assert_eq!((s.read_ops, s.read_bytes), (1, 1024));
    assert_eq!((s.flush_ops, s.errors), (1, 1));
}
