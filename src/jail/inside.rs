//! The jailed process's side: new mount, IPC and UTS namespaces (and the given network
//! namespace), a root that holds only what the VM needs, `pivot_root` into it, rlimits,
//! and the switch to the jail's user and group.
//!
//! The root is a tmpfs mounted over `CHROOT_BASE/ember/ID/root` in the new mount
//! namespace (the host sees an empty directory there): each file is bind-mounted onto an
//! empty file at its own path (read-only unless the VM writes it), the state directory
//! and snapshot store of this VM are bind-mounted at theirs, and /dev holds fresh device
//! nodes (kvm, net/tun, null) owned by the jail's user. Taps given to the VM appear as
//! empty directories in /sys/class/net so the VM sees that they exist (and does not try
//! to create or bring them up, which needs privileges); nothing else of /sys, and no /proc.
//! The tmpfs is made read-only once filled.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::files::JailFile;
use super::JailError;

/// What the jail's root holds.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The host directory the root is mounted on.
    pub root: PathBuf,
    /// Files, each at its own path.
    pub files: Vec<JailFile>,
    /// Host directories the VM writes, each at its own path (state dir, snapshot store).
    pub dirs: Vec<PathBuf>,
    /// Device nodes recreated (same numbers), owned by the jail's user.
    pub devices: Vec<PathBuf>,
    /// Taps the VM attaches.
    pub taps: Vec<String>,
    /// The working directory inside.
    pub cwd: PathBuf,
    /// The jail's user and group.
    pub uid: u32,
    /// The jail's group.
    pub gid: u32,
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| JailError::Setup(format!("{}: a path with a NUL byte", p.display())))
}

