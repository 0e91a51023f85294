//! Metering end to end: a function that burns a known amount of CPU and
//! one that holds a known amount of memory are metered within 10 % of what
//! they measured themselves, priced exactly by the card (from the config
//! file, then changed through the admin API); `/state/usage` totals equal
//! the CSV and JSONL exports; and SIGKILLing Steward again and again while
//! allocations finish never leaves a result the server saw without exactly
//! one intact ledger record; a ledger whose disk fills up keeps every
//! record in memory (health degraded, not down) and writes each once when
//! space comes back.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use steward_devserver::FunctionOptions;
use steward_metering::{RecordKind, UsageRecord, read_records};
use support::{AgentProc, fake_setup};

const TOKEN: &str = "metering-token-0123456789";

const CARD: &str = r#"currency = "USD"
scale = 6
per_task = 100
per_cpu_core_second = 20
per_mb_second = 1
per_wall_second = 3
"#;

/// The card applied by hand, in integers (half up), to check the agent's.
fn priced(r: &UsageRecord, per_task: u64, cpu: u64, mb: u64, wall: u64) -> i64 {
    let term = |rate: u64, q: u64, per: u64| (rate * q + per / 2) / per;
    let task = if r.ran { per_task } else { 0 };
    (task
        + term(cpu, r.cpu_core_us, 1_000_000)
        + term(mb, r.memory_mb_ms, 1_000)
        + term(wall, r.wall_ms(), 1_000)) as i64
}

/// A fake-worker output: JSON, possibly inside a string.
fn output(v: Option<Value>) -> Value {
    match v {
        Some(Value::String(s)) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        Some(v) => v,
        None => Value::Null,
    }
}

fn ledger(steward: &AgentProc) -> Result<Vec<UsageRecord>> {
    Ok(read_records(&steward.data_dir.path().join("usage"))?)
}

/// Waits until the ledger holds an allocation record of `function` beyond
/// the `seen` ones; returns it.
async fn record_of(steward: &AgentProc, function: &str, seen: usize) -> Result<UsageRecord> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mine: Vec<UsageRecord> = ledger(steward)?
            .into_iter()
            .filter(|r| r.kind == RecordKind::Allocation && r.function == function)
            .collect();
        if mine.len() > seen {
            return Ok(mine[seen].clone());
        }
        ensure!(Instant::now() < deadline, "no usage record for {function}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn within(what: &str, metered: f64, truth: f64, tolerance: f64) -> Result<()> {
    let error = (metered - truth).abs() / truth;
    ensure!(
        error <= tolerance,
        "{what}: metered {metered:.0}, truth {truth:.0} ({:.1} % off)",
        error * 100.0
    );
    eprintln!(
        "{what}: metered {metered:.0}, truth {truth:.0} ({:.1} % off)",
        error * 100.0
    );
    Ok(())
}

/// `steward usage export` of the agent's data directory.
fn export(steward: &AgentProc, format: &str) -> Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(["usage", "export", "--format", format])
        .arg("--executor-cache-path")
        .arg(steward.data_dir.path())
        .output()?;
    ensure!(out.status.success(), "export: {out:?}");
    Ok(String::from_utf8(out.stdout)?)
}

