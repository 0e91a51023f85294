//! Records of live workers in the data directory, so that a Steward that
//! was SIGKILLed can clean up at its next start. Cgroups are found by
//! listing Steward's own parent cgroups instead (`cgroup::Cgroups`).
//!
//! A record (`<data dir>/workers/<worker id>`) is a few lines of text:
//!
//! ```text
//! steward-worker-record 2
//! pgid 4242
//! start 1234567
//! boot 670157b1-d3aa-4f54-9f29-51b1ba6062e4
//! cgroup fe-w1.4000-0
//! ```
//!
//! the worker's process group, its leader's start time (clock ticks since
//! boot, field 22 of `/proc/<pid>/stat`), the boot it ran in
//! (`/proc/sys/kernel/random/boot_id`) and its cgroup's name, if it had
//! one. At the next start a process is killed only if all of these say it
//! is the worker's: the group is not 0, 1 or Steward's own, the boot is
//! this one, a live leader started when recorded, and each member started
//! no earlier than the leader and sits in the recorded cgroup. The signal
//! goes through a pidfd opened before the last check, so a pid reused in
//! between is never hit. A file that is not such a record (corrupt, too
//! large, not a regular file, written by an older Steward without a boot
//! id) is never acted on: it is reported as skipped, with the reason.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Serialize;

/// The first line of every record; a file without it is not one.
const RECORD_MAGIC: &str = "steward-worker-record 3";
/// Records of the Steward before adoption: reaped, never adopted.
const RECORD_MAGIC_V2: &str = "steward-worker-record 2";
/// A record is a few short lines: a larger file is not one.
pub(crate) const MAX_RECORD_BYTES: u64 = 4096;
/// Names of skipped files are shown up to this many characters.
const MAX_SHOWN_NAME_CHARS: usize = 128;
/// How long the kill of one leftover process group may retry while its
/// members fork (a fork racing the kill is caught by the next round).
const REAP_GROUP_WITHIN: Duration = Duration::from_secs(2);

/// What a previous run left and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leftover {
    /// The worker's name (function executor id, cgroup name), or the
    /// record file or parent cgroup that was skipped.
    pub worker: String,
    /// "process group", "cgroup", "record" or "cgroup parent".
    pub kind: &'static str,
    pub processes_killed: usize,
    /// Set when nothing was done, saying why (a corrupt or foreign record,
    /// a group that is not the worker's, a parent cgroup not Steward's).
    pub skipped: Option<String>,
}

impl Leftover {
    pub(crate) fn skipped(worker: String, kind: &'static str, why: String) -> Leftover {
        Leftover {
            worker,
            kind,
            processes_killed: 0,
            skipped: Some(why),
        }
    }
}

/// Why a file in the records directory is not a record (it is skipped).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error("a record of an older Steward (no boot id): its process group cannot be verified")]
    OlderSteward,
    #[error("not a worker record (no {RECORD_MAGIC:?} line)")]
    NoMagic,
    #[error("a line without a value")]
    NoValue,
    /// A field whose value does not parse ("pgid", "start time", ...).
    #[error("a bad {0}")]
    Bad(&'static str),
    #[error("field {0} given twice")]
    Twice(String),
    #[error("an unknown field")]
    UnknownField,
    /// A required field that is missing.
    #[error("no {0}")]
    Missing(&'static str),
    #[error("unreadable: {0}")]
    Unreadable(std::io::Error),
    #[error("not a regular file: not a worker record")]
    NotAFile,
    #[error("{0} bytes, more than a worker record's {MAX_RECORD_BYTES}")]
    Size(u64),
    #[error("more than a worker record's {MAX_RECORD_BYTES} bytes")]
    TooLong,
    #[error("not text: not a worker record")]
    NotText,
}

/// Why the processes of a record are not acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotTheWorker {
    #[error("process group {0} is never a worker's (0 and 1 are not)")]
    ReservedGroup(u32),
    #[error("process group {0} is Steward's own")]
    StewardsGroup(u32),
    #[error("this host's boot id cannot be read: the record cannot be verified")]
    NoBootId,
    #[error("recorded in another boot ({0}): its processes are long gone")]
    OtherBoot(String),
    #[error(
        "process {pid} started at tick {started}, not {recorded} as recorded: the id was reused, it is not the worker"
    )]
    Reused {
        pid: u32,
        started: u64,
        recorded: u64,
    },
}

