//! Running one allocation on an initialized worker: prepare inputs (chunked
//! read URIs for args, a writable request-error blob), `create_allocation`,
//! follow `watch_allocation_state` answering the worker's requests (output
//! blobs, nested function calls, watchers of their results, request state),
//! enforce the dynamic deadline (paused while a watcher waits, up to a
//! ceiling), `delete_allocation`, finish uploads and turn the worker's
//! result (a value or a tail call) into the server's `AllocationResult`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::Instrument;

use super::conn::WorkerClient;
use super::{calls, plan, request_state};
use crate::state::Shared;
use crate::watches::{Delivery, Waiter};
use crate::{KillPoint, fe_pb, pb};

/// Deadline of `create_allocation`, `send_allocation_update` and `delete_allocation`.
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// Size offered for a request error payload.
const REQUEST_ERROR_BLOB_BYTES: u64 = 10 * 1024 * 1024;
const CODE_INTERNAL: i32 = 13;
/// Most function call watchers one allocation may list at once; a longer
/// list fails the allocation, naming this bound.
const MAX_WATCHERS: usize = 10_000;

pub(crate) struct AllocOutcome {
    pub result: pb::AllocationResult,
    /// Set when the worker must be killed (timeout, broken worker).
    pub kill_fe: Option<pb::FunctionExecutorTerminationReason>,
    /// The worker holds the allocation, finished: it is told to forget it
    /// once the result is kept ([`forget`]), not before.
    pub on_worker: bool,
}

#[derive(Clone)]
pub(crate) struct Upload {
    pub uri: String,
    pub upload_id: String,
    /// Completed already (by the run before a restart, as its record
    /// says): never completed or aborted again.
    pub completed: bool,
}

impl Upload {
    pub(crate) fn open(uri: String, upload_id: String) -> Upload {
        Upload {
            uri,
            upload_id,
            completed: false,
        }
    }
}

/// Open uploads of a running allocation, aborted if dropped while armed.
struct OpenUploads {
    shared: Arc<Shared>,
    /// The worker the allocation runs on.
    fe_id: String,
    /// Output blobs by the worker's blob id.
    map: HashMap<String, Upload>,
    /// Prepared, not yet committed request-state writes by operation id.
    state_writes: HashMap<String, Upload>,
    request_error: Option<Upload>,
}

impl OpenUploads {
    /// Hands the output uploads to the caller, who now completes or aborts
    /// them. Uncommitted state writes stay here and are aborted when the
    /// guard goes (they never share a namespace with the worker's blob ids).
    fn disarm(&mut self) -> HashMap<String, Upload> {
        self.request_error = None;
        std::mem::take(&mut self.map)
    }
}

impl Drop for OpenUploads {
    fn drop(&mut self) {
        let open: Vec<Upload> = self
            .map
            .drain()
            .chain(self.state_writes.drain())
            .map(|(_, u)| u)
            .chain(self.request_error.take())
            .filter(|u| !u.completed)
            .collect();
        // Let go of alive with its worker (adoption mode): the worker may
        // still write to them; the next agent completes or aborts them.
        if open.is_empty() || self.shared.let_go(&self.fe_id) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            rt.spawn(
                async move {
                    for up in open {
                        if let Err(e) = shared.config.blob_store.abort_multipart(&up.uri, &up.upload_id).await {
                            tracing::warn!(uri = %up.uri, error = %e, "aborting an abandoned upload failed");
                        }
                    }
                }
                .in_current_span(),
            );
        }
    }
}

/// A failed result for `a` with `reason`.
pub(crate) fn failed_result(
    a: &pb::Allocation,
    reason: pb::AllocationFailureReason,
    duration_ms: Option<u64>,
) -> pb::AllocationResult {
    pb::AllocationResult {
        function: a.function.clone().map(with_version),
        allocation_id: a.allocation_id.clone(),
        function_call_id: a.function_call_id.clone(),
        request_id: a.request_id.clone(),
        outcome_code: Some(pb::AllocationOutcomeCode::Failure as i32),
        failure_reason: Some(reason as i32),
        return_value: None,
        request_error: None,
        execution_duration_ms: duration_ms,
    }
}

/// The reference always sends `application_version`, possibly empty.
fn with_version(mut f: pb::FunctionRef) -> pb::FunctionRef {
    f.application_version.get_or_insert_with(String::new);
    f
}

fn manifest_of(p: &pb::DataPayload) -> fe_pb::SerializedObjectManifest {
    fe_pb::SerializedObjectManifest {
        encoding: p.encoding,
        encoding_version: Some(p.encoding_version.unwrap_or(0)),
        size: Some(p.size.unwrap_or(0)),
        metadata_size: Some(p.metadata_size.unwrap_or(0)),
        sha256_hash: Some(p.sha256_hash.clone().unwrap_or_default()),
        content_type: p.content_type.clone(),
        source_function_call_id: p.source_function_call_id.clone(),
    }
}

/// The worker's ETags of a blob's chunks, in order.
pub(crate) fn etags(blob: &fe_pb::Blob) -> Vec<String> {
    blob.chunks
        .iter()
        .map(|c| c.etag.clone().unwrap_or_default())
        .collect()
}

/// Why an input cannot be handed to the worker.
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    /// Past `--max-input-blob-bytes`, or an extent that overflows.
    #[error("{}", .0.message)]
    TooLarge(crate::validate::Rejection),
    /// No read URL could be made.
    #[error(transparent)]
    Presign(#[from] steward_blob_store::BlobError),
}

/// What the worker needs to read `p`: its manifest and presigned chunks
/// covering everything up to its end, which must be within `max_bytes`
/// (`--max-input-blob-bytes`; checked before any URL is made).
async fn readable(
    blobs: &steward_blob_store::BlobStore,
    p: &pb::DataPayload,
    valid_for: Duration,
    max_bytes: u64,
) -> Result<(fe_pb::SerializedObjectInsideBlob, fe_pb::Blob), Unreadable> {
    let uri = p.uri.as_deref().unwrap_or("");
    let offset = p.offset.unwrap_or(0);
    let covered =
        crate::validate::input_extent(p, "the payload", max_bytes).map_err(Unreadable::TooLarge)?;
    let chunks = blobs.presign_read(uri, covered, valid_for).await?;
    Ok((
        fe_pb::SerializedObjectInsideBlob {
            manifest: Some(manifest_of(p)),
            offset: Some(offset),
        },
        fe_pb::Blob {
            id: None,
            chunks: to_chunks(chunks),
        },
    ))
}

pub(crate) fn to_chunks(chunks: Vec<steward_blob_store::Chunk>) -> Vec<fe_pb::BlobChunk> {
    chunks
        .into_iter()
        .map(|c| fe_pb::BlobChunk {
            uri: Some(c.uri),
            size: Some(c.size),
            etag: None,
        })
        .collect()
}

fn ceil_ms(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000) as u64
}

