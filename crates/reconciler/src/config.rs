//! The agent's configuration as the binary gives it: the server, limits,
//! timeouts, defaults, and the pieces it is handed (worker driver, GPU
//! pool, blob store, metering, memory source). Plain data; knows nothing
//! of the running agent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use steward_blob_store::BlobStore;

use crate::admission::WorkerDefaults;
use crate::metering::Metering;
use crate::pb;
use crate::pressure::Eviction;

/// Hands whole GPUs to workers; implemented over the host-resources allocator.
pub trait GpuPool: Send + Sync + 'static {
    /// Reserves `count` GPUs for `owner` and returns their UUIDs, or why
    /// not (said in the worker's startup failure).
    fn allocate(&self, owner: &str, count: u32) -> Result<Vec<String>, GpuRefusal>;
    /// Returns `owner`'s GPUs; harmless when it holds none.
    fn release(&self, owner: &str);
    /// Takes exactly the GPUs `uuids` for `owner`, a worker adopted from an
    /// earlier run that still uses them; refused (taking none) unless each
    /// is here and free.
    fn reserve(&self, owner: &str, uuids: &[String]) -> Result<(), GpuRefusal> {
        if uuids.is_empty() {
            return Ok(());
        }
        Err(GpuRefusal::NoGpus {
            owner: owner.to_string(),
            count: uuids.len() as u32,
        })
    }
}

/// Why a pool gave no GPUs.
#[derive(Debug, thiserror::Error)]
pub enum GpuRefusal {
    #[error("worker {owner} asks for {count} GPU(s) but this host has none")]
    NoGpus { owner: String, count: u32 },
    /// The pool's own reason (its allocator's error).
    #[error(transparent)]
    Pool(Box<dyn std::error::Error + Send + Sync>),
}

/// A pool with no GPUs: every request for one is refused.
#[derive(Debug, Default)]
pub struct NoGpus;

impl GpuPool for NoGpus {
    fn allocate(&self, owner: &str, count: u32) -> Result<Vec<String>, GpuRefusal> {
        if count == 0 {
            Ok(Vec::new())
        } else {
            Err(GpuRefusal::NoGpus {
                owner: owner.to_string(),
                count,
            })
        }
    }
    fn release(&self, _owner: &str) {}
}

/// TLS to the server, as the reference executor's `use_tls` / `tls_config`:
/// the server's CA (the platform's roots without one) and, for mutual
/// TLS, this host's certificate and key (PEM).
#[derive(Clone, Default)]
pub struct ServerTls {
    pub ca_pem: Option<Vec<u8>>,
    pub cert_pem: Option<Vec<u8>>,
    pub key_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    // Never prints key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.cert_pem.is_some())
            .field("client_key", &self.key_pem.is_some())
            .finish()
    }
}

impl ServerTls {
    pub(crate) fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut c = ClientTlsConfig::new();
        c = match &self.ca_pem {
            Some(ca) => c.ca_certificate(Certificate::from_pem(ca)),
            None => c.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.cert_pem, &self.key_pem) {
            c = c.identity(Identity::from_pem(cert, key));
        }
        c
    }
}

/// Default of [`AgentConfig::max_input_blob_bytes`]: 1 TiB. A worker reads
/// each input whole into its own memory, so a larger one could not run on
/// any host; at the reference's 100 MiB read chunks it is 10,486 URLs.
pub const DEFAULT_MAX_INPUT_BLOB_BYTES: u64 = 1 << 40;

/// Default of [`AgentConfig::max_application_code_bytes`]: 1 GiB, the
/// default worker message limit, which the code must fit in anyway.
pub const DEFAULT_MAX_APPLICATION_CODE_BYTES: u64 = 1 << 30;

/// What one allocation may ask of the agent over its life. Each request is
/// remembered until the allocation ends (its id, an open upload), so each
/// count is capped; a breach fails the allocation with FUNCTION_ERROR,
/// naming the bound, and stops its worker (a running function cannot be
/// stopped otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationLimits {
    /// Output blobs: the function's output and each nested call's arguments.
    pub max_output_blobs: usize,
    /// Request-state writes prepared (`ctx.state.set`).
    pub max_state_writes: usize,
    /// Request-state operations of every kind (reads, prepared writes,
    /// commits): each distinct one is remembered and costs blob I/O.
    pub max_state_ops: usize,
    /// Nested function calls (`other(x)`, started futures, `.map` calls).
    pub max_function_calls: usize,
}

