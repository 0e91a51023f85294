//! `--config-path`: the reference executor's YAML, read the same way, so
//! one file serves both agents:
//!
//! ```yaml
//! use_tls: true
//! tls_config:
//!   ca_bundle_path: /etc/steward/ca.pem     # the server's CA (platform roots without it)
//!   cert_path: /etc/steward/client.pem      # mutual TLS: this host's certificate...
//!   key_path: /etc/steward/client.key       # ...and its key
//! ```
//!
//! Other keys are ignored, as the reference ignores them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use steward_reconciler::ServerTls;

#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    use_tls: bool,
    tls_config: Option<TlsSection>,
}

#[derive(Debug, Deserialize)]
struct TlsSection {
    cert_path: Option<PathBuf>,
    key_path: Option<PathBuf>,
    ca_bundle_path: Option<PathBuf>,
}

/// Bounded: a config file is small.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn read_pem(what: &str, path: &Path, marker: &str) -> Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))?;
    if !String::from_utf8_lossy(&bytes).contains(marker) {
        bail!(
            "{what} {} holds no PEM block with {marker:?}",
            path.display()
        );
    }
    Ok(bytes)
}

/// TLS to the server as the file at `path` says; `None` when it does not
/// enable TLS.
pub fn server_tls(path: &Path) -> Result<Option<ServerTls>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.len() > MAX_CONFIG_BYTES {
        bail!("{} is larger than {MAX_CONFIG_BYTES} bytes", path.display());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("in {}", path.display()))
}

fn parse(text: &str) -> Result<Option<ServerTls>> {
    let file: ConfigFile = serde_yaml_ng::from_str(text).context("not the expected YAML")?;
    if !file.use_tls {
        return Ok(None);
    }
    let Some(tls) = file.tls_config else {
        return Ok(Some(ServerTls::default()));
    };
    let (cert_pem, key_pem) = match (&tls.cert_path, &tls.key_path) {
        (Some(c), Some(k)) => (
            Some(read_pem("tls_config.cert_path", c, "CERTIFICATE")?),
            Some(read_pem("tls_config.key_path", k, "PRIVATE KEY")?),
        ),
        (Some(_), None) => {
            bail!("tls_config.cert_path is set but key_path is missing: mutual TLS needs both")
        }
        (None, Some(_)) => {
            bail!("tls_config.key_path is set but cert_path is missing: mutual TLS needs both")
        }
        (None, None) => (None, None),
    };
    let ca_pem = match &tls.ca_bundle_path {
        Some(p) => Some(read_pem("tls_config.ca_bundle_path", p, "CERTIFICATE")?),
        None => None,
    };
    Ok(Some(ServerTls {
        ca_pem,
        cert_pem,
        key_pem,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_reference_format_and_names_what_is_wrong() {
        assert!(parse("use_tls: false\n").expect("ok").is_none());
        assert!(
            parse("labels: {a: b}\n")
                .expect("other keys ignored")
                .is_none()
        );
        let plain = parse("use_tls: true\n").expect("ok").expect("tls");
        assert!(plain.ca_pem.is_none() && plain.cert_pem.is_none());
        let e = parse("use_tls: true\ntls_config:\n  cert_path: /x.pem\n").expect_err("no key");
        assert!(e.to_string().contains("key_path is missing"), "{e:#}");
        let e = parse("use_tls: true\ntls_config:\n  ca_bundle_path: /nonexistent/ca.pem\n")
            .expect_err("no file");
        assert!(format!("{e:#}").contains("/nonexistent/ca.pem"), "{e:#}");
        assert!(parse("use_tls: [").is_err());
    }
}
