//! Daily activity for the last [`DAYS`] days (a year's activity chart):
//! tasks and usage per UTC day, in one small file that survives restarts.
//!
//! The file says how far into the ledger it has counted (a [`Position`]);
//! at start the records after it are counted, so a crash between a record
//! and the next save of this file loses nothing and counts nothing twice.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ledger::{Position, for_each_record};
use crate::record::{RecordKind, UsageRecord};

/// Days kept: a year and a leap day.
pub const DAYS: u32 = 366;
/// Applications whose all-time task counts are kept (for the metrics' top N).
const MAX_APPLICATIONS: usize = 256;

/// One UTC day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Day {
    /// `YYYY-MM-DD`.
    pub date: String,
    pub tasks: u64,
    pub failed: u64,
    pub wall_ms: u64,
    pub cpu_core_us: u64,
    pub memory_mb_ms: u64,
    pub gpu_ms: u64,
    pub idle_ms: u64,
    pub cost_minor: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    /// How far into the ledger these counts go.
    through: Option<Position>,
    /// By days since the epoch.
    days: BTreeMap<u32, Day>,
    /// Tasks per `namespace/application`, all time (the most active kept).
    applications: BTreeMap<String, u64>,
}

pub struct Activity {
    path: PathBuf,
    file: File,
    dirty: bool,
}

/// Days since the epoch of a unix-ms time.
pub fn day_of(unix_ms: u64) -> u32 {
    u32::try_from(unix_ms / 86_400_000).unwrap_or(u32::MAX)
}

