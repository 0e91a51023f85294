//! What one desired state asks of the agent, decided without acting: a
//! pure function of the desired state, the registry and the allocations
//! held, the operator's mode and what the host can admit. Workers first
//! (new ids start, or are refused or rejected; ids no longer desired
//! stop), then allocations (new ones run on their worker or are rejected
//! with a named reason; ones no longer desired are dropped).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::admission::{self, Claim, Refusal, WorkerDefaults};
use crate::desired::Desired;
use crate::lifecycle::{FeMap, FePhase, FeSlot, admitted};
use crate::mode::HostMode;
use crate::pb;
use crate::validate::Rejection;

/// What the plan reads.
pub(crate) struct Current<'a> {
    pub fes: &'a FeMap,
    /// Allocation id to its worker's id, for every allocation held.
    pub allocations: &'a HashMap<String, String>,
    pub mode: HostMode,
    pub allocatable: pb::HostResources,
    pub defaults: &'a WorkerDefaults,
}

/// Validation and admission-control verdicts (they read the filesystem
/// for `file://` locations, so they are reached before planning), one per
/// desired item, in order; `None` for an item the agent already holds.
#[derive(Default)]
pub(crate) struct Verdicts {
    pub fes: Vec<Option<Result<(), Rejection>>>,
    pub allocations: Vec<Option<Result<(), Rejection>>>,
}

/// A worker to start. `refusal`: why it may not (its controller then
/// fails its startup with that, so allocations sent to it fail with it).
pub(crate) struct StartFe {
    pub id: String,
    pub description: Arc<pb::FunctionExecutorDescription>,
    /// What it holds, when admitted.
    pub claim: Option<Claim>,
    pub defaulted: Vec<&'static str>,
    pub refusal: Option<Refusal>,
}

/// A description rejected before any controller.
pub(crate) struct RejectFe {
    /// Empty: nothing to report it under (an event only).
    pub id: String,
    pub description: Arc<pb::FunctionExecutorDescription>,
    pub rejection: Rejection,
}

/// An allocation that gets a failed result instead of a worker.
pub(crate) struct RejectAllocation {
    pub allocation: Arc<pb::Allocation>,
    pub code: &'static str,
    pub message: String,
    pub reason: pb::AllocationFailureReason,
}

/// What to do, in the order to do it.
#[derive(Default)]
pub(crate) struct Plan {
    pub start: Vec<StartFe>,
    pub reject_fes: Vec<RejectFe>,
    /// Desired no more: their controllers are told to shut down.
    pub stop: Vec<String>,
    /// Rejected descriptions desired no more: forgotten.
    pub forget: Vec<String>,
    /// (worker id, allocation) to run.
    pub run: Vec<(String, Arc<pb::Allocation>)>,
    pub reject_allocations: Vec<RejectAllocation>,
    /// (allocation id, worker id) of allocations desired no more.
    pub dropped: Vec<(String, String)>,
}

impl Plan {
    /// Whether the set of workers changes (the server hears at once).
    pub fn fes_changed(&self) -> bool {
        !self.start.is_empty()
            || self.reject_fes.iter().any(|r| !r.id.is_empty())
            || !self.stop.is_empty()
            || !self.forget.is_empty()
    }
}

/// Whether a desired worker or allocation is new to the agent.
pub(crate) fn new_fe(current: &Current<'_>, d: &pb::FunctionExecutorDescription) -> bool {
    !current.fes.contains_key(d.id.as_deref().unwrap_or(""))
}

pub(crate) fn new_allocation(current: &Current<'_>, a: &pb::Allocation) -> bool {
    !current
        .allocations
        .contains_key(a.allocation_id.as_deref().unwrap_or(""))
}

/// Decides what `desired` asks of the agent as it is (`current`).
pub(crate) fn plan(desired: &Desired, current: &Current<'_>, verdicts: Verdicts) -> Plan {
    let mut plan = Plan::default();
    plan_fes(desired, current, verdicts.fes, &mut plan);
    plan_allocations(desired, current, verdicts.allocations, &mut plan);
    plan
}

/// A verdict that was not reached (the item was not new when checked).
fn unchecked() -> Result<(), Rejection> {
    Err(Rejection {
        code: "not_checked",
        message: "the agent did not check this item before planning".into(),
    })
}

fn plan_fes(
    desired: &Desired,
    current: &Current<'_>,
    verdicts: Vec<Option<Result<(), Rejection>>>,
    plan: &mut Plan,
) {
    let mut held = admitted(current.fes);
    let allocatable = admission::allocatable(&current.allocatable);
    let mut wanted: HashSet<&str> = HashSet::new();
    let mut verdicts = verdicts.into_iter();
    for d in &desired.function_executors {
        let verdict = verdicts.next().flatten();
        let id = d.id.as_deref().unwrap_or("");
        let new = !current.fes.contains_key(id) && !wanted.contains(id);
        if !id.is_empty() {
            wanted.insert(id);
        }
        if !new {
            // Immutable per id; one being removed is recreated once gone.
            continue;
        }
        match verdict.unwrap_or_else(unchecked) {
            Ok(()) => {
                let start = admit(current, &held, &allocatable, id, d);
                if let Some(c) = start.claim {
                    held = held.plus(c);
                }
                plan.start.push(start);
            }
            Err(rejection) => plan.reject_fes.push(RejectFe {
                id: id.to_string(),
                description: d.clone(),
                rejection,
            }),
        }
    }
    for (id, slot) in current.fes {
        if wanted.contains(id.as_str()) {
            continue;
        }
        match slot {
            FeSlot::Wanted(_) => plan.stop.push(id.clone()),
            FeSlot::Removing(_) => {}
            FeSlot::Rejected(_) => plan.forget.push(id.clone()),
        }
    }
}

