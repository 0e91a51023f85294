//! An S3 server running inside the test process: `s3s` (the S3 protocol,
//! SigV4 and presigned-URL expiry checks) over `s3s-fs` (objects as files
//! under a directory, one directory per bucket). Tests and the dev control
//! plane use it where a real S3 is needed and none is reachable.
//!
//! Must not know about: anything of Steward; it is a plain S3 endpoint.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Access key the server accepts.
pub const ACCESS_KEY: &str = "STEWARDTESTKEY";
/// Secret key the server accepts.
pub const SECRET_KEY: &str = "stewardtestsecret0123456789";
pub const REGION: &str = "us-east-1";

/// A running server; stops when dropped.
pub struct S3Server {
    pub addr: SocketAddr,
    pub root: PathBuf,
    cancel: CancellationToken,
}

impl S3Server {
    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Starts a server on an ephemeral port serving `root`, creating `buckets`.
pub async fn start(root: &Path, buckets: &[&str]) -> std::io::Result<S3Server> {
    for b in buckets {
        std::fs::create_dir_all(root.join(b))?;
    }
    let fs = s3s_fs::FileSystem::new(root)
        .map_err(|e| std::io::Error::other(format!("s3s-fs: {e:?}")))?;
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    let service = builder.build();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((socket, _)) = accepted else { continue };
            let service = service.clone();
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                if let Err(e) = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                    .await
                {
                    tracing::debug!(error = %e, "test S3 connection ended");
                }
            });
        }
    });
    Ok(S3Server {
        addr,
        root: root.to_path_buf(),
        cancel,
    })
}
