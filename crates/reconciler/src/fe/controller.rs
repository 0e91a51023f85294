//! A worker's controller: an actor that owns its worker process, its
//! queue and running allocations, and its lifecycle. It publishes the
//! lifecycle as a [`FeState`] through a `watch` and reads commands from
//! its channel; it never looks itself up in shared state.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use steward_worker_driver::{Exit, WorkerUsage};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::Live;
use super::allocation::{self, AllocOutcome, failed_result};
use super::startup::{self, Failed};
use crate::adoption::StartReading;
use crate::fe_pb;
use crate::lifecycle::{FeCommand, FePhase, FeState, Reason, Termination};
use crate::pb;
use crate::state::{AllocPhase, Shared, TimelineEntry};

/// An allocation waiting for a slot on its worker.
struct Queued {
    alloc: pb::Allocation,
    /// An allocation already on an adopted worker: followed, not created.
    resume: Option<crate::adoption::AllocRecord>,
    /// When it could have started: its arrival if a slot was free then;
    /// `None` while it waits for a slot or the worker (the wait is the
    /// worker's, not the agent's share of the cycle).
    ready: Option<Instant>,
}

struct Running {
    alloc: pb::Allocation,
    task: tokio::task::AbortHandle,
}

/// An allocation's task, boxed.
type AllocTask = std::pin::Pin<Box<dyn std::future::Future<Output = AllocOutcome> + Send>>;

/// What became of an allocation task.
type Joined = Result<(String, AllocOutcome), tokio::task::JoinError>;

/// The controller's own side of the lifecycle: what it holds in each
/// phase. (Starting holds nothing here: the startup future owns the
/// half-started worker, so a shutdown drops both together.)
enum Phase {
    Starting,
    Running(Live),
    Terminated {
        /// Why the worker never started, for allocations that reach it
        /// after the startup failed (they race the failure; the reason is
        /// the same). `None` for a worker that ran.
        startup_failure: Option<pb::AllocationFailureReason>,
    },
}

pub(super) struct Controller {
    shared: Arc<Shared>,
    id: String,
    desc: Arc<pb::FunctionExecutorDescription>,
    queue: VecDeque<Queued>,
    running: HashMap<String, Running>,
    tasks: JoinSet<(String, AllocOutcome)>,
    phase: Phase,
    /// The published view of the lifecycle.
    view: watch::Sender<FeState>,
    /// Why it will be terminated, in words, said before the termination.
    message: Option<String>,
    /// Usage read just before the worker was stopped.
    last_usage: Option<WorkerUsage>,
    /// Whether the usage was kept (and metering told the worker stopped).
    usage_kept: bool,
    /// Why admission refused this worker, if it did.
    refusal: Option<String>,
    /// Told to let go of its worker alive (see [`FeCommand::Detach`]).
    detaching: bool,
}

impl Controller {
    pub(super) fn new(
        shared: Arc<Shared>,
        desc: Arc<pb::FunctionExecutorDescription>,
        refusal: Option<String>,
        view: watch::Sender<FeState>,
    ) -> Self {
        Controller {
            shared,
            id: desc.id.clone().unwrap_or_default(),
            desc,
            queue: VecDeque::new(),
            running: HashMap::new(),
            tasks: JoinSet::new(),
            phase: Phase::Starting,
            view,
            message: None,
            last_usage: None,
            usage_kept: false,
            refusal,
            detaching: false,
        }
    }

    fn live(&self) -> Option<&Live> {
        match &self.phase {
            Phase::Running(live) => Some(live),
            _ => None,
        }
    }

    fn live_mut(&mut self) -> Option<&mut Live> {
        match &mut self.phase {
            Phase::Running(live) => Some(live),
            _ => None,
        }
    }

    /// Takes the live worker out to stop it; the phase that follows is
    /// set by the caller (terminated, or the controller ends).
    fn take_live(&mut self) -> Option<Live> {
        if !matches!(self.phase, Phase::Running(_)) {
            return None;
        }
        let was = std::mem::replace(
            &mut self.phase,
            Phase::Terminated {
                startup_failure: None,
            },
        );
        match was {
            Phase::Running(live) => Some(live),
            _ => None,
        }
    }

    fn terminated(&self) -> bool {
        matches!(self.phase, Phase::Terminated { .. })
    }

    fn max_concurrency(&self) -> usize {
        self.desc.max_concurrency.unwrap_or(1).max(1) as usize
    }

