//! Operator control: the admin API (absent without a token file, 401
//! without a token, 403 with a wrong one), pause/unpause (reported DRAINED,
//! no new allocation accepted, resumed on unpause) and drain (nothing lost:
//! the running allocation's result is reported, then workers stop, then the
//! host is disabled), through the real HTTP client and the `steward` CLI.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use steward_devserver::{FunctionOptions, client};
use support::{AgentProc, Plane};

const TOKEN: &str = "op-token-0123456789abcdef";

fn token_file(dir: &Path) -> Result<String> {
    let path = dir.join("admin-token");
    support::write_secret(&path, format!("{TOKEN}\n"))?;
    Ok(path.to_string_lossy().into_owned())
}

async fn setup(token: Option<&str>) -> Result<(Plane, AgentProc)> {
    let extra: Vec<&str> = token
        .map(|t| vec!["--admin-token-file", t])
        .unwrap_or_default();
    support::fake_setup(FunctionOptions::default(), &extra).await
}

async fn admin(steward: &AgentProc, action: &str, token: Option<&str>) -> Result<(u16, Value)> {
    let url = format!(
        "{}/admin/{action}",
        steward
            .monitoring_url
            .as_deref()
            .context("monitoring url")?
    );
    let mut req = reqwest::Client::new().post(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    let code = resp.status().as_u16();
    Ok((code, resp.json().await.unwrap_or(Value::Null)))
}

/// Runs the `steward` CLI against `steward`; returns its stdout.
fn cli(steward: &AgentProc, args: &[&str], token_file: &str) -> Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(args)
        .args([
            "--agent-url",
            steward.monitoring_url.as_deref().unwrap_or_default(),
        ])
        .args(["--admin-token-file", token_file])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "steward {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn executor_status(plane: &Plane) -> Result<String> {
    let v = client::executors(&plane.url).await?;
    Ok(v[0]["status"].as_str().unwrap_or_default().to_string())
}

