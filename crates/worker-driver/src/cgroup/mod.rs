//! Linux cgroups for workers, v2 (unified) and v1 (one hierarchy per
//! controller, some co-mounted): which one the host has, where Steward's
//! parent cgroup goes, creating one cgroup per worker with its limits,
//! reading its usage and OOM counter, killing what is in it, removing it.
//!
//! A relative `--cgroup-parent` is placed under Steward's own cgroup (the
//! delegation model of systemd's `Delegate=yes` and of containers with a
//! cgroup namespace); an absolute one under the hierarchy's root.
//!
//! Cleanup touches only what is Steward's: worker cgroups are named
//! `fe-<id>.<pid>-<n>`, and only those are swept at start, only under a
//! parent Steward owns: one it created, which it marks with the extended
//! attribute [`OWNER_XATTR`]
//! (cgroupfs keeps `user.*` attributes since Linux 5.7; they vanish with
//! the cgroup). Only such a parent is removed at a clean stop. Under any
//! other (`--cgroup-parent /system.slice`, or a `steward-*` cgroup someone
//! else made) the services and cgroups already there are never killed;
//! only the worker cgroups named in Steward's own worker records are
//! ([`Cgroups::reap_named`]). Where the kernel keeps no such attribute no
//! parent is owned, and only the records' cgroups are reaped.

pub mod files;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{Limits, WorkerUsage};

/// CFS period used for every worker's CPU quota (100 ms, as Docker and kubelet use).
const CPU_PERIOD_US: u64 = 100_000;
/// The kernel's smallest quota.
const MIN_QUOTA_US: u64 = 1_000;
/// Controllers used, in the order limits are written.
const CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];
/// Where Steward moves itself on cgroup v2 when its own cgroup must hand
/// its controllers down (a cgroup with children may hold no processes).
const AGENT_LEAF: &str = "steward-agent";
/// The extended attribute that marks a parent cgroup as Steward's, and its value.
pub const OWNER_XATTR: &str = "user.steward.owner";
/// The extended attribute naming the Steward instance (its executor id,
/// hashed) a worker cgroup belongs to: another Steward sharing the parent
/// never sweeps it, even once the pid in its name is dead (its worker may
/// have been adopted by a later run of that Steward).
pub const INSTANCE_XATTR: &str = "user.steward.instance";
const OWNER_VALUE: &[u8] = b"steward";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("worker cgroup {0} already exists and still has processes")]
    Busy(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |error| CgroupError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// One hierarchy's parent directory for workers and the controllers used there.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tree {
    controllers: Vec<&'static str>,
    parent: PathBuf,
    /// v2: the existing cgroup that hands controllers down to `parent`
    /// (Steward's own, or the hierarchy root for an absolute parent).
    top: PathBuf,
    /// Whether `parent` is Steward's ([`OWNER_XATTR`]): only then are
    /// leftovers swept under it and it removed at a clean stop.
    owned: bool,
}

/// Whether workers can be confined here, decided once at start.
#[derive(Debug, Clone)]
pub enum CgroupSetup {
    Enabled(std::sync::Arc<Cgroups>),
    /// Limits are not enforced; the text says why.
    Unavailable(String),
}

/// Steward's worker cgroups on this host.
#[derive(Debug)]
pub struct Cgroups {
    version: CgroupVersion,
    trees: Vec<Tree>,
    /// Controllers wanted but absent, said in `/state/host`.
    missing: Vec<&'static str>,
    swap_off: bool,
    /// The parents' own counters (every worker's together), opened once.
    parents: std::sync::OnceLock<WorkerCgroup>,
}

/// Where the kernel tells a process about its cgroups.
pub struct Sources {
    pub mountinfo: String,
    pub self_cgroup: String,
}

impl Sources {
    pub fn of_this_process() -> io::Result<Sources> {
        Ok(Sources {
            mountinfo: fs::read_to_string("/proc/self/mountinfo")?,
            self_cgroup: fs::read_to_string("/proc/self/cgroup")?,
        })
    }
}

/// Joins a cgroup path from `/proc/self/cgroup` (relative to the
/// hierarchy root) onto the mount of `root`.
pub(crate) fn dir_in_mount(m: &files::CgroupMount, path: &str) -> Option<PathBuf> {
    let rel = if m.root == "/" {
        path
    } else {
        path.strip_prefix(m.root.as_str())?
    };
    let rel = rel.trim_start_matches('/');
    Some(if rel.is_empty() {
        m.mount_point.clone()
    } else {
        m.mount_point.join(rel)
    })
}

