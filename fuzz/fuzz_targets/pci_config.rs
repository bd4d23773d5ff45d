//! Any sequence of guest accesses to a PCI root bus holding two virtio-pci functions:
//! configuration space through ports 0xcf8/0xcfc and through ECAM at any offset and width,
//! and BAR 0 of either function (common configuration, ISR, device configuration,
//! notifications, MSI-X table and pending bits), interleaved with device interrupts.
//! Nothing may panic; after every access the functions keep their identity and capability
//! chain, every BAR the root says decodes has the function's BAR size, and what the mapper
//! was told is where the function's BARs decode.
//!
//! Input: a list of operations of 9 bytes each: kind, then target/width byte, then a
//! little-endian u16 offset and a little-endian u32 value (the rest is ignored).
#![no_main]

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::pci::config::BAR_COUNT;
use devices::pci::msix::{MsiMessage, MsiSink};
use devices::pci::{BarMapper, BarRegion, BarWindow, PciConfigIo, PciDevice, PciEcam, PciRoot};
use devices::virtio::pci::{VirtioPciDevice, BAR_SIZE};
use devices::virtio::queue::QueuePosition;
use devices::virtio::{
    features, ActivateError, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use devices::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio_queue::Queue;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A device with two queues that keeps the interrupt it is given.
struct Dummy {
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    running: bool,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | 0xff
    }
    fn ack_features(&mut self, _: u64) {}
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(
        &mut self,
        _: GuestMemoryMmap,
        _: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.interrupt = Some(interrupt);
        self.running = true;
        Ok(())
    }
    fn queue_positions(&self) -> Vec<QueuePosition> {
        if self.running {
            vec![QueuePosition::default(); 2]
        } else {
            Vec::new()
        }
    }
    fn reset(&mut self) {
        self.running = false;
    }
}

struct NullSink;
impl MsiSink for NullSink {
    fn route(&self, _: u16, msg: Option<MsiMessage>) {
        if let Some(m) = msg {
            assert!(m.is_interrupt(), "a non-interrupt address was routed");
        }
    }
    fn trigger(&self, _: u16) {}
}

/// Remembers where it was told each BAR decodes.
#[derive(Default)]
struct Mapper(Mutex<[Option<BarRegion>; BAR_COUNT]>);

impl BarMapper for Mapper {
    fn map_bar(&self, bar: u8, region: Option<BarRegion>) {
        let mut m = self.0.lock().unwrap();
        assert_ne!(m[usize::from(bar)], region, "told of a change that is none");
        if let Some(r) = region {
            assert_eq!(r.len, BAR_SIZE);
        }
        m[usize::from(bar)] = region;
    }
}

struct Function {
    dev: Arc<Mutex<VirtioPciDevice>>,
    virtio: Arc<Mutex<Dummy>>,
    mapper: Arc<Mapper>,
    identity: [u8; 64],
}

fn function(root: &PciRoot, slot: u8, mem: &GuestMemoryMmap) -> Function {
    let virtio = Arc::new(Mutex::new(Dummy {
        interrupt: None,
        running: false,
    }));
    let evts = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let dev = VirtioPciDevice::new(
        virtio.clone(),
        Arc::new(NullSink),
        mem.clone(),
        evts,
        0x1_0000_0000 * u64::from(slot),
    )
    .unwrap();
    let dev = Arc::new(Mutex::new(dev));
    let mapper = Arc::new(Mapper::default());
    root.add_device(slot, dev.clone(), mapper.clone()).unwrap();
    let mut identity = [0u8; 64];
    read_caps(&dev, &mut identity);
    Function {
        dev,
        virtio,
        mapper,
        identity,
    }
}

/// The identity dwords and the capability IDs in chain order (at most 48).
fn read_caps(dev: &Arc<Mutex<VirtioPciDevice>>, out: &mut [u8; 64]) {
    let mut d = dev.lock().unwrap();
    let mut b = [0u8; 4];
    d.config_read(0, &mut b);
    out[..4].copy_from_slice(&b);
    d.config_read(8, &mut b);
    out[4..8].copy_from_slice(&b);
    let mut at = [0u8; 1];
    d.config_read(0x34, &mut at);
    let mut i = 8;
    while at[0] != 0 && i < 56 {
        let mut id = [0u8; 1];
        d.config_read(u16::from(at[0]), &mut id);
        out[i] = id[0];
        i += 1;
        d.config_read(u16::from(at[0]) + 1, &mut at);
    }
    assert_eq!(at[0], 0, "the capability chain does not end");
}

fn width(b: u8) -> usize {
    [1, 2, 4, 8, 3][usize::from(b % 5)]
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
    let root = Arc::new(PciRoot::new());
    let funcs = [function(&root, 1, &mem), function(&root, 2, &mem)];
    let mut io = PciConfigIo::new(root.clone());
    let mut ecam = PciEcam::new(root.clone());
    let mut bars: Vec<BarWindow> = funcs
        .iter()
        .map(|f| BarWindow::new(f.dev.clone(), 0))
        .collect();
    for op in data.chunks_exact(9).take(4096) {
        let (kind, arg) = (op[0] % 8, op[1]);
        let off = u16::from_le_bytes([op[2], op[3]]);
        let value =
            u64::from(u32::from_le_bytes([op[4], op[5], op[6], op[7]])) | u64::from(op[8]) << 32;
        let w = width(arg >> 4);
        let bytes = value.to_le_bytes();
        let mut buf = [0u8; 8];
        let f = usize::from(arg & 1);
        match kind {
            0 => io.write(u64::from(off % 8), &bytes[..w]),
            1 => io.read(u64::from(off % 8), &mut buf[..w]),
            2 => ecam.write(
                u64::from(arg % 4) << 15 | u64::from(off & 0xfff),
                &bytes[..w],
            ),
            3 => ecam.read(
                u64::from(arg % 4) << 15 | u64::from(off & 0xfff),
                &mut buf[..w],
            ),
            4 => bars[f].write(u64::from(off), &bytes[..w]),
            5 => bars[f].read(u64::from(off), &mut buf[..w]),
            6 => {
                let irq = funcs[f].virtio.lock().unwrap().interrupt.clone();
                if let Some(irq) = irq {
                    irq.trigger(match arg >> 1 & 3 {
                        0 => VirtioInterruptType::Config,
                        n => VirtioInterruptType::Queue(u16::from(n - 1)),
                    });
                }
            }
            _ => {
                let irq = funcs[f].virtio.lock().unwrap().interrupt.clone();
                if let Some(irq) = irq {
                    irq.signal_needs_reset();
                }
            }
        }
        for func in &funcs {
            let mut now = [0u8; 64];
            read_caps(&func.dev, &mut now);
            assert_eq!(now, func.identity, "identity or capability chain changed");
            let regions = func.dev.lock().unwrap().bar_regions();
            assert_eq!(
                *func.mapper.0.lock().unwrap(),
                regions,
                "the mapper is out of step"
            );
        }
    }
});
