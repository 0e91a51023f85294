//! What the agent's loops share: the allocations it holds and their
//! timelines, the results waiting for the server, the operator's mode and
//! settings, health, and the published worker registry (written only by
//! the reconciler, read without a lock). Imports nothing above it: no
//! controller, no reconciler, no report, no monitoring.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Instant, SystemTime};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::config::AgentConfig;
pub(crate) use crate::events::TimelineEntry;
use crate::events::{Event, EventLog};
use crate::lifecycle::FeMap;
use crate::log_ids::About;
use crate::metrics::Metrics;
use crate::pb;
use crate::watches::WatchRegistry;

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
    pub allocations: HashMap<String, AllocEntry>,
    /// Allocations the server has dropped from the desired state, newest
    /// last, kept (bounded) so operators can still read their timelines.
    pub recent_allocations: VecDeque<(String, AllocEntry)>,
    /// Results not yet taken by the server, oldest first.
    pub results: VecDeque<PendingResult>,
    pub server_clock: u64,
    /// The last reported state's hash, reused while the state is unchanged.
    pub hash_cache: crate::wire::HashCache,
    /// Function call results the running allocations wait for.
    pub watches: WatchRegistry,
}

/// A value and when it was set.
pub(crate) type Stamped<T> = Option<(T, SystemTime)>;

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
    /// What the operator has put the host in (the operator's commands
    /// write it; the reconciler and the report read it).
    pub mode: watch::Sender<crate::mode::HostMode>,
    /// Labels, reservations and eviction thresholds, changeable at runtime.
    pub settings: watch::Sender<crate::settings::Settings>,
    /// Set by the final report: the server hears STOPPED from then on.
    pub stopped: AtomicBool,
    /// (major, minor) of the workers' Python, reported as labels.
    pub python_version: watch::Sender<Option<(String, String)>>,
    /// The last desired state applied (the reconciler writes it).
    pub last_desired: watch::Sender<Stamped<Arc<crate::desired::Desired>>>,
    /// The last report the server took, encoded (the report loop writes it).
    pub last_report: watch::Sender<Stamped<bytes::Bytes>>,
    /// The worker registry, published whole by the reconciler after each
    /// change; readers take the current version without blocking it.
    pub workers: watch::Sender<Arc<FeMap>>,
    pub health: Mutex<Health>,
    /// Serializes reconcile passes with drain steps: a drain judges the
    /// allocations a pass accepted, never a pass between its plan (which
    /// read the mode) and its execution.
    pub passes: Mutex<()>,
    /// Wakes the report loop for an immediate report.
    pub report_now: Notify,
    /// Wakes the reconcile loop to re-apply the last desired state.
    pub reconcile_now: Notify,
    /// Startup latch: set once registered and the first desired state is applied.
    pub started: AtomicBool,
    pub started_at: Instant,
    /// Count of successful reports; the stream loop waits on it.
    pub reports_ok: tokio::sync::watch::Sender<u64>,
    /// Adoption records of live workers, where workers are adopted.
    pub adoption: Option<crate::adoption::Store>,
    /// What adoption brought back at start, for the reconcile loop's
    /// first pass (see [`Adopted`]).
    pub adopted: Mutex<Adopted>,
    /// Set when Steward lets go of its workers alive (a stop in adoption
    /// mode): nothing of theirs is aborted or removed from then on.
    pub detaching: AtomicBool,
    /// Workers let go of alive so far.
    pub detached_workers: std::sync::atomic::AtomicUsize,
    /// The ids of those workers: the uploads of their allocations stay open.
    pub let_go_of: Mutex<std::collections::HashSet<String>>,
}

/// What adoption brought back at start.
#[derive(Default)]
pub(crate) struct Adopted {
    /// Allocations held on adopted workers (allocation id, worker id): the
    /// reconciler knows them from its first pass.
    pub allocations: Vec<(String, String)>,
    /// Results an earlier run had, perhaps already taken by the server:
    /// sent only if the first desired state still holds their allocations.
    pub results: Vec<pb::AllocationResult>,
}

