//! Fidelity to Indexify server v0.3.15: the shape of the desired state it
//! sends (which optional fields are set, null or empty) and its cadence (a
//! full state with a higher clock on every change for the executor).
//!
//! The expectations are copied from a capture of the real server
//! (`shared/reference/real-server/state-during-allocation.json`, captured
//! 2026-11-25: one allocation of the single-function app `slow`, default
//! function options, file blobs), which CI does not have.

use std::sync::Arc;

use steward_proto::executor_api_pb as pb;

use super::*;

const NS: &str = "default";
const APP: &str = "slow";
const VERSION: &str = "ezJl0APepC491FGsvULO0";
const EX: &str = "ex-1";

/// `desired_state.function_executors[1]` of the capture, verbatim.
const CAPTURED_FUNCTION_EXECUTOR: &str = r#"{
 "allocation_timeout_ms": 300000,
 "application": {
  "content_type": "application/zip",
  "encoding": "DATA_PAYLOAD_ENCODING_BINARY_ZIP",
  "encoding_version": 0,
  "id": "YEB5UaAbiRsmR4OQO2fFU",
  "metadata_size": 0,
  "offset": 0,
  "sha256_hash": "91614aa2b049b03cc43bf9d293b6ddc62ee7e9ed1eeeaea8111da9d8b2ea0c1e",
  "size": 1757,
  "source_function_call_id": null,
  "uri": "file:///<server-blob-root>/default_M3XMybNQl50CZAoq2ojei"
 },
 "container_type": "FUNCTION_EXECUTOR_TYPE_FUNCTION",
 "function": {
  "application_name": "slow",
  "application_version": "ezJl0APepC491FGsvULO0",
  "function_name": "slow",
  "namespace": "default"
 },
 "id": "iynykyuliAV12Gm46AuqP",
 "initialization_timeout_ms": 300000,
 "max_concurrency": 1,
 "pool_id": "fn:default:slow:slow:ezJl0APepC491FGsvULO0",
 "resources": {
  "cpu_ms_per_sec": 1000,
  "disk_bytes": 2147483648,
  "gpu": null,
  "memory_bytes": 1073741824
 },
 "sandbox_metadata": null,
 "secret_names": []
}"#;

/// `desired_state.allocations[0]` of the capture, verbatim.
const CAPTURED_ALLOCATION: &str = r#"{
 "allocation_id": "vwvJGKJBUBwHMUKFRaAMb",
 "args": [
  {
   "content_type": "application/json",
   "encoding": "DATA_PAYLOAD_ENCODING_UTF8_JSON",
   "encoding_version": 0,
   "id": "03ec9b8c42874ac48a1dd75ed756ba54",
   "metadata_size": 0,
   "offset": 0,
   "sha256_hash": "5a0b83e19c5750eed6d8d46cb858d15c956a657093c08afa53133c0fbe5f04fb",
   "size": 4,
   "source_function_call_id": null,
   "uri": "file:///<server-blob-root>/default%2Fslow%2F03ec9b8c42874ac48a1dd75ed756ba54%2Finput"
  }
 ],
 "function": {
  "application_name": "slow",
  "application_version": null,
  "function_name": "slow",
  "namespace": "default"
 },
 "function_call_id": "03ec9b8c42874ac48a1dd75ed756ba54",
 "function_call_metadata": [],
 "function_executor_id": "iynykyuliAV12Gm46AuqP",
 "request_data_payload_uri_prefix": "file:///<server-blob-root>/default/slow/03ec9b8c42874ac48a1dd75ed756ba54",
 "request_error_payload_uri_prefix": "file:///<server-blob-root>/default/slow/03ec9b8c42874ac48a1dd75ed756ba54",
 "request_id": "03ec9b8c42874ac48a1dd75ed756ba54"
}"#;

/// The top level of the capture's desired state (lists cut to their shape).
const CAPTURED_DESIRED_STATE_KEYS: [&str; 4] = [
    "allocations",
    "clock",
    "function_call_results",
    "function_executors",
];

