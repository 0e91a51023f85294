//! `steward-fake-worker`: a native function executor that speaks the
//! Tensorlake worker protocol (`function_executor_service.FunctionExecutor`)
//! with the reference worker's command line, answers at once, and
//! misbehaves on cue. It ignores application code and acts on the
//! function's name (see `examples/fake/fake.py`): `echo`, `noop`, `fail`,
//! `hang`, `crash`, `unhealthy`, `init_fail`, `init_hang`, `sleep_<ms>`,
//! `no_upload` (a value never uploaded), `huge_output` (a u64::MAX-byte blob request),
//! `fuzz` (hostile allocation states from a seed; see `fuzz.rs`), `huge_state`
//! (a 2 MiB allocation state), `gate` (finishes once the file its input names exists),
//! `huge_content_type` (echoes its input, a number `n`, with an `n` MiB content
//! type), `huge_watches` (its input `[count, bytes]`: that many watchers, their
//! ids and watched call ids that many bytes long, then silence),
//! `many_outputs`, `many_writes`, `many_calls` and `foreign_call` (more than one
//! allocation may ask for, or a call into another namespace; see `hostile.rs`),
//! and, for resource-limit tests, `burn_<ms>` (two threads spin for `<ms>` of wall
//! time; outputs the wall and process CPU time), `forkbomb` (spawns `sleep`s until a
//! spawn fails, then kills and reaps them all; outputs how many and the error) and
//! `alloc_<mib>` (allocates and touches `<mib>` MiB, holds it 200 ms; see
//! `limits.rs`) and `hold_<mib>` (the same, held 3 s: for metering).
//! Outputs go through the real output-blob protocol (`file://` blobs).
//!
//! Used where a real worker cannot misbehave on demand (fault tests) and
//! where hundreds of Python workers would not fit (benchmarks).
//! Must not know about: the agent, the control plane.

mod fuzz;
mod hostile;
mod limits;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use steward_proto::function_executor_service as fe;
use steward_proto::function_executor_service::function_executor_server::{
    FunctionExecutor, FunctionExecutorServer,
};
use tokio::sync::{oneshot, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

struct Alloc {
    state: watch::Sender<fe::AllocationState>,
    blob: Option<oneshot::Sender<fe::Blob>>,
}

#[derive(Default)]
struct Inner {
    function: Mutex<Option<String>>,
    /// The function as `initialize` named it (namespace, application).
    function_ref: Mutex<Option<fe::FunctionRef>>,
    allocs: Mutex<HashMap<String, Alloc>>,
}

#[derive(Clone, Default)]
struct Worker(Arc<Inner>);

type StateStream = Pin<Box<dyn Stream<Item = Result<fe::AllocationState, Status>> + Send>>;

fn file_path(uri: &str) -> Result<&str, String> {
    uri.strip_prefix("file://")
        .ok_or_else(|| format!("the fake worker only handles file:// blobs, got {uri}"))
}

/// Reads `size` bytes at global `offset` of a blob whose chunks all name one file.
fn read_blob(blob: &fe::Blob, offset: u64, size: u64) -> Result<Vec<u8>, String> {
    if size == 0 {
        return Ok(Vec::new());
    }
    let uri = blob
        .chunks
        .first()
        .and_then(|c| c.uri.as_deref())
        .ok_or("argument blob has no chunks")?;
    let mut f = std::fs::File::open(file_path(uri)?).map_err(|e| format!("{uri}: {e}"))?;
    f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut buf = vec![0; size as usize];
    f.read_exact(&mut buf).map_err(|e| format!("{uri}: {e}"))?;
    Ok(buf)
}

/// Writes `data` across the blob's chunks (each chunk at its global offset).
fn write_blob(blob: &fe::Blob, data: &[u8]) -> Result<Vec<fe::BlobChunk>, String> {
    let mut used = Vec::new();
    let mut offset = 0usize;
    for c in &blob.chunks {
        if offset >= data.len() && !used.is_empty() {
            break;
        }
        let uri = c.uri.as_deref().ok_or("output chunk without a URI")?;
        let take = (c.size.unwrap_or(0) as usize).min(data.len() - offset);
        // Like the real worker, create the parent directory.
        if let Some(parent) = std::path::Path::new(file_path(uri)?).parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{uri}: {e}"))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(file_path(uri)?)
            .map_err(|e| format!("{uri}: {e}"))?;
        f.seek(SeekFrom::Start(offset as u64))
            .map_err(|e| e.to_string())?;
        f.write_all(&data[offset..offset + take])
            .map_err(|e| e.to_string())?;
        used.push(fe::BlobChunk {
            uri: Some(uri.to_string()),
            size: Some(take as u64),
            etag: Some(hex::encode(Sha256::digest(&data[offset..offset + take]))),
        });
        offset += take;
    }
    if offset < data.len() {
        return Err(format!(
            "output of {} bytes does not fit the offered chunks",
            data.len()
        ));
    }
    Ok(used)
}

/// The number `<n>` in a function name `<prefix><n>`.
fn suffix_number<T: std::str::FromStr>(name: &str, prefix: &str) -> Option<T> {
    name.strip_prefix(prefix).and_then(|n| n.parse().ok())
}

/// `[count, bytes]` (the `huge_watches` input); 20,000 watchers of 1 KiB ids by default.
fn count_and_bytes(input: &[u8]) -> (usize, usize) {
    let text = String::from_utf8_lossy(input);
    let mut numbers = text
        .trim()
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|n| n.trim().parse().ok());
    let count = numbers.next().flatten().unwrap_or(20_000);
    let bytes = numbers.next().flatten().unwrap_or(1024);
    (count, bytes)
}

