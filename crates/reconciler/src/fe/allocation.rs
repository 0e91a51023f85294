//! Running one allocation on an initialized worker: prepare inputs (chunked
//! read URIs for args, a writable request-error blob), `create_allocation`,
//! follow `watch_allocation_state` answering the worker's requests, enforce
//! the dynamic deadline, `delete_allocation`, finish uploads and turn the
//! worker's result into the server's `AllocationResult`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::fe_pb::function_executor_client::FunctionExecutorClient;
use crate::state::Shared;
use crate::{fe_pb, pb};

/// Deadline of `create_allocation`, `send_allocation_update` and `delete_allocation`.
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// Size offered for a request error payload.
const REQUEST_ERROR_BLOB_BYTES: u64 = 10 * 1024 * 1024;
/// gRPC status code for "not implemented".
const CODE_UNIMPLEMENTED: i32 = 12;
const CODE_INTERNAL: i32 = 13;

pub(crate) struct AllocOutcome {
    pub result: pb::AllocationResult,
    /// Set when the worker must be killed (timeout, broken worker).
    pub kill_fe: Option<pb::FunctionExecutorTerminationReason>,
}

#[derive(Clone)]
struct Upload {
    uri: String,
    upload_id: String,
}

/// Open uploads of a running allocation, aborted if dropped while armed.
struct OpenUploads {
    shared: Arc<Shared>,
    map: HashMap<String, Upload>,
    request_error: Option<Upload>,
}

