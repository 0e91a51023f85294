//! systemd's `Type=notify` protocol against a fake `NOTIFY_SOCKET` (a Unix
//! datagram socket this test binds): READY=1 once the startup probe says
//! 200, STATUS= with the mode and counts, WATCHDOG=1 again and again with
//! `WATCHDOG_USEC` set, no WATCHDOG=1 any more once the reconcile loop is
//! wedged (the test-only fault `--test-wedge-reconcile-file`), and
//! STOPPING=1 on SIGTERM. No timing is asserted: messages are awaited
//! with generous deadlines.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use steward_devserver::FunctionOptions;
use support::{AgentProc, Plane};
use tokio::net::UnixDatagram;

/// The fake systemd end: every datagram Steward sent, in order.
struct NotifySocket {
    socket: UnixDatagram,
    received: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &std::path::Path) -> Result<NotifySocket> {
        Ok(NotifySocket {
            socket: UnixDatagram::bind(path)?,
            received: Vec::new(),
        })
    }

    /// The next datagram, if one comes within `limit`.
    async fn next(&mut self, limit: Duration) -> Result<Option<String>> {
        let mut buf = vec![0u8; 64 * 1024];
        match tokio::time::timeout(limit, self.socket.recv(&mut buf)).await {
            Err(_) => Ok(None),
            Ok(n) => {
                let text = String::from_utf8(buf[..n?].to_vec())?;
                self.received.push(text.clone());
                Ok(Some(text))
            }
        }
    }

    /// Waits up to `limit` for a datagram with the line `line` (or, for a
    /// `KEY=` prefix, a line starting with it); returns that datagram.
    async fn wait_for(&mut self, line: &str, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Some(msg) = self.next(left).await?
                && msg
                    .lines()
                    .any(|l| l == line || (line.ends_with('=') && l.starts_with(line)))
            {
                return Ok(msg);
            }
        }
        bail!(
            "no {line:?} within {}s; received: {:?}",
            limit.as_secs(),
            self.received
        )
    }

    /// Reads everything already queued.
    async fn drain(&mut self) -> Result<()> {
        while self.next(Duration::ZERO).await?.is_some() {}
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_status_watchdog_until_wedged_and_stopping() -> Result<()> {
    // Steward starts before any server listens on its address.
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let blobs = tempfile::tempdir()?;
    let dir = tempfile::tempdir()?;
    let socket_path = dir.path().join("notify.sock");
    let mut systemd = NotifySocket::bind(&socket_path)?;
    let wedge = dir.path().join("wedge");
    let bin = support::fake_worker();
    let mut steward = AgentProc::steward_with_env(
        &grpc,
        blobs.path(),
        &[
            "--function-executor-bin",
            bin.to_str().unwrap_or_default(),
            "--test-wedge-reconcile-file",
            wedge.to_str().unwrap_or_default(),
        ],
        &support::path_with_venv(),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap_or_default()),
            // A 1 s watchdog: pings every 0.5 s.
            ("WATCHDOG_USEC", "1000000"),
        ],
    )?;

    // Alive (two pings) but not registered: not ready, and not said to be.
    for _ in 0..2 {
        systemd
            .wait_for("WATCHDOG=1", Duration::from_secs(30))
            .await?;
    }
    let (code, startup) = steward.get_json("/monitoring/startup").await?;
    assert_eq!(code, 503, "{startup}");
    assert!(
        !systemd
            .received
            .iter()
            .any(|m| m.lines().any(|l| l == "READY=1")),
        "READY=1 before the startup probe said 200: {:?}",
        systemd.received
    );

    // READY=1 once the startup probe says 200 (a latch: it stays so).
    let plane = Plane::start_on(&grpc, blobs).await?;
    plane.deploy_fake(FunctionOptions::default()).await?;
    let ready = systemd.wait_for("READY=1", Duration::from_secs(60)).await?;
    let (code, startup) = steward.get_json("/monitoring/startup").await?;
    assert_eq!(
        code, 200,
        "READY=1 was sent before the startup probe said 200: {startup}"
    );
    let status = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .context("READY=1 comes with a STATUS=")?;
    assert!(
        status.starts_with("active: workers ") && status.contains(", allocations running "),
        "{status}"
    );

    // WATCHDOG=1, again and again.
    for _ in 0..3 {
        systemd
            .wait_for("WATCHDOG=1", Duration::from_secs(30))
            .await?;
    }
    // The counts follow the work: a worker starts for an allocation.
    let out = plane
        .invoke_app("fake", "echo", serde_json::json!("hi"))
        .await?;
    assert_eq!(out.status, "success", "{out:?}");
    let mut status = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status.contains("workers 1,") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no STATUS= with the worker: {:?}",
            systemd.received
        );
        let msg = systemd.wait_for("STATUS=", Duration::from_secs(30)).await?;
        status = msg
            .lines()
            .find_map(|l| l.strip_prefix("STATUS="))
            .unwrap_or_default()
            .to_string();
    }
    assert!(status.starts_with("active: workers 1,"), "{status}");

    // The reconcile loop wedged: it says so (an event), then pings no more.
    std::fs::write(&wedge, "")?;
    steward
        .wait_json("/state/events", Duration::from_secs(30), |_, v| {
            v.to_string().contains("reconcile_wedged")
        })
        .await?;
    systemd.drain().await?;
    // Six of its 0.5 s heartbeats: a loop that still ran would have pinged.
    let quiet_until = Instant::now() + Duration::from_secs(3);
    while let Some(left) = quiet_until.checked_duration_since(Instant::now()) {
        if let Some(msg) = systemd.next(left).await? {
            assert!(
                !msg.lines().any(|l| l == "WATCHDOG=1"),
                "WATCHDOG=1 after the reconcile loop wedged: {:?}",
                systemd.received
            );
        }
    }

    // STOPPING=1 on SIGTERM, and Steward still stops.
    steward.signal(nix::sys::signal::Signal::SIGTERM);
    systemd
        .wait_for("STOPPING=1", Duration::from_secs(30))
        .await?;
    assert!(
        steward.wait_exit(Duration::from_secs(60)).is_some(),
        "steward did not stop on SIGTERM"
    );
    plane.stop().await;
    Ok(())
}