/// Runs `f` on the blocking pool, off the (single) runtime thread.
async fn blocking(
    f: impl FnOnce() -> Result<Vec<u8>, String> + Send + 'static,
) -> Result<Vec<u8>, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("blocking task: {e}"))?
}

fn failure(reason: fe::AllocationFailureReason) -> fe::AllocationResult {
    fe::AllocationResult {
        outcome_code: Some(fe::AllocationOutcomeCode::Failure as i32),
        failure_reason: Some(reason as i32),
        ..Default::default()
    }
}

impl Worker {
    fn publish(&self, id: &str, f: impl FnOnce(&mut fe::AllocationState)) {
        if let Some(a) = self.0.allocs.lock().get(id) {
            a.state.send_modify(|s| {
                f(s);
                let n: u64 = s
                    .sha256_hash
                    .as_deref()
                    .and_then(|h| h.parse().ok())
                    .unwrap_or(0);
                s.sha256_hash = Some((n + 1).to_string());
            });
        }
    }

    /// Ends the allocation with an internal error, logging why.
    fn fail_internal(&self, id: &str, why: &str) {
        eprintln!("fake worker: {why}");
        self.publish(id, |s| {
            s.result = Some(failure(fe::AllocationFailureReason::InternalError))
        });
    }

    /// Runs the "function" named at initialization.
    async fn run(self, alloc: fe::Allocation) {
        let id = alloc.allocation_id.clone().unwrap_or_default();
        let function = self.0.function.lock().clone().unwrap_or_default();
        let inputs = alloc.inputs.unwrap_or_default();
        let input = match (inputs.args.first(), inputs.arg_blobs.first()) {
            (Some(arg), Some(blob)) => {
                let size = arg.manifest.as_ref().and_then(|m| m.size).unwrap_or(0);
                read_blob(blob, arg.offset.unwrap_or(0), size)
            }
            _ => Ok(b"null".to_vec()),
        };
        let output = match (function.as_str(), input) {
            (_, Err(e)) => {
                eprintln!("fake worker: reading input: {e}");
                return self.publish(&id, |s| {
                    s.result = Some(failure(fe::AllocationFailureReason::InternalError))
                });
            }
            ("hang", _) => return std::future::pending().await,
            ("huge_state", _) => {
                // One allocation state of 2 MiB (a call's metadata), then silence.
                self.publish(&id, |s| {
                    s.function_calls.push(fe::AllocationFunctionCall {
                        id: Some("big".into()),
                        updates: Some(fe::ExecutionPlanUpdates {
                            updates: vec![fe::ExecutionPlanUpdate {
                                op: Some(fe::execution_plan_update::Op::FunctionCall(
                                    fe::FunctionCall {
                                        call_metadata: Some(vec![7; 2 << 20]),
                                        ..Default::default()
                                    },
                                )),
                            }],
                            root_function_call_id: Some("big".into()),
                            start_at: None,
                        }),
                        args_blob: None,
                    })
                });
                return std::future::pending().await;
            }
            ("huge_watches", Ok(input)) => {
                let (count, bytes) = count_and_bytes(&input);
                let padded = |prefix: &str, i: usize| {
                    format!("{prefix}{i:0>width$}", width = bytes.saturating_sub(1))
                };
                self.publish(&id, |s| {
                    s.function_call_watchers = (0..count)
                        .map(|i| fe::AllocationFunctionCallWatcher {
                            id: Some(padded("w", i)),
                            root_function_call_id: Some(padded("c", i)),
                            ..Default::default()
                        })
                        .collect()
                });
                return std::future::pending().await;
            }
            ("fuzz", Ok(input)) => {
                let seed = String::from_utf8_lossy(&input).trim().parse().unwrap_or(0);
                let mut rng = fuzz::Rng::new(seed);
                for _ in 0..fuzz::steps(&mut rng) {
                    self.publish(&id, |s| fuzz::mutate(&mut rng, s));
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                return self.publish(&id, |s| s.result = Some(fuzz::result(&mut rng)));
            }
            ("crash", _) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                std::process::exit(3);
            }
            ("fail", _) => {
                return self.publish(&id, |s| {
                    s.result = Some(failure(fe::AllocationFailureReason::FunctionError))
                });
            }
            ("noop", _) => b"null".to_vec(),
            (f, Ok(input)) if hostile::FUNCTIONS.contains(&f) => {
                let own = self.0.function_ref.lock().clone().unwrap_or_default();
                self.publish(&id, |s| hostile::ask(f, &input, &own, s));
                input
            }
            ("forkbomb", _) => match blocking(limits::forkbomb).await {
                Ok(output) => output,
                Err(e) => return self.fail_internal(&id, &e),
            },
            ("no_upload", _) => {
                // Claims a value but never asks for a blob to put it in.
                return self.publish(&id, |s| {
                    s.result = Some(fe::AllocationResult {
                        outcome_code: Some(fe::AllocationOutcomeCode::Success as i32),
                        outputs: Some(fe::allocation_result::Outputs::Value(
                            fe::SerializedObjectInsideBlob::default(),
                        )),
                        ..Default::default()
                    })
                });
            }
            ("gate", Ok(input)) => {
                // Finishes once the file named by its (JSON string) input exists.
                let path = String::from_utf8_lossy(&input)
                    .trim()
                    .trim_matches('"')
                    .to_string();
                while !std::path::Path::new(&path).exists() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                input
            }
            (f, Ok(input)) => {
                let work = if let Some(ms) = suffix_number(f, "sleep_") {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(input)
                } else if let Some(ms) = suffix_number(f, "burn_") {
                    blocking(move || limits::burn(Duration::from_millis(ms))).await
                } else if let Some(mib) = suffix_number(f, "alloc_") {
                    limits::alloc(mib, limits::ALLOC_HOLD).await
                } else if let Some(mib) = suffix_number(f, "hold_") {
                    limits::alloc(mib, limits::LONG_HOLD).await
                } else {
                    Ok(input)
                };
                match work {
                    Ok(output) => output,
                    Err(e) => return self.fail_internal(&id, &e),
                }
            }
        };
        // Ask for an output blob and wait for the agent to provide it.
        let (tx, rx) = oneshot::channel();
        if let Some(a) = self.0.allocs.lock().get_mut(&id) {
            a.blob = Some(tx);
        }
        // `huge_output` asks for the largest blob a worker can name.
        let size = if function == "huge_output" {
            u64::MAX
        } else {
            output.len() as u64
        };
        self.publish(&id, |s| {
            s.output_blob_requests
                .push(fe::AllocationOutputBlobRequest {
                    id: Some("out".into()),
                    size: Some(size),
                })
        });
        let Ok(blob) = rx.await else { return };
        let content_type = match function.as_str() {
            "huge_content_type" => {
                let mib: usize = String::from_utf8_lossy(&output)
                    .trim()
                    .parse()
                    .unwrap_or(300);
                "x".repeat(mib << 20)
            }
            _ => "application/json".into(),
        };
        let result = match write_blob(&blob, &output) {
            Ok(chunks) => fe::AllocationResult {
                outcome_code: Some(fe::AllocationOutcomeCode::Success as i32),
                outputs: Some(fe::allocation_result::Outputs::Value(
                    fe::SerializedObjectInsideBlob {
                        manifest: Some(fe::SerializedObjectManifest {
                            encoding: Some(fe::SerializedObjectEncoding::Utf8Json as i32),
                            encoding_version: Some(0),
                            size: Some(size),
                            metadata_size: Some(0),
                            sha256_hash: Some(hex::encode(Sha256::digest(&output))),
                            content_type: Some(content_type),
                            source_function_call_id: None,
                        }),
                        offset: Some(0),
                    },
                )),
                uploaded_function_outputs_blob: Some(fe::Blob {
                    id: blob.id.clone(),
                    chunks,
                }),
                ..Default::default()
            },
            Err(e) => {
                eprintln!("fake worker: writing output: {e}");
                failure(fe::AllocationFailureReason::InternalError)
            }
        };
        self.publish(&id, |s| s.result = Some(result));
    }
}

