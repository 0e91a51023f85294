//! The agent's HTTP face: Kubernetes probes (`/monitoring/startup`,
//! `/monitoring/health`), Prometheus metrics (`/monitoring/metrics`),
//! read-only state documents (`/state/*`) and, only when an admin token is
//! configured, the operator's `/admin/*` actions behind a bearer token
//! (401 without one, 403 with a wrong one, compared in constant time).
//!
//! The server only routes and formats; what the answers say comes from a
//! [`StateSource`] the binary wires in.
//!
//! Nobody on the network can stall or flood the agent through it
//! ([`Limits`]): connections are capped, a client has
//! [`Limits::header_read_timeout`] to send a request's headers and the
//! same to idle between keep-alive requests (a slowloris is cut off), every
//! request has [`Limits::request_timeout`], every connection is closed at
//! [`Limits::connection_lifetime`] and dropped [`Limits::close_grace`]
//! later whatever it is doing (a client that never reads its response
//! frees its slot), and at most [`Limits::state_concurrency`] documents and
//! metrics are rendered at once. Probes never starve behind the cap:
//! connections over it go to a reserve of [`RESERVED_PROBE_CONNECTIONS`]
//! that answers only `/monitoring/startup` and `/monitoring/health` (503
//! to anything else), lives [`PROBE_CONNECTION_LIFETIME`] at most, and
//! gives its oldest connection's place to a new one when full, so strangers
//! holding every slot cannot make kubelet restart the agent. An optional read token
//! guards `/state/*`, the metrics and the host's page; the probes and the
//! page's static assets stay open. A browser, which cannot send a bearer
//! token, logs in at `/login` and gets a session cookie ([`session`]). An
//! admin request's body is read only once its token was accepted.
//! Must not know about: gRPC, protobuf, workers, the control-plane protocol.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub mod session;

/// Content type of OpenMetrics text, as Prometheus expects it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Open connections at most (`--monitoring-max-connections`); one more
/// goes to the probes' reserve ([`RESERVED_PROBE_CONNECTIONS`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;
/// Connections accepted over the cap, where only the probes are answered;
/// when all are taken, the oldest is dropped for the newcomer.
pub const RESERVED_PROBE_CONNECTIONS: usize = 8;
/// The longest a connection of the probes' reserve lives (its headers
/// included), keep-alive off.
pub const PROBE_CONNECTION_LIFETIME: Duration = Duration::from_secs(5);
/// Age at which a connection is asked to close once its current response
/// is written (a keep-alive client reconnects).
pub const DEFAULT_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Time a connection gets after [`Limits::connection_lifetime`] to finish
/// its response before it is dropped (a client that never reads).
pub const DEFAULT_CLOSE_GRACE: Duration = Duration::from_secs(15);
/// Time a client has to send a request's headers, and the longest a
/// keep-alive connection idles between requests
/// (`--monitoring-header-read-timeout-s`).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a request has to be answered, waiting for a rendering slot
/// included (`--monitoring-request-timeout-s`); then 503.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Documents and metrics rendered at once (`--monitoring-state-concurrency`);
/// more requests wait for a slot, within the request timeout.
pub const DEFAULT_STATE_CONCURRENCY: usize = 4;
/// Items of a list document when the request gives no `limit`.
pub const DEFAULT_PAGE_LIMIT: usize = 1000;
/// The largest `limit` a list document accepts.
pub const MAX_PAGE_LIMIT: usize = 10_000;
/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 64 << 10;
/// How long a stopping server lets requests in flight finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (out of descriptors), so the loop does
/// not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

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
    ) -> Option<Result<Document, QueryError>> {
        self.document(name, format).map(Ok)
    }
    /// An authenticated `/admin/{action}` call (`method` GET, POST or
    /// PATCH, with its body); `None` when `action` is unknown.
    fn admin(&self, _action: &str, _method: &str, _body: &[u8]) -> Option<AdminAnswer> {
        None
    }
    /// An `/admin/{action}` call refused before it reached [`StateSource::admin`]
    /// (`status` 401 or 403), for the agent to record (strangers can call
    /// this as often as they like: record it rate-limited).
    fn admin_refused(&self, _action: &str, _status: u16) {}
    /// The host's page (`/` and `/dashboard`) as HTML, made with the query
    /// parameters (`fragment=1`: only the part a live page swaps in);
    /// `None`: there is no page.
    fn page(&self, _query: &BTreeMap<String, String>) -> Option<String> {
        None
    }
    /// A file the page loads (`/assets/{name}`): its content type and bytes.
    fn asset(&self, _name: &str) -> Option<(&'static str, &'static [u8])> {
        None
    }
    /// A read of `path` (`/state/…`, the metrics) refused for a missing
    /// (401) or wrong (403) read token; rate-limit it as
    /// [`StateSource::admin_refused`].
    fn read_refused(&self, _path: &str, _status: u16) {}
}

