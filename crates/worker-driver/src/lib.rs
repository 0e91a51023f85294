//! The worker-driver seam: starting, confining, observing and stopping one
//! function executor worker. The agent asks a [`WorkerDriver`] for a worker
//! from a [`WorkerSpec`] and gets back a [`Worker`] it owns; the driver
//! decides what a worker *is*. Two drivers exist: [`ProcessDriver`], a
//! process in its own process group and, where the host allows it, in its
//! own cgroup (v2 or v1) with CPU, memory and pids limits applied before its
//! first instruction; and [`OciDriver`] ([`oci`]), a container of an OCI
//! runtime (runc, gVisor's runsc, Kata's kata-runtime) with new namespaces,
//! a read-only root, a seccomp profile and the same limits.
//!
//! What every driver shares to keep workers apart from Steward and each
//! other ([`Isolation`]): a uid and gid of its own per worker, leased from a
//! range ([`identity`]), no capabilities, no new privileges, umask 077, an
//! environment from an allowlist, a private scratch directory, and a private
//! channel: a Unix socket in a directory only the worker and Steward can
//! enter, whose listener Steward checks before the first byte ([`channel`]).
//!
//! Also here: cgroup detection and file formats ([`cgroup`]), exact OOM
//! verdicts from the cgroup's own counters, per-worker usage, and cleaning up
//! what a SIGKILLed agent left behind.
//!
//! Must not know about: gRPC, protobuf, the server, allocations, admission
//! (the agent decides what a worker may have; the driver enforces it).

pub mod cgroup;
pub mod channel;
pub mod identity;
mod isolation;
mod leftovers;
pub mod oci;
mod process;
mod procfs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;

pub use cgroup::{CgroupSetup, CgroupVersion, Cgroups};
pub use channel::{ChannelKind, ConnectError, WorkerStream};
pub use identity::{EnvAllow, IdentitySetup, UidRange};
pub use isolation::{Isolation, RunDirError};
pub use leftovers::Leftover;
pub use oci::{Network, OciDriver, OciDriverConfig};
pub use process::{ProcessDriver, ProcessDriverConfig, describe_status};
mod adopt;

/// FNV-1a of `s`: a short, stable name part for an id of any length
/// (cgroup, container and directory names).
pub(crate) fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Resource limits a worker runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// CPU time per second of wall time, in ms (1000 = one core).
    pub cpu_ms_per_sec: u32,
    pub memory_bytes: u64,
    /// Processes and threads the worker's tree may have at once.
    pub pids_max: u64,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The function executor id (validated by the agent: `[A-Za-z0-9._-]`, at most 256 bytes).
    pub id: String,
    pub program: PathBuf,
    /// Arguments; the driver appends `--address <address>` of its choosing
    /// (see [`Worker::address`]).
    pub args: Vec<String>,
    /// Variables set in the worker's environment, on top of those of the
    /// agent's that the allowlist lets through ([`EnvAllow`]) and the
    /// worker's own `HOME` and `TMPDIR`.
    pub env: Vec<(String, String)>,
    pub log_path: PathBuf,
    pub limits: Limits,
}

/// Live resource use of one worker, read from its cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WorkerUsage {
    /// CPU time used since the worker started, in µs.
    pub cpu_usec: u64,
    pub memory_current_bytes: u64,
    /// Highest memory use seen, where the kernel tracks it.
    pub memory_peak_bytes: Option<u64>,
    pub pids_current: Option<u64>,
    /// OOM kills inside the worker's cgroup so far.
    pub oom_kills: u64,
}

/// How a worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// "exited with code 1", "killed by signal 9 (SIGKILL)".
    pub description: String,
    /// Set when the kernel OOM-killed inside the worker's cgroup: says so
    /// with the limit and the counter, for reports and events.
    pub oom: Option<String>,
}

/// CPU time and memory of a worker at one moment: what metering samples
/// (two reads, cheaper than a whole [`WorkerUsage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    /// CPU time used since the worker started, in µs.
    pub cpu_usec: u64,
    pub memory_bytes: u64,
}

/// Observes a worker; shareable with whoever shows or meters it.
pub trait WorkerMonitor: Send + Sync {
    /// Current usage, from the worker's cgroup or, without one, from
    /// `/proc` (the worker's main process only); `None` once it is gone.
    fn usage(&self) -> Option<WorkerUsage>;
    /// CPU time and memory now; `None` once the worker is gone.
    fn reading(&self) -> Option<Reading> {
        self.usage().map(|u| Reading {
            cpu_usec: u.cpu_usec,
            memory_bytes: u.memory_current_bytes,
        })
    }
    /// The limits enforced on the worker; `None` where none are.
    fn limits(&self) -> Option<Limits>;
}

