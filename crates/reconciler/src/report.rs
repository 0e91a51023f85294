//! Building and sending `report_executor_state`: the state hash, result
//! packing under the message size limit, the periodic/on-change loop with
//! backoff, and the final STOPPED report.
//!
//! No report is built that the server must refuse for its size: results
//! are split across reports under the server message limit, and a result
//! that cannot fit next to the state even alone is replaced by a failure
//! of its allocation (named in an event), so it never blocks the others.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::desired::BytesCodec;
use crate::pb;
use crate::server::{channel, describe_status};
use crate::state::{Shared, State};
use crate::wire::encode_fe_state;

/// Results are packed into one report while it stays under this size (or
/// under the server message limit, if smaller); a larger result goes alone,
/// within the server message limit.
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

/// The encoded `ExecutorState` without hash and clock: every field but
/// the worker states in prost's order, then the worker states.
fn state_body(shared: &Shared, st: &State, workers: &crate::lifecycle::FeMap) -> Vec<u8> {
    let c = &shared.config;
    let settings = shared.settings.borrow().clone();
    let mut labels = settings.labels.clone();
    labels.insert("os".into(), std::env::consts::OS.into());
    labels.insert("architecture".into(), std::env::consts::ARCH.into());
    if let Some((major, minor)) = &*shared.python_version.borrow() {
        labels.insert("python_major_version".into(), major.clone());
        labels.insert("python_minor_version".into(), minor.clone());
    }
    let base = pb::ExecutorState {
        executor_id: Some(c.executor_id.clone()),
        hostname: Some(c.hostname.clone()),
        version: Some(c.version.clone()),
        status: Some(shared.status() as i32),
        total_resources: Some(c.total_resources),
        total_function_executor_resources: Some(crate::admission::allocatable_in(c, &settings)),
        allowed_functions: settings.allowed_pb(),
        function_executor_states: Vec::new(),
        labels,
        state_hash: None,
        server_clock: None,
        catalog_entry_name: c.catalog_entry_name.clone(),
        function_call_watches: st.watches.reported(),
        proxy_address: None,
    };
    let described: usize = workers
        .values()
        .map(|f| f.description_bytes().len() + 64)
        .sum();
    let mut body = Vec::with_capacity(base.encoded_len() + described);
    base.encode_raw(&mut body);
    for slot in workers.values().filter(|slot| !slot.gone()) {
        let (status, reason, blamed) = slot.reported();
        encode_fe_state(
            slot.description_bytes(),
            Some(status as i32),
            reason.map(|r| r as i32),
            &blamed,
            &mut body,
        );
    }
    body
}

/// The encoded `ExecutorState`, hash and clock included.
fn encoded_state(shared: &Shared, st: &mut State) -> Vec<u8> {
    use prost::encoding::{string, uint64};
    let workers = shared.workers();
    let mut state = state_body(shared, st, &workers);
    let hash = st.hash_cache.hash_of(&state);
    string::encode(11, &hash, &mut state);
    uint64::encode(12, &st.server_clock, &mut state);
    state
}

/// The agent's `ExecutorState`, hash and clock included.
#[cfg(feature = "testing")]
pub(crate) fn executor_state(shared: &Shared, st: &mut State) -> pb::ExecutorState {
    let bytes = encoded_state(shared, st);
    pb::ExecutorState::decode(bytes.as_slice()).unwrap_or_default()
}

/// A report, encoded, ready for the wire.
#[derive(Clone)]
pub(crate) struct Report {
    pub bytes: bytes::Bytes,
}

impl Report {
    /// The report as a message (for tests, and the final report's results).
    pub fn decode(&self) -> pb::ReportExecutorStateRequest {
        pb::ReportExecutorStateRequest::decode(self.bytes.clone()).unwrap_or_default()
    }
}

/// What a report carries of the buffered results.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Carried {
    /// How many of the oldest.
    pub count: usize,
    /// Whether the size limit left ready results behind.
    pub full: bool,
    /// Whether results wait behind one whose usage record is not durable.
    pub held: bool,
}

