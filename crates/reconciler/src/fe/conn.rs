//! A worker's gRPC connection: one HTTP/2 connection over the stream the
//! driver handed over (a Unix socket, or loopback TCP, whose listener the
//! driver has already checked), used by the generated client directly.
//!
//! tonic's `Channel` queues every call through a buffer task and keeps a
//! reconnecting connection pool; a worker needs neither (a worker whose
//! connection breaks is dead, and is replaced, not redialled), and an
//! allocation makes four or more calls, each of which paid the extra task
//! hop. Here a call goes straight to the HTTP/2 connection task.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::body::Body;
use tonic::codegen::http::{Request, Response, Uri};
use tracing::Instrument;

use crate::fe_pb;

/// What a worker's client calls through.
#[derive(Clone)]
pub(crate) struct WorkerConn {
    send: SendRequest<Body>,
}

/// Encode and decode buffers for worker messages, which are small (their
/// data travels through blobs): a call's buffer starts at 1 KiB instead of
/// tonic's 8 KiB, and grows for a larger message. The state stream keeps
/// its buffer for the allocation's whole life, so this is per running
/// allocation.
const BUFFERS: usize = 1024;

/// tonic's prost codec with [`BUFFERS`].
struct SmallCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> SmallCodec<T, U> {
    fn new() -> Self {
        SmallCodec(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for SmallCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(settings())
    }
}

fn settings() -> tonic::codec::BufferSettings {
    tonic::codec::BufferSettings::new(BUFFERS, 32 * 1024)
}

/// A worker's gRPC client: the calls of `FunctionExecutor` the agent
/// makes, over [`WorkerConn`] with [`SmallCodec`].
#[derive(Clone)]
pub(crate) struct WorkerClient {
    grpc: tonic::client::Grpc<WorkerConn>,
}

type Answer<T> = Result<tonic::Response<T>, tonic::Status>;

macro_rules! unary {
    ($name:ident, $req:ty, $resp:ty) => {
        pub(crate) async fn $name(
            &mut self,
            request: impl tonic::IntoRequest<$req>,
        ) -> Answer<$resp> {
            self.ready().await?;
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(concat!(
                "/function_executor_service.FunctionExecutor/",
                stringify!($name)
            ));
            self.grpc
                .unary(request.into_request(), path, SmallCodec::new())
                .await
        }
    };
}

impl WorkerClient {
    pub(crate) fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.grpc = self.grpc.max_decoding_message_size(limit);
        self
    }

    pub(crate) fn max_encoding_message_size(mut self, limit: usize) -> Self {
        self.grpc = self.grpc.max_encoding_message_size(limit);
        self
    }

    async fn ready(&mut self) -> Result<(), tonic::Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("worker connection: {e}")))
    }

    unary!(
        initialize,
        fe_pb::InitializeRequest,
        fe_pb::InitializeResponse
    );
    unary!(
        create_allocation,
        fe_pb::CreateAllocationRequest,
        fe_pb::Empty
    );
    unary!(
        delete_allocation,
        fe_pb::DeleteAllocationRequest,
        fe_pb::Empty
    );
    unary!(
        send_allocation_update,
        fe_pb::AllocationUpdate,
        fe_pb::Empty
    );
    unary!(
        check_health,
        fe_pb::HealthCheckRequest,
        fe_pb::HealthCheckResponse
    );
    unary!(get_info, fe_pb::InfoRequest, fe_pb::InfoResponse);
    unary!(
        list_allocations,
        fe_pb::ListAllocationsRequest,
        fe_pb::ListAllocationsResponse
    );

    pub(crate) async fn watch_allocation_state(
        &mut self,
        request: fe_pb::WatchAllocationStateRequest,
    ) -> Answer<tonic::codec::Streaming<fe_pb::AllocationState>> {
        self.ready().await?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/function_executor_service.FunctionExecutor/watch_allocation_state",
        );
        self.grpc
            .server_streaming(tonic::Request::new(request), path, SmallCodec::new())
            .await
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<hyper::body::Incoming>, hyper::Error>> + Send>>;

impl tonic::codegen::Service<Request<Body>> for WorkerConn {
    type Response = Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        Box::pin(self.send.send_request(request))
    }
}

/// Opens an HTTP/2 connection to the worker over `stream` (from
/// `Worker::connect`) and returns a client over it. The connection task
/// ends when the last clone of the client is dropped or the worker goes away.
pub(crate) async fn connect(
    stream: steward_worker_driver::WorkerStream,
) -> std::io::Result<WorkerClient> {
    let (send, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(
        async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "worker connection ended");
            }
        }
        .in_current_span(),
    );
    // The `:authority` of every call; the worker has no name to check.
    let origin = Uri::from_static("http://localhost");
    Ok(WorkerClient {
        grpc: tonic::client::Grpc::with_origin(WorkerConn { send }, origin),
    })
}
