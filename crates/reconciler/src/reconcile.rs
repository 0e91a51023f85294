//! Applying a desired state: function executors first (create new ids,
//! leave existing ones alone since descriptions are immutable per id, shut
//! down missing ones), then allocations (hand new ones to their worker's
//! controller, cancel ones that disappeared). Rejected items are reported
//! back to the server so nothing waits forever on them.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admission;
use crate::desired::Desired;
use crate::fe::{self, FeCommand};
use crate::pb;
use crate::state::{AllocEntry, AllocPhase, FeEntry, Shared, TimelineEntry, function_label};
use crate::validate::{
    Rejection, admit_allocation, admit_function_executor, bound_function_call_result, bound_inputs,
    validate_allocation, validate_function_executor,
};

/// Verdicts on the items of a desired state that are new to the agent,
/// reached before taking the state lock: admission resolves `file://`
/// locations (filesystem calls), which must not stall readers of the state.
/// `None` where the item was not new when checked.
struct Verdicts {
    fes: Vec<Option<Result<(), Rejection>>>,
    allocations: Vec<Option<Result<(), Rejection>>>,
}

fn fe_verdict(
    shared: &Shared,
    allocatable: &pb::HostResources,
    d: &pb::FunctionExecutorDescription,
) -> Result<(), Rejection> {
    validate_function_executor(d)
        .and_then(|()| admit_function_executor(d, allocatable, &shared.config.blob_store))
}

fn allocation_verdict(shared: &Shared, a: &pb::Allocation) -> Result<(), Rejection> {
    let blobs = &shared.config.blob_store;
    validate_allocation(a)
        .and_then(|()| bound_inputs(a, shared.config.max_input_blob_bytes, blobs))
        .and_then(|()| admit_allocation(a, blobs))
}

fn precheck(shared: &Shared, desired: &Desired) -> Verdicts {
    let (allocatable, new_fes, new_allocations): (pb::HostResources, Vec<bool>, Vec<bool>) = {
        let st = shared.state.lock();
        (
            crate::state::allocatable_in(&shared.config, &st),
            desired
                .function_executors
                .iter()
                .map(|d| !st.fes.contains_key(d.id.as_deref().unwrap_or("")))
                .collect(),
            desired
                .allocations
                .iter()
                .map(|a| {
                    !st.allocations
                        .contains_key(a.allocation_id.as_deref().unwrap_or(""))
                })
                .collect(),
        )
    };
    Verdicts {
        fes: desired
            .function_executors
            .iter()
            .zip(new_fes)
            .map(|(d, new)| new.then(|| fe_verdict(shared, &allocatable, d)))
            .collect(),
        allocations: desired
            .allocations
            .iter()
            .zip(new_allocations)
            .map(|(a, new)| new.then(|| allocation_verdict(shared, a)))
            .collect(),
    }
}

/// The entry of a new worker and, where it does not fit next to the
/// workers already admitted (holding `held`), why (its controller then fails its startup
/// with that message).
fn admit(
    shared: &Shared,
    held: admission::Claim,
    allocatable: &pb::HostResources,
    d: &pb::FunctionExecutorDescription,
) -> (FeEntry, Option<admission::Refusal>) {
    let defaults = &shared.config.worker_defaults;
    let eff = admission::effective(d, defaults);
    let allocatable = admission::allocatable(allocatable);
    let verdict = admission::admit(&eff.claim, &held, &allocatable);
    let mut entry = FeEntry::new(d.clone(), "pending: accepted from desired state");
    entry.defaulted = eff.defaulted;
    match verdict {
        Ok(()) => {
            entry.claim = Some(eff.claim);
            (entry, None)
        }
        Err(r) => (entry, Some(r)),
    }
}

/// The failure watchers get instead of a result the agent refuses to hand over.
fn refused_result(r: &pb::FunctionCallResult) -> pb::FunctionCallResult {
    pb::FunctionCallResult {
        namespace: r.namespace.clone(),
        request_id: r.request_id.clone(),
        function_call_id: r.function_call_id.clone(),
        outcome_code: Some(pb::AllocationOutcomeCode::Failure as i32),
        failure_reason: Some(pb::AllocationFailureReason::InternalError as i32),
        return_value: None,
        request_error: None,
    }
}