/// The encoded size of a `ReportExecutorStateRequest` whose state and
/// update take `state` and `update` bytes.
fn request_len(state: usize, update: usize) -> usize {
    use prost::encoding::encoded_len_varint;
    2 + encoded_len_varint(state as u64) + state + encoded_len_varint(update as u64) + update
}

/// What the server hears instead of a result too large for any report:
/// its allocation failed (FUNCTION_ERROR), without value or plan.
fn undeliverable(r: &pb::AllocationResult) -> pb::AllocationResult {
    pb::AllocationResult {
        function: r.function.clone(),
        allocation_id: r.allocation_id.clone(),
        function_call_id: r.function_call_id.clone(),
        request_id: r.request_id.clone(),
        outcome_code: Some(pb::AllocationOutcomeCode::Failure as i32),
        failure_reason: Some(pb::AllocationFailureReason::FunctionError as i32),
        return_value: None,
        request_error: None,
        execution_duration_ms: r.execution_duration_ms,
    }
}

/// Builds a report with the oldest buffered results whose usage records
/// are durable (every buffered result when `all`: the final report, after
/// metering was flushed or gave up), within the server message limit:
/// results while the report stays under [`MAX_REPORT_BYTES`] (a larger
/// first one alone), and in place of a result that cannot fit even alone,
/// a failure of its allocation.
pub(crate) fn build_request(shared: &Shared, all: bool) -> (Report, Carried) {
    use prost::encoding::string;
    let durable = if all {
        u64::MAX
    } else {
        shared.durable_ticket()
    };
    let mut update = Vec::new();
    string::encode(1, &shared.config.executor_id, &mut update);
    let (state, packed) = {
        let mut st = shared.state.lock();
        let state = encoded_state(shared, &mut st);
        let packed = pack_results(shared, &mut st, state.len(), durable, &mut update);
        note_packed(shared, &mut st, &packed, state.len());
        (state, packed)
    };
    (
        Report {
            bytes: assemble(&state, &update).into(),
        },
        packed.carried,
    )
}

/// What [`pack_results`] put in a report's update.
struct Packed {
    carried: Carried,
    /// Allocations whose results went out for the first time, and how
    /// long after they were ready.
    first_sends: Vec<(String, Duration)>,
    /// Allocations whose results could fit no report (and their sizes):
    /// their failures went instead.
    replaced: Vec<(String, usize)>,
}

/// Appends to `update` the oldest buffered results whose usage records
/// are durable (ticket ≤ `durable`), while the report stays under the
/// packing target (a larger first one alone, under the server limit); a
/// result that cannot fit even alone is replaced by its failure.
fn pack_results(
    shared: &Shared,
    st: &mut State,
    state_len: usize,
    durable: u64,
    update: &mut Vec<u8>,
) -> Packed {
    use prost::encoding::message;
    let limit = shared.config.max_server_message_bytes;
    let target = MAX_REPORT_BYTES.min(limit);
    let bare = update.len();
    let mut packed = Packed {
        carried: Carried::default(),
        first_sends: Vec::new(),
        replaced: Vec::new(),
    };
    for p in st.results.iter_mut() {
        // In order: one not yet durable holds back those behind it.
        if p.ticket > durable {
            packed.carried.held = true;
            break;
        }
        let mut len = message::encoded_len(2, &p.result);
        if request_len(state_len, bare + len) > limit {
            // Never sendable, so it would block every result behind it.
            let id = p.result.allocation_id.clone().unwrap_or_default();
            packed.replaced.push((id, len));
            p.result = undeliverable(&p.result);
            len = message::encoded_len(2, &p.result);
            if request_len(state_len, bare + len) > limit {
                // The state leaves no room at all; the report fails and says why.
                break;
            }
        }
        // A first result over the packing target goes alone.
        let max = if packed.carried.count == 0 {
            limit
        } else {
            target
        };
        if request_len(state_len, update.len() + len) > max {
            packed.carried.full = true;
            break;
        }
        packed.carried.count += 1;
        message::encode(2, &p.result, update);
        if !p.sent {
            p.sent = true;
            let took = p.ready.elapsed();
            shared
                .metrics
                .cycle_result_to_wire
                .observe(took.as_secs_f64());
            if let Some(id) = p.result.allocation_id.clone() {
                packed.first_sends.push((id, took));
            }
        }
    }
    packed
}

