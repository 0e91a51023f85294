//! Steward's log when stderr is not a terminal (`--log-format auto`, the
//! default): every line is one JSON object carrying the executor id, and
//! every line about a worker or an allocation carries its ids (`fe_id`,
//! `allocation_id`) as fields. Runs the fake worker against the dev
//! control plane, through a success, a failed allocation and a stop.

mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use steward_devserver::FunctionOptions;
use support::fake_setup;

/// Whether a line's `kind` (an event's) says it is about a worker.
fn about_worker(kind: &str) -> bool {
    kind.starts_with("function_executor_")
}

/// Whether a line's `kind` says it is about an allocation.
fn about_allocation(kind: &str) -> bool {
    kind.starts_with("allocation_") || kind == "output_blob_error"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_is_json_with_the_executor_worker_and_allocation_ids() -> Result<()> {
    let (plane, mut steward) = fake_setup(FunctionOptions::default(), &[]).await?;
    let out = plane.invoke_app("fake", "echo", json!("hi")).await?;
    assert_eq!(out.status, "success", "{out:?}");
    // A value the worker never uploads: the allocation fails, and says so.
    let out = plane.invoke_app("fake", "no_upload", json!("x")).await?;
    assert_ne!(out.status, "success", "{out:?}");
    steward.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        steward.wait_exit(Duration::from_secs(30)).is_some(),
        "steward did not stop on SIGTERM"
    );
    let executor_id = std::fs::read_to_string(steward.data_dir.path().join("executor_id"))?;
    let executor_id = executor_id.trim();
    let log = steward.log();
    let mut lines = Vec::new();
    for (n, line) in log.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("line {} is not JSON: {line}", n + 1))?;
        assert!(v.is_object(), "line {} is not an object: {line}", n + 1);
        for key in ["timestamp", "level", "target", "message"] {
            assert!(v[key].is_string(), "line {} has no {key}: {line}", n + 1);
        }
        assert_eq!(v["executor_id"], executor_id, "line {}: {line}", n + 1);
        lines.push(v);
    }
    let has = |v: &Value, key: &str| v[key].as_str().is_some_and(|s| !s.is_empty());
    let kind = |v: &Value| v["kind"].as_str().unwrap_or_default().to_string();
    for v in &lines {
        let k = kind(v);
        let in_controller = v["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("steward_reconciler::fe"));
        if about_worker(&k) || in_controller {
            assert!(has(v, "fe_id"), "a line about a worker without fe_id: {v}");
        }
        if about_worker(&k) {
            assert_eq!(v["fe_id"], v["subject"], "{v}");
        }
        if about_allocation(&k) {
            assert!(
                has(v, "fe_id"),
                "a line about an allocation without fe_id: {v}"
            );
            assert!(
                has(v, "allocation_id"),
                "a line about an allocation without allocation_id: {v}"
            );
            assert_eq!(v["allocation_id"], v["subject"], "{v}");
        }
    }
    // Not vacuous: the workers' and the failed allocation's lines are there.
    let running: Vec<&Value> = lines
        .iter()
        .filter(|v| kind(v) == "function_executor_running")
        .collect();
    assert!(
        running.len() >= 2,
        "both workers' start is logged with its id: {log}"
    );
    let failed = lines
        .iter()
        .find(|v| kind(v) == "allocation_failed")
        .with_context(|| format!("no allocation_failed line: {log}"))?;
    let fe_ids: Vec<&Value> = running.iter().map(|v| &v["fe_id"]).collect();
    assert!(
        fe_ids.contains(&&failed["fe_id"]),
        "the failed allocation's line names its worker: {failed} {fe_ids:?}"
    );
    let last = lines.last().context("no line at all")?;
    assert_eq!(last["message"], "steward stopped", "{last}");
    plane.stop().await;
    Ok(())
}
