//! The operator's side: `steward status`, `steward pause|unpause|drain`,
//! talking to a running agent's monitoring server (`/state/*` for status,
//! with the read token from `--state-token-file` where the agent wants one;
//! `/admin/*` with the bearer token from `--admin-token-file` for actions).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

#[derive(Args, Debug)]
pub struct AgentClientArgs {
    /// The agent's monitoring address.
    #[arg(long, default_value = "http://localhost:7000")]
    pub agent_url: String,
    /// File holding the admin token (the agent's `--admin-token-file`).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// File holding the read token (the agent's `--state-token-file`),
    /// sent with every `/state` request.
    #[arg(long)]
    pub state_token_file: Option<PathBuf>,
}

/// `steward drain`: the agent's address and tokens, and how long to wait.
#[derive(Args, Debug)]
pub struct DrainArgs {
    #[command(flatten)]
    pub agent: AgentClientArgs,
    /// Then wait, at most this many seconds, until the agent is disabled
    /// (its last allocation finished, every worker stopped) and no result
    /// waits for the server; fail if it is not by then. 0 returns once the
    /// drain has begun. A Kubernetes `preStop` hook waits this way.
    #[arg(long, default_value_t = 0)]
    pub wait_s: u64,
}

/// How often `steward drain --wait-s` asks the agent how far it is.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(500);
/// The longest one poll of `steward drain --wait-s` may take.
const DRAIN_POLL_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Pages of one list `steward status` reads at most (of
/// [`steward_monitoring::MAX_PAGE_LIMIT`] items each).
const STATUS_MAX_PAGES: usize = 100;

/// Reads an admin token file: whitespace around it is not part of it.
pub fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading admin token file {}", path.display()))?;
    Ok(text.trim().to_string())
}

