//! The states an operator puts the host in: *active* (normal), *paused*
//! (running allocations finish; no new worker starts and no new allocation
//! is accepted; reported DRAINED so the server places nothing here),
//! *draining* (paused, and once the last allocation finishes every worker
//! is stopped) and *disabled* (nothing runs; still reporting). `unpause`
//! returns to active from any of them. The types only: how a change is
//! applied and how a drain runs is `operator.rs`.

use serde::Serialize;

use crate::pb;

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
    pub(crate) fn target(self, from: HostMode) -> HostMode {
        match (self, from) {
            (ModeCommand::Unpause, _) => HostMode::Active,
            (ModeCommand::Pause, HostMode::Disabled) => HostMode::Disabled,
            (ModeCommand::Pause, _) => HostMode::Paused,
            (ModeCommand::Drain, HostMode::Disabled) => HostMode::Disabled,
            (ModeCommand::Drain, _) => HostMode::Draining,
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
