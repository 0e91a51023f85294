//! `report_executor_state`: registration and heartbeat, the executor's
//! function-call watches (replaced by each report), allocation results
//! (values, tail calls, failures), worker terminations and STOPPED.
//! Everything is checked before anything changes: a malformed watch answers
//! INVALID_ARGUMENT and a malformed tail call INTERNAL for the whole report,
//! as the real server does.
//! Must not know about: HTTP, how desired states are built.

use std::collections::BTreeSet;
use std::time::Instant;

use steward_proto::executor_api_pb as pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Effects, Ending, Executor, Inner, Scheduler, id, push_log};
use crate::convert::{self, ApiError, Watch};
use crate::graph::{Plan, Verdict, normalized};

/// A report whose every part passed the checks.
struct CheckedReport {
    executor_id: String,
    state: pb::ExecutorState,
    watches: BTreeSet<Watch>,
    /// Each result with its converted tail call, if it made one.
    results: Vec<(pb::AllocationResult, Option<Plan>)>,
}

fn check(req: pb::ReportExecutorStateRequest) -> Result<CheckedReport, ApiError> {
    let state = req
        .executor_state
        .ok_or(ApiError::Missing("executor_state"))?;
    let update = req
        .executor_update
        .ok_or(ApiError::Missing("executor_update"))?;
    let executor_id = state
        .executor_id
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or(ApiError::Missing("executor_state.executor_id"))?;
    let watches = convert::watches(&executor_id, &state.function_call_watches)?;
    let results = update
        .allocation_results
        .into_iter()
        .map(|mut r| {
            let plan = match r.return_value.take() {
                Some(pb::allocation_result::ReturnValue::Updates(u)) => Some(convert::plan(u)?),
                other => {
                    r.return_value = other;
                    None
                }
            };
            Ok((r, plan))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(CheckedReport {
        executor_id,
        state,
        watches,
        results,
    })
}

/// (function executor id, reason, blamed allocations) of terminated workers.
fn terminated_fes(state: &pb::ExecutorState) -> Vec<(String, String, Vec<String>)> {
    state
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
        .collect()
}

impl Scheduler {
    /// Handles a state report; malformed reports change nothing.
    pub async fn report(&self, req: pb::ReportExecutorStateRequest) -> Result<(), ApiError> {
        let report = check(req)?;
        let endings = self.inner.lock().apply_report(report);
        self.finish(endings).await;
        Ok(())
    }
}

impl Inner {
    fn apply_report(&mut self, r: CheckedReport) -> Vec<Ending> {
        let mut fx = Effects::default();
        let stopped = r.state.status() == pb::ExecutorStatus::Stopped;
        let terminated = terminated_fes(&r.state);
        self.note_running_fes(&r.state);
        if !stopped {
            self.register(&r.executor_id, r.state, r.watches, &mut fx);
        }
        for (result, plan) in r.results {
            self.apply_result(&r.executor_id, result, plan, &mut fx);
        }
        for (fe_id, reason, blamed) in terminated {
            self.forget_terminated_fe(&fe_id, &reason, blamed, &mut fx);
        }
        if stopped {
            self.remove_executor(&r.executor_id, &mut fx);
        }
        self.settle(fx)
    }

    /// Records cold-start times of workers reported RUNNING for the first time.
    fn note_running_fes(&mut self, state: &pb::ExecutorState) {
        for s in &state.function_executor_states {
            if s.status() != pb::FunctionExecutorStatus::Running {
                continue;
            }
            let Some(id) = s.description.as_ref().and_then(|d| d.id.as_deref()) else {
                continue;
            };
            if let Some(fe) = self.fes.get_mut(id)
                && fe.running_after.is_none()
            {
                let after = fe.placed_at.elapsed();
                fe.running_after = Some(after);
                self.cold_starts_ms.push(after.as_secs_f64() * 1000.0);
            }
        }
    }

    /// Creates or refreshes the executor; replaces its watches, and
    /// republishes it when a new watch can be answered already (the call
    /// finished before the watch arrived).
    fn register(
        &mut self,
        executor_id: &str,
        state: pb::ExecutorState,
        watches: BTreeSet<Watch>,
        fx: &mut Effects,
    ) {
        let old = self.executors.get(executor_id).map(|e| &e.watches);
        let answerable = watches
            .iter()
            .filter(|w| old.is_none_or(|o| !o.contains(*w)))
            .any(|w| self.watch_answerable(w));
        if !self.executors.contains_key(executor_id) {
            tracing::info!(executor = %executor_id, "executor registered");
        }
        let entry = self
            .executors
            .entry(executor_id.to_string())
            .or_insert_with(|| Executor {
                state: state.clone(),
                last_seen: Instant::now(),
                desired: watch::Sender::new(pb::DesiredExecutorState::default()),
                stream_cut: CancellationToken::new(),
                watches: BTreeSet::new(),
                published: 0,
                sent: Default::default(),
            });
        entry.state = state;
        entry.last_seen = Instant::now();
        entry.watches = watches;
        if answerable {
            fx.publish.insert(executor_id.to_string());
        }
    }

    /// Whether a watch names a finished run of a request that did not fail.
    fn watch_answerable(&self, w: &Watch) -> bool {
        let Some(req) = self.requests.get(&w.request_id) else {
            return false;
        };
        if matches!(req.verdict, Some(Verdict::Failure { .. })) {
            return false;
        }
        req.graph
            .run(&w.function_call_id)
            .is_some_and(|r| r.state.is_completed())
    }

    fn apply_result(
        &mut self,
        executor_id: &str,
        r: pb::AllocationResult,
        plan: Option<Plan>,
        fx: &mut Effects,
    ) {
        log_result(&mut self.log_results, executor_id, &r, plan.is_some());
        let Some(alloc_id) = r.allocation_id.clone() else {
            return;
        };
        let Some((rid, fc)) = self.allocations.get(&alloc_id).cloned() else {
            tracing::debug!(allocation = %alloc_id, "result for an unknown or finished allocation");
            return;
        };
        let Some(req) = self.requests.get_mut(&rid) else {
            return;
        };
        let Some(run) = req.graph.run(&fc) else {
            return;
        };
        if req.verdict.is_some() || run.state.is_completed() {
            return;
        }
        if let Some(e) = run.state.executor_id() {
            fx.publish.insert(e.to_string());
        }
        if r.outcome_code() == pb::AllocationOutcomeCode::Success {
            self.record_success(&rid, &fc, r, plan, fx);
        } else {
            let reason = r.failure_reason();
            self.record_failure(
                &rid,
                &fc,
                reason,
                r.request_error,
                r.execution_duration_ms,
                fx,
            );
        }
    }

    fn record_success(
        &mut self,
        rid: &str,
        fc: &str,
        r: pb::AllocationResult,
        plan: Option<Plan>,
        fx: &mut Effects,
    ) {
        let Some(req) = self.requests.get_mut(rid) else {
            return;
        };
        let value = match &r.return_value {
            Some(pb::allocation_result::ReturnValue::Value(p)) => {
                Some(normalized(p, None, &mut id))
            }
            _ => None,
        };
        match req
            .graph
            .record_success(fc, value, plan.as_ref(), r.execution_duration_ms)
        {
            Ok(changes) => {
                self.absorb(rid, changes, fx);
                self.advance(rid, fx);
            }
            Err(e) => {
                tracing::warn!(request = %rid, call = %fc, error = %e, "tail call refused; failing the request");
                let reason = pb::AllocationFailureReason::FunctionError;
                self.record_failure(rid, fc, reason, None, r.execution_duration_ms, fx);
            }
        }
    }

    fn record_failure(
        &mut self,
        rid: &str,
        fc: &str,
        reason: pb::AllocationFailureReason,
        request_error: Option<pb::DataPayload>,
        execution_duration_ms: Option<u64>,
        fx: &mut Effects,
    ) {
        let Some(req) = self.requests.get_mut(rid) else {
            return;
        };
        let changes = req
            .graph
            .record_failure(fc, reason, request_error, execution_duration_ms);
        self.absorb(rid, changes, fx);
        let run = Some(fc.to_string());
        self.end(rid, Verdict::Failure { reason, run }, fx);
    }

    fn forget_terminated_fe(
        &mut self,
        fe_id: &str,
        reason: &str,
        blamed: Vec<String>,
        fx: &mut Effects,
    ) {
        let Some(fe) = self.fes.remove(fe_id) else {
            return;
        };
        tracing::info!(fe = %fe_id, %reason, "function executor terminated; removed from desired state");
        push_log(
            &mut self.log_terminations,
            serde_json::json!({
                "function_executor_id": fe_id,
                "function": fe.key.2,
                "application": fe.key.1,
                "reason": reason,
                "allocation_ids_caused_termination": blamed,
            }),
        );
        fx.publish.insert(fe.executor_id);
    }
}

fn log_result(
    log: &mut Vec<serde_json::Value>,
    executor_id: &str,
    r: &pb::AllocationResult,
    tail_call: bool,
) {
    push_log(
        log,
        serde_json::json!({
            "executor_id": executor_id,
            "allocation_id": r.allocation_id,
            "function_call_id": r.function_call_id,
            "outcome": r.outcome_code().as_str_name(),
            "failure_reason": r.failure_reason.map(|_| r.failure_reason().as_str_name()),
            "execution_duration_ms": r.execution_duration_ms,
            "tail_call": tail_call,
        }),
    );
}