impl Shared {
    /// What workers may hold now (the reserved part can change at runtime).
    pub fn allocatable(&self) -> pb::HostResources {
        crate::admission::allocatable_in(&self.config, &self.settings.borrow())
    }

    /// Whether worker `fe_id` was let go of alive (see `Shared::let_go_of`).
    pub fn let_go(&self, fe_id: &str) -> bool {
        self.let_go_of.lock().contains(fe_id)
    }

    /// The current worker registry (a cheap copy of its pointer).
    pub fn workers(&self) -> Arc<FeMap> {
        self.workers.borrow().clone()
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
        let adoption = config.adopt_workers;
        let adoption_dir = config.data_dir.join("adoption");
        Arc::new(Shared {
            config,
            server,
            code_cache,
            metrics,
            events: EventLog::new(1000),
            state: Mutex::new(State {
                allocations: HashMap::new(),
                recent_allocations: VecDeque::new(),
                results: VecDeque::new(),
                server_clock: 0,
                hash_cache: Default::default(),
                watches: WatchRegistry::default(),
            }),
            mode: watch::Sender::new(crate::mode::HostMode::Active),
            settings: watch::Sender::new(settings),
            stopped: AtomicBool::new(false),
            python_version: watch::Sender::new(None),
            last_desired: watch::Sender::new(None),
            last_report: watch::Sender::new(None),
            workers: watch::Sender::new(Arc::new(FeMap::new())),
            health: Mutex::new(Health::default()),
            passes: Mutex::new(()),
            report_now: Notify::new(),
            reconcile_now: Notify::new(),
            started: AtomicBool::new(false),
            started_at: Instant::now(),
            reports_ok: tokio::sync::watch::Sender::new(0),
            adoption: adoption.then(|| crate::adoption::Store::new(adoption_dir)),
            adopted: Mutex::new(Adopted::default()),
            detaching: AtomicBool::new(false),
            detached_workers: std::sync::atomic::AtomicUsize::new(0),
            let_go_of: Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// Records an event and logs it; subject and message are shortened
    /// (they often carry what a worker or the server chose).
    pub fn event(&self, kind: &'static str, subject: &str, message: impl Into<String>) {
        let e = short_event(kind, subject, message.into());
        tracing::info!(kind, subject = %e.subject, "{}", e.message);
        self.events.push(e);
    }

    /// As [`Shared::event`], for an event about a worker or an allocation
    /// logged outside its span: the line carries the ids as fields
    /// ([`About`]); the subject is the most specific one.
    pub fn event_about(&self, kind: &'static str, about: About<'_>, message: impl Into<String>) {
        let e = short_event(kind, about.subject(), message.into());
        about.log(kind, &e.subject, &e.message);
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
        if let Some(store) = &self.adoption {
            // Kept until the server takes it, through a restart.
            store.result(&result);
        }
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
    pub(crate) fn queue_result(&self, result: pb::AllocationResult, ticket: u64) {
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

impl Shared {
    /// The executor status the server hears: STOPPED after the final
    /// report, DRAINED unless the host is active.
    pub fn status(&self) -> pb::ExecutorStatus {
        if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return pb::ExecutorStatus::Stopped;
        }
        self.mode.borrow().executor_status()
    }
}

impl State {
    /// Whether worker `fe_id` has an allocation queued or running.
    pub(crate) fn busy(&self, fe_id: &str) -> bool {
        self.allocations
            .values()
            .any(|a| a.fe_id == fe_id && a.phase != AllocPhase::Finished)
    }

    /// Whether any allocation is queued or running.
    pub(crate) fn any_busy(&self) -> bool {
        self.allocations
            .values()
            .any(|a| a.phase != AllocPhase::Finished)
    }

    /// Moves allocation `id` to `phase` with a timeline entry.
    pub(crate) fn note_allocation(&mut self, id: &str, phase: Option<AllocPhase>, what: String) {
        if let Some(a) = self.allocations.get_mut(id) {
            if let Some(phase) = phase {
                a.phase = phase;
            }
            a.timeline.push(TimelineEntry::now(what));
        }
    }
}

/// The name shown for a function: `namespace/application/function`.
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
