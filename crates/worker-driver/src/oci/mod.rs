//! The OCI sandbox driver (`--worker-driver oci`): each worker is a
//! container run by an OCI runtime (`runc`; `runsc` for gVisor and
//! `kata-runtime` for Kata have the same command line), from a bundle
//! Steward writes itself ([`bundle`]). The container gets new pid, mount,
//! ipc and uts namespaces (and an empty network namespace with
//! `--worker-network none`), a read-only root made of the host's runtime
//! directories, the Python environment and Steward's init bound read-only
//! ([`host`]), a private `/tmp`, the worker's own directory (scratch and
//! socket) bound writable, the worker's uid from [`crate::identity`], no
//! capabilities, Steward's seccomp profile, its GPUs' device nodes and
//! nothing else of `/dev`, and the CPU, memory and pids limits of the
//! cgroup driver, in a cgroup under Steward's parent that Steward creates
//! and reads as it does a process worker's (usage, OOM verdicts).
//!
//! Lifecycle: `create` (the runtime sets the container up and exits;
//! Steward, a child subreaper, inherits the container's first process),
//! `start`, then Steward waits on that process through a pidfd and gets its
//! exit status with `waitpid`. The first process is Steward's own binary
//! ([`init`]): it forwards SIGTERM to the worker, reaps orphans and dies
//! with Steward. A stop is SIGTERM, then SIGKILL after the grace, then
//! `delete --force`, the cgroup, the bundle and the worker's directory.
//! Containers are named `steward-<executor id>-fe-<id>.<pid>-<n>` and
//! annotated with the executor id; the runtime keeps their state under
//! `<data dir>/oci/state` (its `--root`). At start, every container there
//! annotated with this executor id is deleted (never another's), and stale
//! bundles, cgroups and worker directories go.
//!
//! Must not know about: gRPC, protobuf, the server, allocations, admission.

pub mod bundle;
mod host;
pub mod init;
pub mod runtime;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

pub use bundle::Network;
pub use init::{WORKER_INIT_ARG, worker_init_if_asked};

use crate::cgroup::{CgroupSetup, WorkerCgroup, mark_owned, owned_parent, worker_cgroup_name};
use crate::channel::ChannelKind;
use crate::channel::{self, ConnectError, Expected, WorkerStream};
use crate::identity;
use crate::isolation::Isolation;
use crate::leftovers::Leftover;
use crate::process::{
    CgroupMonitor, Held, Teardown, on_spawner_thread, oom_verdict, prepare, wait_for_spawns,
};
use crate::{DriverError, Enforcement, Exit, Worker, WorkerDriver, WorkerMonitor, WorkerSpec};
use runtime::Runtime;

/// Longest wait for a killed container's first process to be gone.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Longest executor-id part of a container id; longer ids are shortened
/// with a hash (a container id is a file name of the runtime's root).
const MAX_EXECUTOR_ID_IN_NAME: usize = 64;
/// Longest worker-id part of a container id and cgroup name.
const MAX_WORKER_ID_IN_NAME: usize = 100;

/// How the OCI driver is set up.
pub struct OciDriverConfig {
    /// The runtime binary (`runc`, `runsc`, `kata-runtime`, or a path).
    pub runtime: PathBuf,
    pub executor_id: String,
    /// `<data dir>/oci`: the runtime's state (`state/`) and bundles (`bundles/`).
    pub dir: PathBuf,
    pub cgroups: CgroupSetup,
    /// `--cgroup-parent`, as given (the runtime resolves it as Steward does).
    pub cgroup_parent: String,
    pub network: Network,
    /// The binary run as each container's first process (Steward's own).
    pub init: PathBuf,
    /// More host paths bound read-only into every container (`--oci-bind-ro`).
    pub read_only: Vec<PathBuf>,
    /// Host directories bound writable into every container: the
    /// `file://` blob roots, which workers read inputs from and write
    /// outputs to (shared with them through the blob group).
    pub shared: Vec<PathBuf>,
    pub isolation: Isolation,
}

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(
        "the OCI runtime {runtime} cannot be used ({error}); install runc (apt-get install runc), or give --oci-runtime the path of runsc (gVisor) or kata-runtime (Kata)"
    )]
    Runtime {
        runtime: PathBuf,
        error: runtime::RuntimeError,
    },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("making Steward a child subreaper (to wait for its containers): {0}")]
    Subreaper(std::io::Error),
    #[error(
        "--worker-network none leaves workers no network, so only a Unix socket reaches them: --worker-channel tcp cannot be used with it"
    )]
    Channel,
    #[error("the worker run directory: {0}")]
    RunDir(crate::isolation::RunDirError),
    #[error(
        "Steward runs as root but worker identities are not separated ({0}), so its containers would run as uid 0: root without capabilities still reads root's files through the read-only binds (/etc/shadow, host keys) and passes peer checks that trust uid 0; give workers their own uids (--worker-uid-range within Steward's uid map, no --no-worker-identities)"
    )]
    RootWorkers(String),
    #[error(
        "--oci-bind-ro {0}: not an absolute path, or it is / or holds one of /proc, /dev, /sys, /tmp, /run, which each container makes its own and a bind over them would hide"
    )]
    BindOverPrivate(PathBuf),
}

