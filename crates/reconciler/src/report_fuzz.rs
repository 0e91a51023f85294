//! Property test of report building with hostile results (a child of
//! `report`): whatever the sizes and counts of the worker-chosen fields of
//! the buffered results (content types, hashes, source call ids, tail-call
//! plans) and of the watches a host reports, every report built decodes and
//! stays within the server message limit, the reported watches stay within
//! their budget, the reports make progress, and every result is carried
//! exactly once, in order: as itself, or, only when it could not fit a
//! report even alone, as a failure of its allocation.
//!
//! Cases: `STEWARD_REPORT_FUZZ_CASES` (default 24, about a second);
//! `cargo xtask fuzz` runs many more.

use proptest::prelude::*;
use prost::Message;
use tokio::sync::mpsc;

use super::{build_request, request_len};
use crate::pb;
use crate::state::PendingResult;
use crate::watches::{self, Waiter};

/// How many cases a run tries.
fn cases() -> u32 {
    std::env::var("STEWARD_REPORT_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24)
}

/// What one hostile result is made of: the lengths of its worker-chosen
/// fields, and a plan of that many entries instead of a value.
#[derive(Debug, Clone)]
struct Spec {
    content_type: usize,
    sha256: usize,
    source_id: usize,
    plan: Option<(usize, usize)>,
    request_error: bool,
}

/// A length around the interesting points of a server message limit of
/// `limit` bytes: mostly short, sometimes a good share of it, at it, or
/// well over it.
fn len(limit: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0..300usize,
        1 => Just(64),
        1 => (limit / 16)..(limit / 8),
        1 => (limit / 2)..(limit + 64),
        1 => limit..(2 * limit),
    ]
}

fn spec(limit: usize) -> impl Strategy<Value = Spec> {
    (
        len(limit),
        len(limit),
        len(limit),
        proptest::option::weighted(0.3, (0..2000usize, 0..600usize)),
        any::<bool>(),
    )
        .prop_map(
            |(content_type, sha256, source_id, plan, request_error)| Spec {
                content_type,
                sha256,
                source_id,
                plan,
                request_error,
            },
        )
}

/// A server limit, the results (fewer where the limit is large, to keep a
/// case's memory small) and the lengths of the watched call ids.
fn scenario() -> impl Strategy<Value = (usize, Vec<Spec>, Vec<usize>)> {
    prop_oneof![
        Just(16usize << 10),
        Just(64 << 10),
        Just(1 << 20),
        Just(11 << 20)
    ]
    .prop_flat_map(|limit| {
        let most = if limit > (1 << 20) { 4 } else { 120 };
        (
            Just(limit),
            proptest::collection::vec(spec(limit), 1..most),
            proptest::collection::vec(0..1200usize, 0..400),
        )
    })
}

fn payload(s: &Spec, what: &str) -> pb::DataPayload {
    pb::DataPayload {
        uri: Some(format!("file:///blobs/{what}")),
        encoding: Some(pb::DataPayloadEncoding::Utf8Json as i32),
        encoding_version: Some(0),
        content_type: Some("t".repeat(s.content_type)),
        metadata_size: Some(0),
        offset: Some(0),
        size: Some(s.content_type as u64),
        sha256_hash: Some("a".repeat(s.sha256)),
        source_function_call_id: Some("s".repeat(s.source_id)),
        id: None,
    }
}

fn result(i: usize, s: &Spec) -> pb::AllocationResult {
    let return_value = match s.plan {
        None => pb::allocation_result::ReturnValue::Value(payload(s, "value")),
        Some((entries, id_len)) => {
            pb::allocation_result::ReturnValue::Updates(pb::ExecutionPlanUpdates {
                updates: (0..entries)
                    .map(|e| pb::ExecutionPlanUpdate {
                        op: Some(pb::execution_plan_update::Op::FunctionCall(
                            pb::FunctionCall {
                                id: Some(format!("{e}{}", "i".repeat(id_len))),
                                target: None,
                                args: Vec::new(),
                                call_metadata: Some(Vec::new()),
                            },
                        )),
                    })
                    .collect(),
                root_function_call_id: Some("0".into()),
                start_at: None,
            })
        }
    };
    pb::AllocationResult {
        function: Some(pb::FunctionRef {
            namespace: Some("ns".into()),
            application_name: Some("app".into()),
            function_name: Some("f".into()),
            application_version: Some(String::new()),
        }),
        allocation_id: Some(format!("a{i}")),
        function_call_id: Some(format!("c{i}")),
        request_id: Some("r".into()),
        outcome_code: Some(pb::AllocationOutcomeCode::Success as i32),
        failure_reason: None,
        return_value: Some(return_value),
        request_error: s.request_error.then(|| payload(s, "request-error")),
        execution_duration_ms: Some(i as u64),
    }
}

