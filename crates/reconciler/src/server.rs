//! The server edge: the address rules (TLS never silently off), the
//! shared lazily-connected channel, and the `ExecutorAPI` client every
//! server RPC goes through (state reports, the desired-state stream,
//! function calls). Knows nothing of the agent's state.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::AgentError;
use crate::pb::executor_api_client::ExecutorApiClient;

/// The URL to connect to for the server address `addr`. With TLS
/// configured (`use_tls`) every address is TLS or refused: a bare
/// `host:port` is `https://` (the reference executor opens a secure channel
/// to it too), an `https://` one (any case) is kept, and any other scheme
/// (`http://` in any case, `grpc://`, ...) is refused with the reason,
/// never connected to in plaintext. Without TLS a bare address is
/// `http://`, and only `http://` and `https://` are understood.
pub fn server_url(addr: &str, tls: bool) -> Result<String, AddressError> {
    let Some((scheme, rest)) = addr.split_once("://") else {
        let scheme = if tls { "https" } else { "http" };
        return Ok(format!("{scheme}://{addr}"));
    };
    match (scheme.to_ascii_lowercase().as_str(), tls) {
        ("https", _) => Ok(format!("https://{rest}")),
        ("http", false) => Ok(format!("http://{rest}")),
        ("http", true) => Err(AddressError::PlaintextWithTls),
        (_, true) => Err(AddressError::NotHttpsWithTls(scheme.to_string())),
        (_, false) => Err(AddressError::UnknownScheme(scheme.to_string())),
    }
}

/// Why a server address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error(
        "TLS is configured (use_tls) but the address says http://: give https:// or a bare host:port"
    )]
    PlaintextWithTls,
    #[error(
        "TLS is configured (use_tls) but the address's scheme {0:?} is not https: give https:// or a bare host:port"
    )]
    NotHttpsWithTls(String),
    #[error("unknown scheme {0:?}: give http://, https:// or a bare host:port")]
    UnknownScheme(String),
}

/// A lazily connecting channel to the server.
pub(crate) fn channel(addr: &str, tls: Option<&crate::ServerTls>) -> Result<Channel, AgentError> {
    let bad = |reason: String| AgentError::ServerAddr {
        addr: addr.to_string(),
        reason,
    };
    let url = server_url(addr, tls.is_some()).map_err(|e| bad(e.to_string()))?;
    let mut endpoint = Endpoint::from_shared(url).map_err(|e| bad(e.to_string()))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.client_config())
            .map_err(|e| bad(format!("TLS: {e}")))?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// A status with the chain of errors under it (a TLS failure is several
/// levels down a "transport error").
pub(crate) fn describe_status(status: &tonic::Status) -> String {
    let mut out = format!("{}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// A client of the server with the configured message size limit both
/// ways: a larger desired state fails its stream (reopened with backoff,
/// an event names the limit), a larger report is not sent.
pub(crate) fn client(channel: Channel, max_message_bytes: usize) -> ExecutorApiClient<Channel> {
    ExecutorApiClient::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}
