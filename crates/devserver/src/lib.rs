//! A development control plane: the server side of the Indexify executor
//! API (`executor_api_pb.ExecutorAPI`) with just enough scheduling to run
//! real functions for demos, tests and benchmarks, plus a small HTTP API
//! (deploy, invoke, result, fault injection) and the client calls the CLI uses.
//!
//! Scheduling: one function executor per (application, function, version),
//! placed on the least-loaded registered executor when first needed, and
//! filled only up to its capacity (see "Capacity" below). A request is a
//! set of function calls and function runs keyed by durable function call
//! id, as in Indexify server v0.3.15: the root run (id = the
//! request id) comes from the HTTP invocation; running functions add calls
//! with `call_function` (nested calls, futures, `.map`; a `ReduceOp` becomes
//! a left-fold chain) and with tail calls (`AllocationResult.updates`); a
//! call gets a run, i.e. an allocation, once its arguments are ready, and a
//! call id that already has a run is never run again. Outputs travel up
//! tail-call links; executors get a `FunctionCallResult` for every call they
//! watch. A request succeeds when all its runs finished and the root has its
//! output (decoded from the blob store for the caller); any failed run fails
//! it and cancels the rest (no retries).
//! Must not know about: the agent's internals (it only speaks the protocol),
//! worker processes, host resources.
//!
//! # Fidelity to Indexify server v0.3.15
//!
//! Checked against a capture of the real server's desired state
//! (`scheduler/fidelity_tests.rs` holds the captured shapes).
//!
//! Content, as the real server sends it:
//! - Every message is the full desired state: function executors,
//!   allocations, function call results (an empty list when none) and a clock.
//! - `FunctionExecutorDescription`: `pool_id` = `fn:{ns}:{app}:{fn}:{version}`;
//!   `function` with the application version; the code payload with content
//!   type `application/zip`, `BINARY_ZIP` encoding and an id; by default
//!   ([`FunctionOptions`]) 1 CPU (`cpu_ms_per_sec` 1000), 1 GiB of memory,
//!   2 GiB of disk and `gpu` null, `max_concurrency` 1, 300 s initialization
//!   and allocation timeouts; `secret_names` empty, `sandbox_metadata` null,
//!   container type `FUNCTION`.
//! - `Allocation`: `function` without `application_version`;
//!   `function_call_id` the durable call id (the request id for the root);
//!   the root's input named after the request, with no source call id;
//!   arguments that are another call's output carry that call's id as
//!   `source_function_call_id`; `function_call_metadata` the caller's (empty
//!   for the root); one prefix, ending `{ns}/{app}/{request id}`, for both
//!   request data and request errors.
//!
//! Capacity, as the real server's (`queue_size` 1): a function executor
//! holds at most `max_concurrency × 1` allocations in the desired state.
//! Further runnable runs stay pending at the server, in no desired state,
//! one queue per function executor in the order they became runnable
//! (functions do not wait for each other); a slot frees when its allocation
//! leaves the desired state (a result, a cancel or undeploy, a failed
//! request), and the oldest pending run takes it in the next published
//! state, after the one that removes the finished allocation. A run that calls its own
//! function waits for a slot like any other: with `max_concurrency` 1 a
//! parent blocked on such a child waits for ever, as the real server's does
//! once it cannot add a container.
//!
//! Cadence, as the real server's: every change that touches an executor
//! publishes its full desired state with a higher clock (one clock for the
//! whole server), through a `tokio::sync::watch` channel, so a stream sends
//! the latest state only and a slow reader skips superseded ones. The
//! changes: an allocation placed (invocation, `call_function`, a call whose
//! arguments became ready, each when its worker has a free slot), a result
//! (its allocation removed; then, as a change of its own, the pending runs
//! that fit placed: two states, as the real server's cadence of about two
//! messages per allocation shows), a watched call's result, a worker terminated, a cancel or
//! undeploy, an executor expired; and a stream opening gets a full state at
//! once. `GET /v1/stats` counts them, cumulative
//! since start: `desired_states_published`, `desired_states_sent` (messages
//! the streams wrote), `allocations_created`, and per executor
//! `desired_states_by_executor`; `runs_pending` counts the runs waiting at
//! the server now. For comparison, the real server sent about 1.9 messages
//! per allocation (419 for 220 allocations, 2 workers, 16
//! requests in flight).
//!
//! Deliberate differences:
//! - No scale-out: one function executor per (namespace, application,
//!   function, version). The real server adds containers for a function
//!   whose containers are full (up to its `max_containers`, on any executor
//!   with room); here pending runs wait for that one worker's slots. So
//!   under load fewer allocations run at once than on the real server, and
//!   a call to the caller's own full function waits (for ever, if the
//!   caller blocks on it) where the real server would start another
//!   container.
//! - `POST .../batch?count=N` (benchmarks) starts N requests and places
//!   those that fit with one publish; the real server has no batch
//!   invocation.
//! - Opening a stream publishes (the clock advances); the real server sends
//!   its current state.
//! - A new watch of a call that already finished republishes once; the real
//!   server re-notifies on every report while it holds such a watch.
//! - Blob layout: request prefixes live under `requests/`, inputs are stored
//!   once per content (`inputs/{sha256}`), code under `code/`; ids are 16
//!   lowercase alphanumerics rather than 21-character nanoids.
//! - Options are per application ([`FunctionOptions`]); per-function
//!   resources declared in the code are not read.
//! - An unknown child function fails the request (`CONSTRAINT_UNSATISFIABLE`)
//!   instead of pending forever; an executor that goes away fails its
//!   requests (`EXECUTOR_REMOVED`) instead of re-running their runs
//!   elsewhere; failed runs are not retried.

