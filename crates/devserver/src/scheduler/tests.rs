//! Function composition through the scheduler, driven with synthetic
//! reports and `call_function` requests: child allocations, reduce chains,
//! tail calls, watches, failures, validation codes, fault modes, bounds;
//! and placement limited by the worker's capacity.

use std::sync::Arc;
use std::time::Duration;

use steward_proto::executor_api_pb as pb;
use tonic::Code;

use super::*;
use crate::graph::MAX_CALLS_PER_REQUEST;

const NS: &str = "ns";
const APP: &str = "app";
const EX: &str = "ex-1";

struct Plane {
    sched: Arc<Scheduler>,
    /// What the fake agent reports as its watches, in every report.
    watches: Mutex<Vec<pb::FunctionCallWatch>>,
    _dir: tempfile::TempDir,
}

async fn plane() -> Plane {
    plane_with(FunctionOptions::default()).await
}

async fn plane_with(options: FunctionOptions) -> Plane {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir(&src).expect("mkdir");
    let code = ["root", "child", "other", "add"]
        .map(|f| format!("@function()\ndef {f}(x):\n    pass\n\n"))
        .concat();
    std::fs::write(src.join("app.py"), code).expect("write");
    let packed = crate::app::pack(&src).expect("pack");
    let blobs = dir.path().join("blobs");
    std::fs::create_dir(&blobs).expect("mkdir");
    let sched = Arc::new(Scheduler::new(blobs, None, Default::default()));
    sched
        .deploy(NS, APP, "7", packed.zip, options)
        .await
        .expect("deploy");
    sched
        .report(report(EX, vec![], vec![]))
        .await
        .expect("register");
    Plane {
        sched,
        watches: Mutex::new(Vec::new()),
        _dir: dir,
    }
}

/// A report of `executor_id` carrying `watches` and `results`.
pub(super) fn report(
    executor_id: &str,
    watches: Vec<pb::FunctionCallWatch>,
    results: Vec<pb::AllocationResult>,
) -> pb::ReportExecutorStateRequest {
    pb::ReportExecutorStateRequest {
        executor_state: Some(pb::ExecutorState {
            executor_id: Some(executor_id.into()),
            status: Some(pb::ExecutorStatus::Running as i32),
            function_call_watches: watches,
            ..Default::default()
        }),
        executor_update: Some(pb::ExecutorUpdate {
            executor_id: Some(executor_id.into()),
            allocation_results: results,
        }),
    }
}

fn watch(rid: &str, fc: &str) -> pb::FunctionCallWatch {
    pb::FunctionCallWatch {
        namespace: Some(NS.into()),
        application: Some(APP.into()),
        request_id: Some(rid.into()),
        function_call_id: Some(fc.into()),
    }
}

impl Plane {
    async fn invoke(&self) -> String {
        self.sched
            .invoke(NS, APP, "root", b"1".to_vec(), "application/json")
            .await
            .expect("invoke")
    }

    /// The executor's current desired state, without publishing again.
    fn desired(&self) -> pb::DesiredExecutorState {
        let inner = self.sched.inner.lock();
        let e = inner.executors.get(EX).expect("registered");
        e.desired.borrow().clone()
    }

    /// Desired states published to the executor so far.
    fn published(&self) -> u64 {
        self.sched.inner.lock().executors[EX].published
    }

    /// The function call ids of the allocations in the desired state.
    fn allocated(&self) -> BTreeSet<String> {
        self.desired()
            .allocations
            .into_iter()
            .filter_map(|a| a.function_call_id)
            .collect()
    }

    fn allocation(&self, fc: &str) -> Option<pb::Allocation> {
        self.desired()
            .allocations
            .into_iter()
            .find(|a| a.function_call_id.as_deref() == Some(fc))
    }

    /// A JSON value stored in the blob store, as a function output.
    fn payload(&self, name: &str, json: &str) -> pb::DataPayload {
        let path = self.sched.blob_dir.join(name);
        std::fs::write(&path, json).expect("write blob");
        pb::DataPayload {
            uri: Some(format!("file://{}", path.display())),
            encoding: Some(pb::DataPayloadEncoding::Utf8Json as i32),
            encoding_version: Some(0),
            content_type: Some("application/json".into()),
            metadata_size: Some(0),
            offset: Some(0),
            size: Some(json.len() as u64),
            sha256_hash: Some(sha256_hex(json.as_bytes())),
            source_function_call_id: None,
            id: None,
        }
    }

    fn outcome(&self, rid: &str) -> RequestOutcome {
        self.sched.outcome(rid).expect("request").0
    }

    fn runs(&self, rid: &str) -> serde_json::Value {
        self.sched.runs(NS, rid).expect("runs")
    }

