//! Usage totals over a time range, grouped: what `GET /state/usage`
//! answers. It reads the ledger as `steward usage export` does (the same
//! records, the same time filter), so their totals agree.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::activity::{date_of, day_of};
use crate::ledger::{LedgerError, for_each_record};
use crate::record::{RecordKind, UsageRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Function,
    Application,
    Namespace,
    Day,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        Some(match s {
            "function" => GroupBy::Function,
            "application" => GroupBy::Application,
            "namespace" => GroupBy::Namespace,
            "day" => GroupBy::Day,
            _ => return None,
        })
    }

    fn key(self, r: &UsageRecord) -> String {
        match self {
            GroupBy::Function => format!("{}/{}/{}", r.namespace, r.application, r.function),
            GroupBy::Application => format!("{}/{}", r.namespace, r.application),
            GroupBy::Namespace => r.namespace.clone(),
            GroupBy::Day => date_of(day_of(r.ended_unix_ms)),
        }
    }
}

/// Sums over records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub records: u64,
    /// Allocation records.
    pub tasks: u64,
    pub failed: u64,
    /// Wall time of allocations.
    pub wall_ms: u64,
    /// Wall time of workers' idle segments.
    pub idle_ms: u64,
    pub cpu_core_us: u64,
    pub memory_mb_ms: u64,
    pub gpu_ms: BTreeMap<String, u64>,
    pub gpu_busy_ms: BTreeMap<String, u64>,
    pub cost_minor: i64,
}

impl Totals {
    pub fn add(&mut self, r: &UsageRecord) {
        self.records += 1;
        match r.kind {
            RecordKind::Allocation => {
                self.tasks += 1;
                self.failed += u64::from(r.outcome != "success");
                self.wall_ms = self.wall_ms.saturating_add(r.wall_ms());
            }
            RecordKind::WorkerSegment => self.idle_ms = self.idle_ms.saturating_add(r.wall_ms()),
        }
        self.cpu_core_us = self.cpu_core_us.saturating_add(r.cpu_core_us);
        self.memory_mb_ms = self.memory_mb_ms.saturating_add(r.memory_mb_ms);
        for (m, ms) in &r.gpu_ms {
            let e = self.gpu_ms.entry(m.clone()).or_default();
            *e = e.saturating_add(*ms);
        }
        for (m, ms) in &r.gpu_busy_ms {
            let e = self.gpu_busy_ms.entry(m.clone()).or_default();
            *e = e.saturating_add(*ms);
        }
        self.cost_minor = self.cost_minor.saturating_add(r.cost_minor.unwrap_or(0));
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub since_unix_ms: Option<u64>,
    pub until_unix_ms: Option<u64>,
    pub totals: Totals,
    /// Empty without a grouping.
    pub groups: BTreeMap<String, Totals>,
}

/// Whether `r` is in [since, until) by when it ended (as the export filters).
pub fn in_range(r: &UsageRecord, since: Option<u64>, until: Option<u64>) -> bool {
    since.is_none_or(|s| r.ended_unix_ms >= s) && until.is_none_or(|u| r.ended_unix_ms < u)
}

/// Totals of the ledger at `dir` over [since, until), grouped.
pub fn summarize(
    dir: &Path,
    since: Option<u64>,
    until: Option<u64>,
    group_by: Option<GroupBy>,
) -> Result<Summary, LedgerError> {
    let mut s = Summary {
        since_unix_ms: since,
        until_unix_ms: until,
        ..Summary::default()
    };
    for_each_record(dir, None, |r, _| {
        if !in_range(&r, since, until) {
            return;
        }
        s.totals.add(&r);
        if let Some(g) = group_by {
            s.groups.entry(g.key(&r)).or_default().add(&r);
        }
    })?;
    Ok(s)
}
