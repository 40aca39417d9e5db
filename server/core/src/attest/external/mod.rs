//! Passport tokens from an external attestation service (upstream Trustee's attestation
//! service, Intel Trust Authority, ...): verified against the keys the operator trusts for
//! that service, as upstream's KBS does (`kbs/src/token/jwk.rs`,
//! `kbs/docs/attestation_token_verification.md`):
//!
//! - a header `jwk` carrying an `x5c` chain: the chain must lead to a configured certificate
//!   and its leaf hold the `jwk`'s key (upstream's AS signs EAR tokens this way); a header
//!   `jwk` without `x5c` counts only when it is one of the configured keys;
//! - a header `kid`: the key of that id in the configured JWK sets (Intel Trust Authority);
//! - otherwise every configured key that fits the algorithm is tried (a configured
//!   certificate's own key or PEM public key verifies directly).
//!
//! The header's key is never trusted by itself. Then: `exp` required (5 s leeway), `nbf`
//! honoured, `iss` checked when configured, the TEE public key read from the paths upstream
//! knows, the guest's identity from attested init-data claims (`[tether]`) or derived from
//! the TEE key, and an EAR submodule rated `contraindicated` refused.

mod chain;
mod keys;

use std::sync::{Arc, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kbs_types::TeePubKey;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use keys::{Alg, PemContents, PublicKey, TrustedKey, keys_from_jwks, read_pem};

use crate::claims::Claims;
use crate::identity::GuestIdentity;
use crate::init_data;
use crate::token::{
    EXP_LEEWAY_SECS, MAX_TOKEN_BYTES, TEE_PUBKEY_POINTER, TEE_PUBKEY_POINTER_LEGACY, TokenError,
    VerifiedCache, VerifiedToken, tether_claims,
};
use chain::Anchors;

use super::binding::derived_guest_id;

/// Where tokens of upstream's attestation service and of Intel Trust Authority carry the
/// TEE public key (`kbs/docs/attestation_token_verification.md`), after the EAR paths.
const TEE_PUBKEY_PATHS: &[&str] = &[
    TEE_PUBKEY_POINTER,
    TEE_PUBKEY_POINTER_LEGACY,
    "/customized_claims/runtime_data/tee-pubkey",
    "/tdx/attester_runtime_data/tee-pubkey",
    "/tdx/attester_user_data/tee-pubkey",
    "/attester_runtime_data/tee-pubkey",
    "/tee-pubkey",
];

/// Members of the annotated evidence that are not a TEE's claims.
const NOT_A_TEE: &[&str] = &[
    "init_data",
    "init_data_claims",
    "runtime_data_claims",
    "report_data",
];

/// What the operator trusts an external attestation service with (`[[attestation.external]]`).
#[derive(Debug, Default)]
pub struct IssuerKeys {
    /// Keys of the configured JWK sets (files; URL sets arrive through
    /// [`ExternalIssuer::set_jwks`]).
    pub jwks: Vec<TrustedKey>,
    /// Configured certificates (DER): trust anchors for `x5c` chains, and keys by themselves.
    pub certificates: Vec<Vec<u8>>,
    /// Configured PEM public keys.
    pub public_keys: Vec<PublicKey>,
}

/// One trusted external attestation service.
pub struct ExternalIssuer {
    name: String,
    issuer: Option<String>,
    anchors: Anchors,
    /// Configured certificates' and PEM keys' own keys.
    direct: Vec<TrustedKey>,
    /// Keys of the JWK sets, replaced on refresh.
    jwks: RwLock<Arc<Vec<TrustedKey>>>,
    extra_paths: Vec<String>,
    cache: VerifiedCache,
}

impl std::fmt::Debug for ExternalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalIssuer")
            .field("name", &self.name)
            .field("issuer", &self.issuer)
            .field("jwks", &self.jwks_len())
            .field("direct", &self.direct.len())
            .finish_non_exhaustive()
    }
}

/// Why a token is not this issuer's (or not acceptable from it).
#[derive(Debug)]
enum Refusal {
    /// No key of this issuer verifies it: another issuer may.
    NotOurs(String),
    /// Verified by this issuer's key, but refused.
    Refused(TokenError),
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    jwk: Option<Value>,
    #[serde(default)]
    x5c: Option<Vec<String>>,
}

