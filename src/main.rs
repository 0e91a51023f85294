//! `steward`: the host agent binary. The only place where the crates are
//! wired together: CLI and config, host resources, blob store, the
//! reconciler, the monitoring server, signal handling; plus, with the
//! `devserver` feature (default; not in the package), the `steward
//! devserver` dev control plane commands.

mod config_file;
#[cfg(feature = "devserver")]
mod devserver;
mod host;
mod init;
mod load;
mod logging;
mod metering;
mod operator;
mod page;
mod state_source;
mod systemd;
mod usage;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use steward_host_resources as hr;
use steward_reconciler::{Agent, AgentConfig, GpuPool, GpuRefusal, Metrics, pb};
use steward_worker_driver as wd;

const VERSION: &str = env!("STEWARD_VERSION");
const REVISION: &str = env!("STEWARD_GIT_REVISION");
const LONG_VERSION: &str = concat!(
    env!("STEWARD_VERSION"),
    " (",
    env!("STEWARD_GIT_REVISION"),
    ")"
);

/// Steward: a host agent for the Indexify executor protocol. Flags match
/// `indexify-cli executor`, so replacing it is a one-word change.
#[derive(Parser, Debug)]
#[command(name = "steward", version = LONG_VERSION, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    agent: AgentArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The development control plane and its client commands.
    #[cfg(feature = "devserver")]
    Devserver(Box<devserver::DevserverArgs>),
    /// One screen about a running agent: mode, connection, workers, allocations, limits, last errors.
    Status(operator::AgentClientArgs),
    /// Pause a running agent: running allocations finish, nothing new starts (reported DRAINED).
    Pause(operator::AgentClientArgs),
    /// Return a paused, draining or disabled agent to active.
    Unpause(operator::AgentClientArgs),
    /// Pause, then stop every worker once the last allocation finishes (then disabled).
    Drain(operator::DrainArgs),
    /// Show (`get`) or change (`set KEY=VALUE...`) a running agent's labels, eviction thresholds, log level.
    Config(operator::ConfigArgs),
    /// The usage ledger: `usage export --since --until --format csv|jsonl`.
    Usage(usage::UsageArgs),
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// Address of the server's gRPC executor API.
    #[arg(long, default_value = "localhost:8901")]
    grpc_server_addr: String,
    /// Allowed function, `namespace:application:function[:version]`; repeatable. None means any.
    #[arg(short = 'f', long = "function")]
    functions: Vec<String>,
    /// Executor label `key=value`; repeatable (or `STEWARD_LABELS`, comma-separated).
    #[arg(
        short = 'l',
        long = "label",
        env = "STEWARD_LABELS",
        value_delimiter = ','
    )]
    labels: Vec<String>,
    #[arg(long, default_value = "localhost")]
    monitoring_server_host: String,
    #[arg(long, default_value_t = 7000)]
    monitoring_server_port: u16,
    /// Data directory: code cache, worker logs, executor id.
    #[arg(long, default_value = "~/.indexify/executor_cache")]
    executor_cache_path: String,
    #[arg(long)]
    catalog_entry_name: Option<String>,
    /// The reference executor's YAML config: `use_tls` and `tls_config`
    /// (`ca_bundle_path`, `cert_path`, `key_path`) for TLS or mutual TLS to the server.
    #[arg(long)]
    config_path: Option<PathBuf>,
    /// More logging (-v debug, -vv trace).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    verbose: u8,
    /// Log lines as `text` or `json` (one object a line, with the
    /// executor, worker and allocation ids as fields); `auto`: text when
    /// stderr, where the log goes, is a terminal, else JSON.
    #[arg(long, value_enum, default_value_t = logging::LogFormat::Auto, env = "STEWARD_LOG_FORMAT")]
    log_format: logging::LogFormat,
    /// Executor id; by default one is generated once and kept in the data directory.
    #[arg(long)]
    executor_id: Option<String>,
    /// Worker program to run for each function executor.
    #[arg(long, default_value = "function-executor")]
    function_executor_bin: PathBuf,
    /// What a worker is: `process` (a process group in its own cgroup) or
    /// `oci` (a container of an OCI runtime, `--oci-runtime`: new pid,
    /// mount, ipc and uts namespaces, a read-only root, no capabilities, a
    /// seccomp profile, its GPUs' devices only).
    #[arg(long, value_enum, default_value_t = DriverKind::Process)]
    worker_driver: DriverKind,
    /// The OCI runtime of `--worker-driver oci`: `runc`, or `runsc`
    /// (gVisor) or `kata-runtime` (Kata), which take the same command
    /// line; a name on PATH or a path. Refused at start unless it answers
    /// `--version`.
    #[arg(long, default_value = "runc")]
    oci_runtime: PathBuf,
    /// The network of `--worker-driver oci` workers: `host` (the host's,
    /// to reach blob storage) or `none` (a new, empty network namespace:
    /// only the worker's Unix socket reaches it; for `file://` blobs).
    /// `none` is refused at start with `--worker-driver process`, whose
    /// workers always share the host's network.
    #[arg(long, value_enum, default_value_t = WorkerNetwork::Host)]
    worker_network: WorkerNetwork,
    /// A host directory or file bound read-only into every OCI worker
    /// besides /usr, /bin, /lib, /lib64, /etc, the worker program's venv and
    /// its Python installation (a CUDA installation elsewhere, say); repeatable.
    #[arg(long = "oci-bind-ro")]
    oci_bind_ro: Vec<PathBuf>,
    /// Directory `file://` blobs must live in; repeatable. None allows any absolute path.
    #[arg(long = "blob-root")]
    blob_roots: Vec<PathBuf>,
    /// CPUs kept back from workers.
    #[arg(long, default_value_t = 0)]
    reserved_cpus: u32,
    /// Memory kept back from workers, in bytes.
    #[arg(long, default_value_t = 0)]
    reserved_memory_bytes: u64,
    /// Disk kept back from workers, in bytes.
    #[arg(long, default_value_t = 0)]
    reserved_disk_bytes: u64,
    /// GPUs kept back from workers (the lowest indices).
    #[arg(long, default_value_t = 0)]
    reserved_gpus: u32,
    /// Logical CPUs to report and admit against instead of the probed count
    /// (a declared capacity, as Nomad's `cpu_total_compute`).
    #[arg(long)]
    total_cpus: Option<u32>,
    /// Memory in bytes to report and admit against instead of the probed total.
    #[arg(long)]
    total_memory_bytes: Option<u64>,
    /// Disk in bytes to report and admit against instead of the data
    /// directory's volume size.
    #[arg(long)]
    total_disk_bytes: Option<u64>,
    /// Parent cgroup of the workers' cgroups: relative to Steward's own
    /// cgroup (systemd `Delegate=yes`, containers), or absolute from the
    /// hierarchy root.
    #[arg(long, default_value = "steward")]
    cgroup_parent: String,
    /// File holding the bearer token of the `/admin/*` routes (pause,
    /// unpause, drain); without it those routes do not exist. Refused if
    /// its group or others may read it.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// File holding a bearer token that `/state/*` and `/monitoring/metrics`
    /// then require (the admin token is accepted too), for hosts whose
    /// monitoring port others can reach; the probes stay open. Refused if
    /// its group or others may read it.
    #[arg(long)]
    state_token_file: Option<PathBuf>,
    /// Open monitoring connections at most; one more is closed at once.
    #[arg(long, default_value_t = steward_monitoring::DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65_536))]
    monitoring_max_connections: usize,
    /// Seconds a monitoring client has to send a request's headers (and a
    /// keep-alive connection may idle between requests).
    #[arg(long, default_value_t = steward_monitoring::DEFAULT_HEADER_READ_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    monitoring_header_read_timeout_s: u64,
    /// Seconds a monitoring request has to be answered (waiting for a
    /// rendering slot included), then 503.
    #[arg(long, default_value_t = steward_monitoring::DEFAULT_REQUEST_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    monitoring_request_timeout_s: u64,
    /// `/state/*` documents and metrics rendered at once; more wait.
    #[arg(long, default_value_t = steward_monitoring::DEFAULT_STATE_CONCURRENCY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    monitoring_state_concurrency: usize,
    /// Bytes of the usage ledger one `/state/usage` request reads at most
    /// (segments already read are answered from their digests); what it
    /// leaves out is said in the answer's `coverage`.
    #[arg(long, default_value_t = steward_metering::DEFAULT_SCAN_BYTES, value_parser = clap::value_parser!(u64).range((1 << 20)..))]
    state_usage_scan_bytes: u64,
    /// Do not put workers in cgroups (their limits are then not enforced).
    #[arg(long)]
    no_cgroups: bool,
    /// Workers outlive Steward: a SIGKILL, a crash, or a stop in this mode
    /// (SIGTERM) leaves them running, and the next Steward on the same data
    /// directory adopts them with their running allocations. `false`:
    /// every worker dies with Steward (the process driver only; OCI
    /// sandboxes are reaped at the next start either way).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "STEWARD_ADOPT_WORKERS")]
    adopt_workers: bool,
    /// Ids workers run under, `START:COUNT` as in /etc/subuid: the first
    /// is the group through which workers share `file://` blob roots, each
    /// other one the uid and gid of one live worker. The default block lies
    /// above the ids distributions, `useradd`'s subordinate ranges and
    /// systemd's container ranges hand out, below 2^31. Needs root.
    #[arg(long, default_value = "2000000000:65536")]
    worker_uid_range: wd::UidRange,
    /// Run workers as Steward's own user instead of one uid each (they can
    /// then read Steward's data directory and environment, and signal it).
    #[arg(long)]
    no_worker_identities: bool,
    /// How Steward talks to workers: `unix` (a socket in a directory only
    /// the worker's uid and Steward can enter) or `tcp` (loopback, the
    /// fallback). Either way the listener is checked before the first byte.
    #[arg(long, default_value = "unix")]
    worker_channel: wd::ChannelKind,
    /// Directory of workers' sockets and scratch directories (HOME,
    /// TMPDIR) and of the uid leases Stewards on this host share. Default:
    /// /var/lib/steward-workers as root, else <temp dir>/steward-workers-<uid>.
    #[arg(long)]
    worker_run_dir: Option<PathBuf>,
    /// A variable of Steward's environment workers inherit besides PATH,
    /// the locale, time zone, CA bundles, proxies and LD_LIBRARY_PATH:
    /// `NAME` or `PREFIX*`; repeatable.
    #[arg(long = "worker-env-allow")]
    worker_env_allow: Vec<String>,
    /// Do not meter usage (no usage ledger; results are reported without
    /// waiting for their usage records).
    #[arg(long)]
    no_metering: bool,
    /// Bound of the usage ledger (`<data dir>/usage`): the oldest segments
    /// go past it.
    #[arg(long, default_value_t = 1 << 30)]
    usage_ledger_max_bytes: u64,
    /// A live worker's idle time is recorded in pieces at most this long.
    #[arg(long, default_value_t = 900)]
    usage_idle_segment_s: u64,
    /// How often metering samples every worker's CPU and memory (100 to
    /// 60000). Allocation starts and ends are read as they happen; the
    /// memory integral between samples is a trapezoid.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    usage_sample_interval_ms: u64,
    /// Shortest time between two usage-ledger commits (write + fsync)
    /// while results keep coming (0 to 1000). Results wait for it only
    /// while other allocations still run and they have been finishing
    /// less than half a window apart; a lone result waits for no one.
    /// Longer trades result latency under load for agent CPU.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=1000))]
    usage_group_commit_ms: u64,
    /// Fault injection for tests: wait this long before each ledger write
    /// (a slow disk).
    #[arg(long, default_value_t = 0, hide = true)]
    usage_commit_delay_ms: u64,
    /// Fault injection for tests only: once this file exists, the
    /// reconcile loop stops doing anything (a wedged loop: the systemd
    /// watchdog pings stop). Not in the package's binary (built without
    /// the `devserver` feature, which carries dev and test code).
    #[cfg(feature = "devserver")]
    #[arg(long, hide = true)]
    test_wedge_reconcile_file: Option<PathBuf>,
    /// Fault injection for tests only: the agent SIGKILLs itself at this
    /// point of adoption's bookkeeping (call-recorded: a nested call the
    /// server created is on record, the worker not yet told;
    /// upload-recorded: an output upload is on record, the worker not yet
    /// given its URLs). Not in the package's binary.
    #[cfg(feature = "devserver")]
    #[arg(long, hide = true)]
    test_kill_at: Option<steward_reconciler::KillPoint>,
    /// How long a result waits for its usage record when the ledger's
    /// disk hangs or its writes keep failing (100 to 600000); past it
    /// results go without waiting until a write succeeds again.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    usage_stall_limit_ms: u64,
    /// Most usage records kept in memory for the ledger: those not yet
    /// written and those whose write failed (a full disk), retried with
    /// backoff. Past it the oldest are dropped, counted
    /// (`steward_usage_ledger_dropped_records`) and named in an event.
    #[arg(long, default_value_t = steward_metering::BACKLOG_RECORDS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    usage_backlog_records: usize,
    /// CPUs (may be fractional) for a worker whose description sets none.
    #[arg(long, default_value_t = 1.0)]
    default_worker_cpus: f64,
    /// Memory for a worker whose description sets none.
    #[arg(long, default_value_t = 128 << 20)]
    default_worker_memory_bytes: u64,
    /// Processes and threads one worker may have at once (its cgroup's pids.max).
    #[arg(long, default_value_t = 4096)]
    worker_pids_max: u64,
    /// Stop idle workers while the host's available memory is below this
    /// many bytes (0: never, on this signal).
    #[arg(long, default_value_t = 100 << 20, env = "STEWARD_EVICTION_MEMORY_AVAILABLE")]
    eviction_memory_available: u64,
    /// Stop idle workers while memory pressure (PSI `some avg10`, percent)
    /// is above this, where the kernel has PSI (0: never, on this signal).
    #[arg(long, default_value_t = 50.0, env = "STEWARD_EVICTION_MEMORY_PRESSURE")]
    eviction_memory_pressure: f64,
    /// Settings given by flag or environment, which the config file does
    /// not override (precedence: flags > environment > file > defaults).
    #[arg(skip)]
    explicit: Vec<&'static str>,
    /// `nvidia-smi` to use when NVML cannot be loaded.
    #[arg(long, default_value = "nvidia-smi")]
    nvidia_smi: PathBuf,
    /// Report failures tolerated this long before /monitoring/health turns 503.
    #[arg(long, default_value_t = 30)]
    health_report_grace_s: u64,
    /// Lifetime of presigned blob URLs (at least the allocation timeout is used).
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    presign_ttl_s: u64,
    /// S3 endpoint override (MinIO, test servers); credentials come from the AWS_* environment.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    s3_endpoint: Option<String>,
    #[arg(long, env = "AWS_REGION")]
    s3_region: Option<String>,
    /// Allow a plain-HTTP S3 endpoint.
    #[arg(long)]
    s3_allow_http: bool,
    /// Virtual-hosted-style S3 URLs (bucket.host) instead of path style.
    #[arg(long)]
    s3_virtual_hosted_style: bool,
    /// Read chunk and write part size for workers (the reference's 100 MiB by default).
    #[arg(long, default_value_t = 100 << 20, hide = true)]
    blob_chunk_bytes: u64,
    /// Milliseconds between worker health checks.
    #[arg(long, default_value_t = 5000, hide = true)]
    function_executor_health_check_interval_ms: u64,
    /// Reopen the desired-state stream after this many seconds without a message.
    #[arg(long, default_value_t = 300, hide = true)]
    stream_idle_timeout_s: u64,
    /// Longest a running function waits for one nested call's result before
    /// it fails with FUNCTION_TIMEOUT (its own timeout is paused meanwhile;
    /// the reference waits forever).
    #[arg(long, default_value_t = 86_400)]
    max_function_call_wait_s: u64,
    /// Largest blob a worker may ask to write (an output or a request state
    /// value); larger requests fail that allocation's request only.
    #[arg(long, default_value_t = 5 << 40)]
    max_output_blob_bytes: u64,
    /// Largest input handed to a worker (`offset + size` of an argument, a
    /// nested call's value or a request-state value); a larger argument
    /// fails its allocation before any URL is made. A worker reads each
    /// input whole into its memory.
    #[arg(long, default_value_t = steward_reconciler::DEFAULT_MAX_INPUT_BLOB_BYTES)]
    max_input_blob_bytes: u64,
    /// Most output blobs one allocation may ask for (its output and each
    /// nested call's arguments); one more fails it and stops its worker.
    #[arg(long, default_value_t = steward_reconciler::AllocationLimits::DEFAULT.max_output_blobs,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_output_blobs_per_allocation: usize,
    /// Most request-state writes one allocation may prepare; one more
    /// fails it and stops its worker.
    #[arg(long, default_value_t = steward_reconciler::AllocationLimits::DEFAULT.max_state_writes,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_request_state_writes_per_allocation: usize,
    /// Most request-state operations of any kind (reads, writes, commits)
    /// one allocation may ask for; one more fails it and stops its worker.
    #[arg(long, default_value_t = steward_reconciler::AllocationLimits::DEFAULT.max_state_ops,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_request_state_ops_per_allocation: usize,
    /// Most nested function calls one allocation may make; one more fails
    /// it and stops its worker.
    #[arg(long, default_value_t = steward_reconciler::AllocationLimits::DEFAULT.max_function_calls,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_function_calls_per_allocation: usize,
    /// Largest gRPC message exchanged with the server; a larger desired
    /// state fails its stream (an event names the limit), a larger report
    /// is not sent (the reference: unlimited).
    #[arg(long, default_value_t = 256 << 20)]
    max_server_message_bytes: usize,
    /// Largest gRPC message exchanged with a worker; a larger allocation
    /// state fails that allocation and the worker (the application code
    /// sent to `initialize` must fit too).
    #[arg(long, default_value_t = 1 << 30)]
    max_worker_message_bytes: usize,
    /// Largest application code the agent downloads (checked before the
    /// download and again while reading); larger code fails the worker's
    /// start with STARTUP_FAILED_INTERNAL_ERROR. The code must also fit in
    /// one worker message, so the smaller of this and
    /// --max-worker-message-bytes applies.
    #[arg(long, default_value_t = steward_reconciler::DEFAULT_MAX_APPLICATION_CODE_BYTES)]
    max_application_code_bytes: u64,
    /// Seconds between state reports while healthy.
    #[arg(long, default_value_t = 5, hide = true)]
    report_interval_s: u64,
    /// Longest wait between failed state reports (backoff x3 up to this).
    #[arg(long, default_value_t = 300)]
    report_backoff_max_s: u64,
    /// Seconds between samples of host CPU, memory and GPU usage.
    #[arg(long, default_value_t = 10)]
    usage_sample_interval_s: u64,
    /// Threads running the agent's tasks: 1 (default) runs them all on the
    /// main thread; more gives a work-stealing pool (for hosts where one
    /// core cannot keep up with the allocation rate); 0 uses every CPU.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=256))]
    runtime_threads: u16,
    /// Disable periodic worker health checks (as INDEXIFY_DISABLE_FUNCTION_EXECUTOR_HEALTH_CHECKS=1).
    #[arg(long, env = "INDEXIFY_DISABLE_FUNCTION_EXECUTOR_HEALTH_CHECKS", value_parser = parse_flag, default_value = "0")]
    disable_function_executor_health_checks: bool,
}

