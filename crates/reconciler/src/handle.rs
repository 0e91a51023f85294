//! The agent as monitoring and tests see it: [`AgentHandle`] (health,
//! snapshots and pages of workers and allocations, events, settings and
//! the operator's commands) and the views it returns. Worker views are
//! copied from the published registry and each controller's `watch`,
//! usage read from cgroups after every lock is let go.

use std::sync::Arc;
use std::sync::atomic::Ordering;
#[cfg(test)]
use std::time::Duration;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::events::{Event, TimelineEntry};
use crate::lifecycle::{FeMap, FePhase, FeSlot};
use crate::state::{AllocEntry, AllocPhase, Shared, State, function_label};
use crate::{Metrics, pb};

/// A worker, as shown on `/state/function-executors`.
#[derive(Debug, Clone, Serialize)]
pub struct FeView {
    pub id: String,
    pub function: String,
    pub status: String,
    pub termination_reason: Option<String>,
    pub allocation_ids_caused_termination: Vec<String>,
    pub removing: bool,
    pub pid: Option<u32>,
    pub gpus: Vec<String>,
    pub cpu_ms_per_sec: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub max_concurrency: Option<u32>,
    /// What it holds on this host (defaults applied), `None` if refused.
    pub resources: Option<crate::admission::Claim>,
    /// Resources given the agent's defaults because the description left them unset.
    pub defaulted: Vec<&'static str>,
    /// Limits enforced on it (its cgroup), `None` where none are.
    pub limits: Option<steward_worker_driver::Limits>,
    /// Usage read from its cgroup (now, or just before it stopped).
    pub usage: Option<steward_worker_driver::WorkerUsage>,
    pub termination_message: Option<String>,
    pub timeline: Vec<TimelineEntry>,
}

/// An allocation, as shown on `/state/allocations`.
#[derive(Debug, Clone, Serialize)]
pub struct AllocView {
    pub id: String,
    pub function_executor_id: String,
    pub function: String,
    pub phase: AllocPhase,
    pub timeline: Vec<TimelineEntry>,
}

/// Point-in-time copy of what monitoring shows.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub executor_id: String,
    pub server_clock: u64,
    pub pending_results: usize,
    pub function_executors: Vec<FeView>,
    pub allocations: Vec<AllocView>,
}

/// Read access to the running agent, for monitoring and tests.
#[derive(Clone)]
pub struct AgentHandle {
    shared: Arc<Shared>,
}

