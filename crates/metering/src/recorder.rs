//! The recorder: one `steward-metering` thread that samples every worker
//! each second, shares usage out to allocations (the [`Meter`]), prices
//! it, appends the records to the ledger with one fsync per batch (a group
//! commit), and only then releases each allocation's result to the
//! reporter. Callers never wait for it: a hook reads the worker's
//! counters (two `pread`s where the probe keeps its files open) and queues
//! the event; only events that must be written (a finished allocation, a
//! flush) wake the thread, so an allocation costs one wake-up, shared by
//! every allocation finishing in the same batch.
//!
//! Nothing is lost through it: a result is released after its record is
//! durable, after a failed write (counted and logged; the result matters
//! more than its metering), after a panic while processing its batch, and
//! at once when the thread is gone.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::mpsc::{Sender, channel};
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
    /// The allocated GPUs' UUIDs (for their utilisation).
    pub gpu_uuids: Vec<String>,
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
    /// The shortest time between two ledger commits while results keep
    /// coming: each fsync costs a disk flush and the thread's blocking (in
    /// a VM, exits to the hypervisor), so under load a batch gathers what
    /// finishes within it. At low load a result waits for no one. Longer
    /// trades result latency for agent CPU.
    pub group_commit: Duration,
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
            group_commit: Duration::from_millis(2),
        }
    }
}

/// An event, with the worker's reading taken when it happened.
enum Msg {
    WorkerStarted(WorkerInfo, Sample),
    WorkerStopped(String, u64, Option<Sample>),
    AllocationStarted(String, String, Option<Sample>),
    /// With the ticket of its release.
    AllocationFinished(FinishedAllocation, u64, u64, Option<Sample>),
    Flush(Sender<()>),
    /// Utilisation of the host's GPUs (UUID, percent).
    GpuUtilization(Vec<(String, u32)>),
}

/// Events waiting for the thread; it sleeps until `wake` (or its tick).
struct Queue {
    msgs: Vec<Msg>,
    wake: bool,
    closed: bool,
    /// Until then the thread wakes by itself (the group-commit window), so
    /// a poster sets `wake` without waking it: one wake-up per commit.
    quiet_until: Instant,
}

impl Default for Queue {
    fn default() -> Queue {
        Queue {
            msgs: Vec::new(),
            wake: false,
            closed: false,
            quiet_until: Instant::now(),
        }
    }
}

/// The queue and what wakes the thread.
#[derive(Default)]
struct Mailbox {
    queue: Mutex<Queue>,
    ready: std::sync::Condvar,
}

impl Mailbox {
    /// Queues `msg`, waking the thread if `wake`; gives it back when the
    /// thread is gone (to release its result).
    #[allow(clippy::result_large_err)]
    fn post(&self, msg: Msg, wake: bool) -> Result<(), Msg> {
        let mut q = lock(&self.queue);
        if q.closed {
            return Err(msg);
        }
        q.msgs.push(msg);
        if wake && !q.wake {
            q.wake = true;
            if Instant::now() >= q.quiet_until {
                self.ready.notify_one();
            }
        }
        Ok(())
    }