/// Runs `alloc` on its worker, in four phases: [`prepare`] its inputs,
/// [`drive`] the worker to a result, [`finish`] the uploads, [`report`]
/// the result in the server's form.
pub(crate) async fn run(
    shared: Arc<Shared>,
    client: WorkerClient,
    allocation_timeout: Duration,
    alloc: pb::Allocation,
    ready: Instant,
    started: Option<crate::adoption::StartReading>,
) -> AllocOutcome {
    let alloc_id = alloc.allocation_id.clone().unwrap_or_default();
    let (request, request_error) = match prepare(&shared, &alloc, allocation_timeout).await {
        Ok(prepared) => prepared,
        Err(e) => {
            shared.event("allocation_input_error", &alloc_id, e.to_string());
            let reason = pb::AllocationFailureReason::InternalError;
            return fail(&alloc, reason, None, None);
        }
    };
    if let Some(store) = &shared.adoption {
        // On record before the worker hears of it.
        store.allocation_started(
            &alloc,
            record_of(REQUEST_ERROR_BLOB, &request_error),
            started,
        );
    }
    let start = Start {
        create: Some(request),
        uploads: HashMap::new(),
        created_calls: HashSet::new(),
        ready,
    };
    finish_run(
        shared,
        client,
        allocation_timeout,
        alloc,
        request_error,
        start,
    )
    .await
}

/// Follows an allocation that an adopted worker already has (its record
/// from the earlier run): no `create_allocation`; its open uploads are
/// the recorded ones; then as [`run`].
pub(crate) async fn resume(
    shared: Arc<Shared>,
    client: WorkerClient,
    allocation_timeout: Duration,
    record: crate::adoption::AllocRecord,
    ready: Instant,
) -> AllocOutcome {
    let alloc = record.allocation.clone().unwrap_or_default();
    let Some(request_error) = record.request_error.as_ref().map(upload_of) else {
        shared.event(
            "allocation_failed",
            record.id(),
            "its record from the earlier run has no request-error upload",
        );
        return fail(
            &alloc,
            pb::AllocationFailureReason::InternalError,
            None,
            None,
        );
    };
    let start = Start {
        create: None,
        uploads: record
            .outputs
            .iter()
            .map(|u| (u.blob_id.clone(), upload_of(u)))
            .collect(),
        created_calls: record.calls_created.iter().cloned().collect(),
        ready,
    };
    finish_run(
        shared,
        client,
        allocation_timeout,
        alloc,
        request_error,
        start,
    )
    .await
}

/// The blob id the request error's upload is known by in records.
const REQUEST_ERROR_BLOB: &str = "request_error_blob";

fn record_of(blob_id: &str, u: &Upload) -> crate::adoption::UploadRecord {
    crate::adoption::UploadRecord {
        blob_id: blob_id.to_string(),
        uri: u.uri.clone(),
        upload_id: u.upload_id.clone(),
        completed: u.completed,
    }
}

fn upload_of(u: &crate::adoption::UploadRecord) -> Upload {
    Upload {
        uri: u.uri.clone(),
        upload_id: u.upload_id.clone(),
        completed: u.completed,
    }
}

/// How an allocation begins on its worker: created (a new one) or
/// followed (an adopted one, with the uploads it already has).
struct Start {
    create: Option<fe_pb::CreateAllocationRequest>,
    uploads: HashMap<String, Upload>,
    /// Nested calls the server created before a restart.
    created_calls: HashSet<String>,
    ready: Instant,
}

fn fail(
    alloc: &pb::Allocation,
    reason: pb::AllocationFailureReason,
    duration: Option<u64>,
    kill: Option<pb::FunctionExecutorTerminationReason>,
) -> AllocOutcome {
    AllocOutcome {
        result: failed_result(alloc, reason, duration),
        kill_fe: kill,
        on_worker: false,
    }
}

/// Tells the worker to forget finished allocation `alloc_id`, once its
/// result is kept (in the adoption record too): the result does not wait
/// a round trip for the acknowledgement (the call ends within
/// RPC_TIMEOUT, or with the worker's connection).
pub(crate) fn forget(client: &WorkerClient, alloc_id: &str) {
    let delete = fe_pb::DeleteAllocationRequest {
        allocation_id: Some(alloc_id.to_string()),
    };
    let mut client = client.clone();
    let alloc_id = alloc_id.to_string();
    tokio::spawn(
        async move {
            if let Err(d) =
                with_deadline("delete_allocation", client.delete_allocation(delete)).await
            {
                tracing::warn!(allocation = %alloc_id, error = %crate::events::shorten(&d.message, crate::events::MAX_EVENT_MESSAGE), "delete_allocation failed");
            }
        }
        .in_current_span(),
    );
}

/// Phases 2 to 4 of [`run`] and [`resume`].
async fn finish_run(
    shared: Arc<Shared>,
    mut client: WorkerClient,
    allocation_timeout: Duration,
    alloc: pb::Allocation,
    request_error: Upload,
    start: Start,
) -> AllocOutcome {
    let alloc_id = alloc.allocation_id.clone().unwrap_or_default();
    let fail = |reason, duration, kill| fail(&alloc, reason, duration, kill);
    let (outcome, mut guard, duration_ms) = drive(
        &shared,
        &mut client,
        &alloc,
        allocation_timeout,
        start,
        &request_error,
    )
    .await;
    let uploads = guard.disarm();
    let fe_result = match outcome {
        Ok(r) => r,
        Err(d) => {
            shared.event("allocation_failed", &alloc_id, d.message);
            abort_all(&shared, uploads, Some(request_error)).await;
            return fail(d.reason, Some(duration_ms), d.kill);
        }
    };
    let kept = match finish(&shared, &alloc_id, &fe_result, uploads, request_error).await {
        Ok(kept) => kept,
        Err(reason) => {
            return AllocOutcome {
                on_worker: true,
                ..fail(reason, Some(duration_ms), None)
            };
        }
    };
    let mut outcome = match report(&alloc, &fe_result, &kept, duration_ms) {
        Ok(result) => AllocOutcome {
            result,
            kill_fe: None,
            on_worker: false,
        },
        Err(e) => {
            shared.event("allocation_failed", &alloc_id, e.to_string());
            let reason = pb::AllocationFailureReason::FunctionError;
            fail(reason, Some(duration_ms), None)
        }
    };
    outcome.on_worker = true;
    outcome
}

