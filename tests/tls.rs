//! TLS and mutual TLS to the control plane with certificates made in the
//! test (`rcgen`): Steward and the reference executor connect to the dev
//! control plane with the same config file (the reference's format), and
//! each failure is named: a wrong CA, an expired server certificate, a
//! missing client certificate, a key missing from the config.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;
use steward_devserver::{FunctionOptions, ServerTls};
use support::{AgentProc, Plane};

struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Result<Pki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let pki = Pki {
            dir: tempfile::tempdir()?,
            ca,
        };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem())?;
        Ok(pki)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A certificate for `names` signed by this CA (expired if asked),
    /// written as `<file>.pem` and `<file>.key`; returns (cert, key) PEM.
    fn issue(&self, file: &str, names: &[&str], expired: bool) -> Result<(Vec<u8>, Vec<u8>)> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, file);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        let (cert, key) = (cert.pem().into_bytes(), key.serialize_pem().into_bytes());
        std::fs::write(self.path(&format!("{file}.pem")), &cert)?;
        support::write_secret(&self.path(&format!("{file}.key")), &key)?;
        Ok((cert, key))
    }

    /// The reference's config file: TLS with `ca`, and the client
    /// certificate `client` (mutual TLS) if given.
    fn config(&self, name: &str, ca: &Path, client: Option<&str>) -> Result<String> {
        let mut text = format!(
            "use_tls: true\ntls_config:\n  ca_bundle_path: {}\n",
            ca.display()
        );
        if let Some(c) = client {
            text.push_str(&format!(
                "  cert_path: {}\n  key_path: {}\n",
                self.path(&format!("{c}.pem")).display(),
                self.path(&format!("{c}.key")).display()
            ));
        }
        let path = self.path(name);
        std::fs::write(&path, text)?;
        Ok(path.to_string_lossy().into_owned())
    }
}

const SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

async fn tls_plane(pki: &Pki, expired: bool, mutual: bool) -> Result<Plane> {
    let (cert_pem, key_pem) = pki.issue("server", &SERVER_NAMES, expired)?;
    let tls = ServerTls {
        cert_pem,
        key_pem,
        client_ca_pem: mutual.then(|| pki.ca.pem().into_bytes()),
    };
    let plane = Plane::start_tls("127.0.0.1:0", tempfile::tempdir()?, Some(tls)).await?;
    plane.deploy_fake(FunctionOptions::default()).await?;
    Ok(plane)
}

fn steward(plane: &Plane, config: &str) -> Result<AgentProc> {
    let bin = support::fake_worker();
    AgentProc::steward(
        &plane.grpc,
        plane.blob_dir.path(),
        &[
            "--config-path",
            config,
            "--function-executor-bin",
            bin.to_str().unwrap_or_default(),
        ],
    )
}

