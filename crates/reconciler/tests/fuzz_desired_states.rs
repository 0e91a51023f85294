//! Property test of the reconciler on a real agent: arbitrary sequences of
//! desired states, in which function executors and allocations come and go
//! (valid and not: rejected descriptions, unknown workers, missing fields),
//! are streamed by an in-process fake control plane to an agent started
//! with [`Agent::start`]. Its workers are real `steward-fake-worker`
//! processes, fetched code and all, that really run the allocations
//! (`echo`, `sleep_100`, `fail`, `hang`, `crash`, `init_fail`), so the
//! controller's running, cancelling, killing and shutdown paths all run.
//!
//! The properties, checked by polling the agent's observable state and what
//! the fake control plane heard (never by sleeping a fixed time):
//! - at every observation: no allocation has more than one result, no
//!   result names an allocation that was never desired, no allocation whose
//!   function cannot succeed succeeds, and every success's value (read back
//!   from its blob) is its input, echoed;
//! - once each settled step converges: the agent's function executors are
//!   exactly the desired ones, none still starting or being removed; every
//!   allocation ever desired that finished or was dropped has exactly one
//!   result reported and none is left buffered; every desired allocation
//!   that can finish has; and where nothing could have raced (its worker
//!   desired throughout, running, and not a leftover of an earlier one),
//!   an allocation has the outcome its function gives;
//! - once nothing is desired and after shutdown: every allocation ever
//!   desired has exactly one result, and the last report said STOPPED.
//!
//! Some steps are not left to settle before the next, so removals race
//! startups and cancellations race running allocations.
//!
//! Needs the fake worker binary next to the test's target directory (`cargo
//! xtask test` builds it; so does `cargo build -p steward-fake-worker`), or
//! its path in `STEWARD_FAKE_WORKER`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use steward_blob_store::{BlobStore, BlobStoreConfig};
use steward_reconciler::pb::executor_api_server::{ExecutorApi, ExecutorApiServer};
use steward_reconciler::{Agent, AgentConfig, AgentHandle, Metrics, Snapshot, pb};
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

/// Function executor ids `fe-0..fe-3`; allocations may also name `fe-x`,
/// which is never desired.
const FE_SLOTS: usize = 4;
const UNKNOWN_FE: usize = FE_SLOTS;
/// Longest wait for one desired state to be applied or converged; far
/// above what it takes (milliseconds), so only a broken agent reaches it.
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(15);

// === The scenario ===

/// What a function executor's function does on the fake worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Echo,
    Sleep,
    Fail,
    Hang,
    Crash,
    InitFail,
    /// A description the agent rejects (`max_concurrency` 0).
    Invalid,
}

impl Kind {
    fn function(self) -> &'static str {
        match self {
            Kind::Echo | Kind::Invalid => "echo",
            Kind::Sleep => "sleep_100",
            Kind::Fail => "fail",
            Kind::Hang => "hang",
            Kind::Crash => "crash",
            Kind::InitFail => "init_fail",
        }
    }

    fn can_succeed(self) -> bool {
        matches!(self, Kind::Echo | Kind::Sleep)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broken {
    No,
    /// No allocation id: the agent cannot even answer it.
    NoId,
    NoRequestId,
    /// An argument without a URI.
    BadArg,
    /// An argument of 2^63 bytes (once about 10^11 read URLs: the agent
    /// ran out of memory).
    HugeInput,
}

#[derive(Debug, Clone)]
struct FeSpec {
    kind: Kind,
    max_concurrency: u32,
}

#[derive(Debug, Clone)]
struct AllocSpec {
    /// A slot below `FE_SLOTS`, or `UNKNOWN_FE`.
    fe: usize,
    /// Desired in steps `start..start + len` (and never again, as the server
    /// never reuses an allocation id).
    start: usize,
    len: usize,
    broken: Broken,
}

#[derive(Debug, Clone)]
struct StepSpec {
    fes: [bool; FE_SLOTS],
    /// Wait for convergence (and check it) before the next step; otherwise
    /// only wait until the agent has applied it.
    settle: bool,
}

#[derive(Debug, Clone)]
struct Scenario {
    fes: Vec<FeSpec>,
    steps: Vec<StepSpec>,
    allocs: Vec<AllocSpec>,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => Just(Kind::Echo),
        2 => Just(Kind::Sleep),
        1 => Just(Kind::Fail),
        2 => Just(Kind::Hang),
        1 => Just(Kind::Crash),
        1 => Just(Kind::InitFail),
        1 => Just(Kind::Invalid),
    ]
}

