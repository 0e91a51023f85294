//! `steward-bench`: runs each scenario against Steward and against the
//! reference Python executor (`indexify-cli executor` from the venv), on the
//! same dev control plane code, alternating agents, for several rounds, and
//! prints a table of medians, spread and the Steward/reference ratio. With
//! `--baseline-steward` a second Steward binary (an older build) runs next
//! to them, in its own column, with a Steward/baseline ratio.
//! `cargo xtask bench` builds everything in release mode and runs it.
//!
//! Must not know about: Steward's internals; it drives both agents from the
//! outside (processes, the control plane, monitoring endpoints, /proc).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use steward_devserver::{DevServer, DevServerConfig, FunctionOptions, client};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Agent {
    Steward,
    /// The `--baseline-steward` binary, driven as Steward is.
    Baseline,
    Reference,
}

impl Agent {
    /// Steward, this build or the baseline one.
    fn is_steward(self) -> bool {
        matches!(self, Agent::Steward | Agent::Baseline)
    }

    /// The agents a run compares, in the order an even round takes them.
    fn compared(baseline: bool) -> Vec<Agent> {
        let mut agents = vec![Agent::Steward];
        if baseline {
            agents.push(Agent::Baseline);
        }
        agents.push(Agent::Reference);
        agents
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Worker {
    Real,
    Fake,
}

struct Env {
    steward: PathBuf,
    /// A second `steward` binary measured as [`Agent::Baseline`].
    baseline: Option<PathBuf>,
    fake_worker: PathBuf,
    venv: PathBuf,
    repo: PathBuf,
    /// A directory whose `function-executor` is the fake worker (for the reference).
    fake_path_dir: tempfile::TempDir,
    /// A command Steward runs under (a profiler), from `--steward-wrapper`.
    wrapper: Vec<String>,
    /// The OCI runtime of the sandbox scenario, from `--oci-runtime`.
    oci_runtime: String,
}

struct Plane {
    /// One keep-alive HTTP client for every call, as a real caller would use.
    http: reqwest::Client,
    server: Option<DevServer>,
    _blobs: tempfile::TempDir,
    blob_dir: PathBuf,
    url: String,
    grpc: String,
}

impl Plane {
    async fn start() -> Result<Plane> {
        let blobs = tempfile::tempdir()?;
        let server = DevServer::start(DevServerConfig {
            tls: None,
            grpc_addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
            blob_dir: blobs.path().to_path_buf(),
            s3_base: None,
            s3: Default::default(),
        })
        .await?;
        let url = server.http_url();
        let grpc = server.grpc_addr.to_string();
        let blob_dir = std::fs::canonicalize(blobs.path())?;
        Ok(Plane {
            http: reqwest::Client::new(),
            server: Some(server),
            _blobs: blobs,
            blob_dir,
            url,
            grpc,
        })
    }

    /// Stops the control plane and starts a fresh one on the same gRPC
    /// address (a server restart: it knows no executor until one reports).
    async fn restart(&mut self, down_for: Duration) -> Result<()> {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
        tokio::time::sleep(down_for).await;
        let server = DevServer::start(DevServerConfig {
            tls: None,
            grpc_addr: self.grpc.clone(),
            http_addr: "127.0.0.1:0".into(),
            blob_dir: self.blob_dir.clone(),
            s3_base: None,
            s3: Default::default(),
        })
        .await?;
        self.url = server.http_url();
        self.server = Some(server);
        Ok(())
    }

    async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }

    async fn deploy(
        &self,
        env: &Env,
        dir: &str,
        name: &str,
        options: &FunctionOptions,
    ) -> Result<()> {
        client::deploy(
            &self.url,
            "default",
            name,
            "1",
            &env.repo.join(dir),
            options,
        )
        .await?;
        Ok(())
    }

    async fn invoke(
        &self,
        app: &str,
        function: &str,
        input: Value,
    ) -> Result<steward_devserver::RequestOutcome> {
        invoke_at(&self.http, &self.url, app, function, input).await
    }

    async fn batch(&self, app: &str, function: &str, count: usize) -> Result<()> {
        let url = format!(
            "{}/v1/namespaces/default/applications/{app}/functions/{function}/batch?count={count}",
            self.url
        );
        let resp = self.http.post(url).body("\"x\"").send().await?;
        if !resp.status().is_success() {
            bail!("batch failed: {}", resp.text().await?);
        }
        Ok(())
    }

    async fn stats(&self) -> Result<Value> {
        Ok(self
            .http
            .get(format!("{}/v1/stats", self.url))
            .send()
            .await?
            .json()
            .await?)
    }

    async fn wait_executor(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while client::executors(&self.url)
            .await?
            .as_array()
            .is_none_or(|a| a.is_empty())
        {
            if Instant::now() > deadline {
                bail!("agent did not register within 60s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Waits until no request is pending; fails after `limit`.
    async fn drain(&self, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let s = self.stats().await?;
            let pending = s["requests"]["pending"].as_u64().unwrap_or(0);
            let failed = s["requests"]["failure"].as_u64().unwrap_or(0);
            if failed > 0 {
                bail!("{failed} request(s) failed");
            }
            if pending == 0 {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!(
                    "{pending} request(s) still pending after {}s",
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Calls `function` of `app` through the control plane at `url` and waits
/// for its outcome.
async fn invoke_at(
    http: &reqwest::Client,
    url: &str,
    app: &str,
    function: &str,
    input: Value,
) -> Result<steward_devserver::RequestOutcome> {
    let url = format!(
        "{url}/v1/namespaces/default/applications/{app}/functions/{function}?wait=true&timeout_s=300"
    );
    let body = http.post(url).json(&input).send().await?.text().await?;
    let out: steward_devserver::RequestOutcome = serde_json::from_str(&body)
        .with_context(|| format!("{app}/{function} answered: {body}"))?;
    if out.status != "success" {
        bail!("{app}/{function} did not succeed: {out:?}");
    }
    Ok(out)
}

struct AgentProc {
    child: Child,
    monitoring: String,
    _data: tempfile::TempDir,
    /// Steward's parent cgroup, removed with anything left under it.
    cgroup_parent: Option<String>,
    /// The OCI runtime whose containers under the data directory are
    /// deleted when the agent is dropped (`--worker-driver oci`).
    oci_runtime: String,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        // The reference executor leaks its workers, each in a process group
        // of its own. Freeze the agent so it starts no more, kill every
        // descendant and its group, then the agent's own group. This also
        // runs when a signal drops the whole run.
        use nix::sys::signal::{Signal, kill, killpg};
        use nix::unistd::Pid;
        // An agent already reaped (a clean stop) has no pid left to signal.
        if matches!(self.child.try_wait(), Ok(None)) {
            let agent = Pid::from_raw(self.child.id() as i32);
            let _ = kill(agent, Signal::SIGSTOP);
            for p in steward_host_resources::descendants(self.child.id()) {
                let p = Pid::from_raw(p as i32);
                let _ = killpg(p, Signal::SIGKILL);
                let _ = kill(p, Signal::SIGKILL);
            }
            let _ = killpg(agent, Signal::SIGKILL);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The workers' directories a killed Steward (or one that left its
        // workers to adoption) leaves under the worker run directory.
        if let Ok(id) = std::fs::read_to_string(self._data.path().join("executor_id")) {
            let run_dir = steward_worker_driver::Isolation::default_run_dir(id.trim());
            let _ = std::fs::remove_dir_all(run_dir);
        }
        for id in self.containers(&self.oci_runtime) {
            let _ = Command::new(&self.oci_runtime)
                .arg("--root")
                .arg(self.oci_state())
                .args(["delete", "--force", &id])
                .output();
        }
        if let Some(parent) = self.cgroup_parent.take() {
            if let steward_worker_driver::CgroupSetup::Enabled(c) =
                steward_worker_driver::Cgroups::detect(&parent)
            {
                c.reap_leftovers();
                c.remove_parents();
            }
            // The OCI runtime's own hierarchies (devices, freezer, ...).
            remove_cgroups_named(Path::new("/sys/fs/cgroup"), &parent);
        }
    }
}

/// Removes every (by now empty) cgroup directory named `name` under `dir`,
/// children first.
fn remove_cgroups_named(dir: &Path, name: &str) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        if e.file_name().to_string_lossy() == name {
            remove_cgroup_tree(&path);
        } else {
            remove_cgroups_named(&path, name);
        }
    }
}

/// Removes cgroup `dir` and the cgroups below it.
fn remove_cgroup_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn clock_ticks() -> f64 {
    100.0 // USER_HZ on Linux
}

impl AgentProc {
    fn start(env: &Env, agent: Agent, plane: &Plane, worker: Worker) -> Result<AgentProc> {
        Self::start_wrapped(env, agent, plane, worker, &env.wrapper)
    }

    fn start_wrapped(
        env: &Env,
        agent: Agent,
        plane: &Plane,
        worker: Worker,
        wrapper: &[String],
    ) -> Result<AgentProc> {
        Self::start_full(env, agent, plane, worker, wrapper, &[])
    }

    /// Starts the agent under `wrapper` (a program and its arguments, such
    /// as valgrind) when it is not empty; `extra` goes to Steward only.
    fn start_full(
        env: &Env,
        agent: Agent,
        plane: &Plane,
        worker: Worker,
        wrapper: &[String],
        extra: &[&str],
    ) -> Result<AgentProc> {
        let data = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let cgroup_parent = format!("steward-bench-{port}");
        Self::start_in(
            env,
            agent,
            plane,
            worker,
            wrapper,
            extra,
            data,
            cgroup_parent,
        )
    }

    /// SIGKILLs the agent alone (whatever it started stays, as after a
    /// crash) and starts it again on the same data directory and parent
    /// cgroup, with `extra`; the monitoring port is new.
    fn restart(&mut self, env: &Env, plane: &Plane, extra: &[&str]) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The old one is dead; what it leaves to its drop (an empty data
        // directory, no parent cgroup) touches nothing the new one runs.
        let data = std::mem::replace(&mut self._data, tempfile::tempdir()?);
        let parent = self.cgroup_parent.take().unwrap_or_default();
        let next = Self::start_in(
            env,
            Agent::Steward,
            plane,
            Worker::Real,
            &[],
            extra,
            data,
            parent,
        )?;
        drop(std::mem::replace(self, next));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn start_in(
        env: &Env,
        agent: Agent,
        plane: &Plane,
        worker: Worker,
        wrapper: &[String],
        extra: &[&str],
        data: tempfile::TempDir,
        cgroup_parent: String,
    ) -> Result<AgentProc> {
        use std::os::unix::process::CommandExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let venv_bin = env.venv.join("bin");
        let path = match (agent, worker) {
            (Agent::Reference, Worker::Fake) => format!(
                "{}:{}",
                env.fake_path_dir.path().display(),
                venv_bin.display()
            ),
            _ => format!("{}", venv_bin.display()),
        };
        let path = format!("{path}:{}", std::env::var("PATH").unwrap_or_default());
        let mut cmd = match agent {
            Agent::Steward | Agent::Baseline => {
                let bin = match (agent, &env.baseline) {
                    (Agent::Baseline, Some(b)) => b,
                    (Agent::Baseline, None) => bail!("no --baseline-steward given"),
                    _ => &env.steward,
                };
                let mut c = match wrapper.split_first() {
                    Some((program, args)) => {
                        let mut c = Command::new(program);
                        c.args(args).arg(bin);
                        c
                    }
                    None => Command::new(bin),
                };
                c.args([
                    "--grpc-server-addr",
                    &plane.grpc,
                    "--monitoring-server-host",
                    "127.0.0.1",
                ])
                .args(["--monitoring-server-port", &port.to_string()])
                .arg("--executor-cache-path")
                .arg(data.path())
                .arg("--blob-root")
                .arg(&plane.blob_dir)
                // The dev control plane places workers without looking at
                // resources: declare a host that admits the scenarios'
                // hundreds of one-CPU workers (limits stay per worker).
                .args(["--total-cpus", "100000"])
                .args(["--total-memory-bytes", &(1u64 << 50).to_string()])
                .args(["--total-disk-bytes", &(1u64 << 50).to_string()])
                .args(["--cgroup-parent", &cgroup_parent])
                .args(extra)
                .env("RUST_LOG", "warn")
                // Workers die with the agent (a killed run leaves none).
                .env("STEWARD_ADOPT_WORKERS", "false");
                if worker == Worker::Fake {
                    c.arg("--function-executor-bin").arg(&env.fake_worker);
                }
                c
            }
            Agent::Reference => {
                let mut c = Command::new(venv_bin.join("indexify-cli"));
                c.args([
                    "executor",
                    "--grpc-server-addr",
                    &plane.grpc,
                    "--monitoring-server-host",
                    "127.0.0.1",
                ])
                .args(["--monitoring-server-port", &port.to_string()])
                .arg("--executor-cache-path")
                .arg(data.path());
                c
            }
        };
        let child = cmd
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {agent:?}"))?;
        Ok(AgentProc {
            child,
            monitoring: format!("http://127.0.0.1:{port}"),
            _data: data,
            cgroup_parent: agent.is_steward().then_some(cgroup_parent),
            oci_runtime: env.oci_runtime.clone(),
        })
    }

    /// The OCI runtime's state root under Steward's data directory.
    fn oci_state(&self) -> PathBuf {
        self._data.path().join("oci/state")
    }

    /// The ids of the containers `runtime` lists under the agent's data
    /// directory (none without the OCI driver).
    fn containers(&self, runtime: &str) -> Vec<String> {
        let root = self.oci_state();
        if !root.exists() {
            return Vec::new();
        }
        let Ok(out) = Command::new(runtime)
            .arg("--root")
            .arg(&root)
            .args(["list", "--format", "json"])
            .output()
        else {
            return Vec::new();
        };
        serde_json::from_slice::<Option<Vec<Value>>>(&out.stdout)
            .ok()
            .flatten()
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c["id"].as_str().map(String::from))
            .collect()
    }

    /// Stops the agent with SIGTERM and waits up to `limit` for it to exit
    /// (a clean stop removes its workers, containers included); `Drop`
    /// kills whatever is left.
    async fn stop_cleanly(&mut self, limit: Duration) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + limit;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// CPU seconds (user + system) used so far by the agent process itself.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let rest = stat.rsplit_once(')').map(|r| r.1).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / clock_ticks()
    }

    /// The `/proc/<pid>/task/<tid>` directories of the agent's live threads
    /// whose name starts with `prefix` (threads that already exited are gone).
    fn threads(&self, prefix: &str) -> Vec<std::path::PathBuf> {
        let dir = format!("/proc/{}/task", self.child.id());
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|t| t.path())
            .filter(|t| {
                std::fs::read_to_string(t.join("comm"))
                    .is_ok_and(|name| name.trim_end().starts_with(prefix))
            })
            .collect()
    }

    /// CPU seconds used so far by the agent's live threads whose name
    /// starts with `prefix`, to the nanosecond (`schedstat`; `stat` counts
    /// in 10 ms ticks, too coarse for one thread).
    fn thread_cpu_seconds(&self, prefix: &str) -> f64 {
        self.threads(prefix)
            .iter()
            .filter_map(|t| std::fs::read_to_string(t.join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map(|ns| ns / 1e9)
            .sum()
    }

    /// Context switches (voluntary + involuntary) of the agent's live
    /// threads so far.
    fn context_switches(&self) -> f64 {
        self.thread_switches("")
    }

    /// Context switches of the agent's live threads whose name starts with `prefix`.
    fn thread_switches(&self, prefix: &str) -> f64 {
        self.threads(prefix)
            .iter()
            .filter_map(|t| std::fs::read_to_string(t.join("status")).ok())
            .flat_map(|status| {
                status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// (current RSS, peak RSS) in MiB.
    fn rss_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let kb = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
    }

    async fn wait_startup(&self) -> Result<Duration> {
        let started = Instant::now();
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http
                .get(format!("{}/monitoring/startup", self.monitoring))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("startup probe never turned 200");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Samples of one metric per agent.
#[derive(Default)]
struct Table {
    rows: BTreeMap<(usize, String), Row>,
    order: usize,
    /// Whether a baseline Steward runs: its columns are shown.
    baseline: bool,
}

/// A metric's unit, its samples (Steward's, the reference's, the baseline
/// Steward's) and a failure note.
type Row = (String, Vec<f64>, Vec<f64>, Vec<f64>, Option<String>);

impl Table {
    /// The row for `metric`, created (in first-seen order) when new.
    fn row(&mut self, metric: &str, unit: &str) -> &mut Row {
        let key = match self.rows.keys().find(|(_, m)| m == metric) {
            Some(k) => k.clone(),
            None => {
                self.order += 1;
                (self.order, metric.to_string())
            }
        };
        self.rows
            .entry(key)
            .or_insert_with(|| (unit.to_string(), Vec::new(), Vec::new(), Vec::new(), None))
    }

    fn add(&mut self, metric: &str, unit: &str, agent: Agent, value: f64) {
        let row = self.row(metric, unit);
        match agent {
            Agent::Steward => row.1.push(value),
            Agent::Reference => row.2.push(value),
            Agent::Baseline => row.3.push(value),
        }
    }

    fn fail(&mut self, metric: &str, agent: Agent, why: &str) {
        self.row(metric, "").4 = Some(format!("{agent:?}: {why}"));
    }

    fn render(&self) -> String {
        let stat = |v: &[f64]| -> String {
            if v.is_empty() {
                return "-".into();
            }
            let mut s = v.to_vec();
            s.sort_by(|a, b| a.total_cmp(b));
            let med = s[s.len() / 2];
            if s.len() > 1 {
                format!("{} ({}–{})", fmt(med), fmt(s[0]), fmt(s[s.len() - 1]))
            } else {
                fmt(med)
            }
        };
        let median = |v: &[f64]| {
            let mut s = v.to_vec();
            s.sort_by(|a, b| a.total_cmp(b));
            s.get(s.len() / 2).copied()
        };
        let ratio = |a: &[f64], b: &[f64]| match (median(a), median(b)) {
            (Some(a), Some(b)) if b != 0.0 => format!("{:.3}", a / b),
            _ => "-".into(),
        };
        let mut out = String::from(if self.baseline {
            "| metric | unit | Steward median (min–max) | baseline Steward median (min–max) | Steward / baseline | reference median (min–max) | Steward / reference |\n|---|---|---|---|---|---|---|\n"
        } else {
            "| metric | unit | Steward median (min–max) | reference median (min–max) | Steward / reference |\n|---|---|---|---|---|\n"
        });
        for ((_, metric), (unit, st, re, base, note)) in &self.rows {
            let note = note
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            let baseline = if self.baseline {
                format!(" {} | {} |", stat(base), ratio(st, base))
            } else {
                String::new()
            };
            out.push_str(&format!(
                "| {metric}{note} | {unit} | {} |{baseline} {} | {} |\n",
                stat(st),
                stat(re),
                ratio(st, re)
            ));
        }
        out
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Startup, cold start and warm sequential latency with one kind of worker.
/// Worker cold start with and without cgroups (Steward only): a fresh
/// agent and plane per sample, alternating, the control plane's placement
/// → RUNNING time for the first worker.
async fn cgroups(env: &Env, rounds: usize, t: &mut Table) -> Result<()> {
    for round in 0..rounds {
        let order: [(bool, &str); 2] = if round % 2 == 0 {
            [(true, "with"), (false, "without")]
        } else {
            [(false, "without"), (true, "with")]
        };
        for (on, label) in order {
            for worker in [Worker::Real, Worker::Fake] {
                let plane = Plane::start().await?;
                let (dir, app, function, input, wlabel) = worker.hello_app();
                plane
                    .deploy(env, dir, app, &FunctionOptions::default())
                    .await?;
                let extra: &[&str] = if on { &[] } else { &["--no-cgroups"] };
                let proc = AgentProc::start_full(
                    env,
                    Agent::Steward,
                    &plane,
                    worker,
                    &env.wrapper,
                    extra,
                )?;
                proc.wait_startup().await?;
                plane.wait_executor().await?;
                plane.invoke(app, function, input).await?;
                if let Some(c) = plane.stats().await?["cold_starts_ms"]
                    .get(0)
                    .and_then(Value::as_f64)
                {
                    t.add(
                        &format!("11. cold start {label} cgroups: new worker → RUNNING reported ({wlabel})"),
                        "ms",
                        Agent::Steward,
                        c,
                    );
                }
                drop(proc);
            }
        }
    }
    Ok(())
}

/// The functions of `examples/hello` the restart scenario keeps warm: one
/// real worker each.
fn restart_functions() -> Vec<(&'static str, Value)> {
    vec![
        ("greet", json!("bench")),
        ("sum_of_squares", json!([1, 2, 3])),
        ("echo_twice", json!("x")),
        ("visible_gpus", json!("x")),
    ]
}

/// Calls every function of `fns` at once and waits until all answered.
async fn invoke_all(plane: &Plane, fns: &[(&'static str, Value)]) -> Result<()> {
    let mut calls = tokio::task::JoinSet::new();
    for (f, input) in fns {
        let (http, url, f, input) = (plane.http.clone(), plane.url.clone(), *f, input.clone());
        calls.spawn(async move { invoke_at(&http, &url, "hello", f, input).await });
    }
    while let Some(r) = calls.join_next().await {
        r??;
    }
    Ok(())
}

/// Steward SIGKILLed with four warm real workers and started again on the
/// same data directory: with adoption the new one takes the workers over,
/// without it they died with the old one and start cold. Timed from the
/// SIGKILL: the new Steward ready (its first report made and the first
/// desired state applied: `/monitoring/startup` 200), and every function
/// answering again.
async fn restart(env: &Env, rounds: usize, t: &mut Table) -> Result<()> {
    let fns = restart_functions();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for adopt in order {
            let plane = Plane::start().await?;
            plane
                .deploy(env, "examples/hello", "hello", &FunctionOptions::default())
                .await?;
            let flag = if adopt {
                "--adopt-workers=true"
            } else {
                "--adopt-workers=false"
            };
            let mut proc =
                AgentProc::start_full(env, Agent::Steward, &plane, Worker::Real, &[], &[flag])?;
            proc.wait_startup().await?;
            plane.wait_executor().await?;
            invoke_all(&plane, &fns).await?;
            let killed = Instant::now();
            proc.restart(env, &plane, &[flag])?;
            proc.wait_startup().await?;
            let ready = killed.elapsed();
            invoke_all(&plane, &fns).await?;
            let serving = killed.elapsed();
            let label = if adopt {
                "adopting its 4 workers"
            } else {
                "cold: its 4 workers died with it"
            };
            t.add(
                &format!("14. restart: SIGKILL → new Steward ready, first report made ({label})"),
                "ms",
                Agent::Steward,
                ready.as_secs_f64() * 1000.0,
            );
            t.add(
                &format!("14. restart: SIGKILL → all 4 functions answer again ({label})"),
                "ms",
                Agent::Steward,
                serving.as_secs_f64() * 1000.0,
            );
            drop(proc);
        }
    }
    Ok(())
}

/// The host's page with `workers` fake workers running: how long the whole
/// page takes to come (its first data), its weight, and the agent's CPU
/// over 20 s with no page open and with one open (polling its live
/// fragment every 2 s, as the page's script does), one after the other in
/// one run.
async fn page(env: &Env, workers: usize, t: &mut Table) -> Result<()> {
    let plane = Plane::start().await?;
    let apps: Vec<String> = (0..workers).map(|i| format!("p{i}")).collect();
    for app in &apps {
        plane
            .deploy(env, "examples/fake", app, &FunctionOptions::default())
            .await?;
    }
    let proc = AgentProc::start(env, Agent::Steward, &plane, Worker::Fake)?;
    proc.wait_startup().await?;
    plane.wait_executor().await?;
    for app in &apps {
        plane.batch(app, "noop", 1).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    while (plane.stats().await?["function_executors_running"]
        .as_u64()
        .unwrap_or(0) as usize)
        < workers
    {
        if Instant::now() > deadline {
            bail!("{workers} workers not running within 240 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    plane.drain(Duration::from_secs(120)).await?;
    let label = format!("15. page at {workers} workers");
    let url = format!("{}/", proc.monitoring);
    for round in 0..5 {
        let started = Instant::now();
        let body = plane.http.get(&url).send().await?.text().await?;
        if round == 0 {
            // Kept to see what weighs what.
            let dir = env.repo.join("target/page");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(format!("bench-{workers}-workers.html")), &body)?;
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        t.add(
            &format!("{label}: whole page served (first data)"),
            "ms",
            Agent::Steward,
            ms,
        );
        t.add(
            &format!("{label}: page weight"),
            "KiB",
            Agent::Steward,
            body.len() as f64 / 1024.0,
        );
    }
    let window = Duration::from_secs(20);
    let cpu0 = proc.cpu_seconds();
    tokio::time::sleep(window).await;
    let idle = (proc.cpu_seconds() - cpu0) / window.as_secs_f64() * 1000.0;
    let fragment = format!("{}/dashboard?fragment=1", proc.monitoring);
    let cpu1 = proc.cpu_seconds();
    let started = Instant::now();
    while started.elapsed() < window {
        plane.http.get(&fragment).send().await?.text().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let open = (proc.cpu_seconds() - cpu1) / started.elapsed().as_secs_f64() * 1000.0;
    t.add(
        &format!("{label}: agent CPU per second, no page open"),
        "ms",
        Agent::Steward,
        idle,
    );
    t.add(
        &format!("{label}: agent CPU per second, one page open"),
        "ms",
        Agent::Steward,
        open,
    );
    drop(proc);
    Ok(())
}

impl Worker {
    /// The app, function and input a scenario runs on this worker, and its label.
    fn hello_app(
        self,
    ) -> (
        &'static str,
        &'static str,
        &'static str,
        Value,
        &'static str,
    ) {
        match self {
            Worker::Real => (
                "examples/hello",
                "hello",
                "greet",
                json!("bench"),
                "real worker",
            ),
            Worker::Fake => ("examples/fake", "fake", "noop", json!("x"), "fake worker"),
        }
    }
}

async fn latency(env: &Env, agent: Agent, worker: Worker, n: usize, t: &mut Table) -> Result<()> {
    let plane = Plane::start().await?;
    let (dir, app, function, input, label) = worker.hello_app();
    plane
        .deploy(env, dir, app, &FunctionOptions::default())
        .await?;
    let proc = AgentProc::start(env, agent, &plane, worker)?;
    let startup = proc.wait_startup().await?;
    plane.wait_executor().await?;
    if worker == Worker::Fake {
        t.add(
            "6. agent start → /monitoring/startup 200",
            "ms",
            agent,
            startup.as_secs_f64() * 1000.0,
        );
    }
    plane.invoke(app, function, input.clone()).await?;
    if let Some(c) = plane.stats().await?["cold_starts_ms"]
        .get(0)
        .and_then(Value::as_f64)
    {
        t.add(
            &format!("3. cold start: new worker → RUNNING reported ({label})"),
            "ms",
            agent,
            c,
        );
    }
    let samples = warm_sequential(&plane, app, function, &input, n).await?;
    for (p, name) in [(0.5, "p50"), (0.95, "p95"), (0.99, "p99")] {
        t.add(
            &format!("1. sequential latency, warm {label}, {name}"),
            "ms",
            agent,
            percentile(&samples, p),
        );
    }
    drop(proc);
    plane.stop().await;
    Ok(())
}

/// What one throughput run measured.
struct ThroughputRun {
    alloc_per_s: f64,
    cpu_per_1000: f64,
    /// Of which the metering thread's.
    metering_cpu_per_1000: f64,
    metering_switches_per_alloc: f64,
    /// Usage records per ledger write and fsync (group commit).
    records_per_commit: Option<f64>,
    /// State reports the agent sent per allocation (Steward's own count).
    reports_per_alloc: Option<f64>,
    switches_per_alloc: f64,
    idle_rss: f64,
    peak_rss: f64,
}

/// `per_app` × 4 no-op allocations over 4 workers × max_concurrency 8, the
/// agent started with `extra`.
async fn throughput_run(
    env: &Env,
    agent: Agent,
    extra: &[&str],
    per_app: usize,
) -> Result<ThroughputRun> {
    let plane = Plane::start().await?;
    let options = FunctionOptions {
        max_concurrency: 8,
        ..FunctionOptions::default()
    };
    let apps = ["t0", "t1", "t2", "t3"];
    for app in apps {
        plane.deploy(env, "examples/fake", app, &options).await?;
    }
    let proc = AgentProc::start_full(env, agent, &plane, Worker::Fake, &env.wrapper, extra)?;
    plane.wait_executor().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle_rss, _) = proc.rss_mib();
    for app in apps {
        plane.invoke(app, "noop", json!("warm")).await?;
    }
    let reports0 = agent_counter(&proc, "steward_state_reports_total ").await;
    let cpu0 = proc.cpu_seconds();
    let metering0 = proc.thread_cpu_seconds("steward-meter");
    let metering_switches0 = proc.thread_switches("steward-meter");
    let switches0 = proc.context_switches();
    let started = Instant::now();
    for app in apps {
        plane.batch(app, "noop", per_app).await?;
    }
    plane.drain(Duration::from_secs(300)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = proc.cpu_seconds() - cpu0;
    let metering = proc.thread_cpu_seconds("steward-meter") - metering0;
    let metering_switches = proc.thread_switches("steward-meter") - metering_switches0;
    let switches = proc.context_switches() - switches0;
    let n = (per_app * apps.len()) as f64;
    let records_per_commit = match (
        agent_counter(&proc, "steward_usage_ledger_records_total ").await,
        agent_counter(&proc, "steward_usage_ledger_commit_seconds_count ").await,
    ) {
        (Some(r), Some(c)) if c > 0.0 => Some(r / c),
        _ => None,
    };
    let reports = agent_counter(&proc, "steward_state_reports_total ").await;
    let reports_per_alloc = reports.zip(reports0).map(|(b, a)| (b - a) / n);
    let (_, peak_rss) = proc.rss_mib();
    drop(proc);
    plane.stop().await;
    Ok(ThroughputRun {
        alloc_per_s: n / elapsed,
        cpu_per_1000: cpu * 1000.0 / n,
        metering_cpu_per_1000: metering * 1000.0 / n,
        metering_switches_per_alloc: metering_switches / n,
        records_per_commit,
        reports_per_alloc,
        switches_per_alloc: switches / n,
        idle_rss,
        peak_rss,
    })
}

async fn throughput(env: &Env, agent: Agent, t: &mut Table) -> Result<()> {
    let r = throughput_run(env, agent, &[], 500).await?;
    t.add(
        "4. agent context switches per allocation",
        "switches",
        agent,
        r.switches_per_alloc,
    );
    t.add(
        "2. throughput: 2,000 allocations, 4 workers × max_concurrency 8",
        "alloc/s",
        agent,
        r.alloc_per_s,
    );
    t.add(
        "4. agent CPU per 1,000 allocations",
        "CPU s",
        agent,
        r.cpu_per_1000,
    );
    t.add("4. agent resident memory, idle", "MiB", agent, r.idle_rss);
    t.add("4. agent resident memory, peak", "MiB", agent, r.peak_rss);
    Ok(())
}

/// After three warm-up requests, the latency of `n` sequential ones in ms,
/// sorted.
async fn warm_sequential(
    plane: &Plane,
    app: &str,
    function: &str,
    input: &Value,
    n: usize,
) -> Result<Vec<f64>> {
    for _ in 0..WARM_UP_CALLS {
        plane.invoke(app, function, input.clone()).await?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        plane.invoke(app, function, input.clone()).await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples)
}

/// Warm sequential latency (p50, p95) of `n` no-op requests on one fake
/// worker, the agent started with `extra`.
async fn sequential_run(env: &Env, extra: &[&str], n: usize) -> Result<(f64, f64)> {
    let plane = Plane::start().await?;
    let (dir, app, function, input, _) = Worker::Fake.hello_app();
    plane
        .deploy(env, dir, app, &FunctionOptions::default())
        .await?;
    let proc = AgentProc::start_full(
        env,
        Agent::Steward,
        &plane,
        Worker::Fake,
        &env.wrapper,
        extra,
    )?;
    plane.wait_executor().await?;
    let samples = warm_sequential(&plane, app, function, &input, n).await?;
    drop(proc);
    plane.stop().await;
    Ok((percentile(&samples, 0.5), percentile(&samples, 0.95)))
}

/// Allocations per run of the metering scenario: 6,000, so that the
/// agent's CPU (counted in 10 ms ticks) is read to well under 1 %.
const METERING_PER_APP: usize = 1500;

/// The throughput scenario with and without metering (Steward only),
/// alternating which goes first: what metering costs. Each round also
/// gives the ratio of its two runs, which the machine's drift between
/// rounds does not move.
async fn metering(env: &Env, rounds: usize, t: &mut Table) -> Result<()> {
    for round in 0..rounds {
        let order: [(bool, &str); 2] = if round % 2 == 0 {
            [(true, "with"), (false, "without")]
        } else {
            [(false, "without"), (true, "with")]
        };
        let mut cpu = [0.0; 2];
        for (on, label) in order {
            let extra: Vec<&str> = if on {
                std::env::var("BENCH_GROUP_COMMIT_MS")
                    .ok()
                    .map(|v| vec!["--usage-group-commit-ms", v.leak()])
                    .unwrap_or_default()
            } else {
                vec!["--no-metering"]
            };
            let r = throughput_run(env, Agent::Steward, &extra, METERING_PER_APP).await?;
            cpu[usize::from(on)] = r.cpu_per_1000;
            metering_rows(t, label, on, &r);
            let (p50, p95) = sequential_run(env, &extra, 100).await?;
            t.add(
                &format!("12. {label} metering: sequential latency, warm fake worker, p50"),
                "ms",
                Agent::Steward,
                p50,
            );
            t.add(
                &format!("12. {label} metering: sequential latency, warm fake worker, p95"),
                "ms",
                Agent::Steward,
                p95,
            );
        }
        if cpu[0] > 0.0 {
            t.add(
                "12. agent CPU with metering / without, same round",
                "ratio",
                Agent::Steward,
                cpu[1] / cpu[0],
            );
        }
    }
    Ok(())
}

/// One throughput run's rows of the metering scenario.
fn metering_rows(t: &mut Table, label: &str, on: bool, r: &ThroughputRun) {
    t.add(
        &format!("12. {label} metering: agent CPU per 1,000 allocations"),
        "CPU s",
        Agent::Steward,
        r.cpu_per_1000,
    );
    if on {
        t.add(
            "12. with metering: of which the metering thread",
            "CPU s",
            Agent::Steward,
            r.metering_cpu_per_1000,
        );
        t.add(
            "12. with metering: the metering thread's context switches per allocation",
            "switches",
            Agent::Steward,
            r.metering_switches_per_alloc,
        );
        if let Some(n) = r.records_per_commit {
            t.add(
                "12. with metering: usage records per fsync",
                "records",
                Agent::Steward,
                n,
            );
        }
    }
    if let Some(n) = r.reports_per_alloc {
        t.add(
            &format!("12. {label} metering: state reports per allocation"),
            "reports",
            Agent::Steward,
            n,
        );
    }
    t.add(
        &format!("12. {label} metering: throughput"),
        "alloc/s",
        Agent::Steward,
        r.alloc_per_s,
    );
    t.add(
        &format!("12. {label} metering: agent context switches per allocation"),
        "switches",
        Agent::Steward,
        r.switches_per_alloc,
    );
}

/// The worker drivers the sandbox scenario compares, the baseline first.
const DRIVERS: [&str; 2] = ["process", "oci"];

/// How long a Steward gets to stop cleanly (SIGTERM) before it is killed.
const CLEAN_STOP_LIMIT: Duration = Duration::from_secs(30);

/// What one run of the sandbox scenario measured.
struct SandboxRun {
    /// The harness's first call, with no worker yet: invoke → result.
    first_call_ms: f64,
    /// The control plane's placement → RUNNING reported for that worker.
    cold_start_ms: Option<f64>,
    p50_ms: f64,
    p99_ms: f64,
    /// The agent's CPU per warm allocation: its live threads' `schedstat`.
    cpu_ms_per_alloc: f64,
    /// The same from the process's `stat` (10 ms ticks, dead threads too).
    cpu_ms_per_alloc_ticks: f64,
    /// Containers the runtime still listed after the clean stop.
    leftover_containers: usize,
}

/// Steward with `--worker-driver process` and with `oci` on the same
/// workload, alternating which goes first each round so drift between
/// rounds moves both: the first call's cold start, `n` warm sequential
/// calls (p50, p99) and the agent's CPU per warm allocation, on the real
/// and the fake worker. Each round also gives the oci / process ratios of
/// its two runs.
async fn sandbox(env: &Env, rounds: usize, n: usize, t: &mut Table) -> Result<()> {
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            DRIVERS
        } else {
            [DRIVERS[1], DRIVERS[0]]
        };
        for worker in [Worker::Real, Worker::Fake] {
            let label = worker.hello_app().4;
            let mut runs: BTreeMap<&str, SandboxRun> = BTreeMap::new();
            for driver in order {
                eprintln!("sandbox round {}/{rounds}: {driver}, {label}", round + 1);
                let r = sandbox_run(env, driver, worker, n).await?;
                sandbox_rows(t, driver, label, &r);
                runs.insert(driver, r);
            }
            if let (Some(p), Some(o)) = (runs.get("process"), runs.get("oci")) {
                sandbox_ratios(t, label, p, o);
            }
        }
    }
    Ok(())
}

/// One run's rows of the sandbox scenario.
fn sandbox_rows(t: &mut Table, driver: &str, label: &str, r: &SandboxRun) {
    let row = |what: &str| format!("13. {driver}: {what} ({label})");
    t.add(
        &row("cold start, first call invoke → result"),
        "ms",
        Agent::Steward,
        r.first_call_ms,
    );
    if let Some(c) = r.cold_start_ms {
        t.add(
            &row("cold start, new worker → RUNNING reported"),
            "ms",
            Agent::Steward,
            c,
        );
    }
    t.add(
        &row("sequential latency, warm, p50"),
        "ms",
        Agent::Steward,
        r.p50_ms,
    );
    t.add(
        &row("sequential latency, warm, p99"),
        "ms",
        Agent::Steward,
        r.p99_ms,
    );
    t.add(
        &row("agent CPU per warm allocation (threads' schedstat)"),
        "CPU ms",
        Agent::Steward,
        r.cpu_ms_per_alloc,
    );
    t.add(
        &row("agent CPU per warm allocation (process stat, 10 ms ticks)"),
        "CPU ms",
        Agent::Steward,
        r.cpu_ms_per_alloc_ticks,
    );
    t.add(
        &row("containers left after a clean stop"),
        "containers",
        Agent::Steward,
        r.leftover_containers as f64,
    );
}

/// The same round's oci / process ratios and cold-start difference.
fn sandbox_ratios(t: &mut Table, label: &str, p: &SandboxRun, o: &SandboxRun) {
    let mut ratio = |what: &str, a: f64, b: f64| {
        if b > 0.0 {
            t.add(
                &format!("13. oci / process, same round: {what} ({label})"),
                "ratio",
                Agent::Steward,
                a / b,
            );
        }
    };
    ratio("warm p50", o.p50_ms, p.p50_ms);
    ratio("warm p99", o.p99_ms, p.p99_ms);
    ratio(
        "agent CPU per warm allocation",
        o.cpu_ms_per_alloc,
        p.cpu_ms_per_alloc,
    );
    t.add(
        &format!("13. oci − process, same round: first call invoke → result ({label})"),
        "ms",
        Agent::Steward,
        o.first_call_ms - p.first_call_ms,
    );
    if let (Some(a), Some(b)) = (o.cold_start_ms, p.cold_start_ms) {
        t.add(
            &format!("13. oci − process, same round: new worker → RUNNING ({label})"),
            "ms",
            Agent::Steward,
            a - b,
        );
    }
}

/// Warm-up calls `warm_sequential` makes before it times any.
const WARM_UP_CALLS: usize = 3;

/// One Steward with worker `driver`: a fresh plane, the first call (a
/// cold start), `n` timed warm calls, then a clean stop.
async fn sandbox_run(env: &Env, driver: &str, worker: Worker, n: usize) -> Result<SandboxRun> {
    let plane = Plane::start().await?;
    let (dir, app, function, input, _) = worker.hello_app();
    plane
        .deploy(env, dir, app, &FunctionOptions::default())
        .await?;
    let extra = [
        "--worker-driver",
        driver,
        "--oci-runtime",
        env.oci_runtime.as_str(),
    ];
    let mut proc =
        AgentProc::start_full(env, Agent::Steward, &plane, worker, &env.wrapper, &extra)?;
    proc.wait_startup().await?;
    plane.wait_executor().await?;
    let started = Instant::now();
    plane.invoke(app, function, input.clone()).await?;
    let first_call_ms = started.elapsed().as_secs_f64() * 1000.0;
    let cold_start_ms = plane.stats().await?["cold_starts_ms"]
        .get(0)
        .and_then(Value::as_f64);
    let threads0 = proc.thread_cpu_seconds("");
    let ticks0 = proc.cpu_seconds();
    let samples = warm_sequential(&plane, app, function, &input, n).await?;
    // Every call after the first is warm, the warm-up ones included.
    let calls = (n + WARM_UP_CALLS) as f64;
    let cpu_ms_per_alloc = (proc.thread_cpu_seconds("") - threads0) * 1000.0 / calls;
    let cpu_ms_per_alloc_ticks = (proc.cpu_seconds() - ticks0) * 1000.0 / calls;
    proc.stop_cleanly(CLEAN_STOP_LIMIT).await;
    let leftover_containers = proc.containers(&env.oci_runtime).len();
    drop(proc);
    plane.stop().await;
    Ok(SandboxRun {
        first_call_ms,
        cold_start_ms,
        p50_ms: percentile(&samples, 0.5),
        p99_ms: percentile(&samples, 0.99),
        cpu_ms_per_alloc,
        cpu_ms_per_alloc_ticks,
        leftover_containers,
    })
}

/// A composed request on the real worker: `map_squares(100)` from
/// `examples/compose` (100 nested calls, plus the 100 duplicate runs
/// tensorlake 0.3.9's map makes, each a `call_function`, a watch and a
/// delivered result), after one warm-up request.
async fn composed(env: &Env, agent: Agent, runs: usize, t: &mut Table) -> Result<()> {
    const LABEL: &str = "7. composed: map over 100 items (real worker)";
    let plane = Plane::start().await?;
    plane
        .deploy(
            env,
            "examples/compose",
            "compose",
            &FunctionOptions::default(),
        )
        .await?;
    let proc = AgentProc::start(env, agent, &plane, Worker::Real)?;
    plane.wait_executor().await?;
    let expected: Vec<u64> = (1..=100u64).map(|i| i * i).collect();
    let check = |out: steward_devserver::RequestOutcome| -> Result<()> {
        if out.output != Some(json!(expected)) {
            bail!("map_squares(100) gave {:?}", out.output);
        }
        Ok(())
    };
    check(plane.invoke("compose", "map_squares", json!(100)).await?)?;
    let cpu0 = proc.cpu_seconds();
    for _ in 0..runs {
        let started = Instant::now();
        check(plane.invoke("compose", "map_squares", json!(100)).await?)?;
        t.add(
            &format!("{LABEL}, latency"),
            "s",
            agent,
            started.elapsed().as_secs_f64(),
        );
    }
    t.add(
        &format!("{LABEL}, agent CPU per request"),
        "CPU ms",
        agent,
        (proc.cpu_seconds() - cpu0) * 1000.0 / runs.max(1) as f64,
    );
    drop(proc);
    plane.stop().await;
    Ok(())
}

/// One unlabelled sample of the agent's metrics (`name` ends in a space).
async fn agent_counter(proc: &AgentProc, name: &str) -> Option<f64> {
    metrics_text(proc)
        .await?
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// The agent's `/monitoring/metrics` text.
async fn metrics_text(proc: &AgentProc) -> Option<String> {
    reqwest::get(format!("{}/monitoring/metrics", proc.monitoring))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// Mean reconcile pass time from an agent's own metrics, in ms.
async fn reconcile_mean_ms(proc: &AgentProc, agent: Agent) -> Option<f64> {
    let name = match agent {
        Agent::Steward | Agent::Baseline => "steward_reconciliation_latency_seconds",
        Agent::Reference => "state_reconciliation_latency_seconds",
    };
    histogram_mean_ms(&metrics_text(proc).await?, name)
}

/// The upper bound, in ms, of the bucket holding the largest observation of
/// histogram `name` (OpenMetrics text; buckets are cumulative).
fn histogram_max_ms(text: &str, name: &str) -> Option<f64> {
    let count: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}_count ")))?
        .trim()
        .parse()
        .ok()?;
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, n) = rest.split_once("\"} ")?;
            Some((le.parse::<f64>().ok()?, n.trim().parse::<f64>().ok()?))
        })
        .filter(|(_, n)| *n >= count)
        .map(|(le, _)| le * 1000.0)
        .reduce(f64::min)
}

/// Mean, in ms, of histogram `name`.
fn histogram_mean_ms(text: &str, name: &str) -> Option<f64> {
    let value = |suffix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{suffix} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let (sum, count) = (value("_sum")?, value("_count")?);
    (count > 0.0).then(|| sum / count * 1000.0)
}

/// Steward only (`agent`, this build or the baseline): how long reconcile
/// passes hold the state lock, next to how long whole passes take (which
/// is what the lock was held for before admission moved out of it).
async fn lock_rows(proc: &AgentProc, agent: Agent, label: &str, t: &mut Table) -> Option<()> {
    let text = metrics_text(proc).await?;
    let pass = "steward_reconciliation_latency_seconds";
    let lock = "steward_reconcile_lock_hold_seconds";
    for (what, name) in [
        ("whole reconcile pass", pass),
        ("state-lock hold of a pass", lock),
    ] {
        if let Some(ms) = histogram_max_ms(&text, name) {
            t.add(
                &format!("{label}: longest {what} (bucket bound)"),
                "ms",
                agent,
                ms,
            );
        }
        if let Some(ms) = histogram_mean_ms(&text, name) {
            t.add(&format!("{label}: mean {what}"), "ms", agent, ms);
        }
    }
    Some(())
}

/// A control-plane restart with the server down for 8 s (as measured on
/// the real server in issue 11): from the server's return to the agent's
/// first report reaching it.
async fn recovery(env: &Env, agent: Agent, t: &mut Table) -> Result<()> {
    let mut plane = Plane::start().await?;
    plane
        .deploy(env, "examples/fake", "fake", &FunctionOptions::default())
        .await?;
    let proc = AgentProc::start(env, agent, &plane, Worker::Fake)?;
    plane.wait_executor().await?;
    plane.restart(Duration::from_secs(8)).await?;
    let back = Instant::now();
    plane.wait_executor().await?;
    t.add(
        "8. recovery: server back after 8 s down → first report received",
        "s",
        agent,
        back.elapsed().as_secs_f64(),
    );
    drop(proc);
    plane.stop().await;
    Ok(())
}

/// 200 workers and 20,000 allocations in the desired state (fake worker).
async fn scale(
    env: &Env,
    agent: Agent,
    workers: usize,
    allocations: usize,
    limit: Duration,
    t: &mut Table,
) -> Result<()> {
    let plane = Plane::start().await?;
    let apps: Vec<String> = (0..workers).map(|i| format!("s{i}")).collect();
    let options = FunctionOptions {
        max_concurrency: 4,
        ..FunctionOptions::default()
    };
    for app in &apps {
        plane.deploy(env, "examples/fake", app, &options).await?;
    }
    let proc = AgentProc::start(env, agent, &plane, Worker::Fake)?;
    plane.wait_executor().await?;
    let cpu0 = proc.cpu_seconds();
    let started = Instant::now();
    for app in &apps {
        plane.batch(app, "noop", allocations / workers).await?;
    }
    let label = format!(
        "5. scale: {workers} workers, {} allocations",
        allocations / workers * workers
    );
    let converge_deadline = started + limit;
    loop {
        let s = plane.stats().await?;
        if s["function_executors_running"].as_u64().unwrap_or(0) as usize >= workers {
            t.add(
                &format!("{label}: converge (all RUNNING)"),
                "s",
                agent,
                started.elapsed().as_secs_f64(),
            );
            break;
        }
        if Instant::now() > converge_deadline {
            t.fail(
                &format!("{label}: converge (all RUNNING)"),
                agent,
                &format!("not converged in {}s", limit.as_secs()),
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match plane.drain(limit.saturating_sub(started.elapsed())).await {
        Ok(_) => {
            t.add(
                &format!("{label}: drain (all finished)"),
                "s",
                agent,
                started.elapsed().as_secs_f64(),
            );
            t.add(
                &format!("{label}: agent CPU per 1,000 allocations"),
                "CPU s",
                agent,
                (proc.cpu_seconds() - cpu0) * 1000.0 / (allocations / workers * workers) as f64,
            );
        }
        Err(e) => t.fail(
            &format!("{label}: drain (all finished)"),
            agent,
            &e.to_string(),
        ),
    }
    if let Some(ms) = reconcile_mean_ms(&proc, agent).await {
        t.add(&format!("{label}: mean reconcile pass"), "ms", agent, ms);
    }
    if agent.is_steward() {
        lock_rows(&proc, agent, &label, t).await;
    }
    t.add(
        &format!("{label}: agent peak memory"),
        "MiB",
        agent,
        proc.rss_mib().1,
    );
    drop(proc);
    plane.stop().await;
    Ok(())
}

/// The real protocol pattern: two single-function apps on the real worker
/// (one worker each, max_concurrency 1), `requests` requests with
/// `in_flight` outstanding at any time, alternating apps; per-request
/// latency, the agent's CPU and context switches per allocation, and the
/// desired-state messages the control plane sent per allocation.
async fn concurrent(
    env: &Env,
    agent: Agent,
    requests: usize,
    in_flight: usize,
    t: &mut Table,
) -> Result<()> {
    let label =
        format!("9. concurrent: {requests} requests, {in_flight} in flight, 2 real workers");
    let plane = Plane::start().await?;
    let apps = ["c0", "c1"];
    for app in apps {
        plane
            .deploy(env, "examples/hello", app, &FunctionOptions::default())
            .await?;
    }
    let proc = AgentProc::start(env, agent, &plane, Worker::Real)?;
    plane.wait_executor().await?;
    for app in apps {
        plane.invoke(app, "greet", json!("warm")).await?;
    }
    let published0 = published(&plane).await;
    let cpu0 = proc.cpu_seconds();
    let switches0 = proc.context_switches();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (http, url, next) = (plane.http.clone(), plane.url.clone(), next.clone());
        clients.spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return Ok::<_, anyhow::Error>(samples);
                }
                let started = Instant::now();
                invoke_at(&http, &url, apps[i % 2], "greet", json!(format!("r{i}"))).await?;
                samples.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        });
    }
    let mut samples = Vec::with_capacity(requests);
    while let Some(joined) = clients.join_next().await {
        samples.extend(joined??);
    }
    let cpu = proc.cpu_seconds() - cpu0;
    let switches = proc.context_switches() - switches0;
    samples.sort_by(|a, b| a.total_cmp(b));
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    t.add(&format!("{label}: latency mean"), "ms", agent, mean);
    for (p, name) in [(0.5, "p50"), (0.95, "p95"), (0.99, "p99")] {
        t.add(
            &format!("{label}: latency {name}"),
            "ms",
            agent,
            percentile(&samples, p),
        );
    }
    let n = requests as f64;
    t.add(
        &format!("{label}: agent CPU per allocation"),
        "CPU ms",
        agent,
        cpu * 1000.0 / n,
    );
    t.add(
        &format!("{label}: agent context switches per allocation"),
        "switches",
        agent,
        switches / n,
    );
    if let (Some(before), Some(after)) = (published0, published(&plane).await) {
        t.add(
            &format!("{label}: desired states sent per allocation (real server: 1.9)"),
            "messages",
            agent,
            (after - before) / n,
        );
    }
    if agent.is_steward() {
        cycle_rows(&proc, agent, &label, t).await;
    }
    drop(proc);
    plane.stop().await;
    Ok(())
}

/// Desired-state messages the control plane has published so far.
async fn published(plane: &Plane) -> Option<f64> {
    plane.stats().await.ok()?["desired_states_published"].as_f64()
}

/// Steward only (`agent`, this build or the baseline): the agent's own
/// share of each worker cycle, from its `steward_agent_cycle_seconds`
/// histogram (p99 as a bucket bound).
async fn cycle_rows(proc: &AgentProc, agent: Agent, label: &str, t: &mut Table) -> Option<()> {
    let text = metrics_text(proc).await?;
    for (leg, what) in [
        (
            "result_to_wire",
            "allocation finished → result report on the wire",
        ),
        (
            "desired_to_running",
            "desired state received → allocation running",
        ),
    ] {
        if let Some(ms) = histogram_leg_mean_ms(&text, "steward_agent_cycle_seconds", leg) {
            t.add(
                &format!("{label}: agent share, {what}, mean"),
                "ms",
                agent,
                ms,
            );
        }
        if let Some(ms) = histogram_quantile_ms(&text, "steward_agent_cycle_seconds", leg, 0.99) {
            t.add(
                &format!("{label}: agent share, {what}, p99 (bucket bound)"),
                "ms",
                agent,
                ms,
            );
        }
    }
    Some(())
}

/// Mean, in ms, of the series `leg="{leg}"` of histogram `name`.
fn histogram_leg_mean_ms(text: &str, name: &str, leg: &str) -> Option<f64> {
    let series = format!("leg=\"{leg}\"");
    let value = |suffix: &str| {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{suffix}{{")) && l.contains(&series))
            .find_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
    };
    let (sum, count) = (value("_sum")?, value("_count")?);
    (count > 0.0).then(|| sum / count * 1000.0)
}

/// The upper bound, in ms, of the bucket of histogram `name` (series
/// `leg="{leg}"`) holding quantile `q`.
fn histogram_quantile_ms(text: &str, name: &str, leg: &str, q: f64) -> Option<f64> {
    let series = format!("leg=\"{leg}\"");
    let count: f64 = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_count{{")) && l.contains(&series))
        .find_map(|l| l.rsplit_once(' ')?.1.trim().parse().ok())?;
    if count == 0.0 {
        return None;
    }
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")) && l.contains(&series))
        .filter_map(|l| {
            let le = l
                .split("le=\"")
                .nth(1)?
                .split('"')
                .next()?
                .parse::<f64>()
                .ok()?;
            let n = l.rsplit_once(' ')?.1.trim().parse::<f64>().ok()?;
            Some((le, n))
        })
        .filter(|(_, n)| *n >= count * q)
        .map(|(le, _)| le * 1000.0)
        .reduce(f64::min)
}

/// Steward alone under callgrind on the fake worker: instructions per
/// allocation, counted from a warm agent (counters zeroed after warm-up)
/// over `allocations` allocations on 4 workers × max_concurrency 8.
/// Repeatable on noisy machines, unlike CPU time. The profile is kept as
/// `target/bench/callgrind.steward.out` for `callgrind_annotate`.
async fn callgrind(env: &Env, allocations: usize, t: &mut Table) -> Result<()> {
    let label = format!(
        "10. agent instructions per allocation (callgrind, fake worker, {allocations} allocations)"
    );
    let plane = Plane::start().await?;
    let options = FunctionOptions {
        max_concurrency: 8,
        ..FunctionOptions::default()
    };
    let apps = ["g0", "g1", "g2", "g3"];
    for app in apps {
        plane.deploy(env, "examples/fake", app, &options).await?;
    }
    let out_dir = tempfile::tempdir()?;
    let out = out_dir.path().join("callgrind.out");
    let wrapper = vec![
        "valgrind".to_string(),
        "--tool=callgrind".to_string(),
        format!("--callgrind-out-file={}", out.display()),
    ];
    let proc = AgentProc::start_wrapped(env, Agent::Steward, &plane, Worker::Fake, &wrapper)?;
    proc.wait_startup().await?;
    plane.wait_executor().await?;
    for app in apps {
        plane.invoke(app, "noop", json!("warm")).await?;
    }
    let pid = proc.child.id().to_string();
    callgrind_control(&["--zero", &pid])?;
    for app in apps {
        plane.batch(app, "noop", allocations / apps.len()).await?;
    }
    plane.drain(Duration::from_secs(600)).await?;
    callgrind_control(&["--dump=measured", &pid])?;
    let dump = std::fs::read_dir(out_dir.path())?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            std::fs::read_to_string(p).is_ok_and(|s| s.contains("desc: Trigger: dump measured"))
        })
        .context("callgrind wrote no dump for the measured part")?;
    let text = std::fs::read_to_string(&dump)?;
    let total: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary: ")
                .or_else(|| l.strip_prefix("totals: "))
        })
        .and_then(|v| v.trim().parse().ok())
        .context("no totals in the callgrind dump")?;
    t.add(
        &label,
        "instructions",
        Agent::Steward,
        total / (allocations / apps.len() * apps.len()) as f64,
    );
    let keep = env.repo.join("target/bench");
    std::fs::create_dir_all(&keep)?;
    std::fs::copy(&dump, keep.join("callgrind.steward.out"))?;
    drop(proc);
    plane.stop().await;
    Ok(())
}

/// Runs `callgrind_control` with `args` and fails if it does.
fn callgrind_control(args: &[&str]) -> Result<()> {
    let status = Command::new("callgrind_control")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .context("running callgrind_control (valgrind is needed)")?;
    if !status.success() {
        bail!("callgrind_control {args:?} failed: {status}");
    }
    Ok(())
}

/// Which agent `--agent` measures.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum AgentChoice {
    Steward,
    Reference,
}

impl AgentChoice {
    fn admits(choice: Option<AgentChoice>, agent: Agent) -> bool {
        match choice {
            None => true,
            Some(AgentChoice::Steward) => agent.is_steward(),
            Some(AgentChoice::Reference) => agent == Agent::Reference,
        }
    }
}

/// Which scenario `--only` runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Scenario {
    Latency,
    Composed,
    Recovery,
    Throughput,
    Scale,
    Concurrent,
    Callgrind,
    Cgroups,
    Metering,
    Sandbox,
    Restart,
    Page,
}

/// Runs each scenario against Steward and the reference executor, alternating
/// which goes first, and prints a table of medians, spread and ratios.
/// `cargo xtask bench` builds everything in release mode and runs this.
#[derive(Parser, Debug)]
#[command(name = "steward-bench")]
struct Cli {
    /// Rounds of the latency, composed and throughput scenarios
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Warm sequential requests timed per latency run
    #[arg(long, default_value_t = 100)]
    latency_samples: usize,
    /// Workers in the scale scenario
    #[arg(long, default_value_t = 200)]
    scale_workers: usize,
    /// Allocations in the scale scenario, spread over its workers
    #[arg(long, default_value_t = 20_000)]
    scale_allocations: usize,
    /// Time the scale scenario gets to converge and drain, in seconds
    #[arg(long, default_value_t = 240)]
    scale_limit_s: u64,
    /// Timed composed requests per agent and round
    #[arg(long, default_value_t = 3)]
    composed_runs: usize,
    /// Requests of the concurrent scenario
    #[arg(long, default_value_t = 200)]
    concurrent_requests: usize,
    /// Requests the concurrent scenario keeps outstanding
    #[arg(long, default_value_t = 16)]
    concurrent_in_flight: usize,
    /// The OCI runtime the sandbox scenario runs Steward's `oci` driver with
    #[arg(long, default_value = "runc")]
    oci_runtime: String,
    /// Allocations counted under callgrind (Steward only)
    #[arg(long, default_value_t = 400)]
    callgrind_allocations: usize,
    /// Run one scenario only
    #[arg(long, value_enum)]
    only: Option<Scenario>,
    /// Run Steward under this command, split at spaces (a profiler, e.g.
    /// "heaptrack -o target/bench/heaptrack"); its numbers then measure
    /// the profiler too
    #[arg(long)]
    steward_wrapper: Option<String>,
    /// Measure one agent only (a quick look; ratios need both); `steward`
    /// keeps the baseline Steward
    #[arg(long, value_enum)]
    agent: Option<AgentChoice>,
    /// Also measure this second `steward` binary (an older build), driven
    /// as Steward is (same flags, wrapper and fake worker), in the
    /// scenarios that compare agents (latency, composed, recovery,
    /// concurrent, throughput, scale): its own column and a
    /// Steward / baseline ratio
    #[arg(long)]
    baseline_steward: Option<PathBuf>,
    /// Also write the table to this file
    #[arg(long)]
    out: Option<PathBuf>,
    /// The `steward` binary to measure
    #[arg(long, env = "STEWARD_BIN")]
    steward_bin: PathBuf,
    /// The venv with the pinned reference packages
    #[arg(long, env = "STEWARD_VENV")]
    venv: PathBuf,
}

/// Runs the benchmark until it ends or SIGINT/SIGTERM arrives. On a signal
/// the run is dropped where it stands: each agent's `Drop` kills it and its
/// workers' process groups, and the in-process control plane goes with it.
#[tokio::main]
async fn main() -> Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let cli = Cli::parse();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let code = tokio::select! {
        done = run(cli) => return done.map(|()| ExitCode::SUCCESS),
        _ = interrupt.recv() => 130,
        _ = terminate.recv() => 143,
    };
    eprintln!("steward-bench: interrupted; agents and their workers stopped");
    Ok(ExitCode::from(code))
}

async fn run(cli: Cli) -> Result<()> {
    let rounds = cli.rounds;
    let latency_n = cli.latency_samples;
    let scale_workers = cli.scale_workers;
    let scale_allocations = cli.scale_allocations;
    let scale_limit = Duration::from_secs(cli.scale_limit_s);
    let composed_runs = cli.composed_runs;
    let wanted = |s: Scenario| cli.only.is_none_or(|o| o == s);

    let steward = cli.steward_bin.clone();
    let fake_worker = steward.with_file_name("steward-fake-worker");
    let venv = cli.venv.clone();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fake_path_dir = tempfile::tempdir()?;
    std::os::unix::fs::symlink(&fake_worker, fake_path_dir.path().join("function-executor"))?;
    let env = Env {
        steward,
        baseline: cli.baseline_steward.clone(),
        fake_worker,
        venv,
        repo,
        fake_path_dir,
        wrapper: cli
            .steward_wrapper
            .as_deref()
            .map(|w| w.split_whitespace().map(String::from).collect())
            .unwrap_or_default(),
        oci_runtime: cli.oci_runtime.clone(),
    };
    check(&env.steward)?;
    check(&env.fake_worker)?;
    if let Some(b) = &env.baseline {
        check(b)?;
    }

    let started = Instant::now();
    let mut t = Table {
        baseline: env.baseline.is_some(),
        ..Table::default()
    };
    let agents = Agent::compared(env.baseline.is_some());
    for round in 0..rounds {
        // Alternate which agent goes first.
        let mut order = agents.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for agent in order {
            if !AgentChoice::admits(cli.agent, agent) {
                continue;
            }
            eprintln!("round {}/{rounds}: {agent:?}", round + 1);
            for worker in [Worker::Real, Worker::Fake] {
                if !wanted(Scenario::Latency) {
                    break;
                }
                if let Err(e) = latency(&env, agent, worker, latency_n, &mut t).await {
                    t.fail("1. sequential latency", agent, &e.to_string());
                }
            }
            if wanted(Scenario::Composed)
                && let Err(e) = composed(&env, agent, composed_runs, &mut t).await
            {
                t.fail("7. composed", agent, &e.to_string());
            }
            if wanted(Scenario::Recovery)
                && let Err(e) = recovery(&env, agent, &mut t).await
            {
                t.fail("8. recovery", agent, &e.to_string());
            }
            if wanted(Scenario::Concurrent)
                && let Err(e) = concurrent(
                    &env,
                    agent,
                    cli.concurrent_requests,
                    cli.concurrent_in_flight,
                    &mut t,
                )
                .await
            {
                t.fail("9. concurrent", agent, &e.to_string());
            }
            if wanted(Scenario::Throughput)
                && let Err(e) = throughput(&env, agent, &mut t).await
            {
                t.fail(
                    "2. throughput: 2,000 allocations, 4 workers × max_concurrency 8",
                    agent,
                    &e.to_string(),
                );
            }
        }
    }
    // Cold start with and without cgroups (Steward only).
    if cli.only == Some(Scenario::Cgroups)
        || (cli.only.is_none() && AgentChoice::admits(cli.agent, Agent::Steward))
    {
        eprintln!("cgroups: Steward cold start with and without");
        if let Err(e) = cgroups(&env, rounds.max(3), &mut t).await {
            t.fail(
                "11. cold start with and without cgroups",
                Agent::Steward,
                &e.to_string(),
            );
        }
    }
    // The process and OCI worker drivers (Steward only).
    if cli.only == Some(Scenario::Sandbox)
        || (cli.only.is_none()
            && AgentChoice::admits(cli.agent, Agent::Steward)
            && which(&cli.oci_runtime))
    {
        eprintln!("sandbox: Steward with --worker-driver process and oci");
        if let Err(e) = sandbox(&env, rounds, latency_n, &mut t).await {
            t.fail("13. sandbox", Agent::Steward, &e.to_string());
        }
    }
    // Throughput with and without metering (Steward only).
    if cli.only == Some(Scenario::Metering)
        || (cli.only.is_none() && AgentChoice::admits(cli.agent, Agent::Steward))
    {
        eprintln!("metering: Steward throughput with and without");
        if let Err(e) = metering(&env, rounds.max(3), &mut t).await {
            t.fail("12. metering", Agent::Steward, &e.to_string());
        }
    }
    // A SIGKILLed Steward replaced, adopting its workers or not (Steward only).
    if cli.only == Some(Scenario::Restart)
        || (cli.only.is_none() && AgentChoice::admits(cli.agent, Agent::Steward))
    {
        eprintln!("restart: Steward SIGKILLed and replaced, with and without adoption");
        if let Err(e) = restart(&env, rounds.max(3), &mut t).await {
            t.fail("14. restart", Agent::Steward, &e.to_string());
        }
    }
    // The host's page at 200 workers (Steward only).
    if cli.only == Some(Scenario::Page)
        || (cli.only.is_none() && AgentChoice::admits(cli.agent, Agent::Steward))
    {
        eprintln!("page: the host's page at {scale_workers} workers");
        if let Err(e) = page(&env, scale_workers, &mut t).await {
            t.fail("15. page", Agent::Steward, &e.to_string());
        }
    }
    // Callgrind once (Steward only): instruction counts repeat exactly.
    if cli.only == Some(Scenario::Callgrind) || (cli.only.is_none() && which("callgrind_control")) {
        eprintln!("callgrind: Steward");
        if let Err(e) = callgrind(&env, cli.callgrind_allocations, &mut t).await {
            t.fail(
                "10. agent instructions per allocation",
                Agent::Steward,
                &e.to_string(),
            );
        }
    }
    // Scale once per agent: it is the longest scenario.
    for agent in agents {
        if !wanted(Scenario::Scale) {
            break;
        }
        if !AgentChoice::admits(cli.agent, agent) {
            continue;
        }
        eprintln!("scale: {agent:?}");
        if let Err(e) = scale(
            &env,
            agent,
            scale_workers,
            scale_allocations,
            scale_limit,
            &mut t,
        )
        .await
        {
            t.fail("5. scale", agent, &e.to_string());
        }
    }
    let table = t.render();
    let baseline = env
        .baseline
        .as_ref()
        .map(|b| format!("; baseline Steward {}", b.display()))
        .unwrap_or_default();
    let header = format!(
        "{} round(s), {} latency samples, scale {} workers / {} allocations{baseline}; harness ran {:.0} s on {} CPU(s)\n\n",
        rounds,
        latency_n,
        scale_workers,
        scale_allocations,
        started.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("{header}{table}");
    if let Some(path) = cli.out {
        std::fs::write(&path, format!("{header}{table}"))?;
    }
    Ok(())
}

/// Whether `program` is on PATH.
fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

fn check(p: &Path) -> Result<()> {
    if !p.exists() {
        bail!("{} is missing; run `cargo xtask bench`", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_baseline_steward_gets_its_own_column_and_ratio() {
        let mut t = Table::default();
        t.add("cpu", "s", Agent::Steward, 1.0);
        t.add("cpu", "s", Agent::Reference, 4.0);
        let without = t.render();
        assert_eq!(
            without.lines().nth(2),
            Some("| cpu | s | 1.00 | 4.00 | 0.250 |")
        );
        t.baseline = true;
        t.add("cpu", "s", Agent::Baseline, 2.0);
        let with = t.render();
        let lines: Vec<&str> = with.lines().collect();
        assert_eq!(lines[2], "| cpu | s | 1.00 | 2.00 | 0.500 | 4.00 | 0.250 |");
        let cells = |l: &str| l.matches('|').count();
        assert!(lines.iter().all(|l| cells(l) == cells(lines[0])), "{with}");
    }
}
