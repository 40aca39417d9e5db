//! One error type for the HTTP API: an honest status code and the Trustee error JSON body
//! `{"type": "https://github.com/confidential-containers/kbs/errors/<Name>", "detail": "..."}`.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kbs_core::policy_gate::Decision;
use serde::Serialize;

/// Prefix of the `type` field, as upstream Trustee writes it (clients match on it).
pub const ERROR_TYPE_PREFIX: &str = "https://github.com/confidential-containers/kbs/errors/";

/// An API error: status, a CamelCase name and a detail that names the problem (never a secret).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{name}: {detail}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// CamelCase error name, the last part of the `type` URL.
    pub name: &'static str,
    /// Human-readable detail.
    pub detail: String,
}

/// Marker put in response extensions so the metrics layer can count errors by name.
#[derive(Clone, Copy, Debug)]
pub struct ErrorName(pub &'static str);

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    error_type: String,
    detail: &'a str,
}

impl ApiError {
    /// Build an error.
    pub fn new(status: StatusCode, name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            name,
            detail: detail.into(),
        }
    }

    /// 400 with the given name.
    pub fn bad_request(name: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, name, detail)
    }

    /// 401 with the given name.
    pub fn unauthorized(name: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, name, detail)
    }

    /// 403 with the given name.
    pub fn forbidden(name: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, name, detail)
    }

    /// 404 with the given name.
    pub fn not_found(name: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, name, detail)
    }

    /// 500; the detail is logged, the client sees a generic message.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("{context}: internal error (see server log)"),
        )
    }

    /// Map a library error that knows its status and name.
    pub fn from_parts(status: u16, name: &'static str, detail: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::new(status, name, detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), error = self.name, detail = %self.detail, "request failed");
        } else {
            tracing::warn!(status = self.status.as_u16(), error = self.name, detail = %self.detail, "request refused");
        }
        let body = ErrorBody {
            error_type: format!("{ERROR_TYPE_PREFIX}{}", self.name),
            detail: &self.detail,
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        resp.extensions_mut().insert(ErrorName(self.name));
        resp
    }
}

/// Middleware: an error answer no handler wrote (axum's own `Path`, `Query` and `Json`
/// rejections are plain text) gets the JSON error body and its name, like every other error.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let plain_text = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if !(status.is_client_error() || status.is_server_error())
        || !plain_text
        || resp.extensions().get::<ErrorName>().is_some()
    {
        return resp;
    }
    if status.is_server_error() {
        return ApiError::internal("request", "a framework rejection was answered as 5xx")
            .into_response();
    }
    // The framework's rejection texts are short and name the problem, never a secret.
    let text = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let detail = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("bad request")
            .to_string()
    } else {
        text
    };
    let name = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "PayloadTooLarge"
    } else {
        "MalformedRequest"
    };
    ApiError::new(status, name, detail).into_response()
}

macro_rules! from_lib_error {
    ($($ty:path),* $(,)?) => {$(
        impl From<$ty> for ApiError {
            fn from(e: $ty) -> Self {
                ApiError::from_parts(e.status(), e.name(), e.to_string())
            }
        }
    )*};
}

from_lib_error!(
    kbs_core::attest::RcarError,
    kbs_core::token::TokenError,
    kbs_core::jwe::JweError,
    kbs_core::policy::PolicyError,
    kbs_core::appraisal::AppraisalError,
);

impl From<kbs_core::storage::StoreError> for ApiError {
    fn from(e: kbs_core::storage::StoreError) -> Self {
        match e {
            kbs_core::storage::StoreError::NotFound(what) => ApiError::not_found("NotFound", what),
            // The database is down or out of reach (a PostgreSQL server restarting, a network
            // cut): nothing is wrong with the request, so 503 and the client retries.
            other if other.is_unavailable() => {
                tracing::warn!(error = %other, "storage unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "StorageUnavailable",
                    "storage is unavailable; retry later",
                )
            }
            other => ApiError::internal("storage", other),
        }
    }
}

/// A policy decision as an HTTP outcome: a denial is 403 `PolicyDeny`.
pub fn require(decision: Decision) -> Result<(), ApiError> {
    match decision {
        Decision::Allow => Ok(()),
        Decision::Deny(what) => Err(ApiError::forbidden("PolicyDeny", what)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::extract::{Path, Query};
    use axum::routing::get;
    use std::collections::BTreeMap;
    use tower::ServiceExt;

    async fn answer(uri: &str) -> (StatusCode, String, Option<&'static str>, serde_json::Value) {
        let app = Router::new()
            .route(
                "/n/{id}",
                get(|Path(id): Path<i64>| async move { id.to_string() }),
            )
            .route(
                "/q",
                get(|Query(q): Query<BTreeMap<String, u32>>| async move { format!("{q:?}") }),
            )
            .layer(axum::middleware::from_fn(json_errors));
        let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let ct = resp.headers()[CONTENT_TYPE].to_str().unwrap().to_string();
        let name = resp.extensions().get::<ErrorName>().map(|n| n.0);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, ct, name, json)
    }

    #[tokio::test]
    async fn framework_rejections_get_the_json_error_body() {
        for uri in ["/n/abc", "/n/%FF", "/q?a=x"] {
            let (status, ct, name, body) = answer(uri).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            assert!(ct.starts_with("application/json"), "{uri}: {ct}");
            assert_eq!(name, Some("MalformedRequest"), "{uri}");
            assert_eq!(
                body["type"],
                format!("{ERROR_TYPE_PREFIX}MalformedRequest"),
                "{uri}"
            );
            assert!(!body["detail"].as_str().unwrap().is_empty(), "{uri}");
        }
        let (status, ct, name, _) = answer("/n/7").await;
        assert_eq!((status, name), (StatusCode::OK, None));
        assert!(
            ct.starts_with("text/plain"),
            "a plain-text success is left alone"
        );
    }
}
