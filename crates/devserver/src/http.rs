//! The dev control plane's HTTP API:
//! - `POST /v1/namespaces/{ns}/applications/{app}?version=V&gpus=N&max_concurrency=N...`
//!   with the application ZIP as body: deploy.
//! - `POST /v1/namespaces/{ns}/applications/{app}/functions/{fn}?wait=true`
//!   with the input as body: invoke; answers the request id, or the outcome when waiting.
//! - `GET /v1/namespaces/{ns}/requests/{id}?wait=true`: a request's outcome.
//! - `DELETE /v1/namespaces/{ns}/requests/{id}`: cancel (the allocation leaves the desired state).
//! - `DELETE /v1/namespaces/{ns}/applications/{app}`: undeploy (its workers leave the desired state).
//! - `GET /v1/executors`: registered executors and their workers.
//! - `POST /v1/executors/{id}/cut-stream`, `POST /v1/executors/{id}/republish`: fault injection.
//! - `GET /v1/log`: every allocation result and worker termination reported.
//! - `POST .../functions/{fn}/batch?count=N`, `GET /v1/stats`, `DELETE /v1/stats`: benchmarks.
//! - `GET /v1/namespaces/{ns}/requests/{id}/runs`: the request's function runs
//!   and the calls waiting for their arguments, in creation order, at most
//!   1000: `{"request_id", "namespace", "application", "status",
//!   "function_calls", "function_runs", "waiting_calls", "truncated",
//!   "runs": [{"id", "function", "parent", "status" (waiting_for_args |
//!   unplaced | running | withdrawn | completed), "outcome" (success |
//!   failure | null), "failure_reason", "has_output", "child_function_call",
//!   "allocation_id"}]}`; "unplaced" is runnable but waiting for a free
//!   slot on its worker.
//! - `GET /v1/faults`, `POST /v1/faults` with `{"call_function": "ok" |
//!   "refuse" | "drop"}`: fault injection. "refuse" answers every
//!   `call_function` FAILED_PRECONDITION ("refused by fault injection"),
//!   "drop" answers OK and creates nothing (the real server's silent drop),
//!   "ok" restores; `{"placement": "capacity" | "unlimited"}`: "unlimited"
//!   places every runnable run at once (from then on), so allocations queue
//!   at the agent; "capacity" is the real server's rule. Absent fields stay
//!   as they are. Answers the faults now in force, e.g.
//!   `{"call_function": "ok", "placement": "capacity", "place_on_drained": false}`; an unknown field or
//!   value is a 400. `{"place_on_drained": true}` keeps placing allocations
//!   on the workers of an executor that reports DRAINED (by default, as the
//!   real server, it gets none).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::DevServerError;
use crate::scheduler::{FaultsUpdate, FunctionOptions, Scheduler};

type S = Arc<Scheduler>;

