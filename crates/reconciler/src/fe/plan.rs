//! Execution plan updates (nested calls, tail calls, reduce ops) from the
//! worker's form into the server's, and the checks the server would
//! otherwise answer with an error for the whole call or report; the bounds
//! on every worker-chosen string copied into what the server hears (one
//! oversized item fails its own allocation, never every report).

use prost::Message;

use crate::{fe_pb, pb};

/// Largest `call_function` request or tail-call plan (the reference's limit).
pub(crate) const MAX_PLAN_BYTES: usize = 1 << 20;
/// Most entries in one plan (the reference's limit).
pub(crate) const MAX_PLAN_UPDATES: usize = 1000;
/// Longest id a worker names where it reaches the server (function call
/// ids, the call a watcher waits on, a value's source call, watcher ids).
/// Tensorlake's are 64 hex digits (durable ids) or 21-character nanoids.
pub(crate) const MAX_ID_BYTES: usize = 256;
/// Longest content type of a value (RFC 6838: a type and a subtype of at
/// most 127 characters each).
pub(crate) const MAX_CONTENT_TYPE_BYTES: usize = 256;
/// Longest namespace, application, function or version in a plan's
/// function reference.
pub(crate) const MAX_NAME_BYTES: usize = 256;
/// A value's `sha256_hash`: exactly this many hex digits, or absent.
pub(crate) const SHA256_HEX_DIGITS: usize = 64;

/// Why something a worker wrote (a plan, a value's manifest, an id) is not
/// sent to the server; the message names the item and, where one applies,
/// the bound (the constant's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PlanError {
    /// A worker-chosen string longer than its bound.
    #[error("{what} is {len} bytes, over the {max}-byte bound ({bound})")]
    TooLong {
        what: String,
        len: usize,
        max: usize,
        bound: &'static str,
    },
    /// A value's `sha256_hash` that is not [`SHA256_HEX_DIGITS`] hex digits.
    #[error(
        "the value's sha256_hash is not {SHA256_HEX_DIGITS} hex digits ({len} bytes; SHA256_HEX_DIGITS)"
    )]
    BadHash { len: usize },
    /// Anything else the server would refuse (or the agent: a call into
    /// another namespace), described.
    #[error("{0}")]
    Invalid(String),
}

impl From<&str> for PlanError {
    fn from(message: &str) -> Self {
        PlanError::Invalid(message.to_string())
    }
}

impl From<String> for PlanError {
    fn from(message: String) -> Self {
        PlanError::Invalid(message)
    }
}

#[cfg(test)]
impl PlanError {
    /// Whether the message says `part` (what the tests look for).
    pub(crate) fn contains(&self, part: &str) -> bool {
        self.to_string().contains(part)
    }
}

/// Refuses `value` when it is longer than `max` bytes, naming what it is,
/// its length and the bound (`bound`, the constant's name).
pub(crate) fn bounded(
    what: &str,
    value: &str,
    max: usize,
    bound: &'static str,
) -> Result<(), PlanError> {
    if value.len() > max {
        return Err(PlanError::TooLong {
            what: what.to_string(),
            len: value.len(),
            max,
            bound,
        });
    }
    Ok(())
}

/// Refuses an id longer than [`MAX_ID_BYTES`].
pub(crate) fn bounded_id(what: &str, id: &str) -> Result<(), PlanError> {
    bounded(what, id, MAX_ID_BYTES, "MAX_ID_BYTES")
}

/// The checks on what a worker wrote into a value's manifest, before any
/// of it is copied: a hash of exactly 64 hex digits (or none), a short
/// content type and source call id.
fn check_manifest(m: &fe_pb::SerializedObjectManifest) -> Result<(), PlanError> {
    if let Some(h) = &m.sha256_hash
        && (h.len() != SHA256_HEX_DIGITS || !h.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(PlanError::BadHash { len: h.len() });
    }
    if let Some(t) = &m.content_type {
        bounded(
            "the value's content type",
            t,
            MAX_CONTENT_TYPE_BYTES,
            "MAX_CONTENT_TYPE_BYTES",
        )?;
    }
    if let Some(id) = &m.source_function_call_id {
        bounded_id("the value's source function call id", id)?;
    }
    Ok(())
}

