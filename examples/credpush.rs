//! `credpush`: an external plugin that pushes a credential it obtains elsewhere to every
//! guest with a label, through the KBS's Guests API (`tether.plugin.v1.Guests`), and
//! reports per-guest results. Its own process, like any external plugin.
//!
//! It gets the credential two ways:
//! - through the KBS, as upstream's external plugin protocol (`kbs.plugin.v1`) forwards it:
//!   `POST /kbs/v0/external/<name>/push` with the credential as the body (admin-authenticated:
//!   its `ValidateAuth` asks for it) answers the push report as JSON;
//!   `GET /kbs/v0/external/<name>/status` (admin too) answers the last report;
//! - from a file it watches (`--watch <path>`): each change is pushed.
//!
//! Each push lists the guests matching `--selector` (within what the KBS grants the plugin)
//! and installs bundle `--bundle` (one file, `--file-name`, mode 0600) on each, version =
//! the push time in milliseconds (always increasing), at most 8 guests at once.
//!
//! ```text
//! credpush --kbs unix:/run/tether/guests.sock --token-file /etc/tether/credpush.token \
//!          --selector app=db --bundle db-creds [--listen 127.0.0.1:0] [--watch /path]
//! ```
//! prints `listening on <addr>` once its `kbs.plugin.v1` server accepts connections.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use plugin_external::proto::kbs_plugin_v1::kbs_plugin_server::{KbsPlugin, KbsPluginServer};
use plugin_external::proto::kbs_plugin_v1::{
    NeedsEncryptionRequest, NeedsEncryptionResponse, PluginRequest, PluginResponse,
    ValidateAuthRequest, ValidateAuthResponse,
};
use plugin_external::proto::tether_plugin_v1::{
    CredentialFile, InstallCredentialsRequest, ListGuestsRequest,
};
use serde::Serialize;
use tokio::sync::Mutex;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// Largest credential accepted.
const MAX_CREDENTIAL: usize = 64 * 1024;
/// Guests pushed at once.
const PUSHES_AT_ONCE: usize = 8;
/// Deadline of each guest call.
const GUEST_DEADLINE_MS: u32 = 10_000;

#[derive(Parser, Debug)]
struct Args {
    /// The KBS's Guests API: `unix:/path` or `http://127.0.0.1:port`.
    #[arg(long)]
    kbs: String,
    /// The file holding this plugin's token (the KBS's `token_file`).
    #[arg(long)]
    token_file: PathBuf,
    /// Which guests get the credential.
    #[arg(long, default_value = "")]
    selector: String,
    /// The bundle id.
    #[arg(long)]
    bundle: String,
    /// The file name inside the bundle.
    #[arg(long, default_value = "credential")]
    file_name: String,
    /// Where this plugin's `kbs.plugin.v1` server listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Push the contents of this file whenever it changes.
    #[arg(long)]
    watch: Option<PathBuf>,
}

type Guests = plugin_external::guests::client::Client;

/// One guest's result.
#[derive(Clone, Debug, Serialize)]
struct GuestResult {
    guest_id: String,
    /// `installed`, `already_held` or the gRPC code of the failure.
    outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// One push.
#[derive(Clone, Debug, Default, Serialize)]
struct Report {
    bundle: String,
    version: u64,
    selector: String,
    guests: Vec<GuestResult>,
    installed: usize,
    failed: usize,
    /// Set when listing the guests failed (nothing was pushed).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

struct Pusher {
    guests: Guests,
    selector: String,
    bundle: String,
    file_name: String,
    last_version: AtomicU64,
    last: Mutex<Option<Report>>,
}

impl Pusher {
    fn next_version(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let prev = self.last_version.fetch_max(now, Ordering::AcqRel);
        if prev >= now {
            self.last_version.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            now
        }
    }

