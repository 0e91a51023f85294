//! Compiles `proto/*.proto` (the repository root's) into Rust, with a vendored
//! `protoc` so that a fresh machine needs nothing from apt. Also writes the
//! file descriptor set, which the wire-compatibility test compares with the
//! reference packages.

use std::path::PathBuf;

/// (message.field, serializer in `enum_names`) for every enum-typed field of executor_api.
const ENUM_FIELDS: &[(&str, &str)] = &[
    ("DataPayload.encoding", "data_payload_encoding"),
    ("GPUResources.model", "gpu_model"),
    (
        "FunctionExecutorDescription.container_type",
        "function_executor_type",
    ),
    ("FunctionExecutorState.status", "function_executor_status"),
    (
        "FunctionExecutorState.termination_reason",
        "termination_reason",
    ),
    ("ExecutorState.status", "executor_status"),
    ("FunctionCallResult.outcome_code", "outcome_code"),
    ("FunctionCallResult.failure_reason", "failure_reason"),
    ("AllocationResult.outcome_code", "outcome_code"),
    ("AllocationResult.failure_reason", "failure_reason"),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_dir = manifest_dir.join("../../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "executor_api.proto",
        "function_executor.proto",
        "status.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={}", proto_dir.join(p).display());
    }
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    config.btree_map(["."]);
    // Our own well-known types, so every generated message can derive Serialize.
    config.extern_path(".google.protobuf.Timestamp", "crate::wkt::Timestamp");
    config.extern_path(".google.protobuf.Any", "crate::wkt::Any");
    config.type_attribute(".", "#[derive(serde::Serialize)]");
    // Enum fields of the control-plane API serialize as their names in JSON.
    for (field, serializer) in ENUM_FIELDS {
        config.field_attribute(
            format!(".executor_api_pb.{field}"),
            format!("#[serde(serialize_with = \"crate::enum_names::{serializer}\")]"),
        );
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("steward_descriptor.bin"))
        .compile_with_config(
            config,
            &protos.map(|p| proto_dir.join(p)),
            &[proto_dir.clone(), include],
        )?;
    Ok(())
}
