//! The OCI bundle of one worker: `config.json`, built with `oci-spec`'s
//! typed runtime-spec types, and an empty `rootfs/` that the runtime fills
//! with read-only bind mounts of the host's runtime directories.
//!
//! [`spec`] is a pure function of a [`Bundle`] (tested field by field);
//! [`write`] puts it on disk and [`remove`] takes it away again, refusing
//! while anything is mounted under it (a bind mount of `/usr` that leaked
//! out of the container's mount namespace must never be deleted through).
//!
//! Must not know about: the runtime's command line, cgroup files, gRPC.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Arch, LinuxBuilder, LinuxCapabilities, LinuxCpu, LinuxDeviceCgroup, LinuxDeviceType,
    LinuxMemory, LinuxNamespace, LinuxNamespaceType, LinuxPids, LinuxResources, LinuxSeccomp,
    LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder, LinuxSeccompOperator,
    LinuxSyscall, Mount, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec,
    SpecBuilder, UserBuilder, get_default_maskedpaths, get_default_mounts,
    get_default_readonly_paths,
};

use crate::Limits;
use crate::cgroup::cpu_quota_us;

/// The annotation naming the Steward (executor id) a container belongs to:
/// the start-up sweep deletes only containers carrying its own.
pub const EXECUTOR_ANNOTATION: &str = "io.steward.executor-id";
/// The annotation naming the function executor the container runs.
pub const WORKER_ANNOTATION: &str = "io.steward.function-executor-id";
/// File mode creation mask of the worker (nothing it writes is readable by others).
pub const WORKER_UMASK: u32 = 0o077;

/// Which network the worker sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// The host's: workers reach blob storage and the server's URLs.
    Host,
    /// A new, empty network namespace (loopback only): only the channel,
    /// a Unix socket in a bind-mounted directory, reaches Steward.
    None,
}

/// One GPU's character device, bound into the container and allowed by
/// the device cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    pub path: PathBuf,
    pub major: i64,
    pub minor: i64,
}

