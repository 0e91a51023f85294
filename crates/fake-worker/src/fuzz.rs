//! The `fuzz` function: a worker as hostile as the protocol lets it be.
//! From a seed (the function's input) it publishes a sequence of
//! `AllocationState` snapshots full of extreme and malformed items (huge
//! sizes, empty, duplicate and oversized ids, plans with missing fields,
//! watchers of calls that do not exist, request-state keys of any bytes,
//! commits of writes never prepared, NaN progress), without waiting for a
//! single answer, then a random result. The agent must answer what it can,
//! refuse the rest by name, and leave every other allocation alone.

use steward_proto::function_executor_service as fe;

/// splitmix64: small, deterministic, good enough to pick cases.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn size(&mut self) -> u64 {
        match self.below(6) {
            0 => 0,
            1 => 1,
            2 => 1 << 20,
            3 => 5 << 40,
            4 => u64::MAX,
            _ => self.next(),
        }
    }

    fn id(&mut self) -> Option<String> {
        match self.below(6) {
            0 => None,
            1 => Some(String::new()),
            2 => Some("x".repeat(10_000)),
            3 => Some("dup".into()),
            4 => Some("../../etc/passwd".into()),
            _ => Some(format!("{:x}", self.next())),
        }
    }

    fn text(&mut self) -> String {
        let len = self.below(40) as usize;
        (0..len)
            .map(|_| char::from_u32(self.below(0x2FF) as u32 + 1).unwrap_or('?'))
            .collect()
    }
}

fn blob(rng: &mut Rng) -> fe::Blob {
    fe::Blob {
        id: rng.id(),
        chunks: (0..rng.below(3))
            .map(|_| fe::BlobChunk {
                uri: rng
                    .chance(50)
                    .then(|| format!("file:///tmp/{}", rng.text())),
                size: Some(rng.size()),
                etag: rng.id(),
            })
            .collect(),
    }
}

fn value(rng: &mut Rng) -> fe::SerializedObjectInsideBlob {
    fe::SerializedObjectInsideBlob {
        manifest: rng.chance(80).then(|| fe::SerializedObjectManifest {
            encoding: Some(rng.below(8) as i32),
            encoding_version: Some(rng.below(3)),
            size: Some(rng.size()),
            metadata_size: Some(rng.size()),
            sha256_hash: rng.id(),
            content_type: rng.chance(50).then(|| rng.text()),
            source_function_call_id: rng.id(),
        }),
        offset: Some(rng.size()),
    }
}

fn plan(rng: &mut Rng) -> fe::ExecutionPlanUpdates {
    let updates = (0..rng.below(4))
        .map(|_| fe::ExecutionPlanUpdate {
            op: match rng.below(3) {
                0 => None,
                1 => Some(fe::execution_plan_update::Op::Reduce(fe::ReduceOp {
                    id: rng.id(),
                    collection: Vec::new(),
                    reducer: None,
                    call_metadata: None,
                })),
                _ => Some(fe::execution_plan_update::Op::FunctionCall(
                    fe::FunctionCall {
                        id: rng.id(),
                        target: rng.chance(70).then(|| fe::FunctionRef {
                            namespace: Some("default".into()),
                            application_name: Some("fake".into()),
                            function_name: Some(if rng.chance(50) {
                                "echo".into()
                            } else {
                                rng.text()
                            }),
                            application_version: None,
                        }),
                        args: (0..rng.below(3))
                            .map(|_| fe::FunctionArg {
                                source: match rng.below(3) {
                                    0 => None,
                                    1 => Some(fe::function_arg::Source::FunctionCallId(rng.text())),
                                    _ => Some(fe::function_arg::Source::Value(value(rng))),
                                },
                            })
                            .collect(),
                        call_metadata: rng.chance(50).then(|| rng.text().into_bytes()),
                    },
                )),
            },
        })
        .collect();
    fe::ExecutionPlanUpdates {
        updates,
        root_function_call_id: rng.id(),
        start_at: None,
    }
}

fn state_op(rng: &mut Rng) -> fe::AllocationRequestStateOperation {
    use fe::allocation_request_state_operation::Operation as Op;
    fe::AllocationRequestStateOperation {
        operation_id: rng.id(),
        state_key: Some(if rng.chance(20) {
            "k".repeat(2000)
        } else {
            rng.text()
        }),
        operation: match rng.below(4) {
            0 => None,
            1 => Some(Op::PrepareRead(
                fe::AllocationRequestStatePrepareReadOperation {},
            )),
            2 => Some(Op::PrepareWrite(
                fe::AllocationRequestStatePrepareWriteOperation {
                    size: Some(rng.size()),
                },
            )),
            _ => Some(Op::CommitWrite(
                fe::AllocationRequestStateCommitWriteOperation {
                    blob: rng.chance(80).then(|| blob(rng)),
                },
            )),
        },
    }
}

/// Changes `s` the way a worker might between two snapshots.
pub fn mutate(rng: &mut Rng, s: &mut fe::AllocationState) {
    match rng.below(6) {
        0 => s
            .output_blob_requests
            .push(fe::AllocationOutputBlobRequest {
                id: rng.id(),
                size: Some(rng.size()),
            }),
        1 => s.function_calls.push(fe::AllocationFunctionCall {
            id: rng.id(),
            updates: rng.chance(90).then(|| plan(rng)),
            args_blob: rng.chance(50).then(|| blob(rng)),
        }),
        2 => s
            .function_call_watchers
            .push(fe::AllocationFunctionCallWatcher {
                watcher_id: rng.id(),
                function_call_id: rng.id(),
                id: rng.id(),
                root_function_call_id: rng.id(),
            }),
        3 => s.request_state_operations.push(state_op(rng)),
        4 => {
            s.progress = Some(fe::AllocationProgress {
                current: [f32::NAN, f32::INFINITY, -1.0, rng.below(100) as f32]
                    [rng.below(4) as usize],
                total: rng.below(100) as f32,
            })
        }
        _ => {
            // The worker drops what it has been answered (or gives up).
            let i = rng.below(4);
            match i {
                0 => drop(s.output_blob_requests.pop()),
                1 => drop(s.function_calls.pop()),
                2 => drop(s.function_call_watchers.pop()),
                _ => drop(s.request_state_operations.pop()),
            }
        }
    }
}

/// The result the sequence ends with.
pub fn result(rng: &mut Rng) -> fe::AllocationResult {
    fe::AllocationResult {
        outcome_code: Some(rng.below(4) as i32),
        failure_reason: rng.chance(50).then(|| rng.below(5) as i32),
        outputs: match rng.below(3) {
            0 => None,
            1 => Some(fe::allocation_result::Outputs::Value(value(rng))),
            _ => Some(fe::allocation_result::Outputs::Updates(plan(rng))),
        },
        uploaded_function_outputs_blob: rng.chance(50).then(|| blob(rng)),
        request_error_output: rng.chance(30).then(|| value(rng)),
        uploaded_request_error_blob: rng.chance(30).then(|| blob(rng)),
        metrics: None,
    }
}

/// How many snapshots a seed publishes before its result.
pub fn steps(rng: &mut Rng) -> usize {
    1 + rng.below(30) as usize
}
