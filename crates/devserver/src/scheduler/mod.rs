//! The dev control plane's state: registered executors (with the function
//! calls they watch), deployed applications, function executors placed on
//! executors, and requests with their function calls and runs
//! ([`crate::graph`]). Every change recomputes the desired state of the
//! affected executors and publishes it with a new clock.
//!
//! Entry points: `invoke_many`, `call_function` (gRPC), `report` (gRPC, in
//! `report.rs`), the HTTP operations below, and `expire_executors`.
//! Placement and desired states are in `placement.rs`.
//! Must not know about: the agent's internals, worker processes, HTTP routes.

#[cfg(test)]
mod fidelity_tests;
mod placement;
mod report;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use steward_blob_store::{BlobStore, BlobStoreConfig};
use steward_proto::executor_api_pb as pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::DevServerError;
use crate::convert::{self, ApiError, Watch};
use crate::graph::{
    AllocationTemplate, Changes, PlanError, RequestGraph, RunOutcome, RunState, Verdict,
};

/// An executor that has not reported for this long is forgotten.
const EXECUTOR_TTL: Duration = Duration::from_secs(30);

/// Most runs (and waiting calls) one `/runs` listing shows.
const RUNS_LISTING_LIMIT: usize = 1000;

/// Per-application settings for the function executors it gets. The
/// defaults are what Indexify server v0.3.15 gives a function that asks for
/// nothing: 1 CPU, 1 GiB of memory, 2 GiB of disk, no GPU, concurrency 1 and
/// 300 s initialization and allocation timeouts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionOptions {
    pub cpu_ms_per_sec: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub gpus: u32,
    pub max_concurrency: u32,
    pub initialization_timeout_ms: u32,
    pub allocation_timeout_ms: u32,
}

impl Default for FunctionOptions {
    fn default() -> Self {
        FunctionOptions {
            cpu_ms_per_sec: 1000,
            memory_bytes: 1 << 30,
            disk_bytes: 2 << 30,
            gpus: 0,
            max_concurrency: 1,
            initialization_timeout_ms: 300_000,
            allocation_timeout_ms: 300_000,
        }
    }
}

/// How a request ended, as returned to HTTP callers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RequestOutcome {
    pub request_id: String,
    pub namespace: String,
    pub application: String,
    pub function: String,
    /// "pending", "success" or "failure".
    pub status: String,
    /// Why the request failed: the failing run's reason (any run of the
    /// request), or `EXECUTOR_REMOVED`, `ALLOCATION_CANCELLED`, ...
    pub failure_reason: Option<String>,
    /// The root function's return value (JSON when it returned JSON); with
    /// tail calls, the value their chain ended with.
    pub output: Option<serde_json::Value>,
    pub output_content_type: Option<String>,
    /// The message of a RequestError, when a function raised one.
    pub request_error: Option<String>,
    /// The root run's duration on success; the failing run's on failure.
    pub execution_duration_ms: Option<u64>,
    /// Where the root run was placed.
    pub executor_id: Option<String>,
    pub function_executor_id: Option<String>,
}

/// What `call_function` does (fault injection for tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallFunctionFault {
    /// Behave like the real server.
    #[default]
    Ok,
    /// Answer every call FAILED_PRECONDITION.
    Refuse,
    /// Answer OK and create nothing (the real server's silent drop).
    Drop,
}

/// How many allocations a worker may hold in the desired state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementMode {
    /// Like the real server: `max_concurrency` × 1 (its queue size).
    #[default]
    Capacity,
    /// Every runnable run at once, so allocations queue at the agent (as
    /// with a server that keeps a deeper queue per worker): for tests of
    /// the agent's own queue.
    Unlimited,
}

/// Injected faults, as `GET/POST /v1/faults` show them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faults {
    pub call_function: CallFunctionFault,
    pub placement: PlacementMode,
    /// Keep placing allocations on workers of an executor that reports
    /// DRAINED (a server racing the agent's pause): for tests of the
    /// agent's own refusal.
    #[serde(default)]
    pub place_on_drained: bool,
}

/// A change to the injected faults; absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsUpdate {
    pub call_function: Option<CallFunctionFault>,
    pub placement: Option<PlacementMode>,
    pub place_on_drained: Option<bool>,
}

struct Executor {
    state: pb::ExecutorState,
    last_seen: Instant,
    desired: watch::Sender<pb::DesiredExecutorState>,
    /// Cancelled to cut the executor's open desired-state stream.
    stream_cut: CancellationToken,
    /// The function calls it waits for, as last reported.
    watches: BTreeSet<Watch>,
    /// Desired states published to it (each a full state with a new clock).
    published: u64,
    /// Messages its desired-state streams wrote (the watch channel keeps
    /// only the latest state, so a slow reader skips some publishes).
    sent: Arc<AtomicU64>,
}