/// Where each container has its own mounts: a read-only bind of one of
/// them, or of a directory above one, would hide it.
const PRIVATE_MOUNTS: [&str; 5] = ["/proc", "/dev", "/sys", "/tmp", "/run"];

/// Refuses an `--oci-bind-ro` path that is relative, `/`, or at or above a
/// container's private mounts.
fn check_bind_ro(p: &Path) -> Result<(), OciError> {
    let clashes = PRIVATE_MOUNTS
        .iter()
        .any(|m| p.starts_with(m) || Path::new(m).starts_with(p));
    if !p.is_absolute() || clashes {
        return Err(OciError::BindOverPrivate(p.to_path_buf()));
    }
    Ok(())
}

/// Workers as OCI containers (see the module docs).
pub struct OciDriver {
    setup: Arc<Setup>,
    version: String,
}

/// What every start reads (shared with the spawner threads).
struct Setup {
    runtime: Runtime,
    executor_id: String,
    /// `steward-<executor id, bounded>-`: the start of this Steward's container ids.
    prefix: String,
    bundles: PathBuf,
    cgroups: CgroupSetup,
    cgroup_parent: String,
    network: Network,
    init: PathBuf,
    /// Runtime directories and extra binds (read-only), and root links.
    base_binds: Vec<PathBuf>,
    /// Bound writable into every container (the blob roots).
    shared: Vec<PathBuf>,
    links: Vec<(PathBuf, PathBuf)>,
    /// Cgroup parents in hierarchies Steward does not manage itself (the
    /// runtime puts containers in every hierarchy: devices, freezer, …).
    extra_parents: Vec<PathBuf>,
    hostname: Option<String>,
    isolation: Isolation,
}

/// `s` with characters a container id may not hold replaced, and
/// shortened to `max` bytes with a hash of the whole where longer.
fn name_part(s: &str, max: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.len() <= max && clean == s {
        return clean;
    }
    let h = crate::fnv1a(s); // of the original
    let head: String = clean.chars().take(max.saturating_sub(17)).collect();
    format!("{head}-{h:016x}")
}

/// The cgroup name of one start of worker `id`, `fe-<id>.<pid>-<n>` as the
/// process driver's (so the cgroup sweep knows it), with the id bounded.
fn worker_name(id: &str) -> String {
    static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "fe-{}.{}-{n}",
        name_part(id, MAX_WORKER_ID_IN_NAME),
        std::process::id()
    )
}

