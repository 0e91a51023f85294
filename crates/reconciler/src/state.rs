//! State shared by the agent's loops and worker controllers, and the
//! read-only [`AgentHandle`] the binary gives to monitoring.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use crate::events::{Event, EventLog};
use crate::fe::FeCommand;
use crate::watches::WatchRegistry;
use crate::{AgentConfig, Metrics, pb};

/// One worker as the agent tracks it.
pub(crate) struct FeEntry {
    pub description: pb::FunctionExecutorDescription,
    /// `description`, encoded once for every report to copy.
    pub description_bytes: bytes::Bytes,
    pub status: pb::FunctionExecutorStatus,
    pub termination_reason: Option<pb::FunctionExecutorTerminationReason>,
    pub blamed: Vec<String>,
    /// None for a description that was rejected and has no controller.
    pub tx: Option<mpsc::UnboundedSender<FeCommand>>,
    /// Removed from desired state; its controller is shutting down.
    pub removing: bool,
    pub pid: Option<u32>,
    pub gpus: Vec<String>,
    pub timeline: Vec<TimelineEntry>,
    /// What the worker holds while it lives (defaults applied); `None` for
    /// one refused at admission or rejected.
    pub claim: Option<crate::admission::Claim>,
    /// Resources the description left unset, given the agent's defaults.
    pub defaulted: Vec<&'static str>,
    /// The live worker's usage and limits.
    pub monitor: Option<Arc<dyn steward_worker_driver::WorkerMonitor>>,
    /// Usage read just before the worker was stopped.
    pub last_usage: Option<steward_worker_driver::WorkerUsage>,
    /// Why it was terminated, in words (OOM with the limit, eviction, admission).
    pub termination_message: Option<String>,
    /// When an allocation last finished on it (or it became ready): eviction
    /// takes the least recently used idle worker first.
    pub last_used: Instant,
}

impl FeEntry {
    /// A new entry for `description`, pending.
    pub fn new(description: pb::FunctionExecutorDescription, what: &str) -> FeEntry {
        FeEntry {
            description_bytes: prost::Message::encode_to_vec(&description).into(),
            description,
            status: pb::FunctionExecutorStatus::Pending,
            termination_reason: None,
            blamed: Vec::new(),
            tx: None,
            removing: false,
            pid: None,
            gpus: Vec::new(),
            timeline: vec![TimelineEntry::now(what)],
            claim: None,
            defaulted: Vec::new(),
            monitor: None,
            last_usage: None,
            termination_message: None,
            last_used: Instant::now(),
        }
    }

    /// Holds resources: admitted and not terminated.
    pub fn holds_resources(&self) -> bool {
        self.claim.is_some() && self.status != pb::FunctionExecutorStatus::Terminated
    }
}

/// One allocation the agent has accepted and not yet forgotten.
/// How many dropped allocations `/state/allocations` still shows.
pub(crate) const RECENT_ALLOCATIONS: usize = 1000;

