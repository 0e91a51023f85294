//! The operator's commands at work: a mode change (an event, the
//! metric, a report at once) and the drain loop, which stops every worker
//! once no allocation is queued or running, then disables the host.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::lifecycle::{FeCommand, FePhase, FeSlot};
use crate::mode::{HostMode, ModeCommand};
use crate::state::Shared;

/// Applies an operator's command; returns (from, to).
pub(crate) fn command(shared: &Shared, cmd: ModeCommand) -> (HostMode, HostMode) {
    let from = *shared.mode.borrow();
    let to = cmd.target(from);
    set(shared, to, "operator");
    (from, to)
}

/// Moves the host to `to` (an event, the metric, a report at once).
pub(crate) fn set(shared: &Shared, to: HostMode, by: &str) {
    let from = shared.mode.send_replace(to);
    observe(shared, to);
    if from != to {
        shared.event(
            "host_mode",
            &shared.config.executor_id,
            format!("{} → {} ({by})", from.as_str(), to.as_str()),
        );
        shared.report_now.notify_one();
        shared.reconcile_now.notify_one();
    }
}

/// Sets the one-hot `steward_host_mode{mode}` gauge.
pub(crate) fn observe(shared: &Shared, now: HostMode) {
    for m in HostMode::ALL {
        shared
            .metrics
            .host_mode
            .get_or_create(&vec![("mode", m.as_str())])
            .set(i64::from(m == now));
    }
}

/// One step of a drain: once no allocation is queued or running, every
/// worker is asked to stop; once none is left, the host is disabled.
pub(crate) fn drain_step(shared: &Shared) {
    if *shared.mode.borrow() != HostMode::Draining {
        return;
    }
    let _pass = shared.passes.lock();
    let busy = shared.state.lock().any_busy();
    if busy {
        return;
    }
    let mut live = false;
    for slot in shared.workers().values().filter(|s| !s.gone()) {
        // Refused, rejected or terminated workers have no process: they
        // stay (reported) until the server drops them.
        let Some(c) = slot.controlled() else {
            continue;
        };
        let (terminated, stopping) = {
            let v = c.view.borrow();
            let stopping = matches!(v.phase, FePhase::Stopping { .. });
            (v.phase.termination().is_some(), stopping)
        };
        if terminated {
            continue;
        }
        live = true;
        if matches!(slot, FeSlot::Wanted(_)) && !stopping {
            let _ = c.tx.send(FeCommand::Shutdown(
                "draining: the operator drains the host",
            ));
        }
    }
    if !live {
        set(shared, HostMode::Disabled, "drain finished");
    }
}

/// Drives drains to their end.
pub(crate) async fn run_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => drain_step(&shared),
        }
    }
}
