//! The recorder: metering done where the events happen, and one
//! `steward-metering` thread that makes the records durable.
//!
//! A hook (worker started or stopped, allocation started or finished)
//! reads the worker's counters (two `pread`s where the probe keeps its
//! files open) and updates the [`Meter`] under one lock, on the caller's
//! thread; a finished allocation's record is priced there and queued, and
//! the caller gets a commit ticket. Nothing crosses to another thread per
//! allocation. The thread writes what is queued with one `write` and one
//! `fdatasync` (a group commit: at most one per window while records keep
//! coming; the first after a quiet spell goes at once), then raises the
//! durable ticket and tells the reporter; a result leaves the agent only
//! once the durable ticket has reached its own. The thread also samples
//! every worker each second and cuts long idle segments.
//!
//! No result is held forever: the durable ticket is raised after the
//! write, after a panic while writing, by a flush that gives up waiting,
//! once the oldest waiting result has waited past the stall limit (a disk
//! that hangs or keeps failing; from then on, until a write succeeds,
//! results wait for nothing), and when the thread ends; a hook that panics
//! or runs after the thread ended hands out ticket 0, which never waits.
//!
//! No record is thrown away while there is room: a write that fails (a
//! full disk, an I/O error) puts its records back at the head of the queue,
//! and the thread retries with backoff ([`RETRY_BACKOFF_MIN`] doubling to
//! [`RETRY_BACKOFF_MAX`]); the ledger refuses a second record for an id, so
//! a retry never writes one twice. The queue holds at most
//! [`RecorderConfig::backlog_records`]; past that the oldest records go,
//! counted (`steward_usage_ledger_dropped_records`) and said in an event.
//! While writes fail, [`Recorder::ledger_trouble`] says so (the health
//! probe's degraded list) and `steward_usage_ledger_unwritten_records`
//! counts the records that wait.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::activity::{Activity, Day};
use crate::ledger::{BatchError, Ledger, LedgerConfig, LedgerError, Recovery};
use crate::meter::{Accrued, Meter, Sample};
use crate::price::PriceCard;
use crate::record::{RecordKind, UsageRecord, bound_names};

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
    /// finishes within it. A result waits for it only while others still
    /// run and finishes have been coming less than half a window apart;
    /// otherwise it is committed at once. Longer trades result latency
    /// under load for agent CPU.
    pub group_commit: Duration,
    /// Fault injection: a slow disk, waited before each batch is written
    /// (tests widen the window in which a crash can strike).
    pub commit_delay: Duration,
    /// A commit that has not returned after this long (a disk that hangs)
    /// is given up on when the reporter next asks: results go unrecorded
    /// rather than wait on the disk. So is a write that keeps failing:
    /// its results wait this long for a retry to succeed.
    pub stall_limit: Duration,
    /// Most records kept in memory for the ledger ([`BACKLOG_RECORDS`]):
    /// those not yet written, and those whose write failed and waits for a
    /// retry. Past it the oldest go, counted and said.
    pub backlog_records: usize,
}

/// Default of [`RecorderConfig::backlog_records`]: at a few hundred bytes
/// a record (names are bounded, see `record.rs`), tens of MB at most; at a
/// hundred results a second, eight minutes of a full disk.
pub const BACKLOG_RECORDS: usize = 50_000;
/// The first retry of a failed ledger write comes this long after it.
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Retries of a failed ledger write double their wait up to this.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);

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
            stall_limit: Duration::from_secs(10),
            group_commit: Duration::from_millis(20),
            backlog_records: BACKLOG_RECORDS,
        }
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
    unwritten: Gauge,
    dropped: Counter,
    cut: Counter,
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
            unwritten: Gauge::default(),
            dropped: Counter::default(),
            cut: Counter::default(),
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
            "Failed ledger writes (their records wait in memory for a retry) and metering failures",
            self.errors.clone(),
        );
        r.register(
            "usage_ledger_unwritten_records",
            "Usage records in memory waiting for the ledger after a failed write (0 while writes succeed)",
            self.unwritten.clone(),
        );
        r.register(
            "usage_ledger_dropped_records",
            "Usage records dropped, their usage lost: the oldest, when the queue for the ledger was full",
            self.dropped.clone(),
        );
        r.register(
            "usage_ledger_cut_records",
            "Usage records whose names were cut to their bounds or the ledger's frame limit",
            self.cut.clone(),
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
    /// Records in memory waiting for the ledger after a failed write (0
    /// while writes succeed).
    pub unwritten_records: u64,
    /// Failed writes in a row (0 once one succeeds).
    pub failed_attempts: u64,
    /// Records dropped because the queue for the ledger was full.
    pub dropped_records: u64,
    /// Records whose names were cut to the bounds or the frame limit.
    pub cut_records: u64,
}

/// How the metering thread waits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Waiting {
    /// Not waiting (working), or already woken.
    #[default]
    No,
    /// Nothing pending: until its next tick.
    Idle,
    /// Records pending: until the group-commit window is over.
    Window,
    /// Records pending after a failed write: until the retry is due.
    Backoff,
}

/// What the hooks and the thread share under one lock: the meter, the
/// workers' probes, and the records waiting for their commit.
#[derive(Default)]
struct Books {
    meter: Meter,
    infos: HashMap<String, WorkerInfo>,
    probes: HashMap<String, Arc<dyn Probe>>,
    /// Workers whose probe failed at the last ticks, and how many times.
    unreadable: HashMap<String, u32>,
    /// The latest utilisation of each GPU by UUID, percent.
    gpu_utilization: HashMap<String, u32>,
    /// What each live worker's records cost so far (minor units), from
    /// its start or adoption: the page's "cost so far".
    costs: HashMap<String, i64>,
    /// Records made and not yet taken by the thread, oldest first (those
    /// of a failed write back at the head), at most `cap`.
    pending: VecDeque<UsageRecord>,
    cap: usize,
    /// Whether the last write failed (its records wait in `pending`).
    failing: bool,
    /// Records dropped because `pending` was full.
    dropped: u64,
    /// The last commit ticket handed out.
    issued: u64,
    /// Batches the thread has taken, and of those, finished.
    taken: u64,
    finished: u64,
    /// A flush asks for a commit now, whatever the window.
    urgent: bool,
    /// How the thread waits, which says whether a record must wake it.
    waiting: Waiting,
    /// When the last allocation finished, and the mean gap between
    /// finishes (µs, a moving average): whether a window would gather more.
    last_finish: Option<Instant>,
    mean_gap_us: Option<u64>,
    /// The group-commit window.
    window: Duration,
    /// Callers waiting in a flush.
    flushers: usize,
    closed: bool,
}

