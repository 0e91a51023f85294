//! The agent's HTTP face: Kubernetes probes (`/monitoring/startup`,
//! `/monitoring/health`), Prometheus metrics (`/monitoring/metrics`),
//! read-only state documents (`/state/*`) and, only when an admin token is
//! configured, the operator's `/admin/*` actions behind a bearer token
//! (401 without one, 403 with a wrong one, compared in constant time).
//!
//! The server only routes and formats; what the answers say comes from a
//! [`StateSource`] the binary wires in.
//! Must not know about: gRPC, protobuf, workers, the control-plane protocol.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;

/// Content type of OpenMetrics text, as Prometheus expects it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One probe's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub ok: bool,
    pub message: String,
}

/// How a state document is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    /// The protobuf text form, where the document has one.
    Text,
}

/// A rendered state document.
#[derive(Debug, Clone)]
pub enum Document {
    Json(serde_json::Value),
    Text(String),
}

/// What the monitoring server reports; implemented by the agent.
pub trait StateSource: Send + Sync + 'static {
    /// Startup probe: false until the agent is registered and has applied
    /// its first desired state, then true forever.
    fn startup(&self) -> ProbeResult;
    /// Liveness: false when the agent is wedged or cut off.
    fn health(&self) -> ProbeResult;
    /// What works but not fully (the usage ledger failing to write): listed
    /// as `degraded` in the health probe's body, which stays 200 when
    /// [`StateSource::health`] is ok. Empty by default.
    fn degraded(&self) -> Vec<String> {
        Vec::new()
    }
    /// OpenMetrics text of every metric.
    fn metrics(&self) -> String;
    /// The names of the documents under `/state/`.
    fn document_names(&self) -> Vec<&'static str>;
    /// `/state/{name}`; `None` when `name` is unknown.
    fn document(&self, name: &str, format: Format) -> Option<Document>;
    /// `/state/{name}?…` with its query parameters (other than `format`):
    /// `Err` names a bad parameter (HTTP 400). By default parameters are
    /// ignored.
    fn document_with_query(
        &self,
        name: &str,
        format: Format,
        _query: &BTreeMap<String, String>,
    ) -> Option<Result<Document, String>> {
        self.document(name, format).map(Ok)
    }
    /// An authenticated `/admin/{action}` call (`method` GET, POST or
    /// PATCH, with its body); `None` when `action` is unknown.
    fn admin(&self, _action: &str, _method: &str, _body: &[u8]) -> Option<AdminAnswer> {
        None
    }
    /// An `/admin/{action}` call refused before it reached [`StateSource::admin`]
    /// (`status` 401 or 403), for the agent to record.
    fn admin_refused(&self, _action: &str, _status: u16) {}
}

/// What an admin action answers.
#[derive(Debug, Clone)]
pub struct AdminAnswer {
    /// The HTTP status: 200, or 400 for a change refused as invalid.
    pub code: u16,
    pub body: serde_json::Value,
}

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 64 << 10;

/// The bearer token `/admin/*` requires.
#[derive(Clone)]
pub struct AdminToken(Arc<Vec<u8>>);

impl AdminToken {
    /// A token of at least 16 bytes (surrounding whitespace is not part of it).
    pub fn new(token: &str) -> Result<AdminToken, String> {
        let t = token.trim();
        if t.len() < 16 {
            return Err("the admin token must be at least 16 characters".into());
        }
        Ok(AdminToken(Arc::new(t.as_bytes().to_vec())))
    }

