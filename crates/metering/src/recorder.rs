//! The recorder: one `steward-metering` thread that samples every worker
//! each second, shares usage out to allocations (the [`Meter`]), prices
//! it, appends the records to the ledger with one fsync per batch (a group
//! commit), and only then releases each allocation's result to the
//! reporter. Callers never block on it: hooks are channel sends.
//!
//! Nothing is lost through it: a result is released after its record is
//! durable, after a failed write (counted and logged; the result matters
//! more than its metering), after a panic while processing its batch, and
//! at once when the thread is gone.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::activity::{Activity, Day};
use crate::ledger::{Ledger, LedgerConfig, LedgerError, Recovery};
use crate::meter::{Accrued, Meter, Sample};
use crate::price::PriceCard;
use crate::record::{RecordKind, UsageRecord};

/// A worker's CPU time (µs, cumulative) and memory now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    pub cpu_usec: u64,
    pub memory_bytes: u64,
}

/// Reads one worker (its cgroup, or `/proc`); `None` once it is gone.
pub trait Probe: Send + Sync {
    fn read(&self) -> Option<Reading>;
}

/// A worker to meter.
#[derive(Debug, Clone, Default)]
pub struct WorkerInfo {
    pub fe_id: String,
    pub namespace: String,
    pub application: String,
    pub function: String,
    /// One entry per allocated GPU, its model.
    pub gpu_models: Vec<String>,
}

/// An allocation whose result is final.
#[derive(Debug, Clone, Default)]
pub struct FinishedAllocation {
    pub alloc_id: String,
    /// The worker it ran on or was meant for (empty when none).
    pub fe_id: String,
    pub namespace: String,
    pub application: String,
    pub function: String,
    /// "success" or "failure:<reason>".
    pub outcome: String,
    /// Whether it started running on a worker.
    pub ran: bool,
}

/// Hands the allocation's result on; called exactly once.
pub type Release = Box<dyn FnOnce() + Send>;

#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// The ledger (`<data dir>/usage`).
    pub ledger: LedgerConfig,
    /// The activity file (`<data dir>/activity.json`).
    pub activity_path: PathBuf,
    pub sample_interval: Duration,
    /// A live worker's idle time is recorded in pieces at most this long.
    pub idle_segment_max: Duration,
    /// Applications with their own metric labels; the rest are "other".
    pub top_applications: usize,
    pub price_card: Option<PriceCard>,
    /// Fault injection: a slow disk, waited before each batch is written
    /// (tests widen the window in which a crash can strike).
    pub commit_delay: Duration,
}

impl RecorderConfig {
    pub fn new(data_dir: &std::path::Path) -> RecorderConfig {
        RecorderConfig {
            ledger: LedgerConfig::new(data_dir.join("usage")),
            activity_path: data_dir.join("activity.json"),
            sample_interval: Duration::from_secs(1),
            idle_segment_max: Duration::from_secs(15 * 60),
            top_applications: 20,
            price_card: None,
            commit_delay: Duration::ZERO,
        }
    }
}

enum Msg {
    WorkerStarted(WorkerInfo, Arc<dyn Probe>),
    WorkerStopped(String, u64),
    AllocationStarted(String, String, u64),
    AllocationFinished(FinishedAllocation, Release, u64),
    Flush(Sender<()>),
}