/// The parent directory for workers in the hierarchy mounted at `m`.
fn parent_dir(m: &files::CgroupMount, own: &str, parent: &str) -> Option<PathBuf> {
    if parent.starts_with('/') {
        let rel = parent.trim_start_matches('/');
        return Some(m.mount_point.join(rel));
    }
    Some(dir_in_mount(m, own)?.join(parent))
}

/// Why workers cannot be confined in cgroups here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("cgroup parent {0:?} must be path components of [A-Za-z0-9._-] (no '..')")]
    BadParent(String),
    #[error("own cgroup {0} is outside the mounted hierarchy")]
    Outside(String),
    #[error("no cgroup hierarchy with the memory controller is mounted")]
    NoMemoryController,
}

/// Checks a `--cgroup-parent`: path components of `[A-Za-z0-9._-]`, no `..`.
pub fn check_parent(parent: &str) -> Result<(), PlanError> {
    let ok = |c: &str| {
        !c.is_empty()
            && c != "."
            && c != ".."
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    let rel = parent.strip_prefix('/').unwrap_or(parent);
    if rel.is_empty() || !rel.split('/').all(ok) {
        return Err(PlanError::BadParent(parent.to_string()));
    }
    Ok(())
}

/// Decides the version and the parent directories from what the kernel
/// says; `controllers_of` reads a v2 `cgroup.controllers` file.
fn plan(
    sources: &Sources,
    parent: &str,
    controllers_of: &dyn Fn(&Path) -> Option<String>,
) -> Result<(CgroupVersion, Vec<Tree>, Vec<&'static str>), PlanError> {
    let mounts = files::parse_mountinfo(&sources.mountinfo);
    // v2 when the unified hierarchy carries the memory controller.
    if let Some(m) = mounts.iter().find(|m| m.fstype == "cgroup2") {
        let own = files::own_path(&sources.self_cgroup, None).unwrap_or_else(|| "/".into());
        // A Steward started from the leaf a previous one moved into hands
        // controllers down from the same cgroup, not from a nested one.
        let own = match own.strip_suffix(&format!("/{AGENT_LEAF}")) {
            Some("") => "/".to_string(),
            Some(up) => up.to_string(),
            None => own,
        };
        let top = if parent.starts_with('/') {
            Some(m.mount_point.clone())
        } else {
            dir_in_mount(m, &own)
        }
        .ok_or_else(|| PlanError::Outside(own.clone()))?;
        let available = controllers_of(&top).unwrap_or_default();
        let has = |c: &str| available.split_whitespace().any(|a| a == c);
        if has("memory") {
            let used: Vec<&'static str> = ["cpu", "memory", "pids"]
                .into_iter()
                .filter(|c| has(c))
                .collect();
            let missing = ["cpu", "pids"].into_iter().filter(|c| !has(c)).collect();
            let dir = parent_dir(m, &own, parent).ok_or_else(|| PlanError::Outside(own.clone()))?;
            return Ok((
                CgroupVersion::V2,
                vec![Tree {
                    controllers: used,
                    parent: dir,
                    top,
                    owned: false,
                }],
                missing,
            ));
        }
    }
    let mut trees: Vec<Tree> = Vec::new();
    let mut missing = Vec::new();
    for c in CONTROLLERS {
        let found = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.controllers.iter().any(|x| x == c))
            .and_then(|m| {
                let own = files::own_path(&sources.self_cgroup, Some(c))?;
                Some((m.mount_point.clone(), parent_dir(m, &own, parent)?))
            });
        match found {
            Some((_, dir)) => match trees.iter_mut().find(|t| t.parent == dir) {
                Some(t) => t.controllers.push(c),
                None => trees.push(Tree {
                    controllers: vec![c],
                    top: dir.clone(),
                    parent: dir,
                    owned: false,
                }),
            },
            None => missing.push(c),
        }
    }
    if missing.contains(&"memory") {
        return Err(PlanError::NoMemoryController);
    }
    Ok((CgroupVersion::V1, trees, missing))
}

impl Cgroups {
    /// Finds the host's cgroups and prepares Steward's parent cgroup(s).
    /// `Unavailable` says why limits cannot be enforced.
    pub fn detect(parent: &str) -> CgroupSetup {
        let sources = match Sources::of_this_process() {
            Ok(s) => s,
            Err(e) => return CgroupSetup::Unavailable(format!("reading /proc/self: {e}")),
        };
        Self::detect_from(&sources, parent)
    }