impl AllocationLimits {
    /// 10,000 of each (as many as the watchers one allocation may have
    /// open), and 100,000 request-state operations (a read and a commit
    /// for each write, and room for many more reads).
    pub const DEFAULT: AllocationLimits = AllocationLimits {
        max_output_blobs: 10_000,
        max_state_writes: 10_000,
        max_state_ops: 100_000,
        max_function_calls: 10_000,
    };
}

impl Default for AllocationLimits {
    fn default() -> Self {
        AllocationLimits::DEFAULT
    }
}

/// Everything the agent needs to know about itself and its environment.
#[derive(Clone)]
pub struct AgentConfig {
    pub executor_id: String,
    pub hostname: String,
    /// Reported as `ExecutorState.version`.
    pub version: String,
    /// `host:port` or a full `http(s)://` URL of the server's gRPC endpoint.
    pub server_addr: String,
    /// TLS (and mutual TLS) to the server; plain HTTP/2 when `None`.
    pub server_tls: Option<ServerTls>,
    pub labels: BTreeMap<String, String>,
    pub allowed_functions: Vec<pb::AllowedFunction>,
    pub catalog_entry_name: Option<String>,
    pub total_resources: pb::HostResources,
    pub function_executor_resources: pb::HostResources,
    /// The worker program (`function-executor` from PATH by default).
    pub function_executor_bin: PathBuf,
    /// Extra arguments appended to every worker's command line.
    pub function_executor_args: Vec<String>,
    /// Where worker logs and downloaded code live.
    pub data_dir: PathBuf,
    pub report_interval: Duration,
    /// Longest wait between failed reports.
    pub report_backoff_max: Duration,
    pub health_check_interval: Duration,
    pub health_checks_enabled: bool,
    /// Workers outlive the agent and are adopted at its next start
    /// ([`crate::adoption`]); the driver must start them so
    /// (`ProcessDriverConfig::adoptable`). Off: every worker dies with it.
    pub adopt_workers: bool,
    /// How long a new worker may take to accept gRPC connections.
    pub function_executor_connect_timeout: Duration,
    /// SIGTERM-to-SIGKILL grace when stopping a worker.
    pub function_executor_stop_grace: Duration,
    /// Reopen the desired-state stream after this long without a message.
    pub stream_idle_timeout: Duration,
    /// Longest an allocation waits for one function call result before it
    /// fails with FUNCTION_TIMEOUT (its deadline is paused meanwhile).
    pub max_function_call_wait: Duration,
    /// Largest blob a worker may ask to write (outputs, request state);
    /// a larger request is refused to that allocation alone.
    pub max_output_blob_bytes: u64,
    /// Largest input a worker is handed (`offset + size` of an argument, of
    /// a function call's value, of a request-state value); a larger
    /// argument fails its allocation before any URL is made.
    pub max_input_blob_bytes: u64,
    /// What one allocation may ask of the agent.
    pub allocation_limits: AllocationLimits,
    /// Largest gRPC message to or from the server (desired states, reports).
    pub max_server_message_bytes: usize,
    /// Largest gRPC message to or from a worker (allocation states; the
    /// application code in `initialize` counts too).
    pub max_worker_message_bytes: usize,
    /// Largest application code downloaded for a worker; the smaller of
    /// this and `max_worker_message_bytes` applies (the code is sent in
    /// one `initialize` message). Larger code fails the worker's start.
    pub max_application_code_bytes: u64,
    pub blob_store: BlobStore,
    /// Size bound of the application code cache in the data directory.
    pub code_cache_max_bytes: u64,
    pub gpu_pool: Arc<dyn GpuPool>,
    /// Starts, confines and stops workers.
    pub driver: Arc<dyn steward_worker_driver::WorkerDriver>,
    /// What a worker gets where its description is silent, and its pids limit.
    pub worker_defaults: WorkerDefaults,
    /// Stopping idle workers under host memory pressure.
    pub eviction: Eviction,
    /// Usage metering; each result waits until its usage record is durable.
    pub metering: Option<Arc<dyn Metering>>,
    /// How often the reconcile loop proves it is alive while idle (at
    /// most 5 s): it then marks its progress for the health check and
    /// calls [`AgentConfig::on_reconcile_beat`].
    pub reconcile_heartbeat: Duration,
    /// Called on the reconcile loop itself at each of its heartbeats, so a
    /// wedged loop calls it no more (the binary's systemd watchdog pings).
    /// Must be quick: the loop waits for it.
    pub on_reconcile_beat: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Fault injection for tests only: once this file exists the reconcile
    /// loop, at its next heartbeat, stops doing anything (no pass, no
    /// heartbeat) until the agent shuts down: a wedged loop.
    pub wedge_reconcile_when: Option<PathBuf>,
    /// Fault injection for tests only: the agent SIGKILLs itself the first
    /// time it reaches this point, a window of adoption that a kill from
    /// outside cannot hit on purpose.
    pub test_kill_at: Option<KillPoint>,
}

