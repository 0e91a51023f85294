//! A worker's startup, from nothing to initialized, in named steps; and
//! what the driver is asked to start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use steward_worker_driver::{ConnectError, Worker, WorkerSpec};
use tokio::sync::watch;

use super::{Live, conn};
use crate::lifecycle::{FePhase, FeState, Reason, Spawned};
use crate::state::{Shared, TimelineEntry};
use crate::{fe_pb, pb};

fn to_fe_ref(f: &pb::FunctionRef) -> fe_pb::FunctionRef {
    fe_pb::FunctionRef {
        namespace: f.namespace.clone(),
        application_name: f.application_name.clone(),
        function_name: f.function_name.clone(),
        application_version: Some(f.application_version.clone().unwrap_or_default()),
    }
}

/// "3.11.2" -> ("3", "11"), for a Python worker.
fn python_version(info: &fe_pb::InfoResponse) -> Option<(String, String)> {
    if !info.sdk_language.as_deref()?.eq_ignore_ascii_case("python") {
        return None;
    }
    let mut parts = info.sdk_language_version.as_deref()?.split('.');
    let number = |p: Option<&str>| {
        p.filter(|s| !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit()))
            .map(str::to_string)
    };
    Some((number(parts.next())?, number(parts.next())?))
}

/// Reports the workers' Python version as labels, as the reference reports
/// its own (the interpreter that runs the functions is what matters here).
fn note_python_version(shared: &Shared, info: &fe_pb::InfoResponse) {
    let Some(v) = python_version(info) else {
        return;
    };
    let changed = shared.python_version.send_if_modified(|known| {
        let changed = known.as_ref() != Some(&v);
        *known = Some(v);
        changed
    });
    if changed {
        shared.report_now.notify_one();
    }
}

/// The largest application code a worker may be given: the configured
/// limit, and never more than fits in one worker message.
fn application_code_limit(config: &crate::AgentConfig) -> u64 {
    config
        .max_application_code_bytes
        .min(config.max_worker_message_bytes as u64)
}

/// Why a startup failed: the reason the server hears, in words.
pub(super) type Failed = (Reason, String);

fn internal(m: String) -> Failed {
    (Reason::StartupFailedInternalError, m)
}

/// Brings a worker from nothing to initialized: GPUs, code, spawn (the
/// view then shows the process), connect, `get_info`, `initialize`.
pub(super) async fn start(
    shared: Arc<Shared>,
    desc: Arc<pb::FunctionExecutorDescription>,
    refusal: Option<String>,
    view: watch::Sender<FeState>,
) -> Result<Live, Failed> {
    let id = desc.id.clone().unwrap_or_default();
    if let Some(why) = refusal {
        return Err(internal(format!("admission refused this worker: {why}")));
    }
    let gpus = allocate_gpus(&shared, &desc, &id)?;
    let (code, app) = fetch_code(&shared, &desc).await?;
    let spec = worker_spec(&shared, &desc, &id, &gpus);
    let mut process = shared
        .config
        .driver
        .start(spec)
        .await
        .map_err(|e| internal(e.to_string()))?;
    publish_spawned(&shared, &desc, gpus, process.as_ref(), &view);
    let channel = connect(&shared, process.as_mut()).await?;
    // A worker sending more than this in one message has its allocation
    // failed and is terminated as unhealthy (the RPC fails OUT_OF_RANGE).
    let limit = shared.config.max_worker_message_bytes;
    let mut client = channel
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    if let Err(f) = get_info(&shared, &mut client).await {
        process.stop(Duration::ZERO).await;
        return Err(f);
    }
    if let Err(f) = initialize(&desc, &app, code, process.as_ref(), &mut client).await {
        process.stop(Duration::ZERO).await;
        return Err(f);
    }
    Ok(Live {
        worker: process,
        client,
    })
}

/// The GPUs a new worker asks for, taken from the pool.
fn allocate_gpus(
    shared: &Shared,
    desc: &pb::FunctionExecutorDescription,
    id: &str,
) -> Result<Vec<String>, Failed> {
    let gpu_count = desc
        .resources
        .as_ref()
        .and_then(|r| r.gpu.as_ref())
        .and_then(|g| g.count)
        .unwrap_or(0);
    shared
        .config
        .gpu_pool
        .allocate(id, gpu_count)
        .map_err(|e| internal(e.to_string()))
}

