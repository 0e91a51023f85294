//! The OCI sandbox driver (`--worker-driver oci`) on the machine's real
//! `runc`: workers run in containers (the fake worker and the real
//! `function-executor`), see their own pid namespace and a read-only root,
//! reach nothing on the host with `--worker-network none`, map OOM and
//! exits as process workers do, and leave no container, bundle, socket or
//! cgroup behind after a clean stop or after SIGKILL and a restart.
//! A runtime that does not answer `--version` is refused at start.
//!
//! Needs root and `runc` (`cargo xtask test` installs it): without them
//! these tests fail, naming what is missing.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use steward_devserver::FunctionOptions;
use support::oci::{RUNC, Sweep, containers, oci_args, oci_dir, require_runc};
use support::{AgentProc, Plane, cgroup_dirs_named, fake_worker};

/// Polls `check` until it holds, up to `limit`.
async fn eventually(limit: Duration, what: &str, check: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !check() {
        if Instant::now() > deadline {
            bail!("{what}: not within {}s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A plane with `examples/fake` and a Steward running the fake worker in
/// containers.
async fn fake_oci(extra: &[&str]) -> Result<(Plane, AgentProc, Sweep)> {
    require_runc();
    let plane = Plane::start().await?;
    plane.deploy_fake(FunctionOptions::default()).await?;
    let bin = fake_worker();
    let mut args = oci_args(extra);
    args.extend(["--function-executor-bin", bin.to_str().unwrap_or_default()]);
    let steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), &args)?;
    let sweep = Sweep::of(&steward);
    plane.wait_executors(1).await?;
    Ok((plane, steward, sweep))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_worker_runs_in_a_container_and_nothing_is_left_after_a_clean_stop() -> Result<()> {
    let (plane, mut steward, _sweep) = fake_oci(&[]).await?;
    let out = plane
        .invoke_app("fake", "echo", json!({"a": [1, 2]}))
        .await?;
    assert_eq!(
        (out.status.as_str(), out.output),
        ("success", Some(json!({"a": [1, 2]})))
    );
    let data = steward.data_dir.path().to_path_buf();
    let root = oci_dir(&data).join("state");
    let listed = containers(&root);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let (_, fes) = steward.get_json("/state/function-executors").await?;
    let pid = fes["function_executors"][0]["pid"]
        .as_u64()
        .context("pid")? as u32;
    assert_eq!(
        listed[0]["pid"].as_u64(),
        Some(u64::from(pid)),
        "the worker is the container's first process"
    );
    let id = listed[0]["id"].as_str().context("id")?.to_string();
    let executor_id = std::fs::read_to_string(data.join("executor_id"))?;
    assert!(
        id.starts_with(&format!("steward-{}-fe-", executor_id.trim())),
        "{id}"
    );
    assert!(
        oci_dir(&data)
            .join("bundles")
            .join(&id)
            .join("config.json")
            .is_file()
    );
    // The worker's own pid namespace: Steward's init is its first process.
    let ns = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    assert_ne!(
        ns(pid),
        ns(std::process::id()),
        "a pid namespace of its own"
    );

    let parent = steward.cgroup_parent.clone().context("parent")?;
    assert!(!cgroup_dirs_named(&parent).is_empty());
    steward.signal(nix::sys::signal::Signal::SIGTERM);
    ensure!(
        steward.wait_exit(Duration::from_secs(30)).is_some(),
        "steward did not stop"
    );
    assert!(
        containers(&root).is_empty(),
        "no container after a clean stop"
    );
    let bundles: Vec<_> = std::fs::read_dir(oci_dir(&data).join("bundles"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    assert!(
        bundles.is_empty(),
        "no bundle after a clean stop: {bundles:?}"
    );
    assert_eq!(
        cgroup_dirs_named(&parent),
        Vec::<PathBuf>::new(),
        "no cgroup in any hierarchy after a clean stop"
    );
    assert!(!support::alive(pid));
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_steward_leaves_nothing_after_its_restart_and_others_containers_stay()
-> Result<()> {
    let (plane, steward, _sweep) = fake_oci(&[]).await?;
    let out = plane.invoke_app("fake", "echo", json!("x")).await?;
    assert_eq!(out.status, "success", "{out:?}");
    let data = steward.data_dir.path().to_path_buf();
    let root = oci_dir(&data).join("state");
    let before = containers(&root);
    assert_eq!(before.len(), 1, "{before:?}");
    let old_id = before[0]["id"].as_str().context("id")?.to_string();
    let old_pid = before[0]["pid"].as_u64().context("pid")? as u32;
    let old_bundle = oci_dir(&data).join("bundles").join(&old_id);
    let parent = steward.cgroup_parent.clone().context("parent")?;
    let bin = fake_worker();
    let data_dir = steward.into_data_dir()?;

    // The container's init dies with Steward (its parent-death signal):
    // nothing of the worker runs while no Steward does.
    eventually(
        Duration::from_secs(10),
        "the worker dies with Steward",
        || !support::alive(old_pid),
    )
    .await?;
    // Its state, bundle and cgroups stay for the next start to remove.
    assert_eq!(containers(&root).len(), 1);
    assert!(old_bundle.exists());
    let leftover_cgroups: Vec<PathBuf> = cgroup_dirs_named(&parent)
        .iter()
        .map(|p| {
            p.join(
                old_id
                    .split_once("-fe-")
                    .map(|(_, n)| format!("fe-{n}"))
                    .unwrap_or_default(),
            )
        })
        .filter(|p| p.exists())
        .collect();
    assert!(
        !leftover_cgroups.is_empty(),
        "the killed worker's cgroups stay for now"
    );

    // A container under the same root, named like ours, of another
    // executor: the start-up sweep must not touch it.
    let prefix = old_id.split("fe-").next().context("prefix")?;
    let foreign_id = format!("{prefix}fe-foreign.1-1");
    let foreign_bundle = tempfile::tempdir()?;
    std::fs::create_dir(foreign_bundle.path().join("rootfs"))?;
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(old_bundle.join("config.json"))?)?;
    config["annotations"]["io.steward.executor-id"] = json!("another-steward");
    config["process"]["args"] = json!(["/bin/sleep", "600"]);
    config["process"]["user"] = json!({"uid": 65534, "gid": 65534});
    config["process"]["cwd"] = json!("/");
    config["linux"]["cgroupsPath"] = json!(format!("{parent}-foreign/c1"));
    config["mounts"] = json!(
        config["mounts"]
            .as_array()
            .context("mounts")?
            .iter()
            .filter(|m| m["type"] != "bind"
                || ["/usr", "/etc"].contains(&m["destination"].as_str().unwrap_or("")))
            .cloned()
            .collect::<Vec<_>>()
    );
    std::fs::write(
        foreign_bundle.path().join("config.json"),
        serde_json::to_vec(&config)?,
    )?;
    std::os::unix::fs::symlink("usr/bin", foreign_bundle.path().join("rootfs/bin")).ok();
    std::os::unix::fs::symlink("usr/lib", foreign_bundle.path().join("rootfs/lib")).ok();
    std::os::unix::fs::symlink("usr/lib64", foreign_bundle.path().join("rootfs/lib64")).ok();
    let run = std::process::Command::new(RUNC)
        .arg("--root")
        .arg(&root)
        .args(["run", "--detach", "--bundle"])
        .arg(foreign_bundle.path())
        .arg(&foreign_id)
        // Detached, the container keeps the command's stdio: not pipes
        // this test would wait on.
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    ensure!(run.success(), "foreign container: {run:?}");
    let _foreign = Sweep {
        root: root.clone(),
        parents: vec![format!("{parent}-foreign")],
        logs: PathBuf::new(),
    };

    let steward = AgentProc::steward_full(
        &plane.grpc,
        plane.blob_dir.path(),
        &oci_args(&["--function-executor-bin", bin.to_str().unwrap_or_default()]),
        &support::path_with_venv(),
        &[],
        data_dir,
    )?;
    let (_, events) = steward
        .wait_json("/state/events", Duration::from_secs(30), |_, v| {
            v.to_string().contains(&old_id)
        })
        .await?;
    let text = events.to_string();
    assert!(text.contains("leftover_cleaned"), "{events}");
    assert!(
        text.contains("leftover_skipped") && text.contains("another-steward"),
        "{events}"
    );
    let ids: Vec<String> = containers(&root)
        .iter()
        .filter_map(|c| c["id"].as_str().map(str::to_string))
        .collect();
    assert!(
        !ids.contains(&old_id),
        "the leftover container is deleted: {ids:?}"
    );
    assert!(
        ids.contains(&foreign_id),
        "another executor's container stays: {ids:?}"
    );
    assert!(!old_bundle.exists(), "the leftover bundle is removed");
    let left: Vec<&PathBuf> = leftover_cgroups.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "leftover cgroups: {left:?}");
    // A clean stop of the restarted Steward leaves nothing of its own.
    let mut steward = steward;
    steward.signal(nix::sys::signal::Signal::SIGTERM);
    ensure!(
        steward.wait_exit(Duration::from_secs(30)).is_some(),
        "steward did not stop"
    );
    let ours: Vec<String> = containers(&root)
        .iter()
        .filter_map(|c| c["id"].as_str().map(str::to_string))
        .filter(|id| *id != foreign_id)
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
    plane.stop().await;
    Ok(())
}

#[test]
fn a_runtime_that_does_not_answer_version_is_refused_at_start() -> Result<()> {
    let (status, stderr) = support::steward_refusal(&[
        "--worker-driver",
        "oci",
        "--oci-runtime",
        "/nonexistent/runsc",
        "--no-cgroups",
    ])?;
    assert!(
        status.is_some_and(|s| !s.success()),
        "Steward must refuse to start: {status:?} {stderr}"
    );
    assert!(
        stderr.contains("/nonexistent/runsc") && stderr.contains("--version"),
        "the runtime and the check are named: {stderr}"
    );
    Ok(())
}

#[test]
fn a_start_refused_after_the_run_directory_was_made_leaves_none_behind() -> Result<()> {
    support::oci::require_runc();
    let runs = tempfile::tempdir()?;
    let runs_dir = runs.path().to_str().expect("a UTF-8 temp path");
    // The driver refuses the bind once the run directory exists.
    let (status, stderr) = support::steward_refusal(&[
        "--worker-driver",
        "oci",
        "--oci-runtime",
        support::oci::RUNC,
        "--oci-bind-ro",
        "/",
        "--worker-run-dir",
        runs_dir,
        "--no-cgroups",
    ])?;
    assert!(
        status.is_some_and(|s| !s.success()),
        "Steward must refuse to start: {status:?} {stderr}"
    );
    assert!(stderr.contains("--oci-bind-ro"), "{stderr}");
    let left: Vec<String> = std::fs::read_dir(runs.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("e-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

/// Deploys `tests/apps/sandbox` as application `sandbox`.
async fn deploy_sandbox(plane: &Plane, options: FunctionOptions) -> Result<()> {
    support::venv();
    steward_devserver::client::deploy(
        &plane.url,
        "default",
        "sandbox",
        "1",
        &support::repo_root().join("tests/apps/sandbox"),
        &options,
    )
    .await?;
    Ok(())
}

/// A Steward running real `function-executor` workers in containers.
async fn real_oci(plane: &Plane, extra: &[&str]) -> Result<(AgentProc, Sweep)> {
    real_steward(plane, "oci", extra).await
}

/// A Steward running real `function-executor` workers with `driver`.
async fn real_steward(plane: &Plane, driver: &str, extra: &[&str]) -> Result<(AgentProc, Sweep)> {
    require_runc();
    let mut args = vec!["--worker-driver", driver, "--oci-runtime", RUNC];
    args.extend_from_slice(extra);
    let steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), &args)?;
    let sweep = Sweep::of(&steward);
    plane.wait_executors(1).await?;
    Ok((steward, sweep))
}

/// What the `probe` function saw, with a listener on the host's loopback
/// for it to try.
async fn probe(plane: &Plane) -> Result<serde_json::Value> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let out = plane.invoke_app("sandbox", "probe", json!(port)).await?;
    ensure!(out.status == "success", "probe: {out:?}");
    drop(listener);
    out.output.context("probe output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_worker_runs_its_function_in_its_own_sandbox() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_hello(FunctionOptions::default()).await?;
    deploy_sandbox(&plane, FunctionOptions::default()).await?;
    let (steward, _sweep) = real_oci(&plane, &[]).await?;
    let out = plane.invoke("greet", json!("container")).await?;
    assert_eq!(out.output, Some(json!("Hello, container!")), "{out:?}");

    let seen = probe(&plane).await?;
    // Its own pid namespace: Steward's init is 1, the worker a low pid,
    // and no host process is visible.
    assert_eq!(seen["ppid"], 1, "{seen}");
    let pid = seen["pid"].as_u64().context("pid")?;
    assert!(pid < 100, "{seen}");
    let processes = seen["processes"].as_array().context("processes")?;
    assert!(
        processes.len() < 20 && processes.contains(&json!(1)),
        "{seen}"
    );
    // Its own uid, not root.
    assert!(
        seen["uid"].as_u64().is_some_and(|u| u > 2_000_000_000),
        "{seen}"
    );
    // A read-only root and host directories; a private /tmp and home.
    for (path, got) in [("/", "root"), ("/usr", "usr"), ("/etc", "etc")] {
        assert_eq!(seen[got], "EROFS", "{path} is read-only: {seen}");
    }
    assert_eq!(
        (&seen["tmp"], &seen["home"]),
        (&json!("ok"), &json!("ok")),
        "{seen}"
    );
    // The host's network by default (blob storage must be reachable).
    assert_eq!(seen["host_tcp"], "ok", "{seen}");
    // Steward's seccomp profile: no user namespaces.
    assert_eq!(seen["unshare_user"], "EPERM", "{seen}");
    // No device but the harmless ones (no GPU was allocated).
    let dev: Vec<&str> = seen["dev"]
        .as_array()
        .context("dev")?
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    assert!(
        !dev.iter()
            .any(|d| d.starts_with("nvidia") || d.starts_with("sd") || *d == "mem"),
        "{dev:?}"
    );
    drop(steward);
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_network_a_worker_reaches_no_host_listener_but_still_runs() -> Result<()> {
    let plane = Plane::start().await?;
    deploy_sandbox(&plane, FunctionOptions::default()).await?;
    let (steward, _sweep) = real_oci(&plane, &["--worker-network", "none"]).await?;
    let seen = probe(&plane).await?;
    // Loopback is the container's own, where nothing listens.
    assert_eq!(seen["host_tcp"], "ECONNREFUSED", "{seen}");
    drop(steward);
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_and_exits_are_reported_as_for_process_workers() -> Result<()> {
    // The same three calls under both drivers: what the server hears must
    // be the same.
    let options = FunctionOptions {
        memory_bytes: 256 << 20,
        ..FunctionOptions::default()
    };
    let mut heard = Vec::new();
    for driver in ["process", "oci"] {
        let plane = Plane::start().await?;
        deploy_sandbox(&plane, options.clone()).await?;
        let (steward, _sweep) = real_steward(&plane, driver, &[]).await?;
        let mut got = Vec::new();
        for (function, input) in [
            ("hog", json!(512)),
            ("exit_with", json!(3)),
            ("hog", json!(16)),
        ] {
            let out = plane.invoke_app("sandbox", function, input).await?;
            got.push((function, out.status, out.failure_reason, out.output));
        }
        let t = plane.wait_termination("hog").await?;
        let (_, events) = steward.get_json("/state/events").await?;
        let oom = events["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["kind"] == "function_executor_oom");
        heard.push((got, t["reason"].clone(), oom));
        drop(steward);
        plane.stop().await;
    }
    assert_eq!(
        heard[0].0[0],
        ("hog", "failure".to_string(), Some("OOM".to_string()), None),
        "{heard:?}"
    );
    assert_eq!(heard[0], heard[1], "process (left) and oci (right) differ");
    assert!(heard[1].2, "an OOM event under oci");
    Ok(())
}