/// A server payload for a serialized object stored in the blob at `uri`;
/// refused (naming the bound) when the worker's manifest is over one.
pub(crate) fn payload_in_blob(
    so: &fe_pb::SerializedObjectInsideBlob,
    uri: &str,
) -> Result<pb::DataPayload, PlanError> {
    if let Some(m) = &so.manifest {
        check_manifest(m)?;
    }
    let m = so.manifest.clone().unwrap_or_default();
    let encoding = match m.encoding {
        Some(e) if e == fe_pb::SerializedObjectEncoding::BinaryZip as i32 => {
            pb::DataPayloadEncoding::Unknown as i32
        }
        Some(e) => e,
        None => pb::DataPayloadEncoding::Unknown as i32,
    };
    Ok(pb::DataPayload {
        uri: Some(uri.to_string()),
        encoding: Some(encoding),
        encoding_version: Some(m.encoding_version.unwrap_or(0)),
        content_type: m.content_type,
        metadata_size: Some(m.metadata_size.unwrap_or(0)),
        offset: Some(so.offset.unwrap_or(0)),
        size: m.size,
        sha256_hash: m.sha256_hash,
        source_function_call_id: Some(m.source_function_call_id.unwrap_or_default()),
        id: None,
    })
}

fn convert_ref(f: &fe_pb::FunctionRef) -> pb::FunctionRef {
    pb::FunctionRef {
        namespace: f.namespace.clone(),
        application_name: f.application_name.clone(),
        function_name: f.function_name.clone(),
        application_version: Some(f.application_version.clone().unwrap_or_default()),
    }
}

fn convert_arg(
    a: &fe_pb::FunctionArg,
    blob_uri: Option<&str>,
) -> Result<pb::FunctionArg, PlanError> {
    use fe_pb::function_arg::Source as S;
    let source = match &a.source {
        Some(S::FunctionCallId(id)) => pb::function_arg::Source::FunctionCallId(id.clone()),
        Some(S::Value(v)) => {
            if v.manifest.as_ref().and_then(|m| m.encoding)
                == Some(fe_pb::SerializedObjectEncoding::BinaryZip as i32)
            {
                return Err("a function call argument is encoded as a ZIP, which the server does not accept".into());
            }
            let uri = blob_uri.ok_or(
                "a function call argument refers to an arguments blob that was not uploaded",
            )?;
            pb::function_arg::Source::InlineData(payload_in_blob(v, uri)?)
        }
        None => return Err("a function call argument has no source".into()),
    };
    Ok(pb::FunctionArg {
        source: Some(source),
    })
}

fn convert_args(
    args: &[fe_pb::FunctionArg],
    blob_uri: Option<&str>,
) -> Result<Vec<pb::FunctionArg>, PlanError> {
    args.iter().map(|a| convert_arg(a, blob_uri)).collect()
}

/// Converts the worker's execution plan updates into the server's form;
/// `blob_uri` is where the inline argument values were uploaded.
pub(crate) fn convert_updates(
    u: &fe_pb::ExecutionPlanUpdates,
    blob_uri: Option<&str>,
) -> Result<pb::ExecutionPlanUpdates, PlanError> {
    use fe_pb::execution_plan_update::Op as FOp;
    use pb::execution_plan_update::Op;
    let mut updates = Vec::with_capacity(u.updates.len().min(MAX_PLAN_UPDATES + 1));
    for up in &u.updates {
        let op = match &up.op {
            Some(FOp::FunctionCall(c)) => Op::FunctionCall(pb::FunctionCall {
                id: c.id.clone(),
                target: c.target.as_ref().map(convert_ref),
                args: convert_args(&c.args, blob_uri)?,
                call_metadata: Some(c.call_metadata.clone().unwrap_or_default()),
            }),
            Some(FOp::Reduce(r)) => Op::Reduce(pb::ReduceOp {
                id: r.id.clone(),
                collection: convert_args(&r.collection, blob_uri)?,
                reducer: r.reducer.as_ref().map(convert_ref),
                call_metadata: Some(r.call_metadata.clone().unwrap_or_default()),
            }),
            None => return Err("an execution plan update has no operation".into()),
        };
        updates.push(pb::ExecutionPlanUpdate { op: Some(op) });
    }
    let plan = pb::ExecutionPlanUpdates {
        updates,
        root_function_call_id: u.root_function_call_id.clone(),
        start_at: u.start_at,
    };
    validate(&plan)?;
    Ok(plan)
}

