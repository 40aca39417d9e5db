//! [`TokenVerifier`]: the one check every attested request goes through (Bearer tokens of
//! resource and plugin requests, tunnel upgrades and re-authentications): a token this KBS
//! signed, or one signed by a trusted external attestation service (passport mode).

use std::sync::Arc;

use crate::token::{TokenError, TokenSigner, VerifiedToken, unix_now};

use super::external::{ExternalIssuer, verify_external};

/// Verifies attestation tokens: this KBS's own first, then the trusted issuers'.
#[derive(Clone)]
pub struct TokenVerifier {
    signer: Arc<TokenSigner>,
    issuers: Arc<[Arc<ExternalIssuer>]>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("issuers", &self.issuers)
            .finish_non_exhaustive()
    }
}

/// Anything that verifies attestation tokens (the tunnel's re-authentication takes either).
pub trait VerifyToken {
    /// The verified, unpacked token, or why it is refused.
    fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError>;
}

impl VerifyToken for TokenSigner {
    fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        TokenSigner::verify(self, token)
    }
}

impl VerifyToken for TokenVerifier {
    fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        TokenVerifier::verify(self, token)
    }
}

impl TokenVerifier {
    /// Tokens of `signer` only.
    pub fn new(signer: Arc<TokenSigner>) -> Self {
        Self {
            signer,
            issuers: Arc::new([]),
        }
    }

    /// Also tokens of these external attestation services.
    pub fn with_issuers(mut self, issuers: Vec<Arc<ExternalIssuer>>) -> Self {
        self.issuers = issuers.into();
        self
    }

    /// The trusted external issuers.
    pub fn issuers(&self) -> &[Arc<ExternalIssuer>] {
        &self.issuers
    }

    /// The token unpacked, if this KBS signed it (ES256 under its key, unexpired) or a
    /// trusted issuer did; otherwise 401 `InvalidToken` (`TokenExpired`, `InvalidTokenClaims`).
    pub fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        match self.signer.verify(token) {
            Ok(verified) => Ok(verified),
            // Not signed by this KBS's key (another algorithm or key): maybe a passport
            // from a trusted attestation service.
            Err(TokenError::Invalid(
                "algorithm is not ES256" | "signature does not verify under this KBS's key",
            )) if !self.issuers.is_empty() => verify_external(&self.issuers, token, unix_now()),
            Err(e) => Err(e),
        }
    }
}
