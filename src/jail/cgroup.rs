//! `ember jail --cgroup FILE=VALUE,...`: the jailed VM's own cgroup, with limits.
//!
//! Keys are cgroup v2 file names (`cpu.max`, `memory.max`, `pids.max`, ...). Each goes to
//! the hierarchy that holds its controller (the part before the first dot):
//! - cgroup v2 (a `cgroup2` mount whose root lists the controller in `cgroup.controllers`):
//!   the group is `MOUNT/ember/ID`, the controller enabled in the `cgroup.subtree_control`
//!   of `MOUNT` and `MOUNT/ember` (v2 lets no group with processes pass controllers down,
//!   so the jail's groups do not hang under the jailer's own group);
//! - else a cgroup v1 hierarchy of that controller (hosts that still mount them, such as
//!   hybrid systemd hosts): the group is `MOUNT/OWN/ember/ID` under the jailer's own group
//!   `OWN` in that hierarchy (so limits set above the jailer still hold), and the common v2
//!   names are written as their v1 files: `cpu.max` as `cpu.cfs_period_us` and
//!   `cpu.cfs_quota_us`, `memory.max` as `memory.limit_in_bytes`; other names are written
//!   as given (`pids.max` is the same in both; v1 names such as `cpu.shares` work too, and
//!   a name the group does not have fails when it is written, naming the file).
//!
//! The jailer creates the groups, writes the limits, moves the VM process in, and removes
//! the groups once the VM ends.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Errors setting up cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A malformed `--cgroup` item.
    #[error("--cgroup: '{0}' is not FILE=VALUE (e.g. cpu.max=50000 100000)")]
    Syntax(String),
    /// No hierarchy has the controller.
    #[error("--cgroup {file}: no cgroup hierarchy here has the '{controller}' controller")]
    NoController {
        /// The file.
        file: String,
        /// Its controller.
        controller: String,
    },
    /// Reading or writing the cgroup file system failed.
    #[error("cgroup {path}")]
    Io {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// One `FILE=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// The (v2) file name.
    pub file: String,
    /// What is written to it.
    pub value: String,
}

/// Parses `FILE=VALUE[,FILE=VALUE...]`.
pub fn parse_settings(text: &str) -> Result<Vec<Setting>, CgroupError> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (file, value) = item
                .split_once('=')
                .ok_or_else(|| CgroupError::Syntax(item.to_string()))?;
            let file = file.trim();
            let ok = file.contains('.')
                && !file.contains('/')
                && !file.starts_with('.')
                && !file.starts_with("cgroup.");
            if !ok || value.trim().is_empty() {
                return Err(CgroupError::Syntax(item.to_string()));
            }
            Ok(Setting {
                file: file.to_string(),
                value: value.trim().to_string(),
            })
        })
        .collect()
}

/// The cgroup file systems mounted here (from /proc/self/mountinfo).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mounts {
    /// The cgroup v2 mount, if any.
    pub v2: Option<PathBuf>,
    /// cgroup v1 mounts and their controllers.
    pub v1: Vec<(PathBuf, Vec<String>)>,
}

/// Reads the cgroup mounts out of mountinfo's text.
pub fn parse_mounts(mountinfo: &str) -> Mounts {
    let mut m = Mounts::default();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let point = left.split(' ').nth(4).map(PathBuf::from);
        let mut r = right.split(' ');
        let (fstype, _source, opts) = (r.next(), r.next(), r.next().unwrap_or(""));
        match (fstype, point) {
            (Some("cgroup2"), Some(p)) if m.v2.is_none() => m.v2 = Some(p),
            (Some("cgroup"), Some(p)) => {
                let ctrls = opts
                    .split(',')
                    .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                    .map(str::to_string)
                    .collect();
                m.v1.push((p, ctrls));
            }
            _ => {}
        }
    }
    m
}

/// The calling process's group per v1 controller, from /proc/self/cgroup's text.
pub fn parse_own(text: &str) -> HashMap<String, String> {
    let mut own = HashMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next(), parts.next());
        if let (Some(ctrls), Some(path)) = (ctrls, path) {
            for c in ctrls.split(',').filter(|c| !c.is_empty()) {
                own.insert(c.to_string(), path.to_string());
            }
        }
    }
    own
}