    pub fn detect_from(sources: &Sources, parent: &str) -> CgroupSetup {
        if let Err(e) = check_parent(parent) {
            return CgroupSetup::Unavailable(e.to_string());
        }
        let read = |p: &Path| fs::read_to_string(p.join("cgroup.controllers")).ok();
        let (version, trees, missing) = match plan(sources, parent, &read) {
            Ok(p) => p,
            Err(e) => return CgroupSetup::Unavailable(e.to_string()),
        };
        let mut cg = Cgroups {
            version,
            trees,
            missing,
            swap_off: false,
            parents: std::sync::OnceLock::new(),
        };
        match cg.prepare(parent.starts_with('/')) {
            Ok(()) => CgroupSetup::Enabled(std::sync::Arc::new(cg)),
            Err(e) => CgroupSetup::Unavailable(format!(
                "cannot prepare Steward's cgroup ({e}); run as root, or give Steward a delegated cgroup (systemd Delegate=yes)"
            )),
        }
    }

    /// Creates the parent directories, marks those Steward creates as its
    /// own (one it made before, and a SIGKILLed Steward left, still carries
    /// the mark) and, on v2, hands the controllers down to them.
    fn prepare(&mut self, absolute: bool) -> Result<(), CgroupError> {
        for t in &mut self.trees {
            let existed = t.parent.is_dir();
            fs::create_dir_all(&t.parent).map_err(io_err(&t.parent))?;
            if !existed && let Err(e) = mark_owned(&t.parent) {
                tracing::warn!(parent = %t.parent.display(), error = %e, xattr = OWNER_XATTR,
                        "cannot mark the cgroup parent as Steward's: leftovers under it are not swept, only those Steward's records name");
            }
            t.owned = owned_parent(&t.parent);
        }
        if self.version == CgroupVersion::V2
            && let Some(t) = self.trees.first().cloned()
        {
            enable_down_to(&t, absolute)?;
        }
        let swap_file = match self.version {
            CgroupVersion::V2 => "memory.swap.max",
            CgroupVersion::V1 => "memory.memsw.limit_in_bytes",
        };
        self.swap_off = no_swap()
            || self
                .trees
                .iter()
                .any(|t| t.controllers.contains(&"memory") && t.parent.join(swap_file).exists());
        Ok(())
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    pub fn parents(&self) -> Vec<PathBuf> {
        self.trees.iter().map(|t| t.parent.clone()).collect()
    }

    pub fn enforces(&self, controller: &str) -> bool {
        self.trees
            .iter()
            .any(|t| t.controllers.contains(&controller))
    }

    pub fn swap_off(&self) -> bool {
        self.swap_off
    }

    /// Controllers wanted but missing on this host.
    pub fn missing(&self) -> &[&'static str] {
        &self.missing
    }

    /// "cgroup v1 (cpu, cpuacct, memory, pids) under /sys/fs/cgroup/memory/steward, …"
    pub fn describe(&self) -> String {
        let mut used: Vec<&str> = self
            .trees
            .iter()
            .flat_map(|t| t.controllers.clone())
            .collect();
        used.sort_unstable();
        let parents: Vec<String> = self
            .parents()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!(
            "cgroup {} ({}) under {}",
            self.version.as_str(),
            used.join(", "),
            parents.join(", ")
        )
    }

    /// Creates the cgroup of worker `name` (already unique) with `limits`.
    /// A leftover of the same name is emptied and reused.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<WorkerCgroup, CgroupError> {
        let cg = self.worker_cgroup(name, *limits, |_| true);
        for (_, dir) in &cg.dirs {
            let failed = match fs::create_dir(dir) {
                Ok(()) => None,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    (!cg.empty_out(Duration::from_secs(2))).then(|| CgroupError::Busy(dir.clone()))
                }
                Err(e) => Some(io_err(dir)(e)),
            };
            if let Some(e) = failed {
                // Nothing half-made stays in the other hierarchies.
                cg.remove();
                return Err(e);
            }
        }
        if let Err(e) = cg.apply_limits() {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// Kills and removes every worker cgroup (named `fe-<id>.<pid>-<n>`)
    /// under the parents that are Steward's ([`OWNER_XATTR`]; what a
    /// SIGKILLed Steward left), sparing those of another live Steward;
    /// returns (name, processes killed) for each. Nothing else under a
    /// parent is touched, and nothing at all under a parent that is not
    /// Steward's (see [`Cgroups::unowned_parents`]).
    pub fn reap_leftovers(&self) -> Vec<(String, usize)> {
        self.reap_leftovers_except(&[], None)
    }

    /// [`Cgroups::reap_leftovers`], sparing the cgroups named in `spare`
    /// (those of adopted workers) and, given the `instance` sweeping, those
    /// marked as another instance's ([`INSTANCE_XATTR`]).
    pub fn reap_leftovers_except(
        &self,
        spare: &[String],
        instance: Option<&str>,
    ) -> Vec<(String, usize)> {
        let anothers = |dir: &Path| {
            instance.is_some_and(|mine| {
                get_xattr(dir, INSTANCE_XATTR).is_some_and(|theirs| theirs != mine.as_bytes())
            })
        };
        let mut names: Vec<String> = Vec::new();
        for t in self.trees.iter().filter(|t| t.owned) {
            for e in fs::read_dir(&t.parent).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if worker_cgroup_name(&name)
                    && e.path().is_dir()
                    && !names.contains(&name)
                    && !spare.contains(&name)
                    && !anothers(&e.path())
                    && !of_another_live_steward(&name)
                {
                    names.push(name);
                }
            }
        }
        names
            .into_iter()
            .filter_map(|name| {
                let killed = self.reap_one(&name, |t| t.owned)?;
                Some((name, killed))
            })
            .collect()
    }

