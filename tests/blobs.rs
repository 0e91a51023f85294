//! Blobs end to end: the dev control plane keeps code, inputs and outputs in
//! a real S3 server (in-process s3s + s3s-fs, signatures checked), and a
//! real tensorlake function reads a multi-chunk input and writes a
//! multi-chunk output through presigned URLs; and the application code
//! cache serves a second worker and a restarted Steward without a download.

mod support;

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use steward_devserver::FunctionOptions;
use steward_test_s3server as s3;
use support::{AgentProc, Plane};

const CHUNK: usize = 5 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_moves_multi_chunk_payloads_through_presigned_s3_urls() -> Result<()> {
    let s3_root = tempfile::tempdir()?;
    let server = s3::start(s3_root.path(), &["steward"]).await?;
    let endpoint = server.endpoint();
    let plane = Plane::start_s3(
        "s3://steward/dev",
        steward_blob_store::S3Config {
            endpoint: Some(endpoint.clone()),
            region: Some(s3::REGION.into()),
            access_key_id: Some(s3::ACCESS_KEY.into()),
            secret_access_key: Some(s3::SECRET_KEY.into()),
            allow_http: true,
            ..Default::default()
        },
    )
    .await?;
    plane.deploy_hello(FunctionOptions::default()).await?;
    let chunk = CHUNK.to_string();
    let args = [
        "--s3-endpoint",
        &endpoint,
        "--s3-allow-http",
        "--blob-chunk-bytes",
        &chunk,
    ];
    let envs = [
        ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY),
        ("AWS_REGION", s3::REGION),
    ];
    let steward = AgentProc::steward_with_env(
        &plane.grpc,
        plane.blob_dir.path(),
        &args,
        &support::path_with_venv(),
        &envs,
    )?;
    plane.wait_executors(1).await?;

    // 6 MiB in (two read chunks), 12 MiB out (three write parts).
    let text: String = (0..CHUNK + (1 << 20))
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let out = plane.invoke("echo_twice", json!(text)).await?;
    assert_eq!(out.status, "success", "{:?}", out.failure_reason);
    let got = out
        .output
        .as_ref()
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    assert_eq!(got.len(), text.len() * 2);
    assert!(got == format!("{text}{text}"), "output is not byte-exact");

    // The output object is in S3, and no multipart upload is left open.
    let (_, allocs) = steward.get_json("/state/allocations").await?;
    assert_eq!(allocs["pending_results"], json!(0), "{allocs}");
    let files = walk(s3_root.path());
    assert!(
        files
            .iter()
            .any(|f| f.starts_with("steward/dev/requests/") && f.ends_with(".output")),
        "{files:?}"
    );
    let open_uploads: Vec<_> = files
        .iter()
        .filter(|f| f.to_ascii_lowercase().contains("upload"))
        .collect();
    assert!(
        open_uploads.is_empty(),
        "multipart uploads left open: {open_uploads:?}"
    );
    plane.stop().await;
    Ok(())
}

/// Every file under `root`, relative to it.
fn walk(root: &std::path::Path) -> Vec<String> {
    fn go(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                go(root, &p, out);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    go(root, root, &mut out);
    out
}

fn fetches(metrics: &str, source: &str) -> u64 {
    let series = format!("steward_application_code_fetches_total{{source=\"{source}\"}}");
    support::metric(metrics, &series).unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_cache_serves_a_second_worker_and_survives_a_restart() -> Result<()> {
    let plane = Plane::start().await?;
    // The same code under two names: two workers, one download.
    plane
        .deploy_hello_as("first", FunctionOptions::default())
        .await?;
    plane
        .deploy_hello_as("second", FunctionOptions::default())
        .await?;
    let steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), &[])?;
    plane.wait_executors(1).await?;
    assert_eq!(
        plane.invoke_app("first", "greet", json!("a")).await?.status,
        "success"
    );
    assert_eq!(
        plane
            .invoke_app("second", "greet", json!("b"))
            .await?
            .status,
        "success"
    );
    let m = steward.metrics().await?;
    let code_lines: Vec<&str> = m
        .lines()
        .filter(|l| l.contains("application_code_fetches"))
        .collect();
    assert_eq!(
        (fetches(&m, "blob_store"), fetches(&m, "cache")),
        (1, 1),
        "{code_lines:?}"
    );

    // Restart on the same data directory: no download at all.
    let data_dir = steward.into_data_dir()?;
    plane
        .deploy_hello_as("third", FunctionOptions::default())
        .await?;
    let steward = AgentProc::steward_full(
        &plane.grpc,
        plane.blob_dir.path(),
        &[],
        &support::path_with_venv(),
        &[],
        data_dir,
    )?;
    // Registered again: a report from the restarted agent succeeded.
    steward
        .wait_json("/monitoring/startup", Duration::from_secs(30), |c, _| {
            c == 200
        })
        .await?;
    assert_eq!(
        plane.invoke_app("third", "greet", json!("c")).await?.status,
        "success"
    );
    // Wait until all three workers have their code, from wherever.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let m = loop {
        let m = steward.metrics().await?;
        if fetches(&m, "blob_store") + fetches(&m, "cache") >= 3 {
            break m;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "three workers never got their code:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let code_lines: Vec<&str> = m
        .lines()
        .filter(|l| l.contains("application_code_fetches"))
        .collect();
    // Same executor id (kept in the data dir), so the server also sends the
    // two earlier workers back: all three start from the cache.
    assert_eq!(
        (fetches(&m, "blob_store"), fetches(&m, "cache")),
        (0, 3),
        "{code_lines:?}"
    );
    plane.stop().await;
    Ok(())
}
