//! Synthetic agent state for benchmarks: many workers and allocations in
//! the shared state without processes or a server, so the hot paths (state
//! hash, report assembly, desired-state diff, snapshots, metrics) can be
//! measured alone. Only built with the `testing` feature.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::lifecycle::{FeCommand, FeMap, FeSlot, FeState};
use crate::reconcile::Reconciler;
use crate::state::{AllocEntry, AllocPhase, Shared, TimelineEntry};
use crate::{AgentHandle, pb};

/// A populated agent state and the desired state that matches it.
pub struct Synthetic {
    pub handle: AgentHandle,
    pub desired: Arc<pb::DesiredExecutorState>,
    shared: Arc<Shared>,
    reconciler: parking_lot::Mutex<Reconciler>,
    _receivers: Vec<mpsc::UnboundedReceiver<FeCommand>>,
    _views: Vec<tokio::sync::watch::Sender<FeState>>,
}

fn function(i: usize) -> pb::FunctionRef {
    pb::FunctionRef {
        namespace: Some("default".into()),
        application_name: Some(format!("app{}", i % 20)),
        function_name: Some(format!("fn{i}")),
        application_version: Some("1".into()),
    }
}

fn description(i: usize) -> pb::FunctionExecutorDescription {
    pb::FunctionExecutorDescription {
        id: Some(format!("fe-{i:06}")),
        function: Some(function(i)),
        initialization_timeout_ms: Some(300_000),
        application: Some(pb::DataPayload {
            uri: Some(format!("s3://bucket/code/app{}/1.zip", i % 20)),
            encoding: Some(pb::DataPayloadEncoding::BinaryZip as i32),
            encoding_version: Some(0),
            offset: Some(0),
            size: Some(123_456),
            sha256_hash: Some("ab".repeat(32)),
            ..Default::default()
        }),
        resources: Some(pb::FunctionExecutorResources {
            cpu_ms_per_sec: Some(1000),
            memory_bytes: Some(1 << 30),
            disk_bytes: Some(1 << 30),
            gpu: None,
        }),
        max_concurrency: Some(4),
        allocation_timeout_ms: Some(300_000),
        container_type: Some(pb::FunctionExecutorType::Function as i32),
        ..Default::default()
    }
}

fn allocation(i: usize, fes: usize) -> pb::Allocation {
    let fe = i % fes.max(1);
    pb::Allocation {
        function: Some(function(fe)),
        allocation_id: Some(format!("alloc-{i:08}")),
        function_call_id: Some(format!("call-{i:08}")),
        request_id: Some(format!("req-{i:08}")),
        args: vec![pb::DataPayload {
            uri: Some(format!("s3://bucket/requests/req-{i:08}/input")),
            encoding: Some(pb::DataPayloadEncoding::Utf8Json as i32),
            encoding_version: Some(0),
            offset: Some(0),
            size: Some(42),
            metadata_size: Some(0),
            sha256_hash: Some("cd".repeat(32)),
            ..Default::default()
        }],
        request_data_payload_uri_prefix: Some(format!("s3://bucket/requests/req-{i:08}/data")),
        request_error_payload_uri_prefix: Some(format!("s3://bucket/requests/req-{i:08}/error")),
        function_executor_id: Some(format!("fe-{fe:06}")),
        function_call_metadata: Some(Vec::new()),
    }
}

/// A finished allocation's result, as buffered for the next report.
pub fn result(i: usize) -> pb::AllocationResult {
    pb::AllocationResult {
        function: Some(function(i)),
        allocation_id: Some(format!("alloc-{i:08}")),
        function_call_id: Some(format!("call-{i:08}")),
        request_id: Some(format!("req-{i:08}")),
        outcome_code: Some(pb::AllocationOutcomeCode::Success as i32),
        failure_reason: None,
        return_value: Some(pb::allocation_result::ReturnValue::Value(pb::DataPayload {
            uri: Some(format!(
                "s3://bucket/requests/req-{i:08}/data.alloc-{i:08}.out.output"
            )),
            encoding: Some(pb::DataPayloadEncoding::Utf8Json as i32),
            size: Some(330),
            metadata_size: Some(312),
            offset: Some(0),
            sha256_hash: Some("ef".repeat(32)),
            ..Default::default()
        })),
        request_error: None,
        execution_duration_ms: Some(12),
    }
}

