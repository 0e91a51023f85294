//! The process driver: each worker is a `function-executor` process in its
//! own process group (killing the group also kills what user code forked)
//! and, where the host allows, its own cgroup. The child writes its pid to
//! the cgroup's `cgroup.procs` between fork and exec, so the program's
//! first instruction already runs confined. Then, where identities are
//! separated, it takes its own uid and gid and loses every capability
//! ([`crate::identity::Creds::apply`]), and it execs with an allowlisted
//! environment in its private directory, told to listen on a socket there.
//! `PR_SET_PDEATHSIG(SIGKILL)`, set last (a change of uid clears it), makes
//! the kernel kill the worker if Steward dies, even by SIGKILL.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use nix::sys::signal::Signal;
use tokio::process::{Child, Command};

use crate::cgroup::{CgroupSetup, WorkerCgroup};
use crate::channel::{self, ChannelKind, ConnectError, Endpoint, Expected, Target, WorkerStream};
use crate::identity::{self, Creds, IdentitySetup, UidLease};
use crate::isolation::{Isolation, WorkerDir};
use crate::leftovers::{self, Leftover, signal_group};
use crate::{
    DriverError, Enforcement, Exit, Limits, Reading, Worker, WorkerDriver, WorkerMonitor,
    WorkerSpec, WorkerUsage,
};

pub struct ProcessDriverConfig {
    /// Where live workers are recorded for cleanup after a crash.
    pub records_dir: PathBuf,
    pub cgroups: CgroupSetup,
    /// Identities, channel, environment and directories of workers.
    pub isolation: Isolation,
    /// Start workers to outlive Steward (their own session, no parent-death
    /// signal) and record what a later Steward needs to adopt them.
    pub adoptable: bool,
}

/// Workers as processes (see the module docs).
pub struct ProcessDriver {
    pub(crate) records_dir: PathBuf,
    pub(crate) cgroups: CgroupSetup,
    pub(crate) isolation: Arc<Isolation>,
    adoptable: bool,
    /// What adopted workers hold, spared by the leftover sweep.
    pub(crate) spared: std::sync::Mutex<crate::adopt::Spared>,
    /// Set once one of its workers is detached: its stop then leaves the
    /// parent cgroup and the directories to the next Steward.
    pub(crate) detached: Arc<std::sync::atomic::AtomicBool>,
}

impl ProcessDriver {
    /// The driver. Its directories are made at the first start (call
    /// [`Isolation::prepare`] before to refuse to start where they cannot be).
    pub fn new(config: ProcessDriverConfig) -> ProcessDriver {
        ProcessDriver {
            records_dir: config.records_dir,
            cgroups: config.cgroups,
            isolation: Arc::new(config.isolation),
            adoptable: config.adoptable,
            spared: std::sync::Mutex::default(),
            detached: Arc::default(),
        }
    }
}

/// What a worker holds besides its process, given back when it is gone
/// (in this order: the directory with its socket and scratch files, then
/// the channel's port and the uid).
pub(crate) struct Held {
    pub(crate) dir: WorkerDir,
    pub(crate) endpoint: Endpoint,
    pub(crate) lease: UidLease,
}

/// Leases the worker's uid, makes its directory and picks its endpoint
/// (on the spawner thread: it touches the disk and may scan `/proc`).
pub(crate) fn prepare(iso: &Isolation) -> Result<(Held, Option<u32>), DriverError> {
    if !iso.run_dir.is_dir() {
        // The first worker (or the directory was removed): made now.
        iso.prepare()
            .map_err(|e| DriverError::WorkerDir(std::io::Error::other(e)))?;
    }
    let separated = iso.identities.range();
    let lock_dir = iso.lock_dir();
    let running: &dyn Fn() -> std::collections::HashSet<u32> = if separated.is_some() {
        &identity::running_uids
    } else {
        &std::collections::HashSet::new
    };
    let lease = identity::lease(separated.unwrap_or_default(), lock_dir.as_deref(), running)
        .map_err(DriverError::Identity)?;
    let uid = separated.map(|_| lease.id());
    let dir = WorkerDir::create(&iso.run_dir, lease.id(), uid).map_err(DriverError::WorkerDir)?;
    let endpoint = match iso.channel {
        ChannelKind::Unix => Endpoint::Unix(dir.socket()),
        ChannelKind::Tcp => Endpoint::tcp().map_err(DriverError::Port)?,
    };
    Ok((
        Held {
            dir,
            endpoint,
            lease,
        },
        uid,
    ))
}