    fn run_status(&self, rid: &str, fc: &str) -> serde_json::Value {
        let runs = self.runs(rid);
        runs["runs"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["id"] == fc).cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    async fn call(&self, rid: &str, source: &str, root: &str, ops: Vec<pb::ExecutionPlanUpdate>) {
        self.sched
            .call_function(call_request(rid, source, root, ops))
            .await
            .expect("call_function");
    }

    async fn result(&self, fc: &str, r: pb::AllocationResult) {
        self.try_result(fc, r).await.expect("report");
    }

    async fn try_result(&self, fc: &str, mut r: pb::AllocationResult) -> Result<(), ApiError> {
        let a = self.allocation(fc).expect("allocation to report on");
        r.allocation_id = a.allocation_id.clone();
        r.function_call_id = a.function_call_id.clone();
        r.request_id = a.request_id.clone();
        r.function = a.function.clone();
        let watches = self.watches.lock().clone();
        self.sched.report(report(EX, watches, vec![r])).await
    }

    /// Reports `watches` from now on.
    async fn set_watches(&self, watches: Vec<pb::FunctionCallWatch>) {
        *self.watches.lock() = watches.clone();
        self.sched
            .report(report(EX, watches, vec![]))
            .await
            .expect("report");
    }
}

fn target(function: &str) -> pb::FunctionRef {
    pb::FunctionRef {
        namespace: Some(NS.into()),
        application_name: Some(APP.into()),
        function_name: Some(function.into()),
        application_version: None,
    }
}

fn inline_arg(p: &pb::DataPayload) -> pb::FunctionArg {
    pb::FunctionArg {
        source: Some(pb::function_arg::Source::InlineData(p.clone())),
    }
}

fn output_arg(fc: &str) -> pb::FunctionArg {
    pb::FunctionArg {
        source: Some(pb::function_arg::Source::FunctionCallId(fc.into())),
    }
}

fn call_op(id: &str, function: &str, args: Vec<pb::FunctionArg>) -> pb::ExecutionPlanUpdate {
    pb::ExecutionPlanUpdate {
        op: Some(pb::execution_plan_update::Op::FunctionCall(
            pb::FunctionCall {
                id: Some(id.into()),
                target: Some(target(function)),
                args,
                call_metadata: Some(format!("meta-{id}").into_bytes()),
            },
        )),
    }
}

fn reduce_op(id: &str, items: Vec<pb::FunctionArg>) -> pb::ExecutionPlanUpdate {
    pb::ExecutionPlanUpdate {
        op: Some(pb::execution_plan_update::Op::Reduce(pb::ReduceOp {
            id: Some(id.into()),
            collection: items,
            reducer: Some(target("add")),
            call_metadata: Some(b"reduce-meta".to_vec()),
        })),
    }
}

fn plan(root: &str, ops: Vec<pb::ExecutionPlanUpdate>) -> pb::ExecutionPlanUpdates {
    pb::ExecutionPlanUpdates {
        updates: ops,
        root_function_call_id: Some(root.into()),
        start_at: None,
    }
}

fn call_request(
    rid: &str,
    source: &str,
    root: &str,
    ops: Vec<pb::ExecutionPlanUpdate>,
) -> pb::FunctionCallRequest {
    pb::FunctionCallRequest {
        namespace: Some(NS.into()),
        application: Some(APP.into()),
        request_id: Some(rid.into()),
        updates: Some(plan(root, ops)),
        source_function_call_id: Some(source.into()),
    }
}

fn value(p: pb::DataPayload) -> pb::AllocationResult {
    pb::AllocationResult {
        outcome_code: Some(pb::AllocationOutcomeCode::Success as i32),
        return_value: Some(pb::allocation_result::ReturnValue::Value(p)),
        execution_duration_ms: Some(5),
        ..Default::default()
    }
}

fn tail_call(root: &str, ops: Vec<pb::ExecutionPlanUpdate>) -> pb::AllocationResult {
    pb::AllocationResult {
        outcome_code: Some(pb::AllocationOutcomeCode::Success as i32),
        return_value: Some(pb::allocation_result::ReturnValue::Updates(plan(root, ops))),
        ..Default::default()
    }
}

fn failure(
    reason: pb::AllocationFailureReason,
    request_error: Option<pb::DataPayload>,
) -> pb::AllocationResult {
    pb::AllocationResult {
        outcome_code: Some(pb::AllocationOutcomeCode::Failure as i32),
        failure_reason: Some(reason as i32),
        request_error,
        ..Default::default()
    }
}

fn result_for<'a>(d: &'a pb::DesiredExecutorState, fc: &str) -> Option<&'a pb::FunctionCallResult> {
    d.function_call_results
        .iter()
        .find(|r| r.function_call_id.as_deref() == Some(fc))
}