/// What `get_desired_executor_states` streams from.
pub(crate) struct Subscription {
    pub desired: watch::Receiver<pb::DesiredExecutorState>,
    /// Cancelled to end the stream.
    pub cut: CancellationToken,
    pub sent: SentCounter,
}

/// Counts desired-state messages written to an executor's stream.
#[derive(Clone)]
pub(crate) struct SentCounter {
    executor: Arc<AtomicU64>,
    all: Arc<AtomicU64>,
}

impl SentCounter {
    /// Records one message written.
    pub fn count(&self) {
        self.executor.fetch_add(1, Ordering::Relaxed);
        self.all.fetch_add(1, Ordering::Relaxed);
    }
}

struct App {
    version: String,
    code: pb::DataPayload,
    functions: Vec<String>,
    options: FunctionOptions,
}

/// (namespace, application, function, application version).
type FeKey = (String, String, String, String);

struct Fe {
    executor_id: String,
    description: pb::FunctionExecutorDescription,
    key: FeKey,
    placed_at: Instant,
    /// Placement to the first report saying RUNNING.
    running_after: Option<Duration>,
    /// (request id, function call id) of the runs placed on it; those that
    /// left the desired state are dropped when its load is counted.
    placed: Vec<(String, String)>,
}

struct Request {
    outcome: RequestOutcome,
    /// The application version the request runs (picks function executors).
    version: String,
    graph: RequestGraph,
    /// Cancelled or undeployed: no new runs; it ends when none is in flight.
    withdrawn: bool,
    /// Set once the request is over; `outcome` is filled in after its
    /// payloads are decoded.
    verdict: Option<Verdict>,
    done: watch::Sender<bool>,
}

#[derive(Default)]
struct Inner {
    clock: u64,
    executors: BTreeMap<String, Executor>,
    apps: HashMap<(String, String), App>,
    fes: BTreeMap<String, Fe>,
    requests: HashMap<String, Request>,
    /// allocation id -> (request id, function call id), for every allocation
    /// whose result is still accepted.
    allocations: HashMap<String, (String, String)>,
    /// Runnable runs waiting for a slot on their function executor (or for
    /// one to be created), oldest first.
    pending: placement::Pending,
    faults: Faults,
    /// Every allocation result and worker termination the executors
    /// reported, for tests (bounded).
    log_results: Vec<serde_json::Value>,
    log_terminations: Vec<serde_json::Value>,
    /// Placement-to-RUNNING times of workers, in milliseconds.
    cold_starts_ms: Vec<f64>,
    /// Cumulative counts since start, over every executor that ever
    /// registered: desired states published, allocations put into a desired
    /// state, and desired-state messages written to streams.
    desired_states_published: u64,
    allocations_created: u64,
    desired_states_sent: Arc<AtomicU64>,
}

/// What one operation changed beyond the request it touched.
#[derive(Default)]
struct Effects {
    /// Executors whose desired state must be sent again.
    publish: BTreeSet<String>,
    /// (request id, function call id) of runs that finished or got output.
    changed_runs: Vec<(String, String)>,
    /// Requests that ended and await their outcome.
    ended: Vec<String>,
}

/// A request that ended, with the payloads its outcome is decoded from.
struct Ending {
    request_id: String,
    verdict: Verdict,
    output: Option<pb::DataPayload>,
    request_error: Option<pb::DataPayload>,
    execution_duration_ms: Option<u64>,
}

const LOG_LIMIT: usize = 10_000;

fn push_log(log: &mut Vec<serde_json::Value>, v: serde_json::Value) {
    if log.len() == LOG_LIMIT {
        log.remove(0);
    }
    log.push(v);
}

pub(crate) struct Scheduler {
    pub blob_dir: PathBuf,
    /// `s3://bucket/prefix` when blobs live in S3.
    s3_base: Option<String>,
    pub blobs: BlobStore,
    inner: Mutex<Inner>,
}

fn id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..16)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// `FUNCTION_ERROR` for `ALLOCATION_FAILURE_REASON_FUNCTION_ERROR`.
fn reason_name(r: pb::AllocationFailureReason) -> String {
    r.as_str_name()
        .trim_start_matches("ALLOCATION_FAILURE_REASON_")
        .to_string()
}

impl Inner {
    /// Records what a graph transition of request `rid` changed.
    fn absorb(&mut self, rid: &str, changes: Changes, fx: &mut Effects) {
        for a in &changes.finished_allocations {
            self.allocations.remove(a);
        }
        fx.publish.extend(changes.executors);
        fx.changed_runs
            .extend(changes.runs.into_iter().map(|r| (rid.to_string(), r)));
    }

