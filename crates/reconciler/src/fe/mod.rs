//! One controller task per function executor: start the worker (GPUs, code,
//! spawn, connect, `get_info`, `initialize`), run its allocations with at
//! most `max_concurrency` at once, health-check it, notice at once when the
//! process exits, and terminate it with the right reason and blamed
//! allocations. The controller is the only owner of its worker process and
//! the only writer of its lifecycle ([`crate::lifecycle::FePhase`]), which
//! it publishes through a `watch`; the reconciler only sends it commands.

mod adopt;
mod allocation;
mod calls;
mod conn;
mod controller;
mod plan;
mod python;
mod request_state;
mod startup;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::Instrument;

pub(crate) use allocation::failed_result;
use controller::Controller;

use crate::lifecycle::{FeCommand, FeState};
use crate::log_ids::{About, worker_span};
use crate::pb;
use crate::state::{AllocPhase, Shared};

/// A started worker and its connection.
struct Live {
    worker: Box<dyn steward_worker_driver::Worker>,
    client: conn::WorkerClient,
}

/// Learns the workers' Python version before any worker runs (so the first
/// reports already carry it); a worker's `get_info` confirms it later.
pub(crate) async fn probe_python(shared: Arc<Shared>) {
    let Some(v) = python::probe_python_version(&shared.config.function_executor_bin).await else {
        return;
    };
    let set = shared.python_version.send_if_modified(|known| {
        let unknown = known.is_none();
        if unknown {
            *known = Some(v);
        }
        unknown
    });
    if set {
        shared.report_now.notify_one();
    }
}

/// Starts a controller for `desc`; returns its command channel and the
/// view it publishes. `refusal`: why admission refused it (its startup
/// then fails with that).
pub(crate) fn spawn(
    shared: Arc<Shared>,
    desc: Arc<pb::FunctionExecutorDescription>,
    refusal: Option<String>,
) -> (mpsc::UnboundedSender<FeCommand>, watch::Receiver<FeState>) {
    let (view, view_rx) = watch::channel(FeState::new("pending: accepted from desired state"));
    let id = desc.id.clone().unwrap_or_default();
    let controller = Controller::new(shared.clone(), desc, refusal, view.clone());
    (launch(shared, id, view, |rx| controller.run(rx)), view_rx)
}

/// Starts the controller of a worker an earlier run left: `worker` is
/// the driver's adoption of it (or why it failed), `record` the agent's
/// record of it.
pub(crate) fn spawn_adopted(
    shared: Arc<Shared>,
    desc: Arc<pb::FunctionExecutorDescription>,
    worker: Result<Box<dyn steward_worker_driver::Worker>, String>,
    record: crate::adoption::WorkerRecord,
) -> (mpsc::UnboundedSender<FeCommand>, watch::Receiver<FeState>) {
    let (view, view_rx) = watch::channel(FeState::new("pending: left by an earlier run"));
    let id = desc.id.clone().unwrap_or_default();
    let controller = Controller::new(shared.clone(), desc, None, view.clone());
    (
        launch(shared, id, view, |rx| {
            controller.run_adopted(rx, worker, record)
        }),
        view_rx,
    )
}

/// Runs a controller in its own task, in its worker's span, and a task
/// that accounts for it if it panics; returns its command channel.
fn launch<F: std::future::Future<Output = ()> + Send + 'static>(
    shared: Arc<Shared>,
    id: String,
    view: watch::Sender<FeState>,
    run: impl FnOnce(mpsc::UnboundedReceiver<FeCommand>) -> F,
) -> mpsc::UnboundedSender<FeCommand> {
    let (tx, rx) = mpsc::unbounded_channel();
    // Held until the controller's end is accounted for: the view closes
    // (and the id may be started again) only after a panicked controller's
    // allocations have their results and its GPUs are back.
    let open = view;
    let controller = tokio::spawn(run(rx).instrument(worker_span(&id)));
    // A controller that panics must not take its allocations with it.
    tokio::spawn(async move {
        if let Err(e) = controller.await
            && e.is_panic()
        {
            controller_panicked(&shared, &id);
        }
        drop(open);
        shared.report_now.notify_one();
        shared.reconcile_now.notify_one();
    });
    tx
}

