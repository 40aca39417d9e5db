//! RCAR (Request, Challenge, Attestation, Response): sessions, evidence
//! verification and token issue, compatible with upstream `kbs_protocol` clients.
//!
//! Transport-free: the HTTP layer parses bodies and cookies and calls
//! [`RcarService::auth`], [`RcarService::attest`] and [`RcarService::session_token`].

mod binding;
mod cookie;
pub mod external;
mod sample;
mod tokens;
mod verifier;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kbs_types::{Attestation, Challenge, Request, Tee};
use rand::RngCore;
use serde_json::{Value, json};

pub use binding::{
    SELECTED_HASH_ALGORITHM, SUPPORTED_HASH_ALGORITHMS, derived_guest_id, hash_name,
};
pub use sample::SampleVerifier;
pub use tokens::{TokenVerifier, VerifyToken};
pub use verifier::{Verifier, VerifyError};

use crate::appraisal::{AppraisalError, Appraiser};
use crate::init_data::{self, InitDataClaims, InitDataError};
use crate::jwe::{self, JweError};
use crate::token::{self, EarAppraisal, TokenError, TokenSigner, VerifiedToken};
use binding::NegotiationError;
use cookie::{Challenge as SealedChallenge, CookieError, CookieSealer, is_challenge, unix_ms};

/// Nonce size in bytes before base64.
const NONCE_BYTES: usize = 32;
/// Default bound on one evidence verification (verifiers may call remote services).
const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// RCAR limits and lifetimes.
#[derive(Clone, Debug)]
pub struct RcarConfig {
    /// How long a challenge stays valid.
    pub session_ttl: Duration,
    /// Lifetime of issued tokens (and of the attested session cookie).
    pub token_ttl: Duration,
    /// Largest init-data body accepted.
    pub max_init_data_bytes: usize,
}

impl Default for RcarConfig {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(300),
            token_ttl: Duration::from_secs(300),
            max_init_data_bytes: 64 * 1024,
        }
    }
}

