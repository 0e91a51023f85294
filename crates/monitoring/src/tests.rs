//! The server's limits through real sockets: a slowloris is cut off, a
//! connection over the cap is answered only probes (and probes still are
//! with every slot held), a client that never reads is dropped, renderings wait for a slot within
//! the request timeout, the read token guards documents and metrics but
//! not probes, and an admin body is not read before its token.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

const ADMIN: &str = "admin-token-0123456789";
const READ: &str = "read-token-0123456789";
/// Longest a test waits for something that must happen (not a timing
/// assertion: only a bound on a hang).
const PATIENCE: Duration = Duration::from_secs(30);
/// Bytes of the `big` document.
const BIG_DOCUMENT: usize = 64 << 20;

/// A source whose `slow` document waits until the test lets it go.
struct Fake {
    slow_started: Mutex<mpsc::Sender<()>>,
    slow_release: Mutex<mpsc::Receiver<()>>,
    admin_refused: AtomicUsize,
    read_refused: AtomicUsize,
    admin_calls: AtomicUsize,
}

impl StateSource for Fake {
    fn startup(&self) -> ProbeResult {
        ProbeResult {
            ok: true,
            message: "up".into(),
        }
    }
    fn health(&self) -> ProbeResult {
        self.startup()
    }
    fn metrics(&self) -> String {
        "# EOF\n".into()
    }
    fn document_names(&self) -> Vec<&'static str> {
        vec!["fast", "slow"]
    }
    fn document(&self, name: &str, _: Format) -> Option<Document> {
        match name {
            "fast" => Some(Document::Json(serde_json::json!({"fast": true}))),
            // More than the loopback socket buffers hold.
            "big" => Some(Document::Text("x".repeat(BIG_DOCUMENT))),
            "slow" => {
                let _ = self.slow_started.lock().ok()?.send(());
                let _ = self.slow_release.lock().ok()?.recv_timeout(PATIENCE);
                Some(Document::Json(serde_json::json!({"slow": true})))
            }
            _ => None,
        }
    }
    fn admin(&self, _: &str, _: &str, _: &[u8]) -> Option<AdminAnswer> {
        self.admin_calls.fetch_add(1, Ordering::SeqCst);
        Some(AdminAnswer {
            code: 200,
            body: serde_json::json!({}),
        })
    }
    fn admin_refused(&self, _: &str, _: u16) {
        self.admin_refused.fetch_add(1, Ordering::SeqCst);
    }
    fn read_refused(&self, _: &str, _: u16) {
        self.read_refused.fetch_add(1, Ordering::SeqCst);
    }
}

struct Server {
    base: String,
    addr: SocketAddr,
    fake: Arc<Fake>,
    /// Signals `slow` to finish.
    release: mpsc::Sender<()>,
    /// Says `slow` started.
    started: mpsc::Receiver<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    registry: Arc<Registry>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start(limits: Limits, admin: bool, read: bool) -> Server {
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let fake = Arc::new(Fake {
        slow_started: Mutex::new(started_tx),
        slow_release: Mutex::new(release_rx),
        admin_refused: AtomicUsize::new(0),
        read_refused: AtomicUsize::new(0),
        admin_calls: AtomicUsize::new(0),
    });
    let mut registry = Registry::default();
    let config = ServerConfig {
        admin: admin.then(|| BearerToken::new(ADMIN).expect("token")),
        read: read.then(|| BearerToken::new(READ).expect("token")),
        limits,
        metrics: ServerMetrics::register(&mut registry),
    };
    let listener = bind("127.0.0.1:0").await.expect("bind");
    let addr = local_addr(&listener).expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(serve(listener, fake.clone(), config, async move {
        let _ = stopped.await;
    }));
    Server {
        base: format!("http://{addr}"),
        addr,
        fake,
        release,
        started,
        stop: Some(stop),
        registry: Arc::new(registry),
    }
}

/// A server of two connections whose clients may idle as long as they like.
async fn start_capped_at_two() -> Server {
    start(
        Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(600),
            ..Limits::default()
        },
        false,
        false,
    )
    .await
}

