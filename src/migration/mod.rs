//! Moving a running VM to another Ember process, on this host or another: `ember migrate`
//! on the source, `ember run --incoming` (or the API's receive-migration) on the
//! destination.
//!
//! **Source.** A thread named `migration` connects, says what VM comes ([`Offer`]), and
//! copies guest memory while the VM runs: every page first, then, pass after pass, the pages
//! written since the previous pass — those KVM's dirty log shows the guest wrote, OR'ed with
//! those Ember wrote itself (virtio used rings, block reads, received frames; marked in the
//! guest memory's bitmap). When the pages left would take no longer than the allowed
//! downtime to send (or at once without `--live`), it asks the VM's main thread to stop
//! the VM: the main thread pauses the vCPUs, lets the devices finish what they hold,
//! captures the VM's state (exactly a snapshot's), and waits while the thread sends the
//! last pages and the state. Then the hand-over ([`source`]): the destination checks what it
//! got, the source closes its disks, the destination opens them and builds the VM, the
//! source says go and ends. Until it says go, any failure leaves the source VM running
//! with its disks reopened; after, it is gone. So there are never two running copies.
//!
//! **Destination** ([`incoming`]). Listens, refuses what is not an Ember migration stream
//! (or comes without the right key), checks the offer (vCPUs, CPU features, disks, NIC
//! backends), receives pages straight into new guest memory, then the state; it opens disks
//! only once the source closed them, and runs the VM only on go. Anything else discards
//! what it received, and it listens again.
//!
//! The stream ([`wire`]) is versioned, checksummed, and with `--auth-key` authenticated
//! (HMAC-SHA256, no encryption). Plain TCP is for trusted networks only.

pub mod compat;
pub mod incoming;
pub mod source;
pub mod storage;
pub mod wire;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{DiskConfig, NetConfig, VmConfig};

/// The downtime allowed by default (QEMU's and Cloud Hypervisor's).
pub const DEFAULT_DOWNTIME_MS: u64 = 300;

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The address is not `tcp:HOST:PORT`.
    #[error("'{0}' is not a migration address; give tcp:HOST:PORT")]
    Address(String),
    /// The address does not resolve.
    #[error("{0}: cannot resolve")]
    Resolve(String, #[source] std::io::Error),
    /// Connecting, listening or accepting failed.
    #[error("{what} {addr}")]
    Net {
        /// What failed.
        what: &'static str,
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The stream failed.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// The VM cannot go there, or cannot be taken.
    #[error("{0}")]
    Refused(String),
    /// Dirty-page logging.
    #[error("dirty-page logging")]
    Dirty(#[source] crate::dirty::DirtyError),
    /// A copied disk.
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    /// The user cancelled it (`ember domjobabort`).
    #[error("cancelled")]
    Cancelled,
    /// `--timeout` ran out before the pages left fit the downtime.
    #[error(
        "did not converge within {0} s (the guest dirties memory faster than it can be \
         sent)"
    )]
    Timeout(u64),
    /// The VM's main thread could not do its part.
    #[error("{0}")]
    Vm(String),
}

/// `tcp:HOST:PORT` (QEMU's spelling; `[v6addr]` in brackets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl Endpoint {
    /// Parses `tcp:HOST:PORT`.
    pub fn parse(s: &str) -> Result<Self, MigrationError> {
        let bad = || MigrationError::Address(s.to_string());
        let rest = s.strip_prefix("tcp:").ok_or_else(bad)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(['[', ']', '/', ' ']) {
            return Err(bad());
        }
        let port = port.parse().map_err(|_| bad())?;
        Ok(Endpoint {
            host: host.to_string(),
            port,
        })
    }

    /// The addresses it names.
    pub fn resolve(&self) -> Result<Vec<SocketAddr>, MigrationError> {
        let shown = self.to_string();
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| MigrationError::Resolve(shown.clone(), e))?
            .collect();
        if addrs.is_empty() {
            return Err(MigrationError::Resolve(
                shown,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        Ok(addrs)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "tcp:[{}]:{}", self.host, self.port)
        } else {
            write!(f, "tcp:{}:{}", self.host, self.port)
        }
    }
}

