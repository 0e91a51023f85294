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

/// Largest function call result (encoded) routed to the allocations that
/// wait on it: a result is a few hundred bytes of ids and one or two
/// payload descriptions, and one that arrives early is kept (up to
/// `watches::EARLY_RESULTS_LIMIT` of them).
pub(crate) const MAX_FUNCTION_CALL_RESULT_BYTES: usize = 64 << 10;

/// How far into its blob a payload reaches (`offset + size`), if that fits
/// `max_bytes` (`--max-input-blob-bytes`) without overflowing.
pub(crate) fn input_extent(
    p: &pb::DataPayload,
    what: &str,
    max_bytes: u64,
) -> Result<u64, Rejection> {
    let (offset, size) = (p.offset.unwrap_or(0), p.size.unwrap_or(0));
    let too_large = |message| Rejection {
        code: "input_too_large",
        message,
    };
    let end = offset.checked_add(size).ok_or_else(|| {
        too_large(format!(
            "{what}: offset {offset} + size {size} overflows a 64-bit integer"
        ))
    })?;
    if end > max_bytes {
        return Err(too_large(format!(
            "{what}: offset + size is {end} bytes, over the {max_bytes}-byte limit (--max-input-blob-bytes)"
        )));
    }
    Ok(end)
}

/// Checks what the agent would make to hand `a`'s inputs to its worker,
/// before any URL is made: each argument within `max_input_bytes`, and
/// all of them together within [`steward_blob_store::MAX_READ_CHUNKS`]
/// read chunks (which also bounds how many arguments there are).
pub(crate) fn bound_inputs(
    a: &pb::Allocation,
    max_input_bytes: u64,
    blobs: &steward_blob_store::BlobStore,
) -> Result<(), Rejection> {
    let max = steward_blob_store::MAX_READ_CHUNKS;
    let mut chunks: u64 = 0;
    for (i, arg) in a.args.iter().enumerate() {
        let end = input_extent(arg, &format!("allocation.args[{i}]"), max_input_bytes)?;
        chunks = chunks.saturating_add(blobs.read_chunks_for(end));
        if chunks > max {
            return Err(Rejection {
                code: "too_many_input_chunks",
                message: format!(
                    "allocation.args: {} argument(s) need more than {max} read chunks together",
                    a.args.len()
                ),
            });
        }
    }
    Ok(())
}

/// Checks a function call result before it is routed to the allocations
/// waiting on it: its encoded size, and its payloads within
/// `max_input_bytes`.
pub(crate) fn bound_function_call_result(
    r: &pb::FunctionCallResult,
    max_input_bytes: u64,
) -> Result<(), Rejection> {
    use prost::Message;
    let bytes = r.encoded_len();
    if bytes > MAX_FUNCTION_CALL_RESULT_BYTES {
        return Err(Rejection {
            code: "function_call_result_too_large",
            message: format!(
                "the result is {bytes} bytes; at most {MAX_FUNCTION_CALL_RESULT_BYTES} are allowed"
            ),
        });
    }
    for (what, p) in [
        ("return_value", &r.return_value),
        ("request_error", &r.request_error),
    ] {
        if let Some(p) = p {
            input_extent(p, what, max_input_bytes)?;
        }
    }
    Ok(())
}

/// A function executor id names files in the data directory (its log, its
/// process record): only what the server's ids use (nanoids, uuids, hex),
/// bounded, never a path.
fn check_fe_id(id: &str) -> Result<(), Rejection> {
    let ok = id.len() <= 256
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Rejection {
            code: "invalid_id",
            message: format!(
                "function_executor.id {:?} must be at most 256 of [A-Za-z0-9._-]",
                id.chars().take(64).collect::<String>()
            ),
        })
    }
}