/// `steward pause|unpause|drain`: prints the agent's answer.
pub async fn action(args: &AgentClientArgs, action: &str) -> Result<()> {
    let path = args
        .admin_token_file
        .as_deref()
        .context("--admin-token-file is required for admin actions")?;
    let token = read_token(path)?;
    let url = format!("{}/admin/{action}", args.agent_url.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .post(&url)
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let code = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !code.is_success() {
        bail!("{action} refused: HTTP {code}: {body}");
    }
    println!(
        "{action}: {} → {}",
        body["from"].as_str().unwrap_or("?"),
        body["mode"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// `steward drain [--wait-s N]`: begins the drain, then (with a wait)
/// polls the agent until it is disabled with no result waiting for the
/// server, or the wait is over. The admin token reads `/state` too.
pub async fn drain(args: &DrainArgs) -> Result<()> {
    action(&args.agent, "drain").await?;
    if args.wait_s == 0 {
        return Ok(());
    }
    let path = args
        .agent
        .admin_token_file
        .as_deref()
        .context("--admin-token-file is required for admin actions")?;
    let token = read_token(path)?;
    let base = args.agent.agent_url.as_str();
    let deadline = std::time::Instant::now()
        .checked_add(std::time::Duration::from_secs(args.wait_s))
        .context("--wait-s is too large")?;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // One poll at most as long as what is left (10 s at most): a hung
        // agent does not hold the hook past its deadline; an error or a
        // reply that is not the agent's is retried until then.
        let poll = tokio::time::timeout(left.min(DRAIN_POLL_LIMIT), drain_state(base, &token));
        // What this poll saw, said if the deadline passes.
        let last = match poll.await {
            Ok(Ok((mode, waiting))) => {
                match (mode.as_str(), waiting) {
                    ("disabled", Some(0)) => {
                        println!("drained: disabled, no result waiting for the server");
                        return Ok(());
                    }
                    ("draining" | "disabled", _) => {}
                    ("active" | "paused", _) => {
                        bail!("the agent left the drain: it is {mode} (unpaused?)")
                    }
                    _ => {}
                }
                let waiting = waiting.map_or("?".to_string(), |n| n.to_string());
                format!("the agent is {mode}, {waiting} result(s) wait for the server")
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "the agent did not answer in time".to_string(),
        };
        if std::time::Instant::now() >= deadline {
            bail!("not drained within {} s: {last}", args.wait_s);
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// The agent's mode and how many results wait for the server.
async fn drain_state(base: &str, token: &str) -> Result<(String, Option<u64>)> {
    let mode = get(base, "/admin/mode", Some(token)).await?;
    let mode = mode["mode"].as_str().unwrap_or("?").to_string();
    let allocs = get(base, "/state/allocations?limit=1", Some(token)).await?;
    Ok((mode, allocs["pending_results"].as_u64()))
}

async fn get(base: &str, path: &str, token: Option<&str>) -> Result<Value> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut req = reqwest::Client::new().get(&url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.with_context(|| format!("GET {url}"))?;
    let code = resp.status();
    if matches!(code.as_u16(), 401 | 403) {
        bail!("GET {url}: HTTP {code}: the agent wants its read token (--state-token-file)");
    }
    Ok(resp.json().await.unwrap_or(Value::Null))
}

/// Every page of the list document at `path` (its items under `key`, the
/// document's other fields from the first page), up to [`STATUS_MAX_PAGES`].
async fn get_all(base: &str, path: &str, key: &str, token: Option<&str>) -> Result<Value> {
    let limit = steward_monitoring::MAX_PAGE_LIMIT;
    let mut doc = get(base, &format!("{path}?limit={limit}"), token).await?;
    let mut items = doc[key].as_array().cloned().unwrap_or_default();
    let mut next = doc["page"]["next_offset"].as_u64();
    for _ in 1..STATUS_MAX_PAGES {
        let Some(offset) = next else { break };
        let page = get(
            base,
            &format!("{path}?limit={limit}&offset={offset}"),
            token,
        )
        .await?;
        items.extend(page[key].as_array().into_iter().flatten().cloned());
        next = page["page"]["next_offset"].as_u64();
    }
    doc[key] = Value::Array(items);
    Ok(doc)
}

/// `steward status`: one screen about a running agent.
pub async fn status(args: &AgentClientArgs) -> Result<()> {
    let base = args.agent_url.as_str();
    let token = args
        .state_token_file
        .as_deref()
        .map(read_token)
        .transpose()?;
    let t = token.as_deref();
    let (health, host, fes, allocs, events) = tokio::try_join!(
        get(base, "/monitoring/health", None),
        get(base, "/state/host", t),
        get_all(base, "/state/function-executors", "function_executors", t),
        get_all(base, "/state/allocations", "allocations", t),
        get_all(base, "/state/events", "events", t),
    )?;
    print!("{}", render(&health, &host, &fes, &allocs, &events));
    Ok(())
}

fn count_by(items: &Value, key: &str) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for i in items.as_array().into_iter().flatten() {
        *counts
            .entry(i[key].as_str().unwrap_or("?").to_lowercase())
            .or_default() += 1;
    }
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The status screen from the agent's documents.
pub fn render(health: &Value, host: &Value, fes: &Value, allocs: &Value, events: &Value) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<12} {v}\n"));
    line(
        &mut out,
        "mode",
        host["mode"].as_str().unwrap_or("?").to_string(),
    );
    line(
        &mut out,
        "health",
        format!(
            "{} ({})",
            health["status"].as_str().unwrap_or("?"),
            health["message"].as_str().unwrap_or("")
        ),
    );
    line(
        &mut out,
        "workers",
        count_by(&fes["function_executors"], "status"),
    );
    line(
        &mut out,
        "allocations",
        count_by(&allocs["allocations"], "phase"),
    );
    line(
        &mut out,
        "results",
        format!(
            "{} waiting for the server",
            allocs["pending_results"].as_u64().unwrap_or(0)
        ),
    );
    let w = &host["workers"];
    line(
        &mut out,
        "admitted",
        format!(
            "{} of {} CPU ms/s, {} of {} memory bytes",
            w["admitted"]["cpu_ms_per_sec"],
            w["allocatable"]["cpu_ms_per_sec"],
            w["admitted"]["memory_bytes"],
            w["allocatable"]["memory_bytes"]
        ),
    );
    let limits = match w["limits"]["cgroup_version"].as_str() {
        Some(v) => format!("enforced (cgroup {v})"),
        None => format!(
            "NOT enforced: {}",
            w["limits"]["not_enforced_because"].as_str().unwrap_or("?")
        ),
    };
    line(&mut out, "limits", limits);
    let identities = match w["limits"]["worker_uids"].as_str() {
        Some(uids) => format!(
            "separated (uids {uids}, {} channel)",
            w["limits"]["channel"].as_str().unwrap_or("?")
        ),
        None => format!(
            "NOT separated: {}",
            w["limits"]["identities_not_separated_because"]
                .as_str()
                .unwrap_or("?")
        ),
    };
    line(&mut out, "identities", identities);
    let bad: Vec<&Value> = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            let k = e["kind"].as_str().unwrap_or("");
            k.contains("fail")
                || k.contains("rejected")
                || k.contains("oom")
                || k.contains("evicted")
                || k.contains("error")
        })
        .collect();
    out.push_str("last errors:\n");
    if bad.is_empty() {
        out.push_str("  none\n");
    }
    for e in bad.iter().rev().take(5) {
        out.push_str(&format!(
            "  {} {}: {}\n",
            e["kind"].as_str().unwrap_or("?"),
            e["subject"].as_str().unwrap_or(""),
            e["message"].as_str().unwrap_or("")
        ));
    }
    out
}

/// `steward config get` / `steward config set KEY=VALUE...`.
#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// `get`, or `set` followed by `KEY=VALUE` pairs: `labels.NAME=VALUE`
    /// (an empty value removes the label), `allowed_functions=ns:app:fn,...`
    /// (empty: any), `reserved.cpus|memory_bytes|disk_bytes=N`,
    /// `eviction_memory_available=BYTES`,
    /// `eviction_memory_pressure=PERCENT`, `log_level=FILTER`.
    #[arg(num_args = 1..)]
    pub words: Vec<String>,
    #[command(flatten)]
    pub client: AgentClientArgs,
}

fn token_of(args: &AgentClientArgs) -> Result<String> {
    read_token(
        args.admin_token_file
            .as_deref()
            .context("--admin-token-file is required for admin actions")?,
    )
}

/// Turns `KEY=VALUE` pairs into a settings change, starting from `current`.
pub fn change_from(current: &Value, pairs: &[String]) -> Result<Value> {
    let mut change = serde_json::Map::new();
    let mut labels = current["labels"].as_object().cloned().unwrap_or_default();
    let mut labels_touched = false;
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("{pair:?} is not KEY=VALUE"))?;
        match k {
            "eviction_memory_available" => {
                change.insert(
                    k.into(),
                    Value::from(v.parse::<u64>().with_context(|| format!("{k}: bytes"))?),
                );
            }
            "eviction_memory_pressure" => {
                change.insert(
                    k.into(),
                    Value::from(
                        v.parse::<f64>()
                            .with_context(|| format!("{k}: a percentage"))?,
                    ),
                );
            }
            "log_level" => {
                change.insert(k.into(), Value::from(v));
            }
            "reserved.cpus" | "reserved.memory_bytes" | "reserved.disk_bytes" => {
                let n: u64 = v.parse().with_context(|| format!("{k}: a number"))?;
                let field = k.trim_start_matches("reserved.");
                let reserved = change
                    .entry("reserved")
                    .or_insert_with(|| Value::Object(serde_json::Map::new()));
                if let Some(r) = reserved.as_object_mut() {
                    r.insert(field.into(), Value::from(n));
                }
            }
            "allowed_functions" => {
                let list: Vec<Value> = v
                    .split(',')
                    .filter(|f| !f.is_empty())
                    .map(Value::from)
                    .collect();
                change.insert(k.into(), Value::Array(list));
            }
            _ => {
                let name = k
                    .strip_prefix("labels.")
                    .with_context(|| format!("unknown setting {k:?}"))?;
                labels_touched = true;
                if v.is_empty() {
                    labels.remove(name);
                } else {
                    labels.insert(name.into(), Value::from(v));
                }
            }
        }
    }
    if labels_touched {
        change.insert("labels".into(), Value::Object(labels));
    }
    Ok(Value::Object(change))
}

