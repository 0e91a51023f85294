//! The deployment files in `deploy/` against the binary they deploy. The
//! Kubernetes DaemonSet is parsed as YAML and the systemd unit as an INI
//! file; every argument they give `steward` goes through the binary's own
//! parser; a Steward started with the DaemonSet's arguments (paths and
//! ports made the test's own) answers its probe and scrape paths, registers
//! the node's name as a label, and is drained by the preStop command. No
//! docker or kubelet is involved: the Dockerfile is not built here (this
//! machine has no docker daemon).

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_yaml_ng::Value;
use steward_devserver::FunctionOptions;
use support::{AgentProc, Plane};

/// Seconds the pod's grace period must leave after the preStop drain's
/// wait: the hook's own start and last poll, then Steward's stop on
/// SIGTERM (with nothing left to stop after a drain).
const STOP_MARGIN_S: u64 = 30;

/// The node name the test plays the kubelet with.
const NODE: &str = "node-a";

fn deploy(path: &str) -> PathBuf {
    support::repo_root().join("deploy").join(path)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn daemonset() -> Result<Value> {
    let path = deploy("kubernetes/base/daemonset.yaml");
    serde_yaml_ng::from_str(&read(&path)?).with_context(|| format!("parsing {}", path.display()))
}

/// `v` at `path` (keys; numbers index sequences), or an error naming it.
fn at<'a>(v: &'a Value, path: &[&str]) -> Result<&'a Value> {
    let mut cur = v;
    for (i, key) in path.iter().enumerate() {
        let next = match key.parse::<usize>() {
            Ok(n) => cur.get(n),
            Err(_) => cur.get(*key),
        };
        cur = next.with_context(|| format!("no {}", path[..=i].join(".")))?;
    }
    Ok(cur)
}

fn string(v: &Value, path: &[&str]) -> Result<String> {
    at(v, path)?
        .as_str()
        .map(String::from)
        .with_context(|| format!("{} is not a string", path.join(".")))
}

fn strings(v: &Value, path: &[&str]) -> Result<Vec<String>> {
    at(v, path)?
        .as_sequence()
        .with_context(|| format!("{} is not a list", path.join(".")))?
        .iter()
        .map(|s| {
            s.as_str()
                .map(String::from)
                .with_context(|| format!("{} holds a non-string: {s:?}", path.join(".")))
        })
        .collect()
}

/// The pod spec's container named `steward`.
fn steward_container(ds: &Value) -> Result<&Value> {
    at(ds, &["spec", "template", "spec", "containers"])?
        .as_sequence()
        .context("containers is not a list")?
        .iter()
        .find(|c| c.get("name").and_then(Value::as_str) == Some("steward"))
        .context("no container named steward")
}

/// The container's command and arguments, with `$(VAR)` expanded from its
/// environment as the kubelet does (`env` gives each variable's value).
fn argv(container: &Value, env: &BTreeMap<String, String>) -> Result<Vec<String>> {
    let mut argv = strings(container, &["command"])?;
    argv.extend(strings(container, &["args"])?);
    Ok(argv.iter().map(|a| expand(a, env)).collect())
}

/// The kubelet's `$(VAR)` expansion: a defined variable is replaced,
/// `$$` is a literal `$`, anything else stays as written.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(var) = tail
            .strip_prefix("$(")
            .and_then(|t| t.split_once(')'))
            .and_then(|(name, after)| env.get(name).map(|v| (v, after)))
        {
            out.push_str(var.0);
            rest = var.1;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment as the kubelet would set it on node
/// [`NODE`]: literal values, and `spec.nodeName` from the Downward API.
fn container_env(container: &Value) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for e in at(container, &["env"])?
        .as_sequence()
        .context("env is not a list")?
    {
        let name = string(e, &["name"])?;
        let value = match (e.get("value"), e.get("valueFrom")) {
            (Some(v), None) => v.as_str().context("env value")?.to_string(),
            (None, Some(from)) => match string(from, &["fieldRef", "fieldPath"])?.as_str() {
                "spec.nodeName" => NODE.to_string(),
                other => bail!("env {name} comes from {other}, which this test does not play"),
            },
            _ => bail!("env {name} has neither a value nor a valueFrom"),
        };
        env.insert(name, value);
    }
    Ok(env)
}

