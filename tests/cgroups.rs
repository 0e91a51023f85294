//! Workers inside resource limits, on this machine's real cgroups (v1 or
//! v2, whichever it has): a CPU quota holds, a fork bomb stops at the pids
//! limit, a worker past its memory limit is reported OOM through its
//! cgroup's counter, cgroups are gone after a clean stop and after a
//! SIGKILL and restart; and admission never overcommits. Without cgroup
//! access (not root, no delegation) the cgroup tests say so and check that
//! Steward runs and says limits are not enforced.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use steward_devserver::FunctionOptions;
use support::{AgentProc, Plane, fake_setup};

/// The parent cgroup directories Steward reports, or `None` (with the
/// reason printed) where it runs without cgroups.
async fn cgroup_parents(steward: &AgentProc) -> Result<Option<Vec<PathBuf>>> {
    let (_, host) = steward.get_json("/state/host").await?;
    let limits = &host["workers"]["limits"];
    if limits["cgroup_version"].is_null() {
        eprintln!(
            "cgroups are not available here ({}): skipping the enforcement checks",
            limits["not_enforced_because"]
        );
        assert!(limits["not_enforced_because"].is_string(), "{host}");
        return Ok(None);
    }
    Ok(Some(
        limits["cgroup_parents"]
            .as_array()
            .context("cgroup_parents")?
            .iter()
            .filter_map(|p| p.as_str().map(PathBuf::from))
            .collect(),
    ))
}

