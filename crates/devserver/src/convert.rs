//! Checks and conversions of what executors send about function calls:
//! `FunctionCallRequest` (from `call_function`), `ExecutionPlanUpdates`
//! (there and in tail-call allocation results) and `FunctionCallWatch`es,
//! with the status codes the real server answers (missing request fields:
//! INVALID_ARGUMENT; malformed updates: INTERNAL).
//! Must not know about: the scheduler's state, blobs, HTTP.

use steward_proto::executor_api_pb as pb;

use crate::graph::{Arg, CallSpec, Plan, PlanOp};

/// Most watches one executor may report.
pub(crate) const MAX_WATCHES_PER_EXECUTOR: usize = 10_000;

/// Why an executor's message was refused; each maps to one gRPC code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("invalid function call update: {0}")]
    BadUpdate(String),
    #[error("refused by fault injection")]
    Refused,
    #[error("executor {executor_id} reports {count} function call watches; the limit is {limit}")]
    TooManyWatches {
        executor_id: String,
        count: usize,
        limit: usize,
    },
    #[error("request {request_id} would hold more than {limit} function calls")]
    TooManyCalls { request_id: String, limit: usize },
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::Missing(_) => tonic::Status::invalid_argument(msg),
            ApiError::BadUpdate(_) => tonic::Status::internal(msg),
            ApiError::Refused => tonic::Status::failed_precondition(msg),
            ApiError::TooManyWatches { .. } | ApiError::TooManyCalls { .. } => {
                tonic::Status::resource_exhausted(msg)
            }
        }
    }
}

/// A checked `FunctionCallRequest`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CallRequest {
    pub namespace: String,
    pub application: String,
    pub request_id: String,
    pub source_function_call_id: String,
    pub plan: Plan,
}

fn required(v: Option<String>, what: &'static str) -> Result<String, ApiError> {
    v.ok_or(ApiError::Missing(what))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadUpdate(msg.into())
}

/// Checks a `call_function` request, as the real server does.
pub(crate) fn call_request(r: pb::FunctionCallRequest) -> Result<CallRequest, ApiError> {
    let updates = r.updates.ok_or(ApiError::Missing("updates"))?;
    let request_id = required(r.request_id, "request_id")?;
    let source_function_call_id = required(r.source_function_call_id, "source_function_call_id")?;
    let namespace = required(r.namespace, "namespace")?;
    let application = required(r.application, "application")?;
    if updates.root_function_call_id.is_none() {
        return Err(ApiError::Missing("updates.root_function_call_id"));
    }
    Ok(CallRequest {
        namespace,
        application,
        request_id,
        source_function_call_id,
        plan: plan(updates)?,
    })
}

/// Converts `ExecutionPlanUpdates`; any malformed part is `BadUpdate`.
pub(crate) fn plan(u: pb::ExecutionPlanUpdates) -> Result<Plan, ApiError> {
    let root = u
        .root_function_call_id
        .ok_or_else(|| bad("root_function_call_id is missing"))?;
    let ops = u
        .updates
        .into_iter()
        .enumerate()
        .map(|(i, op)| plan_op(op).map_err(|e| bad(format!("updates[{i}]: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Plan { root, ops })
}

fn plan_op(u: pb::ExecutionPlanUpdate) -> Result<PlanOp, String> {
    use pb::execution_plan_update::Op;
    match u.op.ok_or("op is missing")? {
        Op::FunctionCall(c) => {
            let target = c.target.ok_or("function_call.target is missing")?;
            target
                .namespace
                .ok_or("function_call.target.namespace is missing")?;
            let function = target
                .function_name
                .ok_or("function_call.target.function_name is missing")?;
            let id = c.id.ok_or("function_call.id is missing")?;
            Ok(PlanOp::Call {
                id,
                spec: CallSpec {
                    function,
                    args: args(c.args, "function_call.args")?,
                    call_metadata: c.call_metadata.unwrap_or_default(),
                },
            })
        }
        Op::Reduce(r) => {
            let call_metadata = r.call_metadata.ok_or("reduce.call_metadata is missing")?;
            let reducer = r.reducer.ok_or("reduce.reducer is missing")?;
            let function = reducer
                .function_name
                .ok_or("reduce.reducer.function_name is missing")?;
            let id = r.id.ok_or("reduce.id is missing")?;
            Ok(PlanOp::Reduce {
                id,
                function,
                items: args(r.collection, "reduce.collection")?,
                call_metadata,
            })
        }
    }
}

fn args(a: Vec<pb::FunctionArg>, what: &str) -> Result<Vec<Arg>, String> {
    use pb::function_arg::Source;
    a.into_iter()
        .enumerate()
        .map(|(i, arg)| match arg.source {
            None => Err(format!("{what}[{i}] has no source")),
            Some(Source::FunctionCallId(id)) => Ok(Arg::Output(id)),
            Some(Source::InlineData(p)) => {
                inline_payload(&p)
                    .map_err(|field| format!("{what}[{i}].inline_data.{field} is missing"))?;
                Ok(Arg::Inline(p))
            }
        })
        .collect()
}

/// An inline payload needs `uri`, `size`, `sha256_hash` and `encoding`;
/// the error names the first missing field.
fn inline_payload(p: &pb::DataPayload) -> Result<(), &'static str> {
    if p.uri.is_none() {
        return Err("uri");
    }
    if p.size.is_none() {
        return Err("size");
    }
    if p.sha256_hash.is_none() {
        return Err("sha256_hash");
    }
    if p.encoding.is_none() {
        return Err("encoding");
    }
    Ok(())
}

/// A function call an executor waits for (all fields required).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Watch {
    // Field order makes a set of watches searchable by (request, call).
    pub request_id: String,
    pub function_call_id: String,
    pub namespace: String,
    pub application: String,
}

/// Checks an executor's reported watches.
pub(crate) fn watches(
    executor_id: &str,
    ws: &[pb::FunctionCallWatch],
) -> Result<std::collections::BTreeSet<Watch>, ApiError> {
    if ws.len() > MAX_WATCHES_PER_EXECUTOR {
        return Err(ApiError::TooManyWatches {
            executor_id: executor_id.to_string(),
            count: ws.len(),
            limit: MAX_WATCHES_PER_EXECUTOR,
        });
    }
    ws.iter()
        .map(|w| {
            Ok(Watch {
                namespace: required(w.namespace.clone(), "function_call_watches.namespace")?,
                application: required(w.application.clone(), "function_call_watches.application")?,
                request_id: required(w.request_id.clone(), "function_call_watches.request_id")?,
                function_call_id: required(
                    w.function_call_id.clone(),
                    "function_call_watches.function_call_id",
                )?,
            })
        })
        .collect()
}
