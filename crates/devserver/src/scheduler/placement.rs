//! Placement and desired states: runs go to the one function executor of
//! their (namespace, application, function, version), created on the least
//! loaded running executor when missing, as long as it has a free slot:
//! like the real server, a function executor holds at most
//! `max_concurrency × QUEUE_SIZE` allocations in the desired state, and the
//! other runnable runs wait here, per function executor key, in the order
//! they became runnable. An executor's desired state holds its function
//! executors, the allocations placed on them, and a `FunctionCallResult` for
//! each watched call whose run exists.
//! Must not know about: how requests progress (see `crate::graph`).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use steward_proto::executor_api_pb as pb;

use super::{Effects, Fe, FeKey, Inner, Request, id};
use crate::graph::{RunOutcome, RunState, Verdict};

/// Allocations a function executor holds per unit of `max_concurrency`, as
/// the real server's `queue_size`.
const QUEUE_SIZE: usize = 1;

/// How placing one run went.
enum Placement {
    Placed {
        fe_id: String,
        executor_id: String,
    },
    /// Its function executor is full, or there is none and no running
    /// executor to create one on (or the application is gone): try again on
    /// the next change.
    Wait,
    /// The application has no such function.
    Impossible,
}

/// Runnable runs not yet in any desired state, per function executor key,
/// oldest first. Entries whose run was placed, cancelled or forgotten
/// meanwhile are dropped when met.
#[derive(Default)]
pub(super) struct Pending {
    queues: HashMap<FeKey, VecDeque<Waiting>>,
    /// Order of becoming runnable, across keys.
    next_seq: u64,
}

struct Waiting {
    seq: u64,
    request_id: String,
    run_id: String,
}

impl Pending {
    /// Queues run `run_id` of request `request_id` behind the others of `key`.
    pub(super) fn push(&mut self, key: FeKey, request_id: &str, run_id: &str) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queues.entry(key).or_default().push_back(Waiting {
            seq,
            request_id: request_id.to_string(),
            run_id: run_id.to_string(),
        });
    }

    /// Keys with waiting runs, by their oldest run.
    fn keys(&self) -> Vec<FeKey> {
        let mut keys: Vec<(u64, &FeKey)> = self
            .queues
            .iter()
            .filter_map(|(k, q)| q.front().map(|w| (w.seq, k)))
            .collect();
        keys.sort_unstable_by_key(|(seq, _)| *seq);
        keys.into_iter().map(|(_, k)| k.clone()).collect()
    }

    fn front(&self, key: &FeKey) -> Option<(&str, &str)> {
        let w = self.queues.get(key)?.front()?;
        Some((&w.request_id, &w.run_id))
    }

    fn pop(&mut self, key: &FeKey) {
        if let Some(q) = self.queues.get_mut(key) {
            q.pop_front();
            if q.is_empty() {
                self.queues.remove(key);
            }
        }
    }

    /// Runs still waiting (stale entries not counted).
    pub(super) fn count(&self, requests: &HashMap<String, Request>) -> usize {
        self.queues
            .values()
            .flatten()
            .filter(|w| is_unplaced(requests, &w.request_id, &w.run_id))
            .count()
    }
}

/// Whether run `run_id` of request `rid` still waits for placement.
fn is_unplaced(requests: &HashMap<String, Request>, rid: &str, run_id: &str) -> bool {
    requests
        .get(rid)
        .filter(|r| r.verdict.is_none())
        .and_then(|r| r.graph.run(run_id))
        .is_some_and(|run| matches!(run.state, RunState::Unplaced { .. }))
}

/// Whether run `run_id` of request `rid` is an allocation in the desired
/// state on function executor `fe_id` (what `allocations_on` sends).
fn placed_on(requests: &HashMap<String, Request>, rid: &str, run_id: &str, fe_id: &str) -> bool {
    requests
        .get(rid)
        .filter(|r| r.verdict.is_none())
        .and_then(|r| r.graph.run(run_id))
        .is_some_and(|run| match &run.state {
            RunState::Placed { allocation, .. } => {
                allocation.function_executor_id.as_deref() == Some(fe_id)
            }
            _ => false,
        })
}