/// Waits until Steward's health says why it cannot report, containing `what`.
async fn wait_report_error(s: &AgentProc, what: &str) -> Result<String> {
    let (_, events) = s
        .wait_json("/state/events", Duration::from_secs(30), |_, v| {
            v.to_string().contains(what)
        })
        .await?;
    Ok(events.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_with_the_reference_config_file_for_both_agents() -> Result<()> {
    let pki = Pki::new("steward test CA")?;
    pki.issue("client", &["executor"], false)?;
    // TLS: the server proves itself; both agents connect with one file.
    let plane = tls_plane(&pki, false, false).await?;
    let config = pki.config("tls.yaml", &pki.path("ca.pem"), None)?;
    let s = steward(&plane, &config)?;
    plane.wait_executors(1).await?;
    let out = plane.invoke_app("fake", "echo", json!("over tls")).await?;
    assert_eq!(out.status, "success", "{out:?}");
    drop(s);
    plane.stop().await;

    // Mutual TLS: the server also wants a client certificate.
    let plane = tls_plane(&pki, false, true).await?;
    let config = pki.config("mtls.yaml", &pki.path("ca.pem"), Some("client"))?;
    let s = steward(&plane, &config)?;
    plane.wait_executors(1).await?;
    let out = plane.invoke_app("fake", "echo", json!("over mtls")).await?;
    assert_eq!(out.status, "success", "{out:?}");
    drop(s);
    // The reference executor, same file, same plane (differential check).
    let reference = AgentProc::reference_with_args(&plane.grpc, &["--config-path", &config])?;
    let executors = plane.wait_executors(2).await?;
    assert!(
        executors.as_array().is_some_and(|a| a.len() >= 2),
        "{executors}"
    );
    drop(reference);
    plane.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tls_failure_is_named() -> Result<()> {
    let pki = Pki::new("steward test CA")?;
    pki.issue("client", &["executor"], false)?;
    let other = Pki::new("some other CA")?;

    // A CA that did not sign the server's certificate.
    let plane = tls_plane(&pki, false, false).await?;
    let config = pki.config("wrong-ca.yaml", &other.path("ca.pem"), None)?;
    let s = steward(&plane, &config)?;
    let text = wait_report_error(&s, "UnknownIssuer").await?;
    assert!(text.contains("server_connection_lost"), "{text}");
    drop(s);
    plane.stop().await;

    // An expired server certificate.
    let plane = tls_plane(&pki, true, false).await?;
    let config = pki.config("expired.yaml", &pki.path("ca.pem"), None)?;
    let s = steward(&plane, &config)?;
    wait_report_error(&s, "certificate expired").await?;
    drop(s);
    plane.stop().await;

    // Mutual TLS without a client certificate.
    let plane = tls_plane(&pki, false, true).await?;
    let config = pki.config("no-client.yaml", &pki.path("ca.pem"), None)?;
    let s = steward(&plane, &config)?;
    // (TLS 1.3: the server refuses after the handshake, so the agent only
    // sees the connection closed.)
    wait_report_error(&s, "connection closed").await?;
    drop(s);
    plane.stop().await;

    // A certificate without its key: Steward refuses to start and says why.
    let path = pki.path("no-key.yaml");
    std::fs::write(
        &path,
        format!(
            "use_tls: true\ntls_config:\n  cert_path: {}\n",
            pki.path("client.pem").display()
        ),
    )?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
        .args([
            "--grpc-server-addr",
            "127.0.0.1:1",
            "--monitoring-server-port",
            "0",
        ])
        .args(["--config-path", &path.to_string_lossy()])
        .arg("--executor-cache-path")
        .arg(pki.path("data"))
        .args(["--no-cgroups"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key_path is missing"), "{err}");
    Ok(())
}

/// With TLS configured (`use_tls`), an address that would not be TLS is
/// refused at start, saying why; a plaintext control plane listening there
/// never hears from Steward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_configured_a_plaintext_address_is_refused_at_start() -> Result<()> {
    let pki = Pki::new("steward test CA")?;
    let config = pki.config("tls.yaml", &pki.path("ca.pem"), None)?;
    let plane = Plane::start().await?;
    for scheme in ["HTTP", "Http", "grpc"] {
        let addr = format!("{scheme}://{}", plane.grpc);
        let data = tempfile::tempdir()?;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_steward"))
            // Workers die with this agent unless a test adopts them.
            .env("STEWARD_ADOPT_WORKERS", "false")
            .args(["--grpc-server-addr", &addr])
            .args(["--monitoring-server-port", "0", "--no-cgroups"])
            .args(["--config-path", &config])
            .arg("--executor-cache-path")
            .arg(data.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        // Bounded: it exits, or it reached the plane in plaintext.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            let registered = steward_devserver::client::executors(&plane.url).await?;
            if registered.as_array().is_some_and(|a| !a.is_empty())
                || std::time::Instant::now() >= deadline
            {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err)?;
        }
        let status = status.unwrap_or_else(|| panic!("{addr}: not refused at start: {err}"));
        assert!(!status.success(), "{addr}: {err}");
        assert!(
            err.contains("TLS is configured") && err.contains("--grpc-server-addr"),
            "{addr}: {err}"
        );
        let registered = steward_devserver::client::executors(&plane.url).await?;
        assert_eq!(registered, json!([]), "{addr}");
    }
    plane.stop().await;
    Ok(())
}
