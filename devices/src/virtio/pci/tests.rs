use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::*;
use crate::pci::msix::tests::RecordingSink;
use crate::pci::msix::MsiMessage;
use crate::virtio::queue::QueuePosition;
use crate::virtio::{features, status, ActivateError};

/// A device with `n` queues of 16 entries that records what the transport did to it.
struct Dummy {
    sizes: Vec<u16>,
    acked: u64,
    activated: usize,
    resets: usize,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    queues: Vec<Queue>,
    config: [u8; 8],
}

impl Dummy {
    fn new(n: usize) -> Self {
        Dummy {
            sizes: vec![16; n],
            acked: 0,
            activated: 0,
            resets: 0,
            interrupt: None,
            queues: Vec::new(),
            config: [1, 2, 3, 4, 5, 6, 7, 8],
        }
    }
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | 1
    }
    fn ack_features(&mut self, f: u64) {
        self.acked = f;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(
        &mut self,
        _: GuestMemoryMmap,
        q: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.activated = q.len();
        self.interrupt = Some(interrupt);
        self.queues = q;
        Ok(())
    }
    fn queue_positions(&self) -> Vec<QueuePosition> {
        self.queues
            .iter()
            .map(|q| QueuePosition {
                next_avail: q.next_avail(),
                next_used: q.next_used(),
            })
            .collect()
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.queues.clear();
    }
}

struct Rig {
    t: VirtioPciDevice,
    dev: Arc<Mutex<Dummy>>,
    sink: Arc<RecordingSink>,
    evts: Vec<EventFd>,
}

const BAR_AT: u64 = 0x1_0000_0000;

fn rig(queues: usize) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let dev = Arc::new(Mutex::new(Dummy::new(queues)));
    let sink = Arc::new(RecordingSink::default());
    let evts: Vec<EventFd> = (0..queues)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let ours = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let t = VirtioPciDevice::new(dev.clone(), sink.clone(), mem, ours, BAR_AT).unwrap();
    Rig { t, dev, sink, evts }
}