/// A started worker. Dropping it kills the worker and everything it started.
pub trait Worker: Send + Sync {
    fn pid(&self) -> u32;
    /// Where it serves the function executor API, as it was told with
    /// `--address`: `unix:<path>` (a socket in a directory only the worker
    /// and Steward may enter) or `127.0.0.1:<port>` (the TCP fallback).
    /// For logs and timelines: connect with [`Worker::connect`], which
    /// checks who listens there.
    fn address(&self) -> &str;
    /// A connection to the worker, made only once the listener proved to
    /// be the worker (its uid, one of its processes); [`ConnectError::NotYet`]
    /// while nothing listens, [`ConnectError::Refused`] for anything else
    /// listening there.
    fn connect(&self) -> BoxFuture<'static, Result<WorkerStream, ConnectError>>;
    /// The uid the worker runs as.
    fn uid(&self) -> u32;
    fn log_path(&self) -> &Path;
    fn monitor(&self) -> Arc<dyn WorkerMonitor>;
    /// The exit, if the worker has already exited (does not block).
    fn try_exit(&mut self) -> Option<Exit>;
    /// Resolves when the worker exits.
    fn exited(&mut self) -> BoxFuture<'_, Exit>;
    /// SIGTERM, then SIGKILL after `grace` (at once when zero), to the
    /// worker and everything it started; resolves once it is gone and its
    /// cgroup removed. `None` if it could not be waited for.
    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, Option<Exit>>;
    /// Lets go of the worker without stopping it, for the next Steward to
    /// adopt: its record, directory and cgroup stay. Returns whether it
    /// was left running; a worker that cannot be adopted later (not
    /// started for adoption) is stopped as if dropped.
    fn detach(self: Box<Self>) -> bool {
        false
    }
    /// Whether [`Worker::detach`] would leave it running: started for
    /// adoption, recorded so that it can be adopted, and alive.
    fn can_detach(&self) -> bool {
        false
    }
}

/// Why a recorded worker is not adopted. Nothing of it is signalled for
/// these reasons; what is left is reaped with the usual checks.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("the {0} driver does not adopt workers")]
    Unsupported(&'static str),
    #[error("no usable record: {0}")]
    Record(String),
    #[error(
        "recorded without what adoption needs (started by a Steward that did not adopt, or on the TCP channel)"
    )]
    NotAdoptable,
    #[error("not the recorded worker: {0}")]
    NotTheWorker(String),
    #[error("the worker is gone (process {0} is no longer running)")]
    Gone(u32),
    #[error("started under another configuration: {0}")]
    Changed(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Starts workers and cleans up after them.
pub trait WorkerDriver: Send + Sync + 'static {
    /// A short name for logs and `/state/host` ("process").
    fn name(&self) -> &'static str;
    /// Starts a worker. The blocking parts (creating its cgroup, fork,
    /// moving it into the cgroup, exec) run off the caller's runtime.
    fn start(&self, spec: WorkerSpec) -> BoxFuture<'static, Result<Box<dyn Worker>, DriverError>>;
    /// Takes over worker `id`, started by an earlier run of Steward that
    /// let go of it (SIGKILLed, or stopped in adoption mode), if its record
    /// proves it is the same process (pid, start time, boot, uid, cgroup).
    /// Call before [`WorkerDriver::reap_leftovers`], which spares it.
    fn adopt(&self, id: &str) -> Result<Box<dyn Worker>, AdoptError> {
        let _ = id;
        Err(AdoptError::Unsupported(self.name()))
    }
    /// Kills and removes what workers of a previous run left behind (after
    /// a SIGKILLed agent), sparing adopted workers; returns what was found.
    fn reap_leftovers(&self) -> Vec<Leftover>;
    /// What is enforced on workers and, where nothing is, why.
    fn enforcement(&self) -> Enforcement;
    /// CPU time and memory of all its workers together (their parent
    /// cgroups' counters, one read each); `None` without cgroups.
    fn workers_reading(&self) -> Option<Reading> {
        None
    }
    /// Removes the driver's own parent cgroup once the last worker is gone.
    fn shutdown(&self);
}

/// Which limits the driver enforces, and how workers are kept apart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Enforcement {
    /// "v1", "v2", or `None` without cgroups.
    pub cgroup_version: Option<&'static str>,
    /// Where worker cgroups are created (one path per v1 hierarchy).
    pub cgroup_parents: Vec<PathBuf>,
    pub cpu: bool,
    pub memory: bool,
    pub swap_off: bool,
    pub pids: bool,
    /// Set when limits are not enforced (or only partly): why.
    pub not_enforced_because: Option<String>,
    /// The uids workers get (one per live worker, gid the same), as
    /// `first-last`; `None` where they run as Steward's own user.
    pub worker_uids: Option<String>,
    /// How Steward reaches workers: `unix` or `tcp`.
    pub channel: &'static str,
    /// Set when workers are not separated from Steward and from each other
    /// (no root, or opted out): why.
    pub identities_not_separated_because: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("picking a port for the worker: {0}")]
    Port(std::io::Error),
    #[error("leasing a uid for the worker: {0}")]
    Identity(std::io::Error),
    #[error("preparing the worker's directory: {0}")]
    WorkerDir(std::io::Error),
    #[error("opening worker log {path}: {error}")]
    Log {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("creating the worker's cgroup: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("starting {program}: {error}")]
    Spawn {
        program: PathBuf,
        error: std::io::Error,
    },
}
