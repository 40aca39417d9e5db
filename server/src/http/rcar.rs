//! `POST /kbs/v0/auth` and `POST /kbs/v0/attest`: the RCAR handshake.

use axum::Json;
use axum::extract::State;
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kbs_core::attest::RcarService;
use kbs_core::metrics::Metrics;
use kbs_web::error::ApiError;
use kbs_web::extract::{ApiJson, SESSION_COOKIE, session_cookie};

fn count(metrics: &Metrics, tee: &str, stage: &str, outcome: &str) {
    metrics
        .attestations
        .get_or_create(&vec![
            ("tee", tee.to_string()),
            ("stage", stage.to_string()),
            ("outcome", outcome.to_string()),
        ])
        .inc();
}

/// Request -> Challenge, with the session cookie.
pub async fn auth(
    State(rcar): State<Arc<RcarService>>,
    State(metrics): State<Arc<Metrics>>,
    ApiJson(req): ApiJson<kbs_types::Request>,
) -> Result<Response, ApiError> {
    let tee = req.tee.to_string();
    let reply = rcar
        .auth(req)
        .inspect_err(|e| count(&metrics, &tee, "auth", e.name()))?;
    count(&metrics, &tee, "auth", "ok");
    let cookie = session_cookie_header(&reply.session_id, reply.expires)?;
    let mut resp = (StatusCode::OK, Json(reply.challenge)).into_response();
    resp.headers_mut().insert(SET_COOKIE, cookie);
    Ok(resp)
}

/// `kbs-session-id=<value>` until `expires`, for the KBS's paths only.
fn session_cookie_header(value: &str, expires: SystemTime) -> Result<HeaderValue, ApiError> {
    let cookie = format!(
        "{SESSION_COOKIE}={value}; Expires={}; Path=/kbs; HttpOnly; SameSite=Strict",
        httpdate::fmt_http_date(expires)
    );
    HeaderValue::from_str(&cookie).map_err(|e| ApiError::internal("session cookie", e))
}

/// Attestation (with the cookie) -> `{"token": ...}`.
pub async fn attest(
    State(rcar): State<Arc<RcarService>>,
    State(metrics): State<Arc<Metrics>>,
    headers: HeaderMap,
    ApiJson(att): ApiJson<kbs_types::Attestation>,
) -> Result<Response, ApiError> {
    let session = session_cookie(&headers).ok_or_else(|| {
        ApiError::unauthorized(
            "SessionNotFound",
            "missing kbs-session-id cookie: call /kbs/v0/auth first",
        )
    })?;
    match rcar.attest(&session, att).await {
        Ok(attested) => {
            count(&metrics, &attested.verified.tee, "attest", "ok");
            tracing::info!(guest_id = %attested.verified.identity.guest_id, tee = %attested.verified.tee, "guest attested");
            // Background-check clients keep using the cookie: from now on it is the token.
            let expires = UNIX_EPOCH + Duration::from_secs(attested.verified.exp);
            let cookie = session_cookie_header(&attested.token, expires)?;
            let mut resp = Json(json!({"token": attested.token})).into_response();
            resp.headers_mut().insert(SET_COOKIE, cookie);
            Ok(resp)
        }
        Err(e) => {
            count(&metrics, "unknown", "attest", e.name());
            Err(e.into())
        }
    }
}