struct Inner {
    books: Mutex<Books>,
    /// Wakes the thread: a first record after a quiet spell, a flush, the close.
    work: Condvar,
    /// Wakes flushers after a commit.
    committed: Condvar,
    /// The last ticket whose record is on disk (or given up on).
    durable: AtomicU64,
    /// Told each time `durable` advances (the reporter, to send results).
    on_durable: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Told of the ledger's trouble (the agent's event ring).
    on_event: OnceLock<EventSink>,
    /// Since when the oldest result not yet durable has waited, in ms
    /// after `epoch` plus one (0: none waits). Past `stall_limit` (the
    /// thread stuck on its disk, wherever) the results are let go.
    waiting_since: AtomicU64,
    /// Whether a stall was declared (logged once) and no write has
    /// succeeded since: results then wait for nothing.
    stall_logged: std::sync::atomic::AtomicBool,
    epoch: Instant,
    stall_limit: Duration,
    card: RwLock<Option<PriceCard>>,
    activity: Mutex<Activity>,
    status: Mutex<RecorderStatus>,
    metrics: UsageMetrics,
}

/// Where the ledger's events go: (kind, message).
pub type EventSink = Box<dyn Fn(&'static str, String) + Send + Sync>;

/// Handle to the metering thread.
pub struct Recorder {
    inner: Arc<Inner>,
    /// The thread, and a channel that disconnects when it has ended.
    thread: Mutex<Option<(std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<()>)>>,
}

/// When the thread ends (stopped, or a panic outside a batch): nothing is
/// metered any more and every result still waiting goes.
struct ThreadGuard(Arc<Inner>, #[allow(dead_code)] Sender<()>);

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        {
            let mut b = lock(&self.0.books);
            b.closed = true;
            let lost = b.pending.len();
            if lost > 0 {
                // A ledger that still failed at the stop.
                self.0.metrics.dropped.inc_by(lost as u64);
                b.dropped += lost as u64;
                lock(&self.0.status).dropped_records = b.dropped;
                tracing::error!(
                    records = lost,
                    "usage records never written: the ledger still failed when metering stopped"
                );
            }
            b.pending.clear();
            b.finished = u64::MAX;
            self.0.committed.notify_all();
        }
        self.0.give_up("the metering thread ended", true);
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
    fn since_epoch_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Notes that results wait from now (unless older ones already do).
    fn note_waiting(&self, fresh: bool) {
        let now = self.since_epoch_ms().saturating_add(1);
        if fresh {
            self.waiting_since.store(now, Ordering::Relaxed);
        } else {
            let _ =
                self.waiting_since
                    .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Whether the oldest waiting result has waited past the stall limit,
    /// or waits at all once a stall was declared and no write succeeded
    /// since (results keep flowing while the disk is still stuck).
    fn stalled(&self) -> bool {
        let since = self.waiting_since.load(Ordering::Relaxed);
        let limit = u64::try_from(self.stall_limit.as_millis()).unwrap_or(u64::MAX);
        since != 0
            && (self.stall_logged.load(Ordering::Relaxed)
                || self
                    .since_epoch_ms()
                    .saturating_add(1)
                    .saturating_sub(since)
                    > limit)
    }

    /// Tells the agent of the ledger's trouble (and logs it).
    fn event(&self, kind: &'static str, message: String) {
        tracing::warn!(kind, "{message}");
        if let Some(sink) = self.on_event.get()
            && std::panic::catch_unwind(AssertUnwindSafe(|| sink(kind, message))).is_err()
        {
            tracing::error!("telling the agent of a usage ledger event panicked");
        }
    }

    /// Raises the durable ticket to `ticket`, and tells the reporter.
    fn advance(&self, ticket: u64) {
        if self.durable.fetch_max(ticket, Ordering::SeqCst) < ticket
            && let Some(wake) = self.on_durable.get()
            && std::panic::catch_unwind(AssertUnwindSafe(wake)).is_err()
        {
            tracing::error!("telling the reporter of a commit panicked");
        }
    }

    /// Lets every result still waiting go, recorded or not; how many. Said
    /// (logged and counted) when `say`.
    fn give_up(&self, why: &str, say: bool) -> u64 {
        let issued = {
            let b = lock(&self.books);
            self.waiting_since.store(0, Ordering::Relaxed);
            b.issued
        };
        let waiting = issued.saturating_sub(self.durable.load(Ordering::SeqCst));
        if waiting > 0 && say {
            tracing::error!(
                results = waiting,
                "{why}: results released before their usage records were durable"
            );
            self.metrics.errors.inc();
            let mut st = lock(&self.status);
            st.write_errors += 1;
            st.last_error = Some(format!("{why}: {waiting} results released unrecorded"));
        }
        self.advance(issued);
        waiting
    }

    /// Prices the record (by its whole names), then bounds its names (see
    /// [`bound_names`]): what waits in memory for the ledger is bounded.
    fn price(&self, mut r: UsageRecord) -> UsageRecord {
        let card = self
            .card
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.cost_minor = card.as_ref().map(|c| c.cost(&r));
        drop(card);
        if bound_names(&mut r) {
            self.metrics.cut.inc();
            lock(&self.status).cut_records += 1;
        }
        r
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
            books: Mutex::new(Books {
                window: config.group_commit,
                cap: config.backlog_records.max(1),
                ..Books::default()
            }),
            work: Condvar::new(),
            committed: Condvar::new(),
            durable: AtomicU64::new(0),
            on_durable: OnceLock::new(),
            on_event: OnceLock::new(),
            waiting_since: AtomicU64::new(0),
            stall_logged: std::sync::atomic::AtomicBool::new(false),
            epoch: Instant::now(),
            stall_limit: config.stall_limit,
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
        let committer = Committer {
            inner: inner.clone(),
            ledger,
            labeler,
            sample_interval: config.sample_interval.max(Duration::from_millis(10)),
            idle_segment_max: config.idle_segment_max,
            commit_delay: config.commit_delay,
            last_save: Instant::now(),
            last_commit: Instant::now(),
            series: HashMap::new(),
            backoff: RETRY_BACKOFF_MIN,
            retry_at: None,
            episode: None,
            cut_seen: 0,
            dropped_seen: 0,
            dropped_at_success: 0,
        };
        let (exited_tx, exited) = channel::<()>();
        let thread = std::thread::Builder::new()
            .name("steward-metering".into())
            .spawn(move || {
                let guard = ThreadGuard(committer.inner.clone(), exited_tx);
                committer.run();
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

    /// Runs `f` on the books, unless the thread has ended. Metering must
    /// never take its caller down: a panic in `f` is caught and counted.
    fn with_books<T>(&self, f: impl FnOnce(&mut Books, &Inner) -> T) -> Option<T> {
        let mut b = lock(&self.inner.books);
        if b.closed {
            return None;
        }
        let inner = &*self.inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut b, inner))) {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::error!("metering panicked on an event; its allocation goes unrecorded");
                self.inner.metrics.errors.inc();
                None
            }
        }
    }

    pub fn worker_started(&self, info: WorkerInfo, probe: Arc<dyn Probe>) {
        self.with_books(|b, inner| {
            let first = sample_of(probe.read().unwrap_or_default(), now_ms());
            b.begin(info, probe, first, inner);
        });
    }

    /// A worker adopted from an earlier run that never said it stopped:
    /// metered from `since` (a reading the earlier run kept) instead of
    /// now, so the allocations running on it are metered from their start.
    pub fn worker_adopted(&self, info: WorkerInfo, probe: Arc<dyn Probe>, since: Option<Sample>) {
        let Some(first) = since else {
            return self.worker_started(info, probe);
        };
        self.with_books(|b, inner| b.begin(info, probe, first, inner));
    }

    /// An allocation that was running on an adopted worker, metered from
    /// the reading `at` its start left on record (now, without one).
    pub fn allocation_resumed(&self, fe_id: &str, alloc_id: &str, at: Option<Sample>) {
        let Some(at) = at else {
            return self.allocation_started(fe_id, alloc_id);
        };
        self.with_books(|b, _| b.meter.allocation_started(fe_id, alloc_id, at));
    }

    pub fn worker_stopped(&self, fe_id: &str) {
        self.with_books(|b, inner| {
            let at = now_ms();
            let last = b.read(fe_id, at);
            b.probes.remove(fe_id);
            b.worker_stopped(fe_id, at, last, inner);
            b.nudge(inner);
        });
    }

    /// Unreadable at its start (a worker going away), an allocation is
    /// metered nothing.
    pub fn allocation_started(&self, fe_id: &str, alloc_id: &str) {
        self.with_books(|b, _| {
            if let Some(s) = b.read(fe_id, now_ms()) {
                b.meter.allocation_started(fe_id, alloc_id, s);
            }
        });
    }

    /// Meters the allocation and queues its record: the commit ticket its
    /// result waits for (see [`Recorder::durable`]); 0 waits for nothing.
    pub fn allocation_finished(&self, done: FinishedAllocation) -> u64 {
        self.with_books(|b, inner| {
            let at = now_ms();
            let reading = b.read(&done.fe_id, at);
            let used = b
                .meter
                .allocation_finished(&done.fe_id, &done.alloc_id, reading);
            b.push(allocation_record(inner, done, used, at), inner);
            b.issued += 1;
            inner.note_waiting(false);
            b.finished_one();
            if b.waiting == Waiting::Idle {
                b.waiting = Waiting::No;
                inner.work.notify_one();
            }
            b.nudge(inner);
            b.issued
        })
        .unwrap_or(0)
    }

    /// The last commit ticket whose record is on disk, or was given up on
    /// (a failed write, a flush past its timeout, a commit stalled past
    /// the stall limit, the thread gone).
    pub fn durable(&self) -> u64 {
        if self.inner.stalled() {
            let first = !self.inner.stall_logged.swap(true, Ordering::Relaxed);
            self.inner
                .give_up("the usage ledger's disk has not answered in time", first);
        }
        self.inner.durable.load(Ordering::SeqCst)
    }

    /// `wake` is called, on the metering thread, each time the durable
    /// ticket advances. Set once; a second call is ignored.
    pub fn on_durable(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let _ = self.inner.on_durable.set(wake);
    }

    /// `sink` is told, on the metering thread, of the ledger's trouble:
    /// `usage_ledger_write_failed` (how many records wait),
    /// `usage_ledger_records_dropped` and `usage_ledger_write_resumed`.
    /// Set once; a second call is ignored.
    pub fn on_event(&self, sink: EventSink) {
        let _ = self.inner.on_event.set(sink);
    }

    /// Why the ledger is behind, if it is: writes failing (how many
    /// records wait), or a commit that has not answered past the stall
    /// limit. For the health probe, which reports it as degraded rather
    /// than down: a restart brings no disk space back and would lose the
    /// records waiting in memory.
    pub fn ledger_trouble(&self) -> Option<String> {
        let st = lock(&self.inner.status);
        if st.failed_attempts > 0 {
            return Some(format!(
                "usage ledger: {} records wait in memory after {} failed writes ({}); {} dropped since start",
                st.unwritten_records,
                st.failed_attempts,
                st.last_error.as_deref().unwrap_or("no error kept"),
                st.dropped_records
            ));
        }
        drop(st);
        self.inner.stall_logged.load(Ordering::Relaxed).then(|| {
            format!(
                "usage ledger: a commit has not answered within {:?}; results go without waiting for their records",
                self.inner.stall_limit
            )
        })
    }

    /// The latest utilisation of the host's GPUs (UUID, percent), from the
    /// host's own sampling (NVML or `nvidia-smi`): from now on each worker's
    /// allocated GPU time is also metered as busy time.
    pub fn gpu_utilization(&self, gpus: Vec<(String, u32)>) {
        if gpus.is_empty() {
            return;
        }
        self.with_books(|b, _| {
            b.gpu_utilization = gpus.into_iter().collect();
            let utils: Vec<(String, Option<u32>)> = b
                .infos
                .iter()
                .map(|(fe, info)| (fe.clone(), b.utilization_of(&info.gpu_uuids)))
                .collect();
            for (fe, util) in utils {
                b.meter.set_gpu_utilization(&fe, util);
            }
        });
    }

    /// Waits (at most `timeout`) until everything metered so far is on
    /// disk. Past the timeout (a disk that does not answer) the results
    /// still waiting are let go unrecorded: `false`.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut b = lock(&self.inner.books);
        let target = if b.pending.is_empty() {
            b.taken
        } else {
            b.taken + 1
        };
        if b.finished >= target {
            return true;
        }
        b.urgent = !b.pending.is_empty();
        self.inner.work.notify_one();
        b.flushers += 1;
        while b.finished < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            b = self
                .inner
                .committed
                .wait_timeout(b, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        b.flushers -= 1;
        let done = b.finished >= target;
        drop(b);
        if done {
            return true;
        }
        self.inner
            .give_up("metering did not catch up in time", true);
        false
    }

    /// Flushes, stops the thread (idle segments of live workers are recorded,
    /// the activity file saved), waiting at most about `timeout` in all; a
    /// thread stuck on its disk is left behind, its results let go.
    pub fn stop(&self, timeout: Duration) {
        let started = Instant::now();
        let on_own_thread = lock(&self.thread)
            .as_ref()
            .is_some_and(|(t, _)| t.thread().id() == std::thread::current().id());
        if on_own_thread {
            // Dropped on its own thread (it cannot flush itself): let go.
            lock(&self.inner.books).closed = true;
            self.inner
                .give_up("metering was stopped on its own thread", true);
            return;
        }
        self.flush(timeout);
        {
            let mut b = lock(&self.inner.books);
            b.closed = true;
            self.inner.work.notify_one();
        }
        let Some((thread, exited)) = lock(&self.thread).take() else {
            return;
        };
        let left = timeout.saturating_sub(started.elapsed());
        match exited.recv_timeout(left) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!("the metering thread did not stop in time; left behind");
                self.inner.give_up("the metering thread did not stop", true);
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

    /// Prices records from now on (records already made keep their cost).
    pub fn set_price_card(&self, card: Option<PriceCard>) {
        self.inner.metrics.set_card(card.as_ref());
        *self
            .inner
            .card
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = card;
    }

    /// What each live worker's usage records cost so far by the price
    /// card (minor units), since it started or was adopted; the piece
    /// still open (a running allocation, the idle time not yet cut) is not
    /// in it.
    pub fn worker_costs(&self) -> HashMap<String, i64> {
        lock(&self.inner.books).costs.clone()
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

/// Past this mean gap between finishes, waiting would gather nothing.
const GATHER_GAP_SHARE: u64 = 2;

impl Books {
    /// Meters worker `info` from reading `first` (started now, or adopted
    /// with a reading an earlier run kept).
    fn begin(&mut self, info: WorkerInfo, probe: Arc<dyn Probe>, first: Sample, inner: &Inner) {
        // The same id again before its end was seen: the old one ends now.
        if self.meter.knows(&info.fe_id) {
            self.worker_stopped(&info.fe_id, first.at_ms, None, inner);
        }
        self.meter
            .worker_started(&info.fe_id, info.gpu_models.clone(), first);
        let util = self.utilization_of(&info.gpu_uuids);
        self.meter.set_gpu_utilization(&info.fe_id, util);
        self.probes.insert(info.fe_id.clone(), probe);
        self.costs.insert(info.fe_id.clone(), 0);
        self.infos.insert(info.fe_id.clone(), info);
        self.nudge(inner);
    }

    /// Queues a record for the ledger.
    fn push(&mut self, r: UsageRecord, inner: &Inner) {
        if let Some(c) = r.cost_minor
            && let Some(total) = self.costs.get_mut(&r.function_executor_id)
        {
            *total = total.saturating_add(c);
        }
        self.pending.push_back(r);
        self.bound(inner);
    }

    /// Drops the oldest records past the cap (counted, and said by the
    /// thread at its next commit), and keeps the count of records waiting
    /// after a failed write current.
    fn bound(&mut self, inner: &Inner) {
        let over = self.pending.len().saturating_sub(self.cap);
        if over > 0 {
            self.pending.drain(..over);
            self.dropped += over as u64;
            inner.metrics.dropped.inc_by(over as u64);
            lock(&inner.status).dropped_records = self.dropped;
        }
        if self.failing {
            inner.metrics.unwritten.set(self.pending.len() as i64);
            lock(&inner.status).unwritten_records = self.pending.len() as u64;
        }
    }

    /// Notes a finish for the mean gap between finishes.
    fn finished_one(&mut self) {
        let now = Instant::now();
        if let Some(last) = self.last_finish {
            let gap = u64::try_from(now.duration_since(last).as_micros()).unwrap_or(u64::MAX);
            self.mean_gap_us = Some(match self.mean_gap_us {
                Some(mean) => (mean.saturating_mul(7) / 8).saturating_add(gap / 8),
                None => gap,
            });
        }
        self.last_finish = Some(now);
    }

    /// Whether the group-commit window is worth waiting for: allocations
    /// still run, and they have been finishing close together (else a
    /// result would wait for nothing, as a lone request's does).
    fn worth_waiting(&self) -> bool {
        let window_us = u64::try_from(self.window.as_micros()).unwrap_or(u64::MAX);
        self.meter.running() > 0
            && self
                .mean_gap_us
                .is_some_and(|gap| gap.saturating_mul(GATHER_GAP_SHARE) < window_us)
    }

    /// Wakes a thread waiting out the window once the window is no longer
    /// worth waiting for (the last allocation running finished or went).
    fn nudge(&mut self, inner: &Inner) {
        if self.waiting == Waiting::Window && !self.worth_waiting() {
            self.waiting = Waiting::No;
            inner.work.notify_one();
        }
    }

    /// `fe`'s reading now, if it is metered and readable.
    fn read(&self, fe: &str, at_ms: u64) -> Option<Sample> {
        let r = self.probes.get(fe)?.read()?;
        Some(sample_of(r, at_ms))
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

    /// The worker ended: its idle segment is queued.
    fn worker_stopped(&mut self, fe: &str, at: u64, last: Option<Sample>, inner: &Inner) {
        self.unreadable.remove(fe);
        let idle = self.meter.worker_stopped(fe, last);
        let info = self.infos.remove(fe);
        if let (Some(idle), Some(info)) = (idle, info) {
            self.push(segment_record(inner, &info, idle, at), inner);
        }
        self.costs.remove(fe);
    }

    /// Samples every worker; cuts idle segments that grew too long.
    fn tick(&mut self, inner: &Inner, idle_segment_max: Duration) {
        let fes: Vec<String> = self.meter.workers().map(str::to_string).collect();
        let max = idle_segment_max.as_millis() as u64;
        let mut readable = 0;
        for fe in fes {
            let now = now_ms();
            let Some(s) = self.read(&fe, now) else {
                // Unreadable three ticks running: gone without a word (a
                // start that failed after the spawn); its idle time ends.
                let misses = self.unreadable.entry(fe.clone()).or_default();
                *misses += 1;
                if *misses >= 3 {
                    self.probes.remove(&fe);
                    self.worker_stopped(&fe, now, None, inner);
                }
                continue;
            };
            self.unreadable.remove(&fe);
            readable += 1;
            let since = self.meter.idle_since(&fe).unwrap_or(now);
            if now.saturating_sub(since) < max {
                self.meter.sample(&fe, s);
            } else if let (Some(idle), Some(info)) =
                (self.meter.cut_idle(&fe, s), self.infos.get(&fe))
            {
                let r = segment_record(inner, info, idle, now);
                self.push(r, inner);
            }
        }
        lock(&inner.status).workers_metered = readable;
    }

    /// Stopping: every live worker's idle time so far is queued.
    fn close_workers(&mut self, inner: &Inner) {
        let fes: Vec<String> = self.meter.workers().map(str::to_string).collect();
        for fe in fes {
            let at = now_ms();
            let last = self.read(&fe, at);
            self.worker_stopped(&fe, at, last, inner);
        }
    }
}

fn allocation_record(
    inner: &Inner,
    done: FinishedAllocation,
    used: Option<Accrued>,
    at: u64,
) -> UsageRecord {
    let used = used.unwrap_or(Accrued {
        started_ms: at,
        ..Accrued::default()
    });
    let who = [done.fe_id, done.namespace, done.application, done.function];
    inner.price(UsageRecord {
        outcome: done.outcome,
        ran: done.ran,
        ..record_of(RecordKind::Allocation, done.alloc_id, who, used, at)
    })
}

fn segment_record(inner: &Inner, info: &WorkerInfo, idle: Accrued, at: u64) -> UsageRecord {
    let id = format!("{}@{}", info.fe_id, idle.started_ms);
    let idle_ms = idle.idle_ms;
    let who = [
        info.fe_id.clone(),
        info.namespace.clone(),
        info.application.clone(),
        info.function.clone(),
    ];
    inner.price(UsageRecord {
        idle_ms: Some(idle_ms),
        ..record_of(RecordKind::WorkerSegment, id, who, idle, at)
    })
}

/// What `used` accrued until `at`, for the worker, namespace, application
/// and function in `who`; unpriced, without an outcome.
fn record_of(
    kind: RecordKind,
    id: String,
    who: [String; 4],
    used: Accrued,
    at: u64,
) -> UsageRecord {
    let [function_executor_id, namespace, application, function] = who;
    UsageRecord {
        kind,
        id,
        function_executor_id,
        namespace,
        application,
        function,
        started_unix_ms: used.started_ms.min(at),
        ended_unix_ms: at,
        cpu_core_us: used.cpu_core_us,
        memory_mb_ms: used.memory_mb_ms,
        peak_memory_bytes: used.peak_memory_bytes,
        gpu_ms: used.gpu_ms.into_iter().collect(),
        gpu_busy_ms: used.gpu_busy_ms.into_iter().collect(),
        cost_minor: None,
        outcome: String::new(),
        ran: false,
        idle_ms: None,
    }
}

/// The metering thread: ticks, and commits what the hooks queued.
struct Committer {
    inner: Arc<Inner>,
    ledger: Ledger,
    labeler: Labeler,
    sample_interval: Duration,
    idle_segment_max: Duration,
    commit_delay: Duration,
    last_save: Instant,
    last_commit: Instant,
    /// Counters by (namespace, application, kind) label values.
    series: HashMap<(String, String, &'static str), Series>,
    /// The wait before the next retry of a failed write, and when it is due.
    backoff: Duration,
    retry_at: Option<Instant>,
    /// Since the first of the writes failing now, if they are.
    episode: Option<Episode>,
    /// Records cut in their names, as last counted.
    cut_seen: u64,
    /// Records dropped for a full queue, as last said, and as of the
    /// last write that succeeded.
    dropped_seen: u64,
    dropped_at_success: u64,
}

/// A stretch of failing ledger writes.
struct Episode {
    since: Instant,
    attempts: u64,
    /// Records dropped (queue full) by the last write that succeeded
    /// before it, and whether a drop in it was said.
    dropped_before: u64,
    drop_said: bool,
}

/// What one commit takes: the records, the last ticket they cover, and
/// whether the recorder is closing.
struct Taken {
    records: VecDeque<UsageRecord>,
    through: u64,
    closed: bool,
}

impl Committer {
    fn run(mut self) {
        let mut next_tick = Instant::now() + self.sample_interval;
        loop {
            let taken = self.take(&mut next_tick);
            let closed = taken.closed;
            self.commit(taken);
            if closed {
                break;
            }
            if self.last_save.elapsed() >= Duration::from_secs(10) {
                self.save_activity();
            }
        }
        self.save_activity();
    }

    /// Waits for a batch, ticking on the way: records queued, and the
    /// group-commit window over, or not worth waiting for (nothing else
    /// running, or finishes too far apart), or a flush. After a failed
    /// write, nothing goes before its retry is due, unless a flush asks.
    fn take(&mut self, next_tick: &mut Instant) -> Taken {
        let inner = self.inner.clone();
        let mut b = lock(&inner.books);
        loop {
            let now = Instant::now();
            if b.closed {
                let books = &mut *b;
                guarded(&inner, || books.close_workers(&inner));
                break;
            }
            if now >= *next_tick {
                *next_tick = now + self.sample_interval;
                let books = &mut *b;
                guarded(&inner, || books.tick(&inner, self.idle_segment_max));
            }
            let window_over = self.last_commit + b.window;
            let retry = self.retry_at.filter(|at| now < *at);
            if !b.pending.is_empty()
                && (b.urgent || (retry.is_none() && (now >= window_over || !b.worth_waiting())))
            {
                break;
            }
            let (until, waiting) = match retry {
                _ if b.pending.is_empty() => (*next_tick, Waiting::Idle),
                Some(at) => (at.min(*next_tick), Waiting::Backoff),
                None => (window_over.min(*next_tick), Waiting::Window),
            };
            b.waiting = waiting;
            b = inner
                .work
                .wait_timeout(b, until.saturating_duration_since(now))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
            b.waiting = Waiting::No;
        }
        b.urgent = false;
        b.taken += 1;
        Taken {
            records: std::mem::take(&mut b.pending),
            through: b.issued,
            closed: b.closed,
        }
    }

    /// Writes the records with one fsync and counts them, then raises the
    /// durable ticket, then wakes flushers, in that order. A panic on the
    /// way still raises it. A failed write raises nothing: its records go
    /// back to the head of the queue for a retry, and their results wait
    /// (at most the stall limit, see [`Inner::stalled`]).
    fn commit(&mut self, taken: Taken) {
        let mut unwritten = VecDeque::new();
        if !taken.records.is_empty() {
            self.last_commit = Instant::now();
            let records = taken.records;
            match std::panic::catch_unwind(AssertUnwindSafe(|| self.write(records))) {
                Ok(left) => unwritten = left,
                Err(_) => {
                    tracing::error!("metering panicked writing a batch; its results are released");
                    self.inner.metrics.errors.inc();
                }
            }
        }
        let failed = !unwritten.is_empty();
        if !failed {
            self.inner.advance(taken.through);
        }
        let mut b = lock(&self.inner.books);
        if failed {
            // Older than anything queued meanwhile: back at the head. The
            // results waiting keep their place in the stall clock.
            unwritten.append(&mut b.pending);
            b.pending = unwritten;
            b.failing = true;
            b.bound(&self.inner);
        } else {
            // What was issued during the commit waits from now; nothing else does.
            if b.issued > taken.through {
                self.inner.note_waiting(true);
            } else {
                self.inner.waiting_since.store(0, Ordering::Relaxed);
            }
            self.inner.stall_logged.store(false, Ordering::Relaxed);
            b.finished = b.finished.max(b.taken);
            self.dropped_at_success = b.dropped;
            if b.failing {
                b.failing = false;
                self.inner.metrics.unwritten.set(0);
                lock(&self.inner.status).unwritten_records = 0;
            }
        }
        let (dropped, waiting) = (b.dropped, b.pending.len());
        if b.flushers > 0 {
            self.inner.committed.notify_all();
        }
        drop(b);
        self.say_drops(dropped, waiting);
    }

    /// Writes the records and counts those written; the rest, when the
    /// write failed (a retry is then scheduled).
    fn write(&mut self, records: VecDeque<UsageRecord>) -> VecDeque<UsageRecord> {
        if !self.commit_delay.is_zero() {
            std::thread::sleep(self.commit_delay);
        }
        let records = Vec::from(records);
        let started = Instant::now();
        let written = self.ledger.append_batch(&records);
        self.inner
            .metrics
            .commit
            .observe(started.elapsed().as_secs_f64());
        let (flags, error) = match written {
            Ok(flags) => (flags, None),
            Err(BatchError { written, error }) => (written, Some(error)),
        };
        // Only what was written counts (a second record of an id already in
        // the ledger was refused; the rest of a failed write waits).
        let (new, left): (Vec<_>, Vec<_>) = records.into_iter().zip(flags).partition(|(_, w)| *w);
        let new: Vec<UsageRecord> = new.into_iter().map(|(r, _)| r).collect();
        self.count(&new);
        let cut = self.ledger.records_cut();
        if cut > self.cut_seen {
            self.inner.metrics.cut.inc_by(cut - self.cut_seen);
            lock(&self.inner.status).cut_records += cut - self.cut_seen;
            self.cut_seen = cut;
        }
        match error {
            None => {
                self.resumed();
                VecDeque::new()
            }
            Some(e) => {
                // A failed write whose records were all refused as already
                // recorded leaves nothing to retry.
                let left: VecDeque<UsageRecord> = left.into_iter().map(|(r, _)| r).collect();
                self.failed(&e, left.len());
                if left.is_empty() {
                    self.resumed();
                }
                left
            }
        }
    }

    /// A write failed with `waiting` records left: counted, said once per
    /// stretch of failures, and retried after the backoff.
    fn failed(&mut self, e: &LedgerError, waiting: usize) {
        self.inner.metrics.errors.inc();
        {
            let mut st = lock(&self.inner.status);
            st.write_errors += 1;
            st.failed_attempts += 1;
            st.last_error = Some(e.to_string());
        }
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(RETRY_BACKOFF_MAX);
        match &mut self.episode {
            Some(ep) => {
                ep.attempts += 1;
                tracing::debug!(error = %e, records = waiting, attempts = ep.attempts, "usage ledger write failed again");
            }
            None => {
                self.episode = Some(Episode {
                    since: Instant::now(),
                    attempts: 1,
                    dropped_before: self.dropped_at_success,
                    drop_said: false,
                });
                let cap = lock(&self.inner.books).cap;
                self.inner.event(
                    "usage_ledger_write_failed",
                    format!(
                        "{e}: {waiting} usage records wait in memory for the ledger (at most \
                         {cap}, the oldest dropped past that), retried with backoff; results \
                         wait at most the stall limit for them"
                    ),
                );
            }
        }
    }

    /// A write succeeded: a stretch of failures, if any, is over.
    fn resumed(&mut self) {
        self.backoff = RETRY_BACKOFF_MIN;
        self.retry_at = None;
        let Some(ep) = self.episode.take() else {
            return;
        };
        let dropped = lock(&self.inner.books)
            .dropped
            .saturating_sub(ep.dropped_before);
        lock(&self.inner.status).failed_attempts = 0;
        self.inner.event(
            "usage_ledger_write_resumed",
            format!(
                "the usage records that waited are written, after {} failed writes over {} s; \
                 {dropped} dropped meanwhile (queue full)",
                ep.attempts,
                ep.since.elapsed().as_secs()
            ),
        );
    }

    /// Says records dropped for a full queue: the first drop of a stretch
    /// of failures (or of a disk that hung), with how many wait.
    fn say_drops(&mut self, dropped: u64, waiting: usize) {
        let seen = self.dropped_seen;
        if dropped <= seen {
            return;
        }
        self.dropped_seen = dropped;
        if let Some(ep) = &mut self.episode {
            if ep.drop_said {
                return;
            }
            ep.drop_said = true;
        }
        self.inner.event(
            "usage_ledger_records_dropped",
            format!(
                "the queue of usage records waiting for the ledger is full: {} oldest \
                 dropped, their usage lost ({dropped} since start); {waiting} wait",
                dropped - seen
            ),
        );
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

/// Runs `f`, catching and counting a panic (the thread goes on).
fn guarded(inner: &Inner, f: impl FnOnce()) {
    if std::panic::catch_unwind(AssertUnwindSafe(f)).is_err() {
        tracing::error!("metering panicked while sampling");
        inner.metrics.errors.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::read_records;
    use std::sync::atomic::AtomicBool;

    /// A worker's counters as a test sets them; reading panics once `panics` is set.
    #[derive(Default)]
    struct FakeProbe {
        reading: Mutex<Option<Reading>>,
        panics: AtomicBool,
    }

    impl Probe for FakeProbe {
        fn read(&self) -> Option<Reading> {
            assert!(!self.panics.load(Ordering::SeqCst), "a probe that panics");
            *lock(&self.reading)
        }
    }

    fn set(p: &FakeProbe, cpu_usec: u64, memory_bytes: u64) {
        *lock(&p.reading) = Some(Reading {
            cpu_usec,
            memory_bytes,
        });
    }

    fn start_with(dir: &std::path::Path, change: impl FnOnce(&mut RecorderConfig)) -> Recorder {
        let mut c = RecorderConfig::new(dir);
        c.price_card = Some(
            PriceCard::from_toml(
                "currency = \"EUR\"\nscale = 6\nper_task = 7\nper_cpu_core_second = 1000\n",
            )
            .expect("card"),
        );
        change(&mut c);
        Recorder::start(c, &mut Registry::default())
            .expect("start")
            .0
    }

    fn start(dir: &std::path::Path) -> Recorder {
        start_with(dir, |_| {})
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

    /// Each time the durable ticket advances, what the ledger holds then.
    fn watch_ledger(
        rec: &Recorder,
        dir: &std::path::Path,
    ) -> std::sync::mpsc::Receiver<(u64, Vec<UsageRecord>)> {
        let (tx, rx) = channel();
        let dir = dir.join("usage");
        let durable = Arc::downgrade(&rec.inner);
        rec.on_durable(Box::new(move || {
            let Some(inner) = durable.upgrade() else {
                return;
            };
            let at = inner.durable.load(Ordering::SeqCst);
            let _ = tx.send((at, read_records(&dir).expect("read")));
        }));
        rx
    }

    #[test]
    fn a_result_is_released_only_after_its_record_is_in_the_ledger() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rec = start(tmp.path());
        let seen = watch_ledger(&rec, tmp.path());
        let probe = Arc::new(FakeProbe::default());
        set(&probe, 1_000, 50_000_000);
        rec.worker_started(info("w"), probe.clone());
        rec.allocation_started("w", "a");
        set(&probe, 2_501_000, 50_000_000);
        let ticket = rec.allocation_finished(done("a", "w"));
        assert!(ticket > 0);
        let on_disk = loop {
            let (at, on_disk) = seen
                .recv_timeout(Duration::from_secs(5))
                .expect("made durable");
            if at >= ticket {
                break on_disk;
            }
        };
        let a = on_disk
            .iter()
            .find(|r| r.id == "a")
            .expect("on disk before the ticket is durable");
        assert_eq!(a.cpu_core_us, 2_500_000);
        // 7 per task + 1000 per core-second × 2.5.
        assert_eq!(a.cost_minor, Some(7 + 2_500));
        // The worker's cost so far is its records', until it stops.
        assert_eq!(rec.worker_costs().get("w"), Some(&(7 + 2_500)));
        rec.worker_stopped("w");
        assert_eq!(rec.worker_costs().get("w"), None);
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
        let rec = start_with(tmp.path(), |c| {
            c.sample_interval = Duration::from_millis(10)
        });
        let bad = Arc::new(FakeProbe::default());
        set(&bad, 0, 0);
        rec.worker_started(info("bad"), bad.clone());
        rec.allocation_started("bad", "a");
        bad.panics.store(true, Ordering::SeqCst);
        // The hook panics reading the worker: caught, and the result waits for nothing.
        assert_eq!(rec.allocation_finished(done("a", "bad")), 0);
        // The thread's ticks panic on it too, and it goes on committing.
        let good = Arc::new(FakeProbe::default());
        set(&good, 0, 0);
        rec.worker_started(info("good"), good);
        rec.allocation_started("good", "b");
        let ticket = rec.allocation_finished(done("b", "good"));
        assert!(rec.flush(Duration::from_secs(5)));
        assert!(rec.durable() >= ticket);
        let ids: Vec<String> = read_records(&tmp.path().join("usage"))
            .expect("read")
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert!(ids.contains(&"b".to_string()), "{ids:?}");
        // The hook's panic, and at least one tick's on the thread.
        let deadline = Instant::now() + Duration::from_secs(30);
        while rec.inner.metrics.errors.get() < 2 {
            assert!(Instant::now() < deadline, "no tick panicked");
            std::thread::sleep(Duration::from_millis(10));
        }
        bad.panics.store(false, Ordering::SeqCst);
        rec.stop(Duration::from_secs(5));
        assert_eq!(
            rec.allocation_finished(done("c", "good")),
            0,
            "after the stop"
        );
    }

    #[test]
    fn a_flush_past_its_timeout_lets_results_go_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // A disk that takes a second per write.
        let rec = start_with(tmp.path(), |c| c.commit_delay = Duration::from_secs(1));
        let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = wakes.clone();
        rec.on_durable(Box::new(move || {
            n.fetch_add(1, Ordering::SeqCst);
        }));
        let ticket = rec.allocation_finished(done("a", "w"));
        assert!(!rec.flush(Duration::from_millis(100)), "the disk is slow");
        assert!(rec.durable() >= ticket, "given up on");
        assert_eq!(wakes.load(Ordering::SeqCst), 1, "the reporter told once");
        // The write completes later; nothing is released twice.
        assert!(rec.flush(Duration::from_secs(5)));
        assert_eq!(wakes.load(Ordering::SeqCst), 1);
        assert!(rec.status().last_error.is_some());
        assert_eq!(
            read_records(&tmp.path().join("usage")).expect("read").len(),
            1
        );
        rec.stop(Duration::from_secs(5));
    }

    #[test]
    fn a_disk_that_hangs_holds_results_no_longer_than_the_stall_limit() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rec = start_with(tmp.path(), |c| {
            c.commit_delay = Duration::from_secs(3);
            c.stall_limit = Duration::from_millis(50);
        });
        let ticket = rec.allocation_finished(done("a", "w"));
        // The reporter asks, as it does before each report.
        while rec.durable() < ticket {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            read_records(&tmp.path().join("usage"))
                .expect("read")
                .is_empty(),
            "given up on while the write still hangs"
        );
        let error = rec.status().last_error.unwrap_or_default();
        assert!(error.contains("has not answered"), "{error}");
        rec.stop(Duration::from_secs(5));
    }

    /// Polls until the durable ticket reaches `ticket` (a hang is a failure).
    fn await_durable(rec: &Recorder, ticket: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while rec.durable() < ticket {
            assert!(
                Instant::now() < deadline,
                "ticket {ticket} never became durable"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn results_wait_for_the_window_only_while_others_still_run() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rec = start_with(tmp.path(), |c| c.group_commit = Duration::from_secs(3600));
        let seen = watch_ledger(&rec, tmp.path());
        let probe = Arc::new(FakeProbe::default());
        set(&probe, 0, 0);
        rec.worker_started(info("w"), probe);
        // A lone result, then another: neither waits for the hour.
        for id in ["lone-1", "lone-2"] {
            rec.allocation_started("w", id);
            let ticket = rec.allocation_finished(done(id, "w"));
            await_durable(&rec, ticket);
            // The reporter was told of it.
            while seen.recv_timeout(Duration::from_secs(5)).expect("told").0 < ticket {}
        }
        // Under load (finishing close together, one still running) they
        // wait, and all go in one commit when the last one finishes.
        rec.allocation_started("w", "long");
        for i in 0..20 {
            let id = format!("a{i}");
            rec.allocation_started("w", &id);
            rec.allocation_finished(done(&id, "w"));
        }
        let last = rec.allocation_finished(done("long", "w"));
        await_durable(&rec, last);
        let (at, records) = seen
            .recv_timeout(Duration::from_secs(5))
            .expect("one commit");
        assert_eq!(at, last, "the 21 results went in one commit");
        assert_eq!(records.len(), 23);
        rec.stop(Duration::from_secs(5));
    }

    #[test]
    fn results_queued_behind_a_slow_commit_share_the_next_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rec = start_with(tmp.path(), |c| c.commit_delay = Duration::from_millis(300));
        let seen = watch_ledger(&rec, tmp.path());
        // The first commit is under way (slowly); these queue behind it.
        let first = rec.allocation_finished(done("first", "w"));
        let tickets: Vec<u64> = (0..20)
            .map(|i| rec.allocation_finished(done(&format!("a{i}"), "w")))
            .collect();
        let mut steps = Vec::new();
        while steps.last().is_none_or(|(at, _)| *at < tickets[19]) {
            let (at, records) = seen.recv_timeout(Duration::from_secs(5)).expect("commit");
            steps.push((at, records.len()));
        }
        assert!(first < tickets[0]);
        assert!(
            steps.len() <= 2,
            "20 results in at most two commits: {steps:?}"
        );
        assert_eq!(steps.last().map(|s| s.1), Some(21));
        rec.stop(Duration::from_secs(5));
    }

    #[test]
    fn the_same_allocation_finished_again_is_neither_written_nor_counted_twice() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rec = start(tmp.path());
        for _ in 0..2 {
            rec.allocation_finished(done("again", "w"));
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

    /// The recorder's events, as the agent would get them.
    fn events(rec: &Recorder) -> std::sync::mpsc::Receiver<(&'static str, String)> {
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        rec.on_event(Box::new(move |kind, message| {
            let _ = lock(&tx).send((kind, message));
        }));
        rx
    }

    /// The next event of `kind` (others are skipped); a minute without one fails.
    fn event_of(rx: &std::sync::mpsc::Receiver<(&'static str, String)>, kind: &str) -> String {
        loop {
            let (k, message) = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no {kind} event"));
            if k == kind {
                return message;
            }
        }
    }

    /// Polls `what` of the recorder's status until `done` (a minute at most).
    fn await_status(rec: &Recorder, what: &str, done: impl Fn(&RecorderStatus) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(&rec.status()) {
            assert!(Instant::now() < deadline, "{what}: {:?}", rec.status());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn allocation_ids(dir: &std::path::Path) -> Vec<String> {
        read_records(&dir.join("usage"))
            .expect("read")
            .into_iter()
            .filter(|r| r.kind == RecordKind::Allocation)
            .map(|r| r.id)
            .collect()
    }

    #[test]
    fn a_full_disk_keeps_every_record_and_writes_each_once_when_space_returns() {
        let disk = crate::tmpfs_for_tests::Tmpfs::mount(4 << 20);
        let rec = start_with(disk.path(), |c| c.stall_limit = Duration::from_millis(200));
        let said = events(&rec);
        disk.fill();
        let ids: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
        let mut last = 0;
        for id in &ids {
            last = rec.allocation_finished(done(id, "w"));
        }
        let failed = event_of(&said, "usage_ledger_write_failed");
        assert!(
            failed.contains("No space left") && failed.contains("usage records wait"),
            "{failed}"
        );
        // Results keep flowing past the stall limit, their records kept.
        await_durable(&rec, last);
        await_status(&rec, "all 20 wait", |s| s.unwritten_records == 20);
        assert_eq!(rec.inner.metrics.unwritten.get(), 20);
        let trouble = rec.ledger_trouble().expect("trouble said");
        assert!(trouble.contains("20 records wait"), "{trouble}");
        assert!(allocation_ids(disk.path()).is_empty());
        disk.free();
        let resumed = event_of(&said, "usage_ledger_write_resumed");
        assert!(resumed.contains("0 dropped"), "{resumed}");
        assert!(rec.flush(Duration::from_secs(30)));
        assert_eq!(
            allocation_ids(disk.path()),
            ids,
            "every record, once, in order"
        );
        let st = rec.status();
        assert_eq!(
            (st.unwritten_records, st.failed_attempts, st.dropped_records),
            (0, 0, 0)
        );
        assert_eq!(rec.inner.metrics.unwritten.get(), 0);
        assert!(rec.ledger_trouble().is_none());
        rec.stop(Duration::from_secs(5));
    }

    #[test]
    fn past_the_queue_bound_the_oldest_records_go_counted_and_said() {
        let disk = crate::tmpfs_for_tests::Tmpfs::mount(4 << 20);
        let rec = start_with(disk.path(), |c| {
            c.stall_limit = Duration::from_millis(200);
            c.backlog_records = 5;
        });
        let said = events(&rec);
        disk.fill();
        for i in 0..12 {
            rec.allocation_finished(done(&format!("a{i}"), "w"));
        }
        await_status(&rec, "7 dropped, 5 wait", |s| {
            s.dropped_records == 7 && s.unwritten_records == 5
        });
        let dropped = event_of(&said, "usage_ledger_records_dropped");
        assert!(dropped.contains("oldest"), "{dropped}");
        assert_eq!(rec.inner.metrics.dropped.get(), 7);
        disk.free();
        assert!(event_of(&said, "usage_ledger_write_resumed").contains("7 dropped"));
        assert!(rec.flush(Duration::from_secs(30)));
        let newest: Vec<String> = (7..12).map(|i| format!("a{i}")).collect();
        assert_eq!(allocation_ids(disk.path()), newest);
        rec.stop(Duration::from_secs(5));
    }

    #[test]
    fn records_waiting_in_memory_are_bounded_in_their_names() {
        use crate::record::{MAX_ID_BYTES, MAX_NAME_BYTES};
        let disk = crate::tmpfs_for_tests::Tmpfs::mount(4 << 20);
        let rec = start_with(disk.path(), |c| c.stall_limit = Duration::from_millis(200));
        disk.fill();
        let huge = "n".repeat(1 << 20);
        rec.allocation_finished(FinishedAllocation {
            alloc_id: "i".repeat(10_000),
            namespace: huge.clone(),
            application: huge.clone(),
            function: huge,
            ..done("", "w")
        });
        await_status(&rec, "it waits", |s| s.unwritten_records == 1);
        {
            let b = lock(&rec.inner.books);
            let r = b.pending.front().expect("waiting");
            assert!(r.id.len() <= MAX_ID_BYTES, "{}", r.id.len());
            assert_eq!(
                [&r.namespace, &r.application, &r.function].map(|n| n.len()),
                [MAX_NAME_BYTES; 3]
            );
        }
        disk.free();
        assert!(rec.flush(Duration::from_secs(30)));
        let written = read_records(&disk.path().join("usage")).expect("read");
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].function.len(), MAX_NAME_BYTES);
        assert_eq!(rec.status().cut_records, 1);
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
