//! `/healthz` (process alive) and `/readyz` (storage answers).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use std::sync::Arc;

use kbs_core::storage::Store;
use tokio_util::sync::CancellationToken;

/// What readiness looks at: the store answers, and the KBS is not draining.
#[derive(Clone)]
pub struct Readiness {
    /// The store (pinged).
    pub store: Arc<dyn Store>,
    /// Cancelled when the KBS begins to shut down.
    pub shutdown: CancellationToken,
}

/// Liveness: the process answers.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: storage answers and we are not draining.
pub async fn readyz(State(state): State<Readiness>) -> (StatusCode, Json<Value>) {
    if state.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        );
    }
    match tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: storage failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "storage unavailable"})),
            )
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "storage timeout"})),
        ),
    }
}