/// Why an allocation's inputs could not be prepared.
#[derive(Debug, thiserror::Error)]
enum InputError {
    #[error("args[{index}]: {source}")]
    Arg { index: usize, source: Unreadable },
    #[error("request error blob: {0}")]
    RequestErrorBlob(#[from] steward_blob_store::BlobError),
}

/// Phase 1: read URLs for the arguments and an open upload for a request
/// error; the request that starts the allocation on the worker, and that
/// upload (completed or aborted by the caller).
async fn prepare(
    shared: &Shared,
    alloc: &pb::Allocation,
    allocation_timeout: Duration,
) -> Result<(fe_pb::CreateAllocationRequest, Upload), InputError> {
    let blobs = &shared.config.blob_store;
    let mut args = Vec::new();
    let mut arg_blobs = Vec::new();
    for (index, p) in alloc.args.iter().enumerate() {
        let (arg, blob) = readable(
            blobs,
            p,
            allocation_timeout,
            shared.config.max_input_blob_bytes,
        )
        .await
        .map_err(|source| InputError::Arg { index, source })?;
        args.push(arg);
        arg_blobs.push(blob);
    }
    let (request_error, chunks) = open_request_error(blobs, alloc, allocation_timeout).await?;
    let inputs = fe_pb::FunctionInputs {
        args,
        arg_blobs,
        request_error_blob: Some(fe_pb::Blob {
            id: Some("request_error_blob".into()),
            chunks: to_chunks(chunks),
        }),
        function_call_metadata: Some(alloc.function_call_metadata.clone().unwrap_or_default()),
    };
    let request = fe_pb::CreateAllocationRequest {
        allocation: Some(fe_pb::Allocation {
            request_id: alloc.request_id.clone(),
            function_call_id: alloc.function_call_id.clone(),
            allocation_id: alloc.allocation_id.clone(),
            inputs: Some(inputs),
            result: None,
        }),
    };
    Ok((request, request_error))
}

/// Opens the upload of the allocation's request error, with write URLs
/// for up to [`REQUEST_ERROR_BLOB_BYTES`]; aborted again when the URLs
/// cannot be made.
async fn open_request_error(
    blobs: &steward_blob_store::BlobStore,
    alloc: &pb::Allocation,
    allocation_timeout: Duration,
) -> Result<(Upload, Vec<steward_blob_store::Chunk>), steward_blob_store::BlobError> {
    let uri = format!(
        "{}.{}.req_error",
        alloc
            .request_error_payload_uri_prefix
            .as_deref()
            .unwrap_or(""),
        alloc.request_id.as_deref().unwrap_or("")
    );
    let upload_id = blobs.create_multipart(&uri).await?;
    match blobs
        .presign_write_parts(
            &uri,
            &upload_id,
            REQUEST_ERROR_BLOB_BYTES,
            allocation_timeout,
        )
        .await
    {
        Ok(chunks) => Ok((Upload::open(uri, upload_id), chunks)),
        Err(e) => {
            let _ = blobs.abort_multipart(&uri, &upload_id).await;
            Err(e)
        }
    }
}

/// Phase 2: runs the allocation on the worker until it has a result. The
/// open uploads come back with the outcome, in their guard, and how long
/// the worker took in ms (also the run latency metric).
async fn drive(
    shared: &Arc<Shared>,
    client: &mut WorkerClient,
    alloc: &pb::Allocation,
    allocation_timeout: Duration,
    start: Start,
    request_error: &Upload,
) -> (Result<fe_pb::AllocationResult, Driven>, OpenUploads, u64) {
    let started = Instant::now();
    // Owns the open uploads while the worker runs: if this task is dropped
    // (allocation cancelled, worker killed) they are aborted, not leaked.
    let guard = OpenUploads {
        shared: shared.clone(),
        fe_id: alloc.function_executor_id.clone().unwrap_or_default(),
        map: start.uploads,
        state_writes: HashMap::new(),
        request_error: Some(request_error.clone()),
    };
    let mut runner = Runner::new(shared.clone(), client, alloc, allocation_timeout, guard);
    runner.created_before = start.created_calls;
    note_handed_over(shared, &runner.alloc_id, start.ready);
    let outcome = runner.drive(start.create).await;
    let uploads = runner.into_uploads();
    let took = started.elapsed();
    shared
        .metrics
        .allocation_run_latency
        .observe(took.as_secs_f64());
    (outcome, uploads, ceil_ms(took))
}

/// The uploads an allocation's result refers to, once completed.
struct Kept {
    outputs_uri: Option<String>,
    request_error_uri: Option<String>,
}

/// Phase 3: completes the uploads the worker used and aborts the rest. A
/// failure is told as an event; the allocation then fails for the reason
/// returned.
async fn finish(
    shared: &Arc<Shared>,
    alloc_id: &str,
    fe_result: &fe_pb::AllocationResult,
    mut uploads: HashMap<String, Upload>,
    request_error: Upload,
) -> Result<Kept, pb::AllocationFailureReason> {
    let outputs_uri = match complete_outputs(shared, alloc_id, fe_result, &mut uploads).await {
        Ok(uri) => uri,
        Err(Driven {
            reason, message, ..
        }) => {
            shared.event("allocation_failed", alloc_id, message);
            abort_all(shared, uploads, Some(request_error)).await;
            return Err(reason);
        }
    };
    let request_error_uri =
        complete_request_error(shared, alloc_id, fe_result, &request_error).await;
    let unused = request_error_uri.is_none().then_some(request_error);
    abort_all(shared, uploads, unused).await;
    Ok(Kept {
        outputs_uri,
        request_error_uri,
    })
}

/// Completes the output blob the worker reported, taking it from `uploads`;
/// its URI, or none when the worker reported none.
async fn complete_outputs(
    shared: &Shared,
    alloc_id: &str,
    fe_result: &fe_pb::AllocationResult,
    uploads: &mut HashMap<String, Upload>,
) -> Result<Option<String>, Driven> {
    let Some(blob) = &fe_result.uploaded_function_outputs_blob else {
        return Ok(None);
    };
    let failed = |reason, message| Driven {
        reason,
        kill: None,
        message,
    };
    let id = blob.id.clone().unwrap_or_default();
    let Some(up) = uploads.remove(&id) else {
        return Err(failed(
            pb::AllocationFailureReason::FunctionError,
            format!("worker reported output blob {id:?} that was never requested"),
        ));
    };
    if up.completed {
        return Ok(Some(up.uri)); // By the run before a restart.
    }
    shared
        .config
        .blob_store
        .complete_multipart(&up.uri, &up.upload_id, &etags(blob))
        .await
        .map_err(|e| {
            failed(
                pb::AllocationFailureReason::InternalError,
                format!("completing output upload: {e}"),
            )
        })?;
    if let Some(store) = &shared.adoption {
        // A restart from here on must not complete it again.
        store.upload_completed(alloc_id, &id);
    }
    Ok(Some(up.uri))
}

/// Completes the request error upload when the worker wrote one; its URI
/// when that worked (a failure is logged: the result goes on without it).
async fn complete_request_error(
    shared: &Shared,
    alloc_id: &str,
    fe_result: &fe_pb::AllocationResult,
    upload: &Upload,
) -> Option<String> {
    let blob = fe_result.uploaded_request_error_blob.as_ref()?;
    if upload.completed {
        return Some(upload.uri.clone()); // By the run before a restart.
    }
    match shared
        .config
        .blob_store
        .complete_multipart(&upload.uri, &upload.upload_id, &etags(blob))
        .await
    {
        Ok(()) => {
            if let Some(store) = &shared.adoption {
                store.upload_completed(alloc_id, REQUEST_ERROR_BLOB);
            }
            Some(upload.uri.clone())
        }
        Err(e) => {
            tracing::warn!(allocation = %alloc_id, error = %e, "completing request error upload failed");
            None
        }
    }
}

/// Why what the worker wrote cannot go to the server; the function's error.
#[derive(Debug, thiserror::Error)]
enum Unsendable {
    #[error("the function's value cannot be sent to the server: {0}")]
    Value(plan::PlanError),
    #[error("the function's tail call cannot be sent to the server: {0}")]
    TailCall(plan::PlanError),
    #[error("the function returned a value but never uploaded it (no outputs blob)")]
    ValueNotUploaded,
    #[error("the function's request error cannot be sent to the server: {0}")]
    RequestError(plan::PlanError),
}

/// Phase 4: the worker's result in the server's form. What the worker
/// wrote is checked (and bounded) before it is copied: anything the server
/// cannot take fails this allocation alone.
fn report(
    alloc: &pb::Allocation,
    fe_result: &fe_pb::AllocationResult,
    kept: &Kept,
    duration_ms: u64,
) -> Result<pb::AllocationResult, Unsendable> {
    use fe_pb::AllocationFailureReason as F;
    let success = fe_result.outcome_code == Some(fe_pb::AllocationOutcomeCode::Success as i32);
    let (outcome, failure_reason) = if success {
        (pb::AllocationOutcomeCode::Success, None)
    } else {
        let reason = match F::try_from(fe_result.failure_reason.unwrap_or(0)) {
            Ok(F::RequestError) => pb::AllocationFailureReason::RequestError,
            // A worker-side internal error is a grey failure: attributed to the function.
            _ => pb::AllocationFailureReason::FunctionError,
        };
        (pb::AllocationOutcomeCode::Failure, Some(reason as i32))
    };
    let return_value = return_value(alloc, fe_result, kept.outputs_uri.as_deref(), success)?;
    let request_error = match (&fe_result.request_error_output, &kept.request_error_uri) {
        (Some(out), Some(uri)) => {
            Some(plan::payload_in_blob(out, uri).map_err(Unsendable::RequestError)?)
        }
        _ => None,
    };
    Ok(pb::AllocationResult {
        function: alloc.function.clone().map(with_version),
        allocation_id: alloc.allocation_id.clone(),
        function_call_id: alloc.function_call_id.clone(),
        request_id: alloc.request_id.clone(),
        outcome_code: Some(outcome as i32),
        failure_reason,
        return_value,
        request_error,
        execution_duration_ms: Some(duration_ms),
    })
}

/// The function's value or tail call in the server's form.
fn return_value(
    alloc: &pb::Allocation,
    fe_result: &fe_pb::AllocationResult,
    outputs_uri: Option<&str>,
    success: bool,
) -> Result<Option<pb::allocation_result::ReturnValue>, Unsendable> {
    use fe_pb::allocation_result::Outputs;
    use pb::allocation_result::ReturnValue;
    match (&fe_result.outputs, outputs_uri) {
        (Some(Outputs::Value(v)), Some(uri)) => plan::payload_in_blob(v, uri)
            .map(|p| Some(ReturnValue::Value(p)))
            .map_err(Unsendable::Value),
        (Some(Outputs::Updates(u)), _) => plan::check_namespace(u, namespace_of(alloc))
            .and_then(|()| plan::convert_updates(u, outputs_uri))
            .map(|u| Some(ReturnValue::Updates(u)))
            .map_err(Unsendable::TailCall),
        (Some(Outputs::Value(_)), None) if success => Err(Unsendable::ValueNotUploaded),
        _ => Ok(None),
    }
}

struct Driven {
    reason: pb::AllocationFailureReason,
    kill: Option<pb::FunctionExecutorTerminationReason>,
    message: String,
}

fn rpc_failure(what: &str, status: &tonic::Status) -> Driven {
    if status.code() == tonic::Code::DeadlineExceeded {
        return Driven {
            reason: pb::AllocationFailureReason::FunctionTimeout,
            kill: Some(pb::FunctionExecutorTerminationReason::FunctionTimeout),
            message: format!("{what} timed out"),
        };
    }
    Driven {
        reason: pb::AllocationFailureReason::FunctionError,
        kill: Some(pb::FunctionExecutorTerminationReason::Unhealthy),
        message: format!("{what} failed: {}: {}", status.code(), status.message()),
    }
}

async fn with_deadline<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Driven> {
    // Boxed: a tonic call is kilobytes of state, held only while it runs.
    match tokio::time::timeout(RPC_TIMEOUT, Box::pin(fut)).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(rpc_failure(what, &status)),
        Err(_) => Err(rpc_failure(
            what,
            &tonic::Status::deadline_exceeded("no answer"),
        )),
    }
}