#[tonic::async_trait]
impl FunctionExecutor for Worker {
    async fn initialize(
        &self,
        request: Request<fe::InitializeRequest>,
    ) -> Result<Response<fe::InitializeResponse>, Status> {
        let function_ref = request.into_inner().function;
        let name = function_ref
            .as_ref()
            .and_then(|f| f.function_name.clone())
            .unwrap_or_default();
        let outcome = match name.as_str() {
            "init_hang" => std::future::pending().await,
            "init_fail" => fe::InitializeResponse {
                outcome_code: Some(fe::InitializationOutcomeCode::Failure as i32),
                failure_reason: Some(fe::InitializationFailureReason::FunctionError as i32),
            },
            _ => fe::InitializeResponse {
                outcome_code: Some(fe::InitializationOutcomeCode::Success as i32),
                failure_reason: None,
            },
        };
        if outcome.outcome_code == Some(fe::InitializationOutcomeCode::Success as i32) {
            *self.0.function.lock() = Some(name);
            *self.0.function_ref.lock() = function_ref;
        }
        Ok(Response::new(outcome))
    }

    async fn list_allocations(
        &self,
        _: Request<fe::ListAllocationsRequest>,
    ) -> Result<Response<fe::ListAllocationsResponse>, Status> {
        let ids: Vec<String> = self.0.allocs.lock().keys().cloned().collect();
        Ok(Response::new(fe::ListAllocationsResponse {
            allocations: ids
                .into_iter()
                .map(|id| fe::Allocation {
                    allocation_id: Some(id),
                    ..Default::default()
                })
                .collect(),
        }))
    }