/// Accounts for a controller that panicked: its worker is gone (the
/// process died with the controller's handle, which kills on drop; its
/// view closed, so the reconciler forgets it) and every allocation it had
/// not finished gets a failed result, marked finished under the same lock
/// that finds it so no other path fails it again.
fn controller_panicked(shared: &Arc<Shared>, fe_id: &str) {
    shared.event_about(
        "function_executor_controller_panicked",
        About::Worker(fe_id),
        "the controller of this worker panicked; its worker is gone and its allocations failed",
    );
    let orphans: Vec<pb::Allocation> = {
        let mut st = shared.state.lock();
        let ids: Vec<String> = st
            .allocations
            .iter()
            .filter(|(_, a)| a.fe_id == fe_id && a.phase != AllocPhase::Finished)
            .map(|(id, _)| id.clone())
            .collect();
        let orphans = shared
            .last_desired
            .borrow()
            .iter()
            .flat_map(|(d, _)| d.allocations.iter())
            .filter(|a| {
                ids.iter()
                    .any(|id| Some(id.as_str()) == a.allocation_id.as_deref())
            })
            .map(|a| (**a).clone())
            .collect();
        for id in &ids {
            st.note_allocation(
                id,
                Some(AllocPhase::Finished),
                "worker controller panicked".into(),
            );
        }
        orphans
    };
    for a in orphans {
        shared.push_result(failed_result(
            &a,
            pb::AllocationFailureReason::FunctionExecutorTerminated,
            None,
        ));
    }
    shared.config.gpu_pool.release(fe_id);
}

/// Asks every controller to stop (or, when detaching, to let go of its
/// worker alive) and waits until all are gone (their views closed), at
/// most the stop grace and 15 s more; returns how many workers were left
/// running.
pub(crate) async fn shutdown_all(shared: &Arc<Shared>) -> usize {
    let workers = shared.workers();
    let mut views = Vec::new();
    for slot in workers.values() {
        if let Some(c) = slot.controlled() {
            // In adoption mode, workers are let go of alive.
            let cmd = if shared.detaching.load(std::sync::atomic::Ordering::Acquire) {
                FeCommand::Detach
            } else {
                FeCommand::Shutdown("agent shutting down")
            };
            let _ = c.tx.send(cmd);
            views.push(c.view.clone());
        }
    }
    // Refused descriptions have nothing to stop: the final report omits them.
    let controlled = workers
        .iter()
        .filter(|(_, slot)| slot.controlled().is_some())
        .map(|(id, slot)| (id.clone(), slot.clone()))
        .collect();
    shared.workers.send_replace(Arc::new(controlled));
    let grace = shared.config.function_executor_stop_grace + Duration::from_secs(15);
    let all_gone = async {
        for mut view in views {
            while view.changed().await.is_ok() {}
        }
    };
    if tokio::time::timeout(grace, all_gone).await.is_err() {
        tracing::warn!("some function executors did not stop in time");
    }
    let left = shared
        .workers()
        .iter()
        .filter(|(_, slot)| !slot.gone())
        .map(|(id, slot)| (id.clone(), slot.clone()))
        .collect();
    shared.workers.send_replace(Arc::new(left));
    shared
        .detached_workers
        .load(std::sync::atomic::Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::AllocEntry;

    /// A controller that panics: its unfinished allocations get one failed
    /// result each before its view closes (so before its id can be
    /// started again), and an allocation the reconciler then cannot send
    /// it is not failed a second time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicked_controller_fails_its_allocations_once_before_its_view_closes() {
        let shared = crate::testing_support::shared();
        let desc = Arc::new(pb::FunctionExecutorDescription {
            id: Some("fe".into()),
            ..Default::default()
        });
        let allocation = Arc::new(pb::Allocation {
            allocation_id: Some("a1".into()),
            function_executor_id: Some("fe".into()),
            ..Default::default()
        });
        let desired = crate::desired::Desired {
            function_executors: vec![desc.clone()],
            allocations: vec![allocation.clone()],
            clock: Some(1),
            function_call_results: Vec::new(),
        };
        shared
            .last_desired
            .send_replace(Some((Arc::new(desired), std::time::SystemTime::now())));
        shared.state.lock().allocations.insert(
            "a1".into(),
            AllocEntry {
                fe_id: "fe".into(),
                function: "ns/app/f".into(),
                phase: AllocPhase::Queued,
                timeline: Vec::new(),
            },
        );
        // Refused at admission: its startup fails at once, no process.
        let (tx, view) = spawn(shared.clone(), desc, Some("a test refuses it".into()));
        assert!(tx.send(FeCommand::Panic).is_ok());
        // Watched without yielding, from the moment it closes.
        tokio::task::block_in_place(|| {
            while view.has_changed().is_ok() {
                std::hint::spin_loop();
            }
        });
        let results: Vec<String> = {
            let st = shared.state.lock();
            st.results
                .iter()
                .filter_map(|p| p.result.allocation_id.clone())
                .collect()
        };
        assert_eq!(results, ["a1"], "failed once, before the view closed");
        // The reconciler, finding the controller gone, fails nothing twice.
        let r = crate::reconcile::Reconciler::new(shared.clone());
        let registry = crate::lifecycle::FeMap::new();
        r.send_for_test(vec![("fe".into(), allocation)], &registry);
        assert_eq!(shared.state.lock().results.len(), 1);
        assert!(
            shared
                .events
                .recent()
                .iter()
                .any(|e| e.kind == "function_executor_controller_panicked")
        );
    }
}
