//! HTTP client calls used by `steward devserver deploy|invoke` and tests.

use std::path::Path;

use crate::{DevServerError, FunctionOptions, RequestOutcome};

fn client_err(url: &str, e: impl std::fmt::Display) -> DevServerError {
    DevServerError::Client {
        url: url.to_string(),
        message: e.to_string(),
    }
}

/// The client for the dev control plane at `server` and its base URL.
/// Only `http://` and `https://` (any case) are understood: a bare
/// `host:port` or another scheme is refused with the reason, as the client
/// cannot tell whether TLS was meant. For an `https://` server every
/// request stays on TLS (redirects to `http://` included), and no redirect
/// is followed at all: the dev control plane never answers with one.
fn http_client(server: &str) -> Result<(reqwest::Client, String), DevServerError> {
    let refuse = |why: String| client_err(server, why);
    let (scheme, rest) = server.split_once("://").ok_or_else(|| {
        refuse("give the dev control plane's URL with http:// or https://".into())
    })?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "https" => true,
        "http" => false,
        _ => {
            return Err(refuse(format!(
                "scheme {scheme:?} is neither http nor https"
            )));
        }
    };
    let client = reqwest::Client::builder()
        .https_only(tls)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| refuse(e.to_string()))?;
    let scheme = if tls { "https" } else { "http" };
    Ok((client, format!("{scheme}://{rest}")))
}

async fn json_of(url: &str, resp: reqwest::Response) -> Result<serde_json::Value, DevServerError> {
    let status = resp.status();
    if status.is_redirection() {
        let to: String = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|l| {
                String::from_utf8_lossy(l.as_bytes())
                    .chars()
                    .take(256)
                    .collect()
            })
            .unwrap_or_default();
        return Err(client_err(
            url,
            format!("{status}: a redirect to {to:?}, not followed"),
        ));
    }
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
    let (client, server) = http_client(server)?;
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
    let resp = client
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
    let (client, server) = http_client(server)?;
    let url = format!(
        "{server}/v1/namespaces/{namespace}/applications/{application}/functions/{function}"
    );
    let resp = client
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
    let (client, server) = http_client(server)?;
    let url = format!("{server}/v1/executors");
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| client_err(&url, e))?;
    json_of(&url, resp).await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A one-connection HTTP server answering `response` to a request; the
    /// flag says whether anyone connected.
    async fn serve_once(response: String) -> (std::net::SocketAddr, Arc<AtomicBool>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hit = Arc::new(AtomicBool::new(false));
        let seen = hit.clone();
        tokio::spawn(async move {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            seen.store(true, Ordering::SeqCst);
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = sock.write_all(response.as_bytes()).await;
        });
        (addr, hit)
    }

    const EMPTY_LIST: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n[]";

    #[tokio::test]
    async fn a_redirect_is_never_followed() {
        let (elsewhere, followed) = serve_once(EMPTY_LIST.into()).await;
        let (plane, _) = serve_once(format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{elsewhere}/v1/executors\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        ))
        .await;
        let e = executors(&format!("http://{plane}"))
            .await
            .expect_err("a redirect is an error");
        assert!(e.to_string().contains("not followed"), "{e}");
        assert!(
            !followed.load(Ordering::SeqCst),
            "the redirect was followed"
        );
    }

    #[tokio::test]
    async fn a_client_for_an_https_plane_never_speaks_plain_http() {
        let (plain, hit) = serve_once(EMPTY_LIST.into()).await;
        let (client, _) = http_client("https://plane.example").expect("client");
        let sent = client
            .get(format!("http://{plain}/v1/executors"))
            .send()
            .await;
        assert!(sent.is_err(), "{sent:?}");
        assert!(
            !hit.load(Ordering::SeqCst),
            "a plaintext connection was made"
        );
    }

    #[test]
    fn only_http_and_https_urls_are_understood() {
        for (server, base) in [
            ("http://127.0.0.1:8900", "http://127.0.0.1:8900"),
            ("HTTP://127.0.0.1:8900", "http://127.0.0.1:8900"),
            ("https://plane:443", "https://plane:443"),
            ("HTTPS://plane:443", "https://plane:443"),
        ] {
            let (_, got) = http_client(server).expect(server);
            assert_eq!(got, base);
        }
        for server in ["127.0.0.1:8900", "grpc://127.0.0.1:8900", "file:///x"] {
            let e = http_client(server).expect_err(server).to_string();
            assert!(e.contains("http"), "{server}: {e}");
        }
    }
}
