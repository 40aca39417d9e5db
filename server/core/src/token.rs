//! ES256 attestation tokens with EAR-shaped claims.
//!
//! The claims follow the layout the CoCo attestation service emits (EAR,
//! `submods.cpu0["ear.veraison.annotated-evidence"]`), so resource policies
//! written for upstream Trustee evaluate unchanged. Tether adds a `tether`
//! object carrying the guest identity.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
    EllipticCurveKeyType, Jwk, KeyAlgorithm,
};
use jsonwebtoken::{Algorithm, Header};
use kbs_types::TeePubKey;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub use crate::claims::Claims;
pub use crate::identity::GuestIdentity;
use crate::init_data::InitDataClaims;

mod cache;
mod es256;

pub(crate) use cache::VerifiedCache;
use es256::{Es256Key, VerifyFailure};

/// EAR profile identifier placed in every token.
pub const EAR_PROFILE: &str = "tag:github.com,2023:veraison/ear";
/// Id of the default appraisal policy, reported in the EAR submodule (upstream's
/// attestation service names its default policy the same).
pub const APPRAISAL_POLICY_ID: &str = "default";
/// Where upstream EAR tokens (and ours) carry the TEE public key.
pub const TEE_PUBKEY_POINTER: &str =
    "/submods/cpu0/ear.veraison.annotated-evidence/runtime_data_claims/tee-pubkey";
/// Older upstream EAR tokens named the submodule `cpu`.
pub const TEE_PUBKEY_POINTER_LEGACY: &str =
    "/submods/cpu/ear.veraison.annotated-evidence/runtime_data_claims/tee-pubkey";

/// Clock skew tolerated when checking `exp`, in seconds.
pub(crate) const EXP_LEEWAY_SECS: u64 = 5;
/// Largest token this KBS issues or accepts, bytes. A token travels back as a cookie or an
/// `Authorization` header, so it must fit in what the KBS's listener reads as request
/// headers (`server/src/serve.rs` sizes them from this); a token that would be larger (the
/// whole init-data goes into it) is refused at issue (413 `TokenTooLarge`) rather than
/// handed to a client that could never send it back.
pub const MAX_TOKEN_BYTES: usize = 128 * 1024;

/// Errors issuing, loading or verifying tokens.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The signing key file could not be read or written.
    #[error("token signing key {path}: {source}")]
    KeyIo {
        /// The key file.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The signing key file exists but does not hold a P-256 PKCS#8 PEM key.
    #[error("token signing key {path} is not a P-256 PKCS#8 PEM private key")]
    KeyInvalid {
        /// The key file.
        path: PathBuf,
    },
    /// Signing failed.
    #[error("token signing failed: {0}")]
    Sign(String),
    /// The token is malformed, not ES256, or not signed by this KBS.
    #[error("invalid attestation token: {0}")]
    Invalid(&'static str),
    /// The token has expired.
    #[error("attestation token expired")]
    Expired,
    /// The token verified but its claims lack what Tether needs.
    #[error("attestation token claims: {0}")]
    Claims(String),
    /// Not signed by this KBS nor by a trusted external attestation service.
    #[error("invalid attestation token: {0}")]
    Untrusted(String),
    /// The token to issue would be larger than a client can send back.
    #[error(
        "the attestation token would be {size} bytes, more than the {limit} a client can send back (the whole init-data goes into the token: send less)"
    )]
    TooLarge {
        /// Size of the signed token.
        size: usize,
        /// [`MAX_TOKEN_BYTES`].
        limit: usize,
    },
}

impl TokenError {
    /// HTTP status this error maps to.
    pub fn status(&self) -> u16 {
        match self {
            TokenError::KeyIo { .. } | TokenError::KeyInvalid { .. } | TokenError::Sign(_) => 500,
            TokenError::Invalid(_)
            | TokenError::Expired
            | TokenError::Claims(_)
            | TokenError::Untrusted(_) => 401,
            TokenError::TooLarge { .. } => 413,
        }
    }

    /// CamelCase error name for the JSON error type URL.
    pub fn name(&self) -> &'static str {
        match self {
            TokenError::KeyIo { .. } => "TokenKeyIo",
            TokenError::KeyInvalid { .. } => "TokenKeyInvalid",
            TokenError::Sign(_) => "TokenSign",
            TokenError::Invalid(_) | TokenError::Untrusted(_) => "InvalidToken",
            TokenError::Expired => "TokenExpired",
            TokenError::Claims(_) => "InvalidTokenClaims",
            TokenError::TooLarge { .. } => "TokenTooLarge",
        }
    }
}