impl ExternalIssuer {
    /// An issuer named `name` (logs, the `tether.issuer` claim) trusted with `keys`;
    /// `issuer`, when set, must equal the tokens' `iss`; `extra_paths` are JSON pointers
    /// tried first for the TEE public key.
    pub fn new(
        name: &str,
        issuer: Option<String>,
        keys: IssuerKeys,
        extra_paths: Vec<String>,
    ) -> Result<Self, String> {
        let anchors = Anchors::new(&keys.certificates)?;
        let mut direct = Vec::new();
        for der in &keys.certificates {
            direct.push(TrustedKey {
                kid: None,
                alg: None,
                key: PublicKey::from_certificate(der)?,
            });
        }
        direct.extend(keys.public_keys.into_iter().map(|key| TrustedKey {
            kid: None,
            alg: None,
            key,
        }));
        Ok(Self {
            name: name.to_owned(),
            issuer,
            anchors,
            direct,
            jwks: RwLock::new(Arc::new(keys.jwks)),
            extra_paths,
            cache: VerifiedCache::default(),
        })
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replaces the JWK-set keys (a refresh from the set's URL); tokens verified under the
    /// old keys are checked again.
    pub fn set_jwks(&self, keys: Vec<TrustedKey>) {
        *self.jwks.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        self.cache.clear();
    }

    /// How many JWK-set keys are in force.
    pub fn jwks_len(&self) -> usize {
        self.jwks.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Verifies `token` at `now` (Unix seconds) as one of this issuer's.
    fn verify(&self, token: &str, now: u64) -> Result<VerifiedToken, Refusal> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(known) = self.cache.get(&digest) {
            if known.exp < now.saturating_sub(EXP_LEEWAY_SECS) {
                return Err(Refusal::Refused(TokenError::Expired));
            }
            return Ok(VerifiedToken::clone(&known));
        }
        let (message, signature) = token
            .rsplit_once('.')
            .ok_or_else(|| Refusal::NotOurs("malformed token".into()))?;
        let (header_b64, payload_b64) = message
            .split_once('.')
            .ok_or_else(|| Refusal::NotOurs("malformed token".into()))?;
        let header: Header = decode_json(header_b64)
            .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()))
            .map_err(|e| Refusal::NotOurs(format!("token header: {e}")))?;
        let alg = Alg::parse(&header.alg).ok_or_else(|| {
            Refusal::NotOurs(format!(
                "algorithm {:?} is not accepted (ES256/384, RS/PS256/384/512, EdDSA)",
                header.alg.chars().take(16).collect::<String>()
            ))
        })?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| Refusal::NotOurs("signature is not base64url".into()))?;
        let key = self
            .signing_key(&header, alg, message.as_bytes(), &signature, now)
            .map_err(Refusal::NotOurs)?;
        tracing::debug!(issuer = %self.name, ?alg, ?key, "external token signature verified");
        let claims = decode_json(payload_b64)
            .map_err(|e| Refusal::Refused(TokenError::Claims(format!("payload: {e}"))))?;
        let verified = self.accept(claims, now).map_err(Refusal::Refused)?;
        self.cache.insert(
            digest,
            Arc::new(verified.clone()),
            verified.exp.saturating_add(EXP_LEEWAY_SECS),
            now,
        );
        Ok(verified)
    }

    /// The trusted key that verifies the signature, or why none does.
    fn signing_key(
        &self,
        header: &Header,
        alg: Alg,
        message: &[u8],
        signature: &[u8],
        now: u64,
    ) -> Result<&'static str, String> {
        let jwks = self.jwks.read().unwrap_or_else(|p| p.into_inner()).clone();
        let configured = || self.direct.iter().chain(jwks.iter());
        // A header key: endorsed by a chain to a configured certificate, or configured itself.
        if let Some(jwk) = &header.jwk {
            let key = PublicKey::from_jwk(jwk)?;
            let x5c = jwk
                .get("x5c")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .or_else(|| header.x5c.clone());
            let endorsed = match x5c {
                Some(chain) if !chain.is_empty() && !self.anchors.is_empty() => {
                    let chain = chain
                        .iter()
                        .map(|c| keys::x5c_der(c))
                        .collect::<Result<Vec<_>, _>>()?;
                    let leaf = self.anchors.verify(&chain, now)?;
                    if leaf != key {
                        return Err("the header jwk is not the key of its x5c certificate".into());
                    }
                    "header jwk endorsed by x5c"
                }
                _ if configured().any(|k| k.key == key) => "header jwk, a configured key",
                _ => {
                    return Err(
                        "the header jwk is neither a configured key nor endorsed by an x5c chain to a configured certificate".into(),
                    );
                }
            };
            return if key.verify(alg, message, signature) {
                Ok(endorsed)
            } else {
                Err("the signature does not verify under the header jwk".into())
            };
        }
        if let Some(chain) = &header.x5c
            && !self.anchors.is_empty()
        {
            let chain = chain
                .iter()
                .map(|c| keys::x5c_der(c))
                .collect::<Result<Vec<_>, _>>()?;
            let leaf = self.anchors.verify(&chain, now)?;
            return if leaf.verify(alg, message, signature) {
                Ok("x5c leaf")
            } else {
                Err("the signature does not verify under the x5c leaf".into())
            };
        }
        let kid = header.kid.as_deref();
        let mut tried = 0;
        for key in configured().filter(|k| k.admits(alg, kid)) {
            tried += 1;
            if key.key.verify(alg, message, signature) {
                return Ok("configured key");
            }
        }
        Err(match (tried, kid) {
            (0, Some(kid)) => format!(
                "no configured key with kid {:?} for {alg:?}",
                kid.chars().take(64).collect::<String>()
            ),
            (0, None) => format!("no configured key for {alg:?}"),
            _ => "the signature does not verify under any configured key".into(),
        })
    }

    /// The claims of a token whose signature verified: checks and unpacks them.
    fn accept(&self, claims: Value, now: u64) -> Result<VerifiedToken, TokenError> {
        let Value::Object(mut map) = claims else {
            return Err(TokenError::Claims("payload is not a JSON object".into()));
        };
        let exp = map
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| TokenError::Claims("no numeric exp".into()))?;
        if exp < now.saturating_sub(EXP_LEEWAY_SECS) {
            return Err(TokenError::Expired);
        }
        if let Some(nbf) = map.get("nbf").and_then(Value::as_u64)
            && nbf > now.saturating_add(EXP_LEEWAY_SECS)
        {
            return Err(TokenError::Claims(
                "the token is not valid yet (nbf)".into(),
            ));
        }
        if let Some(expected) = &self.issuer
            && map.get("iss").and_then(Value::as_str) != Some(expected.as_str())
        {
            return Err(TokenError::Claims(format!("iss is not {expected:?}")));
        }
        if let Some(Value::Object(submods)) = map.get("submods") {
            for (name, submod) in submods {
                if submod.get("ear.status").and_then(Value::as_str) == Some("contraindicated") {
                    return Err(TokenError::Claims(format!(
                        "the issuer rated submodule {name} contraindicated"
                    )));
                }
            }
        }
        let claims_value = Value::Object(map.clone());
        let tee_pubkey = self.tee_pubkey(&claims_value)?;
        let (tee, evidence) = tee_of(&claims_value);
        let mut identity = match evidence
            .and_then(|e| e.get("init_data_claims"))
            .and_then(|c| c.get("tether"))
        {
            Some(tether) => init_data::identity_from_claims(tether)
                .map_err(|e| TokenError::Claims(format!("init_data_claims: {e}")))?,
            None => GuestIdentity::default(),
        };
        if identity.guest_id.is_empty() {
            identity.guest_id = derived_guest_id(&tee_pubkey)
                .map_err(|e| TokenError::Claims(format!("tee-pubkey: {e}")))?;
        }
        let iat = map.get("iat").and_then(Value::as_u64).unwrap_or(now);
        // The resource policy sees the token's claims with Tether's `tether` object (who
        // the guest is, which service vouched for it).
        let mut tether = tether_claims(&tee, &identity);
        tether["issuer"] = Value::String(self.name.clone());
        map.insert("tether".into(), tether);
        let text = serde_json::to_string(&map).map_err(|e| TokenError::Claims(e.to_string()))?;
        Ok(VerifiedToken {
            claims: Claims::from_serialized(text),
            tee_pubkey,
            identity,
            tee,
            iat,
            exp,
        })
    }

    fn tee_pubkey(&self, claims: &Value) -> Result<TeePubKey, TokenError> {
        let paths = self
            .extra_paths
            .iter()
            .map(String::as_str)
            .chain(TEE_PUBKEY_PATHS.iter().copied());
        for path in paths {
            if let Some(key) = claims.pointer(path) {
                return TeePubKey::deserialize(key)
                    .map_err(|e| TokenError::Claims(format!("tee-pubkey at {path}: {e}")));
            }
        }
        Err(TokenError::Claims(
            "no TEE public key at any known path (set tee_pubkey_paths)".into(),
        ))
    }
}