pub(crate) struct AllocEntry {
    pub fe_id: String,
    pub function: String,
    pub phase: AllocPhase,
    pub timeline: Vec<TimelineEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocPhase {
    Queued,
    Running,
    Finished,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    pub at_unix_ms: u64,
    pub what: String,
}

impl TimelineEntry {
    pub fn now(what: impl Into<String>) -> Self {
        TimelineEntry {
            at_unix_ms: unix_ms(SystemTime::now()),
            what: what.into(),
        }
    }
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A result waiting for the server to take it.
pub(crate) struct PendingResult {
    pub result: pb::AllocationResult,
    /// When the agent had it (the start of its share of the cycle).
    pub ready: Instant,
    /// Whether a report has carried it yet (its share is then counted).
    pub sent: bool,
    /// The metering commit it waits for: it is reported once metering's
    /// durable ticket reaches this (0: waits for nothing).
    pub ticket: u64,
}

impl PendingResult {
    pub fn new(result: pb::AllocationResult, ticket: u64) -> Self {
        PendingResult {
            result,
            ready: Instant::now(),
            sent: false,
            ticket,
        }
    }
}

pub(crate) struct State {
    pub fes: BTreeMap<String, FeEntry>,
    pub allocations: HashMap<String, AllocEntry>,
    /// Allocations the server has dropped from the desired state, newest
    /// last, kept (bounded) so operators can still read their timelines.
    pub recent_allocations: VecDeque<(String, AllocEntry)>,
    /// Results not yet taken by the server, oldest first.
    pub results: VecDeque<PendingResult>,
    pub server_clock: u64,
    pub status: pb::ExecutorStatus,
    /// What the operator has put the host in.
    pub mode: crate::mode::HostMode,
    /// Labels and eviction thresholds, changeable at runtime.
    pub settings: crate::settings::Settings,
    pub last_desired: Option<(Arc<crate::Desired>, SystemTime)>,
    pub last_report: Option<(crate::report::Report, SystemTime)>,
    /// The last reported state's hash, reused while the state is unchanged.
    pub hash_cache: crate::report::HashCache,
    /// Function call results the running allocations wait for.
    pub watches: WatchRegistry,
    /// (major, minor) of the workers' Python, reported as labels.
    pub python_version: Option<(String, String)>,
}

#[derive(Default)]
pub(crate) struct Health {
    pub last_report_ok: Option<Instant>,
    pub last_report_error: Option<String>,
    pub consecutive_report_failures: u32,
    pub last_reconcile_progress: Option<Instant>,
    pub reconcile_busy_since: Option<Instant>,
}

pub(crate) struct Shared {
    pub config: AgentConfig,
    /// The server's channel (lazily connected), shared by every RPC.
    pub server: tonic::transport::Channel,
    pub code_cache: steward_blob_store::CodeCache,
    pub metrics: Arc<Metrics>,
    pub events: EventLog,
    pub state: Mutex<State>,
    pub health: Mutex<Health>,
    /// Wakes the report loop for an immediate report.
    pub report_now: Notify,
    /// Wakes the reconcile loop to re-apply the last desired state.
    pub reconcile_now: Notify,
    /// Startup latch: set once registered and the first desired state is applied.
    pub started: AtomicBool,
    pub started_at: Instant,
    /// Count of successful reports; the stream loop waits on it.
    pub reports_ok: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// What workers may hold now (the reserved part can change at runtime).
    pub fn allocatable(&self) -> pb::HostResources {
        let st = self.state.lock();
        allocatable_in(&self.config, &st)
    }