/// `rc` as a result; `what` names the step in the error.
fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> Result<(), JailError> {
    if rc < 0 {
        Err(JailError::Os(what(), std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let src_c = src.map(cstr).transpose()?;
    let dst_c = cstr(dst)?;
    let fs_c = fstype.map(|f| CString::new(f).unwrap_or_default());
    let data_c = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or NULL
    // where mount(2) allows it.
    let rc = unsafe {
        libc::mount(
            ptr(&src_c),
            dst_c.as_ptr(),
            ptr(&fs_c),
            flags,
            ptr(&data_c) as *const libc::c_void,
        )
    };
    check(rc, || {
        format!(
            "mount {} on {}",
            src.unwrap_or(Path::new("-")).display(),
            dst.display()
        )
    })
}

fn io(what: &Path) -> impl FnOnce(std::io::Error) -> JailError + '_ {
    move |e| JailError::Os(what.display().to_string(), e)
}

/// `inside` (absolute) under the jail root.
fn under(root: &Path, inside: &Path) -> PathBuf {
    root.join(inside.strip_prefix("/").unwrap_or(inside))
}

/// New mount, IPC and UTS namespaces; the network namespace at `netns`, if given.
pub fn enter_namespaces(id: &str, netns: Option<&Path>) -> Result<(), JailError> {
    if let Some(path) = netns {
        let f = fs::File::open(path).map_err(io(path))?;
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a descriptor we hold open for the call.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        check(rc, || format!("--netns {}: setns", path.display()))?;
    }
    // SAFETY: unshare(2) with namespace flags only.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) };
    check(rc, || "unshare(mount, ipc, uts)".into())?;
    // SAFETY: a pointer and length of a live byte string.
    let rc = unsafe { libc::sethostname(id.as_ptr() as *const libc::c_char, id.len()) };
    check(rc, || "sethostname".into())?;
    // Nothing mounted from here on reaches the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
}

/// Creates `dir` and its parents inside the root (mode 0755).
fn make_dirs(dir: &Path) -> Result<(), JailError> {
    fs::create_dir_all(dir).map_err(io(dir))
}

fn bind_file(root: &Path, f: &JailFile) -> Result<(), JailError> {
    let dst = under(root, &f.path);
    if let Some(parent) = dst.parent() {
        make_dirs(parent)?;
    }
    fs::File::create(&dst).map_err(io(&dst))?;
    mount(Some(&f.path), &dst, None, libc::MS_BIND, None)?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
    if !f.writable {
        flags |= libc::MS_RDONLY;
    }
    mount(None, &dst, None, flags, None)
}

fn bind_dir(root: &Path, dir: &Path) -> Result<(), JailError> {
    let dst = under(root, dir);
    make_dirs(&dst)?;
    mount(Some(dir), &dst, None, libc::MS_BIND, None)?;
    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
    mount(None, &dst, None, flags, None)
}

/// A new node with the numbers of host device `dev`, owned by the jail's user.
fn make_device(root: &Path, dev: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    let meta = fs::metadata(dev).map_err(io(dev))?;
    let dst = under(root, dev);
    if let Some(parent) = dst.parent() {
        make_dirs(parent)?;
    }
    let c = cstr(&dst)?;
    // SAFETY: mknod and chown on a NUL-terminated path that outlives the calls.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o660, meta.rdev()) };
    check(rc, || format!("mknod {}", dst.display()))?;
    // SAFETY: as above.
    let rc = unsafe { libc::chown(c.as_ptr(), uid, gid) };
    check(rc, || format!("chown {}", dst.display()))
}

/// Fills the jail's root: tmpfs, files, directories, devices, taps; then read-only.
pub fn build_root(l: &Layout) -> Result<(), JailError> {
    let fs_flags = libc::MS_NOSUID;
    mount(
        None,
        &l.root,
        Some("tmpfs"),
        fs_flags,
        Some("mode=0755,size=1m"),
    )?;
    for f in &l.files {
        bind_file(&l.root, f)?;
    }
    for d in &l.dirs {
        bind_dir(&l.root, d)?;
    }
    for dev in &l.devices {
        make_device(&l.root, dev, l.uid, l.gid)?;
    }
    for tap in &l.taps {
        make_dirs(&l.root.join("sys/class/net").join(tap))?;
    }
    make_dirs(&under(&l.root, &l.cwd))?;
    fs::set_permissions(&l.root, fs::Permissions::from_mode(0o755)).map_err(io(&l.root))?;
    mount(
        None,
        &l.root,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | fs_flags,
        Some("mode=0755"),
    )
}

/// Makes `root` the process's `/` (the old root detached), then enters `cwd`.
pub fn pivot(root: &Path, cwd: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(io(root))?;
    // pivot_root(".", ".") stacks the old root on the new one; detaching "." then drops
    // it without needing a directory for it in the (read-only) new root.
    let dot = c".";
    // SAFETY: two NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    check(rc as libc::c_int, || "pivot_root".into())?;
    // SAFETY: as above.
    let rc = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
    check(rc, || "detaching the old root".into())?;
    std::env::set_current_dir("/").map_err(io(Path::new("/")))?;
    std::env::set_current_dir(cwd).map_err(io(cwd))
}

/// Checks that each tap exists in this (the jail's) network namespace.
pub fn check_taps(taps: &[String]) -> Result<(), JailError> {
    for t in taps {
        if devices::virtio::net::tap::interface_up(t).is_err() {
            return Err(JailError::Setup(format!(
                "tap {t} does not exist in the jail's network namespace; create it first \
                 (ip tuntap add {t} mode tap)"
            )));
        }
    }
    Ok(())
}

/// Sets the open-files and file-size limits.
pub fn set_rlimits(nofile: u64, fsize: Option<u64>) -> Result<(), JailError> {
    let set = |res, v: u64, name: &str| {
        let lim = libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        // SAFETY: setrlimit with a live struct.
        let rc = unsafe { libc::setrlimit(res, &lim) };
        check(rc, || format!("setrlimit {name}"))
    };
    set(libc::RLIMIT_NOFILE, nofile, "nofile")?;
    if let Some(f) = fsize {
        set(libc::RLIMIT_FSIZE, f, "fsize")?;
    }
    Ok(())
}

/// Becomes `uid`:`gid` with no supplementary groups; as root's capabilities go with the
/// user switch, nothing privileged is left.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    // SAFETY: setgroups with an empty list; setresgid/setresuid take plain ids.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), || "setgroups".into())?;
        check(libc::setresgid(gid, gid, gid), || {
            format!("setresgid {gid}")
        })?;
        check(libc::setresuid(uid, uid, uid), || {
            format!("setresuid {uid}")
        })?;
    }
    // SAFETY: getuid/getgid have no preconditions.
    let (u, g) = unsafe { (libc::getuid(), libc::getgid()) };
    if (u, g) != (uid, gid) {
        return Err(JailError::Setup(format!(
            "still {u}:{g} after switching to {uid}:{gid}"
        )));
    }
    Ok(())
}