impl Server {
    /// Polls `/state/fast` until it is answered 200; panics with `never`
    /// after [`PATIENCE`].
    async fn until_fast_is_served(&self, never: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while get(&format!("{}/state/fast", self.base), None).await != 200 {
            assert!(tokio::time::Instant::now() < deadline, "{never}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn metrics_text(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

async fn get(url: &str, token: Option<&str>) -> u16 {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// Reads until the server closes the connection (`Ok(what it sent)`), or
/// `Err` if it is still open after [`PATIENCE`].
async fn until_closed(conn: &mut TcpStream) -> Result<String, String> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 1024];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    match read {
        Ok(()) => Ok(String::from_utf8_lossy(&got).into_owned()),
        Err(_) => Err(format!(
            "still open after {PATIENCE:?}; sent {:?}",
            String::from_utf8_lossy(&got)
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_its_headers_is_cut_off() {
    let server = start(
        Limits {
            header_read_timeout: Duration::from_secs(1),
            ..Limits::default()
        },
        false,
        false,
    )
    .await;
    let mut slow = TcpStream::connect(server.addr).await.expect("connect");
    slow.write_all(b"GET /state/fast HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let said = until_closed(&mut slow).await.expect("closed");
    assert!(
        said.is_empty() || said.starts_with("HTTP/1.1 408"),
        "{said:?}"
    );
    // Everyone else is served.
    assert_eq!(get(&format!("{}/state/fast", server.base), None).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_cap_is_answered_only_probes() {
    let server = start_capped_at_two().await;
    let idle1 = TcpStream::connect(server.addr).await.expect("connect");
    let _idle2 = TcpStream::connect(server.addr).await.expect("connect");
    let mut third = TcpStream::connect(server.addr).await.expect("connect");
    third
        .write_all(b"GET /state/fast HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let said = until_closed(&mut third).await.expect("closed");
    assert!(said.starts_with("HTTP/1.1 503"), "{said:?}");
    assert!(
        server
            .metrics_text()
            .contains("monitoring_connections_refused_total 1"),
        "{}",
        server.metrics_text()
    );
    // A slot comes back when a connection goes.
    drop(idle1);
    server.until_fast_is_served("never served again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_answered_with_every_slot_held_by_idle_connections() {
    let server = start_capped_at_two().await;
    // The cap, and the probes' reserve twice over, held by strangers who
    // never send a byte.
    let mut idle = Vec::new();
    for _ in 0..2 + 2 * RESERVED_PROBE_CONNECTIONS {
        idle.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    assert_eq!(
        get(&format!("{}/monitoring/health", server.base), None).await,
        200
    );
    assert_eq!(
        get(&format!("{}/monitoring/startup", server.base), None).await,
        200
    );
    // Anything else waits for a slot of the cap.
    assert_eq!(get(&format!("{}/state/fast", server.base), None).await, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_response_is_disconnected() {
    let server = start(
        Limits {
            max_connections: 1,
            connection_lifetime: Duration::from_secs(1),
            close_grace: Duration::from_secs(1),
            ..Limits::default()
        },
        false,
        false,
    )
    .await;
    let mut greedy = TcpStream::connect(server.addr).await.expect("connect");
    greedy
        .write_all(b"GET /state/big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    // It holds the one slot while its response is stuck; the slot comes
    // back once the connection is dropped.
    server
        .until_fast_is_served("the slot was never freed")
        .await;
    // And its connection was cut short of the whole document.
    let said = until_closed(&mut greedy).await.expect("closed");
    assert!(said.len() < BIG_DOCUMENT, "{} bytes", said.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renderings_wait_for_a_slot_within_the_request_timeout() {
    let server = start(
        Limits {
            state_concurrency: 1,
            request_timeout: Duration::from_secs(1),
            ..Limits::default()
        },
        false,
        false,
    )
    .await;
    let slow_url = format!("{}/state/slow", server.base);
    let slow = tokio::spawn(async move { get(&slow_url, None).await });
    server
        .started
        .recv_timeout(PATIENCE)
        .expect("slow rendering started");
    // The one slot is taken: this one waits, and is answered 503 at the
    // request timeout.
    assert_eq!(get(&format!("{}/state/fast", server.base), None).await, 503);
    // The slow one timed out as well, but its rendering still holds the
    // slot: the next one waits too.
    assert_eq!(slow.await.expect("join"), 503);
    assert_eq!(get(&format!("{}/state/fast", server.base), None).await, 503);
    assert!(
        server
            .metrics_text()
            .contains("monitoring_requests_timed_out_total 3"),
        "{}",
        server.metrics_text()
    );
    // Probes never wait for a slot.
    assert_eq!(
        get(&format!("{}/monitoring/startup", server.base), None).await,
        200
    );
    server.release.send(()).expect("release");
    server.until_fast_is_served("slot never freed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_token_guards_documents_and_metrics_not_probes() {
    let server = start(Limits::default(), true, true).await;
    let b = &server.base;
    for path in ["/state/fast", "/state", "/monitoring/metrics"] {
        let url = format!("{b}{path}");
        assert_eq!(get(&url, None).await, 401, "{path}");
        assert_eq!(get(&url, Some("not-the-token-at-all")).await, 403, "{path}");
        assert_eq!(get(&url, Some(READ)).await, 200, "{path}");
        assert_eq!(get(&url, Some(ADMIN)).await, 200, "{path}: admin reads");
    }
    for path in ["/monitoring/startup", "/monitoring/health"] {
        assert_eq!(get(&format!("{b}{path}"), None).await, 200, "{path}");
    }
    assert_eq!(server.fake.read_refused.load(Ordering::SeqCst), 6);
    let text = server.metrics_text();
    assert!(
        text.contains("monitoring_auth_failures_total{route=\"state\",status=\"401\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("monitoring_auth_failures_total{route=\"metrics\",status=\"403\"} 1"),
        "{text}"
    );
    // The read token is not an admin token.
    let resp = reqwest::Client::new()
        .post(format!("{b}/admin/pause"))
        .bearer_auth(READ)
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_read_token_documents_are_open() {
    let server = start(Limits::default(), true, false).await;
    assert_eq!(get(&format!("{}/state/fast", server.base), None).await, 200);
    assert_eq!(
        get(&format!("{}/monitoring/metrics", server.base), None).await,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_body_is_not_read_before_its_token() {
    let server = start(
        Limits {
            request_timeout: Duration::from_secs(600),
            ..Limits::default()
        },
        true,
        false,
    )
    .await;
    let mut conn = TcpStream::connect(server.addr).await.expect("connect");
    // Headers announcing a large body, and only a few of its bytes.
    conn.write_all(
        b"POST /admin/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\nConnection: close\r\n\r\n{\"a\":",
    )
    .await
    .expect("write");
    let said = until_closed(&mut conn).await.expect("answered");
    assert!(said.starts_with("HTTP/1.1 401"), "{said:?}");
    assert_eq!(server.fake.admin_refused.load(Ordering::SeqCst), 1);
    assert_eq!(server.fake.admin_calls.load(Ordering::SeqCst), 0);
    // With the token, the body is read (bounded) and the call made.
    let resp = reqwest::Client::new()
        .post(format!("{}/admin/pause", server.base))
        .bearer_auth(ADMIN)
        .body(vec![b' '; 70 << 10])
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 413);
    let resp = reqwest::Client::new()
        .post(format!("{}/admin/pause", server.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(server.fake.admin_calls.load(Ordering::SeqCst), 1);
}

#[test]
fn pages_are_checked_and_say_where_the_next_one_starts() {
    let q = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(Page::from_query(&q(&[])), Ok(Page::default()));
    let p = Page::from_query(&q(&[("limit", "2"), ("offset", "3")])).expect("page");
    assert_eq!(p.range(10), 3..5);
    assert_eq!(p.info(10)["next_offset"], 5);
    assert_eq!(p.info(5)["next_offset"], serde_json::Value::Null);
    assert_eq!(p.range(2), 2..2);
    assert_eq!(p.slice(&[1, 2, 3, 4]), &[4]);
    for (bad, says) in [
        (("limit", "0"), "limit 0: from 1 to 10000"),
        (("limit", "10001"), "limit 10001: from 1 to 10000"),
        (("offset", "-1"), r#"offset "-1": a whole number"#),
        (("limit", "x"), r#"limit "x": a whole number"#),
    ] {
        let e = Page::from_query(&q(&[bad])).expect_err("refused");
        assert_eq!(e.to_string(), says, "{bad:?}");
    }
}