/// The values of `flag` in `args` (`--flag value` or `--flag=value`).
fn flag_values(args: &[String], flag: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            out.push(v.to_string());
        } else if a == flag
            && let Some(v) = it.next_if(|v| !v.starts_with("--"))
        {
            out.push(v.clone());
        }
    }
    out
}

/// The one value of `flag` in `args`.
fn flag(args: &[String], flag: &str) -> Result<String> {
    match flag_values(args, flag).as_slice() {
        [v] => Ok(v.clone()),
        vs => bail!("expected one {flag} in {args:?}, found {vs:?}"),
    }
}

/// `args` with each `(flag, value)` of `set` given that value, or removed
/// with its value when `None`. Every flag of `set` must be in `args`.
fn rewrite(args: &[String], set: &[(&str, Option<&str>)]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut seen = Vec::new();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (a.as_str(), None),
        };
        let Some((_, to)) = set.iter().find(|(f, _)| *f == name) else {
            out.push(a.clone());
            continue;
        };
        seen.push(name.to_string());
        if inline.is_none() {
            it.next_if(|v| !v.starts_with("--"));
        }
        if let Some(to) = to {
            out.extend([name.to_string(), to.to_string()]);
        }
    }
    for (f, _) in set {
        ensure!(seen.iter().any(|s| s == f), "{f} is not in {args:?}");
    }
    Ok(out)
}

/// Runs `steward <args> --help`: clap reads every argument before the
/// `--help`, so this fails on an unknown flag or a value its parser
/// refuses, and succeeds without starting anything.
fn accepted_by_steward(args: &[String]) -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(args)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .context("running steward")?;
    ensure!(
        out.status.success(),
        "steward refuses {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A number given as a YAML integer or a string of one.
fn number(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

/// The port a probe or annotation names: a number, or a container port's name.
fn resolve_port(container: &Value, port: &Value) -> Result<u64> {
    if let Some(n) = number(port) {
        return Ok(n);
    }
    let name = port.as_str().context("a port is a number or a name")?;
    at(container, &["ports"])?
        .as_sequence()
        .context("ports is not a list")?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|p| p.get("containerPort").and_then(number))
        .with_context(|| format!("no container port named {name}"))
}

/// The pod's volume that the container mounts at the deepest mount path
/// holding `path`: (mount path, volume).
fn volume_holding<'a>(ds: &'a Value, container: &Value, path: &str) -> Result<(String, &'a Value)> {
    let mounts = at(container, &["volumeMounts"])?
        .as_sequence()
        .context("volumeMounts is not a list")?;
    let (mount_path, name) = mounts
        .iter()
        .filter_map(|m| Some((string(m, &["mountPath"]).ok()?, string(m, &["name"]).ok()?)))
        .filter(|(mp, _)| Path::new(path).starts_with(mp))
        .max_by_key(|(mp, _)| mp.len())
        .with_context(|| format!("no volume is mounted at or above {path}"))?;
    let volume = at(ds, &["spec", "template", "spec", "volumes"])?
        .as_sequence()
        .context("volumes is not a list")?
        .iter()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(name.as_str()))
        .with_context(|| format!("the mount at {mount_path} names no volume {name}"))?;
    Ok((mount_path, volume))
}

/// The preStop hook's command.
fn pre_stop(container: &Value) -> Result<Vec<String>> {
    strings(container, &["lifecycle", "preStop", "exec", "command"])
}

#[test]
fn the_daemonset_gives_steward_only_arguments_it_accepts() -> Result<()> {
    let ds = daemonset()?;
    let c = steward_container(&ds)?;
    let argv = argv(c, &container_env(c)?)?;
    accepted_by_steward(&argv[1..])?;
    let hook = pre_stop(c)?;
    ensure!(
        hook.first() == argv.first(),
        "preStop runs {:?}, the container {:?}",
        hook.first(),
        argv.first()
    );
    ensure!(
        hook.get(1).map(String::as_str) == Some("drain"),
        "preStop does not drain: {hook:?}"
    );
    accepted_by_steward(&hook[1..])?;
    // What is deployed is the base's resources.
    let kustomization: Value =
        serde_yaml_ng::from_str(&read(&deploy("kubernetes/base/kustomization.yaml"))?)?;
    ensure!(
        strings(&kustomization, &["resources"])?.contains(&"daemonset.yaml".to_string()),
        "the kustomize base does not list daemonset.yaml"
    );
    Ok(())
}