impl Rig {
    fn cfg(&mut self, off: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.t.config_read(off as u16, &mut b[..len]);
        u32::from_le_bytes(b)
    }
    fn set_cfg(&mut self, off: usize, len: usize, v: u32) {
        self.t.config_write(off as u16, &v.to_le_bytes()[..len]);
    }
    fn rd(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.t.bar_read(BAR, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn wr(&mut self, off: u64, len: usize, v: u64) {
        self.t.bar_write(BAR, off, &v.to_le_bytes()[..len]);
    }

    /// Capabilities by walking the list: (id, offset).
    fn capabilities(&mut self) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        let mut at = self.cfg(0x34, 1) as usize;
        while at != 0 && out.len() < 48 {
            out.push((self.cfg(at, 1) as u8, at));
            at = self.cfg(at + 1, 1) as usize;
        }
        out
    }

    /// The virtio structure of `cfg_type`: (bar, offset, length).
    fn virtio_cap(&mut self, cfg_type: u8) -> (u8, u32, u32) {
        let at = self
            .capabilities()
            .into_iter()
            .filter(|(id, _)| *id == CAP_VENDOR)
            .map(|(_, at)| at)
            .find(|at| self.cfg(at + 3, 1) as u8 == cfg_type)
            .expect("capability present");
        (
            self.cfg(at + 4, 1) as u8,
            self.cfg(at + 8, 4),
            self.cfg(at + 12, 4),
        )
    }

    fn msix_cap(&mut self) -> usize {
        self.capabilities()
            .into_iter()
            .find(|(id, _)| *id == CAP_MSIX)
            .unwrap()
            .1
    }

    fn status(&mut self) -> u32 {
        self.rd(COMMON + 0x14, 1) as u32
    }

    /// What Linux's virtio_pci_modern does from probe to DRIVER_OK: enable the function,
    /// MSI-X with one vector per queue plus one for configuration changes, reset,
    /// negotiate, set up each queue, and start.
    fn linux_start(&mut self) {
        self.set_cfg(0x04, 2, 0x6); // memory decoding, bus master
        let cap = self.msix_cap();
        let vectors = (self.cfg(cap + 2, 2) & 0x7ff) + 1;
        self.set_cfg(cap + 2, 2, u32::from(CONTROL_ENABLE | CONTROL_MASK));
        for v in 0..u64::from(vectors) {
            self.wr(MSIX_TABLE + v * 16, 8, 0xfee0_0000);
            self.wr(MSIX_TABLE + v * 16 + 8, 4, 0x40 + v);
            self.wr(MSIX_TABLE + v * 16 + 12, 4, 0);
        }
        self.set_cfg(cap + 2, 2, u32::from(CONTROL_ENABLE));
        self.wr(COMMON + 0x14, 1, 0);
        assert_eq!(self.status(), 0);
        let s = status::ACKNOWLEDGE | status::DRIVER;
        self.wr(COMMON + 0x14, 1, u64::from(s));
        self.wr(COMMON, 4, 1);
        let high = self.rd(COMMON + 4, 4);
        self.wr(COMMON, 4, 0);
        let low = self.rd(COMMON + 4, 4);
        let offered = high << 32 | low;
        for (sel, word) in [(0u64, offered as u32), (1, (offered >> 32) as u32)] {
            self.wr(COMMON + 0x08, 4, sel);
            self.wr(COMMON + 0x0c, 4, u64::from(word));
        }
        self.wr(COMMON + 0x14, 1, u64::from(s | status::FEATURES_OK));
        assert_ne!(self.status() & status::FEATURES_OK, 0);
        self.wr(COMMON + 0x10, 2, 0);
        assert_eq!(self.rd(COMMON + 0x10, 2), 0);
        let n = self.rd(COMMON + 0x12, 2);
        for q in 0..n {
            self.setup_queue(q);
        }
        self.wr(
            COMMON + 0x14,
            1,
            u64::from(s | status::FEATURES_OK | status::DRIVER_OK),
        );
    }

    fn setup_queue(&mut self, q: u64) {
        let base = 0x1000 * (q + 1);
        self.wr(COMMON + 0x16, 2, q);
        let size = self.rd(COMMON + 0x18, 2);
        assert_eq!(size, 16);
        self.wr(COMMON + 0x18, 2, size);
        self.wr(COMMON + 0x20, 4, base);
        self.wr(COMMON + 0x24, 4, 0);
        self.wr(COMMON + 0x28, 4, base + 0x100);
        self.wr(COMMON + 0x2c, 4, 0);
        self.wr(COMMON + 0x30, 4, base + 0x200);
        self.wr(COMMON + 0x34, 4, 0);
        self.wr(COMMON + 0x1a, 2, q + 1);
        assert_eq!(self.rd(COMMON + 0x1a, 2), q + 1);
        assert_eq!(self.rd(COMMON + 0x1e, 2), q, "notify offset");
        self.wr(COMMON + 0x1c, 2, 1);
    }
}

#[test]
fn identity_bar_and_capabilities_are_what_linux_looks_for() {
    let mut r = rig(2);
    assert_eq!(r.cfg(0, 4), 0x1042_1af4, "virtio, modern block device");
    assert_eq!(r.cfg(8, 1), 1, "revision 1");
    assert_eq!(r.cfg(0x3d, 1), 0, "no INTx pin");
    assert_eq!(r.cfg(0x10, 4), (BAR_AT as u32) | 0x4);
    assert_eq!(r.cfg(0x14, 4), (BAR_AT >> 32) as u32);
    let ids: Vec<u8> = r.capabilities().iter().map(|c| c.0).collect();
    assert_eq!(ids, [CAP_MSIX, 9, 9, 9, 9, 9]);
    assert_eq!(r.virtio_cap(CFG_COMMON), (0, 0, 0x38));
    assert_eq!(r.virtio_cap(CFG_NOTIFY), (0, 0x3000, 8));
    assert_eq!(r.virtio_cap(CFG_ISR), (0, 0x1000, 1));
    assert_eq!(r.virtio_cap(CFG_DEVICE), (0, 0x2000, 0x1000));
    let cap = r.msix_cap();
    assert_eq!(r.cfg(cap + 2, 2) & 0x7ff, 2, "three vectors");
    assert_eq!(r.cfg(cap + 4, 4), 0x4000);
    assert_eq!(r.cfg(cap + 8, 4), 0x6000);
    // The notify capability's multiplier follows it.
    let notify = r
        .capabilities()
        .into_iter()
        .find(|(id, at)| *id == 9 && r.cfg(at + 3, 1) == 2)
        .unwrap()
        .1;
    assert_eq!(r.cfg(notify + 16, 4), NOTIFY_MULTIPLIER);
}

#[test]
fn the_bar_sizes_as_one_32_kib_64_bit_region() {
    let mut r = rig(1);
    r.set_cfg(0x10, 4, 0xffff_ffff);
    r.set_cfg(0x14, 4, 0xffff_ffff);
    let size = u64::from(r.cfg(0x10, 4) & !0xf) | u64::from(r.cfg(0x14, 4)) << 32;
    assert_eq!(!size + 1, BAR_SIZE);
}

#[test]
fn linux_modern_driver_sequence_starts_the_device_with_a_vector_per_queue() {
    let mut r = rig(2);
    r.linux_start();
    let d = r.dev.lock().unwrap();
    assert_eq!(d.activated, 2);
    assert_eq!(d.acked, features::VERSION_1 | features::RING_EVENT_IDX | 1);
    let irq = d.interrupt.clone().unwrap();
    drop(d);
    assert_eq!(r.status(), 0xf);

    irq.trigger(VirtioInterruptType::Queue(1));
    irq.trigger(VirtioInterruptType::Queue(0));
    irq.trigger(VirtioInterruptType::Config);

    assert_eq!(r.sink.sent(), [2, 1, 0]);
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x42,
    };
    assert!(r.sink.routes().contains(&(2, Some(msg))));
    assert_eq!(
        r.rd(ISR, 1),
        u64::from(INT_CONFIG),
        "config bit set, queue bits not"
    );
    assert_eq!(r.rd(ISR, 1), 0, "reading ISR clears it");
}