#[tokio::test]
async fn nested_call_creates_child_allocation_with_the_servers_fields() {
    let p = plane().await;
    let rid = p.invoke().await;
    let root = p.allocation(&rid).expect("root allocation");
    let x = p.payload("x", "2");
    p.call(
        &rid,
        &rid,
        "d1",
        vec![call_op("d1", "child", vec![inline_arg(&x)])],
    )
    .await;

    let child = p.allocation("d1").expect("child allocation");
    assert_eq!(
        child.function,
        Some(target("child")),
        "application_version stays None"
    );
    assert_eq!(child.request_id.as_deref(), Some(rid.as_str()));
    assert_eq!(
        child.function_call_metadata.as_deref(),
        Some(&b"meta-d1"[..])
    );
    assert_eq!(
        child.request_data_payload_uri_prefix,
        root.request_data_payload_uri_prefix
    );
    assert_eq!(
        child.request_error_payload_uri_prefix,
        root.request_error_payload_uri_prefix
    );
    assert_ne!(child.allocation_id, root.allocation_id);
    assert_eq!(child.args.len(), 1);
    assert_eq!(child.args[0].uri, x.uri);
    assert_eq!(child.args[0].sha256_hash, x.sha256_hash);
    assert_eq!(child.args[0].source_function_call_id, None);
    assert!(child.args[0].id.is_some(), "payload ids are assigned");
    // Its own function executor, of the deployed version.
    let fe_id = child.function_executor_id.clone().expect("placed");
    assert_ne!(Some(fe_id.clone()), root.function_executor_id);
    let fe = p
        .desired()
        .function_executors
        .into_iter()
        .find(|f| f.id.as_deref() == Some(fe_id.as_str()))
        .expect("child function executor");
    assert_eq!(
        fe.function.and_then(|f| f.application_version).as_deref(),
        Some("7")
    );
    let listed = p.run_status(&rid, "d1");
    assert_eq!(listed["parent"], serde_json::json!(rid));
    assert_eq!(listed["status"], "running");

    // A call on d1's output waits, then gets it with its source call id.
    p.call(
        &rid,
        &rid,
        "d2",
        vec![call_op("d2", "other", vec![output_arg("d1")])],
    )
    .await;
    assert!(p.allocation("d2").is_none());
    assert_eq!(p.run_status(&rid, "d2")["status"], "waiting_for_args");
    let out = p.payload("d1-out", "3");
    p.result("d1", value(out.clone())).await;
    let d2 = p.allocation("d2").expect("d2 runs once d1 has output");
    assert_eq!(d2.args[0].uri, out.uri);
    assert_eq!(d2.args[0].source_function_call_id.as_deref(), Some("d1"));
    assert!(
        p.allocation("d1").is_none(),
        "finished run leaves the desired state"
    );
    assert_eq!(p.outcome(&rid).status, "pending");
}

#[tokio::test]
async fn same_id_is_not_run_again_and_request_waits_for_every_run() {
    let p = plane().await;
    let rid = p.invoke().await;
    let x = p.payload("x", "1");
    p.call(
        &rid,
        &rid,
        "d1",
        vec![call_op("d1", "child", vec![inline_arg(&x)])],
    )
    .await;
    let first = p.allocation("d1").expect("d1").allocation_id;
    // A replayed parent sends the same id again: no second run.
    p.call(
        &rid,
        &rid,
        "d1",
        vec![call_op("d1", "child", vec![inline_arg(&x)])],
    )
    .await;
    assert_eq!(p.allocation("d1").expect("d1").allocation_id, first);
    assert_eq!(p.runs(&rid)["function_runs"], 2);

    // The root returns while its (unwatched) child still runs.
    p.result(&rid, value(p.payload("root-out", "\"done\"")))
        .await;
    assert_eq!(p.outcome(&rid).status, "pending");
    p.result("d1", value(p.payload("d1-out", "5"))).await;
    let o = p.outcome(&rid);
    assert_eq!(o.status, "success");
    assert_eq!(o.output, Some(serde_json::json!("done")));
}

#[tokio::test]
async fn reduce_becomes_a_left_fold_chain() {
    let p = plane().await;
    let rid = p.invoke().await;
    let [a, b, c] = ["a", "b", "c"].map(|n| p.payload(n, n.len().to_string().as_str()));
    p.call(
        &rid,
        &rid,
        "r",
        vec![reduce_op(
            "r",
            vec![inline_arg(&a), inline_arg(&b), inline_arg(&c)],
        )],
    )
    .await;
    let runs = p.runs(&rid);
    assert_eq!(runs["function_calls"], 3, "root + 2 links: {runs}");
    let first = p
        .desired()
        .allocations
        .into_iter()
        .find(|al| {
            al.function
                .as_ref()
                .and_then(|f| f.function_name.as_deref())
                == Some("add")
        })
        .expect("first link runs at once");
    let link0 = first.function_call_id.clone().expect("id");
    assert_ne!(link0, "r");
    assert_eq!(
        first.args.iter().map(|x| x.uri.clone()).collect::<Vec<_>>(),
        vec![a.uri, b.uri]
    );
    assert_eq!(
        first.function_call_metadata.as_deref(),
        Some(&b"reduce-meta"[..])
    );
    assert_eq!(
        p.run_status(&rid, &link0)["parent"],
        serde_json::Value::Null
    );
    assert_eq!(p.run_status(&rid, "r")["status"], "waiting_for_args");

    p.result(&link0, value(p.payload("ab", "3"))).await;
    let last = p.allocation("r").expect("last link gets the reduce id");
    assert_eq!(
        last.args[0].source_function_call_id.as_deref(),
        Some(link0.as_str())
    );
    assert_eq!(last.args[1].uri, c.uri);
}

#[tokio::test]
async fn reduce_with_one_item_fails_the_request() {
    let p = plane().await;
    let rid = p.invoke().await;
    let a = p.payload("a", "1");
    p.call(&rid, &rid, "r", vec![reduce_op("r", vec![inline_arg(&a)])])
        .await;
    let o = p.outcome(&rid);
    assert_eq!(
        (o.status.as_str(), o.failure_reason.as_deref()),
        ("failure", Some("FUNCTION_ERROR"))
    );
    assert!(p.allocation(&rid).is_none(), "the root is cancelled");
}