type Labels = Vec<(&'static str, String)>;

/// The recorder's metrics.
#[derive(Clone)]
struct UsageMetrics {
    tasks: Family<Labels, Counter>,
    cpu: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    memory: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    gpu: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    wall: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    cost: Family<Labels, Counter>,
    records: Counter,
    errors: Counter,
    commit: Histogram,
    price_card: Family<Labels, Gauge>,
}

impl UsageMetrics {
    fn new() -> UsageMetrics {
        UsageMetrics {
            tasks: Family::default(),
            cpu: Family::default(),
            memory: Family::default(),
            gpu: Family::default(),
            wall: Family::default(),
            cost: Family::default(),
            records: Counter::default(),
            errors: Counter::default(),
            commit: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            price_card: Family::default(),
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "usage_tasks",
            "Allocations metered, by namespace and application (the most active; the rest \"other\")",
            self.tasks.clone(),
        );
        r.register(
            "usage_cpu_core_seconds",
            "CPU core-seconds metered, by namespace, application and kind (allocation or idle)",
            self.cpu.clone(),
        );
        r.register(
            "usage_memory_mb_seconds",
            "Memory MB-seconds (integral of memory in use) metered, by namespace, application and kind",
            self.memory.clone(),
        );
        r.register(
            "usage_gpu_seconds",
            "Allocated GPU-seconds metered, by namespace, application and kind",
            self.gpu.clone(),
        );
        r.register(
            "usage_wall_seconds",
            "Wall seconds metered, by namespace, application and kind",
            self.wall.clone(),
        );
        r.register(
            "usage_cost_minor_units",
            "Cost by the price card, in its minor units (see steward_usage_price_card_info)",
            self.cost.clone(),
        );
        r.register(
            "usage_ledger_records",
            "Usage records written to the ledger",
            self.records.clone(),
        );
        r.register(
            "usage_ledger_errors",
            "Failed ledger writes (the results were released all the same)",
            self.errors.clone(),
        );
        r.register(
            "usage_ledger_commit_seconds",
            "Time to write and fsync one batch of usage records",
            self.commit.clone(),
        );
        r.register(
            "usage_price_card_info",
            "The price card in force: its currency and decimal scale",
            self.price_card.clone(),
        );
    }

    fn count(&self, r: &UsageRecord, ns: &str, app: &str) {
        let kind = match r.kind {
            RecordKind::Allocation => "allocation",
            RecordKind::WorkerSegment => "idle",
        };
        let l: Labels = vec![
            ("namespace", ns.to_string()),
            ("application", app.to_string()),
            ("kind", kind.to_string()),
        ];
        if r.kind == RecordKind::Allocation {
            self.tasks.get_or_create(&l[..2].to_vec()).inc();
        }
        self.cpu
            .get_or_create(&l)
            .inc_by(r.cpu_core_us as f64 / 1e6);
        self.memory
            .get_or_create(&l)
            .inc_by(r.memory_mb_ms as f64 / 1e3);
        let gpu: u64 = r.gpu_ms.iter().map(|(_, ms)| *ms).sum();
        if gpu > 0 {
            self.gpu.get_or_create(&l).inc_by(gpu as f64 / 1e3);
        }
        self.wall.get_or_create(&l).inc_by(r.wall_ms() as f64 / 1e3);
        if let Some(c) = r.cost_minor.and_then(|c| u64::try_from(c).ok()) {
            self.cost.get_or_create(&l).inc_by(c);
        }
    }

    fn set_card(&self, card: Option<&PriceCard>) {
        self.price_card.clear();
        if let Some(c) = card {
            self.price_card
                .get_or_create(&vec![
                    ("currency", c.currency.clone()),
                    ("scale", c.scale.to_string()),
                ])
                .set(1);
        }
    }
}

/// Bounds the metrics' application labels: the most active applications
/// from the activity file, then new ones as they come, up to the cap; the
/// rest are "other".
struct Labeler {
    known: HashSet<String>,
    cap: usize,
}

/// Longest label value kept (namespace and application names are the
/// server's, bounded there; this bounds the metrics whatever they are).
const MAX_LABEL: usize = 128;

impl Labeler {
    fn labels(&mut self, ns: &str, app: &str) -> (String, String) {
        let key = format!("{ns}/{app}");
        if self.known.contains(&key) || self.known.len() < self.cap {
            self.known.insert(key);
            let cut = |s: &str| s.chars().take(MAX_LABEL).collect::<String>();
            (cut(ns), cut(app))
        } else {
            ("other".into(), "other".into())
        }
    }
}

/// What the recorder has done, for `/state/usage`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RecorderStatus {
    pub ledger_dir: String,
    pub records_written: u64,
    pub write_errors: u64,
    pub last_error: Option<String>,
    pub recovered_records: usize,
    pub truncated_bytes: u64,
    pub skipped_bytes: u64,
    pub workers_metered: usize,
}

struct Inner {
    card: RwLock<Option<PriceCard>>,
    activity: Mutex<Activity>,
    status: Mutex<RecorderStatus>,
    metrics: UsageMetrics,
}