fn broken() -> impl Strategy<Value = Broken> {
    prop_oneof![
        12 => Just(Broken::No),
        1 => Just(Broken::NoId),
        1 => Just(Broken::NoRequestId),
        1 => Just(Broken::BadArg),
        1 => Just(Broken::HugeInput),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(
            (kind(), 1u32..=3).prop_map(|(kind, max_concurrency)| FeSpec {
                kind,
                max_concurrency,
            }),
            FE_SLOTS,
        ),
        1usize..=5,
    )
        .prop_flat_map(|(fes, n)| {
            let steps = prop::collection::vec(
                (
                    prop::array::uniform4(prop::bool::weighted(0.85)),
                    prop::bool::weighted(0.7),
                )
                    .prop_map(|(fes, settle)| StepSpec { fes, settle }),
                n,
            );
            let allocs = prop::collection::vec(
                (
                    prop_oneof![9 => 0..FE_SLOTS, 1 => Just(UNKNOWN_FE)],
                    0..n,
                    1..=n + 1,
                    broken(),
                )
                    .prop_map(|(fe, start, len, broken)| AllocSpec {
                        fe,
                        start,
                        len,
                        broken,
                    }),
                0..=16,
            );
            (Just(fes), steps, allocs)
        })
        .prop_map(|(fes, steps, allocs)| Scenario { fes, steps, allocs })
}

fn fe_id(slot: usize) -> String {
    if slot == UNKNOWN_FE {
        "fe-x".into()
    } else {
        format!("fe-{slot}")
    }
}

fn alloc_id(i: usize) -> String {
    format!("a-{i}")
}

impl Scenario {
    /// The final step, in which nothing is desired.
    fn last(&self) -> usize {
        self.steps.len()
    }

    fn settles(&self, step: usize) -> bool {
        step == self.last() || self.steps[step].settle
    }

    fn fe_desired(&self, slot: usize, step: usize) -> bool {
        slot < FE_SLOTS && step < self.last() && self.steps[step].fes[slot]
    }

    fn alloc_desired(&self, i: usize, step: usize) -> bool {
        let a = &self.allocs[i];
        step < self.last() && a.start <= step && step < a.start + a.len
    }

    fn kind_of(&self, i: usize) -> Option<Kind> {
        self.fes.get(self.allocs[i].fe).map(|f| f.kind)
    }

    /// Ids of the allocations desired in any step up to `step`.
    fn ever_desired(&self, step: usize) -> HashMap<String, usize> {
        (0..self.allocs.len())
            .filter(|&i| self.allocs[i].broken != Broken::NoId && self.allocs[i].start <= step)
            .map(|i| (alloc_id(i), i))
            .collect()
    }

    /// Whether allocation `i`, desired at `step`, went to the worker that is
    /// there now with nothing racing it: valid, its worker desired from the
    /// allocation's first step on, and that worker not a leftover of an
    /// earlier one still being removed (the step before the worker's
    /// current run of steps settled, so the earlier one was gone).
    fn undisturbed(&self, i: usize, step: usize) -> bool {
        let a = &self.allocs[i];
        if a.broken != Broken::No || !self.fe_desired(a.fe, step) {
            return false;
        }
        let mut first = step;
        while first > 0 && self.fe_desired(a.fe, first - 1) {
            first -= 1;
        }
        first <= a.start && (first == 0 || self.steps[first - 1].settle)
    }
}

// === What the agent is given ===

/// Files the scenario's payloads point at.
struct Blobs {
    root: PathBuf,
    code: pb::DataPayload,
    inputs: Vec<Vec<u8>>,
}

fn uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