/// One group to make: its directory, the files to write (in order), and the
/// `cgroup.subtree_control` files that must pass its controllers down.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Group {
    /// The group's directory.
    pub dir: PathBuf,
    /// `(file, value)` to write, in order.
    pub writes: Vec<(String, String)>,
    /// `(subtree_control file, controller)`, outermost first (v2 only).
    pub enable: Vec<(PathBuf, String)>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A v2 name's v1 writes: `None` when the name has no known v1 form.
fn v1_writes(s: &Setting) -> Option<Vec<(String, String)>> {
    let v = |x: &str| {
        if x == "max" {
            "-1".to_string()
        } else {
            x.to_string()
        }
    };
    match s.file.as_str() {
        "cpu.max" => {
            let mut words = s.value.split_whitespace();
            let quota = words.next()?;
            let mut out = Vec::new();
            if let Some(period) = words.next() {
                out.push(("cpu.cfs_period_us".into(), period.into()));
            }
            out.push(("cpu.cfs_quota_us".into(), v(quota)));
            Some(out)
        }
        "memory.max" => Some(vec![("memory.limit_in_bytes".into(), v(&s.value))]),
        _ => None,
    }
}

fn controller_of(file: &str) -> &str {
    file.split('.').next().unwrap_or(file)
}

fn relative(p: &str) -> &str {
    p.trim_start_matches('/')
}

/// The groups `settings` need for jail `id`, given the mounts and the jailer's own groups.
pub fn plan(
    id: &str,
    settings: &[Setting],
    mounts: &Mounts,
    own: &HashMap<String, String>,
) -> Result<Vec<Group>, CgroupError> {
    let v2_controllers: Vec<String> = match &mounts.v2 {
        Some(root) => {
            let p = root.join("cgroup.controllers");
            fs::read_to_string(&p)
                .map_err(io_err(&p))?
                .split_whitespace()
                .map(str::to_string)
                .collect()
        }
        None => Vec::new(),
    };
    let mut groups: Vec<Group> = Vec::new();
    for s in settings {
        let ctrl = controller_of(&s.file);
        let (dir, writes, enable) = if let (Some(root), true) =
            (&mounts.v2, v2_controllers.iter().any(|c| c == ctrl))
        {
            let parent = root.join("ember");
            let enable = vec![
                (root.join("cgroup.subtree_control"), ctrl.to_string()),
                (parent.join("cgroup.subtree_control"), ctrl.to_string()),
            ];
            (
                parent.join(id),
                vec![(s.file.clone(), s.value.clone())],
                enable,
            )
        } else if let Some((mnt, _)) = mounts.v1.iter().find(|(_, c)| c.iter().any(|c| c == ctrl)) {
            let mine = own.get(ctrl).map(String::as_str).unwrap_or("/");
            let here = mnt.join(relative(mine));
            let writes = v1_writes(s).unwrap_or_else(|| vec![(s.file.clone(), s.value.clone())]);
            (here.join("ember").join(id), writes, Vec::new())
        } else {
            return Err(CgroupError::NoController {
                file: s.file.clone(),
                controller: ctrl.to_string(),
            });
        };
        match groups.iter_mut().find(|g| g.dir == dir) {
            Some(g) => {
                g.writes.extend(writes);
                for e in enable {
                    if !g.enable.contains(&e) {
                        g.enable.push(e);
                    }
                }
            }
            None => groups.push(Group {
                dir,
                writes,
                enable,
            }),
        }
    }
    Ok(groups)
}

