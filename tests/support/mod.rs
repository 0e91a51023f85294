//! Shared helpers for the integration tests: the project's Python venv
//! (pinned indexify + tensorlake), an in-process dev control plane on
//! ephemeral ports, and agent processes that are killed when dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use steward_devserver::{DevServer, DevServerConfig, FunctionOptions, RequestOutcome, client};

pub mod oci;

/// Where the venv with the pinned packages lives: `$STEWARD_VENV`, else `./.venv`.
fn venv_dir() -> PathBuf {
    std::env::var_os("STEWARD_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"))
}

/// The venv with the pinned packages (the real `function-executor`, the
/// reference executor). `cargo xtask test` creates it; a test that needs it
/// fails at once without it, never skips.
pub fn venv() -> PathBuf {
    let dir = venv_dir();
    assert!(
        dir.join("bin/function-executor").exists(),
        "this test needs the real worker: no Python venv with tensorlake==0.3.9 at {}; \
         run `cargo xtask test`, which creates it",
        dir.display()
    );
    dir
}

/// PATH with the venv's bin first when there is a venv, so
/// `function-executor` resolves there. Tests that need only the fake worker
/// (or none) run without a venv; those that deploy a real function fail at
/// the deploy ([`venv`]).
pub fn path_with_venv() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let bin = venv_dir().join("bin");
    if bin.join("function-executor").exists() {
        format!("{}:{path}", bin.display())
    } else {
        path
    }
}

