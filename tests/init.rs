//! Steward as PID 1 of a container (here: a fresh PID namespace made with
//! `unshare`, as root): it reaps orphans its workers' user code leaves
//! behind, and forwards SIGTERM to the agent, which stops cleanly.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use steward_devserver::FunctionOptions;
use support::Plane;

/// (command name, state letter) of a process, from `/proc/<pid>/stat`.
fn comm_and_state(pid: u32) -> Option<(String, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let state = stat.get(close + 2..)?.chars().next()?;
    Some((stat.get(open + 1..close)?.to_string(), state))
}

fn sleeps_under(root: u32) -> Vec<(u32, char)> {
    steward_host_resources::descendants(root)
        .into_iter()
        .filter_map(|p| comm_and_state(p).map(|(c, s)| (p, c, s)))
        .filter(|(_, c, _)| c == "sleep")
        .map(|(p, _, s)| (p, s))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_steward_reaps_orphans_and_forwards_sigterm() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_hello(FunctionOptions::default()).await?;
    let data = tempfile::tempdir()?;
    let mut unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(env!("CARGO_BIN_EXE_steward"))
        .args(["--grpc-server-addr", &plane.grpc])
        .args([
            "--monitoring-server-host",
            "127.0.0.1",
            "--monitoring-server-port",
            "0",
        ])
        .arg("--executor-cache-path")
        .arg(data.path())
        .arg("--blob-root")
        .arg(plane.blob_dir.path())
        .env("PATH", support::path_with_venv())
        .env("STEWARD_ADOPT_WORKERS", "false")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("unshare (needs root and util-linux)")?;
    let mut line = String::new();
    BufReader::new(unshare.stdout.take().context("stdout")?).read_line(&mut line)?;
    anyhow::ensure!(
        line.contains("monitoring_url"),
        "steward did not start: {line:?}"
    );
    // PID 1 of the namespace, as the host sees it.
    let init = steward_host_resources::descendants(unshare.id())
        .into_iter()
        .next()
        .context("no init process under unshare")?;
    plane.wait_executors(1).await?;

    let out = plane.invoke("orphan_sleeper", json!(2)).await?;
    assert_eq!(out.status, "success", "{out:?}");
    // The orphan runs under the namespace's PID 1 (our init)...
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleeps_under(init).is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "the orphan never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and once it exits it is reaped, not left a zombie.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = sleeps_under(init);
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-9", &init.to_string()])
                .status();
            let _ = unshare.wait();
            bail!("orphan not reaped (pid, state): {left:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SIGTERM to PID 1 reaches the agent, which stops and exits cleanly.
    Command::new("kill")
        .args(["-TERM", &init.to_string()])
        .status()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = unshare.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-9", &init.to_string()])
                .status();
            let _ = unshare.wait();
            bail!("steward as PID 1 did not exit within 30 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    plane.stop().await;
    Ok(())
}