/// What an admin action answers.
#[derive(Debug, Clone)]
pub struct AdminAnswer {
    /// The HTTP status: 200, or 400 for a change refused as invalid.
    pub code: u16,
    pub body: serde_json::Value,
}

/// Why a state document's query is refused (HTTP 400, this text in the
/// body's `error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("{name} {value:?}: a whole number")]
    NotANumber { name: &'static str, value: String },
    #[error("limit {0}: from 1 to {MAX_PAGE_LIMIT}")]
    Limit(usize),
    /// A parameter the document itself refuses, in its words.
    #[error("{0}")]
    Parameter(String),
}

/// A bearer token shorter than [`BearerToken::new`] accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a token must be at least 16 characters")]
pub struct TokenTooShort;

/// A bearer token: the admin token of `/admin/*`, or the read token of
/// `/state/*` and the metrics.
#[derive(Clone)]
pub struct BearerToken(Arc<Vec<u8>>);

/// The admin token (the name the binary has always used).
pub type AdminToken = BearerToken;

impl BearerToken {
    /// A token of at least 16 bytes (surrounding whitespace is not part of it).
    pub fn new(token: &str) -> Result<BearerToken, TokenTooShort> {
        let t = token.trim();
        if t.len() < 16 {
            return Err(TokenTooShort);
        }
        Ok(BearerToken(Arc::new(t.as_bytes().to_vec())))
    }

    /// Constant-time comparison (for equal lengths; the length is not secret).
    fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        presented.ct_eq(self.0.as_slice()).into()
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(…)")
    }
}

/// What one client may cost the agent.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub state_concurrency: usize,
    pub connection_lifetime: Duration,
    pub close_grace: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            state_concurrency: DEFAULT_STATE_CONCURRENCY,
            connection_lifetime: DEFAULT_CONNECTION_LIFETIME,
            close_grace: DEFAULT_CLOSE_GRACE,
        }
    }
}

/// The server's own counters (`steward_monitoring_*`).
#[derive(Clone, Default)]
pub struct ServerMetrics {
    /// Requests refused for a missing or wrong token, by route and status.
    auth_failures: Family<Vec<(&'static str, &'static str)>, Counter>,
    connections_refused: Counter,
    requests_timed_out: Counter,
}

impl ServerMetrics {
    /// Counters registered in `registry`.
    pub fn register(registry: &mut Registry) -> ServerMetrics {
        let m = ServerMetrics::default();
        registry.register(
            "monitoring_auth_failures",
            "Monitoring requests refused for a missing (401) or wrong (403) token, by route",
            m.auth_failures.clone(),
        );
        registry.register(
            "monitoring_connections_refused",
            "Monitoring connections accepted over the connection cap, where only the probes are answered",
            m.connections_refused.clone(),
        );
        registry.register(
            "monitoring_requests_timed_out",
            "Monitoring requests answered 503 because they ran past the request timeout",
            m.requests_timed_out.clone(),
        );
        m
    }

    fn auth_failed(&self, route: &'static str, status: StatusCode) {
        let status = if status == StatusCode::UNAUTHORIZED {
            "401"
        } else {
            "403"
        };
        self.auth_failures
            .get_or_create(&vec![("route", route), ("status", status)])
            .inc();
    }
}

/// Everything the server is given besides its listener and source.
#[derive(Clone, Default)]
pub struct ServerConfig {
    /// `/admin/*` exists only with it.
    pub admin: Option<BearerToken>,
    /// With it, `/state/*` and the metrics need it (or the admin token).
    pub read: Option<BearerToken>,
    pub limits: Limits,
    pub metrics: ServerMetrics,
}

/// `?limit=&offset=` of a list document: items `[offset, offset + limit)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub offset: usize,
    pub limit: usize,
}

