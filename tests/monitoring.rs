//! The monitoring server of a running Steward, through a real HTTP client:
//! probe transitions across a control-plane outage, metrics parsed by the
//! Prometheus project's own OpenMetrics parser (from the venv), the metric
//! name snapshot, and the structure of every `/state` document.

mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use steward_devserver::FunctionOptions;
use support::{AgentProc, Plane};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_follow_registration_and_server_outages() -> Result<()> {
    // Reserve a port, then start Steward before any server listens on it.
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let blobs = tempfile::tempdir()?;
    let fast = [
        "--report-backoff-max-s",
        "1",
        "--health-report-grace-s",
        "1",
    ];
    let steward = AgentProc::steward(&grpc, blobs.path(), &fast)?;
    let (code, body) = steward.get_json("/monitoring/startup").await?;
    assert_eq!(
        (code, body["status"].clone()),
        (503, json!("nok")),
        "{body}"
    );
    steward
        .wait_json("/monitoring/health", Duration::from_secs(20), |c, b| {
            c == 503
                && b["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("no state report has succeeded"))
        })
        .await?;

    let plane = Plane::start_on(&grpc, blobs).await?;
    steward
        .wait_json("/monitoring/startup", Duration::from_secs(30), |c, _| {
            c == 200
        })
        .await?;
    let (code, health) = steward
        .wait_json("/monitoring/health", Duration::from_secs(30), |c, _| {
            c == 200
        })
        .await?;
    assert_eq!(health["status"], json!("ok"), "{health}");
    assert_eq!(health["checker"], json!("StewardHealthChecker"));

    // Outage: health turns 503 and says why; startup stays 200.
    let blobs = plane.stop_keep_blobs().await;
    steward
        .wait_json("/monitoring/health", Duration::from_secs(30), |c, _| {
            c == 503
        })
        .await?;
    let (code_startup, _) = steward.get_json("/monitoring/startup").await?;
    assert_eq!(code_startup, 200, "startup is a latch");
    assert_eq!(code, 200);

    // The server comes back on the same address: healthy again.
    let plane = Plane::start_on(&grpc, blobs).await?;
    steward
        .wait_json("/monitoring/health", Duration::from_secs(30), |c, _| {
            c == 200
        })
        .await?;
    assert_eq!(steward.get_json("/monitoring/startup").await?.0, 200);
    plane.stop().await;
    Ok(())
}

/// Names of the metric families, one per line, sorted.
fn snapshot_path() -> std::path::PathBuf {
    support::repo_root().join("tests/snapshots/metric_names.txt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_openmetrics_and_match_the_name_snapshot() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_hello(FunctionOptions::default()).await?;
    let steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), &[])?;
    plane.wait_executors(1).await?;
    assert_eq!(plane.invoke("greet", json!("m")).await?.status, "success");
    assert_eq!(plane.invoke("explode", json!("m")).await?.status, "failure");

    let url = format!(
        "{}/monitoring/metrics",
        steward.monitoring_url.clone().context("url")?
    );
    let resp = reqwest::get(&url).await?;
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert_eq!(
        ctype,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = resp.text().await?;

    // Parse with prometheus_client's OpenMetrics parser; print "name type" per family.
    let script = "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
                  fams = list(p(sys.stdin.read()))\nfor f in fams: print(f.name, f.type)\n";
    let mut child = std::process::Command::new(support::venv().join("bin/python"))
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, text.as_bytes())?;
    let out = child.wait_with_output()?;
    assert!(
        out.status.success(),
        "OpenMetrics parser rejected the output: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed = String::from_utf8(out.stdout)?;
    let mut names: Vec<&str> = parsed.lines().collect();
    names.sort();
    let names = names.join("\n") + "\n";

    // Values for what we just did.
    assert!(
        text.contains(
            "steward_allocations_completed_total{outcome=\"success\",failure_reason=\"none\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("steward_allocations_completed_total{outcome=\"failure\",failure_reason=\"function_error\"} 1"), "{text}");
    assert!(text.contains("steward_healthy 1"), "{text}");
    assert!(
        !text.contains(&plane.invoke("greet", json!("x")).await?.request_id),
        "ids never become labels"
    );

    let path = snapshot_path();
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &names)?;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        names,
        want,
        "metric families changed; if intended, rerun with UPDATE_SNAPSHOTS=1 and commit {}",
        path.display()
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_documents_have_their_structure_and_errors_are_json() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_hello(FunctionOptions::default()).await?;
    let steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), &[])?;
    plane.wait_executors(1).await?;
    assert_eq!(plane.invoke("greet", json!("s")).await?.status, "success");

    let (code, reported) = steward.get_json("/state/reported").await?;
    assert_eq!(code, 200);
    assert!(reported["at_unix_ms"].as_u64().is_some(), "{reported}");
    let state = &reported["report"]["executor_state"];
    assert!(
        state["executor_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{reported}"
    );
    assert_eq!(
        state["state_hash"].as_str().map(str::len),
        Some(64),
        "{reported}"
    );
    assert!(state["labels"]["os"].is_string(), "{reported}");
    assert_eq!(
        state["status"],
        json!("EXECUTOR_STATUS_RUNNING"),
        "enums are names: {reported}"
    );

    let (_, desired) = steward.get_json("/state/desired").await?;
    assert!(
        desired["desired_state"]["clock"].as_u64().is_some(),
        "{desired}"
    );
    assert_eq!(
        desired["desired_state"]["function_executors"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{desired}"
    );

    let (_, fes) = steward.get_json("/state/function-executors").await?;
    let fe = &fes["function_executors"][0];
    assert_eq!(fe["status"], json!("RUNNING"), "{fes}");
    assert!(
        fe["pid"].as_u64().is_some() && fe["timeline"].as_array().is_some_and(|t| t.len() >= 3),
        "{fes}"
    );

    let (_, allocs) = steward.get_json("/state/allocations").await?;
    let a = &allocs["allocations"][0];
    assert_eq!(a["phase"], json!("finished"), "{allocs}");
    assert!(
        a["timeline"].as_array().is_some_and(|t| t
            .iter()
            .any(|e| e["what"].as_str().is_some_and(|w| w.contains("success")))),
        "{allocs}"
    );

    let (_, events) = steward.get_json("/state/events").await?;
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"started") && kinds.contains(&"function_executor_running"),
        "{kinds:?}"
    );

    let (_, host) = steward.get_json("/state/host").await?;
    assert!(
        host["capacity"]["cpu_count"]
            .as_u64()
            .is_some_and(|c| c >= 1),
        "{host}"
    );

    let base = steward.monitoring_url.clone().context("url")?;
    let text = reqwest::get(format!("{base}/state/reported?format=text"))
        .await?
        .text()
        .await?;
    assert!(text.contains("ReportExecutorStateRequest"), "{text}");
    let (code, body) = steward.get_json("/state/nope").await?;
    assert_eq!(code, 404);
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("nope")),
        "{body}"
    );
    let (code, body) = steward.get_json("/nothing/here").await?;
    assert_eq!((code, body["error"].is_string()), (404, true));
    let resp = reqwest::Client::new()
        .post(format!("{base}/monitoring/health"))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 405);
    let body: serde_json::Value = resp.json().await?;
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("only GET")),
        "{body}"
    );
    let (code, _) = steward.get_json("/state/reported?format=xml").await?;
    assert_eq!(code, 400);
    plane.stop().await;
    Ok(())
}

