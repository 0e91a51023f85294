//! Turning a worker's sampled usage into usage per allocation and per idle
//! stretch of the worker.
//!
//! The rule for concurrent allocations: between two samples of a worker,
//! the CPU time it used, the integral of its memory and its GPU time are
//! split equally among the allocations running on it for the whole
//! interval; a worker with none running puts them on its idle segment.
//! Each allocation's wall time is its own. An allocation that starts or
//! ends between samples joins or leaves at the next sample (the sampler
//! samples at each start and end, so the error is one interval at most).

use std::collections::{BTreeMap, HashMap};

/// One reading of a worker's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub at_ms: u64,
    /// Cumulative CPU time of the worker, µs.
    pub cpu_usec: u64,
    pub memory_bytes: u64,
}

/// Usage accumulated for one allocation or idle segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accrued {
    pub started_ms: u64,
    pub cpu_core_us: u64,
    /// Memory integral in MB·ms (MB = 10^6 bytes).
    pub memory_mb_ms: u64,
    pub peak_memory_bytes: u64,
    /// GPU time by model, ms.
    pub gpu_ms: BTreeMap<String, u64>,
    /// For an idle segment: the time with no allocation running, ms.
    pub idle_ms: u64,
    /// Allocated GPU time × the GPUs' utilisation (NVML or `nvidia-smi`),
    /// by model, ms: what the GPUs were busy for. Absent while utilisation
    /// is unknown.
    pub gpu_busy_ms: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct WorkerMeter {
    gpu_models: Vec<String>,
    /// Mean utilisation of the worker's GPUs, percent, when known.
    gpu_utilization: Option<u32>,
    last: Option<Sample>,
    running: BTreeMap<String, Accrued>,
    idle: Accrued,
}

/// At most this many allocations of stopped workers wait for their ends.
const MAX_ORPHANS: usize = 4096;

/// The usage of every live worker and its allocations.
#[derive(Debug, Default)]
pub struct Meter {
    workers: HashMap<String, WorkerMeter>,
    /// Allocations still running when their worker stopped: what they used
    /// until then, for their end (reported after the worker is gone).
    orphans: HashMap<String, Accrued>,
    orphan_order: std::collections::VecDeque<String>,
    /// Allocations running on live workers.
    running: usize,
}

fn share(total: u128, parts: u128) -> u64 {
    u64::try_from(total / parts.max(1)).unwrap_or(u64::MAX)
}

impl WorkerMeter {
    fn apply(&mut self, s: Sample) {
        // A reading older than the last one (posted late by another thread)
        // would count its interval twice: it is ignored.
        let Some(prev) = self.last.filter(|p| p.at_ms <= s.at_ms) else {
            if self.last.is_none() {
                self.last = Some(s);
            }
            return;
        };
        self.last = Some(s);
        let dt = u128::from(s.at_ms.saturating_sub(prev.at_ms));
        let dcpu = u128::from(s.cpu_usec.saturating_sub(prev.cpu_usec));
        // Trapezoid: the mean of the two readings over the interval.
        let mem_mb_ms =
            (u128::from(prev.memory_bytes) + u128::from(s.memory_bytes)) * dt / 2 / 1_000_000;
        let k = self.running.len() as u128;
        let models = self.gpu_models.clone();
        let busy = self
            .gpu_utilization
            .map(|u| dt * u128::from(u.min(100)) / 100);
        let give = |a: &mut Accrued, parts: u128| {
            a.cpu_core_us = a.cpu_core_us.saturating_add(share(dcpu, parts));
            a.memory_mb_ms = a.memory_mb_ms.saturating_add(share(mem_mb_ms, parts));
            a.peak_memory_bytes = a.peak_memory_bytes.max(s.memory_bytes);
            for m in &models {
                let e = a.gpu_ms.entry(m.clone()).or_default();
                *e = e.saturating_add(share(dt, parts));
                if let Some(b) = busy {
                    let e = a.gpu_busy_ms.entry(m.clone()).or_default();
                    *e = e.saturating_add(share(b, parts));
                }
            }
        };
        if k == 0 {
            give(&mut self.idle, 1);
            self.idle.idle_ms = self
                .idle
                .idle_ms
                .saturating_add(u64::try_from(dt).unwrap_or(u64::MAX));
        } else {
            for a in self.running.values_mut() {
                give(a, k);
            }
        }
    }
}