/// The groups for `settings` on this host.
pub fn plan_here(id: &str, settings: &[Setting]) -> Result<Vec<Group>, CgroupError> {
    let read = |p: &str| fs::read_to_string(p).map_err(io_err(Path::new(p)));
    let mounts = parse_mounts(&read("/proc/self/mountinfo")?);
    let own = parse_own(&read("/proc/self/cgroup")?);
    plan(id, settings, &mounts, &own)
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

/// Makes the groups and writes their limits (no process in them yet).
pub fn create(groups: &[Group]) -> Result<(), CgroupError> {
    for g in groups {
        for (control, ctrl) in &g.enable {
            if let Some(dir) = control.parent() {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            let enabled = fs::read_to_string(control).unwrap_or_default();
            if !enabled.split_whitespace().any(|c| c == ctrl) {
                write(control, &format!("+{ctrl}"))?;
            }
        }
        fs::create_dir_all(&g.dir).map_err(io_err(&g.dir))?;
        for (file, value) in &g.writes {
            write(&g.dir.join(file), value)?;
        }
    }
    Ok(())
}

/// Moves process `pid` into every group.
pub fn enter(groups: &[Group], pid: u32) -> Result<(), CgroupError> {
    for g in groups {
        write(&g.dir.join("cgroup.procs"), &pid.to_string())?;
    }
    Ok(())
}

/// Removes the groups (once their process is gone).
pub fn remove(groups: &[Group]) {
    for g in groups {
        if let Err(e) = fs::remove_dir(&g.dir) {
            log::debug!("cannot remove cgroup {}: {e}", g.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 24 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
33 30 0:29 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn settings_parse_and_bad_ones_are_named() {
        let s = parse_settings("cpu.max=50000 100000, memory.max=256M").unwrap();
        assert_eq!(s[0].file, "cpu.max");
        assert_eq!(s[0].value, "50000 100000");
        assert_eq!(s[1].value, "256M");
        for bad in ["cpu", "cpu.max", "../x.y=1", "cgroup.procs=1", "cpu.max="] {
            assert!(parse_settings(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mounts_and_own_groups_are_read() {
        let m = parse_mounts(HYBRID);
        assert_eq!(m.v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(m.v1.len(), 3);
        assert_eq!(m.v1[0].1, vec!["cpu".to_string()]);
        assert_eq!(m.v1[2].1, vec!["xattr".to_string()]);
        let own = parse_own("4:memory:/a/b\n1:cpu,cpuacct:/\n0::/\n");
        assert_eq!(own["memory"], "/a/b");
        assert_eq!(own["cpuacct"], "/");
    }

    fn fake_root(v2_controllers: &str) -> (tempfile::TempDir, Mounts) {
        let d = tempfile::tempdir().unwrap();
        let v2 = d.path().join("unified");
        fs::create_dir_all(&v2).unwrap();
        fs::write(v2.join("cgroup.controllers"), v2_controllers).unwrap();
        let mem = d.path().join("memory");
        fs::create_dir_all(mem.join("a")).unwrap();
        let cpu = d.path().join("cpu");
        fs::create_dir_all(&cpu).unwrap();
        fs::write(cpu.join("cpu.shares"), "1024").unwrap();
        let m = Mounts {
            v2: Some(v2),
            v1: vec![
                (cpu, vec!["cpu".into(), "cpuacct".into()]),
                (mem, vec!["memory".into()]),
            ],
        };
        (d, m)
    }

    #[test]
    fn v2_controllers_go_to_the_v2_group_under_ember() {
        let (d, m) = fake_root("cpu memory pids");
        let s = parse_settings("cpu.max=50000 100000,pids.max=64").unwrap();
        let g = plan("vm1", &s, &m, &HashMap::new()).unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].dir, d.path().join("unified/ember/vm1"));
        assert_eq!(g[0].writes[1], ("pids.max".into(), "64".into()));
        let ctrls: Vec<&str> = g[0].enable.iter().map(|(_, c)| c.as_str()).collect();
        assert_eq!(ctrls, ["cpu", "cpu", "pids", "pids"]);
        create(&g).unwrap();
        let top = fs::read_to_string(d.path().join("unified/cgroup.subtree_control")).unwrap();
        assert_eq!(top, "+pids", "the last controller written");
        assert_eq!(
            fs::read_to_string(g[0].dir.join("cpu.max")).unwrap(),
            "50000 100000"
        );
    }

    #[test]
    fn v1_hierarchies_get_v1_files_under_the_jailers_own_group() {
        let (d, m) = fake_root("hugetlb");
        let own = parse_own("4:memory:/a\n1:cpu,cpuacct:/\n");
        let s = parse_settings("cpu.max=max 100000,memory.max=64M,cpu.shares=512").unwrap();
        let g = plan("vm1", &s, &m, &own).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].dir, d.path().join("cpu/ember/vm1"));
        assert_eq!(
            g[0].writes,
            vec![
                ("cpu.cfs_period_us".to_string(), "100000".to_string()),
                ("cpu.cfs_quota_us".to_string(), "-1".to_string()),
                ("cpu.shares".to_string(), "512".to_string()),
            ]
        );
        assert_eq!(g[1].dir, d.path().join("memory/a/ember/vm1"));
        assert_eq!(g[1].writes[0].0, "memory.limit_in_bytes");
    }

    #[test]
    fn unknown_controllers_are_refused() {
        let (_d, m) = fake_root("cpu");
        let e = plan(
            "v",
            &parse_settings("io.max=8:0 rbps=1").unwrap(),
            &m,
            &HashMap::new(),
        );
        assert!(matches!(e, Err(CgroupError::NoController { .. })), "{e:?}");
    }
}