async fn wait_executor_status(plane: &Plane, want: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while executor_status(plane).await? != want {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the server never saw {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_token_and_exist_only_with_one() -> Result<()> {
    let (plane, steward) = setup(None).await?;
    assert_eq!(
        admin(&steward, "pause", Some(TOKEN)).await?.0,
        404,
        "no token file: no route"
    );
    drop(steward);
    let dir = tempfile::tempdir()?;
    let file = token_file(dir.path())?;
    let steward = AgentProc::steward(
        &plane.grpc,
        plane.blob_dir.path(),
        &[
            "--admin-token-file",
            &file,
            "--function-executor-bin",
            support::fake_worker().to_str().unwrap_or_default(),
        ],
    )?;
    assert_eq!(admin(&steward, "pause", None).await?.0, 401);
    assert_eq!(
        admin(&steward, "pause", Some("op-token-0123456789abcdeX"))
            .await?
            .0,
        403
    );
    let (_, host) = steward.get_json("/state/host").await?;
    assert_eq!(host["mode"], "active", "refused calls change nothing");
    let (code, body) = admin(&steward, "pause", Some(TOKEN)).await?;
    assert_eq!(
        (code, &body["from"], &body["mode"]),
        (200, &json!("active"), &json!("paused"))
    );
    assert_eq!(admin(&steward, "explode", Some(TOKEN)).await?.0, 404);
    let (_, events) = steward.get_json("/state/events").await?;
    let admin_events: Vec<String> = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "admin_request")
        .filter_map(|e| e["message"].as_str().map(String::from))
        .collect();
    assert_eq!(
        admin_events,
        vec![
            "pause: refused with HTTP 401",
            "pause: refused with HTTP 403",
            "pause: ok, active → paused",
            "explode: unknown action (404)",
        ]
    );
    // Read-only routes stay open.
    assert_eq!(steward.get_json("/state/host").await?.0, 200);
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_host_is_drained_to_the_server_accepts_nothing_new_and_resumes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = token_file(dir.path())?;
    let (plane, steward) = setup(Some(&file)).await?;
    let out = plane.invoke_app("fake", "echo", json!("warm")).await?;
    assert_eq!(out.status, "success", "{out:?}");

    let said = cli(&steward, &["pause"], &file)?;
    assert!(said.contains("active → paused"), "{said}");
    wait_executor_status(&plane, "EXECUTOR_STATUS_DRAINED").await?;
    let metrics = steward.metrics().await?;
    assert_eq!(
        support::metric(&metrics, "steward_host_mode{mode=\"paused\"}"),
        Some(1.0)
    );

    // A server that places anyway (racing the pause) is refused by the agent.
    plane.set_faults(json!({"place_on_drained": true})).await?;
    let raced = plane.start_request("fake", "echo", json!("raced")).await?;
    let out = plane.outcome(&raced).await?;
    assert_eq!(
        out.failure_reason.as_deref(),
        Some("FUNCTION_EXECUTOR_TERMINATED"),
        "{out:?}"
    );
    let (_, events) = steward.get_json("/state/events").await?;
    assert!(
        events.to_string().contains("it accepts no new allocation"),
        "{events}"
    );
    plane.set_faults(json!({"place_on_drained": false})).await?;

    // The server places nothing here while DRAINED: the run waits.
    let waiting = plane.start_request("fake", "echo", json!("later")).await?;
    let stats = plane.stats().await?;
    assert_eq!(stats["runs_pending"], 1, "{stats}");

    let status = cli(&steward, &["status"], &file)?;
    assert!(status.contains("paused"), "{status}");
    let said = cli(&steward, &["unpause"], &file)?;
    assert!(said.contains("paused → active"), "{said}");
    wait_executor_status(&plane, "EXECUTOR_STATUS_RUNNING").await?;
    let out = plane.outcome(&waiting).await?;
    assert_eq!(
        out.status, "success",
        "the waiting run ran once resumed: {out:?}"
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_during_a_running_allocation_loses_nothing_then_disables() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = token_file(dir.path())?;
    let (plane, steward) = setup(Some(&file)).await?;
    let running = plane
        .start_request("fake", "sleep_1500", json!("x"))
        .await?;
    steward
        .wait_json("/state/allocations", Duration::from_secs(30), |_, v| {
            v["allocations"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["phase"] == "running")
        })
        .await?;
    let (code, body) = admin(&steward, "drain", Some(TOKEN)).await?;
    assert_eq!((code, &body["mode"]), (200, &json!("draining")));
    // The running allocation finishes and its result reaches the server.
    let out = plane.outcome(&running).await?;
    assert_eq!(out.status, "success", "{out:?}");
    // Then every worker stops and the host is disabled.
    let (_, host) = steward
        .wait_json("/state/host", Duration::from_secs(30), |_, v| {
            v["mode"] == "disabled"
        })
        .await?;
    assert_eq!(host["mode"], "disabled");
    let (_, fes) = steward.get_json("/state/function-executors").await?;
    let live: Vec<&Value> = fes["function_executors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["status"] != "TERMINATED")
        .collect();
    assert!(live.is_empty(), "workers left after the drain: {live:?}");
    let (_, events) = steward.get_json("/state/events").await?;
    let modes: Vec<&str> = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "host_mode")
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert_eq!(
        modes,
        vec![
            "active → draining (operator)",
            "draining → disabled (drain finished)"
        ]
    );
    assert_eq!(executor_status(&plane).await?, "EXECUTOR_STATUS_DRAINED");
    // Resumed, it runs work again.
    assert_eq!(admin(&steward, "unpause", Some(TOKEN)).await?.0, 200);
    wait_executor_status(&plane, "EXECUTOR_STATUS_RUNNING").await?;
    let out = plane.invoke_app("fake", "echo", json!("again")).await?;
    assert_eq!(out.status, "success", "{out:?}");
    plane.stop().await;
    Ok(())
}

async fn patch_config(steward: &AgentProc, change: Value) -> Result<(u16, Value)> {
    support::patch_config(steward, TOKEN, change).await
}

/// Waits until the server sees label `key` = `value` on the executor.
async fn wait_label(plane: &Plane, key: &str, value: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = client::executors(&plane.url).await?;
        if v[0]["labels"][key] == value {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the server never saw {key}={value}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_change_at_runtime_as_a_whole_and_reload_on_sighup() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = token_file(dir.path())?;
    let config = dir.path().join("steward.yaml");
    let write = |rack: &str| {
        std::fs::write(
            &config,
            format!(
                "use_tls: false\nsteward:\n  eviction_memory_available: 999\n  labels:\n    rack: {rack}\n    zone: file\n"
            ),
        )
    };
    write("r1")?;
    let plane = Plane::start().await?;
    // Precedence: flags > environment > file > defaults.
    let steward = AgentProc::steward_with_env(
        &plane.grpc,
        plane.blob_dir.path(),
        &[
            "--admin-token-file",
            &file,
            "--config-path",
            &config.to_string_lossy(),
            "-l",
            "zone=flag",
        ],
        &support::path_with_venv(),
        &[("STEWARD_EVICTION_MEMORY_AVAILABLE", "12345")],
    )?;
    plane.wait_executors(1).await?;
    wait_label(&plane, "rack", "r1").await?;
    wait_label(&plane, "zone", "flag").await?;

    // An invalid change changes nothing and names the field.
    let (code, body) = patch_config(
        &steward,
        json!({"labels": {"rack": "r9", "os": "x"}, "eviction_memory_available": 5}),
    )
    .await?;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("labels.os")),
        "{body}"
    );
    let (code, body) = patch_config(&steward, json!({"lables": {}})).await?;
    assert_eq!(code, 400);
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("lables")),
        "{body}"
    );
    let (code, body) = patch_config(&steward, json!({"log_level": "no such=level=x"})).await?;
    assert_eq!(code, 400, "{body}");
    let url = format!(
        "{}/admin/config",
        steward.monitoring_url.as_deref().unwrap_or_default()
    );
    let now: Value = reqwest::Client::new()
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        now["labels"],
        json!({"rack": "r1", "zone": "flag"}),
        "{now}"
    );
    assert_eq!(
        now["eviction_memory_available"], 12345,
        "the environment beats the file: {now}"
    );

    // A valid one applies and the server hears it at once.
    let (code, body) = patch_config(
        &steward,
        json!({"labels": {"rack": "r2"}, "log_level": "debug"}),
    )
    .await?;
    assert_eq!((code, &body["log_level"]), (200, &json!("debug")), "{body}");
    wait_label(&plane, "rack", "r2").await?;
    // The same through the CLI.
    let shown = cli(&steward, &["config", "set", "labels.rack=r2b"], &file)?;
    assert!(shown.contains("r2b"), "{shown}");
    wait_label(&plane, "rack", "r2b").await?;
    let shown = cli(&steward, &["config", "get"], &file)?;
    assert!(shown.contains("\"log_level\": \"debug\""), "{shown}");

    // The allowlist too: the next report carries it.
    let (code, body) = patch_config(
        &steward,
        json!({"allowed_functions": ["default:fake:echo"]}),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    steward
        .wait_json("/state/reported", Duration::from_secs(30), |_, v| {
            v.to_string().contains(r#""function_name":"echo""#)
        })
        .await?;

    // Reserved resources: what the server is told workers may hold shrinks
    // at once; reserving more than the host has is refused.
    let shown = cli(
        &steward,
        &["config", "set", "reserved.memory_bytes=1073741824"],
        &file,
    )?;
    assert!(shown.contains("1073741824"), "{shown}");
    let allocatable = (64u64 << 30) - (1 << 30);
    steward
        .wait_json("/state/reported", Duration::from_secs(30), |_, v| {
            v.to_string().contains(&allocatable.to_string())
        })
        .await?;
    let (code, body) = patch_config(&steward, json!({"reserved": {"cpus": 1000}})).await?;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("reserved.cpus")),
        "{body}"
    );

    // SIGHUP reloads the file with the same checks.
    write("r3")?;
    steward.signal(nix::sys::signal::Signal::SIGHUP);
    wait_label(&plane, "rack", "r3").await?;
    std::fs::write(&config, "steward:\n  labels:\n    \"bad key\": x\n")?;
    steward.signal(nix::sys::signal::Signal::SIGHUP);
    let (_, events) = steward
        .wait_json("/state/events", Duration::from_secs(30), |_, v| {
            v.to_string().contains("config_reload_failed")
        })
        .await?;
    assert!(events.to_string().contains("labels.bad key"), "{events}");
    let v = client::executors(&plane.url).await?;
    assert_eq!(v[0]["labels"]["rack"], "r3", "a bad file changes nothing");
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_admin_calls_are_counted_and_cannot_flush_the_event_ring() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = token_file(dir.path())?;
    let (plane, steward) = setup(Some(&file)).await?;
    let (_, before) = steward.get_json("/state/events").await?;
    let first = before["events"][0].clone();
    assert_eq!(first["kind"], "started", "{before}");

    // Strangers: more refused calls than the ring holds.
    let url = format!(
        "{}/admin/pause",
        steward.monitoring_url.as_deref().context("url")?
    );
    let http = reqwest::Client::new();
    for i in 0..1200 {
        let req = http.post(&url);
        let req = if i % 2 == 0 {
            req
        } else {
            req.bearer_auth("op-token-0123456789abcdeX")
        };
        let code = req.send().await?.status().as_u16();
        assert!(code == 401 || code == 403, "{code}");
    }
    let metrics = steward.metrics().await?;
    for status in ["401", "403"] {
        assert_eq!(
            support::metric(
                &metrics,
                &format!(
                    "steward_monitoring_auth_failures_total{{route=\"admin\",status=\"{status}\"}}"
                )
            ),
            Some(600.0),
            "{metrics}"
        );
    }
    let (_, events) = steward.get_json("/state/events").await?;
    assert_eq!(
        events["events"][0], first,
        "the oldest event is still there"
    );
    let refused = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("refused with HTTP"))
        })
        .count();
    assert!(
        (1..=10).contains(&refused),
        "{refused} refusals in {events}"
    );

    // An action name of the caller's choosing is shortened in its event.
    let long = "x".repeat(20_000);
    let (code, _) = admin(&steward, &long, Some(TOKEN)).await?;
    assert_eq!(code, 404);
    let (_, events) = steward.get_json("/state/events?offset=0").await?;
    let said = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["message"].as_str())
        .find(|m| m.starts_with("xxx"))
        .context("the unknown action's event")?
        .to_string();
    assert!(
        said.len() <= steward_reconciler::MAX_EVENT_MESSAGE + 32 && said.contains("more bytes]"),
        "{} bytes: {}",
        said.len(),
        &said[said.len().saturating_sub(64)..]
    );
    plane.stop().await;
    Ok(())
}