impl OciDriver {
    /// Checks the runtime (it must answer `--version`), makes Steward a
    /// child subreaper, and prepares the directories.
    pub fn new(config: OciDriverConfig) -> Result<OciDriver, OciError> {
        if config.network == Network::None && config.isolation.channel == ChannelKind::Tcp {
            return Err(OciError::Channel);
        }
        if let crate::identity::IdentitySetup::NotSeparated(why) = &config.isolation.identities
            && identity::steward_uid() == 0
        {
            return Err(OciError::RootWorkers(why.clone()));
        }
        let version = runtime::version(&config.runtime).map_err(|error| OciError::Runtime {
            runtime: config.runtime.clone(),
            error,
        })?;
        config.isolation.prepare().map_err(OciError::RunDir)?;
        #[allow(unsafe_code)]
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(OciError::Subreaper(std::io::Error::last_os_error()));
        }
        let state = config.dir.join("state");
        let bundles = config.dir.join("bundles");
        for d in [&state, &bundles] {
            std::fs::create_dir_all(d).map_err(|error| OciError::Io {
                path: d.clone(),
                error,
            })?;
        }
        let (mut base_binds, links) = host::runtime_dirs(Path::new("/"));
        for p in &config.read_only {
            check_bind_ro(p)?;
            if !base_binds.iter().any(|b| p.starts_with(b)) {
                base_binds.push(p.clone());
            }
        }
        let extra_parents = extra_parents(&config.cgroups, &config.cgroup_parent);
        // Steward makes (and marks as its own) its parent in the
        // hierarchies the runtime adds, as the cgroup driver does in its
        // own: only a parent it made is swept and removed.
        for p in &extra_parents {
            let existed = p.is_dir();
            if let Err(e) = std::fs::create_dir_all(p)
                .and_then(|()| if existed { Ok(()) } else { mark_owned(p) })
            {
                tracing::warn!(parent = %p.display(), error = %e, "cannot make Steward's cgroup parent for the runtime's hierarchies: containers' cgroups there are not swept");
            }
        }
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty());
        Ok(OciDriver {
            setup: Arc::new(Setup {
                runtime: Runtime::new(config.runtime, state),
                prefix: format!(
                    "steward-{}-",
                    name_part(&config.executor_id, MAX_EXECUTOR_ID_IN_NAME)
                ),
                executor_id: config.executor_id,
                bundles,
                cgroups: config.cgroups,
                cgroup_parent: config.cgroup_parent,
                network: config.network,
                init: config.init,
                base_binds,
                shared: config.shared,
                links,
                extra_parents,
                hostname,
                isolation: config.isolation,
            }),
            version,
        })
    }

    /// The runtime's answer to `--version`.
    pub fn runtime_version(&self) -> &str {
        &self.version
    }

    /// The runtime binary.
    pub fn runtime(&self) -> &Path {
        self.setup.runtime.bin()
    }
}

/// Why a container with this Steward's id prefix is not one of its own.
#[derive(Debug, thiserror::Error)]
enum NotOurs {
    #[error("annotated with executor id {id:?}, not this Steward's {ours:?}")]
    Annotated { id: String, ours: String },
    #[error("its bundle is annotated with executor id {0:?}, not this Steward's")]
    Bundle(String),
    #[error("no executor id annotation")]
    NoAnnotation,
}

impl Setup {
    /// Whether `c` is one of this Steward's containers: our id prefix and
    /// our executor id in its annotation; `Err` says why one with our
    /// prefix is not.
    fn ours(&self, c: &runtime::Container) -> Option<Result<(), NotOurs>> {
        let rest = c.id.strip_prefix(&self.prefix)?;
        if !rest.starts_with("fe-") {
            return None;
        }
        let annotated = c
            .annotations
            .as_ref()
            .and_then(|a| a.get(bundle::EXECUTOR_ANNOTATION));
        Some(match annotated {
            Some(e) if *e == self.executor_id => Ok(()),
            Some(e) => Err(NotOurs::Annotated {
                id: e.clone(),
                ours: self.executor_id.clone(),
            }),
            // An older runtime that lists no annotations: the bundle's own
            // config says whose it is.
            None => match annotation_in_bundle(&c.bundle) {
                Some(e) if e == self.executor_id => Ok(()),
                Some(e) => Err(NotOurs::Bundle(e)),
                None => Err(NotOurs::NoAnnotation),
            },
        })
    }

    /// The cgroup path the runtime is given for worker cgroup `name`:
    /// relative to the runtime's own cgroup (Steward's) as `--cgroup-parent`
    /// is, or absolute; on v2 always absolute, from the mount (Steward may
    /// have moved itself into a leaf).
    fn cgroups_path(&self, name: &str) -> PathBuf {
        if let CgroupSetup::Enabled(c) = &self.cgroups
            && c.version() == crate::CgroupVersion::V2
            && !self.cgroup_parent.starts_with('/')
            && let Some(parent) = c.parents().first()
            && let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo")
            && let Some(mount) = host::cgroup_mount_of(&mountinfo, parent)
            && let Ok(rel) = parent.strip_prefix(&mount)
        {
            return Path::new("/").join(rel).join(name);
        }
        Path::new(&self.cgroup_parent).join(name)
    }
}