#[test]
fn the_daemonset_probes_and_scrapes_the_monitoring_port() -> Result<()> {
    let ds = daemonset()?;
    let c = steward_container(&ds)?;
    let args = argv(c, &container_env(c)?)?;
    let port: u64 = flag(&args, "--monitoring-server-port")?.parse()?;
    // The kubelet probes the pod's address, not loopback.
    ensure!(
        flag(&args, "--monitoring-server-host")? == "0.0.0.0",
        "the monitoring server must listen on every address for the kubelet's probes"
    );
    for (probe, path) in [
        ("startupProbe", "/monitoring/startup"),
        ("livenessProbe", "/monitoring/health"),
    ] {
        ensure!(
            string(c, &[probe, "httpGet", "path"])? == path,
            "{probe} must GET {path}"
        );
        let probe_port = resolve_port(c, at(c, &[probe, "httpGet", "port"])?)?;
        ensure!(
            probe_port == port,
            "{probe} probes port {probe_port}, Steward listens on {port}"
        );
    }
    let annotations = at(&ds, &["spec", "template", "metadata", "annotations"])?;
    ensure!(string(annotations, &["prometheus.io/scrape"])? == "true");
    let scrape = resolve_port(c, at(annotations, &["prometheus.io/port"])?)?;
    ensure!(
        scrape == port,
        "Prometheus scrapes port {scrape}, Steward listens on {port}"
    );
    ensure!(string(annotations, &["prometheus.io/path"])? == "/monitoring/metrics");
    Ok(())
}

#[test]
fn the_daemonset_keeps_workers_and_state_on_the_node() -> Result<()> {
    let ds = daemonset()?;
    let pod = at(&ds, &["spec", "template", "spec"])?;
    let c = steward_container(&ds)?;
    let env = container_env(c)?;
    let args = argv(c, &env)?;
    // Adoption checks host pids, and adopted workers keep the node's network.
    for key in ["hostPID", "hostNetwork"] {
        ensure!(
            pod.get(key).and_then(Value::as_bool) == Some(true),
            "{key} must be true"
        );
    }
    ensure!(
        at(c, &["securityContext", "privileged"])?.as_bool() == Some(true),
        "Steward writes the node's cgroups and runs runc: privileged"
    );
    let (mount, cgroup) = volume_holding(&ds, c, "/sys/fs/cgroup")?;
    ensure!(
        mount == "/sys/fs/cgroup" && string(cgroup, &["hostPath", "path"])? == "/sys/fs/cgroup",
        "the node's /sys/fs/cgroup must be mounted at /sys/fs/cgroup: {cgroup:?}"
    );
    let parent = flag(&args, "--cgroup-parent")?;
    ensure!(
        parent.starts_with('/'),
        "--cgroup-parent {parent} must be absolute, outside the pod's cgroup"
    );
    // The executor id (and the worker records) live in the data directory,
    // the workers' sockets and HOME in the run directory: both on the node.
    for f in ["--executor-cache-path", "--worker-run-dir"] {
        let dir = flag(&args, f)?;
        let (mount, volume) = volume_holding(&ds, c, &dir)?;
        ensure!(
            volume.get("hostPath").is_some(),
            "{f} {dir} is on {mount}, which is not a hostPath volume: {volume:?}"
        );
    }
    // NODE_NAME from the Downward API reaches a label.
    let node_name = at(c, &["env"])?
        .as_sequence()
        .context("env")?
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some("NODE_NAME"))
        .context("no NODE_NAME in env")?;
    ensure!(string(node_name, &["valueFrom", "fieldRef", "fieldPath"])? == "spec.nodeName");
    ensure!(
        flag_values(&args, "--label")
            .iter()
            .any(|l| l.split_once('=').is_some_and(|(_, v)| v == NODE)),
        "no --label carries $(NODE_NAME): {args:?}"
    );
    // Every GPU of the node.
    let gpus = at(c, &["resources", "limits", "nvidia.com/gpu"])?;
    ensure!(
        number(gpus).is_some_and(|n| n > 0),
        "nvidia.com/gpu must be a positive count: {gpus:?}"
    );
    Ok(())
}