/// A JSON value with every leaf replaced by its kind: which fields exist,
/// which are null, which lists are empty.
fn shape(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value as V;
    match v {
        V::Null => V::from("null"),
        V::Bool(_) => V::from("bool"),
        V::Number(_) => V::from("number"),
        V::String(_) => V::from("string"),
        V::Array(a) if a.is_empty() => V::from("empty list"),
        V::Array(a) => {
            let mut kinds: Vec<V> = a.iter().map(shape).collect();
            kinds.dedup();
            V::Array(kinds)
        }
        V::Object(o) => V::Object(o.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
    }
}

struct Plane {
    sched: Arc<Scheduler>,
    _dir: tempfile::TempDir,
}

/// A plane with the single-function app `slow` deployed with default
/// options (or `app.py` holding `functions`) and one executor registered.
async fn plane(functions: &[&str]) -> Plane {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir(&src).expect("mkdir");
    let code = functions
        .iter()
        .map(|f| format!("@function()\ndef {f}(x):\n    pass\n\n"))
        .collect::<String>();
    std::fs::write(src.join("app.py"), code).expect("write");
    let packed = crate::app::pack(&src).expect("pack");
    let blobs = dir.path().join("blobs");
    std::fs::create_dir(&blobs).expect("mkdir");
    let sched = Arc::new(Scheduler::new(blobs, None, Default::default()));
    sched
        .deploy(NS, APP, VERSION, packed.zip, FunctionOptions::default())
        .await
        .expect("deploy");
    sched
        .report(super::tests::report(EX, vec![], vec![]))
        .await
        .expect("register");
    Plane { sched, _dir: dir }
}

impl Plane {
    async fn invoke(&self, function: &str) -> String {
        self.sched
            .invoke(NS, APP, function, b"1234".to_vec(), "application/json")
            .await
            .expect("invoke")
    }

    /// The latest desired state published to the executor.
    fn desired(&self) -> pb::DesiredExecutorState {
        let inner = self.sched.inner.lock();
        inner.executors[EX].desired.borrow().clone()
    }

    /// How many desired states the executor was published.
    fn published(&self) -> u64 {
        self.sched.inner.lock().executors[EX].published
    }

    fn allocation(&self, fc: &str) -> Option<pb::Allocation> {
        self.desired()
            .allocations
            .into_iter()
            .find(|a| a.function_call_id.as_deref() == Some(fc))
    }

    /// Reports a successful result (a JSON value) for call `fc`'s allocation.
    async fn succeed(&self, fc: &str, watches: Vec<pb::FunctionCallWatch>) {
        let a = self.allocation(fc).expect("allocation to report on");
        let path = self.sched.blob_dir.join(format!("{fc}.out"));
        std::fs::write(&path, "5").expect("write output");
        let value = pb::DataPayload {
            uri: Some(format!("file://{}", path.display())),
            encoding: Some(pb::DataPayloadEncoding::Utf8Json as i32),
            size: Some(1),
            sha256_hash: Some(sha256_hex(b"5")),
            ..Default::default()
        };
        let r = pb::AllocationResult {
            function: a.function.clone(),
            allocation_id: a.allocation_id.clone(),
            function_call_id: a.function_call_id.clone(),
            request_id: a.request_id.clone(),
            outcome_code: Some(pb::AllocationOutcomeCode::Success as i32),
            return_value: Some(pb::allocation_result::ReturnValue::Value(value)),
            execution_duration_ms: Some(1),
            ..Default::default()
        };
        self.sched
            .report(super::tests::report(EX, watches, vec![r]))
            .await
            .expect("report");
    }

    /// `call_function` from `source`: calls `id` of `child`, on the output
    /// of call `on` when given, else on an inline value.
    async fn call(&self, rid: &str, source: &str, id: &str, on: Option<&str>) {
        let source_of_arg = match on {
            Some(fc) => pb::function_arg::Source::FunctionCallId(fc.into()),
            None => pb::function_arg::Source::InlineData(pb::DataPayload {
                uri: Some(format!("file://{}/x", self.sched.blob_dir.display())),
                encoding: Some(pb::DataPayloadEncoding::Utf8Json as i32),
                size: Some(1),
                sha256_hash: Some("00".into()),
                ..Default::default()
            }),
        };
        let op = pb::ExecutionPlanUpdate {
            op: Some(pb::execution_plan_update::Op::FunctionCall(
                pb::FunctionCall {
                    id: Some(id.into()),
                    target: Some(pb::FunctionRef {
                        namespace: Some(NS.into()),
                        application_name: Some(APP.into()),
                        function_name: Some("child".into()),
                        application_version: None,
                    }),
                    args: vec![pb::FunctionArg {
                        source: Some(source_of_arg),
                    }],
                    call_metadata: Some(Vec::new()),
                },
            )),
        };
        self.sched
            .call_function(pb::FunctionCallRequest {
                namespace: Some(NS.into()),
                application: Some(APP.into()),
                request_id: Some(rid.into()),
                source_function_call_id: Some(source.into()),
                updates: Some(pb::ExecutionPlanUpdates {
                    updates: vec![op],
                    root_function_call_id: Some(id.into()),
                    start_at: None,
                }),
            })
            .await
            .expect("call_function");
    }
}

#[tokio::test]
async fn desired_state_has_the_real_servers_shape() {
    let p = plane(&["slow"]).await;
    let rid = p.invoke("slow").await;
    let desired = serde_json::to_value(p.desired()).expect("serialize");

    let keys: Vec<&str> = desired
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, CAPTURED_DESIRED_STATE_KEYS);
    assert_eq!(desired["function_call_results"], serde_json::json!([]));

    let fes = desired["function_executors"].as_array().expect("list");
    assert_eq!(fes.len(), 1);
    let fe = &fes[0];
    let captured_fe: serde_json::Value =
        serde_json::from_str(CAPTURED_FUNCTION_EXECUTOR).expect("captured");
    assert_eq!(
        shape(fe),
        shape(&captured_fe),
        "function executor shape differs from the capture:\n{fe:#}"
    );
    // The values the real server derives from the defaults and the function.
    for field in [
        "allocation_timeout_ms",
        "container_type",
        "function",
        "initialization_timeout_ms",
        "max_concurrency",
        "pool_id",
        "resources",
        "sandbox_metadata",
        "secret_names",
    ] {
        assert_eq!(fe[field], captured_fe[field], "function_executor.{field}");
    }
    for field in ["content_type", "encoding", "encoding_version", "offset"] {
        assert_eq!(
            fe["application"][field], captured_fe["application"][field],
            "function_executor.application.{field}"
        );
    }

    let allocations = desired["allocations"].as_array().expect("list");
    assert_eq!(allocations.len(), 1);
    let a = &allocations[0];
    let captured_a: serde_json::Value =
        serde_json::from_str(CAPTURED_ALLOCATION).expect("captured");
    assert_eq!(
        shape(a),
        shape(&captured_a),
        "allocation shape differs from the capture:\n{a:#}"
    );
    assert_eq!(a["function"], captured_a["function"]);
    assert_eq!(a["function_call_metadata"], serde_json::json!([]));
    assert_eq!(a["function_executor_id"], fe["id"]);
    // The request id names the request, its root call and its input.
    for id in [
        &a["request_id"],
        &a["function_call_id"],
        &a["args"][0]["id"],
    ] {
        assert_eq!(id, &serde_json::json!(rid));
    }
    // One prefix for data and errors, ending with namespace/app/request.
    let prefix = a["request_data_payload_uri_prefix"]
        .as_str()
        .expect("prefix");
    assert_eq!(a["request_error_payload_uri_prefix"], prefix);
    assert!(prefix.ends_with(&format!("/{NS}/{APP}/{rid}")), "{prefix}");
    for field in ["content_type", "encoding", "encoding_version", "offset"] {
        assert_eq!(
            a["args"][0][field], captured_a["args"][0][field],
            "allocation.args[0].{field}"
        );
    }
}