impl Synthetic {
    /// `fes` running workers, `allocs` running allocations spread over them,
    /// and `results` buffered results.
    pub fn new(fes: usize, allocs: usize, results: usize) -> Synthetic {
        let shared = crate::testing_support::shared();
        let mut receivers = Vec::new();
        let mut views = Vec::new();
        let mut reconciler = Reconciler::new(shared.clone());
        let desired = pb::DesiredExecutorState {
            function_executors: (0..fes).map(description).collect(),
            allocations: (0..allocs).map(|i| allocation(i, fes)).collect(),
            clock: Some(7),
            function_call_results: Vec::new(),
        };
        let mut fes = FeMap::new();
        for d in &desired.function_executors {
            let running = crate::lifecycle::testing::running();
            let (c, rx, view) = crate::lifecycle::testing::described(Arc::new(d.clone()), running);
            receivers.push(rx);
            views.push(view);
            fes.insert(d.id.clone().unwrap_or_default(), FeSlot::Wanted(c));
        }
        shared.workers.send_replace(Arc::new(fes));
        for a in &desired.allocations {
            reconciler.hold(
                a.allocation_id.clone().unwrap_or_default(),
                a.function_executor_id.clone().unwrap_or_default(),
            );
        }
        {
            let mut st = shared.state.lock();
            for a in &desired.allocations {
                st.allocations.insert(
                    a.allocation_id.clone().unwrap_or_default(),
                    AllocEntry {
                        fe_id: a.function_executor_id.clone().unwrap_or_default(),
                        function: "default/app/fn".into(),
                        phase: AllocPhase::Running,
                        timeline: vec![TimelineEntry::now("queued"), TimelineEntry::now("running")],
                    },
                );
            }
            st.results.extend(
                (0..results)
                    .map(result)
                    .map(|r| crate::state::PendingResult::new(r, 0)),
            );
        }
        for i in 0..1000 {
            shared.events.push(crate::Event::now(
                "function_executor_running",
                &format!("fe-{i:06}"),
                "worker pid 1 initialized in 900 ms".into(),
            ));
        }
        Synthetic {
            handle: AgentHandle::new(shared.clone()),
            desired: Arc::new(desired),
            shared,
            reconciler: parking_lot::Mutex::new(reconciler),
            _receivers: receivers,
            _views: views,
        }
    }

    /// `desired` as the stream hands it to the reconciler (items shared).
    pub fn received(&self) -> Arc<crate::Desired> {
        Arc::new(crate::Desired::from((*self.desired).clone()))
    }

    /// Applies `desired` (the steady state: everything already matches).
    pub fn apply(&self, desired: &Arc<crate::Desired>) {
        self.reconciler
            .lock()
            .apply(desired, std::time::Instant::now());
    }

    /// Builds the next state report.
    pub fn build_report(&self) -> bytes::Bytes {
        crate::report::build_request(&self.shared, false).0.bytes
    }

    /// The agent's `ExecutorState` (hash included).
    pub fn executor_state(&self) -> pb::ExecutorState {
        let mut st = self.shared.state.lock();
        crate::report::executor_state(&self.shared, &mut st)
    }
}

/// The stream's desired-state decoder, for benchmarks.
#[derive(Default)]
pub struct DesiredDecoder(crate::desired::Decoder);

impl DesiredDecoder {
    /// Decodes one encoded desired state; returns how many items had to
    /// be decoded (the rest repeated the previous message).
    pub fn decode(&mut self, raw: bytes::Bytes) -> usize {
        self.0.decode(raw).map_or(0, |(_, stats)| stats.decoded)
    }
}
