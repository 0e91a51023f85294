//! Building and sending `report_executor_state`: the state hash, result
//! packing under the message size limit, the periodic/on-change loop with
//! backoff, and the final STOPPED report.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prost::Message;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::AgentError;
use crate::pb;
use crate::pb::executor_api_client::ExecutorApiClient;
use crate::state::{Shared, State};

/// Results are packed into one report while it stays under this size.
pub const MAX_REPORT_BYTES: usize = 10 * 1024 * 1024;
/// Deadline of one report RPC.
pub const REPORT_RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits between failed reports: jittered, ×3 from 3× the report interval
/// up to `report_backoff_max` (the reference's 5 → 15 → 45 → ... → 300 s).
fn report_backoff(c: &crate::AgentConfig) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay((c.report_interval * 3).min(c.report_backoff_max))
        .with_max_delay(c.report_backoff_max)
        .with_factor(3.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Waits between reports while the server cannot be reached at all
/// (connection refused or reset): short, so a restarted server hears from
/// every host within a second of coming back. A failed attempt then is
/// one refused TCP connect, so retrying this often costs nothing.
fn unreachable_backoff() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        // Jitter may double a wait: at most 1 s between tries.
        .with_max_delay(Duration::from_millis(500))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// How a report failed, which decides how soon to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// No server answered: retry within a second.
    Unreachable,
    /// A server answered and refused, or did not answer in time: back off.
    Refused,
}

/// Transport failures (refused or reset connections, a server going away
/// mid-call) come back as UNAVAILABLE, UNKNOWN or CANCELLED; anything else
/// is the server's own answer.
fn classify(status: &tonic::Status) -> Failure {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            Failure::Unreachable
        }
        _ => Failure::Refused,
    }
}