    async fn create_allocation(
        &self,
        request: Request<fe::CreateAllocationRequest>,
    ) -> Result<Response<fe::Empty>, Status> {
        if self.0.function.lock().is_none() {
            return Err(Status::failed_precondition("not initialized"));
        }
        let alloc = request
            .into_inner()
            .allocation
            .ok_or_else(|| Status::invalid_argument("allocation is required"))?;
        let id = alloc
            .allocation_id
            .clone()
            .ok_or_else(|| Status::invalid_argument("allocation_id is required"))?;
        {
            let mut allocs = self.0.allocs.lock();
            if allocs.contains_key(&id) {
                return Err(Status::already_exists(format!("allocation {id} exists")));
            }
            let initial = fe::AllocationState {
                sha256_hash: Some("0".into()),
                ..Default::default()
            };
            allocs.insert(
                id,
                Alloc {
                    state: watch::Sender::new(initial),
                    blob: None,
                },
            );
        }
        tokio::spawn(self.clone().run(alloc));
        Ok(Response::new(fe::Empty {}))
    }

    type watch_allocation_stateStream = StateStream;

    async fn watch_allocation_state(
        &self,
        request: Request<fe::WatchAllocationStateRequest>,
    ) -> Result<Response<StateStream>, Status> {
        let id = request.into_inner().allocation_id.unwrap_or_default();
        let mut rx = self
            .0
            .allocs
            .lock()
            .get(&id)
            .map(|a| a.state.subscribe())
            .ok_or_else(|| Status::not_found(format!("allocation {id}")))?;
        let (tx, out) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let state = rx.borrow_and_update().clone();
                let done = state.result.is_some();
                if tx.send(Ok(state)).await.is_err() || done {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn delete_allocation(
        &self,
        request: Request<fe::DeleteAllocationRequest>,
    ) -> Result<Response<fe::Empty>, Status> {
        let id = request.into_inner().allocation_id.unwrap_or_default();
        let mut allocs = self.0.allocs.lock();
        match allocs.get(&id) {
            None => Err(Status::not_found(format!("allocation {id}"))),
            Some(a) if a.state.borrow().result.is_none() => {
                Err(Status::failed_precondition("allocation is still running"))
            }
            Some(_) => {
                allocs.remove(&id);
                Ok(Response::new(fe::Empty {}))
            }
        }
    }

    async fn send_allocation_update(
        &self,
        request: Request<fe::AllocationUpdate>,
    ) -> Result<Response<fe::Empty>, Status> {
        let update = request.into_inner();
        let id = update.allocation_id.unwrap_or_default();
        let mut allocs = self.0.allocs.lock();
        let a = allocs
            .get_mut(&id)
            .ok_or_else(|| Status::not_found(format!("allocation {id}")))?;
        if a.state.borrow().result.is_some() {
            return Err(Status::failed_precondition("allocation finished"));
        }
        if let Some(fe::allocation_update::Update::OutputBlob(b)) = update.update
            && let (Some(tx), Some(blob)) = (a.blob.take(), b.blob)
        {
            let _ = tx.send(blob);
        }
        Ok(Response::new(fe::Empty {}))
    }

    async fn check_health(
        &self,
        _: Request<fe::HealthCheckRequest>,
    ) -> Result<Response<fe::HealthCheckResponse>, Status> {
        match self.0.function.lock().as_deref() {
            None => Err(Status::unavailable("not initialized")),
            Some("unhealthy") => Ok(Response::new(fe::HealthCheckResponse {
                healthy: Some(false),
                status_message: Some("the fake worker was told to be unhealthy".into()),
            })),
            Some(_) => Ok(Response::new(fe::HealthCheckResponse {
                healthy: Some(true),
                status_message: None,
            })),
        }
    }

    async fn get_info(
        &self,
        _: Request<fe::InfoRequest>,
    ) -> Result<Response<fe::InfoResponse>, Status> {
        Ok(Response::new(fe::InfoResponse {
            version: Some("0.1.2".into()),
            sdk_version: Some(env!("CARGO_PKG_VERSION").into()),
            sdk_language: Some("rust-fake".into()),
            sdk_language_version: Some("1".into()),
        }))
    }
}

fn address_from_args() -> Result<String, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut address = None;
    let mut i = 0;
    while i < args.len() {
        if let Some(v) = args[i].strip_prefix("--address=") {
            address = Some(v.to_string());
        } else if args[i] == "--address" {
            address = args.get(i + 1).cloned();
            i += 1;
        }
        i += 1;
    }
    address.ok_or_else(|| "usage: steward-fake-worker --address HOST:PORT|unix:PATH [--executor-id=..] [--function-executor-id=..]".into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = address_from_args()?;
    // `unix:/path` or `unix:///path`, as grpcio takes them.
    if let Some(path) = address.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        let listener = tokio::net::UnixListener::bind(path)?;
        tonic::transport::Server::builder()
            .add_service(FunctionExecutorServer::new(Worker::default()))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await?;
        return Ok(());
    }
    let addr = tokio::net::lookup_host(&address)
        .await?
        .next()
        .ok_or_else(|| format!("cannot resolve {address}"))?;
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(FunctionExecutorServer::new(Worker::default()))
        .serve(addr)
        .await?;
    Ok(())
}
