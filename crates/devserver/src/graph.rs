//! One request's function calls and function runs, keyed by durable function
//! call id, and the transitions the Indexify server (v0.3.15) applies to
//! them: adding calls (a `ReduceOp` becomes a left-fold chain), creating a
//! run for every call whose arguments are ready, recording results (values
//! and tail calls), copying outputs up tail-call links, failing and
//! cancelling, and deciding when the request is over.
//!
//! Entry points: [`RequestGraph::new`] (the root call and run),
//! [`RequestGraph::add_plan`], [`RequestGraph::create_ready_runs`],
//! [`RequestGraph::record_success`], [`RequestGraph::record_failure`],
//! [`RequestGraph::verdict`].
//! Pure state: no locks, no IO. New runs start `Unplaced`; placing them on
//! function executors is the scheduler's job.
//! Must not know about: executors, function executors, blobs, HTTP.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sha2::{Digest, Sha256};
use steward_proto::executor_api_pb as pb;

/// Most function calls one request may hold (external input is bounded).
pub(crate) const MAX_CALLS_PER_REQUEST: usize = 100_000;

/// Where a function call's argument comes from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg {
    /// A value the caller uploaded.
    Inline(pb::DataPayload),
    /// The output of another function call of the same request.
    Output(String),
}

/// A function call as the caller described it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CallSpec {
    pub function: String,
    pub args: Vec<Arg>,
    pub call_metadata: Vec<u8>,
}

/// One entry of an execution plan (`ExecutionPlanUpdates.updates`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PlanOp {
    Call {
        id: String,
        spec: CallSpec,
    },
    /// Expanded into `function(function(a, b), c)…`; the last call gets `id`.
    Reduce {
        id: String,
        function: String,
        items: Vec<Arg>,
        call_metadata: Vec<u8>,
    },
}

/// A converted `ExecutionPlanUpdates`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    pub root: String,
    pub ops: Vec<PlanOp>,
}

/// A function call recorded in a request.
#[derive(Debug, Clone)]
pub(crate) struct FunctionCall {
    pub spec: CallSpec,
    /// The call whose run made this call; `None` for the root, tail calls and
    /// reduce chains (as the real server).
    pub parent: Option<String>,
}

/// How a finished run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunOutcome {
    Success,
    Failure(pb::AllocationFailureReason),
    /// Stopped because another run of the request failed.
    Cancelled,
}

/// Where a run is in its life.
#[derive(Debug, Clone)]
pub(crate) enum RunState {
    /// Waiting for a function executor; the allocation is ready to send.
    Unplaced {
        allocation: pb::Allocation,
    },
    /// In the desired state of `executor_id` (the function executor is named
    /// in the allocation).
    Placed {
        allocation: pb::Allocation,
        executor_id: String,
    },
    /// Taken out of the desired state (cancel, undeploy) before it finished;
    /// the agent's result for it is still recorded.
    Withdrawn {
        executor_id: Option<String>,
    },
    Completed(RunOutcome),
}

impl RunState {
    pub fn is_completed(&self) -> bool {
        matches!(self, RunState::Completed(_))
    }

    /// The executor that has (or had) the run's allocation.
    pub fn executor_id(&self) -> Option<&str> {
        match self {
            RunState::Placed { executor_id, .. } => Some(executor_id),
            RunState::Withdrawn { executor_id } => executor_id.as_deref(),
            _ => None,
        }
    }
}

/// One execution of a function call.
#[derive(Debug, Clone)]
pub(crate) struct FunctionRun {
    /// Creation order within the request (for stable listings).
    pub seq: u64,
    pub function: String,
    pub parent: Option<String>,
    pub allocation_id: String,
    pub state: RunState,
    pub output: Option<pb::DataPayload>,
    pub request_error: Option<pb::DataPayload>,
    /// The tail call whose output becomes this run's output.
    pub child_function_call: Option<String>,
    pub execution_duration_ms: Option<u64>,
}