impl AgentHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        AgentHandle { shared }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn executor_id(&self) -> &str {
        &self.shared.config.executor_id
    }

    /// (ready, why): ready once registered and the first desired state was applied.
    pub fn startup(&self) -> (bool, String) {
        if self.shared.started.load(Ordering::Acquire) {
            return (
                true,
                "registered with the server and applied the first desired state".into(),
            );
        }
        let h = self.shared.health.lock();
        let why = match (&h.last_report_ok, &h.last_report_error) {
            (None, Some(e)) => format!("not registered yet: last report failed: {e}"),
            (None, None) => "not registered yet: first report in flight".into(),
            (Some(_), _) => "registered; waiting for the first desired state".into(),
        };
        (false, why)
    }

    /// (healthy, why), judged against `report_grace` and `reconcile_watchdog`.
    pub fn health(
        &self,
        report_grace: std::time::Duration,
        reconcile_watchdog: std::time::Duration,
    ) -> (bool, String) {
        let now = Instant::now();
        let h = self.shared.health.lock();
        if let Some(busy) = h.reconcile_busy_since {
            let stuck = now.duration_since(busy);
            if stuck > reconcile_watchdog {
                return (
                    false,
                    format!(
                        "reconcile loop is stuck applying a desired state for {}s",
                        stuck.as_secs()
                    ),
                );
            }
        }
        let last_beat = h.last_reconcile_progress.unwrap_or(self.shared.started_at);
        if now.duration_since(last_beat) > reconcile_watchdog {
            return (
                false,
                format!(
                    "reconcile loop has shown no sign of life for {}s",
                    now.duration_since(last_beat).as_secs()
                ),
            );
        }
        // Judged by the age of the last good report, so a report loop that
        // died or hangs is seen as surely as one whose reports fail.
        let since_ok = now.duration_since(h.last_report_ok.unwrap_or(self.shared.started_at));
        if since_ok > report_grace {
            return (
                false,
                format!(
                    "no state report has succeeded for {}s ({} failed in a row): {}",
                    since_ok.as_secs(),
                    h.consecutive_report_failures,
                    h.last_report_error
                        .as_deref()
                        .unwrap_or("no report attempt failed: the report loop is stuck")
                ),
            );
        }
        (
            true,
            "state reports are succeeding and the reconcile loop is responsive".into(),
        )
    }

    /// The last report sent and when, if any.
    pub fn last_report(&self) -> Option<(pb::ReportExecutorStateRequest, SystemTime)> {
        let last = self.shared.last_report.borrow().clone();
        last.map(|(bytes, at)| {
            let r = prost::Message::decode(bytes).unwrap_or_default();
            (r, at)
        })
    }

    /// The last desired state received and when, if any.
    pub fn last_desired(&self) -> Option<(Arc<crate::Desired>, SystemTime)> {
        self.shared.last_desired.borrow().clone()
    }

    pub fn events(&self) -> Vec<Event> {
        self.shared.events.recent()
    }

    /// Events `[offset, offset + limit)`, oldest first, and how many the
    /// ring holds.
    pub fn events_page(&self, offset: usize, limit: usize) -> (Vec<Event>, usize) {
        self.shared.events.page(offset, limit)
    }

    /// Everything `/state/function-executors` and `/state/allocations` show.
    pub fn snapshot(&self) -> Snapshot {
        let (allocations, pending_results, server_clock) = {
            let st = self.shared.state.lock();
            let (allocations, _) = alloc_views(&st, 0, usize::MAX);
            (allocations, st.results.len(), st.server_clock)
        };
        let function_executors = fe_views(&self.shared.workers(), 0, usize::MAX);
        Snapshot {
            executor_id: self.shared.config.executor_id.clone(),
            server_clock,
            pending_results,
            function_executors: with_usage(function_executors),
            allocations,
        }
    }

    /// Function executors `[offset, offset + limit)` by id, and how many
    /// there are. Copied from the published registry and the workers'
    /// views (no lock of the agent's state); usage is read from the
    /// workers' cgroups after each view is let go.
    pub fn function_executors_page(&self, offset: usize, limit: usize) -> (Vec<FeView>, usize) {
        let workers = self.shared.workers();
        let live = workers.values().filter(|s| !s.gone()).count();
        (with_usage(fe_views(&workers, offset, limit)), live)
    }

    /// Allocations `[offset, offset + limit)` (those the agent holds, by
    /// id, then the recently dropped ones, newest first), how many there
    /// are, and how many results wait for the server.
    pub fn allocations_page(&self, offset: usize, limit: usize) -> (Vec<AllocView>, usize, usize) {
        let st = self.shared.state.lock();
        let (views, total) = alloc_views(&st, offset, limit);
        (views, total, st.results.len())
    }

    /// Each worker's allocations held now: (running, queued), one pass
    /// under the state lock (the host's page).
    pub fn allocation_counts(&self) -> std::collections::HashMap<String, (u32, u32)> {
        let st = self.shared.state.lock();
        let mut counts = std::collections::HashMap::<String, (u32, u32)>::new();
        for a in st.allocations.values() {
            let c = counts.entry(a.fe_id.clone()).or_default();
            match a.phase {
                AllocPhase::Running => c.0 += 1,
                AllocPhase::Queued => c.1 += 1,
                AllocPhase::Finished => {}
            }
        }
        counts
    }

    /// The `limit` allocations whose last step is the latest, newest first,
    /// among those held and those dropped recently (the host's page). One
    /// pass over what is held, under the state lock; only those shown are
    /// copied.
    pub fn latest_allocations(&self, limit: usize) -> Vec<AllocView> {
        let st = self.shared.state.lock();
        let last = |a: &AllocEntry| a.timeline.last().map_or(0, |t| t.at_unix_ms);
        let mut all: Vec<(u64, &String, &AllocEntry)> = st
            .allocations
            .iter()
            .chain(
                st.recent_allocations
                    .iter()
                    .rev()
                    .take(limit)
                    .map(|(id, a)| (id, a)),
            )
            .map(|(id, a)| (last(a), id, a))
            .collect();
        let newest_first = |x: &(u64, &String, &AllocEntry), y: &(u64, &String, &AllocEntry)| {
            y.0.cmp(&x.0).then_with(|| x.1.cmp(y.1))
        };
        if all.len() > limit && limit > 0 {
            all.select_nth_unstable_by(limit - 1, newest_first);
        }
        all.truncate(limit);
        all.sort_unstable_by(newest_first);
        all.into_iter()
            .map(|(_, id, a)| AllocView {
                id: id.clone(),
                function_executor_id: a.fe_id.clone(),
                function: a.function.clone(),
                phase: a.phase,
                timeline: a.timeline.clone(),
            })
            .collect()
    }

    /// Brings the admitted-resource and worker-usage gauges up to date
    /// (read from the workers' cgroups; called before each scrape).
    pub fn refresh_worker_metrics(&self) {
        let workers = self.shared.workers();
        let held = crate::lifecycle::admitted(&workers);
        let monitors: Vec<_> = workers
            .values()
            .filter_map(FeSlot::controlled)
            .filter_map(|c| c.view.borrow().phase.spawned().map(|s| s.monitor.clone()))
            .collect();
        let m = &self.shared.metrics;
        for (name, v) in [
            ("cpu_ms_per_sec", held.cpu_ms_per_sec),
            ("memory_bytes", held.memory_bytes),
            ("disk_bytes", held.disk_bytes),
            ("gpus", held.gpus),
        ] {
            m.admitted
                .get_or_create(&vec![("resource", name)])
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        let (mut mem, mut cpu_us, mut pids) = (0u64, 0u64, 0u64);
        for u in monitors.iter().filter_map(|m| m.usage()) {
            mem = mem.saturating_add(u.memory_current_bytes);
            cpu_us = cpu_us.saturating_add(u.cpu_usec);
            pids = pids.saturating_add(u.pids_current.unwrap_or(0));
        }
        m.workers_memory_bytes
            .set(i64::try_from(mem).unwrap_or(i64::MAX));
        m.workers_cpu_seconds.set(cpu_us as f64 / 1e6);
        m.workers_pids.set(i64::try_from(pids).unwrap_or(i64::MAX));
    }

    /// How workers are confined and admitted, for `/state/host`: the
    /// driver and what it enforces (and why not), the defaults, the
    /// eviction thresholds, and admitted against allocatable resources.
    pub fn workers_document(&self) -> serde_json::Value {
        let c = &self.shared.config;
        let held = crate::lifecycle::admitted(&self.shared.workers());
        serde_json::json!({
            "driver": c.driver.name(),
            "limits": c.driver.enforcement(),
            "defaults": {
                "cpu_ms_per_sec": c.worker_defaults.cpu_ms_per_sec,
                "memory_bytes": c.worker_defaults.memory_bytes,
                "pids_max": c.worker_defaults.pids_max,
            },
            "eviction": {
                "enabled": c.eviction.source.is_some(),
                "memory_available_bytes": c.eviction.memory_available_bytes,
                "psi_some_avg10_percent": c.eviction.psi_some_avg10,
            },
            "admitted": held,
            "allocatable": crate::admission::allocatable(&self.shared.allocatable()),
        })
    }

    /// The runtime-changeable settings now.
    pub fn settings(&self) -> crate::settings::Settings {
        self.shared.settings.borrow().clone()
    }

    /// Applies a settings change as a whole, or nothing; a change is an
    /// event and reaches the server with the next report, sent at once.
    pub fn update_settings(
        &self,
        patch: &crate::settings::SettingsPatch,
        by: &str,
    ) -> Result<crate::settings::Settings, crate::settings::SettingsError> {
        let mut outcome = None;
        self.shared.settings.send_if_modified(|settings| {
            match settings.patched(patch, &self.shared.config.total_resources) {
                Ok(next) => {
                    let changed = next.changed_from(settings);
                    *settings = next.clone();
                    let modified = !changed.is_empty();
                    outcome = Some(Ok((next, changed)));
                    modified
                }
                Err(e) => {
                    outcome = Some(Err(e));
                    false
                }
            }
        });
        // (The closure always runs: `outcome` is set.)
        let (next, changed) = outcome.unwrap_or_else(|| Ok((self.settings(), Vec::new())))?;
        if !changed.is_empty() {
            self.shared.event(
                "settings_changed",
                &self.shared.config.executor_id,
                format!("{} ({by})", changed.join(", ")),
            );
            self.shared.report_now.notify_one();
        }
        Ok(next)
    }

    /// The host's operator mode.
    pub fn mode(&self) -> crate::mode::HostMode {
        *self.shared.mode.borrow()
    }

    /// Applies an operator's command (pause, unpause, drain); returns the
    /// modes before and after.
    pub fn command(
        &self,
        cmd: crate::mode::ModeCommand,
    ) -> (crate::mode::HostMode, crate::mode::HostMode) {
        crate::operator::command(&self.shared, cmd)
    }

    /// Records an event (for the binary: admin calls and their outcome).
    pub fn event(&self, kind: &'static str, subject: &str, message: impl Into<String>) {
        self.shared.event(kind, subject, message);
    }

    /// Records an event strangers can cause, rate-limited per `class`
    /// ([`crate::events::EventLog::push_limited`]).
    pub fn event_limited(
        &self,
        class: &'static str,
        kind: &'static str,
        subject: &str,
        message: impl Into<String>,
    ) {
        self.shared.event_limited(class, kind, subject, message);
    }

    /// OpenMetrics text of the agent's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }
}

