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
        loop {
            if *reports_ok.borrow_and_update() >= required_reports {
                break;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = reports_ok.changed() => if r.is_err() { return },
            }
        }
        shared.metrics.desired_state_streams.inc();
        let request = pb::GetDesiredExecutorStatesRequest {
            executor_id: Some(shared.config.executor_id.clone()),
        };
        let opened = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(10), open(&mut grpc, request)) => r,
        };
        let reason = match opened {
            Err(_) => "opening the stream timed out".to_string(),
            Ok(Err(status)) => format!(
                "opening the stream failed: {}: {}",
                status.code(),
                status.message()
            ),
            Ok(Ok(response)) => {
                let mut stream = response.into_inner();
                let mut decoder = Decoder::default();
                loop {
                    let next = tokio::select! {
                        _ = cancel.cancelled() => return,
                        n = tokio::time::timeout(shared.config.stream_idle_timeout, stream.message()) => n,
                    };
                    match next {
                        Err(_) => {
                            break format!(
                                "no message for {}s; reopening",
                                shared.config.stream_idle_timeout.as_secs()
                            );
                        }
                        Ok(Err(status)) => {
                            break format!(
                                "stream failed: {}: {}",
                                status.code(),
                                status.message()
                            );
                        }
                        Ok(Ok(None)) => break "server closed the stream".to_string(),
                        Ok(Ok(Some(raw))) => {
                            let received = std::time::Instant::now();
                            let desired = match decoder.decode(raw) {
                                Ok((desired, stats)) => {
                                    shared
                                        .metrics
                                        .desired_state_items
                                        .inc_by(stats.items as u64);
                                    shared
                                        .metrics
                                        .desired_state_items_decoded
                                        .inc_by(stats.decoded as u64);
                                    desired
                                }
                                Err(e) => break format!("undecodable desired state: {e}"),
                            };
                            backoff = stream_backoff();
                            shared.metrics.desired_states_received.inc();
                            desired_tx.send_replace(Some((std::sync::Arc::new(desired), received)));
                        }
                    }
                }
            }
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
