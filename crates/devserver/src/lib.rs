//! A development control plane: the server side of the Indexify executor
//! API (`executor_api_pb.ExecutorAPI`) with just enough scheduling to run
//! real functions for demos, tests and benchmarks, plus a small HTTP API
//! (deploy, invoke, result, fault injection) and the client calls the CLI uses.
//!
//! Scheduling: one function executor per (application, function, version),
//! placed on the least-loaded registered executor when first needed. A
//! request is a set of function calls and function runs keyed by durable
//! function call id, as in Indexify server v0.3.15: the root run (id = the
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
        tasks.spawn(grpc::serve(grpc_listener, sched.clone(), cancel.clone()));
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