/// Follows the desired states published to the executor.
struct Cadence {
    sub: Subscription,
    clocks: Vec<u64>,
    published: u64,
}

impl Cadence {
    fn new(p: &Plane) -> Cadence {
        let sub = p.sched.subscribe(EX).expect("registered");
        let clock = sub.desired.borrow().clock.expect("clock");
        Cadence {
            sub,
            clocks: vec![clock],
            published: p.published(),
        }
    }

    /// Asserts that the last operation published exactly one more full
    /// state, with a higher clock, to the subscriber; returns it.
    fn step(&mut self, p: &Plane, what: &str) -> pb::DesiredExecutorState {
        self.steps(p, 1, what)
    }

    /// As `step`, for an operation that published `n` full states (the
    /// subscriber sees the last).
    fn steps(&mut self, p: &Plane, n: u64, what: &str) -> pb::DesiredExecutorState {
        let d = self.sub.desired.borrow().clone();
        assert_eq!(p.published(), self.published + n, "{what}: {n} publish(es)");
        self.published += n;
        let clock = d.clock.expect("clock");
        let last = *self.clocks.last().expect("a clock");
        assert!(
            clock > last,
            "{what}: clock {clock} after {:?}",
            self.clocks
        );
        self.clocks.push(clock);
        assert_eq!(d, p.desired(), "{what}: the subscriber has the latest");
        d
    }

