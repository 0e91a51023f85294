//! Nested function calls: a worker's `AllocationFunctionCall` becomes a
//! `call_function` to the server.
//!
//! Unlike the reference (which fires the RPC without awaiting it), the call
//! is awaited: transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, a few
//! INTERNAL) are retried with backoff, and a definite refusal goes back to
//! the worker as a failed creation result carrying the server's message,
//! so user code raises instead of waiting forever. Calls of one allocation
//! are made one after another, in the order the worker created them, by a
//! [`Sender`] of their own, so an allocation keeps serving its worker's
//! other requests while a call waits out a server outage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use tracing::Instrument;

use super::allocation::{Upload, etags};
use super::plan;
use crate::state::Shared;
use crate::{fe_pb, pb};

/// Deadline of one `call_function` attempt (the reference's).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries of transient failures before giving up.
const MAX_RETRIES: usize = 8;
/// INTERNAL is what the server answers for a malformed plan, which no
/// retry mends; a few retries still cover a failed state-store write.
const MAX_INTERNAL_RETRIES: u32 = 2;

const CODE_INTERNAL: i32 = 13;
/// Most bytes of requests one allocation may have waiting for the server
/// (queued or being sent). A real worker creates its calls one at a time
/// per user thread, each a few KiB; each is at most
/// [`plan::MAX_PLAN_BYTES`], so at least 64 fit.
pub(crate) const MAX_QUEUED_CALL_BYTES: usize = 64 << 20;

/// Why a function call was not created; goes back to the worker.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Refused {
    pub code: i32,
    pub message: String,
}

impl Refused {
    fn local(message: impl Into<String>) -> Refused {
        Refused {
            code: CODE_INTERNAL,
            message: message.into(),
        }
    }
}

/// A call not queued: with it, the calls waiting for the server would hold
/// more than [`MAX_QUEUED_CALL_BYTES`]. The allocation then fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{pending} function call(s) and this one would hold {total} bytes waiting for the server, \
     over the {MAX_QUEUED_CALL_BYTES}-byte bound (MAX_QUEUED_CALL_BYTES)"
)]
pub(crate) struct QueueFull {
    /// Calls already waiting.
    pub pending: usize,
    /// Their bytes and this call's.
    pub total: usize,
}

