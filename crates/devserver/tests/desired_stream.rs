//! The desired-state stream over the real gRPC listener: a full state when it
//! opens, another with a higher clock on every publish, and the counts
//! `/v1/stats` gives benchmarks (`desired_states_published`,
//! `desired_states_sent`, per executor).

use std::time::Duration;

use steward_devserver::{DevServer, DevServerConfig};
use steward_proto::executor_api_pb as pb;
use steward_proto::executor_api_pb::executor_api_client::ExecutorApiClient;

const EX: &str = "ex-stream";

async fn next(s: &mut tonic::Streaming<pb::DesiredExecutorState>) -> pb::DesiredExecutorState {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a desired state within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

async fn stats(http: &reqwest::Client, url: &str) -> serde_json::Value {
    http.get(format!("{url}/v1/stats"))
        .send()
        .await
        .expect("GET /v1/stats")
        .json()
        .await
        .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_sends_full_states_and_stats_count_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = DevServer::start(DevServerConfig {
        tls: None,
        grpc_addr: "127.0.0.1:0".into(),
        http_addr: "127.0.0.1:0".into(),
        blob_dir: dir.path().join("blobs"),
        s3_base: None,
        s3: Default::default(),
    })
    .await
    .expect("start");
    let url = server.http_url();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut grpc = ExecutorApiClient::connect(format!("http://{}", server.grpc_addr))
        .await
        .expect("connect");
    grpc.report_executor_state(pb::ReportExecutorStateRequest {
        executor_state: Some(pb::ExecutorState {
            executor_id: Some(EX.into()),
            status: Some(pb::ExecutorStatus::Running as i32),
            ..Default::default()
        }),
        executor_update: Some(pb::ExecutorUpdate::default()),
    })
    .await
    .expect("register");
    let before = stats(&http, &url).await;
    assert_eq!(before["desired_states_sent"], 0, "{before}");

    let mut stream = grpc
        .get_desired_executor_states(pb::GetDesiredExecutorStatesRequest {
            executor_id: Some(EX.into()),
        })
        .await
        .expect("open stream")
        .into_inner();
    let first = next(&mut stream).await;
    let s = stats(&http, &url).await;
    assert_eq!(s["desired_states_sent"], 1, "{s}");
    assert_eq!(s["desired_states_by_executor"][EX]["sent"], 1, "{s}");
    assert_eq!(s["desired_states_by_executor"][EX]["published"], 1, "{s}");

    let status = http
        .post(format!("{url}/v1/executors/{EX}/republish"))
        .send()
        .await
        .expect("republish")
        .status();
    assert!(status.is_success(), "{status}");
    let second = next(&mut stream).await;
    assert!(
        second.clock > first.clock,
        "{:?} then {:?}",
        first.clock,
        second.clock
    );
    let s = stats(&http, &url).await;
    assert_eq!(s["desired_states_published"], 2, "{s}");
    assert_eq!(s["desired_states_sent"], 2, "{s}");
    assert_eq!(s["allocations_created"], 0, "{s}");
    server.stop().await;
}