    /// After request `rid` changed: creates the runs whose arguments are
    /// ready (unless it was withdrawn), then ends it if it is over.
    fn advance(&mut self, rid: &str, fx: &mut Effects) {
        let Some(req) = self.requests.get_mut(rid) else {
            return;
        };
        if req.verdict.is_some() {
            return;
        }
        if !req.withdrawn {
            for run_id in req.graph.create_ready_runs(&mut id) {
                let Some(run) = req.graph.run(&run_id) else {
                    continue;
                };
                self.allocations
                    .insert(run.allocation_id.clone(), (rid.to_string(), run_id.clone()));
                let key = (
                    req.outcome.namespace.clone(),
                    req.outcome.application.clone(),
                    run.function.clone(),
                    req.version.clone(),
                );
                self.pending.push(key, rid, &run_id);
            }
        }
        if let Some(v) = req.graph.verdict(req.withdrawn) {
            self.end(rid, v, fx);
        }
    }

    /// Ends request `rid`; a failure cancels its unfinished runs.
    fn end(&mut self, rid: &str, verdict: Verdict, fx: &mut Effects) {
        let Some(req) = self.requests.get_mut(rid) else {
            return;
        };
        if req.verdict.is_some() {
            return;
        }
        let failed = matches!(verdict, Verdict::Failure { .. });
        req.verdict = Some(verdict);
        if failed {
            let changes = req.graph.cancel_unfinished();
            self.absorb(rid, changes, fx);
        }
        fx.ended.push(rid.to_string());
    }

    /// Fails request `rid` for a reason no run reported.
    fn fail_request(&mut self, rid: &str, reason: pb::AllocationFailureReason, fx: &mut Effects) {
        self.end(rid, Verdict::Failure { reason, run: None }, fx);
    }

    /// Fails the requests that had allocations on an executor that left.
    fn fail_orphans(&mut self, executor_id: &str, fx: &mut Effects) {
        let orphans: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, r)| r.verdict.is_none())
            .filter(|(_, r)| {
                r.graph
                    .runs()
                    .any(|(_, run)| run.state.executor_id() == Some(executor_id))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for rid in orphans {
            self.fail_request(&rid, pb::AllocationFailureReason::ExecutorRemoved, fx);
        }
    }

    /// Takes request `rid`'s allocations out of the desired state; false when
    /// none was in flight.
    fn withdraw(&mut self, rid: &str, fx: &mut Effects) -> bool {
        let Some(req) = self.requests.get_mut(rid) else {
            return false;
        };
        if req.verdict.is_some() {
            return false;
        }
        let Some(changes) = req.graph.withdraw() else {
            return false;
        };
        req.withdrawn = true;
        self.absorb(rid, changes, fx);
        self.advance(rid, fx);
        true
    }

    /// Places waiting runs, republishes what changed, and hands back the
    /// requests that ended.
    fn settle(&mut self, mut fx: Effects) -> Vec<Ending> {
        // The real server applies a change (a result removes its
        // allocation) and then places waiting runs as a change of its own:
        // two full desired states, about 1.9 per allocation as measured
        // (the watch channel merges some).
        self.notify_watchers(&mut fx);
        for e in std::mem::take(&mut fx.publish) {
            self.publish(&e);
        }
        self.place(&mut fx);
        for e in std::mem::take(&mut fx.publish) {
            self.publish(&e);
        }
        fx.ended.iter().filter_map(|rid| self.ending(rid)).collect()
    }

    fn ending(&self, rid: &str) -> Option<Ending> {
        let req = self.requests.get(rid)?;
        let verdict = req.verdict.clone()?;
        let run_id = match &verdict {
            Verdict::Success => Some(req.graph.root_id()),
            Verdict::Failure { run, .. } => run.as_deref(),
        };
        let run = run_id.and_then(|r| req.graph.run(r));
        Some(Ending {
            request_id: rid.to_string(),
            output: match verdict {
                Verdict::Success => req.graph.root_output().cloned(),
                Verdict::Failure { .. } => None,
            },
            request_error: run.and_then(|r| r.request_error.clone()),
            execution_duration_ms: run.and_then(|r| r.execution_duration_ms),
            verdict,
        })
    }
}

