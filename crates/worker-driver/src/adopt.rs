//! Adoption: taking over a worker that an earlier run of Steward started
//! and let go of (it was SIGKILLed, or stopped in adoption mode), instead
//! of killing it. The worker's record (`leftovers`) says who it must be;
//! adoption goes ahead only if every fact still holds: this boot, a live
//! leader with the recorded start time, leading its own group, running as
//! the recorded uid and sitting in the recorded cgroup, checked after a
//! pidfd to it is open (so a pid reused in between is never taken). Its
//! uid lease, directory, socket and cgroup are then held again, and its
//! end is watched through the pidfd. A record that fails any check is left
//! to the leftover sweep, whose own checks decide what, if anything, dies.
//!
//! Must not know about: gRPC, the server, allocations (the agent keeps
//! its own record of what ran on the worker).

use std::sync::Arc;

use crate::AdoptError;
use crate::cgroup::CgroupSetup;
use crate::channel::{ChannelKind, Endpoint};
use crate::identity::{self, IdentitySetup};
use crate::isolation::{Isolation, WorkerDir};
use crate::leftovers::{self, AdoptFacts, Record};
use crate::process::{CgroupMonitor, Held, Process, ProcessDriver, ProcessWorker, Teardown};
use crate::{Worker, WorkerSpec};

/// What adopted workers hold, which the leftover sweep must not touch:
/// their record files, cgroup names and directory names.
#[derive(Debug, Clone, Default)]
pub(crate) struct Spared {
    pub(crate) ids: Vec<String>,
    pub(crate) cgroups: Vec<String>,
    pub(crate) dirs: Vec<String>,
}

/// The adoption facts of a worker just started (Unix channel only: a TCP
/// port cannot be proved the worker's again once its lease is gone).
pub(crate) fn facts(
    held: &Held,
    uid: Option<u32>,
    spec: &WorkerSpec,
    separated: bool,
) -> Option<AdoptFacts> {
    let Endpoint::Unix(socket) = &held.endpoint else {
        return None;
    };
    Some(AdoptFacts {
        lease: held.lease.id(),
        uid: uid.unwrap_or_else(identity::steward_uid),
        separated,
        socket: socket.clone(),
        limits: spec.limits,
        log: spec.log_path.clone(),
    })
}

/// Adopts worker `id` of `driver` (see the module docs).
pub(crate) fn adopt(driver: &ProcessDriver, id: &str) -> Result<Box<dyn Worker>, AdoptError> {
    let record = leftovers::read_record(&driver.records_dir, id)
        .map_err(|e| AdoptError::Record(e.to_string()))?;
    let facts = record.adopt.clone().ok_or(AdoptError::NotAdoptable)?;
    check_configuration(&facts, &driver.isolation)?;
    let pidfd = same_process(&record, &facts)?;
    let lease = identity::lease_exact(facts.lease, driver.isolation.lock_dir().as_deref())?;
    let cgroup = match (&driver.cgroups, &record.cgroup) {
        (CgroupSetup::Enabled(c), Some(name)) => {
            Some(Arc::new(c.reopen(name, facts.limits).ok_or_else(|| {
                AdoptError::Changed(format!("its cgroup {name} is gone"))
            })?))
        }
        (CgroupSetup::Unavailable(_), Some(_)) => {
            return Err(AdoptError::Changed(
                "it was started in a cgroup, and cgroups are not in use now".into(),
            ));
        }
        (_, None) => None,
    };
    let expected = driver
        .isolation
        .run_dir
        .join(WorkerDir::name(facts.lease))
        .join(crate::isolation::SOCKET);
    if facts.socket != expected {
        return Err(AdoptError::Changed(format!(
            "its socket {} is not in its directory",
            facts.socket.display()
        )));
    }
    let endpoint = Endpoint::Unix(facts.socket.clone());
    let pid = record.pgid;
    #[allow(unsafe_code)]
    // SAFETY: the AsyncFd owns the pidfd, which stays open and the same
    // descriptor until the AsyncFd is dropped.
    let watched = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(std::io::Error::from)?;
    // Last: dropped, a `WorkerDir` removes the directory of a live worker.
    let dir = WorkerDir::existing(&driver.isolation.run_dir, facts.lease)?;
    let worker = ProcessWorker {
        process: Process::Adopted(watched),
        adoptable: true,
        pid,
        uid: facts.uid,
        address: endpoint.address(),
        target: endpoint.target(),
        log_path: facts.log.clone(),
        held: Some(Held {
            dir,
            endpoint,
            lease,
        }),
        monitor: Arc::new(CgroupMonitor {
            cgroup: cgroup.clone(),
            pid,
        }),
        records_dir: driver.records_dir.clone(),
        id: id.to_string(),
        exit: None,
        teardown: Teardown::default(),
        detached: false,
        driver_detached: driver.detached.clone(),
    };
    if let Ok(mut spared) = driver.spared.lock() {
        spared.ids.push(id.to_string());
        spared.cgroups.extend(record.cgroup.clone());
        spared.dirs.push(WorkerDir::name(facts.lease));
    }
    Ok(Box::new(worker))
}

