//! virtio-net queue logic against a mock backend and mock guest queues.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::test_utils::CountingInterrupt;
use crate::virtio::testing::{GuestQueue, F_NEXT};

#[derive(Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
    blocked: bool,
    link: bool,
    offload: Option<u32>,
    reads: usize,
}

#[derive(Clone)]
struct Mock(Arc<Mutex<Wire>>);

impl NetBackend for Mock {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut w = self.0.lock().unwrap();
        w.reads += 1;
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
}

fn rig(acked: u64) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let (rx, rxq) = GuestQueue::new(&mem, 0x1000, QUEUE_SIZE);
    let (tx, txq) = GuestQueue::new(&mem, 0x10_0000, QUEUE_SIZE);
    let wire = Arc::new(Mutex::new(Wire {
        link: true,
        ..Default::default()
    }));
    let mut dev = Net::new(Mock(wire.clone()), mac_for("vm", 0), 1500);
    dev.ack_features(acked);
    let irq = Arc::new(CountingInterrupt::default());
    let vi = Arc::new(VirtioInterrupt::new(irq.clone()));
    dev.activate(mem.clone(), vec![rxq, txq], vi).unwrap();
    Rig {
        mem,
        rx,
        tx,
        dev,
        wire,
        irq,
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