/// A lazily connecting channel to the server.
pub(crate) fn channel(addr: &str) -> Result<Channel, AgentError> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(url).map_err(|e| AgentError::ServerAddr {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// A client of the server with the configured message size limit both
/// ways: a larger desired state fails its stream (reopened with backoff,
/// an event names the limit), a larger report is not sent.
pub(crate) fn client(channel: Channel, max_message_bytes: usize) -> ExecutorApiClient<Channel> {
    ExecutorApiClient::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}

/// Hex SHA-256 of the deterministic encoding of `state` without its
/// `state_hash` and `server_clock`.
///
/// prost encodes fields in number order and our maps are `BTreeMap`s, so
/// equal states give equal bytes.
pub fn state_hash(state: &pb::ExecutorState) -> String {
    let mut s = state.clone();
    s.state_hash = None;
    s.server_clock = None;
    hex::encode(Sha256::digest(s.encode_to_vec()))
}

fn fe_state(fe: &crate::state::FeEntry) -> pb::FunctionExecutorState {
    pb::FunctionExecutorState {
        description: Some(fe.description.clone()),
        status: Some(fe.status as i32),
        termination_reason: fe.termination_reason.map(|r| r as i32),
        allocation_ids_caused_termination: fe.blamed.clone(),
    }
}

/// The agent's `ExecutorState`, hash and clock included.
pub(crate) fn executor_state(shared: &Shared, st: &State) -> pb::ExecutorState {
    let c = &shared.config;
    let mut labels = c.labels.clone();
    labels.insert("os".into(), std::env::consts::OS.into());
    labels.insert("architecture".into(), std::env::consts::ARCH.into());
    if let Some((major, minor)) = &st.python_version {
        labels.insert("python_major_version".into(), major.clone());
        labels.insert("python_minor_version".into(), minor.clone());
    }
    let mut state = pb::ExecutorState {
        executor_id: Some(c.executor_id.clone()),
        hostname: Some(c.hostname.clone()),
        version: Some(c.version.clone()),
        status: Some(st.status as i32),
        total_resources: Some(c.total_resources),
        total_function_executor_resources: Some(c.function_executor_resources),
        allowed_functions: c.allowed_functions.clone(),
        function_executor_states: st.fes.values().map(fe_state).collect(),
        labels,
        state_hash: None,
        server_clock: None,
        catalog_entry_name: c.catalog_entry_name.clone(),
        function_call_watches: st.watches.reported(),
        proxy_address: None,
    };
    state.state_hash = Some(state_hash(&state));
    state.server_clock = Some(st.server_clock);
    state
}

/// Builds a report and says how many of the oldest buffered results it carries.
pub(crate) fn build_request(shared: &Shared) -> (pb::ReportExecutorStateRequest, usize) {
    let st = shared.state.lock();
    let state = executor_state(shared, &st);
    let mut request = pb::ReportExecutorStateRequest {
        executor_state: Some(state),
        executor_update: Some(pb::ExecutorUpdate {
            executor_id: Some(shared.config.executor_id.clone()),
            allocation_results: Vec::new(),
        }),
    };
    let mut size = request.encoded_len();
    let mut results = Vec::new();
    for r in st.results.iter() {
        let len = r.encoded_len() + 8;
        // The first result always goes, whatever its size.
        if !results.is_empty() && size + len > MAX_REPORT_BYTES {
            break;
        }
        size += len;
        results.push(r.clone());
    }
    let n = results.len();
    if let Some(u) = request.executor_update.as_mut() {
        u.allocation_results = results;
    }
    (request, n)
}

/// Reports now and then every `report_interval`, sooner on change. While
/// reports fail it retries within a second if no server answers, and backs
/// off ×3 up to `report_backoff_max` if the server refuses them; during a
/// backoff, changes (such as new results) wait for the next attempt.
pub(crate) async fn run_loop(shared: Arc<Shared>, channel: Channel, cancel: CancellationToken) {
    let mut client = client(channel, shared.config.max_server_message_bytes);
    let mut interval;
    let mut backoff = report_backoff(&shared.config);
    let mut fast = unreachable_backoff();
    let mut failing;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let (request, carried) = build_request(&shared);
        let started = Instant::now();
        shared.metrics.state_reports.inc();
        shared
            .metrics
            .state_report_size
            .observe(request.encoded_len() as f64);
        // A report in flight is finished (bounded by its deadline), never
        // dropped on shutdown: a dropped one can still reach the server
        // after the final STOPPED report and undo it.
        let call = client.report_executor_state(request.clone());
        let outcome = tokio::time::timeout(REPORT_RPC_TIMEOUT, call).await;
        shared
            .metrics
            .state_report_latency
            .observe(started.elapsed().as_secs_f64());
        let error = match outcome {
            Ok(Ok(_)) => None,
            Ok(Err(status)) => Some((
                classify(&status),
                format!("{}: {}", status.code(), status.message()),
            )),
            // A server that takes the call and never answers is not one
            // that refused it: no long backoff either.
            Err(_) => Some((
                Failure::Unreachable,
                format!("no answer within {}s", REPORT_RPC_TIMEOUT.as_secs()),
            )),
        };
        let more_results;
        match error {
            None => {
                let was_failing;
                {
                    let mut st = shared.state.lock();
                    for _ in 0..carried {
                        st.results.pop_front();
                    }
                    more_results = !st.results.is_empty() && carried > 0;
                    shared.metrics.pending_results.set(st.results.len() as i64);
                    st.last_report = Some((request, SystemTime::now()));
                }
                {
                    let mut h = shared.health.lock();
                    was_failing = h.consecutive_report_failures > 0;
                    h.last_report_ok = Some(Instant::now());
                    h.consecutive_report_failures = 0;
                    h.last_report_error = None;
                }
                if was_failing {
                    shared.event(
                        "server_connection_restored",
                        &shared.config.server_addr,
                        "state reports succeed again",
                    );
                }
                shared.reports_ok.send_modify(|n| *n += 1);
                interval = shared.config.report_interval;
                backoff = report_backoff(&shared.config);
                fast = unreachable_backoff();
                failing = false;
            }
            Some((kind, e)) => {
                more_results = false;
                failing = true;
                shared.metrics.state_report_errors.inc();
                note_failure(&shared, &e);
                interval = match kind {
                    Failure::Unreachable => fast.next(),
                    Failure::Refused => backoff.next(),
                }
                .unwrap_or(shared.config.report_backoff_max);
            }
        }
        if more_results {
            // Results left behind by the size limit go out right away.
            continue;
        }
        if failing {
            // A backoff is not cut short by changes: they ride the next try.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = shared.report_now.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Records a failed report; the first failure, and every change of reason
/// (a server that came back but refuses, say), is an event with the reason.
fn note_failure(shared: &Shared, error: &str) {
    let (first, changed) = {
        let mut h = shared.health.lock();
        h.consecutive_report_failures += 1;
        let changed = h.last_report_error.as_deref() != Some(error);
        h.last_report_error = Some(error.to_string());
        (h.consecutive_report_failures == 1, changed)
    };
    if first {
        shared.event(
            "server_connection_lost",
            &shared.config.server_addr,
            format!("state report failed: {error}"),
        );
    } else if changed {
        shared.event(
            "state_report_failing",
            &shared.config.server_addr,
            format!("state reports still fail, now with: {error}"),
        );
    } else {
        tracing::debug!(error, "state report failed");
    }
}

/// One last report with status STOPPED so the server forgets this agent at
/// once, carrying any results still buffered.
pub(crate) async fn send_final(shared: &Arc<Shared>, timeout: Duration) {
    shared.state.lock().status = pb::ExecutorStatus::Stopped;
    let Ok(channel) = channel(&shared.config.server_addr) else {
        return;
    };
    let mut client = client(channel, shared.config.max_server_message_bytes);
    let (request, _) = build_request(shared);
    match tokio::time::timeout(timeout, client.report_executor_state(request)).await {
        Ok(Ok(_)) => shared.event(
            "stopped",
            &shared.config.executor_id,
            "final STOPPED report sent",
        ),
        Ok(Err(s)) => tracing::warn!(error = %s, "final STOPPED report failed"),
        Err(_) => tracing::warn!("final STOPPED report timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_ignores_clock_and_changes_with_content() {
        let mut a = pb::ExecutorState {
            executor_id: Some("e".into()),
            ..Default::default()
        };
        a.labels.insert("b".into(), "2".into());
        a.labels.insert("a".into(), "1".into());
        let h1 = state_hash(&a);
        a.server_clock = Some(42);
        a.state_hash = Some("stale".into());
        assert_eq!(state_hash(&a), h1);
        a.labels.insert("c".into(), "3".into());
        assert_ne!(state_hash(&a), h1);
        assert_eq!(h1.len(), 64);
    }
}