async fn patch_config(steward: &AgentProc, change: Value) -> Result<(u16, Value)> {
    support::patch_config(steward, TOKEN, change).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_metered_within_ten_percent_and_priced_by_the_card() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("steward.yaml");
    let indented: String = CARD.lines().map(|l| format!("    {l}\n")).collect();
    std::fs::write(&config, format!("steward:\n  price_card: |\n{indented}"))?;
    let token = dir.path().join("token");
    support::write_secret(&token, TOKEN)?;
    let one_cpu = FunctionOptions {
        cpu_ms_per_sec: 1000,
        memory_bytes: 1 << 30,
        ..FunctionOptions::default()
    };
    let (plane, steward) = fake_setup(
        one_cpu,
        &[
            "--config-path",
            config.to_str().context("path")?,
            "--admin-token-file",
            token.to_str().context("path")?,
            // Memory is sampled; allocation edges are read as they happen.
            "--usage-sample-interval-ms",
            "200",
        ],
    )
    .await?;

    // CPU: two threads spin for 2 s (under a one-CPU quota where cgroups
    // are enforced); the worker measures its own CPU time meanwhile.
    let out = plane.invoke_app("fake", "burn_2000", json!("x")).await?;
    ensure!(out.status == "success", "{out:?}");
    let burn = output(out.output);
    let r = record_of(&steward, "burn_2000", 0).await?;
    let cpu_ms = burn["cpu_ms"].as_f64().context("cpu_ms")?;
    within("CPU ms", r.cpu_core_us as f64 / 1e3, cpu_ms, 0.10)?;
    ensure!(r.ran && r.outcome == "success", "{r:?}");
    let wall = burn["wall_ms"].as_f64().context("wall_ms")?;
    ensure!(
        r.wall_ms() as f64 >= wall,
        "wall {} < {wall}: {r:?}",
        r.wall_ms()
    );
    ensure!(r.cost_minor == Some(priced(&r, 100, 20, 1, 3)), "{r:?}");

    // Memory: 256 MiB held 3 s.
    let out = plane.invoke_app("fake", "hold_256", json!("x")).await?;
    ensure!(out.status == "success", "{out:?}");
    let held = output(out.output);
    let r = record_of(&steward, "hold_256", 0).await?;
    let held_s = held["held_ms"].as_f64().context("held_ms")? / 1e3;
    let truth_mb_ms = 256.0 * 1.048_576 * held_s * 1e3;
    within("memory MB·ms", r.memory_mb_ms as f64, truth_mb_ms, 0.10)?;
    ensure!(r.peak_memory_bytes >= 256 << 20, "{r:?}");
    ensure!(r.cost_minor == Some(priced(&r, 100, 20, 1, 3)), "{r:?}");

    // A new card through the admin API prices what follows.
    let (code, body) = patch_config(
        &steward,
        json!({"price_card": {"currency": "EUR", "scale": 2, "per_task": 7}}),
    )
    .await?;
    ensure!(code == 200, "{code} {body}");
    ensure!(body["price_card"]["currency"] == "EUR", "{body}");
    let (code, body) = patch_config(
        &steward,
        json!({"price_card": {"currency": "eur", "scale": 2}}),
    )
    .await?;
    ensure!(
        code == 400 && body.to_string().contains("ISO 4217"),
        "{code} {body}"
    );
    let out = plane.invoke_app("fake", "echo", json!("x")).await?;
    ensure!(out.status == "success", "{out:?}");
    let r = record_of(&steward, "echo", 0).await?;
    ensure!(r.cost_minor == Some(7), "{r:?}");

    // /state/usage totals equal the exports', and groups add up.
    let (code, usage) = steward.get_json("/state/usage?group_by=function").await?;
    ensure!(code == 200, "{usage}");
    let totals = &usage["summary"]["totals"];
    let csv = export(&steward, "csv")?;
    let jsonl = export(&steward, "jsonl")?;
    let from_jsonl: Vec<UsageRecord> = jsonl
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let csv_rows: Vec<Vec<String>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    let header: Vec<&str> = csv.lines().next().context("header")?.split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).context("column");
    let (cpu_col, cost_col) = (col("cpu_core_us")?, col("cost_minor")?);
    let csv_cpu: u64 = csv_rows
        .iter()
        .map(|r| r[cpu_col].parse::<u64>().unwrap_or(0))
        .sum();
    let csv_cost: i64 = csv_rows
        .iter()
        .map(|r| r[cost_col].parse::<i64>().unwrap_or(0))
        .sum();
    let jsonl_cpu: u64 = from_jsonl.iter().map(|r| r.cpu_core_us).sum();
    let jsonl_cost: i64 = from_jsonl.iter().filter_map(|r| r.cost_minor).sum();
    ensure!(
        totals["records"] == json!(from_jsonl.len()),
        "{totals} vs {} records",
        from_jsonl.len()
    );
    ensure!(csv_rows.len() == from_jsonl.len(), "{csv}");
    ensure!(
        totals["cpu_core_us"] == json!(jsonl_cpu) && csv_cpu == jsonl_cpu,
        "{totals} {csv_cpu} {jsonl_cpu}"
    );
    ensure!(
        totals["cost_minor"] == json!(jsonl_cost) && csv_cost == jsonl_cost,
        "{totals} {csv_cost} {jsonl_cost}"
    );
    let groups = usage["summary"]["groups"].as_object().context("groups")?;
    ensure!(groups["default/fake/burn_2000"]["tasks"] == 1, "{usage}");
    let group_cpu: u64 = groups
        .values()
        .filter_map(|g| g["cpu_core_us"].as_u64())
        .sum();
    ensure!(group_cpu == jsonl_cpu, "{usage}");
    let (code, bad) = steward.get_json("/state/usage?group_by=colour").await?;
    ensure!(
        code == 400 && bad.to_string().contains("group_by"),
        "{code} {bad}"
    );

    // The activity chart and the metrics count the same tasks.
    let (_, activity) = steward.get_json("/state/activity").await?;
    let tasks: u64 = activity["days"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["tasks"].as_u64())
        .sum();
    ensure!(
        tasks == totals["tasks"].as_u64().unwrap_or(0) && tasks >= 3,
        "{activity}"
    );
    let metrics = steward.metrics().await?;
    let series = r#"steward_usage_tasks_total{namespace="default",application="fake"}"#;
    ensure!(
        support::metric(&metrics, series) == Some(tasks as f64),
        "{metrics}"
    );
    plane.stop().await;
    Ok(())
}

