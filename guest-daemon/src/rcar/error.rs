//! What can go wrong talking to the KBS, and the KBS's own error body.

use std::fmt;
use std::time::Duration;

use kbs_types::ErrorInformation;
use reqwest::StatusCode;

use crate::evidence::EvidenceError;
use crate::resource_path::ResourcePath;
use crate::tee_key::UnsealError;
use crate::tls::TlsError;

/// Longest error detail kept for messages.
const MAX_ERROR_DETAIL_CHARS: usize = 512;

/// The KBS's JSON error body (`{"type", "detail"}`), or the raw text when it is not JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorBody {
    /// The `type` URI (e.g. `https://github.com/confidential-containers/kbs/errors/PolicyDeny`).
    pub error_type: Option<String>,
    /// The `detail`, or the (truncated) raw body.
    pub detail: String,
}

impl ErrorBody {
    pub(super) fn parse(body: &[u8]) -> Self {
        if let Ok(info) = serde_json::from_slice::<ErrorInformation>(body) {
            return Self {
                error_type: Some(info.error_type),
                detail: one_line(&info.detail),
            };
        }
        Self {
            error_type: None,
            detail: one_line(&String::from_utf8_lossy(body)),
        }
    }

    /// The last segment of the `type` URI (e.g. `PolicyDeny`).
    pub fn name(&self) -> Option<&str> {
        let t = self.error_type.as_deref()?;
        t.rsplit('/').next().filter(|s| !s.is_empty()).or(Some(t))
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name(), self.detail.is_empty()) {
            (Some(name), false) => write!(f, "{name}: {}", self.detail),
            (Some(name), true) => f.write_str(name),
            (None, false) => f.write_str(&self.detail),
            (None, true) => f.write_str("(empty body)"),
        }
    }
}

/// `s` on one line (control characters as spaces), cut to a readable length.
pub(super) fn one_line(s: &str) -> String {
    let mut out: String = s
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ERROR_DETAIL_CHARS)
        .collect();
    if s.trim().chars().count() > MAX_ERROR_DETAIL_CHARS {
        out.push_str("...");
    }
    out
}

/// Errors of the RCAR client. Messages name the request, the HTTP status and the KBS's detail.
#[derive(Debug, thiserror::Error)]
pub enum RcarError {
    /// The KBS URL is unusable.
    #[error("invalid KBS URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The CA file could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The init-data is not valid TOML.
    #[error("init-data is not valid TOML: {0}")]
    InitData(String),
    /// The HTTP client could not be built.
    #[error("build HTTP client: {0}")]
    Client(String),
    /// The request did not complete (connect, TLS, timeout, reset).
    #[error("{step}: {reason}")]
    Transport {
        /// The request, e.g. `POST /kbs/v0/auth`.
        step: String,
        /// The transport error and its causes.
        reason: String,
    },
    /// The KBS answered with an unexpected HTTP status.
    #[error("{step}: KBS answered HTTP {status}: {error}")]
    Status {
        /// The request.
        step: String,
        /// The HTTP status.
        status: StatusCode,
        /// The KBS's error body.
        error: ErrorBody,
    },
    /// The KBS has no such resource (HTTP 404).
    #[error("resource {path} not found at the KBS: {error}")]
    NotFound {
        /// The resource asked for.
        path: ResourcePath,
        /// The KBS's error body.
        error: ErrorBody,
    },
    /// The KBS kept answering 401 although the guest attested again.
    #[error(
        "resource {path}: KBS answered HTTP 401 {attempts} times (re-attested in between): {error}"
    )]
    Unauthorized {
        /// The resource asked for.
        path: ResourcePath,
        /// GETs made.
        attempts: u32,
        /// The KBS's last error body.
        error: ErrorBody,
    },
    /// A 200 reply that is not what the protocol says.
    #[error("{step}: malformed KBS reply: {reason}")]
    BadResponse {
        /// The request.
        step: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The KBS selected a hash algorithm this client does not know.
    #[error("KBS selected unsupported hash algorithm {0:?}")]
    HashAlgorithm(String),
    /// The runtime data could not be canonicalised.
    #[error("canonicalise runtime data: {0}")]
    Canonical(serde_json::Error),
    /// The evidence provider failed.
    #[error(transparent)]
    Evidence(#[from] EvidenceError),
    /// The evidence provider did not answer in time.
    #[error("collecting TEE evidence timed out after {0:?}")]
    EvidenceTimeout(Duration),
    /// The resource could not be opened with the TEE key.
    #[error("open resource {path}: {error}")]
    Unseal {
        /// The resource.
        path: ResourcePath,
        /// Why it did not open.
        error: UnsealError,
    },
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn error_body_parses_kbs_json_and_tolerates_text() {
        let body = ErrorBody::parse(
            br#"{"type":"https://github.com/confidential-containers/kbs/errors/PolicyDeny","detail":"denied\nby policy"}"#,
        );
        assert_eq!(body.name(), Some("PolicyDeny"));
        assert_eq!(body.to_string(), "PolicyDeny: denied by policy");
        let body = ErrorBody::parse(b"<html>bad gateway</html>");
        assert_eq!(body.to_string(), "<html>bad gateway</html>");
        assert_eq!(ErrorBody::parse(b"").to_string(), "(empty body)");
        let long = ErrorBody::parse("x".repeat(5000).as_bytes());
        assert!(long.detail.len() < 600);
    }
}
