//! Prometheus metrics of the agent. Label values are bounded sets
//! (outcomes, reasons, results), never ids.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

fn fast_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

fn slow_histogram() -> Histogram {
    // 10 ms .. ~2.8 h
    Histogram::new(exponential_buckets(0.01, 2.5, 16))
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    pub state_reports: Counter,
    pub state_report_errors: Counter,
    pub state_report_latency: Histogram,
    pub state_report_size: Histogram,
    pub desired_state_streams: Counter,
    pub desired_state_stream_errors: Counter,
    pub desired_states_received: Counter,
    pub desired_state_items: Counter,
    pub desired_state_items_decoded: Counter,
    pub reconciliations: Counter,
    pub reconciliation_latency: Histogram,
    pub reconcile_lock_hold: Histogram,
    pub last_desired_function_executors: Gauge,
    pub last_desired_allocations: Gauge,
    pub rejected_items: Family<Labels, Counter>,
    pub fe_creations: Counter,
    pub application_code_fetches: Family<Labels, Counter>,
    pub fe_startup_latency: Histogram,
    pub fe_terminations: Family<Labels, Counter>,
    pub fe_health_checks: Family<Labels, Counter>,
    pub function_executors: Gauge,
    pub allocations_started: Counter,
    pub allocations_completed: Family<Labels, Counter>,
    pub allocation_run_latency: Histogram,
    pub allocations_running: Gauge,
    /// Allocations finished, and of them failed, so far (not exported: the
    /// host's load history counts them per second).
    pub finished: Counter,
    pub failed: Counter,
    pub pending_results: Gauge,
    pub healthy: Gauge,
    pub function_calls: Family<Labels, Counter>,
    pub function_call_latency: Histogram,
    pub function_call_retries: Counter,
    pub function_call_watches: Gauge,
    pub function_call_results: Family<Labels, Counter>,
    pub request_state_operations: Family<Labels, Counter>,
    /// The agent's share of a worker cycle: a finished allocation's result
    /// until the report carrying it goes on the wire.
    pub cycle_result_to_wire: Histogram,
    /// The agent's share of a worker cycle: the desired state that brought
    /// an allocation (or the slot it waited for) until the worker is asked
    /// to run it.
    pub cycle_desired_to_running: Histogram,
    pub admission_refusals: Family<Labels, Counter>,
    /// One-hot: the operator mode the host is in.
    pub host_mode: Family<Labels, Gauge>,
    pub fe_evictions: Counter,
    pub worker_oom_kills: Counter,
    /// Resources held by admitted workers, by resource.
    pub admitted: Family<Labels, Gauge>,
    /// Sums over live workers, read from their cgroups at each scrape.
    pub workers_memory_bytes: Gauge,
    pub workers_cpu_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub workers_pids: Gauge,
    extra: parking_lot::Mutex<Vec<ExtraWriter>>,
}

/// Writes further OpenMetrics families on every scrape.
type ExtraWriter = Box<dyn Fn(&mut String) + Send + Sync>;

/// The family of [`Metrics::cycle_result_to_wire`] and
/// [`Metrics::cycle_desired_to_running`].
type CycleFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// `steward_build_info`: always 1, its labels say what runs where.
fn register_build_info(registry: &mut Registry, version: &str, revision: &str, executor_id: &str) {
    let info: Family<Vec<(String, String)>, Gauge> = Family::default();
    info.get_or_create(&vec![
        ("version".into(), version.into()),
        ("revision".into(), revision.into()),
        ("executor_id".into(), executor_id.into()),
    ])
    .set(1);
    registry.register(
        "build_info",
        "Build and identity of this agent (always 1)",
        info,
    );
}

/// `steward_agent_cycle_seconds`, registered; its legs are made from it.
fn register_cycle(registry: &mut Registry) -> CycleFamily {
    let cycle: CycleFamily = Family::new_with_constructor(|| {
        // 10 µs .. ~0.25 s in steps of 1.5×, fine enough to tell
        // a p99 under 1 ms from one over it.
        Histogram::new(exponential_buckets(0.00001, 1.5, 26))
    });
    registry.register(
        "agent_cycle_seconds",
        "The agent's own share of each worker cycle, by leg (result_to_wire, desired_to_running)",
        cycle.clone(),
    );
    cycle
}

