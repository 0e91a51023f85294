//! A hostile worker: the fake worker's `fuzz` function publishes, for each
//! seed, a sequence of allocation states full of extreme and malformed
//! items and then a random result, answering nothing. For every seed the
//! agent must finish the allocation (some result, never a hang), stay up
//! and healthy, and leave a bystander allocation on another worker alone;
//! at the end nothing is left pending (no results, no watches).
//!
//! Seeds: `STEWARD_FUZZ_SEEDS` (default 40, a few seconds); `cargo xtask
//! fuzz` runs many more.

mod support;

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use steward_devserver::FunctionOptions;
use support::{AgentProc, Plane, metric};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_worker_affects_nothing_but_its_own_allocation() -> Result<()> {
    let seeds: u64 = std::env::var("STEWARD_FUZZ_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let plane = Plane::start().await?;
    plane
        .deploy_fake(FunctionOptions {
            allocation_timeout_ms: 20_000,
            ..FunctionOptions::default()
        })
        .await?;
    let bin = support::fake_worker();
    let args = [
        "--function-executor-bin",
        bin.to_str().unwrap_or_default(),
        "--max-function-call-wait-s",
        "5",
    ];
    let mut steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), &args)?;
    plane.wait_executors(1).await?;

    let mut outcomes = std::collections::BTreeMap::new();
    for seed in 0..seeds {
        // A bystander on another worker runs through each hostile allocation.
        let bystander = plane
            .start_request("fake", "sleep_200", json!(format!("b{seed}")))
            .await?;
        let out = plane.invoke_app("fake", "fuzz", json!(seed)).await?;
        assert_ne!(out.status, "pending", "seed {seed}: {out:?}");
        *outcomes
            .entry(format!(
                "{} {}",
                out.status,
                out.failure_reason.unwrap_or_default()
            ))
            .or_insert(0) += 1;
        let b = plane.outcome(&bystander).await?;
        assert_eq!(
            (b.status.as_str(), b.output),
            ("success", Some(json!(format!("b{seed}")))),
            "seed {seed} disturbed the bystander"
        );
        assert!(
            steward.child.try_wait()?.is_none(),
            "seed {seed} took the agent down"
        );
    }
    eprintln!("outcomes over {seeds} seeds: {outcomes:?}");

    let (code, health) = steward.get_json("/monitoring/health").await?;
    assert_eq!(code, 200, "{health}");
    steward
        .wait_json("/state/allocations", Duration::from_secs(30), |_, v| {
            v["pending_results"] == json!(0)
        })
        .await?;
    let text = steward.metrics().await?;
    assert_eq!(
        metric(&text, "steward_function_call_watches").unwrap_or(0.0),
        0.0,
        "{text}"
    );
    plane.stop().await;
    Ok(())
}