/// The application code (from the cache or the blob store), with its
/// payload description.
async fn fetch_code(
    shared: &Shared,
    desc: &pb::FunctionExecutorDescription,
) -> Result<(Vec<u8>, pb::DataPayload), Failed> {
    let app = desc.application.clone().unwrap_or_default();
    let uri = app.uri.clone().unwrap_or_default();
    // The code is read into memory and sent in one worker message: a size
    // named by the server is checked before the download, and the
    // download stops past the limit.
    let code_limit = application_code_limit(&shared.config);
    let (code, source) = shared
        .code_cache
        .get_or_fetch(
            &shared.config.blob_store,
            &uri,
            app.sha256_hash.as_deref(),
            code_limit,
        )
        .await
        .map_err(|e| match e {
            steward_blob_store::BlobError::TooLarge { .. } => internal(format!(
                "application code: {e} (the smaller of --max-application-code-bytes and --max-worker-message-bytes)"
            )),
            e => internal(format!("application code: {e}")),
        })?;
    let label = match source {
        steward_blob_store::CodeSource::Cache => "cache",
        steward_blob_store::CodeSource::Store => "blob_store",
    };
    shared
        .metrics
        .application_code_fetches
        .get_or_create(&vec![("source", label)])
        .inc();
    // No copy: the cache's buffer is moved when nothing else holds it.
    Ok((Vec::from(code), app))
}

/// Shows the spawned process in the worker's view, and tells metering
/// (it reads the worker's counters); its end is told when the usage is
/// kept (`keep_last_usage`).
fn publish_spawned(
    shared: &Shared,
    desc: &pb::FunctionExecutorDescription,
    gpus: Vec<String>,
    process: &dyn Worker,
    view: &watch::Sender<FeState>,
) {
    if let Some(metering) = &shared.config.metering {
        metering.worker_started(crate::metering::worker_of(desc, &gpus, process.monitor()));
    }
    let spawned = Spawned {
        pid: process.pid(),
        gpus,
        monitor: process.monitor(),
    };
    let what = format!("spawned pid {} on {}", process.pid(), process.address());
    view.send_modify(|s| {
        if matches!(s.phase, FePhase::Pending) {
            s.phase = FePhase::Starting(spawned);
        }
        s.timeline.push(TimelineEntry::now(what));
    });
}

/// Connects to the worker, retrying while it starts; gives up (and stops
/// it) if it exits, if something else listens there, or at the deadline.
pub(super) async fn connect(
    shared: &Shared,
    process: &mut dyn Worker,
) -> Result<conn::WorkerClient, Failed> {
    let deadline = Instant::now() + shared.config.function_executor_connect_timeout;
    let mut retry = Duration::from_millis(2);
    loop {
        if let Some(exit) = process.try_exit() {
            let reason = match exit.oom {
                Some(_) => Reason::Oom,
                None => Reason::StartupFailedInternalError,
            };
            return Err((
                reason,
                format!(
                    "worker {} before accepting connections{} (log: {})",
                    exit.description,
                    exit.oom.map(|o| format!(": {o}")).unwrap_or_default(),
                    process.log_path().display()
                ),
            ));
        }
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            match process.connect().await {
                Ok(stream) => conn::connect(stream).await.map_err(ConnectError::NotYet),
                Err(e) => Err(e),
            }
        });
        match attempt
            .await
            .unwrap_or_else(|_| Err(ConnectError::NotYet(std::io::ErrorKind::TimedOut.into())))
        {
            Ok(c) => return Ok(c),
            // Something that is not the worker listens where it should:
            // not a byte goes there, and the worker goes.
            Err(refused @ ConnectError::Refused { .. }) => {
                process.stop(Duration::ZERO).await;
                return Err(internal(format!("worker channel: {refused}")));
            }
            Err(e) if Instant::now() > deadline => {
                process.stop(Duration::ZERO).await;
                return Err(internal(format!(
                    "worker did not accept connections on {}: {e}",
                    process.address()
                )));
            }
            Err(_) => {
                // Fast workers listen within milliseconds: poll quickly at
                // first; a Python worker takes about half a second, and
                // polling it every 20 ms (a refused loopback connect costs
                // microseconds) adds 10 ms on average, not 50.
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_millis(20));
            }
        }
    }
}

/// Asks the worker what it is; an incomplete answer is a failed startup.
pub(super) async fn get_info(
    shared: &Shared,
    client: &mut conn::WorkerClient,
) -> Result<(), Failed> {
    let info = match tokio::time::timeout(
        Duration::from_secs(10),
        client.get_info(fe_pb::InfoRequest {}),
    )
    .await
    {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) => {
            return Err(internal(format!(
                "get_info failed: {}: {}",
                s.code(),
                s.message()
            )));
        }
        Err(_) => return Err(internal("get_info got no answer within 10s".into())),
    };
    if info.version.is_none()
        || info.sdk_version.is_none()
        || info.sdk_language.is_none()
        || info.sdk_language_version.is_none()
    {
        return Err(internal(format!("get_info answer is incomplete: {info:?}")));
    }
    note_python_version(shared, &info);
    Ok(())
}