impl Default for Page {
    fn default() -> Page {
        Page {
            offset: 0,
            limit: DEFAULT_PAGE_LIMIT,
        }
    }
}

impl Page {
    /// Everything (for callers inside the agent).
    pub const ALL: Page = Page {
        offset: 0,
        limit: usize::MAX,
    };

    /// The page a query asks for; `Err` names a bad `limit` or `offset`.
    pub fn from_query(query: &BTreeMap<String, String>) -> Result<Page, QueryError> {
        let number = |name: &'static str| -> Result<Option<usize>, QueryError> {
            query
                .get(name)
                .map(|v| {
                    v.parse::<usize>().map_err(|_| QueryError::NotANumber {
                        name,
                        value: v.clone(),
                    })
                })
                .transpose()
        };
        let limit = number("limit")?.unwrap_or(DEFAULT_PAGE_LIMIT);
        if !(1..=MAX_PAGE_LIMIT).contains(&limit) {
            return Err(QueryError::Limit(limit));
        }
        Ok(Page {
            offset: number("offset")?.unwrap_or(0),
            limit,
        })
    }

    /// The indices of this page in a list of `total` items.
    pub fn range(&self, total: usize) -> std::ops::Range<usize> {
        let start = self.offset.min(total);
        start..start.saturating_add(self.limit).min(total)
    }

    /// This page of `items`.
    pub fn slice<'a, T>(&self, items: &'a [T]) -> &'a [T] {
        &items[self.range(items.len())]
    }

    /// Where this page sits in a list of `total` items: `total`, `offset`,
    /// `limit` and `next_offset` (`null` on the last page).
    pub fn info(&self, total: usize) -> serde_json::Value {
        self.info_until(total, self.range(total).end)
    }

    /// As [`Page::info`] for a page cut short at `end` (a size bound).
    pub fn info_until(&self, total: usize, end: usize) -> serde_json::Value {
        serde_json::json!({
            "total": total,
            "offset": self.offset,
            "limit": self.limit,
            "next_offset": (end < total).then_some(end),
        })
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

/// Serves until `shutdown` resolves, within `config.limits`.
///
/// axum's own `serve` neither caps connections nor gives hyper a timer,
/// so a client trickling its headers would hold a connection forever:
/// connections are accepted here and each is served by hyper's HTTP/1
/// server with a header read timeout and a lifetime.
pub async fn serve(
    listener: TcpListener,
    source: Arc<dyn StateSource>,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), MonitoringError> {
    let limits = config.limits;
    let metrics = config.metrics.clone();
    let app = router_with(source.clone(), config.clone());
    let reserve_app = probes_only(source, config);
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut reserve_http = hyper::server::conn::http1::Builder::new();
    reserve_http
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout.min(PROBE_CONNECTION_LIFETIME))
        .keep_alive(false);
    let reserve = Reserve::default();
    // Every connection holds a receiver: `stopping.closed()` says all are gone.
    let (stopping, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "monitoring server: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let io = hyper_util::rt::TokioIo::new(stream);
        let stop = stop_rx.clone();
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Over the cap: only the probes are answered, briefly.
            metrics.connections_refused.inc();
            let service = hyper_util::service::TowerToHyperService::new(reserve_app.clone());
            let conn = reserve_http.serve_connection(io, service);
            reserve.admit(async move {
                let _ = tokio::time::timeout(PROBE_CONNECTION_LIFETIME, conn).await;
                drop(stop);
            });
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = http.serve_connection(io, service);
        tokio::spawn(async move {
            drive(conn, limits, stop).await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, stopping.closed()).await;
    reserve.abort_all();
    Ok(())
}

/// Serves one connection: at [`Limits::connection_lifetime`] or when the
/// server stops it is asked to close after its current response, and
/// [`Limits::close_grace`] later it is dropped (its socket closed).
async fn drive<I, S>(
    conn: hyper::server::conn::http1::Connection<I, S>,
    limits: Limits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = tokio::time::sleep(limits.connection_lifetime) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.close_grace, conn).await;
}

/// The connections of the probes' reserve, oldest first.
#[derive(Clone, Default)]
struct Reserve(Arc<parking_lot::Mutex<ReserveInner>>);

#[derive(Default)]
struct ReserveInner {
    next_id: u64,
    open: std::collections::VecDeque<(u64, tokio::task::AbortHandle)>,
}

impl Reserve {
    /// Runs `conn` in the reserve, dropping the oldest connection there
    /// when all [`RESERVED_PROBE_CONNECTIONS`] are taken.
    fn admit(&self, conn: impl std::future::Future<Output = ()> + Send + 'static) {
        let evicted = {
            let mut r = self.0.lock();
            let evicted = (r.open.len() >= RESERVED_PROBE_CONNECTIONS)
                .then(|| r.open.pop_front())
                .flatten();
            let id = r.next_id;
            r.next_id += 1;
            let me = self.clone();
            // Spawned under the lock, so the task's own removal comes
            // after its entry is in.
            let task = tokio::spawn(async move {
                conn.await;
                me.0.lock().open.retain(|(i, _)| *i != id);
            });
            r.open.push_back((id, task.abort_handle()));
            evicted
        };
        if let Some((_, oldest)) = evicted {
            oldest.abort();
        }
    }

    fn abort_all(&self) {
        let open = std::mem::take(&mut self.0.lock().open);
        for (_, task) in open {
            task.abort();
        }
    }
}

/// The local address a listener got (for port 0).
pub fn local_addr(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

/// What every handler gets.
struct App {
    src: Arc<dyn StateSource>,
    /// Rendering slots: a permit travels into the blocking task, so a
    /// request that timed out still holds its slot until its rendering
    /// ends (tower's ConcurrencyLimit would free it at the timeout while
    /// the blocking work it bounds went on).
    rendering: Arc<Semaphore>,
    read: Option<BearerToken>,
    admin: Option<BearerToken>,
    metrics: ServerMetrics,
    /// Browsers logged in with the read (or admin) token.
    sessions: session::Sessions,
}

type Shared = Arc<App>;

/// The routes of a connection over the cap: the probes, and 503 to
/// anything else.
fn probes_only(source: Arc<dyn StateSource>, config: ServerConfig) -> Router {
    let cap = config.limits.max_connections;
    Router::new()
        .route("/monitoring/startup", get(startup))
        .route("/monitoring/health", get(health))
        .fallback(move || async move {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": format!(
                    "the monitoring port's {cap} connections are taken; only the probes are answered"
                )}),
            )
        })
        .with_state(Arc::new(App {
            src: source,
            rendering: Arc::new(Semaphore::new(1)),
            read: None,
            admin: None,
            metrics: config.metrics,
            sessions: session::Sessions::default(),
        }))
}