    /// Waits until woken (and not before `not_before`, sleeping until then
    /// in any case) or `deadline`; the queued events and whether the
    /// mailbox is closed.
    fn take(&self, deadline: Instant, not_before: Instant) -> (Vec<Msg>, bool) {
        let mut q = lock(&self.queue);
        q.quiet_until = not_before;
        loop {
            let now = Instant::now();
            if q.closed || now >= deadline || (q.wake && now >= not_before) {
                break;
            }
            let until = if now < not_before {
                not_before.min(deadline)
            } else {
                deadline
            };
            q = self
                .ready
                .wait_timeout(q, until - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        q.wake = false;
        (std::mem::take(&mut q.msgs), q.closed)
    }

    /// Closes the mailbox; what was still queued.
    fn close(&self) -> Vec<Msg> {
        let mut q = lock(&self.queue);
        q.closed = true;
        self.ready.notify_one();
        std::mem::take(&mut q.msgs)
    }
}

fn sample_of(r: Reading, at_ms: u64) -> Sample {
    Sample {
        at_ms,
        cpu_usec: r.cpu_usec,
        memory_bytes: r.memory_bytes,
    }
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

    /// The counters of one (namespace, application, kind).
    fn series(&self, ns: &str, app: &str, kind: &'static str) -> Series {
        let l: Labels = vec![
            ("namespace", ns.to_string()),
            ("application", app.to_string()),
            ("kind", kind.to_string()),
        ];
        Series {
            tasks: (kind == "allocation")
                .then(|| self.tasks.get_or_create(&l[..2].to_vec()).clone()),
            cpu: self.cpu.get_or_create(&l).clone(),
            memory: self.memory.get_or_create(&l).clone(),
            wall: self.wall.get_or_create(&l).clone(),
            labels: l,
            gpu: None,
            cost: None,
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

type F64Counter = Counter<f64, std::sync::atomic::AtomicU64>;

/// One label set's counters, kept by the metering thread so that counting a
/// record is a few atomic adds (GPU and cost series appear when first used).
struct Series {
    labels: Labels,
    tasks: Option<Counter>,
    cpu: F64Counter,
    memory: F64Counter,
    wall: F64Counter,
    gpu: Option<F64Counter>,
    cost: Option<Counter>,
}

impl Series {
    fn count(&mut self, m: &UsageMetrics, r: &UsageRecord) {
        if let Some(t) = &self.tasks {
            t.inc();
        }
        self.cpu.inc_by(r.cpu_core_us as f64 / 1e6);
        self.memory.inc_by(r.memory_mb_ms as f64 / 1e3);
        self.wall.inc_by(r.wall_ms() as f64 / 1e3);
        let gpu: u64 = r.gpu_ms.iter().map(|(_, ms)| *ms).sum();
        if gpu > 0 {
            self.gpu
                .get_or_insert_with(|| m.gpu.get_or_create(&self.labels).clone())
                .inc_by(gpu as f64 / 1e3);
        }
        if let Some(c) = r.cost_minor.and_then(|c| u64::try_from(c).ok()) {
            self.cost
                .get_or_insert_with(|| m.cost.get_or_create(&self.labels).clone())
                .inc_by(c);
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

/// Results waiting for their records: whoever takes a ticket out calls its
/// release, so each is called exactly once, by the thread after the write,
/// or by whoever gives up on the thread (a flush past its timeout, the
/// thread ending or panicking, a post after it is gone).
#[derive(Default)]
struct Tickets {
    next: u64,
    pending: HashMap<u64, Release>,
}

struct Inner {
    mailbox: Mailbox,
    tickets: Mutex<Tickets>,
    /// Every metered worker's probe, read by callers at events and by the
    /// thread at its ticks.
    probes: Mutex<HashMap<String, Arc<dyn Probe>>>,
    card: RwLock<Option<PriceCard>>,
    activity: Mutex<Activity>,
    status: Mutex<RecorderStatus>,
    metrics: UsageMetrics,
}

/// Handle to the metering thread.
pub struct Recorder {
    inner: Arc<Inner>,
    /// The thread, and a channel that disconnects when it has ended.
    thread: Mutex<Option<(std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<()>)>>,
}

/// Closes the mailbox and releases what waits when the thread ends.
struct ThreadGuard(Arc<Inner>, #[allow(dead_code)] Sender<()>);

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        for m in self.0.mailbox.close() {
            if let Msg::AllocationFinished(_, ticket, _, _) = m {
                self.0.release(ticket);
            }
        }
        self.0.release_all("the metering thread ended");
    }
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

impl Inner {
    fn hold(&self, release: Release) -> u64 {
        let mut t = lock(&self.tickets);
        t.next += 1;
        let ticket = t.next;
        t.pending.insert(ticket, release);
        ticket
    }

    /// Calls the release of `ticket` if nobody has yet.
    fn release(&self, ticket: u64) {
        let release = lock(&self.tickets).pending.remove(&ticket);
        if let Some(r) = release {
            // A panicking release must not take the others' results with it.
            if std::panic::catch_unwind(AssertUnwindSafe(r)).is_err() {
                tracing::error!("releasing a result panicked");
            }
        }
    }

    /// Releases every result still waiting, unrecorded; how many.
    fn release_all(&self, why: &str) -> usize {
        let all: Vec<u64> = lock(&self.tickets).pending.keys().copied().collect();
        if !all.is_empty() {
            tracing::error!(
                results = all.len(),
                "{why}: results released without usage records"
            );
            self.metrics.errors.inc();
            let mut st = lock(&self.status);
            st.write_errors += 1;
            st.last_error = Some(format!("{why}: {} results released unrecorded", all.len()));
        }
        for t in &all {
            self.release(*t);
        }
        all.len()
    }
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
            mailbox: Mailbox::default(),
            tickets: Mutex::new(Tickets::default()),
            probes: Mutex::new(HashMap::new()),
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
        let worker = Worker {
            inner: inner.clone(),
            ledger,
            meter: Meter::default(),
            infos: HashMap::new(),
            labeler,
            sample_interval: config.sample_interval.max(Duration::from_millis(10)),
            idle_segment_max: config.idle_segment_max,
            commit_delay: config.commit_delay,
            group_commit: config.group_commit.min(Duration::from_secs(1)),
            last_save: Instant::now(),
            last_commit: Instant::now(),
            series: HashMap::new(),
            unreadable: HashMap::new(),
            gpu_utilization: HashMap::new(),
        };
        let (exited_tx, exited) = channel::<()>();
        let thread = std::thread::Builder::new()
            .name("steward-metering".into())
            .spawn(move || {
                // However the thread ends (stopped, or a panic outside a
                // batch), nothing is posted to it any more and every result
                // still waiting goes.
                let guard = ThreadGuard(worker.inner.clone(), exited_tx);
                worker.run();
                drop(guard);
            })
            .map_err(|error| LedgerError::Io {
                path: config.ledger.dir.clone(),
                error,
            })?;
        Ok((
            Recorder {
                inner,
                thread: Mutex::new(Some((thread, exited))),
            },
            recovery,
        ))
    }

    fn send(&self, msg: Msg, wake: bool) {
        // The thread is gone: a result must still go.
        if let Err(Msg::AllocationFinished(_, ticket, _, _)) = self.inner.mailbox.post(msg, wake) {
            self.inner.release(ticket);
        }
    }

    /// `fe_id`'s reading now, if it is metered and readable.
    fn read(&self, fe_id: &str, at_ms: u64) -> Option<Sample> {
        let probe = lock(&self.inner.probes).get(fe_id).cloned()?;
        probe.read().map(|r| sample_of(r, at_ms))
    }

    pub fn worker_started(&self, info: WorkerInfo, probe: Arc<dyn Probe>) {
        let first = sample_of(probe.read().unwrap_or_default(), now_ms());
        lock(&self.inner.probes).insert(info.fe_id.clone(), probe);
        self.send(Msg::WorkerStarted(info, first), false);
    }

    pub fn worker_stopped(&self, fe_id: &str) {
        let at = now_ms();
        let last = self.read(fe_id, at);
        lock(&self.inner.probes).remove(fe_id);
        self.send(Msg::WorkerStopped(fe_id.to_string(), at, last), false);
    }

    pub fn allocation_started(&self, fe_id: &str, alloc_id: &str) {
        let at = self.read(fe_id, now_ms());
        let msg = Msg::AllocationStarted(fe_id.to_string(), alloc_id.to_string(), at);
        self.send(msg, false);
    }

    /// Records the allocation, then calls `release` (on the metering thread).
    pub fn allocation_finished(&self, done: FinishedAllocation, release: Release) {
        let at = now_ms();
        let reading = self.read(&done.fe_id, at);
        let ticket = self.inner.hold(release);
        self.send(Msg::AllocationFinished(done, ticket, at, reading), true);
    }

    /// The latest utilisation of the host's GPUs (UUID, percent), from the
    /// host's own sampling (NVML or `nvidia-smi`): from now on each worker's
    /// allocated GPU time is also metered as busy time.
    pub fn gpu_utilization(&self, gpus: Vec<(String, u32)>) {
        if !gpus.is_empty() {
            self.send(Msg::GpuUtilization(gpus), false);
        }
    }

    /// Waits (at most `timeout`) until everything sent so far is recorded
    /// and released. Past the timeout (a disk that does not answer) the
    /// results still waiting are released unrecorded: `false`.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (ack, done) = channel();
        self.send(Msg::Flush(ack), true);
        if done.recv_timeout(timeout).is_ok() {
            return true;
        }
        self.inner.release_all("metering did not catch up in time");
        false
    }

    /// Flushes, stops the thread (idle segments of live workers are recorded,
    /// the activity file saved), waiting at most about `timeout` in all; a
    /// thread stuck on its disk is left behind, its results released.
    pub fn stop(&self, timeout: Duration) {
        let started = Instant::now();
        self.flush(timeout);
        self.inner.mailbox.close();
        let Some((thread, exited)) = lock(&self.thread).take() else {
            return;
        };
        if std::thread::current().id() == thread.thread().id() {
            return; // Dropped on its own thread: it is ending anyway.
        }
        let left = timeout.saturating_sub(started.elapsed());
        match exited.recv_timeout(left) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!("the metering thread did not stop in time; left behind");
                self.inner.release_all("the metering thread did not stop");
            }
            _ => {
                let _ = thread.join();
            }
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
    inner: Arc<Inner>,
    ledger: Ledger,
    meter: Meter,
    infos: HashMap<String, WorkerInfo>,
    labeler: Labeler,
    sample_interval: Duration,
    idle_segment_max: Duration,
    commit_delay: Duration,
    group_commit: Duration,
    last_save: Instant,
    last_commit: Instant,
    /// Counters by (namespace, application, kind) label values.
    series: HashMap<(String, String, &'static str), Series>,
    /// Workers whose probe failed at the last ticks, and how many times.
    unreadable: HashMap<String, u32>,
    /// The latest utilisation of each GPU by UUID, percent.
    gpu_utilization: HashMap<String, u32>,
}

/// One batch's work: records to write, results to release after, flushes
/// to acknowledge after that.
#[derive(Default)]
struct Batch {
    records: Vec<UsageRecord>,
    releases: Vec<u64>,
    flushes: Vec<Sender<()>>,
}

impl Worker {
    fn run(mut self) {
        let mut next_tick = Instant::now() + self.sample_interval;
        loop {
            // Group commit: at most one write and fsync per interval; what
            // finishes meanwhile joins the batch.
            let (msgs, closed) = self
                .inner
                .mailbox
                .take(next_tick, self.last_commit + self.group_commit);
            let tick = Instant::now() >= next_tick;
            if tick {
                next_tick = Instant::now() + self.sample_interval;
            }
            let tickets: Vec<u64> = msgs
                .iter()
                .filter_map(|m| match m {
                    Msg::AllocationFinished(_, t, _, _) => Some(*t),
                    _ => None,
                })
                .collect();
            // Whatever panics (the meter, the ledger, the metrics), this
            // batch's results still go and the thread goes on.
            if std::panic::catch_unwind(AssertUnwindSafe(|| self.batch(msgs, tick))).is_err() {
                tracing::error!("metering panicked on a batch; its results are released");
                self.inner.metrics.errors.inc();
                for t in tickets {
                    self.inner.release(t);
                }
            }
            if closed {
                break;
            }
        }
        // Stopping: live workers' idle time so far is recorded.
        let fes: Vec<String> = self.meter.workers().map(str::to_string).collect();
        let mut b = Batch::default();
        for fe in fes {
            let last = self.probe(&fe).and_then(|p| p.read());
            self.worker_stopped(&fe, now_ms(), last.map(|r| sample_of(r, now_ms())), &mut b);
        }
        self.commit(b);
        self.save_activity();
    }

    fn probe(&self, fe: &str) -> Option<Arc<dyn Probe>> {
        lock(&self.inner.probes).get(fe).cloned()
    }

    /// Handles `msgs` (and a tick), then commits; a panic on the way still
    /// releases every result of the batch.
    fn batch(&mut self, msgs: Vec<Msg>, tick: bool) {
        let mut b = Batch::default();
        let mut work = Vec::with_capacity(msgs.len());
        for m in msgs {
            match m {
                Msg::AllocationFinished(done, ticket, at, reading) => {
                    b.releases.push(ticket);
                    work.push(Msg::AllocationFinished(done, ticket, at, reading));
                }
                Msg::Flush(ack) => b.flushes.push(ack),
                other => work.push(other),
            }
        }
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut records = Vec::new();
            for m in work {
                self.handle(m, &mut records);
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

    fn handle(&mut self, m: Msg, out: &mut Vec<UsageRecord>) {
        match m {
            Msg::WorkerStarted(info, first) => {
                // The same id again before its end was seen: the old one ends now.
                if self.meter.knows(&info.fe_id) {
                    let mut b = Batch::default();
                    self.worker_stopped(&info.fe_id, first.at_ms, None, &mut b);
                    out.append(&mut b.records);
                }
                self.meter
                    .worker_started(&info.fe_id, info.gpu_models.clone(), first);
                let util = self.utilization_of(&info.gpu_uuids);
                self.meter.set_gpu_utilization(&info.fe_id, util);
                self.infos.insert(info.fe_id.clone(), info);
            }
            Msg::AllocationStarted(fe, alloc, Some(s)) => {
                self.meter.allocation_started(&fe, &alloc, s);
            }
            // Unreadable at its start: metered from the next reading.
            Msg::AllocationStarted(fe, alloc, None) => {
                if let Some(s) = self.probe(&fe).and_then(|p| p.read()) {
                    self.meter
                        .allocation_started(&fe, &alloc, sample_of(s, now_ms()));
                }
            }
            Msg::AllocationFinished(done, _, at, reading) => {
                let used = self
                    .meter
                    .allocation_finished(&done.fe_id, &done.alloc_id, reading);
                out.push(self.allocation_record(done, used, at));
            }
            Msg::WorkerStopped(fe, at, last) => {
                let mut b = Batch::default();
                self.worker_stopped(&fe, at, last, &mut b);
                out.append(&mut b.records);
            }
            Msg::Flush(_) => {}
            Msg::GpuUtilization(gpus) => {
                self.gpu_utilization = gpus.into_iter().collect();
                for (fe, info) in &self.infos {
                    let util = self.utilization_of(&info.gpu_uuids);
                    self.meter.set_gpu_utilization(fe, util);
                }
            }
        }
    }

    /// The mean utilisation of these GPUs, if any of them is known.
    fn utilization_of(&self, uuids: &[String]) -> Option<u32> {
        let known: Vec<u32> = uuids
            .iter()
            .filter_map(|u| self.gpu_utilization.get(u).copied())
            .collect();
        let n = u32::try_from(known.len()).ok().filter(|n| *n > 0)?;
        Some(known.iter().map(|p| (*p).min(100)).sum::<u32>() / n)
    }

    fn worker_stopped(&mut self, fe: &str, at: u64, last: Option<Sample>, b: &mut Batch) {
        self.unreadable.remove(fe);
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
            let now = now_ms();
            let Some(s) = self
                .probe(&fe)
                .and_then(|p| p.read())
                .map(|r| sample_of(r, now))
            else {
                // Unreadable three ticks running: gone without a word (a
                // start that failed after the spawn); its idle time ends.
                let misses = self.unreadable.entry(fe.clone()).or_default();
                *misses += 1;
                if *misses >= 3 {
                    self.unreadable.remove(&fe);
                    lock(&self.inner.probes).remove(&fe);
                    let mut b = Batch::default();
                    self.worker_stopped(&fe, now, None, &mut b);
                    out.append(&mut b.records);
                }
                continue;
            };
            self.unreadable.remove(&fe);
            status_workers += 1;
            let since = self.meter.idle_since(&fe).unwrap_or(now);
            if now.saturating_sub(since) >= max {
                if let (Some(idle), Some(info)) =
                    (self.meter.cut_idle(&fe, s), self.infos.get(&fe).cloned())
                {
                    out.push(self.segment_record(&info, idle, now));
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
            gpu_busy_ms: used.gpu_busy_ms.into_iter().collect(),
            cost_minor: None,
            outcome: done.outcome,
            ran: done.ran,
            idle_ms: None,
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
            gpu_busy_ms: idle.gpu_busy_ms.into_iter().collect(),
            cost_minor: None,
            outcome: String::new(),
            ran: false,
            idle_ms: Some(idle.idle_ms),
        })
    }

    /// Writes the batch's records with one fsync, counts them, then releases
    /// the results and acknowledges flushes, in that order.
    fn commit(&mut self, b: Batch) {
        if !b.records.is_empty() {
            self.last_commit = Instant::now();
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
                // Only what was written counts (a second record of an id
                // already in the ledger was refused).
                Ok(flags) => {
                    let new: Vec<UsageRecord> = b
                        .records
                        .into_iter()
                        .zip(flags)
                        .filter_map(|(r, w)| w.then_some(r))
                        .collect();
                    self.count(&new);
                }
                Err(e) => {
                    tracing::error!(error = %e, records = b.records.len(), "usage records not written; results released");
                    self.inner.metrics.errors.inc();
                    let mut st = lock(&self.inner.status);
                    st.write_errors += 1;
                    st.last_error = Some(e.to_string());
                }
            }
        }
        for ticket in b.releases {
            self.inner.release(ticket);
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
            let kind = match r.kind {
                RecordKind::Allocation => "allocation",
                RecordKind::WorkerSegment => "idle",
            };
            let metrics = &self.inner.metrics;
            self.series
                .entry((ns, app, kind))
                .or_insert_with_key(|(ns, app, kind)| metrics.series(ns, app, kind))
                .count(metrics, r);
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
        /// With `.1`: unreadable to callers, and a panic on the metering
        /// thread (which reads an allocation its caller could not).
        fn read(&self) -> Option<Reading> {
            if self.1 {
                let on_thread = std::thread::current().name() == Some("steward-metering");
                assert!(!on_thread, "a probe that panics");
                return None;
            }
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
            gpu_uuids: Vec::new(),
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
        // Processing the start panics, in the same batch as the finish.
        rec.allocation_started("w", "a");
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
    fn a_flush_past_its_timeout_releases_what_waits_exactly_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut c = RecorderConfig::new(tmp.path());
        // A disk that takes a second per write.
        c.commit_delay = Duration::from_secs(1);
        let rec = Recorder::start(c, &mut Registry::default())
            .expect("start")
            .0;
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = calls.clone();
        rec.allocation_finished(
            done("a", "w"),
            Box::new(move || {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        );
        assert!(!rec.flush(Duration::from_millis(100)), "the disk is slow");
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "released by the flush"
        );
        // The write completes later; the result is not released twice.
        assert!(rec.flush(Duration::from_secs(5)));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(rec.status().last_error.is_some());
        rec.stop(Duration::from_secs(5));
    }

    #[test]
    fn the_same_allocation_finished_again_is_neither_written_nor_counted_twice() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rec = start(tmp.path());
        for _ in 0..2 {
            rec.allocation_finished(done("again", "w"), Box::new(|| {}));
            assert!(rec.flush(Duration::from_secs(5)));
        }
        assert_eq!(
            read_records(&tmp.path().join("usage")).expect("read").len(),
            1
        );
        assert_eq!(rec.status().records_written, 1);
        let tasks: u64 = rec.activity().iter().map(|d| d.tasks).sum();
        assert_eq!(tasks, 1);
        rec.stop(Duration::from_secs(5));
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