/// How many allocations a function executor may hold at once (a
/// `max_concurrency` of 0, which the agent refuses, counts as 1).
fn capacity(fe: &Fe) -> usize {
    let concurrency = fe.description.max_concurrency.unwrap_or(1).max(1);
    usize::try_from(concurrency).unwrap_or(usize::MAX) * QUEUE_SIZE
}

impl Inner {
    /// Places waiting runs on function executors with a free slot, creating
    /// those as needed: per function executor, oldest first; functions in
    /// the order of their oldest waiting run.
    pub(super) fn place(&mut self, fx: &mut Effects) {
        // Failing a request (unknown function) can free slots of functions
        // already passed over: go round again.
        while self.place_round(fx) {}
    }

    /// One pass over the waiting runs; true when it failed a request.
    fn place_round(&mut self, fx: &mut Effects) -> bool {
        let mut failed = false;
        for key in self.pending.keys() {
            while let Some((rid, run_id)) = self.pending.front(&key) {
                if !is_unplaced(&self.requests, rid, run_id) {
                    self.pending.pop(&key); // Ended, withdrawn or forgotten.
                    continue;
                }
                let (rid, run_id) = (rid.to_string(), run_id.to_string());
                match self.placement_for(&key) {
                    Placement::Placed { fe_id, executor_id } => {
                        self.pending.pop(&key);
                        self.assign(&rid, &run_id, &fe_id, &executor_id);
                        fx.publish.insert(executor_id);
                    }
                    Placement::Wait => break,
                    Placement::Impossible => {
                        self.pending.pop(&key);
                        tracing::warn!(request = %rid, function = %key.2, "no such function in the application; failing the request");
                        self.fail_request(
                            &rid,
                            pb::AllocationFailureReason::ConstraintUnsatisfiable,
                            fx,
                        );
                        failed = true;
                    }
                }
            }
        }
        failed
    }

    fn placement_for(&mut self, key: &FeKey) -> Placement {
        if let Some(fe_id) = self
            .fes
            .iter()
            .find(|(_, fe)| &fe.key == key)
            .map(|(id, _)| id.clone())
        {
            return match self.has_free_slot(&fe_id) {
                Some(executor_id) => Placement::Placed { fe_id, executor_id },
                None => Placement::Wait,
            };
        }
        match self.apps.get(&(key.0.clone(), key.1.clone())) {
            None => return Placement::Wait,
            Some(app) if !app.functions.iter().any(|f| f == &key.2) => {
                return Placement::Impossible;
            }
            Some(_) => {}
        }
        match self.new_fe(key) {
            Some((fe_id, executor_id)) => Placement::Placed { fe_id, executor_id },
            None => Placement::Wait,
        }
    }

    /// The executor of function executor `fe_id` when it is running and
    /// the worker holds fewer allocations in the desired state than its
    /// capacity (forgetting the runs that left it: finished, cancelled,
    /// withdrawn).
    fn has_free_slot(&mut self, fe_id: &str) -> Option<String> {
        let Inner {
            fes,
            requests,
            faults,
            executors,
            ..
        } = self;
        let fe = fes.get_mut(fe_id)?;
        // An executor that reports itself DRAINED (paused by its operator)
        // gets no new allocation, as the real server does.
        if !faults.place_on_drained
            && executors
                .get(&fe.executor_id)
                .is_none_or(|e| e.state.status() != pb::ExecutorStatus::Running)
        {
            return None;
        }
        fe.placed
            .retain(|(rid, run_id)| placed_on(requests, rid, run_id, fe_id));
        let unlimited = faults.placement == super::PlacementMode::Unlimited;
        (unlimited || fe.placed.len() < capacity(fe)).then(|| fe.executor_id.clone())
    }