    /// Kills and removes the worker cgroup `name` (one that Steward's own
    /// worker records name) under the parents that are not Steward's, where
    /// [`Cgroups::reap_leftovers`] does not look; `None` if there is none.
    pub fn reap_named(&self, name: &str) -> Option<usize> {
        if !worker_cgroup_name(name) || of_another_live_steward(name) {
            return None;
        }
        self.reap_one(name, |t| !t.owned)
    }

    /// Empties and removes the worker cgroup `name` in the trees `which`
    /// picks; `None` if it exists in none of them.
    fn reap_one(&self, name: &str, which: impl Fn(&Tree) -> bool) -> Option<usize> {
        let unknown = Limits {
            cpu_ms_per_sec: 0,
            memory_bytes: 0,
            pids_max: 0,
        };
        let mut cg = self.worker_cgroup(name, unknown, which);
        cg.dirs.retain(|(_, d)| d.is_dir());
        if cg.dirs.is_empty() {
            return None;
        }
        let killed = cg.procs().len();
        cg.empty_out(Duration::from_secs(5));
        cg.remove();
        Some(killed)
    }

    /// The worker cgroup `name` in the trees `which` picks (not created).
    fn worker_cgroup(
        &self,
        name: &str,
        limits: Limits,
        which: impl Fn(&Tree) -> bool,
    ) -> WorkerCgroup {
        WorkerCgroup {
            version: self.version,
            counters: std::sync::OnceLock::new(),
            dirs: self
                .trees
                .iter()
                .filter(|t| which(t))
                .map(|t| (t.controllers.clone(), t.parent.join(name)))
                .collect(),
            limits,
        }
    }