/// `YYYY-MM-DD` of days since the epoch (Howard Hinnant's civil_from_days).
pub fn date_of(day: u32) -> String {
    let z = i64::from(day) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

impl Activity {
    /// Loads the file at `path` (a missing or damaged one starts empty and
    /// is rebuilt from what the ledger still holds) and counts the ledger
    /// records in `ledger_dir` after where it left off.
    pub fn open(path: PathBuf, ledger_dir: &Path) -> Activity {
        let file = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "activity file damaged: rebuilt from the usage ledger");
                File::default()
            }),
            Err(_) => File::default(),
        };
        let mut a = Activity {
            path,
            file,
            dirty: false,
        };
        let from = a.file.through;
        let mut replay = Vec::new();
        if let Err(e) = for_each_record(ledger_dir, from, |r, p| replay.push((r, p))) {
            tracing::warn!(error = %e, "activity: reading the usage ledger");
        }
        for (r, p) in replay {
            a.add(&r, p);
        }
        a
    }

    /// Counts `r`, which ends at ledger position `at`.
    pub fn add(&mut self, r: &UsageRecord, at: Position) {
        self.file.through = Some(self.file.through.map_or(at, |t| t.max(at)));
        self.dirty = true;
        let day = day_of(r.ended_unix_ms);
        // A record stamped beyond tomorrow (a clock that jumped) would push
        // a year of real days out: it stays in the ledger, not in the chart.
        let today = day_of(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        );
        if day > today.saturating_add(1) {
            return;
        }
        if let std::collections::btree_map::Entry::Vacant(e) = self.file.days.entry(day) {
            e.insert(Day {
                date: date_of(day),
                ..Day::default()
            });
            // A new day: the oldest beyond a year go.
            let newest = self.file.days.keys().next_back().copied().unwrap_or(day);
            self.file
                .days
                .retain(|k, _| newest.saturating_sub(*k) < DAYS);
        }
        let Some(d) = self.file.days.get_mut(&day) else {
            return;
        };
        let gpu: u64 = r.gpu_ms.iter().map(|(_, ms)| *ms).sum();
        d.cpu_core_us = d.cpu_core_us.saturating_add(r.cpu_core_us);
        d.memory_mb_ms = d.memory_mb_ms.saturating_add(r.memory_mb_ms);
        d.gpu_ms = d.gpu_ms.saturating_add(gpu);
        d.cost_minor = d.cost_minor.saturating_add(r.cost_minor.unwrap_or(0));
        match r.kind {
            RecordKind::Allocation => {
                d.tasks += 1;
                d.failed += u64::from(r.outcome != "success");
                d.wall_ms = d.wall_ms.saturating_add(r.wall_ms());
                let key = format!("{}/{}", r.namespace, r.application);
                *self.file.applications.entry(key).or_default() += 1;
            }
            RecordKind::WorkerSegment => d.idle_ms = d.idle_ms.saturating_add(r.wall_ms()),
        }
        if self.file.applications.len() > MAX_APPLICATIONS {
            // Keep the most active; ties by name.
            let mut v: Vec<(String, u64)> = std::mem::take(&mut self.file.applications)
                .into_iter()
                .collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            v.truncate(MAX_APPLICATIONS);
            self.file.applications = v.into_iter().collect();
        }
    }

    /// The days with activity, oldest first.
    pub fn days(&self) -> Vec<Day> {
        self.file.days.values().cloned().collect()
    }

    /// The `n` applications (`namespace/application`) with the most tasks.
    pub fn top_applications(&self, n: usize) -> Vec<String> {
        let mut v: Vec<(&String, &u64)> = self.file.applications.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.into_iter().take(n).map(|(k, _)| k.clone()).collect()
    }

    /// Writes the file if anything changed: a temporary file, fsynced, then
    /// renamed over the old one (a crash leaves one or the other, whole).
    pub fn save(&mut self) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let tmp = self.path.with_extension("tmp");
        let bytes = serde_json::to_vec(&self.file).map_err(std::io::Error::other)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Ledger, LedgerConfig};

    fn rec(i: u64, day: u64) -> UsageRecord {
        UsageRecord {
            kind: RecordKind::Allocation,
            id: format!("a{i}"),
            function_executor_id: "fe".into(),
            namespace: "ns".into(),
            application: format!("app{}", i % 2),
            function: "f".into(),
            started_unix_ms: day * 86_400_000,
            ended_unix_ms: day * 86_400_000 + 1_000,
            cpu_core_us: 10,
            memory_mb_ms: 1,
            peak_memory_bytes: 0,
            gpu_ms: Vec::new(),
            cost_minor: Some(5),
            outcome: if i == 0 {
                "failure:oom".into()
            } else {
                "success".into()
            },
            ran: true,
            idle_ms: None,
            gpu_busy_ms: Vec::new(),
        }
    }

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(date_of(day_of(1_795_564_800_000)), "2026-11-25");
        assert_eq!(date_of(day_of(951_782_400_000)), "2000-02-29");
    }

    #[test]
    fn counts_survive_a_crash_between_saves_without_counting_twice() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ledger_dir = tmp.path().join("usage");
        let path = tmp.path().join("activity.json");
        let (mut ledger, _) = Ledger::open(LedgerConfig::new(ledger_dir.clone())).expect("ledger");
        let mut a = Activity::open(path.clone(), &ledger_dir);
        for i in 0..4 {
            ledger.append(&rec(i, 20_000)).expect("append");
            a.add(&rec(i, 20_000), ledger.position());
        }
        a.save().expect("save");
        // Two more records reach the ledger, then a crash before the next save.
        for i in 4..6 {
            ledger.append(&rec(i, 20_001)).expect("append");
            a.add(&rec(i, 20_001), ledger.position());
        }
        drop(a);
        let a = Activity::open(path, &ledger_dir);
        let days = a.days();
        assert_eq!(days.len(), 2);
        assert_eq!((days[0].tasks, days[0].failed, days[1].tasks), (4, 1, 2));
        assert_eq!(days[0].cost_minor, 20);
        assert_eq!(a.top_applications(1).len(), 1);
    }

    #[test]
    fn only_a_year_is_kept_and_a_damaged_file_is_rebuilt() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ledger_dir = tmp.path().join("usage");
        let path = tmp.path().join("activity.json");
        let mut a = Activity::open(path.clone(), &ledger_dir);
        for d in 0..400u64 {
            a.add(&rec(d + 1, 20_000 + d), Position::default());
        }
        assert_eq!(a.days().len(), DAYS as usize);
        // A clock far in the future pushes nothing out, and a damaged but
        // valid file with absurd day numbers does not panic.
        a.add(&rec(999, u64::from(u32::MAX)), Position::default());
        assert_eq!(a.days().len(), DAYS as usize);
        std::fs::write(
            &path,
            format!(r#"{{"days": {{"{}": {{"date": "x", "tasks": 1, "failed": 0, "wall_ms": 0, "cpu_core_us": 0, "memory_mb_ms": 0, "gpu_ms": 0, "idle_ms": 0, "cost_minor": 0}}}}, "applications": {{}}}}"#, u32::MAX),
        )
        .expect("write");
        let mut odd = Activity::open(path.clone(), &ledger_dir);
        odd.add(&rec(1, 20_000), Position::default());
        a.save().expect("save");
        std::fs::write(&path, b"{not json").expect("damage");
        let a = Activity::open(path, &ledger_dir);
        assert!(a.days().is_empty());
    }
}