/// Timeline entries (and events) for what a report first carries.
fn note_packed(shared: &Shared, st: &mut State, packed: &Packed, state_len: usize) {
    for (id, took) in &packed.first_sends {
        let what = format!(
            "reported: result on the wire {} µs after it was ready",
            took.as_micros()
        );
        st.note_allocation(id, None, what);
    }
    let limit = shared.config.max_server_message_bytes;
    for (id, len) in &packed.replaced {
        let message = format!(
            "its result is {len} bytes and cannot fit a report next to the state ({state_len} bytes) under the server message limit of {limit} bytes (--max-server-message-bytes); the server hears FUNCTION_ERROR instead"
        );
        st.note_allocation(id, None, message.clone());
        let fe_id = st.allocations.get(id).map(|a| a.fe_id.as_str());
        shared.event_about(
            "allocation_failed",
            crate::log_ids::About::Allocation {
                fe_id,
                allocation_id: id,
            },
            message,
        );
    }
}

/// A `ReportExecutorStateRequest`: the encoded state, then the update.
fn assemble(state: &[u8], update: &[u8]) -> Vec<u8> {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut request = Vec::with_capacity(request_len(state.len(), update.len()));
    encode_key(1, WireType::LengthDelimited, &mut request);
    encode_varint(state.len() as u64, &mut request);
    request.extend_from_slice(state);
    encode_key(2, WireType::LengthDelimited, &mut request);
    encode_varint(update.len() as u64, &mut request);
    request.extend_from_slice(update);
    request
}

/// Sends one encoded report.
async fn send(
    grpc: &mut tonic::client::Grpc<Channel>,
    report: Report,
) -> Result<(), tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("server not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/executor_api_pb.ExecutorAPI/report_executor_state",
    );
    grpc.unary(tonic::Request::new(report.bytes), path, BytesCodec)
        .await
        .map(|_| ())
}

/// A client of the server for encoded reports, with the configured
/// message size limit.
fn report_client(channel: Channel, max_message_bytes: usize) -> tonic::client::Grpc<Channel> {
    tonic::client::Grpc::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}

/// Reports now and then every `report_interval`, sooner on change. While
/// reports fail it retries within a second if no server answers, and backs
/// off ×3 up to `report_backoff_max` if the server refuses them; during a
/// backoff, changes (such as new results) wait for the next attempt.
pub(crate) async fn run_loop(shared: Arc<Shared>, channel: Channel, cancel: CancellationToken) {
    let mut client = report_client(channel, shared.config.max_server_message_bytes);
    let mut pacing = Pacing::new(&shared.config);
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let (request, carried) = build_request(&shared, false);
        let next = match report_once(&shared, &mut client, &request).await {
            None => {
                took(&shared, &request, carried);
                pacing = Pacing::new(&shared.config);
                // Results left behind by the size limit go out right away.
                if carried.full {
                    continue;
                }
                Next::Wait(shared.config.report_interval)
            }
            Some((kind, e)) => {
                shared.metrics.state_report_errors.inc();
                note_failure(&shared, &e);
                Next::Backoff(pacing.after(kind, &shared.config))
            }
        };
        let woken = async {
            match next {
                // A backoff is not cut short by changes: they ride the next try.
                Next::Backoff(interval) => tokio::time::sleep(interval).await,
                Next::Wait(interval) => tokio::select! {
                    _ = shared.report_now.notified() => {}
                    _ = tokio::time::sleep(interval) => {}
                },
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = woken => {}
        }
    }
}

