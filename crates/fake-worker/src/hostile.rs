//! Functions that ask the agent for more than one allocation may have, all
//! in one allocation state, then echo their input as `echo` does:
//! `many_outputs` (input `n`: `n` output blobs besides its output),
//! `many_writes` (input `n`: `n` request-state writes), `many_reads` (input
//! `n`: `n` request-state reads), `many_calls` (input
//! `[n, kib]`: `n` nested calls of `noop`, each with `kib` KiB of call
//! metadata) and `foreign_call` (one call of `noop` in another namespace).

use steward_proto::function_executor_service as fe;

/// The names handled here.
pub const FUNCTIONS: [&str; 5] = [
    "many_outputs",
    "many_writes",
    "many_reads",
    "many_calls",
    "foreign_call",
];

/// The numbers in an input such as `3` or `[70, 1000]`.
fn numbers(input: &[u8]) -> Vec<usize> {
    String::from_utf8_lossy(input)
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// A nested call `id` of `noop` in `namespace` (the allocation's
/// application otherwise), with `metadata` bytes of call metadata.
fn call(
    id: String,
    own: &fe::FunctionRef,
    namespace: Option<String>,
    metadata: usize,
) -> fe::AllocationFunctionCall {
    let target = fe::FunctionRef {
        namespace: namespace.or_else(|| own.namespace.clone()),
        application_name: own.application_name.clone(),
        function_name: Some("noop".into()),
        application_version: own.application_version.clone(),
    };
    fe::AllocationFunctionCall {
        id: Some(id.clone()),
        updates: Some(fe::ExecutionPlanUpdates {
            updates: vec![fe::ExecutionPlanUpdate {
                op: Some(fe::execution_plan_update::Op::FunctionCall(
                    fe::FunctionCall {
                        id: Some(id.clone()),
                        target: Some(target),
                        args: Vec::new(),
                        call_metadata: Some(vec![7; metadata]),
                    },
                )),
            }],
            root_function_call_id: Some(id),
            start_at: None,
        }),
        args_blob: None,
    }
}

/// Adds to `state` what `function` asks for, given its `input`; `own` is
/// the function the worker was initialized with.
pub fn ask(function: &str, input: &[u8], own: &fe::FunctionRef, state: &mut fe::AllocationState) {
    let n = numbers(input);
    let count = n.first().copied().unwrap_or(1);
    match function {
        "many_outputs" => {
            state
                .output_blob_requests
                .extend((0..count).map(|i| fe::AllocationOutputBlobRequest {
                    id: Some(format!("extra-{i}")),
                    size: Some(1),
                }))
        }
        "many_writes" => state.request_state_operations.extend((0..count).map(|i| {
            fe::AllocationRequestStateOperation {
                operation_id: Some(format!("write-{i}")),
                state_key: Some(format!("k{i}")),
                operation: Some(
                    fe::allocation_request_state_operation::Operation::PrepareWrite(
                        fe::AllocationRequestStatePrepareWriteOperation { size: Some(1) },
                    ),
                ),
            }
        })),
        "many_reads" => state.request_state_operations.extend((0..count).map(|i| {
            fe::AllocationRequestStateOperation {
                operation_id: Some(format!("read-{i}")),
                state_key: Some(format!("k{i}")),
                operation: Some(
                    fe::allocation_request_state_operation::Operation::PrepareRead(
                        fe::AllocationRequestStatePrepareReadOperation {},
                    ),
                ),
            }
        })),
        "many_calls" => {
            let metadata = n.get(1).copied().unwrap_or(0) << 10;
            state
                .function_calls
                .extend((0..count).map(|i| call(format!("call-{i}"), own, None, metadata)))
        }
        "foreign_call" => {
            state
                .function_calls
                .push(call("foreign".into(), own, Some("elsewhere".into()), 0))
        }
        _ => {}
    }
}
