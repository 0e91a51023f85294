//! Generated protobuf and gRPC types: the Indexify executor API
//! (`executor_api_pb`, spoken with the control plane) and the Tensorlake
//! function executor API (`function_executor_service`, spoken with workers).
//!
//! This is the only crate that compiles `proto/`. It holds no logic.
//! Must not know about: processes, blobs, HTTP, host resources.

#![allow(clippy::all, clippy::unwrap_used, missing_docs, nonstandard_style)]

/// The control-plane API (package `executor_api_pb`).
pub mod executor_api_pb {
    tonic::include_proto!("executor_api_pb");
}

/// The worker API (package `function_executor_service`).
pub mod function_executor_service {
    tonic::include_proto!("function_executor_service");
}

/// `google.rpc.Status`, as carried inside worker messages.
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// Encoded `FileDescriptorSet` of every file in `proto/`, for descriptor checks.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/steward_descriptor.bin"));

/// The two protobuf well-known types the protos use, defined here so that
/// they can derive `serde::Serialize` like every generated message.
pub mod wkt {
    /// `google.protobuf.Timestamp`.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, ::prost::Message, serde::Serialize)]
    pub struct Timestamp {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }

    /// `google.protobuf.Any`.
    #[derive(Clone, PartialEq, Eq, Hash, ::prost::Message, serde::Serialize)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: ::prost::alloc::string::String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: ::prost::alloc::vec::Vec<u8>,
    }
}

/// JSON serializers that write enum fields of `executor_api_pb` as their
/// names (`"EXECUTOR_STATUS_RUNNING"`), or the number when it is unknown.
pub mod enum_names {
    use crate::executor_api_pb as pb;

    macro_rules! names {
        ($($fn_name:ident => $enum:ty),* $(,)?) => {$(
            pub fn $fn_name<S: serde::Serializer>(v: &Option<i32>, s: S) -> Result<S::Ok, S::Error> {
                match v.map(|n| (n, <$enum>::try_from(n))) {
                    None => s.serialize_none(),
                    Some((_, Ok(e))) => s.serialize_str(e.as_str_name()),
                    Some((n, Err(_))) => s.serialize_i32(n),
                }
            }
        )*};
    }

    names! {
        data_payload_encoding => pb::DataPayloadEncoding,
        gpu_model => pb::GpuModel,
        function_executor_type => pb::FunctionExecutorType,
        function_executor_status => pb::FunctionExecutorStatus,
        termination_reason => pb::FunctionExecutorTerminationReason,
        executor_status => pb::ExecutorStatus,
        outcome_code => pb::AllocationOutcomeCode,
        failure_reason => pb::AllocationFailureReason,
    }
}
