//! ES256 JWS compact signing and verification with `ring` (P-256, SHA-256, JWS `r || s`).
//!
//! The attestation token is signed once per handshake and, in passport mode, verified on
//! every resource request. RustCrypto's P-256 through `jsonwebtoken` cost ~560 us per
//! signature and ~380 us per verification on this machine (it also re-derives the public
//! key from the PKCS#8 document on each call); ring does the same in a fraction of that.
//! The output is the same JWS compact form `jsonwebtoken::encode` produces (the header is
//! serialised once with serde_json, as jsonwebtoken does), and the checks on verification
//! mirror `jsonwebtoken::decode` with an ES256-only `Validation` requiring `exp`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};
use serde_json::Value;

/// The only algorithm accepted.
const ALG: &str = "ES256";
/// Length of a fixed-size P-256 signature (`r || s`).
const SIGNATURE_LEN: usize = 64;

/// Why a token did not verify, in `jsonwebtoken`'s terms.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum VerifyFailure {
    /// Not three base64url parts, or a header/payload that is not a JSON object.
    Malformed,
    /// The header's `alg` is not ES256 (including `none`).
    Algorithm,
    /// The signature does not verify under the key.
    Signature,
    /// No numeric `exp` claim.
    MissingExp,
    /// `exp` (plus the leeway) is in the past.
    Expired,
}

/// A P-256 signing key with its precomputed JWS header.
pub(super) struct Es256Key {
    pair: EcdsaKeyPair,
    public: UnparsedPublicKey<Vec<u8>>,
    rng: SystemRandom,
    /// base64url of the header JSON, the first part of every token.
    header_b64: String,
}

impl Es256Key {
    /// `private` is the 32-byte scalar, `public` the 65-byte uncompressed point,
    /// `header_json` the JOSE header exactly as it goes on the wire.
    pub fn new(
        private: &[u8],
        public: &[u8],
        header_json: &[u8],
    ) -> Result<Self, ring::error::KeyRejected> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            private,
            public,
            &rng,
        )?;
        Ok(Self {
            pair,
            public: UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public.to_vec()),
            rng,
            header_b64: URL_SAFE_NO_PAD.encode(header_json),
        })
    }

    /// `header.payload.signature` for the serialised claims.
    pub fn sign(&self, claims_json: &[u8]) -> Result<String, ring::error::Unspecified> {
        let mut token = String::with_capacity(
            self.header_b64.len() + claims_json.len().div_ceil(3) * 4 + SIGNATURE_LEN * 2,
        );
        token.push_str(&self.header_b64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(claims_json, &mut token);
        let signature = self.pair.sign(&self.rng, token.as_bytes())?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut token);
        Ok(token)
    }

    /// Checks a compact JWS as `jsonwebtoken::decode` would (same order of checks: header,
    /// algorithm, signature, then `exp` with `leeway` seconds at time `now`) and returns
    /// its claims.
    pub fn verify(&self, token: &str, now: u64, leeway: u64) -> Result<Value, VerifyFailure> {
        let (message, signature) = token.rsplit_once('.').ok_or(VerifyFailure::Malformed)?;
        let (header, payload) = message.split_once('.').ok_or(VerifyFailure::Malformed)?;
        if payload.contains('.') {
            return Err(VerifyFailure::Malformed);
        }
        let header: Value = decode_json(header)?;
        let alg = header
            .as_object()
            .ok_or(VerifyFailure::Malformed)?
            .get("alg")
            .ok_or(VerifyFailure::Malformed)?;
        if alg.as_str() != Some(ALG) {
            return Err(VerifyFailure::Algorithm);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| VerifyFailure::Malformed)?;
        self.public
            .verify(message.as_bytes(), &signature)
            .map_err(|_| VerifyFailure::Signature)?;
        let claims: Value = decode_json(payload)?;
        if !claims.is_object() {
            return Err(VerifyFailure::Malformed);
        }
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or(VerifyFailure::MissingExp)?;
        if exp < now.saturating_sub(leeway) {
            return Err(VerifyFailure::Expired);
        }
        Ok(claims)
    }
}

fn decode_json(part: &str) -> Result<Value, VerifyFailure> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| VerifyFailure::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| VerifyFailure::Malformed)
}