impl Blobs {
    fn create(root: PathBuf, allocations: usize) -> std::io::Result<Blobs> {
        std::fs::create_dir_all(root.join("inputs"))?;
        // An empty ZIP archive: the fake worker ignores the code, but the
        // agent fetches, caches and hands it over as it would any.
        let mut zip = b"PK\x05\x06".to_vec();
        zip.resize(22, 0);
        let code_path = root.join("app.zip");
        std::fs::write(&code_path, &zip)?;
        let code = pb::DataPayload {
            uri: Some(uri(&code_path)),
            encoding: Some(pb::DataPayloadEncoding::BinaryZip as i32),
            encoding_version: Some(0),
            offset: Some(0),
            size: Some(zip.len() as u64),
            sha256_hash: Some(hex::encode(Sha256::digest(&zip))),
            ..Default::default()
        };
        let mut inputs = Vec::new();
        for i in 0..allocations {
            let input = format!("{{\"allocation\":{i}}}").into_bytes();
            std::fs::write(root.join("inputs").join(format!("a-{i}.json")), &input)?;
            inputs.push(input);
        }
        Ok(Blobs { root, code, inputs })
    }

    fn input(&self, i: usize) -> pb::DataPayload {
        let input = &self.inputs[i];
        pb::DataPayload {
            uri: Some(uri(&self.root.join("inputs").join(format!("a-{i}.json")))),
            encoding: Some(pb::DataPayloadEncoding::Utf8Json as i32),
            encoding_version: Some(0),
            offset: Some(0),
            size: Some(input.len() as u64),
            metadata_size: Some(0),
            sha256_hash: Some(hex::encode(Sha256::digest(input))),
            ..Default::default()
        }
    }
}

fn function_ref(name: &str) -> pb::FunctionRef {
    pb::FunctionRef {
        namespace: Some("ns".into()),
        application_name: Some("app".into()),
        function_name: Some(name.into()),
        application_version: Some("1".into()),
    }
}

fn description(sc: &Scenario, blobs: &Blobs, slot: usize) -> pb::FunctionExecutorDescription {
    let spec = &sc.fes[slot];
    pb::FunctionExecutorDescription {
        id: Some(fe_id(slot)),
        function: Some(function_ref(spec.kind.function())),
        initialization_timeout_ms: Some(10_000),
        application: Some(blobs.code.clone()),
        resources: Some(pb::FunctionExecutorResources {
            cpu_ms_per_sec: Some(1000),
            memory_bytes: Some(1 << 20),
            disk_bytes: Some(1 << 20),
            gpu: None,
        }),
        max_concurrency: Some(if spec.kind == Kind::Invalid {
            0
        } else {
            spec.max_concurrency
        }),
        // Long enough that `hang` runs until it is cancelled.
        allocation_timeout_ms: Some(600_000),
        container_type: Some(pb::FunctionExecutorType::Function as i32),
        ..Default::default()
    }
}

fn allocation(sc: &Scenario, blobs: &Blobs, i: usize) -> pb::Allocation {
    let spec = &sc.allocs[i];
    let function = sc.kind_of(i).map_or("echo", Kind::function);
    let request = blobs.root.join("requests").join(format!("r-{i}"));
    pb::Allocation {
        function: Some(function_ref(function)),
        allocation_id: (spec.broken != Broken::NoId).then(|| alloc_id(i)),
        function_call_id: Some(format!("c-{i}")),
        request_id: (spec.broken != Broken::NoRequestId).then(|| format!("r-{i}")),
        args: vec![match spec.broken {
            Broken::BadArg => pb::DataPayload::default(),
            Broken::HugeInput => pb::DataPayload {
                size: Some(1 << 63),
                ..blobs.input(i)
            },
            _ => blobs.input(i),
        }],
        request_data_payload_uri_prefix: Some(uri(&request.join("data"))),
        request_error_payload_uri_prefix: Some(uri(&request.join("error"))),
        function_executor_id: Some(fe_id(spec.fe)),
        function_call_metadata: Some(Vec::new()),
    }
}

/// The desired state of `step` (clock `step + 1`; the fake control plane
/// starts at clock 0 with nothing desired).
fn desired(sc: &Scenario, blobs: &Blobs, step: usize) -> pb::DesiredExecutorState {
    pb::DesiredExecutorState {
        function_executors: (0..FE_SLOTS)
            .filter(|&s| sc.fe_desired(s, step))
            .map(|s| description(sc, blobs, s))
            .collect(),
        allocations: (0..sc.allocs.len())
            .filter(|&i| sc.alloc_desired(i, step))
            .map(|i| allocation(sc, blobs, i))
            .collect(),
        clock: Some(step as u64 + 1),
        function_call_results: Vec::new(),
    }
}

