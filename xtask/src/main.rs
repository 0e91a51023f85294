//! This binary defines the project's tasks that plain `cargo` cannot express:
//!
//! - `cargo xtask demo [--once]`: the agent against the embedded dev control
//!   plane, running the real Tensorlake functions of `examples/hello` and
//!   the composed application `examples/compose`.
//! - `cargo xtask test`: every test, after making sure the Python venv with
//!   the pinned reference packages exists.
//! - `cargo xtask bench`: release builds, then the side-by-side harness
//!   (`crates/bench`) against the reference executor; the table also goes to
//!   `target/bench/results.md`. Not part of `test`.
//!
//! Both create `.venv` (indexify==0.4.56, tensorlake==0.3.9) when missing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The reference packages every test and benchmark runs against.
const PINS: &[&str] = &["indexify==0.4.56", "tensorlake==0.3.9"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(args.iter().any(|a| a == "--once")),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("venv") => ensure_venv().map(|p| println!("{}", p.display())),
        _ => {
            eprintln!(
                "usage: cargo xtask <demo [--once] | test [cargo test args] | bench [harness args] | venv>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Creates `.venv` with the pinned packages unless it already has them.
fn ensure_venv() -> Result<PathBuf> {
    let venv = root().join(".venv");
    let stamp = venv.join(".steward-pins");
    let want = PINS.join(" ");
    let ready = venv.join("bin/function-executor").exists()
        && venv.join("bin/indexify-cli").exists()
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == want);
    if ready {
        return Ok(venv);
    }
    let python = std::env::var("STEWARD_PYTHON").unwrap_or_else(|_| "python3".into());
    eprintln!(
        "xtask: creating {} with {want} (once; takes a minute)",
        venv.display()
    );
    run(Command::new(&python).args(["-m", "venv"]).arg(&venv))
        .with_context(|| format!("{python} -m venv: is Python 3.10+ with venv installed?"))?;
    run(Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .args(PINS))?;
    std::fs::write(&stamp, &want)?;
    Ok(venv)
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test(extra: &[String]) -> Result<()> {
    let venv = ensure_venv()?;
    // The binaries the tests spawn (steward, steward-fake-worker), with the
    // same features as the test build so nothing compiles twice.
    run(cargo()
        .current_dir(root())
        .args(["build", "--workspace", "--bins", "--all-features"]))?;
    run(cargo()
        .current_dir(root())
        .args(["test", "--workspace", "--all-targets", "--all-features"])
        .args(extra)
        .env("STEWARD_VENV", &venv))
}

fn bench(extra: &[String]) -> Result<()> {
    let venv = ensure_venv()?;
    let root = root();
    run(cargo().current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "steward",
        "-p",
        "steward-fake-worker",
        "-p",
        "steward-bench",
    ]))?;
    std::fs::create_dir_all(root.join("target/bench"))?;
    run(Command::new(root.join("target/release/steward-bench"))
        .current_dir(&root)
        .args(extra)
        .arg("--out")
        .arg(root.join("target/bench/results.md"))
        .env("STEWARD_BIN", root.join("target/release/steward"))
        .env("STEWARD_VENV", &venv))
}

/// A child process killed (SIGKILL) when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Guard {
    fn first_line_json(&mut self) -> Result<serde_json::Value> {
        let out = self.0.stdout.take().context("child stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("expected a JSON line, got {line:?}"))
    }

    /// SIGTERM, then wait up to `limit`.
    fn terminate(&mut self, limit: Duration) -> Result<()> {
        run(Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string()))?;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait()? {
                if !status.success() {
                    bail!("exited with {status}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("did not exit within {}s of SIGTERM", limit.as_secs())
    }
}

fn steward_json(bin: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(bin)
        .args(args)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("steward {} failed", args.join(" "));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn demo(once: bool) -> Result<()> {
    let venv = ensure_venv()?;
    let root = root();
    run(cargo()
        .current_dir(&root)
        .args(["build", "--quiet", "--bin", "steward"]))?;
    let bin = root.join("target/debug/steward");
    let work = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut plane = Guard(
        Command::new(&bin)
            .args([
                "devserver",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--blob-dir",
            ])
            .arg(work.join("blobs"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the dev control plane")?,
    );
    let p = plane.first_line_json()?;
    let grpc = p["grpc_addr"].as_str().context("grpc_addr")?.to_string();
    let http = p["http_url"].as_str().context("http_url")?.to_string();

    let mut agent = Guard(
        Command::new(&bin)
            .args([
                "--grpc-server-addr",
                &grpc,
                "--monitoring-server-host",
                "127.0.0.1",
                "--monitoring-server-port",
                "0",
            ])
            .arg("--executor-cache-path")
            .arg(work.join("agent"))
            .arg("--blob-root")
            .arg(work.join("blobs"))
            .env("PATH", &path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .context("starting steward")?,
    );
    let a = agent.first_line_json()?;
    let monitoring = a["monitoring_url"]
        .as_str()
        .context("monitoring_url")?
        .to_string();

    let deadline = Instant::now() + Duration::from_secs(30);
    while steward_json(&bin, &["devserver", "executors", "--server", &http])?
        .as_array()
        .is_none_or(|a| a.is_empty())
    {
        if Instant::now() > deadline {
            bail!("steward did not register with the dev control plane within 30s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for app in ["hello", "compose"] {
        let dir = root.join("examples").join(app);
        let dir = dir.to_str().context("path")?;
        steward_json(&bin, &["devserver", "deploy", dir, "--server", &http])?;
    }

    println!(
        "\nSteward ran examples/hello and examples/compose on the real tensorlake function-executor:\n"
    );
    println!(
        "{:<8} {:<16} {:<16} {:<9} result",
        "app", "function", "input", "status"
    );
    for (app, function, input) in [
        ("hello", "greet", "\"Steward\""),
        ("hello", "sum_of_squares", "[1, 2, 3, 4, 5]"),
        ("hello", "explode", "\"demo\""),
        ("compose", "nested", "3"),
        ("compose", "tail", "4"),
        ("compose", "map_squares", "5"),
        ("compose", "reduce_sum", "10"),
        ("compose", "futures", "3"),
        ("compose", "state_roundtrip", "\"Steward\""),
        ("compose", "failing_child", "1"),
    ] {
        let started = Instant::now();
        let out = steward_json(
            &bin,
            &[
                "devserver",
                "invoke",
                app,
                function,
                "--input",
                input,
                "--server",
                &http,
            ],
        )?;
        let status = out["status"].as_str().unwrap_or("?");
        let result = if status == "success" {
            out["output"].to_string()
        } else {
            format!(
                "failure reason {}",
                out["failure_reason"].as_str().unwrap_or("?")
            )
        };
        println!(
            "{app:<8} {function:<16} {input:<16} {status:<9} {result}   ({} ms)",
            started.elapsed().as_millis()
        );
    }
    println!("\nMonitoring: {monitoring}/monitoring/health  {monitoring}/monitoring/metrics");
    println!(
        "State:      {monitoring}/state/function-executors  {monitoring}/state/allocations  {monitoring}/state/events"
    );
    println!("Control plane: {http}/v1/executors");
    if once {
        agent
            .terminate(Duration::from_secs(30))
            .context("stopping steward")?;
        plane
            .terminate(Duration::from_secs(10))
            .context("stopping the dev control plane")?;
        println!("\nStopped cleanly.");
        return Ok(());
    }
    println!("\nRunning; press Ctrl-C to stop.");
    let _ = agent.0.wait();
    Ok(())
}
