//! `POST /kbs/v0/auth` and `POST /kbs/v0/attest`: the RCAR handshake.

use axum::Json;
use axum::extract::State;
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiJson, SESSION_COOKIE, session_cookie};
use crate::app::AppState;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// Request -> Challenge, with the session cookie.
pub async fn auth(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<kbs_types::Request>,
) -> Result<Response, ApiError> {
    let tee = req.tee.to_string();
    let reply = state.rcar.auth(req).inspect_err(|e| {
        Metrics::inc(
            &state.metrics.attestations,
            &[("tee", &tee), ("stage", "auth"), ("outcome", e.name())],
        );
    })?;
    state
        .metrics
        .rcar_sessions
        .set(state.rcar.session_count() as i64);
    let cookie = format!(
        "{SESSION_COOKIE}={}; Expires={}; Path=/kbs; HttpOnly; SameSite=Strict",
        reply.session_id,
        httpdate::fmt_http_date(reply.expires)
    );
    let cookie =
        HeaderValue::from_str(&cookie).map_err(|e| ApiError::internal("session cookie", e))?;
    let mut resp = (StatusCode::OK, Json(reply.challenge)).into_response();
    resp.headers_mut().insert(SET_COOKIE, cookie);
    Ok(resp)
}

/// Attestation (with the cookie) -> `{"token": ...}`.
pub async fn attest(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(att): ApiJson<kbs_types::Attestation>,
) -> Result<Response, ApiError> {
    let session = session_cookie(&headers).ok_or_else(|| {
        ApiError::unauthorized(
            "SessionNotFound",
            "missing kbs-session-id cookie: call /kbs/v0/auth first",
        )
    })?;
    match state.rcar.attest(&session, att).await {
        Ok(attested) => {
            Metrics::inc(
                &state.metrics.attestations,
                &[
                    ("tee", &attested.verified.tee),
                    ("stage", "attest"),
                    ("outcome", "ok"),
                ],
            );
            tracing::info!(guest_id = %attested.verified.identity.guest_id, tee = %attested.verified.tee, "guest attested");
            Ok(Json(json!({"token": attested.token})).into_response())
        }
        Err(e) => {
            Metrics::inc(
                &state.metrics.attestations,
                &[
                    ("tee", "unknown"),
                    ("stage", "attest"),
                    ("outcome", e.name()),
                ],
            );
            Err(e.into())
        }
    }
}