/// Checks that every function `u` calls is in `namespace`, the calling
/// allocation's own: a function never starts work in another namespace.
/// (A plan naming no namespace is refused by [`validate`].)
pub(crate) fn check_namespace(
    u: &fe_pb::ExecutionPlanUpdates,
    namespace: &str,
) -> Result<(), PlanError> {
    use fe_pb::execution_plan_update::Op as FOp;
    for (i, up) in u.updates.iter().enumerate() {
        let target = match &up.op {
            Some(FOp::FunctionCall(c)) => c.target.as_ref(),
            Some(FOp::Reduce(r)) => r.reducer.as_ref(),
            None => None,
        };
        if let Some(ns) = target.and_then(|t| t.namespace.as_deref())
            && !ns.is_empty()
            && ns != namespace
        {
            return Err(PlanError::Invalid(format!(
                "plan entry {i} calls a function in namespace {:?}, not the allocation's own {namespace:?}",
                ns.chars().take(64).collect::<String>()
            )));
        }
    }
    Ok(())
}

fn nonempty(v: &Option<String>) -> bool {
    v.as_deref().is_some_and(|s| !s.is_empty())
}

fn check_ref(what: &str, f: Option<&pb::FunctionRef>) -> Result<(), PlanError> {
    let f = f.ok_or_else(|| format!("{what} has no target function"))?;
    if !nonempty(&f.namespace) || !nonempty(&f.function_name) {
        return Err(PlanError::Invalid(format!(
            "{what} names no namespace or function"
        )));
    }
    for (field, v) in [
        ("namespace", &f.namespace),
        ("application", &f.application_name),
        ("function", &f.function_name),
        ("application version", &f.application_version),
    ] {
        bounded(
            &format!("{what}'s {field}"),
            v.as_deref().unwrap_or(""),
            MAX_NAME_BYTES,
            "MAX_NAME_BYTES",
        )?;
    }
    Ok(())
}

fn check_args(what: &str, args: &[pb::FunctionArg]) -> Result<(), PlanError> {
    for a in args {
        if let Some(pb::function_arg::Source::FunctionCallId(id)) = &a.source {
            bounded_id(&format!("{what}'s argument call id"), id)?;
        }
        if let Some(pb::function_arg::Source::InlineData(p)) = &a.source
            && (!nonempty(&p.uri)
                || p.size.is_none()
                || !nonempty(&p.sha256_hash)
                || p.encoding.is_none())
        {
            return Err(PlanError::Invalid(format!(
                "{what} has an inline argument without uri, size, sha256 or encoding"
            )));
        }
    }
    Ok(())
}

