//! systemd's `Type=notify` protocol (`sd_notify(3)`), spoken only when
//! systemd (or anyone) sets `NOTIFY_SOCKET`; without it nothing is sent.
//!
//! - `READY=1` once the startup probe would answer 200 (registered, and
//!   the first desired state applied).
//! - `WATCHDOG=1` from the reconcile loop itself, at each of its
//!   heartbeats, which are set to half of `WATCHDOG_USEC` when systemd's
//!   watchdog is on: a wedged loop stops the pings and systemd restarts
//!   Steward.
//! - `STATUS=` with the operator's mode and the counts of workers and
//!   running allocations, sent when it changes.
//! - `STOPPING=1` when a SIGTERM (or SIGINT) starts the shutdown.
//!
//! Must not know about: the agent beyond its [`AgentHandle`].

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use steward_reconciler::AgentHandle;

/// The notifier of a Steward that systemd started with `Type=notify`.
#[derive(Debug, Clone, Copy)]
pub struct Notifier {
    watchdog: Option<Duration>,
}

/// How often the state is looked at for READY=1, then for STATUS= changes.
const READY_POLL: Duration = Duration::from_millis(100);
const STATUS_POLL: Duration = Duration::from_secs(2);

impl Notifier {
    /// The notifier, when `NOTIFY_SOCKET` is set.
    pub fn from_env() -> Option<Notifier> {
        std::env::var_os("NOTIFY_SOCKET")?;
        let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
        Some(Notifier { watchdog })
    }

    /// With systemd's watchdog on: the reconcile loop's heartbeat (half of
    /// `WATCHDOG_USEC`) and what it calls at each beat (WATCHDOG=1).
    pub fn watchdog(&self) -> Option<(Duration, Arc<dyn Fn() + Send + Sync>)> {
        let every = self.watchdog? / 2;
        tracing::info!(
            every_ms = every.as_millis() as u64,
            "systemd watchdog on: the reconcile loop pings it"
        );
        let ping: Arc<dyn Fn() + Send + Sync> = Arc::new(|| {
            if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
                tracing::debug!(error = %e, "WATCHDOG=1 not sent");
            }
        });
        Some((every, ping))
    }

    /// Sends READY=1 once the agent is ready, then keeps STATUS= up to
    /// date; runs until aborted.
    pub async fn run(self, handle: AgentHandle) {
        let mut tick = tokio::time::interval(READY_POLL);
        while !handle.startup().0 {
            tick.tick().await;
        }
        let mut said = status(&handle);
        send(&[NotifyState::Ready, NotifyState::Status(&said)]);
        tracing::info!(status = %said, "told systemd READY=1");
        let mut tick = tokio::time::interval(STATUS_POLL);
        loop {
            tick.tick().await;
            let now = status(&handle);
            if now != said {
                send(&[NotifyState::Status(&now)]);
                said = now;
            }
        }
    }

    /// STOPPING=1: the shutdown has begun.
    pub fn stopping(&self) {
        send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: stopping workers and sending the final report"),
        ]);
    }
}

/// The mode and counts, as `STATUS=` says them.
fn status(handle: &AgentHandle) -> String {
    let m = handle.metrics();
    format!(
        "{}: workers {}, allocations running {}",
        handle.mode().as_str(),
        m.function_executors.get(),
        m.allocations_running.get()
    )
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}