#[tokio::test]
async fn tail_calls_give_the_root_its_output() {
    let p = plane().await;
    let rid = p.invoke().await;
    let x = p.payload("x", "1");
    // root: return other.awaitable(child.awaitable(x)) -> [d_other{args=[fc d_child]}, d_child]
    p.result(
        &rid,
        tail_call(
            "d_other",
            vec![
                call_op("d_other", "other", vec![output_arg("d_child")]),
                call_op("d_child", "child", vec![inline_arg(&x)]),
            ],
        ),
    )
    .await;
    let root_run = p.run_status(&rid, &rid);
    assert_eq!(root_run["status"], "completed");
    assert_eq!(root_run["has_output"], false);
    assert_eq!(root_run["child_function_call"], "d_other");
    assert_eq!(
        p.run_status(&rid, "d_child")["parent"],
        serde_json::Value::Null
    );
    assert_eq!(p.outcome(&rid).status, "pending");

    p.result("d_child", value(p.payload("child-out", "2")))
        .await;
    // d_other tail-calls again; its callee's value travels up two links.
    p.result(
        "d_other",
        tail_call(
            "d_last",
            vec![call_op("d_last", "child", vec![output_arg("d_child")])],
        ),
    )
    .await;
    assert_eq!(p.outcome(&rid).status, "pending");
    p.result("d_last", value(p.payload("last-out", "{\"sum\": 4}")))
        .await;
    let o = p.outcome(&rid);
    assert_eq!(o.status, "success", "{o:?}");
    assert_eq!(o.output, Some(serde_json::json!({"sum": 4})));
    assert_eq!(o.output_content_type.as_deref(), Some("application/json"));
    assert_eq!(p.run_status(&rid, "d_other")["has_output"], true);
    assert_eq!(p.run_status(&rid, &rid)["has_output"], true);
}

#[tokio::test]
async fn tail_call_that_can_never_resolve_fails_instead_of_hanging() {
    let p = plane().await;
    let rid = p.invoke().await;
    let x = p.payload("x", "1");
    // The root id names no call (like a bare map's list id).
    p.result(
        &rid,
        tail_call("list", vec![call_op("d1", "child", vec![inline_arg(&x)])]),
    )
    .await;
    assert_eq!(p.outcome(&rid).status, "pending");
    p.result("d1", value(p.payload("d1-out", "1"))).await;
    let o = p.outcome(&rid);
    assert_eq!(
        (o.status.as_str(), o.failure_reason.as_deref()),
        ("failure", Some("FUNCTION_ERROR"))
    );
}

#[tokio::test]
async fn malformed_tail_call_fails_the_whole_report_and_changes_nothing() {
    let p = plane().await;
    let rid = p.invoke().await;
    let mut bad = p.payload("x", "1");
    bad.sha256_hash = None;
    let err = p
        .try_result(
            &rid,
            tail_call("d", vec![call_op("d", "child", vec![inline_arg(&bad)])]),
        )
        .await
        .expect_err("malformed");
    assert_eq!(tonic::Status::from(err).code(), Code::Internal);
    let mut no_root = tail_call("d", vec![]);
    if let Some(pb::allocation_result::ReturnValue::Updates(u)) = &mut no_root.return_value {
        u.root_function_call_id = None;
    }
    let err = p.try_result(&rid, no_root).await.expect_err("no root");
    assert_eq!(tonic::Status::from(err).code(), Code::Internal);
    assert_eq!(p.run_status(&rid, &rid)["status"], "running");
    assert!(p.allocation(&rid).is_some());
}

#[tokio::test]
async fn watched_call_results_reach_the_watching_executor() {
    let p = plane().await;
    let rid = p.invoke().await;
    let x = p.payload("x", "1");
    p.call(
        &rid,
        &rid,
        "d1",
        vec![call_op("d1", "child", vec![inline_arg(&x)])],
    )
    .await;
    p.set_watches(vec![watch(&rid, "d1")]).await;
    p.sched.republish(EX).expect("republish");
    let pending = p.desired();
    let r = result_for(&pending, "d1").expect("a result while running");
    assert_eq!(r.outcome_code(), pb::AllocationOutcomeCode::Unknown);
    assert!(r.return_value.is_none());

    let out = p.payload("d1-out", "9");
    let clock = p.desired().clock;
    p.result("d1", value(out.clone())).await;
    let d = p.desired();
    assert!(d.clock > clock);
    let r = result_for(&d, "d1").expect("result");
    assert_eq!(r.outcome_code(), pb::AllocationOutcomeCode::Success);
    assert_eq!(r.namespace.as_deref(), Some(NS));
    assert_eq!(r.request_id.as_deref(), Some(rid.as_str()));
    let v = r.return_value.as_ref().expect("value");
    assert_eq!(
        (v.uri.clone(), v.size, v.content_type.clone()),
        (out.uri, out.size, None)
    );
    assert_eq!(v.source_function_call_id, None);

    // Dropping the watch drops the result.
    p.set_watches(vec![]).await;
    p.sched.republish(EX).expect("republish");
    assert!(p.desired().function_call_results.is_empty());
}

