//! One error type for the HTTP API: an honest status code and the Trustee error JSON body
//! `{"type": "https://github.com/confidential-containers/kbs/errors/<Name>", "detail": "..."}`.

use axum::http::StatusCode;
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