impl Scheduler {
    pub fn new(
        blob_dir: PathBuf,
        s3_base: Option<String>,
        s3: steward_blob_store::S3Config,
    ) -> Self {
        let blobs = BlobStore::new(BlobStoreConfig {
            local_roots: vec![blob_dir.clone()],
            s3,
            ..Default::default()
        });
        let s3_base = s3_base.map(|b| b.trim_end_matches('/').to_string());
        Scheduler {
            blob_dir,
            s3_base,
            blobs,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn uri(&self, rel: &str) -> String {
        match &self.s3_base {
            Some(base) => format!("{base}/{rel}"),
            None => format!("file://{}/{}", self.blob_dir.display(), rel),
        }
    }

    /// Stores an application's code and settings; replaces an older version.
    pub async fn deploy(
        &self,
        namespace: &str,
        application: &str,
        version: &str,
        zip: Vec<u8>,
        options: FunctionOptions,
    ) -> Result<serde_json::Value, DevServerError> {
        for (what, v) in [
            ("namespace", namespace),
            ("application", application),
            ("version", version),
        ] {
            if v.is_empty()
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                || v.starts_with('.')
            {
                return Err(DevServerError::BadRequest(format!(
                    "{what} {v:?} must be non-empty [A-Za-z0-9._-]"
                )));
            }
        }
        let functions = crate::app::manifest_functions(&zip)?;
        let sha = sha256_hex(&zip);
        let uri = self.uri(&format!(
            "code/{namespace}/{application}/{version}-{}.zip",
            &sha[..12]
        ));
        let size = zip.len() as u64;
        self.blobs.put(&uri, zip.into()).await?;
        let code = pb::DataPayload {
            uri: Some(uri.clone()),
            encoding: Some(pb::DataPayloadEncoding::BinaryZip as i32),
            encoding_version: Some(0),
            content_type: Some("application/zip".into()),
            metadata_size: Some(0),
            offset: Some(0),
            size: Some(size),
            sha256_hash: Some(sha.clone()),
            source_function_call_id: None,
            id: Some(id()),
        };
        self.inner.lock().apps.insert(
            (namespace.into(), application.into()),
            App {
                version: version.into(),
                code,
                functions: functions.clone(),
                options,
            },
        );
        Ok(serde_json::json!({
            "namespace": namespace, "application": application, "version": version,
            "functions": functions, "code_uri": uri, "sha256": sha,
        }))
    }

    /// Starts a request: stores the input, places it, and returns its id.
    pub async fn invoke(
        self: &Arc<Self>,
        namespace: &str,
        application: &str,
        function: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<String, DevServerError> {
        let ids = self
            .invoke_many(namespace, application, function, body, content_type, 1)
            .await?;
        ids.into_iter()
            .next()
            .ok_or_else(|| DevServerError::App("no request created".into()))
    }

    /// The application's deployed version, if `function` is one of its functions.
    fn check_function(
        &self,
        namespace: &str,
        application: &str,
        function: &str,
    ) -> Result<String, DevServerError> {
        let inner = self.inner.lock();
        let app = inner
            .apps
            .get(&(namespace.to_string(), application.to_string()))
            .ok_or_else(|| {
                DevServerError::NotFound(format!("application {namespace}/{application}"))
            })?;
        if !app.functions.iter().any(|f| f == function) {
            return Err(DevServerError::NotFound(format!(
                "function {function} in {namespace}/{application} (has: {})",
                app.functions.join(", ")
            )));
        }
        Ok(app.version.clone())
    }

    /// Starts `count` requests with the same input (stored once, by its
    /// sha256) and places as many as their worker has room for with one
    /// desired-state update; the rest wait for results to free slots.
    pub async fn invoke_many(
        self: &Arc<Self>,
        namespace: &str,
        application: &str,
        function: &str,
        body: Vec<u8>,
        content_type: &str,
        count: usize,
    ) -> Result<Vec<String>, DevServerError> {
        let version = self.check_function(namespace, application, function)?;
        let sha = sha256_hex(&body);
        let input_uri = self.uri(&format!("inputs/{sha}"));
        let size = body.len() as u64;
        self.blobs.put(&input_uri, body.into()).await?;
        let json = content_type.starts_with("application/json");
        let arg = pb::DataPayload {
            uri: Some(input_uri),
            encoding: Some(if json {
                pb::DataPayloadEncoding::Utf8Json
            } else {
                pb::DataPayloadEncoding::Raw
            } as i32),
            encoding_version: Some(0),
            content_type: Some(content_type.to_string()),
            metadata_size: Some(0),
            offset: Some(0),
            size: Some(size),
            sha256_hash: Some(sha),
            source_function_call_id: None,
            id: None,
        };
        let mut inner = self.inner.lock();
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            let request_id = id();
            let request = self.new_request(
                namespace,
                application,
                function,
                &version,
                &request_id,
                // The real server names a request's input after the request.
                pb::DataPayload {
                    id: Some(request_id.clone()),
                    ..arg.clone()
                },
            );
            inner.allocations.insert(
                request
                    .graph
                    .run(&request_id)
                    .map(|r| r.allocation_id.clone())
                    .unwrap_or_default(),
                (request_id.clone(), request_id.clone()),
            );
            inner.requests.insert(request_id.clone(), request);
            let key = (
                namespace.to_string(),
                application.to_string(),
                function.to_string(),
                version.clone(),
            );
            inner.pending.push(key, &request_id, &request_id);
            ids.push(request_id);
        }
        let endings = inner.settle(Effects::default());
        debug_assert!(
            endings.is_empty(),
            "a new request cannot end while it is placed"
        );
        Ok(ids)
    }

    /// A request whose root run calls `function` with `arg`. Its allocation
    /// has the real server's shape: no application version in `function`,
    /// empty call metadata, and one prefix for request data and errors.
    fn new_request(
        &self,
        namespace: &str,
        application: &str,
        function: &str,
        version: &str,
        request_id: &str,
        arg: pb::DataPayload,
    ) -> Request {
        // The real server's `{blob store}/{ns}/{app}/{request id}` for both,
        // under `requests/`.
        let prefix = self.uri(&format!("requests/{namespace}/{application}/{request_id}"));
        let template = AllocationTemplate {
            namespace: namespace.into(),
            application: application.into(),
            request_id: request_id.into(),
            data_prefix: prefix.clone(),
            error_prefix: prefix,
        };
        let allocation = pb::Allocation {
            function: Some(pb::FunctionRef {
                namespace: Some(namespace.into()),
                application_name: Some(application.into()),
                function_name: Some(function.into()),
                application_version: None,
            }),
            allocation_id: Some(id()),
            function_call_id: Some(request_id.into()),
            request_id: Some(request_id.into()),
            args: vec![arg],
            request_data_payload_uri_prefix: Some(template.data_prefix.clone()),
            request_error_payload_uri_prefix: Some(template.error_prefix.clone()),
            function_executor_id: None,
            function_call_metadata: Some(Vec::new()),
        };
        Request {
            outcome: RequestOutcome {
                request_id: request_id.into(),
                namespace: namespace.into(),
                application: application.into(),
                function: function.into(),
                status: "pending".into(),
                failure_reason: None,
                output: None,
                output_content_type: None,
                request_error: None,
                execution_duration_ms: None,
                executor_id: None,
                function_executor_id: None,
            },
            version: version.into(),
            graph: RequestGraph::new(template, function, allocation),
            withdrawn: false,
            verdict: None,
            done: watch::Sender::new(false),
        }
    }

    /// `call_function`: adds the calls a running function made and runs
    /// those whose arguments are ready. Unknown or finished requests and
    /// unknown source calls are dropped silently, as the real server does.
    pub async fn call_function(&self, r: pb::FunctionCallRequest) -> Result<(), ApiError> {
        if self.inner.lock().faults.call_function == CallFunctionFault::Refuse {
            return Err(ApiError::Refused);
        }
        let call = convert::call_request(r)?;
        let endings = {
            let mut inner = self.inner.lock();
            let mut fx = Effects::default();
            inner.add_calls(&call, &mut fx)?;
            inner.settle(fx)
        };
        self.finish(endings).await;
        Ok(())
    }

    /// Fills in the outcomes of ended requests (decoding their payloads) and
    /// wakes their waiters.
    async fn finish(&self, endings: Vec<Ending>) {
        let mut decoded = Vec::with_capacity(endings.len());
        for e in endings {
            let output = match &e.output {
                Some(p) => Some(self.decode_value(p).await),
                None => None,
            };
            let request_error = match &e.request_error {
                Some(p) => Some(self.decode_text(p).await),
                None => None,
            };
            decoded.push((e, output, request_error));
        }
        let mut inner = self.inner.lock();
        for (e, output, request_error) in decoded {
            let Some(req) = inner.requests.get_mut(&e.request_id) else {
                continue;
            };
            let o = &mut req.outcome;
            match e.verdict {
                Verdict::Success => {
                    o.status = "success".into();
                    o.output_content_type = e.output.as_ref().and_then(|p| p.content_type.clone());
                    o.output = output;
                }
                Verdict::Failure { reason, .. } => {
                    o.status = "failure".into();
                    o.failure_reason = Some(reason_name(reason));
                }
            }
            o.request_error = request_error;
            o.execution_duration_ms = e.execution_duration_ms;
            req.done.send_replace(true);
        }
    }

    /// Decodes a returned value: JSON as JSON, text and other UTF-8 as a
    /// string, anything else as its size.
    async fn decode_value(&self, p: &pb::DataPayload) -> serde_json::Value {
        match self.read_payload(p).await {
            Ok(data) => match p.encoding() {
                pb::DataPayloadEncoding::Utf8Json => serde_json::from_slice(&data)
                    .unwrap_or_else(|e| serde_json::json!({"undecodable_json": e.to_string()})),
                pb::DataPayloadEncoding::Utf8Text => {
                    serde_json::Value::String(String::from_utf8_lossy(&data).into())
                }
                _ => match String::from_utf8(data) {
                    Ok(s) => serde_json::Value::String(s),
                    Err(e) => serde_json::json!({"binary_bytes": e.as_bytes().len()}),
                },
            },
            Err(e) => serde_json::json!({"unreadable_output": e}),
        }
    }

    async fn decode_text(&self, p: &pb::DataPayload) -> String {
        match self.read_payload(p).await {
            Ok(d) => String::from_utf8_lossy(&d).into_owned(),
            Err(e) => format!("unreadable request error: {e}"),
        }
    }

    /// The data part (metadata skipped) of a payload.
    async fn read_payload(&self, p: &pb::DataPayload) -> Result<Vec<u8>, String> {
        let bytes = self
            .blobs
            .get(p.uri.as_deref().unwrap_or(""))
            .await
            .map_err(|e| e.to_string())?;
        let offset = usize::try_from(p.offset.unwrap_or(0)).unwrap_or(usize::MAX);
        let size = match p.size {
            Some(s) => usize::try_from(s).unwrap_or(usize::MAX),
            None => bytes.len().saturating_sub(offset),
        };
        let meta = usize::try_from(p.metadata_size.unwrap_or(0)).unwrap_or(usize::MAX);
        let end = offset.saturating_add(size);
        let data = offset
            .checked_add(meta)
            .filter(|_| meta <= size)
            .and_then(|start| bytes.get(start..end));
        data.map(<[u8]>::to_vec).ok_or_else(|| {
            format!(
                "payload [{offset}, {end}) is outside a {}-byte blob",
                bytes.len()
            )
        })
    }

    /// The desired-state channel of a registered executor (a full state is
    /// published first, as the real server sends one when a stream opens),
    /// the token that cuts its stream, and the counters of messages sent.
    pub fn subscribe(&self, executor_id: &str) -> Option<Subscription> {
        let mut inner = self.inner.lock();
        if !inner.executors.contains_key(executor_id) {
            return None;
        }
        inner.publish(executor_id);
        let all = inner.desired_states_sent.clone();
        inner.executors.get(executor_id).map(|e| Subscription {
            desired: e.desired.subscribe(),
            cut: e.stream_cut.clone(),
            sent: SentCounter {
                executor: e.sent.clone(),
                all,
            },
        })
    }

    pub fn outcome(&self, request_id: &str) -> Option<(RequestOutcome, watch::Receiver<bool>)> {
        let inner = self.inner.lock();
        inner
            .requests
            .get(request_id)
            .map(|r| (r.outcome.clone(), r.done.subscribe()))
    }

    /// Counts for benchmarks: requests by status, workers placed and running,
    /// every worker's placement-to-RUNNING time, `runs_pending` (runnable
    /// runs in no desired state yet: their worker is full, or there is no
    /// executor to put it on), and the desired-state
    /// cadence: `desired_states_published` (full states published, all
    /// executors), `desired_states_sent` (messages the streams wrote; fewer
    /// when a reader skipped superseded states), `allocations_created`, and
    /// per registered executor `desired_states_by_executor`. The cadence
    /// counts are cumulative since start (not reset by `forget_finished`);
    /// messages per allocation is the difference of `desired_states_sent`
    /// over the difference of `allocations_created`.
    pub fn stats(&self) -> serde_json::Value {
        let inner = self.inner.lock();
        let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
        for r in inner.requests.values() {
            *by_status.entry(r.outcome.status.as_str()).or_default() += 1;
        }
        let by_executor: BTreeMap<&str, serde_json::Value> = inner
            .executors
            .iter()
            .map(|(id, e)| {
                let sent = e.sent.load(Ordering::Relaxed);
                let v = serde_json::json!({"published": e.published, "sent": sent});
                (id.as_str(), v)
            })
            .collect();
        serde_json::json!({
            "requests": by_status,
            "function_executors": inner.fes.len(),
            "function_executors_running": inner.fes.values().filter(|f| f.running_after.is_some()).count(),
            "cold_starts_ms": inner.cold_starts_ms,
            "runs_pending": inner.pending.count(&inner.requests),
            "desired_states_published": inner.desired_states_published,
            "desired_states_sent": inner.desired_states_sent.load(Ordering::Relaxed),
            "allocations_created": inner.allocations_created,
            "desired_states_by_executor": by_executor,
        })
    }

    /// Forgets finished requests (keeps memory flat across benchmark rounds).
    pub fn forget_finished(&self) {
        let mut inner = self.inner.lock();
        inner.requests.retain(|_, r| r.outcome.status == "pending");
        let Inner {
            requests,
            allocations,
            ..
        } = &mut *inner;
        allocations.retain(|_, (rid, _)| requests.contains_key(rid));
    }

    /// What executors reported: every allocation result and worker termination.
    pub fn log(&self) -> serde_json::Value {
        let inner = self.inner.lock();
        serde_json::json!({"results": inner.log_results, "terminations": inner.log_terminations})
    }

    /// Takes a request's allocations out of the desired state (the agent
    /// cancels them); their results are still recorded, and the request
    /// fails once none is in flight.
    pub async fn cancel(&self, request_id: &str) -> Result<(), DevServerError> {
        let endings = {
            let mut inner = self.inner.lock();
            if !inner.requests.contains_key(request_id) {
                return Err(DevServerError::NotFound(format!("request {request_id}")));
            }
            let mut fx = Effects::default();
            if !inner.withdraw(request_id, &mut fx) {
                return Err(DevServerError::BadRequest(format!(
                    "request {request_id} is not running"
                )));
            }
            inner.settle(fx)
        };
        self.finish(endings).await;
        Ok(())
    }

    /// Removes an application: its workers and running allocations leave the
    /// desired state.
    pub async fn undeploy(&self, namespace: &str, application: &str) -> Result<(), DevServerError> {
        let endings = {
            let mut inner = self.inner.lock();
            inner
                .apps
                .remove(&(namespace.to_string(), application.to_string()))
                .ok_or_else(|| {
                    DevServerError::NotFound(format!("application {namespace}/{application}"))
                })?;
            let mut fx = Effects::default();
            let requests: Vec<String> = inner
                .requests
                .iter()
                .filter(|(_, r)| {
                    r.outcome.namespace == namespace && r.outcome.application == application
                })
                .map(|(id, _)| id.clone())
                .collect();
            for rid in requests {
                inner.withdraw(&rid, &mut fx);
            }
            let gone: Vec<String> = inner
                .fes
                .iter()
                .filter(|(_, f)| f.key.0 == namespace && f.key.1 == application)
                .map(|(id, _)| id.clone())
                .collect();
            for id in gone {
                if let Some(fe) = inner.fes.remove(&id) {
                    fx.publish.insert(fe.executor_id);
                }
            }
            inner.settle(fx)
        };
        self.finish(endings).await;
        Ok(())
    }

    /// Ends the executor's open desired-state stream (it reconnects).
    pub fn cut_stream(&self, executor_id: &str) -> Result<(), DevServerError> {
        let mut inner = self.inner.lock();
        let e = inner
            .executors
            .get_mut(executor_id)
            .ok_or_else(|| DevServerError::NotFound(format!("executor {executor_id}")))?;
        let old = std::mem::replace(&mut e.stream_cut, CancellationToken::new());
        old.cancel();
        Ok(())
    }

    /// Sends the same desired state again with a new clock.
    pub fn republish(&self, executor_id: &str) -> Result<(), DevServerError> {
        let mut inner = self.inner.lock();
        if !inner.executors.contains_key(executor_id) {
            return Err(DevServerError::NotFound(format!("executor {executor_id}")));
        }
        inner.publish(executor_id);
        Ok(())
    }

    pub fn faults(&self) -> Faults {
        self.inner.lock().faults
    }

    /// Applies a fault-injection change; returns the faults now in force.
    pub fn set_faults(&self, update: FaultsUpdate) -> Faults {
        let mut inner = self.inner.lock();
        if let Some(p) = update.placement {
            tracing::info!(mode = ?p, "placement mode");
            inner.faults.placement = p;
        }
        if let Some(d) = update.place_on_drained {
            tracing::info!(place_on_drained = d, "placement on drained executors");
            inner.faults.place_on_drained = d;
        }
        if let Some(f) = update.call_function {
            tracing::info!(mode = ?f, "call_function fault injection");
            inner.faults.call_function = f;
        }
        inner.faults
    }

    /// A request's function runs and the calls still waiting for their
    /// arguments, in creation order (at most `RUNS_LISTING_LIMIT`).
    pub fn runs(
        &self,
        namespace: &str,
        request_id: &str,
    ) -> Result<serde_json::Value, DevServerError> {
        let inner = self.inner.lock();
        let req = inner
            .requests
            .get(request_id)
            .filter(|r| r.outcome.namespace == namespace)
            .ok_or_else(|| DevServerError::NotFound(format!("request {namespace}/{request_id}")))?;
        let mut runs: Vec<_> = req.graph.runs().collect();
        runs.sort_by_key(|(_, r)| r.seq);
        let listed_runs = runs
            .iter()
            .take(RUNS_LISTING_LIMIT)
            .map(|(id, r)| run_json(id, r));
        let waiting = req.graph.waiting_calls().map(|(id, c)| {
            serde_json::json!({
                "id": id, "function": c.spec.function, "parent": c.parent,
                "status": "waiting_for_args", "outcome": null, "failure_reason": null,
                "has_output": false, "child_function_call": null, "allocation_id": null,
            })
        });
        let listed: Vec<serde_json::Value> = listed_runs
            .chain(waiting)
            .take(RUNS_LISTING_LIMIT)
            .collect();
        let waiting_count = req.graph.waiting_calls().count();
        Ok(serde_json::json!({
            "request_id": request_id,
            "namespace": namespace,
            "application": req.outcome.application,
            "status": req.outcome.status,
            "function_calls": req.graph.call_count(),
            "function_runs": runs.len(),
            "waiting_calls": waiting_count,
            "truncated": runs.len() + waiting_count > listed.len(),
            "runs": listed,
        }))
    }

    pub fn executors(&self) -> serde_json::Value {
        let inner = self.inner.lock();
        serde_json::Value::Array(
            inner
                .executors
                .iter()
                .map(|(id, e)| executor_json(id, e))
                .collect(),
        )
    }
}

fn run_json(id: &str, r: &crate::graph::FunctionRun) -> serde_json::Value {
    let (status, outcome, reason) = match &r.state {
        RunState::Unplaced { .. } => ("unplaced", None, None),
        RunState::Placed { .. } => ("running", None, None),
        RunState::Withdrawn { .. } => ("withdrawn", None, None),
        RunState::Completed(RunOutcome::Success) => ("completed", Some("success"), None),
        RunState::Completed(RunOutcome::Failure(f)) => {
            ("completed", Some("failure"), Some(reason_name(*f)))
        }
        RunState::Completed(RunOutcome::Cancelled) => (
            "completed",
            Some("failure"),
            Some("FUNCTION_RUN_CANCELLED".to_string()),
        ),
    };
    serde_json::json!({
        "id": id, "function": r.function, "parent": r.parent, "status": status,
        "outcome": outcome, "failure_reason": reason, "has_output": r.output.is_some(),
        "child_function_call": r.child_function_call, "allocation_id": r.allocation_id,
    })
}

fn executor_json(id: &str, e: &Executor) -> serde_json::Value {
    let fes: Vec<serde_json::Value> = e
        .state
        .function_executor_states
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.description.as_ref().and_then(|d| d.id.clone()),
                "status": s.status().as_str_name(),
                "termination_reason": s.termination_reason.map(|_| s.termination_reason().as_str_name()),
                "allocation_ids_caused_termination": s.allocation_ids_caused_termination,
            })
        })
        .collect();
    let gpu = e
        .state
        .total_resources
        .as_ref()
        .and_then(|r| r.gpu.as_ref());
    serde_json::json!({
        "executor_id": id,
        "hostname": e.state.hostname,
        "version": e.state.version,
        "status": e.state.status().as_str_name(),
        "state_hash": e.state.state_hash,
        "server_clock": e.state.server_clock,
        "labels": e.state.labels,
        "gpu_count": gpu.and_then(|g| g.count),
        "gpu_model": gpu.map(|g| g.model().as_str_name()),
        "function_call_watches": e.watches.len(),
        "function_executors": fes,
    })
}