/// A worker's usage monitor and the usage read before it stopped.
type UsageSource = (
    Option<Arc<dyn steward_worker_driver::WorkerMonitor>>,
    Option<steward_worker_driver::WorkerUsage>,
);

/// Views of function executors `[offset, offset + limit)` (those not
/// gone) without their usage, and where to read it (a cgroup read each,
/// made after every view is let go).
fn fe_views(workers: &FeMap, offset: usize, limit: usize) -> Vec<(FeView, UsageSource)> {
    workers
        .iter()
        .filter(|(_, slot)| !slot.gone())
        .skip(offset)
        .take(limit)
        .map(|(id, slot)| fe_view(id, slot))
        .collect()
}

/// One worker's view, copied from its slot and its controller's `watch`.
fn fe_view(id: &str, slot: &FeSlot) -> (FeView, UsageSource) {
    let d = slot.description();
    let res = d.resources.as_ref();
    let (status, reason, blamed) = slot.reported();
    let mut view = FeView {
        id: id.to_string(),
        function: function_label(d.function.as_ref()),
        status: format!("{status:?}").to_uppercase(),
        termination_reason: reason.map(|r| format!("{r:?}")),
        allocation_ids_caused_termination: blamed,
        removing: matches!(slot, FeSlot::Removing(_)),
        pid: None,
        gpus: Vec::new(),
        cpu_ms_per_sec: res.and_then(|r| r.cpu_ms_per_sec),
        memory_bytes: res.and_then(|r| r.memory_bytes),
        max_concurrency: d.max_concurrency,
        resources: None,
        defaulted: Vec::new(),
        limits: None,
        usage: None,
        termination_message: None,
        timeline: Vec::new(),
    };
    let c = match slot {
        FeSlot::Rejected(r) => {
            view.termination_message = Some(r.message.clone());
            view.timeline = r.timeline.clone();
            return (view, (None, None));
        }
        FeSlot::Wanted(c) | FeSlot::Removing(c) => c,
    };
    view.resources = c.claim;
    view.defaulted = c.defaulted.clone();
    let state = c.view.borrow();
    view.timeline = state.timeline.clone();
    let mut source: UsageSource = (None, None);
    match &state.phase {
        FePhase::Pending => {}
        FePhase::Starting(s)
        | FePhase::Running(s)
        | FePhase::Stopping {
            spawned: Some(s), ..
        } => {
            view.removing |= matches!(state.phase, FePhase::Stopping { .. });
            view.pid = Some(s.pid);
            view.gpus = s.gpus.clone();
            view.limits = s.monitor.limits();
            source.0 = Some(s.monitor.clone());
        }
        FePhase::Stopping { spawned: None, .. } => view.removing = true,
        FePhase::Terminated(t) => {
            view.pid = t.pid;
            view.gpus = t.gpus.clone();
            view.termination_message = t.message.clone();
            source.1 = t.usage;
        }
    }
    (view, source)
}

