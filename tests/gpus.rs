//! GPUs end to end. There is no GPU on the machines that run these tests,
//! so a fake `nvidia-smi` (a shell script printing captured-format CSV) sits
//! first on PATH; NVML cannot load here, so Steward falls back to it, as it
//! would on a host without the NVML library. Everything else is real: the
//! dev control plane, Steward, and the tensorlake `function-executor`
//! reading `CUDA_VISIBLE_DEVICES`.

mod support;

use anyhow::Result;
use serde_json::json;
use steward_devserver::FunctionOptions;
use support::{AgentProc, Plane};

const GPU0: &str = "GPU-0a0a0a0a-1111-2222-3333-444444444444";
const GPU1: &str = "GPU-1b1b1b1b-5555-6666-7777-888888888888";

/// Two Tesla T4s.
fn fake_nvidia_smi(dir: &std::path::Path) -> Result<()> {
    support::fake_nvidia_smi(
        dir,
        &[
            &format!("0, {GPU0}, Tesla T4, 15360, 3, 0"),
            &format!("1, {GPU1}, Tesla T4, 15360, 0, 7"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_get_distinct_gpus_and_a_third_is_refused() -> Result<()> {
    let bin = tempfile::tempdir()?;
    fake_nvidia_smi(bin.path())?;
    let path = format!("{}:{}", bin.path().display(), support::path_with_venv());
    let plane = Plane::start().await?;
    let one_gpu = FunctionOptions {
        gpus: 1,
        ..FunctionOptions::default()
    };
    for app in ["gpu-a", "gpu-b", "gpu-c"] {
        plane.deploy_hello_as(app, one_gpu.clone()).await?;
    }
    let steward = AgentProc::steward_with_path(&plane.grpc, plane.blob_dir.path(), &[], &path)?;
    let executors = plane.wait_executors(1).await?;
    assert_eq!(executors[0]["gpu_count"], json!(2), "{executors}");
    assert_eq!(
        executors[0]["gpu_model"],
        json!("GPU_MODEL_NVIDIA_TESLA_T4"),
        "{executors}"
    );

    let a = plane.invoke_app("gpu-a", "visible_gpus", json!("")).await?;
    let b = plane.invoke_app("gpu-b", "visible_gpus", json!("")).await?;
    assert_eq!(a.status, "success", "{a:?}");
    assert_eq!(b.status, "success", "{b:?}");
    let mut seen = vec![
        a.output.clone().unwrap_or_default(),
        b.output.clone().unwrap_or_default(),
    ];
    seen.sort_by_key(|v| v.to_string());
    assert_eq!(
        seen,
        vec![json!(GPU0), json!(GPU1)],
        "each worker gets its own GPU"
    );

    let c = plane.invoke_app("gpu-c", "visible_gpus", json!("")).await?;
    assert_eq!(c.status, "failure", "{c:?}");
    assert_eq!(
        c.failure_reason.as_deref(),
        Some("STARTUP_FAILED_INTERNAL_ERROR"),
        "{c:?}"
    );
    let (_, events) = steward.get_json("/state/events").await?;
    let text = events.to_string();
    assert!(
        text.contains("asks for 1 GPU(s); admitted workers hold 2 of 2 allocatable (0 free)"),
        "{text}"
    );

    let (_, host) = steward.get_json("/state/host").await?;
    assert_eq!(host["gpus_free"], json!(0), "{host}");
    assert_eq!(host["gpus"].as_array().map(Vec::len), Some(2), "{host}");
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_without_gpus_reports_none_and_says_so_once() -> Result<()> {
    let plane = Plane::start().await?;
    // Only the system directories on PATH: no nvidia-smi (and no worker is
    // needed, so no venv either).
    let path = "/usr/bin:/bin".to_string();
    let steward = AgentProc::steward_with_path(&plane.grpc, plane.blob_dir.path(), &[], &path)?;
    let executors = plane.wait_executors(1).await?;
    assert_eq!(
        executors[0]["gpu_count"],
        serde_json::Value::Null,
        "{executors}"
    );
    let (_, reported) = steward.get_json("/state/reported").await?;
    let resources = &reported["report"]["executor_state"]["total_resources"];
    assert!(resources["gpu"].is_null(), "{resources}");
    assert!(
        resources["cpu_count"].as_u64().unwrap_or(0) >= 1,
        "{resources}"
    );
    assert_eq!(
        steward.log().matches("no GPUs").count(),
        1,
        "{}",
        steward.log()
    );
    plane.stop().await;
    Ok(())
}
