//! A worker's gRPC connection: one HTTP/2 connection over loopback TCP,
//! used by the generated client directly.
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

use crate::fe_pb::function_executor_client::FunctionExecutorClient;

/// What a worker's client calls through.
#[derive(Clone)]
pub(crate) struct WorkerConn {
    send: SendRequest<Body>,
}

/// A worker's gRPC client.
pub(crate) type WorkerClient = FunctionExecutorClient<WorkerConn>;

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

/// Opens an HTTP/2 connection to the worker at `address` (`host:port`)
/// and returns a client over it. The connection task ends when the last
/// clone of the client is dropped or the worker goes away.
pub(crate) async fn connect(address: &str) -> std::io::Result<WorkerClient> {
    let tcp = tokio::net::TcpStream::connect(address).await?;
    tcp.set_nodelay(true)?;
    let (send, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "worker connection ended");
        }
    });
    let origin: Uri = format!("http://{address}")
        .parse()
        .map_err(std::io::Error::other)?;
    Ok(FunctionExecutorClient::with_origin(
        WorkerConn { send },
        origin,
    ))
}