/// Handle to the metering thread.
pub struct Recorder {
    tx: Mutex<Option<Sender<Msg>>>,
    inner: Arc<Inner>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Recorder {
    /// Opens the ledger (recovering it) and the activity file, registers the
    /// metrics and starts the thread.
    pub fn start(
        config: RecorderConfig,
        registry: &mut Registry,
    ) -> Result<(Recorder, Recovery), LedgerError> {
        let (ledger, recovery) = Ledger::open(config.ledger.clone())?;
        let activity = Activity::open(config.activity_path.clone(), &config.ledger.dir);
        let labeler = Labeler {
            known: activity
                .top_applications(config.top_applications)
                .into_iter()
                .collect(),
            cap: config.top_applications,
        };
        let metrics = UsageMetrics::new();
        metrics.register(registry);
        metrics.set_card(config.price_card.as_ref());
        let inner = Arc::new(Inner {
            card: RwLock::new(config.price_card.clone()),
            activity: Mutex::new(activity),
            status: Mutex::new(RecorderStatus {
                ledger_dir: config.ledger.dir.display().to_string(),
                recovered_records: recovery.records,
                truncated_bytes: recovery.truncated_bytes,
                skipped_bytes: recovery.skipped_bytes,
                ..RecorderStatus::default()
            }),
            metrics,
        });
        let (tx, rx) = channel();
        let worker = Worker {
            rx,
            inner: inner.clone(),
            ledger,
            meter: Meter::default(),
            probes: HashMap::new(),
            infos: HashMap::new(),
            labeler,
            sample_interval: config.sample_interval.max(Duration::from_millis(10)),
            idle_segment_max: config.idle_segment_max,
            commit_delay: config.commit_delay,
            last_save: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("steward-metering".into())
            .spawn(move || worker.run())
            .map_err(|error| LedgerError::Io {
                path: config.ledger.dir.clone(),
                error,
            })?;
        Ok((
            Recorder {
                tx: Mutex::new(Some(tx)),
                inner,
                thread: Mutex::new(Some(thread)),
            },
            recovery,
        ))
    }

    fn send(&self, msg: Msg) {
        let failed = match &*lock(&self.tx) {
            Some(tx) => tx.send(msg).err().map(|e| e.0),
            None => Some(msg),
        };
        // The thread is gone: a result must still go.
        if let Some(Msg::AllocationFinished(_, release, _)) = failed {
            release();
        }
    }

    pub fn worker_started(&self, info: WorkerInfo, probe: Arc<dyn Probe>) {
        self.send(Msg::WorkerStarted(info, probe));
    }

    pub fn worker_stopped(&self, fe_id: &str) {
        self.send(Msg::WorkerStopped(fe_id.to_string(), now_ms()));
    }

    pub fn allocation_started(&self, fe_id: &str, alloc_id: &str) {
        self.send(Msg::AllocationStarted(
            fe_id.to_string(),
            alloc_id.to_string(),
            now_ms(),
        ));
    }

    /// Records the allocation, then calls `release` (on the metering thread).
    pub fn allocation_finished(&self, done: FinishedAllocation, release: Release) {
        self.send(Msg::AllocationFinished(done, release, now_ms()));
    }

    /// Waits (at most `timeout`) until everything sent so far is recorded
    /// and released; `false` on timeout.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (ack, done) = channel();
        self.send(Msg::Flush(ack));
        done.recv_timeout(timeout).is_ok()
    }

    /// Flushes, stops the thread (idle segments of live workers are recorded)
    /// and saves the activity file.
    pub fn stop(&self, timeout: Duration) {
        self.flush(timeout);
        drop(lock(&self.tx).take());
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }

    pub fn price_card(&self) -> Option<PriceCard> {
        self.inner
            .card
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Prices records from now on (records already written keep their cost).
    pub fn set_price_card(&self, card: Option<PriceCard>) {
        self.inner.metrics.set_card(card.as_ref());
        *self
            .inner
            .card
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = card;
    }

    pub fn activity(&self) -> Vec<Day> {
        lock(&self.inner.activity).days()
    }

    pub fn status(&self) -> RecorderStatus {
        lock(&self.inner.status).clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The metering thread's state.
struct Worker {
    rx: Receiver<Msg>,
    inner: Arc<Inner>,
    ledger: Ledger,
    meter: Meter,
    probes: HashMap<String, Arc<dyn Probe>>,
    infos: HashMap<String, WorkerInfo>,
    labeler: Labeler,
    sample_interval: Duration,
    idle_segment_max: Duration,
    commit_delay: Duration,
    last_save: Instant,
}

/// One batch's work: records to write, results to release after, flushes
/// to acknowledge after that.
#[derive(Default)]
struct Batch {
    records: Vec<UsageRecord>,
    releases: Vec<Release>,
    flushes: Vec<Sender<()>>,
}

impl Worker {
    fn run(mut self) {
        let mut next_tick = Instant::now() + self.sample_interval;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let first = match self.rx.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut msgs: Vec<Msg> = first.into_iter().collect();
            msgs.extend(self.rx.try_iter());
            let tick = Instant::now() >= next_tick;
            if tick {
                next_tick = Instant::now() + self.sample_interval;
            }
            self.batch(msgs, tick);
        }
        // Stopping: live workers' idle time so far is recorded.
        let fes: Vec<String> = self.meter.workers().map(str::to_string).collect();
        let mut b = Batch::default();
        for fe in fes {
            self.worker_stopped(&fe, now_ms(), &mut b);
        }
        self.commit(b);
        self.save_activity();
    }

    /// Handles `msgs` (and a tick), then commits; a panic on the way still
    /// releases every result of the batch.
    fn batch(&mut self, msgs: Vec<Msg>, tick: bool) {
        let mut b = Batch::default();
        let mut work = Vec::with_capacity(msgs.len());
        for m in msgs {
            match m {
                Msg::AllocationFinished(done, release, at) => {
                    b.releases.push(release);
                    work.push(Msg::AllocationFinished(done, Box::new(|| {}), at));
                }
                Msg::Flush(ack) => b.flushes.push(ack),
                other => work.push(other),
            }
        }
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut records = Vec::new();
            let mut cache = HashMap::new();
            for m in work {
                self.handle(m, &mut cache, &mut records);
            }
            if tick {
                self.tick(&mut records);
            }
            records
        }));
        match outcome {
            Ok(records) => b.records = records,
            Err(_) => {
                tracing::error!(
                    "metering panicked on a batch; its results are released unrecorded"
                );
                self.inner.metrics.errors.inc();
            }
        }
        self.commit(b);
        if self.last_save.elapsed() >= Duration::from_secs(10) {
            self.save_activity();
        }
    }

