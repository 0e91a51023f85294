//! Composed applications end to end (`examples/compose` on the real
//! tensorlake `function-executor`): blocking nested calls, tail calls, map,
//! reduce, futures with a timeout, request state shared between functions
//! and a failing child. The same cases run with the reference Python
//! executor against the same dev control plane and must give the same
//! values and failure reasons (differential check). Then the behaviours
//! where Steward is better than the reference: a refused call raises in
//! user code, a lost call ends its parent at the wait ceiling. The same
//! cases give the same results with workers in OCI containers
//! (`--worker-driver oci`, runc) as in processes.
//!
//! Needs the project venv (`cargo xtask test` creates it).

mod support;

use anyhow::Result;
use serde_json::json;
use steward_devserver::FunctionOptions;
use support::{AgentProc, Plane, metric};

/// (function, input, expected status, expected output, expected failure reason)
type Case = (
    &'static str,
    serde_json::Value,
    &'static str,
    serde_json::Value,
    Option<&'static str>,
);

fn cases() -> Vec<Case> {
    vec![
        ("nested", json!(3), "success", json!(10), None),
        ("tail", json!(4), "success", json!(16), None),
        (
            "map_squares",
            json!(4),
            "success",
            json!([1, 4, 9, 16]),
            None,
        ),
        ("reduce_sum", json!(5), "success", json!(15), None),
        (
            "futures",
            json!(3),
            "success",
            json!("fast=9 slow=TimeoutError"),
            None,
        ),
        (
            "state_roundtrip",
            json!("bob"),
            "success",
            json!("hello bob; missing key -> default"),
            None,
        ),
        (
            "failing_child",
            json!(1),
            "failure",
            serde_json::Value::Null,
            Some("FUNCTION_ERROR"),
        ),
        ("guarded", json!(2), "success", json!("ok 4"), None),
    ]
}

type Got = Vec<(String, String, serde_json::Value, Option<String>)>;

async fn run_cases(plane: &Plane) -> Result<Got> {
    let mut got = Vec::new();
    for (function, input, status, output, reason) in cases() {
        let out = plane.invoke_app("compose", function, input).await?;
        let value = out.output.clone().unwrap_or(serde_json::Value::Null);
        assert_eq!(
            (out.status.as_str(), &value, out.failure_reason.as_deref()),
            (status, &output, reason),
            "{function}: {out:?}"
        );
        got.push((function.to_string(), out.status, value, out.failure_reason));
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composed_apps_give_the_same_results_with_steward_and_the_reference() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_compose(FunctionOptions::default()).await?;
    let steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), &[])?;
    plane.wait_executors(1).await?;
    let ours = run_cases(&plane).await?;

    // Every kind of request a worker makes was answered, none UNIMPLEMENTED.
    let text = steward.metrics().await?;
    for series in [
        r#"steward_function_calls_total{result="created"}"#,
        r#"steward_function_call_results_total{routing="delivered"}"#,
        r#"steward_request_state_operations_total{operation="prepare_write",status="ok"}"#,
        r#"steward_request_state_operations_total{operation="commit_write",status="ok"}"#,
        r#"steward_request_state_operations_total{operation="prepare_read",status="ok"}"#,
        r#"steward_request_state_operations_total{operation="prepare_read",status="not_found"}"#,
    ] {
        assert!(
            metric(&text, series).is_some_and(|v| v >= 1.0),
            "{series} missing or zero in:\n{text}"
        );
    }
    assert_eq!(
        metric(&text, r#"steward_function_calls_total{result="refused"}"#).unwrap_or(0.0),
        0.0
    );
    // Every watch was dropped once its allocation ended.
    assert_eq!(
        metric(&text, "steward_function_call_watches"),
        Some(0.0),
        "{text}"
    );
    let (_, reported) = steward.get_json("/state/reported").await?;
    let labels = &reported["report"]["executor_state"]["labels"];
    assert!(
        labels["python_major_version"] == "3" && labels["python_minor_version"].is_string(),
        "python version labels: {labels}"
    );
    drop(steward);
    plane.stop().await;

    let plane = Plane::start().await?;
    plane.deploy_compose(FunctionOptions::default()).await?;
    let reference = AgentProc::reference(&plane.grpc)?;
    plane.wait_executors(1).await?;
    let theirs = run_cases(&plane).await?;
    drop(reference);
    plane.stop().await;
    assert_eq!(ours, theirs);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composed_apps_give_the_same_results_in_oci_sandboxes_as_in_processes() -> Result<()> {
    let mut results = Vec::new();
    for driver in ["process", "oci"] {
        let plane = Plane::start().await?;
        plane.deploy_compose(FunctionOptions::default()).await?;
        let mut steward = AgentProc::steward(
            &plane.grpc,
            plane.blob_dir.path(),
            &["--worker-driver", driver],
        )?;
        plane.wait_executors(1).await?;
        results.push(run_cases(&plane).await?);
        if driver == "oci" {
            // Every call, watch and state operation went through
            // containers; a clean stop leaves none behind.
            let root = steward.data_dir.path().join("oci/state");
            steward.signal(nix::sys::signal::Signal::SIGTERM);
            anyhow::ensure!(
                steward
                    .wait_exit(std::time::Duration::from_secs(60))
                    .is_some(),
                "steward did not stop"
            );
            let left = std::process::Command::new("runc")
                .arg("--root")
                .arg(&root)
                .args(["list", "--quiet"])
                .output()?;
            assert!(
                String::from_utf8_lossy(&left.stdout).trim().is_empty(),
                "containers left: {left:?}"
            );
        }
        drop(steward);
        plane.stop().await;
    }
    assert_eq!(results[0], results[1], "process (left) and oci (right)");
    Ok(())
}

async fn events(agent: &AgentProc, kind: &str) -> Result<Vec<String>> {
    let (_, v) = agent.get_json("/state/events").await?;
    Ok(v["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == kind)
        .filter_map(|e| e["message"].as_str().map(String::from))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_function_call_raises_in_user_code() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_compose(FunctionOptions::default()).await?;
    let steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), &[])?;
    plane.wait_executors(1).await?;
    plane.fault_call_function("refuse").await?;
    // The reference would tell the worker "created" and the parent would
    // wait forever; here user code gets an exception.
    let out = plane.invoke_app("compose", "guarded", json!(2)).await?;
    assert_eq!(out.status, "success", "{out:?}");
    let text = out.output.as_ref().and_then(|v| v.as_str()).unwrap_or("");
    assert!(text.starts_with("caught InternalError"), "{out:?}");
    let refused = events(&steward, "function_call_refused").await?;
    assert!(
        refused
            .iter()
            .any(|m| m.contains("FailedPrecondition") || m.contains("refused")),
        "{refused:?}"
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_function_call_ends_its_parent_at_the_wait_ceiling() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_compose(FunctionOptions::default()).await?;
    let steward = AgentProc::steward(
        &plane.grpc,
        plane.blob_dir.path(),
        &["--max-function-call-wait-s", "3"],
    )?;
    plane.wait_executors(1).await?;
    // Accepted, never run: the real server drops calls this way (§8.2).
    plane.fault_call_function("drop").await?;
    let out = plane.invoke_app("compose", "nested", json!(3)).await?;
    assert_eq!(
        (out.status.as_str(), out.failure_reason.as_deref()),
        ("failure", Some("FUNCTION_TIMEOUT")),
        "{out:?}"
    );
    let failed = events(&steward, "allocation_failed").await?;
    assert!(
        failed
            .iter()
            .any(|m| m.contains("waited 3 s for a function call result")),
        "{failed:?}"
    );
    plane.stop().await;
    Ok(())
}