    /// Constant-time comparison (for equal lengths; the length is not secret).
    fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        presented.ct_eq(self.0.as_slice()).into()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MonitoringError {
    #[error("cannot listen on {addr} for the monitoring server: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("monitoring server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Binds the monitoring listener, naming the address in the error when the
/// port is taken.
pub async fn bind(addr: &str) -> Result<TcpListener, MonitoringError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MonitoringError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    source: Arc<dyn StateSource>,
    admin: Option<AdminToken>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), MonitoringError> {
    axum::serve(listener, router_with_admin(source, admin))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(MonitoringError::Serve)
}

/// The local address a listener got (for port 0).
pub fn local_addr(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

type Src = Arc<dyn StateSource>;

/// The routes, for embedding or testing (no admin routes).
pub fn router(source: Src) -> Router {
    router_with_admin(source, None)
}

/// The routes; `/admin/*` exists only with a token.
pub fn router_with_admin(source: Src, admin: Option<AdminToken>) -> Router {
    let mut r = Router::new()
        .route("/monitoring/startup", get(startup))
        .route("/monitoring/health", get(health))
        .route("/monitoring/metrics", get(metrics))
        .route("/state", get(state_index))
        .route("/state/{name}", get(state_document));
    if let Some(token) = admin {
        let token = Arc::new(token);
        r = r.route(
            "/admin/{action}",
            axum::routing::any(move |state, path, method, headers, body| {
                admin_call(state, path, method, headers, body, token)
            }),
        );
    }
    r.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(source)
}

async fn admin_call(
    State(src): State<Src>,
    Path(action): Path<String>,
    method: axum::http::Method,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
    token: Arc<AdminToken>,
) -> Response {
    if !matches!(method.as_str(), "GET" | "POST" | "PATCH") {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": format!("{method} is not allowed on /admin/{action}")}),
        );
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let denied = match presented {
        None => Some((
            StatusCode::UNAUTHORIZED,
            "an admin token is required (Authorization: Bearer …)",
        )),
        Some(t) if !token.matches(t.as_bytes()) => {
            Some((StatusCode::FORBIDDEN, "wrong admin token"))
        }
        Some(_) => None,
    };
    if let Some((code, why)) = denied {
        src.admin_refused(&action, code.as_u16());
        let mut resp = json(code, serde_json::json!({"error": why}));
        if code == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        return resp;
    }
    if body.len() > MAX_ADMIN_BODY {
        return json(
            StatusCode::PAYLOAD_TOO_LARGE,
            serde_json::json!({"error": format!("an admin request body is at most {MAX_ADMIN_BODY} bytes")}),
        );
    }
    match src.admin(&action, method.as_str(), &body) {
        Some(AdminAnswer { code, body }) => json(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
        ),
        None => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("no admin action {action:?}")}),
        ),
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (status, axum::Json(value)).into_response()
}

/// A probe's answer: 200 `{"status": "ok"}` or 503 `{"status": "nok"}`, plus
/// `extra` fields, and `degraded` (a list) when there is any.
fn probe(p: ProbeResult, extra: &[(&str, &str)], degraded: Vec<String>) -> Response {
    let (code, status) = if p.ok {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "nok")
    };
    let mut body = serde_json::json!({"status": status, "message": p.message});
    for (k, v) in extra {
        body[*k] = serde_json::Value::String(v.to_string());
    }
    if !degraded.is_empty() {
        body["degraded"] = serde_json::json!(degraded);
    }
    json(code, body)
}

async fn startup(State(src): State<Src>) -> Response {
    probe(src.startup(), &[], Vec::new())
}

async fn health(State(src): State<Src>) -> Response {
    let degraded = src.degraded();
    probe(
        src.health(),
        &[("checker", "StewardHealthChecker")],
        degraded,
    )
}

/// Runs `f` on the blocking pool: rendering metrics and documents reads
/// the agent's state and its workers' cgroup files, which must not hold up
/// the agent's runtime thread (one thread by default) while it works.
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

async fn metrics(State(src): State<Src>) -> Response {
    let Some(text) = off_runtime(move || src.metrics()).await else {
        return json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"error": "rendering the metrics failed"}),
        );
    };
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
    );
    resp
}

async fn state_index(State(src): State<Src>) -> Response {
    let names: Vec<String> = src
        .document_names()
        .iter()
        .map(|n| format!("/state/{n}"))
        .collect();
    json(StatusCode::OK, serde_json::json!({"documents": names}))
}

async fn state_document(
    State(src): State<Src>,
    Path(name): Path<String>,
    Query(mut q): Query<BTreeMap<String, String>>,
) -> Response {
    let format = q.remove("format");
    let format = match format.as_deref() {
        None | Some("json") => Format::Json,
        Some("text") => Format::Text,
        Some(other) => {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("unknown format {other:?}; use json or text")}),
            );
        }
    };
    let doc = {
        let (src, name) = (src.clone(), name.clone());
        off_runtime(move || src.document_with_query(&name, format, &q))
            .await
            .flatten()
    };
    match doc {
        Some(Ok(Document::Json(v))) => json(StatusCode::OK, v),
        Some(Ok(Document::Text(t))) => t.into_response(),
        Some(Err(why)) => json(StatusCode::BAD_REQUEST, serde_json::json!({"error": why})),
        None => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("no state document {name:?}"), "documents": src.document_names()}),
        ),
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    json(
        StatusCode::NOT_FOUND,
        serde_json::json!({"error": format!("no route for {}", uri.path())}),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    json(
        StatusCode::METHOD_NOT_ALLOWED,
        serde_json::json!({"error": format!("{method} is not allowed on {}; only GET", uri.path())}),
    )
}