impl Meter {
    /// A worker started at `first` (its first reading), holding GPUs of these models.
    pub fn worker_started(&mut self, fe_id: &str, gpu_models: Vec<String>, first: Sample) {
        let old = self.workers.insert(
            fe_id.to_string(),
            WorkerMeter {
                gpu_models,
                gpu_utilization: None,
                last: Some(first),
                running: BTreeMap::new(),
                idle: Accrued {
                    started_ms: first.at_ms,
                    ..Accrued::default()
                },
            },
        );
        if let Some(old) = old {
            self.running = self.running.saturating_sub(old.running.len());
        }
    }

    /// A reading of the worker: the interval since the last is shared out.
    pub fn sample(&mut self, fe_id: &str, s: Sample) {
        if let Some(w) = self.workers.get_mut(fe_id) {
            w.apply(s);
        }
    }

    /// An allocation starts on the worker (after the reading `at`).
    pub fn allocation_started(&mut self, fe_id: &str, alloc_id: &str, at: Sample) {
        let Some(w) = self.workers.get_mut(fe_id) else {
            return;
        };
        w.apply(at);
        let again = w.running.insert(
            alloc_id.to_string(),
            Accrued {
                started_ms: at.at_ms,
                ..Accrued::default()
            },
        );
        if again.is_none() {
            self.running += 1;
        }
    }

    /// An allocation ended (at the reading `at`, if its worker could still
    /// be read): what it used.
    pub fn allocation_finished(
        &mut self,
        fe_id: &str,
        alloc_id: &str,
        at: Option<Sample>,
    ) -> Option<Accrued> {
        if let Some(a) = self.orphans.remove(alloc_id) {
            self.orphan_order.retain(|o| o != alloc_id);
            return Some(a);
        }
        // The worker named, or (a result that lost track of its worker)
        // whichever runs it: an allocation never stays running forever.
        let fe = if self.workers.contains_key(fe_id) {
            fe_id.to_string()
        } else {
            self.workers
                .iter()
                .find(|(_, w)| w.running.contains_key(alloc_id))
                .map(|(id, _)| id.clone())?
        };
        let w = self.workers.get_mut(&fe)?;
        if let Some(at) = at.filter(|_| fe == fe_id) {
            w.apply(at);
        }
        let used = w.running.remove(alloc_id);
        if used.is_some() {
            self.running = self.running.saturating_sub(1);
        }
        used
    }

    /// How many allocations run on live workers.
    pub fn running(&self) -> usize {
        self.running
    }

    /// The utilisation of the worker's GPUs from now on (percent; `None`:
    /// unknown).
    pub fn set_gpu_utilization(&mut self, fe_id: &str, percent: Option<u32>) {
        if let Some(w) = self.workers.get_mut(fe_id) {
            w.gpu_utilization = percent;
        }
    }

    /// Whether the worker is metered.
    pub fn knows(&self, fe_id: &str) -> bool {
        self.workers.contains_key(fe_id)
    }

    /// Closes the worker's idle segment at the reading `at` and opens the
    /// next one: the closed one, for a record (long-lived workers are
    /// recorded in pieces, so a crash loses at most one piece).
    pub fn cut_idle(&mut self, fe_id: &str, at: Sample) -> Option<Accrued> {
        let w = self.workers.get_mut(fe_id)?;
        w.apply(at);
        let next = Accrued {
            started_ms: at.at_ms,
            ..Accrued::default()
        };
        Some(std::mem::replace(&mut w.idle, next))
    }

    /// When the worker's open idle segment started.
    pub fn idle_since(&self, fe_id: &str) -> Option<u64> {
        Some(self.workers.get(fe_id)?.idle.started_ms)
    }