/// `--worker-driver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DriverKind {
    Process,
    Oci,
}

/// `--worker-network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WorkerNetwork {
    Host,
    None,
}

fn parse_flag(s: &str) -> Result<bool, String> {
    match s {
        "" | "0" | "false" => Ok(false),
        "1" | "true" => Ok(true),
        other => Err(format!("expected 0/1/true/false, got {other:?}")),
    }
}

fn expand_home(p: &str) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(rest),
        None => PathBuf::from(p),
    }
}

fn main() -> Result<()> {
    // Inside a worker's container Steward's binary is the first process
    // (`--worker-driver oci`): it runs the worker, and nothing else.
    if let Some(code) = wd::oci::worker_init_if_asked() {
        std::process::exit(code);
    }
    if let Some(code) = init::supervise_if_pid1()? {
        std::process::exit(code);
    }
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    cli.agent.explicit = [
        "labels",
        "functions",
        "eviction_memory_available",
        "eviction_memory_pressure",
    ]
    .into_iter()
    .filter(|id| {
        matches!(
            matches.value_source(id),
            Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
        )
    })
    .collect();
    let threads = match cli.command {
        #[cfg(feature = "devserver")]
        Some(Command::Devserver(_)) => 0,
        Some(_) => 1,
        None => usize::from(cli.agent.runtime_threads),
    };
    runtime(threads)?.block_on(async_main(cli))
}

