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

#[cfg(test)]
mod tests {
    //! The plan alone: no runtime, no controllers; registry entries are
    //! channels whose other ends the test holds.
    use super::*;
    use crate::lifecycle::testing::{described, running};
    use crate::lifecycle::{Controlled, FeSlot, Refused};

    fn description(id: &str, memory_gib: u64) -> Arc<pb::FunctionExecutorDescription> {
        Arc::new(pb::FunctionExecutorDescription {
            id: Some(id.into()),
            resources: Some(pb::FunctionExecutorResources {
                cpu_ms_per_sec: Some(1000),
                memory_bytes: Some(memory_gib << 30),
                disk_bytes: Some(1 << 30),
                gpu: None,
            }),
            ..Default::default()
        })
    }

    fn allocation(id: &str, fe: &str) -> Arc<pb::Allocation> {
        Arc::new(pb::Allocation {
            allocation_id: Some(id.into()),
            function_executor_id: Some(fe.into()),
            ..Default::default()
        })
    }

    fn desired(
        fes: &[Arc<pb::FunctionExecutorDescription>],
        allocs: &[Arc<pb::Allocation>],
    ) -> Desired {
        Desired {
            function_executors: fes.to_vec(),
            allocations: allocs.to_vec(),
            clock: Some(1),
            function_call_results: Vec::new(),
        }
    }

    /// A host with 8 CPUs, 10 GiB of memory and 100 GiB of disk.
    fn host() -> pb::HostResources {
        pb::HostResources {
            cpu_count: Some(8),
            memory_bytes: Some(10 << 30),
            disk_bytes: Some(100 << 30),
            gpu: None,
        }
    }

    /// A registry entry in `phase`, keeping its channels' other ends.
    struct Held {
        fes: FeMap,
        _ends: Vec<Box<dyn std::any::Any>>,
    }

    fn registry(entries: Vec<(&str, &str, FePhase)>) -> Held {
        let mut fes = FeMap::new();
        let mut ends: Vec<Box<dyn std::any::Any>> = Vec::new();
        for (id, kind, phase) in entries {
            let (mut c, rx, view): (Controlled, _, _) = described(description(id, 1), phase);
            c.claim =
                Some(crate::admission::effective(&c.description, &WorkerDefaults::default()).claim);
            ends.push(Box::new(rx));
            ends.push(Box::new(view));
            let slot = match kind {
                "wanted" => FeSlot::Wanted(c),
                "removing" => FeSlot::Removing(c),
                _ => FeSlot::Rejected(Refused {
                    description: c.description.clone(),
                    description_bytes: c.description_bytes.clone(),
                    message: "bad".into(),
                    timeline: Vec::new(),
                }),
            };
            fes.insert(id.into(), slot);
        }
        Held { fes, _ends: ends }
    }

    /// Every new item valid.
    fn all_valid(d: &Desired, current: &Current<'_>) -> Verdicts {
        Verdicts {
            fes: d
                .function_executors
                .iter()
                .map(|f| new_fe(current, f).then_some(Ok(())))
                .collect(),
            allocations: d
                .allocations
                .iter()
                .map(|a| new_allocation(current, a).then_some(Ok(())))
                .collect(),
        }
    }

