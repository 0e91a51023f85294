//! The host agent's core: the client side of the Indexify executor protocol.
//!
//! It reports this host's state to the server (every 5 s and on every
//! change), applies each desired state it streams back (function executors
//! first, then allocations), runs one controller per function executor
//! (spawn, initialize, health-check, run allocations, terminate), and keeps
//! every allocation result until a report carrying it has succeeded. It
//! also admits workers against the allocatable resources, evicts idle ones
//! under memory pressure, and keeps the operator's mode and runtime
//! settings.
//!
//! Entry points: [`Agent::start`], [`AgentConfig`], [`AgentHandle`].
//! Must not know about: HTTP serving, how host capacity and memory are
//! measured (it is given [`pb::HostResources`], a [`GpuPool`] and a
//! [`MemorySource`]), how workers are started and confined (a
//! `steward-worker-driver` `WorkerDriver`), how blobs are stored beyond the
//! `steward-blob-store` API.

mod admission;
mod adoption;
mod config;
mod desired;
mod events;
mod eviction;
mod fe;
mod handle;
mod lifecycle;
mod log_ids;
mod metering;
mod metrics;
mod mode;
mod operator;
mod pressure;
mod reconcile;
mod report;
mod server;
mod settings;
mod state;
mod stream;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(any(test, feature = "testing"))]
mod testing_support;
mod validate;
mod watches;
mod wire;

use std::sync::Arc;
use std::time::Duration;

pub use admission::{Claim, WorkerDefaults};
pub use config::{
    AgentConfig, AllocationLimits, DEFAULT_MAX_APPLICATION_CODE_BYTES,
    DEFAULT_MAX_INPUT_BLOB_BYTES, GpuPool, GpuRefusal, KillPoint, NoGpus, ServerTls,
};
pub use desired::Desired;
pub use events::{Event, EventLog, MAX_EVENT_MESSAGE, MAX_EVENT_SUBJECT, shorten};
pub use handle::{AgentHandle, Snapshot};
pub use metering::{MeteredAllocation, MeteredWorker, Metering};
pub use metrics::Metrics;
pub use mode::{HostMode, ModeCommand};
pub use pressure::{Eviction, MemorySample, MemorySource};
pub use server::{AddressError, server_url};
pub use settings::{
    NotAnAllowedFunction, Settings, SettingsError, SettingsPatch, parse_allowed_function,
};
pub use steward_proto::executor_api_pb as pb;
pub use steward_proto::function_executor_service as fe_pb;
pub use validate::{validate_allocation, validate_function_executor};
pub use wire::state_hash;

use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid server address {addr:?}: {reason}")]
    ServerAddr { addr: String, reason: String },
    #[error("preparing {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Kills and removes what an earlier run left that was not adopted, each
/// said in an event.
fn sweep_leftovers(shared: &state::Shared) {
    for l in shared.config.driver.reap_leftovers() {
        match &l.skipped {
            None => shared.event(
                "leftover_cleaned",
                &l.worker,
                format!(
                    "a previous run left worker {} behind ({}); killed {} leftover process(es)",
                    l.worker, l.kind, l.processes_killed
                ),
            ),
            Some(why) => shared.event(
                "leftover_skipped",
                &l.worker,
                format!("{} {}: not cleaned up, {why}", l.kind, l.worker),
            ),
        }
    }
}

/// The running agent.
pub struct Agent {
    handle: AgentHandle,
    tasks: tokio::task::JoinSet<()>,
    cancel: CancellationToken,
}

impl Agent {
    /// Starts the report, stream and reconcile loops.
    pub fn start(config: AgentConfig, metrics: Arc<Metrics>) -> Result<Agent, AgentError> {
        for dir in [config.data_dir.join("logs"), config.data_dir.join("code")] {
            std::fs::create_dir_all(&dir).map_err(|source| AgentError::DataDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let channel = server::channel(&config.server_addr, config.server_tls.as_ref())?;
        let code_dir = config.data_dir.join("code");
        let code_cache =
            steward_blob_store::CodeCache::open(&code_dir, config.code_cache_max_bytes).map_err(
                |source| AgentError::DataDir {
                    path: code_dir.display().to_string(),
                    source,
                },
            )?;
        let shared = state::Shared::new(config, metrics, code_cache, channel.clone());
        if let Some(m) = &shared.config.metering {
            // Results held for their usage records go as soon as they are durable.
            let me = Arc::downgrade(&shared);
            m.on_durable(Box::new(move || {
                if let Some(shared) = me.upgrade() {
                    shared.report_now.notify_one();
                }
            }));
        }
        // Before the sweep, which spares what is adopted.
        let adopted = reconcile::adopted::adopt_left_workers(&shared);
        if adopted > 0 {
            tracing::info!(adopted, "adopted workers left running by an earlier run");
        }
        sweep_leftovers(&shared);
        let cancel = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(fe::probe_python(shared.clone()));
        operator::observe(&shared, mode::HostMode::Active);
        tasks.spawn(operator::run_loop(shared.clone(), cancel.clone()));
        if let Some(source) = shared.config.eviction.source.clone() {
            tasks.spawn(eviction::run_loop(shared.clone(), source, cancel.clone()));
        }
        let (desired_tx, desired_rx) = tokio::sync::watch::channel(None);
        tasks.spawn(report::run_loop(
            shared.clone(),
            channel.clone(),
            cancel.clone(),
        ));
        tasks.spawn(stream::run_loop(
            shared.clone(),
            channel,
            desired_tx,
            cancel.clone(),
        ));
        tasks.spawn(reconcile::run_loop(
            shared.clone(),
            desired_rx,
            cancel.clone(),
        ));
        Ok(Agent {
            handle: AgentHandle::new(shared),
            tasks,
            cancel,
        })
    }

    pub fn handle(&self) -> AgentHandle {
        self.handle.clone()
    }

    /// Stops taking work, terminates every worker, sends a final STOPPED
    /// report (best effort, bounded by `report_timeout`) and returns. In
    /// adoption mode ([`AgentConfig::adopt_workers`]) workers are left
    /// running instead, with their allocations, for the next agent to
    /// adopt, and the server is not told STOPPED (it is to
    /// keep them: no final report is sent); returns how many were left running.
    pub async fn shutdown(mut self, report_timeout: Duration) -> usize {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
        let shared = self.handle.shared();
        let detach = shared.config.adopt_workers;
        shared
            .detaching
            .store(detach, std::sync::atomic::Ordering::Release);
        let left = fe::shutdown_all(shared).await;
        if let Some(m) = shared.config.metering.clone() {
            // Every result pushed so far reaches the final report.
            let _ = tokio::task::spawn_blocking(move || m.flush(report_timeout)).await;
        }
        shared.config.driver.shutdown();
        if left == 0 {
            report::send_final(shared, report_timeout).await;
        } else {
            // No last report: one without the workers let go of (their
            // controllers are gone) could have the server drop them and
            // their allocations. The server hears nothing, as after a
            // SIGKILL, until the next agent reports them adopted; results
            // not yet sent are on record for it.
            shared.event(
                "stopped",
                &shared.config.executor_id,
                format!("{left} worker(s) left running for the next agent; no final report"),
            );
        }
        left
    }
}
