//! The server side of `executor_api_pb.ExecutorAPI`: a thin adapter from
//! tonic to the scheduler (reports, desired-state streams, `call_function`).
//! Must not know about: scheduling, HTTP.

use std::pin::Pin;
use std::sync::Arc;

use steward_proto::executor_api_pb as pb;
use steward_proto::executor_api_pb::executor_api_server::{ExecutorApi, ExecutorApiServer};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::DevServerError;
use crate::scheduler::Scheduler;

struct Api {
    sched: Arc<Scheduler>,
    cancel: CancellationToken,
}

type DesiredStream = Pin<Box<dyn Stream<Item = Result<pb::DesiredExecutorState, Status>> + Send>>;

#[tonic::async_trait]
impl ExecutorApi for Api {
    async fn report_executor_state(
        &self,
        request: Request<pb::ReportExecutorStateRequest>,
    ) -> Result<Response<pb::ReportExecutorStateResponse>, Status> {
        self.sched.report(request.into_inner()).await?;
        Ok(Response::new(pb::ReportExecutorStateResponse {}))
    }

    type get_desired_executor_statesStream = DesiredStream;

    async fn get_desired_executor_states(
        &self,
        request: Request<pb::GetDesiredExecutorStatesRequest>,
    ) -> Result<Response<DesiredStream>, Status> {
        let id = request.into_inner().executor_id.unwrap_or_default();
        let sub = self.sched.subscribe(&id).ok_or_else(|| {
            Status::not_found(format!(
                "executor {id:?} is not registered; report state first"
            ))
        })?;
        let (sent, cut) = (sub.sent, sub.cut);
        // Latest state only, as the real server's watch channel.
        let stream = tokio_stream::StreamExt::map(WatchStream::new(sub.desired), move |d| {
            sent.count();
            Ok(d)
        });
        // Streams end when the server stops or the stream is cut on purpose.
        let server_stop = self.cancel.clone();
        let ended = async move {
            tokio::select! {
                _ = server_stop.cancelled() => {}
                _ = cut.cancelled() => {}
            }
        };
        let stream = futures::StreamExt::take_until(stream, Box::pin(ended));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn call_function(
        &self,
        request: Request<pb::FunctionCallRequest>,
    ) -> Result<Response<pb::FunctionCallResponse>, Status> {
        self.sched.call_function(request.into_inner()).await?;
        Ok(Response::new(pb::FunctionCallResponse {}))
    }
}

pub(crate) async fn serve(
    listener: TcpListener,
    sched: Arc<Scheduler>,
    tls: Option<crate::ServerTls>,
    cancel: CancellationToken,
) -> Result<(), DevServerError> {
    let svc = ExecutorApiServer::new(Api {
        sched,
        cancel: cancel.clone(),
    })
    .max_decoding_message_size(usize::MAX)
    .max_encoding_message_size(usize::MAX);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let mut c =
            ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
        if let Some(ca) = &tls.client_ca_pem {
            c = c.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder
            .tls_config(c)
            .map_err(|e| DevServerError::Serve(format!("gRPC TLS: {e}")))?;
    }
    builder
        .add_service(svc)
        // TCP_NODELAY: without it small stream messages wait on delayed ACKs (~40 ms).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            cancel.cancelled_owned(),
        )
        .await
        .map_err(|e| DevServerError::Serve(format!("gRPC: {e}")))
}
