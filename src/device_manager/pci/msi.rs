//! MSI-X through KVM: one GSI per vector, routed to the vector's message with
//! KVM_SET_GSI_ROUTING, and one irqfd per GSI, so a device raises a vector with one
//! eventfd write. KVM_SET_GSI_ROUTING replaces the whole table, so the VM's table is kept
//! here: the IOAPIC and PIC routes KVM starts with, plus every MSI route.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::pci::msix::{MsiMessage, MsiSink};
use devices::virtio::RateLimitedLog;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device_manager::DeviceError;

/// GSIs of the IOAPIC's pins; MSI routes start after them.
const IOAPIC_PINS: u32 = 24;
/// GSIs handed to MSI vectors: 24 to 1023.
const MSI_GSI_END: u32 = 1024;

/// KVM's own routes: GSI n to IOAPIC pin n (0-23) and to PIC pin n % 8 (0-15), as
/// KVM_CREATE_IRQCHIP sets them up.
fn irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let entry = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut v: Vec<_> = (0..IOAPIC_PINS)
        .map(|g| entry(g, KVM_IRQCHIP_IOAPIC, g))
        .collect();
    v.extend((0..16).map(|g| {
        let chip = if g < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        entry(g, chip, g % 8)
    }));
    v
}

/// The whole routing table: KVM's own routes and these MSI routes.
fn routing_table(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let mut v = irqchip_routes();
    v.extend(msi.iter().map(|(gsi, m)| {
        let mut e = kvm_irq_routing_entry {
            gsi: *gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi = kvm_irq_routing_msi {
            address_lo: m.address as u32,
            address_hi: (m.address >> 32) as u32,
            data: m.data,
            ..Default::default()
        };
        e
    }));
    v
}

struct Routes {
    msi: BTreeMap<u32, MsiMessage>,
    free: BTreeSet<u32>,
}

/// The VM's GSI routing table and the pool of GSIs for MSI vectors.
pub struct MsiRoutes {
    vm: Arc<VmFd>,
    inner: Mutex<Routes>,
}

impl MsiRoutes {
    /// KVM's initial table, every MSI GSI free.
    pub fn new(vm: Arc<VmFd>) -> Self {
        MsiRoutes {
            vm,
            inner: Mutex::new(Routes {
                msi: BTreeMap::new(),
                free: (IOAPIC_PINS..MSI_GSI_END).collect(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Routes> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `n` free GSIs, or None if the pool has fewer.
    fn alloc(&self, n: usize) -> Option<Vec<u32>> {
        let mut r = self.lock();
        if r.free.len() < n {
            return None;
        }
        Some((0..n).filter_map(|_| r.free.pop_first()).collect())
    }

    /// Gives `gsis` back, their routes removed.
    fn free(&self, gsis: &[u32]) {
        let mut r = self.lock();
        let routed = gsis.iter().any(|g| r.msi.contains_key(g));
        for g in gsis {
            r.msi.remove(g);
            r.free.insert(*g);
        }
        if routed {
            if let Err(e) = self.commit(&r) {
                log::warn!("msi: cannot remove routes: {e}");
            }
        }
    }

    /// Routes `gsi` to `msg` (None: no route).
    fn set(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), kvm_ioctls::Error> {
        let mut r = self.lock();
        let changed = match msg {
            Some(m) => r.msi.insert(gsi, m) != Some(m),
            None => r.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&r)?;
        }
        Ok(())
    }

    fn commit(&self, r: &Routes) -> Result<(), kvm_ioctls::Error> {
        let table = KvmIrqRouting::from_entries(&routing_table(&r.msi))
            .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        self.vm.set_gsi_routing(&table)
    }
}

/// The MSI-X vectors of one function: a GSI and an irqfd each.
pub struct KvmMsiSink {
    vm: Arc<VmFd>,
    routes: Arc<MsiRoutes>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
    log: Mutex<RateLimitedLog>,
}

impl KvmMsiSink {
    /// `vectors` GSIs with an irqfd each.
    pub fn new(vm: Arc<VmFd>, routes: Arc<MsiRoutes>, vectors: u16) -> Result<Self, DeviceError> {
        let gsis = routes
            .alloc(usize::from(vectors))
            .ok_or(DeviceError::NoMsiGsi)?;
        let mut sink = KvmMsiSink {
            vm,
            routes,
            gsis: Vec::new(),
            irqfds: Vec::new(),
            log: Mutex::new(RateLimitedLog::new()),
        };
        for (i, gsi) in gsis.iter().copied().enumerate() {
            let registered = EventFd::new(EFD_NONBLOCK)
                .map_err(DeviceError::EventFd)
                .and_then(|evt| {
                    sink.vm
                        .register_irqfd(&evt, gsi)
                        .map(|()| evt)
                        .map_err(|source| DeviceError::Irqfd { irq: gsi, source })
                });
            match registered {
                Ok(evt) => {
                    sink.gsis.push(gsi);
                    sink.irqfds.push(evt);
                }
                Err(e) => {
                    sink.routes.free(&gsis[i..]);
                    sink.release();
                    return Err(e);
                }
            }
        }
        Ok(sink)
    }

    /// Unregisters the irqfds and gives the GSIs back (the device is going away).
    pub fn release(&self) {
        for (evt, gsi) in self.irqfds.iter().zip(&self.gsis) {
            if let Err(e) = self.vm.unregister_irqfd(evt, *gsi) {
                log::warn!("cannot unregister the irqfd of GSI {gsi}: {e}");
            }
        }
        self.routes.free(&self.gsis);
    }
}

impl MsiSink for KvmMsiSink {
    fn route(&self, vector: u16, msg: Option<MsiMessage>) {
        let Some(gsi) = self.gsis.get(usize::from(vector)) else {
            return;
        };
        if let Err(e) = self.routes.set(*gsi, msg) {
            self.log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .warn(format_args!("msi: KVM refused the route of GSI {gsi}: {e}"));
        }
    }

    fn trigger(&self, vector: u16) {
        if let Some(evt) = self.irqfds.get(usize::from(vector)) {
            if let Err(e) = evt.write(1) {
                self.log
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .warn(format_args!("msi: cannot raise vector {vector}: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_kvms_irqchip_routes_and_adds_msi_routes() {
        let mut msi = BTreeMap::new();
        msi.insert(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        let t = routing_table(&msi);
        assert_eq!(t.len(), 24 + 16 + 1);
        let ioapic = t
            .iter()
            .filter(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY: irqchip entries hold the irqchip member of the union.
            .filter(|e| unsafe { e.u.irqchip.irqchip } == KVM_IRQCHIP_IOAPIC)
            .count();
        assert_eq!(ioapic, 24);
        // SAFETY: entry 8 is the PIC slave route of GSI 8 (after 24 IOAPIC routes).
        let pic8 = unsafe { t[24 + 8].u.irqchip };
        assert_eq!((pic8.irqchip, pic8.pin), (KVM_IRQCHIP_PIC_SLAVE, 0));
        let last = t.last().unwrap();
        assert_eq!((last.gsi, last.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: an MSI entry holds the msi member of the union.
        let m = unsafe { last.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }

    #[test]
    fn kvm_takes_the_routes_and_an_irqfd_per_vector_and_all_come_back_on_release() {
        let kvm = kvm_ioctls::Kvm::new().unwrap_or_else(|e| {
            panic!("this test is about KVM and needs /dev/kvm, which cannot be opened: {e}")
        });
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let routes = Arc::new(MsiRoutes::new(vm.clone()));
        let sink = KvmMsiSink::new(vm.clone(), routes.clone(), 3).unwrap();
        assert_eq!(sink.gsis, [24, 25, 26]);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };

        routes.set(sink.gsis[1], Some(msg)).unwrap();
        sink.trigger(1);
        routes.set(sink.gsis[1], None).unwrap();
        sink.release();

        let all = (MSI_GSI_END - IOAPIC_PINS) as usize;
        assert_eq!(
            routes.alloc(all).map(|g| g.len()),
            Some(all),
            "every GSI is free"
        );
        assert!(routes.lock().msi.is_empty());
    }
}
