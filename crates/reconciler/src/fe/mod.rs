//! One controller task per function executor: start the worker (GPUs, code,
//! spawn, connect, `get_info`, `initialize`), run its allocations with at
//! most `max_concurrency` at once, health-check it, notice at once when the
//! process exits, and terminate it with the right reason and blamed
//! allocations. The controller is the only owner of its worker process.

mod allocation;
mod calls;
mod conn;
mod plan;
mod python;
mod request_state;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use steward_worker_driver::{ConnectError, Exit, Worker, WorkerSpec};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use allocation::AllocOutcome;
pub(crate) use allocation::failed_result;

/// Learns the workers' Python version before any worker runs (so the first
/// reports already carry it); a worker's `get_info` confirms it later.
pub(crate) async fn probe_python(shared: Arc<Shared>) {
    let Some(v) = python::probe_python_version(&shared.config.function_executor_bin).await else {
        return;
    };
    let set = {
        let mut st = shared.state.lock();
        st.python_version
            .is_none()
            .then(|| st.python_version = Some(v))
            .is_some()
    };
    if set {
        shared.report_now.notify_one();
    }
}

use crate::state::{AllocPhase, Shared, TimelineEntry};
use crate::{fe_pb, pb};

type Reason = pb::FunctionExecutorTerminationReason;

/// What the reconciler tells a controller.
pub(crate) enum FeCommand {
    /// An allocation and when the desired state that brought it arrived.
    Run(Box<pb::Allocation>, Instant),
    Cancel(String),
    Shutdown,
    /// Stop if idle (host memory pressure); the text says why.
    Evict(String),
}

/// Starts a controller for `desc` and returns its command channel.
/// `refusal`: why admission refused it (its startup then fails with that).
pub(crate) fn spawn(
    shared: Arc<Shared>,
    desc: pb::FunctionExecutorDescription,
    refusal: Option<String>,
) -> mpsc::UnboundedSender<FeCommand> {
    let (tx, rx) = mpsc::unbounded_channel();
    let id = desc.id.clone().unwrap_or_default();
    let controller = tokio::spawn(Controller::new(shared.clone(), desc, refusal).run(rx));
    // A controller that panics must not take its allocations with it.
    tokio::spawn(async move {
        if let Err(e) = controller.await
            && e.is_panic()
        {
            controller_panicked(&shared, &id);
        }
    });
    tx
}

/// Accounts for a controller that panicked: its worker is reported
/// terminated (the process died with the controller's handle, which kills
/// on drop) and every allocation it had not finished gets a failed result.
fn controller_panicked(shared: &Arc<Shared>, fe_id: &str) {
    shared.event(
        "function_executor_controller_panicked",
        fe_id,
        "the controller of this worker panicked; its worker is gone and its allocations failed",
    );
    let orphans: Vec<pb::Allocation> = {
        let st = shared.state.lock();
        let unfinished = |id: &str| {
            st.allocations
                .get(id)
                .is_some_and(|a| a.fe_id == fe_id && a.phase != AllocPhase::Finished)
        };
        st.last_desired
            .iter()
            .flat_map(|(d, _)| d.allocations.iter())
            .filter(|a| unfinished(a.allocation_id.as_deref().unwrap_or("")))
            .map(|a| (**a).clone())
            .collect()
    };
    for a in orphans {
        shared.push_result(failed_result(
            &a,
            pb::AllocationFailureReason::FunctionExecutorTerminated,
            None,
        ));
    }
    shared.config.gpu_pool.release(fe_id);
    // The worker went with the controller: dropping it killed it and its cgroup.
    shared.state.lock().fes.remove(fe_id);
    shared.report_now.notify_one();
    shared.reconcile_now.notify_one();
}