/// One worker as recorded while it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) pgid: u32,
    /// The leader's start time, in clock ticks since boot.
    pub(crate) start: u64,
    pub(crate) boot_id: String,
    /// The name of the worker's cgroup directory, if it had one.
    pub(crate) cgroup: Option<String>,
    /// What a new Steward needs to adopt the worker (absent in records of
    /// a Steward before adoption: those are only reaped).
    pub(crate) adopt: Option<AdoptFacts>,
}

/// What a record keeps for adoption besides the process: the lease (the
/// worker's uid where identities are separated, else the number naming its
/// directory), whether it runs as that uid, where it listens, its limits
/// and its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdoptFacts {
    pub(crate) lease: u32,
    /// The uid it runs as.
    pub(crate) uid: u32,
    pub(crate) separated: bool,
    pub(crate) socket: std::path::PathBuf,
    pub(crate) limits: crate::Limits,
    pub(crate) log: std::path::PathBuf,
}

impl AdoptFacts {
    fn encode(&self, text: &mut String) {
        let l = &self.limits;
        text.push_str(&format!(
            "lease {}\nuid {} {}\nlimits {} {} {}\n",
            self.lease,
            self.uid,
            if self.separated { "own" } else { "stewards" },
            l.cpu_ms_per_sec,
            l.memory_bytes,
            l.pids_max
        ));
        // Paths last: they may hold spaces (never a newline: refused).
        text.push_str(&format!(
            "socket {}\nlog {}\n",
            self.socket.display(),
            self.log.display()
        ));
    }
}

/// The adoption fields of a record as they are parsed.
#[derive(Default)]
struct AdoptFields {
    lease: Option<u32>,
    uid: Option<(u32, bool)>,
    limits: Option<crate::Limits>,
    socket: Option<std::path::PathBuf>,
    log: Option<std::path::PathBuf>,
}

