//! Admin token format (upstream-compatible: `iss`, `sub`, `aud: ["KBS"]`, `role`, `iat`, `exp`)
//! and Ed25519 key pairs in the PEM formats `openssl genpkey -algorithm ed25519` writes.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use zeroize::Zeroizing;

/// Errors with admin keys and tokens.
#[derive(Debug, thiserror::Error)]
pub enum AdminKeyError {
    /// The key file could not be read or written.
    ///
    /// The cause is part of the message and deliberately not `source()`, so a report that
    /// prints the chain (`{:#}`) names it once.
    #[error("admin key file {path}: {cause}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        cause: std::io::Error,
    },
    /// The PEM is not an Ed25519 PKCS#8 private key.
    #[error("admin key {0}: not an Ed25519 PKCS#8 private key PEM")]
    Format(String),
    /// Signing failed.
    #[error("signing admin token: {0}")]
    Sign(String),
}

/// What to put in an admin token.
#[derive(Clone, Debug)]
pub struct AdminTokenRequest {
    /// `sub`.
    pub subject: String,
    /// `role`.
    pub role: String,
    /// Lifetime from now.
    pub ttl: Duration,
    /// `iss`.
    pub issuer: String,
    /// Explicit `exp` (unix s), overriding `ttl` (tests use it for expired tokens).
    pub expires_at: Option<u64>,
}

impl AdminTokenRequest {
    /// A request with issuer `kbsctl`.
    pub fn new(subject: &str, role: &str, ttl: Duration) -> Self {
        Self {
            subject: subject.to_string(),
            role: role.to_string(),
            ttl,
            issuer: "kbsctl".to_string(),
            expires_at: None,
        }
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: [&'a str; 1],
    role: &'a str,
    iat: u64,
    exp: u64,
}

/// An Ed25519 admin key pair.
pub struct AdminKeyPair {
    signing: SigningKey,
}

impl AdminKeyPair {
    /// Generate a fresh key.
    pub fn generate() -> Self {
        Self {
            signing: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// Load a PKCS#8 PEM private key.
    pub fn from_pem(pem: &str, origin: &str) -> Result<Self, AdminKeyError> {
        let signing = SigningKey::from_pkcs8_pem(pem)
            .map_err(|_| AdminKeyError::Format(origin.to_string()))?;
        Ok(Self { signing })
    }

    /// Load from a file.
    pub fn load(path: &Path) -> Result<Self, AdminKeyError> {
        let pem =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|cause| AdminKeyError::Io {
                    path: path.display().to_string(),
                    cause,
                })?,
            );
        Self::from_pem(&pem, &path.display().to_string())
    }

    /// Load `path`, or generate and save it (0600) with its public key beside it (`.pub`).
    pub fn load_or_generate(path: &Path) -> Result<(Self, bool), AdminKeyError> {
        if path.exists() {
            return Ok((Self::load(path)?, false));
        }
        let kp = Self::generate();
        let io = |cause| AdminKeyError::Io {
            path: path.display().to_string(),
            cause,
        };
        crate::fsutil::write_private_atomic(path, kp.private_pem().as_bytes()).map_err(io)?;
        std::fs::write(path.with_extension("pub"), kp.public_pem()).map_err(io)?;
        Ok((kp, true))
    }

    /// PKCS#8 PEM of the private key.
    pub fn private_pem(&self) -> Zeroizing<String> {
        self.signing
            .to_pkcs8_pem(LineEnding::LF)
            .unwrap_or_else(|_| Zeroizing::new(String::new()))
    }

    /// SPKI PEM of the public key.
    pub fn public_pem(&self) -> String {
        self.signing
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap_or_default()
    }

    /// Sign an admin token.
    pub fn sign(&self, req: &AdminTokenRequest) -> Result<String, AdminKeyError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            iss: &req.issuer,
            sub: &req.subject,
            aud: ["KBS"],
            role: &req.role,
            iat: now,
            exp: req.expires_at.unwrap_or(now + req.ttl.as_secs()),
        };
        let der = self
            .signing
            .to_pkcs8_der()
            .map_err(|e| AdminKeyError::Sign(e.to_string()))?;
        let key = EncodingKey::from_ed_der(der.as_bytes());
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key)
            .map_err(|e| AdminKeyError::Sign(e.to_string()))
    }
}

impl std::fmt::Debug for AdminKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKeyPair([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_key_file_names_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.key");
        let err = AdminKeyPair::load(&path).unwrap_err();
        // The cause is in the message, and not also below it where `{:#}` would print it again.
        let reported = err.to_string();
        assert!(reported.contains("absent.key"), "{reported}");
        assert!(reported.contains("(os error 2)"), "{reported}");
        assert!(std::error::Error::source(&err).is_none());
    }
}