#[test]
fn notify_writes_that_reach_the_transport_signal_their_queue() {
    let mut r = rig(2);
    r.wr(NOTIFY + 4, 2, 1);
    assert_eq!(r.evts[1].read().unwrap(), 1);
    assert!(r.evts[0].read().is_err(), "queue 0 was not signalled");
    r.wr(NOTIFY + 0x400, 2, 0); // no such queue
    r.wr(NOTIFY + 2, 2, 0); // between two queues' addresses
    assert!(r.evts[0].read().is_err());
    let notifies = r.t.queue_notifies();
    assert_eq!(notifies.len(), 2);
    assert_eq!(notifies[1].offset, NOTIFY + 4);
    assert_eq!(notifies[1].datamatch, None);
}

#[test]
fn vectors_outside_the_table_read_back_as_no_vector() {
    let mut r = rig(1);
    r.wr(COMMON + 0x10, 2, 1);
    assert_eq!(r.rd(COMMON + 0x10, 2), 1, "vector 1 exists");
    r.wr(COMMON + 0x10, 2, 2);
    assert_eq!(r.rd(COMMON + 0x10, 2), u64::from(NO_VECTOR));
    r.wr(COMMON + 0x16, 2, 0);
    r.wr(COMMON + 0x1a, 2, 0x1234);
    assert_eq!(r.rd(COMMON + 0x1a, 2), u64::from(NO_VECTOR));
    r.wr(COMMON + 0x16, 2, 9); // no such queue
    assert_eq!(r.rd(COMMON + 0x18, 2), 0, "size 0: no queue");
    r.wr(COMMON + 0x1a, 2, 0);
    assert_eq!(r.rd(COMMON + 0x1a, 2), u64::from(NO_VECTOR));
}