/// A desired state and when its message arrived.
pub(crate) type Received = (Arc<Desired>, Instant);

/// How often an idle reconcile loop proves it is alive.
pub(crate) const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) async fn run_loop(
    shared: Arc<Shared>,
    mut desired_rx: watch::Receiver<Option<Received>>,
    cancel: CancellationToken,
) {
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = desired_rx.changed() => if r.is_err() { return },
            _ = shared.reconcile_now.notified() => {}
            _ = heartbeat.tick() => {
                // Proves to the health check that this loop is alive while idle.
                shared.health.lock().last_reconcile_progress = Some(Instant::now());
                continue;
            }
        }
        let Some((desired, received)) = desired_rx.borrow_and_update().clone() else {
            continue;
        };
        let started = Instant::now();
        shared.health.lock().reconcile_busy_since = Some(started);
        let fes_changed = apply(&shared, &desired, received);
        shared.metrics.reconciliations.inc();
        shared
            .metrics
            .reconciliation_latency
            .observe(started.elapsed().as_secs_f64());
        {
            let mut h = shared.health.lock();
            h.reconcile_busy_since = None;
            h.last_reconcile_progress = Some(Instant::now());
        }
        let first = !shared.started.swap(true, Ordering::AcqRel);
        if first {
            shared.event(
                "started",
                &shared.config.executor_id,
                "first desired state applied; agent is ready",
            );
        }
        // New or removed workers are reported at once; a desired state that
        // only moved allocations is echoed (its clock) by the next report,
        // as the reference does, saving an RPC per allocation.
        if first || fes_changed {
            shared.report_now.notify_one();
        }
    }
}

