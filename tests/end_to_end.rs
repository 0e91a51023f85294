//! End to end through the dev control plane with the real tensorlake
//! `function-executor`: Steward runs `examples/hello`, the reference Python
//! executor gets the same results from the same control plane (so the
//! control plane speaks the protocol as the real server does), and Steward's
//! workers never outlive it.
//!
//! Needs the project venv (`cargo xtask test` creates it).

mod support;

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use steward_devserver::FunctionOptions;
use support::{AgentProc, Plane, alive, worker_pids};

/// (function, input, expected status, expected output, expected failure reason)
fn cases() -> Vec<(
    &'static str,
    serde_json::Value,
    &'static str,
    serde_json::Value,
    Option<&'static str>,
)> {
    vec![
        (
            "greet",
            json!("Steward"),
            "success",
            json!("Hello, Steward!"),
            None,
        ),
        (
            "sum_of_squares",
            json!([1, 2, 3, 4]),
            "success",
            json!(30),
            None,
        ),
        (
            "explode",
            json!("on purpose"),
            "failure",
            serde_json::Value::Null,
            Some("FUNCTION_ERROR"),
        ),
    ]
}

async fn run_cases(
    plane: &Plane,
) -> Result<Vec<(String, String, serde_json::Value, Option<String>)>> {
    let mut got = Vec::new();
    for (function, input, status, output, reason) in cases() {
        let out = plane.invoke(function, input).await?;
        assert_eq!(out.status, status, "{function}: {out:?}");
        assert_eq!(
            out.output.clone().unwrap_or(serde_json::Value::Null),
            output,
            "{function}: {out:?}"
        );
        assert_eq!(out.failure_reason.as_deref(), reason, "{function}: {out:?}");
        got.push((
            function.to_string(),
            out.status,
            out.output.unwrap_or_default(),
            out.failure_reason,
        ));
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steward_and_reference_executor_give_the_same_results() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_hello(FunctionOptions::default()).await?;

    let steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), &[])?;
    plane.wait_executors(1).await?;
    let ours = run_cases(&plane).await?;
    let (code, startup) = steward.get_json("/monitoring/startup").await?;
    assert_eq!((code, startup["status"].as_str()), (200, Some("ok")));
    let (_, fes) = steward.get_json("/state/function-executors").await?;
    let fes = fes["function_executors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(fes.len(), 3, "one worker per function: {fes:?}");
    assert!(fes.iter().all(|f| f["status"] == "RUNNING"), "{fes:?}");
    drop(steward);
    plane.stop().await;

    // Same app, same control plane code, the reference executor as the agent.
    let plane = Plane::start().await?;
    plane.deploy_hello(FunctionOptions::default()).await?;
    let reference = AgentProc::reference(&plane.grpc)?;
    plane.wait_executors(1).await?;
    let theirs = run_cases(&plane).await?;
    drop(reference);
    plane.stop().await;
    assert_eq!(ours, theirs);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_steward_leaves_no_worker_behind() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_hello(FunctionOptions::default()).await?;
    // Adoption off: workers die with Steward (with it on, they are left
    // for the next Steward to adopt: tests/adoption.rs).
    let mut steward = AgentProc::steward(
        &plane.grpc,
        plane.blob_dir.path(),
        &["--adopt-workers=false"],
    )?;
    plane.wait_executors(1).await?;
    assert_eq!(plane.invoke("greet", json!("x")).await?.status, "success");
    let executor_id = std::fs::read_to_string(steward.data_dir.path().join("executor_id"))?;
    let pids = worker_pids(executor_id.trim());
    assert_eq!(pids.len(), 1, "one worker expected, found {pids:?}");

    steward.signal(nix::sys::signal::Signal::SIGKILL);
    steward
        .wait_exit(Duration::from_secs(10))
        .expect("steward exits on SIGKILL");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: Vec<u32> = pids.into_iter().filter(|p| alive(*p)).collect();
    assert!(
        left.is_empty(),
        "workers outlived a SIGKILLed steward: {left:?}"
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_workers_and_deregisters() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_hello(FunctionOptions::default()).await?;
    // Adoption off: a stop stops the workers and says STOPPED.
    let mut steward = AgentProc::steward(
        &plane.grpc,
        plane.blob_dir.path(),
        &["--adopt-workers=false"],
    )?;
    plane.wait_executors(1).await?;
    assert_eq!(
        plane.invoke("sum_of_squares", json!([2])).await?.output,
        Some(json!(4))
    );
    let executor_id = std::fs::read_to_string(steward.data_dir.path().join("executor_id"))?;
    let pids = worker_pids(executor_id.trim());
    assert_eq!(pids.len(), 1);

    steward.signal(nix::sys::signal::Signal::SIGTERM);
    let status = steward
        .wait_exit(Duration::from_secs(20))
        .expect("steward exits within 20s of SIGTERM");
    assert!(status.success(), "clean exit expected, got {status}");
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "workers left after SIGTERM"
    );
    // The final STOPPED report removed the executor from the control plane.
    let executors = steward_devserver::client::executors(&plane.url).await?;
    assert_eq!(
        executors,
        json!([]),
        "executor still registered after STOPPED"
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_sigkilled_run_are_cleaned_on_the_next_start() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_hello(FunctionOptions::default()).await?;
    let steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), &[])?;
    plane.wait_executors(1).await?;
    // User code forks a process that stays in the worker's process group.
    let out = plane.invoke("spawn_sleeper", json!(300)).await?;
    let sleeper = out.output.and_then(|v| v.as_u64()).expect("sleeper pid") as u32;
    assert!(alive(sleeper));

    // SIGKILL: the worker dies with Steward, its forked child does not.
    let (_, fes) = steward.get_json("/state/function-executors").await?;
    let workers: Vec<u32> = fes["function_executors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    assert!(!workers.is_empty(), "{fes}");
    let data_dir = steward.into_data_dir()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        workers.iter().all(|p| !alive(*p)),
        "the worker outlived a SIGKILLed agent: {workers:?}"
    );
    assert!(
        alive(sleeper),
        "the forked child should outlive a SIGKILLed agent until the next start"
    );

    let steward = AgentProc::steward_full(
        &plane.grpc,
        plane.blob_dir.path(),
        &[],
        &support::path_with_venv(),
        &[],
        data_dir,
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(sleeper) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !alive(sleeper),
        "leftover process {sleeper} was not cleaned"
    );
    let (_, events) = steward.get_json("/state/events").await?;
    assert!(events.to_string().contains("leftover_cleaned"), "{events}");
    plane.stop().await;
    Ok(())
}