#[tokio::test]
async fn watch_arriving_after_the_call_finished_republishes() {
    let p = plane().await;
    let rid = p.invoke().await;
    let x = p.payload("x", "1");
    p.call(
        &rid,
        &rid,
        "d1",
        vec![call_op("d1", "child", vec![inline_arg(&x)])],
    )
    .await;
    p.result("d1", value(p.payload("d1-out", "9"))).await;
    let before = p.desired();
    assert!(before.function_call_results.is_empty());
    p.set_watches(vec![watch(&rid, "d1")]).await;
    let after = p.desired();
    assert!(after.clock > before.clock, "the new watch republished");
    let r = result_for(&after, "d1").expect("result");
    assert_eq!(r.outcome_code(), pb::AllocationOutcomeCode::Success);
    assert!(r.return_value.is_some());
    // The same watch again is no change: no new desired state.
    p.set_watches(vec![watch(&rid, "d1")]).await;
    assert_eq!(p.desired().clock, after.clock);
}

#[tokio::test]
async fn watch_of_a_tail_calling_child_sees_success_then_the_value() {
    let p = plane().await;
    let rid = p.invoke().await;
    let x = p.payload("x", "1");
    p.call(
        &rid,
        &rid,
        "d1",
        vec![call_op("d1", "child", vec![inline_arg(&x)])],
    )
    .await;
    p.set_watches(vec![watch(&rid, "d1")]).await;
    p.result(
        "d1",
        tail_call("d2", vec![call_op("d2", "other", vec![inline_arg(&x)])]),
    )
    .await;
    let d = p.desired();
    let r = result_for(&d, "d1").expect("result");
    assert_eq!(r.outcome_code(), pb::AllocationOutcomeCode::Success);
    assert!(r.return_value.is_none(), "unresolved tail chain");
    let out = p.payload("d2-out", "8");
    p.result("d2", value(out.clone())).await;
    let d = p.desired();
    let r = result_for(&d, "d1").expect("result");
    assert_eq!(r.return_value.as_ref().and_then(|v| v.uri.clone()), out.uri);
}

#[tokio::test]
async fn child_failure_fails_the_request_and_removes_the_parent() {
    let p = plane().await;
    let rid = p.invoke().await;
    let x = p.payload("x", "1");
    p.call(
        &rid,
        &rid,
        "d1",
        vec![
            call_op("d1", "child", vec![inline_arg(&x)]),
            call_op("d2", "other", vec![inline_arg(&x)]),
            call_op("d3", "other", vec![output_arg("d1")]),
        ],
    )
    .await;
    p.set_watches(vec![watch(&rid, "d1")]).await;
    let err = p.payload("err", "bad input");
    let mut f = failure(pb::AllocationFailureReason::RequestError, Some(err));
    f.execution_duration_ms = Some(11);
    p.result("d1", f).await;
    let o = p.outcome(&rid);
    assert_eq!(o.status, "failure");
    assert_eq!(o.failure_reason.as_deref(), Some("REQUEST_ERROR"));
    assert_eq!(o.request_error.as_deref(), Some("bad input"));
    assert_eq!(o.execution_duration_ms, Some(11));
    let d = p.desired();
    assert!(
        d.allocations.is_empty(),
        "parent and sibling cancelled: {:?}",
        d.allocations
    );
    assert!(
        d.function_call_results.is_empty(),
        "no result for a failed request"
    );
    assert_eq!(
        p.run_status(&rid, &rid)["failure_reason"],
        "FUNCTION_RUN_CANCELLED"
    );
    // Later results and calls for the request change nothing.
    p.call(
        &rid,
        &rid,
        "d9",
        vec![call_op("d9", "child", vec![inline_arg(&x)])],
    )
    .await;
    assert_eq!(p.runs(&rid)["function_calls"], 4);
    assert_eq!(
        p.outcome(&rid).failure_reason.as_deref(),
        Some("REQUEST_ERROR")
    );
}

#[tokio::test]
async fn call_function_validation_codes() {
    let p = plane().await;
    let rid = p.invoke().await;
    let x = p.payload("x", "1");
    let good = || {
        call_request(
            &rid,
            &rid,
            "d",
            vec![call_op("d", "child", vec![inline_arg(&x)])],
        )
    };
    let code = |r: pb::FunctionCallRequest| {
        let s = p.sched.clone();
        async move {
            s.call_function(r)
                .await
                .map_err(|e| tonic::Status::from(e).code())
        }
    };
    let missing: [fn(&mut pb::FunctionCallRequest); 6] = [
        |r| r.updates = None,
        |r| r.request_id = None,
        |r| r.source_function_call_id = None,
        |r| r.namespace = None,
        |r| r.application = None,
        |r| r.updates.as_mut().expect("updates").root_function_call_id = None,
    ];
    for (i, m) in missing.iter().enumerate() {
        let mut r = good();
        m(&mut r);
        assert_eq!(code(r).await, Err(Code::InvalidArgument), "case {i}");
    }
    let malformed: Vec<Box<Mutation>> = vec![
        Box::new(|r| op(r).op = None),
        Box::new(|r| fc(r).target = None),
        Box::new(|r| fc(r).target.as_mut().expect("target").namespace = None),
        Box::new(|r| fc(r).target.as_mut().expect("target").function_name = None),
        Box::new(|r| fc(r).id = None),
        Box::new(|r| fc(r).args[0].source = None),
        Box::new(|r| set_inline(fc(r), |p| p.uri = None)),
        Box::new(|r| set_inline(fc(r), |p| p.size = None)),
        Box::new(|r| set_inline(fc(r), |p| p.sha256_hash = None)),
        Box::new(|r| set_inline(fc(r), |p| p.encoding = None)),
        Box::new(|r| *op(r) = reduce_without(|o| o.call_metadata = None)),
        Box::new(|r| *op(r) = reduce_without(|o| o.reducer = None)),
        Box::new(|r| *op(r) = reduce_without(|o| o.id = None)),
    ];
    for (i, m) in malformed.iter().enumerate() {
        let mut r = good();
        m(&mut r);
        assert_eq!(code(r).await, Err(Code::Internal), "case {i}");
    }
    assert_eq!(p.runs(&rid)["function_calls"], 1, "nothing was added");

    // Silent drops: unknown request, unknown source call.
    let mut r = good();
    r.request_id = Some("nope".into());
    assert_eq!(code(r).await, Ok(()));
    let mut r = good();
    r.source_function_call_id = Some("nope".into());
    assert_eq!(code(r).await, Ok(()));
    assert_eq!(p.runs(&rid)["function_calls"], 1, "dropped");
    assert_eq!(code(good()).await, Ok(()));
    assert_eq!(p.runs(&rid)["function_calls"], 2);
}

