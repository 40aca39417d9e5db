//! The public keys an external attestation service signs its tokens with, read from JWKs,
//! certificates or PEM public keys, and JWS signature checks with ring. HMAC (`HS*`) and
//! `none` are never accepted: a verification key here is always public.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{
    self, ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, RsaParameters, RsaPublicKeyComponents,
    UnparsedPublicKey,
};
use serde_json::Value;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::SubjectPublicKeyInfo;

/// JWS algorithms accepted (RFC 7518), all with public keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    /// ECDSA P-256 SHA-256.
    Es256,
    /// ECDSA P-384 SHA-384.
    Es384,
    /// RSASSA-PKCS1-v1_5 SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 SHA-512.
    Rs512,
    /// RSASSA-PSS SHA-256.
    Ps256,
    /// RSASSA-PSS SHA-384.
    Ps384,
    /// RSASSA-PSS SHA-512.
    Ps512,
    /// Ed25519.
    EdDsa,
}

impl Alg {
    /// The algorithm a JOSE `alg` names, if accepted.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "PS384" => Alg::Ps384,
            "PS512" => Alg::Ps512,
            "EdDSA" => Alg::EdDsa,
            _ => return None,
        })
    }

    fn rsa(self) -> Option<&'static RsaParameters> {
        Some(match self {
            Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
            Alg::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
            Alg::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
            _ => return None,
        })
    }
}

/// A public key, in a canonical form (two encodings of one key compare equal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicKey {
    /// P-256, uncompressed point.
    P256(Vec<u8>),
    /// P-384, uncompressed point.
    P384(Vec<u8>),
    /// RSA modulus and exponent, big-endian without leading zeros.
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
    },
    /// Ed25519.
    Ed25519(Vec<u8>),
}

fn strip(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[start..].to_vec()
}

/// JWK members are base64url without padding; tolerate padding.
fn b64url(v: &Value, member: &str) -> Result<Vec<u8>, String> {
    let text = v
        .get(member)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("JWK has no string `{member}`"))?;
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| format!("JWK `{member}` is not base64url"))
}

impl PublicKey {
    /// From a JWK (`kty` EC with `crv` P-256/P-384, RSA, or OKP Ed25519).
    pub fn from_jwk(jwk: &Value) -> Result<Self, String> {
        let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or_default();
        match kty {
            "EC" => {
                let (x, y) = (b64url(jwk, "x")?, b64url(jwk, "y")?);
                let (len, p256) = match jwk.get("crv").and_then(Value::as_str) {
                    Some("P-256") => (32, true),
                    Some("P-384") => (48, false),
                    other => return Err(format!("JWK curve {other:?} is not P-256 or P-384")),
                };
                if x.len() != len || y.len() != len {
                    return Err("JWK EC coordinates have the wrong length".into());
                }
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Ok(if p256 {
                    PublicKey::P256(point)
                } else {
                    PublicKey::P384(point)
                })
            }
            "RSA" => Ok(PublicKey::Rsa {
                n: strip(&b64url(jwk, "n")?),
                e: strip(&b64url(jwk, "e")?),
            }),
            "OKP" if jwk.get("crv").and_then(Value::as_str) == Some("Ed25519") => {
                Ok(PublicKey::Ed25519(b64url(jwk, "x")?))
            }
            other => Err(format!(
                "JWK key type {other:?} is not EC, RSA or OKP Ed25519"
            )),
        }
    }

    /// From a DER SubjectPublicKeyInfo.
    pub fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, String> {
        const ED25519: &str = "1.3.101.112";
        if spki.algorithm.algorithm.to_id_string() == ED25519 {
            return Ok(PublicKey::Ed25519(spki.subject_public_key.data.to_vec()));
        }
        match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => Ok(PublicKey::Rsa {
                n: strip(rsa.modulus),
                e: strip(rsa.exponent),
            }),
            Ok(x509_parser::public_key::PublicKey::EC(point)) => match point.data().len() {
                65 => Ok(PublicKey::P256(point.data().to_vec())),
                97 => Ok(PublicKey::P384(point.data().to_vec())),
                _ => Err("EC key is not an uncompressed P-256 or P-384 point".into()),
            },
            _ => Err("public key is not EC P-256/P-384, RSA or Ed25519".into()),
        }
    }

    /// The key of a DER certificate.
    pub fn from_certificate(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("certificate: {e}"))?;
        Self::from_spki(cert.public_key())
    }

    /// Whether this key can check `alg` signatures.
    pub fn fits(&self, alg: Alg) -> bool {
        matches!(
            (self, alg),
            (PublicKey::P256(_), Alg::Es256)
                | (PublicKey::P384(_), Alg::Es384)
                | (PublicKey::Ed25519(_), Alg::EdDsa)
                | (
                    PublicKey::Rsa { .. },
                    Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256 | Alg::Ps384 | Alg::Ps512
                )
        )
    }

    /// Checks a JWS signature (`signature` as the JWS carries it: `r || s` for ECDSA).
    pub fn verify(&self, alg: Alg, message: &[u8], signature: &[u8]) -> bool {
        if !self.fits(alg) {
            return false;
        }
        match self {
            PublicKey::P256(point) => UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                .verify(message, signature)
                .is_ok(),
            PublicKey::P384(point) => UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, point)
                .verify(message, signature)
                .is_ok(),
            PublicKey::Ed25519(key) => UnparsedPublicKey::new(&signature::ED25519, key)
                .verify(message, signature)
                .is_ok(),
            PublicKey::Rsa { n, e } => alg.rsa().is_some_and(|params| {
                RsaPublicKeyComponents { n, e }
                    .verify(params, message, signature)
                    .is_ok()
            }),
        }
    }
}

