//! The dev control plane over its real listeners: `call_function` status
//! codes through tonic, the `/v1/faults` fault-injection route and the
//! `/v1/namespaces/{ns}/requests/{id}/runs` listing. No agent runs; the test
//! speaks the executor protocol itself.

use std::time::Duration;

use steward_devserver::{DevServer, DevServerConfig, FunctionOptions, client};
use steward_proto::executor_api_pb as pb;
use steward_proto::executor_api_pb::executor_api_client::ExecutorApiClient;
use tonic::Code;

type Client = ExecutorApiClient<tonic::transport::Channel>;

async fn start(dir: &std::path::Path) -> DevServer {
    DevServer::start(DevServerConfig {
        tls: None,
        grpc_addr: "127.0.0.1:0".into(),
        http_addr: "127.0.0.1:0".into(),
        blob_dir: dir.join("blobs"),
        s3_base: None,
        s3: Default::default(),
    })
    .await
    .expect("start")
}

async fn register(grpc: &mut Client) {
    let state = pb::ExecutorState {
        executor_id: Some("ex".into()),
        status: Some(pb::ExecutorStatus::Running as i32),
        ..Default::default()
    };
    grpc.report_executor_state(pb::ReportExecutorStateRequest {
        executor_state: Some(state),
        executor_update: Some(pb::ExecutorUpdate::default()),
    })
    .await
    .expect("register");
}

fn call(request_id: &str, with_updates: bool) -> pb::FunctionCallRequest {
    let payload = pb::DataPayload {
        uri: Some("file:///nowhere".into()),
        encoding: Some(pb::DataPayloadEncoding::BinaryPickle as i32),
        size: Some(1),
        sha256_hash: Some("00".into()),
        ..Default::default()
    };
    let op = pb::ExecutionPlanUpdate {
        op: Some(pb::execution_plan_update::Op::FunctionCall(
            pb::FunctionCall {
                id: Some("d1".into()),
                target: Some(pb::FunctionRef {
                    namespace: Some("default".into()),
                    application_name: Some("app".into()),
                    function_name: Some("child".into()),
                    application_version: None,
                }),
                args: vec![pb::FunctionArg {
                    source: Some(pb::function_arg::Source::InlineData(payload)),
                }],
                call_metadata: Some(Vec::new()),
            },
        )),
    };
    pb::FunctionCallRequest {
        namespace: Some("default".into()),
        application: Some("app".into()),
        request_id: Some(request_id.into()),
        updates: with_updates.then(|| pb::ExecutionPlanUpdates {
            updates: vec![op],
            root_function_call_id: Some("d1".into()),
            start_at: None,
        }),
        source_function_call_id: Some(request_id.into()),
    }
}

async fn post_faults(http: &reqwest::Client, url: &str, body: &str) -> (u16, serde_json::Value) {
    let resp = http
        .post(format!("{url}/v1/faults"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("POST /v1/faults");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json"))
}

async fn runs(http: &reqwest::Client, url: &str, id: &str) -> (u16, serde_json::Value) {
    let resp = http
        .get(format!("{url}/v1/namespaces/default/requests/{id}/runs"))
        .send()
        .await
        .expect("GET runs");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_function_faults_and_runs_over_the_wire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir(&src).expect("mkdir");
    std::fs::write(
        src.join("app.py"),
        "@function()\ndef root(x):\n    pass\n\n@function()\ndef child(x):\n    pass\n",
    )
    .expect("write");
    let server = start(dir.path()).await;
    let url = server.http_url();
    let mut grpc = Client::connect(format!("http://{}", server.grpc_addr))
        .await
        .expect("connect");
    register(&mut grpc).await;
    client::deploy(
        &url,
        "default",
        "app",
        "1",
        &src,
        &FunctionOptions::default(),
    )
    .await
    .expect("deploy");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let started: serde_json::Value = http
        .post(format!(
            "{url}/v1/namespaces/default/applications/app/functions/root"
        ))
        .body("1")
        .send()
        .await
        .expect("invoke")
        .json()
        .await
        .expect("json");
    let rid = started["request_id"]
        .as_str()
        .expect("request id")
        .to_string();

    let err = grpc
        .call_function(call(&rid, false))
        .await
        .expect_err("no updates");
    assert_eq!(err.code(), Code::InvalidArgument);

    assert_eq!(
        post_faults(&http, &url, r#"{"call_function": "refuse"}"#).await,
        (
            200,
            serde_json::json!({"call_function": "refuse", "placement": "capacity", "place_on_drained": false})
        )
    );
    let err = grpc
        .call_function(call(&rid, true))
        .await
        .expect_err("refused");
    assert_eq!(
        (err.code(), err.message()),
        (Code::FailedPrecondition, "refused by fault injection")
    );

    assert_eq!(
        post_faults(&http, &url, r#"{"call_function": "later"}"#)
            .await
            .0,
        400
    );
    assert_eq!(
        post_faults(&http, &url, r#"{"callfunction": "ok"}"#)
            .await
            .0,
        400
    );
    post_faults(&http, &url, r#"{"call_function": "drop"}"#).await;
    grpc.call_function(call(&rid, true))
        .await
        .expect("dropped is OK");
    let (code, listed) = runs(&http, &url, &rid).await;
    assert_eq!(
        (code, listed["function_calls"].clone()),
        (200, serde_json::json!(1))
    );

    assert_eq!(
        post_faults(&http, &url, r#"{"call_function": "ok"}"#)
            .await
            .1,
        serde_json::json!({"call_function": "ok", "placement": "capacity", "place_on_drained": false})
    );
    grpc.call_function(call(&rid, true)).await.expect("ok");
    let (_, listed) = runs(&http, &url, &rid).await;
    assert_eq!(listed["function_runs"], 2, "{listed}");
    let child = &listed["runs"][1];
    assert_eq!(
        (
            child["id"].clone(),
            child["function"].clone(),
            child["parent"].clone()
        ),
        (
            serde_json::json!("d1"),
            serde_json::json!("child"),
            serde_json::json!(rid)
        )
    );
    assert_eq!(child["status"], "running");
    assert_eq!(child["has_output"], false);
    assert_eq!(listed["truncated"], false);

    assert_eq!(runs(&http, &url, "nope").await.0, 404);
    let faults: serde_json::Value = http
        .get(format!("{url}/v1/faults"))
        .send()
        .await
        .expect("GET faults")
        .json()
        .await
        .expect("json");
    assert_eq!(
        faults,
        serde_json::json!({"call_function": "ok", "placement": "capacity", "place_on_drained": false})
    );
    server.stop().await;
}