/// A change that breaks a good request.
type Mutation = dyn Fn(&mut pb::FunctionCallRequest);

fn op(r: &mut pb::FunctionCallRequest) -> &mut pb::ExecutionPlanUpdate {
    &mut r.updates.as_mut().expect("updates").updates[0]
}

fn fc(r: &mut pb::FunctionCallRequest) -> &mut pb::FunctionCall {
    match &mut op(r).op {
        Some(pb::execution_plan_update::Op::FunctionCall(c)) => c,
        _ => unreachable!("a function call"),
    }
}

fn set_inline(c: &mut pb::FunctionCall, f: impl Fn(&mut pb::DataPayload)) {
    if let Some(pb::function_arg::Source::InlineData(p)) = &mut c.args[0].source {
        f(p);
    }
}

fn reduce_without(f: impl Fn(&mut pb::ReduceOp)) -> pb::ExecutionPlanUpdate {
    let mut op = reduce_op("r", vec![output_arg("a"), output_arg("b")]);
    if let Some(pb::execution_plan_update::Op::Reduce(r)) = &mut op.op {
        f(r);
    }
    op
}

#[tokio::test]
async fn fault_modes_refuse_drop_and_restore() {
    let p = plane().await;
    let rid = p.invoke().await;
    let x = p.payload("x", "1");
    let req = || {
        call_request(
            &rid,
            &rid,
            "d",
            vec![call_op("d", "child", vec![inline_arg(&x)])],
        )
    };
    let set = |f| {
        p.sched.set_faults(FaultsUpdate {
            call_function: Some(f),
            ..FaultsUpdate::default()
        })
    };

    set(CallFunctionFault::Refuse);
    let status = tonic::Status::from(p.sched.call_function(req()).await.expect_err("refused"));
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "refused by fault injection");
    let mut invalid = req();
    invalid.updates = None;
    let status = tonic::Status::from(p.sched.call_function(invalid).await.expect_err("refused"));
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "refuses every call"
    );

    set(CallFunctionFault::Drop);
    p.sched.call_function(req()).await.expect("drop answers OK");
    assert_eq!(p.runs(&rid)["function_calls"], 1);
    assert!(p.allocation("d").is_none());

    assert_eq!(
        set(CallFunctionFault::Ok).call_function,
        CallFunctionFault::Ok
    );
    assert_eq!(
        p.sched.set_faults(FaultsUpdate::default()),
        p.sched.faults(),
        "absent stays"
    );
    p.sched.call_function(req()).await.expect("ok");
    assert!(p.allocation("d").is_some());
}

#[tokio::test]
async fn bad_watches_and_too_many_calls_are_named_errors() {
    let p = plane().await;
    let rid = p.invoke().await;
    let mut w = watch(&rid, "d");
    w.application = None;
    let err = p
        .sched
        .report(report(EX, vec![w], vec![]))
        .await
        .expect_err("bad watch");
    assert_eq!(tonic::Status::from(err).code(), Code::InvalidArgument);

    let many = (0..convert::MAX_WATCHES_PER_EXECUTOR + 1)
        .map(|i| watch(&rid, &i.to_string()))
        .collect();
    let err = p
        .sched
        .report(report(EX, many, vec![]))
        .await
        .expect_err("too many");
    assert!(matches!(err, ApiError::TooManyWatches { .. }), "{err}");

    let items = (0..=MAX_CALLS_PER_REQUEST + 1)
        .map(|i| output_arg(&i.to_string()))
        .collect();
    let err = p
        .sched
        .call_function(call_request(&rid, &rid, "r", vec![reduce_op("r", items)]))
        .await
        .expect_err("too many calls");
    assert_eq!(tonic::Status::from(err).code(), Code::ResourceExhausted);
    assert_eq!(p.runs(&rid)["function_calls"], 1);
}