/// The executor id annotation in a bundle's `config.json`.
fn annotation_in_bundle(bundle: &Path) -> Option<String> {
    let text = std::fs::read_to_string(bundle.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("annotations")?
        .get(bundle::EXECUTOR_ANNOTATION)?
        .as_str()
        .map(str::to_string)
}

/// Steward's parent directories in the hierarchies the cgroup driver does
/// not manage (the runtime creates them for its containers).
fn extra_parents(cgroups: &CgroupSetup, parent: &str) -> Vec<PathBuf> {
    let (Ok(mountinfo), Ok(self_cgroup)) = (
        std::fs::read_to_string("/proc/self/mountinfo"),
        std::fs::read_to_string("/proc/self/cgroup"),
    ) else {
        return Vec::new();
    };
    let managed = match cgroups {
        CgroupSetup::Enabled(c) => c.parents(),
        CgroupSetup::Unavailable(_) => Vec::new(),
    };
    host::own_cgroup_dirs(&mountinfo, &self_cgroup)
        .into_iter()
        .filter_map(|own| {
            if parent.starts_with('/') {
                let mount = host::cgroup_mount_of(&mountinfo, &own)?;
                Some(mount.join(parent.trim_start_matches('/')))
            } else {
                Some(own.join(parent))
            }
        })
        .filter(|p| !managed.contains(p))
        .collect()
}

/// Removes empty worker cgroups (`fe-<id>.<pid>-<n>`) under the extra
/// parents Steward made ([`owned_parent`]); returns their names.
fn sweep_extra_cgroups(parents: &[PathBuf]) -> Vec<String> {
    let mut removed = Vec::new();
    for p in parents.iter().filter(|p| owned_parent(p)) {
        let Ok(entries) = std::fs::read_dir(p) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if worker_cgroup_name(&name)
                && !crate::cgroup::of_another_live_steward(&name)
                && std::fs::remove_dir(e.path()).is_ok()
            {
                removed.push(name);
            }
        }
    }
    removed
}

/// What a start made, kept so that an abandoned start can be undone.
struct Made {
    container: String,
    bundle: PathBuf,
    cgroup: Option<Arc<WorkerCgroup>>,
    pid: u32,
    pidfd: OwnedFd,
    /// The worker's directory, endpoint and uid lease.
    held: Held,
    uid: u32,
    log_path: PathBuf,
}

impl WorkerDriver for OciDriver {
    fn name(&self) -> &'static str {
        "oci"
    }

    fn start(&self, spec: WorkerSpec) -> BoxFuture<'static, Result<Box<dyn Worker>, DriverError>> {
        let setup = self.setup.clone();
        async move {
            // Every step blocks (the uid lease scans /proc, the runtime
            // sets up namespaces, mounts and cgroups): all on a spawner
            // thread, never on the agent's runtime thread.
            let runtime = setup.runtime.clone();
            let undo_runtime = runtime.clone();
            let made = on_spawner_thread(
                move || setup.make(spec),
                // Abandoned while the runtime worked: nothing stays.
                move |made| {
                    if let Ok(m) = made {
                        undo(&undo_runtime, m);
                    }
                },
            )
            .await
            .map_err(|error| DriverError::Spawn {
                program: PathBuf::new(),
                error,
            })??;
            let Made {
                container,
                bundle,
                cgroup,
                pid,
                pidfd,
                held,
                uid,
                log_path,
            } = made;
            #[allow(unsafe_code)]
            // SAFETY: the pidfd is owned by the AsyncFd from here on, so it
            // stays open for as long as it is registered.
            let exit_fd =
                unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
                    .map_err(|e| DriverError::Spawn {
                        program: PathBuf::new(),
                        error: e.into_parts().1,
                    })?;
            let worker: Box<dyn Worker> = Box::new(OciWorker {
                container,
                bundle,
                runtime,
                pid,
                uid,
                exit_fd: Some(exit_fd),
                address: held.endpoint.address(),
                log_path,
                monitor: Arc::new(CgroupMonitor { cgroup, pid }),
                held: Some(held),
                exit: None,
                teardown: Teardown::default(),
            });
            Ok(worker)
        }
        .boxed()
    }

    fn reap_leftovers(&self) -> Vec<Leftover> {
        self.setup.reap_leftovers()
    }

    fn enforcement(&self) -> Enforcement {
        crate::process::enforcement(&self.setup.cgroups, &self.setup.isolation)
    }

    fn shutdown(&self) {
        wait_for_spawns(Duration::from_secs(10));
        self.setup.shutdown();
    }
}