/// When the next report goes after this one.
enum Next {
    /// After a failure: the backoff, whatever changes.
    Backoff(Duration),
    /// After a success: the interval, or at once on a change.
    Wait(Duration),
}

/// The backoffs of failing reports: short while the server is
/// unreachable, growing ×3 while it refuses.
struct Pacing {
    refused: backon::ExponentialBackoff,
    unreachable: backon::ExponentialBackoff,
}

impl Pacing {
    fn new(config: &crate::AgentConfig) -> Pacing {
        Pacing {
            refused: report_backoff(config),
            unreachable: unreachable_backoff(),
        }
    }

    fn after(&mut self, kind: Failure, config: &crate::AgentConfig) -> Duration {
        match kind {
            Failure::Unreachable => self.unreachable.next(),
            Failure::Refused => self.refused.next(),
        }
        .unwrap_or(config.report_backoff_max)
    }
}

/// Sends one report, timed; why it failed, if it did.
async fn report_once(
    shared: &Shared,
    client: &mut tonic::client::Grpc<Channel>,
    request: &Report,
) -> Option<(Failure, String)> {
    let started = Instant::now();
    shared.metrics.state_reports.inc();
    shared
        .metrics
        .state_report_size
        .observe(request.bytes.len() as f64);
    // A report in flight is finished (bounded by its deadline), never
    // dropped on shutdown: a dropped one can still reach the server
    // after the final STOPPED report and undo it.
    let call = send(client, request.clone());
    let outcome = tokio::time::timeout(REPORT_RPC_TIMEOUT, call).await;
    shared
        .metrics
        .state_report_latency
        .observe(started.elapsed().as_secs_f64());
    match outcome {
        Ok(Ok(_)) => None,
        Ok(Err(status)) => Some((classify(&status), describe_status(&status))),
        // A server that takes the call and never answers is not one
        // that refused it: no long backoff either.
        Err(_) => Some((
            Failure::Unreachable,
            format!("no answer within {}s", REPORT_RPC_TIMEOUT.as_secs()),
        )),
    }
}

/// The server took a report: what it carried leaves the buffer, health
/// says so (an event if reports had been failing), the stream hears.
fn took(shared: &Shared, request: &Report, carried: Carried) {
    let taken: Vec<String> = {
        let mut st = shared.state.lock();
        let carried = carried.count.min(st.results.len());
        let taken = st
            .results
            .drain(..carried)
            .filter(|_| shared.adoption.is_some())
            .filter_map(|p| p.result.allocation_id)
            .collect();
        shared.metrics.pending_results.set(st.results.len() as i64);
        taken
    };
    if let Some(store) = &shared.adoption {
        // The server has them: no restart sends them again.
        store.taken(&taken);
    }
    shared
        .last_report
        .send_replace(Some((request.bytes.clone(), SystemTime::now())));
    let was_failing = {
        let mut h = shared.health.lock();
        let was_failing = h.consecutive_report_failures > 0;
        h.last_report_ok = Some(Instant::now());
        h.consecutive_report_failures = 0;
        h.last_report_error = None;
        was_failing
    };
    if was_failing {
        shared.event(
            "server_connection_restored",
            &shared.config.server_addr,
            "state reports succeed again",
        );
    }
    shared.reports_ok.send_modify(|n| *n += 1);
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
    shared
        .stopped
        .store(true, std::sync::atomic::Ordering::Release);
    let Ok(channel) = channel(
        &shared.config.server_addr,
        shared.config.server_tls.as_ref(),
    ) else {
        return;
    };
    let mut client = report_client(channel, shared.config.max_server_message_bytes);
    let (mut request, carried) = build_request(shared, false);
    if carried.held {
        // Results pushed after the shutdown's flush (a worker that stopped
        // late): flush once more, which records them or gives up on them
        // (and says so), then carry everything.
        if let Some(m) = shared.config.metering.clone() {
            let wait = timeout.min(Duration::from_secs(2));
            let _ = tokio::task::spawn_blocking(move || m.flush(wait)).await;
        }
        request = build_request(shared, true).0;
    }
    let results = result_ids(&request);
    match tokio::time::timeout(timeout, send(&mut client, request)).await {
        Ok(Ok(_)) => {
            if let Some(store) = &shared.adoption {
                store.taken(&results);
            }
            shared.event(
                "stopped",
                &shared.config.executor_id,
                "final STOPPED report sent",
            );
        }
        Ok(Err(s)) => tracing::warn!(error = %s, "final STOPPED report failed"),
        Err(_) => tracing::warn!("final STOPPED report timed out"),
    }
}

