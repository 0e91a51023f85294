//! The dev control plane's state: registered executors, deployed
//! applications, function executors placed on executors, and requests with
//! their allocations and results. Every change recomputes the desired state
//! of the affected executors and publishes it with a new clock.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use steward_blob_store::{BlobStore, BlobStoreConfig};
use steward_proto::executor_api_pb as pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::DevServerError;

/// An executor that has not reported for this long is forgotten.
const EXECUTOR_TTL: Duration = Duration::from_secs(30);

/// Per-application settings for the function executors it gets.
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
            disk_bytes: 1 << 30,
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
    pub failure_reason: Option<String>,
    /// The function's return value (JSON when it returned JSON).
    pub output: Option<serde_json::Value>,
    pub output_content_type: Option<String>,
    /// The message of a RequestError, when the function raised one.
    pub request_error: Option<String>,
    pub execution_duration_ms: Option<u64>,
    pub executor_id: Option<String>,
    pub function_executor_id: Option<String>,
}

struct Executor {
    state: pb::ExecutorState,
    last_seen: Instant,
    desired: watch::Sender<pb::DesiredExecutorState>,
    /// Cancelled to cut the executor's open desired-state stream.
    stream_cut: CancellationToken,
}

struct App {
    version: String,
    code: pb::DataPayload,
    functions: Vec<String>,
    options: FunctionOptions,
}

struct Fe {
    executor_id: String,
    description: pb::FunctionExecutorDescription,
    key: (String, String, String, String),
    placed_at: Instant,
    /// Placement to the first report saying RUNNING.
    running_after: Option<Duration>,
}

struct Request {
    outcome: RequestOutcome,
    /// Kept after the allocation leaves the desired state (cancelled or
    /// undeployed) so its result is still recorded.
    allocation_id: String,
    /// Set while the allocation is in the desired state.
    allocation: Option<pb::Allocation>,
    done: watch::Sender<bool>,
}

#[derive(Default)]
struct Inner {
    clock: u64,
    executors: BTreeMap<String, Executor>,
    apps: HashMap<(String, String), App>,
    fes: BTreeMap<String, Fe>,
    requests: HashMap<String, Request>,
    /// Requests waiting for an executor, oldest first.
    unplaced: Vec<String>,
    /// Every allocation result and worker termination the executors
    /// reported, for tests (bounded).
    log_results: Vec<serde_json::Value>,
    log_terminations: Vec<serde_json::Value>,
    /// Placement-to-RUNNING times of workers, in milliseconds.
    cold_starts_ms: Vec<f64>,
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
            content_type: None,
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