#[test]
fn the_daemonsets_grace_period_covers_the_pre_stop_drain() -> Result<()> {
    let ds = daemonset()?;
    let c = steward_container(&ds)?;
    let args = argv(c, &container_env(c)?)?;
    let hook = pre_stop(c)?;
    let wait: u64 = flag(&hook, "--wait-s")?.parse()?;
    ensure!(
        wait > 0,
        "a preStop drain that does not wait is over at once"
    );
    let grace = at(
        &ds,
        &["spec", "template", "spec", "terminationGracePeriodSeconds"],
    )?
    .as_u64()
    .context("terminationGracePeriodSeconds")?;
    ensure!(
        grace >= wait + STOP_MARGIN_S,
        "terminationGracePeriodSeconds {grace} < the drain's --wait-s {wait} + {STOP_MARGIN_S}"
    );
    // The hook reaches this container's agent, with the token it was given.
    let url = flag(&hook, "--agent-url")?;
    let port = flag(&args, "--monitoring-server-port")?;
    ensure!(
        url == format!("http://127.0.0.1:{port}") || url == format!("http://localhost:{port}"),
        "preStop calls {url}, Steward listens on port {port}"
    );
    let token = flag(&hook, "--admin-token-file")?;
    ensure!(
        flag(&args, "--admin-token-file")? == token,
        "preStop reads another token file than Steward's"
    );
    let (_, volume) = volume_holding(&ds, c, &token)?;
    let mode = at(volume, &["secret", "defaultMode"])?
        .as_u64()
        .context("defaultMode")?;
    ensure!(
        mode & 0o077 == 0,
        "Steward refuses a token file of mode {mode:o}"
    );
    Ok(())
}