/// The native fake worker next to `steward`. `cargo xtask test` builds it;
/// under a plain `cargo test` it is built here on first use (cargo builds
/// only this package's binaries for its tests).
pub fn fake_worker() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let steward = Path::new(env!("CARGO_BIN_EXE_steward"));
    let bin = steward.with_file_name("steward-fake-worker");
    BUILD.call_once(|| {
        let profile_dir = steward.parent();
        let Some(target_dir) = profile_dir.and_then(Path::parent) else {
            return;
        };
        if bin.exists() {
            return;
        }
        let profile = match profile_dir.and_then(Path::file_name) {
            Some(p) if p == "release" => "release",
            _ => "dev",
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let status = Command::new(cargo)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--quiet", "-p", "steward-fake-worker"])
            .args(["--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .status();
        eprintln!("building {}: {status:?}", bin.display());
    });
    assert!(
        bin.exists(),
        "{} is missing and could not be built; run `cargo build --workspace` (cargo xtask test does)",
        bin.display()
    );
    bin
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A dev control plane on ephemeral ports with its own blob directory.
pub struct Plane {
    pub server: Option<DevServer>,
    pub blob_dir: tempfile::TempDir,
    pub url: String,
    pub grpc: String,
}

impl Plane {
    pub async fn start() -> Result<Plane> {
        Self::start_on("127.0.0.1:0", tempfile::tempdir()?).await
    }

    /// Starts on a given gRPC address (to restart a server in place).
    pub async fn start_on(grpc_addr: &str, blob_dir: tempfile::TempDir) -> Result<Plane> {
        Self::start_tls(grpc_addr, blob_dir, None).await
    }

    /// A plane serving the executor API over TLS (mutual with a client CA).
    pub async fn start_tls(
        grpc_addr: &str,
        blob_dir: tempfile::TempDir,
        tls: Option<steward_devserver::ServerTls>,
    ) -> Result<Plane> {
        let server = DevServer::start(DevServerConfig {
            tls,
            grpc_addr: grpc_addr.into(),
            http_addr: "127.0.0.1:0".into(),
            blob_dir: blob_dir.path().to_path_buf(),
            s3_base: None,
            s3: Default::default(),
        })
        .await?;
        Self::from_server(server, blob_dir)
    }

    /// A plane whose blobs live under `s3_base` on an S3 endpoint.
    pub async fn start_s3(s3_base: &str, s3: steward_blob_store::S3Config) -> Result<Plane> {
        let blob_dir = tempfile::tempdir()?;
        let server = DevServer::start(DevServerConfig {
            tls: None,
            grpc_addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
            blob_dir: blob_dir.path().to_path_buf(),
            s3_base: Some(s3_base.into()),
            s3,
        })
        .await?;
        Self::from_server(server, blob_dir)
    }

    fn from_server(server: DevServer, blob_dir: tempfile::TempDir) -> Result<Plane> {
        let url = server.http_url();
        let grpc = server.grpc_addr.to_string();
        Ok(Plane {
            server: Some(server),
            blob_dir,
            url,
            grpc,
        })
    }

    pub async fn deploy_hello(&self, options: FunctionOptions) -> Result<()> {
        venv(); // The real worker runs it: fail here without the venv.
        client::deploy(
            &self.url,
            "default",
            "hello",
            "1",
            &repo_root().join("examples/hello"),
            &options,
        )
        .await?;
        Ok(())
    }

    pub async fn invoke(&self, function: &str, input: serde_json::Value) -> Result<RequestOutcome> {
        self.invoke_app("hello", function, input).await
    }

    pub async fn invoke_app(
        &self,
        app: &str,
        function: &str,
        input: serde_json::Value,
    ) -> Result<RequestOutcome> {
        Ok(client::invoke(&self.url, "default", app, function, &input, 120).await?)
    }

    /// Deploys `examples/hello` under another application name.
    pub async fn deploy_hello_as(&self, app: &str, options: FunctionOptions) -> Result<()> {
        venv(); // The real worker runs it: fail here without the venv.
        client::deploy(
            &self.url,
            "default",
            app,
            "1",
            &repo_root().join("examples/hello"),
            &options,
        )
        .await?;
        Ok(())
    }

    /// Deploys `examples/compose` (nested calls, map/reduce, tail calls,
    /// futures, request state) as application `compose`.
    pub async fn deploy_compose(&self, options: FunctionOptions) -> Result<()> {
        venv(); // The real worker runs it: fail here without the venv.
        client::deploy(
            &self.url,
            "default",
            "compose",
            "1",
            &repo_root().join("examples/compose"),
            &options,
        )
        .await?;
        Ok(())
    }

    /// Sets how the plane answers `call_function`: "ok", "refuse" or "drop".
    pub async fn fault_call_function(&self, mode: &str) -> Result<()> {
        self.set_faults(serde_json::json!({ "call_function": mode }))
            .await
    }

    /// Changes the plane's injected faults (`POST /v1/faults`).
    pub async fn set_faults(&self, faults: serde_json::Value) -> Result<()> {
        let status = reqwest::Client::new()
            .post(format!("{}/v1/faults", self.url))
            .json(&faults)
            .send()
            .await?
            .status();
        if !status.is_success() {
            bail!("setting faults {faults}: HTTP {status}");
        }
        Ok(())
    }

    /// Deploys `examples/fake` (functions the fake worker acts out).
    pub async fn deploy_fake(&self, options: FunctionOptions) -> Result<()> {
        client::deploy(
            &self.url,
            "default",
            "fake",
            "1",
            &repo_root().join("examples/fake"),
            &options,
        )
        .await?;
        Ok(())
    }

    /// Starts a request without waiting; returns its id.
    pub async fn start_request(
        &self,
        app: &str,
        function: &str,
        input: serde_json::Value,
    ) -> Result<String> {
        let url = format!(
            "{}/v1/namespaces/default/applications/{app}/functions/{function}",
            self.url
        );
        let v: serde_json::Value = reqwest::Client::new()
            .post(url)
            .json(&input)
            .send()
            .await?
            .json()
            .await?;
        v["request_id"]
            .as_str()
            .map(String::from)
            .context("request_id")
    }

    /// Waits for a request's outcome.
    pub async fn outcome(&self, request_id: &str) -> Result<RequestOutcome> {
        let url = format!(
            "{}/v1/namespaces/default/requests/{request_id}?wait=true&timeout_s=120",
            self.url
        );
        Ok(reqwest::get(url).await?.json().await?)
    }

    /// The plane's counters (`GET /v1/stats`).
    pub async fn stats(&self) -> Result<serde_json::Value> {
        Ok(reqwest::get(format!("{}/v1/stats", self.url))
            .await?
            .json()
            .await?)
    }

    /// Every result and worker termination the executors reported.
    pub async fn log(&self) -> Result<serde_json::Value> {
        Ok(reqwest::get(format!("{}/v1/log", self.url))
            .await?
            .json()
            .await?)
    }

    /// Waits until a termination of a worker for `function` was reported.
    pub async fn wait_termination(&self, function: &str) -> Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log().await?;
            if let Some(t) = log["terminations"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["function"] == function)
            {
                return Ok(t.clone());
            }
            if Instant::now() > deadline {
                bail!("no termination of a {function} worker reported within 60s: {log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn post(&self, path: &str) -> Result<u16> {
        Ok(reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .send()
            .await?
            .status()
            .as_u16())
    }

    pub async fn delete(&self, path: &str) -> Result<u16> {
        Ok(reqwest::Client::new()
            .delete(format!("{}{path}", self.url))
            .send()
            .await?
            .status()
            .as_u16())
    }

    /// Waits until `n` executors are registered.
    pub async fn wait_executors(&self, n: usize) -> Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = client::executors(&self.url).await?;
            if v.as_array().map_or(0, |a| a.len()) >= n {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("{n} executor(s) did not register within 60s: {v}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }

    /// Stops the server and hands back its blob directory for a restart.
    pub async fn stop_keep_blobs(mut self) -> tempfile::TempDir {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
        let Plane { blob_dir, .. } = self;
        blob_dir
    }
}

/// A plane with `examples/fake` deployed and a registered Steward running
/// the fake worker, with `extra` arguments.
pub async fn fake_setup(options: FunctionOptions, extra: &[&str]) -> Result<(Plane, AgentProc)> {
    let plane = Plane::start().await?;
    plane.deploy_fake(options).await?;
    let bin = fake_worker();
    let mut args = vec!["--function-executor-bin", bin.to_str().unwrap_or_default()];
    args.extend_from_slice(extra);
    let steward = AgentProc::steward(&plane.grpc, plane.blob_dir.path(), &args)?;
    plane.wait_executors(1).await?;
    Ok((plane, steward))
}

/// Starts Steward with `args` on a fresh data directory and a server
/// address nothing answers at, for a start it must refuse before it
/// connects anywhere: waits up to 30 s for it to exit (one still running
/// then is killed). Its exit status (None if it ran on) and its stderr.
pub fn steward_refusal(args: &[&str]) -> Result<(Option<std::process::ExitStatus>, String)> {
    let data = tempfile::tempdir()?;
    let log = data.path().join("steward.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_steward"))
        // Workers die with this agent unless a test adopts them.
        .env("STEWARD_ADOPT_WORKERS", "false")
        .args(["--grpc-server-addr", "127.0.0.1:1"])
        .args(["--monitoring-server-host", "127.0.0.1"])
        .args(["--monitoring-server-port", "0"])
        .arg("--executor-cache-path")
        .arg(data.path().join("agent"))
        .args(args)
        .env("PATH", path_with_venv())
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting steward")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((status, std::fs::read_to_string(&log)?))
}

/// An agent process (Steward or the reference executor), killed on drop.
pub struct AgentProc {
    pub child: Child,
    pub monitoring_url: Option<String>,
    pub data_dir: tempfile::TempDir,
    /// Steward's parent cgroup, removed (with any worker cgroup left) on drop.
    pub cgroup_parent: Option<String>,
}

/// The parent cgroup of a test's Steward: its own (tests run side by side,
/// and each Steward reaps what is under its parent at start), named after
/// the data directory so that a restart on the same directory finds it.
pub fn cgroup_parent_for(data_dir: &Path) -> String {
    let name = data_dir
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        })
        .unwrap_or_default();
    format!("steward-test-{name}")
}

/// Writes an executable fake `nvidia-smi` into `dir` whose `--query-gpu`
/// answer is `rows` (CSV in `NVIDIA_SMI_QUERY` order, one line per GPU).
pub fn fake_nvidia_smi(dir: &Path, rows: &[&str]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let csv: String = rows.iter().map(|r| format!("{r}\\n")).collect();
    let script = format!(
        "#!/bin/sh\ncase \"$*\" in\n  *--query-gpu*) printf '{csv}' ;;\n  *) echo 'fake nvidia-smi: {} GPU(s)' ;;\nesac\n",
        rows.len()
    );
    let path = dir.join("nvidia-smi");
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Writes a secret (a token, a TLS key) readable by its owner only, as
/// Steward requires of them.
pub fn write_secret(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// `PATCH /admin/config` with `change`, as an operator holding `token`:
/// (status, body).
pub async fn patch_config(
    steward: &AgentProc,
    token: &str,
    change: serde_json::Value,
) -> Result<(u16, serde_json::Value)> {
    let url = format!(
        "{}/admin/config",
        steward
            .monitoring_url
            .as_deref()
            .context("monitoring url")?
    );
    let resp = reqwest::Client::new()
        .patch(url)
        .bearer_auth(token)
        .json(&change)
        .send()
        .await?;
    let code = resp.status().as_u16();
    Ok((code, resp.json().await.unwrap_or(serde_json::Value::Null)))
}

/// Removes a test Steward's parent cgroup and whatever is left under it.
pub fn remove_cgroup_parent(parent: &str) {
    if let steward_worker_driver::CgroupSetup::Enabled(c) =
        steward_worker_driver::Cgroups::detect(parent)
    {
        // A worker the kernel is still tearing down keeps its cgroup (and so
        // the parent) busy for a moment: try again until they are gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            c.reap_leftovers();
            c.remove_parents();
            if c.parents().iter().all(|p| !p.exists()) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // An OCI runtime (`--worker-driver oci`) also puts workers in the
    // other hierarchies (devices, freezer, ...): the parent goes there too.
    for dir in cgroup_dirs_named(parent) {
        remove_cgroup_tree(&dir);
    }
}

/// Every cgroup directory named `name` or below a directory of that name,
/// in every hierarchy (v1 and v2).
pub fn cgroup_dirs_named(name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = e.path();
            if e.file_name().to_string_lossy() == name {
                found.push(path);
            } else {
                stack.push(path);
            }
        }
    }
    found
}

/// Kills what is in cgroup `dir` and below, and removes them (the kernel
/// takes a moment to tear killed processes down).
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl AgentProc {
    /// Starts `steward` against `grpc` with a fresh data dir and `extra` args.
    pub fn steward(grpc: &str, blob_root: &Path, extra: &[&str]) -> Result<AgentProc> {
        Self::steward_with_path(grpc, blob_root, extra, &path_with_venv())
    }

    /// Like [`AgentProc::steward`] with an explicit PATH. Its stderr goes to
    /// `steward.log` in the data dir, printed if the test fails.
    pub fn steward_with_path(
        grpc: &str,
        blob_root: &Path,
        extra: &[&str],
        path: &str,
    ) -> Result<AgentProc> {
        Self::steward_with_env(grpc, blob_root, extra, path, &[])
    }

    pub fn steward_with_env(
        grpc: &str,
        blob_root: &Path,
        extra: &[&str],
        path: &str,
        envs: &[(&str, &str)],
    ) -> Result<AgentProc> {
        Self::steward_full(grpc, blob_root, extra, path, envs, tempfile::tempdir()?)
    }

    /// Stops this agent (SIGKILL) and hands back its data directory, to
    /// start another agent on it.
    pub fn into_data_dir(mut self) -> Result<tempfile::TempDir> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // What the killed agent left is for the next one to clean up.
        self.cgroup_parent = None;
        Ok(std::mem::replace(&mut self.data_dir, tempfile::tempdir()?))
    }

    /// Steward with every knob: extra args, PATH, environment, data directory.
    pub fn steward_full(
        grpc: &str,
        blob_root: &Path,
        extra: &[&str],
        path: &str,
        envs: &[(&str, &str)],
        data_dir: tempfile::TempDir,
    ) -> Result<AgentProc> {
        let bin = Path::new(env!("CARGO_BIN_EXE_steward"));
        Self::steward_bin(bin, grpc, blob_root, extra, path, envs, data_dir)
    }

    /// [`AgentProc::steward_full`] with the binary at `bin` (an upgrade to
    /// another path).
    pub fn steward_bin(
        bin: &Path,
        grpc: &str,
        blob_root: &Path,
        extra: &[&str],
        path: &str,
        envs: &[(&str, &str)],
        data_dir: tempfile::TempDir,
    ) -> Result<AgentProc> {
        let log = std::fs::File::create(data_dir.path().join("steward.log"))?;
        let has = |flag: &str| extra.iter().any(|a| a.starts_with(flag));
        let mut defaults: Vec<String> = Vec::new();
        let cgroup_parent = if has("--cgroup-parent") || has("--no-cgroups") {
            None
        } else {
            let p = cgroup_parent_for(data_dir.path());
            defaults.extend(["--cgroup-parent".into(), p.clone()]);
            Some(p)
        };
        // The dev control plane places workers without looking at the
        // host's resources (the real server would spread them over hosts):
        // tests declare a host big enough for the one-CPU, 1 GiB, 2 GiB-disk
        // workers of their apps on this two-core machine, unless they test
        // admission.
        if !has("--total-cpus") {
            defaults.extend(["--total-cpus".into(), "64".into()]);
        }
        if !has("--total-memory-bytes") {
            defaults.extend(["--total-memory-bytes".into(), (64u64 << 30).to_string()]);
        }
        if !has("--total-disk-bytes") {
            defaults.extend(["--total-disk-bytes".into(), (1u64 << 40).to_string()]);
        }
        let mut child = Command::new(bin)
            // Workers die with this agent unless a test adopts them.
            .env("STEWARD_ADOPT_WORKERS", "false")
            .args([
                "--grpc-server-addr",
                grpc,
                "--monitoring-server-host",
                "127.0.0.1",
                "--monitoring-server-port",
                "0",
            ])
            .arg("--executor-cache-path")
            .arg(data_dir.path())
            .arg("--blob-root")
            .arg(blob_root)
            .args(&defaults)
            .args(extra)
            .env("PATH", path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting steward")?;
        let stdout = child.stdout.take().context("steward stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("steward's first line: {line:?}"))?;
        let monitoring_url = v["monitoring_url"].as_str().map(String::from);
        Ok(AgentProc {
            child,
            monitoring_url,
            data_dir,
            cgroup_parent,
        })
    }

    /// Starts the reference Python executor (`indexify-cli executor`).
    pub fn reference(grpc: &str) -> Result<AgentProc> {
        Self::reference_with_args(grpc, &[])
    }

    /// The reference executor with `extra` arguments (`--config-path`, …).
    pub fn reference_with_args(grpc: &str, extra: &[&str]) -> Result<AgentProc> {
        let data_dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(venv().join("bin/indexify-cli"))
            .args([
                "executor",
                "--grpc-server-addr",
                grpc,
                "--monitoring-server-host",
                "127.0.0.1",
            ])
            .arg("--monitoring-server-port")
            .arg(port.to_string())
            .arg("--executor-cache-path")
            .arg(data_dir.path())
            .args(extra)
            .env("PATH", path_with_venv())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting indexify-cli executor")?;
        Ok(AgentProc {
            child,
            monitoring_url: Some(format!("http://127.0.0.1:{port}")),
            data_dir,
            cgroup_parent: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `path` until `check` accepts (status, body), up to `limit`.
    pub async fn wait_json(
        &self,
        path: &str,
        limit: Duration,
        check: impl Fn(u16, &serde_json::Value) -> bool,
    ) -> Result<(u16, serde_json::Value)> {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.get_json(path).await?;
            if check(got.0, &got.1) {
                return Ok(got);
            }
            if Instant::now() > deadline {
                bail!(
                    "{path} never matched within {}s; last: {} {}",
                    limit.as_secs(),
                    got.0,
                    got.1
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn get_json(&self, path: &str) -> Result<(u16, serde_json::Value)> {
        let url = format!(
            "{}{path}",
            self.monitoring_url
                .as_deref()
                .context("no monitoring url")?
        );
        let resp = reqwest::get(&url).await?;
        let code = resp.status().as_u16();
        Ok((code, resp.json().await?))
    }
}

/// The value of the sample line `series` (name with labels) in OpenMetrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

impl AgentProc {
    /// The agent's `/monitoring/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let url = format!(
            "{}/monitoring/metrics",
            self.monitoring_url
                .as_deref()
                .context("no monitoring url")?
        );
        Ok(reqwest::get(url).await?.text().await?)
    }

    /// Steward's log so far (empty for the reference executor).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("steward.log")).unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", self.log());
        }
        // The reference executor leaks its workers, each in a process group
        // of its own: kill its descendants' groups, then its own group.
        for pid in steward_host_resources::descendants(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = self.cgroup_parent.take() {
            remove_cgroup_parent(&p);
        }
        // A SIGKILLed Steward leaves its workers' directories (sockets,
        // scratch) for its next start to sweep; a test's Steward has none.
        if let Ok(id) = std::fs::read_to_string(self.data_dir.path().join("executor_id")) {
            let run_dir = steward_worker_driver::Isolation::default_run_dir(id.trim());
            let _ = std::fs::remove_dir_all(run_dir);
        }
    }
}

/// Whether a process with `pid` still exists (zombies count as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Pids of `function-executor` processes whose command line mentions `needle`.
pub fn worker_pids(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("function-executor") && cmd.contains(needle) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// Every usage record of the data directory `data_dir`, as `steward usage
/// export --format jsonl` prints them.
#[allow(dead_code)]
pub fn usage_export(data_dir: &Path) -> Result<Vec<serde_json::Value>> {
    let out = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args([
            "usage",
            "export",
            "--format",
            "jsonl",
            "--executor-cache-path",
        ])
        .arg(data_dir)
        .output()?;
    anyhow::ensure!(out.status.success(), "export: {out:?}");
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}
