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
