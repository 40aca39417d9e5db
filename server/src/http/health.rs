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

/// Readiness: storage answers and we are not draining. The body names the store's engine
/// (`"store": "postgres"`), so an operator sees at once which dependency is down; it never
/// carries the database URL.
pub async fn readyz(State(state): State<Readiness>) -> (StatusCode, Json<Value>) {
    let store = state.store.engine();
    if state.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining", "store": store})),
        );
    }
    match tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => (
            StatusCode::OK,
            Json(json!({"status": "ready", "store": store})),
        ),
        Ok(Err(e)) => {
            tracing::warn!(store, error = %e, "readiness: storage failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                // The error goes to the log only: /readyz answers anyone.
                Json(json!({"status": "storage unavailable", "store": store})),
            )
        }
        Err(_) => {
            tracing::warn!(store, "readiness: storage did not answer within 2s");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "storage timeout", "store": store})),
            )
        }
    }
}

/// What answers while `kbs` waits at start for a database it cannot reach yet
/// (`[storage] connect_wait_secs`): the process is alive (`/healthz` 200), not ready
/// (`/readyz` 503 `waiting for storage`), and every other request is refused with 503
/// `StorageUnavailable`, which a client retries.
pub fn starting_router(store: &'static str) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(move || async move {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"status": "waiting for storage", "store": store})),
                )
            }),
        )
        .fallback(|| async {
            kbs_web::error::ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "StorageUnavailable",
                "the KBS is starting and waits for its database; retry later",
            )
        })
}
