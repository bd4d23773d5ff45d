//! Ember: a small type-2 hypervisor on Linux `/dev/kvm`.
//!
//! The binary (`main.rs`) parses the command line into a [`config::VmConfig`], builds a
//! [`vmm::Vmm`] and runs it. The VMM core lives here; the devices and the boot code are the
//! `devices` and `boot` crates.

pub mod api;
pub mod ci_watch;
pub mod cli;
pub mod config;
pub mod console;
pub mod definitions;
pub mod device_manager;
pub mod dirty;
pub mod host;
pub mod img;
pub mod jail;
pub mod logger;
pub mod memory;
pub mod migration;
pub mod net;
pub mod run_state;
pub mod seccomp;
pub mod session;
pub mod signals;
pub mod snapshot;
pub mod test_runner;
pub mod vcpu;
pub mod vmdir;
pub mod vmm;
pub mod vstate;

/// Formats an error with all its causes on one line: `outer: cause: root cause`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open '/x'")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_joins_causes_once() {
        let e = Outer(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            error_chain(&e),
            "cannot open '/x': No such file or directory (os error 2)"
        );
    }
}
