//! The vocabulary between the reconciler and the worker controllers: the
//! commands a controller takes, the lifecycle it publishes through a
//! `watch` ([`FeState`], whose [`FePhase`] only the controller writes),
//! and the registry entry the reconciler keeps per worker ([`FeSlot`]).
//! Knows neither the shared state nor how a controller works.
//!
//! A worker's phases and their transitions, all made by its controller:
//!
//! ```text
//! Pending ──spawned──▶ Starting ──initialized──▶ Running
//!    │                    │                         │
//!    ├────────────────────┴── startup failed ───────┼──▶ Terminated{reason, blamed, ..}
//!    │                                              ├─ exited, unhealthy, OOM, timeout,
//!    │                                              │  cancelled, evicted ─▶ Terminated
//!    └──── Shutdown (any phase but Terminated) ─────┴──▶ Stopping ─▶ (view closed)
//! ```
//!
//! A worker adopted from an earlier run starts at Starting (reconnecting)
//! and goes on to Running, or to Terminated if it is gone. Detach leaves a
//! Running worker alive and closes the view without Terminated.
//!
//! A closed view (the controller's sender dropped: it finished, or
//! panicked) means the worker is gone; the reconciler then forgets its slot.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use steward_worker_driver::{WorkerMonitor, WorkerUsage};
use tokio::sync::{mpsc, watch};

use crate::admission::Claim;
use crate::events::TimelineEntry;
use crate::pb;

pub(crate) type Reason = pb::FunctionExecutorTerminationReason;

/// What the reconciler (and the drain and eviction loops) tell a controller.
pub(crate) enum FeCommand {
    /// An allocation and when the desired state that brought it arrived.
    Run(Arc<pb::Allocation>, Instant),
    Cancel(String),
    /// Stop the worker and end; the text says why (its timeline).
    Shutdown(&'static str),
    /// Stop if idle (host memory pressure); the text says why.
    Evict(String),
    /// Let go of the worker alive, with its running allocations, for the
    /// next agent to adopt (a stop in adoption mode); a worker that cannot
    /// be adopted is stopped as by `Shutdown`.
    Detach,
    /// Panic (tests of what a panicked controller leaves behind).
    #[cfg(test)]
    Panic,
}

/// A worker process as its view shows it.
#[derive(Clone)]
pub(crate) struct Spawned {
    pub pid: u32,
    pub gpus: Vec<String>,
    pub monitor: Arc<dyn WorkerMonitor>,
}

/// How a worker ended.
#[derive(Clone, Debug)]
pub(crate) struct Termination {
    pub reason: Reason,
    /// In words: OOM with the limit, eviction, admission, startup error.
    pub message: Option<String>,
    /// The allocations the server should blame.
    pub blamed: Vec<String>,
    pub pid: Option<u32>,
    pub gpus: Vec<String>,
    /// Usage read just before the worker was stopped.
    pub usage: Option<WorkerUsage>,
}

/// Where a worker is in its life. Only its controller moves it.
#[derive(Clone)]
pub(crate) enum FePhase {
    /// Accepted; no process yet (GPUs, code, spawn).
    Pending,
    /// Spawned; connecting and initializing.
    Starting(Spawned),
    /// Initialized: takes allocations.
    Running(Spawned),
    /// Told to shut down; `was` is the status the server keeps hearing
    /// until the worker is gone.
    Stopping {
        was: pb::FunctionExecutorStatus,
        spawned: Option<Spawned>,
    },
    Terminated(Termination),
}

impl FePhase {
    /// The status the server hears.
    pub fn status(&self) -> pb::FunctionExecutorStatus {
        use pb::FunctionExecutorStatus as S;
        match self {
            FePhase::Pending | FePhase::Starting(_) => S::Pending,
            FePhase::Running(_) => S::Running,
            FePhase::Stopping { was, .. } => *was,
            FePhase::Terminated(_) => S::Terminated,
        }
    }

    /// The live process, if any.
    pub fn spawned(&self) -> Option<&Spawned> {
        match self {
            FePhase::Starting(s) | FePhase::Running(s) => Some(s),
            FePhase::Stopping { spawned, .. } => spawned.as_ref(),
            FePhase::Pending | FePhase::Terminated(_) => None,
        }
    }

    pub fn termination(&self) -> Option<&Termination> {
        match self {
            FePhase::Terminated(t) => Some(t),
            _ => None,
        }
    }
}

/// What a controller publishes about its worker.
#[derive(Clone)]
pub(crate) struct FeState {
    pub phase: FePhase,
    pub timeline: Vec<TimelineEntry>,
    /// When an allocation last finished on it (or it became ready):
    /// eviction takes the least recently used idle worker first.
    pub last_used: Instant,
}

impl FeState {
    pub fn new(what: &str) -> FeState {
        FeState {
            phase: FePhase::Pending,
            timeline: vec![TimelineEntry::now(what)],
            last_used: Instant::now(),
        }
    }
}

/// A worker with a controller, as the registry holds it.
#[derive(Clone)]
pub(crate) struct Controlled {
    pub description: Arc<pb::FunctionExecutorDescription>,
    /// `description`, encoded once for every report to copy.
    pub description_bytes: bytes::Bytes,
    /// What it holds while it lives (defaults applied); `None` when
    /// admission refused it.
    pub claim: Option<Claim>,
    /// Resources the description left unset, given the agent's defaults.
    pub defaulted: Vec<&'static str>,
    pub tx: mpsc::UnboundedSender<FeCommand>,
    pub view: watch::Receiver<FeState>,
}

impl Controlled {
    /// Its controller has ended (or panicked): the worker is gone.
    pub fn closed(&self) -> bool {
        self.view.has_changed().is_err()
    }