/// Removes a test Steward's parent cgroup on drop.
struct CgroupParentGuard(String);

impl Drop for CgroupParentGuard {
    fn drop(&mut self) {
        support::remove_cgroup_parent(&self.0);
    }
}

/// The allocation ids whose results the server took.
async fn server_finished(plane: &support::Plane) -> Result<Vec<String>> {
    let log = plane.log().await?;
    Ok(log["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["allocation_id"].as_str().map(String::from))
        .collect())
}

fn ledger_ids(dir: &Path) -> Result<HashMap<String, usize>> {
    let mut ids = HashMap::new();
    for r in read_records(&dir.join("usage"))? {
        if r.kind == RecordKind::Allocation {
            *ids.entry(r.id).or_default() += 1;
        }
    }
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_allocations_finish_never_loses_or_doubles_a_record() -> Result<()> {
    let many = FunctionOptions {
        max_concurrency: 4,
        ..FunctionOptions::default()
    };
    // A slow disk (each batch waits 100 ms before it is written) widens
    // the window in which a kill strikes between a record and its result.
    let slow = ["--usage-commit-delay-ms", "100"];
    let (plane, mut steward) = fake_setup(many, &slow).await?;
    let bin = support::fake_worker();
    let args = [
        "--function-executor-bin",
        bin.to_str().context("path")?,
        slow[0],
        slow[1],
    ];
    for round in 0..4 {
        let before = server_finished(&plane).await?.len();
        // A steady stream of short allocations, some finishing at any moment.
        for i in 0..12 {
            plane
                .start_request("fake", "sleep_20", json!(format!("r{round}-{i}")))
                .await?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while server_finished(&plane).await?.len() < before + 3 {
            ensure!(Instant::now() < deadline, "round {round}: nothing finished");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let data_dir = steward.into_data_dir()?;
        // The killed agent's cgroups are the next one's to reap; should this
        // test fail before it starts, the guard removes them.
        let cgroups = CgroupParentGuard(support::cgroup_parent_for(data_dir.path()));
        // Every result the server took has exactly one intact record.
        let ids = ledger_ids(data_dir.path())?;
        for id in server_finished(&plane).await? {
            ensure!(
                ids.get(&id) == Some(&1),
                "round {round}: allocation {id} the server saw finished has {:?} records",
                ids.get(&id)
            );
        }
        steward = AgentProc::steward_full(
            &plane.grpc,
            plane.blob_dir.path(),
            &args,
            &support::path_with_venv(),
            &[],
            data_dir,
        )?;
        // The restarted agent owns its parent cgroup again.
        std::mem::forget(cgroups);
        // The restarted agent recovered the ledger without counting twice.
        let (_, usage) = steward
            .wait_json("/state/usage", Duration::from_secs(30), |c, _| c == 200)
            .await?;
        let recovered = usage["ledger"]["recovered_records"].as_u64().unwrap_or(0);
        let on_disk = read_records(&steward.data_dir.path().join("usage"))?.len() as u64;
        ensure!(recovered == on_disk, "round {round}: {usage}");
    }
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_time_is_metered_by_model_with_its_utilisation() -> Result<()> {
    let bin = tempfile::tempdir()?;
    // One Tesla T4, 50 % busy.
    support::fake_nvidia_smi(
        bin.path(),
        &["0, GPU-5a1b0c2d-0000-4000-8000-000000000001, Tesla T4, 15360, 1024, 50"],
    )?;
    let path = format!("{}:{}", bin.path().display(), support::path_with_venv());
    let plane = support::Plane::start().await?;
    let one_gpu = FunctionOptions {
        gpus: 1,
        ..FunctionOptions::default()
    };
    plane.deploy_fake(one_gpu).await?;
    let worker = support::fake_worker();
    let steward = AgentProc::steward_with_path(
        &plane.grpc,
        plane.blob_dir.path(),
        &[
            "--function-executor-bin",
            worker.to_str().context("path")?,
            "--usage-sample-interval-s",
            "1",
        ],
        &path,
    )?;
    plane.wait_executors(1).await?;
    let out = plane.invoke_app("fake", "sleep_1500", json!("x")).await?;
    ensure!(out.status == "success", "{out:?}");
    let r = record_of(&steward, "sleep_1500", 0).await?;
    let model = "GPU_MODEL_NVIDIA_TESLA_T4";
    let gpu = r.gpu_ms.iter().find(|(m, _)| m == model).map(|(_, ms)| *ms);
    let busy = r
        .gpu_busy_ms
        .iter()
        .find(|(m, _)| m == model)
        .map(|(_, ms)| *ms);
    let (Some(gpu), Some(busy)) = (gpu, busy) else {
        anyhow::bail!("no GPU time by model: {r:?}");
    };
    // One GPU allocated for the allocation's wall time, half of it busy.
    within("GPU ms", gpu as f64, r.wall_ms() as f64, 0.02)?;
    ensure!(gpu >= 1_500, "{r:?}");
    ensure!(busy.abs_diff(gpu / 2) <= 5, "busy {busy} of {gpu}: {r:?}");
    plane.stop().await;
    Ok(())
}

/// A small tmpfs for a usage ledger that fills up, mounted on a temporary
/// directory of its own (the tests run as root) and unmounted on drop, also
/// when the test fails.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(bytes: u64) -> Result<SmallDisk> {
        let dir = tempfile::tempdir()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()?;
        ensure!(status.success(), "mounting a tmpfs (as root): {status}");
        Ok(SmallDisk(dir))
    }

    fn filler(&self) -> std::path::PathBuf {
        self.0.path().join("filler")
    }

    /// Takes what space is left.
    fn fill(&self) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(self.filler())?;
        while f.write_all(&[7u8; 4096]).is_ok() {}
        while f.write_all(&[7u8]).is_ok() {}
        Ok(())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let path = self.0.path();
        if !Command::new("umount")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success())
        {
            // An agent still holds its files: detached now, gone once it exits.
            let _ = Command::new("umount").arg("-l").arg(path).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_ledger_disk_loses_no_record_and_each_arrives_once_when_space_returns() -> Result<()>
{
    let disk = SmallDisk::mount(4 << 20)?;
    let data_dir = tempfile::tempdir()?;
    std::os::unix::fs::symlink(disk.0.path(), data_dir.path().join("usage"))?;
    let plane = support::Plane::start().await?;
    plane.deploy_fake(FunctionOptions::default()).await?;
    let bin = support::fake_worker();
    let steward = AgentProc::steward_full(
        &plane.grpc,
        plane.blob_dir.path(),
        &[
            "--function-executor-bin",
            bin.to_str().context("path")?,
            "--usage-stall-limit-ms",
            "500",
        ],
        &support::path_with_venv(),
        &[],
        data_dir,
    )?;
    plane.wait_executors(1).await?;
    disk.fill()?;

    // Results keep flowing while the disk is full (after the stall limit).
    for i in 0..6 {
        let out = plane.invoke_app("fake", "echo", json!(i)).await?;
        ensure!(out.status == "success", "{out:?}");
    }
    let finished = server_finished(&plane).await?;
    ensure!(finished.len() == 6, "{finished:?}");
    ensure!(
        ledger_ids(steward.data_dir.path())?.is_empty(),
        "nothing written yet"
    );
    // Health stays 200, degraded, saying how many records wait; so do the
    // gauge and the event.
    let (_, health) = steward
        .wait_json("/monitoring/health", Duration::from_secs(30), |c, h| {
            c == 200
                && h["degraded"][0]
                    .as_str()
                    .is_some_and(|d| d.contains("usage ledger: 6 records wait"))
        })
        .await?;
    ensure!(health["status"] == "ok", "{health}");
    let metrics = steward.metrics().await?;
    ensure!(
        support::metric(&metrics, "steward_usage_ledger_unwritten_records") == Some(6.0),
        "{metrics}"
    );
    let (_, events) = steward.get_json("/state/events").await?;
    let said = |kind: &str| {
        events["events"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["kind"] == kind)
            .and_then(|e| e["message"].as_str().map(String::from))
    };
    let failed = said("usage_ledger_write_failed").context("no write-failed event")?;
    ensure!(
        failed.contains("No space left") && failed.contains("usage records wait"),
        "{failed}"
    );

    // Space comes back: every record arrives, exactly once.
    std::fs::remove_file(disk.filler())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ids = ledger_ids(steward.data_dir.path())?;
        if finished.iter().all(|id| ids.contains_key(id)) {
            ensure!(
                ids.len() == 6 && ids.values().all(|n| *n == 1),
                "each record once: {ids:?}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "records never arrived: {ids:?} of {finished:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, health) = steward
        .wait_json("/monitoring/health", Duration::from_secs(30), |c, h| {
            c == 200 && h.get("degraded").is_none()
        })
        .await?;
    ensure!(health["status"] == "ok", "{health}");
    let metrics = steward.metrics().await?;
    ensure!(
        support::metric(&metrics, "steward_usage_ledger_unwritten_records") == Some(0.0)
            && support::metric(&metrics, "steward_usage_ledger_dropped_records_total") == Some(0.0),
        "{metrics}"
    );
    let (_, events) = steward.get_json("/state/events").await?;
    ensure!(
        events.to_string().contains("usage_ledger_write_resumed"),
        "{events}"
    );
    plane.stop().await;
    Ok(())
}