/// Fixed parts of every allocation of a request.
#[derive(Debug, Clone)]
pub(crate) struct AllocationTemplate {
    pub namespace: String,
    pub application: String,
    pub request_id: String,
    pub data_prefix: String,
    pub error_prefix: String,
}

/// Why a plan could not be added.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum PlanError {
    #[error("request {request_id} would hold more than {limit} function calls")]
    TooManyCalls { request_id: String, limit: usize },
    #[error("reduce {id} has {items} item(s); it needs at least 2")]
    ShortReduce { id: String, items: usize },
}

/// How a request ended, before its payloads are decoded.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    Success,
    Failure {
        reason: pb::AllocationFailureReason,
        /// The run whose failure ended the request.
        run: Option<String>,
    },
}

/// Runs whose observable state changed (for watch notification) and
/// executors whose desired state lost an allocation.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub runs: Vec<String>,
    pub executors: Vec<String>,
    /// Allocation ids that will never be accepted again.
    pub finished_allocations: Vec<String>,
}

/// The calls and runs of one request.
pub(crate) struct RequestGraph {
    template: AllocationTemplate,
    calls: BTreeMap<String, FunctionCall>,
    runs: BTreeMap<String, FunctionRun>,
    /// Calls that have no run yet (their arguments are not ready).
    waiting: BTreeSet<String>,
    /// child function call id -> runs that tail-called it.
    tail_parents: HashMap<String, Vec<String>>,
    next_seq: u64,
}

fn reduce_link_id(reduce_id: &str, position: usize) -> String {
    let mut h = Sha256::new();
    h.update(reduce_id.as_bytes());
    h.update(b":reduce:");
    h.update(position.to_string().as_bytes());
    hex::encode(h.finalize())
}

/// A payload as sent in an allocation: defaults filled, an id assigned.
pub(crate) fn normalized(
    p: &pb::DataPayload,
    source_function_call_id: Option<String>,
    new_id: &mut dyn FnMut() -> String,
) -> pb::DataPayload {
    pb::DataPayload {
        encoding_version: Some(p.encoding_version.unwrap_or(0)),
        metadata_size: Some(p.metadata_size.unwrap_or(0)),
        offset: Some(p.offset.unwrap_or(0)),
        source_function_call_id,
        id: Some(
            p.id.clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(new_id),
        ),
        ..p.clone()
    }
}

impl RequestGraph {
    /// A request whose root call (id = request id) runs `root_allocation`.
    pub fn new(
        template: AllocationTemplate,
        root_function: &str,
        root_allocation: pb::Allocation,
    ) -> Self {
        let root = template.request_id.clone();
        let spec = CallSpec {
            function: root_function.to_string(),
            args: root_allocation
                .args
                .iter()
                .cloned()
                .map(Arg::Inline)
                .collect(),
            call_metadata: Vec::new(),
        };
        let mut g = RequestGraph {
            template,
            calls: BTreeMap::new(),
            runs: BTreeMap::new(),
            waiting: BTreeSet::new(),
            tail_parents: HashMap::new(),
            next_seq: 0,
        };
        g.calls
            .insert(root.clone(), FunctionCall { spec, parent: None });
        g.insert_run(&root, root_allocation);
        g
    }

    pub fn root_id(&self) -> &str {
        &self.template.request_id
    }

    pub fn has_call(&self, id: &str) -> bool {
        self.calls.contains_key(id)
    }

    pub fn run(&self, id: &str) -> Option<&FunctionRun> {
        self.runs.get(id)
    }

    pub fn run_mut(&mut self, id: &str) -> Option<&mut FunctionRun> {
        self.runs.get_mut(id)
    }

    pub fn runs(&self) -> impl Iterator<Item = (&String, &FunctionRun)> {
        self.runs.iter()
    }

    /// Calls still waiting for their arguments, with their spec and parent.
    pub fn waiting_calls(&self) -> impl Iterator<Item = (&String, &FunctionCall)> {
        self.waiting
            .iter()
            .filter_map(|id| self.calls.get(id).map(|c| (id, c)))
    }

