//! The host's load over time, for its page and `/state/load`: a sample a
//! second (allocations running, finished and failed; CPU and memory of the
//! host from `/proc` and of all workers from their parent cgroups; GPUs
//! held by workers, and the GPUs' busy share and memory from the host's
//! latest usage sample) into the rings of `steward-load-history`, whose day and month
//! tiers are saved to `<data dir>/load-history` once a minute and read back
//! at start. Each sample is a few small reads: two `/proc` files, two
//! cgroup counters, two atomic counters.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use steward_load_history::{FIELDS, History, N, Range, Sample, Series};

/// The rings and where they are saved.
pub struct LoadView {
    history: Mutex<History>,
    path: PathBuf,
}

impl LoadView {
    /// The history saved at `path`, or a fresh one (a bad file is said and
    /// left for the next save to replace).
    pub fn open(path: PathBuf) -> LoadView {
        let history = History::load(&path).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "load history not restored; starting afresh");
            History::new()
        });
        LoadView {
            history: Mutex::new(history),
            path,
        }
    }

    pub fn series(&self, range: Range) -> Series {
        self.history.lock().series(range)
    }

    /// `/state/load?range=hour|day|month` (hour by default).
    pub fn document(&self, range: Option<&str>) -> Result<serde_json::Value, String> {
        let range = match range {
            None => Range::Hour,
            Some(r) => {
                Range::parse(r).ok_or_else(|| format!("range {r:?}: one of hour, day, month"))?
            }
        };
        serde_json::to_value(self.series(range)).map_err(|e| e.to_string())
    }
}

/// What the sampler reads besides the agent: the driver, the GPUs.
pub struct Sources {
    pub handle_driver: Arc<dyn steward_worker_driver::WorkerDriver>,
    pub gpus: Arc<steward_host_resources::GpuAllocator>,
    pub host: Arc<crate::host::HostView>,
}

impl Sources {
    /// With the agent's counters.
    pub fn with(self, handle: steward_reconciler::AgentHandle) -> Running {
        Running {
            handle,
            driver: self.handle_driver,
            gpus: self.gpus,
            host: self.host,
        }
    }
}

/// Everything the sampler reads.
pub struct Running {
    handle: steward_reconciler::AgentHandle,
    driver: Arc<dyn steward_worker_driver::WorkerDriver>,
    gpus: Arc<steward_host_resources::GpuAllocator>,
    host: Arc<crate::host::HostView>,
}

/// Samples every second until the runtime stops; saves the coarser tiers
/// every minute.
pub async fn sample_loop(view: Arc<LoadView>, sources: Running) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last = Previous::default();
    let mut since_save = 0u32;
    loop {
        tick.tick().await;
        if let Some(s) = last.sample(&sources) {
            view.history.lock().record(s);
        }
        since_save += 1;
        if since_save >= 60 {
            since_save = 0;
            let v = view.clone();
            let saved = tokio::task::spawn_blocking(move || {
                let h = v.history.lock().clone();
                h.save(&v.path)
            })
            .await;
            if let Ok(Err(error)) = saved {
                tracing::warn!(%error, "cannot save the load history");
            }
        }
    }
}

/// The previous reading of each cumulative counter (a sample is the
/// difference).
#[derive(Default)]
struct Previous {
    cpu: Option<CpuTimes>,
    workers_cpu_usec: Option<(u64, std::time::Instant)>,
    finished: Option<u64>,
    failed: Option<u64>,
}