impl AdoptFields {
    fn take(&mut self, key: &str, value: &str) -> Result<bool, RecordError> {
        let bad = |what| move |_| RecordError::Bad(what);
        match key {
            "lease" => set(&mut self.lease, key, value.parse().map_err(bad("lease"))?)?,
            "uid" => {
                let (uid, whose) = value.split_once(' ').ok_or(RecordError::Bad("uid"))?;
                let separated = match whose {
                    "own" => true,
                    "stewards" => false,
                    _ => return Err(RecordError::Bad("uid")),
                };
                set(
                    &mut self.uid,
                    key,
                    (uid.parse().map_err(bad("uid"))?, separated),
                )?
            }
            "limits" => {
                let n: Vec<u64> = value
                    .split(' ')
                    .map(|v| v.parse().map_err(bad("limits")))
                    .collect::<Result<_, _>>()?;
                let [cpu, memory_bytes, pids_max] = n[..] else {
                    return Err(RecordError::Bad("limits"));
                };
                let cpu_ms_per_sec = u32::try_from(cpu).map_err(|_| RecordError::Bad("limits"))?;
                set(
                    &mut self.limits,
                    key,
                    crate::Limits {
                        cpu_ms_per_sec,
                        memory_bytes,
                        pids_max,
                    },
                )?
            }
            "socket" if value.starts_with('/') => set(&mut self.socket, key, value.into())?,
            "log" if value.starts_with('/') => set(&mut self.log, key, value.into())?,
            "socket" | "log" => return Err(RecordError::Bad("path")),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// All of them, none of them (a record that cannot be adopted), or a
    /// bad record.
    fn finish(self) -> Result<Option<AdoptFacts>, RecordError> {
        match (self.lease, self.uid, self.limits, self.socket, self.log) {
            (Some(lease), Some((uid, separated)), Some(limits), Some(socket), Some(log)) => {
                Ok(Some(AdoptFacts {
                    lease,
                    uid,
                    separated,
                    socket,
                    limits,
                    log,
                }))
            }
            (None, None, None, None, None) => Ok(None),
            _ => Err(RecordError::Missing("adoption field")),
        }
    }
}

impl Record {
    fn encode(&self) -> String {
        let mut text = format!(
            "{RECORD_MAGIC}\npgid {}\nstart {}\nboot {}\n",
            self.pgid, self.start, self.boot_id
        );
        if let Some(c) = &self.cgroup {
            text.push_str(&format!("cgroup {c}\n"));
        }
        if let Some(a) = &self.adopt {
            a.encode(&mut text);
        }
        text
    }

    /// A record, or why the text is not one.
    pub(crate) fn parse(text: &str) -> Result<Record, RecordError> {
        let mut lines = text.lines();
        let adoptable = match lines.next() {
            Some(RECORD_MAGIC) => true,
            Some(RECORD_MAGIC_V2) => false,
            _ if plain_old_record(text) => return Err(RecordError::OlderSteward),
            _ => return Err(RecordError::NoMagic),
        };
        let (mut pgid, mut start, mut boot_id, mut cgroup) = (None, None, None, None);
        let mut adopt = AdoptFields::default();
        for line in lines {
            let (key, value) = line.split_once(' ').ok_or(RecordError::NoValue)?;
            let bad = |what| move |_| RecordError::Bad(what);
            match key {
                "pgid" => set(&mut pgid, key, value.parse().map_err(bad("pgid"))?)?,
                "start" => set(&mut start, key, value.parse().map_err(bad("start time"))?)?,
                "boot" => set(
                    &mut boot_id,
                    key,
                    valid_boot_id(value)
                        .ok_or(RecordError::Bad("boot id"))?
                        .to_string(),
                )?,
                "cgroup" if crate::cgroup::worker_cgroup_name(value) => {
                    set(&mut cgroup, key, value.to_string())?
                }
                "cgroup" => return Err(RecordError::Bad("cgroup name")),
                _ if adoptable && adopt.take(key, value)? => {}
                _ => return Err(RecordError::UnknownField),
            }
        }
        Ok(Record {
            pgid: pgid.ok_or(RecordError::Missing("pgid"))?,
            start: start.ok_or(RecordError::Missing("start time"))?,
            boot_id: boot_id.ok_or(RecordError::Missing("boot id"))?,
            cgroup,
            adopt: adopt.finish()?,
        })
    }
}

/// Fills a field of a record being parsed, once.
fn set<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), RecordError> {
    match slot.replace(value) {
        Some(_) => Err(RecordError::Twice(key.to_string())),
        None => Ok(()),
    }
}

/// The format of Steward before records carried a boot id: "<pgid> <start>".
fn plain_old_record(text: &str) -> bool {
    let parts: Vec<&str> = text.split_whitespace().collect();
    parts.len() == 2 && parts.iter().all(|p| p.parse::<u64>().is_ok())
}

/// A boot id as the kernel writes it (a UUID).
fn valid_boot_id(s: &str) -> Option<&str> {
    (s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(s)
}

/// This boot's id.
pub(crate) fn boot_id() -> Option<String> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    valid_boot_id(text.trim()).map(str::to_string)
}

/// One process as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Proc {
    pub(crate) pid: u32,
    pub(crate) pgid: u32,
    /// Clock ticks since boot.
    pub(crate) start: u64,
    pub(crate) zombie: bool,
    /// `/proc/<pid>/cgroup`.
    pub(crate) cgroups: String,
}

/// (state, pgid, start time) of a `/proc/<pid>/stat` line. The command
/// name may hold spaces and parentheses: fields are counted after the
/// last ')'.
fn parse_stat(stat: &str) -> Option<(char, u32, u64)> {
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): pgid is field 5, starttime field 22.
    let state = fields.first()?.chars().next()?;
    let pgid = fields.get(2)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, pgid, start))
}

fn proc_of(pid: u32) -> Option<Proc> {
    let (state, pgid, start) =
        parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    Some(Proc {
        pid,
        pgid,
        start,
        zombie: matches!(state, 'Z' | 'X'),
        cgroups: std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default(),
    })
}

/// The processes of group `pgid`, and the process whose pid is `pgid`.
fn group_and_leader(pgid: u32) -> Vec<Proc> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (_, g, _) = parse_stat(&stat)?;
            (g == pgid || pid == pgid).then_some(pid)
        })
        .filter_map(proc_of)
        .collect()
}

/// What a record is checked against: this boot and this Steward.
#[derive(Debug, Clone)]
pub(crate) struct Host {
    pub(crate) boot_id: Option<String>,
    pub(crate) own_pid: u32,
    pub(crate) own_pgid: u32,
}