/// Errors of the RCAR handshake, each with its HTTP status and error name.
#[derive(Debug, thiserror::Error)]
pub enum RcarError {
    /// The client's protocol version is not 0.4.x.
    #[error("protocol version {0:?} is not supported (expected 0.4.x)")]
    InvalidRequestVersion(String),
    /// No verifier is configured for the requested TEE.
    #[error("TEE {0:?} is not supported by this KBS")]
    UnknownTee(String),
    /// The client offered no hash algorithm Tether uses.
    #[error(
        "no supported hash algorithm offered (offered: {0}; supported: sha384, sha256, sha512)"
    )]
    UnsupportedHashAlgorithm(String),
    /// The request is malformed in a way the JSON parser could not catch.
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    /// No such session (not a cookie this KBS sealed or signed).
    #[error("attestation session not found")]
    SessionNotFound,
    /// The session expired.
    #[error("attestation session expired")]
    SessionExpired,
    /// The runtime-data nonce is not the session's.
    #[error("runtime-data nonce does not match the session's challenge")]
    NonceMismatch,
    /// The session has not completed attestation.
    #[error("attestation session is not attested")]
    NotAttested,
    /// Init-data is malformed or has an invalid key.
    #[error("invalid init-data: {0}")]
    InvalidInitData(String),
    /// Init-data exceeds the configured limit.
    #[error("init-data is {size} bytes, the limit is {limit}")]
    InitDataTooLarge {
        /// Body size in bytes.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The TEE public key is not one resources can be sealed to.
    #[error("{0}")]
    UnsupportedTeePubKey(#[source] JweError),
    /// The verifier refused the evidence.
    #[error("evidence verification failed: {0}")]
    EvidenceVerificationFailed(#[source] VerifyError),
    /// The appraisal policy failed (not a refusal: a policy that cannot be evaluated).
    #[error(transparent)]
    Appraisal(#[from] AppraisalError),
    /// Token issue failed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// An internal step failed (serialisation).
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl RcarError {
    /// HTTP status this error maps to.
    pub fn status(&self) -> u16 {
        match self {
            RcarError::InvalidRequestVersion(_)
            | RcarError::UnknownTee(_)
            | RcarError::UnsupportedHashAlgorithm(_)
            | RcarError::InvalidRequest(_)
            | RcarError::InvalidInitData(_)
            | RcarError::UnsupportedTeePubKey(_) => 400,
            RcarError::SessionNotFound
            | RcarError::SessionExpired
            | RcarError::NonceMismatch
            | RcarError::NotAttested => 401,
            RcarError::EvidenceVerificationFailed(e) => e.status(),
            RcarError::InitDataTooLarge { .. } => 413,
            RcarError::Appraisal(e) => e.status(),
            RcarError::Token(e) => e.status(),
            RcarError::Internal(_) => 500,
        }
    }

    /// CamelCase error name for the JSON error type URL.
    pub fn name(&self) -> &'static str {
        match self {
            RcarError::InvalidRequestVersion(_) => "InvalidRequestVersion",
            RcarError::UnknownTee(_) => "UnknownTee",
            RcarError::UnsupportedHashAlgorithm(_) => "UnsupportedHashAlgorithm",
            RcarError::InvalidRequest(_) => "InvalidRequest",
            RcarError::SessionNotFound => "SessionNotFound",
            RcarError::SessionExpired => "SessionExpired",
            RcarError::NonceMismatch => "NonceMismatch",
            RcarError::NotAttested => "SessionNotAttested",
            RcarError::InvalidInitData(_) => "InvalidInitData",
            RcarError::InitDataTooLarge { .. } => "InitDataTooLarge",
            RcarError::UnsupportedTeePubKey(_) => "UnsupportedTeePubKey",
            RcarError::EvidenceVerificationFailed(e) => match e {
                VerifyError::Unavailable(_) => "VerifierUnavailable",
                _ => "EvidenceVerificationFailed",
            },
            RcarError::Appraisal(e) => e.name(),
            RcarError::Token(e) => e.name(),
            RcarError::Internal(_) => "Internal",
        }
    }
}

impl From<CookieError> for RcarError {
    fn from(e: CookieError) -> Self {
        match e {
            CookieError::NotFound => RcarError::SessionNotFound,
            CookieError::Expired => RcarError::SessionExpired,
        }
    }
}

impl From<InitDataError> for RcarError {
    fn from(err: InitDataError) -> Self {
        match err {
            InitDataError::TooLarge { size, limit } => RcarError::InitDataTooLarge { size, limit },
            InitDataError::Invalid(reason) => RcarError::InvalidInitData(reason),
        }
    }
}

/// Reply to `POST /kbs/v0/auth`.
#[derive(Clone, Debug)]
pub struct AuthReply {
    /// The `kbs-session-id` cookie value: the challenge, sealed.
    pub session_id: String,
    /// The challenge body.
    pub challenge: Challenge,
    /// When the challenge expires (cookie `Expires`).
    pub expires: SystemTime,
}

/// Reply to a successful `POST /kbs/v0/attest`.
#[derive(Clone, Debug)]
pub struct Attested {
    /// The signed attestation token (`{"token": ...}`); also the new `kbs-session-id`
    /// cookie value (background-check mode).
    pub token: String,
    /// The same token, unpacked.
    pub verified: VerifiedToken,
}

/// The RCAR handshake: issues challenges, verifies evidence, signs tokens. Holds no
/// per-session state: the session travels in its cookie (see [`cookie`]).
pub struct RcarService {
    config: RcarConfig,
    signer: Arc<TokenSigner>,
    tokens: TokenVerifier,
    verifiers: HashMap<Tee, Arc<dyn Verifier>>,
    appraiser: Arc<Appraiser>,
    cookies: CookieSealer,
    verify_timeout: Duration,
}

impl std::fmt::Debug for RcarService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcarService")
            .field("config", &self.config)
            .field("tees", &self.verifiers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl RcarService {
    /// Builds the service; one verifier per TEE (a later one for the same TEE wins).
    /// `cookie_key` seals challenge cookies: every replica that serves the same clients
    /// must use the same one.
    pub fn new(
        config: RcarConfig,
        signer: Arc<TokenSigner>,
        verifiers: Vec<Arc<dyn Verifier>>,
        cookie_key: &[u8; 32],
    ) -> Self {
        let verifiers = verifiers.into_iter().map(|v| (v.tee(), v)).collect();
        Self {
            config,
            tokens: TokenVerifier::new(signer.clone()),
            signer,
            verifiers,
            appraiser: Arc::default(),
            cookies: CookieSealer::new(cookie_key),
            verify_timeout: DEFAULT_VERIFY_TIMEOUT,
        }
    }

    /// Appraises evidence with `appraiser` (default: the built-in appraisal policy and no
    /// reference values).
    pub fn with_appraiser(mut self, appraiser: Arc<Appraiser>) -> Self {
        self.appraiser = appraiser;
        self
    }

    /// Also accepts passport tokens of these external attestation services.
    pub fn with_external_issuers(mut self, issuers: Vec<Arc<external::ExternalIssuer>>) -> Self {
        self.tokens = TokenVerifier::new(self.signer.clone()).with_issuers(issuers);
        self
    }

    /// The appraisal policy and reference values in force.
    pub fn appraiser(&self) -> &Arc<Appraiser> {
        &self.appraiser
    }

    /// Verifies Bearer tokens: this KBS's, then the trusted issuers'.
    pub fn tokens(&self) -> &TokenVerifier {
        &self.tokens
    }

    /// Overrides the bound on one evidence verification (default 30 s).
    pub fn with_verify_timeout(mut self, timeout: Duration) -> Self {
        self.verify_timeout = timeout;
        self
    }

    /// The TEEs this service has verifiers for.
    pub fn tees(&self) -> Vec<Tee> {
        self.verifiers.keys().copied().collect()
    }

    /// The configuration in force.
    pub fn config(&self) -> &RcarConfig {
        &self.config
    }

    /// `POST /kbs/v0/auth`: checks the request and answers a fresh nonce, sealed with the
    /// session's facts into the cookie.
    pub fn auth(&self, req: Request) -> Result<AuthReply, RcarError> {
        check_version(&req.version)?;
        if !self.verifiers.contains_key(&req.tee) {
            return Err(RcarError::UnknownTee(req.tee.as_ref().to_owned()));
        }
        let hash = binding::select_hash(&req.extra_params).map_err(|e| match e {
            NegotiationError::Malformed(reason) => RcarError::InvalidRequest(reason),
            NegotiationError::NoCommonAlgorithm(names) => {
                RcarError::UnsupportedHashAlgorithm(names)
            }
        })?;

        let mut raw = [0u8; NONCE_BYTES];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = STANDARD.encode(raw);
        let expires = SystemTime::now() + self.config.session_ttl;
        let sealed = SealedChallenge {
            tee: req.tee,
            nonce: nonce.clone(),
            hash,
            exp_ms: unix_ms(expires),
        };
        Ok(AuthReply {
            session_id: self.cookies.seal(&sealed),
            challenge: Challenge {
                nonce,
                extra_params: json!({ SELECTED_HASH_ALGORITHM: hash_name(hash) }),
            },
            expires,
        })
    }

    /// `POST /kbs/v0/attest`: verifies the evidence for the challenge in the session cookie
    /// and issues a token. An attested session's cookie (a token) is not a challenge: 401
    /// `SessionNotFound`, the client starts a new handshake.
    pub async fn attest(&self, session_id: &str, att: Attestation) -> Result<Attested, RcarError> {
        let challenge = self.cookies.open(session_id, unix_ms(SystemTime::now()))?;
        if att.runtime_data.nonce != challenge.nonce {
            return Err(RcarError::NonceMismatch);
        }
        let tee_pubkey = &att.runtime_data.tee_pubkey;
        jwe::validate_tee_pubkey(tee_pubkey).map_err(RcarError::UnsupportedTeePubKey)?;
        let init = att
            .init_data
            .as_ref()
            .map(|init| init_data::parse(init, self.config.max_init_data_bytes))
            .transpose()?;
        let verifier = self
            .verifiers
            .get(&challenge.tee)
            .ok_or_else(|| RcarError::UnknownTee(challenge.tee.as_ref().to_owned()))?;
        let report_data = binding::expected_report_data(
            challenge.hash,
            tee_pubkey,
            &challenge.nonce,
            &att.tee_evidence.additional_evidence,
        )
        .map_err(|_| RcarError::Internal("runtime data serialisation"))?;
        if !att.tee_evidence.additional_evidence.is_empty() {
            // No device verifiers yet: the string is bound by the digest but
            // contributes no claims.
            tracing::debug!(
                session_id,
                "additional evidence ignored (no device verifiers)"
            );
        }

        let verified = tokio::time::timeout(
            self.verify_timeout,
            verifier.verify(
                &att.tee_evidence.primary_evidence,
                &report_data,
                init.as_ref().map(|i| i.digest.as_slice()),
            ),
        )
        .await
        .unwrap_or_else(|_| Err(VerifyError::Unavailable("verification timed out".into())));
        let tee_claims = verified.map_err(RcarError::EvidenceVerificationFailed)?;
        let (token, verified) = self.issue(&challenge, &att, init.as_ref(), tee_claims)?;
        Ok(Attested { token, verified })
    }

    /// Appraises the verified claims and signs the token; a contraindicated appraisal is
    /// refused (`EvidenceVerificationFailed`, the detail says why).
    fn issue(
        &self,
        challenge: &SealedChallenge,
        att: &Attestation,
        init: Option<&InitDataClaims>,
        tee_claims: Value,
    ) -> Result<(String, VerifiedToken), RcarError> {
        let tee_pubkey = &att.runtime_data.tee_pubkey;
        let tee = challenge.tee.as_ref();
        let evidence =
            token::annotated_evidence(tee, tee_claims, tee_pubkey, &challenge.nonce, init);
        let appraisal = self.appraiser.appraise(&evidence)?;
        if appraisal.is_refused() {
            return Err(RcarError::EvidenceVerificationFailed(
                VerifyError::Rejected(format!(
                    "the appraisal policy rated the evidence {}",
                    appraisal.summary()
                )),
            ));
        }
        let mut identity = init.and_then(|i| i.identity.clone()).unwrap_or_default();
        if identity.guest_id.is_empty() {
            identity.guest_id = binding::derived_guest_id(tee_pubkey)
                .map_err(|_| RcarError::Internal("tee-pubkey serialisation"))?;
        }
        if appraisal.status != crate::appraisal::TrustTier::Affirming {
            tracing::info!(
                guest_id = %identity.guest_id,
                tee,
                status = appraisal.status.as_str(),
                reasons = %appraisal.reasons.join("; "),
                "evidence appraised"
            );
        }
        let ear = EarAppraisal {
            status: appraisal.status.as_str(),
            trust_vector: Some(appraisal.trust_vector_json()),
            policy_id: appraisal.policy_id,
        };
        let claims = token::ear_claims(tee, evidence, &ear, &identity);
        Ok(self.signer.issue_verified(claims, self.config.token_ttl)?)
    }

    /// The token of an attested session (background-check mode: the cookie is the token).
    /// A cookie still holding a challenge is 401 `SessionNotAttested`.
    pub fn session_token(&self, session_id: &str) -> Result<VerifiedToken, RcarError> {
        if is_challenge(session_id) {
            self.cookies.open(session_id, unix_ms(SystemTime::now()))?;
            return Err(RcarError::NotAttested);
        }
        self.signer.verify(session_id).map_err(session_error)
    }

    /// The token signer.
    pub fn signer(&self) -> &Arc<TokenSigner> {
        &self.signer
    }
}

/// A session cookie that is not a valid token of ours: expired, or not ours at all.
fn session_error(e: TokenError) -> RcarError {
    match e {
        TokenError::Expired => RcarError::SessionExpired,
        _ => RcarError::SessionNotFound,
    }
}

fn check_version(version: &str) -> Result<(), RcarError> {
    let truncated = || version.chars().take(32).collect::<String>();
    let parsed = semver::Version::parse(version)
        .map_err(|_| RcarError::InvalidRequestVersion(truncated()))?;
    if parsed.major == 0 && parsed.minor == 4 && parsed.pre.is_empty() {
        Ok(())
    } else {
        Err(RcarError::InvalidRequestVersion(truncated()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