fn default_downtime() -> u64 {
    DEFAULT_DOWNTIME_MS
}

/// `PUT /ember/migrate`: send this VM away. Answered when the migration ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `tcp:HOST:PORT`.
    pub url: String,
    /// Copy memory while the VM runs (pre-copy); without it the VM is paused first.
    #[serde(default)]
    pub live: bool,
    /// The longest pause allowed for the last pages and the state (live).
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Give up (the VM stays here) when it has not converged after this many seconds.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Also send each qcow2 disk's own (overlay) clusters; the base must exist there.
    #[serde(default)]
    pub copy_storage: bool,
    /// A file holding the shared key both ends authenticate with.
    #[serde(default)]
    pub auth_key: Option<PathBuf>,
    /// Send at most this many MiB per second.
    #[serde(default)]
    pub bandwidth_mib: Option<u64>,
    /// Also send a checksum of all guest memory at the stop; the destination compares.
    #[serde(default)]
    pub verify: bool,
}

/// Bytes of guest memory per `--verify` checksum.
pub const VERIFY_CHUNK: usize = 1 << 20;

/// A CRC-32 of each [`VERIFY_CHUNK`] of every region of `mem`, in order.
pub fn memory_checksums(mem: &devices::GuestMemoryMmap) -> Result<Vec<u32>, String> {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let mut out = Vec::new();
    let mut buf = vec![0u8; VERIFY_CHUNK];
    for r in mem.iter() {
        let mut at = 0u64;
        while at < r.len() {
            let n = (r.len() - at).min(VERIFY_CHUNK as u64) as usize;
            mem.read_slice(
                &mut buf[..n],
                vm_memory::GuestAddress(r.start_addr().0 + at),
            )
            .map_err(|e| format!("cannot read guest memory: {e}"))?;
            out.push(crc32fast::hash(&buf[..n]));
            at += n as u64;
        }
    }
    Ok(out)
}

/// Where `theirs` (the source's checksums) and `ours` differ: a refusal naming the first
/// guest address, or None when they agree.
pub fn compare_checksums(
    mem: &devices::GuestMemoryMmap,
    theirs: &[u32],
    ours: &[u32],
) -> Option<String> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    if theirs.len() != ours.len() {
        return Some(format!(
            "--verify: {} checksums for {} MiB of memory",
            theirs.len(),
            ours.len()
        ));
    }
    let starts: Vec<u64> = mem
        .iter()
        .flat_map(|r| {
            (0..r.len())
                .step_by(VERIFY_CHUNK)
                .map(move |o| r.start_addr().0 + o)
        })
        .collect();
    let bad: Vec<u64> = theirs
        .iter()
        .zip(ours)
        .zip(&starts)
        .filter(|((a, b), _)| a != b)
        .map(|(_, at)| *at)
        .collect();
    bad.first().map(|first| {
        format!(
            "--verify: guest memory differs from the source's in {} MiB, the first at {first:#x}",
            bad.len()
        )
    })
}

/// `PUT /ember/receive-migration` (before a VM is configured): wait for one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    /// `tcp:ADDR:PORT` to listen on.
    pub url: String,
    /// A file holding the shared key.
    #[serde(default)]
    pub auth_key: Option<PathBuf>,
    /// NIC backends here, by id.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// Disk images here, by id.
    #[serde(default)]
    pub disk: Vec<DiskConfig>,
}

/// A qcow2 disk whose own clusters are sent (`--copy-storage`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopiedDisk {
    /// Virtual size.
    pub size: u64,
    /// Its backing file, as its header names it.
    pub backing: Option<String>,
    /// The backing file's format.
    pub backing_format: Option<String>,
}