/// The cgroup directory name of one start of worker `id`: `fe-<id>.<n>`,
/// unique per start (a worker recreated under the same id never meets the
/// removal of its predecessor's cgroup), shortened with a hash where the id
/// would pass the kernel's 255-byte name limit.
fn cgroup_name(id: &str) -> String {
    static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if id.len() <= 200 {
        return format!("fe-{id}.{}-{n}", std::process::id());
    }
    let h = crate::fnv1a(id);
    let head: String = id.chars().take(180).collect();
    format!("fe-{head}-{h:016x}.{}-{n}", std::process::id())
}

impl WorkerDriver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    fn start(&self, spec: WorkerSpec) -> BoxFuture<'static, Result<Box<dyn Worker>, DriverError>> {
        let cgroups = self.cgroups.clone();
        let records_dir = self.records_dir.clone();
        let iso = self.isolation.clone();
        let adoptable = self.adoptable;
        let driver_detached = self.detached.clone();
        let instance = self.isolation.instance();
        let separated = self.isolation.identities.range().is_some();
        async move {
            let runtime = tokio::runtime::Handle::current();
            // Everything that may block goes to the spawner thread: moving
            // a process into a cgroup waits for an RCU grace period in the
            // kernel (about 15 ms on cgroup v1), which the agent's runtime
            // thread must never sit through.
            let (child, cgroup, spec, held, uid) = {
                on_spawner_thread(
                    move || {
                        let _entered = runtime.enter();
                        let (held, uid) = prepare(&iso)?;
                        spawn_confined(&spec, &cgroups, &held, uid, &iso, adoptable)
                            .map(|(c, g)| (c, g, spec, held, uid))
                    },
                    // The start was abandoned (its worker removed, or the
                    // agent stopping) while the spawn ran: nothing stays.
                    |started| {
                        if let Ok((mut child, cgroup, _, held, _)) = started {
                            if let Some(pid) = child.id() {
                                signal_group(pid, Signal::SIGKILL);
                            }
                            let _ = child.start_kill();
                            if let Some(cg) = cgroup {
                                cg.destroy();
                            }
                            drop(held);
                        }
                    },
                )
                .await
                .map_err(|error| DriverError::Spawn {
                    program: PathBuf::new(),
                    error,
                })??
            };
            let pid = child.id().unwrap_or(0);
            let cgroup_name = cgroup.as_ref().and_then(|c| c.name());
            let facts = adoptable
                .then(|| crate::adopt::facts(&held, uid, &spec, separated))
                .flatten();
            // Left running at a stop only if a later Steward can adopt it;
            // then its cgroup is this instance's alone to sweep.
            let adoptable = leftovers::record(&records_dir, &spec.id, pid, cgroup_name, facts);
            if adoptable && let Some(cg) = &cgroup {
                cg.mark_instance(&instance);
            }
            let worker: Box<dyn Worker> = Box::new(ProcessWorker {
                process: Process::Child(child),
                adoptable,
                pid,
                uid: uid.unwrap_or_else(crate::identity::steward_uid),
                address: held.endpoint.address(),
                target: held.endpoint.target(),
                log_path: spec.log_path,
                held: Some(held),
                monitor: Arc::new(CgroupMonitor { cgroup, pid }),
                records_dir,
                id: spec.id,
                exit: None,
                teardown: Teardown::default(),
                detached: false,
                driver_detached,
            });
            Ok(worker)
        }
        .boxed()
    }

    fn reap_leftovers(&self) -> Vec<Leftover> {
        let host = leftovers::Host::this();
        let spared = self.spared.lock().map(|s| s.clone()).unwrap_or_default();
        let mut records = Vec::new();
        let mut found = Vec::new();
        for f in leftovers::take_records(&self.records_dir, &spared.ids) {
            match f {
                leftovers::Found::Record { worker, record } => records.push((worker, record)),
                leftovers::Found::Skipped(l) => found.push(l),
            }
        }
        // Cgroups first: they also hold what left the worker's process group.
        if let CgroupSetup::Enabled(c) = &self.cgroups {
            let cgroup = |worker, killed| Leftover {
                worker,
                kind: "cgroup",
                processes_killed: killed,
                skipped: None,
            };
            for (name, theirs) in c.other_instances(&self.isolation.instance()) {
                found.push(Leftover::skipped(
                    name,
                    "cgroup",
                    format!("another Steward's (instance {theirs}): left for it to adopt or sweep"),
                ));
            }
            for parent in c.unowned_parents() {
                found.push(Leftover::skipped(
                    parent.display().to_string(),
                    "cgroup parent",
                    "not Steward's (it did not create it: no user.steward.owner mark, whatever its name): nothing under it is swept, only the worker cgroups Steward's records name".into(),
                ));
            }
            found.extend(
                c.reap_leftovers_except(&spared.cgroups, Some(&self.isolation.instance()))
                    .into_iter()
                    .map(|(name, killed)| cgroup(name, killed)),
            );
            for (_, r) in &records {
                if let Some(name) = &r.cgroup
                    && leftovers::check(r, &host).is_ok()
                    && let Some(killed) = c.reap_named(name)
                {
                    found.push(cgroup(name.clone(), killed));
                }
            }
        }
        for (worker, r) in records {
            found.push(match leftovers::reap_group(&r, &host) {
                Ok(killed) => Leftover {
                    worker,
                    kind: "process group",
                    processes_killed: killed,
                    skipped: None,
                },
                Err(why) => Leftover::skipped(worker, "process group", why.to_string()),
            });
        }
        // Their processes are gone: their directories (sockets, scratch
        // files) go too.
        let dirs = self.isolation.sweep_except(&spared.dirs);
        if dirs > 0 {
            tracing::info!(dirs, run_dir = %self.isolation.run_dir.display(), "removed leftover worker directories");
        }
        found
    }

    fn adopt(&self, id: &str) -> Result<Box<dyn Worker>, crate::AdoptError> {
        crate::adopt::adopt(self, id)
    }

    fn enforcement(&self) -> Enforcement {
        enforcement(&self.cgroups, &self.isolation)
    }

    fn workers_reading(&self) -> Option<Reading> {
        match &self.cgroups {
            CgroupSetup::Enabled(c) => c.parents_reading(),
            CgroupSetup::Unavailable(_) => None,
        }
    }

    fn shutdown(&self) {
        wait_for_spawns(Duration::from_secs(10));
        let detached = self.detached.load(std::sync::atomic::Ordering::Acquire);
        if let CgroupSetup::Enabled(c) = &self.cgroups
            && !detached
        {
            // Every worker is gone by now; anything left under our parent
            // is a straggler of ours (another instance's are left alone).
            c.reap_leftovers_except(&[], Some(&self.isolation.instance()));
            c.remove_parents();
        }
        if !detached {
            self.isolation.remove();
        }
    }
}