    pub fn call_count(&self) -> usize {
        self.calls.len()
    }

    fn insert_run(&mut self, id: &str, allocation: pb::Allocation) {
        let function = allocation
            .function
            .as_ref()
            .and_then(|f| f.function_name.clone())
            .unwrap_or_default();
        let parent = self.calls.get(id).and_then(|c| c.parent.clone());
        self.next_seq += 1;
        self.runs.insert(
            id.to_string(),
            FunctionRun {
                seq: self.next_seq,
                function,
                parent,
                allocation_id: allocation.allocation_id.clone().unwrap_or_default(),
                state: RunState::Unplaced { allocation },
                output: None,
                request_error: None,
                child_function_call: None,
                execution_duration_ms: None,
            },
        );
        self.waiting.remove(id);
    }

    /// How many calls `ops` would add.
    fn added_calls(ops: &[PlanOp]) -> usize {
        ops.iter()
            .map(|op| match op {
                PlanOp::Call { .. } => 1,
                PlanOp::Reduce { items, .. } => items.len().saturating_sub(1),
            })
            .sum()
    }

    /// Adds a plan's calls (overwriting same ids). Checks everything first,
    /// so an error changes nothing.
    pub fn add_plan(&mut self, ops: &[PlanOp], parent: Option<&str>) -> Result<(), PlanError> {
        self.check_plan(ops)?;
        self.add_checked_plan(ops, parent);
        Ok(())
    }

    /// Whether `add_plan` would accept `ops`.
    pub fn check_plan(&self, ops: &[PlanOp]) -> Result<(), PlanError> {
        if self.calls.len() + Self::added_calls(ops) > MAX_CALLS_PER_REQUEST {
            return Err(PlanError::TooManyCalls {
                request_id: self.template.request_id.clone(),
                limit: MAX_CALLS_PER_REQUEST,
            });
        }
        for op in ops {
            if let PlanOp::Reduce { id, items, .. } = op
                && items.len() < 2
            {
                return Err(PlanError::ShortReduce {
                    id: id.clone(),
                    items: items.len(),
                });
            }
        }
        Ok(())
    }

    fn add_checked_plan(&mut self, ops: &[PlanOp], parent: Option<&str>) {
        for op in ops {
            if let PlanOp::Call { id, spec } = op {
                let parent = parent.map(String::from);
                self.add_call(id, spec.clone(), parent);
            }
        }
        for op in ops {
            if let PlanOp::Reduce {
                id,
                function,
                items,
                call_metadata,
            } = op
            {
                self.add_reduce(id, function, items, call_metadata);
            }
        }
    }

    fn add_call(&mut self, id: &str, spec: CallSpec, parent: Option<String>) {
        self.calls
            .insert(id.to_string(), FunctionCall { spec, parent });
        // An id that already has a run is not run again (replay).
        if !self.runs.contains_key(id) {
            self.waiting.insert(id.to_string());
        }
    }

    /// `function(function(a, b), c)…`: each link takes the previous link's
    /// output; the last link gets `id`. Fewer than 2 items are refused by
    /// `check_plan`.
    fn add_reduce(&mut self, id: &str, function: &str, items: &[Arg], call_metadata: &[u8]) {
        let Some((first, rest)) = items.split_first() else {
            return;
        };
        let mut acc = first.clone();
        for (position, item) in rest.iter().enumerate() {
            let link_id = if position + 1 == rest.len() {
                id.to_string()
            } else {
                reduce_link_id(id, position)
            };
            let spec = CallSpec {
                function: function.to_string(),
                args: vec![acc, item.clone()],
                call_metadata: call_metadata.to_vec(),
            };
            self.add_call(&link_id, spec, None);
            acc = Arg::Output(link_id);
        }
    }

    fn arg_payload(
        &self,
        arg: &Arg,
        new_id: &mut dyn FnMut() -> String,
    ) -> Option<pb::DataPayload> {
        match arg {
            Arg::Inline(p) => Some(normalized(p, None, new_id)),
            Arg::Output(call_id) => {
                let out = self.runs.get(call_id)?.output.as_ref()?;
                Some(normalized(out, Some(call_id.clone()), new_id))
            }
        }
    }

