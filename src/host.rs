//! The host as monitoring shows it: capacity, reserved and allocatable
//! resources, GPUs and who holds them, and live usage sampled periodically
//! (exported as gauges and in `/state/host`).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use steward_host_resources as hr;

type Labels = Vec<(String, String)>;

pub struct HostView {
    capacity: hr::Capacity,
    reserved: hr::Reserved,
    gpus: Vec<hr::GpuInfo>,
    allocator: Arc<hr::GpuAllocator>,
    usage: Mutex<Option<hr::HostUsage>>,
    cpu_usage: Gauge<f64, AtomicU64>,
    memory_used: Gauge,
    gpu_utilization: Family<Labels, Gauge<f64, AtomicU64>>,
    gpu_memory_used: Family<Labels, Gauge>,
    gpus_allocated: Gauge,
}

impl HostView {
    pub fn new(
        capacity: hr::Capacity,
        reserved: hr::Reserved,
        gpus: Vec<hr::GpuInfo>,
        allocator: Arc<hr::GpuAllocator>,
    ) -> Self {
        HostView {
            capacity,
            reserved,
            gpus,
            allocator,
            usage: Mutex::new(None),
            cpu_usage: Gauge::default(),
            memory_used: Gauge::default(),
            gpu_utilization: Family::default(),
            gpu_memory_used: Family::default(),
            gpus_allocated: Gauge::default(),
        }
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        let cap = Gauge::<i64>::default();
        cap.set(i64::from(self.capacity.cpu_count));
        registry.register(
            "host_cpus",
            "Logical CPUs of the host (cgroup limit applied)",
            cap,
        );
        let mem = Gauge::<i64>::default();
        mem.set(self.capacity.memory_bytes as i64);
        registry.register(
            "host_memory_bytes",
            "Memory of the host (cgroup limit applied)",
            mem,
        );
        let gpus = Gauge::<i64>::default();
        gpus.set(self.gpus.len() as i64);
        registry.register("host_gpus", "GPUs discovered on the host", gpus);
        registry.register(
            "host_cpu_usage_ratio",
            "Busy share of all CPUs at the last sample (0-1)",
            self.cpu_usage.clone(),
        );
        registry.register(
            "host_memory_used_bytes",
            "Memory in use at the last sample",
            self.memory_used.clone(),
        );
        registry.register(
            "gpu_utilization_ratio",
            "GPU utilisation at the last sample (0-1), by GPU index",
            self.gpu_utilization.clone(),
        );
        registry.register(
            "gpu_memory_used_bytes",
            "GPU memory in use at the last sample, by GPU index",
            self.gpu_memory_used.clone(),
        );
        registry.register(
            "gpus_allocated",
            "GPUs held by function executors",
            self.gpus_allocated.clone(),
        );
    }

    fn record(&self, u: hr::HostUsage) {
        self.cpu_usage.set(f64::from(u.cpu_percent) / 100.0);
        self.memory_used.set(u.memory_used_bytes as i64);
        for g in &u.gpus {
            let labels = vec![("gpu".to_string(), g.index.to_string())];
            if let Some(p) = g.utilization_percent {
                self.gpu_utilization
                    .get_or_create(&labels)
                    .set(f64::from(p) / 100.0);
            }
            if let Some(m) = g.memory_used_bytes {
                self.gpu_memory_used.get_or_create(&labels).set(m as i64);
            }
        }
        *self.usage.lock() = Some(u);
    }

    /// The GPUs' busy share summed (in GPUs) and their memory used, from
    /// the latest usage sample (`None` before one, or without GPUs).
    pub fn gpu_reading(&self) -> Option<(f32, f64)> {
        let usage = self.usage.lock();
        let gpus = &usage.as_ref()?.gpus;
        if gpus.is_empty() {
            return None;
        }
        let busy = gpus
            .iter()
            .filter_map(|g| g.utilization_percent)
            .map(|p| p.min(100) as f32 / 100.0)
            .sum();
        let memory = gpus
            .iter()
            .filter_map(|g| g.memory_used_bytes)
            .fold(0u64, u64::saturating_add) as f64;
        Some((busy, memory))
    }