/// What a driver with these cgroups and this isolation enforces (shared
/// by the drivers: a sandbox's limits are the same cgroup limits).
pub(crate) fn enforcement(cgroups: &CgroupSetup, iso: &Isolation) -> Enforcement {
    let (worker_uids, identities_not_separated_because) = match &iso.identities {
        IdentitySetup::Separated(r) => (Some(r.workers_text()), None),
        IdentitySetup::NotSeparated(why) => (None, Some(why.clone())),
    };
    let isolated = |e: Enforcement| Enforcement {
        worker_uids,
        channel: iso.channel.as_str(),
        identities_not_separated_because,
        ..e
    };
    isolated(match cgroups {
        CgroupSetup::Enabled(c) => Enforcement {
            cgroup_version: Some(c.version().as_str()),
            cgroup_parents: c.parents(),
            cpu: c.enforces("cpu"),
            memory: c.enforces("memory"),
            swap_off: c.swap_off(),
            pids: c.enforces("pids"),
            not_enforced_because: (!c.missing().is_empty())
                .then(|| format!("no cgroup controller for: {}", c.missing().join(", "))),
            ..Enforcement::default()
        },
        CgroupSetup::Unavailable(why) => Enforcement {
            not_enforced_because: Some(why.clone()),
            ..Enforcement::default()
        },
    })
}