    fn allocation_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(
            self.desc.allocation_timeout_ms.unwrap_or(300_000),
        ))
    }

    fn note(&self, what: String) {
        self.view
            .send_modify(|s| s.timeline.push(TimelineEntry::now(what)));
    }

    fn alloc_note(&self, id: &str, phase: AllocPhase, what: &str) {
        self.shared
            .state
            .lock()
            .note_allocation(id, Some(phase), what.to_string());
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<FeCommand>) {
        self.shared.metrics.fe_creations.inc();
        if self.starting(&mut rx).await {
            self.serve_then_stop(&mut rx).await;
        }
        self.end(rx);
    }

    /// The controller of a worker an earlier run left: reattaches to it
    /// (or, where it is gone, reports it terminated and fails what ran on
    /// it), then serves as any other.
    pub(super) async fn run_adopted(
        mut self,
        mut rx: mpsc::UnboundedReceiver<FeCommand>,
        worker: Result<Box<dyn steward_worker_driver::Worker>, String>,
        record: crate::adoption::WorkerRecord,
    ) {
        let started = Instant::now();
        match super::adopt::reattach(self.shared.clone(), &self.desc, worker, &record, &self.view)
            .await
        {
            Ok((live, on_worker)) => self.adopted(live, record, &on_worker, started),
            Err(failed) => self.adoption_failed(failed, &record),
        }
        self.serve_then_stop(&mut rx).await;
        self.end(rx);
    }

    async fn serve_then_stop(&mut self, rx: &mut mpsc::UnboundedReceiver<FeCommand>) {
        self.serve(rx).await;
        if self.detaching && self.let_go() {
            return;
        }
        self.stop_serving().await;
    }

    /// The controller ends: what it held goes back, unless its worker was
    /// let go of alive (its GPUs and record are the next agent's).
    fn end(self, rx: mpsc::UnboundedReceiver<FeCommand>) {
        if !self.detaching {
            self.shared.config.gpu_pool.release(&self.id);
            if let Some(store) = &self.shared.adoption {
                store.worker_gone(&self.id);
            }
        }
        self.finish(rx);
    }

    /// Lets go of the worker alive (adoption mode, agent stopping): its
    /// running allocations stay on it, recorded, for the next agent, and
    /// so do queued ones (the server still wants them: the next agent
    /// hears of them again). Returns false where the worker cannot outlive
    /// the agent (it is then stopped as at any shutdown).
    fn let_go(&mut self) -> bool {
        if !self.live().is_some_and(|l| l.worker.can_detach()) {
            self.detaching = false;
            return false;
        }
        // What already finished is kept (on record, and told to the
        // worker to forget) before the rest is let go of.
        self.collect_finished();
        let Some(live) = self.take_live() else {
            self.detaching = false;
            return false;
        };
        if !live.worker.detach() {
            // It exited just now: what ran on it fails as at any stop.
            self.detaching = false;
            self.keep_last_usage();
            return false;
        }
        // Their uploads stay open (`Shared::let_go_of`): the worker may be
        // writing to them.
        self.shared.let_go_of.lock().insert(self.id.clone());
        self.tasks.abort_all();
        let running = self.running.len();
        self.shared
            .detached_workers
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        for _ in self.running.drain() {
            self.shared.metrics.allocations_running.dec();
        }
        self.queue.clear();
        self.shared.event(
            "function_executor_detached",
            &self.id,
            format!("left running for the next agent to adopt, with {running} allocation(s) on it"),
        );
        true
    }

    /// Phase 1: starts the worker, queueing allocations meanwhile. Returns
    /// whether it goes on to serve (false: told to shut down meanwhile).
    async fn starting(&mut self, rx: &mut mpsc::UnboundedReceiver<FeCommand>) -> bool {
        let started = Instant::now();
        // Boxed so that a shutdown can drop it (and the worker in it) early.
        let mut startup = Box::pin(startup::start(
            self.shared.clone(),
            self.desc.clone(),
            self.refusal.take(),
            self.view.clone(),
        ));
        loop {
            tokio::select! {
                // Commands first: an allocation that arrived with the worker
                // is queued (and blamed) before a startup failure is handled.
                biased;
                cmd = rx.recv() => match cmd {
                    Some(FeCommand::Run(a, _)) => self.queue.push_back(Queued { alloc: Arc::unwrap_or_clone(a), resume: None, ready: None }),
                    Some(FeCommand::Cancel(id)) => self.cancel_queued(&id),
                    Some(FeCommand::Evict(_)) => {} // Not idle: it is starting.
                    // Not yet worth keeping: it stops with the agent.
                    Some(FeCommand::Detach) => {
                        self.stopping("agent stopping");
                        break;
                    }
                    #[cfg(test)]
                    Some(FeCommand::Panic) => panic!("a test asked this controller to panic"),
                    Some(FeCommand::Shutdown(why)) => {
                        self.stopping(why);
                        break;
                    }
                    None => break,
                },
                r = &mut startup => {
                    match r {
                        Ok(live) => self.started(live, started),
                        Err(failed) => self.startup_failed(failed),
                    }
                    return true;
                }
            }
        }
        // A half-started worker goes with the startup future: dropping
        // it kills the worker, its group and its cgroup (its usage is
        // read first).
        self.keep_last_usage();
        drop(startup);
        self.fail_queued(pb::AllocationFailureReason::FunctionExecutorTerminated);
        false
    }

    fn started(&mut self, live: Live, started: Instant) {
        if let Some(store) = &self.shared.adoption {
            let gpus = self
                .view
                .borrow()
                .phase
                .spawned()
                .map(|s| s.gpus.clone())
                .unwrap_or_default();
            let reading = StartReading::now(live.worker.monitor().as_ref());
            store.worker_running(&self.desc, &gpus, reading);
        }
        self.shared
            .metrics
            .fe_startup_latency
            .observe(started.elapsed().as_secs_f64());
        self.shared.event(
            "function_executor_running",
            &self.id,
            format!(
                "worker pid {} on {} initialized in {} ms (log: {})",
                live.worker.pid(),
                live.worker.address(),
                started.elapsed().as_millis(),
                live.worker.log_path().display()
            ),
        );
        self.view.send_modify(|s| {
            if let FePhase::Starting(spawned) = &s.phase {
                s.phase = FePhase::Running(spawned.clone());
            }
            let what = pb::FunctionExecutorStatus::Running.as_str_name();
            s.timeline.push(TimelineEntry::now(what));
            s.last_used = Instant::now();
        });
        self.shared.report_now.notify_one();
        self.phase = Phase::Running(live);
    }

    /// Reattached to a worker of an earlier run: the allocations it still
    /// has are followed where they are; those it never got (the earlier
    /// run stopped between its record and `create_allocation`) are handed
    /// to it now. Results the record kept are the agent's, not the
    /// controller's (see `adopt_workers`).
    fn adopted(
        &mut self,
        live: Live,
        record: crate::adoption::WorkerRecord,
        on_worker: &std::collections::HashSet<String>,
        started: Instant,
    ) {
        let (mut resumed, mut again) = (Vec::new(), Vec::new());
        for a in record.allocations {
            if a.result.is_some() {
                // Kept for the server already; the worker may let it go.
                if on_worker.contains(a.id()) {
                    allocation::forget(&live.client, a.id());
                }
                continue;
            }
            let Some(alloc) = a.allocation.clone() else {
                continue;
            };
            if on_worker.contains(a.id()) {
                resumed.push(Queued {
                    alloc,
                    resume: Some(a),
                    ready: None,
                });
            } else {
                again.push(Queued {
                    alloc,
                    resume: None,
                    ready: None,
                });
            }
        }
        self.shared.event(
            "function_executor_adopted",
            &self.id,
            format!(
                "worker pid {} of an earlier run adopted on {} in {} ms: {} running allocation(s) followed, {} handed to it again (it never got them)",
                live.worker.pid(),
                live.worker.address(),
                started.elapsed().as_millis(),
                resumed.len(),
                again.len()
            ),
        );
        self.queue.extend(resumed);
        self.queue.extend(again);
        self.view.send_modify(|s| {
            if let FePhase::Starting(spawned) = &s.phase {
                s.phase = FePhase::Running(spawned.clone());
            }
            s.timeline.push(TimelineEntry::now("RUNNING (adopted)"));
            s.last_used = Instant::now();
        });
        self.shared.report_now.notify_one();
        self.phase = Phase::Running(live);
    }

    /// A worker of an earlier run that could not be adopted (gone, or not
    /// the one recorded): reported terminated, and what ran on it failed
    /// as on a worker lost under its allocations.
    fn adoption_failed(
        &mut self,
        (reason, message): Failed,
        record: &crate::adoption::WorkerRecord,
    ) {
        self.shared
            .event("function_executor_lost", &self.id, message.clone());
        self.message = Some(message);
        let lost: Vec<pb::Allocation> = record
            .allocations
            .iter()
            .filter(|a| a.result.is_none())
            .filter_map(|a| a.allocation.clone())
            .collect();
        let blamed: Vec<String> = lost
            .iter()
            .filter_map(|a| a.allocation_id.clone())
            .collect();
        for a in &lost {
            self.shared.push_result(failed_result(
                a,
                pb::AllocationFailureReason::FunctionExecutorTerminated,
                None,
            ));
        }
        self.keep_last_usage();
        self.mark_terminated(reason, blamed);
    }

    fn startup_failed(&mut self, (reason, message): Failed) {
        self.shared.event(
            "function_executor_startup_failed",
            &self.id,
            message.clone(),
        );
        self.message = Some(message);
        let startup_reason = match reason {
            Reason::StartupFailedFunctionError => {
                pb::AllocationFailureReason::StartupFailedFunctionError
            }
            Reason::StartupFailedFunctionTimeout => {
                pb::AllocationFailureReason::StartupFailedFunctionTimeout
            }
            Reason::Oom => pb::AllocationFailureReason::Oom,
            _ => pb::AllocationFailureReason::StartupFailedInternalError,
        };
        let blamed: Vec<String> = self
            .queue
            .iter()
            .filter_map(|q| q.alloc.allocation_id.clone())
            .collect();
        self.fail_queued(startup_reason);
        // The process (if one was spawned) went with the startup.
        self.keep_last_usage();
        self.mark_terminated(reason, blamed);
        self.phase = Phase::Terminated {
            startup_failure: Some(startup_reason),
        };
    }

    /// Phase 2: runs allocations until told to shut down.
    async fn serve(&mut self, rx: &mut mpsc::UnboundedReceiver<FeCommand>) {
        let mut health = tokio::time::interval(self.shared.config.health_check_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        health.tick().await;
        loop {
            self.start_queued();
            let alive = self.live().is_some();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(FeCommand::Run(a, received)) => self.take(a, received),
                    Some(FeCommand::Cancel(id)) => self.cancel(id).await,
                    Some(FeCommand::Evict(why)) => self.evict(why).await,
                    #[cfg(test)]
                    Some(FeCommand::Panic) => panic!("a test asked this controller to panic"),
                    Some(FeCommand::Shutdown(why)) => {
                        self.stopping(why);
                        return;
                    }
                    Some(FeCommand::Detach) => {
                        self.detaching = true;
                        return;
                    }
                    None => return,
                },
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Some((id, outcome)) = self.account(joined) {
                        self.finish_allocation(id, outcome).await;
                    }
                }
                exit = async {
                    match &mut self.phase {
                        Phase::Running(live) => live.worker.exited().await,
                        _ => std::future::pending().await,
                    }
                }, if alive => {
                    self.shared.event("function_executor_exited", &self.id, format!("worker {}", exit.description));
                    let reason = self.note_oom(&exit).unwrap_or(Reason::Unhealthy);
                    let blamed = self.running.keys().cloned().collect();
                    self.kill(reason, blamed, None).await;
                }
                _ = health.tick(), if alive && self.shared.config.health_checks_enabled => {
                    if let Err(why) = self.check_health().await {
                        self.shared.event("function_executor_unhealthy", &self.id, why.to_string());
                        let blamed = self.running.keys().cloned().collect();
                        self.kill(Reason::Unhealthy, blamed, None).await;
                    }
                }
            }
        }
    }

    /// An allocation for this worker: queued, or failed at once when the
    /// worker is terminated.
    fn take(&mut self, a: Arc<pb::Allocation>, received: Instant) {
        if let Phase::Terminated { startup_failure } = self.phase {
            let id = a.allocation_id.as_deref().unwrap_or("");
            self.alloc_note(id, AllocPhase::Finished, "function executor is terminated");
            let why =
                startup_failure.unwrap_or(pb::AllocationFailureReason::FunctionExecutorTerminated);
            self.shared.push_result(failed_result(&a, why, None));
            return;
        }
        let free = self.queue.is_empty() && self.running.len() < self.max_concurrency();
        self.queue.push_back(Queued {
            alloc: Arc::unwrap_or_clone(a),
            resume: None,
            ready: free.then_some(received),
        });
    }

    async fn cancel(&mut self, id: String) {
        if self.running.contains_key(&id) {
            self.kill(Reason::FunctionCancelled, vec![id.clone()], Some(&id))
                .await;
        } else {
            self.cancel_queued(&id);
        }
    }

    /// Told to shut down: the view says so (the server keeps hearing the
    /// status it had until the worker is gone).
    fn stopping(&self, why: &'static str) {
        self.view.send_modify(|s| {
            if s.phase.termination().is_none() {
                let was = s.phase.status();
                let spawned = s.phase.spawned().cloned();
                s.phase = FePhase::Stopping { was, spawned };
            }
            s.timeline.push(TimelineEntry::now(why));
        });
    }

    /// Shutdown: keeps what already finished, stops the worker, and
    /// reports the rest terminated (a task that fails because the worker
    /// is gone is not an error of its function).
    async fn stop_serving(&mut self) {
        self.collect_finished();
        self.tasks.abort_all();
        if let Some(mut live) = self.take_live() {
            self.keep_last_usage();
            live.worker
                .stop(self.shared.config.function_executor_stop_grace)
                .await;
        }
        for (_, r) in std::mem::take(&mut self.running) {
            self.shared.push_result(failed_result(
                &r.alloc,
                pb::AllocationFailureReason::FunctionExecutorTerminated,
                None,
            ));
        }
        self.fail_queued(pb::AllocationFailureReason::FunctionExecutorTerminated);
    }

    /// Fails every queued allocation with `why`.
    fn fail_queued(&mut self, why: pb::AllocationFailureReason) {
        for Queued { alloc: a, .. } in std::mem::take(&mut self.queue) {
            self.shared.push_result(failed_result(&a, why, None));
        }
    }

    /// The controller ends: allocations still in its channel fail (none
    /// can be sent after it is closed: the sender then fails them). Its
    /// view closes once the task that watches it has seen it end (see
    /// [`super::spawn`]): then the reconciler forgets the worker.
    fn finish(self, mut rx: mpsc::UnboundedReceiver<FeCommand>) {
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            // Let go of alive: the next agent hears of them again.
            if self.detaching {
                break;
            }
            if let FeCommand::Run(a, _) = cmd {
                let id = a.allocation_id.as_deref().unwrap_or("");
                self.alloc_note(id, AllocPhase::Finished, "function executor is gone");
                self.shared.push_result(failed_result(
                    &a,
                    pb::AllocationFailureReason::FunctionExecutorTerminated,
                    None,
                ));
            }
        }
        if !self.detaching {
            self.shared
                .event("function_executor_removed", &self.id, "controller stopped");
        }
    }

    /// Marks the worker as used now (eviction takes the least recently used).
    fn touch(&self) {
        self.view.send_modify(|s| s.last_used = Instant::now());
    }

    fn set_termination_message(&mut self, message: String) {
        self.message = Some(message);
    }

    /// Keeps the worker's usage as last read, before its cgroup goes, and
    /// tells metering the worker stops (once per worker: the monitor is
    /// taken).
    fn keep_last_usage(&mut self) {
        if self.usage_kept {
            return;
        }
        let Some(monitor) = self
            .view
            .borrow()
            .phase
            .spawned()
            .map(|s| s.monitor.clone())
        else {
            return;
        };
        self.usage_kept = true;
        // Read outside the view's lock (cgroup files).
        self.last_usage = monitor.usage().or(self.last_usage);
        if let Some(metering) = &self.shared.config.metering {
            metering.worker_stopped(&self.id);
        }
    }

    /// For an exit the kernel's OOM killer caused: says so (event, message,
    /// metric) and returns the OOM reason.
    fn note_oom(&mut self, exit: &Exit) -> Option<Reason> {
        let oom = exit.oom.as_ref()?;
        self.shared.metrics.worker_oom_kills.inc();
        self.shared
            .event("function_executor_oom", &self.id, oom.clone());
        self.set_termination_message(oom.clone());
        Some(Reason::Oom)
    }

    /// An OOM kill inside a live worker's cgroup, as an exit-like verdict.
    fn oom_inside(&self) -> Option<Exit> {
        let monitor = self.live()?.worker.monitor();
        let kills = monitor.usage()?.oom_kills;
        let limit = monitor.limits()?.memory_bytes;
        (kills > 0).then(|| Exit {
            description: "alive, but a process of it was OOM-killed".into(),
            oom: Some(format!(
                "OOM-killed: a process of the worker reached its cgroup memory limit of {limit} bytes (oom_kill count {kills})"
            )),
        })
    }

    /// Stops an idle worker under memory pressure; a busy one stays (the
    /// eviction loop looks again).
    async fn evict(&mut self, why: String) {
        if !self.running.is_empty() || !self.queue.is_empty() || self.terminated() {
            return;
        }
        // An allocation the reconciler already accepted for this worker
        // may still be on its way here: then it is not idle.
        let busy = self.shared.state.lock().busy(&self.id);
        if busy {
            return;
        }
        let Some(mut live) = self.take_live() else {
            return;
        };
        let freed = live
            .worker
            .monitor()
            .usage()
            .map(|u| u.memory_current_bytes);
        self.keep_last_usage();
        // Idle: nothing to finish, so no grace (which would also leave a
        // window for new allocations to be routed to a worker going away).
        live.worker.stop(Duration::ZERO).await;
        let freed = match freed {
            Some(b) => format!("freed {b} bytes of memory (its cgroup's use)"),
            None => "freed its memory (not measured: no cgroup)".to_string(),
        };
        let message = format!("evicted while idle: {why}; {freed}");
        self.shared.metrics.fe_evictions.inc();
        self.shared
            .event("function_executor_evicted", &self.id, message.clone());
        self.set_termination_message(message);
        self.mark_terminated(Reason::Unhealthy, Vec::new());
        self.note("worker process stopped (evicted)".into());
    }

    /// Terminated: the view says why and whom to blame; the server hears
    /// at once. The phase stays terminated until the controller ends.
    fn mark_terminated(&mut self, reason: Reason, blamed: Vec<String>) {
        if !self.terminated() {
            self.phase = Phase::Terminated {
                startup_failure: None,
            };
        }
        self.shared
            .metrics
            .fe_terminations
            .get_or_create(&vec![("reason", reason_label(reason))])
            .inc();
        self.shared.config.gpu_pool.release(&self.id);
        let message = self.message.take();
        let usage = self.last_usage;
        self.view.send_modify(|s| {
            let spawned = s.phase.spawned().cloned();
            s.phase = FePhase::Terminated(Termination {
                reason,
                message,
                blamed,
                pid: spawned.as_ref().map(|p| p.pid),
                gpus: spawned.map(|p| p.gpus).unwrap_or_default(),
                usage,
            });
            let what = format!(
                "{}: {}",
                pb::FunctionExecutorStatus::Terminated.as_str_name(),
                reason.as_str_name()
            );
            s.timeline.push(TimelineEntry::now(what));
        });
        self.shared.report_now.notify_one();
    }

    fn cancel_queued(&mut self, id: &str) {
        if let Some(pos) = self
            .queue
            .iter()
            .position(|q| q.alloc.allocation_id.as_deref() == Some(id))
            && let Some(Queued { alloc: a, .. }) = self.queue.remove(pos)
        {
            self.shared.push_result(failed_result(
                &a,
                pb::AllocationFailureReason::AllocationCancelled,
                None,
            ));
        }
    }

    fn start_queued(&mut self) {
        let (client, monitor) = match &self.phase {
            Phase::Running(live) => (live.client.clone(), live.worker.monitor()),
            _ => return,
        };
        while self.running.len() < self.max_concurrency() {
            let Some(Queued {
                alloc: a,
                resume,
                ready,
            }) = self.queue.pop_front()
            else {
                break;
            };
            let ready = ready.unwrap_or_else(Instant::now);
            let id = a.allocation_id.clone().unwrap_or_default();
            self.shared.metrics.allocations_started.inc();
            self.shared.metrics.allocations_running.inc();
            self.alloc_note(&id, AllocPhase::Running, "running");
            let fut = match resume {
                Some(record) => self.resumed(record, ready, client.clone()),
                None => self.fresh(a.clone(), ready, client.clone(), monitor.as_ref()),
            };
            let task_id = id.clone();
            // Inside the worker's span: the allocation's lines carry both ids.
            let span = crate::log_ids::allocation_span(&id);
            let handle = self
                .tasks
                .spawn(async move { (task_id, fut.await) }.instrument(span));
            self.running.insert(
                id,
                Running {
                    alloc: a,
                    task: handle,
                },
            );
        }
    }

    /// The task of a new allocation. Boxed where it is made: the
    /// allocation's state machine is large, and moving it into the task by
    /// value copied it three times (a quarter of the agent's instructions,
    /// by callgrind).
    fn fresh(
        &self,
        a: pb::Allocation,
        ready: Instant,
        client: super::conn::WorkerClient,
        monitor: &dyn steward_worker_driver::WorkerMonitor,
    ) -> AllocTask {
        let id = a.allocation_id.clone().unwrap_or_default();
        if let Some(metering) = &self.shared.config.metering {
            metering.allocation_started(&self.id, &id);
        }
        let started = self
            .shared
            .adoption
            .as_ref()
            .and_then(|_| StartReading::now(monitor));
        Box::pin(allocation::run(
            self.shared.clone(),
            client,
            self.allocation_timeout(),
            a,
            ready,
            started,
        ))
    }

    /// The task following an allocation that was already on the adopted
    /// worker; metered from the reading it started at.
    fn resumed(
        &self,
        record: crate::adoption::AllocRecord,
        ready: Instant,
        client: super::conn::WorkerClient,
    ) -> AllocTask {
        if let Some(metering) = &self.shared.config.metering {
            let at = record
                .started
                .map(|s| (s.at_ms, s.cpu_usec, s.memory_bytes));
            metering.allocation_resumed(&self.id, record.id(), at);
        }
        Box::pin(allocation::resume(
            self.shared.clone(),
            client,
            self.allocation_timeout(),
            record,
            ready,
        ))
    }

    /// A joined allocation task: its outcome, or, for a task that panicked,
    /// a failed result pushed here (an aborted task was accounted for by
    /// whoever aborted it).
    fn account(&mut self, joined: Joined) -> Option<(String, AllocOutcome)> {
        let e = match joined {
            Ok(done) => return Some(done),
            Err(e) => e,
        };
        if !e.is_panic() {
            return None;
        }
        let id = self
            .running
            .iter()
            .find(|(_, r)| r.task.id() == e.id())
            .map(|(id, _)| id.clone())?;
        let r = self.running.remove(&id)?;
        self.shared.metrics.allocations_running.dec();
        self.shared.event(
            "allocation_failed",
            &id,
            "the agent's task running this allocation panicked",
        );
        self.shared.push_result(failed_result(
            &r.alloc,
            pb::AllocationFailureReason::InternalError,
            None,
        ));
        None
    }

    /// Takes the results of allocation tasks that already finished, so a
    /// kill or shutdown that follows does not overwrite them with failures.
    fn collect_finished(&mut self) {
        while let Some(joined) = self.tasks.try_join_next() {
            let Some((id, outcome)) = self.account(joined) else {
                continue;
            };
            if self.running.remove(&id).is_some() {
                self.shared.metrics.allocations_running.dec();
                self.shared.push_result(outcome.result);
                if outcome.on_worker
                    && let Some(live) = self.live()
                {
                    allocation::forget(&live.client, &id);
                }
            }
        }
    }

    async fn finish_allocation(&mut self, id: String, mut outcome: AllocOutcome) {
        if self.running.remove(&id).is_none() {
            return; // Already accounted for by a kill.
        }
        self.shared.metrics.allocations_running.dec();
        self.touch();
        let failed = outcome.result.outcome_code != Some(pb::AllocationOutcomeCode::Success as i32);
        // A worker lost under a running allocation may have been OOM-killed:
        // then the allocation and the worker are OOM, not a function error.
        let mut oom = None;
        if outcome.kill_fe == Some(Reason::Unhealthy) {
            let exit = match self.exit_soon().await {
                Some(exit) => Some(exit),
                // Alive, but one of its processes was OOM-killed (cgroup v1
                // kills one process, not the whole worker).
                None => self.oom_inside(),
            };
            oom = exit.and_then(|e| self.note_oom(&e));
            if oom.is_some() {
                outcome.result.failure_reason = Some(pb::AllocationFailureReason::Oom as i32);
            }
        }
        self.shared.push_result(outcome.result);
        if outcome.on_worker
            && let Some(live) = self.live()
        {
            // Kept now (and on record): the worker may let it go.
            allocation::forget(&live.client, &id);
        }
        if let Some(reason) = oom.or(outcome.kill_fe) {
            self.kill(reason, vec![id], None).await;
        } else if failed && self.live().is_some() && self.shared.config.health_checks_enabled {
            // A failure may mean a broken worker: check once right away.
            if let Err(why) = self.check_health().await {
                self.shared
                    .event("function_executor_unhealthy", &self.id, why.to_string());
                let blamed = self.running.keys().cloned().collect();
                self.kill(Reason::Unhealthy, blamed, None).await;
            }
        }
    }

    async fn check_health(&mut self) -> Result<(), Unhealthy> {
        let Some(live) = self.live_mut() else {
            return Ok(());
        };
        let call = live.client.check_health(fe_pb::HealthCheckRequest {});
        let verdict = match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                if r.healthy == Some(true) {
                    Ok(())
                } else {
                    Err(Unhealthy::Says(r.status_message.unwrap_or_default()))
                }
            }
            Ok(Err(s)) => Err(Unhealthy::Failed(s.code(), s.message().to_string())),
            Err(_) => Err(Unhealthy::NoAnswer),
        };
        let label = if verdict.is_ok() {
            "healthy"
        } else {
            "unhealthy"
        };
        self.shared
            .metrics
            .fe_health_checks
            .get_or_create(&vec![("result", label)])
            .inc();
        verdict
    }

    /// The worker's exit if it has exited or does within a moment (a failed
    /// RPC can be how a dying worker is first noticed).
    async fn exit_soon(&mut self) -> Option<Exit> {
        let live = self.live_mut()?;
        if let Some(exit) = live.worker.try_exit() {
            return Some(exit);
        }
        // (The wait also covers removing its cgroup: an exit seen in time
        // but not yet cleaned up still counts.)
        let waited = tokio::time::timeout(Duration::from_millis(50), live.worker.exited())
            .await
            .ok();
        waited.or_else(|| live.worker.try_exit())
    }

    /// Kills the worker and reports it terminated with `reason`, blaming
    /// `blamed`. Allocations running on it fail; `cancelled` (if any) is
    /// reported as cancelled, the others as function errors.
    async fn kill(&mut self, reason: Reason, blamed: Vec<String>, cancelled: Option<&str>) {
        self.collect_finished();
        let mut reason = reason;
        if let Some(live) = self.live_mut() {
            // A failed RPC can be how a dead worker is first noticed: say so.
            // (It may still be closing down: give it a moment when unhealthy.)
            let exited = match live.worker.try_exit() {
                Some(exit) => Some(exit),
                None if reason == Reason::Unhealthy => self.exit_soon().await,
                None => None,
            };
            if let Some(exit) = exited {
                self.shared.event(
                    "function_executor_exited",
                    &self.id,
                    format!("worker {}", exit.description),
                );
                if reason == Reason::Unhealthy
                    && let Some(oom) = self.note_oom(&exit)
                {
                    reason = oom;
                }
            }
        }
        if let Some(mut live) = self.take_live() {
            self.keep_last_usage();
            let exit = live.worker.stop(Duration::ZERO).await;
            // An OOM kill of one of its processes (the worker itself alive,
            // as cgroup v1 kills one process) is still the worker's OOM.
            if reason == Reason::Unhealthy
                && let Some(oom) = exit.as_ref().and_then(|e| self.note_oom(e))
            {
                reason = oom;
            }
        }
        // (Tasks that ended while the worker was being stopped ended
        // because it was: they are reported below as the kill decides.)
        for (id, r) in std::mem::take(&mut self.running) {
            r.task.abort();
            self.shared.metrics.allocations_running.dec();
            let why = sibling_reason(&id, reason, &blamed, cancelled);
            self.shared.push_result(failed_result(&r.alloc, why, None));
        }
        for Queued { alloc: a, .. } in std::mem::take(&mut self.queue) {
            self.shared.push_result(failed_result(
                &a,
                pb::AllocationFailureReason::FunctionExecutorTerminated,
                None,
            ));
        }
        self.shared.event(
            "function_executor_terminated",
            &self.id,
            format!(
                "{} (blamed: {})",
                reason.as_str_name(),
                if blamed.is_empty() {
                    "none".to_string()
                } else {
                    blamed.join(", ")
                }
            ),
        );
        self.mark_terminated(reason, blamed);
        self.note("worker process stopped".into());
    }
}