pub async fn config(args: &ConfigArgs) -> Result<()> {
    let token = token_of(&args.client)?;
    let url = format!(
        "{}/admin/config",
        args.client.agent_url.trim_end_matches('/')
    );
    let http = reqwest::Client::new();
    let current: Value = http
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .json()
        .await?;
    let (verb, pairs) = args
        .words
        .split_first()
        .context("config get | config set KEY=VALUE...")?;
    let shown = match verb.as_str() {
        "get" => current,
        "set" if !pairs.is_empty() => {
            let resp = http
                .patch(&url)
                .bearer_auth(&token)
                .json(&change_from(&current, pairs)?)
                .send()
                .await
                .with_context(|| format!("PATCH {url}"))?;
            let code = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            if !code.is_success() {
                bail!(
                    "refused: HTTP {code}: {}",
                    body["error"].as_str().unwrap_or("")
                );
            }
            body
        }
        _ => bail!("config get | config set KEY=VALUE..."),
    };
    println!("{}", serde_json::to_string_pretty(&shown)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn set_pairs_become_one_change() {
        let current =
            json!({"labels": {"rack": "r1", "zone": "a"}, "eviction_memory_available": 1});
        let change = change_from(
            &current,
            &[
                "labels.rack=r2".into(),
                "labels.zone=".into(),
                "eviction_memory_pressure=20".into(),
                "allowed_functions=a:b:c,d:e:f:2".into(),
            ],
        )
        .expect("valid");
        assert_eq!(
            change,
            json!({
                "labels": {"rack": "r2"},
                "eviction_memory_pressure": 20.0,
                "allowed_functions": ["a:b:c", "d:e:f:2"],
            })
        );
        assert!(change_from(&current, &["nope=1".into()]).is_err());
        assert!(change_from(&current, &["eviction_memory_available=lots".into()]).is_err());
        assert!(change_from(&current, &["labels".into()]).is_err());
    }
}