/// The views with their usage read (live workers now, else the last read).
fn with_usage(views: Vec<(FeView, UsageSource)>) -> Vec<FeView> {
    views
        .into_iter()
        .map(|(mut v, (monitor, last))| {
            v.usage = monitor.as_ref().and_then(|m| m.usage()).or(last);
            v
        })
        .collect()
}

/// Views of allocations `[offset, offset + limit)`: the held ones by id,
/// then the recently dropped ones, newest first; and how many there are.
fn alloc_views(st: &State, offset: usize, limit: usize) -> (Vec<AllocView>, usize) {
    let mut held: Vec<(&String, &AllocEntry)> = st.allocations.iter().collect();
    held.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let total = held.len() + st.recent_allocations.len();
    let views = held
        .into_iter()
        .chain(st.recent_allocations.iter().rev().map(|(id, a)| (id, a)))
        .skip(offset)
        .take(limit)
        .map(|(id, a)| AllocView {
            id: id.clone(),
            function_executor_id: a.fe_id.clone(),
            function: a.function.clone(),
            phase: a.phase,
            timeline: a.timeline.clone(),
        })
        .collect();
    (views, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker monitor that notes whether the agent's state lock was
    /// held while it was read (a cgroup read each, in a real one).
    struct LockProbe {
        shared: std::sync::Weak<Shared>,
        reads: std::sync::atomic::AtomicUsize,
        under_lock: std::sync::atomic::AtomicUsize,
    }

    impl steward_worker_driver::WorkerMonitor for LockProbe {
        fn usage(&self) -> Option<steward_worker_driver::WorkerUsage> {
            use std::sync::atomic::Ordering::SeqCst;
            let shared = self.shared.upgrade()?;
            self.reads.fetch_add(1, SeqCst);
            if shared.state.try_lock().is_none() {
                self.under_lock.fetch_add(1, SeqCst);
            }
            Some(steward_worker_driver::WorkerUsage::default())
        }
        fn limits(&self) -> Option<steward_worker_driver::Limits> {
            None
        }
    }

    #[test]
    fn worker_usage_is_read_after_the_state_lock_is_let_go_and_pages_are_copied() {
        use std::sync::atomic::Ordering::SeqCst;
        let shared = crate::testing_support::shared();
        let probe = Arc::new(LockProbe {
            shared: Arc::downgrade(&shared),
            reads: Default::default(),
            under_lock: Default::default(),
        });
        let mut views = Vec::new();
        {
            let mut fes = FeMap::new();
            let mut st = shared.state.lock();
            for i in 0..5 {
                let spawned = crate::lifecycle::testing::spawned(Some(probe.clone()));
                let (c, _rx, view) =
                    crate::lifecycle::testing::controlled(FePhase::Running(spawned));
                views.push(view);
                fes.insert(format!("fe-{i}"), FeSlot::Wanted(c));
                st.allocations.insert(
                    format!("a-{}", 4 - i),
                    AllocEntry {
                        fe_id: format!("fe-{i}"),
                        function: "ns/app/f".into(),
                        phase: AllocPhase::Running,
                        timeline: Vec::new(),
                    },
                );
            }
            shared.workers.send_replace(Arc::new(fes));
        }
        let handle = AgentHandle::new(shared.clone());
        let (page, total) = handle.function_executors_page(1, 2);
        assert_eq!(total, 5);
        let ids: Vec<&str> = page.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["fe-1", "fe-2"]);
        assert!(page.iter().all(|f| f.usage.is_some()));
        let snapshot = handle.snapshot();
        assert_eq!(snapshot.function_executors.len(), 5);
        assert_eq!(
            probe.reads.load(SeqCst),
            7,
            "two for the page, five for the snapshot"
        );
        assert_eq!(
            probe.under_lock.load(SeqCst),
            0,
            "read under the state lock"
        );
        // Allocations are paged in one order: by id.
        let (page, total, _) = handle.allocations_page(0, 3);
        let ids: Vec<&str> = page.iter().map(|a| a.id.as_str()).collect();
        assert_eq!((ids, total), (vec!["a-0", "a-1", "a-2"], 5));
        let (page, _, _) = handle.allocations_page(3, 3);
        assert_eq!(page.len(), 2);
    }

    /// The page's recent allocations: by their last step, newest first,
    /// held or dropped alike, whatever their ids.
    #[test]
    fn the_latest_allocations_come_newest_first() {
        let shared = crate::testing_support::shared();
        let entry = |at: u64| AllocEntry {
            fe_id: "fe".into(),
            function: "ns/app/f".into(),
            phase: AllocPhase::Running,
            timeline: vec![crate::events::TimelineEntry {
                at_unix_ms: at,
                what: "step".into(),
            }],
        };
        {
            let mut st = shared.state.lock();
            for (id, at) in [("a", 30), ("b", 10), ("c", 50), ("d", 20)] {
                st.allocations.insert(id.into(), entry(at));
            }
            for (id, at) in [("x", 5), ("y", 40)] {
                st.recent_allocations.push_back((id.into(), entry(at)));
            }
        }
        let handle = AgentHandle::new(shared);
        let ids = |n| -> Vec<String> {
            handle
                .latest_allocations(n)
                .into_iter()
                .map(|a| a.id)
                .collect()
        };
        assert_eq!(ids(3), ["c", "y", "a"]);
        assert_eq!(handle.allocation_counts().get("fe"), Some(&(4, 0)));
        assert_eq!(ids(10), ["c", "y", "a", "d", "b", "x"]);
        assert!(ids(0).is_empty());
    }

    /// A monitor whose usage read stalls until the test lets it go: a
    /// `/state` reader caught in the middle of a snapshot.
    struct StalledRead {
        entered: std::sync::mpsc::SyncSender<()>,
        release: parking_lot::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl steward_worker_driver::WorkerMonitor for StalledRead {
        fn usage(&self) -> Option<steward_worker_driver::WorkerUsage> {
            let _ = self.entered.try_send(());
            let _ = self.release.lock().recv();
            None
        }
        fn limits(&self) -> Option<steward_worker_driver::Limits> {
            None
        }
    }

    /// A writer that takes nothing until the test lets it go: a reader
    /// whose connection does not drain while its document is serialised.
    struct StalledWriter {
        entered: std::sync::mpsc::SyncSender<()>,
        release: std::sync::mpsc::Receiver<()>,
    }

    impl std::io::Write for StalledWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.entered.try_send(());
            let _ = self.release.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What an allocation's end does on the way to the server: the
    /// controller marks its worker used (its view), the result is queued
    /// and the next report carries it. Run on another thread: `Some` with
    /// the report's allocation ids, `None` if it was still blocked after
    /// a minute (a reader holding a writer's lock).
    fn finish_allocation(
        shared: &Arc<Shared>,
        view: &tokio::sync::watch::Sender<crate::lifecycle::FeState>,
        id: &str,
    ) -> Option<Vec<String>> {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (shared, view, id) = (shared.clone(), view.clone(), id.to_string());
        std::thread::spawn(move || {
            view.send_modify(|s| s.last_used = Instant::now());
            shared.push_result(pb::AllocationResult {
                allocation_id: Some(id),
                outcome_code: Some(pb::AllocationOutcomeCode::Success as i32),
                ..Default::default()
            });
            let (ids, carried) = crate::report::carried_ids(&shared, false);
            shared.state.lock().results.drain(..carried.count);
            let _ = done_tx.send(ids);
        });
        done_rx.recv_timeout(Duration::from_secs(60)).ok()
    }

    /// A slow `/state` reader, stalled while it copies the workers' views
    /// (a cgroup read) and then while its document is serialised, delays
    /// no allocation's result: readers copy and let go, they never hold
    /// what a controller, the result queue or the reporter writes.
    #[test]
    fn a_stalled_state_reader_does_not_delay_an_allocation_result() {
        use std::sync::mpsc::sync_channel;
        let shared = crate::testing_support::shared();
        let (entered_tx, entered) = sync_channel(8);
        let (release_tx, release_rx) = sync_channel(8);
        let monitor = Arc::new(StalledRead {
            entered: entered_tx.clone(),
            release: parking_lot::Mutex::new(release_rx),
        });
        let spawned = crate::lifecycle::testing::spawned(Some(monitor));
        let (c, _rx, view) = crate::lifecycle::testing::controlled(FePhase::Running(spawned));
        shared.workers.send_replace(Arc::new(FeMap::from([(
            "fe-0".to_string(),
            FeSlot::Wanted(c),
        )])));
        let handle = AgentHandle::new(shared.clone());
        let reader = std::thread::spawn(move || handle.snapshot());
        entered
            .recv_timeout(Duration::from_secs(60))
            .expect("the reader reaches the worker's usage");
        assert_eq!(
            finish_allocation(&shared, &view, "a-1"),
            Some(vec!["a-1".to_string()]),
            "the result waited for a reader stalled in a snapshot"
        );
        release_tx.send(()).expect("the reader waits");
        let snapshot = reader.join().expect("the reader ends");
        // Hold the snapshot and stall its serialisation.
        let (write_release_tx, write_release) = sync_channel(1);
        let writer = StalledWriter {
            entered: entered_tx,
            release: write_release,
        };
        let serialiser = std::thread::spawn(move || serde_json::to_writer(writer, &snapshot));
        entered
            .recv_timeout(Duration::from_secs(60))
            .expect("the serialiser writes");
        assert_eq!(
            finish_allocation(&shared, &view, "a-2"),
            Some(vec!["a-2".to_string()]),
            "the result waited for a stalled serialiser"
        );
        drop(write_release_tx);
        assert!(serialiser.join().is_ok());
    }
}