/// Where [`AgentConfig::test_kill_at`] kills the agent: just after a
/// change is on the adoption record, before the worker hears of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillPoint {
    /// A nested call the server created is on record; the worker has not
    /// been told it was created.
    CallRecorded,
    /// An output upload is on record; the worker has not got its URLs.
    UploadRecorded,
}

impl std::str::FromStr for KillPoint {
    type Err = String;

    fn from_str(s: &str) -> Result<KillPoint, String> {
        match s {
            "call-recorded" => Ok(KillPoint::CallRecorded),
            "upload-recorded" => Ok(KillPoint::UploadRecorded),
            _ => Err(format!("{s:?}: expected call-recorded or upload-recorded")),
        }
    }
}

impl AgentConfig {
    /// Defaults matching the reference executor's timings.
    pub fn new(
        executor_id: String,
        server_addr: String,
        data_dir: PathBuf,
        blob_store: BlobStore,
    ) -> Self {
        AgentConfig {
            executor_id,
            hostname: "localhost".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            server_addr,
            server_tls: None,
            labels: BTreeMap::new(),
            allowed_functions: Vec::new(),
            catalog_entry_name: None,
            total_resources: pb::HostResources::default(),
            function_executor_resources: pb::HostResources::default(),
            function_executor_bin: PathBuf::from("function-executor"),
            function_executor_args: Vec::new(),
            report_interval: Duration::from_secs(5),
            report_backoff_max: Duration::from_secs(300),
            health_check_interval: Duration::from_secs(5),
            health_checks_enabled: true,
            adopt_workers: false,
            function_executor_connect_timeout: Duration::from_secs(60),
            function_executor_stop_grace: Duration::from_secs(5),
            stream_idle_timeout: Duration::from_secs(300),
            max_function_call_wait: Duration::from_secs(24 * 3600),
            max_output_blob_bytes: 5 << 40,
            max_input_blob_bytes: DEFAULT_MAX_INPUT_BLOB_BYTES,
            allocation_limits: AllocationLimits::DEFAULT,
            max_server_message_bytes: 256 << 20,
            max_worker_message_bytes: 1 << 30,
            max_application_code_bytes: DEFAULT_MAX_APPLICATION_CODE_BYTES,
            blob_store,
            code_cache_max_bytes: 10 << 30,
            gpu_pool: Arc::new(NoGpus),
            driver: Arc::new(steward_worker_driver::ProcessDriver::new(
                steward_worker_driver::ProcessDriverConfig {
                    records_dir: data_dir.join("workers"),
                    cgroups: steward_worker_driver::CgroupSetup::Unavailable(
                        "cgroups were not configured".into(),
                    ),
                    isolation: steward_worker_driver::Isolation::unseparated(
                        &data_dir.join("run"),
                        "worker identities were not configured",
                    ),
                    adoptable: false,
                },
            )),
            worker_defaults: WorkerDefaults::default(),
            eviction: Eviction::default(),
            metering: None,
            reconcile_heartbeat: Duration::from_secs(5),
            on_reconcile_beat: None,
            wedge_reconcile_when: None,
            test_kill_at: None,
            data_dir,
        }
    }
}