/// The worker must be kept apart as it was: same kind of identity, same
/// channel.
fn check_configuration(facts: &AdoptFacts, iso: &Isolation) -> Result<(), AdoptError> {
    let separated = matches!(iso.identities, IdentitySetup::Separated(_));
    if facts.separated != separated {
        return Err(AdoptError::Changed(
            "worker identities were turned on or off since it started".into(),
        ));
    }
    if let Some(range) = iso.identities.range()
        && !range.contains(facts.uid)
    {
        return Err(AdoptError::Changed(format!(
            "its uid {} is outside the worker uid range {range}",
            facts.uid
        )));
    }
    if iso.channel != ChannelKind::Unix {
        return Err(AdoptError::Changed(
            "workers are reached over TCP now, not a Unix socket".into(),
        ));
    }
    Ok(())
}

/// The real uid of process `pid` (`Uid:` in its status: the owner of
/// `/proc/<pid>` is root for a process that is not dumpable).
fn real_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A pidfd to the recorded worker, if the process with its pid is the one
/// recorded: this boot, alive, started at the recorded tick, leading its
/// own group, of the recorded uid and in the recorded cgroup. The checks
/// run after the pidfd is open: a pid reused after them is not this fd's.
fn same_process(record: &Record, facts: &AdoptFacts) -> Result<std::os::fd::OwnedFd, AdoptError> {
    let host = leftovers::Host::this();
    leftovers::check(record, &host).map_err(|e| AdoptError::NotTheWorker(e.to_string()))?;
    let pid = record.pgid;
    let raw = i32::try_from(pid).map_err(|_| AdoptError::NotTheWorker(format!("pid {pid}")))?;
    let fd = leftovers::pidfd_open(raw).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => AdoptError::Gone(pid),
        _ => AdoptError::Io(e),
    })?;
    let p = leftovers::process(pid).ok_or(AdoptError::Gone(pid))?;
    if p.start != record.start {
        return Err(AdoptError::NotTheWorker(format!(
            "process {pid} started at tick {}, not {} as recorded: the pid was reused",
            p.start, record.start
        )));
    }
    if p.zombie {
        return Err(AdoptError::Gone(pid));
    }
    if p.pgid != pid {
        return Err(AdoptError::NotTheWorker(format!(
            "process {pid} no longer leads its process group"
        )));
    }
    let owner = real_uid(pid).ok_or(AdoptError::Gone(pid))?;
    if owner != facts.uid {
        return Err(AdoptError::NotTheWorker(format!(
            "process {pid} runs as uid {owner}, not the worker's {}",
            facts.uid
        )));
    }
    if let Some(name) = &record.cgroup
        && !leftovers::in_cgroup(&p.cgroups, name)
    {
        return Err(AdoptError::NotTheWorker(format!(
            "process {pid} is not in the worker's cgroup {name}"
        )));
    }
    Ok(fd)
}