#[test]
fn a_taken_monitoring_port_is_a_clear_startup_error() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port().to_string();
    let data = tempfile::tempdir()?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args([
            "--grpc-server-addr",
            "127.0.0.1:1",
            "--monitoring-server-host",
            "127.0.0.1",
        ])
        .args(["--monitoring-server-port", &port])
        .arg("--executor-cache-path")
        .arg(data.path())
        .env("PATH", support::path_with_venv())
        .env("RUST_BACKTRACE", "0")
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot listen on 127.0.0.1:{port} for the monitoring server"
        )),
        "{stderr}"
    );
    Ok(())
}

const READ_TOKEN: &str = "state-token-0123456789abcdef";

/// GET `path` with an optional bearer token: (status, JSON body or null).
async fn get_with(
    steward: &AgentProc,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, serde_json::Value)> {
    let url = format!("{}{path}", steward.monitoring_url.clone().context("url")?);
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    let code = resp.status().as_u16();
    Ok((code, resp.json().await.unwrap_or(serde_json::Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_token_guards_state_and_metrics_and_every_list_is_paged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("state-token");
    support::write_secret(&token, format!("{READ_TOKEN}\n"))?;
    let token = token.to_str().context("path")?;
    let (plane, steward) = support::fake_setup(
        FunctionOptions::default(),
        &[
            "--state-token-file",
            token,
            "--monitoring-header-read-timeout-s",
            "1",
        ],
    )
    .await?;
    for i in 0..3 {
        let out = plane.invoke_app("fake", "echo", json!(i)).await?;
        assert_eq!(out.status, "success", "{out:?}");
    }

    // Documents and metrics need the token; probes do not.
    for path in ["/state/events", "/state/host", "/monitoring/metrics"] {
        assert_eq!(get_with(&steward, path, None).await?.0, 401, "{path}");
        assert_eq!(
            get_with(&steward, path, Some("wrong-token-0123456789"))
                .await?
                .0,
            403,
            "{path}"
        );
    }
    assert_eq!(get_with(&steward, "/monitoring/health", None).await?.0, 200);
    assert_eq!(
        get_with(&steward, "/monitoring/startup", None).await?.0,
        200
    );
    let t = Some(READ_TOKEN);
    let text = {
        let url = format!(
            "{}/monitoring/metrics",
            steward.monitoring_url.clone().context("url")?
        );
        reqwest::Client::new()
            .get(url)
            .bearer_auth(READ_TOKEN)
            .send()
            .await?
            .text()
            .await?
    };
    assert_eq!(
        support::metric(
            &text,
            "steward_monitoring_auth_failures_total{route=\"state\",status=\"401\"}"
        ),
        Some(2.0),
        "{text}"
    );

    // Every list is paged: `limit` items, and where the next page starts.
    let (code, all) = get_with(&steward, "/state/allocations", t).await?;
    assert_eq!(code, 200, "{all}");
    let total = all["page"]["total"].as_u64().context("total")?;
    assert!(total >= 3, "{all}");
    let (_, first) = get_with(&steward, "/state/allocations?limit=2", t).await?;
    assert_eq!(first["allocations"].as_array().map(Vec::len), Some(2));
    assert_eq!(first["page"]["next_offset"], json!(2), "{first}");
    let (_, rest) = get_with(&steward, "/state/allocations?limit=2&offset=2", t).await?;
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["allocations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["id"].as_str().map(String::from))
            .collect()
    };
    let mut paged = ids(&first);
    paged.extend(ids(&rest));
    assert_eq!(paged[..3], ids(&all)[..3], "pages follow one order");
    for (path, key) in [
        ("/state/events", "events"),
        ("/state/function-executors", "function_executors"),
        ("/state/activity", "days"),
    ] {
        let (code, doc) = get_with(&steward, &format!("{path}?limit=1"), t).await?;
        assert_eq!(code, 200, "{path}: {doc}");
        assert_eq!(doc[key].as_array().map(Vec::len), Some(1), "{path}: {doc}");
        assert_eq!(doc["page"]["limit"], json!(1), "{path}: {doc}");
        let (code, _) = get_with(&steward, &format!("{path}?limit=0"), t).await?;
        assert_eq!(code, 400, "{path}");
    }
    let (_, desired) = get_with(&steward, "/state/desired?limit=1", t).await?;
    assert!(
        desired["pages"]["function_executors"]["total"].as_u64() >= Some(1),
        "{desired}"
    );
    let (_, usage) = get_with(&steward, "/state/usage?group_by=function&limit=1", t).await?;
    assert_eq!(usage["coverage"]["complete"], json!(true), "{usage}");
    assert_eq!(usage["groups_page"]["limit"], json!(1), "{usage}");

    // A client trickling its headers is cut off at the header timeout.
    let addr = steward
        .monitoring_url
        .clone()
        .context("url")?
        .trim_start_matches("http://")
        .to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await?;
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET /state/host HTTP/1.1\r\n").await?;
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut slow, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a slowloris connection stayed open");

    // `steward status` sends the read token when given it.
    let status = |with_token: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_steward"));
        cmd.args(["status", "--agent-url"])
            .arg(steward.monitoring_url.clone().unwrap_or_default());
        if with_token {
            cmd.args(["--state-token-file", token]);
        }
        cmd.output()
    };
    let out = status(true)?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.lines()
            .any(|l| l.starts_with("mode") && l.ends_with("active")),
        "{said}"
    );
    assert!(said.contains("finished"), "{said}");
    let out = status(false)?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--state-token-file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    plane.stop().await;
    Ok(())
}

#[test]
fn a_token_file_others_can_read_is_refused_at_start() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("token");
    std::fs::write(&token, READ_TOKEN)?;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644))?;
    for flag in ["--state-token-file", "--admin-token-file"] {
        // A Steward that accepted the file would run on: it is killed.
        let token = token.to_str().expect("a UTF-8 temp path");
        let (status, stderr) = support::steward_refusal(&[flag, token])?;
        assert!(
            status.is_some_and(|s| !s.success()),
            "{flag}: started with a token file others can read"
        );
        assert!(
            stderr.contains(flag) && stderr.contains("mode 644") && stderr.contains("chmod 600"),
            "{flag}: {stderr}"
        );
    }
    Ok(())
}