/// The routes, for embedding or testing (no admin routes, no read token).
pub fn router(source: Arc<dyn StateSource>) -> Router {
    router_with(source, ServerConfig::default())
}

/// The routes; `/admin/*` exists only with an admin token.
pub fn router_with(source: Arc<dyn StateSource>, config: ServerConfig) -> Router {
    let timeout = config.limits.request_timeout;
    let app = Arc::new(App {
        src: source,
        rendering: Arc::new(Semaphore::new(config.limits.state_concurrency.max(1))),
        read: config.read,
        admin: config.admin.clone(),
        metrics: config.metrics.clone(),
        sessions: session::Sessions::default(),
    });
    let guarded = Router::new()
        .route("/monitoring/metrics", get(metrics))
        .route("/state", get(state_index))
        .route("/state/{name}", get(state_document))
        .route("/", get(page))
        .route("/dashboard", get(page))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            read_guard,
        ));
    let mut r = Router::new()
        .route("/monitoring/startup", get(startup))
        .route("/monitoring/health", get(health))
        // The page's own script and style: the same on every host, no data.
        .route("/assets/{name}", get(asset))
        .route(
            "/login",
            get(login_form)
                .post(login)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_LOGIN_BODY)),
        )
        .route("/logout", axum::routing::post(logout))
        .merge(guarded);
    if let Some(token) = config.admin {
        let token = Arc::new(token);
        r = r.route(
            "/admin/{action}",
            axum::routing::any(move |state, path, method, headers, body| {
                admin_call(state, path, method, headers, body, token)
            }),
        );
    }
    let metrics = config.metrics;
    r.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
        .layer(
            tower::ServiceBuilder::new()
                .layer(HandleErrorLayer::new(move |_: tower::BoxError| {
                    let metrics = metrics.clone();
                    async move {
                        metrics.requests_timed_out.inc();
                        json(
                            StatusCode::SERVICE_UNAVAILABLE,
                            serde_json::json!({"error": format!(
                                "the request was not answered within {} s", timeout.as_secs_f64()
                            )}),
                        )
                    }
                }))
                .layer(tower::timeout::TimeoutLayer::new(timeout)),
        )
}