/// A key an issuer is trusted with, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedKey {
    /// The JWK's `kid`, if any.
    pub kid: Option<String>,
    /// The JWK's `alg`, if any: then only that algorithm is accepted with this key.
    pub alg: Option<Alg>,
    /// The key.
    pub key: PublicKey,
}

impl TrustedKey {
    /// Whether a token signed with `alg` (and naming `kid`, if it does) may use this key.
    pub fn admits(&self, alg: Alg, kid: Option<&str>) -> bool {
        self.key.fits(alg)
            && self.alg.is_none_or(|a| a == alg)
            && match (kid, &self.kid) {
                (Some(wanted), Some(have)) => wanted == have,
                // A certificate or PEM key has no id; a token without one may use any key.
                _ => true,
            }
    }
}

/// The keys of a JWK set (`{"keys": [...]}`) or of a single JWK. Keys of other types (a
/// symmetric `oct` key, an unknown curve) are skipped: they can never verify here.
pub fn keys_from_jwks(doc: &Value) -> Result<Vec<TrustedKey>, String> {
    let list: Vec<&Value> = match doc.get("keys") {
        Some(Value::Array(keys)) => keys.iter().collect(),
        Some(_) => return Err("`keys` is not an array".into()),
        None if doc.get("kty").is_some() => vec![doc],
        None => return Err("not a JWK set (no `keys`) nor a JWK (no `kty`)".into()),
    };
    let mut out = Vec::new();
    for jwk in list {
        let Ok(key) = PublicKey::from_jwk(jwk) else {
            continue;
        };
        let alg = match jwk.get("alg").and_then(Value::as_str) {
            Some(name) => match Alg::parse(name) {
                Some(alg) => Some(alg),
                None => continue,
            },
            None => None,
        };
        let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_owned);
        out.push(TrustedKey { kid, alg, key });
    }
    Ok(out)
}

/// What a PEM file configured for an issuer holds: certificates (DER) and public keys.
#[derive(Debug, Default)]
pub struct PemContents {
    /// `CERTIFICATE` blocks, DER.
    pub certificates: Vec<Vec<u8>>,
    /// `PUBLIC KEY` blocks.
    pub public_keys: Vec<PublicKey>,
}

/// Reads `CERTIFICATE` and `PUBLIC KEY` blocks from PEM text; anything else is an error
/// (a private key pasted into the wrong file should not pass silently).
pub fn read_pem(text: &[u8]) -> Result<PemContents, String> {
    let mut out = PemContents::default();
    for pem in x509_parser::pem::Pem::iter_from_buffer(text) {
        let pem = pem.map_err(|e| format!("PEM: {e}"))?;
        match pem.label.as_str() {
            "CERTIFICATE" => {
                PublicKey::from_certificate(&pem.contents)?;
                out.certificates.push(pem.contents);
            }
            "PUBLIC KEY" => {
                let (_, spki) = SubjectPublicKeyInfo::from_der(&pem.contents)
                    .map_err(|e| format!("public key: {e}"))?;
                out.public_keys.push(PublicKey::from_spki(&spki)?);
            }
            other => {
                return Err(format!(
                    "PEM block {other:?} is not CERTIFICATE or PUBLIC KEY"
                ));
            }
        }
    }
    if out.certificates.is_empty() && out.public_keys.is_empty() {
        return Err("no CERTIFICATE or PUBLIC KEY block".into());
    }
    Ok(out)
}

/// A base64 DER certificate from a JWK `x5c` (standard base64 per RFC 7517; upstream's
/// attestation service writes base64url: both are accepted).
pub fn x5c_der(text: &str) -> Result<Vec<u8>, String> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    STANDARD
        .decode(&compact)
        .or_else(|_| URL_SAFE_NO_PAD.decode(compact.trim_end_matches('=')))
        .map_err(|_| "x5c entry is not base64".to_string())
}
