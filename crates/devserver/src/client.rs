//! HTTP client calls used by `steward devserver deploy|invoke` and tests.

use std::path::Path;

use crate::{DevServerError, FunctionOptions, RequestOutcome};

fn client_err(url: &str, e: impl std::fmt::Display) -> DevServerError {
    DevServerError::Client {
        url: url.to_string(),
        message: e.to_string(),
    }
}

async fn json_of(url: &str, resp: reqwest::Response) -> Result<serde_json::Value, DevServerError> {
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.map_err(|e| client_err(url, e))?;
    if !status.is_success() {
        return Err(client_err(
            url,
            format!(
                "{status}: {}",
                v.get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("unknown error")
            ),
        ));
    }
    Ok(v)
}

/// Packs `path` and deploys it as `namespace/application`.
pub async fn deploy(
    server: &str,
    namespace: &str,
    application: &str,
    version: &str,
    path: &Path,
    options: &FunctionOptions,
) -> Result<serde_json::Value, DevServerError> {
    let packed = crate::app::pack(path)?;
    let url = format!("{server}/v1/namespaces/{namespace}/applications/{application}");
    let query = [
        ("version", version.to_string()),
        ("cpu_ms_per_sec", options.cpu_ms_per_sec.to_string()),
        ("memory_bytes", options.memory_bytes.to_string()),
        ("disk_bytes", options.disk_bytes.to_string()),
        ("gpus", options.gpus.to_string()),
        ("max_concurrency", options.max_concurrency.to_string()),
        (
            "initialization_timeout_ms",
            options.initialization_timeout_ms.to_string(),
        ),
        (
            "allocation_timeout_ms",
            options.allocation_timeout_ms.to_string(),
        ),
    ];
    let query: String = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let full = format!("{url}?{query}");
    let resp = reqwest::Client::new()
        .post(&full)
        .header("content-type", "application/zip")
        .body(packed.zip)
        .send()
        .await
        .map_err(|e| client_err(&url, e))?;
    json_of(&url, resp).await
}

/// Invokes a function with a JSON input and waits for the outcome.
pub async fn invoke(
    server: &str,
    namespace: &str,
    application: &str,
    function: &str,
    input: &serde_json::Value,
    timeout_s: u64,
) -> Result<RequestOutcome, DevServerError> {
    let url = format!(
        "{server}/v1/namespaces/{namespace}/applications/{application}/functions/{function}"
    );
    let resp = reqwest::Client::new()
        .post(format!("{url}?wait=true&timeout_s={timeout_s}"))
        .header("content-type", "application/json")
        .body(input.to_string())
        .send()
        .await
        .map_err(|e| client_err(&url, e))?;
    let v = json_of(&url, resp).await?;
    serde_json::from_value(v).map_err(|e| client_err(&url, e))
}

/// Registered executors, as the server sees them.
pub async fn executors(server: &str) -> Result<serde_json::Value, DevServerError> {
    let url = format!("{server}/v1/executors");
    let resp = reqwest::get(&url).await.map_err(|e| client_err(&url, e))?;
    json_of(&url, resp).await
}