/// Checks a function executor description.
pub fn validate_function_executor(d: &pb::FunctionExecutorDescription) -> Result<(), Rejection> {
    non_empty(&d.id, "function_executor.id")?;
    check_fe_id(d.id.as_deref().unwrap_or(""))?;
    if d.container_type == Some(pb::FunctionExecutorType::Sandbox as i32) {
        return Err(Rejection {
            code: "unsupported_type",
            message: "sandbox function executors are not supported by this agent".into(),
        });
    }
    validate_function_ref(d.function.as_ref(), "function_executor.function", true)?;
    validate_payload(d.application.as_ref(), "function_executor.application")?;
    if let Some(app) = &d.application
        && app.encoding != Some(pb::DataPayloadEncoding::BinaryZip as i32)
    {
        return Err(Rejection {
            code: "invalid_encoding",
            message: "function_executor.application must be a BINARY_ZIP payload".into(),
        });
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
    if let Some(g) = &r.gpu
        && (g.count.is_none() || g.model.is_none())
    {
        return Err(missing("function_executor.resources.gpu.{count,model}"));
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
pub(crate) mod tests {
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
        if let Some(f) = d.function.as_mut() {
            f.function_name = None;
        }
        let e = validate_function_executor(&d).expect_err("no fn name");
        assert_eq!(
            e.message,
            "function_executor.function.function_name is missing or empty"
        );
        for bad in ["../../etc/cron.d/x", "..", "a/b", &"x".repeat(300)] {
            let mut d = good_fe();
            d.id = Some(bad.to_string());
            assert_eq!(
                validate_function_executor(&d).expect_err(bad).code,
                "invalid_id"
            );
        }
        let mut d = good_fe();
        d.id = Some("-cNXOwmUJKenmf_HMeypF".into());
        assert_eq!(validate_function_executor(&d), Ok(()), "a nanoid");
        let mut d = good_fe();
        d.max_concurrency = Some(0);
        assert_eq!(
            validate_function_executor(&d).expect_err("zero").code,
            "invalid_concurrency"
        );
        let mut d = good_fe();
        if let Some(a) = d.application.as_mut() {
            a.uri = Some("nowhere".into());
        }
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

/// Checks that one worker fits what this host gives workers (a server bug or
/// a stale placement must not overcommit the host) and that its code URI is
/// one this agent may fetch.
pub(crate) fn admit_function_executor(
    d: &pb::FunctionExecutorDescription,
    allocatable: &pb::HostResources,
    blobs: &steward_blob_store::BlobStore,
) -> Result<(), Rejection> {
    let too_big = |what: &str, want: u64, have: u64| Rejection {
        code: "exceeds_allocatable",
        message: format!(
            "function executor asks for {want} {what} but this host gives workers at most {have}"
        ),
    };
    if let Some(r) = &d.resources {
        let cpus = u64::from(r.cpu_ms_per_sec.unwrap_or(0)).div_ceil(1000);
        let have = u64::from(allocatable.cpu_count.unwrap_or(0));
        if cpus > have {
            return Err(too_big("CPU(s)", cpus, have));
        }
        let (mem, have) = (
            r.memory_bytes.unwrap_or(0),
            allocatable.memory_bytes.unwrap_or(0),
        );
        if mem > have {
            return Err(too_big("bytes of memory", mem, have));
        }
        let (disk, have) = (
            r.disk_bytes.unwrap_or(0),
            allocatable.disk_bytes.unwrap_or(0),
        );
        if disk > have {
            return Err(too_big("bytes of disk", disk, have));
        }
        let gpus = r.gpu.as_ref().and_then(|g| g.count).unwrap_or(0);
        let have = allocatable.gpu.as_ref().and_then(|g| g.count).unwrap_or(0);
        if gpus > have {
            return Err(too_big("GPU(s)", u64::from(gpus), u64::from(have)));
        }
    }
    let uri = d
        .application
        .as_ref()
        .and_then(|a| a.uri.as_deref())
        .unwrap_or("");
    blobs.check_uri(uri).map_err(|e| Rejection {
        code: "uri_not_allowed",
        message: format!("function_executor.application: {e}"),
    })
}

/// Checks that every blob an allocation names is one this agent may use.
pub(crate) fn admit_allocation(
    a: &pb::Allocation,
    blobs: &steward_blob_store::BlobStore,
) -> Result<(), Rejection> {
    let bad = |what: String, e: steward_blob_store::BlobError| Rejection {
        code: "uri_not_allowed",
        message: format!("{what}: {e}"),
    };
    for (i, arg) in a.args.iter().enumerate() {
        blobs
            .check_uri(arg.uri.as_deref().unwrap_or(""))
            .map_err(|e| bad(format!("allocation.args[{i}]"), e))?;
    }
    for (what, prefix) in [
        (
            "allocation.request_data_payload_uri_prefix",
            &a.request_data_payload_uri_prefix,
        ),
        (
            "allocation.request_error_payload_uri_prefix",
            &a.request_error_payload_uri_prefix,
        ),
    ] {
        let probe = format!("{}.probe", prefix.as_deref().unwrap_or(""));
        blobs
            .check_uri(&probe)
            .map_err(|e| bad(what.to_string(), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod admission_tests {
    use super::*;

    #[test]
    fn oversized_worker_and_escaping_uris_are_rejected() {
        let root = tempfile::tempdir().expect("tempdir");
        let blobs = steward_blob_store::BlobStore::new(steward_blob_store::BlobStoreConfig {
            local_roots: vec![root.path().to_path_buf()],
            ..Default::default()
        });
        let host = pb::HostResources {
            cpu_count: Some(2),
            memory_bytes: Some(1 << 30),
            disk_bytes: Some(1 << 30),
            gpu: None,
        };
        let mut d = tests::good_fe();
        if let Some(a) = d.application.as_mut() {
            a.uri = Some(format!("file://{}/code.zip", root.path().display()));
        }
        assert_eq!(admit_function_executor(&d, &host, &blobs), Ok(()));
        if let Some(r) = d.resources.as_mut() {
            r.cpu_ms_per_sec = Some(2500);
        }
        let e = admit_function_executor(&d, &host, &blobs).expect_err("3 cpus");
        assert_eq!(
            e.message,
            "function executor asks for 3 CPU(s) but this host gives workers at most 2"
        );
        let mut d = tests::good_fe();
        if let Some(a) = d.application.as_mut() {
            a.uri = Some("file:///etc/shadow".into());
        }
        assert_eq!(
            admit_function_executor(&d, &host, &blobs)
                .expect_err("escape")
                .code,
            "uri_not_allowed"
        );
        let a = pb::Allocation {
            request_data_payload_uri_prefix: Some(format!(
                "file://{}/../../x",
                root.path().display()
            )),
            request_error_payload_uri_prefix: Some(format!("file://{}/err", root.path().display())),
            ..Default::default()
        };
        assert!(
            admit_allocation(&a, &blobs)
                .expect_err("dotdot")
                .message
                .contains("'..'")
        );
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    fn payload(offset: u64, size: u64) -> pb::DataPayload {
        pb::DataPayload {
            uri: Some("file:///blobs/x".into()),
            encoding: Some(pb::DataPayloadEncoding::Utf8Json as i32),
            offset: Some(offset),
            size: Some(size),
            sha256_hash: Some("ab".into()),
            ..Default::default()
        }
    }

    fn store() -> steward_blob_store::BlobStore {
        steward_blob_store::BlobStore::new(steward_blob_store::BlobStoreConfig::default())
    }

    #[test]
    fn a_huge_or_overflowing_input_is_rejected_before_any_url() {
        let max = crate::DEFAULT_MAX_INPUT_BLOB_BYTES;
        let with_args = |args| pb::Allocation {
            args,
            ..Default::default()
        };
        let ok = with_args(vec![payload(0, 10), payload(max - 10, 10)]);
        assert_eq!(bound_inputs(&ok, max, &store()), Ok(()));

        let huge = with_args(vec![payload(0, 10), payload(0, 1 << 63)]);
        let e = bound_inputs(&huge, max, &store()).expect_err("2^63 bytes");
        assert_eq!(e.code, "input_too_large");
        assert_eq!(
            e.message,
            "allocation.args[1]: offset + size is 9223372036854775808 bytes, over the \
             1099511627776-byte limit (--max-input-blob-bytes)"
        );

        let overflow = with_args(vec![payload(u64::MAX, 2)]);
        let e = bound_inputs(&overflow, max, &store()).expect_err("overflow");
        assert_eq!(e.code, "input_too_large");
        assert!(e.message.contains("overflows"), "{}", e.message);

        // Each argument fits, but not all of them together.
        let many = with_args(vec![payload(0, max); 2]);
        let e = bound_inputs(&many, max, &store()).expect_err("2 TiB of inputs");
        assert_eq!(e.code, "too_many_input_chunks");
        let tiny = with_args(vec![
            payload(0, 0);
            steward_blob_store::MAX_READ_CHUNKS as usize + 1
        ]);
        assert_eq!(
            bound_inputs(&tiny, max, &store())
                .expect_err("one chunk each")
                .code,
            "too_many_input_chunks"
        );
    }

    #[test]
    fn an_oversized_function_call_result_is_refused() {
        let max = crate::DEFAULT_MAX_INPUT_BLOB_BYTES;
        let result = |value: pb::DataPayload| pb::FunctionCallResult {
            namespace: Some("ns".into()),
            request_id: Some("r".into()),
            function_call_id: Some("c".into()),
            outcome_code: Some(pb::AllocationOutcomeCode::Success as i32),
            failure_reason: None,
            return_value: Some(value),
            request_error: None,
        };
        assert_eq!(
            bound_function_call_result(&result(payload(0, 10)), max),
            Ok(())
        );
        let e = bound_function_call_result(&result(payload(0, 1 << 63)), max).expect_err("huge");
        assert_eq!(e.code, "input_too_large");
        assert!(e.message.starts_with("return_value: "), "{}", e.message);
        let mut big = payload(0, 10);
        big.content_type = Some("x".repeat(MAX_FUNCTION_CALL_RESULT_BYTES));
        assert_eq!(
            bound_function_call_result(&result(big), max)
                .expect_err("64 KiB content type")
                .code,
            "function_call_result_too_large"
        );
    }
}