impl Host {
    pub(crate) fn this() -> Host {
        Host {
            boot_id: boot_id(),
            own_pid: std::process::id(),
            own_pgid: u32::try_from(nix::unistd::getpgrp().as_raw()).unwrap_or(0),
        }
    }
}

/// Whether record `r` may be acted on at all here: its group is not 0, 1
/// or Steward's own, and it was written in this boot.
pub(crate) fn check(r: &Record, host: &Host) -> Result<(), NotTheWorker> {
    if r.pgid < 2 {
        return Err(NotTheWorker::ReservedGroup(r.pgid));
    }
    if r.pgid == host.own_pid || r.pgid == host.own_pgid {
        return Err(NotTheWorker::StewardsGroup(r.pgid));
    }
    match &host.boot_id {
        None => Err(NotTheWorker::NoBootId),
        Some(b) if *b != r.boot_id => Err(NotTheWorker::OtherBoot(r.boot_id.clone())),
        Some(_) => Ok(()),
    }
}

/// Whether `cgroups` (a `/proc/<pid>/cgroup` text) places the process in
/// the cgroup named `name` (in any hierarchy).
pub(crate) fn in_cgroup(cgroups: &str, name: &str) -> bool {
    cgroups.lines().any(|l| {
        let path = l.splitn(3, ':').nth(2).unwrap_or("");
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        path.split('/').any(|c| c == name)
    })
}

/// The processes of record `r` that may be killed, from `procs` (the group
/// and its leader as `/proc` shows them): none unless [`check`] passes and
/// a live leader is the one recorded; then each member that started no
/// earlier than the leader, is not Steward, is not yet a zombie and sits
/// in the recorded cgroup (where one was recorded).
pub(crate) fn targets(r: &Record, host: &Host, procs: &[Proc]) -> Result<Vec<u32>, NotTheWorker> {
    check(r, host)?;
    if let Some(leader) = procs.iter().find(|p| p.pid == r.pgid)
        && leader.start != r.start
    {
        return Err(NotTheWorker::Reused {
            pid: r.pgid,
            started: leader.start,
            recorded: r.start,
        });
    }
    Ok(procs
        .iter()
        .filter(|p| is_member(r, host, p) && !p.zombie)
        .map(|p| p.pid)
        .collect())
}

fn is_member(r: &Record, host: &Host, p: &Proc) -> bool {
    p.pgid == r.pgid
        && p.pid != host.own_pid
        && p.start >= r.start
        && r.cgroup.as_deref().is_none_or(|c| in_cgroup(&p.cgroups, c))
}

/// Records a running worker in `dir` (nothing where its start time or the
/// boot id cannot be read: such a record could never be verified).
/// Returns whether the record written can be adopted from (it holds the
/// adoption facts).
pub(crate) fn record(
    dir: &Path,
    name: &str,
    pid: u32,
    cgroup: Option<String>,
    adopt: Option<AdoptFacts>,
) -> bool {
    let (Some(p), Some(boot_id)) = (proc_of(pid), boot_id()) else {
        return false;
    };
    // A path with a line break cannot be written as a record line: such a
    // worker is recorded for cleanup, not for adoption.
    let adopt = adopt.filter(|a| {
        [&a.socket, &a.log]
            .iter()
            .all(|p| !p.as_os_str().as_encoded_bytes().contains(&b'\n'))
    });
    let r = Record {
        pgid: pid,
        start: p.start,
        boot_id,
        cgroup,
        adopt,
    };
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(dir.join(name), r.encode()))
        .is_ok();
    written && r.adopt.is_some()
}

/// Reads the record of worker `name` in `dir` without removing it.
pub(crate) fn read_record(dir: &Path, name: &str) -> Result<Record, RecordError> {
    let path = dir.join(name);
    let meta = std::fs::symlink_metadata(&path).map_err(RecordError::Unreadable)?;
    if !meta.is_file() {
        return Err(RecordError::NotAFile);
    }
    Record::parse(&read_bounded(&path)?)
}

/// Process `pid` as `/proc` shows it now.
pub(crate) fn process(pid: u32) -> Option<Proc> {
    proc_of(pid)
}

pub(crate) fn forget(dir: &Path, name: &str) {
    let _ = std::fs::remove_file(dir.join(name));
}