impl Inner {
    /// The `call_function` transition (after fault and field checks).
    fn add_calls(&mut self, call: &convert::CallRequest, fx: &mut Effects) -> Result<(), ApiError> {
        if self.faults.call_function == CallFunctionFault::Drop {
            tracing::info!(request = %call.request_id, "call_function dropped by fault injection");
            return Ok(());
        }
        let rid = call.request_id.as_str();
        let Some(req) = self.requests.get_mut(rid).filter(|r| {
            r.verdict.is_none()
                && !r.withdrawn
                && r.outcome.namespace == call.namespace
                && r.outcome.application == call.application
        }) else {
            tracing::debug!(request = %rid, "call_function for an unknown or finished request; dropped");
            return Ok(());
        };
        if !req.graph.has_call(&call.source_function_call_id) {
            tracing::debug!(request = %rid, source = %call.source_function_call_id, "call_function from an unknown function call; dropped");
            return Ok(());
        }
        match req
            .graph
            .add_plan(&call.plan.ops, Some(&call.source_function_call_id))
        {
            Ok(()) => self.advance(rid, fx),
            Err(PlanError::TooManyCalls { request_id, limit }) => {
                return Err(ApiError::TooManyCalls { request_id, limit });
            }
            Err(e @ PlanError::ShortReduce { .. }) => {
                tracing::warn!(request = %rid, error = %e, "failing the request");
                self.fail_request(rid, pb::AllocationFailureReason::FunctionError, fx);
            }
        }
        Ok(())
    }
}

