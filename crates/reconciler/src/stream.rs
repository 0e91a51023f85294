//! The desired-state stream: opened only after a report has succeeded (the
//! server answers NOT_FOUND for agents it does not know), reopened with
//! backoff after errors, and after `stream_idle_timeout` of silence.
//! Each message replaces the previous one in a watch channel, so the
//! reconciler always applies the newest state and never a stale backlog.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::desired::{Decoder, RawCodec};
use crate::pb;
use crate::state::Shared;

const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Jittered 50 ms → 500 ms → 5 s between reopen attempts.
fn stream_backoff() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay(BACKOFF_START)
        .with_max_delay(BACKOFF_MAX)
        .with_factor(10.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Opens the stream with raw message bytes as its items (see `desired`).
async fn open(
    grpc: &mut tonic::client::Grpc<Channel>,
    request: pb::GetDesiredExecutorStatesRequest,
) -> Result<tonic::Response<tonic::codec::Streaming<bytes::Bytes>>, tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("server not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/executor_api_pb.ExecutorAPI/get_desired_executor_states",
    );
    grpc.server_streaming(
        tonic::Request::new(request),
        path,
        RawCodec::<pb::GetDesiredExecutorStatesRequest>::default(),
    )
    .await
}

pub(crate) async fn run_loop(
    shared: Arc<Shared>,
    channel: Channel,
    desired_tx: watch::Sender<Option<crate::reconcile::Received>>,
    cancel: CancellationToken,
) {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(shared.config.max_server_message_bytes)
        .max_encoding_message_size(shared.config.max_server_message_bytes);
    let mut reports_ok = shared.reports_ok.subscribe();
    let mut required_reports = 1u64;
    let mut backoff = stream_backoff();
    loop {
        // Wait for a report that succeeded after the last stream failure.
        if !report_succeeded(&mut reports_ok, required_reports, &cancel).await {
            return;
        }
        shared.metrics.desired_state_streams.inc();
        let mut follower = Follower {
            shared: &shared,
            desired_tx: &desired_tx,
            backoff: &mut backoff,
        };
        let Some(reason) = follower.session(&mut grpc, &cancel).await else {
            return;
        };
        shared.metrics.desired_state_stream_errors.inc();
        tracing::warn!(reason = %crate::events::shorten(&reason, crate::events::MAX_EVENT_MESSAGE), "desired state stream interrupted");
        required_reports = *reports_ok.borrow() + 1;
        shared.report_now.notify_one();
        let wait = backoff.next().unwrap_or(BACKOFF_MAX);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Waits until at least `required` reports have succeeded; false when
/// cancelled or the report loop is gone.
async fn report_succeeded(
    reports_ok: &mut watch::Receiver<u64>,
    required: u64,
    cancel: &CancellationToken,
) -> bool {
    loop {
        if *reports_ok.borrow_and_update() >= required {
            return true;
        }
        tokio::select! {
            _ = cancel.cancelled() => return false,
            r = reports_ok.changed() => if r.is_err() { return false },
        }
    }
}

/// Opens the stream and hands its messages to the reconciler.
struct Follower<'a> {
    shared: &'a Shared,
    desired_tx: &'a watch::Sender<Option<crate::reconcile::Received>>,
    /// Reset by every message received.
    backoff: &'a mut backon::ExponentialBackoff,
}

impl Follower<'_> {
    /// Opens the stream and follows it; why it stopped, or none when
    /// cancelled.
    async fn session(
        &mut self,
        grpc: &mut tonic::client::Grpc<Channel>,
        cancel: &CancellationToken,
    ) -> Option<String> {
        let request = pb::GetDesiredExecutorStatesRequest {
            executor_id: Some(self.shared.config.executor_id.clone()),
        };
        let opened = tokio::select! {
            _ = cancel.cancelled() => return None,
            r = tokio::time::timeout(Duration::from_secs(10), open(grpc, request)) => r,
        };
        match opened {
            Err(_) => Some("opening the stream timed out".to_string()),
            Ok(Err(status)) => Some(format!(
                "opening the stream failed: {}: {}",
                status.code(),
                status.message()
            )),
            Ok(Ok(response)) => self.follow(response.into_inner(), cancel).await,
        }
    }

    /// Follows `stream` until it fails, ends or goes idle; why it stopped,
    /// or none when cancelled.
    async fn follow(
        &mut self,
        mut stream: tonic::codec::Streaming<bytes::Bytes>,
        cancel: &CancellationToken,
    ) -> Option<String> {
        let idle = self.shared.config.stream_idle_timeout;
        let mut decoder = Decoder::default();
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return None,
                n = tokio::time::timeout(idle, stream.message()) => n,
            };
            let reason = match next {
                Err(_) => format!("no message for {}s; reopening", idle.as_secs()),
                Ok(Err(status)) => {
                    format!("stream failed: {}: {}", status.code(), status.message())
                }
                Ok(Ok(None)) => "server closed the stream".to_string(),
                Ok(Ok(Some(raw))) => match self.publish(&mut decoder, raw) {
                    Ok(()) => continue,
                    Err(e) => format!("undecodable desired state: {e}"),
                },
            };
            return Some(reason);
        }
    }

    /// Decodes one message and makes it the newest desired state.
    fn publish(
        &mut self,
        decoder: &mut Decoder,
        raw: bytes::Bytes,
    ) -> Result<(), prost::DecodeError> {
        let received = std::time::Instant::now();
        let (desired, stats) = decoder.decode(raw)?;
        let metrics = &self.shared.metrics;
        metrics.desired_state_items.inc_by(stats.items as u64);
        metrics
            .desired_state_items_decoded
            .inc_by(stats.decoded as u64);
        *self.backoff = stream_backoff();
        metrics.desired_states_received.inc();
        self.desired_tx
            .send_replace(Some((std::sync::Arc::new(desired), received)));
        Ok(())
    }
}