    pub fn document(&self) -> serde_json::Value {
        let owners = self.allocator.owners();
        self.gpus_allocated
            .set(owners.values().map(Vec::len).sum::<usize>() as i64);
        let gpus: Vec<serde_json::Value> = self
            .gpus
            .iter()
            .map(|g| {
                let holder = owners
                    .iter()
                    .find(|(_, idx)| idx.contains(&g.index))
                    .map(|(o, _)| o.clone());
                serde_json::json!({
                    "index": g.index, "uuid": g.uuid, "product_name": g.product_name,
                    "model": g.model, "memory_bytes": g.memory_bytes, "function_executor": holder,
                })
            })
            .collect();
        serde_json::json!({
            "capacity": self.capacity,
            "reserved": self.reserved,
            "allocatable": self.capacity.allocatable(&self.reserved),
            "gpus": gpus,
            "gpus_free": self.allocator.free_count(),
            "usage": *self.usage.lock(),
        })
    }
}

/// Samples usage every `every` until the runtime stops.
pub async fn sample_loop(
    host: Arc<HostView>,
    sampler: hr::UsageSampler,
    every: Duration,
    metering: Option<Arc<steward_metering::Recorder>>,
) {
    let sampler = Arc::new(Mutex::new(sampler));
    loop {
        let s = sampler.clone();
        match tokio::task::spawn_blocking(move || s.lock().sample()).await {
            Ok(u) => {
                // GPU utilisation also meters the workers' busy GPU time.
                if let Some(m) = &metering {
                    let gpus = u
                        .gpus
                        .iter()
                        .filter_map(|g| Some((g.uuid.clone(), g.utilization_percent?)))
                        .collect();
                    m.gpu_utilization(gpus);
                }
                host.record(u)
            }
            Err(e) => tracing::warn!(error = %e, "usage sampling task failed"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Blob store operations as Prometheus metrics, labelled by operation.
pub struct BlobMetrics {
    requests: Family<Labels, prometheus_client::metrics::counter::Counter>,
    errors: Family<Labels, prometheus_client::metrics::counter::Counter>,
    bytes: Family<Labels, prometheus_client::metrics::counter::Counter>,
    latency: Family<Labels, prometheus_client::metrics::histogram::Histogram>,
    /// Each operation's series, looked up once: a family lookup hashes a
    /// freshly allocated label set, and an allocation makes a dozen blob
    /// operations.
    series: Mutex<Vec<(&'static str, Arc<OpSeries>)>>,
}

/// The series of one blob operation (sharing the families' values).
struct OpSeries {
    requests: prometheus_client::metrics::counter::Counter,
    bytes: prometheus_client::metrics::counter::Counter,
    latency: prometheus_client::metrics::histogram::Histogram,
}

impl BlobMetrics {
    pub fn register(registry: &mut Registry) -> BlobMetrics {
        let m = BlobMetrics {
            requests: Family::default(),
            errors: Family::default(),
            bytes: Family::default(),
            latency: Family::new_with_constructor(|| {
                prometheus_client::metrics::histogram::Histogram::new(
                    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.5, 14),
                )
            }),
            series: Mutex::new(Vec::new()),
        };
        registry.register(
            "blob_store_requests",
            "Blob store operations, by operation",
            m.requests.clone(),
        );
        registry.register(
            "blob_store_errors",
            "Blob store operations that failed, by operation",
            m.errors.clone(),
        );
        registry.register(
            "blob_store_transferred_bytes",
            "Bytes read or written by the agent, by operation",
            m.bytes.clone(),
        );
        registry.register(
            "blob_store_latency_seconds",
            "Blob store operation latency, by operation",
            m.latency.clone(),
        );
        m
    }
}

impl BlobMetrics {
    fn series(&self, op: &'static str) -> Arc<OpSeries> {
        let mut known = self.series.lock();
        if let Some((_, s)) = known.iter().find(|(name, _)| *name == op) {
            return s.clone();
        }
        let labels = vec![("operation".to_string(), op.to_string())];
        let s = Arc::new(OpSeries {
            requests: self.requests.get_or_create(&labels).clone(),
            bytes: self.bytes.get_or_create(&labels).clone(),
            latency: self.latency.get_or_create(&labels).clone(),
        });
        known.push((op, s.clone()));
        s
    }
}

impl steward_blob_store::BlobObserver for BlobMetrics {
    fn observe(&self, op: &'static str, ok: bool, seconds: f64, bytes: u64) {
        let series = self.series(op);
        series.requests.inc();
        if !ok {
            let labels = vec![("operation".to_string(), op.to_string())];
            self.errors.get_or_create(&labels).inc();
        }
        series.bytes.inc_by(bytes);
        series.latency.observe(seconds);
    }
}