    /// The worker ended: its idle segment. Allocations still running keep
    /// what they used so far until their ends are reported.
    pub fn worker_stopped(&mut self, fe_id: &str, last: Option<Sample>) -> Option<Accrued> {
        let mut w = self.workers.remove(fe_id)?;
        if let Some(s) = last {
            w.apply(s);
        }
        self.running = self.running.saturating_sub(w.running.len());
        for (id, a) in std::mem::take(&mut w.running) {
            if self.orphan_order.len() >= MAX_ORPHANS
                && let Some(old) = self.orphan_order.pop_front()
            {
                self.orphans.remove(&old);
            }
            self.orphan_order.push_back(id.clone());
            self.orphans.insert(id, a);
        }
        Some(w.idle)
    }

    /// The workers metered now.
    pub fn workers(&self) -> impl Iterator<Item = &str> {
        self.workers.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at_ms: u64, cpu_usec: u64, memory_bytes: u64) -> Sample {
        Sample {
            at_ms,
            cpu_usec,
            memory_bytes,
        }
    }

    #[test]
    fn running_counts_allocations_on_live_workers() {
        let mut m = Meter::default();
        m.worker_started("w", Vec::new(), s(0, 0, 0));
        m.worker_started("v", Vec::new(), s(0, 0, 0));
        m.allocation_started("w", "a", s(1, 0, 0));
        m.allocation_started("w", "a", s(2, 0, 0));
        m.allocation_started("w", "b", s(2, 0, 0));
        m.allocation_started("v", "c", s(2, 0, 0));
        m.allocation_started("gone", "d", s(2, 0, 0));
        assert_eq!(
            m.running(),
            3,
            "a started twice counts once; no worker, no count"
        );
        m.allocation_finished("w", "a", None);
        m.allocation_finished("w", "a", None);
        assert_eq!(m.running(), 2);
        // b is an orphan now: it no longer runs anywhere.
        m.worker_stopped("w", None);
        assert_eq!(m.running(), 1);
        m.allocation_finished("w", "b", None);
        // The same worker id again replaces the old one and what ran on it.
        m.worker_started("v", Vec::new(), s(3, 0, 0));
        assert_eq!(m.running(), 0);
    }

    #[test]
    fn concurrent_allocations_split_the_worker_equally_and_idle_time_is_apart() {
        let mut m = Meter::default();
        m.worker_started("w", vec!["H100".into()], s(0, 0, 100_000_000));
        // Idle for 1 s using 0.1 core-s.
        m.allocation_started("w", "a", s(1_000, 100_000, 100_000_000));
        // a alone for 1 s: 1 core-s, 200 MB average.
        m.allocation_started("w", "b", s(2_000, 1_100_000, 300_000_000));
        // a and b together for 2 s: 2 core-s shared.
        let a = m
            .allocation_finished("w", "a", Some(s(4_000, 3_100_000, 300_000_000)))
            .expect("a");
        let b = m
            .allocation_finished("w", "b", Some(s(5_000, 3_600_000, 100_000_000)))
            .expect("b");
        let idle = m
            .worker_stopped("w", Some(s(6_000, 3_700_000, 100_000_000)))
            .expect("idle");
        assert_eq!(a.cpu_core_us, 1_000_000 + 1_000_000);
        assert_eq!(b.cpu_core_us, 1_000_000 + 500_000);
        assert_eq!(idle.cpu_core_us, 100_000 + 100_000);
        // Memory: a gets 200 MB·1 s + half of 300 MB·2 s.
        assert_eq!(a.memory_mb_ms, 200_000 + 300_000);
        assert_eq!(b.memory_mb_ms, 300_000 + 200_000);
        assert_eq!(a.gpu_ms["H100"], 1_000 + 1_000);
        assert_eq!(b.gpu_ms["H100"], 1_000 + 1_000);
        assert_eq!(idle.gpu_ms["H100"], 2_000);
        assert!(a.gpu_busy_ms.is_empty(), "utilisation unknown");
        assert_eq!(
            (a.peak_memory_bytes, b.peak_memory_bytes),
            (300_000_000, 300_000_000)
        );
        // Nothing is lost or made up: the parts add up to the whole.
        assert_eq!(a.cpu_core_us + b.cpu_core_us + idle.cpu_core_us, 3_700_000);
    }