    fn allocation_for(
        &self,
        id: &str,
        call: &FunctionCall,
        new_id: &mut dyn FnMut() -> String,
    ) -> Option<pb::Allocation> {
        let args = call
            .spec
            .args
            .iter()
            .map(|a| self.arg_payload(a, new_id))
            .collect::<Option<Vec<_>>>()?;
        let t = &self.template;
        Some(pb::Allocation {
            function: Some(pb::FunctionRef {
                namespace: Some(t.namespace.clone()),
                application_name: Some(t.application.clone()),
                function_name: Some(call.spec.function.clone()),
                application_version: None,
            }),
            allocation_id: Some(new_id()),
            function_call_id: Some(id.to_string()),
            request_id: Some(t.request_id.clone()),
            args,
            request_data_payload_uri_prefix: Some(t.data_prefix.clone()),
            request_error_payload_uri_prefix: Some(t.error_prefix.clone()),
            function_executor_id: None,
            function_call_metadata: Some(call.spec.call_metadata.clone()),
        })
    }

    /// Creates a run for every waiting call whose arguments are all ready;
    /// returns their ids.
    pub fn create_ready_runs(&mut self, new_id: &mut dyn FnMut() -> String) -> Vec<String> {
        let mut ready = Vec::new();
        for id in &self.waiting {
            let Some(call) = self.calls.get(id) else {
                continue;
            };
            if let Some(allocation) = self.allocation_for(id, call, new_id) {
                ready.push((id.clone(), allocation));
            }
        }
        let ids = ready.iter().map(|(id, _)| id.clone()).collect();
        for (id, allocation) in ready {
            self.insert_run(&id, allocation);
        }
        ids
    }

    /// Records a successful result of run `id`: its value, or a tail call
    /// (`plan`, whose root's output becomes this run's). Outputs are copied
    /// up tail-call links. A plan error changes nothing.
    pub fn record_success(
        &mut self,
        id: &str,
        value: Option<pb::DataPayload>,
        plan: Option<&Plan>,
        execution_duration_ms: Option<u64>,
    ) -> Result<Changes, PlanError> {
        if let Some(plan) = plan {
            self.check_plan(&plan.ops)?;
        }
        let mut changes = Changes::default();
        let Some(run) = self.runs.get_mut(id) else {
            return Ok(changes);
        };
        run.state = RunState::Completed(RunOutcome::Success);
        run.output = value;
        run.execution_duration_ms = execution_duration_ms;
        run.child_function_call = plan.map(|p| p.root.clone());
        changes.runs.push(id.to_string());
        changes.finished_allocations.push(run.allocation_id.clone());
        if let Some(plan) = plan {
            self.tail_parents
                .entry(plan.root.clone())
                .or_default()
                .push(id.to_string());
            self.add_checked_plan(&plan.ops, None);
            // The tail call may name a run that already has its output.
            if self
                .runs
                .get(&plan.root)
                .is_some_and(|r| r.output.is_some())
            {
                changes.runs.extend(self.propagate(&plan.root));
            }
        } else {
            changes.runs.extend(self.propagate(id));
        }
        Ok(changes)
    }

    /// Copies run `from`'s output to every run whose tail call it is, and
    /// up their links in turn; returns the runs that got an output.
    fn propagate(&mut self, from: &str) -> Vec<String> {
        let mut updated = Vec::new();
        let mut work = vec![from.to_string()];
        while let Some(child) = work.pop() {
            let Some(output) = self.runs.get(&child).and_then(|r| r.output.clone()) else {
                continue;
            };
            let parents = self.tail_parents.get(&child).cloned().unwrap_or_default();
            for p in parents {
                let Some(run) = self.runs.get_mut(&p) else {
                    continue;
                };
                if run.output.is_some() {
                    continue; // Already resolved; also stops cycles.
                }
                run.output = Some(output.clone());
                run.state = RunState::Completed(RunOutcome::Success);
                updated.push(p.clone());
                work.push(p);
            }
        }
        updated
    }

