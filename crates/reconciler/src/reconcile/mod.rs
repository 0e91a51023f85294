//! Applying a desired state: [`plan`] decides, without acting, what it
//! asks (workers to start, refuse, reject or stop; allocations to run,
//! reject or drop); [`Reconciler::apply`] checks the new items first
//! (validation and admission read the filesystem for `file://` locations),
//! then executes the plan: controllers are spawned and told what to do
//! outside any lock, the new registry is published whole, and the shared
//! state's lock is taken once, to swap allocation entries. Rejected items
//! are reported back to the server so nothing waits forever on them.

pub(crate) mod adopted;
pub(crate) mod plan;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::desired::Desired;
use crate::fe::{self, failed_result};
use crate::lifecycle::{Controlled, FeCommand, FeMap, FeSlot, Refused};
use crate::log_ids::About;
use crate::pb;
use crate::state::{AllocEntry, AllocPhase, Shared, State, TimelineEntry, function_label};
use crate::validate::{
    Rejection, admit_allocation, admit_function_executor, bound_function_call_result, bound_inputs,
    validate_allocation, validate_function_executor,
};
use plan::{Current, Plan, Verdicts};

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

/// Verdicts on the items of `desired` that are new to the agent.
fn precheck(shared: &Shared, desired: &Desired, current: &Current<'_>) -> Verdicts {
    Verdicts {
        fes: desired
            .function_executors
            .iter()
            .map(|d| plan::new_fe(current, d).then(|| fe_verdict(shared, &current.allocatable, d)))
            .collect(),
        allocations: desired
            .allocations
            .iter()
            .map(|a| plan::new_allocation(current, a).then(|| allocation_verdict(shared, a)))
            .collect(),
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

/// How many allocation entries one hold of the state lock inserts, and
/// how many it takes out: a pass that accepts or drops tens of thousands
/// of allocations holds the lock once per batch, never for all of them.
const SWAP_BATCH: usize = 1024;

/// How often an idle reconcile loop proves it is alive, at most (the
/// default of [`crate::AgentConfig::reconcile_heartbeat`]).
pub(crate) const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);
/// ... and at least.
const MIN_HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(10);

/// The test-only fault ([`crate::AgentConfig::wedge_reconcile_when`]):
/// whether the loop is to wedge now (said once, in an event).
fn wedge_injected(shared: &Shared) -> bool {
    let Some(path) = &shared.config.wedge_reconcile_when else {
        return false;
    };
    if !path.exists() {
        return false;
    }
    shared.event(
        "reconcile_wedged",
        &shared.config.executor_id,
        format!(
            "fault injected ({} exists): the reconcile loop does nothing more",
            path.display()
        ),
    );
    true
}

pub(crate) async fn run_loop(
    shared: Arc<Shared>,
    mut desired_rx: watch::Receiver<Option<Received>>,
    cancel: CancellationToken,
) {
    let mut heartbeat = tokio::time::interval(
        shared
            .config
            .reconcile_heartbeat
            .clamp(MIN_HEARTBEAT, HEARTBEAT),
    );
    let mut reconciler = Reconciler::new(shared.clone());
    // Allocations on adopted workers: known from the first pass.
    for (id, fe_id) in std::mem::take(&mut shared.adopted.lock().allocations) {
        reconciler.allocations.insert(id, fe_id);
    }
    let mut first = true;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = desired_rx.changed() => if r.is_err() { return },
            _ = shared.reconcile_now.notified() => {}
            _ = heartbeat.tick() => {
                if wedge_injected(&shared) {
                    cancel.cancelled().await;
                    return;
                }
                // Proves to the health check (and systemd's watchdog,
                // through the hook) that this loop is alive while idle.
                shared.health.lock().last_reconcile_progress = Some(Instant::now());
                if let Some(beat) = &shared.config.on_reconcile_beat {
                    beat();
                }
                continue;
            }
        }
        let Some((desired, received)) = desired_rx.borrow_and_update().clone() else {
            continue;
        };
        if std::mem::take(&mut first) {
            adopted::release_results(&shared, &desired);
        }
        reconciler.pass(&desired, received);
    }
}