    fn current<'a>(
        fes: &'a FeMap,
        allocations: &'a HashMap<String, String>,
        mode: HostMode,
        defaults: &'a WorkerDefaults,
    ) -> Current<'a> {
        Current {
            fes,
            allocations,
            mode,
            allocatable: host(),
            defaults,
        }
    }

    fn codes(p: &Plan) -> Vec<(&str, &'static str)> {
        p.reject_allocations
            .iter()
            .map(|r| (r.allocation.allocation_id.as_deref().unwrap_or(""), r.code))
            .collect()
    }

    #[test]
    fn new_workers_start_known_ones_stay_and_missing_ones_stop_or_are_forgotten() {
        let held = registry(vec![
            ("kept", "wanted", running()),
            ("gone", "wanted", running()),
            ("leaving", "removing", running()),
            ("bad", "rejected", FePhase::Pending),
        ]);
        let allocations = HashMap::new();
        let defaults = WorkerDefaults::default();
        let c = current(&held.fes, &allocations, HostMode::Active, &defaults);
        let d = desired(
            &[
                description("kept", 1),
                description("new", 1),
                description("new", 1),
            ],
            &[],
        );
        let p = plan(&d, &c, all_valid(&d, &c));
        let started: Vec<&str> = p.start.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(started, ["new"], "a repeated id starts once");
        assert!(p.start[0].refusal.is_none() && p.start[0].claim.is_some());
        assert_eq!(p.stop, ["gone"]);
        assert_eq!(p.forget, ["bad"]);
        assert!(p.fes_changed());
        // The same desired state again, as if applied: nothing to do.
        let d = desired(&[description("kept", 1), description("leaving", 1)], &[]);
        let p = plan(&d, &c, all_valid(&d, &c));
        assert!(
            p.start.is_empty(),
            "an id being removed is recreated once gone"
        );
        assert_eq!(p.stop, ["gone"]);
    }

    #[test]
    fn a_rejected_description_is_reported_and_its_allocations_fail() {
        let held = registry(vec![]);
        let allocations = HashMap::new();
        let defaults = WorkerDefaults::default();
        let c = current(&held.fes, &allocations, HostMode::Active, &defaults);
        let d = desired(
            &[description("bad", 1), description("", 1)],
            &[allocation("a1", "bad")],
        );
        let mut v = all_valid(&d, &c);
        v.fes = vec![
            Some(Err(Rejection {
                code: "missing_field",
                message: "application is missing".into(),
            })),
            Some(Err(Rejection {
                code: "missing_field",
                message: "id is missing".into(),
            })),
        ];
        let p = plan(&d, &c, v);
        assert!(p.start.is_empty());
        let ids: Vec<&str> = p.reject_fes.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["bad", ""], "one without an id is an event only");
        assert_eq!(codes(&p), [("a1", "function_executor_terminated")]);
        assert!(p.fes_changed());
    }

    #[test]
    fn allocations_run_on_live_workers_and_are_rejected_with_a_named_reason_otherwise() {
        let stopping = FePhase::Stopping {
            was: pb::FunctionExecutorStatus::Running,
            spawned: None,
        };
        let held = registry(vec![
            ("up", "wanted", running()),
            ("starting", "wanted", FePhase::Pending),
            ("leaving", "removing", running()),
            ("draining", "wanted", stopping),
            ("bad", "rejected", FePhase::Pending),
            ("undesired", "wanted", running()),
        ]);
        let mut allocations = HashMap::new();
        allocations.insert("old".to_string(), "up".to_string());
        allocations.insert("dropped".to_string(), "up".to_string());
        let defaults = WorkerDefaults::default();
        let c = current(&held.fes, &allocations, HostMode::Active, &defaults);
        let fes: Vec<_> = ["up", "starting", "leaving", "draining", "bad"]
            .iter()
            .map(|id| description(id, 1))
            .collect();
        let d = desired(
            &fes,
            &[
                allocation("old", "up"),
                allocation("a-up", "up"),
                allocation("a-up", "up"),
                allocation("a-starting", "starting"),
                allocation("a-leaving", "leaving"),
                allocation("a-draining", "draining"),
                allocation("a-bad", "bad"),
                allocation("a-nowhere", "nowhere"),
                allocation("a-undesired", "undesired"),
                allocation("a-invalid", "up"),
            ],
        );
        let mut v = all_valid(&d, &c);
        v.allocations[9] = Some(Err(Rejection {
            code: "missing_field",
            message: "function is missing".into(),
        }));
        let p = plan(&d, &c, v);
        let run: Vec<(&str, &str)> = p
            .run
            .iter()
            .map(|(fe, a)| (fe.as_str(), a.allocation_id.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(
            run,
            [("up", "a-up"), ("starting", "a-starting")],
            "a repeated id runs once; known ones stay"
        );
        assert_eq!(
            codes(&p),
            [
                ("a-leaving", "function_executor_terminated"),
                ("a-draining", "function_executor_terminated"),
                ("a-bad", "function_executor_terminated"),
                ("a-nowhere", "unknown_function_executor"),
                ("a-undesired", "function_executor_terminated"),
                ("a-invalid", "missing_field"),
            ]
        );
        assert_eq!(
            p.stop,
            ["undesired"],
            "stopped in this plan: it takes no allocation"
        );
        assert_eq!(
            p.reject_allocations[5].reason,
            pb::AllocationFailureReason::InternalError,
            "an invalid allocation is the agent's refusal"
        );
        assert_eq!(p.dropped, [("dropped".to_string(), "up".to_string())]);
        assert!(p.fes_changed());
    }

    #[test]
    fn admission_refuses_what_does_not_fit_next_to_what_is_held_and_planned() {
        // 10 GiB allocatable: 4 GiB held, then 4 GiB fits, then 4 GiB more does not.
        let held = registry(vec![]);
        let mut fes = held.fes.clone();
        let (mut c4, _rx, _view) = described(description("held", 4), running());
        c4.claim =
            Some(crate::admission::effective(&c4.description, &WorkerDefaults::default()).claim);
        fes.insert("held".into(), FeSlot::Wanted(c4));
        let allocations = HashMap::new();
        let defaults = WorkerDefaults::default();
        let c = current(&fes, &allocations, HostMode::Active, &defaults);
        let d = desired(
            &[
                description("held", 4),
                description("fits", 4),
                description("full", 4),
            ],
            &[allocation("a", "full")],
        );
        let p = plan(&d, &c, all_valid(&d, &c));
        assert_eq!(p.start.len(), 2);
        assert!(p.start[0].refusal.is_none() && p.start[0].claim.is_some());
        let refusal = p.start[1].refusal.as_ref().expect("the third does not fit");
        assert_eq!(refusal.resource, "memory");
        assert!(p.start[1].claim.is_none(), "a refused worker holds nothing");
        // Its controller fails its startup: allocations still go to it and
        // fail with the startup's reason there.
        assert_eq!(p.run.len(), 1);
    }

    #[test]
    fn paused_and_draining_hosts_start_nothing_and_accept_no_allocation() {
        let held = registry(vec![("up", "wanted", running())]);
        let allocations = HashMap::new();
        let defaults = WorkerDefaults::default();
        for mode in [HostMode::Paused, HostMode::Draining, HostMode::Disabled] {
            let c = current(&held.fes, &allocations, mode, &defaults);
            let d = desired(
                &[description("up", 1), description("new", 1)],
                &[allocation("a", "up")],
            );
            let p = plan(&d, &c, all_valid(&d, &c));
            let refusal = p.start[0].refusal.as_ref().expect("no new worker starts");
            assert_eq!(refusal.resource, "host_mode");
            assert!(
                refusal.message.contains(mode.as_str()),
                "{}",
                refusal.message
            );
            assert_eq!(codes(&p), [("a", "host_not_active")]);
            assert_eq!(
                p.reject_allocations[0].reason,
                pb::AllocationFailureReason::FunctionExecutorTerminated
            );
            assert!(p.stop.is_empty(), "a mode stops nothing by itself");
        }
    }
}
