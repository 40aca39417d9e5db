//! The workload owner's side of splitapi: connect to a sandbox's splitapi endpoint over
//! mutual TLS with the client bundle the KBS issued, deliver a secret, read the status.
//!
//! ```text
//! kbsctl splitapi client-creds web-1 --out ./web-1-creds      # ca.crt client.crt client.key
//! cargo run -p examples --example splitapi_owner -- \
//!     --creds ./web-1-creds --guest-id web-1 --addr 10.0.0.7:8443 \
//!     --secret-name db-password --secret-file ./db-password
//! ```
//!
//! The server certificate must chain to the sandbox's `ca.crt` (and nothing else: no
//! public roots) and carry the name the client checks: the guest_id (DNS SAN) by default,
//! or `--server-name` (the `[tether] name` or `ip` SAN of the sandbox). The endpoint
//! address can differ from the name (NAT, port forward): `--addr` is where to connect.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, Parser)]
#[command(about = "Deliver a secret to a sandbox over splitapi (mutual TLS) and read its status")]
struct Args {
    /// Directory holding ca.crt, client.crt and client.key (`kbsctl splitapi client-creds`).
    #[arg(long, value_name = "DIR")]
    creds: PathBuf,
    /// The sandbox's guest_id.
    #[arg(long)]
    guest_id: String,
    /// Address of the sandbox's splitapi endpoint.
    #[arg(long, value_name = "HOST:PORT")]
    addr: SocketAddr,
    /// Name to verify the server certificate against (default: the guest_id); an IP
    /// address is checked against the certificate's IP SAN.
    #[arg(long)]
    server_name: Option<String>,
    /// Name of the secret to deliver (`[A-Za-z0-9._-]+`).
    #[arg(long, requires = "secret_source")]
    secret_name: Option<String>,
    /// File whose bytes are the secret.
    #[arg(long, group = "secret_source", value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// The secret itself (visible in the process list: prefer --secret-file).
    #[arg(long, group = "secret_source")]
    secret_value: Option<String>,
}

/// An HTTPS client for one sandbox's splitapi endpoint.
pub struct OwnerClient {
    http: reqwest::Client,
    base: String,
}

/// Largest PEM file read from the credentials directory.
const MAX_PEM_BYTES: u64 = 256 * 1024;

fn read_pem(dir: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let path = dir.join(name);
    let mut bytes = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .with_context(|| format!("read {}", path.display()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        bail!("{} is larger than {MAX_PEM_BYTES} bytes", path.display());
    }
    Ok(bytes)
}

impl OwnerClient {
    /// A client presenting `dir`'s client.crt/client.key, trusting only `dir`'s ca.crt,
    /// verifying the server as `server_name` while connecting to `addr`.
    pub fn from_dir(dir: &Path, server_name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&read_pem(dir, "ca.crt")?) {
            roots
                .add(cert.context("ca.crt: bad PEM")?)
                .context("ca.crt is not a usable trust anchor")?;
        }
        if roots.is_empty() {
            bail!("{} holds no certificate", dir.join("ca.crt").display());
        }
        let chain = CertificateDer::pem_slice_iter(&read_pem(dir, "client.crt")?)
            .collect::<Result<Vec<_>, _>>()
            .context("client.crt: bad PEM")?;
        let key = PrivateKeyDer::from_pem_slice(&read_pem(dir, "client.key")?)
            .context("client.key: no private key in it")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("client.crt and client.key do not go together")?;
        let mut builder = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(30));
        // Connect to `addr` while checking the certificate against `server_name`.
        let host = match server_name.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
            Ok(IpAddr::V4(ip)) => ip.to_string(),
            Err(_) => {
                let host = server_name.to_ascii_lowercase();
                builder = builder.resolve(&host, addr);
                host
            }
        };
        Ok(Self {
            http: builder.build().context("build the HTTPS client")?,
            base: format!("https://{host}:{}", addr.port()),
        })
    }

    /// `PUT /splitapi/v1/secrets/<name>`: the stored version, digest and path.
    pub async fn put_secret(
        &self,
        name: &str,
        secret: Vec<u8>,
    ) -> anyhow::Result<serde_json::Value> {
        let resp = self
            .http
            .put(format!("{}/splitapi/v1/secrets/{name}", self.base))
            .header("content-type", "application/octet-stream")
            .body(secret)
            .send()
            .await
            .context("PUT the secret")?;
        json_reply(resp).await
    }

    /// `GET /splitapi/v1/status`.
    pub async fn status(&self) -> anyhow::Result<serde_json::Value> {
        let resp = self
            .http
            .get(format!("{}/splitapi/v1/status", self.base))
            .send()
            .await
            .context("GET the status")?;
        json_reply(resp).await
    }
}

async fn json_reply(resp: reqwest::Response) -> anyhow::Result<serde_json::Value> {
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("read the JSON reply")?;
    if !status.is_success() {
        bail!(
            "the sandbox answered {status}: {} ({})",
            body["detail"].as_str().unwrap_or(""),
            body["error"].as_str().unwrap_or("")
        );
    }
    Ok(body)
}

fn print_json(title: &str, value: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{title}\n{}", serde_json::to_string_pretty(value)?)?;
    out.flush()?;
    Ok(())
}

#[allow(dead_code)]
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server_name = args.server_name.as_deref().unwrap_or(&args.guest_id);
    let client = OwnerClient::from_dir(&args.creds, server_name, args.addr)?;
    if let Some(name) = &args.secret_name {
        let secret = match (&args.secret_file, &args.secret_value) {
            (Some(path), _) => {
                std::fs::read(path).with_context(|| format!("read {}", path.display()))?
            }
            (None, Some(value)) => value.clone().into_bytes(),
            (None, None) => bail!("--secret-name needs --secret-file or --secret-value"),
        };
        let stored = client.put_secret(name, secret).await?;
        print_json(&format!("PUT /splitapi/v1/secrets/{name}"), &stored)?;
    }
    let status = client.status().await?;
    print_json("GET /splitapi/v1/status", &status)?;
    Ok(())
}