/// Creates the worker's cgroup and forks the worker into it (on the
/// spawner thread), under its own identity where it has one (`uid`), in
/// its directory, told to listen at its endpoint; the cgroup is removed
/// again if the spawn fails.
fn spawn_confined(
    spec: &WorkerSpec,
    cgroups: &CgroupSetup,
    held: &Held,
    uid: Option<u32>,
    iso: &Isolation,
    adoptable: bool,
) -> Result<(Child, Option<Arc<WorkerCgroup>>), DriverError> {
    let log_err = |error| DriverError::Log {
        path: spec.log_path.clone(),
        error,
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log_path)
        .map_err(log_err)?;
    let log2 = log.try_clone().map_err(log_err)?;
    let home = held.dir.home();
    let cgroup = match cgroups {
        CgroupSetup::Enabled(c) => Some(Arc::new(c.create(&cgroup_name(&spec.id), &spec.limits)?)),
        CgroupSetup::Unavailable(_) => None,
    };
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .arg("--address")
        .arg(held.endpoint.address())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .current_dir(&home)
        .kill_on_drop(!adoptable)
        .env_clear()
        .envs(identity::worker_env(
            &iso.env_allow,
            std::env::vars_os(),
            &home,
            uid,
            &spec.env,
        ));
    let creds = Creds::new(uid, iso.identities.range());
    let spawned = (|| {
        // In this order in the child: its own group (or, to outlive
        // Steward, its own session), into the cgroup (as Steward), then the
        // worker's identity, then the parent-death signal (which a change
        // of uid clears) unless it is to outlive Steward.
        if adoptable {
            new_session(&mut cmd);
        } else {
            cmd.process_group(0);
        }
        if let Some(cg) = &cgroup {
            confine(&mut cmd, cg)?;
        }
        take_identity(&mut cmd, creds);
        if !adoptable {
            set_parent_death_signal(&mut cmd);
        }
        cmd.spawn()
    })();
    match spawned {
        Ok(child) => Ok((child, cgroup)),
        Err(mut error) => {
            if let Some(cg) = &cgroup {
                cg.destroy();
            }
            if let Some(uid) = uid
                && error.kind() == std::io::ErrorKind::PermissionDenied
            {
                error = std::io::Error::new(
                    error.kind(),
                    format!(
                        "{error} (the worker runs as uid {uid}: the program and every directory above it must be readable and searchable by others)"
                    ),
                );
            }
            Err(DriverError::Spawn {
                program: spec.program.clone(),
                error,
            })
        }
    }
}

/// Usage and limits of a worker from its cgroup, or, without one, usage
/// of its main process from `/proc` (no limits).
pub(crate) struct CgroupMonitor {
    pub(crate) cgroup: Option<Arc<WorkerCgroup>>,
    pub(crate) pid: u32,
}

impl WorkerMonitor for CgroupMonitor {
    fn usage(&self) -> Option<WorkerUsage> {
        match &self.cgroup {
            Some(cg) => cg.usage(),
            None => {
                let r = crate::procfs::reading(self.pid)?;
                Some(WorkerUsage {
                    cpu_usec: r.cpu_usec,
                    memory_current_bytes: r.memory_bytes,
                    ..WorkerUsage::default()
                })
            }
        }
    }
    fn reading(&self) -> Option<Reading> {
        match &self.cgroup {
            Some(cg) => cg.reading(),
            None => crate::procfs::reading(self.pid),
        }
    }
    fn limits(&self) -> Option<Limits> {
        Some(self.cgroup.as_ref()?.limits())
    }
}

/// The worker's process: a child of this Steward, or one adopted from an
/// earlier run (not a child: its end is seen through a pidfd, and its exit
/// status is not known).
pub(crate) enum Process {
    Child(Child),
    Adopted(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>),
}

/// How the process ended.
enum Ended {
    Status(ExitStatus),
    /// An adopted worker's: its parent is not Steward, which never learns
    /// the status.
    Unknown,
}