/// Why a health check failed.
#[derive(Debug, thiserror::Error)]
enum Unhealthy {
    #[error("worker says it is unhealthy: {0}")]
    Says(String),
    #[error("health check failed: {0}: {1}")]
    Failed(tonic::Code, String),
    #[error("health check got no answer within 5s")]
    NoAnswer,
}

/// The failure of an allocation running on a worker killed for `reason`:
/// the cancelled one is cancelled, the ones blamed fail by the reason, and
/// the others had their worker terminated under them.
fn sibling_reason(
    id: &str,
    reason: Reason,
    blamed: &[String],
    cancelled: Option<&str>,
) -> pb::AllocationFailureReason {
    use pb::AllocationFailureReason as F;
    if Some(id) == cancelled {
        return F::AllocationCancelled;
    }
    if reason == Reason::Oom {
        return F::Oom;
    }
    if !blamed.iter().any(|b| b == id) {
        return F::FunctionExecutorTerminated;
    }
    match reason {
        Reason::FunctionTimeout => F::FunctionTimeout,
        _ => F::FunctionError,
    }
}

fn reason_label(r: Reason) -> &'static str {
    match r {
        Reason::Unknown => "unknown",
        Reason::StartupFailedInternalError => "startup_failed_internal_error",
        Reason::StartupFailedFunctionError => "startup_failed_function_error",
        Reason::StartupFailedFunctionTimeout => "startup_failed_function_timeout",
        Reason::Unhealthy => "unhealthy",
        Reason::InternalError => "internal_error",
        Reason::FunctionTimeout => "function_timeout",
        Reason::FunctionCancelled => "function_cancelled",
        Reason::Oom => "oom",
    }
}