/// Forgets executors that stopped reporting and fails their requests.
pub(crate) async fn expire_executors(
    sched: Arc<Scheduler>,
    cancel: CancellationToken,
) -> Result<(), DevServerError> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let endings = sched.inner.lock().expire(EXECUTOR_TTL);
        sched.finish(endings).await;
    }
}

impl Inner {
    /// Removes executors silent for longer than `ttl` (with their function
    /// executors and watches) and fails the requests that ran there.
    fn expire(&mut self, ttl: Duration) -> Vec<Ending> {
        let expired: Vec<String> = self
            .executors
            .iter()
            .filter(|(_, e)| e.last_seen.elapsed() > ttl)
            .map(|(id, _)| id.clone())
            .collect();
        let mut fx = Effects::default();
        for id in expired {
            tracing::warn!(executor = %id, "executor stopped reporting; forgetting it");
            self.remove_executor(&id, &mut fx);
        }
        self.settle(fx)
    }

    /// Forgets an executor, its function executors and watches, and fails
    /// the requests that had allocations there.
    fn remove_executor(&mut self, executor_id: &str, fx: &mut Effects) {
        self.executors.remove(executor_id);
        self.fes.retain(|_, f| f.executor_id != executor_id);
        self.fail_orphans(executor_id, fx);
    }
}