    /// A reading of `fe` now, one per worker per batch.
    fn read(&self, fe: &str, cache: &mut HashMap<String, Option<Sample>>) -> Option<Sample> {
        if let Some(s) = cache.get(fe) {
            return *s;
        }
        let s = self.probes.get(fe).and_then(|p| p.read()).map(|r| Sample {
            at_ms: now_ms(),
            cpu_usec: r.cpu_usec,
            memory_bytes: r.memory_bytes,
        });
        cache.insert(fe.to_string(), s);
        s
    }

    fn handle(
        &mut self,
        m: Msg,
        cache: &mut HashMap<String, Option<Sample>>,
        out: &mut Vec<UsageRecord>,
    ) {
        match m {
            Msg::WorkerStarted(info, probe) => {
                let first = probe.read().unwrap_or_default();
                let s = Sample {
                    at_ms: now_ms(),
                    cpu_usec: first.cpu_usec,
                    memory_bytes: first.memory_bytes,
                };
                self.meter
                    .worker_started(&info.fe_id, info.gpu_models.clone(), s);
                self.probes.insert(info.fe_id.clone(), probe);
                self.infos.insert(info.fe_id.clone(), info);
            }
            Msg::AllocationStarted(fe, alloc, at) => {
                if let Some(s) = self.read(&fe, cache) {
                    self.meter
                        .allocation_started(&fe, &alloc, Sample { at_ms: at, ..s });
                }
            }
            Msg::AllocationFinished(done, _, at) => {
                let s = self
                    .read(&done.fe_id, cache)
                    .map(|s| Sample { at_ms: at, ..s });
                let used = self
                    .meter
                    .allocation_finished(&done.fe_id, &done.alloc_id, s);
                out.push(self.allocation_record(done, used, at));
            }
            Msg::WorkerStopped(fe, at) => {
                let mut b = Batch::default();
                self.worker_stopped(&fe, at, &mut b);
                out.append(&mut b.records);
            }
            Msg::Flush(_) => {}
        }
    }

    fn worker_stopped(&mut self, fe: &str, at: u64, b: &mut Batch) {
        let last = self
            .probes
            .remove(fe)
            .and_then(|p| p.read())
            .map(|r| Sample {
                at_ms: at,
                cpu_usec: r.cpu_usec,
                memory_bytes: r.memory_bytes,
            });
        let idle = self.meter.worker_stopped(fe, last);
        let info = self.infos.remove(fe);
        if let (Some(idle), Some(info)) = (idle, info) {
            b.records.push(self.segment_record(&info, idle, at));
        }
    }