// === The fake control plane ===

/// Everything the agent reported.
#[derive(Default)]
struct Heard {
    results: Vec<pb::AllocationResult>,
    /// The status of each report, in the order they arrived.
    statuses: Vec<i32>,
}

struct FakeControlPlane {
    desired: watch::Receiver<pb::DesiredExecutorState>,
    heard: Arc<Mutex<Heard>>,
}

type DesiredStream = Pin<Box<dyn Stream<Item = Result<pb::DesiredExecutorState, Status>> + Send>>;

#[tonic::async_trait]
impl ExecutorApi for FakeControlPlane {
    async fn report_executor_state(
        &self,
        request: Request<pb::ReportExecutorStateRequest>,
    ) -> Result<Response<pb::ReportExecutorStateResponse>, Status> {
        let r = request.into_inner();
        let mut heard = self.heard.lock();
        heard
            .statuses
            .push(r.executor_state.and_then(|s| s.status).unwrap_or(-1));
        heard.results.extend(
            r.executor_update
                .map(|u| u.allocation_results)
                .unwrap_or_default(),
        );
        Ok(Response::new(pb::ReportExecutorStateResponse {}))
    }

    type get_desired_executor_statesStream = DesiredStream;

    async fn get_desired_executor_states(
        &self,
        _: Request<pb::GetDesiredExecutorStatesRequest>,
    ) -> Result<Response<DesiredStream>, Status> {
        let stream = tokio_stream::StreamExt::map(WatchStream::new(self.desired.clone()), Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn call_function(
        &self,
        _: Request<pb::FunctionCallRequest>,
    ) -> Result<Response<pb::FunctionCallResponse>, Status> {
        Err(Status::unimplemented(
            "no function in this test calls another",
        ))
    }
}

/// The fake worker binary, or a panic that says how to build it.
fn fake_worker() -> PathBuf {
    let candidates: Vec<PathBuf> = match std::env::var_os("STEWARD_FAKE_WORKER") {
        Some(p) => vec![PathBuf::from(p)],
        None => {
            // The test runs from <target>/<profile>/deps; the binary sits in <profile>.
            let beside = std::env::current_exe()
                .ok()
                .and_then(|exe| Some(exe.parent()?.parent()?.join("steward-fake-worker")));
            let fallback = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/debug/steward-fake-worker");
            beside.into_iter().chain([fallback]).collect()
        }
    };
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!(
            "steward-fake-worker is not built (looked at {candidates:?}): run the tests with \
             `cargo xtask test`, or `cargo build -p steward-fake-worker` first, or set \
             STEWARD_FAKE_WORKER to its path"
        ),
    }
}

// === Observing and judging ===

/// What the test sees at one moment.
struct Seen {
    snapshot: Snapshot,
    results: Vec<pb::AllocationResult>,
}

fn look(handle: &AgentHandle, heard: &Mutex<Heard>) -> Seen {
    Seen {
        snapshot: handle.snapshot(),
        results: heard.lock().results.clone(),
    }
}

impl Seen {
    fn count(&self, id: &str) -> usize {
        self.results
            .iter()
            .filter(|r| r.allocation_id.as_deref() == Some(id))
            .count()
    }

    fn result(&self, id: &str) -> Option<&pb::AllocationResult> {
        self.results
            .iter()
            .find(|r| r.allocation_id.as_deref() == Some(id))
    }

    /// An allocation's phase as `/state/allocations` names it.
    fn phase(&self, id: &str) -> Option<String> {
        let a = self.snapshot.allocations.iter().find(|a| a.id == id)?;
        serde_json::to_value(a.phase)
            .ok()?
            .as_str()
            .map(str::to_string)
    }