fn run(limit: usize, specs: &[Spec], watch_ids: &[usize]) -> Result<(), TestCaseError> {
    let shared = crate::testing_support::shared_with(|c| c.max_server_message_bytes = limit);
    let originals: Vec<pb::AllocationResult> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| result(i, s))
        .collect();
    let budget = watches::budget(limit);
    let (tx, _rx) = mpsc::unbounded_channel();
    let reported_watches = {
        let mut st = shared.state.lock();
        // Watches as allocations add them: over the budget they are refused.
        for (i, len) in watch_ids.iter().enumerate() {
            let watch = pb::FunctionCallWatch {
                namespace: Some("ns".into()),
                application: Some("app".into()),
                request_id: Some("r".into()),
                function_call_id: Some(format!("{i}{}", "w".repeat(*len))),
            };
            let waiter = Waiter {
                allocation_id: format!("w{i}"),
                watcher_id: format!("{i}"),
                tx: tx.clone(),
            };
            let _ = st.watches.add(&watch, waiter, budget);
        }
        prop_assert!(st.watches.reported_bytes() <= budget.host);
        for r in &originals {
            st.results.push_back(PendingResult::new(r.clone(), 0));
        }
        st.watches.len()
    };
    let mut seen = Vec::new();
    let mut state_len = 0;
    while !shared.state.lock().results.is_empty() {
        let (report, carried) = build_request(&shared, false);
        prop_assert!(
            report.bytes.len() <= limit,
            "a {}-byte report under a {limit}-byte limit",
            report.bytes.len()
        );
        let decoded = pb::ReportExecutorStateRequest::decode(report.bytes.clone())
            .map_err(|e| TestCaseError::fail(format!("the report does not decode: {e}")))?;
        let state = decoded.executor_state.unwrap_or_default();
        prop_assert_eq!(state.function_call_watches.len(), reported_watches);
        state_len = state.encoded_len();
        let results = decoded
            .executor_update
            .map(|u| u.allocation_results)
            .unwrap_or_default();
        prop_assert_eq!(results.len(), carried.count);
        prop_assert!(carried.count > 0, "a report carried nothing: no progress");
        seen.extend(results);
        // The report succeeded: what it carried leaves the buffer.
        let mut st = shared.state.lock();
        for _ in 0..carried.count {
            st.results.pop_front();
        }
    }
    prop_assert_eq!(seen.len(), originals.len());
    let bare = {
        let mut b = Vec::new();
        prost::encoding::string::encode(1, &shared.config.executor_id, &mut b);
        b.len()
    };
    for (original, got) in originals.iter().zip(&seen) {
        prop_assert_eq!(&got.allocation_id, &original.allocation_id, "in order");
        let alone = request_len(
            state_len,
            bare + prost::encoding::message::encoded_len(2, original),
        );
        if got == original {
            prop_assert!(alone <= limit);
        } else {
            prop_assert!(alone > limit, "replaced although it fits alone");
            prop_assert_eq!(
                (got.outcome_code(), got.failure_reason()),
                (
                    pb::AllocationOutcomeCode::Failure,
                    pb::AllocationFailureReason::FunctionError
                )
            );
            prop_assert_eq!(&got.request_id, &original.request_id);
            prop_assert_eq!(&got.function_call_id, &original.function_call_id);
            prop_assert!(got.return_value.is_none() && got.request_error.is_none());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn report_fuzz_hostile_results_never_block_or_oversize_a_report(
        (limit, specs, watch_ids) in scenario()
    ) {
        run(limit, &specs, &watch_ids)?;
    }
}
