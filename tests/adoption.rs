//! Adoption of live workers across a restart of Steward, with the real
//! worker and the dev control plane: a function is running when Steward is
//! SIGKILLed (or stopped with SIGTERM, or replaced by a binary at another
//! path); the next Steward on the same data directory adopts the worker
//! (same pid), follows the allocation to its end, and the plane gets its
//! result once and never hears the worker terminated; its usage is metered
//! once. A worker that died while no Steward ran is reported terminated,
//! with its allocation failed. The windows between a change on the
//! adoption record and the worker hearing of it (a nested call created, an
//! output upload opened) are hit by the agent killing itself there
//! (`--test-kill-at`): nothing is asked of the server or the blob store a
//! second time. (Adoption off keeps the worker dying with
//! Steward: `end_to_end::sigkill_of_steward_leaves_no_worker_behind`,
//! whose agents run with `STEWARD_ADOPT_WORKERS=false`.)

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use steward_devserver::FunctionOptions;
use support::{AgentProc, Plane, alive, metric, path_with_venv, worker_pids};

const ADOPT: &[&str] = &["--adopt-workers=true"];

/// A directory the workers (other uids) can use, for the file that
/// releases `wait_for_file` (which removes it).
fn gate() -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    let release = dir.path().join("release");
    Ok((dir, release))
}

fn release(path: &Path) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, "released")?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn executor_id(steward: &AgentProc) -> Result<String> {
    Ok(
        std::fs::read_to_string(steward.data_dir.path().join("executor_id"))?
            .trim()
            .to_string(),
    )
}

/// Starts `wait_for_file` and waits until the worker runs it (its mark:
/// Steward's phase "running" comes before the worker has the allocation);
/// its request id and the worker's pid.
async fn start_long(plane: &Plane, steward: &AgentProc, gate: &Path) -> Result<(String, u32)> {
    start_long_in(plane, steward, "hello", gate).await
}

async fn start_long_in(
    plane: &Plane,
    steward: &AgentProc,
    app: &str,
    gate: &Path,
) -> Result<(String, u32)> {
    let rid = plane
        .start_request(app, "wait_for_file", json!(gate))
        .await?;
    steward
        .wait_json("/state/allocations", Duration::from_secs(120), |_, v| {
            v["allocations"][0]["phase"] == "running"
        })
        .await?;
    let started = PathBuf::from(format!("{}.started", gate.display()));
    until_exists(&started, Duration::from_secs(60)).await?;
    let pids = worker_pids(&executor_id(steward)?);
    ensure!(pids.len() == 1, "one worker expected, found {pids:?}");
    Ok((rid, pids[0]))
}