    /// Moves an unplaced run onto function executor `fe_id`.
    fn assign(&mut self, rid: &str, run_id: &str, fe_id: &str, executor_id: &str) {
        let Some(req) = self.requests.get_mut(rid) else {
            return;
        };
        if run_id == req.graph.root_id() {
            req.outcome.executor_id = Some(executor_id.to_string());
            req.outcome.function_executor_id = Some(fe_id.to_string());
        }
        let Some(run) = req.graph.run_mut(run_id) else {
            return;
        };
        if let RunState::Unplaced { allocation } = &mut run.state {
            self.allocations_created += 1;
            if let Some(fe) = self.fes.get_mut(fe_id) {
                fe.placed.push((rid.to_string(), run_id.to_string()));
            }
            allocation.function_executor_id = Some(fe_id.to_string());
            let allocation = std::mem::take(allocation);
            run.state = RunState::Placed {
                allocation,
                executor_id: executor_id.to_string(),
            };
        }
    }

    fn new_fe(&mut self, key: &FeKey) -> Option<(String, String)> {
        let app = self.apps.get(&(key.0.clone(), key.1.clone()))?;
        // Least loaded executor that is running.
        let executor_id = self
            .executors
            .iter()
            .filter(|(_, e)| e.state.status() == pb::ExecutorStatus::Running)
            .min_by_key(|(id, _)| self.fes.values().filter(|f| &f.executor_id == *id).count())
            .map(|(id, _)| id.clone())?;
        let o = &app.options;
        let fe_id = id();
        let function = pb::FunctionRef {
            namespace: Some(key.0.clone()),
            application_name: Some(key.1.clone()),
            function_name: Some(key.2.clone()),
            application_version: Some(key.3.clone()),
        };
        let gpu_model = self
            .executors
            .get(&executor_id)
            .and_then(|e| e.state.total_resources.as_ref())
            .and_then(|r| r.gpu.as_ref())
            .and_then(|g| g.model)
            .or(Some(pb::GpuModel::Unknown as i32));
        let description = pb::FunctionExecutorDescription {
            id: Some(fe_id.clone()),
            function: Some(function),
            secret_names: Vec::new(),
            initialization_timeout_ms: Some(o.initialization_timeout_ms),
            application: Some(app.code.clone()),
            resources: Some(pb::FunctionExecutorResources {
                cpu_ms_per_sec: Some(o.cpu_ms_per_sec),
                memory_bytes: Some(o.memory_bytes),
                disk_bytes: Some(o.disk_bytes),
                gpu: (o.gpus > 0).then_some(pb::GpuResources {
                    count: Some(o.gpus),
                    model: gpu_model,
                }),
            }),
            max_concurrency: Some(o.max_concurrency),
            allocation_timeout_ms: Some(o.allocation_timeout_ms),
            sandbox_metadata: None,
            container_type: Some(pb::FunctionExecutorType::Function as i32),
            // As the real server names a function's pool.
            pool_id: Some(format!("fn:{}:{}:{}:{}", key.0, key.1, key.2, key.3)),
        };
        self.fes.insert(
            fe_id.clone(),
            Fe {
                executor_id: executor_id.clone(),
                description,
                key: key.clone(),
                placed_at: Instant::now(),
                running_after: None,
                placed: Vec::new(),
            },
        );
        Some((fe_id, executor_id))
    }

    /// Adds the executors watching any changed run to those to republish.
    pub(super) fn notify_watchers(&self, fx: &mut Effects) {
        for (rid, fc) in &fx.changed_runs {
            for (executor_id, e) in &self.executors {
                if watches_call(&e.watches, rid, fc) {
                    fx.publish.insert(executor_id.clone());
                }
            }
        }
    }