    /// Records that run `id` failed (the caller then ends the request,
    /// which cancels the other runs).
    pub fn record_failure(
        &mut self,
        id: &str,
        reason: pb::AllocationFailureReason,
        request_error: Option<pb::DataPayload>,
        execution_duration_ms: Option<u64>,
    ) -> Changes {
        let mut changes = Changes::default();
        if let Some(run) = self.runs.get_mut(id) {
            run.state = RunState::Completed(RunOutcome::Failure(reason));
            run.request_error = request_error;
            run.execution_duration_ms = execution_duration_ms;
            changes.runs.push(id.to_string());
            changes.finished_allocations.push(run.allocation_id.clone());
        }
        changes
    }

    /// Marks every unfinished run cancelled; returns the executors that had
    /// their allocations.
    pub fn cancel_unfinished(&mut self) -> Changes {
        let mut changes = Changes::default();
        for (id, run) in &mut self.runs {
            if run.state.is_completed() {
                continue;
            }
            if let Some(e) = run.state.executor_id() {
                changes.executors.push(e.to_string());
            }
            run.state = RunState::Completed(RunOutcome::Cancelled);
            changes.runs.push(id.clone());
            changes.finished_allocations.push(run.allocation_id.clone());
        }
        changes
    }

    /// Takes every allocation out of the desired state: placed runs become
    /// `Withdrawn` (their results still count), unplaced ones are cancelled.
    /// Returns the executors that had allocations, or `None` when no run was
    /// in flight.
    pub fn withdraw(&mut self) -> Option<Changes> {
        let mut changes = Changes::default();
        let mut any = false;
        for (id, run) in &mut self.runs {
            match &run.state {
                RunState::Placed { executor_id, .. } => {
                    changes.executors.push(executor_id.clone());
                    run.state = RunState::Withdrawn {
                        executor_id: Some(executor_id.clone()),
                    };
                }
                RunState::Unplaced { .. } => {
                    run.state = RunState::Completed(RunOutcome::Cancelled);
                    changes.finished_allocations.push(run.allocation_id.clone());
                    changes.runs.push(id.clone());
                }
                _ => continue,
            }
            any = true;
        }
        any.then_some(changes)
    }

    fn in_flight(&self) -> bool {
        self.runs.values().any(|r| !r.state.is_completed())
    }

    fn root_resolved(&self) -> bool {
        self.runs.get(self.root_id()).is_some_and(|r| {
            matches!(r.state, RunState::Completed(RunOutcome::Success))
                && (r.output.is_some() || r.child_function_call.is_none())
        })
    }

    /// Whether the request is over: `None` while any run is unfinished.
    /// Success needs every run successful and the root's output resolved
    /// through its tail calls; a request whose runs all finished without that
    /// can never progress and fails.
    pub fn verdict(&self, withdrawn: bool) -> Option<Verdict> {
        if self.in_flight() {
            return None;
        }
        let failed = self.runs.iter().find_map(|(id, r)| match r.state {
            RunState::Completed(RunOutcome::Failure(reason)) => Some((id.clone(), reason)),
            _ => None,
        });
        if let Some((run, reason)) = failed {
            return Some(Verdict::Failure {
                reason,
                run: Some(run),
            });
        }
        let all_success = self
            .runs
            .values()
            .all(|r| matches!(r.state, RunState::Completed(RunOutcome::Success)));
        if all_success && self.root_resolved() {
            return Some(Verdict::Success);
        }
        let reason = if withdrawn {
            pb::AllocationFailureReason::AllocationCancelled
        } else {
            pb::AllocationFailureReason::FunctionError
        };
        Some(Verdict::Failure { reason, run: None })
    }

    /// The output the request returns: the root run's (after propagation).
    pub fn root_output(&self) -> Option<&pb::DataPayload> {
        self.runs
            .get(self.root_id())
            .and_then(|r| r.output.as_ref())
    }
}