/// The first message: the VM that comes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    /// The source's Ember.
    pub ember_version: String,
    /// The VM's configuration.
    pub config: VmConfig,
    /// Guest RAM regions: (guest address, bytes).
    pub regions: Vec<(u64, u64)>,
    /// The CPU features the guest was given (names as /proc/cpuinfo has them).
    pub cpu_features: Vec<String>,
    /// Memory is copied while the VM runs.
    pub live: bool,
    /// Disks whose data comes along, by index in `config.disks` (None: shared storage).
    pub copied: Vec<Option<CopiedDisk>>,
}

/// Where a migration job is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// No job ran.
    #[default]
    None,
    /// This Ember waits for a VM to come (`--incoming`).
    Incoming,
    /// Connecting and agreeing.
    Setup,
    /// Copying memory while the VM runs (or, not live, while it is paused).
    Active,
    /// The VM is stopped; the last pages and the state go out.
    Stopping,
    /// Handing the disks and the VM over.
    Handover,
    /// The VM runs on the destination.
    Completed,
    /// It failed; the VM goes on here.
    Failed,
    /// Cancelled; the VM goes on here.
    Cancelled,
}

impl JobState {
    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::None
                | JobState::Incoming
                | JobState::Completed
                | JobState::Failed
                | JobState::Cancelled
        )
    }
}

/// What `ember domjobinfo` shows (`GET /ember/migration`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobInfo {
    /// Where it is.
    pub state: JobState,
    /// Pre-copy while running.
    pub live: bool,
    /// `tcp:HOST:PORT`.
    pub destination: String,
    /// Since it started.
    pub elapsed_ms: u64,
    /// Passes over memory so far (1 is the full copy).
    pub iteration: u64,
    /// Guest RAM.
    pub ram_total: u64,
    /// Bytes of guest pages sent (a page sent twice counts twice).
    pub ram_sent: u64,
    /// Everything sent on the connection.
    pub bytes_sent: u64,
    /// Bytes of dirty pages still to send.
    pub remaining: u64,
    /// How fast the guest dirties memory, bytes per second (last pass).
    pub dirty_rate: u64,
    /// How fast pages go out, bytes per second (last pass).
    pub bandwidth: u64,
    /// The pause the pages left would take, by the last pass's rate.
    pub expected_downtime_ms: u64,
    /// The pause the guest had (the VM stopped to the destination's go), once known.
    pub downtime_ms: Option<u64>,
    /// Disk bytes sent (`--copy-storage`).
    pub disk_sent: u64,
    /// Why it failed.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_addresses_parse_and_print_back() {
        let e = Endpoint::parse("tcp:127.0.0.1:4444").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 4444));
        assert_eq!(e.to_string(), "tcp:127.0.0.1:4444");
        let v6 = Endpoint::parse("tcp:[::1]:80").unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "tcp:[::1]:80");
        assert_eq!(Endpoint::parse("tcp:host:1").unwrap().host, "host");
    }

    #[test]
    fn other_addresses_are_refused_with_the_form_to_use() {
        for bad in [
            "",
            "127.0.0.1:4444",
            "unix:/x",
            "tcp:",
            "tcp:host",
            "tcp::4444",
            "tcp:host:99999",
            "tcp:host:-1",
            "tcp:a b:1",
        ] {
            let e = Endpoint::parse(bad).unwrap_err();
            assert!(e.to_string().contains("tcp:HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_migrate_request_takes_qemus_default_downtime() {
        let r: MigrateRequest = serde_json::from_str(r#"{"url":"tcp:h:1"}"#).unwrap();
        assert_eq!(r.downtime_ms, 300);
        assert!(!r.live && !r.copy_storage && r.timeout_s.is_none());
        assert!(serde_json::from_str::<MigrateRequest>(r#"{"url":"x","bogus":1}"#).is_err());
    }
}