pub mod app;
pub mod client;
mod convert;
mod graph;
mod grpc;
mod http;
mod scheduler;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use scheduler::{CallFunctionFault, Faults, FaultsUpdate, FunctionOptions, RequestOutcome};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum DevServerError {
    #[error("{0}")]
    App(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("blob store: {0}")]
    Blob(#[from] steward_blob_store::BlobError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(String),
    #[error("request to {url} failed: {message}")]
    Client { url: String, message: String },
}

/// Where the dev control plane listens and keeps its blobs.
#[derive(Debug, Clone)]
pub struct DevServerConfig {
    pub grpc_addr: String,
    pub http_addr: String,
    /// Root of the `file://` blob store (code, inputs, outputs).
    pub blob_dir: PathBuf,
    /// Keep blobs under this `s3://bucket/prefix` instead of `blob_dir`.
    pub s3_base: Option<String>,
    pub s3: steward_blob_store::S3Config,
    /// Serve the executor API over TLS (and require client certificates
    /// signed by `client_ca_pem`, for mutual TLS).
    pub tls: Option<ServerTls>,
}

/// The gRPC server's certificate and key (PEM), and the CA its clients'
/// certificates must chain to (mutual TLS), if any.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

/// A running dev control plane.
pub struct DevServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    cancel: CancellationToken,
    tasks: tokio::task::JoinSet<Result<(), DevServerError>>,
}

impl DevServer {
    /// Binds both listeners and starts serving.
    pub async fn start(config: DevServerConfig) -> Result<DevServer, DevServerError> {
        std::fs::create_dir_all(&config.blob_dir).map_err(|e| {
            DevServerError::App(format!("creating {}: {e}", config.blob_dir.display()))
        })?;
        let blob_dir = std::fs::canonicalize(&config.blob_dir).map_err(|e| {
            DevServerError::App(format!("resolving {}: {e}", config.blob_dir.display()))
        })?;
        let sched = Arc::new(scheduler::Scheduler::new(
            blob_dir,
            config.s3_base.clone(),
            config.s3.clone(),
        ));
        let bind = |addr: String| async move {
            TcpListener::bind(&addr)
                .await
                .map_err(|source| DevServerError::Bind { addr, source })
        };
        let grpc_listener = bind(config.grpc_addr.clone()).await?;
        let http_listener = bind(config.http_addr.clone()).await?;
        let grpc_addr = grpc_listener
            .local_addr()
            .map_err(|e| DevServerError::Serve(e.to_string()))?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|e| DevServerError::Serve(e.to_string()))?;
        let cancel = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(grpc::serve(
            grpc_listener,
            sched.clone(),
            config.tls.clone(),
            cancel.clone(),
        ));
        tasks.spawn(http::serve(http_listener, sched.clone(), cancel.clone()));
        tasks.spawn(scheduler::expire_executors(sched, cancel.clone()));
        tracing::info!(%grpc_addr, %http_addr, "dev control plane listening");
        Ok(DevServer {
            grpc_addr,
            http_addr,
            cancel,
            tasks,
        })
    }

    /// Serves until `shutdown` resolves or a listener fails.
    pub async fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), DevServerError> {
        tokio::pin!(shutdown);
        let result = tokio::select! {
            _ = &mut shutdown => Ok(()),
            Some(r) = self.tasks.join_next() => match r {
                Ok(r) => r,
                Err(e) => Err(DevServerError::Serve(e.to_string())),
            },
        };
        self.stop().await;
        result
    }

    /// Stops serving; open desired-state streams end, and anything still
    /// running after two seconds is aborted.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let drained = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }

    /// Base URL of the HTTP API.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }
}
