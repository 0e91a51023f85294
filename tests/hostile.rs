//! A hostile worker: `tests/apps/hostile`, run by the real
//! `function-executor` under the process driver, tries the attacks of issue
//! 25 on Steward and on another live worker: read Steward's environment,
//! signal Steward, open the usage ledger, the admin token, the worker
//! records, the executor id and the cached code of every application, and
//! connect to the other worker's socket. The function returns what each
//! attempt got, so every failure is seen from inside. These protections
//! need root (workers under their own uids): without it the test says so
//! and checks nothing more; `cargo xtask test` runs as root in CI, where a
//! protection that does not hold is a real failure.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use steward_devserver::{FunctionOptions, client};
use support::{AgentProc, Plane, repo_root, write_secret};

fn root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0)
}

/// Regular files directly in `dir`, by name.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect()
}

/// The Unix socket of the one live worker, from its timeline ("spawned pid
/// N on unix:<path>").
fn socket_of(fes: &Value) -> Option<String> {
    let text = fes.to_string();
    let at = text.find("on unix:")? + "on unix:".len();
    let rest = &text[at..];
    let end = rest.find(|c: char| c == '"' || c.is_whitespace())?;
    Some(rest[..end].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_worker_reaches_nothing_of_steward_or_another_worker() -> Result<()> {
    let plane = Plane::start().await?;
    plane.deploy_hello(FunctionOptions::default()).await?;
    client::deploy(
        &plane.url,
        "default",
        "hostile",
        "1",
        &repo_root().join("tests/apps/hostile"),
        &FunctionOptions::default(),
    )
    .await?;
    let secrets = tempfile::tempdir()?;
    let token = secrets.path().join("admin-token");
    write_secret(&token, "an-admin-token-long-enough")?;
    let token_arg = token.to_string_lossy().into_owned();
    let steward = AgentProc::steward(
        &plane.grpc,
        plane.blob_dir.path(),
        &["--admin-token-file", &token_arg],
    )?;
    plane.wait_executors(1).await?;

    // The neighbour: hello's worker, alive after its request.
    let out = plane.invoke("greet", json!("neighbour")).await?;
    assert_eq!(out.output, Some(json!("Hello, neighbour!")), "{out:?}");
    let (_, fes) = steward.get_json("/state/function-executors").await?;
    let neighbour = socket_of(&fes).with_context(|| format!("no socket in {fes}"))?;

    let data = steward.data_dir.path();
    let mut files = serde_json::Map::new();
    files.insert("admin_token".into(), json!(token));
    files.insert("executor_id".into(), json!(data.join("executor_id")));
    for (kind, dir) in [
        ("ledger", data.join("usage")),
        ("record", data.join("workers")),
        ("cached_code", data.join("code")),
    ] {
        let found = files_in(&dir);
        assert!(!found.is_empty(), "nothing in {}", dir.display());
        for (i, f) in found.into_iter().enumerate() {
            files.insert(format!("{kind}_{i}"), json!(f));
        }
    }
    let targets = json!({
        "steward_pid": steward.pid(),
        "files": files,
        "sockets": {"neighbour_socket": neighbour},
    });
    let out = plane.invoke_app("hostile", "attack", targets).await?;
    let got = out
        .output
        .clone()
        .with_context(|| format!("the attack returned nothing: {out:?}"))?;
    eprintln!("the hostile worker got {got}");
    if !root() {
        eprintln!(
            "SKIP: these protections need root (workers under their own uids); as this user the worker got {got}"
        );
        plane.stop().await;
        return Ok(());
    }
    let uid = got["uid"].as_u64().context("uid")?;
    assert!((2_000_000_001..=2_000_065_535).contains(&uid), "{got}");
    let attempts = got.as_object().context("an object")?;
    assert!(attempts.len() >= 8, "{got}");
    for (attack, result) in attempts.iter().filter(|(k, _)| *k != "uid") {
        assert!(
            result == "EACCES" || result == "EPERM",
            "{attack} was not refused: {result} (all: {got})"
        );
    }
    // Seen from outside: Steward and the neighbour are untouched.
    let again = plane.invoke("greet", json!("again")).await?;
    assert_eq!(again.output, Some(json!("Hello, again!")), "{again:?}");
    plane.stop().await;
    Ok(())
}
