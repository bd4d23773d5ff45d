use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use super::*;

#[test]
fn modes_parse_and_print_back() {
    for m in [Mode::On, Mode::Strict, Mode::Log, Mode::Off] {
        assert_eq!(m.to_string().parse::<Mode>(), Ok(m));
    }
    assert!("maybe".parse::<Mode>().unwrap_err().contains("on, strict"));
}

#[test]
fn every_role_compiles_in_every_mode_within_the_kernels_limit() {
    for role in [Role::Vmm, Role::Vcpu] {
        for mode in [Mode::On, Mode::Strict, Mode::Log] {
            let p = compile(role, mode).unwrap().unwrap();
            assert!(p.len() < 4096, "{role} {mode}: {} instructions", p.len());
        }
        assert!(compile(role, Mode::Off).unwrap().is_none());
    }
}

/// Runs this test binary again as a child that only runs `probe` with `scenario`.
fn probe_child(scenario: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp::tests::probe",
            "--ignored",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env("EMBER_SECCOMP_PROBE", scenario)
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(code) }
}

/// Makes the call a probe scenario names; its return value.
fn make_call(call: &str) -> i32 {
    match call {
        // SAFETY: socket(2) takes no memory.
        "socket" => unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) },
        // SAFETY: as above.
        "unixsocket" => unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) },
        "execmap" => {
            // SAFETY: a new anonymous mapping (never used); no existing memory changes.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                -1
            } else {
                0
            }
        }
        // SAFETY: an ioctl without an argument on fd -1.
        "createvm" => unsafe { libc::ioctl(-1, ioctls::KVM_CREATE_VM()) },
        // SAFETY: as above.
        "kvmrun" => unsafe { libc::ioctl(-1, ioctls::KVM_RUN()) },
        // SAFETY: an ioctl with an integer argument on fd -1.
        "tapoffload" => unsafe { libc::ioctl(-1, ioctls::TUNSETOFFLOAD, 0) },
        "thread" => i32::from(std::thread::spawn(|| 7).join().ok() != Some(7)),
        "execve" => {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            // SAFETY: a NUL-terminated path and a NULL-terminated argv that outlive the call.
            unsafe { libc::execv(argv[0], argv.as_ptr()) }
        }
        other => panic!("bad scenario {other}"),
    }
}

/// Not a test on its own: the child half of the tests below (`EMBER_SECCOMP_PROBE` says
/// what to do under which filter); it ends the process itself.
#[test]
#[ignore = "run by the seccomp tests as a child process"]
fn probe() {
    let Ok(scenario) = std::env::var("EMBER_SECCOMP_PROBE") else {
        return;
    };
    let (mode, role) = match scenario.split('-').take(2).collect::<Vec<_>>()[..] {
        [m, r] => (
            m.parse::<Mode>().unwrap(),
            if r == "vmm" { Role::Vmm } else { Role::Vcpu },
        ),
        _ => panic!("bad scenario {scenario}"),
    };
    set_mode(mode);
    install(role, "probe").unwrap();
    if scenario.ends_with("-inherited") {
        // A thread under its maker's filter only: the line names it as the kernel does.
        let t = std::thread::Builder::new().name("helper".into());
        let call = scenario.split('-').nth(2).unwrap().to_string();
        let rc = t.spawn(move || make_call(&call)).unwrap().join().unwrap();
        exit_now(rc);
    }
    let rc = make_call(scenario.split('-').nth(2).unwrap());
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    exit_now(if rc < 0 { 100 + errno.min(100) } else { 0 });
}

#[test]
fn a_blocked_call_prints_one_line_and_exits_148() {
    let (status, err) = probe_child("on-vcpu-socket");
    assert_eq!(status.code(), Some(148), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("seccomp"))
        .unwrap_or_default();
    assert_eq!(
        line,
        "ember: seccomp: thread 'probe' made system call 41 (socket), which its filter does \
         not allow; the VM is stopped (exit status 148)"
    );
}

#[test]
fn a_thread_without_its_own_filter_is_named_as_the_kernel_knows_it() {
    let (status, err) = probe_child("on-vmm-unixsocket-inherited");
    assert_eq!(status.code(), Some(148), "{err}");
    assert!(err.contains("thread 'helper' made system call 41"), "{err}");
}

#[test]
fn ioctls_are_filtered_by_request() {
    let (status, err) = probe_child("on-vcpu-createvm");
    assert_eq!(status.code(), Some(148), "{err}");
    assert!(err.contains("(ioctl)"), "{err}");
    // KVM_RUN is allowed: it reaches the kernel, which answers EBADF for fd -1; so is
    // TUNSETOFFLOAD (virtio-net starts on the vCPU thread that wrote DRIVER_OK).
    for call in ["kvmrun", "tapoffload"] {
        let (status, err) = probe_child(&format!("on-vcpu-{call}"));
        assert_eq!(status.code(), Some(100 + libc::EBADF), "{call}: {err}");
    }
}

#[test]
fn no_thread_may_map_executable_memory() {
    for role in ["vcpu", "vmm"] {
        let (status, err) = probe_child(&format!("on-{role}-execmap"));
        assert_eq!(status.code(), Some(148), "{role}: {err}");
        assert!(err.contains("(mmap)"), "{err}");
    }
}

#[test]
fn the_vmm_makes_threads_but_only_datagram_inet_sockets() {
    let (status, err) = probe_child("on-vmm-thread");
    assert_eq!(status.code(), Some(0), "{err}");
    let (status, err) = probe_child("on-vmm-unixsocket");
    assert_eq!(status.code(), Some(148), "{err}");
}

#[test]
fn strict_kills_without_a_handler_and_log_lets_the_call_through() {
    let (status, err) = probe_child("strict-vmm-execve");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?} {err}");
    assert!(!err.contains("ember: seccomp"), "{err}");
    let (status, err) = probe_child("log-vcpu-socket");
    assert_eq!(status.code(), Some(0), "{err}");
}