/// The checks the server makes (it answers INTERNAL for the whole call or
/// report otherwise), plus the reference's size limits.
pub(crate) fn validate(plan: &pb::ExecutionPlanUpdates) -> Result<(), PlanError> {
    use pb::execution_plan_update::Op;
    if !nonempty(&plan.root_function_call_id) {
        return Err("the plan has no root function call id".into());
    }
    bounded_id(
        "the plan's root function call id",
        plan.root_function_call_id.as_deref().unwrap_or(""),
    )?;
    if plan.updates.len() > MAX_PLAN_UPDATES {
        return Err(PlanError::Invalid(format!(
            "the plan has {} entries; at most {MAX_PLAN_UPDATES} are allowed",
            plan.updates.len()
        )));
    }
    let bytes = plan.encoded_len();
    if bytes > MAX_PLAN_BYTES {
        return Err(PlanError::Invalid(format!(
            "the plan is {bytes} bytes; at most {MAX_PLAN_BYTES} are allowed"
        )));
    }
    for (i, up) in plan.updates.iter().enumerate() {
        let what = format!("plan entry {i}");
        match &up.op {
            Some(Op::FunctionCall(c)) => {
                if !nonempty(&c.id) {
                    return Err(PlanError::Invalid(format!(
                        "{what} (function call) has no id"
                    )));
                }
                bounded_id(&format!("{what}'s id"), c.id.as_deref().unwrap_or(""))?;
                check_ref(&what, c.target.as_ref())?;
                check_args(&what, &c.args)?;
            }
            Some(Op::Reduce(r)) => {
                if !nonempty(&r.id) {
                    return Err(PlanError::Invalid(format!("{what} (reduce) has no id")));
                }
                bounded_id(&format!("{what}'s id"), r.id.as_deref().unwrap_or(""))?;
                check_ref(&what, r.reducer.as_ref())?;
                check_args(&what, &r.collection)?;
            }
            None => return Err(PlanError::Invalid(format!("{what} has no operation"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(encoding: fe_pb::SerializedObjectEncoding) -> fe_pb::FunctionArg {
        fe_pb::FunctionArg {
            source: Some(fe_pb::function_arg::Source::Value(
                fe_pb::SerializedObjectInsideBlob {
                    manifest: Some(fe_pb::SerializedObjectManifest {
                        encoding: Some(encoding as i32),
                        encoding_version: Some(0),
                        size: Some(10),
                        metadata_size: Some(3),
                        sha256_hash: Some("ab".repeat(32)),
                        content_type: None,
                        source_function_call_id: None,
                    }),
                    offset: Some(7),
                },
            )),
        }
    }

    fn call(id: &str, args: Vec<fe_pb::FunctionArg>) -> fe_pb::ExecutionPlanUpdate {
        fe_pb::ExecutionPlanUpdate {
            op: Some(fe_pb::execution_plan_update::Op::FunctionCall(
                fe_pb::FunctionCall {
                    id: Some(id.into()),
                    target: Some(fe_pb::FunctionRef {
                        namespace: Some("ns".into()),
                        application_name: Some("app".into()),
                        function_name: Some("f".into()),
                        application_version: None,
                    }),
                    args,
                    call_metadata: None,
                },
            )),
        }
    }

    fn plan(updates: Vec<fe_pb::ExecutionPlanUpdate>) -> fe_pb::ExecutionPlanUpdates {
        fe_pb::ExecutionPlanUpdates {
            updates,
            root_function_call_id: Some("D".into()),
            start_at: None,
        }
    }

    #[test]
    fn values_point_into_the_args_blob() {
        let p = plan(vec![call(
            "D",
            vec![
                value(fe_pb::SerializedObjectEncoding::BinaryPickle),
                fe_pb::FunctionArg {
                    source: Some(fe_pb::function_arg::Source::FunctionCallId("C".into())),
                },
            ],
        )]);
        let out = convert_updates(&p, Some("file:///b")).expect("converts");
        let Some(pb::execution_plan_update::Op::FunctionCall(c)) = &out.updates[0].op else {
            panic!("a function call");
        };
        let Some(pb::function_arg::Source::InlineData(d)) = &c.args[0].source else {
            panic!("inline data");
        };
        assert_eq!(d.uri.as_deref(), Some("file:///b"));
        assert_eq!(
            (d.offset, d.size, d.metadata_size),
            (Some(7), Some(10), Some(3))
        );
        assert!(matches!(
            &c.args[1].source,
            Some(pb::function_arg::Source::FunctionCallId(id)) if id == "C"
        ));
        assert_eq!(c.call_metadata.as_deref(), Some(&[][..]));
    }

    #[test]
    fn what_the_server_would_refuse_is_refused_here() {
        let v = || value(fe_pb::SerializedObjectEncoding::BinaryPickle);
        let missing_blob = convert_updates(&plan(vec![call("D", vec![v()])]), None);
        assert!(missing_blob.is_err_and(|e| e.contains("not uploaded")));
        let zip = convert_updates(
            &plan(vec![call(
                "D",
                vec![value(fe_pb::SerializedObjectEncoding::BinaryZip)],
            )]),
            Some("file:///b"),
        );
        assert!(zip.is_err_and(|e| e.contains("ZIP")));
        let mut no_root = plan(vec![call("D", vec![])]);
        no_root.root_function_call_id = None;
        assert!(convert_updates(&no_root, None).is_err_and(|e| e.contains("root")));
        let no_id = convert_updates(&plan(vec![call("", vec![])]), None);
        assert!(no_id.is_err_and(|e| e.contains("no id")));
        let too_many = plan(
            (0..=MAX_PLAN_UPDATES)
                .map(|i| call(&i.to_string(), vec![]))
                .collect(),
        );
        assert!(convert_updates(&too_many, None).is_err_and(|e| e.contains("at most")));
        let no_op = plan(vec![fe_pb::ExecutionPlanUpdate { op: None }]);
        assert!(convert_updates(&no_op, None).is_err());
    }

    #[test]
    fn a_call_into_another_namespace_is_refused() {
        let mine = plan(vec![call("D", vec![])]);
        assert_eq!(check_namespace(&mine, "ns"), Ok(()));
        let mut foreign = plan(vec![call("C", vec![]), call("D", vec![])]);
        if let Some(fe_pb::execution_plan_update::Op::FunctionCall(c)) = &mut foreign.updates[1].op
            && let Some(t) = c.target.as_mut()
        {
            t.namespace = Some("other".into());
        }
        assert_eq!(
            check_namespace(&foreign, "ns"),
            Err("plan entry 1 calls a function in namespace \"other\", not the allocation's own \"ns\"".into())
        );
        let reduce = plan(vec![fe_pb::ExecutionPlanUpdate {
            op: Some(fe_pb::execution_plan_update::Op::Reduce(fe_pb::ReduceOp {
                id: Some("R".into()),
                collection: Vec::new(),
                reducer: Some(fe_pb::FunctionRef {
                    namespace: Some("other".into()),
                    ..Default::default()
                }),
                call_metadata: None,
            })),
        }]);
        assert!(check_namespace(&reduce, "ns").is_err());
    }

    #[test]
    fn worker_chosen_strings_over_their_bounds_are_refused_by_name() {
        let with = |change: &dyn Fn(&mut fe_pb::SerializedObjectManifest)| {
            let fe_pb::FunctionArg {
                source: Some(fe_pb::function_arg::Source::Value(mut v)),
            } = value(fe_pb::SerializedObjectEncoding::BinaryPickle)
            else {
                panic!("a value");
            };
            if let Some(m) = v.manifest.as_mut() {
                change(m);
            }
            payload_in_blob(&v, "file:///b")
        };
        assert!(with(&|_| {}).is_ok());
        assert!(with(&|m| m.sha256_hash = None).is_ok(), "absent is fine");
        assert!(
            with(&|m| m.content_type = Some("t".repeat(MAX_CONTENT_TYPE_BYTES))).is_ok(),
            "at the bound is fine"
        );
        for (change, bound) in [
            (
                &(|m: &mut fe_pb::SerializedObjectManifest| {
                    m.content_type = Some("t".repeat(MAX_CONTENT_TYPE_BYTES + 1))
                }) as &dyn Fn(&mut fe_pb::SerializedObjectManifest),
                "MAX_CONTENT_TYPE_BYTES",
            ),
            (&|m| m.sha256_hash = Some("ab".into()), "SHA256_HEX_DIGITS"),
            (
                &|m| m.sha256_hash = Some("g".repeat(64)),
                "SHA256_HEX_DIGITS",
            ),
            (
                &|m| m.sha256_hash = Some(String::new()),
                "SHA256_HEX_DIGITS",
            ),
            (
                &|m| m.source_function_call_id = Some("i".repeat(MAX_ID_BYTES + 1)),
                "MAX_ID_BYTES",
            ),
        ] {
            let e = with(change).expect_err(bound);
            assert!(e.contains(bound), "{e}");
        }
        let long = "i".repeat(MAX_ID_BYTES + 1);
        let mut p = plan(vec![call(&long, vec![])]);
        assert!(convert_updates(&p, None).is_err_and(|e| e.contains("MAX_ID_BYTES")));
        p = plan(vec![call("D", vec![])]);
        p.root_function_call_id = Some(long);
        assert!(convert_updates(&p, None).is_err_and(|e| e.contains("MAX_ID_BYTES")));
        p = plan(vec![call(
            "D",
            vec![fe_pb::FunctionArg {
                source: Some(fe_pb::function_arg::Source::Value(
                    fe_pb::SerializedObjectInsideBlob {
                        manifest: Some(fe_pb::SerializedObjectManifest {
                            content_type: Some("t".repeat(MAX_CONTENT_TYPE_BYTES + 1)),
                            ..Default::default()
                        }),
                        offset: None,
                    },
                )),
            }],
        )]);
        assert!(
            convert_updates(&p, Some("file:///b"))
                .is_err_and(|e| e.contains("MAX_CONTENT_TYPE_BYTES"))
        );
        if let Some(fe_pb::execution_plan_update::Op::FunctionCall(c)) = &mut p.updates[0].op {
            c.args.clear();
            if let Some(t) = c.target.as_mut() {
                t.function_name = Some("f".repeat(MAX_NAME_BYTES + 1));
            }
        }
        assert!(convert_updates(&p, None).is_err_and(|e| e.contains("MAX_NAME_BYTES")));
    }
}