fn error(e: DevServerError) -> Response {
    let code = match e {
        DevServerError::BadRequest(_) => StatusCode::BAD_REQUEST,
        DevServerError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (
        code,
        axum::Json(serde_json::json!({"error": e.to_string()})),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct DeployQuery {
    version: Option<String>,
    cpu_ms_per_sec: Option<u32>,
    memory_bytes: Option<u64>,
    disk_bytes: Option<u64>,
    gpus: Option<u32>,
    max_concurrency: Option<u32>,
    initialization_timeout_ms: Option<u32>,
    allocation_timeout_ms: Option<u32>,
}

async fn deploy(
    State(s): State<S>,
    Path((ns, app)): Path<(String, String)>,
    Query(q): Query<DeployQuery>,
    body: Bytes,
) -> Response {
    let d = FunctionOptions::default();
    let o = &q;
    let options = FunctionOptions {
        cpu_ms_per_sec: o.cpu_ms_per_sec.unwrap_or(d.cpu_ms_per_sec),
        memory_bytes: o.memory_bytes.unwrap_or(d.memory_bytes),
        disk_bytes: o.disk_bytes.unwrap_or(d.disk_bytes),
        gpus: o.gpus.unwrap_or(d.gpus),
        max_concurrency: o.max_concurrency.unwrap_or(d.max_concurrency),
        initialization_timeout_ms: o
            .initialization_timeout_ms
            .unwrap_or(d.initialization_timeout_ms),
        allocation_timeout_ms: o.allocation_timeout_ms.unwrap_or(d.allocation_timeout_ms),
    };
    let version = q.version.clone().unwrap_or_else(|| "1".into());
    match s.deploy(&ns, &app, &version, body.to_vec(), options).await {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => error(e),
    }
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    wait: Option<bool>,
    timeout_s: Option<u64>,
}

async fn invoke(
    State(s): State<S>,
    Path((ns, app, function)): Path<(String, String, String)>,
    Query(q): Query<WaitQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    match s
        .invoke(&ns, &app, &function, body.to_vec(), &content_type)
        .await
    {
        Ok(id) if q.wait.unwrap_or(false) => outcome(&s, &id, true, q.timeout_s).await,
        Ok(id) => (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({"request_id": id})),
        )
            .into_response(),
        Err(e) => error(e),
    }
}

async fn outcome(s: &S, id: &str, wait: bool, timeout_s: Option<u64>) -> Response {
    let Some((mut out, mut done)) = s.outcome(id) else {
        return error(DevServerError::NotFound(format!("request {id}")));
    };
    if wait && out.status == "pending" {
        let limit = Duration::from_secs(timeout_s.unwrap_or(600));
        let _ = tokio::time::timeout(limit, done.wait_for(|d| *d)).await;
        if let Some((o, _)) = s.outcome(id) {
            out = o;
        }
    }
    (StatusCode::OK, axum::Json(out)).into_response()
}

async fn get_request(
    State(s): State<S>,
    Path((_ns, id)): Path<(String, String)>,
    Query(q): Query<WaitQuery>,
) -> Response {
    outcome(&s, &id, q.wait.unwrap_or(false), q.timeout_s).await
}

async fn executors(State(s): State<S>) -> Response {
    (StatusCode::OK, axum::Json(s.executors())).into_response()
}

fn done(r: Result<(), DevServerError>) -> Response {
    match r {
        Ok(()) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok"})),
        )
            .into_response(),
        Err(e) => error(e),
    }
}

async fn cancel_request(State(s): State<S>, Path((_ns, id)): Path<(String, String)>) -> Response {
    done(s.cancel(&id).await)
}

async fn undeploy(State(s): State<S>, Path((ns, app)): Path<(String, String)>) -> Response {
    done(s.undeploy(&ns, &app).await)
}

async fn cut_stream(State(s): State<S>, Path(id): Path<String>) -> Response {
    done(s.cut_stream(&id))
}

async fn republish(State(s): State<S>, Path(id): Path<String>) -> Response {
    done(s.republish(&id))
}

async fn stats(State(s): State<S>) -> Response {
    (StatusCode::OK, axum::Json(s.stats())).into_response()
}

async fn forget_finished(State(s): State<S>) -> Response {
    s.forget_finished();
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({"status": "ok"})),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct BatchQuery {
    count: usize,
}

/// Starts `count` requests with the same JSON input at once.
async fn invoke_batch(
    State(s): State<S>,
    Path((ns, app, function)): Path<(String, String, String)>,
    Query(q): Query<BatchQuery>,
    body: Bytes,
) -> Response {
    let ids = match s
        .invoke_many(
            &ns,
            &app,
            &function,
            body.to_vec(),
            "application/json",
            q.count,
        )
        .await
    {
        Ok(ids) => ids,
        Err(e) => return error(e),
    };
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({"request_ids": ids})),
    )
        .into_response()
}

async fn runs(State(s): State<S>, Path((ns, id)): Path<(String, String)>) -> Response {
    match s.runs(&ns, &id) {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => error(e),
    }
}

async fn get_faults(State(s): State<S>) -> Response {
    (StatusCode::OK, axum::Json(s.faults())).into_response()
}

async fn set_faults(State(s): State<S>, body: Bytes) -> Response {
    match serde_json::from_slice::<FaultsUpdate>(&body) {
        Ok(update) => (StatusCode::OK, axum::Json(s.set_faults(update))).into_response(),
        Err(e) => error(DevServerError::BadRequest(format!("faults: {e}"))),
    }
}

async fn log(State(s): State<S>) -> Response {
    (StatusCode::OK, axum::Json(s.log())).into_response()
}

pub(crate) async fn serve(
    listener: TcpListener,
    sched: S,
    cancel: CancellationToken,
) -> Result<(), DevServerError> {
    let app = Router::new()
        .route(
            "/v1/namespaces/{ns}/applications/{app}",
            post(deploy).delete(undeploy),
        )
        .route(
            "/v1/namespaces/{ns}/applications/{app}/functions/{function}",
            post(invoke),
        )
        .route(
            "/v1/namespaces/{ns}/requests/{id}",
            get(get_request).delete(cancel_request),
        )
        .route("/v1/namespaces/{ns}/requests/{id}/runs", get(runs))
        .route("/v1/faults", get(get_faults).post(set_faults))
        .route("/v1/executors", get(executors))
        .route("/v1/executors/{id}/cut-stream", post(cut_stream))
        .route("/v1/executors/{id}/republish", post(republish))
        .route("/v1/log", get(log))
        .route("/v1/stats", get(stats).delete(forget_finished))
        .route(
            "/v1/namespaces/{ns}/applications/{app}/functions/{function}/batch",
            post(invoke_batch),
        )
        .layer(DefaultBodyLimit::max(1 << 30))
        .with_state(sched);
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
        .map_err(|e| DevServerError::Serve(format!("HTTP: {e}")))
}