/// Asks every controller to stop and waits until all are gone.
pub(crate) async fn shutdown_all(shared: &Arc<Shared>) {
    {
        let mut st = shared.state.lock();
        for fe in st.fes.values_mut() {
            fe.removing = true;
            if let Some(tx) = &fe.tx {
                let _ = tx.send(FeCommand::Shutdown);
            }
        }
        st.fes.retain(|_, fe| fe.tx.is_some());
    }
    let deadline =
        Instant::now() + shared.config.function_executor_stop_grace + Duration::from_secs(15);
    while Instant::now() < deadline {
        if shared.state.lock().fes.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!("some function executors did not stop in time");
}

struct Live {
    worker: Box<dyn Worker>,
    client: conn::WorkerClient,
}

/// An allocation waiting for a slot on its worker.
struct Queued {
    alloc: pb::Allocation,
    /// When it could have started: its arrival if a slot was free then;
    /// `None` while it waits for a slot or the worker (the wait is the
    /// worker's, not the agent's share of the cycle).
    ready: Option<Instant>,
}

struct Running {
    alloc: pb::Allocation,
    task: tokio::task::AbortHandle,
}

/// What became of an allocation task.
type Joined = Result<(String, AllocOutcome), tokio::task::JoinError>;

struct Controller {
    shared: Arc<Shared>,
    id: String,
    desc: pb::FunctionExecutorDescription,
    queue: VecDeque<Queued>,
    running: HashMap<String, Running>,
    tasks: JoinSet<(String, AllocOutcome)>,
    live: Option<Live>,
    terminated: bool,
    /// Why the worker never started, for allocations that reach it after
    /// the startup failed (they race the failure; the reason is the same).
    startup_failure: Option<pb::AllocationFailureReason>,
    /// Why admission refused this worker, if it did.
    refusal: Option<String>,
}

impl Controller {
    fn new(
        shared: Arc<Shared>,
        desc: pb::FunctionExecutorDescription,
        refusal: Option<String>,
    ) -> Self {
        Controller {
            shared,
            id: desc.id.clone().unwrap_or_default(),
            desc,
            queue: VecDeque::new(),
            running: HashMap::new(),
            tasks: JoinSet::new(),
            live: None,
            terminated: false,
            startup_failure: None,
            refusal,
        }
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
        if let Some(fe) = self.shared.state.lock().fes.get_mut(&self.id) {
            fe.timeline.push(TimelineEntry::now(what));
        }
    }

    fn alloc_note(&self, id: &str, phase: AllocPhase, what: &str) {
        if let Some(a) = self.shared.state.lock().allocations.get_mut(id) {
            a.phase = phase;
            a.timeline.push(TimelineEntry::now(what));
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<FeCommand>) {
        self.shared.metrics.fe_creations.inc();
        let started = Instant::now();
        // Phase 1: start the worker, queueing allocations meanwhile.
        // Boxed so that a shutdown can drop it (and the worker in it) early.
        let mut startup = Box::pin(start(
            self.shared.clone(),
            self.desc.clone(),
            self.refusal.take(),
        ));
        let shutdown_requested = loop {
            tokio::select! {
                // Commands first: an allocation that arrived with the worker
                // is queued (and blamed) before a startup failure is handled.
                biased;
                cmd = rx.recv() => match cmd {
                    Some(FeCommand::Run(a, _)) => self.queue.push_back(Queued { alloc: *a, ready: None }),
                    Some(FeCommand::Cancel(id)) => self.cancel_queued(&id),
                    Some(FeCommand::Evict(_)) => {} // Not idle: it is starting.
                    Some(FeCommand::Shutdown) | None => break true,
                },
                r = &mut startup => {
                    match r {
                        Ok(live) => {
                            self.shared.metrics.fe_startup_latency.observe(started.elapsed().as_secs_f64());
                            self.set_status(pb::FunctionExecutorStatus::Running, None, Vec::new(), Some(live.worker.pid()));
                            self.shared.event("function_executor_running", &self.id, format!(
                                "worker pid {} on {} initialized in {} ms (log: {})",
                                live.worker.pid(), live.worker.address(), started.elapsed().as_millis(), live.worker.log_path().display()
                            ));
                            self.touch();
                            self.live = Some(live);
                        }
                        Err((reason, message)) => {
                            self.shared.event("function_executor_startup_failed", &self.id, message.clone());
                            self.set_termination_message(message);
                            let startup_reason = match reason {
                                Reason::StartupFailedFunctionError => pb::AllocationFailureReason::StartupFailedFunctionError,
                                Reason::StartupFailedFunctionTimeout => pb::AllocationFailureReason::StartupFailedFunctionTimeout,
                                Reason::Oom => pb::AllocationFailureReason::Oom,
                                _ => pb::AllocationFailureReason::StartupFailedInternalError,
                            };
                            self.startup_failure = Some(startup_reason);
                            let blamed: Vec<String> = self.queue.iter().filter_map(|q| q.alloc.allocation_id.clone()).collect();
                            for Queued { alloc: a, .. } in std::mem::take(&mut self.queue) {
                                self.shared.push_result(failed_result(&a, startup_reason, None));
                            }
                            self.mark_terminated(reason, blamed);
                        }
                    }
                    break false;
                }
            }
        };
        if shutdown_requested {
            // A half-started worker goes with the startup future: dropping
            // it kills the worker, its group and its cgroup.
            drop(startup);
            self.shared.config.gpu_pool.release(&self.id);
            for Queued { alloc: a, .. } in std::mem::take(&mut self.queue) {
                self.shared.push_result(failed_result(
                    &a,
                    pb::AllocationFailureReason::FunctionExecutorTerminated,
                    None,
                ));
            }
            self.finish().await;
            return;
        }

        // Phase 2: run allocations until told to shut down.
        let mut health = tokio::time::interval(self.shared.config.health_check_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        health.tick().await;
        loop {
            self.start_queued();
            let alive = self.live.is_some();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(FeCommand::Run(a, received)) => {
                        if self.terminated {
                            self.alloc_note(a.allocation_id.as_deref().unwrap_or(""), AllocPhase::Finished, "function executor is terminated");
                            let why = self.startup_failure.unwrap_or(pb::AllocationFailureReason::FunctionExecutorTerminated);
                            self.shared.push_result(failed_result(&a, why, None));
                        } else {
                            let free = self.queue.is_empty() && self.running.len() < self.max_concurrency();
                            self.queue.push_back(Queued { alloc: *a, ready: free.then_some(received) });
                        }
                    }
                    Some(FeCommand::Cancel(id)) => {
                        if self.running.contains_key(&id) {
                            self.kill(Reason::FunctionCancelled, vec![id.clone()], Some(&id)).await;
                        } else {
                            self.cancel_queued(&id);
                        }
                    }
                    Some(FeCommand::Evict(why)) => self.evict(why).await,
                    Some(FeCommand::Shutdown) | None => break,
                },
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Some((id, outcome)) = self.account(joined) {
                        self.finish_allocation(id, outcome).await;
                    }
                }
                exit = async { self.live.as_mut().map(|l| l.worker.exited()).expect("guarded by alive").await }, if alive => {
                    self.shared.event("function_executor_exited", &self.id, format!("worker {}", exit.description));
                    let reason = self.note_oom(&exit).unwrap_or(Reason::Unhealthy);
                    let blamed = self.running.keys().cloned().collect();
                    self.kill(reason, blamed, None).await;
                }
                _ = health.tick(), if alive && self.shared.config.health_checks_enabled => {
                    if let Err(why) = self.check_health().await {
                        self.shared.event("function_executor_unhealthy", &self.id, why);
                        let blamed = self.running.keys().cloned().collect();
                        self.kill(Reason::Unhealthy, blamed, None).await;
                    }
                }
            }
        }
        // Shutdown: keep what already finished, stop the worker, and report
        // the rest terminated (a task that fails because the worker is gone
        // is not an error of its function).
        self.collect_finished();
        self.tasks.abort_all();
        if let Some(mut live) = self.live.take() {
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
        for Queued { alloc: a, .. } in std::mem::take(&mut self.queue) {
            self.shared.push_result(failed_result(
                &a,
                pb::AllocationFailureReason::FunctionExecutorTerminated,
                None,
            ));
        }
        self.shared.config.gpu_pool.release(&self.id);
        self.finish().await;
    }

    /// Forgets this worker and lets the reconciler recreate the id if wanted.
    async fn finish(&mut self) {
        self.shared.state.lock().fes.remove(&self.id);
        self.shared
            .event("function_executor_removed", &self.id, "controller stopped");
        self.shared.report_now.notify_one();
        self.shared.reconcile_now.notify_one();
    }

    fn set_status(
        &self,
        status: pb::FunctionExecutorStatus,
        reason: Option<Reason>,
        blamed: Vec<String>,
        pid: Option<u32>,
    ) {
        {
            let mut st = self.shared.state.lock();
            if let Some(fe) = st.fes.get_mut(&self.id) {
                fe.status = status;
                fe.termination_reason = reason;
                fe.blamed = blamed;
                if pid.is_some() {
                    fe.pid = pid;
                }
                let what = match reason {
                    Some(r) => format!("{}: {}", status.as_str_name(), r.as_str_name()),
                    None => status.as_str_name().to_string(),
                };
                fe.timeline.push(TimelineEntry::now(what));
            }
        }
        self.shared.report_now.notify_one();
    }

    /// Marks the worker as used now (eviction takes the least recently used).
    fn touch(&self) {
        if let Some(fe) = self.shared.state.lock().fes.get_mut(&self.id) {
            fe.last_used = Instant::now();
        }
    }

    fn set_termination_message(&self, message: String) {
        if let Some(fe) = self.shared.state.lock().fes.get_mut(&self.id) {
            fe.termination_message = Some(message);
        }
    }

    /// Keeps the worker's usage as last read, before its cgroup goes, and
    /// tells metering the worker stops (once per worker: the monitor is
    /// taken).
    fn keep_last_usage(&self) {
        let monitor = {
            let mut st = self.shared.state.lock();
            st.fes.get_mut(&self.id).and_then(|fe| fe.monitor.take())
        };
        let Some(m) = monitor else { return };
        // Read outside the state lock (cgroup files).
        let usage = m.usage();
        if let Some(fe) = self.shared.state.lock().fes.get_mut(&self.id) {
            fe.last_usage = usage.or(fe.last_usage);
        }
        if let Some(metering) = &self.shared.config.metering {
            metering.worker_stopped(&self.id);
        }
    }

    /// For an exit the kernel's OOM killer caused: says so (event, message,
    /// metric) and returns the OOM reason.
    fn note_oom(&self, exit: &Exit) -> Option<Reason> {
        let oom = exit.oom.as_ref()?;
        self.shared.metrics.worker_oom_kills.inc();
        self.shared
            .event("function_executor_oom", &self.id, oom.clone());
        self.set_termination_message(oom.clone());
        Some(Reason::Oom)
    }

    /// An OOM kill inside a live worker's cgroup, as an exit-like verdict.
    fn oom_inside(&self) -> Option<Exit> {
        let monitor = self.live.as_ref()?.worker.monitor();
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
        if !self.running.is_empty() || !self.queue.is_empty() || self.terminated {
            return;
        }
        // An allocation the reconciler already accepted for this worker
        // may still be on its way here: then it is not idle.
        let busy = self.shared.state.lock().busy(&self.id);
        if busy {
            return;
        }
        let Some(mut live) = self.live.take() else {
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

    fn mark_terminated(&mut self, reason: Reason, blamed: Vec<String>) {
        self.terminated = true;
        self.shared
            .metrics
            .fe_terminations
            .get_or_create(&vec![("reason", reason_label(reason))])
            .inc();
        self.shared.config.gpu_pool.release(&self.id);
        self.set_status(
            pb::FunctionExecutorStatus::Terminated,
            Some(reason),
            blamed,
            None,
        );
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
        let Some(live) = &self.live else { return };
        while self.running.len() < self.max_concurrency() {
            let Some(Queued { alloc: a, ready }) = self.queue.pop_front() else {
                break;
            };
            let ready = ready.unwrap_or_else(Instant::now);
            let id = a.allocation_id.clone().unwrap_or_default();
            self.shared.metrics.allocations_started.inc();
            self.shared.metrics.allocations_running.inc();
            if let Some(e) = self.shared.state.lock().allocations.get_mut(&id) {
                e.phase = AllocPhase::Running;
                e.timeline.push(TimelineEntry::now("running"));
            }
            if let Some(metering) = &self.shared.config.metering {
                metering.allocation_started(&self.id, &id);
            }
            // Boxed where it is made: the allocation's state machine is
            // large, and moving it into the task by value copied it three
            // times (a quarter of the agent's instructions, by callgrind).
            let fut = Box::pin(allocation::run(
                self.shared.clone(),
                live.client.clone(),
                self.allocation_timeout(),
                a.clone(),
                ready,
            ));
            let task_id = id.clone();
            let handle = self.tasks.spawn(async move { (task_id, fut.await) });
            self.running.insert(
                id,
                Running {
                    alloc: a,
                    task: handle,
                },
            );
        }
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
        if let Some(reason) = oom.or(outcome.kill_fe) {
            self.kill(reason, vec![id], None).await;
        } else if failed && self.live.is_some() && self.shared.config.health_checks_enabled {
            // A failure may mean a broken worker: check once right away.
            if let Err(why) = self.check_health().await {
                self.shared
                    .event("function_executor_unhealthy", &self.id, why);
                let blamed = self.running.keys().cloned().collect();
                self.kill(Reason::Unhealthy, blamed, None).await;
            }
        }
    }

    async fn check_health(&mut self) -> Result<(), String> {
        let Some(live) = &mut self.live else {
            return Ok(());
        };
        let call = live.client.check_health(fe_pb::HealthCheckRequest {});
        let verdict = match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                if r.healthy == Some(true) {
                    Ok(())
                } else {
                    Err(format!(
                        "worker says it is unhealthy: {}",
                        r.status_message.unwrap_or_default()
                    ))
                }
            }
            Ok(Err(s)) => Err(format!(
                "health check failed: {}: {}",
                s.code(),
                s.message()
            )),
            Err(_) => Err("health check got no answer within 5s".to_string()),
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
        let live = self.live.as_mut()?;
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
        if let Some(live) = self.live.as_mut() {
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
        if let Some(mut live) = self.live.take() {
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

fn to_fe_ref(f: &pb::FunctionRef) -> fe_pb::FunctionRef {
    fe_pb::FunctionRef {
        namespace: f.namespace.clone(),
        application_name: f.application_name.clone(),
        function_name: f.function_name.clone(),
        application_version: Some(f.application_version.clone().unwrap_or_default()),
    }
}

/// "3.11.2" -> ("3", "11"), for a Python worker.
fn python_version(info: &fe_pb::InfoResponse) -> Option<(String, String)> {
    if !info.sdk_language.as_deref()?.eq_ignore_ascii_case("python") {
        return None;
    }
    let mut parts = info.sdk_language_version.as_deref()?.split('.');
    let number = |p: Option<&str>| {
        p.filter(|s| !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit()))
            .map(str::to_string)
    };
    Some((number(parts.next())?, number(parts.next())?))
}

/// Reports the workers' Python version as labels, as the reference reports
/// its own (the interpreter that runs the functions is what matters here).
fn note_python_version(shared: &Shared, info: &fe_pb::InfoResponse) {
    let Some(v) = python_version(info) else {
        return;
    };
    let changed = {
        let mut st = shared.state.lock();
        let changed = st.python_version.as_ref() != Some(&v);
        st.python_version = Some(v);
        changed
    };
    if changed {
        shared.report_now.notify_one();
    }
}

/// Brings a worker from nothing to initialized.
/// The largest application code a worker may be given: the configured
/// limit, and never more than fits in one worker message.
fn application_code_limit(config: &crate::AgentConfig) -> u64 {
    config
        .max_application_code_bytes
        .min(config.max_worker_message_bytes as u64)
}

async fn start(
    shared: Arc<Shared>,
    desc: pb::FunctionExecutorDescription,
    refusal: Option<String>,
) -> Result<Live, (Reason, String)> {
    let id = desc.id.clone().unwrap_or_default();
    let internal = |m: String| (Reason::StartupFailedInternalError, m);
    if let Some(why) = refusal {
        return Err(internal(format!("admission refused this worker: {why}")));
    }
    let gpu_count = desc
        .resources
        .as_ref()
        .and_then(|r| r.gpu.as_ref())
        .and_then(|g| g.count)
        .unwrap_or(0);
    let gpus = shared
        .config
        .gpu_pool
        .allocate(&id, gpu_count)
        .map_err(internal)?;
    let app = desc.application.clone().unwrap_or_default();
    let uri = app.uri.clone().unwrap_or_default();
    // The code is read into memory and sent in one worker message: a size
    // named by the server is checked before the download, and the
    // download stops past the limit.
    let code_limit = application_code_limit(&shared.config);
    let (code, source) = shared
        .code_cache
        .get_or_fetch(
            &shared.config.blob_store,
            &uri,
            app.sha256_hash.as_deref(),
            code_limit,
        )
        .await
        .map_err(|e| match e {
            steward_blob_store::BlobError::TooLarge { .. } => internal(format!(
                "application code: {e} (the smaller of --max-application-code-bytes and --max-worker-message-bytes)"
            )),
            e => internal(format!("application code: {e}")),
        })?;
    let label = match source {
        steward_blob_store::CodeSource::Cache => "cache",
        steward_blob_store::CodeSource::Store => "blob_store",
    };
    shared
        .metrics
        .application_code_fetches
        .get_or_create(&vec![("source", label)])
        .inc();
    // No copy: the cache's buffer is moved when nothing else holds it.
    let code = Vec::from(code);
    let spec = worker_spec(&shared, &desc, &id, &gpus);
    let mut process = shared
        .config
        .driver
        .start(spec)
        .await
        .map_err(|e| internal(e.to_string()))?;
    let tracked = {
        let mut st = shared.state.lock();
        let fe = st.fes.get_mut(&id);
        let tracked = fe.is_some();
        if let Some(fe) = fe {
            fe.pid = Some(process.pid());
            fe.gpus = gpus.clone();
            fe.monitor = Some(process.monitor());
            fe.timeline.push(TimelineEntry::now(format!(
                "spawned pid {} on {}",
                process.pid(),
                process.address()
            )));
        }
        tracked
    };
    // Told outside the state lock (it reads the worker's counters); its
    // end is told when the monitor is taken (`keep_last_usage`).
    if tracked && let Some(metering) = &shared.config.metering {
        metering.worker_started(crate::metering::worker_of(&desc, &gpus, process.monitor()));
    }
    // Connect, retrying while the worker starts; give up if it exits.
    let deadline = Instant::now() + shared.config.function_executor_connect_timeout;
    let mut retry = Duration::from_millis(2);
    let channel = loop {
        if let Some(exit) = process.try_exit() {
            let reason = match exit.oom {
                Some(_) => Reason::Oom,
                None => Reason::StartupFailedInternalError,
            };
            return Err((
                reason,
                format!(
                    "worker {} before accepting connections{} (log: {})",
                    exit.description,
                    exit.oom.map(|o| format!(": {o}")).unwrap_or_default(),
                    process.log_path().display()
                ),
            ));
        }
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            match process.connect().await {
                Ok(stream) => conn::connect(stream).await.map_err(ConnectError::NotYet),
                Err(e) => Err(e),
            }
        });
        match attempt
            .await
            .unwrap_or_else(|_| Err(ConnectError::NotYet(std::io::ErrorKind::TimedOut.into())))
        {
            Ok(c) => break c,
            // Something that is not the worker listens where it should:
            // not a byte goes there, and the worker goes.
            Err(refused @ ConnectError::Refused { .. }) => {
                process.stop(Duration::ZERO).await;
                return Err(internal(format!("worker channel: {refused}")));
            }
            Err(e) if Instant::now() > deadline => {
                process.stop(Duration::ZERO).await;
                return Err(internal(format!(
                    "worker did not accept connections on {}: {e}",
                    process.address()
                )));
            }
            Err(_) => {
                // Fast workers listen within milliseconds: poll quickly at
                // first; a Python worker takes about half a second, and
                // polling it every 20 ms (a refused loopback connect costs
                // microseconds) adds 10 ms on average, not 50.
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_millis(20));
            }
        }
    };
    // A worker sending more than this in one message has its allocation
    // failed and is terminated as unhealthy (the RPC fails OUT_OF_RANGE).
    let limit = shared.config.max_worker_message_bytes;
    let mut client = channel
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let info = match tokio::time::timeout(
        Duration::from_secs(10),
        client.get_info(fe_pb::InfoRequest {}),
    )
    .await
    {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) => {
            process.stop(Duration::ZERO).await;
            return Err(internal(format!(
                "get_info failed: {}: {}",
                s.code(),
                s.message()
            )));
        }
        Err(_) => {
            process.stop(Duration::ZERO).await;
            return Err(internal("get_info got no answer within 10s".into()));
        }
    };
    if info.version.is_none()
        || info.sdk_version.is_none()
        || info.sdk_language.is_none()
        || info.sdk_language_version.is_none()
    {
        process.stop(Duration::ZERO).await;
        return Err(internal(format!("get_info answer is incomplete: {info:?}")));
    }
    note_python_version(&shared, &info);
    let init_timeout =
        Duration::from_millis(u64::from(desc.initialization_timeout_ms.unwrap_or(0)));
    let sha = hex::encode(Sha256::digest(&code));
    let request = fe_pb::InitializeRequest {
        function: desc.function.as_ref().map(to_fe_ref),
        application_code: Some(fe_pb::SerializedObject {
            manifest: Some(fe_pb::SerializedObjectManifest {
                encoding: Some(fe_pb::SerializedObjectEncoding::BinaryZip as i32),
                encoding_version: Some(app.encoding_version.unwrap_or(0)),
                size: Some(code.len() as u64),
                metadata_size: Some(0),
                sha256_hash: Some(sha),
                content_type: None,
                source_function_call_id: None,
            }),
            data: Some(code),
        }),
    };
    let mut req = tonic::Request::new(request);
    req.set_timeout(init_timeout);
    let init_started = Instant::now();
    let outcome = tokio::time::timeout(
        init_timeout + Duration::from_secs(1),
        client.initialize(req),
    )
    .await;
    let failure = match outcome {
        Err(_) => Some((
            Reason::StartupFailedFunctionTimeout,
            format!(
                "initialize took longer than {} ms",
                init_timeout.as_millis()
            ),
        )),
        // A worker may answer an expired deadline with CANCELLED.
        Ok(Err(s))
            if matches!(
                s.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) || init_started.elapsed() >= init_timeout =>
        {
            Some((
                Reason::StartupFailedFunctionTimeout,
                format!(
                    "initialize took longer than {} ms",
                    init_timeout.as_millis()
                ),
            ))
        }
        Ok(Err(s)) => Some((
            Reason::StartupFailedFunctionError,
            format!("initialize failed: {}: {}", s.code(), s.message()),
        )),
        Ok(Ok(r)) => {
            let r = r.into_inner();
            if r.outcome_code == Some(fe_pb::InitializationOutcomeCode::Success as i32) {
                None
            } else {
                Some((
                    Reason::StartupFailedFunctionError,
                    format!(
                        "initialize answered {:?} ({:?}); see {}",
                        r.outcome_code(),
                        r.failure_reason(),
                        process.log_path().display()
                    ),
                ))
            }
        }
    };
    if let Some(f) = failure {
        process.stop(Duration::ZERO).await;
        return Err(f);
    }
    Ok(Live {
        worker: process,
        client,
    })
}

/// What the driver starts for worker `id`: the worker program with the
/// reference's arguments, its GPUs, and limits from its admitted claim.
fn worker_spec(
    shared: &Shared,
    desc: &pb::FunctionExecutorDescription,
    id: &str,
    gpus: &[String],
) -> WorkerSpec {
    let config = &shared.config;
    let claim = crate::admission::effective(desc, &config.worker_defaults).claim;
    let mut args = vec![
        format!("--executor-id={}", config.executor_id),
        format!("--function-executor-id={id}"),
    ];
    args.extend(config.function_executor_args.iter().cloned());
    let mut env = Vec::new();
    if !gpus.is_empty() {
        let visible = gpus.join(",");
        env.push(("CUDA_VISIBLE_DEVICES".to_string(), visible.clone()));
        env.push(("NVIDIA_VISIBLE_DEVICES".to_string(), visible));
    }
    WorkerSpec {
        id: id.to_string(),
        program: config.function_executor_bin.clone(),
        args,
        // On top of what the driver's allowlist lets through: workers get
        // presigned URLs, never the agent's cloud credentials.
        env,
        log_path: config.data_dir.join("logs").join(format!("fe-{id}.log")),
        limits: crate::admission::limits(&claim, &config.worker_defaults),
    }
}