    /// Worker cgroups under Steward's parents marked as another instance's
    /// ([`INSTANCE_XATTR`]), which [`Cgroups::reap_leftovers_except`]
    /// leaves: (name, the other instance).
    pub fn other_instances(&self, instance: &str) -> Vec<(String, String)> {
        let mut found: Vec<(String, String)> = Vec::new();
        for t in self.trees.iter().filter(|t| t.owned) {
            for e in fs::read_dir(&t.parent).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !worker_cgroup_name(&name) || found.iter().any(|(n, _)| *n == name) {
                    continue;
                }
                if let Some(theirs) = get_xattr(&e.path(), INSTANCE_XATTR)
                    && theirs != instance.as_bytes()
                {
                    found.push((name, String::from_utf8_lossy(&theirs).into_owned()));
                }
            }
        }
        found
    }

    /// CPU time and memory of every worker together, from the parents'
    /// own counters (hierarchical: they include every worker cgroup below).
    pub fn parents_reading(&self) -> Option<crate::Reading> {
        let none = Limits {
            cpu_ms_per_sec: 0,
            memory_bytes: 0,
            pids_max: 0,
        };
        self.parents
            .get_or_init(|| self.worker_cgroup("", none, |_| true))
            .reading()
    }

    /// The cgroup `name` of a worker started by an earlier run (one being
    /// adopted), with the limits it was given; `None` unless its directory
    /// exists in every hierarchy.
    pub fn reopen(&self, name: &str, limits: Limits) -> Option<WorkerCgroup> {
        if !worker_cgroup_name(name) {
            return None;
        }
        let cg = self.worker_cgroup(name, limits, |_| true);
        cg.dirs.iter().all(|(_, d)| d.is_dir()).then_some(cg)
    }

    /// The parent directories that are not Steward's (it did not create
    /// them: no [`OWNER_XATTR`]): workers are created there, but leftovers
    /// are not swept and the parent is not removed at a clean stop.
    pub fn unowned_parents(&self) -> Vec<PathBuf> {
        self.trees
            .iter()
            .filter(|t| !t.owned)
            .map(|t| t.parent.clone())
            .collect()
    }

    /// Removes the parent directories that are Steward's if empty (at a
    /// clean stop).
    pub fn remove_parents(&self) {
        for t in self.trees.iter().filter(|t| t.owned) {
            // A worker cgroup the kernel is still tearing down keeps the
            // parent busy for a moment: retry briefly on EBUSY.
            let deadline = Instant::now() + Duration::from_secs(1);
            while let Err(e) = fs::remove_dir(&t.parent) {
                if e.kind() != io::ErrorKind::ResourceBusy || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Memory left under the limit of Steward's own cgroup (workers under a
/// relative parent count against it), `None` without a limit. Inside a
/// container this is what runs out first, not the host's memory.
pub fn own_memory_headroom(sources: &Sources) -> Option<u64> {
    let mounts = files::parse_mountinfo(&sources.mountinfo);
    let read = |p: PathBuf| fs::read_to_string(p).ok();
    let (limit, usage) = if let Some(m) = mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.controllers.iter().any(|c| c == "memory"))
    {
        let dir = dir_in_mount(m, &files::own_path(&sources.self_cgroup, Some("memory"))?)?;
        (
            read(dir.join("memory.limit_in_bytes"))?,
            read(dir.join("memory.usage_in_bytes"))?,
        )
    } else {
        let m = mounts.iter().find(|m| m.fstype == "cgroup2")?;
        let dir = dir_in_mount(m, &files::own_path(&sources.self_cgroup, None)?)?;
        (
            read(dir.join("memory.max"))?,
            read(dir.join("memory.current"))?,
        )
    };
    // v1 spells "no limit" as a number near i64::MAX; v2 as "max".
    let limit = files::single(&limit).filter(|l| *l < 1 << 60)?;
    Some(limit.saturating_sub(files::single(&usage)?))
}

/// The CPU quota and period of `limits`, in µs (what `cpu.max` and
/// `cpu.cfs_quota_us` get, and an OCI bundle's `linux.resources.cpu`).
pub fn cpu_quota_us(limits: &Limits) -> (u64, u64) {
    let quota = (u64::from(limits.cpu_ms_per_sec) * CPU_PERIOD_US / 1000).max(MIN_QUOTA_US);
    (quota, CPU_PERIOD_US)
}

/// Whether a parent cgroup directory is named after Steward (the OCI
/// driver's parents, which the runtime makes; the cgroup driver's own
/// parents are Steward's only when marked, [`owned_parent`]): named after it
/// (`steward`, or `steward` then `-`, `.` or `_` and more, as the default
/// `steward`, `steward.slice` or `steward-bench-7000`). Only under such a
/// parent are leftover worker cgroups swept and the parent itself removed;
/// under any other (`--cgroup-parent /system.slice`) Steward removes only
/// the worker cgroups its own records name, and never touches the rest.
pub fn steward_parent(dir: &Path) -> bool {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("steward"))
        .is_some_and(|rest| {
            rest.is_empty() || (rest.len() > 1 && rest.starts_with(['-', '.', '_']))
        })
}

/// `dir` and the attribute `attr` as C strings.
fn xattr_names(dir: &Path, attr: &str) -> io::Result<(std::ffi::CString, std::ffi::CString)> {
    use std::os::unix::ffi::OsStrExt;
    Ok((
        std::ffi::CString::new(dir.as_os_str().as_bytes())?,
        std::ffi::CString::new(attr)?,
    ))
}

/// Sets extended attribute `attr` of `dir` to `value`.
fn set_xattr(dir: &Path, attr: &str, value: &[u8]) -> io::Result<()> {
    let (path, name) = xattr_names(dir, attr)?;
    // SAFETY: both strings are NUL-terminated and the value's length is its own.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Extended attribute `attr` of `dir` (at most 64 bytes), if set.
fn get_xattr(dir: &Path, attr: &str) -> Option<Vec<u8>> {
    let (path, name) = xattr_names(dir, attr).ok()?;
    let mut buf = [0u8; 64];
    // SAFETY: both strings are NUL-terminated; the kernel writes at most
    // `buf.len()` bytes into `buf`.
    #[allow(unsafe_code)]
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    buf.get(..n).map(<[u8]>::to_vec)
}

/// Marks `dir` as Steward's with [`OWNER_XATTR`].
pub(crate) fn mark_owned(dir: &Path) -> io::Result<()> {
    set_xattr(dir, OWNER_XATTR, OWNER_VALUE)
}

/// Whether `dir` carries Steward's mark ([`OWNER_XATTR`]): Steward created it.
pub fn owned_parent(dir: &Path) -> bool {
    get_xattr(dir, OWNER_XATTR).as_deref() == Some(OWNER_VALUE)
}

/// Whether `name` is a worker cgroup's as the driver names them:
/// `fe-<id>.<pid>-<n>` (the id of `[A-Za-z0-9._-]`, possibly shortened
/// with a hash), within the kernel's 255-byte limit.
pub fn worker_cgroup_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name
            .strip_prefix("fe-")
            .and_then(|rest| rest.rsplit_once('.'))
            .and_then(|(id, tail)| Some((id, tail.split_once('-')?)))
            .is_some_and(|(id, (pid, n))| !id.is_empty() && digits(pid) && digits(n))
}

/// Whether worker cgroup `name` (`fe-<id>.<pid>-<n>`) was made by another
/// Steward that still runs (one sharing this parent): its workers are not
/// leftovers.
pub(crate) fn of_another_live_steward(name: &str) -> bool {
    let Some(pid) = name
        .rsplit_once('.')
        .and_then(|(_, tail)| tail.split_once('-'))
        .and_then(|(pid, _)| pid.parse::<u32>().ok())
    else {
        return false;
    };
    pid != std::process::id()
        && fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "steward")
}