impl Setup {
    /// Deletes this Steward's containers a SIGKILLed run left (never
    /// another's), then stale bundles, cgroups and worker directories.
    fn reap_leftovers(&self) -> Vec<Leftover> {
        let mut found = Vec::new();
        let containers = match self.runtime.list() {
            Ok(c) => c,
            Err(e) => {
                found.push(Leftover::skipped(
                    self.runtime.bin().display().to_string(),
                    "container",
                    format!("cannot list containers: {e}"),
                ));
                Vec::new()
            }
        };
        let mut kept: Vec<PathBuf> = Vec::new();
        for c in &containers {
            match self.ours(c) {
                None => kept.push(c.bundle.clone()),
                Some(Err(why)) => {
                    kept.push(c.bundle.clone());
                    found.push(Leftover::skipped(
                        c.id.clone(),
                        "container",
                        why.to_string(),
                    ));
                }
                Some(Ok(())) => match self.runtime.delete(&c.id) {
                    Ok(()) => found.push(Leftover {
                        worker: c.id.clone(),
                        kind: "container",
                        processes_killed: usize::from(c.pid > 0 && c.status != "stopped"),
                        skipped: None,
                    }),
                    Err(e) => {
                        kept.push(c.bundle.clone());
                        found.push(Leftover::skipped(
                            c.id.clone(),
                            "container",
                            format!("delete failed: {e}"),
                        ));
                    }
                },
            }
        }
        // Bundles of containers that are gone (or were never created).
        if let Ok(entries) = std::fs::read_dir(&self.bundles) {
            for e in entries.filter_map(Result::ok) {
                let path = e.path();
                if kept.contains(&path) {
                    continue;
                }
                found.push(match bundle::remove(&path) {
                    Ok(()) => Leftover {
                        worker: e.file_name().to_string_lossy().into_owned(),
                        kind: "bundle",
                        processes_killed: 0,
                        skipped: None,
                    },
                    Err(why) => {
                        Leftover::skipped(path.display().to_string(), "bundle", why.to_string())
                    }
                });
            }
        }
        if let CgroupSetup::Enabled(c) = &self.cgroups {
            found.extend(
                c.reap_leftovers()
                    .into_iter()
                    .map(|(name, killed)| Leftover {
                        worker: name,
                        kind: "cgroup",
                        processes_killed: killed,
                        skipped: None,
                    }),
            );
        }
        found.extend(
            sweep_extra_cgroups(&self.extra_parents)
                .into_iter()
                .map(|name| Leftover {
                    worker: name,
                    kind: "cgroup",
                    processes_killed: 0,
                    skipped: None,
                }),
        );
        let dirs = self.isolation.sweep();
        if dirs > 0 {
            tracing::info!(dirs, run_dir = %self.isolation.run_dir.display(), "removed leftover worker directories");
        }
        found
    }

