//! Pressure eviction at work: while the host's memory is short (see
//! `pressure.rs` for when), the least recently used idle worker is asked
//! to stop, one at a time; with nothing idle, an event says so.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::lifecycle::{FeCommand, FeMap, FePhase, FeSlot};
use crate::pressure::{Eviction, MemorySource};
use crate::state::{Shared, State};

/// The idle workers that may be evicted, least recently used first.
pub(crate) fn candidates(workers: &FeMap, st: &State) -> Vec<String> {
    let mut idle: Vec<(Instant, &String)> = workers
        .iter()
        .filter_map(|(id, slot)| match slot {
            FeSlot::Wanted(c) if !c.closed() => {
                let v = c.view.borrow();
                matches!(v.phase, FePhase::Running(_)).then_some((v.last_used, id))
            }
            _ => None,
        })
        .filter(|(_, id)| !st.busy(id))
        .collect();
    idle.sort();
    idle.into_iter().map(|(_, id)| id.clone()).collect()
}

/// What one look at the host's memory did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Calm,
    /// This worker was asked to go.
    Evicting(String),
    /// Pressure, but no worker is idle (said as an event).
    NothingIdle,
}

/// One look at the host's memory: asks the least recently used idle worker
/// to go if there is pressure. `say_idle` makes a pressure with nothing to
/// evict an event (the loop says it at most every 30 s).
pub(crate) fn step(shared: &Shared, source: &dyn MemorySource, say_idle: bool) -> Step {
    let thresholds = {
        let settings = shared.settings.borrow();
        Eviction {
            source: None,
            memory_available_bytes: settings.eviction_memory_available,
            psi_some_avg10: settings.eviction_memory_pressure,
            interval: shared.config.eviction.interval,
        }
    };
    let Some(why) = source.sample().and_then(|s| thresholds.pressure(&s)) else {
        return Step::Calm;
    };
    let workers = shared.workers();
    let idle = candidates(&workers, &shared.state.lock());
    let victim = idle
        .into_iter()
        .find_map(|id| Some((workers.get(&id)?.controlled()?.tx.clone(), id)));
    match victim {
        Some((tx, id)) if tx.send(FeCommand::Evict(why.clone())).is_ok() => Step::Evicting(id),
        _ => {
            if say_idle {
                shared.event(
                    "memory_pressure",
                    &shared.config.executor_id,
                    format!("{why}; no idle worker to evict"),
                );
            }
            Step::NothingIdle
        }
    }
}

pub(crate) async fn run_loop(
    shared: Arc<Shared>,
    source: Arc<dyn MemorySource>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(shared.config.eviction.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One eviction at a time: the next waits until this one's worker is gone.
    let mut in_flight: Option<(String, Instant)> = None;
    let mut said_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some((id, since)) = &in_flight {
            let gone = shared.workers().get(id).is_none_or(|slot| {
                slot.gone()
                    || slot
                        .controlled()
                        .is_none_or(|c| c.view.borrow().phase.termination().is_some())
            });
            if !gone && since.elapsed() < Duration::from_secs(30) {
                continue;
            }
            in_flight = None;
        }
        let say_idle = said_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(30));
        match step(&shared, source.as_ref(), say_idle) {
            Step::Evicting(id) => in_flight = Some((id, Instant::now())),
            Step::NothingIdle if say_idle => said_at = Some(Instant::now()),
            Step::NothingIdle | Step::Calm => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pressure::MemorySample;
    use crate::state::{AllocEntry, AllocPhase};
    use parking_lot::Mutex;

    struct FakeMemory(Mutex<MemorySample>);
    impl MemorySource for FakeMemory {
        fn sample(&self) -> Option<MemorySample> {
            Some(*self.0.lock())
        }
    }

    fn shared() -> Arc<Shared> {
        crate::testing_support::shared()
    }

    #[tokio::test]
    async fn evicts_idle_workers_least_recently_used_first() {
        let shared = shared();
        let base = Instant::now();
        let mut rxs = std::collections::HashMap::new();
        let mut views = std::collections::HashMap::new();
        {
            let mut st = shared.state.lock();
            // "busy" was used longest ago but runs an allocation; "starting"
            // is not running yet; "old" and "new" are idle.
            let mut fes = FeMap::new();
            for (id, age_s, running) in [
                ("busy", 300, true),
                ("new", 10, true),
                ("old", 200, true),
                ("starting", 400, false),
            ] {
                let phase = match running {
                    true => crate::lifecycle::testing::running(),
                    false => FePhase::Pending,
                };
                let (c, rx, view) = crate::lifecycle::testing::controlled(phase);
                view.send_modify(|s| s.last_used = base - Duration::from_secs(age_s));
                rxs.insert(id, rx);
                views.insert(id, view);
                fes.insert(id.into(), FeSlot::Wanted(c));
            }
            shared.workers.send_replace(Arc::new(fes));
            st.allocations.insert(
                "a1".into(),
                AllocEntry {
                    fe_id: "busy".into(),
                    function: "f".into(),
                    phase: AllocPhase::Running,
                    timeline: Vec::new(),
                },
            );
        }
        let memory = FakeMemory(Mutex::new(MemorySample {
            available_bytes: 8 << 30,
            psi_some_avg10: None,
        }));
        assert_eq!(
            step(&shared, &memory, true),
            Step::Calm,
            "no pressure, no eviction"
        );
        memory.0.lock().available_bytes = 10 << 20;
        assert_eq!(step(&shared, &memory, true), Step::Evicting("old".into()));
        match rxs.get_mut("old").and_then(|r| r.try_recv().ok()) {
            Some(FeCommand::Evict(why)) => assert!(why.contains("10485760"), "{why}"),
            _ => panic!("old was not asked to go"),
        }
        // Once "old" is terminated, "new" is next; "busy" never while it runs.
        views["old"].send_modify(|s| s.phase = crate::lifecycle::testing::terminated());
        assert_eq!(step(&shared, &memory, true), Step::Evicting("new".into()));
        views["new"].send_modify(|s| s.phase = crate::lifecycle::testing::terminated());
        assert_eq!(step(&shared, &memory, true), Step::NothingIdle);
        let events = shared.events.recent();
        assert!(
            events
                .iter()
                .any(|e| e.kind == "memory_pressure" && e.message.contains("no idle worker")),
            "{events:?}"
        );
        assert!(rxs.get_mut("busy").is_some_and(|r| r.try_recv().is_err()));
        assert!(
            rxs.get_mut("starting")
                .is_some_and(|r| r.try_recv().is_err())
        );
    }
}