/// Everything the container of one worker is made of; host paths are
/// absolute and appear at the same path inside.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub executor_id: String,
    pub worker_id: String,
    /// The container's process: Steward's worker init, then the program.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the blob group where identities are separated).
    pub groups: Vec<u32>,
    /// Bound read-only (`rbind,rro`): the host's runtime directories, the
    /// Python environment, the program, the init.
    pub read_only: Vec<PathBuf>,
    /// Bound writable: the worker's scratch directory and socket directory.
    pub writable: Vec<PathBuf>,
    /// Symbolic links made in the root (`/bin -> usr/bin` on merged-/usr hosts).
    pub links: Vec<(PathBuf, PathBuf)>,
    pub limits: Limits,
    /// Whether memory+swap can be limited (v1 `memory.memsw.*`, v2 `memory.swap.max`).
    pub swap_limited: bool,
    /// The worker's cgroup as the runtime names it (relative to the
    /// runtime's own cgroup, or absolute from the hierarchy root).
    pub cgroups_path: Option<PathBuf>,
    pub network: Network,
    pub gpus: Vec<DeviceNode>,
    pub hostname: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("building the OCI runtime spec: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{0}: something is still mounted under it; not removed")]
    Mounted(PathBuf),
    #[error(
        "refusing to run a worker as uid {uid} gid {gid}: root without capabilities still owns root's files (/etc/shadow, host keys) and passes peer checks that trust uid 0; run Steward with worker identities (--worker-uid-range)"
    )]
    Root { uid: u32, gid: u32 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BundleError + '_ {
    move |error| BundleError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn bind(path: &Path, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(path.to_path_buf())
        .set_typ(Some("bind".into()))
        .set_source(Some(path.to_path_buf()))
        .set_options(Some(options.iter().map(|o| o.to_string()).collect()));
    m
}

fn tmpfs(at: &str, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(at.into())
        .set_typ(Some("tmpfs".into()))
        .set_source(Some("tmpfs".into()))
        .set_options(Some(options.iter().map(|o| o.to_string()).collect()));
    m
}

/// Masked (made unreadable) besides the runtime's defaults: the RAPL
/// energy counters, a power side channel on the host's other tenants
/// (PLATYPUS, CVE-2020-8694), masked by Docker and containerd too.
pub const EXTRA_MASKED_PATHS: &[&str] = &["/sys/devices/virtual/powercap"];

/// Options of `/proc` (the runtime's default mount has none).
const PROC_OPTIONS: &[&str] = &["nosuid", "noexec", "nodev"];

/// The mounts: the runtime's usual `/proc` (nosuid, noexec, nodev), `/dev`,
/// `/sys`, then a private `/tmp`, the read-only binds, the writable binds
/// and the GPUs' devices.
fn mounts(b: &Bundle) -> Vec<Mount> {
    let mut all = get_default_mounts();
    for m in all
        .iter_mut()
        .filter(|m| m.typ().as_deref() == Some("proc"))
    {
        m.set_options(Some(PROC_OPTIONS.iter().map(|o| o.to_string()).collect()));
    }
    all.push(tmpfs("/tmp", &["nosuid", "nodev", "mode=1777"]));
    for p in &b.read_only {
        // `rro`: read-only all the way down, submounts included.
        all.push(bind(p, &["rbind", "rro", "nosuid", "nodev"]));
    }
    for p in &b.writable {
        all.push(bind(p, &["rbind", "rw", "nosuid", "nodev", "noexec"]));
    }
    for d in &b.gpus {
        all.push(bind(&d.path, &["bind", "rw", "nosuid", "noexec"]));
    }
    all
}

/// CPU, memory and pids as the cgroup driver sets them, and a device
/// cgroup that denies every device but the runtime's defaults (null,
/// zero, random, tty, …) and the worker's GPUs.
fn resources(b: &Bundle) -> LinuxResources {
    let (quota, period) = cpu_quota_us(&b.limits);
    let mut cpu = LinuxCpu::default();
    cpu.set_quota(Some(quota as i64)).set_period(Some(period));
    let memory_limit = i64::try_from(b.limits.memory_bytes).unwrap_or(i64::MAX);
    let mut memory = LinuxMemory::default();
    memory.set_limit(Some(memory_limit));
    if b.swap_limited {
        // memory+swap equal to memory: no swap.
        memory.set_swap(Some(memory_limit));
    }
    let mut pids = LinuxPids::default();
    pids.set_limit(i64::try_from(b.limits.pids_max).unwrap_or(i64::MAX));
    let mut devices = vec![device_rule(false, None, None, None)];
    for d in &b.gpus {
        devices.push(device_rule(
            true,
            Some(LinuxDeviceType::C),
            Some(d.major),
            Some(d.minor),
        ));
    }
    let mut r = LinuxResources::default();
    r.set_cpu(Some(cpu))
        .set_memory(Some(memory))
        .set_pids(Some(pids))
        .set_devices(Some(devices));
    r
}

fn device_rule(
    allow: bool,
    typ: Option<LinuxDeviceType>,
    major: Option<i64>,
    minor: Option<i64>,
) -> LinuxDeviceCgroup {
    let mut d = LinuxDeviceCgroup::default();
    d.set_allow(allow)
        .set_typ(typ.or(Some(LinuxDeviceType::A)))
        .set_major(major)
        .set_minor(minor)
        .set_access(Some("rwm".into()));
    d
}

fn namespaces(network: Network) -> Vec<LinuxNamespace> {
    let mut types = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
    ];
    if network == Network::None {
        types.push(LinuxNamespaceType::Network);
    }
    types
        .into_iter()
        .map(|t| {
            let mut n = LinuxNamespace::default();
            n.set_typ(t);
            n
        })
        .collect()
}

/// Syscalls an unprivileged worker has no business making, each a kernel
/// attack surface: new namespaces (user namespaces above all), keyrings,
/// BPF, perf, userfaultfd, io_uring, tracing other processes, handles that
/// bypass path checks, the kernel log (`syslog`: kernel addresses where
/// `dmesg_restrict` is 0), `uselib`, and what needs privileges it does not
/// have anyway.
/// runc applies no seccomp profile of its own (Docker's default lives in
/// Docker), so Steward's is in every bundle: allow by default, refuse
/// these with EPERM (`clone3` with ENOSYS, so that libc falls back to
/// `clone`, whose namespace flags are then checked).
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "reboot",
    "request_key",
    "setns",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
];

/// `CLONE_NEW*` flags: a `clone` asking for any of them is refused.
const CLONE_NAMESPACE_FLAGS: [u64; 7] = [
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

fn syscall(names: &[&str], errno: i32, args: Option<Vec<LinuxSeccompArg>>) -> LinuxSyscall {
    let mut s = LinuxSyscall::default();
    s.set_names(names.iter().map(|n| n.to_string()).collect())
        .set_action(LinuxSeccompAction::ScmpActErrno)
        .set_errno_ret(Some(errno as u32))
        .set_args(args);
    s
}

/// Steward's seccomp profile (see [`DENIED_SYSCALLS`]).
pub fn seccomp() -> Result<LinuxSeccomp, BundleError> {
    let mut rules = vec![
        syscall(DENIED_SYSCALLS, libc::EPERM, None),
        syscall(&["clone3"], libc::ENOSYS, None),
    ];
    for flag in CLONE_NAMESPACE_FLAGS {
        let arg = LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(flag)
            .value_two(flag)
            .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
            .build()
            .map_err(BundleError::Spec)?;
        rules.push(syscall(&["clone"], libc::EPERM, Some(vec![arg])));
    }
    let arches = if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]
    } else {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    };
    let mut s = LinuxSeccomp::default();
    s.set_default_action(LinuxSeccompAction::ScmpActAllow)
        .set_architectures(Some(arches))
        .set_syscalls(Some(rules));
    Ok(s)
}

