use std::sync::{Arc, Mutex};

use super::*;
use crate::pci::config::{COMMAND, COMMAND_MEMORY};
use crate::pci::BarKind;

/// A function with a 64-bit BAR and one capability, recording BAR accesses.
struct TestFn {
    cfg: PciConfig,
    bar_writes: Vec<(u8, u64, Vec<u8>)>,
}

impl TestFn {
    fn new(bar_at: u64) -> Self {
        let mut cfg = PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1041,
            revision: 1,
            class: 0x02_00_00,
            subsystem_vendor: 0x1af4,
            subsystem: 1,
        });
        cfg.add_bar(0, 0x4000, BarKind::Memory64, bar_at).unwrap();
        cfg.add_capability(&[0x09, 0, 4, 0], &[0, 0, 0, 0xff])
            .unwrap();
        TestFn {
            cfg,
            bar_writes: Vec::new(),
        }
    }
}

impl PciDevice for TestFn {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.cfg.read(usize::from(offset), data);
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.cfg.write(usize::from(offset), data);
    }
    fn bar_regions(&self) -> [Option<BarRegion>; BAR_COUNT] {
        self.cfg.bar_regions()
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(bar + offset as u8);
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.bar_writes.push((bar, offset, data.to_vec()));
    }
}

/// A mapper that records what it was told.
#[derive(Default)]
struct Recorder(Mutex<Vec<(u8, Option<BarRegion>)>>);

impl Recorder {
    fn calls(&self) -> Vec<(u8, Option<BarRegion>)> {
        self.0.lock().unwrap().clone()
    }
}

impl BarMapper for Recorder {
    fn map_bar(&self, bar: u8, region: Option<BarRegion>) {
        self.0.lock().unwrap().push((bar, region));
    }
}

fn root_with_device(slot: u8) -> (Arc<PciRoot>, Arc<Mutex<TestFn>>, Arc<Recorder>) {
    let root = Arc::new(PciRoot::new());
    let dev = Arc::new(Mutex::new(TestFn::new(0x1_0000_0000)));
    let rec = Arc::new(Recorder::default());
    root.add_device(slot, dev.clone(), rec.clone()).unwrap();
    (root, dev, rec)
}

fn io_read(io: &mut PciConfigIo, dev: u8, reg: u16, len: usize) -> u32 {
    let addr = 0x8000_0000 | u32::from(dev) << 11 | u32::from(reg & 0xfc);
    io.write(0, &addr.to_le_bytes());
    let mut b = [0u8; 4];
    io.read(4 + u64::from(reg & 3), &mut b[..len]);
    u32::from_le_bytes(b)
}

fn io_write(io: &mut PciConfigIo, dev: u8, reg: u16, len: usize, v: u32) {
    let addr = 0x8000_0000 | u32::from(dev) << 11 | u32::from(reg & 0xfc);
    io.write(0, &addr.to_le_bytes());
    io.write(4 + u64::from(reg & 3), &v.to_le_bytes()[..len]);
}

fn ecam_read(e: &mut PciEcam, dev: u8, reg: u16, len: usize) -> u32 {
    let mut b = [0u8; 4];
    e.read(u64::from(dev) << 15 | u64::from(reg), &mut b[..len]);
    u32::from_le_bytes(b)
}

#[test]
fn the_host_bridge_answers_at_00_00_0_on_both_mechanisms() {
    let root = Arc::new(PciRoot::new());
    let mut io = PciConfigIo::new(root.clone());
    let mut ecam = PciEcam::new(root);
    assert_eq!(io_read(&mut io, 0, 0, 4), 0x0008_1b36);
    assert_eq!(io_read(&mut io, 0, 0x0a, 2), 0x0600, "class: host bridge");
    assert_eq!(ecam_read(&mut ecam, 0, 0x0a, 2), 0x0600);
}

#[test]
fn linux_type_1_probe_reads_back_the_enable_bit() {
    let mut io = PciConfigIo::new(Arc::new(PciRoot::new()));
    io.write(3, &[1]); // outb(0x01, 0xcfb)
    io.write(0, &0x8000_0000u32.to_le_bytes());
    let mut b = [0u8; 4];
    io.read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
}

#[test]
fn empty_slots_other_functions_and_buses_read_all_ones() {
    let (root, _, _) = root_with_device(3);
    let mut ecam = PciEcam::new(root.clone());
    assert_eq!(ecam_read(&mut ecam, 4, 0, 4), 0xffff_ffff);
    let mut b = [0u8; 4];
    ecam.read(3 << 15 | 1 << 12, &mut b); // function 1
    assert_eq!(b, [0xff; 4]);
    ecam.read(1 << 20 | 3 << 15, &mut b); // bus 1
    assert_eq!(b, [0xff; 4]);
    let mut io = PciConfigIo::new(root);
    io.write(0, &0x0000_1800u32.to_le_bytes()); // enable bit clear
    io.read(4, &mut b);
    assert_eq!(b, [0xff; 4]);
}