/// Sends `signal` to a process group.
pub(crate) fn signal_group(pgid: u32, signal: Signal) {
    if let Ok(pgid) = i32::try_from(pgid) {
        let _ = killpg(Pid::from_raw(pgid), signal);
    }
}

/// A file in the records directory, read or skipped.
pub(crate) enum Found {
    Record { worker: String, record: Record },
    Skipped(Leftover),
}

/// Reads and removes every record in `dir`. What is not a record of this
/// Steward's comes back skipped, with the reason; a directory is left
/// where it is, a symbolic link is removed without being followed.
pub(crate) fn take_records(dir: &Path, spare: &[String]) -> Vec<Found> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        if spare
            .iter()
            .any(|s| std::ffi::OsStr::new(s) == e.file_name())
        {
            continue; // An adopted worker's: it lives on.
        }
        let worker: String = e
            .file_name()
            .to_string_lossy()
            .chars()
            .take(MAX_SHOWN_NAME_CHARS)
            .collect();
        let path = e.path();
        let read = match std::fs::symlink_metadata(&path) {
            Err(e) => Err(RecordError::Unreadable(e)),
            Ok(m) if m.is_dir() => {
                found.push(Found::Skipped(Leftover::skipped(
                    worker,
                    "record",
                    "a directory, not a worker record: left as it is".into(),
                )));
                continue;
            }
            Ok(m) if !m.is_file() => Err(RecordError::NotAFile),
            Ok(m) if m.len() > MAX_RECORD_BYTES => Err(RecordError::Size(m.len())),
            Ok(_) => read_bounded(&path),
        };
        let _ = std::fs::remove_file(&path);
        found.push(match read.and_then(|text| Record::parse(&text)) {
            Ok(record) => Found::Record { worker, record },
            Err(why) => Found::Skipped(Leftover::skipped(worker, "record", why.to_string())),
        });
    }
    found
}

/// The file's text, without following a link or blocking on a FIFO, and
/// never more than [`MAX_RECORD_BYTES`].
fn read_bounded(path: &Path) -> Result<String, RecordError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(RecordError::Unreadable)?;
    let mut bytes = Vec::new();
    file.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(RecordError::Unreadable)?;
    if bytes.len() as u64 > MAX_RECORD_BYTES {
        return Err(RecordError::TooLong);
    }
    String::from_utf8(bytes).map_err(|_| RecordError::NotText)
}

