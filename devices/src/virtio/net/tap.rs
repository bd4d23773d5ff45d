//! TAP devices: opened by name (attached if they exist, created if allowed) or taken as an
//! already open descriptor, with the virtio-net header (IFF_VNET_HDR) so checksum and
//! segmentation offloads pass through.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::NetBackend;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// TUNSETOFFLOAD flags.
pub mod offload {
    /// The guest takes packets with partial checksums.
    pub const CSUM: u32 = 0x01;
    /// ... and TCPv4 segmentation.
    pub const TSO4: u32 = 0x02;
    /// ... and TCPv6 segmentation.
    pub const TSO6: u32 = 0x04;
    /// ... and UDP fragmentation.
    pub const UFO: u32 = 0x10;
}

/// Size of the virtio-net header we and the tap use (virtio_net_hdr_v1).
pub const VNET_HDR_LEN: usize = 12;

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// A name too long for an interface.
    #[error("'{0}' is not a valid interface name (1 to 15 characters)")]
    BadName(String),
    /// TUNSETIFF failed (the tap does not exist and cannot be created, or is busy).
    #[error("cannot attach to tap '{name}' (does it exist? creating one needs CAP_NET_ADMIN)")]
    Attach {
        /// Interface name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A descriptor that is not a usable tap.
    #[error("descriptor {fd} is not a tap opened with IFF_TAP|IFF_VNET_HDR")]
    BadFd {
        /// The descriptor.
        fd: RawFd,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An ioctl on the tap failed.
    #[error("{what} on the tap failed")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq`: a name and a 24-byte union (flags, index, ...).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(TapError::BadName(name.into()));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        Ok(req)
    }

    fn flags(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_flags(&mut self, flags: libc::c_short) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    fn index(&self) -> libc::c_int {
        libc::c_int::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }

    fn set_index(&mut self, index: libc::c_int) {
        self.data[..4].copy_from_slice(&index.to_ne_bytes());
    }

    fn name(&self) -> String {
        // SAFETY: name is NUL-terminated (IFNAMSIZ bytes, the kernel or new() wrote at most
        // IFNAMSIZ - 1 characters).
        unsafe { CStr::from_ptr(self.name.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: the caller passes a request whose argument is `*mut T` for a live T.
    if unsafe { libc::ioctl(fd, req, arg) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_val(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the request takes an integer argument by value.
    if unsafe { libc::ioctl(fd, req, arg) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An open tap.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to tap `name`, creating it if it does not exist (needs CAP_NET_ADMIN).
    pub fn open(name: &str) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(name)?;
        req.set_flags(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        ioctl_ptr(file.as_raw_fd(), TUNSETIFF, &mut req).map_err(|source| TapError::Attach {
            name: name.into(),
            source,
        })?;
        Self::finish(file, req.name())
    }

    /// Takes over an open tap descriptor (from a manager such as libvirt).
    pub fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        let mut req = IfReq::new("x")?;
        ioctl_ptr(fd, TUNGETIFF, &mut req).map_err(|source| TapError::BadFd { fd, source })?;
        if req.flags() & IFF_TAP == 0 || req.flags() & IFF_VNET_HDR == 0 {
            return Err(TapError::BadFd {
                fd,
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        // SAFETY: the caller hands the descriptor over; from here this File owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: F_SETFL on the descriptor we now own.
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        Self::finish(file, req.name())
    }

    fn finish(file: File, name: String) -> Result<Self, TapError> {
        let size = VNET_HDR_LEN as libc::c_int;
        ioctl_ptr(
            file.as_raw_fd(),
            TUNSETVNETHDRSZ,
            &size as *const _ as *mut libc::c_int,
        )
        .map_err(|source| TapError::Ioctl {
            what: "TUNSETVNETHDRSZ",
            source,
        })?;
        Ok(Tap { file, name })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, parts: &[IoSlice]) -> io::Result<usize> {
        self.file.write_vectored(parts)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        ioctl_val(
            self.file.as_raw_fd(),
            TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    }

    fn link_up(&self) -> bool {
        interface_up(&self.name).unwrap_or(true)
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn control_socket() -> io::Result<File> {
    // SAFETY: a plain datagram socket for interface ioctls; owned by the File.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sock is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(sock) })
}

fn ifreq(name: &str) -> io::Result<IfReq> {
    IfReq::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Whether interface `name` is administratively up (IFF_UP), from SIOCGIFFLAGS.
pub fn interface_up(name: &str) -> io::Result<bool> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req)?;
    Ok(req.flags() & libc::IFF_UP as libc::c_short != 0)
}

/// Brings interface `name` up (as `ip link set NAME up`).
pub fn set_interface_up(name: &str) -> io::Result<()> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req)?;
    req.set_flags(req.flags() | libc::IFF_UP as libc::c_short);
    ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req)
}

/// Whether an interface called `name` exists.
pub fn interface_exists(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && Path::new("/sys/class/net").join(name).exists()
}

/// Makes interface `port` a port of bridge `bridge` (as `ip link set PORT master BRIDGE`).
pub fn add_to_bridge(bridge: &str, port: &str) -> io::Result<()> {
    const SIOCBRADDIF: libc::c_ulong = 0x89a2;
    let sock = control_socket()?;
    let mut req = ifreq(port)?;
    ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req)?;
    let mut breq = ifreq(bridge)?;
    breq.set_index(req.index());
    ioctl_ptr(sock.as_raw_fd(), SIOCBRADDIF, &mut breq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(IfReq::new("tap0").is_ok());
        assert!(matches!(IfReq::new(""), Err(TapError::BadName(_))));
        assert!(IfReq::new("a-name-far-too-long").is_err());
        assert!(IfReq::new("a/b").is_err());
    }

    #[test]
    fn loopback_is_up_and_unknown_interfaces_are_errors() {
        assert!(interface_up("lo").unwrap());
        assert!(interface_up("no-such-if0").is_err());
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        assert!(matches!(Tap::from_fd(fd), Err(TapError::BadFd { .. })));
    }
}