/// Starts `steward` with `args` and `envs`, its stderr in `data`'s
/// `steward.log`; the agent once it has said where it listens.
fn start(
    args: &[String],
    envs: &[(&str, &str)],
    data: tempfile::TempDir,
    cgroup_parent: Option<String>,
) -> Result<AgentProc> {
    let log = std::fs::File::create(data.path().join("steward.log"))?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_steward"))
        // Workers die with this agent unless a test adopts them.
        .env("STEWARD_ADOPT_WORKERS", "false")
        .args(args)
        .env("PATH", support::path_with_venv())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting steward")?;
    let stdout = child.stdout.take().context("steward stdout")?;
    let mut agent = AgentProc {
        child,
        monitoring_url: None,
        data_dir: data,
        cgroup_parent,
    };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line)
        .with_context(|| format!("steward's first line: {line:?}; its log:\n{}", agent.log()))?;
    agent.monitoring_url = v["monitoring_url"].as_str().map(String::from);
    Ok(agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemonsets_steward_serves_its_probes_names_its_node_and_drains() -> Result<()> {
    let ds = daemonset()?;
    let c = steward_container(&ds)?;
    let env = container_env(c)?;
    let args = argv(c, &env)?;
    let plane = Plane::start().await?;
    let data = tempfile::tempdir()?;
    let token = data.path().join("admin-token");
    support::write_secret(&token, "deploy-test-admin-token-0123456789\n")?;
    let token = token.to_str().context("token path")?;
    let data_path = data.path().to_str().context("data path")?.to_string();
    let parent = support::cgroup_parent_for(data.path());
    // The manifest's arguments, with the node's paths, address and port
    // made this test's own (its worker run directory is the default one).
    let local = rewrite(
        &args[1..],
        &[
            ("--grpc-server-addr", Some(&plane.grpc)),
            ("--monitoring-server-host", Some("127.0.0.1")),
            ("--monitoring-server-port", Some("0")),
            ("--executor-cache-path", Some(&data_path)),
            ("--worker-run-dir", None),
            ("--cgroup-parent", Some(&parent)),
            ("--admin-token-file", Some(token)),
        ],
    )?;
    // Plus a worker for the test's functions, the plane's file:// blob
    // store shared with it, and room for it on this host.
    let mut local = local;
    let fake = support::fake_worker();
    let blobs = plane.blob_dir.path().to_str().context("blob dir")?;
    local.extend([
        "--function-executor-bin".into(),
        fake.to_str().context("fake")?.into(),
        "--blob-root".into(),
        blobs.into(),
    ]);
    for (f, v) in [
        ("--total-cpus", "64".to_string()),
        ("--total-memory-bytes", (64u64 << 30).to_string()),
        ("--total-disk-bytes", (1u64 << 40).to_string()),
    ] {
        local.extend([f.to_string(), v]);
    }
    plane.deploy_fake(FunctionOptions::default()).await?;
    let env_pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let steward = start(&local, &env_pairs, data, Some(parent))?;
    let limit = Duration::from_secs(60);
    for probe in ["startupProbe", "livenessProbe"] {
        let path = string(c, &[probe, "httpGet", "path"])?;
        steward
            .wait_json(&path, limit, |code, _| code == 200)
            .await?;
    }
    let annotations = at(&ds, &["spec", "template", "metadata", "annotations"])?;
    let scrape = string(annotations, &["prometheus.io/path"])?;
    let url = format!(
        "{}{scrape}",
        steward
            .monitoring_url
            .as_deref()
            .context("monitoring url")?
    );
    let resp = reqwest::get(&url).await?;
    ensure!(resp.status() == 200, "GET {scrape}: {}", resp.status());
    let metrics = resp.text().await?;
    ensure!(
        metrics.contains("steward_build_info"),
        "{scrape} is not Steward's metrics"
    );
    // The node's name reaches the server as the label the manifest gives it.
    let executors = plane.wait_executors(1).await?;
    let (key, _) = flag_values(&args, "--label")
        .into_iter()
        .find_map(|l| {
            l.split_once('=')
                .filter(|(_, v)| *v == NODE)
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .context("no label carries the node's name")?;
    ensure!(
        executors[0]["labels"][&key] == NODE,
        "the server sees labels {}",
        executors[0]["labels"]
    );
    // An allocation runs for 1.5 s when the pod is told to stop.
    let running = plane
        .start_request("fake", "sleep_1500", serde_json::json!("x"))
        .await?;
    steward
        .wait_json("/state/allocations", limit, |_, v| {
            v["allocations"][0]["phase"] == "running"
        })
        .await?;
    // The preStop hook, run as written but against this agent and token.
    let hook = rewrite(
        &pre_stop(c)?[1..],
        &[
            (
                "--agent-url",
                Some(steward.monitoring_url.as_deref().context("url")?),
            ),
            ("--admin-token-file", Some(token)),
        ],
    )?;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args(&hook)
        .stdin(Stdio::null())
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "preStop {hook:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // It returned once the drain was over, not when it began (the
    // allocation still had most of its 1.5 s to run then): the host is
    // disabled, no worker is left, and the result reached the server.
    let mode = reqwest::Client::new()
        .get(format!(
            "{}/admin/mode",
            steward.monitoring_url.as_deref().context("url")?
        ))
        .bearer_auth("deploy-test-admin-token-0123456789")
        .send()
        .await?
        .json::<serde_json::Value>()
        .await?;
    ensure!(mode["mode"] == "disabled", "after preStop: {mode}");
    let (_, fes) = steward.get_json("/state/function-executors").await?;
    ensure!(
        fes["function_executors"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|f| f["status"] == "TERMINATED"),
        "workers left after preStop: {fes}"
    );
    let outcome = plane.outcome(&running).await?;
    ensure!(outcome.status == "success", "{outcome:?}");
    drop(steward);
    plane.stop().await;
    Ok(())
}

/// The unit's `[section]` `key=value` entries in order, continuation lines
/// joined, comments dropped.
fn unit_entries(text: &str) -> Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let full = std::mem::take(&mut pending) + line;
        if let Some(name) = full.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (k, v) = full
            .split_once('=')
            .with_context(|| format!("not key=value: {full:?}"))?;
        out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    ensure!(pending.is_empty(), "the unit ends in a continuation");
    Ok(out)
}

/// The unit's one `[Service]` value of `key`.
fn service(entries: &[(String, String, String)], key: &str) -> Result<String> {
    let vs: Vec<&String> = entries
        .iter()
        .filter(|(s, k, _)| s == "Service" && k == key)
        .map(|(_, _, v)| v)
        .collect();
    match vs.as_slice() {
        [v] => Ok((*v).clone()),
        _ => bail!("expected one {key}= in [Service], found {vs:?}"),
    }
}

/// The unit's ExecStart= as an argument vector (it uses no quoting,
/// variables or prefixes, which this test does not interpret).
fn exec_start(entries: &[(String, String, String)]) -> Result<Vec<String>> {
    let line = service(entries, "ExecStart")?;
    ensure!(
        !line.contains(['"', '\'', '$', '%']) && !line.starts_with(['-', '@', '+', '!', ':']),
        "ExecStart= uses quoting, variables or prefixes this test cannot read: {line}"
    );
    Ok(line.split_whitespace().map(String::from).collect())
}

#[test]
fn the_systemd_unit_notifies_and_leaves_workers_to_adoption() -> Result<()> {
    let entries = unit_entries(&read(&deploy("systemd/steward.service"))?)?;
    for (key, want) in [
        ("Type", "notify"),
        ("Restart", "on-failure"),
        ("Delegate", "yes"),
        // Steward's cgroup leaf (the worker driver's AGENT_LEAF).
        ("DelegateSubgroup", "steward-agent"),
        ("KillMode", "process"),
        ("OOMPolicy", "continue"),
        ("TasksMax", "infinity"),
    ] {
        ensure!(service(&entries, key)? == want, "{key}= must be {want}");
    }
    let watchdog = service(&entries, "WatchdogSec")?;
    ensure!(
        watchdog
            .trim_end_matches('s')
            .parse::<u64>()
            .is_ok_and(|s| s > 0),
        "WatchdogSec={watchdog}: a watchdog in seconds"
    );
    let argv = exec_start(&entries)?;
    accepted_by_steward(&argv[1..])?;
    // Both directories lie in the state directory systemd makes writable.
    let state = Path::new("/var/lib").join(service(&entries, "StateDirectory")?);
    for f in ["--executor-cache-path", "--worker-run-dir"] {
        let dir = flag(&argv, f)?;
        ensure!(
            Path::new(&dir).starts_with(&state),
            "{f} {dir} is outside StateDirectory {} (read-only under ProtectSystem=strict)",
            state.display()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_units_steward_starts_with_the_shipped_config_file() -> Result<()> {
    let entries = unit_entries(&read(&deploy("systemd/steward.service"))?)?;
    let argv = exec_start(&entries)?;
    let data = tempfile::tempdir()?;
    let data_path = data.path().to_str().context("data path")?.to_string();
    let config = deploy("systemd/config.yaml");
    let config = config.to_str().context("config path")?;
    let parent = support::cgroup_parent_for(data.path());
    let local = rewrite(
        &argv[1..],
        &[
            ("--config-path", Some(config)),
            // Nothing answers there: this checks the start, not the server.
            ("--grpc-server-addr", Some("127.0.0.1:1")),
            ("--monitoring-server-host", Some("127.0.0.1")),
            ("--monitoring-server-port", Some("0")),
            ("--executor-cache-path", Some(&data_path)),
            ("--worker-run-dir", None),
        ],
    )?;
    let mut local = local;
    local.extend(["--cgroup-parent".to_string(), parent.clone()]);
    let steward = start(&local, &[], data, Some(parent))?;
    // The file's TLS section let it start; its `steward:` section applied.
    let (code, events) = steward.get_json("/state/events").await?;
    ensure!(code == 200, "/state/events: {code}");
    let text = events.to_string();
    ensure!(
        !text.contains("config_reload_failed"),
        "the shipped config.yaml is refused: {text}"
    );
    Ok(())
}