    /// Starts `count` requests with the same input (stored once, by its
    /// sha256) and places them all with one desired-state update.
    pub async fn invoke_many(
        self: &Arc<Self>,
        namespace: &str,
        application: &str,
        function: &str,
        body: Vec<u8>,
        content_type: &str,
        count: usize,
    ) -> Result<Vec<String>, DevServerError> {
        {
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
        }
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
            id: Some(id()),
        };
        let mut inner = self.inner.lock();
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            let request_id = id();
            let arg = arg.clone();
            let version = inner
                .apps
                .get(&(namespace.to_string(), application.to_string()))
                .map(|a| a.version.clone())
                .unwrap_or_default();
            let allocation = pb::Allocation {
                function: Some(pb::FunctionRef {
                    namespace: Some(namespace.into()),
                    application_name: Some(application.into()),
                    function_name: Some(function.into()),
                    application_version: Some(version),
                }),
                allocation_id: Some(id()),
                function_call_id: Some(request_id.clone()),
                request_id: Some(request_id.clone()),
                args: vec![arg],
                request_data_payload_uri_prefix: Some(
                    self.uri(&format!("requests/{request_id}/data")),
                ),
                request_error_payload_uri_prefix: Some(
                    self.uri(&format!("requests/{request_id}/error")),
                ),
                function_executor_id: None,
                function_call_metadata: Some(Vec::new()),
            };
            inner.requests.insert(
                request_id.clone(),
                Request {
                    allocation_id: allocation.allocation_id.clone().unwrap_or_default(),
                    outcome: RequestOutcome {
                        request_id: request_id.clone(),
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
                    allocation: Some(allocation),
                    done: watch::Sender::new(false),
                },
            );
            inner.unplaced.push(request_id.clone());
            ids.push(request_id);
        }
        self.place(&mut inner);
        Ok(ids)
    }

    /// Places waiting requests on function executors, creating those as needed.
    fn place(&self, inner: &mut Inner) {
        let waiting = std::mem::take(&mut inner.unplaced);
        let mut touched = Vec::new();
        for rid in waiting {
            let Some(req) = inner.requests.get(&rid) else {
                continue;
            };
            let Some(alloc) = &req.allocation else {
                continue;
            };
            let f = alloc.function.clone().unwrap_or_default();
            let key = (
                f.namespace.clone().unwrap_or_default(),
                f.application_name.clone().unwrap_or_default(),
                f.function_name.clone().unwrap_or_default(),
                f.application_version.clone().unwrap_or_default(),
            );
            let existing = inner
                .fes
                .iter()
                .find(|(_, fe)| fe.key == key)
                .map(|(id, fe)| (id.clone(), fe.executor_id.clone()));
            let placed = match existing {
                Some(p) => Some(p),
                None => self.new_fe(inner, &key),
            };
            match placed {
                Some((fe_id, executor_id)) => {
                    if let Some(req) = inner.requests.get_mut(&rid) {
                        if let Some(a) = req.allocation.as_mut() {
                            a.function_executor_id = Some(fe_id.clone());
                        }
                        req.outcome.executor_id = Some(executor_id.clone());
                        req.outcome.function_executor_id = Some(fe_id);
                    }
                    touched.push(executor_id);
                }
                None => inner.unplaced.push(rid),
            }
        }
        touched.sort();
        touched.dedup();
        for e in touched {
            publish(inner, &e);
        }
    }

    fn new_fe(
        &self,
        inner: &mut Inner,
        key: &(String, String, String, String),
    ) -> Option<(String, String)> {
        let app = inner.apps.get(&(key.0.clone(), key.1.clone()))?;
        // Least loaded executor that is running.
        let executor_id = inner
            .executors
            .iter()
            .filter(|(_, e)| e.state.status() == pb::ExecutorStatus::Running)
            .min_by_key(|(id, _)| inner.fes.values().filter(|f| &f.executor_id == *id).count())
            .map(|(id, _)| id.clone())?;
        let o = &app.options;
        let fe_id = id();
        let description = pb::FunctionExecutorDescription {
            id: Some(fe_id.clone()),
            function: Some(pb::FunctionRef {
                namespace: Some(key.0.clone()),
                application_name: Some(key.1.clone()),
                function_name: Some(key.2.clone()),
                application_version: Some(key.3.clone()),
            }),
            secret_names: Vec::new(),
            initialization_timeout_ms: Some(o.initialization_timeout_ms),
            application: Some(app.code.clone()),
            resources: Some(pb::FunctionExecutorResources {
                cpu_ms_per_sec: Some(o.cpu_ms_per_sec),
                memory_bytes: Some(o.memory_bytes),
                disk_bytes: Some(o.disk_bytes),
                gpu: (o.gpus > 0).then(|| pb::GpuResources {
                    count: Some(o.gpus),
                    model: inner
                        .executors
                        .get(&executor_id)
                        .and_then(|e| e.state.total_resources.as_ref())
                        .and_then(|r| r.gpu.as_ref())
                        .and_then(|g| g.model)
                        .or(Some(pb::GpuModel::Unknown as i32)),
                }),
            }),
            max_concurrency: Some(o.max_concurrency),
            allocation_timeout_ms: Some(o.allocation_timeout_ms),
            sandbox_metadata: None,
            container_type: Some(pb::FunctionExecutorType::Function as i32),
            pool_id: None,
        };
        inner.fes.insert(
            fe_id.clone(),
            Fe {
                executor_id: executor_id.clone(),
                description,
                key: key.clone(),
                placed_at: Instant::now(),
                running_after: None,
            },
        );
        Some((fe_id, executor_id))
    }

    /// Handles a state report; returns an error for malformed reports.
    pub async fn report(&self, req: pb::ReportExecutorStateRequest) -> Result<(), tonic::Status> {
        let state = req
            .executor_state
            .ok_or_else(|| tonic::Status::invalid_argument("executor_state is required"))?;
        let update = req
            .executor_update
            .ok_or_else(|| tonic::Status::invalid_argument("executor_update is required"))?;
        let executor_id = state
            .executor_id
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                tonic::Status::invalid_argument("executor_state.executor_id is required")
            })?;
        // Decode outputs before taking the lock (blob reads are async).
        let mut decoded = Vec::new();
        for r in update.allocation_results {
            decoded.push((self.decode(&r).await, r));
        }
        let mut inner = self.inner.lock();
        let stopped = state.status() == pb::ExecutorStatus::Stopped;
        let terminated: Vec<(String, String, Vec<String>)> = state
            .function_executor_states
            .iter()
            .filter(|s| s.status() == pb::FunctionExecutorStatus::Terminated)
            .filter_map(|s| {
                let id = s.description.as_ref().and_then(|d| d.id.clone())?;
                let reason = s
                    .termination_reason()
                    .as_str_name()
                    .trim_start_matches("FUNCTION_EXECUTOR_TERMINATION_REASON_")
                    .to_string();
                Some((id, reason, s.allocation_ids_caused_termination.clone()))
            })
            .collect();
        for s in &state.function_executor_states {
            if s.status() != pb::FunctionExecutorStatus::Running {
                continue;
            }
            let Some(id) = s.description.as_ref().and_then(|d| d.id.as_deref()) else {
                continue;
            };
            if let Some(fe) = inner.fes.get_mut(id)
                && fe.running_after.is_none()
            {
                let after = fe.placed_at.elapsed();
                fe.running_after = Some(after);
                inner.cold_starts_ms.push(after.as_secs_f64() * 1000.0);
            }
        }
        let is_new = !inner.executors.contains_key(&executor_id);
        if stopped {
            inner.executors.remove(&executor_id);
        } else {
            let entry = inner
                .executors
                .entry(executor_id.clone())
                .or_insert_with(|| Executor {
                    state: state.clone(),
                    last_seen: Instant::now(),
                    desired: watch::Sender::new(pb::DesiredExecutorState::default()),
                    stream_cut: CancellationToken::new(),
                });
            entry.state = state;
            entry.last_seen = Instant::now();
        }
        if is_new && !stopped {
            tracing::info!(executor = %executor_id, "executor registered");
        }
        let mut changed = false;
        for ((output, content_type, request_error), r) in decoded {
            let Some(alloc_id) = r.allocation_id.clone() else {
                continue;
            };
            push_log(
                &mut inner.log_results,
                serde_json::json!({
                    "executor_id": executor_id,
                    "allocation_id": alloc_id,
                    "outcome": r.outcome_code().as_str_name(),
                    "failure_reason": r.failure_reason.map(|_| r.failure_reason().as_str_name()),
                    "execution_duration_ms": r.execution_duration_ms,
                }),
            );
            let Some(req) = inner
                .requests
                .values_mut()
                .find(|q| q.allocation_id == alloc_id && q.outcome.status == "pending")
            else {
                tracing::debug!(allocation = %alloc_id, "result for an unknown allocation");
                continue;
            };
            let success = r.outcome_code() == pb::AllocationOutcomeCode::Success;
            req.outcome.status = if success { "success" } else { "failure" }.into();
            req.outcome.failure_reason = (!success).then(|| {
                r.failure_reason()
                    .as_str_name()
                    .trim_start_matches("ALLOCATION_FAILURE_REASON_")
                    .to_string()
            });
            req.outcome.output = output;
            req.outcome.output_content_type = content_type;
            req.outcome.request_error = request_error;
            req.outcome.execution_duration_ms = r.execution_duration_ms;
            req.allocation = None;
            req.done.send_replace(true);
            changed = true;
        }
        for (fe_id, reason, blamed) in terminated {
            if let Some(fe) = inner.fes.remove(&fe_id) {
                tracing::info!(fe = %fe_id, %reason, "function executor terminated; removed from desired state");
                push_log(
                    &mut inner.log_terminations,
                    serde_json::json!({
                        "function_executor_id": fe_id,
                        "function": fe.key.2,
                        "application": fe.key.1,
                        "reason": reason,
                        "allocation_ids_caused_termination": blamed,
                    }),
                );
                changed = true;
            }
        }
        if stopped {
            let gone: Vec<String> = inner
                .fes
                .iter()
                .filter(|(_, f)| f.executor_id == executor_id)
                .map(|(id, _)| id.clone())
                .collect();
            for id in gone {
                inner.fes.remove(&id);
            }
            fail_orphans(&mut inner, &executor_id);
        }
        if is_new || changed {
            self.place(&mut inner);
        }
        if changed && !stopped {
            publish(&mut inner, &executor_id);
        }
        Ok(())
    }

    /// Reads a result's output and request error from the blob store.
    async fn decode(
        &self,
        r: &pb::AllocationResult,
    ) -> (Option<serde_json::Value>, Option<String>, Option<String>) {
        let mut output = None;
        let mut content_type = None;
        if let Some(pb::allocation_result::ReturnValue::Value(p)) = &r.return_value {
            content_type = p.content_type.clone();
            output = Some(match self.read_payload(p).await {
                Ok(data) => match p.encoding() {
                    pb::DataPayloadEncoding::Utf8Json => serde_json::from_slice(&data)
                        .unwrap_or_else(|e| serde_json::json!({"undecodable_json": e.to_string()})),
                    pb::DataPayloadEncoding::Utf8Text => {
                        serde_json::Value::String(String::from_utf8_lossy(&data).into())
                    }
                    _ => match String::from_utf8(data.clone()) {
                        Ok(s) => serde_json::Value::String(s),
                        Err(_) => serde_json::json!({"binary_bytes": data.len()}),
                    },
                },
                Err(e) => serde_json::json!({"unreadable_output": e}),
            });
        }
        if let Some(pb::allocation_result::ReturnValue::Updates(_)) = &r.return_value {
            output = Some(
                serde_json::json!({"unsupported": "the function returned further function calls, which the dev control plane does not run"}),
            );
        }
        let request_error = match &r.request_error {
            Some(p) => Some(match self.read_payload(p).await {
                Ok(d) => String::from_utf8_lossy(&d).into_owned(),
                Err(e) => format!("unreadable request error: {e}"),
            }),
            None => None,
        };
        (output, content_type, request_error)
    }

    /// The data part (metadata skipped) of a payload.
    async fn read_payload(&self, p: &pb::DataPayload) -> Result<Vec<u8>, String> {
        let bytes = self
            .blobs
            .get(p.uri.as_deref().unwrap_or(""))
            .await
            .map_err(|e| e.to_string())?;
        let offset = p.offset.unwrap_or(0) as usize;
        let size = p
            .size
            .unwrap_or((bytes.len() - offset.min(bytes.len())) as u64) as usize;
        let meta = p.metadata_size.unwrap_or(0) as usize;
        let end = offset + size;
        if end > bytes.len() || meta > size {
            return Err(format!(
                "payload [{offset}, {end}) is outside a {}-byte blob",
                bytes.len()
            ));
        }
        Ok(bytes[offset + meta..end].to_vec())
    }

    /// The desired-state channel of a registered executor.
    /// The desired-state channel of a registered executor, and the token
    /// that cuts its stream.
    pub fn subscribe(
        &self,
        executor_id: &str,
    ) -> Option<(watch::Receiver<pb::DesiredExecutorState>, CancellationToken)> {
        let mut inner = self.inner.lock();
        if !inner.executors.contains_key(executor_id) {
            return None;
        }
        publish(&mut inner, executor_id);
        inner
            .executors
            .get(executor_id)
            .map(|e| (e.desired.subscribe(), e.stream_cut.clone()))
    }

    pub fn outcome(&self, request_id: &str) -> Option<(RequestOutcome, watch::Receiver<bool>)> {
        let inner = self.inner.lock();
        inner
            .requests
            .get(request_id)
            .map(|r| (r.outcome.clone(), r.done.subscribe()))
    }

    /// Counts for benchmarks: requests by status, workers placed and running,
    /// and every worker's placement-to-RUNNING time.
    pub fn stats(&self) -> serde_json::Value {
        let inner = self.inner.lock();
        let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
        for r in inner.requests.values() {
            *by_status.entry(r.outcome.status.as_str()).or_default() += 1;
        }
        serde_json::json!({
            "requests": by_status,
            "function_executors": inner.fes.len(),
            "function_executors_running": inner.fes.values().filter(|f| f.running_after.is_some()).count(),
            "cold_starts_ms": inner.cold_starts_ms,
        })
    }

    /// Forgets finished requests (keeps memory flat across benchmark rounds).
    pub fn forget_finished(&self) {
        self.inner
            .lock()
            .requests
            .retain(|_, r| r.outcome.status == "pending");
    }

    /// What executors reported: every allocation result and worker termination.
    pub fn log(&self) -> serde_json::Value {
        let inner = self.inner.lock();
        serde_json::json!({"results": inner.log_results, "terminations": inner.log_terminations})
    }

    /// Removes a request's allocation from the desired state (the agent
    /// cancels it); its result is still recorded.
    pub fn cancel(&self, request_id: &str) -> Result<(), DevServerError> {
        let mut inner = self.inner.lock();
        let req = inner
            .requests
            .get_mut(request_id)
            .ok_or_else(|| DevServerError::NotFound(format!("request {request_id}")))?;
        let executor = req.outcome.executor_id.clone();
        if req.allocation.take().is_none() {
            return Err(DevServerError::BadRequest(format!(
                "request {request_id} is not running"
            )));
        }
        inner.unplaced.retain(|r| r != request_id);
        if let Some(e) = executor {
            publish(&mut inner, &e);
        }
        Ok(())
    }

    /// Removes an application: its workers and running allocations leave the
    /// desired state.
    pub fn undeploy(&self, namespace: &str, application: &str) -> Result<(), DevServerError> {
        let mut inner = self.inner.lock();
        inner
            .apps
            .remove(&(namespace.to_string(), application.to_string()))
            .ok_or_else(|| {
                DevServerError::NotFound(format!("application {namespace}/{application}"))
            })?;
        let gone: Vec<(String, String)> = inner
            .fes
            .iter()
            .filter(|(_, f)| f.key.0 == namespace && f.key.1 == application)
            .map(|(id, f)| (id.clone(), f.executor_id.clone()))
            .collect();
        for req in inner.requests.values_mut() {
            if req.outcome.namespace == namespace && req.outcome.application == application {
                req.allocation = None;
            }
        }
        for (id, _) in &gone {
            inner.fes.remove(id);
        }
        let mut executors: Vec<String> = gone.into_iter().map(|(_, e)| e).collect();
        executors.dedup();
        for e in executors {
            publish(&mut inner, &e);
        }
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
        publish(&mut inner, executor_id);
        Ok(())
    }

    pub fn executors(&self) -> serde_json::Value {
        let inner = self.inner.lock();
        serde_json::Value::Array(
            inner
                .executors
                .iter()
                .map(|(id, e)| {
                    let fes: Vec<serde_json::Value> = e
                        .state
                        .function_executor_states
                        .iter()
                        .map(|s| serde_json::json!({
                            "id": s.description.as_ref().and_then(|d| d.id.clone()),
                            "status": s.status().as_str_name(),
                            "termination_reason": s.termination_reason.map(|_| s.termination_reason().as_str_name()),
                            "allocation_ids_caused_termination": s.allocation_ids_caused_termination,
                        }))
                        .collect();
                    let gpu = e.state.total_resources.as_ref().and_then(|r| r.gpu.as_ref());
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
                        "function_executors": fes,
                    })
                })
                .collect(),
        )
    }
}

