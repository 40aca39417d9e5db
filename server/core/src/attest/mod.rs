//! RCAR (Request, Challenge, Attestation, Response): sessions, evidence
//! verification and token issue, compatible with upstream `kbs_protocol` clients.
//!
//! Transport-free: the HTTP layer parses bodies and cookies and calls
//! [`RcarService::auth`], [`RcarService::attest`] and [`RcarService::session_token`].

mod binding;
mod sample;
mod session;
mod verifier;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kbs_types::{Attestation, Challenge, Request, Tee};
use rand::RngCore;
use serde_json::{Value, json};
use uuid::Uuid;

pub use binding::{
    SELECTED_HASH_ALGORITHM, SUPPORTED_HASH_ALGORITHMS, derived_guest_id, hash_name,
};
pub use sample::SampleVerifier;
pub use verifier::{Verifier, VerifyError};

use crate::init_data::{self, InitDataClaims, InitDataError};
use crate::jwe::{self, JweError};
use crate::token::{self, TokenError, TokenSigner, VerifiedToken};
use binding::NegotiationError;
use session::{Lookup, Session, SessionTable, State};

/// Nonce size in bytes before base64.
const NONCE_BYTES: usize = 32;
/// Default bound on one evidence verification (verifiers may call remote services).
const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// RCAR limits and lifetimes.
#[derive(Clone, Debug)]
pub struct RcarConfig {
    /// How long a challenge stays valid.
    pub session_ttl: Duration,
    /// Most sessions held at once; beyond it `auth` answers 429.
    pub max_sessions: usize,
    /// Lifetime of issued tokens (and of the attested session cookie).
    pub token_ttl: Duration,
    /// Largest init-data body accepted.
    pub max_init_data_bytes: usize,
}

impl Default for RcarConfig {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(300),
            max_sessions: 100_000,
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
    /// The session table is full.
    #[error("too many attestation sessions in progress, retry later")]
    TooManySessions,
    /// No such session (unknown or malformed id, or already purged).
    #[error("attestation session not found")]
    SessionNotFound,
    /// The session expired.
    #[error("attestation session expired")]
    SessionExpired,
    /// Evidence was already presented for this session's nonce.
    #[error("the session's nonce was already used; start a new handshake")]
    NonceReused,
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
            | RcarError::NonceReused
            | RcarError::NonceMismatch
            | RcarError::NotAttested => 401,
            RcarError::EvidenceVerificationFailed(e) => match e {
                VerifyError::Unavailable(_) => 500,
                _ => 401,
            },
            RcarError::InitDataTooLarge { .. } => 413,
            RcarError::TooManySessions => 429,
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
            RcarError::TooManySessions => "TooManySessions",
            RcarError::SessionNotFound => "SessionNotFound",
            RcarError::SessionExpired => "SessionExpired",
            RcarError::NonceReused => "NonceReused",
            RcarError::NonceMismatch => "NonceMismatch",
            RcarError::NotAttested => "SessionNotAttested",
            RcarError::InvalidInitData(_) => "InvalidInitData",
            RcarError::InitDataTooLarge { .. } => "InitDataTooLarge",
            RcarError::UnsupportedTeePubKey(_) => "UnsupportedTeePubKey",
            RcarError::EvidenceVerificationFailed(e) => match e {
                VerifyError::Unavailable(_) => "VerifierUnavailable",
                _ => "EvidenceVerificationFailed",
            },
            RcarError::Token(e) => e.name(),
            RcarError::Internal(_) => "Internal",
        }
    }
}