/// A token this KBS signed, checked and unpacked.
#[derive(Clone, Debug)]
pub struct VerifiedToken {
    /// All claims, as the resource policy sees them (`input`), as compact JSON text.
    /// Shared: sessions, the verified-token cache and the guest directory hold the same copy.
    pub claims: Claims,
    /// The TEE key the guest proved possession of during attestation.
    pub tee_pubkey: TeePubKey,
    /// The guest's identity.
    pub identity: GuestIdentity,
    /// TEE name (`sample`, `tdx`, ...).
    pub tee: String,
    /// Issued-at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

impl VerifiedToken {
    /// Unpack claims already known to be authentic (just signed or just verified); `text`
    /// is their JSON serialisation.
    fn from_claims(claims: &Value, text: String) -> Result<Self, TokenError> {
        let key = claims
            .pointer(TEE_PUBKEY_POINTER)
            .or_else(|| claims.pointer(TEE_PUBKEY_POINTER_LEGACY))
            .ok_or_else(|| TokenError::Claims("no runtime_data_claims.tee-pubkey".into()))?;
        let tee_pubkey = TeePubKey::deserialize(key)
            .map_err(|e| TokenError::Claims(format!("tee-pubkey: {e}")))?;
        let tether = claims
            .get("tether")
            .ok_or_else(|| TokenError::Claims("no tether claims".into()))?;
        let identity = GuestIdentity::deserialize(tether)
            .map_err(|e| TokenError::Claims(format!("tether identity: {e}")))?;
        let tee = tether
            .get("tee")
            .and_then(Value::as_str)
            .ok_or_else(|| TokenError::Claims("no tether.tee".into()))?
            .to_owned();
        let number = |name: &str| {
            claims
                .get(name)
                .and_then(Value::as_u64)
                .ok_or_else(|| TokenError::Claims(format!("no numeric {name}")))
        };
        let iat = number("iat")?;
        let exp = number("exp")?;
        Ok(Self {
            claims: Claims::from_serialized(text),
            tee_pubkey,
            identity,
            tee,
            iat,
            exp,
        })
    }
}

/// The EAR appraisal of one attestation, as it goes into the `cpu0` submodule.
#[derive(Clone, Debug, PartialEq)]
pub struct EarAppraisal {
    /// `ear.status`: `affirming`, `warning`, `contraindicated` or `none`.
    pub status: &'static str,
    /// `ear.trustworthiness-vector` (claim name to value), when the appraisal set one.
    pub trust_vector: Option<Value>,
    /// `ear.appraisal-policy-id`.
    pub policy_id: &'static str,
}

impl Default for EarAppraisal {
    /// Affirming, no trust vector, the default policy's id.
    fn default() -> Self {
        Self {
            status: "affirming",
            trust_vector: None,
            policy_id: APPRAISAL_POLICY_ID,
        }
    }
}

/// The annotated evidence of one attestation (`ear.veraison.annotated-evidence`): the TEE
/// claims under the TEE's name, the report data (as upstream's attestation service lifts it
/// there too), the init-data digest and claims when init-data was sent, the runtime data.
/// The appraisal policy reads it as its `input`.
pub fn annotated_evidence(
    tee: &str,
    tee_claims: Value,
    tee_pubkey: &TeePubKey,
    nonce: &str,
    init_data: Option<&InitDataClaims>,
) -> Map<String, Value> {
    let mut evidence = Map::new();
    if let Some(report_data) = tee_claims.get("report_data").filter(|r| r.is_string()) {
        evidence.insert("report_data".into(), report_data.clone());
    }
    evidence.insert(tee.to_owned(), tee_claims);
    if let Some(init) = init_data {
        evidence.insert("init_data".into(), Value::String(hex::encode(&init.digest)));
        evidence.insert("init_data_claims".into(), init.claims.clone());
    }
    evidence.insert(
        "runtime_data_claims".into(),
        json!({ "nonce": nonce, "tee-pubkey": tee_pubkey }),
    );
    evidence
}

/// The EAR-shaped claims of a token (without `iat`/`exp`/`jti`) for annotated evidence and
/// its appraisal.
pub fn ear_claims(
    tee: &str,
    evidence: Map<String, Value>,
    appraisal: &EarAppraisal,
    identity: &GuestIdentity,
) -> Map<String, Value> {
    let mut claims = Map::new();
    claims.insert("eat_profile".into(), Value::String(EAR_PROFILE.into()));
    claims.insert(
        "ear.verifier-id".into(),
        json!({
            "developer": "tether",
            "build": concat!("tether-", env!("CARGO_PKG_VERSION")),
        }),
    );
    let mut cpu0 = Map::new();
    cpu0.insert("ear.status".into(), json!(appraisal.status));
    if let Some(vector) = &appraisal.trust_vector {
        cpu0.insert("ear.trustworthiness-vector".into(), vector.clone());
    }
    cpu0.insert("ear.appraisal-policy-id".into(), json!(appraisal.policy_id));
    cpu0.insert(
        "ear.veraison.annotated-evidence".into(),
        Value::Object(evidence),
    );
    claims.insert("submods".into(), json!({ "cpu0": Value::Object(cpu0) }));
    claims.insert("tether".into(), tether_claims(tee, identity));
    claims
}

/// The `tether` object: the TEE and the guest's identity.
pub fn tether_claims(tee: &str, identity: &GuestIdentity) -> Value {
    let mut tether =
        json!({ "tee": tee, "guest_id": identity.guest_id, "labels": identity.labels });
    if let Some(name) = &identity.name {
        tether["name"] = json!(name);
    }
    if let Some(ip) = &identity.ip {
        tether["ip"] = json!(ip.to_string());
    }
    tether
}

/// Builds the EAR-shaped claims for a successful attestation (without `iat`/`exp`/`jti`),
/// appraised affirming without a trust vector (tests and tools; the RCAR service appraises).
pub fn build_claims(
    tee: &str,
    tee_claims: Value,
    tee_pubkey: &TeePubKey,
    nonce: &str,
    init_data: Option<&InitDataClaims>,
    identity: &GuestIdentity,
) -> Map<String, Value> {
    let evidence = annotated_evidence(tee, tee_claims, tee_pubkey, nonce, init_data);
    ear_claims(tee, evidence, &EarAppraisal::default(), identity)
}

/// Signs and verifies attestation tokens with this KBS's P-256 key.
pub struct TokenSigner {
    es256: Es256Key,
    cache: VerifiedCache,
    public_jwk: Value,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("public_jwk", &self.public_jwk)
            .field("private_key", &"[redacted]")
            .finish()
    }
}