/// Whether the host has no swap configured (so none can be used).
fn no_swap() -> bool {
    fs::read_to_string("/proc/swaps").is_ok_and(|s| s.lines().count() <= 1)
}

/// On v2, enables the used controllers in every cgroup from the top
/// (Steward's own, or the hierarchy root for an absolute parent) down to
/// the parent, so that each worker cgroup gets them.
fn enable_down_to(t: &Tree, absolute: bool) -> Result<(), CgroupError> {
    let enable: String = t
        .controllers
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut chain: Vec<&Path> = t
        .parent
        .ancestors()
        .take_while(|d| d.starts_with(&t.top))
        .collect();
    chain.reverse();
    for dir in chain {
        let file = dir.join("cgroup.subtree_control");
        match fs::write(&file, &enable) {
            Ok(()) => {}
            // A cgroup with processes cannot hand controllers down (v2's
            // no-internal-processes rule): move them into a leaf first.
            Err(e) if dir == t.top && !absolute && e.raw_os_error() == Some(libc::EBUSY) => {
                move_processes_to_leaf(dir)?;
                fs::write(&file, &enable).map_err(io_err(&file))?;
            }
            Err(e) => return Err(io_err(&file)(e)),
        }
    }
    Ok(())
}

/// Moves Steward (and the init that forked it, when Steward runs as a
/// container's PID 1) into a leaf of its own cgroup. Processes that are not
/// Steward's mean the cgroup is not delegated to it (an SSH session, a
/// shared scope): then nothing is moved and limits are not enforced.
fn move_processes_to_leaf(dir: &Path) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    let text = fs::read_to_string(&procs).map_err(io_err(&procs))?;
    let me = std::process::id() as i32;
    let parent = nix::unistd::getppid().as_raw();
    let pids = files::pids(&text);
    if let Some(other) = pids.iter().find(|p| **p != me && **p != parent) {
        return Err(CgroupError::Io {
            path: procs,
            error: io::Error::other(format!(
                "this cgroup also holds process {other}, not Steward's: it is not delegated to Steward"
            )),
        });
    }
    let leaf = dir.join(AGENT_LEAF);
    match fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(&leaf)(e)),
    }
    let target = leaf.join("cgroup.procs");
    for pid in pids {
        // A process that exited meanwhile is fine (ESRCH).
        if let Err(e) = fs::write(&target, pid.to_string())
            && e.raw_os_error() != Some(libc::ESRCH)
        {
            return Err(io_err(&target)(e));
        }
    }
    tracing::info!(leaf = %leaf.display(), "moved Steward into a leaf cgroup so that its own cgroup can hand controllers to workers");
    Ok(())
}

