//! An external KBS plugin written only from upstream Trustee's `protos/plugin.proto` and
//! `kbs/docs/ext_plugin.md` (no Tether type in it: its gRPC stubs are generated from the
//! unchanged upstream proto), run by the tests in its own process.
//!
//! - `POST /secret/<id>` (admin: `ValidateAuth` says so for every non-GET) stores the body;
//!   `GET /secret/<id>` (attested) returns it, and `NeedsEncryption` asks for a JWE.
//! - `GET /echo/...` returns `{"method","path","query","body"}` as JSON, not encrypted.
//! - `GET /status/<code>` answers `status_code` `<code>`; `GET /slow/<ms>` sleeps first;
//!   `GET /pid` answers this process's id. Anything else: `status_code` 404.
//!
//! `upstream_plugin [--listen 127.0.0.1:0] [--tls-cert cert.pem --tls-key key.pem]` prints
//! `listening on <addr>` once it accepts connections.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use plugin_external::proto::kbs_plugin_v1::kbs_plugin_server::{KbsPlugin, KbsPluginServer};
use plugin_external::proto::kbs_plugin_v1::{
    NeedsEncryptionRequest, NeedsEncryptionResponse, PluginRequest, PluginResponse,
    ValidateAuthRequest, ValidateAuthResponse,
};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct SecretStore {
    secrets: Mutex<HashMap<String, Vec<u8>>>,
}

fn reply(status_code: i32, body: impl Into<Vec<u8>>) -> Result<Response<PluginResponse>, Status> {
    Ok(Response::new(PluginResponse {
        body: body.into(),
        status_code,
        content_type: String::new(),
    }))
}

#[tonic::async_trait]
impl KbsPlugin for SecretStore {
    async fn handle(
        &self,
        request: Request<PluginRequest>,
    ) -> Result<Response<PluginResponse>, Status> {
        let r = request.into_inner();
        let path: Vec<&str> = r.path.iter().map(String::as_str).collect();
        match (r.method.as_str(), path.as_slice()) {
            ("POST", ["secret", id]) => {
                self.secrets
                    .lock()
                    .map_err(|_| Status::internal("lock"))?
                    .insert(id.to_string(), r.body);
                reply(200, "stored")
            }
            ("GET", ["secret", id]) => {
                let found = self
                    .secrets
                    .lock()
                    .map_err(|_| Status::internal("lock"))?
                    .get(*id)
                    .cloned();
                match found {
                    Some(secret) => reply(0, secret),
                    None => reply(404, "no such secret"),
                }
            }
            (_, ["echo", ..]) => {
                let mut query: Vec<_> = r.query.iter().collect();
                query.sort();
                let body = serde_json::json!({
                    "method": r.method,
                    "path": r.path,
                    "query": query.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                    "body": String::from_utf8_lossy(&r.body),
                });
                Ok(Response::new(PluginResponse {
                    body: body.to_string().into_bytes(),
                    status_code: 200,
                    content_type: "application/json".into(),
                }))
            }
            ("GET", ["status", code]) => reply(code.parse().unwrap_or(500), "as asked"),
            ("GET", ["slow", ms]) => {
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
                reply(200, "slow")
            }
            ("GET", ["pid"]) => reply(200, std::process::id().to_string()),
            _ => reply(404, "unknown path"),
        }
    }

    async fn validate_auth(
        &self,
        request: Request<ValidateAuthRequest>,
    ) -> Result<Response<ValidateAuthResponse>, Status> {
        // Provisioning (anything but GET) is for operators; retrieval for attested TEEs.
        let r = request.into_inner();
        Ok(Response::new(ValidateAuthResponse {
            requires_admin_auth: r.method != "GET",
        }))
    }

    async fn needs_encryption(
        &self,
        request: Request<NeedsEncryptionRequest>,
    ) -> Result<Response<NeedsEncryptionResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(NeedsEncryptionResponse {
            requires_payload_encryption: r.path.first().map(String::as_str) == Some("secret"),
        }))
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen = arg(&args, "--listen").unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let addr = listener.local_addr()?;
    let mut server = Server::builder();
    if let (Some(cert), Some(key)) = (arg(&args, "--tls-cert"), arg(&args, "--tls-key")) {
        let identity = Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?);
        server = server.tls_config(ServerTlsConfig::new().identity(identity))?;
    }
    println!("listening on {addr}");
    server
        .add_service(KbsPluginServer::new(SecretStore::default()))
        .serve_with_incoming(TcpIncoming::from(listener))
        .await?;
    Ok(())
}
