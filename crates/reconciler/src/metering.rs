//! The seam through which the agent tells metering what runs where: a
//! worker started or stopped, an allocation started or finished. Metering
//! itself (sampling, pricing, the ledger) lives behind [`Metering`], in the
//! binary over `steward-metering`.
//!
//! The one promise it must keep: each finished allocation gets a commit
//! ticket, and `durable()` reaches every ticket handed out, soon (once the
//! usage record is on disk, or at once if it cannot be recorded); a result
//! leaves the agent only when `durable()` has reached its ticket.

use std::sync::Arc;
use std::time::Duration;

use steward_worker_driver::WorkerMonitor;

use crate::pb;

/// A worker that began to run.
pub struct MeteredWorker {
    pub fe_id: String,
    pub namespace: String,
    pub application: String,
    pub function: String,
    /// One entry per allocated GPU: its model as the protocol names it
    /// (e.g. `GPU_MODEL_NVIDIA_H100_80GB`).
    pub gpu_models: Vec<String>,
    /// The UUIDs of the GPUs it was given (for their utilisation).
    pub gpu_uuids: Vec<String>,
    pub monitor: Arc<dyn WorkerMonitor>,
}

/// An allocation whose result is final.
#[derive(Debug, Clone, Default)]
pub struct MeteredAllocation {
    pub alloc_id: String,
    /// The worker it ran on or was meant for (empty when none).
    pub fe_id: String,
    pub namespace: String,
    pub application: String,
    pub function: String,
    /// "success" or "failure:<reason>".
    pub outcome: String,
    /// Whether it started running on a worker.
    pub ran: bool,
}

/// Metering's side of the seam. Every call must return at once: no
/// blocking I/O on the caller's thread (reading a worker's counters, a
/// `pread` of a cgroup file or of `/proc`, is the most it may do). The
/// agent calls it without holding its state lock.
pub trait Metering: Send + Sync + 'static {
    fn worker_started(&self, worker: MeteredWorker);
    fn worker_stopped(&self, fe_id: &str);
    fn allocation_started(&self, fe_id: &str, alloc_id: &str);
    /// A worker adopted from an earlier run, which never said it stopped:
    /// metered as running since `since` (unix ms, CPU µs, memory bytes:
    /// its recorded start), so its life is metered once, without a gap.
    fn worker_adopted(&self, worker: MeteredWorker, since: Option<(u64, u64, u64)>) {
        let _ = since;
        self.worker_started(worker);
    }
    /// An allocation that ran on an adopted worker before the restart,
    /// metered from its recorded start `at` (as in `worker_adopted`).
    fn allocation_resumed(&self, fe_id: &str, alloc_id: &str, at: Option<(u64, u64, u64)>) {
        let _ = at;
        self.allocation_started(fe_id, alloc_id);
    }
    /// Meters `allocation` and queues its usage record: the commit ticket
    /// its result waits for (0 waits for nothing).
    fn allocation_finished(&self, allocation: MeteredAllocation) -> u64;
    /// The last commit ticket whose record is durable (or given up on).
    fn durable(&self) -> u64;
    /// `wake` is called, on metering's own thread, each time `durable`
    /// advances (the reporter then sends what waited).
    fn on_durable(&self, wake: Box<dyn Fn() + Send + Sync>);
    /// Blocks until every record so far is durable; past `timeout` it
    /// gives up on them, so that a final report carries every result.
    fn flush(&self, timeout: Duration);
}

/// What metering is told about the worker of `desc`.
pub(crate) fn worker_of(
    desc: &pb::FunctionExecutorDescription,
    gpu_uuids: &[String],
    monitor: Arc<dyn WorkerMonitor>,
) -> MeteredWorker {
    let f = desc.function.clone().unwrap_or_default();
    let gpu = desc.resources.as_ref().and_then(|r| r.gpu.as_ref());
    let count = gpu.and_then(|g| g.count).unwrap_or(0);
    let model = gpu
        .and_then(|g| g.model)
        .and_then(|m| pb::GpuModel::try_from(m).ok())
        .unwrap_or(pb::GpuModel::Unknown)
        .as_str_name()
        .to_string();
    MeteredWorker {
        fe_id: desc.id.clone().unwrap_or_default(),
        namespace: f.namespace.unwrap_or_default(),
        application: f.application_name.unwrap_or_default(),
        function: f.function_name.unwrap_or_default(),
        gpu_models: vec![model; count.min(64) as usize],
        gpu_uuids: gpu_uuids.to_vec(),
        monitor,
    }
}