/// One worker's cgroup (a directory per v1 hierarchy, one on v2).
#[derive(Debug)]
pub struct WorkerCgroup {
    version: CgroupVersion,
    dirs: Vec<(Vec<&'static str>, PathBuf)>,
    limits: Limits,
    /// The CPU and memory counters, opened once and re-read with `pread`
    /// (one system call per reading: metering reads them at every
    /// allocation start and end). Reads fail once the cgroup is removed.
    counters: std::sync::OnceLock<(Option<fs::File>, fs::File)>,
}

impl WorkerCgroup {
    fn dir_of(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(cs, _)| cs.contains(&controller))
            .map(|(_, d)| d.as_path())
    }

    fn read(&self, controller: &str, file: &str) -> Option<String> {
        fs::read_to_string(self.dir_of(controller)?.join(file)).ok()
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The cgroup's directory name (`fe-<id>.<pid>-<n>`).
    pub fn name(&self) -> Option<String> {
        let (_, dir) = self.dirs.first()?;
        Some(dir.file_name()?.to_string_lossy().into_owned())
    }

    /// Marks the cgroup as `instance`'s ([`INSTANCE_XATTR`]); where the
    /// kernel keeps no user attributes on cgroups (before 5.7) it stays
    /// unmarked.
    pub fn mark_instance(&self, instance: &str) {
        for (_, d) in &self.dirs {
            let _ = set_xattr(d, INSTANCE_XATTR, instance.as_bytes());
        }
    }

    /// The `cgroup.procs` files a new worker writes its pid to before exec.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    fn write(
        &self,
        controller: &str,
        file: &str,
        value: &str,
        required: bool,
    ) -> Result<(), CgroupError> {
        let Some(dir) = self.dir_of(controller) else {
            return Ok(());
        };
        let path = dir.join(file);
        if !required && !path.exists() {
            return Ok(());
        }
        fs::write(&path, value).map_err(io_err(&path))
    }

    fn apply_limits(&self) -> Result<(), CgroupError> {
        let l = &self.limits;
        let (quota, _) = cpu_quota_us(l);
        let mem = l.memory_bytes.to_string();
        let pids = l.pids_max.to_string();
        match self.version {
            CgroupVersion::V2 => {
                self.write("cpu", "cpu.max", &format!("{quota} {CPU_PERIOD_US}"), true)?;
                self.write("memory", "memory.max", &mem, true)?;
                self.write("memory", "memory.swap.max", "0", false)?;
                // The whole worker goes at once on OOM, not a random thread of it.
                self.write("memory", "memory.oom.group", "1", false)?;
                self.write("pids", "pids.max", &pids, true)?;
            }
            CgroupVersion::V1 => {
                self.write("cpu", "cpu.cfs_period_us", &CPU_PERIOD_US.to_string(), true)?;
                self.write("cpu", "cpu.cfs_quota_us", &quota.to_string(), true)?;
                self.write("memory", "memory.limit_in_bytes", &mem, true)?;
                // memory+swap equal to memory: no swap. Where swap
                // accounting is off, discourage swapping instead.
                if self
                    .write("memory", "memory.memsw.limit_in_bytes", &mem, false)
                    .is_err()
                {
                    self.write("memory", "memory.swappiness", "0", false)?;
                }
                self.write("pids", "pids.max", &pids, true)?;
            }
        }
        Ok(())
    }

    /// OOM kills inside this cgroup so far.
    pub fn oom_kills(&self) -> Option<u64> {
        match self.version {
            CgroupVersion::V2 => files::keyed(&self.read("memory", "memory.events")?, "oom_kill"),
            CgroupVersion::V1 => {
                files::keyed(&self.read("memory", "memory.oom_control")?, "oom_kill")
            }
        }
    }