    /// Samples every worker; cuts idle segments that grew too long.
    fn tick(&mut self, out: &mut Vec<UsageRecord>) {
        let fes: Vec<String> = self.meter.workers().map(str::to_string).collect();
        let max = self.idle_segment_max.as_millis() as u64;
        let mut status_workers = 0;
        for fe in fes {
            let Some(r) = self.probes.get(&fe).and_then(|p| p.read()) else {
                // Gone without a word (a start that failed after the
                // spawn): its idle time ends here.
                let mut b = Batch::default();
                self.worker_stopped(&fe, now_ms(), &mut b);
                out.append(&mut b.records);
                continue;
            };
            status_workers += 1;
            let s = Sample {
                at_ms: now_ms(),
                cpu_usec: r.cpu_usec,
                memory_bytes: r.memory_bytes,
            };
            let since = self.meter.idle_since(&fe).unwrap_or(s.at_ms);
            if s.at_ms.saturating_sub(since) >= max {
                if let (Some(idle), Some(info)) =
                    (self.meter.cut_idle(&fe, s), self.infos.get(&fe).cloned())
                {
                    out.push(self.segment_record(&info, idle, s.at_ms));
                }
            } else {
                self.meter.sample(&fe, s);
            }
        }
        lock(&self.inner.status).workers_metered = status_workers;
    }

    fn price(&self, mut r: UsageRecord) -> UsageRecord {
        let card = self
            .inner
            .card
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.cost_minor = card.as_ref().map(|c| c.cost(&r));
        r
    }

    fn allocation_record(
        &self,
        done: FinishedAllocation,
        used: Option<Accrued>,
        at: u64,
    ) -> UsageRecord {
        let used = used.unwrap_or(Accrued {
            started_ms: at,
            ..Accrued::default()
        });
        self.price(UsageRecord {
            kind: RecordKind::Allocation,
            id: done.alloc_id,
            function_executor_id: done.fe_id,
            namespace: done.namespace,
            application: done.application,
            function: done.function,
            started_unix_ms: used.started_ms.min(at),
            ended_unix_ms: at,
            cpu_core_us: used.cpu_core_us,
            memory_mb_ms: used.memory_mb_ms,
            peak_memory_bytes: used.peak_memory_bytes,
            gpu_ms: used.gpu_ms.into_iter().collect(),
            cost_minor: None,
            outcome: done.outcome,
            ran: done.ran,
        })
    }

    fn segment_record(&self, info: &WorkerInfo, idle: Accrued, at: u64) -> UsageRecord {
        self.price(UsageRecord {
            kind: RecordKind::WorkerSegment,
            id: format!("{}@{}", info.fe_id, idle.started_ms),
            function_executor_id: info.fe_id.clone(),
            namespace: info.namespace.clone(),
            application: info.application.clone(),
            function: info.function.clone(),
            started_unix_ms: idle.started_ms.min(at),
            ended_unix_ms: at,
            cpu_core_us: idle.cpu_core_us,
            memory_mb_ms: idle.memory_mb_ms,
            peak_memory_bytes: idle.peak_memory_bytes,
            gpu_ms: idle.gpu_ms.into_iter().collect(),
            cost_minor: None,
            outcome: String::new(),
            ran: false,
        })
    }

    /// Writes the batch's records with one fsync, counts them, then releases
    /// the results and acknowledges flushes, in that order.
    fn commit(&mut self, b: Batch) {
        if !b.records.is_empty() {
            if !self.commit_delay.is_zero() {
                std::thread::sleep(self.commit_delay);
            }
            let started = Instant::now();
            let written = self.ledger.append_batch(&b.records);
            self.inner
                .metrics
                .commit
                .observe(started.elapsed().as_secs_f64());
            match written {
                Ok(_) => self.count(&b.records),
                Err(e) => {
                    tracing::error!(error = %e, records = b.records.len(), "usage records not written; results released");
                    self.inner.metrics.errors.inc();
                    let mut st = lock(&self.inner.status);
                    st.write_errors += 1;
                    st.last_error = Some(e.to_string());
                }
            }
        }
        for release in b.releases {
            // A panicking release must not take the others' results with it.
            if std::panic::catch_unwind(AssertUnwindSafe(release)).is_err() {
                tracing::error!("releasing a result panicked");
            }
        }
        for ack in b.flushes {
            let _ = ack.send(());
        }
    }

    /// Counts written records in the activity, metrics and status.
    fn count(&mut self, records: &[UsageRecord]) {
        let at = self.ledger.position();
        let mut activity = lock(&self.inner.activity);
        for r in records {
            activity.add(r, at);
            let (ns, app) = self.labeler.labels(&r.namespace, &r.application);
            self.inner.metrics.count(r, &ns, &app);
        }
        drop(activity);
        self.inner.metrics.records.inc_by(records.len() as u64);
        lock(&self.inner.status).records_written += records.len() as u64;
    }

