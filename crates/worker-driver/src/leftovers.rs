//! Records of live workers in the data directory, so that a Steward that
//! was SIGKILLed can clean up at its next start: each record names a
//! worker's process group and its leader's start time (a reused pid is not
//! ours). Cgroups are found by listing Steward's parent cgroup instead.

use std::path::Path;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Serialize;

/// What a previous run left and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leftover {
    /// The worker's name (function executor id, or cgroup name).
    pub worker: String,
    /// "process group" or "cgroup".
    pub kind: &'static str,
    pub processes_killed: usize,
}

/// Fields of `/proc/<pid>/stat` we need: (pgid, start time in clock ticks).
fn stat_of(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): pgid is field 5, starttime field 22.
    let pgid = fields.get(2)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((pgid, start))
}

/// Records a running worker's process group in `dir`.
pub(crate) fn record(dir: &Path, name: &str, pid: u32) {
    let Some((_, start)) = stat_of(pid) else {
        return;
    };
    if std::fs::create_dir_all(dir).is_ok() {
        let _ = std::fs::write(dir.join(name), format!("{pid} {start}\n"));
    }
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

/// Kills the process groups recorded in `dir` (processes forked by user
/// code survive their worker, keeping its group) and clears the records.
pub(crate) fn reap_process_groups(dir: &Path) -> Vec<Leftover> {
    let mut reaped = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return reaped;
    };
    for e in entries.flatten() {
        let worker = e.file_name().to_string_lossy().to_string();
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let mut parts = text.split_whitespace();
        let (Some(pgid), Some(start)) = (
            parts.next().and_then(|p| p.parse::<u32>().ok()),
            parts.next().and_then(|s| s.parse::<u64>().ok()),
        ) else {
            let _ = std::fs::remove_file(e.path());
            continue;
        };
        // A live leader with another start time means the id was reused: not ours.
        let reused = stat_of(pgid).is_some_and(|(_, s)| s != start);
        let mut killed = 0;
        if !reused {
            let members = std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|p| p.file_name().to_string_lossy().parse::<u32>().ok())
                .filter(|pid| stat_of(*pid).is_some_and(|(g, _)| g == pgid))
                .count();
            if members > 0 {
                signal_group(pgid, Signal::SIGKILL);
                killed = members;
            }
        }
        let _ = std::fs::remove_file(e.path());
        reaped.push(Leftover {
            worker,
            kind: "process group",
            processes_killed: killed,
        });
    }
    reaped
}
