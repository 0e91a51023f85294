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

/// Bounded: a config file is small. A larger one is refused at start and
/// on every SIGHUP re-read, before it is read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The config file's text, refused past [`MAX_CONFIG_BYTES`] (the file may
/// grow between a size check and the read: the read itself is bounded).
fn read_config(path: &Path) -> Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        bail!("{} is larger than {MAX_CONFIG_BYTES} bytes", path.display());
    }
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Refuses a secret (a token file, a TLS key) that its group or others
/// may read, saying its mode.
pub fn check_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} has mode {:03o}: a secret must be readable by its owner only (chmod 600)",
            path.display(),
            mode & 0o777
        );
    }
    Ok(())
}

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
    let text = read_config(path)?;
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
            Some({
                check_private(k).context("tls_config.key_path")?;
                read_pem("tls_config.key_path", k, "PRIVATE KEY")?
            }),
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

/// The log filter last applied at runtime (for `GET /admin/config`).
static LOG_LEVEL: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The settings an operator can change, with the log filter and the price
/// card, as JSON.
pub fn settings_document(
    handle: &steward_reconciler::AgentHandle,
    metering: Option<&steward_metering::Recorder>,
) -> serde_json::Value {
    let mut v = serde_json::to_value(handle.settings()).unwrap_or_default();
    let level = LOG_LEVEL.lock().ok().and_then(|l| l.clone());
    if let Some(o) = v.as_object_mut() {
        o.insert("log_level".into(), serde_json::json!(level));
        o.insert(
            "price_card".into(),
            serde_json::json!(metering.and_then(|m| m.price_card())),
        );
    }
    v
}

/// Applies a change of settings (`PATCH /admin/config`, or the `steward:`
/// section of the config file on SIGHUP) as a whole: every field is
/// checked before anything changes; an error names the field.
pub fn apply_settings(
    handle: &steward_reconciler::AgentHandle,
    metering: Option<&steward_metering::Recorder>,
    change: serde_json::Value,
    by: &str,
) -> Result<serde_json::Value, String> {
    let serde_json::Value::Object(mut fields) = change else {
        return Err("the change must be a JSON object".into());
    };
    let card = match fields.remove("price_card") {
        None => None,
        Some(v) => Some(crate::metering::parse_price_card(&v)?),
    };
    if card.is_some() && metering.is_none() {
        return Err("price_card: metering is off (--no-metering)".into());
    }
    let level = match fields.remove("log_level") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(l)) => Some(
            crate::logging::parse_log_level(&l)
                .map(|f| (l, f))
                .map_err(|e| format!("log_level: {e}"))?,
        ),
        Some(_) => return Err("log_level: a string such as \"info\" or \"debug,h2=warn\"".into()),
    };
    let patch: steward_reconciler::SettingsPatch =
        serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| e.to_string())?;
    // Nothing is applied until everything is valid: the settings check
    // themselves as a whole, and the log filter is already parsed.
    handle
        .update_settings(&patch, by)
        .map_err(|e| e.to_string())?;
    if let Some((text, filter)) = level {
        crate::logging::set_log_filter(filter)?;
        if let Ok(mut l) = LOG_LEVEL.lock() {
            *l = Some(text);
        }
    }
    if let (Some(card), Some(m)) = (card, metering)
        && m.price_card() != card
    {
        let said = match &card {
            Some(c) => format!(
                "price card now in force: {} (scale {})",
                c.currency, c.scale
            ),
            None => "price card removed: records are no longer priced".into(),
        };
        m.set_price_card(card);
        handle.event("price_card", by, said);
    }
    Ok(settings_document(handle, metering))
}

/// The `steward:` section of the config file (Steward's own settings), as JSON.
pub fn steward_section(path: &Path) -> Result<Option<serde_json::Value>> {
    let text = read_config(path)?;
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).context("not YAML")?;
    let Some(section) = doc.get("steward") else {
        return Ok(None);
    };
    Ok(Some(
        serde_json::to_value(section).context("steward: section")?,
    ))
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

    #[test]
    fn a_config_file_past_the_bound_is_refused_before_it_is_parsed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.yaml");
        let mut text = String::from("steward:\n  labels: {a: b}\n");
        std::fs::write(&path, &text).expect("write");
        assert!(steward_section(&path).expect("small").is_some());
        text.push_str(&"#".repeat(MAX_CONFIG_BYTES as usize));
        std::fs::write(&path, &text).expect("write");
        let e = steward_section(&path).expect_err("too large");
        assert!(format!("{e:#}").contains("larger than"), "{e:#}");
        assert!(server_tls(&path).is_err());
    }

    #[test]
    fn secrets_readable_by_others_are_refused_with_their_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("client.key");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").expect("write");
        let cert = dir.path().join("client.pem");
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\n").expect("write");
        let yaml = format!(
            "use_tls: true\ntls_config:\n  cert_path: {}\n  key_path: {}\n",
            cert.display(),
            key.display()
        );
        for (mode, ok) in [
            (0o644, false),
            (0o640, false),
            (0o604, false),
            (0o600, true),
            (0o400, true),
        ] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
            assert_eq!(check_private(&key).is_ok(), ok, "{mode:o}");
            match parse(&yaml) {
                Ok(tls) => assert!(ok && tls.is_some_and(|t| t.key_pem.is_some()), "{mode:o}"),
                Err(e) => {
                    assert!(!ok, "{mode:o}: {e:#}");
                    let said = format!("{e:#}");
                    assert!(
                        said.contains(&format!("mode {mode:03o}")) && said.contains("key_path"),
                        "{said}"
                    );
                }
            }
        }
    }
}