#[test]
fn without_msix_a_queue_interrupt_only_sets_the_isr_bit() {
    let mut r = rig(1);
    r.t.interrupt().trigger(VirtioInterruptType::Queue(0));
    assert!(r.sink.sent().is_empty());
    assert_eq!(r.rd(ISR, 1), u64::from(INT_USED_RING));
}

#[test]
fn a_masked_vector_is_sent_when_the_driver_unmasks_it() {
    let mut r = rig(1);
    r.linux_start();
    let irq = r.t.interrupt();
    r.wr(MSIX_TABLE + 16 + 12, 4, 1);
    irq.trigger(VirtioInterruptType::Queue(0));
    assert!(r.sink.sent().is_empty());
    assert_eq!(r.rd(MSIX_PBA, 8), 0b10);
    r.wr(MSIX_TABLE + 16 + 12, 4, 0);
    assert_eq!(r.sink.sent(), [1]);
}

#[test]
fn a_driver_reset_clears_vectors_and_isr_and_wakes_every_queue() {
    let mut r = rig(2);
    r.linux_start();
    for e in &r.evts {
        e.read().unwrap(); // the reset at probe woke them
    }
    r.t.interrupt().signal_needs_reset();
    assert_ne!(r.status() & status::DEVICE_NEEDS_RESET, 0);
    r.wr(COMMON + 0x14, 1, 0);
    assert_eq!(r.status(), 0);
    assert_eq!(r.rd(COMMON + 0x10, 2), u64::from(NO_VECTOR));
    assert_eq!(r.rd(ISR, 1), 0);
    assert_eq!(r.dev.lock().unwrap().resets, 2, "at probe and now");
    for e in &r.evts {
        assert_eq!(e.read().unwrap(), 1);
    }
}

#[test]
fn device_needing_a_reset_says_so_through_the_config_vector() {
    let mut r = rig(1);
    r.linux_start();
    r.t.interrupt().signal_needs_reset();
    r.t.interrupt().signal_needs_reset();
    assert_eq!(r.sink.sent(), [0], "one config interrupt");
}

#[test]
fn queue_registers_are_frozen_before_features_ok_and_after_driver_ok() {
    let mut r = rig(1);
    r.wr(COMMON + 0x16, 2, 0);
    r.wr(COMMON + 0x18, 2, 4);
    assert_eq!(r.rd(COMMON + 0x18, 2), 16, "before FEATURES_OK");
    r.linux_start();
    r.wr(COMMON + 0x16, 2, 0);
    r.wr(COMMON + 0x20, 4, 0x8000);
    assert_eq!(r.rd(COMMON + 0x20, 4), 0x1000, "after DRIVER_OK");
    assert_eq!(r.rd(COMMON + 0x20, 8), 0x1000, "as one qword too");
}

#[test]
fn the_config_access_capability_reaches_the_bar() {
    let mut r = rig(1);
    let cap = r
        .capabilities()
        .into_iter()
        .find(|(id, at)| *id == 9 && r.cfg(at + 3, 1) == u32::from(CFG_PCI))
        .unwrap()
        .1;
    r.set_cfg(cap + 4, 1, 0);
    r.set_cfg(cap + 8, 4, 0x12); // num_queues
    r.set_cfg(cap + 12, 4, 2);
    assert_eq!(r.cfg(cap + 16, 2), 1);
    r.set_cfg(cap + 8, 4, 0x16); // queue_select
    r.set_cfg(cap + 16, 2, 5);
    assert_eq!(r.rd(COMMON + 0x16, 2), 5);
    // A window outside the BAR or of a bad width does nothing.
    r.set_cfg(cap + 8, 4, 0xffff_fffe);
    r.set_cfg(cap + 16, 2, 0);
    r.set_cfg(cap + 12, 4, 3);
    r.cfg(cap + 16, 4);
}

