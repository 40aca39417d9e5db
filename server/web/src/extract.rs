//! The extractors every handler shares: bodies within the size limit, JSON whatever the
//! content type, an authorised admin ([`AdminCaller`]) and an attested guest ([`Attested`]).
//! They are generic over the router state: any state that can hand out (`FromRef`) the
//! [`AdminGate`] or the [`RcarService`] works, a plugin's context included.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequest, FromRequestParts, OriginalUri, Request};
use axum::http::request::Parts;
use bytes::Bytes;
use kbs_core::attest::RcarService;
use kbs_core::token::VerifiedToken;
use serde::de::DeserializeOwned;

use crate::admin_auth::{AdminIdentity, ForwardedBy, bearer};
use crate::admin_gate::AdminGate;
use crate::error::ApiError;

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
            Err(rej) if timed_out(&rej) => Err(ApiError::new(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                "RequestTimeout",
                "the request body did not arrive within http.body_timeout",
            )),
            Err(rej) => Err(ApiError::bad_request("MalformedRequest", rej.body_text())),
        }
    }
}

/// Whether reading the body failed because its deadline passed (the listener's body
/// timeout yields an `io::Error` of kind `TimedOut`, somewhere down the error's sources).
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        current = e.source();
    }
    false
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

impl<S> FromRequestParts<S> for AdminCaller
where
    S: Send + Sync,
    Arc<AdminGate>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let gate = Arc::<AdminGate>::from_ref(state);
        // Plugin routers are nested: authorise the path the client sent, not the stripped one.
        let path = original_path(parts);
        let identity = gate.authorize(&parts.headers, &parts.method, &path)?;
        Ok(Self(match parts.extensions.get::<ForwardedBy>() {
            Some(ForwardedBy(replica)) => identity.forwarded_by(replica),
            None => identity,
        }))
    }
}

/// An attested caller: a Bearer attestation token (passport mode) or the RCAR session
/// cookie (background-check mode).
pub struct Attested(pub VerifiedToken);

impl<S> FromRequestParts<S> for Attested
where
    S: Send + Sync,
    Arc<RcarService>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let rcar = Arc::<RcarService>::from_ref(state);
        if let Some(token) = bearer(&parts.headers) {
            return Ok(Self(rcar.tokens().verify(token)?));
        }
        if let Some(id) = session_cookie(&parts.headers) {
            return Ok(Self(rcar.session_token(&id)?));
        }
        Err(ApiError::unauthorized(
            "Unauthenticated",
            "attest first: send the kbs-session-id cookie or an `Authorization: Bearer <attestation token>`",
        ))
    }
}

/// The request path as the client sent it (nested plugin routers see a stripped URI).
pub fn original_path(parts: &Parts) -> String {
    parts
        .extensions
        .get::<OriginalUri>()
        .map(|u| u.path().to_string())
        .unwrap_or_else(|| parts.uri.path().to_string())
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::body::Body;
    use axum::extract::Request;

    use super::*;

    /// A body whose reading failed on the listener's deadline is a 408 `RequestTimeout`;
    /// any other broken body stays a 400.
    #[tokio::test]
    async fn a_body_past_its_deadline_is_a_408() {
        let failing = |kind: std::io::ErrorKind| {
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from_static(b"part")),
                Err(std::io::Error::new(
                    kind,
                    "request body not received within 1s",
                )),
            ];
            let body = Body::from_stream(futures::stream::iter(chunks));
            Request::builder().body(body).unwrap()
        };
        let Err(e) = ApiBytes::from_request(failing(std::io::ErrorKind::TimedOut), &()).await
        else {
            panic!("read a broken body")
        };
        assert_eq!((e.status.as_u16(), e.name), (408, "RequestTimeout"));
        let Err(e) = ApiBytes::from_request(failing(std::io::ErrorKind::BrokenPipe), &()).await
        else {
            panic!("read a broken body")
        };
        assert_eq!(e.status.as_u16(), 400);
    }
}
