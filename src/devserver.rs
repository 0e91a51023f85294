//! `steward devserver`: the development control plane and its client
//! commands (deploy, invoke, executors). Behind the `devserver` feature
//! (on by default, for the demo, the bench and the tests): the packaged
//! binary is built without it and carries no dev control plane.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct DevserverArgs {
    #[command(subcommand)]
    command: Option<DevCommand>,
    /// gRPC listen address (the executor API).
    #[arg(long, default_value = "127.0.0.1:8901")]
    grpc_addr: String,
    /// HTTP listen address (deploy, invoke, results).
    #[arg(long, default_value = "127.0.0.1:8900")]
    http_addr: String,
    /// Serve the executor API over TLS with this certificate (PEM)...
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// ...and this key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Root of the file:// blob store.
    #[arg(long, default_value = "~/.steward/devserver")]
    blob_dir: String,
    /// Keep code, inputs and outputs under this s3://bucket/prefix instead
    /// (credentials from the AWS_* environment).
    #[arg(long)]
    s3_base: Option<String>,
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    s3_endpoint: Option<String>,
    #[arg(long)]
    s3_allow_http: bool,
}

#[derive(Subcommand, Debug)]
enum DevCommand {
    /// Pack a directory or .py file of Tensorlake functions and deploy it.
    Deploy {
        path: PathBuf,
        /// Application name (default: the directory or file name).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "1")]
        version: String,
        #[arg(long, default_value_t = 0)]
        gpus: u32,
        #[arg(long, default_value_t = 1)]
        max_concurrency: u32,
        #[arg(long, default_value = "http://127.0.0.1:8900")]
        server: String,
    },
    /// Invoke a function with a JSON input and print the outcome as JSON.
    Invoke {
        application: String,
        function: String,
        /// JSON input.
        #[arg(long, default_value = "null")]
        input: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
        #[arg(long, default_value = "http://127.0.0.1:8900")]
        server: String,
    },
    /// Print the registered executors as JSON.
    Executors {
        #[arg(long, default_value = "http://127.0.0.1:8900")]
        server: String,
    },
}

/// The dev control plane's TLS from `--tls-cert`, `--tls-key` and `--tls-client-ca`.
fn devserver_tls(args: &DevserverArgs) -> Result<Option<steward_devserver::ServerTls>> {
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    match (&args.tls_cert, &args.tls_key) {
        (None, None) if args.tls_client_ca.is_none() => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(steward_devserver::ServerTls {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: args.tls_client_ca.as_ref().map(read).transpose()?,
        })),
        _ => bail!("TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)"),
    }
}

/// Runs the dev control plane, or one of its client commands.
pub async fn run(args: DevserverArgs) -> Result<()> {
    use steward_devserver::{DevServer, DevServerConfig, FunctionOptions, client};
    match args.command {
        None => {
            let tls = devserver_tls(&args)?;
            let server = DevServer::start(DevServerConfig {
                tls,
                grpc_addr: args.grpc_addr,
                http_addr: args.http_addr,
                blob_dir: crate::expand_home(&args.blob_dir),
                s3_base: args.s3_base,
                s3: steward_blob_store::S3Config {
                    endpoint: args.s3_endpoint,
                    allow_http: args.s3_allow_http,
                    ..Default::default()
                },
            })
            .await?;
            println!(
                "{}",
                serde_json::json!({"grpc_addr": server.grpc_addr.to_string(), "http_url": server.http_url()})
            );
            server.run_until(crate::shutdown_signal()).await?;
            Ok(())
        }
        Some(DevCommand::Deploy {
            path,
            name,
            namespace,
            version,
            gpus,
            max_concurrency,
            server,
        }) => {
            let name = match name {
                Some(n) => n,
                None => path
                    .canonicalize()
                    .with_context(|| format!("reading {}", path.display()))?
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .context("cannot derive an application name from the path; pass --name")?,
            };
            let options = FunctionOptions {
                gpus,
                max_concurrency,
                ..FunctionOptions::default()
            };
            let v = client::deploy(&server, &namespace, &name, &version, &path, &options).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Some(DevCommand::Invoke {
            application,
            function,
            input,
            namespace,
            timeout_s,
            server,
        }) => {
            let input: serde_json::Value = serde_json::from_str(&input)
                .with_context(|| format!("--input is not JSON: {input}"))?;
            let out = client::invoke(
                &server,
                &namespace,
                &application,
                &function,
                &input,
                timeout_s,
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Some(DevCommand::Executors { server }) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&client::executors(&server).await?)?
            );
            Ok(())
        }
    }
}