    async fn push(&self, credential: Vec<u8>) -> Report {
        let version = self.next_version();
        let mut report = Report {
            bundle: self.bundle.clone(),
            version,
            selector: self.selector.clone(),
            ..Report::default()
        };
        let listed = self
            .guests
            .clone()
            .list_guests(ListGuestsRequest {
                selector: self.selector.clone(),
            })
            .await;
        let guests = match listed {
            Ok(r) => r.into_inner().guests,
            Err(s) => {
                report.error = Some(format!("{:?}: {}", s.code(), s.message()));
                *self.last.lock().await = Some(report.clone());
                return report;
            }
        };
        let credential = Arc::new(credential);
        let mut results: Vec<GuestResult> = futures::stream::iter(guests)
            .map(|g| {
                let mut client = self.guests.clone();
                let credential = credential.clone();
                let request = InstallCredentialsRequest {
                    guest_id: g.guest_id.clone(),
                    bundle_id: self.bundle.clone(),
                    version,
                    files: vec![CredentialFile {
                        name: self.file_name.clone(),
                        mode: 0o600,
                        contents: credential.to_vec(),
                    }],
                    not_after: 0,
                    deadline_ms: GUEST_DEADLINE_MS,
                };
                async move {
                    match client.install_credentials(request).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            GuestResult {
                                guest_id: g.guest_id,
                                outcome: if r.already_held {
                                    "already_held".into()
                                } else {
                                    "installed".into()
                                },
                                version: Some(r.version),
                                error: None,
                            }
                        }
                        Err(s) => GuestResult {
                            guest_id: g.guest_id,
                            outcome: format!("{:?}", s.code()),
                            version: None,
                            error: Some(s.message().to_string()),
                        },
                    }
                }
            })
            .buffer_unordered(PUSHES_AT_ONCE)
            .collect()
            .await;
        results.sort_by(|a, b| a.guest_id.cmp(&b.guest_id));
        report.installed = results.iter().filter(|r| r.error.is_none()).count();
        report.failed = results.len() - report.installed;
        report.guests = results;
        println!(
            "pushed {} version {version}: {} installed, {} failed",
            self.bundle, report.installed, report.failed
        );
        *self.last.lock().await = Some(report.clone());
        report
    }
}

/// The `kbs.plugin.v1` side.
struct Plugin(Arc<Pusher>);

fn json(status_code: i32, value: &impl Serialize) -> Result<Response<PluginResponse>, Status> {
    Ok(Response::new(PluginResponse {
        body: serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?,
        status_code,
        content_type: "application/json".into(),
    }))
}

#[tonic::async_trait]
impl KbsPlugin for Plugin {
    async fn handle(
        &self,
        request: Request<PluginRequest>,
    ) -> Result<Response<PluginResponse>, Status> {
        let r = request.into_inner();
        let path: Vec<&str> = r.path.iter().map(String::as_str).collect();
        match (r.method.as_str(), path.as_slice()) {
            ("POST", ["push"]) => {
                if r.body.is_empty() || r.body.len() > MAX_CREDENTIAL {
                    return json(
                        400,
                        &serde_json::json!({"error": format!("the credential must be 1..={MAX_CREDENTIAL} bytes")}),
                    );
                }
                let report = self.0.push(r.body).await;
                json(if report.error.is_some() { 502 } else { 200 }, &report)
            }
            ("GET", ["status"]) => match self.0.last.lock().await.clone() {
                Some(report) => json(200, &report),
                None => json(404, &serde_json::json!({"error": "nothing pushed yet"})),
            },
            _ => json(
                404,
                &serde_json::json!({"error": "POST push or GET status"}),
            ),
        }
    }

    async fn validate_auth(
        &self,
        _: Request<ValidateAuthRequest>,
    ) -> Result<Response<ValidateAuthResponse>, Status> {
        // Every route is an operator's.
        Ok(Response::new(ValidateAuthResponse {
            requires_admin_auth: true,
        }))
    }

    async fn needs_encryption(
        &self,
        _: Request<NeedsEncryptionRequest>,
    ) -> Result<Response<NeedsEncryptionResponse>, Status> {
        Ok(Response::new(NeedsEncryptionResponse {
            requires_payload_encryption: false,
        }))
    }
}

/// Push the file at `path` each time its contents change (checked every 200 ms).
async fn watch(pusher: Arc<Pusher>, path: PathBuf) {
    let mut last: Option<Vec<u8>> = None;
    loop {
        if let Ok(bytes) = tokio::fs::read(&path).await
            && !bytes.is_empty()
            && bytes.len() <= MAX_CREDENTIAL
            && last.as_ref() != Some(&bytes)
        {
            last = Some(bytes.clone());
            pusher.push(bytes).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading {}", args.token_file.display()))?;
    let guests = plugin_external::guests::client::connect(&args.kbs, &token)
        .map_err(|e| anyhow::anyhow!("--kbs: {e}"))?;
    let pusher = Arc::new(Pusher {
        guests,
        selector: args.selector,
        bundle: args.bundle,
        file_name: args.file_name,
        last_version: AtomicU64::new(0),
        last: Mutex::new(None),
    });
    if let Some(path) = args.watch {
        tokio::spawn(watch(pusher.clone(), path));
    }
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    Server::builder()
        .add_service(KbsPluginServer::new(Plugin(pusher)))
        .serve_with_incoming(TcpIncoming::from(listener))
        .await?;
    Ok(())
}