    #[test]
    fn busy_gpu_time_is_allocated_time_times_utilisation() {
        let mut m = Meter::default();
        m.worker_started("w", vec!["T4".into(), "T4".into()], s(0, 0, 0));
        m.set_gpu_utilization("w", Some(50));
        m.allocation_started("w", "a", s(1_000, 0, 0));
        m.set_gpu_utilization("w", Some(100));
        let a = m
            .allocation_finished("w", "a", Some(s(3_000, 0, 0)))
            .expect("a");
        // Two GPUs for 2 s, fully busy.
        assert_eq!((a.gpu_ms["T4"], a.gpu_busy_ms["T4"]), (4_000, 4_000));
        let idle = m.worker_stopped("w", None).expect("idle");
        assert_eq!((idle.gpu_ms["T4"], idle.gpu_busy_ms["T4"]), (2_000, 1_000));
    }

    #[test]
    fn counters_going_backwards_or_unknown_workers_do_not_panic() {
        let mut m = Meter::default();
        m.sample("nobody", s(1, 1, 1));
        assert!(
            m.allocation_finished("nobody", "x", Some(s(1, 1, 1)))
                .is_none()
        );
        m.worker_started("w", Vec::new(), s(10, 500, 1));
        m.allocation_started("w", "a", s(5, 100, u64::MAX));
        let a = m
            .allocation_finished("w", "a", Some(s(20, u64::MAX, u64::MAX)))
            .expect("a");
        assert!(a.cpu_core_us > 0);
    }

    #[test]
    fn an_allocation_ended_after_its_worker_keeps_what_it_used() {
        let mut m = Meter::default();
        m.worker_started("w", Vec::new(), s(0, 0, 0));
        m.allocation_started("w", "a", s(0, 0, 0));
        m.worker_stopped("w", Some(s(1_000, 700_000, 0)));
        let a = m.allocation_finished("w", "a", None).expect("orphan");
        assert_eq!(a.cpu_core_us, 700_000);
        assert!(m.allocation_finished("w", "a", None).is_none(), "once");
    }

    #[test]
    fn idle_segments_are_cut_without_losing_time() {
        let mut m = Meter::default();
        m.worker_started("w", Vec::new(), s(0, 0, 0));
        let first = m.cut_idle("w", s(1_000, 10, 0)).expect("cut");
        let second = m.worker_stopped("w", Some(s(2_500, 25, 0))).expect("rest");
        assert_eq!((first.started_ms, first.cpu_core_us), (0, 10));
        assert_eq!((second.started_ms, second.cpu_core_us), (1_000, 15));
        assert_eq!((first.idle_ms, second.idle_ms), (1_000, 1_500));
    }

    #[test]
    fn idle_time_is_only_the_time_with_nothing_running_and_late_readings_are_ignored() {
        let mut m = Meter::default();
        m.worker_started("w", Vec::new(), s(0, 0, 0));
        m.allocation_started("w", "a", s(1_000, 0, 0));
        // A reading from before the last one, posted late.
        m.sample("w", s(500, 0, 0));
        m.allocation_finished("w", "a", Some(s(9_000, 8_000_000, 0)))
            .expect("a");
        let idle = m
            .worker_stopped("w", Some(s(10_000, 8_000_000, 0)))
            .expect("idle");
        assert_eq!(idle.idle_ms, 2_000, "busy 8 s of 10");
        assert_eq!(idle.cpu_core_us, 0);
        // A result without its worker still ends the allocation it ran.
        m.worker_started("v", Vec::new(), s(0, 0, 0));
        m.allocation_started("v", "b", s(0, 0, 0));
        assert!(m.allocation_finished("", "b", None).is_some());
        m.sample("v", s(1_000, 500, 0));
        let idle = m.worker_stopped("v", None).expect("idle");
        assert_eq!(idle.cpu_core_us, 500, "no ghost keeps taking a share");
    }
}