/// Polls until `path` exists.
async fn until_exists(path: &Path, limit: Duration) -> Result<()> {
    let end = std::time::Instant::now() + limit;
    while !path.exists() {
        ensure!(
            std::time::Instant::now() < end,
            "{} did not appear in {limit:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A plane with `examples/hello`, an adopting Steward, and `wait_for_file`
/// running on its worker until `gate` is released.
struct Long {
    plane: Plane,
    steward: AgentProc,
    gate: PathBuf,
    _gate_dir: tempfile::TempDir,
    rid: String,
    pid: u32,
}

impl Long {
    async fn start() -> Result<Long> {
        let plane = Plane::start().await?;
        plane.deploy_hello(FunctionOptions::default()).await?;
        let (gate_dir, gate) = gate()?;
        let steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), ADOPT)?;
        plane.wait_executors(1).await?;
        let (rid, pid) = start_long(&plane, &steward, &gate).await?;
        Ok(Long {
            plane,
            steward,
            gate,
            _gate_dir: gate_dir,
            rid,
            pid,
        })
    }
}

/// Waits until the agent has an event of `kind`; its message.
async fn event(steward: &AgentProc, kind: &str) -> Result<String> {
    let (_, v) = steward
        .wait_json("/state/events", Duration::from_secs(60), |_, v| {
            v["events"]
                .as_array()
                .is_some_and(|es| es.iter().any(|e| e["kind"] == kind))
        })
        .await?;
    let e = v["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["kind"] == kind)
        .context("event")?;
    Ok(e["message"].as_str().unwrap_or_default().to_string())
}

/// How many results the plane got (each test's plane runs one request of
/// one allocation), and whether it heard a worker of `function` terminated.
async fn plane_saw(plane: &Plane, function: &str) -> Result<(usize, bool)> {
    let log = plane.log().await?;
    let results = log["results"].as_array().map_or(0, Vec::len);
    let terminated = log["terminations"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["function"] == function);
    Ok((results, terminated))
}

/// The usage records of allocations of `function` (`steward usage export`).
fn usage_records(data_dir: &Path, function: &str) -> Result<Vec<serde_json::Value>> {
    Ok(support::usage_export(data_dir)?
        .into_iter()
        .filter(|r| r["function"] == function && r["kind"] == "allocation")
        .collect())
}

/// The next Steward on `data`, adopting.
fn restart(plane: &Plane, data: tempfile::TempDir, bin: Option<&Path>) -> Result<AgentProc> {
    restart_with(plane, data, bin, &path_with_venv())
}

fn restart_with(
    plane: &Plane,
    data: tempfile::TempDir,
    bin: Option<&Path>,
    path: &str,
) -> Result<AgentProc> {
    let bin = bin.unwrap_or(Path::new(env!("CARGO_BIN_EXE_steward")));
    AgentProc::steward_bin(
        bin,
        &plane.grpc,
        plane.blob_dir.path(),
        ADOPT,
        path,
        &[],
        data,
    )
}

/// After the restart: the same worker (pid) runs the allocation on, which
/// finishes once released; the plane gets one result and no termination.
async fn finishes_on_the_adopted_worker(
    plane: &Plane,
    steward: &AgentProc,
    rid: &str,
    pid: u32,
    gate: &Path,
) -> Result<()> {
    let adopted = event(steward, "function_executor_adopted").await?;
    ensure!(adopted.contains(&format!("pid {pid}")), "{adopted}");
    ensure!(
        adopted.contains("1 running allocation(s) followed"),
        "{adopted}"
    );
    ensure!(
        worker_pids(&executor_id(steward)?) == [pid],
        "the same worker runs on"
    );
    release(gate)?;
    let out = plane.outcome(rid).await?;
    ensure!(out.status == "success", "{out:?}");
    ensure!(out.output == Some(json!("released")), "{out:?}");
    let (results, terminated) = plane_saw(plane, "wait_for_file").await?;
    ensure!(results == 1, "the plane got {results} results for it");
    ensure!(!terminated, "the plane heard the adopted worker terminated");
    ensure!(alive(pid), "the worker stays for the next allocation");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_outlives_a_sigkilled_steward_and_is_adopted_with_its_allocation() -> Result<()> {
    let Long {
        plane,
        steward,
        gate,
        _gate_dir,
        rid,
        pid,
    } = Long::start().await?;

    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let data = steward.into_data_dir()?; // SIGKILL
    ensure!(alive(pid), "the worker outlived the SIGKILLed agent");
    let steward = restart(&plane, data, None)?;
    finishes_on_the_adopted_worker(&plane, &steward, &rid, pid, &gate).await?;
    // Metered once, from its start before the restart.
    let records = usage_records(steward.data_dir.path(), "wait_for_file")?;
    ensure!(records.len() == 1, "usage records: {records:?}");
    let started = records[0]["started_unix_ms"].as_u64().unwrap_or(u64::MAX);
    ensure!(started < killed_at, "metered from its start: {records:?}");
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_made_while_no_steward_ran_is_collected_and_sent_once() -> Result<()> {
    let Long {
        plane,
        steward,
        gate,
        _gate_dir,
        rid,
        pid,
    } = Long::start().await?;
    let data = steward.into_data_dir()?; // SIGKILL
    release(&gate)?;
    // The function removes the file on its way out: it has finished (or
    // is about to) while no agent runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while gate.exists() {
        if std::time::Instant::now() > deadline {
            bail!("the function never took its release");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let steward = restart(&plane, data, None)?;
    let adopted = event(&steward, "function_executor_adopted").await?;
    ensure!(adopted.contains(&format!("pid {pid}")), "{adopted}");
    let out = plane.outcome(&rid).await?;
    ensure!(out.status == "success", "{out:?}");
    ensure!(out.output == Some(json!("released")), "{out:?}");
    let (results, terminated) = plane_saw(&plane, "wait_for_file").await?;
    ensure!(
        results == 1 && !terminated,
        "{results} results, terminated: {terminated}"
    );
    let records = usage_records(steward.data_dir.path(), "wait_for_file")?;
    ensure!(records.len() == 1, "usage records: {records:?}");
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_adoption_mode_leaves_the_worker_for_an_upgraded_binary() -> Result<()> {
    let Long {
        plane,
        mut steward,
        gate,
        _gate_dir,
        rid,
        pid,
    } = Long::start().await?;

    steward.signal(nix::sys::signal::Signal::SIGTERM);
    let status = steward
        .wait_exit(Duration::from_secs(30))
        .context("steward exits on SIGTERM")?;
    ensure!(status.success(), "{status:?}");
    let log = steward.log();
    let last = log.lines().last().unwrap_or_default();
    ensure!(
        last.contains("workers were left running"),
        "last log line: {last}"
    );
    ensure!(alive(pid), "the worker outlived the stopped agent");
    // The plane was not told STOPPED: it keeps the worker and allocation.
    let (results, terminated) = plane_saw(&plane, "wait_for_file").await?;
    ensure!(
        results == 0 && !terminated,
        "{results} results, terminated: {terminated}"
    );

    // An upgrade: another binary, at another path, on the same data.
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let upgraded = dir.path().join("steward-upgraded");
    std::fs::copy(env!("CARGO_BIN_EXE_steward"), &upgraded)?;
    let data = steward.into_data_dir()?;
    let steward = restart(&plane, data, Some(&upgraded))?;
    finishes_on_the_adopted_worker(&plane, &steward, &rid, pid, &gate).await?;
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_died_while_no_steward_ran_is_reported_terminated() -> Result<()> {
    let Long {
        plane,
        steward,
        gate: _,
        _gate_dir,
        rid,
        pid,
    } = Long::start().await?;
    let data = steward.into_data_dir()?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        if std::time::Instant::now() > deadline {
            bail!("worker {pid} did not die");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let steward = restart(&plane, data, None)?;
    let lost = event(&steward, "function_executor_lost").await?;
    ensure!(lost.contains("gone"), "{lost}");
    let t = plane.wait_termination("wait_for_file").await?;
    ensure!(t.to_string().contains("UNHEALTHY"), "{t}");
    let out = plane.outcome(&rid).await?;
    ensure!(out.status != "success", "{out:?}");
    let (results, _) = plane_saw(&plane, "wait_for_file").await?;
    ensure!(results == 1, "the plane got {results} results for it");
    drop(steward);
    plane.stop().await;
    Ok(())
}

/// Starts `function` of `app` with an adopting agent that SIGKILLs itself
/// at `point` (`--test-kill-at`, a window a kill from outside cannot hit
/// on purpose), waits for that death, and starts the next agent on the
/// same data; the request's id and the next agent.
async fn killed_at(
    plane: &Plane,
    point: &str,
    app: &str,
    function: &str,
    input: serde_json::Value,
) -> Result<(String, AgentProc)> {
    let kill = format!("--test-kill-at={point}");
    let args = [ADOPT, &[kill.as_str()]].concat();
    let mut steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), &args)?;
    plane.wait_executors(1).await?;
    let rid = plane.start_request(app, function, input).await?;
    let status = steward
        .wait_exit(Duration::from_secs(120))
        .with_context(|| format!("the agent never reached {point}"))?;
    ensure!(
        std::os::unix::process::ExitStatusExt::signal(&status) == Some(9),
        "the agent ended otherwise than by the injected SIGKILL: {status:?}\n{}",
        steward.log()
    );
    let steward = restart(plane, steward.into_data_dir()?, None)?;
    let adopted = event(&steward, "function_executor_adopted").await?;
    ensure!(
        adopted.contains("1 running allocation(s) followed"),
        "{adopted}"
    );
    Ok((rid, steward))
}

/// The server created `nested`'s call of `square`, and the agent died
/// with the call on record before the worker heard: the next agent tells
/// the worker, does not ask the server again, and the parent finishes
/// with its child's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_call_created_before_a_kill_is_not_sent_again() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_compose(FunctionOptions::default()).await?;
    let (rid, steward) = killed_at(&plane, "call-recorded", "compose", "nested", json!(3)).await?;
    let out = plane.outcome(&rid).await?;
    ensure!(out.status == "success", "{out:?}");
    ensure!(out.output == Some(json!(10)), "{out:?}");
    let text = steward.metrics().await?;
    // Every call_function of this agent is timed (the series is there
    // from the start, so a wrong name fails too).
    let sent = metric(&text, "steward_function_call_latency_seconds_count");
    ensure!(
        sent == Some(0.0),
        "calls sent to the server again: {sent:?}"
    );
    plane.stop().await;
    Ok(())
}

/// The agent died with an output upload on record before the worker got
/// its URLs: the worker asks again, and the next agent gives it the
/// recorded upload, not a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_asked_for_again_after_a_kill_gets_the_recorded_upload() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_hello(FunctionOptions::default()).await?;
    let (rid, steward) =
        killed_at(&plane, "upload-recorded", "hello", "greet", json!("Ada")).await?;
    let out = plane.outcome(&rid).await?;
    ensure!(out.status == "success", "{out:?}");
    ensure!(out.output == Some(json!("Hello, Ada!")), "{out:?}");
    let text = steward.metrics().await?;
    let op = |op: &str| {
        metric(
            &text,
            &format!("steward_blob_store_requests_total{{operation=\"{op}\"}}"),
        )
    };
    // The recorded upload was completed here; none was opened.
    ensure!(op("complete_multipart") == Some(1.0), "{text}");
    let created = op("create_multipart").unwrap_or(0.0);
    ensure!(created == 0.0, "a second upload was created ({created})");
    plane.stop().await;
    Ok(())
}

/// An adopted worker keeps its GPU: a worker started after the restart
/// gets the other one, never the adopted worker's. (A fake `nvidia-smi`
/// with two GPUs, as in `tests/gpus.rs`; the rest is real.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_worker_keeps_its_gpu_from_the_next_worker() -> Result<()> {
    const GPU0: &str = "GPU-0a0a0a0a-1111-2222-3333-444444444444";
    const GPU1: &str = "GPU-1b1b1b1b-5555-6666-7777-888888888888";
    let bin = tempfile::tempdir()?;
    support::fake_nvidia_smi(
        bin.path(),
        &[
            &format!("0, {GPU0}, Tesla T4, 15360, 3, 0"),
            &format!("1, {GPU1}, Tesla T4, 15360, 0, 7"),
        ],
    )?;
    let path = format!("{}:{}", bin.path().display(), path_with_venv());
    let plane = Plane::start().await?;
    let one_gpu = FunctionOptions {
        gpus: 1,
        ..FunctionOptions::default()
    };
    for app in ["gpu-a", "gpu-b"] {
        plane.deploy_hello_as(app, one_gpu.clone()).await?;
    }
    let (_g, gate) = gate()?;
    let steward = AgentProc::steward_with_path(&plane.grpc, plane.blob_dir.path(), ADOPT, &path)?;
    plane.wait_executors(1).await?;
    let (rid, _pid) = start_long_in(&plane, &steward, "gpu-a", &gate).await?;
    let data = steward.into_data_dir()?; // SIGKILL
    let steward = restart_with(&plane, data, None, &path)?;
    event(&steward, "function_executor_adopted").await?;
    let b = plane.invoke_app("gpu-b", "visible_gpus", json!("")).await?;
    ensure!(b.status == "success", "{b:?}");
    // The adopted worker started first and got the first GPU.
    ensure!(
        b.output == Some(json!(GPU1)),
        "the next worker got {:?}",
        b.output
    );
    let (_, host) = steward.get_json("/state/host").await?;
    ensure!(host["gpus_free"] == json!(0), "{host}");
    release(&gate)?;
    ensure!(plane.outcome(&rid).await?.status == "success");
    plane.stop().await;
    Ok(())
}