/// Worker cgroup directories under the parents.
fn worker_cgroups(parents: &[PathBuf]) -> Vec<PathBuf> {
    parents
        .iter()
        .flat_map(|p| std::fs::read_dir(p).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect()
}

/// A fake-worker output: JSON, possibly inside a string.
fn output(v: Option<Value>) -> Value {
    match v {
        Some(Value::String(s)) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        Some(v) => v,
        None => Value::Null,
    }
}

/// The one function executor for `function`, from `/state/function-executors`.
async fn fe_of(steward: &AgentProc, function: &str) -> Result<Value> {
    let has = |f: &Value| {
        f["function"]
            .as_str()
            .is_some_and(|n| n.ends_with(function))
    };
    let (_, fes) = steward
        .wait_json(
            "/state/function-executors",
            Duration::from_secs(60),
            |_, v| {
                v["function_executors"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(has)
            },
        )
        .await?;
    fes["function_executors"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| has(f))
        .cloned()
        .context("worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_quota_holds_and_cgroups_go_with_a_clean_stop() -> Result<()> {
    let half_a_core = FunctionOptions {
        cpu_ms_per_sec: 500,
        memory_bytes: 256 << 20,
        ..FunctionOptions::default()
    };
    let (plane, mut steward) = fake_setup(half_a_core, &[]).await?;
    let Some(parents) = cgroup_parents(&steward).await? else {
        let out = plane.invoke_app("fake", "burn_1500", json!("x")).await?;
        assert_eq!(out.status, "success", "{out:?}");
        return Ok(());
    };
    // Start the worker with a short burn, then measure one from its cgroup.
    let out = plane.invoke_app("fake", "burn_1500", json!("warm")).await?;
    assert_eq!(out.status, "success", "{out:?}");
    let fe = fe_of(&steward, "burn_1500").await?;
    let before = fe["usage"]["cpu_usec"]
        .as_u64()
        .context("cgroup CPU usage")?;
    let started = Instant::now();
    let out = plane.invoke_app("fake", "burn_1500", json!("x")).await?;
    let wall = started.elapsed();
    assert_eq!(out.status, "success", "{out:?}");
    let burn = output(out.output);
    let fe = fe_of(&steward, "burn_1500").await?;
    assert_eq!(fe["limits"]["cpu_ms_per_sec"], 500, "{fe}");
    assert_eq!(fe["limits"]["memory_bytes"], 256u64 << 20, "{fe}");
    let after = fe["usage"]["cpu_usec"]
        .as_u64()
        .context("cgroup CPU usage")?;
    // Two threads spin for 1.5 s: unconfined they would use ~2 cores (or
    // all this machine has free); the quota allows 0.5 of one.
    let cgroup_cores = after.saturating_sub(before) as f64 / 1e6 / wall.as_secs_f64();
    let own_cores =
        burn["cpu_ms"].as_f64().context("cpu_ms")? / burn["wall_ms"].as_f64().context("wall_ms")?;
    assert!(
        cgroup_cores <= 0.65,
        "the worker's cgroup used {cgroup_cores:.2} cores ({fe})"
    );
    assert!(
        own_cores <= 0.65,
        "the worker measured {own_cores:.2} cores ({burn})"
    );
    assert!(
        !worker_cgroups(&parents).is_empty(),
        "a live worker has a cgroup"
    );

    // A clean stop removes worker cgroups and the parent.
    steward.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        steward.wait_exit(Duration::from_secs(30)).is_some(),
        "steward stopped"
    );
    for p in &parents {
        assert!(!p.exists(), "{} left after a clean stop", p.display());
    }
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_stops_at_the_pids_limit() -> Result<()> {
    let (plane, steward) =
        fake_setup(FunctionOptions::default(), &["--worker-pids-max", "48"]).await?;
    if cgroup_parents(&steward).await?.is_none() {
        return Ok(());
    }
    let out = plane.invoke_app("fake", "forkbomb", json!("x")).await?;
    assert_eq!(out.status, "success", "{out:?}");
    let bomb = output(out.output);
    let spawned = bomb["spawned"].as_u64().context("spawned")?;
    assert!(spawned < 48, "{bomb}");
    assert!(
        bomb["error"]
            .as_str()
            .is_some_and(|e| e.contains("temporarily unavailable")),
        "the fork failed with EAGAIN: {bomb}"
    );
    let fe = fe_of(&steward, "forkbomb").await?;
    assert_eq!(fe["limits"]["pids_max"], 48, "{fe}");
    // The worker survived its children and still serves.
    let out = plane.invoke_app("fake", "forkbomb", json!("again")).await?;
    assert_eq!(out.status, "success", "{out:?}");
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_worker_past_its_memory_limit_is_reported_oom() -> Result<()> {
    let plane = Plane::start().await?;
    plane
        .deploy_hello(FunctionOptions {
            memory_bytes: 256 << 20,
            ..FunctionOptions::default()
        })
        .await?;
    let steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), &[])?;
    plane.wait_executors(1).await?;
    if cgroup_parents(&steward).await?.is_none() {
        return Ok(());
    }
    let out = plane.invoke("hog", json!(512)).await?;
    assert_eq!(out.status, "failure", "{out:?}");
    assert_eq!(out.failure_reason.as_deref(), Some("OOM"), "{out:?}");
    let t = plane.wait_termination("hog").await?;
    assert_eq!(t["reason"], "OOM", "{t}");
    let (_, events) = steward.get_json("/state/events").await?;
    let oom = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["kind"] == "function_executor_oom")
        .cloned()
        .context("an OOM event")?;
    assert!(
        oom["message"]
            .as_str()
            .is_some_and(|m| m.contains(&(256u64 << 20).to_string())),
        "the limit is named: {oom}"
    );
    let metrics = steward.metrics().await?;
    assert_eq!(
        support::metric(&metrics, "steward_worker_oom_kills_total"),
        Some(1.0)
    );
    // A hog within its limit runs.
    let out = plane.invoke("hog", json!(16)).await?;
    assert_eq!(out.status, "success", "{out:?}");
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroups_left_by_a_sigkilled_agent_are_removed_at_the_next_start() -> Result<()> {
    let (plane, steward) = fake_setup(FunctionOptions::default(), &[]).await?;
    let Some(parents) = cgroup_parents(&steward).await? else {
        return Ok(());
    };
    let out = plane.invoke_app("fake", "echo", json!("x")).await?;
    assert_eq!(out.status, "success", "{out:?}");
    let bin = support::fake_worker();
    let data_dir = steward.into_data_dir()?;
    // The kernel kills the worker with the agent; its cgroup stays.
    let leftovers = worker_cgroups(&parents);
    assert!(!leftovers.is_empty(), "a leftover cgroup");
    let steward = AgentProc::steward_full(
        &plane.grpc,
        plane.blob_dir.path(),
        &["--function-executor-bin", bin.to_str().unwrap_or_default()],
        &support::path_with_venv(),
        &[],
        data_dir,
    )?;
    let (_, events) = steward
        .wait_json("/state/events", Duration::from_secs(30), |_, v| {
            v.to_string().contains("(cgroup)")
        })
        .await?;
    assert!(events.to_string().contains("leftover_cleaned"), "{events}");
    // (The server still wants the worker: the new agent starts its own,
    // in a cgroup of another name.)
    let left: Vec<&PathBuf> = leftovers.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "leftover cgroups: {left:?}");
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_do_not_fit_are_refused_with_the_numbers() -> Result<()> {
    // Three workers that each need 40 % of allocatable memory.
    let ten_gib = 10u64 << 30;
    let forty_percent = ten_gib * 4 / 10;
    let options = FunctionOptions {
        memory_bytes: forty_percent,
        ..FunctionOptions::default()
    };
    let (plane, steward) = fake_setup(
        options,
        &["--total-memory-bytes", &ten_gib.to_string(), "--no-cgroups"],
    )
    .await?;
    let mut requests = Vec::new();
    for f in ["sleep_1500", "hang", "gate"] {
        requests.push((f, plane.start_request("fake", f, json!("x")).await?));
    }
    // The refused worker is reported terminated (and forgotten once the
    // server drops it): its event keeps the numbers.
    let (_, events) = steward
        .wait_json("/state/events", Duration::from_secs(60), |_, v| {
            v.to_string().contains("admission refused")
        })
        .await?;
    let refusal = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("admission refused"))
        })
        .cloned()
        .context("refusal event")?;
    let message = refusal["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!(
            "asks for {forty_percent} bytes of memory; admitted workers hold {} of {ten_gib} allocatable",
            2 * forty_percent
        )),
        "{message}"
    );
    let (_, fes) = steward.get_json("/state/function-executors").await?;
    let running: Vec<&Value> = fes["function_executors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["status"] == "RUNNING")
        .collect();
    assert_eq!(running.len(), 2, "{fes}");
    assert!(
        running
            .iter()
            .all(|f| f["resources"]["memory_bytes"] == forty_percent)
    );
    let (_, host) = steward.get_json("/state/host").await?;
    // Without cgroups (here by flag) Steward says limits are not enforced, and why.
    assert_eq!(
        host["workers"]["limits"]["cgroup_version"],
        Value::Null,
        "{host}"
    );
    assert_eq!(
        host["workers"]["limits"]["not_enforced_because"], "--no-cgroups was given",
        "{host}"
    );
    let admitted = host["workers"]["admitted"]["memory_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert_eq!(admitted, 2 * forty_percent, "nothing overcommitted: {host}");
    let metrics = steward.metrics().await?;
    assert_eq!(
        support::metric(
            &metrics,
            "steward_worker_admission_refusals_total{resource=\"memory\"}"
        ),
        Some(1.0)
    );
    // The server was told: the refused worker terminated with the startup
    // reason, and its request failed with it.
    let log = plane.log().await?;
    let t = log["terminations"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["reason"] == "STARTUP_FAILED_INTERNAL_ERROR")
        .cloned()
        .context("the refused worker's termination")?;
    let function = t["function"].as_str().unwrap_or_default().to_string();
    let (_, id) = requests
        .iter()
        .find(|(f, _)| function.ends_with(*f))
        .with_context(|| format!("a request for {function}"))?;
    let out = plane.outcome(id).await?;
    assert_eq!(
        out.failure_reason.as_deref(),
        Some("STARTUP_FAILED_INTERNAL_ERROR"),
        "{function}: {out:?}"
    );
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workers_are_evicted_under_memory_pressure_busy_ones_finish() -> Result<()> {
    // A threshold no host meets: the host is always under pressure.
    let (plane, steward) = fake_setup(
        FunctionOptions::default(),
        &["--eviction-memory-available", &(1u64 << 50).to_string()],
    )
    .await?;
    // A busy worker is never evicted: its allocation runs to the end.
    let out = plane.invoke_app("fake", "sleep_1500", json!("x")).await?;
    assert_eq!(out.status, "success", "{out:?}");
    // Once idle, it goes, reported with the reason.
    let t = plane.wait_termination("sleep_1500").await?;
    assert_eq!(t["reason"], "UNHEALTHY", "{t}");
    let (_, events) = steward
        .wait_json("/state/events", Duration::from_secs(30), |_, v| {
            v.to_string().contains("function_executor_evicted")
        })
        .await?;
    let evicted = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["kind"] == "function_executor_evicted")
        .cloned()
        .context("eviction event")?;
    let message = evicted["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("below the eviction threshold"),
        "{message}"
    );
    assert!(message.contains("freed"), "names what was freed: {message}");
    let metrics = steward.metrics().await?;
    assert!(
        support::metric(&metrics, "steward_function_executor_evictions_total")
            .is_some_and(|n| n >= 1.0)
    );
    plane.stop().await;
    Ok(())
}

/// Service processes in cgroups under a parent that is not Steward's,
/// killed and removed (with the parent and the cgroup above it) on drop.
struct ForeignServices {
    parents: Vec<PathBuf>,
    services: Vec<(String, std::process::Child)>,
}

impl ForeignServices {
    /// Starts a `sleep` in a cgroup `name` under each parent.
    fn start(parents: Vec<PathBuf>, names: &[&str]) -> Result<ForeignServices> {
        let mut s = ForeignServices {
            parents,
            services: Vec::new(),
        };
        for name in names {
            let child = std::process::Command::new("sleep").arg("600").spawn()?;
            let pid = child.id().to_string();
            s.services.push((name.to_string(), child));
            for p in &s.parents {
                std::fs::create_dir(p.join(name))?;
                std::fs::write(p.join(name).join("cgroup.procs"), &pid)?;
            }
        }
        Ok(s)
    }

    fn alive(&mut self) -> Vec<String> {
        let mut alive = Vec::new();
        for (n, c) in &mut self.services {
            if matches!(c.try_wait(), Ok(None)) {
                alive.push(n.clone());
            }
        }
        alive
    }
}

impl Drop for ForeignServices {
    fn drop(&mut self) {
        for (_, c) in &mut self.services {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Whatever is under the parents is this test's (its services, any
        // worker cgroup left by a failure), then the parents and the
        // cgroups above them.
        let mut dirs: Vec<PathBuf> = Vec::new();
        for p in &self.parents {
            dirs.extend(
                std::fs::read_dir(p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|d| d.is_dir()),
            );
        }
        dirs.extend(self.parents.iter().cloned());
        dirs.extend(
            self.parents
                .iter()
                .filter_map(|p| p.parent().map(PathBuf::from)),
        );
        for d in dirs {
            // A process being torn down keeps its cgroup busy a moment.
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::remove_dir(&d).is_err() && d.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Removes Steward's ownership mark from `dirs`: they are as if someone
/// else had made them.
fn disown(dirs: &[PathBuf]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    for d in dirs {
        let path = std::ffi::CString::new(d.as_os_str().as_bytes())?;
        let name = std::ffi::CString::new(steward_worker_driver::cgroup::OWNER_XATTR)?;
        // SAFETY: both strings are NUL-terminated.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) };
        anyhow::ensure!(
            rc == 0,
            "{}: {}",
            d.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cgroup_parent_that_is_not_stewards_keeps_its_services() -> Result<()> {
    // A stand-in for `--cgroup-parent /system.slice`, holding a service in
    // a cgroup named like a worker's and one named as services are.
    foreign_parent_keeps_its_services("system.slice").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_named_after_steward_that_it_did_not_create_keeps_its_services() -> Result<()> {
    // The name is no proof of ownership.
    foreign_parent_keeps_its_services("steward-foreign").await
}

/// Steward started with `--cgroup-parent` a parent `leaf` that someone
/// else made (under a cgroup of this test's own) kills none of the
/// services there.
async fn foreign_parent_keeps_its_services(leaf: &str) -> Result<()> {
    let data_dir = tempfile::tempdir()?;
    let parent = format!("{}/{leaf}", support::cgroup_parent_for(data_dir.path()));
    let steward_worker_driver::CgroupSetup::Enabled(cg) =
        steward_worker_driver::Cgroups::detect(&parent)
    else {
        eprintln!("cgroups are not available here: nothing to check");
        return Ok(());
    };
    // Made by this test, not by a Steward.
    disown(&cg.parents())?;
    let mut services = ForeignServices::start(cg.parents(), &["fe-svc.1-0", "postgres.service"])?;
    let plane = Plane::start().await?;
    plane.deploy_fake(FunctionOptions::default()).await?;
    let bin = support::fake_worker();
    let mut steward = AgentProc::steward_full(
        &plane.grpc,
        plane.blob_dir.path(),
        &[
            "--function-executor-bin",
            bin.to_str().unwrap_or_default(),
            "--cgroup-parent",
            &parent,
        ],
        &support::path_with_venv(),
        &[],
        data_dir,
    )?;
    // Registered: the start-up cleanup is over.
    plane.wait_executors(1).await?;
    assert_eq!(services.alive(), ["fe-svc.1-0", "postgres.service"]);
    let (_, events) = steward.get_json("/state/events").await?;
    let skipped = events.to_string();
    assert!(
        skipped.contains("leftover_skipped") && skipped.contains("cgroup parent"),
        "{events}"
    );
    assert_eq!(
        cgroup_parents(&steward).await?.as_deref(),
        Some(services.parents.as_slice())
    );
    // Workers still run there, and go with a clean stop; the services stay.
    let out = plane.invoke_app("fake", "echo", json!("x")).await?;
    assert_eq!(out.status, "success", "{out:?}");
    steward.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(steward.wait_exit(Duration::from_secs(30)).is_some());
    assert_eq!(services.alive(), ["fe-svc.1-0", "postgres.service"]);
    for p in &services.parents {
        assert!(p.join("fe-svc.1-0").is_dir() && p.join("postgres.service").is_dir());
        // The worker's own cgroup went with it; nothing else was touched.
        let mut left: Vec<String> = std::fs::read_dir(p)?
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["fe-svc.1-0", "postgres.service"], "{}", p.display());
    }
    plane.stop().await;
    Ok(())
}