/// Owns the worker registry and the set of allocations held: nobody else
/// inserts or removes entries.
pub(crate) struct Reconciler {
    shared: Arc<Shared>,
    /// Allocation id to worker id, for every allocation held.
    allocations: HashMap<String, String>,
}

/// Whom an event of a pass is about (its log line's ids).
enum Subject {
    Worker(String),
    Allocation { fe_id: Option<String>, id: String },
    Other(String),
}

/// The effects of a plan that wait until the shared state's lock is let go.
#[derive(Default)]
struct AfterLock {
    events: Vec<(&'static str, Subject, String)>,
    results: Vec<pb::AllocationResult>,
    cancel: Vec<(String, String)>,
}

impl Reconciler {
    pub fn new(shared: Arc<Shared>) -> Reconciler {
        Reconciler {
            shared,
            allocations: HashMap::new(),
        }
    }

    /// Holds allocation `id` on worker `fe_id` (a state built without a
    /// desired state: the synthetic benchmark's).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn hold(&mut self, id: String, fe_id: String) {
        self.allocations.insert(id, fe_id);
    }

    /// One timed pass of the loop: applies `desired`, then says it is
    /// alive, ready (the first time) and, when workers changed, reports.
    fn pass(&mut self, desired: &Arc<Desired>, received: Instant) {
        let shared = self.shared.clone();
        let started = Instant::now();
        shared.health.lock().reconcile_busy_since = Some(started);
        let fes_changed = self.apply(desired, received);
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

    /// Applies one desired state. Never blocks: workers are started and
    /// stopped by their own tasks. Returns whether the set of workers
    /// changed (a state the server should hear about at once); result
    /// reports are triggered separately.
    pub fn apply(&mut self, desired: &Arc<Desired>, received: Instant) -> bool {
        let shared = self.shared.clone();
        let _pass = shared.passes.lock();
        let fes = self.sweep();
        let mode = *shared.mode.borrow();
        let allocatable = shared.allocatable();
        let current = Current {
            fes: &fes,
            allocations: &self.allocations,
            mode,
            allocatable,
            defaults: &shared.config.worker_defaults,
        };
        let verdicts = precheck(&shared, desired, &current);
        let plan = plan::plan(desired, &current, verdicts);
        let fes_changed = plan.fes_changed();
        self.execute(desired, plan, &fes, received);
        let registered = shared.workers.borrow().len();
        shared.metrics.function_executors.set(registered as i64);
        fes_changed
    }

    /// Forgets workers whose controllers ended; returns the registry.
    fn sweep(&self) -> Arc<FeMap> {
        let fes = self.shared.workers();
        if !fes.values().any(FeSlot::gone) {
            return fes;
        }
        let kept: FeMap = fes
            .iter()
            .filter(|(_, slot)| !slot.gone())
            .map(|(id, slot)| (id.clone(), slot.clone()))
            .collect();
        let kept = Arc::new(kept);
        self.shared.workers.send_replace(kept.clone());
        kept
    }

    fn execute(&mut self, desired: &Arc<Desired>, plan: Plan, fes: &FeMap, received: Instant) {
        let mut after = AfterLock::default();
        let fes = self.execute_fes(&plan, fes, &mut after);
        let entries = self.allocation_entries(&plan, &mut after);
        self.swap_allocations(desired, &plan, entries, &fes, &mut after);
        self.send(plan.run, &fes, received);
        for (alloc_id, fe_id) in after.cancel {
            if let Some(c) = fes.get(&fe_id).and_then(FeSlot::controlled) {
                let _ = c.tx.send(FeCommand::Cancel(alloc_id));
            }
        }
        for (kind, subject, message) in after.events {
            match subject {
                Subject::Worker(id) => self.shared.event_about(kind, About::Worker(&id), message),
                Subject::Allocation { fe_id, id } => self.shared.event_about(
                    kind,
                    About::Allocation {
                        fe_id: fe_id.as_deref(),
                        allocation_id: &id,
                    },
                    message,
                ),
                Subject::Other(subject) => self.shared.event(kind, &subject, message),
            }
        }
        for r in after.results {
            self.shared.push_result(r);
        }
    }

    /// Starts, refuses, stops and forgets workers; publishes the registry.
    fn execute_fes(&self, plan: &Plan, fes: &FeMap, after: &mut AfterLock) -> Arc<FeMap> {
        let shared = &self.shared;
        let changed = plan.fes_changed();
        let mut next = if changed { fes.clone() } else { FeMap::new() };
        for s in &plan.start {
            if let Some(r) = &s.refusal {
                shared.metrics.admission_refused(r.resource);
            }
            let refusal = s.refusal.as_ref().map(|r| r.message.clone());
            let (tx, view) = fe::spawn(shared.clone(), s.description.clone(), refusal);
            let controlled = Controlled {
                description_bytes: prost::Message::encode_to_vec(&*s.description).into(),
                description: s.description.clone(),
                claim: s.claim,
                defaulted: s.defaulted.clone(),
                tx,
                view,
            };
            next.insert(s.id.clone(), FeSlot::Wanted(controlled));
        }
        for r in &plan.reject_fes {
            shared
                .metrics
                .rejected("function_executor", r.rejection.code);
            let message = r.rejection.message.clone();
            after.events.push((
                "function_executor_rejected",
                Subject::Worker(r.id.clone()),
                message.clone(),
            ));
            if r.id.is_empty() {
                continue;
            }
            let refused = Refused {
                description_bytes: prost::Message::encode_to_vec(&*r.description).into(),
                description: r.description.clone(),
                timeline: vec![TimelineEntry::now(format!("rejected: {message}"))],
                message,
            };
            next.insert(r.id.clone(), FeSlot::Rejected(refused));
        }
        for id in &plan.stop {
            if let Some(FeSlot::Wanted(c)) = next.remove(id) {
                let _ =
                    c.tx.send(FeCommand::Shutdown("removing: absent from desired state"));
                next.insert(id.clone(), FeSlot::Removing(c));
            }
        }
        for id in &plan.forget {
            next.remove(id);
        }
        if !changed {
            return self.shared.workers();
        }
        let next = Arc::new(next);
        shared.workers.send_replace(next.clone());
        next
    }

    /// The entries of new allocations, built before the lock is taken;
    /// rejected ones finished, with their failed results.
    fn allocation_entries(
        &mut self,
        plan: &Plan,
        after: &mut AfterLock,
    ) -> Vec<(String, AllocEntry)> {
        let mut entries = Vec::with_capacity(plan.run.len() + plan.reject_allocations.len());
        let entry = |a: &pb::Allocation| AllocEntry {
            fe_id: a.function_executor_id.clone().unwrap_or_default(),
            function: function_label(a.function.as_ref()),
            phase: AllocPhase::Queued,
            timeline: vec![TimelineEntry::now("queued: accepted from desired state")],
        };
        for (fe_id, a) in &plan.run {
            let id = a.allocation_id.clone().unwrap_or_default();
            self.allocations.insert(id.clone(), fe_id.clone());
            entries.push((id, entry(a)));
        }
        for r in &plan.reject_allocations {
            self.shared.metrics.rejected("allocation", r.code);
            let id = r.allocation.allocation_id.clone().unwrap_or_default();
            after.events.push((
                "allocation_rejected",
                Subject::Allocation {
                    fe_id: r.allocation.function_executor_id.clone(),
                    id: id.clone(),
                },
                r.message.clone(),
            ));
            if id.is_empty() {
                continue;
            }
            let mut e = entry(&r.allocation);
            e.phase = AllocPhase::Finished;
            e.timeline
                .push(TimelineEntry::now(format!("rejected: {}", r.message)));
            after
                .results
                .push(failed_result(&r.allocation, r.reason, None));
            self.allocations.insert(id.clone(), e.fe_id.clone());
            entries.push((id, e));
        }
        for (id, _) in &plan.dropped {
            self.allocations.remove(id);
        }
        entries
    }

    /// The shared state's lock in a pass: once per batch of at most
    /// [`SWAP_BATCH`] new and dropped allocation entries (the clock set,
    /// entries inserted and taken out; the last batch also routes function
    /// call results); once more, only if allocations were dropped, to keep
    /// the newest of them as recent. Timelines are stamped, and entries
    /// past the recent bound freed, outside it.
    fn swap_allocations(
        &self,
        desired: &Arc<Desired>,
        plan: &Plan,
        entries: Vec<(String, AllocEntry)>,
        fes: &FeMap,
        after: &mut AfterLock,
    ) {
        let shared = &self.shared;
        let mut dropped = Vec::with_capacity(plan.dropped.len());
        let mut entries = entries.into_iter();
        let mut leaving = plan.dropped.iter();
        // In batches: a pass that inserts or drops tens of thousands of
        // allocations takes the lock once per batch, never for all of them.
        loop {
            let mut st = shared.state.lock();
            let locked = Instant::now();
            st.server_clock = desired.clock.unwrap_or(0);
            st.allocations.extend(entries.by_ref().take(SWAP_BATCH));
            for (id, fe_id) in leaving.by_ref().take(SWAP_BATCH) {
                let Some(entry) = st.allocations.remove(id) else {
                    continue;
                };
                if entry.phase != AllocPhase::Finished && fes.contains_key(fe_id) {
                    after.cancel.push((id.clone(), fe_id.clone()));
                }
                dropped.push((id.clone(), entry));
            }
            let last = entries.len() == 0 && leaving.len() == 0;
            if last {
                route_call_results(shared, &mut st, desired, after);
            }
            shared
                .metrics
                .reconcile_lock_hold
                .observe(locked.elapsed().as_secs_f64());
            if last {
                break;
            }
        }
        self.keep_recent(dropped);
        shared
            .last_desired
            .send_replace(Some((desired.clone(), SystemTime::now())));
        shared
            .metrics
            .last_desired_function_executors
            .set(desired.function_executors.len() as i64);
        shared
            .metrics
            .last_desired_allocations
            .set(desired.allocations.len() as i64);
    }

    /// Keeps the newest of the dropped allocations (at most
    /// [`crate::state::RECENT_ALLOCATIONS`]) for operators to read.
    fn keep_recent(&self, mut dropped: Vec<(String, AllocEntry)>) {
        if dropped.is_empty() {
            return;
        }
        let keep = dropped.len().min(crate::state::RECENT_ALLOCATIONS);
        let newest = dropped.split_off(dropped.len() - keep);
        drop(dropped);
        let mut newest: Vec<(String, AllocEntry)> = newest
            .into_iter()
            .map(|(id, mut entry)| {
                entry
                    .timeline
                    .push(TimelineEntry::now("dropped from desired state"));
                (id, entry)
            })
            .collect();
        let overflow: Vec<(String, AllocEntry)> = {
            let mut st = self.shared.state.lock();
            let locked = Instant::now();
            let over = (st.recent_allocations.len() + newest.len())
                .saturating_sub(crate::state::RECENT_ALLOCATIONS);
            let overflow = st.recent_allocations.drain(..over).collect();
            st.recent_allocations.extend(newest.drain(..));
            self.shared
                .metrics
                .reconcile_lock_hold
                .observe(locked.elapsed().as_secs_f64());
            overflow
        };
        drop(overflow);
    }

    /// [`Reconciler::send`], for tests.
    #[cfg(test)]
    pub(crate) fn send_for_test(&self, run: Vec<(String, Arc<pb::Allocation>)>, fes: &FeMap) {
        self.send(run, fes, Instant::now());
    }

    /// Marks an allocation that could not be sent finished, unless another
    /// path (a panicked controller's accounting) already did: whether its
    /// failure is still to be pushed.
    fn finish_unsent(&self, a: &pb::Allocation) -> bool {
        let id = a.allocation_id.as_deref().unwrap_or("");
        let mut st = self.shared.state.lock();
        let open = st
            .allocations
            .get(id)
            .is_some_and(|e| e.phase != AllocPhase::Finished);
        if open {
            let what = "function executor is terminated".to_string();
            st.note_allocation(id, Some(AllocPhase::Finished), what);
        }
        open
    }

    /// Hands new allocations to their controllers; one whose controller
    /// has already ended fails at once (it would otherwise wait for ever).
    fn send(&self, run: Vec<(String, Arc<pb::Allocation>)>, fes: &FeMap, received: Instant) {
        for (fe_id, a) in run {
            let sent = fes
                .get(&fe_id)
                .and_then(FeSlot::controlled)
                .map(|c| c.tx.send(FeCommand::Run(a.clone(), received)).is_ok());
            if sent != Some(true) && self.finish_unsent(&a) {
                self.shared.push_result(failed_result(
                    &a,
                    pb::AllocationFailureReason::FunctionExecutorTerminated,
                    None,
                ));
            }
        }
    }
}

/// Function call results, after allocations so a cancelled allocation has
/// already left the registry's waiters... as far as its task has run; a
/// late delivery to it is dropped unread.
fn route_call_results(shared: &Shared, st: &mut State, desired: &Desired, after: &mut AfterLock) {
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
            after.events.push((
                "function_call_result_rejected",
                Subject::Other(r.function_call_id.clone().unwrap_or_default()),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allocations held with no worker, as if the server had placed them.
    fn held(r: &mut Reconciler, ids: impl Iterator<Item = String>) {
        let shared = r.shared.clone();
        let mut st = shared.state.lock();
        for id in ids {
            r.hold(id.clone(), "fe".into());
            let entry = AllocEntry {
                fe_id: "fe".into(),
                function: "ns/app/f".into(),
                phase: AllocPhase::Finished,
                timeline: Vec::new(),
            };
            st.allocations.insert(id, entry);
        }
    }

    /// Dropped allocations leave the held ones, stamped; the newest 1,000
    /// stay readable as recent, older ones go.
    #[test]
    fn dropped_allocations_keep_the_newest_as_recent_within_the_bound() {
        let shared = crate::testing_support::shared();
        let mut r = Reconciler::new(shared.clone());
        let nothing = |clock| {
            Arc::new(Desired {
                function_executors: Vec::new(),
                allocations: Vec::new(),
                clock: Some(clock),
                function_call_results: Vec::new(),
            })
        };
        held(&mut r, (0..1500).map(|i| format!("a{i}")));
        r.apply(&nothing(2), Instant::now());
        held(&mut r, (0..10).map(|i| format!("late{i}")));
        r.apply(&nothing(3), Instant::now());
        let st = shared.state.lock();
        assert!(st.allocations.is_empty() && r.allocations.is_empty());
        assert_eq!(
            st.recent_allocations.len(),
            crate::state::RECENT_ALLOCATIONS
        );
        let newest: Vec<&str> = st
            .recent_allocations
            .iter()
            .rev()
            .take(10)
            .map(|(id, _)| id.as_str())
            .collect();
        assert!(newest.iter().all(|id| id.starts_with("late")), "{newest:?}");
        assert!(st.recent_allocations.iter().all(|(_, a)| {
            a.timeline.last().map(|t| t.what.as_str()) == Some("dropped from desired state")
        }));
        assert_eq!(st.server_clock, 3);
    }

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
        Reconciler::new(shared.clone()).apply(&desired, Instant::now());

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