#[test]
fn ecam_and_port_io_agree_at_every_offset_and_width() {
    let (root, _, _) = root_with_device(5);
    let mut io = PciConfigIo::new(root.clone());
    let mut ecam = PciEcam::new(root);
    for dev in [0u8, 5, 6] {
        for len in [1usize, 2, 4] {
            for reg in (0..256u16).step_by(len) {
                assert_eq!(
                    io_read(&mut io, dev, reg, len),
                    ecam_read(&mut ecam, dev, reg, len),
                    "device {dev} register {reg:#x} width {len}"
                );
            }
        }
    }
}

#[test]
fn a_write_through_one_mechanism_is_read_through_the_other() {
    let (root, _, _) = root_with_device(2);
    let mut io = PciConfigIo::new(root.clone());
    let mut ecam = PciEcam::new(root);
    io_write(&mut io, 2, 0x3c, 1, 0x0b);
    assert_eq!(ecam_read(&mut ecam, 2, 0x3c, 1), 0x0b);
    ecam.write(2 << 15 | 0x10, &0xe000_0000u32.to_le_bytes());
    assert_eq!(io_read(&mut io, 2, 0x10, 4), 0xe000_0004);
}

#[test]
fn decoding_on_moves_and_off_are_told_to_the_mapper() {
    let (root, _, rec) = root_with_device(1);
    assert!(rec.calls().is_empty(), "decoding is off at first");
    let mem = u32::from(COMMAND_MEMORY);
    root.config_write(0, 1, 0, COMMAND as u16, &mem.to_le_bytes()[..2]);
    let at = |addr| Some(BarRegion { addr, len: 0x4000 });
    assert_eq!(rec.calls(), [(0, at(0x1_0000_0000))]);
    root.config_write(0, 1, 0, 0x14, &2u32.to_le_bytes());
    assert_eq!(rec.calls()[1], (0, at(0x2_0000_0000)));
    root.config_write(0, 1, 0, COMMAND as u16, &[0, 0]);
    assert_eq!(rec.calls()[2], (0, None));
    // Writes that change no decoding say nothing.
    root.config_write(0, 1, 0, 0x3c, &[9]);
    assert_eq!(rec.calls().len(), 3);
}

#[test]
fn removing_a_device_unmaps_its_bars_and_frees_the_slot() {
    let (root, _, rec) = root_with_device(1);
    root.config_write(0, 1, 0, COMMAND as u16, &[2, 0]);
    assert_eq!(root.free_slot(), Some(2));
    assert!(root.remove_device(1).is_some());
    assert_eq!(rec.calls().last(), Some(&(0, None)));
    assert_eq!(root.free_slot(), Some(1));
    assert!(root.remove_device(1).is_none());
    let mut b = [0u8; 2];
    root.config_read(0, 1, 0, 0, &mut b);
    assert_eq!(b, [0xff, 0xff]);
}

#[test]
fn slots_are_checked() {
    let (root, dev, rec) = root_with_device(1);
    assert_eq!(
        root.add_device(1, dev.clone(), rec.clone()),
        Err(PciRootError::SlotTaken(1))
    );
    assert_eq!(
        root.add_device(0, dev.clone(), rec.clone()),
        Err(PciRootError::BadSlot(0))
    );
    assert_eq!(
        root.add_device(32, dev, rec),
        Err(PciRootError::BadSlot(32))
    );
}

#[test]
fn bar_windows_pass_accesses_with_their_bar_number() {
    let (_, dev, _) = root_with_device(1);
    let mut w = BarWindow::new(dev.clone(), 0);
    let mut b = [0u8; 2];
    w.read(3, &mut b);
    assert_eq!(b, [3, 3]);
    w.write(8, &[1, 2]);
    assert_eq!(dev.lock().unwrap().bar_writes, [(0, 8, vec![1, 2])]);
}

#[test]
fn hostile_accesses_on_both_mechanisms_never_panic() {
    let (root, _, _) = root_with_device(1);
    let mut io = PciConfigIo::new(root.clone());
    let mut ecam = PciEcam::new(root);
    for width in [1usize, 2, 3, 4, 8] {
        for off in 0..8u64 {
            io.write(off, &vec![0xff; width]);
            io.read(off, &mut vec![0; width]);
        }
        for off in [
            0u64,
            1,
            0xfff,
            1 << 15,
            (1 << 28) - 1,
            1 << 28,
            u64::MAX - 8,
        ] {
            ecam.write(off, &vec![0xff; width]);
            ecam.read(off, &mut vec![0; width]);
        }
    }
}
