//! The owner-facing API behind the mutual-TLS handshake. Every request is logged (method,
//! path, status, peer, client certificate fingerprint), never a secret's bytes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::watch;

use super::{BUNDLE_ID, GuestIdentity, SplitApiStatus};
use crate::store::{self, BundleInfo, HeldSecret, StateStore, StoreError};

/// The connection a request came on (added per connection by the accept loop).
#[derive(Clone, Debug)]
pub(super) struct Peer {
    pub addr: SocketAddr,
    /// First 8 bytes (hex) of the SHA-256 of the client's leaf certificate.
    pub client: String,
    /// Version of the credentials the handshake used.
    pub credentials_version: u64,
}

#[derive(Clone)]
pub(super) struct ApiState {
    pub store: Arc<StateStore>,
    pub identity: watch::Receiver<GuestIdentity>,
    pub status: watch::Receiver<SplitApiStatus>,
    pub max_secret_bytes: usize,
}

pub(super) fn router(state: ApiState) -> Router {
    let limit = DefaultBodyLimit::max(state.max_secret_bytes);
    Router::new()
        .route(
            "/splitapi/v1/status",
            get(status).fallback(method_not_allowed),
        )
        .route(
            "/splitapi/v1/secrets/{name}",
            put(put_secret).fallback(method_not_allowed).layer(limit),
        )
        .fallback(not_found)
        .with_state(state)
        .layer(middleware::from_fn(log_request))
}

/// JSON error body: `{"error": "<code>", "detail": "<message>"}`.
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: &'static str,
    detail: String,
}

pub(super) struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            detail: self.detail,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InvalidName { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_name", e.to_string())
            }
            other => {
                tracing::error!(error = %other, "splitapi storage failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "storage",
                    other.to_string(),
                )
            }
        }
    }
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed here", request.method()),
    )
}

async fn log_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let peer = request.extensions().get::<Peer>().cloned();
    let response = next.run(request).await;
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (addr, client, credentials) = peer.map_or((None, String::new(), 0), |p| {
        (Some(p.addr), p.client, p.credentials_version)
    });
    tracing::info!(
        %method,
        path,
        status = response.status().as_u16(),
        peer = ?addr,
        client,
        credentials,
        elapsed_ms,
        "splitapi request"
    );
    response
}

#[derive(Debug, Serialize)]
struct HeldEntry {
    uri: String,
    version: u64,
    applied_at: u64,
}

#[derive(Debug, Serialize)]
struct StatusBody {
    guest: GuestIdentity,
    credentials: Option<CredentialsStatus>,
    resources: Vec<HeldEntry>,
    secrets: Vec<HeldSecret>,
    /// Where the workload reads the secrets: `<secrets_dir>/<name>`.
    secrets_dir: PathBuf,
}

#[derive(Debug, Serialize)]
struct CredentialsStatus {
    #[serde(flatten)]
    held: BundleInfo,
    /// Version the endpoint's TLS currently uses (equal to `version` unless the held
    /// bundle could not be loaded).
    serving_version: Option<u64>,
    expired: bool,
}

async fn status(State(state): State<ApiState>) -> Result<Json<StatusBody>, ApiError> {
    let guest = state.identity.borrow().clone();
    let serving = state.status.borrow().bundle.as_ref().map(|b| b.version);
    let store = Arc::clone(&state.store);
    let body = tokio::task::spawn_blocking(move || {
        let now = unix_now();
        let credentials = store.bundle_info(BUNDLE_ID).map(|held| CredentialsStatus {
            expired: held.not_after <= now,
            held,
            serving_version: serving,
        });
        let resources = store
            .held()
            .into_iter()
            .filter(|r| !r.uri.starts_with(store::CREDENTIALS_URI_PREFIX))
            .map(|r| HeldEntry {
                uri: r.uri,
                version: r.version,
                applied_at: r.applied_at,
            })
            .collect();
        StatusBody {
            guest,
            credentials,
            resources,
            secrets: store.held_secrets(),
            secrets_dir: store.secrets_dir(),
        }
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(Json(body))
}

#[derive(Debug, Serialize)]
struct PutReply {
    name: String,
    version: u64,
    size: usize,
    sha256: String,
    /// The stable path the workload reads.
    path: PathBuf,
}

async fn put_secret(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    store::check_name("secret name", &name)?;
    let bytes = body.map_err(|rejection| {
        // Over the limit (or the client broke off): nothing is stored.
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("a secret may be at most {} bytes", state.max_secret_bytes),
            )
        } else {
            ApiError::new(rejection.status(), "bad_body", rejection.body_text())
        }
    })?;
    let size = bytes.len();
    let store = Arc::clone(&state.store);
    let secret_name = name.clone();
    let stored = tokio::task::spawn_blocking(move || store.store_secret(&secret_name, &bytes))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    tracing::info!(
        name,
        version = stored.version,
        size,
        "secret stored from the workload owner"
    );
    let status = if stored.version == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let reply = PutReply {
        name,
        version: stored.version,
        size,
        sha256: stored.sha256,
        path: stored.path,
    };
    Ok((status, [(header::CACHE_CONTROL, "no-store")], Json(reply)).into_response())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