    /// Recomputes and sends `executor_id`'s full desired state with a new
    /// clock (the stream delivers the latest one only), and counts it.
    pub(super) fn publish(&mut self, executor_id: &str) {
        if !self.executors.contains_key(executor_id) {
            return;
        }
        self.clock += 1;
        self.desired_states_published += 1;
        let state = pb::DesiredExecutorState {
            function_executors: self
                .fes
                .values()
                .filter(|f| f.executor_id == executor_id)
                .map(|f| f.description.clone())
                .collect(),
            allocations: self.allocations_on(executor_id),
            clock: Some(self.clock),
            function_call_results: self.results_for(executor_id),
        };
        if let Some(e) = self.executors.get_mut(executor_id) {
            e.published += 1;
            e.desired.send_replace(state);
        }
    }

    fn allocations_on(&self, executor_id: &str) -> Vec<pb::Allocation> {
        let fe_here = |fe_id: &Option<String>| {
            fe_id
                .as_ref()
                .and_then(|id| self.fes.get(id))
                .is_some_and(|f| f.executor_id == executor_id)
        };
        let mut out = Vec::new();
        for req in self.requests.values().filter(|r| r.verdict.is_none()) {
            for (_, run) in req.graph.runs() {
                if let RunState::Placed { allocation, .. } = &run.state
                    && fe_here(&allocation.function_executor_id)
                {
                    out.push(allocation.clone());
                }
            }
        }
        out
    }

    /// A `FunctionCallResult` for each watch of `executor_id` whose run
    /// exists, unless its request failed (the real server deletes those).
    fn results_for(&self, executor_id: &str) -> Vec<pb::FunctionCallResult> {
        let Some(e) = self.executors.get(executor_id) else {
            return Vec::new();
        };
        e.watches
            .iter()
            .filter_map(|w| {
                let req = self.requests.get(&w.request_id).filter(|r| {
                    r.outcome.namespace == w.namespace
                        && r.outcome.application == w.application
                        && !matches!(r.verdict, Some(Verdict::Failure { .. }))
                })?;
                let run = req.graph.run(&w.function_call_id)?;
                Some(call_result(
                    w,
                    &run.state,
                    run.output.as_ref(),
                    run.request_error.as_ref(),
                ))
            })
            .collect()
    }
}

/// Whether `watches` holds a watch of call `fc` of request `rid`.
pub(super) fn watches_call(
    watches: &std::collections::BTreeSet<crate::convert::Watch>,
    rid: &str,
    fc: &str,
) -> bool {
    let from = crate::convert::Watch {
        request_id: rid.to_string(),
        function_call_id: fc.to_string(),
        namespace: String::new(),
        application: String::new(),
    };
    watches
        .range(from..)
        .next()
        .is_some_and(|w| w.request_id == rid && w.function_call_id == fc)
}

fn call_result(
    w: &crate::convert::Watch,
    state: &RunState,
    output: Option<&pb::DataPayload>,
    request_error: Option<&pb::DataPayload>,
) -> pb::FunctionCallResult {
    let (code, reason) = match state {
        RunState::Completed(RunOutcome::Success) => (pb::AllocationOutcomeCode::Success, None),
        RunState::Completed(RunOutcome::Failure(r)) => {
            (pb::AllocationOutcomeCode::Failure, Some(*r as i32))
        }
        RunState::Completed(RunOutcome::Cancelled) => (
            pb::AllocationOutcomeCode::Failure,
            Some(pb::AllocationFailureReason::AllocationCancelled as i32),
        ),
        _ => (pb::AllocationOutcomeCode::Unknown, None),
    };
    // As the real server rebuilds them: no content type, no source call.
    let strip = |p: &pb::DataPayload| pb::DataPayload {
        content_type: None,
        source_function_call_id: None,
        ..p.clone()
    };
    pb::FunctionCallResult {
        namespace: Some(w.namespace.clone()),
        request_id: Some(w.request_id.clone()),
        function_call_id: Some(w.function_call_id.clone()),
        outcome_code: Some(code as i32),
        failure_reason: reason,
        return_value: output.map(strip),
        request_error: request_error.map(strip),
    }
}