impl From<Lookup> for RcarError {
    fn from(lookup: Lookup) -> Self {
        match lookup {
            Lookup::NotFound => RcarError::SessionNotFound,
            Lookup::Expired => RcarError::SessionExpired,
            Lookup::Spent => RcarError::NonceReused,
            Lookup::NotAttested => RcarError::NotAttested,
            Lookup::Full => RcarError::TooManySessions,
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
    /// Session id for the `kbs-session-id` cookie (uuid v4).
    pub session_id: String,
    /// The challenge body.
    pub challenge: Challenge,
    /// When the challenge expires (cookie `Expires`).
    pub expires: SystemTime,
}

/// Reply to a successful `POST /kbs/v0/attest`.
#[derive(Clone, Debug)]
pub struct Attested {
    /// The signed attestation token (`{"token": ...}`).
    pub token: String,
    /// The same token, unpacked.
    pub verified: VerifiedToken,
}

/// The RCAR handshake: issues challenges, verifies evidence, signs tokens.
pub struct RcarService {
    config: RcarConfig,
    signer: Arc<TokenSigner>,
    verifiers: HashMap<Tee, Arc<dyn Verifier>>,
    sessions: SessionTable,
    verify_timeout: Duration,
}

impl std::fmt::Debug for RcarService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcarService")
            .field("config", &self.config)
            .field("tees", &self.verifiers.keys().collect::<Vec<_>>())
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl RcarService {
    /// Builds the service; one verifier per TEE (a later one for the same TEE wins).
    pub fn new(
        config: RcarConfig,
        signer: Arc<TokenSigner>,
        verifiers: Vec<Arc<dyn Verifier>>,
    ) -> Self {
        let verifiers = verifiers.into_iter().map(|v| (v.tee(), v)).collect();
        Self {
            sessions: SessionTable::new(config.max_sessions),
            config,
            signer,
            verifiers,
            verify_timeout: DEFAULT_VERIFY_TIMEOUT,
        }
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

    /// `POST /kbs/v0/auth`: checks the request and opens a session with a fresh nonce.
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
        let id = Uuid::new_v4();
        let now = Instant::now();
        let session = Session {
            tee: req.tee,
            nonce: nonce.clone(),
            hash,
            expires: now + self.config.session_ttl,
            state: State::Challenged,
        };
        self.sessions.insert(id, session, now)?;
        Ok(AuthReply {
            session_id: id.to_string(),
            challenge: Challenge {
                nonce,
                extra_params: json!({ SELECTED_HASH_ALGORITHM: hash_name(hash) }),
            },
            expires: SystemTime::now() + self.config.session_ttl,
        })
    }

    /// `POST /kbs/v0/attest`: verifies the evidence for a challenged session and issues a token.
    ///
    /// The nonce is spent once the request passes the cheap checks, so a
    /// failed verification requires a new handshake (as upstream clients do).
    pub async fn attest(&self, session_id: &str, att: Attestation) -> Result<Attested, RcarError> {
        let id = parse_session_id(session_id)?;
        let challenge = self.sessions.challenge(&id, Instant::now())?;
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

        self.sessions.begin_verification(&id, Instant::now())?;
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
        let tee_claims = match verified {
            Ok(claims) => claims,
            Err(err) => {
                self.sessions.finish(&id, None);
                return Err(RcarError::EvidenceVerificationFailed(err));
            }
        };

        let outcome = self.issue(&challenge, &att, init.as_ref(), tee_claims);
        match outcome {
            Ok((token, verified)) => {
                let verified = Arc::new(verified);
                let expires = Instant::now() + self.config.token_ttl;
                self.sessions.finish(&id, Some((verified.clone(), expires)));
                Ok(Attested {
                    token,
                    verified: Arc::unwrap_or_clone(verified),
                })
            }
            Err(err) => {
                self.sessions.finish(&id, None);
                Err(err)
            }
        }
    }

    fn issue(
        &self,
        challenge: &session::Challenge,
        att: &Attestation,
        init: Option<&InitDataClaims>,
        tee_claims: Value,
    ) -> Result<(String, VerifiedToken), RcarError> {
        let tee_pubkey = &att.runtime_data.tee_pubkey;
        let mut identity = init.and_then(|i| i.identity.clone()).unwrap_or_default();
        if identity.guest_id.is_empty() {
            identity.guest_id = binding::derived_guest_id(tee_pubkey)
                .map_err(|_| RcarError::Internal("tee-pubkey serialisation"))?;
        }
        let claims = token::build_claims(
            challenge.tee.as_ref(),
            tee_claims,
            tee_pubkey,
            &challenge.nonce,
            init,
            &identity,
        );
        Ok(self.signer.issue_verified(claims, self.config.token_ttl)?)
    }

    /// The token of an attested session (background-check mode: cookie only).
    pub fn session_token(&self, session_id: &str) -> Result<VerifiedToken, RcarError> {
        let id = parse_session_id(session_id)?;
        let token = self.sessions.token(&id, Instant::now())?;
        Ok(VerifiedToken::clone(&token))
    }

    /// Drops expired sessions; returns how many.
    pub fn purge_expired(&self) -> usize {
        self.sessions.purge_expired(Instant::now())
    }

    /// Sessions currently held.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The token signer.
    pub fn signer(&self) -> &Arc<TokenSigner> {
        &self.signer
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

fn parse_session_id(session_id: &str) -> Result<Uuid, RcarError> {
    Uuid::try_parse(session_id).map_err(|_| RcarError::SessionNotFound)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