/// Sends the function and its code; the worker's verdict within the
/// description's initialization timeout.
async fn initialize(
    desc: &pb::FunctionExecutorDescription,
    app: &pb::DataPayload,
    code: Vec<u8>,
    process: &dyn Worker,
    client: &mut conn::WorkerClient,
) -> Result<(), Failed> {
    let init_timeout =
        Duration::from_millis(u64::from(desc.initialization_timeout_ms.unwrap_or(0)));
    let mut req = tonic::Request::new(initialize_request(desc, app, code));
    req.set_timeout(init_timeout);
    let init_started = Instant::now();
    let outcome = tokio::time::timeout(
        init_timeout + Duration::from_secs(1),
        client.initialize(req),
    )
    .await;
    let timed_out = || {
        Err((
            Reason::StartupFailedFunctionTimeout,
            format!(
                "initialize took longer than {} ms",
                init_timeout.as_millis()
            ),
        ))
    };
    match outcome {
        Err(_) => timed_out(),
        // A worker may answer an expired deadline with CANCELLED.
        Ok(Err(s))
            if matches!(
                s.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) || init_started.elapsed() >= init_timeout =>
        {
            timed_out()
        }
        Ok(Err(s)) => Err((
            Reason::StartupFailedFunctionError,
            format!("initialize failed: {}: {}", s.code(), s.message()),
        )),
        Ok(Ok(r)) => initialized(&r.into_inner(), process),
    }
}

/// The worker's answer to `initialize`, as a verdict.
fn initialized(r: &fe_pb::InitializeResponse, process: &dyn Worker) -> Result<(), Failed> {
    if r.outcome_code == Some(fe_pb::InitializationOutcomeCode::Success as i32) {
        return Ok(());
    }
    Err((
        Reason::StartupFailedFunctionError,
        format!(
            "initialize answered {:?} ({:?}); see {}",
            r.outcome_code(),
            r.failure_reason(),
            process.log_path().display()
        ),
    ))
}

/// The function and its code, as the worker is given them.
fn initialize_request(
    desc: &pb::FunctionExecutorDescription,
    app: &pb::DataPayload,
    code: Vec<u8>,
) -> fe_pb::InitializeRequest {
    let sha = hex::encode(Sha256::digest(&code));
    fe_pb::InitializeRequest {
        function: desc.function.as_ref().map(to_fe_ref),
        application_code: Some(fe_pb::SerializedObject {
            manifest: Some(fe_pb::SerializedObjectManifest {
                encoding: Some(fe_pb::SerializedObjectEncoding::BinaryZip as i32),
                encoding_version: Some(app.encoding_version.unwrap_or(0)),
                size: Some(code.len() as u64),
                metadata_size: Some(0),
                sha256_hash: Some(sha),
                content_type: None,
                source_function_call_id: None,
            }),
            data: Some(code),
        }),
    }
}

/// What the driver starts for worker `id`: the worker program with the
/// reference's arguments, its GPUs, and limits from its admitted claim.
fn worker_spec(
    shared: &Shared,
    desc: &pb::FunctionExecutorDescription,
    id: &str,
    gpus: &[String],
) -> WorkerSpec {
    let config = &shared.config;
    let claim = crate::admission::effective(desc, &config.worker_defaults).claim;
    let mut args = vec![
        format!("--executor-id={}", config.executor_id),
        format!("--function-executor-id={id}"),
    ];
    args.extend(config.function_executor_args.iter().cloned());
    let mut env = Vec::new();
    if !gpus.is_empty() {
        let visible = gpus.join(",");
        env.push(("CUDA_VISIBLE_DEVICES".to_string(), visible.clone()));
        env.push(("NVIDIA_VISIBLE_DEVICES".to_string(), visible));
    }
    WorkerSpec {
        id: id.to_string(),
        program: config.function_executor_bin.clone(),
        args,
        // On top of what the driver's allowlist lets through: workers get
        // presigned URLs, never the agent's cloud credentials.
        env,
        log_path: config.data_dir.join("logs").join(format!("fe-{id}.log")),
        limits: crate::admission::limits(&claim, &config.worker_defaults),
    }
}