#[tokio::test]
async fn map_duplicates_hold_the_request_until_done() {
    let p = plane().await;
    let rid = p.invoke().await;
    let x = p.payload("x", "1");
    for d in ["d1", "d2"] {
        p.call(
            &rid,
            &rid,
            d,
            vec![call_op(d, "child", vec![inline_arg(&x)])],
        )
        .await;
    }
    // The list node's call: fresh ids, root id not among them.
    p.call(
        &rid,
        &rid,
        "list",
        vec![
            call_op("d1b", "child", vec![inline_arg(&x)]),
            call_op("d2b", "child", vec![inline_arg(&x)]),
        ],
    )
    .await;
    assert_eq!(p.runs(&rid)["function_runs"], 5);
    for d in ["d1", "d2"] {
        p.result(d, value(p.payload(&format!("{d}-out"), "1")))
            .await;
    }
    p.result(&rid, value(p.payload("root-out", "[1, 1]"))).await;
    p.result("d1b", value(p.payload("d1b-out", "1"))).await;
    assert_eq!(p.outcome(&rid).status, "pending", "d2b still runs");
    p.result("d2b", value(p.payload("d2b-out", "1"))).await;
    assert_eq!(p.outcome(&rid).output, Some(serde_json::json!([1, 1])));
}

#[tokio::test]
async fn cancel_withdraws_every_run_and_records_results() {
    let p = plane().await;
    let rid = p.invoke().await;
    let x = p.payload("x", "1");
    p.call(
        &rid,
        &rid,
        "d1",
        vec![call_op("d1", "child", vec![inline_arg(&x)])],
    )
    .await;
    let root = p.allocation(&rid).expect("root");
    p.sched.cancel(&rid).await.expect("cancel");
    assert!(p.desired().allocations.is_empty());
    assert!(
        p.sched.cancel(&rid).await.is_err(),
        "nothing left to cancel"
    );
    // The agent reports the cancelled root.
    let mut r = failure(pb::AllocationFailureReason::AllocationCancelled, None);
    r.allocation_id = root.allocation_id;
    p.sched
        .report(report(EX, vec![], vec![r]))
        .await
        .expect("report");
    let o = p.outcome(&rid);
    assert_eq!(o.failure_reason.as_deref(), Some("ALLOCATION_CANCELLED"));
    assert_eq!(
        p.run_status(&rid, "d1")["failure_reason"],
        "FUNCTION_RUN_CANCELLED"
    );
}

#[tokio::test]
async fn withdrawn_request_takes_no_new_calls_and_ends_with_its_last_run() {
    let p = plane().await;
    let rid = p.invoke().await;
    let root = p.allocation(&rid).expect("root");
    p.sched.cancel(&rid).await.expect("cancel");
    let x = p.payload("x", "1");
    p.call(
        &rid,
        &rid,
        "d1",
        vec![call_op("d1", "child", vec![inline_arg(&x)])],
    )
    .await;
    assert_eq!(p.runs(&rid)["function_calls"], 1, "dropped after cancel");
    // The root finished before the cancel reached the agent: its result
    // still counts, and the request succeeds.
    let mut r = value(p.payload("out", "4"));
    r.allocation_id = root.allocation_id;
    p.sched
        .report(report(EX, vec![], vec![r]))
        .await
        .expect("report");
    assert_eq!(p.outcome(&rid).output, Some(serde_json::json!(4)));
}

#[tokio::test]
async fn results_reach_a_watcher_on_another_executor() {
    let p = plane().await;
    let rid = p.invoke().await;
    // A second executor gets the child's function executor (least loaded).
    let other = "ex-2";
    p.sched
        .report(report(other, vec![], vec![]))
        .await
        .expect("register");
    p.set_watches(vec![watch(&rid, "d1")]).await;
    let x = p.payload("x", "1");
    p.call(
        &rid,
        &rid,
        "d1",
        vec![call_op("d1", "child", vec![inline_arg(&x)])],
    )
    .await;
    let child = {
        let inner = p.sched.inner.lock();
        let e = inner.executors.get(other).expect("registered");
        let d = e.desired.borrow().clone();
        d.allocations
            .into_iter()
            .next()
            .expect("child placed on ex-2")
    };
    let clock = p.desired().clock;
    let mut r = value(p.payload("d1-out", "1"));
    r.allocation_id = child.allocation_id;
    p.sched
        .report(report(other, vec![], vec![r]))
        .await
        .expect("report");
    let d = p.desired();
    assert!(d.clock > clock, "the watching executor was republished");
    assert_eq!(
        result_for(&d, "d1").map(|r| r.outcome_code()),
        Some(pb::AllocationOutcomeCode::Success)
    );
}

#[tokio::test]
async fn executor_expiry_fails_its_requests_and_drops_its_watches() {
    let p = plane().await;
    let rid = p.invoke().await;
    p.set_watches(vec![watch(&rid, "d")]).await;
    let endings = p.sched.inner.lock().expire(Duration::ZERO);
    p.sched.finish(endings).await;
    let o = p.outcome(&rid);
    assert_eq!(o.failure_reason.as_deref(), Some("EXECUTOR_REMOVED"));
    let inner = p.sched.inner.lock();
    assert!(inner.executors.is_empty() && inner.fes.is_empty());
    assert!(
        inner.allocations.is_empty(),
        "no allocation is expected any more"
    );
}

