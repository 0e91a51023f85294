//! Checks on items of a desired state before the agent acts on them. An
//! invalid item is rejected with a reason naming the field; the rest of the
//! desired state still converges.

use crate::pb;

/// Why an item was rejected: a bounded code for metrics and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: &'static str,
    pub message: String,
}

fn missing(what: &str) -> Rejection {
    Rejection {
        code: "missing_field",
        message: format!("{what} is missing or empty"),
    }
}

fn non_empty(v: &Option<String>, what: &str) -> Result<(), Rejection> {
    match v {
        Some(s) if !s.is_empty() => Ok(()),
        _ => Err(missing(what)),
    }
}

fn validate_function_ref(
    f: Option<&pb::FunctionRef>,
    what: &str,
    need_version: bool,
) -> Result<(), Rejection> {
    let f = f.ok_or_else(|| missing(what))?;
    non_empty(&f.namespace, &format!("{what}.namespace"))?;
    non_empty(&f.application_name, &format!("{what}.application_name"))?;
    non_empty(&f.function_name, &format!("{what}.function_name"))?;
    if need_version {
        non_empty(
            &f.application_version,
            &format!("{what}.application_version"),
        )?;
    }
    Ok(())
}

/// Checks a data payload; `what` names it in messages.
pub fn validate_payload(p: Option<&pb::DataPayload>, what: &str) -> Result<(), Rejection> {
    let p = p.ok_or_else(|| missing(what))?;
    non_empty(&p.uri, &format!("{what}.uri"))?;
    let uri = p.uri.as_deref().unwrap_or("");
    if !uri.contains("://") {
        return Err(Rejection {
            code: "invalid_uri",
            message: format!("{what}.uri {uri:?} has no scheme"),
        });
    }
    if p.encoding.is_none() || pb::DataPayloadEncoding::try_from(p.encoding.unwrap_or(0)).is_err() {
        return Err(Rejection {
            code: "invalid_encoding",
            message: format!("{what}.encoding is missing or unknown"),
        });
    }
    if p.size.is_none() {
        return Err(missing(&format!("{what}.size")));
    }
    if p.offset.is_none() {
        return Err(missing(&format!("{what}.offset")));
    }
    Ok(())
}

/// Checks a function executor description.
pub fn validate_function_executor(d: &pb::FunctionExecutorDescription) -> Result<(), Rejection> {
    non_empty(&d.id, "function_executor.id")?;
    if d.container_type == Some(pb::FunctionExecutorType::Sandbox as i32) {
        return Err(Rejection {
            code: "unsupported_type",
            message: "sandbox function executors are not supported by this agent".into(),
        });
    }
    validate_function_ref(d.function.as_ref(), "function_executor.function", true)?;
    validate_payload(d.application.as_ref(), "function_executor.application")?;
    if let Some(app) = &d.application {
        if app.encoding != Some(pb::DataPayloadEncoding::BinaryZip as i32) {
            return Err(Rejection {
                code: "invalid_encoding",
                message: "function_executor.application must be a BINARY_ZIP payload".into(),
            });
        }
    }
    match d.initialization_timeout_ms {
        Some(t) if t > 0 => {}
        _ => {
            return Err(Rejection {
                code: "invalid_timeout",
                message: "function_executor.initialization_timeout_ms must be > 0".into(),
            });
        }
    }
    match d.allocation_timeout_ms {
        Some(t) if t > 0 => {}
        _ => {
            return Err(Rejection {
                code: "invalid_timeout",
                message: "function_executor.allocation_timeout_ms must be > 0".into(),
            });
        }
    }
    match d.max_concurrency {
        Some(c) if c > 0 => {}
        _ => {
            return Err(Rejection {
                code: "invalid_concurrency",
                message: "function_executor.max_concurrency must be >= 1".into(),
            });
        }
    }
    let r = d
        .resources
        .as_ref()
        .ok_or_else(|| missing("function_executor.resources"))?;
    if r.cpu_ms_per_sec.is_none() || r.memory_bytes.is_none() || r.disk_bytes.is_none() {
        return Err(missing(
            "function_executor.resources.{cpu_ms_per_sec,memory_bytes,disk_bytes}",
        ));
    }
    if let Some(g) = &r.gpu {
        if g.count.is_none() || g.model.is_none() {
            return Err(missing("function_executor.resources.gpu.{count,model}"));
        }
    }
    Ok(())
}

/// Checks an allocation.
pub fn validate_allocation(a: &pb::Allocation) -> Result<(), Rejection> {
    non_empty(&a.allocation_id, "allocation.allocation_id")?;
    validate_function_ref(a.function.as_ref(), "allocation.function", false)?;
    non_empty(&a.function_call_id, "allocation.function_call_id")?;
    non_empty(&a.request_id, "allocation.request_id")?;
    non_empty(&a.function_executor_id, "allocation.function_executor_id")?;
    non_empty(
        &a.request_data_payload_uri_prefix,
        "allocation.request_data_payload_uri_prefix",
    )?;
    non_empty(
        &a.request_error_payload_uri_prefix,
        "allocation.request_error_payload_uri_prefix",
    )?;
    if a.function_call_metadata.is_none() {
        return Err(missing("allocation.function_call_metadata"));
    }
    for (i, arg) in a.args.iter().enumerate() {
        validate_payload(Some(arg), &format!("allocation.args[{i}]"))?;
        if arg.sha256_hash.is_none() {
            return Err(missing(&format!("allocation.args[{i}].sha256_hash")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn good_fe() -> pb::FunctionExecutorDescription {
        pb::FunctionExecutorDescription {
            id: Some("fe-1".into()),
            function: Some(pb::FunctionRef {
                namespace: Some("ns".into()),
                application_name: Some("app".into()),
                function_name: Some("f".into()),
                application_version: Some("1".into()),
            }),
            initialization_timeout_ms: Some(1000),
            application: Some(pb::DataPayload {
                uri: Some("file:///tmp/x.zip".into()),
                encoding: Some(pb::DataPayloadEncoding::BinaryZip as i32),
                offset: Some(0),
                size: Some(10),
                ..Default::default()
            }),
            resources: Some(pb::FunctionExecutorResources {
                cpu_ms_per_sec: Some(1000),
                memory_bytes: Some(1),
                disk_bytes: Some(1),
                gpu: None,
            }),
            max_concurrency: Some(1),
            allocation_timeout_ms: Some(1000),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_good_and_names_the_bad_field() {
        assert_eq!(validate_function_executor(&good_fe()), Ok(()));
        let mut d = good_fe();
        d.function.as_mut().map(|f| f.function_name = None);
        let e = validate_function_executor(&d).expect_err("no fn name");
        assert_eq!(
            e.message,
            "function_executor.function.function_name is missing or empty"
        );
        let mut d = good_fe();
        d.max_concurrency = Some(0);
        assert_eq!(
            validate_function_executor(&d).expect_err("zero").code,
            "invalid_concurrency"
        );
        let mut d = good_fe();
        d.application
            .as_mut()
            .map(|a| a.uri = Some("nowhere".into()));
        assert_eq!(
            validate_function_executor(&d).expect_err("uri").code,
            "invalid_uri"
        );
    }

    #[test]
    fn allocation_requires_ids() {
        let e = validate_allocation(&pb::Allocation::default()).expect_err("empty");
        assert_eq!(e.message, "allocation.allocation_id is missing or empty");
    }
}