#[test]
fn device_configuration_is_read_through_the_bar() {
    let mut r = rig(1);
    assert_eq!(r.rd(DEVICE + 2, 2), 0x0403);
}

#[test]
fn hostile_accesses_at_every_offset_and_width_never_panic() {
    let mut r = rig(2);
    r.linux_start();
    for len in [1usize, 2, 3, 4, 8] {
        for off in (0..BAR_SIZE + 16).step_by(1) {
            let mut b = vec![0u8; len];
            r.t.bar_read(BAR, off, &mut b);
            if !(COMMON..COMMON + COMMON_LEN).contains(&off) {
                r.t.bar_write(BAR, off, &vec![0xff; len]);
            }
        }
        for off in 0..4096u16 {
            let mut b = vec![0u8; len];
            r.t.config_read(off, &mut b);
            r.t.config_write(off, &vec![0xff; len]);
        }
    }
    r.t.bar_read(1, 0, &mut [0; 4]);
    r.t.bar_write(5, 0, &[0; 4]);
    r.t.bar_read(BAR, u64::MAX - 2, &mut [0; 4]);
    r.t.bar_write(BAR, u64::MAX, &[0; 4]);
    assert_eq!(r.cfg(0, 4), 0x1042_1af4, "identity unchanged");
}

#[test]
fn common_config_writes_of_every_width_never_panic() {
    let mut r = rig(2);
    for len in [1usize, 2, 4, 8] {
        for off in 0..COMMON_LEN {
            r.wr(COMMON + off, len, u64::MAX);
            r.rd(COMMON + off, len);
        }
    }
    r.wr(COMMON + 0x14, 1, 0);
    assert_eq!(r.status(), 0);
}

#[test]
fn a_running_device_restores_running_with_queue_positions_and_msix() {
    let mut a = rig(2);
    a.linux_start();
    {
        let mut d = a.dev.lock().unwrap();
        d.queues[1].set_next_avail(7);
        d.queues[1].set_next_used(6);
    }
    a.wr(MSIX_TABLE + 12, 4, 1); // mask the config vector
    a.t.interrupt().trigger(VirtioInterruptType::Config);
    let mut b = rig(2);

    crate::persist::assert_round_trip(&a.t, &mut b.t);

    let d = b.dev.lock().unwrap();
    assert_eq!(d.activated, 2);
    assert_eq!((d.queues[1].next_avail(), d.queues[1].next_used()), (7, 6));
    drop(d);
    assert_eq!(b.rd(MSIX_PBA, 8), 1, "config vector pending");
    assert!(b.sink.routes().iter().any(|(v, m)| *v == 2 && m.is_some()));
    assert_eq!(b.t.bar_regions()[0].map(|r| r.addr), Some(BAR_AT));
    b.t.interrupt().trigger(VirtioInterruptType::Queue(1));
    assert_eq!(b.sink.sent(), [2]);
}

#[test]
fn a_function_that_never_ran_restores_without_starting() {
    let a = rig(1);
    let mut b = rig(1);
    crate::persist::assert_round_trip(&a.t, &mut b.t);
    assert_eq!(b.dev.lock().unwrap().activated, 0);
}

#[test]
fn hostile_saved_states_are_refused() {
    let mut a = rig(2);
    a.linux_start();
    let good = a.t.save();
    let mut b = rig(2);
    let mut bad = good.clone();
    bad.queue_vectors.push(0);
    assert!(b.t.restore(&bad).is_err());
    let mut bad = good.clone();
    bad.config_vector = 9;
    assert!(b.t.restore(&bad).is_err());
    let mut bad = good.clone();
    bad.msix.table.pop();
    assert!(b.t.restore(&bad).is_err());
    let mut bad = good.clone();
    bad.config.regs.truncate(10);
    assert!(b.t.restore(&bad).is_err());
    let mut bad = good;
    bad.common.queues[0].desc_table = 1 << 40;
    assert!(b.t.restore(&bad).is_err());
    let mut c = rig(1);
    assert!(c.t.restore(&a.t.save()).is_err(), "another device's state");
}