impl Metrics {
    /// Registers everything under the `steward` prefix; `version` and
    /// `revision` go into `steward_build_info`.
    pub fn new(version: &str, revision: &str, executor_id: &str) -> Metrics {
        let mut registry = Registry::with_prefix("steward");
        register_build_info(&mut registry, version, revision, executor_id);
        let cycle = register_cycle(&mut registry);
        let mut m = Metrics::unregistered(registry, &cycle);
        m.register_host();
        m.register_reports();
        m.register_desired_state();
        m.register_reconcile();
        m.register_workers();
        m.register_allocations();
        m.register_function_calls();
        m
    }

    /// Every metric, none registered yet; the cycle legs come from `cycle`.
    fn unregistered(registry: Registry, cycle: &CycleFamily) -> Metrics {
        // One statement each: `get_or_create` holds the family's lock
        // until the end of its statement.
        let cycle_result_to_wire = cycle
            .get_or_create(&vec![("leg", "result_to_wire")])
            .clone();
        let cycle_desired_to_running = cycle
            .get_or_create(&vec![("leg", "desired_to_running")])
            .clone();
        Metrics {
            registry,
            cycle_result_to_wire,
            cycle_desired_to_running,
            host_mode: Family::default(),
            admission_refusals: Family::default(),
            fe_evictions: Counter::default(),
            worker_oom_kills: Counter::default(),
            admitted: Family::default(),
            workers_memory_bytes: Gauge::default(),
            workers_cpu_seconds: Gauge::<f64, std::sync::atomic::AtomicU64>::default(),
            workers_pids: Gauge::default(),
            state_reports: Counter::default(),
            state_report_errors: Counter::default(),
            state_report_latency: fast_histogram(),
            state_report_size: Histogram::new(exponential_buckets(256.0, 4.0, 10)),
            desired_state_streams: Counter::default(),
            desired_state_stream_errors: Counter::default(),
            desired_states_received: Counter::default(),
            desired_state_items: Counter::default(),
            desired_state_items_decoded: Counter::default(),
            reconciliations: Counter::default(),
            reconciliation_latency: fast_histogram(),
            reconcile_lock_hold: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            last_desired_function_executors: Gauge::default(),
            last_desired_allocations: Gauge::default(),
            rejected_items: Family::default(),
            fe_creations: Counter::default(),
            application_code_fetches: Family::default(),
            fe_startup_latency: slow_histogram(),
            fe_terminations: Family::default(),
            fe_health_checks: Family::default(),
            function_executors: Gauge::default(),
            allocations_started: Counter::default(),
            allocations_completed: Family::default(),
            allocation_run_latency: slow_histogram(),
            allocations_running: Gauge::default(),
            finished: Counter::default(),
            failed: Counter::default(),
            pending_results: Gauge::default(),
            healthy: Gauge::default(),
            function_calls: Family::default(),
            function_call_latency: fast_histogram(),
            function_call_retries: Counter::default(),
            function_call_watches: Gauge::default(),
            function_call_results: Family::default(),
            request_state_operations: Family::default(),
            extra: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// The host: its operator mode, admission, and what its live workers use.
    fn register_host(&mut self) {
        let r = &mut self.registry;
        r.register(
            "host_mode",
            "The operator mode the host is in (1 for the current one): active, paused, draining, disabled",
            self.host_mode.clone(),
        );
        r.register(
            "worker_admission_refusals",
            "Workers refused because they did not fit next to those admitted, by the first resource short",
            self.admission_refusals.clone(),
        );
        r.register(
            "function_executor_evictions",
            "Idle workers stopped under host memory pressure",
            self.fe_evictions.clone(),
        );
        r.register(
            "worker_oom_kills",
            "Workers the kernel OOM-killed at their cgroup memory limit",
            self.worker_oom_kills.clone(),
        );
        r.register(
            "worker_admitted",
            "Resources held by admitted workers (cpu_ms_per_sec, memory_bytes, disk_bytes, gpus)",
            self.admitted.clone(),
        );
        r.register(
            "workers_memory_bytes",
            "Memory in use by all live workers, from their cgroups",
            self.workers_memory_bytes.clone(),
        );
        r.register(
            "workers_cpu_seconds",
            "CPU time used so far by the live workers, from their cgroups",
            self.workers_cpu_seconds.clone(),
        );
        r.register(
            "workers_pids",
            "Processes and threads of all live workers, from their cgroups",
            self.workers_pids.clone(),
        );
    }

    /// State reports to the server.
    fn register_reports(&mut self) {
        let r = &mut self.registry;
        r.register(
            "state_reports",
            "State report RPCs sent",
            self.state_reports.clone(),
        );
        r.register(
            "state_report_errors",
            "State report RPCs that failed",
            self.state_report_errors.clone(),
        );
        r.register(
            "state_report_latency_seconds",
            "State report RPC latency",
            self.state_report_latency.clone(),
        );
        r.register(
            "state_report_size_bytes",
            "Encoded size of state reports",
            self.state_report_size.clone(),
        );
    }

    /// The desired-state stream from the server.
    fn register_desired_state(&mut self) {
        let r = &mut self.registry;
        r.register(
            "desired_state_streams",
            "Desired state streams opened",
            self.desired_state_streams.clone(),
        );
        r.register(
            "desired_state_stream_errors",
            "Desired state streams that failed or went idle",
            self.desired_state_stream_errors.clone(),
        );
        r.register(
            "desired_states_received",
            "Desired state messages received",
            self.desired_states_received.clone(),
        );
        r.register(
            "desired_state_items",
            "Function executors, allocations and function call results received in desired states",
            self.desired_state_items.clone(),
        );
        r.register(
            "desired_state_items_decoded",
            "Desired state items decoded (the rest repeated the previous message and were reused)",
            self.desired_state_items_decoded.clone(),
        );
    }

    /// Applying desired states.
    fn register_reconcile(&mut self) {
        let r = &mut self.registry;
        r.register(
            "reconciliations",
            "Desired states applied",
            self.reconciliations.clone(),
        );
        r.register(
            "reconciliation_latency_seconds",
            "Time to apply one desired state",
            self.reconciliation_latency.clone(),
        );
        r.register(
            "reconcile_lock_hold_seconds",
            "Time a reconcile pass holds the agent's state lock (readers wait this long at most)",
            self.reconcile_lock_hold.clone(),
        );
        r.register(
            "last_desired_state_function_executors",
            "Function executors in the last desired state",
            self.last_desired_function_executors.clone(),
        );
        r.register(
            "last_desired_state_allocations",
            "Allocations in the last desired state",
            self.last_desired_allocations.clone(),
        );
        r.register(
            "desired_state_rejected_items",
            "Function executors and allocations rejected from a desired state, by kind and reason",
            self.rejected_items.clone(),
        );
    }

    /// Function executors (workers).
    fn register_workers(&mut self) {
        let r = &mut self.registry;
        r.register(
            "function_executor_creations",
            "Function executors started",
            self.fe_creations.clone(),
        );
        r.register(
            "application_code_fetches",
            "Application code fetched for new workers, by source (cache or blob_store)",
            self.application_code_fetches.clone(),
        );
        r.register(
            "function_executor_startup_latency_seconds",
            "Spawn to initialized, for function executors that started",
            self.fe_startup_latency.clone(),
        );
        r.register(
            "function_executor_terminations",
            "Function executors terminated, by reason",
            self.fe_terminations.clone(),
        );
        r.register(
            "function_executor_health_checks",
            "Function executor health checks, by result",
            self.fe_health_checks.clone(),
        );
        r.register(
            "function_executors",
            "Function executors known to the agent",
            self.function_executors.clone(),
        );
    }

    /// Allocations and their results; the agent's health.
    fn register_allocations(&mut self) {
        let r = &mut self.registry;
        r.register(
            "allocations_started",
            "Allocations started on a function executor",
            self.allocations_started.clone(),
        );
        r.register(
            "allocations_completed",
            "Allocations finished, by outcome and failure reason",
            self.allocations_completed.clone(),
        );
        r.register(
            "allocation_run_latency_seconds",
            "Allocation run time on the function executor",
            self.allocation_run_latency.clone(),
        );
        r.register(
            "allocations_running",
            "Allocations running now",
            self.allocations_running.clone(),
        );
        r.register(
            "pending_allocation_results",
            "Allocation results not yet taken by the server",
            self.pending_results.clone(),
        );
        r.register(
            "healthy",
            "1 when the agent considers itself healthy",
            self.healthy.clone(),
        );
    }

    /// Nested function calls, their results, and request state.
    fn register_function_calls(&mut self) {
        let r = &mut self.registry;
        r.register(
            "function_calls",
            "Nested function calls forwarded to the server, by result (created or refused)",
            self.function_calls.clone(),
        );
        r.register(
            "function_call_latency_seconds",
            "Worker request to server answer for nested function calls, retries included",
            self.function_call_latency.clone(),
        );
        r.register(
            "function_call_retries",
            "call_function attempts retried after a transient failure",
            self.function_call_retries.clone(),
        );
        r.register(
            "function_call_watches",
            "Function call results this host waits for (reported watches)",
            self.function_call_watches.clone(),
        );
        r.register(
            "function_call_results",
            "Function call results from the server, by routing (delivered, kept, not_final)",
            self.function_call_results.clone(),
        );
        r.register(
            "request_state_operations",
            "Request state operations served, by operation and status",
            self.request_state_operations.clone(),
        );
    }

    pub(crate) fn allocation_completed(&self, outcome: &'static str, reason: &'static str) {
        self.allocations_completed
            .get_or_create(&vec![("outcome", outcome), ("failure_reason", reason)])
            .inc();
        self.finished.inc();
        if outcome != "success" {
            self.failed.inc();
        }
    }

    pub(crate) fn function_call(&self, result: &'static str, took: std::time::Duration) {
        self.function_calls
            .get_or_create(&vec![("result", result)])
            .inc();
        self.function_call_latency.observe(took.as_secs_f64());
    }

    pub(crate) fn request_state_operation(
        &self,
        op: &crate::fe_pb::AllocationRequestStateOperation,
        code: i32,
    ) {
        use crate::fe_pb::allocation_request_state_operation::Operation as Op;
        let op = match op.operation {
            Some(Op::PrepareRead(_)) => "prepare_read",
            Some(Op::PrepareWrite(_)) => "prepare_write",
            Some(Op::CommitWrite(_)) => "commit_write",
            None => "none",
        };
        let status = match code {
            0 => "ok",
            5 => "not_found",
            _ => "error",
        };
        self.request_state_operations
            .get_or_create(&vec![("operation", op), ("status", status)])
            .inc();
    }

    pub(crate) fn admission_refused(&self, resource: &'static str) {
        self.admission_refusals
            .get_or_create(&vec![("resource", resource)])
            .inc();
    }

    pub(crate) fn rejected(&self, kind: &'static str, reason: &'static str) {
        self.rejected_items
            .get_or_create(&vec![("kind", kind), ("reason", reason)])
            .inc();
    }

    /// Adds a writer of further OpenMetrics families (host usage, GPUs...),
    /// called on every scrape before `# EOF`.
    pub fn add_extra(&self, f: Box<dyn Fn(&mut String) + Send + Sync>) {
        self.extra.lock().push(f);
    }

    /// The registry, to register further families before the agent starts.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// OpenMetrics text, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            return "# EOF\n".into();
        }
        let extra = self.extra.lock();
        if !extra.is_empty() {
            if let Some(stripped) = out.strip_suffix("# EOF\n") {
                out = stripped.to_string();
            }
            for f in extra.iter() {
                f(&mut out);
            }
            out.push_str("# EOF\n");
        }
        out
    }
}