    pub fn new(
        config: AgentConfig,
        metrics: Arc<Metrics>,
        code_cache: steward_blob_store::CodeCache,
        server: tonic::transport::Channel,
    ) -> Arc<Shared> {
        let settings = crate::settings::Settings {
            labels: config.labels.clone(),
            allowed_functions: config
                .allowed_functions
                .iter()
                .map(crate::settings::allowed_function_text)
                .collect(),
            reserved: crate::settings::Reserved {
                cpus: config
                    .total_resources
                    .cpu_count
                    .unwrap_or(0)
                    .saturating_sub(config.function_executor_resources.cpu_count.unwrap_or(0)),
                memory_bytes: config
                    .total_resources
                    .memory_bytes
                    .unwrap_or(0)
                    .saturating_sub(config.function_executor_resources.memory_bytes.unwrap_or(0)),
                disk_bytes: config
                    .total_resources
                    .disk_bytes
                    .unwrap_or(0)
                    .saturating_sub(config.function_executor_resources.disk_bytes.unwrap_or(0)),
            },
            eviction_memory_available: config.eviction.memory_available_bytes,
            eviction_memory_pressure: config.eviction.psi_some_avg10,
        };
        Arc::new(Shared {
            config,
            server,
            code_cache,
            metrics,
            events: EventLog::new(1000),
            state: Mutex::new(State {
                fes: BTreeMap::new(),
                allocations: HashMap::new(),
                recent_allocations: VecDeque::new(),
                results: VecDeque::new(),
                server_clock: 0,
                status: pb::ExecutorStatus::Running,
                mode: crate::mode::HostMode::Active,
                settings,
                last_desired: None,
                last_report: None,
                hash_cache: Default::default(),
                watches: WatchRegistry::default(),
                python_version: None,
            }),
            health: Mutex::new(Health::default()),
            report_now: Notify::new(),
            reconcile_now: Notify::new(),
            started: AtomicBool::new(false),
            started_at: Instant::now(),
            reports_ok: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Records an event and logs it; subject and message are shortened
    /// (they often carry what a worker or the server chose).
    pub fn event(&self, kind: &'static str, subject: &str, message: impl Into<String>) {
        let e = short_event(kind, subject, message.into());
        tracing::info!(kind, subject = %e.subject, "{}", e.message);
        self.events.push(e);
    }

    /// As [`Shared::event`], for events strangers can cause: at most
    /// [`crate::events::RATE_LIMITED_EVENTS`] of `class` a minute reach the
    /// ring and the log.
    pub fn event_limited(
        &self,
        class: &'static str,
        kind: &'static str,
        subject: &str,
        message: impl Into<String>,
    ) {
        let e = short_event(kind, subject, message.into());
        let (subject, message) = (e.subject.clone(), e.message.clone());
        if self.events.push_limited(class, e) {
            tracing::info!(kind, subject = %subject, "{message}");
        }
    }

    /// A final result: metered (its usage record queued for the ledger),
    /// then queued for a report that goes once the record is durable.
    pub fn push_result(&self, result: pb::AllocationResult) {
        let outcome = outcome_label(&result);
        self.metrics.allocation_completed(outcome.0, outcome.1);
        let (ran, fe_id) = {
            let mut st = self.state.lock();
            let mut seen = (false, String::new());
            let id = result.allocation_id.as_deref().unwrap_or_default();
            if let Some(a) = st.allocations.get_mut(id) {
                seen = (a.phase == AllocPhase::Running, a.fe_id.clone());
                a.phase = AllocPhase::Finished;
                a.timeline.push(TimelineEntry::now(format!(
                    "finished: {} {}",
                    outcome.0, outcome.1
                )));
            } else if self.config.metering.is_some()
                && let Some((_, a)) = st.recent_allocations.iter().rev().find(|(i, _)| i == id)
            {
                // Dropped from the desired state (cancelled) while it ran:
                // metering still needs its worker.
                seen = (a.phase == AllocPhase::Running, a.fe_id.clone());
            }
            seen
        };
        let Some(metering) = &self.config.metering else {
            self.queue_result(result, 0);
            return;
        };
        let f = result.function.clone().unwrap_or_default();
        let ticket = metering.allocation_finished(crate::metering::MeteredAllocation {
            alloc_id: result.allocation_id.clone().unwrap_or_default(),
            fe_id,
            namespace: f.namespace.unwrap_or_default(),
            application: f.application_name.unwrap_or_default(),
            function: f.function_name.unwrap_or_default(),
            outcome: match outcome {
                ("success", _) => "success".to_string(),
                (o, r) => format!("{o}:{r}"),
            },
            ran,
        });
        self.queue_result(result, ticket);
    }

    /// Metering's durable ticket (everything, without metering).
    pub(crate) fn durable_ticket(&self) -> u64 {
        self.config
            .metering
            .as_ref()
            .map_or(u64::MAX, |m| m.durable())
    }

    /// Queues a result for a report, and wakes the reporter if the result
    /// may go now (otherwise metering wakes it when its record is durable).
    fn queue_result(&self, result: pb::AllocationResult, ticket: u64) {
        {
            let mut st = self.state.lock();
            st.results.push_back(PendingResult::new(result, ticket));
            // Current during outages too, not only after a report.
            self.metrics.pending_results.set(st.results.len() as i64);
        }
        // Read after the push: a commit that raises the ticket later wakes
        // the reporter itself, and then sees this result.
        if ticket <= self.durable_ticket() {
            self.report_now.notify_one();
        }
    }
}

/// (outcome, failure reason) as lowercase metric label values.
pub(crate) fn outcome_label(r: &pb::AllocationResult) -> (&'static str, &'static str) {
    let outcome = match r.outcome_code() {
        pb::AllocationOutcomeCode::Success => "success",
        pb::AllocationOutcomeCode::Failure => "failure",
        pb::AllocationOutcomeCode::Unknown => "unknown",
    };
    let reason = if r.failure_reason.is_some() {
        failure_reason_name(r.failure_reason())
    } else {
        "none"
    };
    (outcome, reason)
}

pub(crate) fn failure_reason_name(r: pb::AllocationFailureReason) -> &'static str {
    use pb::AllocationFailureReason as R;
    match r {
        R::Unknown => "unknown",
        R::InternalError => "internal_error",
        R::FunctionError => "function_error",
        R::FunctionTimeout => "function_timeout",
        R::RequestError => "request_error",
        R::AllocationCancelled => "allocation_cancelled",
        R::FunctionExecutorTerminated => "function_executor_terminated",
        R::Oom => "oom",
        R::ConstraintUnsatisfiable => "constraint_unsatisfiable",
        R::ExecutorRemoved => "executor_removed",
        R::StartupFailedInternalError => "startup_failed_internal_error",
        R::StartupFailedFunctionError => "startup_failed_function_error",
        R::StartupFailedFunctionTimeout => "startup_failed_function_timeout",
    }
}

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

pub(crate) fn function_label(f: Option<&pb::FunctionRef>) -> String {
    match f {
        Some(f) => format!(
            "{}/{}/{}",
            f.namespace.as_deref().unwrap_or(""),
            f.application_name.as_deref().unwrap_or(""),
            f.function_name.as_deref().unwrap_or("")
        ),
        None => String::new(),
    }
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
        let last = self.shared.state.lock().last_report.clone();
        last.map(|(r, at)| (r.decode(), at))
    }

    /// The last desired state received and when, if any.
    pub fn last_desired(&self) -> Option<(Arc<crate::Desired>, SystemTime)> {
        self.shared.state.lock().last_desired.clone()
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
        let (function_executors, allocations, pending_results, server_clock) = {
            let st = self.shared.state.lock();
            let fes = fe_views(&st, 0, usize::MAX);
            let (allocations, _) = alloc_views(&st, 0, usize::MAX);
            (fes, allocations, st.results.len(), st.server_clock)
        };
        Snapshot {
            executor_id: self.shared.config.executor_id.clone(),
            server_clock,
            pending_results,
            function_executors: with_usage(function_executors),
            allocations,
        }
    }

    /// Function executors `[offset, offset + limit)` by id, and how many
    /// there are. Only the page is copied under the state lock; usage is
    /// read from the workers' cgroups after it is let go.
    pub fn function_executors_page(&self, offset: usize, limit: usize) -> (Vec<FeView>, usize) {
        let (views, total) = {
            let st = self.shared.state.lock();
            (fe_views(&st, offset, limit), st.fes.len())
        };
        (with_usage(views), total)
    }

    /// Allocations `[offset, offset + limit)` (those the agent holds, by
    /// id, then the recently dropped ones, newest first), how many there
    /// are, and how many results wait for the server.
    pub fn allocations_page(&self, offset: usize, limit: usize) -> (Vec<AllocView>, usize, usize) {
        let st = self.shared.state.lock();
        let (views, total) = alloc_views(&st, offset, limit);
        (views, total, st.results.len())
    }

    /// Brings the admitted-resource and worker-usage gauges up to date
    /// (read from the workers' cgroups; called before each scrape).
    pub fn refresh_worker_metrics(&self) {
        let (held, monitors) = {
            let st = self.shared.state.lock();
            let held = st.admitted();
            let monitors: Vec<_> = st.fes.values().filter_map(|f| f.monitor.clone()).collect();
            (held, monitors)
        };
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
        let held = self.shared.state.lock().admitted();
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
        self.shared.state.lock().settings.clone()
    }

    /// Applies a settings change as a whole, or nothing; a change is an
    /// event and reaches the server with the next report, sent at once.
    pub fn update_settings(
        &self,
        patch: &crate::settings::SettingsPatch,
        by: &str,
    ) -> Result<crate::settings::Settings, crate::settings::SettingsError> {
        let (next, changed) = {
            let mut st = self.shared.state.lock();
            let next = st
                .settings
                .patched(patch, &self.shared.config.total_resources)?;
            let changed = next.changed_from(&st.settings);
            st.settings = next.clone();
            (next, changed)
        };
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
        self.shared.state.lock().mode
    }

    /// Applies an operator's command (pause, unpause, drain); returns the
    /// modes before and after.
    pub fn command(
        &self,
        cmd: crate::mode::ModeCommand,
    ) -> (crate::mode::HostMode, crate::mode::HostMode) {
        crate::mode::command(&self.shared, cmd)
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

/// Views of function executors `[offset, offset + limit)` without their
/// usage, and where to read it (not under the state lock: a cgroup read
/// each).
fn fe_views(st: &State, offset: usize, limit: usize) -> Vec<(FeView, UsageSource)> {
    st.fes
        .iter()
        .skip(offset)
        .take(limit)
        .map(|(id, fe)| {
            let res = fe.description.resources.as_ref();
            let view = FeView {
                id: id.clone(),
                function: function_label(fe.description.function.as_ref()),
                status: format!("{:?}", fe.status).to_uppercase(),
                termination_reason: fe.termination_reason.map(|r| format!("{r:?}")),
                allocation_ids_caused_termination: fe.blamed.clone(),
                removing: fe.removing,
                pid: fe.pid,
                gpus: fe.gpus.clone(),
                cpu_ms_per_sec: res.and_then(|r| r.cpu_ms_per_sec),
                memory_bytes: res.and_then(|r| r.memory_bytes),
                max_concurrency: fe.description.max_concurrency,
                resources: fe.claim,
                defaulted: fe.defaulted.clone(),
                limits: fe.monitor.as_ref().and_then(|m| m.limits()),
                usage: None,
                termination_message: fe.termination_message.clone(),
                timeline: fe.timeline.clone(),
            };
            (view, (fe.monitor.clone(), fe.last_usage))
        })
        .collect()
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

/// An event with its subject and message shortened to the bounds.
fn short_event(kind: &'static str, subject: &str, message: String) -> Event {
    use crate::events::{MAX_EVENT_MESSAGE, MAX_EVENT_SUBJECT, shorten};
    let message = if message.len() > MAX_EVENT_MESSAGE {
        shorten(&message, MAX_EVENT_MESSAGE).into_owned()
    } else {
        message
    };
    Event::now(kind, &shorten(subject, MAX_EVENT_SUBJECT), message)
}

/// What workers may hold, for a caller that holds the state lock.
pub(crate) fn allocatable_in(config: &AgentConfig, st: &State) -> pb::HostResources {
    st.settings.allocatable(
        &config.total_resources,
        config.function_executor_resources.gpu,
    )
}

impl State {
    /// What the admitted, not-terminated workers hold together.
    pub(crate) fn admitted(&self) -> crate::admission::Claim {
        self.fes
            .values()
            .filter(|f| f.holds_resources())
            .filter_map(|f| f.claim)
            .fold(
                crate::admission::Claim::default(),
                crate::admission::Claim::plus,
            )
    }

    /// Whether worker `fe_id` has an allocation queued or running.
    pub(crate) fn busy(&self, fe_id: &str) -> bool {
        self.allocations
            .values()
            .any(|a| a.fe_id == fe_id && a.phase != AllocPhase::Finished)
    }
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
        {
            let mut st = shared.state.lock();
            for i in 0..5 {
                let mut fe = FeEntry::new(pb::FunctionExecutorDescription::default(), "RUNNING");
                fe.monitor = Some(probe.clone());
                st.fes.insert(format!("fe-{i}"), fe);
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
}
