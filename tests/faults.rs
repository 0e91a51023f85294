//! Fault injection: one test per fault, each asserting what the server was
//! told (worker terminations with reasons and blamed allocations, results)
//! and that no process is left. Worker faults use `steward-fake-worker`, a
//! native worker that misbehaves on cue (a real one cannot hang, crash or
//! fail its health check on demand); server faults use the dev control
//! plane's fault-injection endpoints.

mod support;

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use steward_devserver::FunctionOptions;
use support::{AgentProc, Plane, alive, fake_setup};

const FAST_HEALTH: [&str; 2] = ["--function-executor-health-check-interval-ms", "200"];

/// Worker pids Steward knows about right now.
async fn worker_pids(steward: &AgentProc) -> Result<Vec<u32>> {
    let (_, fes) = steward.get_json("/state/function-executors").await?;
    Ok(fes["function_executors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["pid"].as_u64())
        .map(|p| p as u32)
        .collect())
}

/// Polls until Steward knows a worker pid; returns the pids.
async fn wait_worker_pids(steward: &AgentProc) -> Result<Vec<u32>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let pids = worker_pids(steward).await?;
        if !pids.is_empty() {
            return Ok(pids);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no worker pid in /state/function-executors within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_worker_round_trip() -> Result<()> {
    let (plane, _steward) = fake_setup(FunctionOptions::default(), &[]).await?;
    let out = plane
        .invoke_app("fake", "echo", json!({"a": [1, 2]}))
        .await?;
    assert_eq!(
        (out.status.as_str(), out.output),
        ("success", Some(json!({"a": [1, 2]})))
    );
    let out = plane.invoke_app("fake", "fail", json!(1)).await?;
    assert_eq!(out.failure_reason.as_deref(), Some("FUNCTION_ERROR"));
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_exit_is_noticed_at_once_and_blames_its_allocation() -> Result<()> {
    // No health check runs during the test: only the exit itself can end it.
    let no_health = ["--function-executor-health-check-interval-ms", "3600000"];
    let (plane, steward) = fake_setup(FunctionOptions::default(), &no_health).await?;
    let id = plane.start_request("fake", "crash", json!("x")).await?;
    let out = plane.outcome(&id).await?;
    assert_eq!(
        out.failure_reason.as_deref(),
        Some("FUNCTION_ERROR"),
        "{out:?}"
    );
    let t = plane.wait_termination("crash").await?;
    assert_eq!(t["reason"], json!("UNHEALTHY"), "{t}");
    let log = plane.log().await?;
    let alloc_id = log["results"]
        .as_array()
        .into_iter()
        .flatten()
        .last()
        .map(|r| r["allocation_id"].clone());
    assert_eq!(
        t["allocation_ids_caused_termination"],
        json!([alloc_id.unwrap_or_default()]),
        "{t}"
    );
    let (_, events) = steward.get_json("/state/events").await?;
    let events = events.to_string();
    assert!(
        events.contains("function_executor_exited") && events.contains("worker exited with code 3"),
        "{events}"
    );
    assert!(
        !events.contains("function_executor_unhealthy"),
        "noticed by a health check, not by the exit: {events}"
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_worker_is_killed_and_reported_unhealthy() -> Result<()> {
    let (plane, steward) = fake_setup(FunctionOptions::default(), &FAST_HEALTH).await?;
    let out = plane.invoke_app("fake", "unhealthy", json!("x")).await?;
    assert_eq!(out.status, "success");
    let pid = out.function_executor_id.clone();
    let t = plane.wait_termination("unhealthy").await?;
    assert_eq!(
        (
            t["reason"].clone(),
            t["allocation_ids_caused_termination"].clone()
        ),
        (json!("UNHEALTHY"), json!([])),
        "{t}"
    );
    let (_, events) = steward.get_json("/state/events").await?;
    assert!(
        events
            .to_string()
            .contains("the fake worker was told to be unhealthy"),
        "{events}"
    );
    assert!(pid.is_some());
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initialization_timeout_and_failure_are_startup_failures() -> Result<()> {
    let options = FunctionOptions {
        initialization_timeout_ms: 500,
        ..FunctionOptions::default()
    };
    let (plane, _steward) = fake_setup(options, &[]).await?;
    let hang = plane.start_request("fake", "init_hang", json!("x")).await?;
    let fail = plane.start_request("fake", "init_fail", json!("x")).await?;
    let hang = plane.outcome(&hang).await?;
    let fail = plane.outcome(&fail).await?;
    assert_eq!(
        hang.failure_reason.as_deref(),
        Some("STARTUP_FAILED_FUNCTION_TIMEOUT"),
        "{hang:?}"
    );
    assert_eq!(
        fail.failure_reason.as_deref(),
        Some("STARTUP_FAILED_FUNCTION_ERROR"),
        "{fail:?}"
    );
    let t = plane.wait_termination("init_hang").await?;
    assert_eq!(t["reason"], json!("STARTUP_FAILED_FUNCTION_TIMEOUT"), "{t}");
    assert_eq!(
        t["allocation_ids_caused_termination"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{t}"
    );
    let t = plane.wait_termination("init_fail").await?;
    assert_eq!(t["reason"], json!("STARTUP_FAILED_FUNCTION_ERROR"), "{t}");
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_timeout_kills_the_worker() -> Result<()> {
    let options = FunctionOptions {
        allocation_timeout_ms: 700,
        ..FunctionOptions::default()
    };
    let (plane, steward) = fake_setup(options, &[]).await?;
    let id = plane.start_request("fake", "hang", json!("x")).await?;
    let pids = wait_worker_pids(&steward).await?;
    let out = plane.outcome(&id).await?;
    assert_eq!(
        out.failure_reason.as_deref(),
        Some("FUNCTION_TIMEOUT"),
        "{out:?}"
    );
    let t = plane.wait_termination("hang").await?;
    assert_eq!(t["reason"], json!("FUNCTION_TIMEOUT"), "{t}");
    assert_eq!(
        t["allocation_ids_caused_termination"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{t}"
    );
    assert!(
        !pids.is_empty() && pids.iter().all(|p| !alive(*p)),
        "timed-out worker still alive: {pids:?}"
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_allocation_is_cancelled_and_its_worker_killed() -> Result<()> {
    let (plane, steward) = fake_setup(FunctionOptions::default(), &[]).await?;
    let id = plane.start_request("fake", "hang", json!("x")).await?;
    steward
        .wait_json("/state/allocations", Duration::from_secs(30), |_, v| {
            v.to_string().contains("\"phase\":\"running\"")
        })
        .await?;
    let pids = worker_pids(&steward).await?;
    assert_eq!(
        plane
            .delete(&format!("/v1/namespaces/default/requests/{id}"))
            .await?,
        200
    );
    let out = plane.outcome(&id).await?;
    assert_eq!(
        out.failure_reason.as_deref(),
        Some("ALLOCATION_CANCELLED"),
        "{out:?}"
    );
    let t = plane.wait_termination("hang").await?;
    assert_eq!(t["reason"], json!("FUNCTION_CANCELLED"), "{t}");
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "cancelled worker still alive: {pids:?}"
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_worker_fails_its_running_and_queued_allocations() -> Result<()> {
    let (plane, steward) = fake_setup(FunctionOptions::default(), &[]).await?;
    // The real server never sends a full worker more; a server that does
    // (a deeper queue) makes the agent queue the second allocation.
    plane.set_faults(json!({"placement": "unlimited"})).await?;
    let running = plane.start_request("fake", "hang", json!("x")).await?;
    let queued = plane.start_request("fake", "hang", json!("y")).await?;
    steward
        .wait_json("/state/allocations", Duration::from_secs(30), |_, v| {
            let s = v.to_string();
            s.contains("\"phase\":\"running\"") && s.contains("\"phase\":\"queued\"")
        })
        .await?;
    assert_eq!(
        plane
            .delete("/v1/namespaces/default/applications/fake")
            .await?,
        200
    );
    for id in [running, queued] {
        let out = plane.outcome(&id).await?;
        assert_eq!(
            out.failure_reason.as_deref(),
            Some("FUNCTION_EXECUTOR_TERMINATED"),
            "{out:?}"
        );
    }
    steward
        .wait_json(
            "/state/function-executors",
            Duration::from_secs(30),
            |_, v| v["function_executors"] == json!([]),
        )
        .await?;
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_stream_and_resent_state_restart_nothing() -> Result<()> {
    let (plane, steward) = fake_setup(FunctionOptions::default(), &[]).await?;
    assert_eq!(
        plane.invoke_app("fake", "echo", json!(1)).await?.status,
        "success"
    );
    let before = worker_pids(&steward).await?;
    let executor_id = std::fs::read_to_string(steward.data_dir.path().join("executor_id"))?;
    assert_eq!(
        plane
            .post(&format!("/v1/executors/{}/cut-stream", executor_id.trim()))
            .await?,
        200
    );
    assert_eq!(
        plane
            .post(&format!("/v1/executors/{}/republish", executor_id.trim()))
            .await?,
        200
    );
    // Work still flows through a new stream, on the same worker.
    assert_eq!(
        plane.invoke_app("fake", "echo", json!(2)).await?.output,
        Some(json!(2))
    );
    assert_eq!(worker_pids(&steward).await?, before);
    let metrics = steward.metrics().await?;
    assert!(
        metrics.contains("steward_function_executor_creations_total 1\n"),
        "worker restarted:\n{metrics}"
    );
    assert!(
        metrics.contains("steward_desired_state_streams_total 2\n"),
        "stream not reopened:\n{metrics}"
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_kept_through_an_outage_and_delivered_after() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_fake(FunctionOptions::default()).await?;
    let grpc = plane.grpc.clone();
    let bin = support::fake_worker();
    let args = [
        "--function-executor-bin",
        bin.to_str().unwrap_or_default(),
        "--report-backoff-max-s",
        "1",
    ];
    let steward = AgentProc::steward(&grpc, plane.blob_dir.path(), &args)?;
    plane.wait_executors(1).await?;
    // The function finishes only when the test opens its gate, during the outage.
    let gate_dir = tempfile::tempdir()?;
    let gate = gate_dir.path().join("open");
    let _id = plane
        .start_request("fake", "gate", json!(gate.to_string_lossy()))
        .await?;
    steward
        .wait_json("/state/allocations", Duration::from_secs(30), |_, v| {
            v.to_string().contains("\"phase\":\"running\"")
        })
        .await?;
    let pids = worker_pids(&steward).await?;
    let (_, allocs) = steward.get_json("/state/allocations").await?;
    let alloc_id = allocs["allocations"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // The server goes away while the function runs; the result waits in Steward.
    let blobs = plane.stop_keep_blobs().await;
    std::fs::write(&gate, b"")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = steward.metrics().await?;
        if m.contains("steward_allocations_completed_total{outcome=\"success\"") {
            assert!(
                m.contains("steward_pending_allocation_results 1\n")
                    || m.contains("steward_pending_allocation_results 0\n")
            );
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the allocation never finished during the outage:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, allocs) = steward.get_json("/state/allocations").await?;
    assert_eq!(
        allocs["pending_results"],
        json!(1),
        "the result waits in Steward: {allocs}"
    );
    assert!(
        pids.iter().all(|p| alive(*p)),
        "workers must keep running through an outage"
    );

    // A server comes back on the same address and receives the kept result.
    let plane = Plane::start_on(&grpc, blobs).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = plane.log().await?;
        if log["results"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["allocation_id"] == json!(alloc_id))
        {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "kept result never delivered: {log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_is_reopened_without_disturbing_workers() -> Result<()> {
    let (plane, steward) = fake_setup(
        FunctionOptions::default(),
        &["--stream-idle-timeout-s", "1"],
    )
    .await?;
    assert_eq!(
        plane.invoke_app("fake", "echo", json!(1)).await?.status,
        "success"
    );
    let before = worker_pids(&steward).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = steward.metrics().await?;
        if support::metric(&m, "steward_desired_state_streams_total").unwrap_or(0.0) >= 3.0 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "stream was not reopened after silence:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        worker_pids(&steward).await?,
        before,
        "reopening the stream restarted a worker"
    );
    assert_eq!(
        plane.invoke_app("fake", "echo", json!(2)).await?.output,
        Some(json!(2))
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_hears_from_the_agent_within_seconds() -> Result<()> {
    let plane = Plane::start().await?;
    let grpc = plane.grpc.clone();
    // Default backoff settings: what a fleet runs with.
    let steward = AgentProc::steward(&grpc, plane.blob_dir.path(), &[])?;
    plane.wait_executors(1).await?;

    let blobs = plane.stop_keep_blobs().await;
    // The agent has noticed: a report failed, so it is backing off.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = steward.metrics().await?;
        if support::metric(&m, "steward_state_report_errors_total").is_some_and(|v| v >= 1.0) {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no failed report during the outage:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A server comes back on the same address: the agent registers again
    // at once (a functional bound, generous; the long backoff took 15 s).
    let plane = Plane::start_on(&grpc, blobs).await?;
    let back = std::time::Instant::now();
    loop {
        let executors = steward_devserver::client::executors(&plane.url).await?;
        if executors.as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        if back.elapsed() > Duration::from_secs(3) {
            let (_, events) = steward.get_json("/state/events").await?;
            anyhow::bail!("the agent did not report within 3 s of the server's return: {events}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, events) = steward.get_json("/state/events").await?;
    assert!(
        events.to_string().contains("server_connection_restored"),
        "{events}"
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_allocation_does_not_blame_its_siblings() -> Result<()> {
    let options = FunctionOptions {
        max_concurrency: 2,
        ..FunctionOptions::default()
    };
    let (plane, steward) = fake_setup(options, &[]).await?;
    let cancelled = plane.start_request("fake", "hang", json!("a")).await?;
    let sibling = plane.start_request("fake", "hang", json!("b")).await?;
    steward
        .wait_json("/state/allocations", Duration::from_secs(30), |_, v| {
            v.to_string().matches("\"phase\":\"running\"").count() == 2
        })
        .await?;
    assert_eq!(
        plane
            .delete(&format!("/v1/namespaces/default/requests/{cancelled}"))
            .await?,
        200
    );
    let out = plane.outcome(&cancelled).await?;
    assert_eq!(
        out.failure_reason.as_deref(),
        Some("ALLOCATION_CANCELLED"),
        "{out:?}"
    );
    // The sibling's worker was killed under it: not its function's fault.
    let out = plane.outcome(&sibling).await?;
    assert_eq!(
        out.failure_reason.as_deref(),
        Some("FUNCTION_EXECUTOR_TERMINATED"),
        "{out:?}"
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_never_uploaded_is_a_failure() -> Result<()> {
    let (plane, _steward) = fake_setup(FunctionOptions::default(), &[]).await?;
    let out = plane.invoke_app("fake", "no_upload", json!("x")).await?;
    assert_eq!(
        (out.status.as_str(), out.failure_reason.as_deref()),
        ("failure", Some("FUNCTION_ERROR")),
        "{out:?}"
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_output_request_fails_only_its_allocation() -> Result<()> {
    let (plane, steward) = fake_setup(FunctionOptions::default(), &[]).await?;
    let out = plane.invoke_app("fake", "huge_output", json!("x")).await?;
    assert_eq!(out.status, "failure", "{out:?}");
    let (_, events) = steward.get_json("/state/events").await?;
    assert!(
        events.to_string().contains("byte limit"),
        "the refusal names the limit: {events}"
    );
    // The agent (and with it every other worker) is still there.
    let ok = plane
        .invoke_app("fake", "echo", json!("still here"))
        .await?;
    assert_eq!(ok.output, Some(json!("still here")), "{ok:?}");
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_message_over_the_limit_fails_only_its_allocation() -> Result<()> {
    let (plane, steward) = fake_setup(
        FunctionOptions::default(),
        &["--max-worker-message-bytes", "1048576"],
    )
    .await?;
    let out = plane.invoke_app("fake", "huge_state", json!("x")).await?;
    assert_eq!(
        (out.status.as_str(), out.failure_reason.as_deref()),
        ("failure", Some("FUNCTION_ERROR")),
        "{out:?}"
    );
    let t = plane.wait_termination("huge_state").await?;
    assert_eq!(t["reason"], json!("UNHEALTHY"), "{t}");
    let (_, events) = steward.get_json("/state/events").await?;
    assert!(
        events.to_string().contains("too large"),
        "the failure names the size limit: {events}"
    );
    let ok = plane
        .invoke_app("fake", "echo", json!("still here"))
        .await?;
    assert_eq!(ok.output, Some(json!("still here")), "{ok:?}");
    plane.stop().await;
    Ok(())
}

/// Polls until the first hostile allocation has done what it can at the
/// agent: its result is in (whatever it carries) or its watches are.
async fn wait_hostile_in_place(steward: &AgentProc) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = steward.metrics().await?;
        let completed: f64 = text
            .lines()
            .filter(|l| l.starts_with("steward_allocations_completed_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let watches = support::metric(&text, "steward_function_call_watches").unwrap_or(0.0);
        if completed >= 1.0 || watches > 0.0 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the hostile allocation neither finished nor watched within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the `hostile` functions, then, once the first has finished or
/// registered its watches at the agent, a bystander on another worker of
/// the same host: the bystander's result reaches the server, each hostile
/// allocation fails alone with FUNCTION_ERROR and an event naming its
/// bound, and the host stays healthy and keeps working.
async fn hostile_fails_alone(
    extra: &[&str],
    hostile: &[(&str, serde_json::Value, &str)],
) -> Result<()> {
    let (plane, steward) = fake_setup(FunctionOptions::default(), extra).await?;
    let mut started = Vec::new();
    for (function, input, bound) in hostile {
        let id = plane.start_request("fake", function, input.clone()).await?;
        started.push((id, *bound));
    }
    wait_hostile_in_place(&steward).await?;
    let bystander = plane
        .start_request("fake", "echo", json!("bystander"))
        .await?;
    let b = plane.outcome(&bystander).await?;
    assert_eq!(
        (b.status.as_str(), b.output.clone()),
        ("success", Some(json!("bystander"))),
        "the bystander's result must reach the server: {b:?}"
    );
    for (id, bound) in started {
        let out = plane.outcome(&id).await?;
        assert_eq!(
            (out.status.as_str(), out.failure_reason.as_deref()),
            ("failure", Some("FUNCTION_ERROR")),
            "{out:?}"
        );
        let (_, events) = steward.get_json("/state/events").await?;
        assert!(
            events["events"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["kind"] == json!("allocation_failed")
                    && e["message"].as_str().is_some_and(|m| m.contains(bound))),
            "the failure names {bound}: {events}"
        );
    }
    let (code, health) = steward.get_json("/monitoring/health").await?;
    assert_eq!(code, 200, "{health}");
    let ok = plane.invoke_app("fake", "echo", json!("after")).await?;
    assert_eq!(ok.output, Some(json!("after")), "{ok:?}");
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_mib_content_type_fails_only_its_allocation() -> Result<()> {
    // Under the 1 GiB worker message limit, over the 256 MiB server one.
    hostile_fails_alone(
        &[],
        &[("huge_content_type", json!(300), "MAX_CONTENT_TYPE_BYTES")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_long_watch_ids_fail_only_their_allocation() -> Result<()> {
    // 20k watchers of 1 KiB ids: over the count cap (10k would be 10 MiB
    // of watches in every report, over this server's 8 MiB limit); 100 of
    // them: each id over the id bound. One host each: a breach stops the
    // hostile worker, which fails what waits on it.
    let limit = ["--max-server-message-bytes", "8388608"];
    hostile_fails_alone(
        &limit,
        &[("huge_watches", json!([20_000, 1024]), "MAX_WATCHERS")],
    )
    .await?;
    hostile_fails_alone(
        &limit,
        &[("huge_watches", json!([100, 1024]), "MAX_ID_BYTES")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_cannot_outgrow_the_server_message_limit() -> Result<()> {
    // 5,000 watches of 200-byte ids, each within every per-allocation
    // bound, together over a 1 MiB server limit: the host's watch budget
    // (a quarter of the limit) fails the allocation that would exceed it.
    hostile_fails_alone(
        &["--max-server-message-bytes", "1048576"],
        &[("huge_watches", json!([5_000, 200]), "watch budget")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_allocation_caps_fail_only_their_allocation() -> Result<()> {
    // Each asks for one more than its limit allows, all in one allocation
    // state.
    hostile_fails_alone(
        &[
            "--max-output-blobs-per-allocation",
            "3",
            "--max-request-state-writes-per-allocation",
            "3",
            "--max-request-state-ops-per-allocation",
            "5",
            "--max-function-calls-per-allocation",
            "100",
        ],
        &[
            // Three extra output blobs and its output.
            (
                "many_outputs",
                json!(3),
                "(--max-output-blobs-per-allocation)",
            ),
            (
                "many_writes",
                json!(4),
                "(--max-request-state-writes-per-allocation)",
            ),
            // Reads are counted too: six of them.
            (
                "many_reads",
                json!(6),
                "(--max-request-state-ops-per-allocation)",
            ),
            (
                "many_calls",
                json!([101, 0]),
                "(--max-function-calls-per-allocation)",
            ),
        ],
    )
    .await
}

#[test]
fn a_per_allocation_limit_of_zero_is_refused_at_start() -> Result<()> {
    // Zero would fail every allocation: clap refuses it before anything starts.
    for flag in [
        "--max-output-blobs-per-allocation",
        "--max-request-state-writes-per-allocation",
        "--max-request-state-ops-per-allocation",
        "--max-function-calls-per-allocation",
    ] {
        // A Steward that accepted the flag would run on: it is killed.
        let (status, err) = support::steward_refusal(&[flag, "0", "--no-cgroups"])?;
        assert_eq!(status.and_then(|s| s.code()), Some(2), "{flag}: {err}");
        assert!(err.contains(flag) && err.contains("not in 1.."), "{err}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_code_over_its_limit_fails_the_worker_start() -> Result<()> {
    // The fake application's zip is larger than 16 bytes: it is refused by
    // its size, not read into memory.
    let (plane, steward) = fake_setup(
        FunctionOptions::default(),
        &["--max-application-code-bytes", "16"],
    )
    .await?;
    let out = plane.invoke_app("fake", "echo", json!("x")).await?;
    assert_eq!(
        (out.status.as_str(), out.failure_reason.as_deref()),
        ("failure", Some("STARTUP_FAILED_INTERNAL_ERROR")),
        "{out:?}"
    );
    let (_, events) = steward.get_json("/state/events").await?;
    let text = events.to_string();
    assert!(
        text.contains("over the limit of 16 bytes")
            && text.contains("--max-application-code-bytes"),
        "the failure names the limit: {text}"
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_function_call_queue_is_bounded() -> Result<()> {
    // 70 calls of 1000 KiB each (every one within the plan limit) in one
    // allocation state: over the 64 MiB that may wait for the server.
    hostile_fails_alone(
        &[],
        &[("many_calls", json!([70, 1000]), "(MAX_QUEUED_CALL_BYTES)")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_call_into_another_namespace_fails_its_allocation() -> Result<()> {
    hostile_fails_alone(
        &[],
        &[(
            "foreign_call",
            json!("x"),
            "calls a function in namespace \"elsewhere\", not the allocation's own \"default\"",
        )],
    )
    .await
}