/// Whether `headers` carry one of `tokens` as a bearer token: `Err` is the
/// refusal (401 without a token, 403 with a wrong one).
fn authorize(
    headers: &axum::http::HeaderMap,
    tokens: &[&BearerToken],
) -> Result<(), (StatusCode, &'static str)> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        None => Err((
            StatusCode::UNAUTHORIZED,
            "a token is required (Authorization: Bearer …)",
        )),
        Some(t) if !tokens.iter().any(|k| k.matches(t.as_bytes())) => {
            Err((StatusCode::FORBIDDEN, "wrong token"))
        }
        Some(_) => Ok(()),
    }
}

fn refusal(code: StatusCode, why: &str) -> Response {
    let mut resp = json(code, serde_json::json!({"error": why}));
    if code == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// `/state/*` and the metrics need the read token (or the admin token)
/// when one is configured.
async fn read_guard(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let Some(read) = &app.read else {
        return next.run(req).await;
    };
    let tokens: Vec<&BearerToken> = std::iter::once(read).chain(app.admin.as_ref()).collect();
    let cookie = req
        .headers()
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok());
    let by_session = app.sessions.admits(cookie);
    match authorize(req.headers(), &tokens) {
        Ok(()) => next.run(req).await,
        Err(_) if by_session => next.run(req).await,
        // A browser asking for the page gets the login form.
        Err((code, _)) if matches!(req.uri().path(), "/" | "/dashboard") => {
            app.metrics.auth_failed("page", code);
            login_page(code, "")
        }
        Err((code, why)) => {
            let path = req.uri().path();
            let route = if path.starts_with("/state") {
                "state"
            } else {
                "metrics"
            };
            app.metrics.auth_failed(route, code);
            app.src.read_refused(path, code.as_u16());
            refusal(code, why)
        }
    }
}

async fn admin_call(
    State(app): State<Shared>,
    Path(action): Path<String>,
    method: axum::http::Method,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
    token: Arc<BearerToken>,
) -> Response {
    if !matches!(method.as_str(), "GET" | "POST" | "PATCH") {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": format!("{method} is not allowed on /admin/{action}")}),
        );
    }
    // The token first: a stranger's body is never read.
    if let Err((code, why)) = authorize(&headers, &[&token]) {
        app.metrics.auth_failed("admin", code);
        app.src.admin_refused(&action, code.as_u16());
        return refusal(code, why);
    }
    let Ok(body) = axum::body::to_bytes(body, MAX_ADMIN_BODY).await else {
        return json(
            StatusCode::PAYLOAD_TOO_LARGE,
            serde_json::json!({"error": format!("an admin request body is at most {MAX_ADMIN_BODY} bytes")}),
        );
    };
    match app.src.admin(&action, method.as_str(), &body) {
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

async fn startup(State(app): State<Shared>) -> Response {
    probe(app.src.startup(), &[], Vec::new())
}

async fn health(State(app): State<Shared>) -> Response {
    let degraded = app.src.degraded();
    probe(
        app.src.health(),
        &[("checker", "StewardHealthChecker")],
        degraded,
    )
}

/// Runs `f` on the blocking pool once a rendering slot is free: rendering
/// metrics and documents reads the agent's state and its workers' cgroup
/// files, which must not hold up the agent's runtime thread (one thread by
/// default) while it works. The slot is held until `f` returns.
async fn off_runtime<T: Send + 'static>(
    app: &App,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let slot = app.rendering.clone().acquire_owned().await.ok()?;
    tokio::task::spawn_blocking(move || {
        let out = f();
        drop(slot);
        out
    })
    .await
    .ok()
}

async fn metrics(State(app): State<Shared>) -> Response {
    let src = app.src.clone();
    let Some(text) = off_runtime(&app, move || src.metrics()).await else {
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

async fn state_index(State(app): State<Shared>) -> Response {
    let names: Vec<String> = app
        .src
        .document_names()
        .iter()
        .map(|n| format!("/state/{n}"))
        .collect();
    json(StatusCode::OK, serde_json::json!({"documents": names}))
}

async fn state_document(
    State(app): State<Shared>,
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
        let (src, name) = (app.src.clone(), name.clone());
        off_runtime(&app, move || src.document_with_query(&name, format, &q))
            .await
            .flatten()
    };
    match doc {
        Some(Ok(Document::Json(v))) => json(StatusCode::OK, v),
        Some(Ok(Document::Text(t))) => t.into_response(),
        Some(Err(why)) => json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": why.to_string()}),
        ),
        None => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("no state document {name:?}"), "documents": app.src.document_names()}),
        ),
    }
}

