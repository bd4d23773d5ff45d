//! Queue notifications wired to eventfds, for both transports: each queue notification
//! address a transport lists ([`QueueNotify`]) becomes a KVM ioeventfd, so a guest write
//! there signals the device's event loop without an exit to Ember. Behind a small trait so
//! the PCI BAR mapper can be tested without /dev/kvm.

use devices::virtio::QueueNotify;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::DeviceError;

/// Where ioeventfds are registered (KVM in the VMM, a recorder in tests).
pub trait IoEvents: Send + Sync {
    /// Signals `evt` on writes at guest address `addr` (carrying `datamatch`, if given).
    fn register(
        &self,
        addr: u64,
        datamatch: Option<u32>,
        evt: &EventFd,
    ) -> Result<(), kvm_ioctls::Error>;
    /// Undoes [`Self::register`].
    fn unregister(
        &self,
        addr: u64,
        datamatch: Option<u32>,
        evt: &EventFd,
    ) -> Result<(), kvm_ioctls::Error>;
}

impl IoEvents for VmFd {
    fn register(
        &self,
        addr: u64,
        datamatch: Option<u32>,
        evt: &EventFd,
    ) -> Result<(), kvm_ioctls::Error> {
        let a = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(v) => self.register_ioevent(evt, &a, v),
            None => self.register_ioevent(evt, &a, NoDatamatch),
        }
    }

    fn unregister(
        &self,
        addr: u64,
        datamatch: Option<u32>,
        evt: &EventFd,
    ) -> Result<(), kvm_ioctls::Error> {
        let a = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(v) => self.unregister_ioevent(evt, &a, v),
            None => self.unregister_ioevent(evt, &a, NoDatamatch),
        }
    }
}

/// Registers one ioeventfd per queue at the transport region placed at `base`; on
/// failure, what was registered is undone.
pub fn register_notifies(
    io: &dyn IoEvents,
    base: u64,
    notifies: &[QueueNotify],
    evts: &[EventFd],
) -> Result<(), DeviceError> {
    for (i, n) in notifies.iter().enumerate() {
        let Some(evt) = evts.get(usize::from(n.queue)) else {
            continue;
        };
        let addr = base + n.offset;
        if let Err(source) = io.register(addr, n.datamatch, evt) {
            unregister_notifies(io, base, &notifies[..i], evts);
            return Err(DeviceError::Ioeventfd { addr, source });
        }
    }
    Ok(())
}

/// Undoes [`register_notifies`].
pub fn unregister_notifies(
    io: &dyn IoEvents,
    base: u64,
    notifies: &[QueueNotify],
    evts: &[EventFd],
) {
    for n in notifies {
        let Some(evt) = evts.get(usize::from(n.queue)) else {
            continue;
        };
        let addr = base + n.offset;
        if let Err(e) = io.unregister(addr, n.datamatch, evt) {
            log::warn!("cannot unregister the ioeventfd at {addr:#x}: {e}");
        }
    }
}

/// `n` non-blocking eventfds, one per queue.
pub fn queue_eventfds(n: usize) -> Result<Vec<EventFd>, DeviceError> {
    (0..n)
        .map(|_| EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).map_err(DeviceError::EventFd))
        .collect()
}

/// Second handles on the same eventfds.
pub fn clone_eventfds(evts: &[EventFd]) -> Result<Vec<EventFd>, DeviceError> {
    evts.iter()
        .map(|e| e.try_clone().map_err(DeviceError::EventFd))
        .collect()
}