impl TokenSigner {
    /// Loads the PKCS#8 PEM key at `path`, generating and saving one (mode 0600) if absent.
    pub fn load_or_generate(path: &Path) -> Result<Self, TokenError> {
        if let Some(signer) = Self::load(path)? {
            return Ok(signer);
        }
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| TokenError::Sign(format!("encode new key: {e}")))?;
        match crate::fsutil::create_private(path, pem.as_bytes()) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "generated token signing key");
                Self::from_secret(&secret)
            }
            // Another process created it first: use theirs. Read once more, not in a loop: a
            // name that is taken but holds no file (a dangling link) is an error, where
            // trying again recursed until the stack overflowed.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Self::load(path)?.ok_or_else(|| TokenError::KeyIo {
                    path: path.to_owned(),
                    source: io::Error::new(
                        io::ErrorKind::NotFound,
                        "the name is taken but holds no file to read (a dangling link?)",
                    ),
                })
            }
            Err(source) => Err(TokenError::KeyIo {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The key in the PKCS#8 PEM file at `path`; `None` when there is no file there.
    fn load(path: &Path) -> Result<Option<Self>, TokenError> {
        let pem = match fs::read_to_string(path) {
            Ok(pem) => Zeroizing::new(pem),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(TokenError::KeyIo {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        if let Ok(meta) = fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %path.display(), "token signing key is readable by group or others");
        }
        let secret = p256::SecretKey::from_pkcs8_pem(&pem).map_err(|_| TokenError::KeyInvalid {
            path: path.to_owned(),
        })?;
        Self::from_secret(&secret).map(Some)
    }

    /// A signer with a fresh in-memory key (tests, throwaway instances).
    pub fn ephemeral() -> Result<Self, TokenError> {
        Self::from_secret(&p256::SecretKey::random(&mut rand::rngs::OsRng))
    }

    fn from_secret(secret: &p256::SecretKey) -> Result<Self, TokenError> {
        let point = secret.public_key().to_encoded_point(false);
        let (Some(x), Some(y)) = (point.x(), point.y()) else {
            return Err(TokenError::Sign(
                "public key has no affine coordinates".into(),
            ));
        };
        let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
        let jwk = Jwk {
            common: CommonParameters {
                key_algorithm: Some(KeyAlgorithm::ES256),
                ..Default::default()
            },
            algorithm: AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                key_type: EllipticCurveKeyType::EC,
                curve: EllipticCurve::P256,
                x,
                y,
            }),
        };
        let public_jwk =
            serde_json::to_value(&jwk).map_err(|e| TokenError::Sign(format!("jwk: {e}")))?;
        let mut header = Header::new(Algorithm::ES256);
        header.jwk = Some(jwk);

        let header_json =
            serde_json::to_vec(&header).map_err(|e| TokenError::Sign(format!("header: {e}")))?;
        let private: Zeroizing<[u8; 32]> = Zeroizing::new(secret.to_bytes().into());
        let es256 = Es256Key::new(private.as_slice(), point.as_bytes(), &header_json)
            .map_err(|e| TokenError::Sign(format!("signing key: {e}")))?;

        Ok(Self {
            es256,
            cache: VerifiedCache::default(),
            public_jwk,
        })
    }

    /// The signing key's public half as a JWK (for relying parties).
    pub fn public_jwk(&self) -> Value {
        self.public_jwk.clone()
    }

    /// Signs `claims` after adding `iat`, `exp` (now + `ttl`) and a fresh `jti`.
    pub fn issue(&self, claims: Map<String, Value>, ttl: Duration) -> Result<String, TokenError> {
        self.sign(stamp(claims, ttl)).map(|(token, _, _)| token)
    }

    /// Like [`TokenSigner::issue`], also returning the unpacked token (no re-verification).
    /// The token is remembered as verified: it was signed here a moment ago, so the client's
    /// first request with it (RCAR's resource GET, the tunnel upgrade) needs no ES256
    /// verification, only the digest lookup and the expiry check of a cache hit.
    pub fn issue_verified(
        &self,
        claims: Map<String, Value>,
        ttl: Duration,
    ) -> Result<(String, VerifiedToken), TokenError> {
        let (token, claims, text) = self.sign(stamp(claims, ttl))?;
        let verified = VerifiedToken::from_claims(&Value::Object(claims), text)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.cache.insert(
            digest,
            Arc::new(verified.clone()),
            verified.exp.saturating_add(EXP_LEEWAY_SECS),
            unix_now(),
        );
        Ok((token, verified))
    }

    /// The token, the claims and their JSON text (what the token's payload encodes).
    fn sign(
        &self,
        claims: Map<String, Value>,
    ) -> Result<(String, Map<String, Value>, String), TokenError> {
        let json = serde_json::to_string(&claims).map_err(|e| TokenError::Sign(e.to_string()))?;
        let token = self
            .es256
            .sign(json.as_bytes())
            .map_err(|_| TokenError::Sign("ES256 signature failed".into()))?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge {
                size: token.len(),
                limit: MAX_TOKEN_BYTES,
            });
        }
        Ok((token, claims, json))
    }

    /// Verifies a token: ES256 under this signer's key only, unexpired (5 s leeway).
    pub fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid("token too large"));
        }
        let now = unix_now();
        // A token verified before is recognised by its digest: same bytes, same verdict,
        // only the expiry can have changed since.
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(known) = self.cache.get(&digest) {
            if known.exp < now.saturating_sub(EXP_LEEWAY_SECS) {
                return Err(TokenError::Expired);
            }
            return Ok(VerifiedToken::clone(&known));
        }
        let claims = self
            .es256
            .verify(token, now, EXP_LEEWAY_SECS)
            .map_err(|e| match e {
                VerifyFailure::Expired => TokenError::Expired,
                VerifyFailure::Algorithm => TokenError::Invalid("algorithm is not ES256"),
                VerifyFailure::Signature => {
                    TokenError::Invalid("signature does not verify under this KBS's key")
                }
                VerifyFailure::MissingExp => TokenError::Invalid("missing exp claim"),
                VerifyFailure::Malformed => TokenError::Invalid("malformed token"),
            })?;
        let text = serde_json::to_string(&claims).map_err(|e| TokenError::Claims(e.to_string()))?;
        let verified = VerifiedToken::from_claims(&claims, text)?;
        self.cache.insert(
            digest,
            Arc::new(verified.clone()),
            verified.exp.saturating_add(EXP_LEEWAY_SECS),
            now,
        );
        Ok(verified)
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn stamp(mut claims: Map<String, Value>, ttl: Duration) -> Map<String, Value> {
    let now = unix_now();
    claims.insert("iat".into(), Value::from(now));
    claims.insert("exp".into(), Value::from(now.saturating_add(ttl.as_secs())));
    claims.insert(
        "jti".into(),
        Value::String(uuid::Uuid::new_v4().to_string()),
    );
    claims
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use jsonwebtoken::EncodingKey;

    fn ec_tee_key() -> TeePubKey {
        TeePubKey::EC {
            crv: "P-256".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis".into(),
            y: "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE".into(),
        }
    }

    fn identity() -> GuestIdentity {
        GuestIdentity {
            guest_id: "web-1".into(),
            labels: std::collections::BTreeMap::from([("app".into(), "web".into())]).into(),
            ..Default::default()
        }
    }

    fn sample_claims() -> Map<String, Value> {
        build_claims(
            "sample",
            json!({"svn": "1"}),
            &ec_tee_key(),
            "bm9uY2U=",
            None,
            &identity(),
        )
    }

    #[test]
    fn issue_then_verify() {
        let signer = TokenSigner::ephemeral().unwrap();
        let token = signer
            .issue(sample_claims(), Duration::from_secs(300))
            .unwrap();
        let verified = signer.verify(&token).unwrap();
        assert_eq!(verified.tee, "sample");
        assert_eq!(verified.identity, identity());
        assert!(matches!(verified.tee_pubkey, TeePubKey::EC { ref crv, .. } if crv == "P-256"));
        assert_eq!(verified.exp - verified.iat, 300);
        let c = &verified.claims.to_value();
        assert_eq!(c["eat_profile"], EAR_PROFILE);
        assert_eq!(c["submods"]["cpu0"]["ear.status"], "affirming");
        assert_eq!(
            c["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["sample"]["svn"],
            "1"
        );
        assert_eq!(
            c["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["runtime_data_claims"]["nonce"],
            "bm9uY2U="
        );
        assert!(c["jti"].as_str().unwrap().len() == 36);
        assert_eq!(c["tether"]["labels"]["app"], "web");
    }

    #[test]
    fn issue_verified_matches_verify() {
        let signer = TokenSigner::ephemeral().unwrap();
        let (token, direct) = signer
            .issue_verified(sample_claims(), Duration::from_secs(60))
            .unwrap();
        let checked = signer.verify(&token).unwrap();
        assert_eq!(direct.claims, checked.claims);
        assert_eq!(direct.identity, checked.identity);
    }

    #[test]
    fn header_carries_public_jwk() {
        let signer = TokenSigner::ephemeral().unwrap();
        let token = signer
            .issue(sample_claims(), Duration::from_secs(60))
            .unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        let jwk = serde_json::to_value(header.jwk.unwrap()).unwrap();
        assert_eq!(jwk, signer.public_jwk());
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(jwk["alg"], "ES256");
    }

    #[test]
    fn init_data_claims_are_included() {
        let init = InitDataClaims {
            algorithm: kbs_types::HashAlgorithm::Sha384,
            digest: vec![0xab; 48],
            claims: json!({"algorithm": "sha384", "data": {}}),
            identity: None,
        };
        let claims = build_claims(
            "tdx",
            json!({}),
            &ec_tee_key(),
            "n",
            Some(&init),
            &identity(),
        );
        let ev = &claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"];
        assert_eq!(ev["init_data"], "ab".repeat(48));
        assert_eq!(ev["init_data_claims"]["algorithm"], "sha384");
        assert!(ev.get("tdx").is_some());
    }

    #[test]
    fn expired_token_is_rejected() {
        let signer = TokenSigner::ephemeral().unwrap();
        let mut claims = sample_claims();
        claims.insert("iat".into(), json!(1000));
        claims.insert("exp".into(), json!(1001));
        let (token, _, _) = signer.sign(claims).unwrap();
        assert!(matches!(signer.verify(&token), Err(TokenError::Expired)));

        // Within the 5 s leeway still verifies.
        let now = unix_now();
        let mut claims = sample_claims();
        claims.insert("iat".into(), json!(now - 60));
        claims.insert("exp".into(), json!(now - 2));
        let (token, _, _) = signer.sign(claims).unwrap();
        assert!(signer.verify(&token).is_ok());
    }

    #[test]
    fn the_expiry_leeway_ends_to_the_second() {
        let signer = TokenSigner::ephemeral().unwrap();
        let mut claims = sample_claims();
        claims.insert("iat".into(), json!(900));
        claims.insert("exp".into(), json!(1000));
        let (token, _, _) = signer.sign(claims).unwrap();
        let verify = |now| signer.es256.verify(&token, now, EXP_LEEWAY_SECS);
        assert!(verify(1000).is_ok(), "at exp");
        assert!(
            verify(1000 + EXP_LEEWAY_SECS).is_ok(),
            "at the end of the leeway"
        );
        assert_eq!(
            verify(1001 + EXP_LEEWAY_SECS).unwrap_err(),
            VerifyFailure::Expired
        );
        // A claims object without a numeric exp, and a payload that is no object.
        for payload in [json!({"iat": 1}), json!({"exp": "1000"}), json!([1000])] {
            let token = signer.es256.sign(payload.to_string().as_bytes()).unwrap();
            let err = signer.es256.verify(&token, 0, 0).unwrap_err();
            assert!(
                matches!(err, VerifyFailure::MissingExp | VerifyFailure::Malformed),
                "{payload}: {err:?}"
            );
        }
    }

    #[test]
    fn other_signers_and_algorithms_are_rejected() {
        let signer = TokenSigner::ephemeral().unwrap();
        let other = TokenSigner::ephemeral().unwrap();
        let token = other
            .issue(sample_claims(), Duration::from_secs(60))
            .unwrap();
        let err = signer.verify(&token).err().unwrap();
        assert!(matches!(err, TokenError::Invalid(_)), "{err}");
        assert_eq!(err.status(), 401);

        let claims = stamp(sample_claims(), Duration::from_secs(60));
        // HS256 with the public JWK's x as a "secret".
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis"),
        )
        .unwrap();
        assert!(matches!(signer.verify(&hs), Err(TokenError::Invalid(_))));

        // alg none: header {"alg":"none"} and an empty signature.
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let unsigned = format!("{none_header}.{body}.");
        assert!(matches!(
            signer.verify(&unsigned),
            Err(TokenError::Invalid(_))
        ));

        // A valid signature by another key whose JWK sits in the header.
        let other_secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let other = TokenSigner::from_secret(&other_secret).unwrap();
        let mut forged_header = Header::new(Algorithm::ES256);
        forged_header.jwk = header_of(&other).jwk;
        let forged =
            jsonwebtoken::encode(&forged_header, &claims, &jwt_encoding_key(&other_secret))
                .unwrap();
        assert!(matches!(
            signer.verify(&forged),
            Err(TokenError::Invalid(_))
        ));

        // Tampered payload.
        let good = signer
            .issue(sample_claims(), Duration::from_secs(60))
            .unwrap();
        let mut parts: Vec<&str> = good.split('.').collect();
        let mut evil = claims.clone();
        evil.insert(
            "tether".into(),
            json!({"tee": "tdx", "guest_id": "admin", "labels": {}}),
        );
        let evil_body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&evil).unwrap());
        parts[1] = &evil_body;
        assert!(signer.verify(&parts.join(".")).is_err());

        for junk in ["", ".", "a.b.c", "not a token"] {
            assert!(matches!(signer.verify(junk), Err(TokenError::Invalid(_))));
        }
        // Refused for its size before any parsing.
        assert!(matches!(
            signer.verify(&"x".repeat(MAX_TOKEN_BYTES + 1)),
            Err(TokenError::Invalid("token too large"))
        ));
    }

    /// The header jsonwebtoken would put on this signer's tokens.
    fn header_of(signer: &TokenSigner) -> Header {
        let mut header = Header::new(Algorithm::ES256);
        header.jwk = Some(serde_json::from_value(signer.public_jwk()).unwrap());
        header
    }

    fn jwt_encoding_key(secret: &p256::SecretKey) -> EncodingKey {
        use p256::pkcs8::EncodePrivateKey as _;
        EncodingKey::from_ec_der(secret.to_pkcs8_der().unwrap().as_bytes())
    }

    fn jwt_decoding(signer: &TokenSigner) -> (jsonwebtoken::DecodingKey, jsonwebtoken::Validation) {
        let jwk = signer.public_jwk();
        let key = jsonwebtoken::DecodingKey::from_ec_components(
            jwk["x"].as_str().unwrap(),
            jwk["y"].as_str().unwrap(),
        )
        .unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        (key, validation)
    }

    #[test]
    fn ring_tokens_verify_with_jsonwebtoken() {
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let signer = TokenSigner::from_secret(&secret).unwrap();
        let token = signer
            .issue(sample_claims(), Duration::from_secs(60))
            .unwrap();
        let (key, validation) = jwt_decoding(&signer);
        let decoded = jsonwebtoken::decode::<Value>(&token, &key, &validation).unwrap();
        assert_eq!(decoded.header.alg, Algorithm::ES256);
        assert_eq!(decoded.header.jwk, header_of(&signer).jwk);
        assert_eq!(decoded.claims["tether"]["guest_id"], "web-1");

        // The header segment is byte-identical to what jsonwebtoken itself emits.
        let claims = stamp(sample_claims(), Duration::from_secs(60));
        let theirs =
            jsonwebtoken::encode(&header_of(&signer), &claims, &jwt_encoding_key(&secret)).unwrap();
        assert_eq!(
            token.split('.').next().unwrap(),
            theirs.split('.').next().unwrap()
        );
        // A signature by another key does not pass jsonwebtoken either.
        let other = TokenSigner::ephemeral().unwrap();
        let forged = other
            .issue(sample_claims(), Duration::from_secs(60))
            .unwrap();
        assert!(jsonwebtoken::decode::<Value>(&forged, &key, &validation).is_err());
    }

    #[test]
    fn jsonwebtoken_tokens_verify_with_ring() {
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let signer = TokenSigner::from_secret(&secret).unwrap();
        let claims = stamp(sample_claims(), Duration::from_secs(60));
        let token =
            jsonwebtoken::encode(&header_of(&signer), &claims, &jwt_encoding_key(&secret)).unwrap();
        let verified = signer.verify(&token).unwrap();
        assert_eq!(verified.claims.to_value(), Value::Object(claims.clone()));

        // Without exp: refused, as jsonwebtoken's Validation requiring exp does.
        let mut no_exp = claims.clone();
        no_exp.remove("exp");
        let token =
            jsonwebtoken::encode(&header_of(&signer), &no_exp, &jwt_encoding_key(&secret)).unwrap();
        assert!(matches!(
            signer.verify(&token),
            Err(TokenError::Invalid("missing exp claim"))
        ));
        let (key, validation) = jwt_decoding(&signer);
        assert!(jsonwebtoken::decode::<Value>(&token, &key, &validation).is_err());

        // Extra parts and bad base64 are malformed, not panics.
        let good = signer
            .issue(sample_claims(), Duration::from_secs(60))
            .unwrap();
        for bad in [
            format!("{good}.x"),
            format!("x.{good}"),
            good.replacen('.', "..", 1),
            format!("{good}="),
        ] {
            assert!(
                matches!(signer.verify(&bad), Err(TokenError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn verified_cache_hits_but_still_checks_expiry() {
        let signer = TokenSigner::ephemeral().unwrap();
        let token = signer
            .issue(sample_claims(), Duration::from_secs(60))
            .unwrap();
        let first = signer.verify(&token).unwrap();
        assert_eq!(signer.cache.len(), 1);
        let second = signer.verify(&token).unwrap();
        assert_eq!(first.claims, second.claims);
        assert_eq!(signer.cache.len(), 1);

        // A cached entry whose token has since expired is refused.
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut stale = first.clone();
        stale.exp = 1000;
        signer.cache.insert(digest, Arc::new(stale), 0, unix_now());
        assert!(matches!(signer.verify(&token), Err(TokenError::Expired)));

        // Failures are not cached; a tampered token never matches an entry.
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(signer.verify(&tampered).is_err());
        assert_eq!(signer.cache.len(), 1);
    }

    /// A token answered from the cache is good to the end of the leeway, as one whose
    /// signature is checked is (`the_expiry_leeway_ends_to_the_second`): at
    /// `exp + EXP_LEEWAY_SECS` it verifies, one second later it has expired.
    #[test]
    fn a_cached_token_is_good_to_the_end_of_the_leeway() {
        let signer = TokenSigner::ephemeral().unwrap();
        let token = signer
            .issue(sample_claims(), Duration::from_secs(60))
            .unwrap();
        let issued = signer.verify(&token).unwrap();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let verify_cached_with_exp = |exp: u64, now: u64| {
            let mut cached = issued.clone();
            cached.exp = exp;
            signer.cache.insert(digest, Arc::new(cached), now, now);
            signer.verify(&token)
        };
        // The verdict is read against the clock of `verify`: a second that ticks between
        // reading it here and there spoils the attempt, so try again.
        for _ in 0..10 {
            let now = unix_now();
            let last = verify_cached_with_exp(now - EXP_LEEWAY_SECS, now);
            let after = verify_cached_with_exp(now - EXP_LEEWAY_SECS - 1, now);
            if unix_now() != now {
                continue;
            }
            assert_eq!(
                last.unwrap().exp,
                now - EXP_LEEWAY_SECS,
                "at the end of the leeway"
            );
            assert!(matches!(after, Err(TokenError::Expired)), "{after:?}");
            return;
        }
        panic!("the clock ticked during each of ten attempts");
    }

    #[test]
    fn an_issued_token_is_known_verified_without_a_signature_check() {
        let signer = TokenSigner::ephemeral().unwrap();
        let (token, issued) = signer
            .issue_verified(sample_claims(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(signer.cache.len(), 1);
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = signer
            .cache
            .get(&digest)
            .expect("the issued token is cached");
        assert_eq!(cached.claims, issued.claims);
        assert_eq!(cached.exp, issued.exp);
        // The cache answers the first verification, with the claims that were signed.
        let verified = signer.verify(&token).unwrap();
        assert_eq!(verified.claims, issued.claims);
        assert_eq!(signer.cache.len(), 1);
        // A token of another signer is still refused (the cache is keyed by the bytes).
        let other = TokenSigner::ephemeral().unwrap();
        let (foreign, _) = other
            .issue_verified(sample_claims(), Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            signer.verify(&foreign),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn legacy_cpu_submodule_pointer_is_accepted() {
        let mut claims = sample_claims();
        let submods = claims.remove("submods").unwrap();
        claims.insert("submods".into(), json!({"cpu": submods["cpu0"].clone()}));
        let claims = Value::Object(stamp(claims, Duration::from_secs(10)));
        let text = serde_json::to_string(&claims).unwrap();
        let verified = VerifiedToken::from_claims(&claims, text).unwrap();
        assert_eq!(verified.identity.guest_id, "web-1");
    }

    #[test]
    fn key_file_is_generated_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/token.key");
        let first = TokenSigner::load_or_generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = fs::read_to_string(&path).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        // No temp files left behind.
        let entries: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(entries.len(), 1);

        let second = TokenSigner::load_or_generate(&path).unwrap();
        assert_eq!(first.public_jwk(), second.public_jwk());
        let token = first
            .issue(sample_claims(), Duration::from_secs(60))
            .unwrap();
        assert!(second.verify(&token).is_ok());
    }

    #[test]
    fn bad_key_file_is_reported_without_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = TokenSigner::load_or_generate(&path).err().unwrap();
        assert!(matches!(err, TokenError::KeyInvalid { .. }));
        assert!(!err.to_string().contains("c2VjcmV0"));
        assert_eq!(err.status(), 500);
    }

    #[test]
    fn errors_map_to_their_status_and_name() {
        let key_io = TokenError::KeyIo {
            path: "k".into(),
            source: io::Error::other("x"),
        };
        let cases = [
            (key_io, 500, "TokenKeyIo"),
            (
                TokenError::KeyInvalid { path: "k".into() },
                500,
                "TokenKeyInvalid",
            ),
            (TokenError::Sign("x".into()), 500, "TokenSign"),
            (TokenError::Invalid("x"), 401, "InvalidToken"),
            (TokenError::Untrusted("x".into()), 401, "InvalidToken"),
            (TokenError::Expired, 401, "TokenExpired"),
            (TokenError::Claims("x".into()), 401, "InvalidTokenClaims"),
            (
                TokenError::TooLarge { size: 2, limit: 1 },
                413,
                "TokenTooLarge",
            ),
        ];
        for (err, status, name) in cases {
            assert_eq!((err.status(), err.name()), (status, name), "{err}");
        }
    }

    /// A token of exactly [`MAX_TOKEN_BYTES`] is issued and verifies; one that would be
    /// longer is refused at issue.
    #[test]
    fn the_token_size_limit_is_inclusive() {
        let signer = TokenSigner::ephemeral().unwrap();
        let with_padding = |n: usize| {
            let mut claims = stamp(sample_claims(), Duration::from_secs(60));
            claims.insert("pad".into(), json!("a".repeat(n)));
            signer.sign(claims)
        };
        let base = with_padding(0).unwrap().0.len();
        // base64url turns 3 bytes into 4 characters: walk the padding up to the limit.
        let mut n = (MAX_TOKEN_BYTES - base) * 3 / 4 - 8;
        let mut largest = String::new();
        loop {
            match with_padding(n) {
                Ok((token, ..)) => largest = token,
                Err(TokenError::TooLarge { size, limit }) => {
                    assert!(size > MAX_TOKEN_BYTES, "{size}");
                    assert_eq!(limit, MAX_TOKEN_BYTES);
                    break;
                }
                Err(e) => panic!("{e}"),
            }
            n += 1;
        }
        // base64url never makes 4k+1 characters, but with this header's length the limit
        // itself is a token length.
        assert_eq!(largest.len(), MAX_TOKEN_BYTES);
        let verified = signer.verify(&largest).unwrap();
        assert_eq!(verified.identity.guest_id, "web-1");
    }

    /// Counts the WARN events of the thread it is the default subscriber of.
    struct WarnCounter(Arc<std::sync::atomic::AtomicUsize>);

    impl tracing::Subscriber for WarnCounter {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            if *event.metadata().level() == tracing::Level::WARN {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    fn warnings_while(f: impl FnOnce()) -> usize {
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tracing::subscriber::with_default(WarnCounter(count.clone()), f);
        count.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn a_key_file_others_can_read_is_loaded_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let first = TokenSigner::load_or_generate(&path).unwrap();
        let load = || {
            let mut loaded = None;
            let warnings = warnings_while(|| {
                loaded = Some(TokenSigner::load_or_generate(&path).unwrap().public_jwk());
            });
            assert_eq!(loaded.unwrap(), first.public_jwk());
            warnings
        };
        assert_eq!(load(), 0, "mode 0600");
        for mode in [0o640, 0o604, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(load(), 1, "mode {mode:o}");
        }
    }

    /// A dangling link where the key should be: the name is taken (the key cannot be created
    /// there) but there is nothing to read. It recursed until the stack overflowed.
    #[test]
    fn a_dangling_link_at_the_key_path_is_an_error_not_a_loop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let target = dir.path().join("nowhere");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = TokenSigner::load_or_generate(&path).err().unwrap();
        let TokenError::KeyIo { source, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(source.kind(), io::ErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("dangling link"), "{err}");
        assert!(!target.exists(), "the link is never followed");
    }

    /// What cannot be read, or cannot be created, is reported as it happened.
    #[test]
    fn key_file_io_errors_are_reported_as_they_happened() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the key should be: it is not replaced by a new key.
        let taken = dir.path().join("token.key");
        fs::create_dir(&taken).unwrap();
        let err = TokenSigner::load_or_generate(&taken).err().unwrap();
        let TokenError::KeyIo { source, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(source.kind(), io::ErrorKind::IsADirectory, "{err}");
        // A name the key fits under but its temporary file (23 characters longer) does not.
        let long = dir.path().join("k".repeat(240));
        let err = TokenSigner::load_or_generate(&long).err().unwrap();
        let TokenError::KeyIo { source, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(
            source.raw_os_error(),
            Some(rustix::io::Errno::NAMETOOLONG.raw_os_error()),
            "{err}"
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn debug_redacts_private_key() {
        let signer = TokenSigner::ephemeral().unwrap();
        assert!(format!("{signer:?}").contains("[redacted]"));
    }
}