    /// Usage now; `None` once the cgroup is gone.
    pub fn usage(&self) -> Option<WorkerUsage> {
        let num = |c: &str, f: &str| self.read(c, f).as_deref().and_then(files::single);
        let (cpu_usec, current, peak) = match self.version {
            CgroupVersion::V2 => (
                self.read("cpu", "cpu.stat")
                    .as_deref()
                    .and_then(|s| files::keyed(s, "usage_usec"))
                    .unwrap_or(0),
                num("memory", "memory.current")?,
                num("memory", "memory.peak"),
            ),
            CgroupVersion::V1 => (
                num("cpuacct", "cpuacct.usage").map_or(0, |ns| ns / 1000),
                num("memory", "memory.usage_in_bytes")?,
                num("memory", "memory.max_usage_in_bytes"),
            ),
        };
        Some(WorkerUsage {
            cpu_usec,
            memory_current_bytes: current,
            memory_peak_bytes: peak,
            pids_current: num("pids", "pids.current"),
            oom_kills: self.oom_kills().unwrap_or(0),
        })
    }

    /// CPU time and memory only, for metering: two `pread`s of files kept
    /// open. CPU reads as 0 where no hierarchy accounts it (v1 without
    /// `cpuacct`); on v2 `cpu.stat` exists in every cgroup. `None` once the
    /// cgroup is gone, or where memory cannot be read.
    pub fn reading(&self) -> Option<crate::Reading> {
        let (cpu, memory) = self.counters()?;
        let mut buf = [0u8; 512];
        let text = |f: &fs::File, buf: &mut [u8]| -> Option<String> {
            use std::os::unix::fs::FileExt;
            let n = f.read_at(buf, 0).ok()?;
            Some(String::from_utf8_lossy(buf.get(..n)?).into_owned())
        };
        let memory_bytes = files::single(&text(memory, &mut buf)?)?;
        let cpu_usec = match (self.version, cpu) {
            (_, None) => 0,
            (CgroupVersion::V2, Some(f)) => files::keyed(&text(f, &mut buf)?, "usage_usec")?,
            (CgroupVersion::V1, Some(f)) => files::single(&text(f, &mut buf)?)? / 1000,
        };
        Some(crate::Reading {
            cpu_usec,
            memory_bytes,
        })
    }

    /// The counter files, opened at the first reading that finds them (a
    /// failed open is tried again next time).
    fn counters(&self) -> Option<&(Option<fs::File>, fs::File)> {
        if let Some(c) = self.counters.get() {
            return Some(c);
        }
        let open = |c: &str, f: &str| fs::File::open(self.dir_of(c)?.join(f)).ok();
        let (cpu, memory) = match self.version {
            CgroupVersion::V2 => (
                open("cpu", "cpu.stat").or_else(|| open("memory", "cpu.stat")),
                open("memory", "memory.current")?,
            ),
            CgroupVersion::V1 => (
                open("cpuacct", "cpuacct.usage"),
                open("memory", "memory.usage_in_bytes")?,
            ),
        };
        Some(self.counters.get_or_init(|| (cpu, memory)))
    }

    /// Every process in the cgroup (union over hierarchies).
    pub fn procs(&self) -> Vec<i32> {
        let mut all: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|(_, d)| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| files::pids(&t))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// SIGKILLs everything in the cgroup (`cgroup.kill` where the kernel has it).
    pub fn kill_all(&self) {
        if self.version == CgroupVersion::V2
            && let Some((_, d)) = self.dirs.first()
            && fs::write(d.join("cgroup.kill"), "1").is_ok()
        {
            return;
        }
        for pid in self.procs() {
            // SAFETY-free: a plain kill(2) through nix.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Kills until the cgroup holds no process (forks racing the kill are
    /// caught by the next round; the pids limit bounds them); `false` if
    /// processes remain after `within`.
    pub fn empty_out(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut pause = Duration::from_millis(1);
        loop {
            if self.procs().is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.kill_all();
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Removes the cgroup's directories (they must be empty of processes).
    /// Returns whether all are gone.
    pub fn remove(&self) -> bool {
        let mut all = true;
        for (_, d) in &self.dirs {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => all = false,
            }
        }
        all
    }

    /// Empties and removes the cgroup, retrying while the kernel finishes
    /// tearing the last processes down.
    pub fn destroy(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut pause = Duration::from_millis(1);
        loop {
            self.empty_out(Duration::from_secs(1));
            if self.remove() {
                return true;
            }
            if Instant::now() >= deadline {
                tracing::warn!(dirs = ?self.dirs, "worker cgroup could not be removed");
                return false;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests;
