//! Admin token format (upstream-compatible: `iss`, `sub`, `aud: ["KBS"]`, `role`, `iat`, `exp`)
//! and Ed25519 key pairs in the PEM formats `openssl genpkey -algorithm ed25519` writes.

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, KeypairBytes};
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

    /// Load `path`, or generate and save it (0600, never replacing a file another process
    /// created meanwhile) with its public key beside it (`.pub`, 0644).
    pub fn load_or_generate(path: &Path) -> Result<(Self, bool), AdminKeyError> {
        if path.exists() {
            return Ok((Self::load(path)?, false));
        }
        let kp = Self::generate();
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |cause| AdminKeyError::Io { path, cause }
        };
        match crate::fsutil::create_private(path, kp.private_pem().as_bytes()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Ok((Self::load(path)?, false));
            }
            Err(e) => return Err(io(path)(e)),
        }
        let public = path.with_extension("pub");
        crate::fsutil::write_private_atomic(&public, kp.public_pem().as_bytes())
            .and_then(|()| std::fs::set_permissions(&public, Permissions::from_mode(0o644)))
            .map_err(io(&public))?;
        Ok((kp, true))
    }

    /// PKCS#8 PEM of the private key: version 1 (RFC 5208, no public key), as `openssl
    /// genpkey -algorithm ed25519` writes it. OpenSSL 3.0 and Python's `cryptography` refuse
    /// the version 2 form (with the public key) that ed25519-dalek writes by default.
    pub fn private_pem(&self) -> Zeroizing<String> {
        KeypairBytes {
            secret_key: self.signing.to_bytes(),
            public_key: None,
        }
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// RFC 5208 version 1 of an Ed25519 key: `SEQUENCE { INTEGER 0, { OID 1.3.101.112 },
    /// OCTET STRING { OCTET STRING (32 bytes) } }`, 48 bytes, what `openssl genpkey` writes.
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];

    fn der_of(pem: &str) -> Vec<u8> {
        use base64::Engine as _;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    /// issue 17 defect 14: the generated admin key was PKCS#8 v2, which OpenSSL 3.0 refuses.
    #[test]
    fn private_keys_are_written_as_pkcs8_v1() {
        let kp = AdminKeyPair::generate();
        let pem = kp.private_pem();
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----\n"),
            "{}",
            &pem[..30]
        );
        let der = der_of(&pem);
        assert_eq!(der.len(), 48, "no public key inside");
        assert_eq!(der[..16], V1_PREFIX);
        let again = AdminKeyPair::from_pem(&pem, "test").unwrap();
        assert_eq!(again.public_pem(), kp.public_pem());
    }

    /// Keys written before (version 2, with the public key) still load.
    #[test]
    fn version_2_keys_still_load() {
        let kp = AdminKeyPair::generate();
        let v2 = kp.signing.to_pkcs8_pem(LineEnding::LF).unwrap();
        assert!(der_of(&v2).len() > 48, "ed25519-dalek writes version 2");
        let loaded = AdminKeyPair::from_pem(&v2, "v2").unwrap();
        assert_eq!(loaded.public_pem(), kp.public_pem());
    }

    #[test]
    fn generated_pair_is_private_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.key");
        let (kp, created) = AdminKeyPair::load_or_generate(&path).unwrap();
        assert!(created);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&path.with_extension("pub")), 0o644);
        let (again, created) = AdminKeyPair::load_or_generate(&path).unwrap();
        assert!(!created);
        assert_eq!(again.public_pem(), kp.public_pem());
    }

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