    fn fe_status(&self, id: &str) -> Option<&str> {
        self.snapshot
            .function_executors
            .iter()
            .find(|f| f.id == id)
            .map(|f| f.status.as_str())
    }
}

enum Verdict {
    Converged,
    NotYet(String),
    Violated(String),
}

fn outcome(r: &pb::AllocationResult) -> String {
    if r.outcome_code == Some(pb::AllocationOutcomeCode::Success as i32) {
        "SUCCESS".into()
    } else {
        let reason = r.failure_reason().as_str_name();
        format!(
            "FAILURE {}",
            reason
                .strip_prefix("ALLOCATION_FAILURE_REASON_")
                .unwrap_or(reason)
        )
    }
}

/// What must hold whenever the agent is looked at, after `step` was sent.
fn safety(sc: &Scenario, blobs: &Blobs, step: usize, seen: &Seen) -> Result<(), String> {
    let ever = sc.ever_desired(step);
    for r in &seen.results {
        let id = r.allocation_id.as_deref().unwrap_or("");
        let Some(&i) = ever.get(id) else {
            return Err(format!(
                "a result for allocation {id:?}, never desired: {r:?}"
            ));
        };
        let n = seen.count(id);
        if n > 1 {
            return Err(format!("allocation {id} has {n} results"));
        }
        if r.outcome_code != Some(pb::AllocationOutcomeCode::Success as i32) {
            continue;
        }
        let can = sc.allocs[i].broken == Broken::No && sc.kind_of(i).is_some_and(Kind::can_succeed);
        if !can {
            return Err(format!(
                "allocation {id} (on {}, {:?}) succeeded, which its function cannot",
                fe_id(sc.allocs[i].fe),
                sc.kind_of(i)
            ));
        }
        let value = match &r.return_value {
            Some(pb::allocation_result::ReturnValue::Value(v)) => v,
            other => {
                return Err(format!(
                    "allocation {id} succeeded without a value: {other:?}"
                ));
            }
        };
        let path = value
            .uri
            .as_deref()
            .and_then(|u| u.strip_prefix("file://"))
            .ok_or_else(|| format!("allocation {id}'s value is not a local blob: {value:?}"))?;
        let bytes =
            std::fs::read(path).map_err(|e| format!("allocation {id}'s value {path}: {e}"))?;
        let start = value.offset.unwrap_or(0) as usize;
        let end = start + value.size.unwrap_or(0) as usize;
        if bytes.get(start..end) != Some(&blobs.inputs[i][..]) {
            return Err(format!(
                "allocation {id}'s value is {:?}, not its input {:?}",
                bytes.get(start..end).map(String::from_utf8_lossy),
                String::from_utf8_lossy(&blobs.inputs[i])
            ));
        }
    }
    Ok(())
}

/// Whether the agent has converged to the desired state of `step`.
fn convergence(sc: &Scenario, step: usize, seen: &Seen) -> Verdict {
    let want: BTreeSet<String> = (0..FE_SLOTS)
        .filter(|&s| sc.fe_desired(s, step))
        .map(fe_id)
        .collect();
    let have: BTreeSet<String> = seen
        .snapshot
        .function_executors
        .iter()
        .map(|f| f.id.clone())
        .collect();
    if want != have {
        return Verdict::NotYet(format!("function executors {have:?}, desired {want:?}"));
    }
    for f in &seen.snapshot.function_executors {
        let slot: usize = f.id["fe-".len()..].parse().expect("fe-N");
        let kind = sc.fes[slot].kind;
        match f.status.as_str() {
            _ if f.removing => {
                return Verdict::NotYet(format!("{} is being removed though desired", f.id));
            }
            "PENDING" => return Verdict::NotYet(format!("{} is still starting", f.id)),
            "RUNNING" if matches!(kind, Kind::InitFail | Kind::Invalid) => {
                return Verdict::Violated(format!("{} ({kind:?}) is running", f.id));
            }
            "RUNNING" | "TERMINATED" => {}
            other => return Verdict::Violated(format!("{} has status {other}", f.id)),
        }
    }
    if seen.snapshot.pending_results != 0 {
        return Verdict::NotYet(format!(
            "{} result(s) not reported yet",
            seen.snapshot.pending_results
        ));
    }
    for (id, i) in sc.ever_desired(step) {
        let n = seen.count(&id);
        if !sc.alloc_desired(i, step) {
            if n != 1 {
                return Verdict::NotYet(format!("dropped allocation {id} has {n} results"));
            }
            continue;
        }
        let finished = seen.phase(&id).as_deref() == Some("finished");
        // Only `hang` on a worker that is up may run for ever.
        let may_run = sc.allocs[i].broken == Broken::No
            && sc.kind_of(i) == Some(Kind::Hang)
            && seen.fe_status(&fe_id(sc.allocs[i].fe)) == Some("RUNNING");
        match (finished, n) {
            (true, 1) => {}
            (false, 0) if may_run => {}
            _ => {
                return Verdict::NotYet(format!(
                    "desired allocation {id} is {:?} with {n} results",
                    seen.phase(&id)
                ));
            }
        }
    }
    Verdict::Converged
}

/// Outcomes of allocations nothing raced, once `step` has converged.
fn outcomes(sc: &Scenario, step: usize, seen: &Seen, tally: &mut Tally) -> Result<(), String> {
    for i in (0..sc.allocs.len()).filter(|&i| sc.alloc_desired(i, step)) {
        let fe = fe_id(sc.allocs[i].fe);
        if !sc.undisturbed(i, step) || seen.fe_status(&fe) != Some("RUNNING") {
            continue;
        }
        let id = alloc_id(i);
        let got = seen.result(&id).map(outcome);
        let want = match sc.kind_of(i) {
            Some(Kind::Echo | Kind::Sleep) => Some("SUCCESS".to_string()),
            Some(Kind::Fail) => Some("FAILURE FUNCTION_ERROR".to_string()),
            Some(Kind::Hang) => None,
            _ => continue,
        };
        if got != want {
            return Err(format!(
                "allocation {id} on running {fe} ({:?}) ended {got:?}, expected {want:?}",
                sc.kind_of(i)
            ));
        }
        tally.checked_outcomes += 1;
    }
    Ok(())
}

/// What a case ended with.
#[derive(Debug, Default)]
struct Tally {
    /// Each allocation's outcome, as reported.
    outcomes: BTreeMap<String, String>,
    /// How many outcomes were checked against the function's.
    checked_outcomes: usize,
    /// The agent's events: (kind, subject, message).
    events: Vec<(String, String, String)>,
}

fn dump(sc: &Scenario, step: usize, seen: &Seen, handle: &AgentHandle) -> String {
    let fes: Vec<String> = seen
        .snapshot
        .function_executors
        .iter()
        .map(|f| {
            format!(
                "{} {}{} {:?}",
                f.id,
                f.status,
                if f.removing { " (removing)" } else { "" },
                f.termination_reason
            )
        })
        .collect();
    let allocs: Vec<String> = (0..sc.allocs.len())
        .map(|i| {
            let id = alloc_id(i);
            format!(
                "{id} {:?} desired={} results={:?}",
                seen.phase(&id),
                sc.alloc_desired(i, step),
                seen.results
                    .iter()
                    .filter(|r| r.allocation_id.as_deref() == Some(id.as_str()))
                    .map(outcome)
                    .collect::<Vec<_>>()
            )
        })
        .collect();
    let events: Vec<String> = handle
        .events()
        .iter()
        .rev()
        .take(25)
        .rev()
        .map(|e| format!("{} {}: {}", e.kind, e.subject, e.message))
        .collect();
    format!(
        "at step {step} of {sc:#?}\nfunction executors: {fes:#?}\nallocations: {allocs:#?}\n\
         pending results: {}\nlast events: {events:#?}",
        seen.snapshot.pending_results
    )
}

// === Running a scenario ===

fn run(sc: &Scenario) -> Result<Tally, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?
        .block_on(run_async(sc))
}