impl Process {
    fn try_wait(&mut self) -> Option<Ended> {
        match self {
            Process::Child(c) => c.try_wait().ok()?.map(Ended::Status),
            Process::Adopted(fd) => pidfd_exited(fd.get_ref()).then_some(Ended::Unknown),
        }
    }

    async fn wait(&mut self) -> std::io::Result<Ended> {
        match self {
            Process::Child(c) => c.wait().await.map(Ended::Status),
            Process::Adopted(fd) => {
                // A pidfd turns readable when its process ends.
                let _ = fd.readable().await?;
                Ok(Ended::Unknown)
            }
        }
    }
}

/// Whether the process of a pidfd has ended (a poll that does not block).
fn pidfd_exited(fd: &std::os::fd::OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: one pollfd on the stack, a descriptor we own, no waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLIN != 0
}

pub(crate) struct ProcessWorker {
    pub(crate) process: Process,
    /// Started (or adopted) to outlive Steward: it can be detached.
    pub(crate) adoptable: bool,
    pub(crate) pid: u32,
    /// The uid it runs as (Steward's own where identities are not separated).
    pub(crate) uid: u32,
    pub(crate) address: String,
    pub(crate) target: Target,
    pub(crate) log_path: PathBuf,
    /// Its directory, endpoint and uid, kept from every other worker while
    /// this one lives; given back once its processes are gone.
    pub(crate) held: Option<Held>,
    pub(crate) monitor: Arc<CgroupMonitor>,
    pub(crate) records_dir: PathBuf,
    pub(crate) id: String,
    pub(crate) exit: Option<Exit>,
    /// The removal of the cgroup, once started, for `stop`/`exited` to await.
    pub(crate) teardown: Teardown,
    /// Let go of, alive: nothing of it is killed or removed when dropped.
    pub(crate) detached: bool,
    /// Its driver's: set when it is detached (see `ProcessDriver::detached`).
    pub(crate) driver_detached: Arc<std::sync::atomic::AtomicBool>,
}

/// The OOM verdict of a worker's exit, for reports and events: set when
/// the kernel OOM-killed inside its cgroup, naming the limit and the count.
pub(crate) fn oom_verdict(cgroup: Option<&WorkerCgroup>) -> Option<String> {
    let cg = cgroup?;
    let kills = cg.oom_kills().filter(|n| *n > 0)?;
    Some(format!(
        "OOM-killed: the worker's cgroup reached its memory limit of {} bytes (oom_kill count {kills})",
        cg.limits().memory_bytes
    ))
}

/// A worker's cleanup once it is gone: started once, run off the async
/// threads (removing a cgroup waits on the kernel), awaited by `stop` and
/// `exited`.
#[derive(Default)]
pub(crate) struct Teardown {
    started: bool,
    removal: Option<tokio::task::JoinHandle<()>>,
}

impl Teardown {
    pub(crate) fn started(&self) -> bool {
        self.started
    }

    /// Runs `job` on the blocking pool (inline without a runtime), once.
    pub(crate) fn start(&mut self, job: impl FnOnce() + Send + 'static) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => self.removal = Some(rt.spawn_blocking(job)),
            Err(_) => job(),
        }
    }

    /// Waits until the job has run.
    pub(crate) async fn finished(&mut self) {
        if let Some(h) = self.removal.take() {
            let _ = h.await;
        }
    }
}

impl ProcessWorker {
    fn cgroup(&self) -> Option<Arc<WorkerCgroup>> {
        self.monitor.cgroup.clone()
    }

    /// The exit as reported: an OOM kill counted by the worker's cgroup makes it OOM.
    fn exit_of(&self, ended: &Ended) -> Exit {
        let description = match ended {
            Ended::Status(status) => describe_status(status),
            Ended::Unknown => {
                "exited (status unknown: adopted from an earlier run, it is not Steward's child)"
                    .to_string()
            }
        };
        Exit {
            description,
            oom: oom_verdict(self.cgroup().as_deref()),
        }
    }

