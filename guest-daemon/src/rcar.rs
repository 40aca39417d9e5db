//! The RCAR client (Request, Challenge, Attestation, Response): attests to the
//! KBS and fetches resources, wire compatible with upstream guest-components'
//! `kbs_protocol` client.
//!
//! Background-check mode keeps the KBS session in a cookie store; passport
//! mode presents the attestation token as a bearer credential instead.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kbs_types::{
    Attestation, Challenge, CompositeEvidence, ErrorInformation, HashAlgorithm, InitData, Request,
    Response, RuntimeData, Tee,
};
use reqwest::StatusCode;
use serde_json::json;
use zeroize::{Zeroize, Zeroizing};

use crate::evidence::{EvidenceError, EvidenceProvider};
use crate::resource_path::ResourcePath;
use crate::tee_key::{TeeKeyPair, UnsealError};
use crate::tls::{CaBundle, TlsError};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod mock_kbs_tests;

/// KBS protocol version sent in the RCAR `Request`.
pub const KBS_PROTOCOL_VERSION: &str = "0.4.0";
/// Most GETs of one resource, re-attesting between them on 401 (upstream's
/// `KBS_GET_RESOURCE_MAX_ATTEMPT`).
pub const GET_RESOURCE_MAX_ATTEMPTS: u32 = 3;
/// Hash used for the runtime-data digest when the KBS does not pick one.
pub const DEFAULT_HASH_ALGORITHM: HashAlgorithm = HashAlgorithm::Sha384;