impl OpenUploads {
    /// Hands the uploads to the caller, who now completes or aborts them.
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
            .map(|(_, u)| u)
            .chain(self.request_error.take())
            .collect();
        if open.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            rt.spawn(async move {
                for up in open {
                    if let Err(e) = shared.config.blob_store.abort_multipart(&up.uri, &up.upload_id).await {
                        tracing::warn!(uri = %up.uri, error = %e, "aborting an abandoned upload failed");
                    }
                }
            });
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

fn to_chunks(chunks: Vec<steward_blob_store::Chunk>) -> Vec<fe_pb::BlobChunk> {
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

pub(crate) async fn run(
    shared: Arc<Shared>,
    mut client: FunctionExecutorClient<Channel>,
    allocation_timeout: Duration,
    alloc: pb::Allocation,
) -> AllocOutcome {
    let blobs = &shared.config.blob_store;
    let alloc_id = alloc.allocation_id.clone().unwrap_or_default();
    let fail = |reason, duration, kill| AllocOutcome {
        result: failed_result(&alloc, reason, duration),
        kill_fe: kill,
    };

    // Prepare inputs.
    let mut args = Vec::new();
    let mut arg_blobs = Vec::new();
    for (i, p) in alloc.args.iter().enumerate() {
        let uri = p.uri.clone().unwrap_or_default();
        let covered = p.offset.unwrap_or(0) + p.size.unwrap_or(0);
        match blobs.presign_read(&uri, covered, allocation_timeout).await {
            Ok(chunks) => arg_blobs.push(fe_pb::Blob {
                id: None,
                chunks: to_chunks(chunks),
            }),
            Err(e) => {
                shared.event(
                    "allocation_input_error",
                    &alloc_id,
                    format!("args[{i}]: {e}"),
                );
                return fail(pb::AllocationFailureReason::InternalError, None, None);
            }
        }
        args.push(fe_pb::SerializedObjectInsideBlob {
            manifest: Some(manifest_of(p)),
            offset: Some(p.offset.unwrap_or(0)),
        });
    }
    let request_error_uri = format!(
        "{}.{}.req_error",
        alloc
            .request_error_payload_uri_prefix
            .as_deref()
            .unwrap_or(""),
        alloc.request_id.as_deref().unwrap_or("")
    );
    let request_error_upload = match blobs.create_multipart(&request_error_uri).await {
        Ok(upload_id) => Upload {
            uri: request_error_uri.clone(),
            upload_id,
        },
        Err(e) => {
            shared.event(
                "allocation_input_error",
                &alloc_id,
                format!("request error blob: {e}"),
            );
            return fail(pb::AllocationFailureReason::InternalError, None, None);
        }
    };
    let request_error_chunks = match blobs
        .presign_write_parts(
            &request_error_uri,
            &request_error_upload.upload_id,
            REQUEST_ERROR_BLOB_BYTES,
            allocation_timeout,
        )
        .await
    {
        Ok(c) => c,
        Err(e) => {
            let _ = blobs
                .abort_multipart(&request_error_uri, &request_error_upload.upload_id)
                .await;
            shared.event(
                "allocation_input_error",
                &alloc_id,
                format!("request error blob: {e}"),
            );
            return fail(pb::AllocationFailureReason::InternalError, None, None);
        }
    };
    let request = fe_pb::CreateAllocationRequest {
        allocation: Some(fe_pb::Allocation {
            request_id: alloc.request_id.clone(),
            function_call_id: alloc.function_call_id.clone(),
            allocation_id: alloc.allocation_id.clone(),
            inputs: Some(fe_pb::FunctionInputs {
                args,
                arg_blobs,
                request_error_blob: Some(fe_pb::Blob {
                    id: Some("request_error_blob".into()),
                    chunks: to_chunks(request_error_chunks),
                }),
                function_call_metadata: Some(
                    alloc.function_call_metadata.clone().unwrap_or_default(),
                ),
            }),
            result: None,
        }),
    };

    let started = Instant::now();
    // Owns the open uploads while the worker runs: if this task is dropped
    // (allocation cancelled, worker killed) they are aborted, not leaked.
    let mut guard = OpenUploads {
        shared: shared.clone(),
        map: HashMap::new(),
        request_error: Some(request_error_upload.clone()),
    };
    let outcome = drive(
        &shared,
        &mut client,
        &alloc_id,
        request,
        allocation_timeout,
        &alloc,
        &mut guard.map,
    )
    .await;
    let mut uploads = guard.disarm();
    let duration_ms = ceil_ms(started.elapsed());
    shared
        .metrics
        .allocation_run_latency
        .observe(started.elapsed().as_secs_f64());

    let (fe_result, kill) = match outcome {
        Ok(r) => (r, None),
        Err(Driven {
            reason,
            kill,
            message,
        }) => {
            shared.event("allocation_failed", &alloc_id, message);
            abort_all(&shared, uploads, Some(request_error_upload)).await;
            return fail(reason, Some(duration_ms), kill);
        }
    };

    // Finish uploads: complete the ones the worker used, abort the rest.
    let mut result = pb::AllocationResult {
        function: alloc.function.clone().map(with_version),
        allocation_id: alloc.allocation_id.clone(),
        function_call_id: alloc.function_call_id.clone(),
        request_id: alloc.request_id.clone(),
        outcome_code: None,
        failure_reason: None,
        return_value: None,
        request_error: None,
        execution_duration_ms: Some(duration_ms),
    };
    let mut outputs_uri = None;
    if let Some(blob) = &fe_result.uploaded_function_outputs_blob {
        let id = blob.id.clone().unwrap_or_default();
        match uploads.remove(&id) {
            Some(up) => {
                let etags: Vec<String> = blob
                    .chunks
                    .iter()
                    .map(|c| c.etag.clone().unwrap_or_default())
                    .collect();
                if let Err(e) = blobs
                    .complete_multipart(&up.uri, &up.upload_id, &etags)
                    .await
                {
                    shared.event(
                        "allocation_failed",
                        &alloc_id,
                        format!("completing output upload: {e}"),
                    );
                    abort_all(&shared, uploads, Some(request_error_upload)).await;
                    return fail(
                        pb::AllocationFailureReason::InternalError,
                        Some(duration_ms),
                        None,
                    );
                }
                outputs_uri = Some(up.uri);
            }
            None => {
                shared.event(
                    "allocation_failed",
                    &alloc_id,
                    format!("worker reported output blob {id:?} that was never requested"),
                );
                abort_all(&shared, uploads, Some(request_error_upload)).await;
                return fail(
                    pb::AllocationFailureReason::FunctionError,
                    Some(duration_ms),
                    None,
                );
            }
        }
    }
    let mut request_error_kept = None;
    if fe_result.uploaded_request_error_blob.is_some() {
        let etags: Vec<String> = fe_result
            .uploaded_request_error_blob
            .iter()
            .flat_map(|b| b.chunks.iter().map(|c| c.etag.clone().unwrap_or_default()))
            .collect();
        match blobs
            .complete_multipart(
                &request_error_upload.uri,
                &request_error_upload.upload_id,
                &etags,
            )
            .await
        {
            Ok(()) => request_error_kept = Some(request_error_upload.uri.clone()),
            Err(e) => {
                tracing::warn!(allocation = %alloc_id, error = %e, "completing request error upload failed")
            }
        }
    }
    abort_all(
        &shared,
        uploads,
        if request_error_kept.is_some() {
            None
        } else {
            Some(request_error_upload)
        },
    )
    .await;

    use fe_pb::AllocationFailureReason as F;
    let success = fe_result.outcome_code == Some(fe_pb::AllocationOutcomeCode::Success as i32);
    if success {
        result.outcome_code = Some(pb::AllocationOutcomeCode::Success as i32);
    } else {
        result.outcome_code = Some(pb::AllocationOutcomeCode::Failure as i32);
        let reason = match F::try_from(fe_result.failure_reason.unwrap_or(0)) {
            Ok(F::RequestError) => pb::AllocationFailureReason::RequestError,
            // A worker-side internal error is a grey failure: attributed to the function.
            _ => pb::AllocationFailureReason::FunctionError,
        };
        result.failure_reason = Some(reason as i32);
    }
    match (&fe_result.outputs, &outputs_uri) {
        (Some(fe_pb::allocation_result::Outputs::Value(v)), Some(uri)) => {
            result.return_value = Some(pb::allocation_result::ReturnValue::Value(payload_in_blob(
                v, uri,
            )));
        }
        (Some(fe_pb::allocation_result::Outputs::Updates(u)), _) => {
            match convert_updates(u, outputs_uri.as_deref()) {
                Ok(u) => result.return_value = Some(pb::allocation_result::ReturnValue::Updates(u)),
                Err(e) => {
                    shared.event("allocation_failed", &alloc_id, e);
                    return fail(
                        pb::AllocationFailureReason::FunctionError,
                        Some(duration_ms),
                        None,
                    );
                }
            }
        }
        _ => {}
    }
    if let (Some(out), Some(uri)) = (&fe_result.request_error_output, &request_error_kept) {
        result.request_error = Some(payload_in_blob(out, uri));
    }
    AllocOutcome {
        result,
        kill_fe: kill,
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
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(rpc_failure(what, &status)),
        Err(_) => Err(rpc_failure(
            what,
            &tonic::Status::deadline_exceeded("no answer"),
        )),
    }
}

/// Runs the allocation on the worker until it has a result.
async fn drive(
    shared: &Arc<Shared>,
    client: &mut FunctionExecutorClient<Channel>,
    alloc_id: &str,
    request: fe_pb::CreateAllocationRequest,
    allocation_timeout: Duration,
    alloc: &pb::Allocation,
    uploads: &mut HashMap<String, Upload>,
) -> Result<fe_pb::AllocationResult, Driven> {
    with_deadline("create_allocation", client.create_allocation(request)).await?;
    let watch = fe_pb::WatchAllocationStateRequest {
        allocation_id: Some(alloc_id.to_string()),
    };
    let mut stream = with_deadline(
        "watch_allocation_state",
        client.watch_allocation_state(watch),
    )
    .await?;
    let mut deadline = tokio::time::Instant::now() + allocation_timeout;
    let mut last_progress: Option<(u32, u32)> = None;
    let mut answered: HashSet<String> = HashSet::new();
    let result = loop {
        let next = tokio::select! {
            m = stream.message() => m,
            _ = tokio::time::sleep_until(deadline) => {
                return Err(Driven {
                    reason: pb::AllocationFailureReason::FunctionTimeout,
                    kill: Some(pb::FunctionExecutorTerminationReason::FunctionTimeout),
                    message: format!("no progress within {} ms", allocation_timeout.as_millis()),
                });
            }
        };
        let state = match next {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(Driven {
                    reason: pb::AllocationFailureReason::FunctionError,
                    kill: None,
                    message: "worker ended the state stream without a result".into(),
                });
            }
            Err(status) => return Err(rpc_failure("watch_allocation_state", &status)),
        };
        let progress = state
            .progress
            .map(|p| (p.current.to_bits(), p.total.to_bits()));
        if progress.is_some() && progress != last_progress {
            last_progress = progress;
            deadline = tokio::time::Instant::now() + allocation_timeout;
        }
        let work_started = tokio::time::Instant::now();
        answer_requests(
            shared,
            client,
            alloc_id,
            alloc,
            &state,
            &mut answered,
            uploads,
            allocation_timeout,
        )
        .await?;
        // Time spent on the agent's side does not count against the function.
        deadline += work_started.elapsed();
        if let Some(r) = state.result {
            break r;
        }
    };
    let delete = fe_pb::DeleteAllocationRequest {
        allocation_id: Some(alloc_id.to_string()),
    };
    if let Err(d) = with_deadline("delete_allocation", client.delete_allocation(delete)).await {
        tracing::warn!(allocation = alloc_id, error = %d.message, "delete_allocation failed");
    }
    Ok(result)
}

async fn send_update(
    client: &mut FunctionExecutorClient<Channel>,
    alloc_id: &str,
    update: fe_pb::allocation_update::Update,
) -> Result<(), Driven> {
    let msg = fe_pb::AllocationUpdate {
        allocation_id: Some(alloc_id.to_string()),
        update: Some(update),
    };
    match tokio::time::timeout(RPC_TIMEOUT, client.send_allocation_update(msg)).await {
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

fn status(code: i32, message: impl Into<String>) -> steward_proto::google::rpc::Status {
    steward_proto::google::rpc::Status {
        code,
        message: message.into(),
        details: Vec::new(),
    }
}

/// Answers every request in `state` not answered before.
async fn answer_requests(
    shared: &Arc<Shared>,
    client: &mut FunctionExecutorClient<Channel>,
    alloc_id: &str,
    alloc: &pb::Allocation,
    state: &fe_pb::AllocationState,
    answered: &mut HashSet<String>,
    uploads: &mut HashMap<String, Upload>,
    valid_for: Duration,
) -> Result<(), Driven> {
    use fe_pb::allocation_update::Update;
    let blobs = &shared.config.blob_store;
    for req in &state.output_blob_requests {
        let id = req.id.clone().unwrap_or_default();
        if !answered.insert(format!("blob:{id}")) {
            continue;
        }
        let uri = format!(
            "{}.{}.{}.output",
            alloc
                .request_data_payload_uri_prefix
                .as_deref()
                .unwrap_or(""),
            alloc_id,
            id
        );
        let size = req.size.unwrap_or(0);
        let prepared = async {
            let upload_id = blobs.create_multipart(&uri).await?;
            let chunks = blobs
                .presign_write_parts(&uri, &upload_id, size, valid_for)
                .await;
            match chunks {
                Ok(c) => Ok((upload_id, c)),
                Err(e) => {
                    let _ = blobs.abort_multipart(&uri, &upload_id).await;
                    Err(e)
                }
            }
        }
        .await;
        let update = match prepared {
            Ok((upload_id, chunks)) => {
                uploads.insert(
                    id.clone(),
                    Upload {
                        uri: uri.clone(),
                        upload_id,
                    },
                );
                fe_pb::AllocationOutputBlob {
                    status: Some(status(0, "")),
                    blob: Some(fe_pb::Blob {
                        id: Some(id.clone()),
                        chunks: to_chunks(chunks),
                    }),
                }
            }
            Err(e) => {
                shared.event(
                    "output_blob_error",
                    alloc_id,
                    format!("output blob {id}: {e}"),
                );
                fe_pb::AllocationOutputBlob {
                    status: Some(status(CODE_INTERNAL, e.to_string())),
                    blob: None,
                }
            }
        };
        send_update(client, alloc_id, Update::OutputBlob(update)).await?;
    }
    for call in &state.function_calls {
        let id = call.id.clone().unwrap_or_default();
        if !answered.insert(format!("call:{id}")) {
            continue;
        }
        let root = call
            .updates
            .as_ref()
            .and_then(|u| u.root_function_call_id.clone());
        let update =
            Update::FunctionCallCreationResult(fe_pb::AllocationFunctionCallCreationResult {
                function_call_id: root,
                allocation_function_call_id: Some(id),
                status: Some(status(
                    CODE_UNIMPLEMENTED,
                    "function calls from running functions are not supported by this agent yet",
                )),
            });
        send_update(client, alloc_id, update).await?;
    }
    for op in &state.request_state_operations {
        let id = op.operation_id.clone().unwrap_or_default();
        if !answered.insert(format!("state:{id}")) {
            continue;
        }
        let update =
            Update::RequestStateOperationResult(fe_pb::AllocationRequestStateOperationResult {
                operation_id: Some(id),
                status: Some(status(
                    CODE_UNIMPLEMENTED,
                    "request state is not supported by this agent yet",
                )),
                result: None,
            });
        send_update(client, alloc_id, update).await?;
    }
    Ok(())
}

async fn abort_all(shared: &Arc<Shared>, uploads: HashMap<String, Upload>, extra: Option<Upload>) {
    for up in uploads.into_values().chain(extra) {
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

/// A server payload for a serialized object stored in the blob at `uri`.
fn payload_in_blob(so: &fe_pb::SerializedObjectInsideBlob, uri: &str) -> pb::DataPayload {
    let m = so.manifest.clone().unwrap_or_default();
    let encoding = match m.encoding {
        Some(e) if e == fe_pb::SerializedObjectEncoding::BinaryZip as i32 => {
            pb::DataPayloadEncoding::Unknown as i32
        }
        Some(e) => e,
        None => pb::DataPayloadEncoding::Unknown as i32,
    };
    pb::DataPayload {
        uri: Some(uri.to_string()),
        encoding: Some(encoding),
        encoding_version: Some(m.encoding_version.unwrap_or(0)),
        content_type: m.content_type,
        metadata_size: Some(m.metadata_size.unwrap_or(0)),
        offset: Some(so.offset.unwrap_or(0)),
        size: m.size,
        sha256_hash: m.sha256_hash,
        source_function_call_id: Some(m.source_function_call_id.unwrap_or_default()),
        id: None,
    }
}

fn convert_ref(f: &fe_pb::FunctionRef) -> pb::FunctionRef {
    pb::FunctionRef {
        namespace: f.namespace.clone(),
        application_name: f.application_name.clone(),
        function_name: f.function_name.clone(),
        application_version: Some(f.application_version.clone().unwrap_or_default()),
    }
}

fn convert_arg(a: &fe_pb::FunctionArg, blob_uri: Option<&str>) -> Result<pb::FunctionArg, String> {
    use fe_pb::function_arg::Source as S;
    let source = match &a.source {
        Some(S::FunctionCallId(id)) => pb::function_arg::Source::FunctionCallId(id.clone()),
        Some(S::Value(v)) => {
            let uri = blob_uri
                .ok_or("function call argument refers to an outputs blob that was not uploaded")?;
            pb::function_arg::Source::InlineData(payload_in_blob(v, uri))
        }
        None => return Err("function call argument has no source".into()),
    };
    Ok(pb::FunctionArg {
        source: Some(source),
    })
}

/// Converts the worker's execution plan updates into the server's form.
fn convert_updates(
    u: &fe_pb::ExecutionPlanUpdates,
    blob_uri: Option<&str>,
) -> Result<pb::ExecutionPlanUpdates, String> {
    use fe_pb::execution_plan_update::Op as FOp;
    use pb::execution_plan_update::Op;
    let mut updates = Vec::new();
    for up in &u.updates {
        let op = match &up.op {
            Some(FOp::FunctionCall(c)) => Op::FunctionCall(pb::FunctionCall {
                id: Some(c.id.clone().unwrap_or_default()),
                target: c.target.as_ref().map(convert_ref),
                args: c
                    .args
                    .iter()
                    .map(|a| convert_arg(a, blob_uri))
                    .collect::<Result<_, _>>()?,
                call_metadata: Some(c.call_metadata.clone().unwrap_or_default()),
            }),
            Some(FOp::Reduce(r)) => Op::Reduce(pb::ReduceOp {
                id: r.id.clone(),
                collection: r
                    .collection
                    .iter()
                    .map(|a| convert_arg(a, blob_uri))
                    .collect::<Result<_, _>>()?,
                reducer: r.reducer.as_ref().map(convert_ref),
                call_metadata: Some(r.call_metadata.clone().unwrap_or_default()),
            }),
            None => return Err("execution plan update without an operation".into()),
        };
        updates.push(pb::ExecutionPlanUpdate { op: Some(op) });
    }
    Ok(pb::ExecutionPlanUpdates {
        updates,
        root_function_call_id: Some(u.root_function_call_id.clone().unwrap_or_default()),
        start_at: u.start_at,
    })
}