    /// At a clean stop, once every worker is gone: stragglers (a start
    /// abandoned mid-way), then Steward's parent cgroups in every
    /// hierarchy and its run directory.
    fn shutdown(&self) {
        if let Ok(list) = self.runtime.list() {
            for c in list {
                if matches!(self.ours(&c), Some(Ok(()))) {
                    let _ = self.runtime.delete(&c.id);
                    let _ = bundle::remove(&c.bundle);
                }
            }
        }
        if let CgroupSetup::Enabled(c) = &self.cgroups {
            c.reap_leftovers();
            c.remove_parents();
        }
        sweep_extra_cgroups(&self.extra_parents);
        for p in self.extra_parents.iter().filter(|p| owned_parent(p)) {
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            while let Err(e) = std::fs::remove_dir(p) {
                if e.kind() != std::io::ErrorKind::ResourceBusy
                    || std::time::Instant::now() >= deadline
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.isolation.remove();
    }

    /// Leases the worker's identity and directory, writes its bundle, and
    /// has the runtime create and start it (on a spawner thread).
    fn make(&self, spec: WorkerSpec) -> Result<Made, DriverError> {
        let program_err = |program: &Path, error: std::io::Error| DriverError::Spawn {
            program: program.to_path_buf(),
            error,
        };
        let path_var = std::env::var("PATH").ok();
        let program =
            host::resolve_program(&spec.program, path_var.as_deref()).ok_or_else(|| {
                program_err(
                    &spec.program,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "not found on the host (nor on PATH), so it cannot be bound into the container",
                    ),
                )
            })?;
        let gpus = host::gpu_devices(&gpu_uuids(&spec.env), Path::new("/proc"), Path::new("/dev"))
            .map_err(|e| program_err(&program, std::io::Error::other(e)))?;
        let (held, own_uid) = prepare(&self.isolation)?;
        let uid = own_uid.unwrap_or_else(identity::steward_uid);
        let gid = own_uid.unwrap_or_else(steward_gid);
        let name = worker_name(&spec.id);
        let container = format!("{}{name}", self.prefix);
        let bundle_dir = self.bundles.join(&container);
        let home = held.dir.home();
        let mut read_only = self.base_binds.clone();
        let mut extra = host::program_binds(&program, &read_only);
        if !read_only.iter().any(|b| self.init.starts_with(b)) {
            extra.push(self.init.clone());
        }
        read_only.extend(extra);
        let mut args: Vec<String> = vec![
            self.init.display().to_string(),
            WORKER_INIT_ARG.to_string(),
            "--".to_string(),
            program.display().to_string(),
        ];
        args.extend(spec.args.iter().cloned());
        args.push("--address".into());
        args.push(held.endpoint.address());
        let env = identity::worker_env(
            &self.isolation.env_allow,
            std::env::vars_os(),
            &home,
            own_uid,
            &spec.env,
        )
        .into_iter()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
        // The worker's directory (socket and scratch) is the one writable
        // path it shares with the host.
        let writable = held
            .dir
            .home()
            .parent()
            .map(Path::to_path_buf)
            .into_iter()
            .chain(self.shared.iter().cloned())
            .collect();
        let b = bundle::Bundle {
            executor_id: self.executor_id.clone(),
            worker_id: spec.id.clone(),
            args,
            env,
            cwd: home,
            uid,
            gid,
            groups: self
                .isolation
                .identities
                .range()
                .map(|r| vec![r.blob_gid()])
                .unwrap_or_default(),
            read_only,
            writable,
            links: self.links.clone(),
            limits: spec.limits,
            swap_limited: swap_limited(&self.cgroups),
            cgroups_path: Some(self.cgroups_path(&name)),
            network: self.network,
            gpus,
            hostname: self.hostname.clone(),
        };
        let cgroup = match &self.cgroups {
            CgroupSetup::Enabled(c) => Some(Arc::new(c.create(&name, &spec.limits)?)),
            CgroupSetup::Unavailable(_) => None,
        };
        let fail = |e: DriverError| {
            let _ = self.runtime.delete(&container);
            if let Some(cg) = &cgroup {
                cg.destroy();
            }
            let _ = bundle::remove(&bundle_dir);
            e
        };
        let runtime_err = |e: runtime::RuntimeError| DriverError::Spawn {
            program: program.clone(),
            error: std::io::Error::other(e.to_string()),
        };
        bundle::write(&bundle_dir, &b)
            .map_err(|e| fail(program_err(&program, std::io::Error::other(e.to_string()))))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
            .map_err(|error| {
                fail(DriverError::Log {
                    path: spec.log_path.clone(),
                    error,
                })
            })?;
        let pid_file = bundle_dir.join("pid");
        self.runtime
            .create(
                &container,
                &bundle_dir,
                &pid_file,
                &log,
                &bundle_dir.join("runtime.log"),
            )
            .map_err(|e| fail(runtime_err(e)))?;
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|p| *p > 1)
            .ok_or_else(|| {
                fail(program_err(
                    &program,
                    std::io::Error::other(format!(
                        "the runtime wrote no pid to {}",
                        pid_file.display()
                    )),
                ))
            })?;
        let pidfd =
            crate::leftovers::pidfd_open(pid as i32).map_err(|e| fail(program_err(&program, e)))?;
        if let Err(e) = self.runtime.start(&container) {
            crate::leftovers::pidfd_kill(&pidfd);
            reap(pid, KILL_WAIT);
            return Err(fail(runtime_err(e)));
        }
        Ok(Made {
            container,
            bundle: bundle_dir,
            cgroup,
            pid,
            pidfd,
            held,
            uid,
            log_path: spec.log_path,
        })
    }
}

/// Steward's own effective gid (the owner group of `/proc/self`).
fn steward_gid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(0, |m| m.gid())
}

