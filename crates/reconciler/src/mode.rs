//! The states an operator puts the host in: *active* (normal), *paused*
//! (running allocations finish; no new worker starts and no new allocation
//! is accepted; reported DRAINED so the server places nothing here),
//! *draining* (paused, and once the last allocation finishes every worker
//! is stopped) and *disabled* (nothing runs; still reporting). `unpause`
//! returns to active from any of them.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::{FeCommand, FePhase, FeSlot};
use crate::pb;
use crate::state::Shared;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HostMode {
    #[default]
    Active,
    Paused,
    Draining,
    Disabled,
}

impl HostMode {
    pub const ALL: [HostMode; 4] = [
        HostMode::Active,
        HostMode::Paused,
        HostMode::Draining,
        HostMode::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HostMode::Active => "active",
            HostMode::Paused => "paused",
            HostMode::Draining => "draining",
            HostMode::Disabled => "disabled",
        }
    }

    /// What the server is told: DRAINED unless active.
    pub fn executor_status(self) -> pb::ExecutorStatus {
        match self {
            HostMode::Active => pb::ExecutorStatus::Running,
            _ => pb::ExecutorStatus::Drained,
        }
    }
}

/// What an operator asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeCommand {
    Pause,
    Unpause,
    Drain,
}

impl ModeCommand {
    pub fn parse(s: &str) -> Option<ModeCommand> {
        match s {
            "pause" => Some(ModeCommand::Pause),
            "unpause" | "resume" => Some(ModeCommand::Unpause),
            "drain" => Some(ModeCommand::Drain),
            _ => None,
        }
    }

    /// The mode the command leads to from `from`.
    fn target(self, from: HostMode) -> HostMode {
        match (self, from) {
            (ModeCommand::Unpause, _) => HostMode::Active,
            (ModeCommand::Pause, HostMode::Disabled) => HostMode::Disabled,
            (ModeCommand::Pause, _) => HostMode::Paused,
            (ModeCommand::Drain, HostMode::Disabled) => HostMode::Disabled,
            (ModeCommand::Drain, _) => HostMode::Draining,
        }
    }
}

/// Applies an operator's command; returns (from, to).
pub(crate) fn command(shared: &Shared, cmd: ModeCommand) -> (HostMode, HostMode) {
    let from = shared.state.lock().mode;
    let to = cmd.target(from);
    set(shared, to, "operator");
    (from, to)
}

/// Moves the host to `to` (an event, the metric, a report at once).
pub(crate) fn set(shared: &Shared, to: HostMode, by: &str) {
    let from = {
        let mut st = shared.state.lock();
        let from = st.mode;
        st.mode = to;
        if st.status != pb::ExecutorStatus::Stopped {
            st.status = to.executor_status();
        }
        from
    };
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
    let busy = {
        let st = shared.state.lock();
        if st.mode != HostMode::Draining {
            return;
        }
        st.any_busy()
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        use HostMode::*;
        use ModeCommand::*;
        for from in HostMode::ALL {
            assert_eq!(Unpause.target(from), Active);
        }
        assert_eq!(Pause.target(Active), Paused);
        assert_eq!(Pause.target(Draining), Paused);
        assert_eq!(Drain.target(Active), Draining);
        assert_eq!(Drain.target(Paused), Draining);
        assert_eq!(Drain.target(Disabled), Disabled);
        assert_eq!(Pause.target(Disabled), Disabled);
        assert_eq!(Active.executor_status(), pb::ExecutorStatus::Running);
        assert_eq!(Paused.executor_status(), pb::ExecutorStatus::Drained);
        assert_eq!(ModeCommand::parse("resume"), Some(Unpause));
        assert_eq!(ModeCommand::parse("explode"), None);
    }
}
