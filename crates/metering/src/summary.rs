//! Usage totals over a time range, grouped: what `GET /state/usage`
//! answers. It reads the ledger as `steward usage export` does (the same
//! records, the same time filter), so their totals agree.
//!
//! A request never parses the whole ledger ([`summarize_bounded`]): a
//! sealed segment, once read, is kept as a [`SummaryCache`] digest (when
//! its records ended, and its totals by day and function), so a later
//! request skips it when it lies outside the range and adds its digest
//! when it lies inside; only segments that straddle a bound, the open one,
//! and ones not read yet are read, newest first, up to a byte budget.
//! What the budget left out is said ([`Coverage`]), and the next request
//! goes on from there.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

use crate::activity::{date_of, day_of};
use crate::ledger::{LedgerError, for_each_record, records_of, segment_files};
use crate::record::{RecordKind, UsageRecord};

/// Bytes of ledger one summary reads at most (`--state-usage-scan-bytes`):
/// four segments of the default 16 MiB.
pub const DEFAULT_SCAN_BYTES: u64 = 64 << 20;
/// (day, function) groups one segment's digest keeps; a segment with more
/// keeps only when its records ended, and is read again when it must be
/// counted.
const MAX_DIGEST_GROUPS: usize = 1024;
/// Segments whose digests are kept (a 1 GiB ledger has 64).
const MAX_DIGESTS: usize = 4096;

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
        self.key_of(
            &r.namespace,
            &r.application,
            &r.function,
            day_of(r.ended_unix_ms),
        )
    }

    fn key_of(self, namespace: &str, application: &str, function: &str, day: u32) -> String {
        match self {
            GroupBy::Function => format!("{namespace}/{application}/{function}"),
            GroupBy::Application => format!("{namespace}/{application}"),
            GroupBy::Namespace => namespace.to_string(),
            GroupBy::Day => date_of(day),
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

impl Totals {
    /// Adds `other`, summed as [`Totals::add`] sums records.
    fn merge(&mut self, other: &Totals) {
        self.records += other.records;
        self.tasks += other.tasks;
        self.failed += other.failed;
        self.wall_ms = self.wall_ms.saturating_add(other.wall_ms);
        self.idle_ms = self.idle_ms.saturating_add(other.idle_ms);
        self.cpu_core_us = self.cpu_core_us.saturating_add(other.cpu_core_us);
        self.memory_mb_ms = self.memory_mb_ms.saturating_add(other.memory_mb_ms);
        for (m, ms) in &other.gpu_ms {
            let e = self.gpu_ms.entry(m.clone()).or_default();
            *e = e.saturating_add(*ms);
        }
        for (m, ms) in &other.gpu_busy_ms {
            let e = self.gpu_busy_ms.entry(m.clone()).or_default();
            *e = e.saturating_add(*ms);
        }
        self.cost_minor = self.cost_minor.saturating_add(other.cost_minor);
    }
}

/// (day, namespace, application, function).
type DigestKey = (u32, String, String, String);

/// One sealed segment, summed once it was read.
struct Digest {
    /// The segment's size when it was read (a different size is a
    /// different segment).
    len: u64,
    /// When its first- and last-ending records ended; `None`: no records.
    span: Option<(u64, u64)>,
    /// Its totals by day and function; `None` past [`MAX_DIGEST_GROUPS`].
    groups: Option<BTreeMap<DigestKey, Totals>>,
}

impl Digest {
    fn new(len: u64) -> Digest {
        Digest {
            len,
            span: None,
            groups: Some(BTreeMap::new()),
        }
    }

    fn add(&mut self, r: &UsageRecord) {
        let end = r.ended_unix_ms;
        self.span = Some(
            self.span
                .map_or((end, end), |(lo, hi)| (lo.min(end), hi.max(end))),
        );
        let Some(groups) = &mut self.groups else {
            return;
        };
        let key = (
            day_of(end),
            r.namespace.clone(),
            r.application.clone(),
            r.function.clone(),
        );
        if groups.len() >= MAX_DIGEST_GROUPS && !groups.contains_key(&key) {
            self.groups = None;
            return;
        }
        groups.entry(key).or_default().add(r);
    }
}

/// Digests of the ledger's sealed segments, kept between requests; one
/// summary is made at a time (a request waits for the one before).
#[derive(Default)]
pub struct SummaryCache {
    digests: Mutex<HashMap<u64, Digest>>,
}

/// How much of the ledger a summary counted, and at what cost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Coverage {
    /// Every segment that may hold records in the range was counted.
    pub complete: bool,
    /// Segments in the ledger.
    pub segments: usize,
    /// Segments answered from their digests, without reading them.
    pub from_digests: usize,
    /// Bytes read and parsed for this summary.
    pub scanned_bytes: u64,
    /// Segments the byte budget left out (the oldest first), and their bytes.
    pub unscanned_segments: usize,
    pub unscanned_bytes: u64,
}

/// As [`summarize`], reading at most about `max_scan_bytes` of the ledger
/// (at least one segment) and using and filling `cache`: the segments
/// left out are said in the [`Coverage`].
pub fn summarize_bounded(
    dir: &Path,
    since: Option<u64>,
    until: Option<u64>,
    group_by: Option<GroupBy>,
    cache: &SummaryCache,
    max_scan_bytes: u64,
) -> Result<(Summary, Coverage), LedgerError> {
    let mut s = Summary {
        since_unix_ms: since,
        until_unix_ms: until,
        ..Summary::default()
    };
    let segments = segment_files(dir)?;
    let newest = segments.last().map(|(seq, _, _)| *seq);
    let mut cov = Coverage {
        segments: segments.len(),
        ..Coverage::default()
    };
    // A summary that panicked left digests that are each whole.
    let mut digests = cache
        .digests
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    digests.retain(|seq, d| segments.iter().any(|(s, _, len)| s == seq && *len == d.len));
    let outside =
        |lo: u64, hi: u64| until.is_some_and(|u| lo >= u) || since.is_some_and(|s| hi < s);
    let inside = |lo: u64, hi: u64| since.is_none_or(|s| lo >= s) && until.is_none_or(|u| hi < u);
    for (seq, path, len) in segments.iter().rev() {
        if let Some(d) = digests.get(seq) {
            match (d.span, &d.groups) {
                (None, _) => {
                    cov.from_digests += 1;
                    continue;
                }
                (Some((lo, hi)), _) if outside(lo, hi) => {
                    cov.from_digests += 1;
                    continue;
                }
                (Some((lo, hi)), Some(groups)) if inside(lo, hi) => {
                    for ((day, ns, app, function), t) in groups {
                        s.totals.merge(t);
                        if let Some(g) = group_by {
                            s.groups
                                .entry(g.key_of(ns, app, function, *day))
                                .or_default()
                                .merge(t);
                        }
                    }
                    cov.from_digests += 1;
                    continue;
                }
                _ => {}
            }
        }
        if cov.scanned_bytes > 0 && cov.scanned_bytes.saturating_add(*len) > max_scan_bytes {
            cov.unscanned_segments += 1;
            cov.unscanned_bytes = cov.unscanned_bytes.saturating_add(*len);
            continue;
        }
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            // Rotated away meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => {
                return Err(LedgerError::Io {
                    path: path.clone(),
                    error,
                });
            }
        };
        cov.scanned_bytes = cov.scanned_bytes.saturating_add(bytes.len() as u64);
        let mut digest = (Some(*seq) != newest).then(|| Digest::new(*len));
        for r in records_of(&bytes) {
            if let Some(d) = &mut digest {
                d.add(&r);
            }
            if !in_range(&r, since, until) {
                continue;
            }
            s.totals.add(&r);
            if let Some(g) = group_by {
                s.groups.entry(g.key(&r)).or_default().add(&r);
            }
        }
        if let Some(d) = digest
            && digests.len() < MAX_DIGESTS
        {
            digests.insert(*seq, d);
        }
    }
    cov.complete = cov.unscanned_segments == 0;
    Ok((s, cov))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tests::record;
    use crate::ledger::{Ledger, LedgerConfig};

    /// A ledger of 300 records in segments of about 4 KiB.
    fn ledger() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut config = LedgerConfig::new(tmp.path().to_path_buf());
        config.segment_bytes = 4 << 10;
        let (mut l, _) = Ledger::open(config).expect("open");
        for i in 0..300 {
            l.append(&record(i)).expect("append");
        }
        tmp
    }

    fn segment_sizes(dir: &Path) -> Vec<u64> {
        segment_files(dir)
            .expect("segments")
            .into_iter()
            .map(|(_, _, len)| len)
            .collect()
    }

    #[test]
    fn a_bounded_summary_reads_little_and_converges_to_the_full_one() {
        let tmp = ledger();
        let dir = tmp.path();
        let sizes = segment_sizes(dir);
        assert!(sizes.len() > 10, "{sizes:?}");
        // The open segment is preallocated (1 MiB of zeros to read), the
        // sealed ones hold about 4 KiB each: room for about three of them.
        let (open, sealed) = sizes.split_last().expect("segments");
        let budget = open + 3 * sealed.iter().copied().max().unwrap_or(0);
        for (since, until, group_by) in [
            (None, None, Some(GroupBy::Function)),
            (Some(100_000), Some(200_000), Some(GroupBy::Application)),
            (Some(250_500), None, Some(GroupBy::Day)),
        ] {
            let full = summarize(dir, since, until, group_by).expect("full");
            let cache = SummaryCache::default();
            let mut rounds = 0;
            let (bounded, cov) = loop {
                let (s, cov) = summarize_bounded(dir, since, until, group_by, &cache, budget)
                    .expect("bounded");
                assert!(cov.scanned_bytes <= budget, "{cov:?}");
                rounds += 1;
                if cov.complete {
                    break (s, cov);
                }
                assert!(rounds < sizes.len(), "never complete: {cov:?}");
            };
            assert_eq!(bounded.totals, full.totals, "{since:?}..{until:?}");
            assert_eq!(bounded.groups, full.groups, "{since:?}..{until:?}");
            // Once every sealed segment is digested, a request reads at
            // most the open segment and those straddling a bound.
            let (again, cov2) =
                summarize_bounded(dir, since, until, group_by, &cache, budget).expect("again");
            assert_eq!(again.totals, full.totals);
            assert!(
                cov2.complete && cov2.scanned_bytes <= budget,
                "{cov2:?} after {cov:?}"
            );
            assert!(cov2.from_digests + 3 >= cov2.segments, "{cov2:?}");
        }
    }

    #[test]
    fn a_segment_with_too_many_groups_is_read_again_not_miscounted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut config = LedgerConfig::new(tmp.path().to_path_buf());
        config.segment_bytes = 1 << 20;
        let (mut l, _) = Ledger::open(config).expect("open");
        for i in 0..(MAX_DIGEST_GROUPS as u64 + 50) {
            let mut r = record(i);
            r.function = format!("f{i}");
            l.append(&r).expect("append");
        }
        // Seal it: the next record opens a new segment.
        drop(l);
        let mut config = LedgerConfig::new(tmp.path().to_path_buf());
        config.segment_bytes = 1;
        let (mut l, _) = Ledger::open(config).expect("reopen");
        l.append(&record(1_000_000)).expect("append");
        let full = summarize(tmp.path(), None, None, Some(GroupBy::Function)).expect("full");
        let cache = SummaryCache::default();
        for _ in 0..2 {
            let (s, cov) = summarize_bounded(
                tmp.path(),
                None,
                None,
                Some(GroupBy::Function),
                &cache,
                u64::MAX,
            )
            .expect("bounded");
            assert_eq!(s.groups, full.groups);
            assert!(cov.complete, "{cov:?}");
        }
    }
}