const KBS_PREFIX: &str = "kbs/v0";
const SUPPORTED_HASH_ALGORITHMS_KEY: &str = "supported-hash-algorithms";
const SELECTED_HASH_ALGORITHM_KEY: &str = "selected-hash-algorithm";
const INIT_DATA_FORMAT: &str = "toml";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const EVIDENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// The KBS keeps idle connections 5 s (as upstream notes): drop ours sooner
/// so a request never lands on a connection the server is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Largest challenge or token reply read.
const MAX_HANDSHAKE_BODY: usize = 1024 * 1024;
/// Largest sealed resource read.
const MAX_RESOURCE_BODY: usize = 32 * 1024 * 1024;
/// Largest error body read; the rest is dropped.
const MAX_ERROR_BODY: usize = 16 * 1024;
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
    fn parse(body: &[u8]) -> Self {
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

fn one_line(s: &str) -> String {
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

/// An attestation token. `Debug` is redacted; zeroized on drop.
struct Token {
    jwt: String,
    exp: Option<u64>,
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
fn jwt_claims(jwt: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
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

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The RCAR `Request`: protocol version, TEE, and the hash algorithms we can use.
pub fn build_request(tee: Tee) -> Request {
    Request {
        version: KBS_PROTOCOL_VERSION.to_owned(),
        tee,
        extra_params: json!({ SUPPORTED_HASH_ALGORITHMS_KEY: HashAlgorithm::list_all() }),
    }
}

/// The hash the KBS picked in the `Challenge` (`selected-hash-algorithm`), SHA-384 if absent.
pub fn select_hash_algorithm(extra_params: &serde_json::Value) -> Result<HashAlgorithm, RcarError> {
    match extra_params.get(SELECTED_HASH_ALGORITHM_KEY) {
        None => Ok(DEFAULT_HASH_ALGORITHM),
        Some(serde_json::Value::String(name)) => name
            .to_lowercase()
            .parse()
            .map_err(|_| RcarError::HashAlgorithm(name.clone())),
        Some(other) => Err(RcarError::HashAlgorithm(other.to_string())),
    }
}

/// The report data bound into the evidence: the hash of the JCS-canonical JSON
/// of `{"tee-pubkey", "nonce", "additional-evidence"}`.
pub fn runtime_data_digest(
    runtime_data: &RuntimeData,
    additional_evidence: &str,
    hash: HashAlgorithm,
) -> Result<Vec<u8>, RcarError> {
    let value = json!({
        "tee-pubkey": runtime_data.tee_pubkey,
        "nonce": runtime_data.nonce,
        "additional-evidence": additional_evidence,
    });
    let canonical = serde_json_canonicalizer::to_vec(&value).map_err(RcarError::Canonical)?;
    Ok(hash.digest(&canonical))
}

/// Read a body of at most `limit` bytes.
async fn read_body(resp: &mut reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    if let Some(len) = resp.content_length().filter(|len| *len > limit as u64) {
        return Err(format!(
            "body of {len} bytes exceeds the {limit}-byte limit"
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if body.len() + chunk.len() > limit {
            return Err(format!("body exceeds the {limit}-byte limit"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The error body of a non-200 reply; a body that cannot be read is reported as such.
async fn read_error_body(resp: &mut reqwest::Response) -> ErrorBody {
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_ERROR_BODY.saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if body.len() >= MAX_ERROR_BODY {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                return ErrorBody {
                    error_type: None,
                    detail: format!("(error body unreadable: {})", error_chain(&e)),
                };
            }
        }
    }
    ErrorBody::parse(&body)
}

/// A reqwest error and its causes on one line ("timed out" spelled out).
fn error_chain(e: &reqwest::Error) -> String {
    let mut msg = if e.is_timeout() {
        format!("timed out (connect {CONNECT_TIMEOUT:?}, request {REQUEST_TIMEOUT:?}): {e}")
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    msg
}

/// Settings for a [`KbsClient`].
pub struct KbsClientBuilder {
    /// Base URL of the KBS (`http://` or `https://`, without `/kbs/v0`).
    pub kbs_url: String,
    /// PEM file of extra root certificates for an `https` KBS.
    pub ca_file: Option<PathBuf>,
    /// Init-data TOML text, sent with the attestation as `{"format": "toml", "body": ...}`.
    pub init_data: Option<String>,
    /// The TEE key; a fresh EC P-256 key when `None`.
    pub key: Option<TeeKeyPair>,
    /// Where the evidence comes from.
    pub evidence: Box<dyn EvidenceProvider>,
}

impl KbsClientBuilder {
    /// A builder with no CA file, no init-data and a fresh EC key.
    pub fn new(kbs_url: impl Into<String>, evidence: Box<dyn EvidenceProvider>) -> Self {
        Self {
            kbs_url: kbs_url.into(),
            ca_file: None,
            init_data: None,
            key: None,
            evidence,
        }
    }

    /// Trust the roots in this PEM file too.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Send this init-data TOML with each attestation.
    pub fn init_data(mut self, toml: impl Into<String>) -> Self {
        self.init_data = Some(toml.into());
        self
    }

    /// Use this TEE key instead of a fresh one.
    pub fn key(mut self, key: TeeKeyPair) -> Self {
        self.key = Some(key);
        self
    }

    /// Validate the settings and build the client.
    pub fn build(self) -> Result<KbsClient, RcarError> {
        let base = normalise_base_url(&self.kbs_url)?;
        if let Some(init_data) = &self.init_data {
            toml::from_str::<toml::Table>(init_data)
                .map_err(|e| RcarError::InitData(toml_error(init_data, &e)))?;
        }
        let ca = self
            .ca_file
            .as_deref()
            .map(CaBundle::from_pem_file)
            .transpose()?;
        let http_client = |cookies: bool| -> Result<reqwest::Client, RcarError> {
            let mut builder = reqwest::Client::builder()
                .cookie_store(cookies)
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(REQUEST_TIMEOUT)
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .user_agent(concat!("tether-guest-daemon/", env!("CARGO_PKG_VERSION")));
            if let Some(ca) = &ca {
                builder = ca.add_to_reqwest(builder)?;
            }
            builder
                .build()
                .map_err(|e| RcarError::Client(error_chain(&e)))
        };
        let key = self.key.unwrap_or_else(TeeKeyPair::new_ec);
        Ok(KbsClient {
            http: http_client(true)?,
            passport_http: http_client(false)?,
            base,
            key,
            evidence: self.evidence,
            init_data: self.init_data,
            token: None,
        })
    }
}

/// A TOML error on one line: "line L, column C: message".
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(at) = e.span().map(|span| span.start.min(text.len())) else {
        return one_line(e.message());
    };
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {}", one_line(e.message()))
}

fn normalise_base_url(url: &str) -> Result<String, RcarError> {
    let invalid = |reason| RcarError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let parsed = reqwest::Url::parse(url).map_err(|_| invalid("not an absolute URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("scheme must be http or https"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid("must not have a query or fragment"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid("must not carry credentials"));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

/// A client of one KBS for one TEE key: RCAR attestation and resource fetches.
pub struct KbsClient {
    base: String,
    http: reqwest::Client,
    passport_http: reqwest::Client,
    key: TeeKeyPair,
    evidence: Box<dyn EvidenceProvider>,
    init_data: Option<String>,
    token: Option<Token>,
}

impl fmt::Debug for KbsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KbsClient")
            .field("kbs_url", &self.base)
            .field("tee", &self.evidence.tee())
            .field("key", &self.key)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl KbsClient {
    /// The token of the last successful attestation.
    pub fn token(&self) -> Option<&str> {
        self.token.as_ref().map(|t| t.jwt.as_str())
    }

    /// `exp` of the current token (seconds since the epoch), read without verifying it.
    pub fn token_expiry(&self) -> Option<u64> {
        self.token.as_ref().and_then(|t| t.exp)
    }

    /// The TEE key bound into the attestations.
    pub fn tee_key(&self) -> &TeeKeyPair {
        &self.key
    }

    /// The KBS base URL, without a trailing slash.
    pub fn kbs_url(&self) -> &str {
        &self.base
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}/{KBS_PREFIX}/{path}", self.base)
    }

    /// Run the RCAR handshake; on success the session cookie is stored and the token returned.
    pub async fn attest(&mut self) -> Result<String, RcarError> {
        let tee = self.evidence.tee();

        // Request -> Challenge.
        let step = format!("POST /{KBS_PREFIX}/auth");
        let challenge: Challenge = self
            .post_json(&step, &self.endpoint("auth"), &build_request(tee))
            .await?;
        let hash = select_hash_algorithm(&challenge.extra_params)?;
        tracing::debug!(%tee, hash = %hash, "KBS challenge received");

        // Bind the nonce and our key into the evidence. No device attesters:
        // additional evidence is empty, as upstream's without devices.
        let runtime_data = RuntimeData {
            nonce: challenge.nonce,
            tee_pubkey: self.key.export_pubkey(),
        };
        let additional_evidence = String::new();
        let report_data = runtime_data_digest(&runtime_data, &additional_evidence, hash)?;
        let primary_evidence = tokio::time::timeout(
            EVIDENCE_TIMEOUT,
            self.evidence.primary_evidence(report_data),
        )
        .await
        .map_err(|_| RcarError::EvidenceTimeout(EVIDENCE_TIMEOUT))??;

        // Attestation -> token.
        let attestation = Attestation {
            init_data: self.init_data.as_ref().map(|body| InitData {
                format: INIT_DATA_FORMAT.to_owned(),
                body: body.clone(),
            }),
            runtime_data,
            tee_evidence: CompositeEvidence {
                primary_evidence,
                additional_evidence,
            },
        };
        let step = format!("POST /{KBS_PREFIX}/attest");
        let reply: TokenReply = self
            .post_json(&step, &self.endpoint("attest"), &attestation)
            .await?;
        let jwt = reply.token;
        if jwt_claims(&jwt).is_none() {
            return Err(RcarError::BadResponse {
                step,
                reason: "token is not a JWT with a JSON claims object".into(),
            });
        }
        let exp = jwt_expiry(&jwt);
        tracing::info!(%tee, exp, "attested to the KBS");
        self.token = Some(Token {
            jwt: jwt.clone(),
            exp,
        });
        Ok(jwt)
    }

    async fn post_json<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        step: &str,
        url: &str,
        body: &B,
    ) -> Result<R, RcarError> {
        let mut resp = self
            .http
            .post(url)
            .json(body)
            .send()
            .await
            .map_err(|e| transport(step, &e))?;
        if resp.status() != StatusCode::OK {
            return Err(RcarError::Status {
                step: step.to_owned(),
                status: resp.status(),
                error: read_error_body(&mut resp).await,
            });
        }
        let bytes = read_body(&mut resp, MAX_HANDSHAKE_BODY)
            .await
            .map_err(|reason| bad_response(step, reason))?;
        serde_json::from_slice(&bytes).map_err(|e| bad_response(step, e.to_string()))
    }

    /// Fetch and open a resource with the session cookie, attesting first when
    /// there is no live token and again (up to [`GET_RESOURCE_MAX_ATTEMPTS`]
    /// GETs in all) when the KBS answers 401.
    pub async fn get_resource(
        &mut self,
        path: &ResourcePath,
    ) -> Result<Zeroizing<Vec<u8>>, RcarError> {
        let live = self
            .token
            .as_ref()
            .is_some_and(|t| t.exp.is_none_or(|exp| exp > now_secs()));
        if !live {
            self.attest().await?;
        }
        let url = self.endpoint(&format!("resource/{path}"));
        let step = format!("GET /{KBS_PREFIX}/resource/{path}");
        let mut attempt = 1;
        loop {
            tracing::debug!(%path, attempt, "requesting resource");
            let resp = self
                .http
                .get(&url)
                .send()
                .await
                .map_err(|e| transport(&step, &e))?;
            match self.resource_reply(&step, path, resp).await {
                Err(RcarError::Status {
                    status: StatusCode::UNAUTHORIZED,
                    error,
                    ..
                }) => {
                    if attempt >= GET_RESOURCE_MAX_ATTEMPTS {
                        return Err(RcarError::Unauthorized {
                            path: path.clone(),
                            attempts: attempt,
                            error,
                        });
                    }
                    tracing::warn!(%path, attempt, %error, "KBS answered 401: attesting again");
                    self.attest().await?;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// GET `/kbs/v0/<path>` (a client-request plugin such as `splitapi/credentials`) with
    /// the session cookie and return the 200 body (at most 32 MiB). Attests first when
    /// there is no live token, and once more when the KBS answers 401; any other status is
    /// [`RcarError::Status`] with the KBS's error body.
    pub async fn get_attested(&mut self, path: &str) -> Result<Vec<u8>, RcarError> {
        self.call_attested(reqwest::Method::GET, path, None).await
    }

    /// `POST /kbs/v0/<path>` with `body` (`content_type`) in this client's attested session
    /// (attesting first when there is no live token, and once more after a 401); the
    /// reply's body on 200. The POST twin of [`get_attested`](Self::get_attested).
    pub async fn post_attested(
        &mut self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, RcarError> {
        self.call_attested(reqwest::Method::POST, path, Some((content_type, body)))
            .await
    }

    async fn call_attested(
        &mut self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Vec<u8>, RcarError> {
        let live = self
            .token
            .as_ref()
            .is_some_and(|t| t.exp.is_none_or(|exp| exp > now_secs()));
        if !live {
            self.attest().await?;
        }
        let path = path.trim_start_matches('/');
        let url = self.endpoint(path);
        let step = format!("{method} /{KBS_PREFIX}/{path}");
        let mut attempt = 1;
        loop {
            let mut request = self.http.request(method.clone(), &url);
            if let Some((content_type, body)) = &body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, *content_type)
                    .body(body.clone());
            }
            let mut resp = request.send().await.map_err(|e| transport(&step, &e))?;
            let status = resp.status();
            if status == StatusCode::OK {
                return read_body(&mut resp, MAX_RESOURCE_BODY)
                    .await
                    .map_err(|reason| bad_response(&step, reason));
            }
            let error = read_error_body(&mut resp).await;
            if status == StatusCode::UNAUTHORIZED && attempt < 2 {
                tracing::warn!(%step, %error, "KBS answered 401: attesting again");
                self.attest().await?;
                attempt += 1;
                continue;
            }
            return Err(RcarError::Status {
                step,
                status,
                error,
            });
        }
    }

    /// Fetch and open a resource in passport mode: `Authorization: Bearer
    /// <token>`, no cookie, no retry. The token must bind this client's TEE key.
    pub async fn get_resource_with_token(
        &self,
        token: &str,
        path: &ResourcePath,
    ) -> Result<Zeroizing<Vec<u8>>, RcarError> {
        let url = self.endpoint(&format!("resource/{path}"));
        let step = format!("GET /{KBS_PREFIX}/resource/{path}");
        let resp = self
            .passport_http
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| transport(&step, &e))?;
        match self.resource_reply(&step, path, resp).await {
            Err(RcarError::Status {
                status: StatusCode::UNAUTHORIZED,
                error,
                ..
            }) => Err(RcarError::Unauthorized {
                path: path.clone(),
                attempts: 1,
                error,
            }),
            other => other,
        }
    }

    /// Turn a resource reply into plaintext or the error its status says.
    async fn resource_reply(
        &self,
        step: &str,
        path: &ResourcePath,
        mut resp: reqwest::Response,
    ) -> Result<Zeroizing<Vec<u8>>, RcarError> {
        match resp.status() {
            StatusCode::OK => {
                let body = read_body(&mut resp, MAX_RESOURCE_BODY)
                    .await
                    .map_err(|reason| bad_response(step, reason))?;
                let jwe: Response = serde_json::from_slice(&body)
                    .map_err(|e| bad_response(step, format!("not a JWE: {e}")))?;
                self.key.open(&jwe).map_err(|error| RcarError::Unseal {
                    path: path.clone(),
                    error,
                })
            }
            StatusCode::NOT_FOUND => Err(RcarError::NotFound {
                path: path.clone(),
                error: read_error_body(&mut resp).await,
            }),
            status => Err(RcarError::Status {
                step: step.to_owned(),
                status,
                error: read_error_body(&mut resp).await,
            }),
        }
    }
}

#[derive(serde::Deserialize)]
struct TokenReply {
    token: String,
}

fn transport(step: &str, e: &reqwest::Error) -> RcarError {
    RcarError::Transport {
        step: step.to_owned(),
        reason: error_chain(e),
    }
}

fn bad_response(step: &str, reason: String) -> RcarError {
    RcarError::BadResponse {
        step: step.to_owned(),
        reason,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::evidence::SampleAttester;
    use kbs_types::TeePubKey;
    use sha2::{Digest, Sha256, Sha384};

    fn fixed_runtime_data() -> RuntimeData {
        RuntimeData {
            nonce: "bm9uY2U=".into(),
            tee_pubkey: TeePubKey::EC {
                crv: "P-256".into(),
                alg: "ECDH-ES+A256KW".into(),
                x: "WA".into(),
                y: "WQ".into(),
            },
        }
    }

    /// The canonical form written out by hand: keys sorted by UTF-16 code
    /// units at every level, no whitespace.
    const CANONICAL: &str = r#"{"additional-evidence":"","nonce":"bm9uY2U=","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"WA","y":"WQ"}}"#;

    #[test]
    fn runtime_data_digest_matches_hand_computed_value() {
        let rd = fixed_runtime_data();
        let digest = runtime_data_digest(&rd, "", HashAlgorithm::Sha384).unwrap();
        assert_eq!(digest, Sha384::digest(CANONICAL.as_bytes()).to_vec());
        // The same value, computed outside Rust (Python hashlib.sha384 of CANONICAL).
        assert_eq!(
            hex::encode(&digest),
            "5e0b540e0f66af8eb96e249ff864c37e0b42c86c00cae6bd\
             4f4b0ab3b5b8b343a6fe0d59699f8526e937038b22d91a5a"
        );
        let digest = runtime_data_digest(&rd, "", HashAlgorithm::Sha256).unwrap();
        assert_eq!(digest, Sha256::digest(CANONICAL.as_bytes()).to_vec());
    }

    #[test]
    fn runtime_data_digest_of_rsa_key() {
        let rd = RuntimeData {
            nonce: "n".into(),
            tee_pubkey: TeePubKey::RSA {
                alg: "RSA-OAEP-256".into(),
                k_mod: "AQ".into(),
                k_exp: "AQAB".into(),
            },
        };
        let expected = r#"{"additional-evidence":"","nonce":"n","tee-pubkey":{"alg":"RSA-OAEP-256","e":"AQAB","kty":"RSA","n":"AQ"}}"#;
        assert_eq!(
            runtime_data_digest(&rd, "", HashAlgorithm::Sha384).unwrap(),
            Sha384::digest(expected.as_bytes()).to_vec()
        );
    }

    #[test]
    fn request_carries_version_tee_and_hash_list() {
        let req = serde_json::to_value(build_request(Tee::Sample)).unwrap();
        assert_eq!(
            req,
            json!({
                "version": "0.4.0",
                "tee": "sample",
                "extra-params": {"supported-hash-algorithms": ["sha256", "sha384", "sha512", "sm3"]},
            })
        );
    }

    #[test]
    fn hash_selection_follows_challenge() {
        assert_eq!(
            select_hash_algorithm(&json!("")).unwrap(),
            HashAlgorithm::Sha384
        );
        assert_eq!(
            select_hash_algorithm(&json!({})).unwrap(),
            HashAlgorithm::Sha384
        );
        assert_eq!(
            select_hash_algorithm(&json!({"selected-hash-algorithm": "SHA512"})).unwrap(),
            HashAlgorithm::Sha512
        );
        assert_eq!(
            select_hash_algorithm(&json!({"selected-hash-algorithm": "sha256"})).unwrap(),
            HashAlgorithm::Sha256
        );
        assert!(select_hash_algorithm(&json!({"selected-hash-algorithm": "md5"})).is_err());
        assert!(select_hash_algorithm(&json!({"selected-hash-algorithm": 384})).is_err());
    }

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

    #[test]
    fn base_url_is_checked_and_normalised() {
        assert_eq!(
            normalise_base_url("http://kbs:8080/").unwrap(),
            "http://kbs:8080"
        );
        assert_eq!(
            normalise_base_url("https://kbs.example/prefix/").unwrap(),
            "https://kbs.example/prefix"
        );
        for bad in [
            "kbs:8080",
            "ftp://kbs",
            "http://kbs/?q=1",
            "http://u:p@kbs",
            "",
            "http://",
        ] {
            assert!(normalise_base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn builder_rejects_bad_init_data_and_ca_file() {
        let err = KbsClientBuilder::new("http://kbs", Box::new(SampleAttester))
            .init_data("not = [valid")
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "init-data is not valid TOML: line 1, column 13: unclosed array, expected `]`"
        );
        let err = KbsClientBuilder::new("http://kbs", Box::new(SampleAttester))
            .init_data("a = 1\nb = \"x\"\nc = = 2\n")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("line 3, column"), "{err}");
        let err = KbsClientBuilder::new("https://kbs", Box::new(SampleAttester))
            .ca_file("/nonexistent/ca.pem")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

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

    #[test]
    fn client_is_send_and_sync_and_futures_are_send() {
        fn assert_send_sync<T: Send + Sync>(_: &T) {}
        fn assert_send<T: Send>(_: T) {}
        let mut client = KbsClientBuilder::new("http://127.0.0.1:1", Box::new(SampleAttester))
            .build()
            .unwrap();
        assert_send_sync(&client);
        let path: ResourcePath = "a/b/c".parse().unwrap();
        assert_send(client.get_resource(&path));
        assert_send(client.attest());
    }

    #[test]
    fn debug_does_not_leak_the_token() {
        let mut client = KbsClientBuilder::new("http://kbs", Box::new(SampleAttester))
            .build()
            .unwrap();
        client.token = Some(Token {
            jwt: "secret.token.value".into(),
            exp: Some(5),
        });
        let dbg = format!("{client:?}");
        assert!(!dbg.contains("secret.token.value"), "{dbg}");
        assert_eq!(client.token(), Some("secret.token.value"));
        assert_eq!(client.token_expiry(), Some(5));
    }
}