/// Fails requests whose allocations sat on an executor that left.
fn fail_orphans(inner: &mut Inner, executor_id: &str) {
    for req in inner.requests.values_mut() {
        if req.allocation.is_some() && req.outcome.executor_id.as_deref() == Some(executor_id) {
            req.allocation = None;
            req.outcome.status = "failure".into();
            req.outcome.failure_reason = Some("EXECUTOR_REMOVED".into());
            req.done.send_replace(true);
        }
    }
}

/// Recomputes and sends `executor_id`'s desired state with a new clock.
fn publish(inner: &mut Inner, executor_id: &str) {
    inner.clock += 1;
    let clock = inner.clock;
    let function_executors: Vec<_> = inner
        .fes
        .values()
        .filter(|f| f.executor_id == executor_id)
        .map(|f| f.description.clone())
        .collect();
    let allocations: Vec<_> = inner
        .requests
        .values()
        .filter_map(|r| r.allocation.as_ref())
        .filter(|a| {
            a.function_executor_id
                .as_ref()
                .and_then(|id| inner.fes.get(id))
                .is_some_and(|f| f.executor_id == executor_id)
        })
        .cloned()
        .collect();
    if let Some(e) = inner.executors.get(executor_id) {
        e.desired.send_replace(pb::DesiredExecutorState {
            function_executors,
            allocations,
            clock: Some(clock),
            function_call_results: Vec::new(),
        });
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
        let mut inner = sched.inner.lock();
        let expired: Vec<String> = inner
            .executors
            .iter()
            .filter(|(_, e)| e.last_seen.elapsed() > EXECUTOR_TTL)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            tracing::warn!(executor = %id, "executor stopped reporting; forgetting it");
            inner.executors.remove(&id);
            inner.fes.retain(|_, f| f.executor_id != id);
            fail_orphans(&mut inner, &id);
        }
    }
}