/// The GPUs allocated to the worker: the UUIDs in `NVIDIA_VISIBLE_DEVICES`
/// of its environment, the variable the agent sets for them (and the one
/// NVIDIA's container toolkit reads from a bundle).
fn gpu_uuids(env: &[(String, String)]) -> Vec<String> {
    env.iter()
        .rev()
        .find(|(k, _)| k == "NVIDIA_VISIBLE_DEVICES")
        .map(|(_, v)| {
            v.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether memory+swap can be limited in the worker's cgroup (v1
/// `memory.memsw.*`, v2 `memory.swap.max`): then the bundle sets swap
/// equal to memory, no swap.
fn swap_limited(cgroups: &CgroupSetup) -> bool {
    let CgroupSetup::Enabled(c) = cgroups else {
        return false;
    };
    c.parents().iter().any(|p| {
        p.join("memory.memsw.limit_in_bytes").exists() || p.join("memory.swap.max").exists()
    })
}

/// Undoes what a start made (an abandoned start): the container, its
/// cgroup and bundle, then its directory and uid.
fn undo(runtime: &Runtime, m: Made) {
    crate::leftovers::pidfd_kill(&m.pidfd);
    reap(m.pid, KILL_WAIT);
    let _ = runtime.delete(&m.container);
    if let Some(cg) = &m.cgroup {
        cg.destroy();
    }
    let _ = bundle::remove(&m.bundle);
    drop(m.held);
}

/// Reaps the container's first process (Steward's child once the
/// runtime's `create` exited), polling for up to `within`.
fn reap(pid: u32, within: Duration) -> Option<WaitStatus> {
    let deadline = std::time::Instant::now() + within;
    let pid = Pid::from_raw(pid as i32);
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(s) => return Some(s),
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct OciWorker {
    container: String,
    bundle: PathBuf,
    runtime: Runtime,
    /// The container's first process (Steward's init), as the host sees it.
    pid: u32,
    uid: u32,
    /// Readable once the container's first process has exited.
    exit_fd: Option<AsyncFd<OwnedFd>>,
    address: String,
    log_path: PathBuf,
    monitor: Arc<CgroupMonitor>,
    /// The worker's directory, endpoint and uid lease, given back once
    /// nothing of it runs.
    held: Option<Held>,
    exit: Option<Exit>,
    teardown: Teardown,
}

/// Whether process `pid` is gone (or a zombie).
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

impl OciWorker {
    fn cgroup(&self) -> Option<Arc<WorkerCgroup>> {
        self.monitor.cgroup.clone()
    }

    fn signal(&self, signal: Signal) {
        if let Some(fd) = &self.exit_fd {
            crate::leftovers::pidfd_signal(fd.get_ref(), signal);
        }
    }

    /// The exit as reported: an OOM kill counted by the container's cgroup
    /// makes it OOM, as for a process worker.
    fn exit_of(&self, status: &WaitStatus) -> Exit {
        Exit {
            description: init::describe_init_status(status),
            oom: oom_verdict(self.cgroup().as_deref()),
        }
    }

    /// The exit status, if the first process has exited (does not block).
    fn poll_status(&self) -> Option<WaitStatus> {
        let pid = Pid::from_raw(self.pid as i32);
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => None,
            Ok(s) => Some(s),
            // Not Steward's child (a runtime whose process Steward did not
            // inherit): its status is unknown, only that it is gone.
            Err(_) => gone(self.pid).then_some(WaitStatus::Exited(pid, 0)),
        }
    }

    /// Waits for the first process to exit.
    async fn wait(&self) -> WaitStatus {
        loop {
            if let Some(s) = self.poll_status() {
                return s;
            }
            let Some(fd) = &self.exit_fd else {
                return WaitStatus::Exited(Pid::from_raw(self.pid as i32), 0);
            };
            match fd.readable().await {
                Ok(mut guard) => {
                    if let Some(s) = self.poll_status() {
                        return s;
                    }
                    guard.clear_ready();
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Deletes the container, its cgroup and bundle, then gives back its
    /// directory and uid, off the async threads.
    fn cleanup(&mut self) {
        if self.teardown.started() {
            return;
        }
        self.signal(Signal::SIGKILL);
        let pid = self.pid;
        let runtime = self.runtime.clone();
        let container = self.container.clone();
        let bundle_dir = self.bundle.clone();
        let cgroup = self.cgroup();
        let held = self.held.take();
        let exit_fd = self.exit_fd.take();
        self.teardown.start(move || {
            reap(pid, KILL_WAIT);
            drop(exit_fd);
            if let Err(e) = runtime.delete(&container) {
                tracing::warn!(%container, error = %e, "container could not be deleted");
            }
            if let Some(cg) = cgroup {
                cg.destroy();
            }
            if let Err(e) = bundle::remove(&bundle_dir) {
                tracing::warn!(bundle = %bundle_dir.display(), error = %e, "bundle could not be removed");
            }
            drop(held);
        });
    }

    async fn cleaned_up(&mut self) {
        self.cleanup();
        self.teardown.finished().await;
    }

    async fn finish(&mut self, status: WaitStatus) -> Exit {
        let exit = self.exit_of(&status);
        self.exit = Some(exit.clone());
        self.cleaned_up().await;
        exit
    }
}

impl Worker for OciWorker {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn address(&self) -> &str {
        &self.address
    }

    fn connect(&self) -> BoxFuture<'static, Result<WorkerStream, ConnectError>> {
        let expected = Expected {
            uid: self.uid,
            pid: self.pid,
            cgroup: self.cgroup(),
        };
        match self.held.as_ref().map(|h| h.endpoint.target()) {
            Some(target) => channel::connect(target, expected).boxed(),
            None => futures::future::ready(Err(ConnectError::NotYet(std::io::Error::other(
                "the worker is gone",
            ))))
            .boxed(),
        }
    }

    fn uid(&self) -> u32 {
        self.uid
    }

    fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn monitor(&self) -> Arc<dyn WorkerMonitor> {
        self.monitor.clone()
    }

    fn try_exit(&mut self) -> Option<Exit> {
        if let Some(e) = &self.exit {
            return Some(e.clone());
        }
        let status = self.poll_status()?;
        let exit = self.exit_of(&status);
        self.exit = Some(exit.clone());
        self.cleanup();
        Some(exit)
    }

    fn exited(&mut self) -> BoxFuture<'_, Exit> {
        async move {
            if let Some(e) = self.exit.clone() {
                self.cleaned_up().await;
                return e;
            }
            let status = self.wait().await;
            self.finish(status).await
        }
        .boxed()
    }

    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, Option<Exit>> {
        async move {
            if let Some(e) = self.try_exit() {
                self.cleaned_up().await;
                return Some(e);
            }
            if !grace.is_zero() {
                // Steward's init forwards it to the worker.
                self.signal(Signal::SIGTERM);
                if let Ok(status) = tokio::time::timeout(grace, self.wait()).await {
                    return Some(self.finish(status).await);
                }
            }
            // SIGKILL to a pid namespace's first process kills all of it.
            self.signal(Signal::SIGKILL);
            if let Some(cg) = self.cgroup() {
                cg.kill_all();
            }
            let status = tokio::time::timeout(KILL_WAIT, self.wait()).await.ok()?;
            Some(self.finish(status).await)
        }
        .boxed()
    }
}

impl Drop for OciWorker {
    fn drop(&mut self) {
        // Dropped without a stop (a start abandoned, a controller that
        // panicked): nothing of it may stay.
        self.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_bind_cannot_hide_a_containers_private_mounts() {
        for bad in [
            "/",
            "relative/cuda",
            "/proc",
            "/dev/nvidia0",
            "/sys/fs",
            "/tmp",
            "/run/x",
        ] {
            assert!(
                matches!(
                    check_bind_ro(Path::new(bad)),
                    Err(OciError::BindOverPrivate(_))
                ),
                "{bad} was accepted"
            );
        }
        for good in ["/opt/cuda", "/usr/local/cuda-12", "/srv/models"] {
            assert!(check_bind_ro(Path::new(good)).is_ok(), "{good} was refused");
        }
    }

    #[test]
    fn container_ids_keep_the_runtimes_rules_and_the_executor_id() {
        assert_eq!(name_part("steward-0123abcd", 64), "steward-0123abcd");
        let odd = name_part("host:1/a b", 64);
        assert!(odd.starts_with("host_1_a_b-"), "{odd}");
        assert_ne!(
            name_part("a:b", 64),
            name_part("a/b", 64),
            "distinct after cleaning"
        );
        let long = name_part(&"x".repeat(300), 64);
        assert_eq!(long.len(), 64);
        let name = worker_name(&"f".repeat(256));
        assert!(name.len() < 140, "{name}");
        assert!(worker_cgroup_name(&name), "{name}");
        assert_ne!(worker_name("f"), worker_name("f"));
        for n in [name, worker_name("a.b-c_d")] {
            let id = format!("steward-{}-{n}", name_part("e", 64));
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                    && id.len() <= 255,
                "{id}"
            );
        }
    }
}