    /// Asserts that the last operation published nothing.
    fn unchanged(&self, p: &Plane, what: &str) {
        assert_eq!(p.published(), self.published, "{what}: no publish");
    }
}

#[tokio::test]
async fn a_full_state_with_a_higher_clock_is_published_on_every_change() {
    let p = plane(&["slow", "child"]).await;
    let mut c = Cadence::new(&p);

    // Allocation created: published with its function executor.
    let r1 = p.invoke("slow").await;
    let d = c.step(&p, "first invocation");
    assert_eq!(d.function_executors.len(), 1);
    assert!(p.allocation(&r1).is_some());
    // The worker is full (max_concurrency 1): the second run waits at the
    // server, and the executor hears nothing.
    let r2 = p.invoke("slow").await;
    c.unchanged(&p, "invocation while the worker is full");
    assert!(p.allocation(&r2).is_none());

    // Result: published without its allocation, then with the waiting run
    // in the freed slot (two changes on the real server, two states).
    p.succeed(&r1, vec![]).await;
    let d = c.steps(&p, 2, "result that frees the slot");
    assert!(p.allocation(&r1).is_none());
    assert!(p.allocation(&r2).is_some());
    assert_eq!(
        d.function_executors.len(),
        1,
        "full state: the unchanged worker is repeated"
    );

    // A nested call that can run creates an allocation: published.
    p.call(&r2, &r2, "d1", None).await;
    c.step(&p, "nested call");
    assert!(p.allocation("d1").is_some());
    // A call waiting for d1's output creates nothing for the executor.
    p.call(&r2, &r2, "d2", Some("d1")).await;
    c.unchanged(&p, "waiting call");

    // d1's result removes its allocation, then d2 is placed: two states.
    let watch = pb::FunctionCallWatch {
        namespace: Some(NS.into()),
        application: Some(APP.into()),
        request_id: Some(r2.clone()),
        function_call_id: Some("d2".into()),
    };
    p.succeed("d1", vec![watch.clone()]).await;
    c.steps(&p, 2, "result that makes the next call runnable");
    assert!(p.allocation("d1").is_none());
    assert!(p.allocation("d2").is_some());

    // A watched call's result reaches the watcher with the allocation's removal.
    p.succeed("d2", vec![watch]).await;
    let d = c.step(&p, "watched result");
    assert!(p.allocation("d2").is_none());
    let result = d
        .function_call_results
        .iter()
        .find(|r| r.function_call_id.as_deref() == Some("d2"))
        .expect("function call result");
    assert_eq!(result.outcome_code(), pb::AllocationOutcomeCode::Success);

    // The counts a benchmark reads.
    let stats = p.sched.stats();
    assert_eq!(stats["desired_states_published"], c.published);
    assert_eq!(
        stats["desired_states_by_executor"][EX]["published"],
        c.published
    );
    assert_eq!(stats["allocations_created"], 4, "r1, r2, d1, d2: {stats}");
    assert_eq!(stats["desired_states_sent"], 0, "no stream is open");
}