/// Drives one allocation on its worker: owns the worker client, the open
/// uploads and the watchers while the allocation runs.
struct Runner<'a> {
    shared: Arc<Shared>,
    client: &'a mut WorkerClient,
    alloc: &'a pb::Allocation,
    alloc_id: String,
    allocation_timeout: Duration,
    uploads: OpenUploads,
    /// Ids of worker requests already answered, by kind.
    answered: HashSet<String>,
    watchers: Watchers,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    /// Nested calls on their way to the server (made on first use).
    calls: Option<calls::Sender>,
    /// How many requests of each [`Capped`] kind the worker made.
    counts: [usize; 4],
    /// Nested calls the server created before a restart (a resumed
    /// allocation's record): answered, never sent again.
    created_before: HashSet<String>,
}

/// The kinds of request capped per allocation (`AllocationLimits`).
#[derive(Clone, Copy)]
enum Capped {
    OutputBlob,
    StateWrite,
    /// Every request-state operation (read, write, commit).
    StateOp,
    FunctionCall,
}

impl Capped {
    /// Its limit, what it is called, and the flag that sets the limit.
    fn bound(self, limits: &crate::AllocationLimits) -> (usize, &'static str, &'static str) {
        match self {
            Capped::OutputBlob => (
                limits.max_output_blobs,
                "output blobs",
                "max-output-blobs-per-allocation",
            ),
            Capped::StateWrite => (
                limits.max_state_writes,
                "request-state writes",
                "max-request-state-writes-per-allocation",
            ),
            Capped::StateOp => (
                limits.max_state_ops,
                "request-state operations",
                "max-request-state-ops-per-allocation",
            ),
            Capped::FunctionCall => (
                limits.max_function_calls,
                "function calls",
                "max-function-calls-per-allocation",
            ),
        }
    }
}

/// A breach of a per-allocation bound: the allocation fails as the
/// function's error, and its worker is stopped, since a running function
/// cannot be stopped otherwise and must not go on unwatched.
fn breach(message: String) -> Driven {
    Driven {
        reason: pb::AllocationFailureReason::FunctionError,
        kill: Some(pb::FunctionExecutorTerminationReason::Unhealthy),
        message,
    }
}

/// The ids a worker gives its requests (output blobs, nested calls,
/// request-state operations) are each at most [`plan::MAX_ID_BYTES`]: they
/// are remembered until the allocation ends, and an output blob's id
/// becomes part of the URI reported to the server.
fn check_request_ids(state: &fe_pb::AllocationState) -> Result<(), plan::PlanError> {
    for r in &state.output_blob_requests {
        plan::bounded_id("an output blob id", r.id.as_deref().unwrap_or(""))?;
    }
    for c in &state.function_calls {
        plan::bounded_id("a function call id", c.id.as_deref().unwrap_or(""))?;
        if let Some(root) = c
            .updates
            .as_ref()
            .and_then(|u| u.root_function_call_id.as_deref())
        {
            plan::bounded_id("a function call's root call id", root)?;
        }
    }
    for op in &state.request_state_operations {
        plan::bounded_id(
            "a request-state operation id",
            op.operation_id.as_deref().unwrap_or(""),
        )?;
    }
    Ok(())
}