/// Admission of a new worker next to the workers holding `held`, and the
/// operator's mode.
fn admit(
    current: &Current<'_>,
    held: &Claim,
    allocatable: &Claim,
    id: &str,
    d: &Arc<pb::FunctionExecutorDescription>,
) -> StartFe {
    let eff = admission::effective(d, current.defaults);
    let verdict = admission::admit(&eff.claim, held, allocatable);
    let mut refusal = verdict.err();
    let claim = refusal.is_none().then_some(eff.claim);
    if current.mode != HostMode::Active {
        refusal = Some(Refusal {
            resource: "host_mode",
            message: format!(
                "the host is {} by its operator: no new worker starts",
                current.mode.as_str()
            ),
        });
    }
    StartFe {
        id: id.to_string(),
        description: d.clone(),
        claim,
        defaulted: eff.defaulted,
        refusal,
    }
}

/// Where allocations may go after this plan's worker decisions.
struct Routes<'a> {
    current: &'a Current<'a>,
    started: HashSet<&'a str>,
    refused: HashSet<&'a str>,
    stopped: HashSet<&'a str>,
}

type Refused = (&'static str, String, pb::AllocationFailureReason);

impl Routes<'_> {
    fn route(&self, fe_id: &str) -> Result<(), Refused> {
        let terminated = || {
            Err((
                "function_executor_terminated",
                format!("function executor {fe_id} is terminated or being removed"),
                pb::AllocationFailureReason::FunctionExecutorTerminated,
            ))
        };
        if self.started.contains(fe_id) {
            return Ok(());
        }
        if self.refused.contains(fe_id) || self.stopped.contains(fe_id) {
            return terminated();
        }
        match self.current.fes.get(fe_id) {
            Some(FeSlot::Wanted(c))
                if !c.closed() && !matches!(c.view.borrow().phase, FePhase::Stopping { .. }) =>
            {
                Ok(())
            }
            Some(_) => terminated(),
            None => Err((
                "unknown_function_executor",
                format!("function executor {fe_id} is not in the desired state"),
                pb::AllocationFailureReason::FunctionExecutorTerminated,
            )),
        }
    }
}

fn plan_allocations(
    desired: &Desired,
    current: &Current<'_>,
    verdicts: Vec<Option<Result<(), Rejection>>>,
    plan: &mut Plan,
) {
    let routes = Routes {
        current,
        started: plan.start.iter().map(|s| s.id.as_str()).collect(),
        refused: plan.reject_fes.iter().map(|r| r.id.as_str()).collect(),
        stopped: plan.stop.iter().map(String::as_str).collect(),
    };
    let mut wanted: HashSet<&str> = HashSet::new();
    let mut run = Vec::new();
    let mut rejected = Vec::new();
    let mut verdicts = verdicts.into_iter();
    for a in &desired.allocations {
        let verdict = verdicts.next().flatten();
        let id = a.allocation_id.as_deref().unwrap_or("");
        let new = !current.allocations.contains_key(id) && !wanted.contains(id);
        if !id.is_empty() {
            wanted.insert(id);
        }
        if !new {
            continue; // Immutable per id.
        }
        let fe_id = a.function_executor_id.as_deref().unwrap_or("");
        let verdict = verdict
            .unwrap_or_else(unchecked)
            .map_err(|r| {
                (
                    r.code,
                    r.message,
                    pb::AllocationFailureReason::InternalError,
                )
            })
            .and_then(|()| mode_admits(current.mode))
            .and_then(|()| routes.route(fe_id));
        match verdict {
            Ok(()) => run.push((fe_id.to_string(), a.clone())),
            Err((code, message, reason)) => rejected.push(RejectAllocation {
                allocation: a.clone(),
                code,
                message,
                reason,
            }),
        }
    }
    plan.run = run;
    plan.reject_allocations = rejected;
    plan.dropped = current
        .allocations
        .iter()
        .filter(|(id, _)| !wanted.contains(id.as_str()))
        .map(|(id, fe)| (id.clone(), fe.clone()))
        .collect();
}

fn mode_admits(mode: HostMode) -> Result<(), Refused> {
    if mode == HostMode::Active {
        return Ok(());
    }
    Err((
        "host_not_active",
        format!(
            "the host is {} by its operator: it accepts no new allocation",
            mode.as_str()
        ),
        pb::AllocationFailureReason::FunctionExecutorTerminated,
    ))
}