#[tokio::test]
async fn unknown_child_function_fails_the_request() {
    let p = plane().await;
    let rid = p.invoke().await;
    let x = p.payload("x", "1");
    p.call(
        &rid,
        &rid,
        "d",
        vec![call_op("d", "missing", vec![inline_arg(&x)])],
    )
    .await;
    assert_eq!(
        p.outcome(&rid).failure_reason.as_deref(),
        Some("CONSTRAINT_UNSATISFIABLE")
    );
}

#[tokio::test]
async fn forget_finished_keeps_running_requests_reachable() {
    let p = plane().await;
    let done = p.invoke().await;
    let running = p.invoke().await;
    p.result(&done, value(p.payload("out", "1"))).await;
    p.sched.forget_finished();
    assert!(p.sched.outcome(&done).is_none());
    p.result(&running, value(p.payload("out2", "2"))).await;
    assert_eq!(p.outcome(&running).output, Some(serde_json::json!(2)));
}

fn ids(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn a_full_worker_gets_the_next_run_in_the_state_after_the_one_that_frees_its_slot() {
    let p = plane().await; // max_concurrency 1
    let r1 = p.invoke().await;
    let published = p.published();
    let r2 = p.invoke().await;
    assert_eq!(
        p.allocated(),
        ids(&[&r1]),
        "the worker holds one allocation"
    );
    assert_eq!(p.published(), published, "the executor hears nothing");
    assert_eq!(p.run_status(&r2, &r2)["status"], "unplaced");
    assert_eq!(p.sched.stats()["runs_pending"], 1);

    p.result(&r1, value(p.payload("out1", "1"))).await;
    assert_eq!(
        p.published(),
        published + 2,
        "two messages: the removal, then the placement"
    );
    assert_eq!(p.allocated(), ids(&[&r2]), "r1 removed, r2 placed");
    assert_eq!(p.sched.stats()["runs_pending"], 0);
    p.result(&r2, value(p.payload("out2", "2"))).await;
    assert_eq!(p.outcome(&r2).output, Some(serde_json::json!(2)));
}

#[tokio::test]
async fn a_worker_holds_at_most_max_concurrency_allocations_oldest_first() {
    let p = plane_with(FunctionOptions {
        max_concurrency: 3,
        ..FunctionOptions::default()
    })
    .await;
    let mut r = Vec::new();
    for _ in 0..5 {
        r.push(p.invoke().await);
    }
    assert_eq!(p.allocated(), ids(&[&r[0], &r[1], &r[2]]));
    assert_eq!(p.sched.stats()["runs_pending"], 2);
    let published = p.published();
    p.result(&r[1], value(p.payload("out1", "1"))).await;
    assert_eq!(
        p.published(),
        published + 2,
        "two messages: the removal, then the placement"
    );
    assert_eq!(p.allocated(), ids(&[&r[0], &r[2], &r[3]]));
    p.result(&r[0], value(p.payload("out0", "0"))).await;
    assert_eq!(p.allocated(), ids(&[&r[2], &r[3], &r[4]]));
    assert_eq!(p.sched.stats()["runs_pending"], 0);
}

#[tokio::test]
async fn a_call_to_the_callers_full_worker_waits_but_other_functions_do_not() {
    let p = plane().await; // max_concurrency 1
    let rid = p.invoke().await;
    let older = p.invoke().await;
    let x = p.payload("x", "1");
    // A child of another function runs at once, ahead of the older waiting
    // root run: each worker has its own queue.
    p.call(
        &rid,
        &rid,
        "d1",
        vec![call_op("d1", "child", vec![inline_arg(&x)])],
    )
    .await;
    assert_eq!(p.allocated(), ids(&[&rid, "d1"]));
    // A child of the caller's own function waits behind `older` for the
    // slot the caller holds, as on the real server once it cannot add a
    // worker: a caller waiting for it would wait for ever.
    p.call(
        &rid,
        &rid,
        "d2",
        vec![call_op("d2", "root", vec![inline_arg(&x)])],
    )
    .await;
    assert_eq!(p.run_status(&rid, "d2")["status"], "unplaced");
    p.result(&rid, value(p.payload("root-out", "1"))).await;
    assert_eq!(p.allocated(), ids(&[&older, "d1"]));
    p.result(&older, value(p.payload("older-out", "1"))).await;
    assert_eq!(p.allocated(), ids(&["d1", "d2"]));
}

#[tokio::test]
async fn cancelling_frees_the_slot_and_drops_waiting_runs() {
    let p = plane().await; // max_concurrency 1
    let mut r = Vec::new();
    for _ in 0..4 {
        r.push(p.invoke().await);
    }
    // A waiting request is cancelled where it is: no message.
    let published = p.published();
    p.sched.cancel(&r[1]).await.expect("cancel waiting");
    assert_eq!(p.published(), published);
    assert_eq!(
        p.outcome(&r[1]).failure_reason.as_deref(),
        Some("ALLOCATION_CANCELLED")
    );
    // Withdrawing the placed one frees its slot: the removal, then the
    // placement.
    p.sched.cancel(&r[0]).await.expect("cancel placed");
    assert_eq!(p.published(), published + 2, "two messages");
    assert_eq!(p.allocated(), ids(&[&r[2]]));
    p.result(&r[2], value(p.payload("out2", "2"))).await;
    assert_eq!(p.allocated(), ids(&[&r[3]]));
}