async fn run_async(sc: &Scenario) -> Result<Tally, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let blobs = Blobs::create(dir.path().join("blobs"), sc.allocs.len())
        .map_err(|e| format!("blobs: {e}"))?;

    let (desired_tx, desired_rx) = watch::channel(pb::DesiredExecutorState {
        clock: Some(0),
        ..Default::default()
    });
    let heard = Arc::new(Mutex::new(Heard::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| format!("addr: {e}"))?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ExecutorApiServer::new(FakeControlPlane {
                desired: desired_rx,
                heard: heard.clone(),
            }))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );

    let blob_store = BlobStore::new(BlobStoreConfig {
        local_roots: vec![blobs.root.clone()],
        ..Default::default()
    });
    let mut config = AgentConfig::new(
        "fuzz".into(),
        addr.to_string(),
        dir.path().join("data"),
        blob_store,
    );
    config.function_executor_bin = fake_worker();
    let room = pb::HostResources {
        cpu_count: Some(64),
        memory_bytes: Some(1 << 40),
        disk_bytes: Some(1 << 40),
        gpu: None,
    };
    config.total_resources = room;
    config.function_executor_resources = room;
    config.function_executor_stop_grace = Duration::from_secs(1);
    config.function_executor_connect_timeout = Duration::from_secs(10);
    let agent = Agent::start(config, Arc::new(Metrics::new("test", "test", "fuzz")))
        .map_err(|e| format!("starting the agent: {e}"))?;
    let handle = agent.handle();

    let mut tally = Tally::default();
    let steps = async {
        for step in 0..=sc.last() {
            desired_tx.send_replace(desired(sc, &blobs, step));
            let settle = sc.settles(step);
            let started = Instant::now();
            loop {
                let applied = handle
                    .last_desired()
                    .and_then(|(d, _)| d.clock)
                    .is_some_and(|c| c == step as u64 + 1);
                let seen = look(&handle, &heard);
                safety(sc, &blobs, step, &seen)
                    .map_err(|e| format!("{e}\n{}", dump(sc, step, &seen, &handle)))?;
                let verdict = match (applied, settle) {
                    (false, _) => Verdict::NotYet("desired state not applied yet".into()),
                    (true, false) => Verdict::Converged,
                    (true, true) => convergence(sc, step, &seen),
                };
                match verdict {
                    Verdict::Converged => {
                        if settle {
                            outcomes(sc, step, &seen, &mut tally)
                                .map_err(|e| format!("{e}\n{}", dump(sc, step, &seen, &handle)))?;
                        }
                        break;
                    }
                    Verdict::Violated(why) => {
                        return Err(format!("{why}\n{}", dump(sc, step, &seen, &handle)));
                    }
                    Verdict::NotYet(why) if started.elapsed() > CONVERGENCE_TIMEOUT => {
                        return Err(format!(
                            "no convergence within {CONVERGENCE_TIMEOUT:?}: {why}\n{}",
                            dump(sc, step, &seen, &handle)
                        ));
                    }
                    Verdict::NotYet(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
        Ok::<(), String>(())
    }
    .await;
    // Shut down even after a failure, so no worker outlives the case.
    agent.shutdown(Duration::from_secs(5)).await;
    steps?;

    let seen = look(&handle, &heard);
    safety(sc, &blobs, sc.last(), &seen)?;
    for id in sc.ever_desired(sc.last()).keys() {
        let n = seen.count(id);
        if n != 1 {
            return Err(format!("after shutdown, allocation {id} has {n} results"));
        }
    }
    // The last report the server heard: a report in flight at shutdown is
    // finished before the final one, never left to arrive after it.
    let statuses = heard.lock().statuses.clone();
    if statuses.last() != Some(&(pb::ExecutorStatus::Stopped as i32)) {
        return Err(format!("the last report did not say STOPPED: {statuses:?}"));
    }
    server.abort();
    tally.events = handle
        .events()
        .into_iter()
        .map(|e| (e.kind.to_string(), e.subject, e.message))
        .collect();
    tally.outcomes = seen
        .results
        .iter()
        .map(|r| (r.allocation_id.clone().unwrap_or_default(), outcome(r)))
        .collect();
    Ok(tally)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        // A broken agent fails a case by timing out: bound the shrinking.
        max_shrink_iters: 64,
        max_shrink_time: 60_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_allocation_gets_exactly_one_result_and_each_state_converges(sc in scenario()) {
        run(&sc).map_err(TestCaseError::fail)?;
    }
}

/// The running path, pinned down: allocations on echo and fail workers run
/// to their results; a hanging one dropped from the desired state is
/// cancelled, which kills its worker and fails its sibling; a worker removed
/// under a running allocation fails it.
#[test]
fn allocations_really_run() {
    let fe = |kind| FeSpec {
        kind,
        max_concurrency: 2,
    };
    let alloc = |fe, start, len| AllocSpec {
        fe,
        start,
        len,
        broken: Broken::No,
    };
    let sc = Scenario {
        fes: vec![
            fe(Kind::Echo),
            fe(Kind::Fail),
            fe(Kind::Hang),
            fe(Kind::Hang),
        ],
        steps: vec![
            StepSpec {
                fes: [true; FE_SLOTS],
                settle: true,
            },
            StepSpec {
                fes: [true, true, true, false],
                settle: true,
            },
        ],
        allocs: vec![
            alloc(0, 0, 2),
            alloc(0, 0, 1),
            alloc(0, 1, 1),
            alloc(1, 0, 2),
            alloc(2, 0, 1),
            alloc(2, 0, 2),
            alloc(3, 0, 2),
        ],
    };
    let tally = run(&sc).unwrap_or_else(|e| panic!("{e}"));
    let want = [
        ("a-0", "SUCCESS"),
        ("a-1", "SUCCESS"),
        ("a-2", "SUCCESS"),
        ("a-3", "FAILURE FUNCTION_ERROR"),
        ("a-4", "FAILURE ALLOCATION_CANCELLED"),
        ("a-5", "FAILURE FUNCTION_EXECUTOR_TERMINATED"),
        ("a-6", "FAILURE FUNCTION_EXECUTOR_TERMINATED"),
    ]
    .map(|(id, o)| (id.to_string(), o.to_string()));
    assert_eq!(tally.outcomes, want.into_iter().collect());
    // Step 0: a-0, a-1, a-3, a-4, a-5, a-6; step 1: a-0, a-2, a-3.
    assert_eq!(tally.checked_outcomes, 9);
}

/// Allocations running on workers removed from the desired state fail as
/// FUNCTION_EXECUTOR_TERMINATED, never as errors of their own function,
/// however soon their tasks notice the worker is gone.
#[test]
fn running_allocations_of_removed_workers_are_terminated() {
    let hang = FeSpec {
        kind: Kind::Hang,
        max_concurrency: 3,
    };
    let sc = Scenario {
        fes: vec![hang.clone(), hang.clone(), hang.clone(), hang],
        steps: vec![
            StepSpec {
                fes: [true; FE_SLOTS],
                settle: true,
            },
            StepSpec {
                fes: [false; FE_SLOTS],
                settle: true,
            },
        ],
        allocs: (0..3 * FE_SLOTS)
            .map(|i| AllocSpec {
                fe: i % FE_SLOTS,
                start: 0,
                len: 2,
                broken: Broken::No,
            })
            .collect(),
    };
    let tally = run(&sc).unwrap_or_else(|e| panic!("{e}"));
    let wrong: Vec<_> = tally
        .outcomes
        .iter()
        .filter(|(_, o)| *o != "FAILURE FUNCTION_EXECUTOR_TERMINATED")
        .collect();
    assert!(wrong.is_empty(), "{wrong:?}");
    assert_eq!(tally.outcomes.len(), 3 * FE_SLOTS);
}

/// An input whose size the agent will not hand over (2^63 bytes) fails only
/// its own allocation, before any read URL is made, with an event naming
/// the limit; the allocations around it on the same worker run.
#[test]
fn a_huge_input_fails_only_its_allocation() {
    let alloc = |broken| AllocSpec {
        fe: 0,
        start: 0,
        len: 1,
        broken,
    };
    let echo = FeSpec {
        kind: Kind::Echo,
        max_concurrency: 2,
    };
    let sc = Scenario {
        fes: vec![echo.clone(), echo.clone(), echo.clone(), echo],
        steps: vec![StepSpec {
            fes: [true, false, false, false],
            settle: true,
        }],
        allocs: vec![
            alloc(Broken::No),
            alloc(Broken::HugeInput),
            alloc(Broken::No),
        ],
    };
    let tally = run(&sc).unwrap_or_else(|e| panic!("{e}"));
    let want = [
        ("a-0", "SUCCESS"),
        ("a-1", "FAILURE INTERNAL_ERROR"),
        ("a-2", "SUCCESS"),
    ]
    .map(|(id, o)| (id.to_string(), o.to_string()));
    assert_eq!(tally.outcomes, want.into_iter().collect());
    let rejected: Vec<_> = tally
        .events
        .iter()
        .filter(|(kind, subject, _)| kind == "allocation_rejected" && subject == "a-1")
        .collect();
    assert!(
        rejected.iter().any(|(_, _, m)| m.contains(
            "allocation.args[0]: offset + size is 9223372036854775808 bytes, over the \
             1099511627776-byte limit (--max-input-blob-bytes)"
        )),
        "{:?}",
        tally.events
    );
}