/// The allocation ids of the results `request` carries.
fn result_ids(request: &Report) -> Vec<String> {
    request
        .decode()
        .executor_update
        .map(|u| u.allocation_results)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.allocation_id)
        .collect()
}

/// The allocation ids the next report carries, and what it carried (for
/// tests).
#[cfg(test)]
pub(crate) fn carried_ids(shared: &Shared, all: bool) -> (Vec<String>, Carried) {
    let (report, carried) = build_request(shared, all);
    (result_ids(&report), carried)
}

#[cfg(test)]
#[path = "report_fuzz.rs"]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AgentError;
    use crate::server::server_url;
    use crate::wire::{HashCache, state_hash};
    use sha2::{Digest, Sha256};

    #[test]
    fn with_tls_configured_every_server_address_is_tls_or_refused() {
        // (address, TLS configured, the URL connected to). A bare host:port
        // with TLS is TLS, as the reference executor's secure channel.
        let accepted = [
            ("indexify:8901", true, "https://indexify:8901"),
            ("[::1]:8901", true, "https://[::1]:8901"),
            ("https://indexify:8901", true, "https://indexify:8901"),
            ("HTTPS://indexify:8901", true, "https://indexify:8901"),
            ("Https://indexify:8901", true, "https://indexify:8901"),
            // Without TLS: plaintext only where asked for.
            ("indexify:8901", false, "http://indexify:8901"),
            ("HTTP://indexify:8901", false, "http://indexify:8901"),
            ("https://indexify:8901", false, "https://indexify:8901"),
        ];
        for (addr, tls, url) in accepted {
            assert_eq!(server_url(addr, tls).as_deref(), Ok(url), "{addr} {tls}");
        }
        let refused = [
            ("http://indexify:8901", true, "TLS is configured"),
            ("HTTP://indexify:8901", true, "TLS is configured"),
            ("Http://indexify:8901", true, "TLS is configured"),
            ("grpc://indexify:8901", true, "\"grpc\" is not https"),
            ("unix:///run/indexify.sock", true, "\"unix\" is not https"),
            ("dns://indexify:8901", true, "\"dns\" is not https"),
            ("grpc://indexify:8901", false, "unknown scheme"),
        ];
        for (addr, tls, why) in refused {
            let e = server_url(addr, tls).expect_err(addr).to_string();
            assert!(e.contains(why), "{addr} {tls}: {e}");
        }
    }

    #[tokio::test]
    async fn a_channel_with_tls_refuses_a_plaintext_address() {
        let tls = crate::ServerTls::default();
        for addr in ["HTTP://127.0.0.1:1", "grpc://127.0.0.1:1"] {
            match channel(addr, Some(&tls)) {
                Err(AgentError::ServerAddr { reason, .. }) => {
                    assert!(reason.contains("TLS is configured"), "{addr}: {reason}")
                }
                Err(e) => panic!("{addr}: {e}"),
                Ok(_) => panic!("{addr}: connects in plaintext with TLS configured"),
            }
        }
    }

    #[cfg(feature = "testing")]
    #[test]
    fn a_report_decodes_to_the_state_and_carries_its_own_hash() {
        let s = crate::testing::Synthetic::new(5, 20, 3);
        let report = pb::ReportExecutorStateRequest::decode(s.build_report()).expect("decodes");
        let state = report.executor_state.expect("state");
        assert_eq!(
            state.state_hash.as_deref(),
            Some(state_hash(&state).as_str())
        );
        let described: Vec<_> = state
            .function_executor_states
            .iter()
            .map(|f| f.description.clone().expect("description"))
            .collect();
        assert_eq!(described, s.desired.function_executors);
        assert!(
            state
                .function_executor_states
                .iter()
                .all(|f| f.status == Some(pb::FunctionExecutorStatus::Running as i32))
        );
        assert_eq!(
            state.labels.get("os").map(String::as_str),
            Some(std::env::consts::OS)
        );
        let update = report.executor_update.expect("update");
        assert_eq!(update.executor_id.as_deref(), Some("bench"));
        assert_eq!(update.allocation_results.len(), 3);
        // The same state again: the same bytes, so the same hash.
        let again = pb::ReportExecutorStateRequest::decode(s.build_report()).expect("decodes");
        assert_eq!(
            again.executor_state.and_then(|e| e.state_hash),
            state.state_hash
        );
    }

    /// Metering whose durable ticket a test sets.
    #[derive(Default)]
    struct Gate(std::sync::atomic::AtomicU64);

    impl crate::Metering for Gate {
        fn worker_started(&self, _: crate::MeteredWorker) {}
        fn worker_stopped(&self, _: &str) {}
        fn allocation_started(&self, _: &str, _: &str) {}
        fn allocation_finished(&self, _: crate::MeteredAllocation) -> u64 {
            0
        }
        fn durable(&self) -> u64 {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
        fn on_durable(&self, _: Box<dyn Fn() + Send + Sync>) {}
        fn flush(&self, _: Duration) {}
    }

    fn result(id: &str) -> pb::AllocationResult {
        pb::AllocationResult {
            allocation_id: Some(id.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_report_carries_results_in_order_up_to_the_first_not_yet_durable() {
        let gate = Arc::new(Gate::default());
        let metering: Arc<dyn crate::Metering> = gate.clone();
        let shared = crate::testing_support::shared_with(|c| c.metering = Some(metering));
        {
            let mut st = shared.state.lock();
            // Tickets out of order, as two threads can push them.
            for (id, ticket) in [("a", 1), ("b", 3), ("c", 2), ("d", 0)] {
                st.results
                    .push_back(crate::state::PendingResult::new(result(id), ticket));
            }
        }
        let (ids, carried) = carried_ids(&shared, false);
        assert!(ids.is_empty() && carried.held && !carried.full, "{ids:?}");
        gate.0.store(2, std::sync::atomic::Ordering::SeqCst);
        let (ids, carried) = carried_ids(&shared, false);
        assert_eq!(ids, ["a"], "b (ticket 3) holds back c and d");
        assert!(carried.held);
        let (ids, carried) = carried_ids(&shared, true);
        assert_eq!(ids, ["a", "b", "c", "d"], "the final report carries all");
        assert!(!carried.held);
        gate.0.store(3, std::sync::atomic::Ordering::SeqCst);
        let (ids, carried) = carried_ids(&shared, false);
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert_eq!(carried.count, 4);
        assert!(!carried.held && !carried.full);
    }

    /// A result whose value declares a content type of `bytes` bytes.
    fn result_with_content_type(id: &str, bytes: usize) -> pb::AllocationResult {
        pb::AllocationResult {
            return_value: Some(pb::allocation_result::ReturnValue::Value(pb::DataPayload {
                content_type: Some("t".repeat(bytes)),
                ..Default::default()
            })),
            ..result(id)
        }
    }

    /// Builds reports as the loop does (each one succeeding) until the
    /// buffer is empty; every report must fit `limit`. Returns what each
    /// report carried.
    fn drain(shared: &Shared, limit: usize) -> Vec<Vec<pb::AllocationResult>> {
        let mut reports = Vec::new();
        while !shared.state.lock().results.is_empty() {
            let (report, carried) = build_request(shared, false);
            assert!(report.bytes.len() <= limit, "{} bytes", report.bytes.len());
            assert!(carried.count > 0, "no progress");
            let mut st = shared.state.lock();
            for _ in 0..carried.count {
                st.results.pop_front();
            }
            reports.push(
                report
                    .decode()
                    .executor_update
                    .map(|u| u.allocation_results)
                    .unwrap_or_default(),
            );
        }
        reports
    }

    #[test]
    fn results_are_split_across_reports_under_the_server_limit() {
        let limit = 1 << 20;
        let shared = crate::testing_support::shared_with(|c| c.max_server_message_bytes = limit);
        for i in 0..5 {
            let r = result_with_content_type(&format!("r{i}"), 300 << 10);
            shared
                .state
                .lock()
                .results
                .push_back(crate::state::PendingResult::new(r, 0));
        }
        let counts: Vec<usize> = drain(&shared, limit).iter().map(Vec::len).collect();
        assert_eq!(counts, [3, 2]);
    }

    #[test]
    fn a_result_that_fits_no_report_becomes_a_failure_and_blocks_nothing() {
        let limit = 1 << 20;
        let shared = crate::testing_support::shared_with(|c| c.max_server_message_bytes = limit);
        for r in [
            result("before"),
            result_with_content_type("huge", 2 << 20),
            result("after"),
        ] {
            shared
                .state
                .lock()
                .results
                .push_back(crate::state::PendingResult::new(r, 0));
        }
        let reports = drain(&shared, limit);
        assert_eq!(reports.len(), 1, "the failure is small: all go together");
        let outcomes: Vec<_> = reports[0]
            .iter()
            .map(|r| {
                (
                    r.allocation_id.clone().unwrap_or_default(),
                    r.outcome_code(),
                    r.return_value.is_some(),
                )
            })
            .collect();
        assert_eq!(
            outcomes,
            [
                ("before".into(), pb::AllocationOutcomeCode::Unknown, false),
                ("huge".into(), pb::AllocationOutcomeCode::Failure, false),
                ("after".into(), pb::AllocationOutcomeCode::Unknown, false),
            ]
        );
        assert_eq!(
            reports[0][1].failure_reason(),
            pb::AllocationFailureReason::FunctionError
        );
        let events = shared.events.recent();
        assert!(
            events.iter().any(|e| e.kind == "allocation_failed"
                && e.subject == "huge"
                && e.message.contains("--max-server-message-bytes")),
            "{events:?}"
        );
    }

    #[test]
    fn a_first_result_over_the_packing_target_goes_alone_within_the_limit() {
        let limit = MAX_REPORT_BYTES + (2 << 20);
        let shared = crate::testing_support::shared_with(|c| c.max_server_message_bytes = limit);
        for r in [
            result("small"),
            result_with_content_type("big", MAX_REPORT_BYTES + (1 << 20)),
            result("last"),
        ] {
            shared
                .state
                .lock()
                .results
                .push_back(crate::state::PendingResult::new(r, 0));
        }
        let ids: Vec<Vec<String>> = drain(&shared, limit)
            .into_iter()
            .map(|rs| rs.into_iter().filter_map(|r| r.allocation_id).collect())
            .collect();
        assert_eq!(ids, [vec!["small"], vec!["big"], vec!["last"]]);
    }

    #[test]
    fn the_hash_cache_rehashes_only_a_changed_body() {
        let mut cache = HashCache::default();
        let a = cache.hash_of(b"one");
        assert_eq!(a, hex::encode(Sha256::digest(b"one")));
        assert_eq!(cache.hash_of(b"one"), a);
        let b = cache.hash_of(b"two");
        assert_eq!(b, hex::encode(Sha256::digest(b"two")));
    }

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