/// One allocation's calls on their way to the server, in order; outcomes
/// come back as (allocation function call id, outcome). Dropping it stops
/// the calls not yet sent. The queue is bounded by the bytes it holds
/// ([`MAX_QUEUED_CALL_BYTES`]) and, through the allocation's limit, by the
/// number of calls.
pub(crate) struct Sender {
    queue: tokio::sync::mpsc::UnboundedSender<(String, usize, pb::FunctionCallRequest)>,
    done: tokio::sync::mpsc::UnboundedReceiver<(String, usize, Result<(), Refused>)>,
    /// Calls sent to the sender whose outcome has not been taken yet.
    pending: usize,
    /// Their encoded bytes.
    pending_bytes: usize,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl Sender {
    pub fn new(shared: Arc<Shared>) -> Sender {
        let (queue, mut requests) = tokio::sync::mpsc::unbounded_channel();
        let (done_tx, done) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(
            async move {
                while let Some((id, bytes, request)) = requests.recv().await {
                    let outcome = send(&shared, request).await;
                    if done_tx.send((id, bytes, outcome)).is_err() {
                        return;
                    }
                }
            }
            .in_current_span(),
        );
        Sender {
            queue,
            done,
            pending: 0,
            pending_bytes: 0,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    /// Queues a call behind the ones already queued; refused (the
    /// allocation then fails) when the queue would hold more than
    /// [`MAX_QUEUED_CALL_BYTES`].
    pub fn push(&mut self, id: String, request: pb::FunctionCallRequest) -> Result<(), QueueFull> {
        use prost::Message;
        let bytes = request.encoded_len();
        let total = self.pending_bytes.saturating_add(bytes);
        if total > MAX_QUEUED_CALL_BYTES {
            return Err(QueueFull {
                pending: self.pending,
                total,
            });
        }
        if self.queue.send((id, bytes, request)).is_ok() {
            self.pending += 1;
            self.pending_bytes = total;
        }
        Ok(())
    }

    /// Whether a call still waits for the server's answer.
    pub fn busy(&self) -> bool {
        self.pending > 0
    }

    /// The next call outcome; never resolves while nothing is pending.
    pub async fn next(&mut self) -> (String, Result<(), Refused>) {
        if self.pending == 0 {
            return std::future::pending().await;
        }
        match self.done.recv().await {
            Some((id, bytes, outcome)) => {
                self.pending -= 1;
                self.pending_bytes = self.pending_bytes.saturating_sub(bytes);
                (id, outcome)
            }
            None => std::future::pending().await,
        }
    }
}

/// The server-side request for `call`, made by allocation `alloc`; the
/// arguments blob (if any) is completed first.
pub(crate) async fn prepare(
    shared: &Shared,
    alloc: &pb::Allocation,
    call: &fe_pb::AllocationFunctionCall,
    uploads: &mut std::collections::HashMap<String, Upload>,
) -> Result<pb::FunctionCallRequest, Refused> {
    let updates = call
        .updates
        .as_ref()
        .ok_or_else(|| Refused::local("the function call has no execution plan"))?;
    let args_uri = match &call.args_blob {
        Some(blob) => Some(complete_args_blob(shared, blob, uploads).await?),
        None => None,
    };
    let updates = plan::convert_updates(updates, args_uri.as_deref())
        .map_err(|e| Refused::local(e.to_string()))?;
    let function = alloc.function.clone().unwrap_or_default();
    Ok(pb::FunctionCallRequest {
        namespace: function.namespace,
        application: function.application_name,
        request_id: alloc.request_id.clone(),
        updates: Some(updates),
        source_function_call_id: alloc.function_call_id.clone(),
    })
}

async fn complete_args_blob(
    shared: &Shared,
    blob: &fe_pb::Blob,
    uploads: &mut std::collections::HashMap<String, Upload>,
) -> Result<String, Refused> {
    let id = blob.id.clone().unwrap_or_default();
    let up = uploads.remove(&id).ok_or_else(|| {
        Refused::local(format!(
            "the arguments blob {id:?} is not an output blob of this allocation"
        ))
    })?;
    match shared
        .config
        .blob_store
        .complete_multipart(&up.uri, &up.upload_id, &etags(blob))
        .await
    {
        Ok(()) => Ok(up.uri),
        Err(e) => {
            let _ = shared
                .config
                .blob_store
                .abort_multipart(&up.uri, &up.upload_id)
                .await;
            Err(Refused::local(format!(
                "completing the arguments blob: {e}"
            )))
        }
    }
}

fn backoff() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(MAX_RETRIES)
        .build()
}

/// Whether a failed attempt is worth another.
fn transient(code: tonic::Code, internal_seen: u32) -> bool {
    match code {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => true,
        tonic::Code::Internal => internal_seen <= MAX_INTERNAL_RETRIES,
        _ => false,
    }
}

/// Sends `request` until the server accepts or definitely refuses it.
pub(crate) async fn send(
    shared: &Arc<Shared>,
    request: pb::FunctionCallRequest,
) -> Result<(), Refused> {
    let started = Instant::now();
    let mut client = crate::server::client(
        shared.server.clone(),
        shared.config.max_server_message_bytes,
    );
    let mut delays = backoff();
    let mut internal_seen = 0;
    let outcome = loop {
        let mut req = tonic::Request::new(request.clone());
        req.set_timeout(CALL_TIMEOUT);
        let status = match tokio::time::timeout(CALL_TIMEOUT, client.call_function(req)).await {
            Ok(Ok(_)) => break Ok(()),
            Ok(Err(s)) => s,
            Err(_) => tonic::Status::deadline_exceeded("no answer within 5 s"),
        };
        if status.code() == tonic::Code::Internal {
            internal_seen += 1;
        }
        let retry = transient(status.code(), internal_seen)
            .then(|| delays.next())
            .flatten();
        match retry {
            Some(delay) => {
                tracing::debug!(code = ?status.code(), message = %crate::events::shorten(status.message(), crate::events::MAX_EVENT_MESSAGE), ?delay, "call_function failed; retrying");
                shared.metrics.function_call_retries.inc();
                tokio::time::sleep(delay).await;
            }
            None => {
                break Err(Refused {
                    code: status.code() as i32,
                    message: format!(
                        "the server did not create the function call: {}: {}",
                        status.code(),
                        status.message()
                    ),
                });
            }
        }
    };
    let label = if outcome.is_ok() {
        "created"
    } else {
        "refused"
    };
    shared.metrics.function_call(label, started.elapsed());
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_are_retried() {
        assert!(transient(tonic::Code::Unavailable, 0));
        assert!(transient(tonic::Code::DeadlineExceeded, 0));
        assert!(!transient(tonic::Code::InvalidArgument, 0));
        assert!(!transient(tonic::Code::FailedPrecondition, 0));
        assert!(!transient(tonic::Code::NotFound, 0));
        assert!(transient(tonic::Code::Internal, 1));
        assert!(!transient(tonic::Code::Internal, MAX_INTERNAL_RETRIES + 1));
        assert_eq!(backoff().count(), MAX_RETRIES);
    }
}