/// The query key the server sets on a page request when the page should
/// offer to log out (a read token is configured).
pub const PAGE_LOGOUT: &str = "logout";

/// A login form's body is at most this (a token is far shorter).
const MAX_LOGIN_BODY: usize = 4096;

/// The login form, with `message` (escaped) above it.
fn login_page(code: StatusCode, message: &str) -> Response {
    let message: String = message
        .chars()
        .map(|c| match c {
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '&' => "&amp;".to_string(),
            '"' => "&quot;".to_string(),
            c => c.to_string(),
        })
        .collect();
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Steward · log in</title><link rel=\"stylesheet\" href=\"/assets/page.css\"></head>\
         <body><main><h1>Steward</h1><p>This host's page needs its read token.</p>\
         <p class=\"failing\" id=\"login-message\">{message}</p>\
         <form method=\"post\" action=\"/login\" id=\"login\"><label>read token \
         <input type=\"password\" name=\"token\" autocomplete=\"current-password\" required></label> \
         <button>log in</button></form>\
         <p><small>The session lasts {} hours, or until the agent restarts.</small></p></main></body></html>\n",
        session::SESSION_TTL.as_secs() / 3600
    );
    let mut resp = (
        code,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response();
    if code == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

async fn login_form(State(app): State<Shared>, headers: axum::http::HeaderMap) -> Response {
    let cookie = headers.get(header::COOKIE).and_then(|v| v.to_str().ok());
    if app.read.is_none() || app.sessions.admits(cookie) {
        return see_other("/dashboard", None);
    }
    login_page(StatusCode::OK, "")
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

/// The read (or admin) token, once, for a session cookie.
async fn login(
    State(app): State<Shared>,
    headers: axum::http::HeaderMap,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let Some(read) = &app.read else {
        return see_other("/dashboard", None);
    };
    let cookie = headers.get(header::COOKIE).and_then(|v| v.to_str().ok());
    let presented = form.token.trim().as_bytes();
    let ok = read.matches(presented) || app.admin.as_ref().is_some_and(|a| a.matches(presented));
    if !ok {
        app.metrics.auth_failed("login", StatusCode::FORBIDDEN);
        app.src.read_refused("/login", 403);
        return login_page(StatusCode::FORBIDDEN, "wrong token");
    }
    // A browser logging in again gives its old session back.
    app.sessions.close(cookie);
    let id = app.sessions.open();
    see_other("/dashboard", Some(session::set_cookie(&id)))
}

async fn logout(State(app): State<Shared>, headers: axum::http::HeaderMap) -> Response {
    let cookie = headers.get(header::COOKIE).and_then(|v| v.to_str().ok());
    app.sessions.close(cookie);
    see_other("/login", Some(session::set_cookie("")))
}

/// 303 to `to`, setting `cookie` if given.
fn see_other(to: &'static str, cookie: Option<String>) -> Response {
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response();
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert(header::SET_COOKIE, c);
    }
    resp
}

/// What the host's page may load: only what the agent serves itself.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

async fn page(
    State(app): State<Shared>,
    Query(mut q): Query<BTreeMap<String, String>>,
) -> Response {
    // Whether the page offers to log out (a read token is set); never the
    // caller's to say.
    q.remove(PAGE_LOGOUT);
    if app.read.is_some() {
        q.insert(PAGE_LOGOUT.into(), "1".into());
    }
    let src = app.src.clone();
    match off_runtime(&app, move || src.page(&q)).await.flatten() {
        Some(html) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
                (header::CACHE_CONTROL, "no-store"),
            ],
            html,
        )
            .into_response(),
        None => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "this agent serves no page"}),
        ),
    }
}

async fn asset(State(app): State<Shared>, Path(name): Path<String>) -> Response {
    match app.src.asset(&name) {
        Some((content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "max-age=300"),
            ],
            bytes,
        )
            .into_response(),
        None => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("no asset {name:?}")}),
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

#[cfg(test)]
mod tests;