/// The agent's runtime: by default one thread runs every task (as
/// linkerd2-proxy does with one core). The agent's work is many short
/// hand-offs between tasks (stream, reconcile, worker controllers, report,
/// RPC connections); on one thread a hand-off is a queue push, while a
/// work-stealing pool wakes a parked thread for it, and that doubled the
/// context switches and CPU per allocation (BENCHMARKS.md, runtime rows).
/// `threads` > 1 gives a work-stealing pool of that size; 0 sizes it to
/// the CPUs (the dev control plane's default).
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build()
}

async fn async_main(cli: Cli) -> Result<()> {
    match cli.command {
        #[cfg(feature = "devserver")]
        Some(Command::Devserver(args)) => {
            logging::init(0, logging::LogFormat::Text);
            devserver::run(*args).await
        }
        Some(Command::Status(args)) => operator::status(&args).await,
        Some(Command::Pause(args)) => operator::action(&args, "pause").await,
        Some(Command::Unpause(args)) => operator::action(&args, "unpause").await,
        Some(Command::Drain(args)) => operator::drain(&args).await,
        Some(Command::Config(args)) => operator::config(&args).await,
        Some(Command::Usage(args)) => usage::run(args),
        None => {
            logging::init(cli.agent.verbose, cli.agent.log_format);
            run_agent(cli.agent).await
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
    }
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for l in labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("label {l:?} is not key=value");
        };
        if k.is_empty() {
            bail!("label {l:?} has an empty key");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn parse_allowlist(functions: &[String]) -> Result<Vec<pb::AllowedFunction>> {
    functions
        .iter()
        .map(|f| {
            steward_reconciler::parse_allowed_function(f)
                .map_err(|e| anyhow::anyhow!("function {e}"))
        })
        .collect()
}

/// The executor id: from the flag, else the one kept in the data directory,
/// else a new one written there.
fn executor_id(flag: Option<String>, data_dir: &Path) -> Result<String> {
    if let Some(id) = flag {
        return Ok(id);
    }
    let path = data_dir.join("executor_id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let id = format!("steward-{:016x}", rand_u64());
    std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn gpu_model(m: hr::GpuModel) -> pb::GpuModel {
    match m {
        hr::GpuModel::Unknown => pb::GpuModel::Unknown,
        hr::GpuModel::A100_40GB => pb::GpuModel::NvidiaA10040gb,
        hr::GpuModel::A100_80GB => pb::GpuModel::NvidiaA10080gb,
        hr::GpuModel::H100_80GB => pb::GpuModel::NvidiaH10080gb,
        hr::GpuModel::TeslaT4 => pb::GpuModel::NvidiaTeslaT4,
        hr::GpuModel::A6000 => pb::GpuModel::NvidiaA6000,
        hr::GpuModel::A10 => pb::GpuModel::NvidiaA10,
    }
}

struct GpuPoolAdapter(Arc<hr::GpuAllocator>);

impl GpuPool for GpuPoolAdapter {
    fn allocate(&self, owner: &str, count: u32) -> Result<Vec<String>, GpuRefusal> {
        if count == 0 {
            return Ok(Vec::new());
        }
        self.0
            .allocate(owner, count)
            .map(|a| a.uuids)
            .map_err(|e| GpuRefusal::Pool(Box::new(e)))
    }
    fn release(&self, owner: &str) {
        self.0.release(owner);
    }
    fn reserve(&self, owner: &str, uuids: &[String]) -> Result<(), GpuRefusal> {
        if uuids.is_empty() {
            return Ok(());
        }
        self.0
            .reserve(owner, uuids)
            .map(|_| ())
            .map_err(|e| GpuRefusal::Pool(Box::new(e)))
    }
}

/// Applies the `steward:` section of the config file; a bad file or value
/// changes nothing and is said (event and log).
fn reload_settings(
    handle: &steward_reconciler::AgentHandle,
    metering: Option<&steward_metering::Recorder>,
    path: &Path,
    flags: &FlagSettings,
    by: &str,
) {
    let outcome = config_file::steward_section(path)
        .map_err(|e| format!("{e:#}"))
        .and_then(|section| match section {
            Some(v) => config_file::apply_settings(handle, metering, flags.over(v), by).map(|_| ()),
            None => Ok(()),
        });
    if let Err(e) = outcome {
        tracing::warn!(file = %path.display(), error = %e, "config file not applied");
        handle.event(
            "config_reload_failed",
            &path.display().to_string(),
            format!("nothing changed: {e}"),
        );
    }
}

/// Settings given by flag or environment: they win over the file's.
struct FlagSettings {
    explicit: Vec<&'static str>,
    labels: BTreeMap<String, String>,
}

impl FlagSettings {
    /// The file's `steward:` section with what flags set laid over it.
    fn over(&self, mut section: serde_json::Value) -> serde_json::Value {
        let Some(o) = section.as_object_mut() else {
            return section;
        };
        for id in &self.explicit {
            if *id == "labels" {
                let mut labels = o
                    .get("labels")
                    .and_then(|l| l.as_object())
                    .cloned()
                    .unwrap_or_default();
                for (k, v) in &self.labels {
                    labels.insert(k.clone(), serde_json::json!(v));
                }
                o.insert("labels".into(), serde_json::Value::Object(labels));
            } else if *id == "functions" {
                o.remove("allowed_functions");
            } else {
                o.remove(*id);
            }
        }
        section
    }
}

async fn reload_on_sighup(
    handle: steward_reconciler::AgentHandle,
    metering: Option<Arc<steward_metering::Recorder>>,
    path: PathBuf,
    flags: FlagSettings,
) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!(file = %path.display(), "SIGHUP: reloading settings");
        reload_settings(&handle, metering.as_deref(), &path, &flags, "SIGHUP reload");
    }
}

/// Removes the worker driver's parent cgroup when dropped.
struct DriverShutdown(Arc<dyn wd::WorkerDriver>);

/// This Steward's worker run directory, removed when dropped before a
/// driver took it over (a start that failed in between).
struct RunDirUntilDriver(Option<wd::Isolation>);

impl RunDirUntilDriver {
    fn handed_over(mut self) {
        self.0 = None;
    }
}

impl Drop for RunDirUntilDriver {
    fn drop(&mut self) {
        if let Some(isolation) = self.0.take() {
            isolation.remove();
        }
    }
}

impl Drop for DriverShutdown {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// The host's memory for pressure eviction: `MemAvailable`, or what is
/// left under Steward's own cgroup limit if that is less.
struct HostMemory;

impl steward_reconciler::MemorySource for HostMemory {
    fn sample(&self) -> Option<steward_reconciler::MemorySample> {
        let h = hr::memory_headroom()?;
        // Inside a container, its own memory limit runs out first.
        let own = wd::cgroup::Sources::of_this_process()
            .ok()
            .and_then(|s| wd::cgroup::own_memory_headroom(&s));
        Some(steward_reconciler::MemorySample {
            available_bytes: own.map_or(h.available_bytes, |o| o.min(h.available_bytes)),
            psi_some_avg10: h.psi_some_avg10,
        })
    }
}

fn worker_defaults(args: &AgentArgs) -> Result<steward_reconciler::WorkerDefaults> {
    let cpus = args.default_worker_cpus;
    if !(cpus.is_finite() && (0.001..=4096.0).contains(&cpus)) {
        bail!("--default-worker-cpus {cpus}: give a number of CPUs between 0.001 and 4096");
    }
    if args.default_worker_memory_bytes < (8 << 20) {
        bail!(
            "--default-worker-memory-bytes {}: at least 8 MiB is needed to start a worker",
            args.default_worker_memory_bytes
        );
    }
    if args.worker_pids_max < 16 {
        bail!(
            "--worker-pids-max {}: a worker needs at least 16",
            args.worker_pids_max
        );
    }
    Ok(steward_reconciler::WorkerDefaults {
        cpu_ms_per_sec: (cpus * 1000.0).round() as u32,
        memory_bytes: args.default_worker_memory_bytes,
        pids_max: args.worker_pids_max,
    })
}

/// The process driver, confining workers in cgroups where the host allows
/// and under their own identities where Steward is root; says once whether
/// limits are enforced and identities separated and, if not, why.
fn worker_driver(
    args: &AgentArgs,
    data_dir: &std::path::Path,
    isolation: wd::Isolation,
) -> wd::ProcessDriver {
    wd::ProcessDriver::new(wd::ProcessDriverConfig {
        records_dir: data_dir.join("workers"),
        cgroups: worker_cgroups(args),
        isolation,
        // A TCP port cannot be proved the worker's again after a restart.
        adoptable: adopting(args),
    })
}

/// Whether workers are started to be adopted: `--adopt-workers` under the
/// process driver on the Unix channel (OCI sandboxes and TCP workers are
/// not adopted: they die with Steward or are reaped at its next start).
fn adopting(args: &AgentArgs) -> bool {
    args.adopt_workers
        && args.worker_driver == DriverKind::Process
        && args.worker_channel == wd::ChannelKind::Unix
}

/// The OCI driver (`--worker-driver oci`): refused here, before anything
/// starts, when the runtime does not answer `--version`.
fn oci_driver(
    args: &AgentArgs,
    data_dir: &std::path::Path,
    executor_id: &str,
    isolation: wd::Isolation,
) -> Result<wd::OciDriver> {
    if args.worker_network == WorkerNetwork::None && args.worker_channel == wd::ChannelKind::Tcp {
        bail!("--worker-network none leaves workers no network: use --worker-channel unix");
    }
    let driver = wd::OciDriver::new(wd::OciDriverConfig {
        runtime: args.oci_runtime.clone(),
        executor_id: executor_id.to_string(),
        dir: data_dir.join("oci"),
        cgroups: worker_cgroups(args),
        cgroup_parent: args.cgroup_parent.clone(),
        network: match args.worker_network {
            WorkerNetwork::Host => wd::Network::Host,
            WorkerNetwork::None => wd::Network::None,
        },
        init: std::env::current_exe()
            .context("finding Steward's own binary (each container's init)")?,
        read_only: args.oci_bind_ro.clone(),
        shared: args.blob_roots.clone(),
        isolation,
    })
    .map_err(|e| anyhow::anyhow!("--worker-driver oci: {e}"))?;
    tracing::info!(runtime = %driver.runtime().display(), version = driver.runtime_version(), network = ?args.worker_network, "workers run in OCI containers");
    if args.blob_roots.is_empty() {
        tracing::warn!(
            "no --blob-root: OCI workers see no file:// blobs (only the blob roots are bound into their containers)"
        );
    }
    Ok(driver)
}

/// Workers' cgroups, where the host allows; says once whether limits are
/// enforced and, if not, why.
fn worker_cgroups(args: &AgentArgs) -> wd::CgroupSetup {
    let cgroups = if args.no_cgroups {
        wd::CgroupSetup::Unavailable("--no-cgroups was given".into())
    } else {
        wd::Cgroups::detect(&args.cgroup_parent)
    };
    match &cgroups {
        wd::CgroupSetup::Enabled(c) => {
            tracing::info!(cgroups = %c.describe(), "worker limits are enforced");
            if !c.missing().is_empty() {
                tracing::warn!(missing = ?c.missing(), "some cgroup controllers are missing: those limits are not enforced");
            }
        }
        wd::CgroupSetup::Unavailable(why) => {
            tracing::warn!(reason = %why, "worker limits are NOT enforced: workers run without cgroups");
        }
    }
    cgroups
}

/// How workers are kept apart: their identities (where Steward is root),
/// the channel, the variables they inherit and their directories, checked
/// and made here; says once whether identities are separated and, if not,
/// why. With identities, `file://` blob roots are shared with workers
/// through the range's blob group.
fn worker_isolation(args: &AgentArgs, executor_id: &str) -> Result<wd::Isolation> {
    let identities = wd::IdentitySetup::detect(
        args.worker_uid_range,
        args.no_worker_identities
            .then_some("--no-worker-identities was given"),
    );
    let base = args
        .worker_run_dir
        .clone()
        .unwrap_or_else(wd::Isolation::default_base);
    let isolation = wd::Isolation::new(
        &base,
        executor_id,
        identities,
        args.worker_channel,
        wd::EnvAllow::with(&args.worker_env_allow),
    );
    isolation
        .prepare()
        .map_err(|e| anyhow::anyhow!("--worker-run-dir: {e}"))?;
    match &isolation.identities {
        wd::IdentitySetup::Separated(range) => {
            tracing::info!(uids = %range.workers_text(), channel = args.worker_channel.as_str(), run_dir = %isolation.run_dir.display(), "workers run under their own uids");
            for root in &args.blob_roots {
                match wd::identity::share_with_workers(root, range.blob_gid()) {
                    Ok(None) => {}
                    Ok(Some(why)) => {
                        tracing::warn!(root = %root.display(), %why, "workers cannot reach this blob root")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot share a blob root with workers: their file:// blobs there will fail")
                    }
                }
            }
            if args.blob_roots.is_empty() {
                tracing::warn!(
                    "no --blob-root: workers reach file:// blobs only where their own uids may"
                );
            }
            if let Some(why) = wd::identity::unreachable_by_workers(&args.function_executor_bin) {
                tracing::error!(%why, "workers, under their own uids, cannot run the worker program: install it (and its Python) where others may read it, or use --no-worker-identities");
            }
        }
        wd::IdentitySetup::NotSeparated(why) => {
            tracing::warn!(reason = %why, channel = args.worker_channel.as_str(), "worker identities are NOT separated: workers run as Steward's own user");
        }
    }
    Ok(isolation)
}

async fn run_agent(args: AgentArgs) -> Result<()> {
    let server_tls = match &args.config_path {
        Some(p) => config_file::server_tls(p)?,
        None => None,
    };
    // An address that would not be TLS while TLS is configured is refused
    // here, before anything starts, never connected to in plaintext.
    if let Err(reason) =
        steward_reconciler::server_url(&args.grpc_server_addr, server_tls.is_some())
    {
        bail!("--grpc-server-addr {:?}: {reason}", args.grpc_server_addr);
    }
    // A process worker is never given a network namespace of its own: a
    // `none` it would silently ignore is refused instead.
    if args.worker_network == WorkerNetwork::None && args.worker_driver == DriverKind::Process {
        bail!(
            "--worker-network none needs --worker-driver oci: a process worker shares the host's network, so it cannot be taken away"
        );
    }
    let admin_token = args
        .admin_token_file
        .as_deref()
        .map(|p| bearer_token("--admin-token-file", p))
        .transpose()?;
    let state_token = args
        .state_token_file
        .as_deref()
        .map(|p| bearer_token("--state-token-file", p))
        .transpose()?;
    let data_dir = expand_home(&args.executor_cache_path);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    // Known before anything is logged: every line carries it.
    let executor_id = executor_id(args.executor_id.clone(), &data_dir)?;
    logging::set_executor_id(&executor_id);
    // No worker may enter it: the ledger, records, code cache and logs.
    wd::identity::private_dir(&data_dir)
        .map_err(|e| anyhow::anyhow!("--executor-cache-path: {e}"))?;
    let labels = parse_labels(&args.labels)?;
    let allowed_functions = parse_allowlist(&args.functions)?;

    // Host resources.
    let mut capacity = hr::probe_capacity(&data_dir).context("probing host capacity")?;
    if let Some(cpus) = args.total_cpus {
        capacity.cpu_count = cpus;
    }
    if let Some(bytes) = args.total_memory_bytes {
        capacity.memory_bytes = bytes;
    }
    if let Some(bytes) = args.total_disk_bytes {
        capacity.disk_bytes = bytes;
    }
    let reserved = hr::Reserved {
        cpu_count: args.reserved_cpus,
        memory_bytes: args.reserved_memory_bytes,
        disk_bytes: args.reserved_disk_bytes,
        gpu_count: args.reserved_gpus,
    };
    let smi = hr::NvidiaSmiProbe {
        binary: args.nvidia_smi.clone(),
    };
    let (gpus, gpu_source) = hr::detect_gpus_with_source(&[&hr::NvmlProbe, &smi]);
    let usage_probe: Option<Box<dyn hr::GpuProbe>> = match gpu_source {
        Some(0) => Some(Box::new(hr::NvmlProbe)),
        Some(_) => Some(Box::new(smi.clone())),
        None => None,
    };
    let allocator = Arc::new(hr::GpuAllocator::new(gpus.clone(), reserved.gpu_count));
    let gpu_res = |count: u32| {
        (count > 0).then(|| pb::GpuResources {
            count: Some(count),
            model: Some(
                gpus.first()
                    .map(|g| gpu_model(g.model))
                    .unwrap_or(pb::GpuModel::Unknown) as i32,
            ),
        })
    };
    let to_pb = |c: hr::Capacity, gpu_count: u32| pb::HostResources {
        cpu_count: Some(c.cpu_count),
        memory_bytes: Some(c.memory_bytes),
        disk_bytes: Some(c.disk_bytes),
        gpu: gpu_res(gpu_count),
    };
    let total = to_pb(capacity, gpus.len() as u32);
    let allocatable = to_pb(
        capacity.allocatable(&reserved),
        allocator.allocatable_count(),
    );
    tracing::info!(?capacity, gpus = gpus.len(), ?reserved, "host resources");

    let mut metrics = Metrics::new(VERSION, REVISION, &executor_id);
    let blob_metrics = Arc::new(host::BlobMetrics::register(metrics.registry_mut()));
    let blob_store = steward_blob_store::BlobStore::new(steward_blob_store::BlobStoreConfig {
        local_roots: args.blob_roots.clone(),
        presign_ttl: Duration::from_secs(args.presign_ttl_s.max(1)),
        chunk_bytes: args.blob_chunk_bytes,
        s3: steward_blob_store::S3Config {
            endpoint: args.s3_endpoint.clone(),
            region: args.s3_region.clone(),
            allow_http: args.s3_allow_http,
            virtual_hosted_style: args.s3_virtual_hosted_style,
            ..Default::default()
        },
    })
    .with_observer(blob_metrics);
    if args.blob_roots.is_empty() {
        tracing::warn!("no --blob-root given: workers may be handed any absolute file:// path");
    }
    let mut config = AgentConfig::new(
        executor_id.clone(),
        args.grpc_server_addr.clone(),
        data_dir,
        blob_store,
    );
    config.hostname = hostname();
    config.server_tls = server_tls;
    config.version = VERSION.to_string();
    config.labels = labels;
    config.allowed_functions = allowed_functions;
    config.catalog_entry_name = args.catalog_entry_name.clone();
    config.total_resources = total;
    config.function_executor_resources = allocatable;
    config.function_executor_bin = args.function_executor_bin.clone();
    config.health_checks_enabled = !args.disable_function_executor_health_checks;
    config.adopt_workers = adopting(&args);
    config.report_interval = Duration::from_secs(args.report_interval_s.max(1));
    config.stream_idle_timeout = Duration::from_secs(args.stream_idle_timeout_s.max(1));
    config.max_function_call_wait = Duration::from_secs(args.max_function_call_wait_s.max(1));
    config.max_output_blob_bytes = args.max_output_blob_bytes;
    config.max_input_blob_bytes = args.max_input_blob_bytes;
    config.allocation_limits = steward_reconciler::AllocationLimits {
        max_output_blobs: args.max_output_blobs_per_allocation,
        max_state_writes: args.max_request_state_writes_per_allocation,
        max_state_ops: args.max_request_state_ops_per_allocation,
        max_function_calls: args.max_function_calls_per_allocation,
    };
    config.max_server_message_bytes = args.max_server_message_bytes.max(1 << 20);
    config.max_worker_message_bytes = args.max_worker_message_bytes.max(1 << 20);
    config.max_application_code_bytes = args.max_application_code_bytes;
    config.health_check_interval =
        Duration::from_millis(args.function_executor_health_check_interval_ms.max(10));
    config.report_backoff_max = Duration::from_secs(args.report_backoff_max_s.max(1));
    config.gpu_pool = Arc::new(GpuPoolAdapter(allocator.clone()));
    config.worker_defaults = worker_defaults(&args)?;
    let isolation = worker_isolation(&args, &executor_id)?;
    // Until a driver owns it (its shutdown removes it), the run directory
    // goes with a failed start: nothing of it outlives the process.
    let run_dir = RunDirUntilDriver(Some(isolation.clone()));
    let driver: Arc<dyn wd::WorkerDriver> = match args.worker_driver {
        DriverKind::Process => Arc::new(worker_driver(&args, &config.data_dir, isolation)),
        DriverKind::Oci => Arc::new(oci_driver(
            &args,
            &config.data_dir,
            &executor_id,
            isolation,
        )?),
    };
    run_dir.handed_over();
    config.driver = driver.clone();
    // Steward's parent cgroup goes however this function returns (a taken
    // port, a bad address): nothing of it outlives the process.
    let _parent_cgroup = DriverShutdown(driver);
    config.eviction = steward_reconciler::Eviction {
        source: Some(Arc::new(HostMemory)),
        memory_available_bytes: args.eviction_memory_available,
        psi_some_avg10: (args.eviction_memory_pressure > 0.0)
            .then_some(args.eviction_memory_pressure),
        interval: Duration::from_secs(1),
    };

    let host = Arc::new(host::HostView::new(
        capacity,
        reserved,
        gpus.clone(),
        allocator.clone(),
    ));
    let load_sources = load::Sources {
        handle_driver: config.driver.clone(),
        gpus: allocator,
        host: host.clone(),
    };
    let load = Arc::new(load::LoadView::open(config.data_dir.join("load-history")));
    host.register_metrics(metrics.registry_mut());
    let recorder = start_metering(&args, &config.data_dir, &mut metrics)?;
    let monitoring_metrics = steward_monitoring::ServerMetrics::register(metrics.registry_mut());
    config.metering = recorder
        .clone()
        .map(|r| Arc::new(metering::RecorderMetering(r)) as Arc<dyn steward_reconciler::Metering>);
    #[cfg(feature = "devserver")]
    {
        config.wedge_reconcile_when = args.test_wedge_reconcile_file.clone();
        config.test_kill_at = args.test_kill_at;
    }
    // Under systemd's watchdog the reconcile loop's own heartbeat pings it.
    let notifier = systemd::Notifier::from_env();
    if let Some((every, ping)) = notifier.as_ref().and_then(|n| n.watchdog()) {
        config.reconcile_heartbeat = every;
        config.on_reconcile_beat = Some(ping);
    }
    let metrics = Arc::new(metrics);
    let monitoring_addr = format!(
        "{}:{}",
        args.monitoring_server_host, args.monitoring_server_port
    );
    let listener = steward_monitoring::bind(&monitoring_addr).await?;
    let local = listener
        .local_addr()
        .context("monitoring listener address")?;

    let agent = Agent::start(config, metrics)?;
    if let Some(r) = &recorder {
        // The ledger's trouble (a full disk: how many records wait) goes
        // to the event ring.
        let handle = agent.handle();
        let dir = r.status().ledger_dir;
        r.on_event(Box::new(move |kind, message| {
            handle.event(kind, &dir, message)
        }));
    }
    if let Some(st) = recorder.as_ref().map(|r| r.status())
        && (st.truncated_bytes > 0 || st.skipped_bytes > 0)
    {
        agent.handle().event(
            "usage_ledger_recovered",
            &st.ledger_dir,
            format!(
                "{} records kept; cut a torn tail of {} bytes; skipped {} damaged bytes",
                st.recovered_records, st.truncated_bytes, st.skipped_bytes
            ),
        );
    }
    if let Some(path) = args.config_path.clone() {
        // Steward's own settings in the file apply now and at every SIGHUP,
        // checked as the admin API checks them.
        let flags = FlagSettings {
            explicit: args.explicit.clone(),
            labels: parse_labels(&args.labels)?,
        };
        reload_settings(
            &agent.handle(),
            recorder.as_deref(),
            &path,
            &flags,
            "config file",
        );
        tokio::spawn(reload_on_sighup(
            agent.handle(),
            recorder.clone(),
            path,
            flags,
        ));
    }
    // One machine-readable line on stdout, for scripts and tests.
    println!(
        "{}",
        serde_json::json!({"executor_id": executor_id, "monitoring_url": format!("http://{local}")})
    );
    tracing::info!(executor_id = %executor_id, server = %args.grpc_server_addr, monitoring = %format!("http://{local}"), version = LONG_VERSION, "steward started");
    if let Some(sampler) = hr::UsageSampler::new(usage_probe) {
        tokio::spawn(host::sample_loop(
            host.clone(),
            sampler,
            Duration::from_secs(args.usage_sample_interval_s.max(1)),
            recorder.clone(),
        ));
    }
    tokio::spawn(load::sample_loop(
        load.clone(),
        load_sources.with(agent.handle()),
    ));
    let source = Arc::new(state_source::AgentStateSource {
        started: std::time::SystemTime::now(),
        load: Some(load),
        host: host.clone(),
        handle: agent.handle(),
        report_grace: Duration::from_secs(args.health_report_grace_s),
        reconcile_watchdog: Duration::from_secs(60),
        metering: recorder.clone(),
        usage_cache: steward_metering::SummaryCache::default(),
        usage_scan_bytes: args.state_usage_scan_bytes,
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let monitoring = tokio::spawn(steward_monitoring::serve(
        listener,
        source,
        steward_monitoring::ServerConfig {
            admin: admin_token,
            read: state_token,
            limits: steward_monitoring::Limits {
                max_connections: args.monitoring_max_connections,
                header_read_timeout: Duration::from_secs(args.monitoring_header_read_timeout_s),
                request_timeout: Duration::from_secs(args.monitoring_request_timeout_s),
                state_concurrency: args.monitoring_state_concurrency,
                ..steward_monitoring::Limits::default()
            },
            metrics: monitoring_metrics,
        },
        stop.clone().cancelled_owned(),
    ));
    let notifying = notifier.map(|n| (n, tokio::spawn(n.run(agent.handle()))));
    shutdown_signal().await;
    if let Some((n, status)) = notifying {
        status.abort();
        n.stopping();
    }
    let left_running = agent.shutdown(Duration::from_secs(5)).await;
    if let Some(r) = recorder {
        // Live workers' idle time and the activity file, then the thread ends.
        let _ = tokio::task::spawn_blocking(move || r.stop(Duration::from_secs(5))).await;
    }
    stop.cancel();
    let _ = monitoring.await;
    if left_running > 0 {
        tracing::info!(
            workers = left_running,
            "steward stopped; workers were left running for the next steward on this data directory to adopt (--adopt-workers)"
        );
    } else {
        tracing::info!("steward stopped");
    }
    Ok(())
}

/// The token in the file given as `flag`: refused unless only its owner
/// may read the file.
fn bearer_token(flag: &str, path: &Path) -> Result<steward_monitoring::BearerToken> {
    config_file::check_private(path).with_context(|| format!("{flag} {}", path.display()))?;
    steward_monitoring::BearerToken::new(&operator::read_token(path)?)
        .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
}

/// The usage recorder over `<data dir>/usage`, unless `--no-metering`.
fn start_metering(
    args: &AgentArgs,
    data_dir: &Path,
    metrics: &mut Metrics,
) -> Result<Option<Arc<steward_metering::Recorder>>> {
    if args.no_metering {
        tracing::warn!("--no-metering: usage is not recorded");
        return Ok(None);
    }
    let mut config = steward_metering::RecorderConfig::new(data_dir);
    config.ledger.max_total_bytes = args.usage_ledger_max_bytes.max(1 << 20);
    config.idle_segment_max = Duration::from_secs(args.usage_idle_segment_s.max(1));
    config.sample_interval = Duration::from_millis(args.usage_sample_interval_ms);
    config.commit_delay = Duration::from_millis(args.usage_commit_delay_ms.min(10_000));
    config.group_commit = Duration::from_millis(args.usage_group_commit_ms);
    config.stall_limit = Duration::from_millis(args.usage_stall_limit_ms);
    config.backlog_records = args.usage_backlog_records;
    let (recorder, recovery) = steward_metering::Recorder::start(config, metrics.registry_mut())
        .context("opening the usage ledger")?;
    tracing::info!(
        records = recovery.records,
        segments = recovery.segments,
        truncated_bytes = recovery.truncated_bytes,
        skipped_bytes = recovery.skipped_bytes,
        "usage ledger recovered"
    );
    Ok(Some(Arc::new(recorder)))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