/// The allocation's namespace, the only one its function may call into.
fn namespace_of(alloc: &pb::Allocation) -> &str {
    alloc
        .function
        .as_ref()
        .and_then(|f| f.namespace.as_deref())
        .unwrap_or("")
}

/// Counts the agent's share from `ready` until the worker is asked to run
/// the allocation, as a metric and a timeline stamp.
fn note_handed_over(shared: &Shared, alloc_id: &str, ready: Instant) {
    let took = ready.elapsed();
    shared
        .metrics
        .cycle_desired_to_running
        .observe(took.as_secs_f64());
    if let Some(a) = shared.state.lock().allocations.get_mut(alloc_id) {
        a.timeline.push(crate::state::TimelineEntry::now(format!(
            "handed to the worker {} µs after it could start",
            took.as_micros()
        )));
    }
}

/// The next outcome of a nested call, if any are in flight.
async fn next_call(calls: &mut Option<calls::Sender>) -> (String, Result<(), calls::Refused>) {
    match calls {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// The next state from the worker's stream; its end or failure ends the
/// allocation.
fn next_state(
    next: Result<Option<fe_pb::AllocationState>, tonic::Status>,
) -> Result<fe_pb::AllocationState, Driven> {
    match next {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(Driven {
            reason: pb::AllocationFailureReason::FunctionError,
            kill: None,
            message: "worker ended the state stream without a result".into(),
        }),
        Err(status) => Err(rpc_failure("watch_allocation_state", &status)),
    }
}

impl<'a> Runner<'a> {
    fn new(
        shared: Arc<Shared>,
        client: &'a mut WorkerClient,
        alloc: &'a pb::Allocation,
        allocation_timeout: Duration,
        uploads: OpenUploads,
    ) -> Self {
        let alloc_id = alloc.allocation_id.clone().unwrap_or_default();
        let (tx, deliveries) = mpsc::unbounded_channel();
        let watchers = Watchers::new(shared.clone(), alloc, tx);
        Runner {
            shared,
            client,
            alloc,
            alloc_id,
            allocation_timeout,
            uploads,
            answered: HashSet::new(),
            watchers,
            deliveries,
            calls: None,
            counts: [0; 4],
            created_before: HashSet::new(),
        }
    }

    fn into_uploads(self) -> OpenUploads {
        self.uploads
    }

    /// Runs the allocation on the worker until it has a result.
    async fn drive(
        &mut self,
        create: Option<fe_pb::CreateAllocationRequest>,
    ) -> Result<fe_pb::AllocationResult, Driven> {
        if let Some(request) = create {
            with_deadline("create_allocation", self.client.create_allocation(request)).await?;
        }
        let watch = fe_pb::WatchAllocationStateRequest {
            allocation_id: Some(self.alloc_id.clone()),
        };
        let stream = with_deadline(
            "watch_allocation_state",
            self.client.watch_allocation_state(watch),
        )
        .await?;
        self.follow(stream).await
    }

    /// Follows the worker's state stream, answering its requests and
    /// watching the deadline, until the worker has a result.
    async fn follow(
        &mut self,
        mut stream: tonic::Streaming<fe_pb::AllocationState>,
    ) -> Result<fe_pb::AllocationResult, Driven> {
        let mut clock = Deadline::new(
            self.allocation_timeout,
            self.shared.config.max_function_call_wait,
        );
        let mut last_progress: Option<(u32, u32)> = None;
        loop {
            // The function waits on the agent or the server, not on itself.
            let calls_busy = self.calls.as_ref().is_some_and(calls::Sender::busy);
            clock.waiting(self.watchers.pending() || calls_busy);
            let next = tokio::select! {
                m = stream.message() => m,
                // Handlers are boxed: each is kilobytes of state machine
                // that would otherwise stay inline in every running
                // allocation for its whole life (heaptrack: 16 KB each).
                (id, outcome) = next_call(&mut self.calls) => {
                    Box::pin(self.answer_call(id, outcome)).await?;
                    continue;
                }
                Some(d) = self.deliveries.recv() => {
                    let started = tokio::time::Instant::now();
                    Box::pin(self.deliver(d)).await?;
                    clock.extend(started.elapsed());
                    continue;
                }
                _ = tokio::time::sleep_until(clock.wake_at()) => return Err(clock.expired()),
            };
            let state = next_state(next)?;
            let progress = state
                .progress
                .map(|p| (p.current.to_bits(), p.total.to_bits()));
            if progress.is_some() && progress != last_progress {
                last_progress = progress;
                clock.reset();
            }
            let work_started = tokio::time::Instant::now();
            Box::pin(self.answer(&state)).await?;
            // Time spent on the agent's side does not count against the function.
            clock.extend(work_started.elapsed());
            if let Some(r) = state.result {
                return Ok(r);
            }
        }
    }

    /// Answers every request in `state` not answered before, in the
    /// reference's order: output blobs, function calls, watchers, request
    /// state reads, then writes and commits.
    async fn answer(&mut self, state: &fe_pb::AllocationState) -> Result<(), Driven> {
        check_request_ids(state).map_err(|e| breach(e.to_string()))?;
        for req in &state.output_blob_requests {
            self.output_blob(req).await?;
        }
        for call in &state.function_calls {
            self.function_call(call).await?;
        }
        for d in self.watchers.sync(&state.function_call_watchers)? {
            self.deliver(d).await?;
        }
        use fe_pb::allocation_request_state_operation::Operation as Op;
        let (reads, writes): (Vec<_>, Vec<_>) = state
            .request_state_operations
            .iter()
            .partition(|op| matches!(op.operation, Some(Op::PrepareRead(_))));
        for op in reads.into_iter().chain(writes) {
            self.request_state(op).await?;
        }
        Ok(())
    }

    /// Counts one more request of `kind`; the first past its per-allocation
    /// limit is a [`breach`].
    fn count(&mut self, kind: Capped) -> Result<(), Driven> {
        let (max, what, flag) = kind.bound(&self.shared.config.allocation_limits);
        let n = &mut self.counts[kind as usize];
        *n += 1;
        if *n > max {
            return Err(breach(format!(
                "the function asked for more than {max} {what}, the per-allocation limit (--{flag})"
            )));
        }
        Ok(())
    }

    async fn send(&mut self, update: fe_pb::allocation_update::Update) -> Result<(), Driven> {
        send_update(self.client, &self.alloc_id, update).await
    }

    async fn output_blob(
        &mut self,
        req: &fe_pb::AllocationOutputBlobRequest,
    ) -> Result<(), Driven> {
        let id = req.id.clone().unwrap_or_default();
        if !self.answered.insert(format!("blob:{id}")) {
            return Ok(());
        }
        self.count(Capped::OutputBlob)?;
        let uri = format!(
            "{}.{}.{}.output",
            self.alloc
                .request_data_payload_uri_prefix
                .as_deref()
                .unwrap_or(""),
            self.alloc_id,
            id
        );
        let size = req.size.unwrap_or(0);
        let blobs = &self.shared.config.blob_store;
        let prepared = async {
            let max = self.shared.config.max_output_blob_bytes;
            if size > max {
                return Err(format!("a {size}-byte output is over the {max}-byte limit"));
            }
            // Asked again after a restart (the answer never reached it):
            // the recorded upload is given again, not a second one.
            let recorded = self
                .uploads
                .map
                .get(&id)
                .filter(|u| !u.completed && u.uri == uri)
                .map(|u| u.upload_id.clone());
            let upload_id = match recorded {
                Some(upload_id) => upload_id,
                None => blobs
                    .create_multipart(&uri)
                    .await
                    .map_err(|e| e.to_string())?,
            };
            match blobs
                .presign_write_parts(&uri, &upload_id, size, self.allocation_timeout)
                .await
            {
                Ok(c) => Ok((upload_id, c)),
                Err(e) => {
                    let _ = blobs.abort_multipart(&uri, &upload_id).await;
                    Err(e.to_string())
                }
            }
        }
        .await;
        let update = match prepared {
            Ok((upload_id, chunks)) => {
                let upload = Upload::open(uri, upload_id);
                if let Some(store) = &self.shared.adoption {
                    // On record before the worker gets its URLs.
                    store.output_created(&self.alloc_id, record_of(&id, &upload));
                    injected_kill(&self.shared, KillPoint::UploadRecorded);
                }
                self.uploads.map.insert(id.clone(), upload);
                fe_pb::AllocationOutputBlob {
                    status: Some(status(0, "")),
                    blob: Some(fe_pb::Blob {
                        id: Some(id),
                        chunks: to_chunks(chunks),
                    }),
                }
            }
            Err(e) => {
                self.shared.event(
                    "output_blob_error",
                    &self.alloc_id,
                    format!("output blob {id}: {e}"),
                );
                fe_pb::AllocationOutputBlob {
                    status: Some(status(CODE_INTERNAL, e)),
                    blob: Some(fe_pb::Blob {
                        id: Some(id),
                        chunks: Vec::new(),
                    }),
                }
            }
        };
        self.send(fe_pb::allocation_update::Update::OutputBlob(update))
            .await
    }

    /// Queues a nested call for the server (the worker hears whether it was
    /// created when the server answers); a call that cannot even be sent is
    /// refused at once.
    async fn function_call(&mut self, call: &fe_pb::AllocationFunctionCall) -> Result<(), Driven> {
        let id = call
            .id
            .clone()
            .or_else(|| {
                call.updates
                    .as_ref()
                    .and_then(|u| u.root_function_call_id.clone())
            })
            .unwrap_or_default();
        if !self.answered.insert(format!("call:{id}")) {
            return Ok(());
        }
        self.count(Capped::FunctionCall)?;
        if self.created_before.remove(&id) {
            // The server created it before the restart; the worker never
            // heard: it hears now.
            return self.answer_call(id, Ok(())).await;
        }
        if let Some(u) = &call.updates {
            plan::check_namespace(u, namespace_of(self.alloc))
                .map_err(|e| breach(format!("a nested function call: {e}")))?;
        }
        match calls::prepare(&self.shared, self.alloc, call, &mut self.uploads.map).await {
            Ok(request) => {
                let shared = &self.shared;
                self.calls
                    .get_or_insert_with(|| calls::Sender::new(shared.clone()))
                    .push(id, request)
                    .map_err(|e| breach(e.to_string()))
            }
            Err(refused) => self.answer_call(id, Err(refused)).await,
        }
    }

    /// Tells the worker whether its call was created.
    async fn answer_call(
        &mut self,
        id: String,
        outcome: Result<(), calls::Refused>,
    ) -> Result<(), Driven> {
        let status = match outcome {
            Ok(()) => {
                if let Some(store) = &self.shared.adoption {
                    // After a restart the server is not asked again.
                    store.call_created(&self.alloc_id, &id);
                    injected_kill(&self.shared, KillPoint::CallRecorded);
                }
                status(0, "")
            }
            Err(r) => {
                self.shared.event(
                    "function_call_refused",
                    &self.alloc_id,
                    format!("function call {id}: {}", r.message),
                );
                status(r.code, r.message)
            }
        };
        let update = fe_pb::allocation_update::Update::FunctionCallCreationResult(
            fe_pb::AllocationFunctionCallCreationResult {
                function_call_id: Some(id.clone()),
                allocation_function_call_id: Some(id),
                status: Some(status),
            },
        );
        self.send(update).await
    }

    /// Hands a watcher its result (once), with read URIs for the value.
    async fn deliver(&mut self, d: Delivery) -> Result<(), Driven> {
        if !self.watchers.take(&d.watcher_id) {
            return Ok(()); // Gone (user timeout) or already served.
        }
        let r = &d.result;
        let blobs = &self.shared.config.blob_store;
        let valid_for = self.allocation_timeout;
        let max_bytes = self.shared.config.max_input_blob_bytes;
        let mut out = fe_pb::AllocationFunctionCallResult {
            function_call_id: r.function_call_id.clone(),
            watcher_id: Some(d.watcher_id.clone()),
            outcome_code: Some(match r.outcome_code() {
                pb::AllocationOutcomeCode::Success => fe_pb::AllocationOutcomeCode::Success,
                pb::AllocationOutcomeCode::Failure => fe_pb::AllocationOutcomeCode::Failure,
                pb::AllocationOutcomeCode::Unknown => fe_pb::AllocationOutcomeCode::Unknown,
            } as i32),
            value_output: None,
            value_blob: None,
            request_error_output: None,
            request_error_blob: None,
        };
        let unreadable = |what: &str, e: Unreadable| Driven {
            reason: pb::AllocationFailureReason::InternalError,
            kill: None,
            message: format!(
                "the {what} of function call {:?} cannot be handed to the worker: {e}",
                r.function_call_id
            ),
        };
        if let Some(p) = &r.return_value {
            let (so, blob) = readable(blobs, p, valid_for, max_bytes)
                .await
                .map_err(|e| unreadable("value", e))?;
            out.value_output = Some(so);
            out.value_blob = Some(blob);
        }
        if let Some(p) = &r.request_error {
            let (so, blob) = readable(blobs, p, valid_for, max_bytes)
                .await
                .map_err(|e| unreadable("request error", e))?;
            out.request_error_output = Some(so);
            out.request_error_blob = Some(blob);
        }
        self.send(fe_pb::allocation_update::Update::FunctionCallResult(out))
            .await
    }

    async fn request_state(
        &mut self,
        op: &fe_pb::AllocationRequestStateOperation,
    ) -> Result<(), Driven> {
        let id = op.operation_id.clone().unwrap_or_default();
        if !self.answered.insert(format!("state:{id}")) {
            return Ok(());
        }
        use fe_pb::allocation_request_state_operation::Operation as Op;
        if matches!(op.operation, Some(Op::PrepareWrite(_))) {
            self.count(Capped::StateWrite)?;
        }
        self.count(Capped::StateOp)?;
        let prefix = self
            .alloc
            .request_data_payload_uri_prefix
            .as_deref()
            .unwrap_or("");
        let result = request_state::serve(
            &self.shared.config.blob_store,
            prefix,
            op,
            &mut self.uploads.state_writes,
            self.allocation_timeout,
            self.shared.config.max_output_blob_bytes,
            self.shared.config.max_input_blob_bytes,
        )
        .await;
        let code = result.status.as_ref().map(|s| s.code).unwrap_or(0);
        self.shared.metrics.request_state_operation(op, code);
        self.send(fe_pb::allocation_update::Update::RequestStateOperationResult(result))
            .await
    }
}

/// The allocation's deadline: `allocation_timeout` from the last progress,
/// extended by time spent on the agent's side, and paused while a watcher
/// waits for a function call result, up to `max_wait` per wait.
struct Deadline {
    timeout: Duration,
    max_wait: Duration,
    at: tokio::time::Instant,
    waiting_since: Option<tokio::time::Instant>,
}

impl Deadline {
    fn new(timeout: Duration, max_wait: Duration) -> Self {
        Deadline {
            timeout,
            max_wait,
            at: tokio::time::Instant::now() + timeout,
            waiting_since: None,
        }
    }

    fn reset(&mut self) {
        self.at = tokio::time::Instant::now() + self.timeout;
    }

    fn extend(&mut self, by: Duration) {
        self.at += by;
    }

    /// Notes whether a watcher is waiting now; the time waited is added to
    /// the deadline when the wait ends.
    fn waiting(&mut self, pending: bool) {
        let now = tokio::time::Instant::now();
        match (pending, self.waiting_since) {
            (true, None) => self.waiting_since = Some(now),
            (false, Some(since)) => {
                self.at += now.duration_since(since);
                self.waiting_since = None;
            }
            _ => {}
        }
    }

    fn wake_at(&self) -> tokio::time::Instant {
        match self.waiting_since {
            Some(since) => since + self.max_wait,
            None => self.at,
        }
    }

    fn expired(&self) -> Driven {
        let message = match self.waiting_since {
            Some(_) => format!(
                "waited {} s for a function call result without getting one (max-function-call-wait-s); the call was lost or is stuck",
                self.max_wait.as_secs()
            ),
            None => format!("no progress within {} ms", self.timeout.as_millis()),
        };
        Driven {
            reason: pb::AllocationFailureReason::FunctionTimeout,
            kill: Some(pb::FunctionExecutorTerminationReason::FunctionTimeout),
            message,
        }
    }
}

/// The watchers an allocation has open, registered with the agent-wide
/// registry; dropping this unregisters them all (allocation ended or
/// cancelled).
struct Watchers {
    shared: Arc<Shared>,
    alloc_id: String,
    /// Namespace, application and request of every watch of this allocation.
    base: pb::FunctionCallWatch,
    tx: mpsc::UnboundedSender<Delivery>,
    /// Watcher id -> (its watch, result already sent).
    live: HashMap<String, (pb::FunctionCallWatch, bool)>,
}

impl Watchers {
    fn new(
        shared: Arc<Shared>,
        alloc: &pb::Allocation,
        tx: mpsc::UnboundedSender<Delivery>,
    ) -> Self {
        let f = alloc.function.clone().unwrap_or_default();
        Watchers {
            shared,
            alloc_id: alloc.allocation_id.clone().unwrap_or_default(),
            base: pb::FunctionCallWatch {
                namespace: f.namespace,
                application: f.application_name,
                request_id: alloc.request_id.clone(),
                function_call_id: None,
            },
            tx,
            live: HashMap::new(),
        }
    }

    /// Whether a watcher still waits for its result.
    fn pending(&self) -> bool {
        self.live.values().any(|(_, sent)| !sent)
    }

    /// Marks `watcher_id` served; false when it is gone or was served.
    fn take(&mut self, watcher_id: &str) -> bool {
        match self.live.get_mut(watcher_id) {
            Some((_, sent)) if !*sent => {
                *sent = true;
                true
            }
            _ => false,
        }
    }

    /// Follows the worker's watcher list: registers new watchers, drops
    /// vanished ones. Returns results to hand over at once (kept results,
    /// and failures for watchers that name no call). A list over a bound
    /// (too many watchers, an id too long, more watches than the host's
    /// budget or the allocation's share of it leaves room for) fails the
    /// allocation, naming the bound, and stops its worker: the running
    /// function cannot be stopped otherwise.
    fn sync(
        &mut self,
        list: &[fe_pb::AllocationFunctionCallWatcher],
    ) -> Result<Vec<Delivery>, Driven> {
        let over_bound = |message: String| Driven {
            reason: pb::AllocationFailureReason::FunctionError,
            kill: Some(pb::FunctionExecutorTerminationReason::Unhealthy),
            message,
        };
        check_watchers(list).map_err(|e| over_bound(e.to_string()))?;
        let budget = crate::watches::budget(self.shared.config.max_server_message_bytes);
        let mut refused = None;
        let mut now = Vec::new();
        let mut changed = false;
        let present: HashSet<String> = list.iter().filter_map(watcher_id).collect();
        let count;
        {
            let mut st = self.shared.state.lock();
            let gone: Vec<String> = self
                .live
                .keys()
                .filter(|id| !present.contains(*id))
                .cloned()
                .collect();
            for id in gone {
                if let Some((watch, _)) = self.live.remove(&id) {
                    changed |= st.watches.remove(&watch, &self.alloc_id, &id);
                }
            }
            for w in list {
                let Some(id) = watcher_id(w) else { continue };
                if self.live.contains_key(&id) {
                    continue;
                }
                let call = w
                    .root_function_call_id
                    .clone()
                    .or_else(|| w.function_call_id.clone());
                let Some(call) = call.filter(|c| !c.is_empty()) else {
                    // Nothing to watch: the worker gets a failure, not a hang.
                    self.live.insert(id.clone(), (self.base.clone(), false));
                    now.push(self.failure(id));
                    continue;
                };
                let watch = pb::FunctionCallWatch {
                    function_call_id: Some(call),
                    ..self.base.clone()
                };
                let waiter = Waiter {
                    allocation_id: self.alloc_id.clone(),
                    watcher_id: id.clone(),
                    tx: self.tx.clone(),
                };
                let (added, early) = match st.watches.add(&watch, waiter, budget) {
                    Ok(added) => added,
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                };
                changed |= added;
                self.live.insert(id.clone(), (watch, false));
                if let Some(result) = early {
                    now.push(Delivery {
                        watcher_id: id,
                        result,
                    });
                }
            }
            count = st.watches.len();
        }
        self.settle(count, changed);
        match refused {
            Some(e) => Err(over_bound(e.to_string())),
            None => Ok(now),
        }
    }

    /// After the registry changed: the gauge, and a report at once when
    /// the set of reported watches changed.
    fn settle(&self, count: usize, changed: bool) {
        self.shared.metrics.function_call_watches.set(count as i64);
        if changed {
            self.shared.report_now.notify_one();
        }
    }

    fn failure(&self, watcher_id: String) -> Delivery {
        self.shared.event(
            "function_call_watcher_invalid",
            &self.alloc_id,
            format!("watcher {watcher_id} names no function call; answered with a failure"),
        );
        Delivery {
            watcher_id,
            result: Arc::new(pb::FunctionCallResult {
                namespace: self.base.namespace.clone(),
                request_id: self.base.request_id.clone(),
                function_call_id: None,
                outcome_code: Some(pb::AllocationOutcomeCode::Failure as i32),
                failure_reason: Some(pb::AllocationFailureReason::InternalError as i32),
                return_value: None,
                request_error: None,
            }),
        }
    }
}

/// A watcher list over a per-allocation bound.
#[derive(Debug, thiserror::Error)]
enum WatcherListError {
    #[error(
        "the worker lists {0} function call watchers, over the bound of {MAX_WATCHERS} per allocation (MAX_WATCHERS)"
    )]
    TooMany(usize),
    #[error(transparent)]
    Id(#[from] plan::PlanError),
}

/// The per-allocation bounds on a watcher list: at most [`MAX_WATCHERS`]
/// entries, every id at most [`plan::MAX_ID_BYTES`].
fn check_watchers(list: &[fe_pb::AllocationFunctionCallWatcher]) -> Result<(), WatcherListError> {
    if list.len() > MAX_WATCHERS {
        return Err(WatcherListError::TooMany(list.len()));
    }
    for w in list {
        for (what, id) in [
            ("a watcher id", &w.id),
            ("a watcher id", &w.watcher_id),
            ("a watched function call id", &w.function_call_id),
            ("a watched function call id", &w.root_function_call_id),
        ] {
            if let Some(id) = id {
                plan::bounded_id(what, id)?;
            }
        }
    }
    Ok(())
}

fn watcher_id(w: &fe_pb::AllocationFunctionCallWatcher) -> Option<String> {
    w.id.clone()
        .or_else(|| w.watcher_id.clone())
        .filter(|id| !id.is_empty())
}

impl Drop for Watchers {
    fn drop(&mut self) {
        if self.live.is_empty() {
            return;
        }
        let mut changed = false;
        let count = {
            let mut st = self.shared.state.lock();
            for (id, (watch, _)) in self.live.drain() {
                changed |= st.watches.remove(&watch, &self.alloc_id, &id);
            }
            st.watches.len()
        };
        self.settle(count, changed);
    }
}

async fn send_update(
    client: &mut WorkerClient,
    alloc_id: &str,
    update: fe_pb::allocation_update::Update,
) -> Result<(), Driven> {
    let msg = fe_pb::AllocationUpdate {
        allocation_id: Some(alloc_id.to_string()),
        update: Some(update),
    };
    match tokio::time::timeout(RPC_TIMEOUT, Box::pin(client.send_allocation_update(msg))).await {
        Ok(Ok(_)) => Ok(()),
        // The allocation finished meanwhile; its result is on the way.
        Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition => Ok(()),
        Ok(Err(s)) => Err(rpc_failure("send_allocation_update", &s)),
        Err(_) => Err(rpc_failure(
            "send_allocation_update",
            &tonic::Status::deadline_exceeded("no answer"),
        )),
    }
}

pub(crate) fn status(code: i32, message: impl Into<String>) -> steward_proto::google::rpc::Status {
    steward_proto::google::rpc::Status {
        code,
        message: message.into(),
        details: Vec::new(),
    }
}

async fn abort_all(shared: &Arc<Shared>, uploads: HashMap<String, Upload>, extra: Option<Upload>) {
    for up in uploads.into_values().chain(extra).filter(|u| !u.completed) {
        if let Err(e) = shared
            .config
            .blob_store
            .abort_multipart(&up.uri, &up.upload_id)
            .await
        {
            tracing::warn!(uri = %up.uri, error = %e, "aborting upload failed");
        }
    }
}

/// The test-only fault ([`crate::AgentConfig::test_kill_at`]): the agent
/// SIGKILLs itself at `at`, as a kill from outside might land there.
fn injected_kill(shared: &Shared, at: KillPoint) {
    if shared.config.test_kill_at == Some(at) {
        tracing::warn!(?at, "fault injected: the agent kills itself");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_over_the_id_bound_are_refused_by_name() {
        let long = "i".repeat(plan::MAX_ID_BYTES + 1);
        let fine = "i".repeat(plan::MAX_ID_BYTES);
        let blob = |id: &str| fe_pb::AllocationState {
            output_blob_requests: vec![fe_pb::AllocationOutputBlobRequest {
                id: Some(id.into()),
                size: Some(1),
            }],
            ..Default::default()
        };
        let call = |id: &str| fe_pb::AllocationState {
            function_calls: vec![fe_pb::AllocationFunctionCall {
                id: Some(id.into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let op = |id: &str| fe_pb::AllocationState {
            request_state_operations: vec![fe_pb::AllocationRequestStateOperation {
                operation_id: Some(id.into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        for (make, what) in [
            (
                &blob as &dyn Fn(&str) -> fe_pb::AllocationState,
                "output blob id",
            ),
            (&call, "function call id"),
            (&op, "request-state operation id"),
        ] {
            assert_eq!(check_request_ids(&make(&fine)), Ok(()), "{what}");
            let e = check_request_ids(&make(&long)).expect_err(what);
            assert!(e.contains(what) && e.contains("MAX_ID_BYTES"), "{e}");
        }
        let root = fe_pb::AllocationState {
            function_calls: vec![fe_pb::AllocationFunctionCall {
                id: Some("c".into()),
                updates: Some(fe_pb::ExecutionPlanUpdates {
                    root_function_call_id: Some(long),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(check_request_ids(&root).is_err_and(|e| e.contains("root call id")));
    }

    #[test]
    fn a_waiting_watcher_pauses_the_deadline_up_to_the_ceiling() {
        let mut d = Deadline::new(Duration::from_secs(10), Duration::from_secs(3));
        let due = d.at;
        assert_eq!(d.wake_at(), due);
        assert!(d.expired().message.contains("no progress within 10000 ms"));

        d.waiting(true);
        let since = d.waiting_since.expect("waiting");
        assert_eq!(
            d.wake_at(),
            since + Duration::from_secs(3),
            "the ceiling, not the deadline"
        );
        let expired = d.expired();
        assert!(
            expired
                .message
                .contains("waited 3 s for a function call result"),
            "{}",
            expired.message
        );
        assert_eq!(expired.reason, pb::AllocationFailureReason::FunctionTimeout);
        d.waiting(true);
        assert_eq!(
            d.waiting_since,
            Some(since),
            "a wait is not restarted while it lasts"
        );

        d.waiting(false);
        assert!(d.waiting_since.is_none());
        assert!(d.at >= due, "time spent waiting is added to the deadline");
        assert_eq!(d.wake_at(), d.at);
    }
}