/// Applies one desired state. Never blocks: workers are started and stopped
/// by their own tasks.
/// Returns whether the set of workers changed (a state the server should
/// hear about at once); result reports are triggered separately.
pub(crate) fn apply(shared: &Arc<Shared>, desired: &Arc<Desired>, received: Instant) -> bool {
    let mut fes_changed = false;
    let mut results = Vec::new();
    let mut events: Vec<(&'static str, String, String)> = Vec::new();
    let mut verdicts = precheck(shared, desired);
    {
        let mut st = shared.state.lock();
        let locked = Instant::now();
        st.server_clock = desired.clock.unwrap_or(0);
        st.last_desired = Some((desired.clone(), SystemTime::now()));
        shared
            .metrics
            .last_desired_function_executors
            .set(desired.function_executors.len() as i64);
        shared
            .metrics
            .last_desired_allocations
            .set(desired.allocations.len() as i64);

        // 1. Function executors.
        let allocatable = crate::state::allocatable_in(&shared.config, &st);
        let mut wanted: HashSet<&str> = HashSet::new();
        for (i, d) in desired.function_executors.iter().enumerate() {
            let id = d.id.as_deref().unwrap_or("");
            if !id.is_empty() {
                wanted.insert(id);
            }
            if st.fes.contains_key(id) {
                continue; // Immutable per id; an entry being removed is recreated once it is gone.
            }
            // Gone since the precheck (its controller ended): checked here.
            let verdict = verdicts.fes[i]
                .take()
                .unwrap_or_else(|| fe_verdict(shared, &allocatable, d));
            match verdict {
                Ok(()) => {
                    let (entry, mut refusal) = admit(shared, st.admitted(), &allocatable, d);
                    if st.mode != crate::mode::HostMode::Active {
                        refusal = Some(admission::Refusal {
                            resource: "host_mode",
                            message: format!(
                                "the host is {} by its operator: no new worker starts",
                                st.mode.as_str()
                            ),
                        });
                    }
                    if let Some(r) = &refusal {
                        shared.metrics.admission_refused(r.resource);
                    }
                    let tx = fe::spawn(shared.clone(), (**d).clone(), refusal.map(|r| r.message));
                    fes_changed = true;
                    st.fes.insert(
                        id.to_string(),
                        FeEntry {
                            tx: Some(tx),
                            ..entry
                        },
                    );
                }
                Err(rej) => {
                    shared.metrics.rejected("function_executor", rej.code);
                    events.push((
                        "function_executor_rejected",
                        id.to_string(),
                        rej.message.clone(),
                    ));
                    if !id.is_empty() {
                        // Report it terminated so the server stops waiting for it.
                        fes_changed = true;
                        let mut entry =
                            FeEntry::new((**d).clone(), &format!("rejected: {}", rej.message));
                        entry.status = pb::FunctionExecutorStatus::Terminated;
                        entry.termination_reason =
                            Some(pb::FunctionExecutorTerminationReason::StartupFailedInternalError);
                        entry.termination_message = Some(rej.message.clone());
                        st.fes.insert(id.to_string(), entry);
                    }
                }
            }
        }
        let mut gone = Vec::new();
        for (id, fe) in st.fes.iter_mut() {
            if wanted.contains(id.as_str()) || fe.removing {
                continue;
            }
            match &fe.tx {
                Some(tx) => {
                    fe.removing = true;
                    fes_changed = true;
                    fe.timeline
                        .push(TimelineEntry::now("removing: absent from desired state"));
                    let _ = tx.send(FeCommand::Shutdown);
                }
                None => gone.push(id.clone()),
            }
        }
        for id in gone {
            st.fes.remove(&id);
            fes_changed = true;
        }

        // 2. Allocations.
        let mut wanted_allocs: HashSet<&str> = HashSet::new();
        for (i, a) in desired.allocations.iter().enumerate() {
            let id = a.allocation_id.as_deref().unwrap_or("");
            if !id.is_empty() {
                wanted_allocs.insert(id);
            }
            if st.allocations.contains_key(id) {
                continue; // Immutable per id.
            }
            let fe_id = a.function_executor_id.clone().unwrap_or_default();
            let verdict = verdicts.allocations[i]
                .take()
                .unwrap_or_else(|| allocation_verdict(shared, a))
                .map_err(|r| {
                    (
                        r.code,
                        r.message,
                        pb::AllocationFailureReason::InternalError,
                    )
                });
            let mode = st.mode;
            let verdict = verdict.and_then(|()| {
                if mode == crate::mode::HostMode::Active {
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
            });
            let verdict = verdict.and_then(|()| match st.fes.get(&fe_id) {
                Some(fe) if !fe.removing && fe.tx.is_some() => Ok(()),
                Some(_) => Err((
                    "function_executor_terminated",
                    format!("function executor {fe_id} is terminated or being removed"),
                    pb::AllocationFailureReason::FunctionExecutorTerminated,
                )),
                None => Err((
                    "unknown_function_executor",
                    format!("function executor {fe_id} is not in the desired state"),
                    pb::AllocationFailureReason::FunctionExecutorTerminated,
                )),
            });
            let mut entry = AllocEntry {
                fe_id: fe_id.clone(),
                function: function_label(a.function.as_ref()),
                phase: AllocPhase::Queued,
                timeline: vec![TimelineEntry::now("queued: accepted from desired state")],
            };
            match verdict {
                Ok(()) => {
                    if let Some(tx) = st.fes.get(&fe_id).and_then(|fe| fe.tx.as_ref()) {
                        let _ = tx.send(FeCommand::Run(Box::new((**a).clone()), received));
                    }
                }
                Err((code, message, reason)) => {
                    shared.metrics.rejected("allocation", code);
                    events.push(("allocation_rejected", id.to_string(), message.clone()));
                    if id.is_empty() {
                        continue;
                    }
                    entry.phase = AllocPhase::Finished;
                    entry
                        .timeline
                        .push(TimelineEntry::now(format!("rejected: {message}")));
                    results.push(fe::failed_result(a, reason, None));
                }
            }
            st.allocations.insert(id.to_string(), entry);
        }
        let dropped: Vec<String> = st
            .allocations
            .keys()
            .filter(|id| !wanted_allocs.contains(id.as_str()))
            .cloned()
            .collect();
        for id in dropped {
            if let Some(mut entry) = st.allocations.remove(&id) {
                if entry.phase != AllocPhase::Finished
                    && let Some(tx) = st.fes.get(&entry.fe_id).and_then(|fe| fe.tx.as_ref())
                {
                    let _ = tx.send(FeCommand::Cancel(id.clone()));
                }
                entry
                    .timeline
                    .push(TimelineEntry::now("dropped from desired state"));
                if st.recent_allocations.len() == crate::state::RECENT_ALLOCATIONS {
                    st.recent_allocations.pop_front();
                }
                st.recent_allocations.push_back((id, entry));
            }
        }
        shared.metrics.function_executors.set(st.fes.len() as i64);

        // 3. Function call results, after allocations so a cancelled
        // allocation has already left the registry's waiters... as far as
        // its task has run; a late delivery to it is dropped unread.
        for r in &desired.function_call_results {
            // One the agent will not hand over reaches its watchers as a
            // failure naming why (they would otherwise wait for ever).
            let refused = bound_function_call_result(r, shared.config.max_input_blob_bytes).err();
            let routed = match &refused {
                None => st.watches.route(r),
                Some(_) => st.watches.route(&refused_result(r)),
            };
            if let (Some(why), crate::watches::Routed::Delivered(n)) = (&refused, routed) {
                shared.metrics.rejected("function_call_result", why.code);
                events.push((
                    "function_call_result_rejected",
                    r.function_call_id.clone().unwrap_or_default(),
                    format!("{}; {n} waiting watcher(s) get a failure", why.message),
                ));
            }
            let label = match routed {
                crate::watches::Routed::Delivered(_) => "delivered",
                crate::watches::Routed::Kept => "kept",
                crate::watches::Routed::NotFinal => "not_final",
            };
            shared
                .metrics
                .function_call_results
                .get_or_create(&vec![("routing", label)])
                .inc();
        }
        shared
            .metrics
            .reconcile_lock_hold
            .observe(locked.elapsed().as_secs_f64());
    }
    for (kind, subject, message) in events {
        shared.event(kind, &subject, message);
    }
    for r in results {
        shared.push_result(r);
    }
    fes_changed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result naming a 2^63-byte value reaches its watcher as a failure,
    /// and an event names the bound: handing the value over would make
    /// about 10^11 read URLs.
    #[tokio::test]
    async fn an_oversized_function_call_result_reaches_its_watcher_as_a_failure() {
        let shared = crate::testing_support::shared();
        let watch = |call: &str| pb::FunctionCallWatch {
            namespace: Some("ns".into()),
            application: Some("app".into()),
            request_id: Some("r".into()),
            function_call_id: Some(call.into()),
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for call in ["huge", "fine"] {
            let waiter = crate::watches::Waiter {
                allocation_id: "a".into(),
                watcher_id: call.into(),
                tx: tx.clone(),
            };
            let added = shared.state.lock().watches.add(
                &watch(call),
                waiter,
                crate::watches::WatchBudget::UNLIMITED,
            );
            assert!(added.is_ok());
        }
        let result = |call: &str, size: u64| {
            Arc::new(pb::FunctionCallResult {
                namespace: Some("ns".into()),
                request_id: Some("r".into()),
                function_call_id: Some(call.into()),
                outcome_code: Some(pb::AllocationOutcomeCode::Success as i32),
                failure_reason: None,
                return_value: Some(pb::DataPayload {
                    uri: Some("file:///blobs/v".into()),
                    offset: Some(0),
                    size: Some(size),
                    ..Default::default()
                }),
                request_error: None,
            })
        };
        let desired = Arc::new(Desired {
            function_executors: Vec::new(),
            allocations: Vec::new(),
            clock: Some(1),
            function_call_results: vec![result("huge", 1 << 63), result("fine", 10)],
        });
        apply(&shared, &desired, Instant::now());

        let mut got = std::collections::HashMap::new();
        while let Ok(d) = rx.try_recv() {
            got.insert(d.watcher_id.clone(), d.result);
        }
        let huge = got.get("huge").expect("the huge result's watcher hears");
        assert_eq!(huge.outcome_code(), pb::AllocationOutcomeCode::Failure);
        assert!(huge.return_value.is_none());
        let fine = got.get("fine").expect("the other watcher hears");
        assert_eq!(fine.outcome_code(), pb::AllocationOutcomeCode::Success);
        assert_eq!(fine.return_value.as_ref().and_then(|v| v.size), Some(10));
        let events = shared.events.recent();
        let rejected = events
            .iter()
            .find(|e| e.kind == "function_call_result_rejected")
            .expect("an event names the refusal");
        assert_eq!(rejected.subject, "huge");
        assert!(
            rejected.message.contains("(--max-input-blob-bytes)"),
            "{}",
            rejected.message
        );
    }
}