    /// Sends `sig` to the worker's process group. An adopted worker is not
    /// Steward's child: once it has exited, its pid (and group id) may be
    /// anyone's, so it is signalled through its pidfd, and its group only
    /// while it lives (a group id is not reused while its leader lives);
    /// what is left of it then is its cgroup's to kill.
    fn signal(&self, sig: Signal) {
        match &self.process {
            Process::Child(_) => signal_group(self.pid, sig),
            Process::Adopted(fd) => {
                if pidfd_exited(fd.get_ref()) {
                    if sig == Signal::SIGKILL
                        && let Some(cg) = self.cgroup()
                    {
                        cg.kill_all();
                    }
                    return;
                }
                leftovers::pidfd_signal(fd.get_ref(), sig);
                signal_group(self.pid, sig);
            }
        }
    }

    /// Kills what is left of the worker (its group, its cgroup) and removes
    /// the cgroup, off the async threads.
    fn cleanup(&mut self) {
        if self.teardown.started() {
            return;
        }
        self.signal(Signal::SIGKILL);
        leftovers::forget(&self.records_dir, &self.id);
        let cgroup = self.cgroup();
        let held = self.held.take();
        // The cgroup is emptied first: the worker's directory and uid are
        // given back only once nothing of it runs.
        self.teardown.start(move || {
            if let Some(cg) = cgroup {
                cg.destroy();
            }
            drop(held);
        });
    }

    /// Cleans up and waits until the cgroup is gone.
    async fn cleaned_up(&mut self) {
        self.cleanup();
        self.teardown.finished().await;
    }

    async fn finish(&mut self, status: Ended) -> Exit {
        let exit = self.exit_of(&status);
        self.exit = Some(exit.clone());
        self.cleaned_up().await;
        exit
    }
}

impl Worker for ProcessWorker {
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
        channel::connect(self.target.clone(), expected).boxed()
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
        let status = self.process.try_wait()?;
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
            match self.process.wait().await {
                Ok(status) => self.finish(status).await,
                Err(e) => Exit {
                    description: format!("could not be waited for: {e}"),
                    oom: None,
                },
            }
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
                self.signal(Signal::SIGTERM);
                if let Ok(Ok(status)) = tokio::time::timeout(grace, self.process.wait()).await {
                    return Some(self.finish(status).await);
                }
            }
            self.signal(Signal::SIGKILL);
            if let Some(cg) = self.cgroup() {
                cg.kill_all();
            }
            let status = tokio::time::timeout(Duration::from_secs(10), self.process.wait())
                .await
                .ok()
                .and_then(Result::ok)?;
            Some(self.finish(status).await)
        }
        .boxed()
    }

    fn can_detach(&self) -> bool {
        self.adoptable && self.exit.is_none()
    }

    fn detach(mut self: Box<Self>) -> bool {
        if !self.can_detach() || self.process.try_wait().is_some() {
            return false; // Dropped: stopped and cleaned up.
        }
        self.detached = true;
        self.driver_detached
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(held) = self.held.take() {
            // Its directory (with its socket) stays; its uid lease is
            // released with Steward's lock, and taken again on adoption.
            held.dir.keep();
        }
        true
    }
}

impl Drop for ProcessWorker {
    fn drop(&mut self) {
        if self.detached {
            return; // Left running for the next Steward.
        }
        // A worker dropped without being stopped (a startup abandoned, a
        // controller that panicked): nothing of it may stay.
        self.cleanup();
    }
}

/// Describes how a process exited, for logs and reasons.
pub fn describe_status(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!(
            "killed by signal {sig} ({})",
            Signal::try_from(sig)
                .map(|s| s.as_str())
                .unwrap_or("unknown")
        ),
        _ => "exited".to_string(),
    }
}

type SpawnJob = Box<dyn FnOnce() + Send>;

/// Threads that fork workers: several, so that workers started together
/// share the kernel's wait for moving them into their cgroups.
const SPAWNER_THREADS: usize = 4;