/// The TEE an external token vouches for, and its EAR annotated evidence if it has one.
fn tee_of(claims: &Value) -> (String, Option<&Map<String, Value>>) {
    let evidence = claims
        .get("submods")
        .and_then(Value::as_object)
        .and_then(|s| s.get("cpu0").or_else(|| s.get("cpu")))
        .and_then(|cpu| cpu.get("ear.veraison.annotated-evidence"))
        .and_then(Value::as_object);
    if let Some(ev) = evidence
        && let Some(tee) = ev.keys().find(|k| !NOT_A_TEE.contains(&k.as_str()))
    {
        return (tee.clone(), evidence);
    }
    // Intel Trust Authority puts the TEE's claims under its name.
    for tee in ["tdx", "snp", "sgx"] {
        if claims.get(tee).is_some_and(Value::is_object) {
            return (tee.to_owned(), evidence);
        }
    }
    ("external".to_owned(), evidence)
}

fn decode_json(part: &str) -> Result<Value, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| "not base64url".to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))
}

/// Verifies a token that is not this KBS's against the trusted issuers, at `now`.
pub(crate) fn verify_external(
    issuers: &[Arc<ExternalIssuer>],
    token: &str,
    now: u64,
) -> Result<VerifiedToken, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Invalid("token too large"));
    }
    let mut why = Vec::with_capacity(issuers.len());
    for issuer in issuers {
        match issuer.verify(token, now) {
            Ok(verified) => return Ok(verified),
            Err(Refusal::Refused(e)) => {
                tracing::info!(issuer = %issuer.name, error = %e, "external attestation token refused");
                return Err(e);
            }
            Err(Refusal::NotOurs(reason)) => why.push(format!("{}: {reason}", issuer.name)),
        }
    }
    Err(TokenError::Untrusted(format!(
        "not signed by this KBS's key nor by a trusted attestation service ({})",
        why.join("; ")
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
