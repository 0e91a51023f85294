//! The host's load over time (`/state/load`), from a running Steward with
//! the fake worker: each second's sample counts the allocations that
//! finished in it, and the host's CPU and memory; ranges other than hour,
//! day and month are refused by name.

mod support;

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::json;
use steward_devserver::FunctionOptions;

/// The total of field `name` over the points of a series.
fn total(series: &serde_json::Value, name: &str) -> f64 {
    let Some(i) = series["fields"]
        .as_array()
        .and_then(|f| f.iter().position(|f| f["name"] == name))
    else {
        return 0.0;
    };
    series["points"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["value"][i].as_f64())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_history_counts_what_ran_each_second() -> Result<()> {
    let (plane, steward) = support::fake_setup(FunctionOptions::default(), &[]).await?;
    for _ in 0..5 {
        let out = plane.invoke_app("fake", "noop", json!("x")).await?;
        ensure!(out.status == "success", "{out:?}");
    }
    let (_, series) = steward
        .wait_json(
            "/state/load?range=hour",
            Duration::from_secs(30),
            |code, v| code == 200 && total(v, "finished") >= 5.0,
        )
        .await?;
    ensure!(series["step_s"] == 1, "{series}");
    ensure!(
        total(&series, "finished") == 5.0,
        "every allocation counted once: {series}"
    );
    ensure!(total(&series, "failed") == 0.0);
    ensure!(total(&series, "host_memory") > 0.0, "host memory sampled");
    let (code, day) = steward.get_json("/state/load?range=day").await?;
    ensure!(code == 200 && day["step_s"] == 60, "{day}");
    let (code, bad) = steward.get_json("/state/load?range=week").await?;
    ensure!(code == 400, "{code} {bad}");
    ensure!(bad.to_string().contains("one of hour, day, month"), "{bad}");
    plane.stop().await;
    Ok(())
}