/// Runs `job` on one of a few threads that live as long as the agent and
/// fork every worker. The kernel sends the parent-death signal when the
/// *thread* that forked a child exits, not the process: a worker forked
/// from a pooled thread that later retires would be killed with it. The
/// caller awaits the result without blocking its runtime.
pub(crate) async fn on_spawner_thread<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
    undo: impl FnOnce(T) + Send + 'static,
) -> std::io::Result<T> {
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<SpawnJob>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..SPAWNER_THREADS {
            let rx = rx.clone();
            let started = std::thread::Builder::new()
                .name(format!("steward-spawner-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while taking a job.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        // This thread must never end while its workers
                        // live (their parent-death signal follows it).
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                            tracing::error!("a worker spawn panicked; the spawner thread goes on");
                        }
                    }
                });
            if let Err(e) = started {
                tracing::error!(error = %e, "cannot start a worker spawner thread");
            }
        }
        std::sync::Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel::<T>();
    let gone = || std::io::Error::other("the worker spawner thread is gone");
    let in_flight = InFlight::enter();
    let job: SpawnJob = Box::new(move || {
        let _in_flight = in_flight;
        if reply_tx.is_closed() {
            return; // Abandoned before it started.
        }
        if let Err(value) = reply_tx.send(job()) {
            undo(value);
        }
    });
    spawner
        .lock()
        .map_err(|_| gone())?
        .send(job)
        .map_err(|_| gone())?;
    reply_rx.await.map_err(|_| gone())
}

/// Spawns queued or running on the spawner threads.
static SPAWNS_IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts one spawn in flight until dropped.
struct InFlight;

impl InFlight {
    fn enter() -> InFlight {
        SPAWNS_IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        SPAWNS_IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Waits (bounded) until no spawn is queued or running, so that a stop
/// cleans up after the last one.
pub(crate) fn wait_for_spawns(limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while SPAWNS_IN_FLIGHT.load(std::sync::atomic::Ordering::Acquire) > 0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes `pid` in decimal to `fd` without allocating (between fork and exec).
fn write_pid(fd: RawFd, pid: libc::pid_t) -> bool {
    let mut buf = [0u8; 24];
    let mut n = pid.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let digits = &buf[i..];
    #[allow(unsafe_code)]
    // SAFETY: `digits` is a live buffer of `digits.len()` bytes.
    let written = unsafe { libc::write(fd, digits.as_ptr().cast(), digits.len()) };
    written == digits.len() as isize
}

/// Puts the child into the worker's cgroup before it execs: the files are
/// opened here, written by the child (async-signal-safe calls only), and
/// closed in the parent when `cmd` is dropped (close-on-exec in the child).
fn confine(cmd: &mut Command, cg: &WorkerCgroup) -> std::io::Result<()> {
    let files = cg
        .procs_files()
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
        })
        .collect::<std::io::Result<Vec<std::fs::File>>>()?;
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only
    // calls async-signal-safe functions (getpid, write).
    unsafe {
        cmd.pre_exec(move || {
            let pid = libc::getpid();
            for f in &files {
                if !write_pid(f.as_raw_fd(), pid) {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// Makes the child the leader of a new session (and process group), so
/// that it outlives Steward's session and terminal.
fn new_session(cmd: &mut Command) {
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setsid, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Switches the child to the worker's credentials before exec.
fn take_identity(cmd: &mut Command, creds: Creds) {
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only
    // makes system calls (`Creds::apply`).
    unsafe {
        cmd.pre_exec(move || creds.apply());
    }
}

#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_names_fit_the_kernel_limit_and_stay_distinct() {
        assert!(cgroup_name("abc").starts_with("fe-abc."));
        assert_ne!(cgroup_name("abc"), cgroup_name("abc"), "unique per start");
        let long_a = "a".repeat(256);
        let mut long_b = "a".repeat(255);
        long_b.push('b');
        let (a, b) = (cgroup_name(&long_a), cgroup_name(&long_b));
        assert!(a.len() <= 255 && b.len() <= 255);
        assert_ne!(a, b);
        // The start-up sweep recognises every name it may meet.
        for name in [cgroup_name("abc"), cgroup_name("a.b-c_d"), a, b] {
            assert!(crate::cgroup::worker_cgroup_name(&name), "{name}");
        }
    }

    #[test]
    fn pids_are_written_in_decimal() {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        for pid in [1, 42, 4_194_304] {
            assert!(write_pid(w.as_raw_fd(), pid));
            let mut buf = [0u8; 32];
            let n = nix::unistd::read(&r, &mut buf).expect("read");
            assert_eq!(&buf[..n], pid.to_string().as_bytes());
        }
    }
}