/// The runtime spec of a worker's container; refused for uid or gid 0
/// (no worker runs as root, even without capabilities).
pub fn spec(b: &Bundle) -> Result<Spec, BundleError> {
    if b.uid == 0 || b.gid == 0 {
        return Err(BundleError::Root {
            uid: b.uid,
            gid: b.gid,
        });
    }
    let user = UserBuilder::default()
        .uid(b.uid)
        .gid(b.gid)
        .umask(WORKER_UMASK)
        .additional_gids(b.groups.clone())
        .build()?;
    let no_caps = LinuxCapabilities::default();
    let mut caps = no_caps;
    for set in [
        LinuxCapabilities::set_bounding,
        LinuxCapabilities::set_effective,
        LinuxCapabilities::set_inheritable,
        LinuxCapabilities::set_permitted,
        LinuxCapabilities::set_ambient,
    ] {
        set(&mut caps, Some(Default::default()));
    }
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(user)
        .args(b.args.clone())
        .env(
            b.env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        )
        .cwd(b.cwd.clone())
        .capabilities(caps)
        .no_new_privileges(true)
        .build()?;
    // The process driver's workers inherit Steward's limits (open files…);
    // so do these, but for core files: a crashing worker must not write a
    // core as large as its memory into its home, which no quota bounds.
    let mut process = process;
    process.set_rlimits(Some(vec![
        PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitCore)
            .hard(0u64)
            .soft(0u64)
            .build()?,
    ]));
    let linux = LinuxBuilder::default()
        .namespaces(namespaces(b.network))
        .resources(resources(b))
        .seccomp(seccomp()?)
        .masked_paths(
            get_default_maskedpaths()
                .into_iter()
                .chain(EXTRA_MASKED_PATHS.iter().map(|p| p.to_string()))
                .collect::<Vec<_>>(),
        )
        .readonly_paths(get_default_readonly_paths())
        .build()?;
    let mut linux = linux;
    linux.set_cgroups_path(b.cgroups_path.clone());
    let annotations = HashMap::from([
        (EXECUTOR_ANNOTATION.to_string(), b.executor_id.clone()),
        (WORKER_ANNOTATION.to_string(), b.worker_id.clone()),
    ]);
    let mut spec = SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(true)
                .build()?,
        )
        .process(process)
        .mounts(mounts(b))
        .annotations(annotations)
        .linux(linux)
        .build()?;
    spec.set_hostname(b.hostname.clone());
    Ok(spec)
}

/// Writes the bundle into `dir` (created; it must not exist): `config.json`
/// and an empty `rootfs/` holding only the links.
pub fn write(dir: &Path, b: &Bundle) -> Result<(), BundleError> {
    let spec = spec(b)?;
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(&rootfs).map_err(io_err(&rootfs))?;
    for (link, target) in &b.links {
        let at = rootfs.join(link.strip_prefix("/").unwrap_or(link));
        std::os::unix::fs::symlink(target, &at).map_err(io_err(&at))?;
    }
    let config = dir.join("config.json");
    let json = serde_json::to_vec_pretty(&spec).map_err(|e| BundleError::Io {
        path: config.clone(),
        error: io::Error::other(e),
    })?;
    fs::write(&config, json).map_err(io_err(&config))
}

/// Removes a bundle directory, unless anything is mounted at or under it
/// (then it is left, and said). A missing directory is fine.
pub fn remove(dir: &Path) -> Result<(), BundleError> {
    if !dir.exists() {
        return Ok(());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let real = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if mounted_under(&mountinfo, &real) {
        return Err(BundleError::Mounted(dir.to_path_buf()));
    }
    fs::remove_dir_all(dir).map_err(io_err(dir))
}

/// Whether `mountinfo` lists a mount point at or under `dir`.
fn mounted_under(mountinfo: &str, dir: &Path) -> bool {
    crate::cgroup::files::mount_points(mountinfo)
        .iter()
        .any(|m| m.starts_with(dir))
}

#[cfg(test)]
mod tests;
