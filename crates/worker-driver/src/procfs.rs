//! A worker's CPU time and memory from `/proc`, for workers without a
//! cgroup: its main process (and the children it has reaped) only.

use std::sync::OnceLock;

use crate::Reading;

/// A positive `sysconf` value, or `default`.
fn sysconf_or(var: nix::unistd::SysconfVar, default: u64) -> u64 {
    nix::unistd::sysconf(var)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(default)
}

fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| sysconf_or(nix::unistd::SysconfVar::CLK_TCK, 100))
}

fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| sysconf_or(nix::unistd::SysconfVar::PAGE_SIZE, 4096))
}

/// utime + stime + cutime + cstime of a `/proc/<pid>/stat` line, in ticks.
/// The command name (in parentheses) may hold anything, so fields are
/// counted from the last `)`.
pub(crate) fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": state is field 3; utime..cstime are fields 14..=17.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let mut total: u64 = 0;
    for f in fields.get(11..15)? {
        let v: i64 = f.parse().ok()?;
        total = total.saturating_add(u64::try_from(v).unwrap_or(0));
    }
    Some(total)
}

/// Resident pages of a `/proc/<pid>/statm` line.
pub(crate) fn resident_pages(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// CPU and resident memory of process `pid`; `None` once it is gone.
pub(crate) fn reading(pid: u32) -> Option<Reading> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let ticks = cpu_ticks(&stat)?;
    Some(Reading {
        cpu_usec: ticks.saturating_mul(1_000_000) / clock_ticks_per_second(),
        memory_bytes: resident_pages(&statm)?.saturating_mul(page_size()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and parentheses.
        let line = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 1000 1000000 300 18446744073709551615";
        assert_eq!(cpu_ticks(line), Some(250 + 50 + 7 + 3));
        assert_eq!(cpu_ticks("4242 (x) S 1"), None);
        assert_eq!(cpu_ticks("garbage"), None);
        assert_eq!(resident_pages("1000 250 30 1 0 100 0"), Some(250));
        assert_eq!(resident_pages(""), None);
    }

    #[test]
    fn this_process_reads_as_alive() {
        let r = reading(std::process::id()).expect("own /proc entry");
        assert!(r.memory_bytes > 0);
    }
}
