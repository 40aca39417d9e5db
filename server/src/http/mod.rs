//! HTTP handlers and the extractors they share. Handlers stay thin: parse, call the core,
//! map errors to [`ApiError`].

pub mod admin;
pub mod guests;
pub mod health;
pub mod rcar;
pub mod resource;
pub mod tunnel;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::admin::auth::AdminIdentity;
use crate::app::AppState;
use crate::error::ApiError;
use crate::token::VerifiedToken;

/// Name of the RCAR session cookie.
pub const SESSION_COOKIE: &str = "kbs-session-id";

/// A request body read within the configured size limit (413 past it).
pub struct ApiBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(req, state).await {
            Ok(b) => Ok(Self(b)),
            Err(rej) if rej.status().as_u16() == 413 => Err(ApiError::new(
                rej.status(),
                "PayloadTooLarge",
                "request body exceeds the configured limit (http.max_body_bytes)",
            )),
            Err(rej) => Err(ApiError::bad_request("MalformedRequest", rej.body_text())),
        }
    }
}

/// A JSON body, parsed whatever the content type says (upstream clients differ), with
/// size-limit and syntax errors mapped to the error JSON.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ApiBytes(body) = ApiBytes::from_request(req, state).await?;
        serde_json::from_slice(&body).map(Self).map_err(|e| {
            ApiError::bad_request("MalformedRequest", format!("invalid JSON body: {e}"))
        })
    }
}

/// An authenticated and authorised admin caller.
pub struct AdminCaller(pub AdminIdentity);

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        // Plugin routers are nested: authorise the path the client sent, not the stripped one.
        let path = crate::plugins::original_path(parts);
        // A dashboard session cookie counts as the admin it was opened by (role re-checked).
        let result =
            match crate::dashboard::session_caller(state, &parts.headers, &parts.method, &path) {
                Some(session) => session,
                None => state.admin.authorize(&parts.headers, &parts.method, &path),
            };
        if let Err(e) = &result {
            crate::metrics::Metrics::inc(
                &state.metrics.admin_actions,
                &[("action", "auth"), ("outcome", e.name)],
            );
        }
        result.map(Self)
    }
}

/// An attested caller: a Bearer attestation token (passport mode) or the RCAR session
/// cookie (background-check mode).
pub struct Attested(pub VerifiedToken);

impl FromRequestParts<AppState> for Attested {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(token) = crate::admin::auth::bearer(&parts.headers) {
            return Ok(Self(state.rcar.signer().verify(token)?));
        }
        if let Some(id) = session_cookie(&parts.headers) {
            return Ok(Self(state.rcar.session_token(&id)?));
        }
        Err(ApiError::unauthorized(
            "Unauthenticated",
            "attest first: send the kbs-session-id cookie or an `Authorization: Bearer <attestation token>`",
        ))
    }
}

/// The value of the `kbs-session-id` cookie, if present.
pub fn session_cookie(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.trim_matches('"').to_string())
}