/// Kills what is left of the worker of record `r` (processes forked by
/// user code survive their worker, keeping its group), checking each
/// process as [`targets`] says; returns how many were killed, or why
/// nothing was done.
pub(crate) fn reap_group(r: &Record, host: &Host) -> Result<usize, NotTheWorker> {
    let deadline = Instant::now() + REAP_GROUP_WITHIN;
    let mut pause = Duration::from_millis(1);
    let mut killed: Vec<u32> = Vec::new();
    loop {
        let pids = targets(r, host, &group_and_leader(r.pgid))?;
        if pids.is_empty() || Instant::now() >= deadline {
            return Ok(killed.len());
        }
        for pid in pids {
            if kill_if(pid, |p| is_member(r, host, p)) && !killed.contains(&pid) {
                killed.push(pid);
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// SIGKILLs process `pid` if, looked at after a pidfd to it is open, it
/// passes `ok`: the signal goes to the process that was checked even if
/// the pid is reused meanwhile. Where the kernel has no pidfds (before
/// 5.3) the check and the kill are two steps.
fn kill_if(pid: u32, ok: impl Fn(&Proc) -> bool) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    let fd = pidfd_open(raw);
    if !proc_of(pid).is_some_and(|p| ok(&p)) {
        return false;
    }
    match fd {
        Ok(fd) => pidfd_kill(&fd),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            nix::sys::signal::kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok()
        }
        Err(_) => false,
    }
}

#[allow(unsafe_code)]
pub(crate) fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes two integers and returns a new
    // descriptor or -1; nothing is borrowed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn pidfd_kill(fd: &OwnedFd) -> bool {
    pidfd_signal(fd, Signal::SIGKILL)
}

/// Sends `signal` to the process `fd` refers to (never to a reuser of its pid).
#[allow(unsafe_code)]
pub(crate) fn pidfd_signal(fd: &OwnedFd, signal: Signal) -> bool {
    // SAFETY: pidfd_send_signal(2) with a descriptor we own, a signal
    // number, no siginfo (null) and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: &str = "670157b1-d3aa-4f54-9f29-51b1ba6062e4";
    const OTHER_BOOT: &str = "00000000-d3aa-4f54-9f29-51b1ba6062e4";

    fn host() -> Host {
        Host {
            boot_id: Some(BOOT.into()),
            own_pid: 500,
            own_pgid: 400,
        }
    }

    fn record(pgid: u32) -> Record {
        Record {
            pgid,
            start: 1000,
            boot_id: BOOT.into(),
            cgroup: Some("fe-w1.4000-0".into()),
            adopt: None,
        }
    }

    fn proc(pid: u32, pgid: u32, start: u64, cgroup: &str) -> Proc {
        Proc {
            pid,
            pgid,
            start,
            zombie: false,
            cgroups: format!("4:memory:/steward/{cgroup}\n1:cpu:/steward/{cgroup}\n"),
        }
    }

    #[test]
    fn records_round_trip_and_anything_else_is_refused_with_a_reason() {
        let r = record(4242);
        assert_eq!(Record::parse(&r.encode()).expect("round trip"), r);
        let bare = Record {
            cgroup: None,
            ..r.clone()
        };
        assert_eq!(Record::parse(&bare.encode()).expect("round trip"), bare);
        let adoptable = Record {
            adopt: Some(AdoptFacts {
                lease: 2_000_000_007,
                uid: 2_000_000_007,
                separated: true,
                socket: "/var/lib/steward workers/e-1/w7/fe.sock".into(),
                limits: crate::Limits {
                    cpu_ms_per_sec: 1500,
                    memory_bytes: 1 << 30,
                    pids_max: 512,
                },
                log: "/data/fe logs/w.log".into(),
            }),
            ..r
        };
        assert_eq!(
            Record::parse(&adoptable.encode()).expect("round trip"),
            adoptable
        );
        // A record of the Steward before adoption is still read (to be
        // reaped), never with adoption fields.
        let v2 = bare.encode().replace("record 3", "record 2");
        assert_eq!(Record::parse(&v2).expect("v2"), bare);
        let v2_with = adoptable.encode().replace("record 3", "record 2");
        assert!(
            Record::parse(&v2_with)
                .expect_err("v2 adopts nothing")
                .to_string()
                .contains("unknown field")
        );
        // Adoption fields come all together or not at all.
        let partial: String = adoptable
            .encode()
            .lines()
            .filter(|l| !l.starts_with("log "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(
            Record::parse(&partial)
                .expect_err("partial")
                .to_string()
                .contains("no adoption field")
        );
        let cases = [
            ("4242 1000\n", "older Steward"),
            ("", "not a worker record"),
            ("garbage", "not a worker record"),
            (
                "steward-worker-record 2\npgid 4242\nstart 1000\n",
                "no boot id",
            ),
            (
                "steward-worker-record 2\nstart 1000\nboot x\n",
                "bad boot id",
            ),
            (
                &format!("steward-worker-record 2\npgid 4242\npgid 4243\nstart 1\nboot {BOOT}\n"),
                "given twice",
            ),
            (
                &format!("steward-worker-record 2\npgid -1\nstart 1\nboot {BOOT}\n"),
                "bad pgid",
            ),
            (
                &format!(
                    "steward-worker-record 2\npgid 9\nstart 1\nboot {BOOT}\ncgroup ../system.slice\n"
                ),
                "bad cgroup",
            ),
            (
                &format!("steward-worker-record 2\npgid 9\nstart 1\nboot {BOOT}\nowner root\n"),
                "unknown field",
            ),
        ];
        for (text, why) in cases {
            let e = Record::parse(text).expect_err(text).to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (a (b) c) S 1 4240 4240 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 98765 1000000 300";
        assert_eq!(parse_stat(line), Some(('S', 4240, 98765)));
        assert_eq!(parse_stat("4242 (x) S 1"), None);
    }

    #[test]
    fn groups_0_1_and_stewards_own_are_never_targets() {
        let h = host();
        // Every process the table shows sits in the recorded group, started
        // late enough and in the recorded cgroup: only the group id saves them.
        for pgid in [0, 1, h.own_pid, h.own_pgid] {
            let procs = [
                proc(pgid, pgid, 1000, "fe-w1.4000-0"),
                proc(77, pgid, 1001, "fe-w1.4000-0"),
            ];
            let e = targets(&record(pgid), &h, &procs)
                .expect_err("never a worker's group")
                .to_string();
            assert!(e.contains(&format!("process group {pgid}")), "{e}");
        }
    }

    #[test]
    fn a_record_of_another_boot_or_without_a_boot_id_is_never_acted_on() {
        let procs = [proc(4242, 4242, 1000, "fe-w1.4000-0")];
        let other = Record {
            boot_id: OTHER_BOOT.into(),
            ..record(4242)
        };
        let e = targets(&other, &host(), &procs)
            .expect_err("another boot")
            .to_string();
        assert!(e.contains("another boot"), "{e}");
        let unknown = Host {
            boot_id: None,
            ..host()
        };
        let e = targets(&record(4242), &unknown, &procs)
            .expect_err("no boot id")
            .to_string();
        assert!(e.contains("boot id cannot be read"), "{e}");
    }

    #[test]
    fn a_reused_leader_id_spares_the_whole_group() {
        let procs = [
            proc(4242, 4242, 5000, "fe-w1.4000-0"),
            proc(4243, 4242, 5001, "fe-w1.4000-0"),
        ];
        let e = targets(&record(4242), &host(), &procs)
            .expect_err("reused")
            .to_string();
        assert!(e.contains("reused"), "{e}");
    }

    #[test]
    fn only_members_in_the_recorded_cgroup_that_started_after_the_leader_are_targets() {
        let procs = [
            // The leader, gone: its orphans keep the group.
            proc(4243, 4242, 1200, "fe-w1.4000-0"),
            // In the group but in another cgroup: not the worker's.
            proc(4244, 4242, 1300, "postgres.service"),
            // Started before the recorded leader: not its descendant.
            proc(4245, 4242, 999, "fe-w1.4000-0"),
            // Another group.
            proc(4246, 4300, 1300, "fe-w1.4000-0"),
            Proc {
                zombie: true,
                ..proc(4247, 4242, 1300, "fe-w1.4000-0")
            },
        ];
        assert_eq!(targets(&record(4242), &host(), &procs), Ok(vec![4243]));
        // A prefix of the name is another cgroup.
        let near = [proc(4243, 4242, 1200, "fe-w1.4000-01")];
        assert_eq!(targets(&record(4242), &host(), &near), Ok(vec![]));
        // Without a recorded cgroup (a host without cgroups) the group decides.
        let bare = Record {
            cgroup: None,
            ..record(4242)
        };
        assert_eq!(targets(&bare, &host(), &procs), Ok(vec![4243, 4244]));
    }

    #[test]
    fn corrupt_and_foreign_files_are_skipped_with_the_reason() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        std::fs::write(dir.join("old"), "4242 1000\n").expect("write");
        std::fs::write(dir.join("corrupt"), "steward-worker-record 2\npgid x\n").expect("write");
        std::fs::write(dir.join("huge"), vec![b'1'; MAX_RECORD_BYTES as usize + 1]).expect("write");
        std::fs::write(dir.join("binary"), [0xff, 0xfe, 0x00]).expect("write");
        std::os::unix::fs::symlink("/proc/1/stat", dir.join("link")).expect("symlink");
        std::fs::create_dir(dir.join("subdir")).expect("mkdir");
        let good = record(4242).encode();
        std::fs::write(dir.join("w1"), &good).expect("write");
        let found = take_records(dir, &[]);
        let mut skipped: Vec<(String, String)> = found
            .iter()
            .filter_map(|f| match f {
                Found::Skipped(l) => {
                    Some((l.worker.clone(), l.skipped.clone().unwrap_or_default()))
                }
                Found::Record { .. } => None,
            })
            .collect();
        skipped.sort();
        let names: Vec<&str> = skipped.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["binary", "corrupt", "huge", "link", "old", "subdir"],
            "{skipped:?}"
        );
        for (name, why) in &skipped {
            assert!(!why.is_empty(), "{name}");
        }
        assert!(found.iter().any(|f| matches!(f, Found::Record { worker, record } if worker == "w1" && *record == super::tests::record(4242))));
        // Files are gone (the link without its target touched); a directory stays.
        let left: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["subdir"]);
        assert!(std::fs::metadata("/proc/1/stat").is_ok());
    }
}