    /// Holds resources: admitted, not terminated, not gone.
    pub fn holds_resources(&self) -> bool {
        self.claim.is_some() && !self.closed() && self.view.borrow().phase.termination().is_none()
    }
}

/// A description refused before any controller: reported terminated so
/// the server stops waiting for it.
#[derive(Clone)]
pub(crate) struct Refused {
    pub description: Arc<pb::FunctionExecutorDescription>,
    pub description_bytes: bytes::Bytes,
    pub message: String,
    pub timeline: Vec<TimelineEntry>,
}

/// One worker id in the registry: what the reconciler decided about it.
#[derive(Clone)]
pub(crate) enum FeSlot {
    /// In the desired state; its controller runs it.
    Wanted(Controlled),
    /// Dropped from the desired state; its controller is shutting down.
    Removing(Controlled),
    /// Its description was rejected; there is no controller.
    Rejected(Refused),
}

impl FeSlot {
    pub fn controlled(&self) -> Option<&Controlled> {
        match self {
            FeSlot::Wanted(c) | FeSlot::Removing(c) => Some(c),
            FeSlot::Rejected(_) => None,
        }
    }

    pub fn description(&self) -> &Arc<pb::FunctionExecutorDescription> {
        match self {
            FeSlot::Wanted(c) | FeSlot::Removing(c) => &c.description,
            FeSlot::Rejected(r) => &r.description,
        }
    }

    pub fn description_bytes(&self) -> &bytes::Bytes {
        match self {
            FeSlot::Wanted(c) | FeSlot::Removing(c) => &c.description_bytes,
            FeSlot::Rejected(r) => &r.description_bytes,
        }
    }

    /// Its controller has ended: the slot is forgotten at the next pass
    /// and readers skip it meanwhile.
    pub fn gone(&self) -> bool {
        self.controlled().is_some_and(Controlled::closed)
    }

    /// The reported status, termination reason and blamed allocations.
    pub fn reported(&self) -> (pb::FunctionExecutorStatus, Option<Reason>, Vec<String>) {
        match self {
            FeSlot::Wanted(c) | FeSlot::Removing(c) => {
                let v = c.view.borrow();
                let t = v.phase.termination();
                (
                    v.phase.status(),
                    t.map(|t| t.reason),
                    t.map(|t| t.blamed.clone()).unwrap_or_default(),
                )
            }
            FeSlot::Rejected(_) => (
                pb::FunctionExecutorStatus::Terminated,
                Some(Reason::StartupFailedInternalError),
                Vec::new(),
            ),
        }
    }
}

/// The registry: worker id to slot. The reconciler alone writes it and
/// publishes each new version whole.
pub(crate) type FeMap = BTreeMap<String, FeSlot>;

/// What admitted, not-terminated workers hold together.
pub(crate) fn admitted(fes: &FeMap) -> Claim {
    fes.values()
        .filter_map(FeSlot::controlled)
        .filter(|c| c.holds_resources())
        .filter_map(|c| c.claim)
        .fold(Claim::default(), Claim::plus)
}

/// Registry entries without a controller, for tests and the synthetic
/// benchmark state: the caller holds the command receiver and the view's
/// sender and plays the controller.
#[cfg(any(test, feature = "testing"))]
pub(crate) mod testing {
    use super::*;

    /// A monitor that reads nothing.
    struct NoMonitor;

    impl WorkerMonitor for NoMonitor {
        fn usage(&self) -> Option<WorkerUsage> {
            None
        }
        fn limits(&self) -> Option<steward_worker_driver::Limits> {
            None
        }
    }

    pub(crate) fn spawned(monitor: Option<Arc<dyn WorkerMonitor>>) -> Spawned {
        Spawned {
            pid: 1,
            gpus: Vec::new(),
            monitor: monitor.unwrap_or_else(|| Arc::new(NoMonitor)),
        }
    }

    pub(crate) fn running() -> FePhase {
        FePhase::Running(spawned(None))
    }

    #[cfg(test)]
    pub(crate) fn terminated() -> FePhase {
        FePhase::Terminated(Termination {
            reason: Reason::Unhealthy,
            message: None,
            blamed: Vec::new(),
            pid: Some(1),
            gpus: Vec::new(),
            usage: None,
        })
    }

    /// A worker in `phase` with a default description and no claim.
    #[cfg(test)]
    pub(crate) fn controlled(
        phase: FePhase,
    ) -> (
        Controlled,
        mpsc::UnboundedReceiver<FeCommand>,
        watch::Sender<FeState>,
    ) {
        described(Arc::default(), phase)
    }

    /// A worker for `description` in `phase`.
    pub(crate) fn described(
        description: Arc<pb::FunctionExecutorDescription>,
        phase: FePhase,
    ) -> (
        Controlled,
        mpsc::UnboundedReceiver<FeCommand>,
        watch::Sender<FeState>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = FeState::new("test");
        state.phase = phase;
        let (view_tx, view) = watch::channel(state);
        let c = Controlled {
            description_bytes: prost::Message::encode_to_vec(&*description).into(),
            description,
            claim: None,
            defaulted: Vec::new(),
            tx,
            view,
        };
        (c, rx, view_tx)
    }
}