impl Previous {
    fn sample(&mut self, src: &Running) -> Option<Sample> {
        let mut values = [0f32; N];
        let metrics = src.handle.metrics();
        values[index("running")] = metrics.allocations_running.get() as f32;
        values[index("finished")] = delta(&mut self.finished, metrics.finished.get()) as f32;
        values[index("failed")] = delta(&mut self.failed, metrics.failed.get()) as f32;
        if let Some(now) = CpuTimes::read()
            && let Some(prev) = self.cpu.replace(now)
        {
            values[index("host_cpu")] = now.cores_busy_since(&prev);
        }
        values[index("host_memory")] = memory_used().unwrap_or(0) as f32;
        if let Some(r) = src.driver.workers_reading() {
            let now = std::time::Instant::now();
            if let Some((usec, at)) = self.workers_cpu_usec.replace((r.cpu_usec, now)) {
                let wall = now.duration_since(at).as_secs_f64() * 1e6;
                if wall > 0.0 {
                    values[index("workers_cpu")] =
                        (r.cpu_usec.saturating_sub(usec) as f64 / wall) as f32;
                }
            }
            values[index("workers_memory")] = r.memory_bytes as f32;
        }
        values[index("gpus_held")] = src.gpus.owners().values().map(Vec::len).sum::<usize>() as f32;
        if let Some((busy, memory)) = src.host.gpu_reading() {
            values[index("gpu_busy")] = busy;
            values[index("gpu_memory")] = memory as f32;
        }
        let at_unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        Some(Sample { at_unix_s, values })
    }
}

/// The position of field `name` in a sample.
fn index(name: &str) -> usize {
    FIELDS.iter().position(|f| f.name == name).unwrap_or(0)
}

/// `now - prev` (0 the first time, or when the counter went back).
fn delta(prev: &mut Option<u64>, now: u64) -> u64 {
    match prev.replace(now) {
        Some(p) => now.saturating_sub(p),
        None => 0,
    }
}

/// The host's CPU time in clock ticks, busy and in all, and its CPUs.
#[derive(Debug, Clone, Copy)]
struct CpuTimes {
    busy: u64,
    total: u64,
    cpus: u32,
}

impl CpuTimes {
    fn read() -> Option<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The `cpu` line of `/proc/stat`: idle and iowait are not busy.
    fn parse(stat: &str) -> Option<CpuTimes> {
        let mut lines = stat.lines();
        let first = lines.next()?.strip_prefix("cpu ")?;
        let f: Vec<u64> = first
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is
        // already in user).
        let total: u64 = f.iter().take(8).sum();
        let idle = f.get(3)? + f.get(4).copied().unwrap_or(0);
        let cpus = lines.take_while(|l| l.starts_with("cpu")).count().max(1) as u32;
        Some(CpuTimes {
            busy: total.saturating_sub(idle),
            total,
            cpus,
        })
    }

    /// Cores busy on average since `prev`.
    fn cores_busy_since(&self, prev: &CpuTimes) -> f32 {
        let total = self.total.saturating_sub(prev.total);
        if total == 0 {
            return 0.0;
        }
        let busy = self.busy.saturating_sub(prev.busy);
        (busy as f64 / total as f64 * f64::from(self.cpus)) as f32
    }
}

/// `MemTotal - MemAvailable` of `/proc/meminfo`, in bytes.
fn memory_used() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(kib("MemTotal:")?.saturating_sub(kib("MemAvailable:")?) * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lines_give_busy_cores() {
        let a = CpuTimes::parse("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1\ncpu1 1\nintr 5\n")
            .expect("parsed");
        let b = CpuTimes::parse("cpu  200 0 200 800 100 0 0 0 0 0\ncpu0 1\ncpu1 1\nintr 5\n")
            .expect("parsed");
        assert_eq!(a.cpus, 2);
        // 200 of 300 ticks busy on 2 CPUs: 1.33 cores.
        assert!((b.cores_busy_since(&a) - 4.0 / 3.0).abs() < 1e-5);
        assert!(CpuTimes::parse("garbage").is_none());
    }

    #[test]
    fn counters_give_per_second_counts() {
        let mut prev = None;
        assert_eq!(delta(&mut prev, 10), 0, "the first reading is a start");
        assert_eq!(delta(&mut prev, 13), 3);
        assert_eq!(delta(&mut prev, 13), 0);
    }
}