    fn save_activity(&mut self) {
        self.last_save = Instant::now();
        if let Err(e) = lock(&self.inner.activity).save() {
            tracing::warn!(error = %e, "saving the activity file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::read_records;

    struct FakeProbe(Mutex<Option<Reading>>, bool);

    impl Probe for FakeProbe {
        fn read(&self) -> Option<Reading> {
            assert!(!self.1, "a probe that panics");
            *lock(&self.0)
        }
    }

    fn set(p: &FakeProbe, cpu_usec: u64, memory_bytes: u64) {
        *lock(&p.0) = Some(Reading {
            cpu_usec,
            memory_bytes,
        });
    }

    fn start(dir: &std::path::Path) -> Recorder {
        let mut c = RecorderConfig::new(dir);
        c.price_card = Some(
            PriceCard::from_toml(
                "currency = \"EUR\"\nscale = 6\nper_task = 7\nper_cpu_core_second = 1000\n",
            )
            .expect("card"),
        );
        Recorder::start(c, &mut Registry::default())
            .expect("start")
            .0
    }

    fn info(fe: &str) -> WorkerInfo {
        WorkerInfo {
            fe_id: fe.into(),
            namespace: "ns".into(),
            application: "app".into(),
            function: "f".into(),
            gpu_models: Vec::new(),
        }
    }

    fn done(alloc: &str, fe: &str) -> FinishedAllocation {
        FinishedAllocation {
            alloc_id: alloc.into(),
            fe_id: fe.into(),
            namespace: "ns".into(),
            application: "app".into(),
            function: "f".into(),
            outcome: "success".into(),
            ran: true,
        }
    }

    #[test]
    fn a_result_is_released_only_after_its_record_is_in_the_ledger() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rec = start(tmp.path());
        let probe = Arc::new(FakeProbe(Mutex::new(None), false));
        set(&probe, 1_000, 50_000_000);
        rec.worker_started(info("w"), probe.clone());
        rec.allocation_started("w", "a");
        assert!(rec.flush(Duration::from_secs(5)));
        set(&probe, 2_501_000, 50_000_000);
        let dir = tmp.path().join("usage");
        let (seen_tx, seen_rx) = channel();
        rec.allocation_finished(
            done("a", "w"),
            Box::new(move || {
                let on_disk = read_records(&dir).expect("read");
                let _ = seen_tx.send(on_disk);
            }),
        );
        let on_disk = seen_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("released");
        let a = on_disk
            .iter()
            .find(|r| r.id == "a")
            .expect("recorded before release");
        assert_eq!(a.cpu_core_us, 2_500_000);
        // 7 per task + 1000 per core-second × 2.5.
        assert_eq!(a.cost_minor, Some(7 + 2_500));
        rec.stop(Duration::from_secs(5));
        // The worker's idle time is recorded at stop.
        let all = read_records(&tmp.path().join("usage")).expect("read");
        assert!(
            all.iter().any(|r| r.kind == RecordKind::WorkerSegment),
            "{all:?}"
        );
        assert_eq!(rec.status().records_written, all.len() as u64);
    }

    #[test]
    fn results_still_go_when_metering_panics_or_is_gone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rec = start(tmp.path());
        let bad = Arc::new(FakeProbe(Mutex::new(None), true));
        rec.worker_started(info("w"), bad);
        let (tx, rx) = channel();
        let t = tx.clone();
        rec.allocation_finished(done("a", "w"), Box::new(move || t.send("a").expect("send")));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok("a"));
        rec.stop(Duration::from_secs(5));
        rec.allocation_finished(
            done("b", "w"),
            Box::new(move || tx.send("b").expect("send")),
        );
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(1)),
            Ok("b"),
            "inline once stopped"
        );
    }

    #[test]
    fn application_labels_are_bounded() {
        let mut l = Labeler {
            known: HashSet::new(),
            cap: 2,
        };
        assert_eq!(l.labels("n", "a").1, "a");
        assert_eq!(l.labels("n", "b").1, "b");
        assert_eq!(l.labels("n", "c").1, "other");
        assert_eq!(l.labels("n", "a").1, "a");
        l.cap = 3;
        assert_eq!(l.labels(&"x".repeat(500), "a").0.len(), MAX_LABEL);
    }
}
