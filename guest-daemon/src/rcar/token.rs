//! The attestation token the client holds, and the claims it reads from a JWT without
//! verifying it (the KBS verifies; the client only needs `exp`).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroize;

/// An attestation token. `Debug` is redacted; zeroized on drop.
pub(super) struct Token {
    pub jwt: String,
    pub exp: Option<u64>,
}

impl Drop for Token {
    fn drop(&mut self) {
        self.jwt.zeroize();
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("jwt", &"[redacted]")
            .field("exp", &self.exp)
            .finish()
    }
}

/// The claims of a JWT, decoded without verifying the signature.
pub(super) fn jwt_claims(jwt: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut parts = jwt.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

/// `exp` of a JWT (seconds since the epoch), decoded without verifying the signature.
pub fn jwt_expiry(jwt: &str) -> Option<u64> {
    let exp = jwt_claims(jwt)?.get("exp")?.clone();
    exp.as_u64().or_else(|| {
        exp.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    })
}

impl Token {
    /// True while it has not expired (a token without `exp` never does).
    pub fn is_live(&self) -> bool {
        self.exp.is_none_or(|exp| exp > now_secs())
    }
}

/// The wall clock, in seconds since the epoch.
pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jwt(claims: serde_json::Value) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    #[test]
    fn jwt_expiry_is_read_without_verification() {
        assert_eq!(
            jwt_expiry(&jwt(json!({"exp": 1_700_000_000u64}))),
            Some(1_700_000_000)
        );
        assert_eq!(
            jwt_expiry(&jwt(json!({"exp": 1_700_000_000.5}))),
            Some(1_700_000_000)
        );
        assert_eq!(jwt_expiry(&jwt(json!({"iat": 1}))), None);
        assert_eq!(jwt_expiry(&jwt(json!({"exp": -5}))), None);
        assert_eq!(jwt_expiry(&jwt(json!({"exp": "soon"}))), None);
        assert_eq!(jwt_expiry("not a jwt"), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
        assert_eq!(jwt_expiry("a.b.c.d"), None);
        assert!(jwt_claims(&jwt(json!([1]))).is_none());
    }
}
