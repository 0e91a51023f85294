//! Property test: arbitrary sequences of desired states, valid and not
//! (missing fields, unknown workers, duplicate and reused ids), applied to
//! the reconciler. It must never panic, apply each state promptly, track
//! every valid allocation, keep producing a well-formed report, and wind
//! every worker down once the server wants none.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use steward_reconciler::pb;
use steward_reconciler::testing::Synthetic;

fn fe(id: u8, broken: u8) -> pb::FunctionExecutorDescription {
    let mut d = pb::FunctionExecutorDescription {
        id: Some(format!("fe-{id}")),
        function: Some(pb::FunctionRef {
            namespace: Some("ns".into()),
            application_name: Some("app".into()),
            function_name: Some(format!("f{id}")),
            application_version: Some("1".into()),
        }),
        initialization_timeout_ms: Some(1000),
        application: Some(pb::DataPayload {
            uri: Some("file:///nonexistent/code.zip".into()),
            encoding: Some(pb::DataPayloadEncoding::BinaryZip as i32),
            offset: Some(0),
            size: Some(1),
            ..Default::default()
        }),
        resources: Some(pb::FunctionExecutorResources {
            cpu_ms_per_sec: Some(1000),
            memory_bytes: Some(1),
            disk_bytes: Some(1),
            gpu: None,
        }),
        max_concurrency: Some(2),
        allocation_timeout_ms: Some(1000),
        ..Default::default()
    };
    match broken {
        1 => d.id = None,
        2 => d.function = None,
        3 => d.max_concurrency = Some(0),
        4 => d.application = None,
        5 => d.resources = None,
        6 => d.container_type = Some(pb::FunctionExecutorType::Sandbox as i32),
        _ => {}
    }
    d
}

fn alloc(id: u8, fe_id: u8, broken: u8) -> pb::Allocation {
    let mut a = pb::Allocation {
        function: Some(pb::FunctionRef {
            namespace: Some("ns".into()),
            application_name: Some("app".into()),
            function_name: Some(format!("f{fe_id}")),
            application_version: None,
        }),
        allocation_id: Some(format!("a-{id}")),
        function_call_id: Some(format!("c-{id}")),
        request_id: Some(format!("r-{id}")),
        args: vec![],
        request_data_payload_uri_prefix: Some("file:///nonexistent/out".into()),
        request_error_payload_uri_prefix: Some("file:///nonexistent/err".into()),
        function_executor_id: Some(format!("fe-{fe_id}")),
        function_call_metadata: Some(vec![]),
    };
    match broken {
        1 => a.allocation_id = None,
        2 => a.request_id = None,
        3 => a.function_call_metadata = None,
        4 => a.args = vec![pb::DataPayload::default()],
        _ => {}
    }
    a
}

fn desired_state() -> impl Strategy<Value = pb::DesiredExecutorState> {
    (
        prop::collection::vec((0u8..5, 0u8..10), 0..8),
        prop::collection::vec((0u8..30, 0u8..7, 0u8..8), 0..20),
        any::<u64>(),
    )
        .prop_map(|(fes, allocs, clock)| pb::DesiredExecutorState {
            function_executors: fes.into_iter().map(|(id, b)| fe(id, b)).collect(),
            allocations: allocs
                .into_iter()
                .map(|(id, fe_id, b)| alloc(id, fe_id, b))
                .collect(),
            clock: Some(clock),
            function_call_results: vec![],
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_sequence_of_desired_states_converges(states in prop::collection::vec(desired_state(), 1..6)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async {
            let s = Synthetic::new(0, 0, 0);
            for d in &states {
                let started = Instant::now();
                s.apply(&std::sync::Arc::new(d.clone()));
                prop_assert!(started.elapsed() < Duration::from_secs(1), "apply took {:?}", started.elapsed());
                tokio::task::yield_now().await;
                let report = s.build_report();
                let hash = report.executor_state.and_then(|e| e.state_hash).unwrap_or_default();
                prop_assert_eq!(hash.len(), 64);
                // Every allocation id in the desired state is tracked: accepted or rejected.
                let snap = s.handle.snapshot();
                for a in &d.allocations {
                    if let Some(id) = &a.allocation_id {
                        prop_assert!(snap.allocations.iter().any(|v| &v.id == id), "allocation {} untracked", id);
                    }
                }
            }
            // The server wants nothing: every worker winds down.
            let nothing = std::sync::Arc::new(pb::DesiredExecutorState { clock: Some(u64::MAX), ..Default::default() });
            s.apply(&nothing);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                s.apply(&nothing);
                if s.handle.snapshot().function_executors.is_empty() {
                    break;
                }
                prop_assert!(Instant::now() < deadline, "workers never wound down: {:?}", s.handle.snapshot().function_executors);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        })?;
    }
}
