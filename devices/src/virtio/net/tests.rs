//! virtio-net queue logic against a mock backend and mock guest queues.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::test_utils::CountingInterrupt;
use crate::virtio::testing::{within, GuestQueue, F_NEXT};
use crate::virtio::{status, INT_CONFIG};

/// Something the guest does while the device works (a vCPU racing the event loop).
type Hook = Box<dyn FnMut() + Send>;

#[derive(Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
    blocked: bool,
    link: bool,
    offload: Option<u32>,
    reads: usize,
    /// A frame the tap offers again and again.
    endless: Option<Vec<u8>>,
    on_read: Option<Hook>,
    on_write: Option<Hook>,
}

#[derive(Clone)]
struct Mock(Arc<Mutex<Wire>>);

impl NetBackend for Mock {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut w = self.0.lock().unwrap();
        w.reads += 1;
        if let Some(hook) = w.on_read.as_mut() {
            hook();
        }
        if let Some(f) = w.endless.clone() {
            buf[..f.len()].copy_from_slice(&f);
            return Ok(f.len());
        }
        match w.to_guest.pop_front() {
            Some(f) => {
                buf[..f.len()].copy_from_slice(&f);
                Ok(f.len())
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn write_frame(&mut self, parts: &[IoSlice]) -> io::Result<usize> {
        let mut w = self.0.lock().unwrap();
        if w.blocked {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let frame: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let n = frame.len();
        w.from_guest.push(frame);
        if let Some(hook) = w.on_write.as_mut() {
            hook();
        }
        Ok(n)
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.0.lock().unwrap().offload = Some(flags);
        Ok(())
    }
    fn link_up(&self) -> bool {
        self.0.lock().unwrap().link
    }
    fn raw_fd(&self) -> RawFd {
        -1
    }
}

const BUF: u64 = 0x20_0000;

struct Rig {
    mem: GuestMemoryMmap,
    rx: GuestQueue,
    tx: GuestQueue,
    dev: Net<Mock>,
    wire: Arc<Mutex<Wire>>,
    irq: Arc<CountingInterrupt>,
    vi: Arc<VirtioInterrupt>,
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn rig(acked: u64) -> Rig {
    let mem = guest_memory();
    let rx = GuestQueue::new(&mem, 0x1000, QUEUE_SIZE);
    let tx = GuestQueue::new(&mem, 0x10_0000, QUEUE_SIZE);
    rig_on(mem, acked, rx, tx)
}

/// A running device on the given queues.
fn rig_on(
    mem: GuestMemoryMmap,
    acked: u64,
    (rx, rxq): (GuestQueue, Queue),
    (tx, txq): (GuestQueue, Queue),
) -> Rig {
    let wire = Arc::new(Mutex::new(Wire {
        link: true,
        ..Default::default()
    }));
    let mut dev = Net::new(Mock(wire.clone()), mac_for("vm", 0), 1500);
    dev.ack_features(acked);
    let irq = Arc::new(CountingInterrupt::default());
    let vi = Arc::new(VirtioInterrupt::new(irq.clone()));
    dev.activate(mem.clone(), vec![rxq, txq], vi.clone())
        .unwrap();
    Rig {
        mem,
        rx,
        tx,
        dev,
        wire,
        irq,
        vi,
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| seed.wrapping_add(i as u8)));
    f
}

#[test]
fn transmit_passes_header_and_frame_to_the_backend() {
    let mut r = rig(u64::MAX);
    let f = frame(100, 7);
    r.mem
        .write_slice(&f[..VNET_HDR_LEN], GuestAddress(BUF))
        .unwrap();
    r.mem
        .write_slice(&f[VNET_HDR_LEN..], GuestAddress(BUF + 0x1000))
        .unwrap();
    r.tx.chain(&[
        (BUF, VNET_HDR_LEN as u32, false),
        (BUF + 0x1000, 100, false),
    ]);
    assert_eq!(r.dev.process_tx(), TxState::Done);
    assert_eq!(r.wire.lock().unwrap().from_guest, vec![f]);
    assert_eq!(r.tx.used_idx(), 1);
    assert!(r.irq.count() > 0);
}

#[test]
fn malformed_transmits_are_dropped_and_completed() {
    let mut r = rig(u64::MAX);
    r.tx.chain(&[(BUF, 4, false)]); // shorter than the header
    r.tx.chain(&[(1 << 40, 100, false)]); // outside guest memory
    r.tx.chain(&[(BUF, 70_000, false), (BUF, 70_000, false)]); // longer than a frame
    let me = r.tx.next_index();
    r.tx.desc(BUF, 64, F_NEXT, me); // a loop
    r.tx.publish(me);
    assert_eq!(r.dev.process_tx(), TxState::Done);
    assert_eq!(r.tx.used_idx(), 4);
    assert!(r.wire.lock().unwrap().from_guest.len() <= 1);
}

#[test]
fn a_full_backend_holds_the_transmit_until_it_drains() {
    let mut r = rig(u64::MAX);
    r.wire.lock().unwrap().blocked = true;
    r.mem.write_slice(&frame(60, 1), GuestAddress(BUF)).unwrap();
    r.tx.chain(&[(BUF, 72, false)]);
    assert_eq!(r.dev.process_tx(), TxState::Blocked);
    assert_eq!(r.tx.used_idx(), 0);
    r.wire.lock().unwrap().blocked = false;
    assert_eq!(r.dev.process_tx(), TxState::Done);
    assert_eq!(r.tx.used_idx(), 1);
    assert_eq!(r.wire.lock().unwrap().from_guest.len(), 1);
}

fn rx_data(r: &Rig, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    r.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn receive_fills_one_buffer_with_num_buffers_one() {
    let mut r = rig(!feature::MRG_RXBUF);
    let f = frame(200, 3);
    r.wire.lock().unwrap().to_guest.push_back(f.clone());
    r.rx.chain(&[(BUF, 2048, true)]);
    assert_eq!(r.dev.process_rx(), RxState::Drained);
    assert_eq!(r.rx.used_elem(0), (0, f.len() as u32));
    let got = rx_data(&r, BUF, f.len());
    assert_eq!(&got[10..12], &[1, 0]);
    assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
}

#[test]
fn mergeable_receive_spans_buffers_and_counts_them() {
    let mut r = rig(u64::MAX);
    let f = frame(3000, 9);
    r.wire.lock().unwrap().to_guest.push_back(f.clone());
    for i in 0..3 {
        r.rx.chain(&[(BUF + i * 0x1000, 1500, true)]);
    }
    assert_eq!(r.dev.process_rx(), RxState::Drained);
    assert_eq!(r.rx.used_idx(), 3);
    let lens: Vec<u32> = (0..3).map(|i| r.rx.used_elem(i).1).collect();
    assert_eq!(lens, vec![1500, 1500, (f.len() - 3000) as u32]);
    let mut got = rx_data(&r, BUF, 1500);
    got.extend(rx_data(&r, BUF + 0x1000, 1500));
    got.extend(rx_data(&r, BUF + 0x2000, f.len() - 3000));
    assert_eq!(&got[10..12], &[3, 0]);
    assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
}

#[test]
fn without_buffers_one_frame_waits_and_the_backend_is_not_drained() {
    let mut r = rig(u64::MAX);
    for i in 0..5 {
        r.wire.lock().unwrap().to_guest.push_back(frame(100, i));
    }
    assert_eq!(r.dev.process_rx(), RxState::NeedBuffers);
    assert!(r.dev.rx_pending());
    assert_eq!(
        r.wire.lock().unwrap().to_guest.len(),
        4,
        "only one frame taken"
    );
    // Again without buffers: nothing more is read.
    assert_eq!(r.dev.process_rx(), RxState::NeedBuffers);
    assert_eq!(r.wire.lock().unwrap().to_guest.len(), 4);
    for i in 0..5 {
        r.rx.chain(&[(BUF + i * 0x1000, 2048, true)]);
    }
    assert_eq!(r.dev.process_rx(), RxState::Drained);
    assert_eq!(r.rx.used_idx(), 5);
    assert!(!r.dev.rx_pending());
}

#[test]
fn too_small_buffer_without_mergeable_drops_the_frame() {
    let mut r = rig(!feature::MRG_RXBUF);
    r.wire.lock().unwrap().to_guest.push_back(frame(3000, 1));
    r.rx.chain(&[(BUF, 1500, true)]);
    assert_eq!(r.dev.process_rx(), RxState::Drained);
    assert_eq!(r.rx.used_elem(0).1, 0);
}

#[test]
fn hostile_receive_buffers_never_panic() {
    let mut r = rig(u64::MAX);
    r.wire.lock().unwrap().to_guest.push_back(frame(100, 1));
    r.wire.lock().unwrap().to_guest.push_back(frame(100, 2));
    r.rx.chain(&[(1 << 40, 2048, true)]); // outside memory
    r.rx.chain(&[(BUF, 0, true)]); // zero length
    r.rx.chain(&[(BUF, 4, true)]); // no room for the header
    r.rx.chain(&[(BUF, 2048, false)]); // read-only buffer
    r.rx.chain(&[(BUF + 0x4000, 2048, true)]);
    r.rx.chain(&[(BUF + 0x8000, 2048, true)]);
    let _ = r.dev.process_rx();
    assert!(r.rx.used_idx() >= 2);
}

#[test]
fn link_changes_reach_config_and_interrupt() {
    let mut r = rig(u64::MAX);
    let mut cfg = [0u8; 2];
    r.dev.read_config(6, &mut cfg);
    assert_eq!(u16::from_le_bytes(cfg) & S_LINK_UP, S_LINK_UP);
    let before = r.irq.count();
    r.wire.lock().unwrap().link = false;
    r.dev.poll_link();
    r.dev.read_config(6, &mut cfg);
    assert_eq!(u16::from_le_bytes(cfg) & S_LINK_UP, 0);
    assert!(r.irq.count() > before);
    r.dev.poll_link();
    assert_eq!(r.irq.count(), before + 1, "no interrupt without a change");
}

#[test]
fn offloads_follow_the_guest_features() {
    let r = rig(u64::MAX);
    assert_eq!(
        r.wire.lock().unwrap().offload,
        Some(tap::offload::CSUM | tap::offload::TSO4 | tap::offload::TSO6 | tap::offload::UFO)
    );
    let r = rig(feature::GUEST_TSO4 | features::VERSION_1);
    assert_eq!(
        r.wire.lock().unwrap().offload,
        Some(0),
        "TSO without CSUM is off"
    );
}

#[test]
fn mac_is_stable_per_name_and_index() {
    assert_eq!(mac_for("web", 0), mac_for("web", 0));
    assert_ne!(mac_for("web", 0), mac_for("web", 1));
    assert_ne!(mac_for("web", 0), mac_for("db", 0));
    assert_eq!(mac_for("x", 0)[..3], [0x52, 0x54, 0x00]);
    let r = rig(u64::MAX);
    let mut mac = [0u8; 6];
    r.dev.read_config(0, &mut mac);
    assert_eq!(mac, mac_for("vm", 0));
}

// Hostile and racing guests: every pass ends, queue errors stop the device.

/// Runs `f` on the rig on another thread; fails the test if it does not return in 5 s.
fn run<T: Send + 'static>(mut r: Rig, f: impl FnOnce(&mut Rig) -> T + Send + 'static) -> (Rig, T) {
    within(5, move || {
        let v = f(&mut r);
        (r, v)
    })
}

/// Writes a 72-byte frame at `at` and makes it available for transmission.
fn post_transmit(r: &mut Rig, at: u64) {
    r.mem.write_slice(&frame(60, 1), GuestAddress(at)).unwrap();
    r.tx.chain(&[(at, 72, false)]);
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; 16 << 20];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

#[test]
fn transmit_avail_index_jump_stops_the_device_and_asks_for_a_reset() {
    let mut r = rig(u64::MAX);
    post_transmit(&mut r, BUF);
    r.tx.set_avail_idx(5000);

    let (r, state) = run(r, |r| r.dev.process_tx());

    assert_eq!(state, TxState::Done);
    assert!(r.vi.needs_reset());
    assert_ne!(r.vi.status() & INT_CONFIG, 0);
    assert_eq!(r.irq.count(), 1);
    assert!(r.wire.lock().unwrap().from_guest.is_empty());
}

#[test]
fn used_ring_writes_that_clobber_avail_idx_stop_the_device() {
    let mem = guest_memory();
    let rx = GuestQueue::new(&mem, 0x1000, QUEUE_SIZE);
    // The transmit available ring starts inside its own used ring: avail.idx is the
    // length field of used entry 0, which completing a transmit sets to 0.
    let used = 0x10_2000;
    let tx = GuestQueue::at(&mem, 0x10_0000, used + 6, used, QUEUE_SIZE);
    let mut r = rig_on(mem, u64::MAX, rx, tx);
    post_transmit(&mut r, BUF);

    let (r, state) = run(r, |r| r.dev.process_tx());

    assert_eq!(state, TxState::Done);
    assert_eq!(
        r.wire.lock().unwrap().from_guest.len(),
        1,
        "the frame went out"
    );
    assert!(
        r.vi.needs_reset(),
        "then avail.idx read 0, behind the device"
    );
}

#[test]
fn transmit_ring_at_address_zero_stops_the_device_instead_of_spinning() {
    let mem = guest_memory();
    let rx = GuestQueue::new(&mem, 0x1000, QUEUE_SIZE);
    let tx = GuestQueue::at(&mem, 0x10_0000, 0, 0x10_2000, QUEUE_SIZE);
    let mut r = rig_on(mem, u64::MAX, rx, tx);
    post_transmit(&mut r, BUF);

    let (r, state) = run(r, |r| r.dev.process_tx());

    assert_eq!(state, TxState::Done);
    assert!(r.vi.needs_reset());
}

#[test]
fn receive_buffers_the_device_cannot_write_are_returned_empty_without_looping() {
    let mut r = rig(u64::MAX);
    for i in 0..3 {
        r.wire.lock().unwrap().to_guest.push_back(frame(100, i));
        r.rx.chain(&[(BUF + u64::from(i) * 0x1000, 2048, false)]); // read-only
    }

    let (mut r, state) = run(r, |r| r.dev.process_rx());

    assert_eq!(state, RxState::NeedBuffers);
    assert_eq!(r.rx.used_idx(), 3);
    assert!((0..3).all(|i| r.rx.used_elem(i) == (u32::from(i), 0)));
    assert!(r.dev.rx_pending());
    assert!(
        !r.vi.needs_reset(),
        "a read-only buffer is not a queue error"
    );
    // A usable buffer takes the frame that waited.
    r.rx.chain(&[(BUF + 0x8000, 2048, true)]);
    assert_eq!(r.dev.process_rx(), RxState::NeedBuffers);
    assert_eq!(r.rx.used_elem(3), (3, 112));
}

#[test]
fn receive_head_index_out_of_range_stops_the_device() {
    let mut r = rig(u64::MAX);
    r.wire.lock().unwrap().to_guest.push_back(frame(100, 1));
    r.rx.publish(QUEUE_SIZE + 5);
    r.rx.publish(QUEUE_SIZE + 6);

    let (r, _) = run(r, |r| r.dev.process_rx());

    assert!(r.vi.needs_reset());
    assert_eq!(r.rx.used_idx(), 0);
}

#[test]
fn a_mergeable_frame_waits_for_enough_buffers_without_spinning() {
    let mut r = rig(u64::MAX);
    let f = frame(3000, 4);
    r.wire.lock().unwrap().to_guest.push_back(f.clone());
    r.rx.chain(&[(BUF, 1500, true)]);

    let (mut r, state) = run(r, |r| r.dev.process_rx());

    assert_eq!(state, RxState::NeedBuffers);
    assert_eq!(r.rx.used_idx(), 0, "the buffer waits with the frame");
    r.rx.chain(&[(BUF + 0x1000, 1500, true)]);
    r.rx.chain(&[(BUF + 0x2000, 1500, true)]);
    assert_eq!(r.dev.process_rx(), RxState::Drained);
    assert_eq!(r.rx.used_idx(), 3);
    let mut got = rx_data(&r, BUF, 1500);
    got.extend(rx_data(&r, BUF + 0x1000, 1500));
    got.extend(rx_data(&r, BUF + 0x2000, f.len() - 3000));
    assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
}

#[test]
fn a_frame_larger_than_a_whole_queue_of_buffers_is_dropped_not_retried_forever() {
    // Found by the virtio_net fuzz target: the frame waited, and every pass yielded.
    let mut r = rig(u64::MAX);
    r.wire.lock().unwrap().to_guest.push_back(frame(20_000, 1));
    let small = frame(100, 2);
    r.wire.lock().unwrap().to_guest.push_back(small.clone());
    for i in 0..u64::from(QUEUE_SIZE) {
        r.rx.chain(&[(BUF + i * 64, 64, true)]); // 16 KiB in all
    }

    let (r, state) = run(r, |r| {
        let first = r.dev.process_rx();
        (first, r.dev.process_rx())
    });

    assert_eq!(state, (RxState::Yielded, RxState::Drained));
    assert!(!r.dev.rx_pending());
    assert_eq!(r.rx.used_idx(), 2, "the small frame took two buffers");
    let mut got = rx_data(&r, BUF, 64);
    got.extend(rx_data(&r, BUF + 64, small.len() - 64));
    assert_eq!(got[VNET_HDR_LEN..], small[VNET_HDR_LEN..]);
}

#[test]
fn a_transmit_pass_is_bounded_while_the_guest_keeps_posting() {
    let mut r = rig(u64::MAX);
    post_transmit(&mut r, BUF);
    let mut guest = r.tx.clone();
    r.wire.lock().unwrap().on_write = Some(Box::new(move || {
        guest.chain(&[(BUF, 72, false)]);
    }));

    let (r, state) = run(r, |r| r.dev.process_tx());

    assert_eq!(state, TxState::Yielded);
    assert_eq!(
        r.wire.lock().unwrap().from_guest.len(),
        usize::from(QUEUE_SIZE)
    );
    assert!(!r.vi.needs_reset());
}

#[test]
fn a_receive_pass_is_bounded_while_frames_and_buffers_keep_coming() {
    let mut r = rig(u64::MAX);
    r.wire.lock().unwrap().endless = Some(frame(100, 1));
    r.rx.chain(&[(BUF, 2048, true)]);
    let mut guest = r.rx.clone();
    r.wire.lock().unwrap().on_read = Some(Box::new(move || {
        guest.chain(&[(BUF, 2048, true)]);
    }));

    let (r, state) = run(r, |r| r.dev.process_rx());

    assert_eq!(state, RxState::Yielded);
    assert!(r.wire.lock().unwrap().reads <= FRAMES_PER_PASS);
    assert_eq!(usize::from(r.rx.used_idx()), FRAMES_PER_PASS);
}

#[test]
fn a_stopped_device_touches_no_guest_memory_until_reset() {
    let mut r = rig(u64::MAX);
    r.tx.set_avail_idx(5000);
    let (mut r, _) = run(r, |r| r.dev.process_tx());
    assert!(r.vi.needs_reset());
    // The guest goes on posting, and frames arrive.
    r.tx.set_avail_idx(0);
    post_transmit(&mut r, BUF);
    r.rx.chain(&[(BUF + 0x1_0000, 2048, true)]);
    r.wire.lock().unwrap().to_guest.push_back(frame(100, 1));
    let before = snapshot(&r.mem);

    let (mut r, (tx, rx)) = run(r, |r| (r.dev.process_tx(), r.dev.process_rx()));

    assert_eq!((tx, rx), (TxState::Done, RxState::Drained));
    assert!(snapshot(&r.mem) == before, "guest memory changed");
    assert!(r.wire.lock().unwrap().from_guest.is_empty());
    // A driver reset and a new start bring it back.
    r.dev.reset();
    r.vi.reset();
    let (rx, rxq) = GuestQueue::new(&r.mem, 0x40_0000, QUEUE_SIZE);
    let (tx, txq) = GuestQueue::new(&r.mem, 0x50_0000, QUEUE_SIZE);
    (r.rx, r.tx) = (rx, tx);
    r.dev.ack_features(u64::MAX);
    r.dev
        .activate(r.mem.clone(), vec![rxq, txq], r.vi.clone())
        .unwrap();
    post_transmit(&mut r, BUF);
    assert_eq!(r.dev.process_tx(), TxState::Done);
    assert_eq!(r.wire.lock().unwrap().from_guest.len(), 1);
}

mod through_mmio {
    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::mmio::MmioTransport;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Does what a driver does up to DRIVER_OK; returns its side of the transmit queue.
    fn driver_start(t: &mut MmioTransport, mem: &GuestMemoryMmap) -> GuestQueue {
        wr(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, 0x24, 1);
        wr(t, 0x20, 1); // VERSION_1
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(t, 0x70, s);
        let mut tx = None;
        for q in 0..2u32 {
            let base = 0x40_0000 + u64::from(q) * 0x1_0000;
            wr(t, 0x30, q);
            wr(t, 0x38, u32::from(QUEUE_SIZE));
            wr(t, 0x80, base as u32);
            wr(t, 0x90, (base + 0x1000) as u32);
            wr(t, 0xa0, (base + 0x2000) as u32);
            wr(t, 0x44, 1);
            let (g, _) = GuestQueue::at(mem, base, base + 0x1000, base + 0x2000, QUEUE_SIZE);
            tx = Some(g);
        }
        wr(t, 0x70, s | status::DRIVER_OK);
        tx.unwrap()
    }

    #[test]
    fn needs_reset_shows_in_the_status_register_and_a_driver_reset_clears_it() {
        let mem = guest_memory();
        let wire = Arc::new(Mutex::new(Wire {
            link: true,
            ..Default::default()
        }));
        let net = Arc::new(Mutex::new(Net::new(Mock(wire.clone()), [2; 6], 1500)));
        let vi = Arc::new(VirtioInterrupt::new(Arc::new(CountingInterrupt::default())));
        let evts = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let mut t = MmioTransport::new(net.clone(), vi, mem.clone(), evts);
        let mut tx = driver_start(&mut t, &mem);
        assert_eq!(rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        tx.set_avail_idx(5000);

        let dev = net.clone();
        within(5, move || dev.lock().unwrap().process_tx());

        assert_ne!(rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(rd(&mut t, 0x60) & INT_CONFIG, 0);
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert_eq!(rd(&mut t, 0x60), 0);
        // Started again, the device serves the queue.
        let mut tx = driver_start(&mut t, &mem);
        assert_eq!(rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        mem.write_slice(&frame(60, 1), GuestAddress(BUF)).unwrap();
        tx.chain(&[(BUF, 72, false)]);
        assert_eq!(net.lock().unwrap().process_tx(), TxState::Done);
        assert_eq!(wire.lock().unwrap().from_guest.len(), 1);
    }
}

#[test]
fn stats_count_frames_bytes_and_drops_each_way() {
    let mut r = rig(!feature::MRG_RXBUF);
    r.mem
        .write_slice(&frame(100, 1), GuestAddress(BUF))
        .unwrap();
    r.tx.chain(&[(BUF, (VNET_HDR_LEN + 100) as u32, false)]);
    r.tx.chain(&[(BUF, 4, false)]); // shorter than the header
    r.dev.process_tx();
    r.wire.lock().unwrap().to_guest.push_back(frame(200, 2));
    r.wire.lock().unwrap().to_guest.push_back(frame(3000, 3)); // no buffer fits it
    r.rx.chain(&[(BUF + 0x10000, 2048, true)]);
    r.rx.chain(&[(BUF + 0x20000, 1500, true)]);
    r.dev.process_rx();
    let s = r.dev.stats();
    assert_eq!((s.tx_packets, s.tx_bytes, s.tx_dropped), (1, 100, 1));
    assert_eq!((s.rx_packets, s.rx_bytes, s.rx_dropped), (1, 200, 1));
}
