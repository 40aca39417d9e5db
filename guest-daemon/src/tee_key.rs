//! The TEE key pair: the asymmetric key a guest binds into its attestation
//! evidence, and with which it opens the JWEs the KBS seals to it.
//!
//! Wire behaviour follows upstream guest-components (`kbs_protocol::keypair`
//! and `crypto::rust::{ec, rsa}`) and the sealing side in trustee's
//! `kbs/src/jwe`: the public key goes out as a JWK (`kbs_types::TeePubKey`),
//! the KBS answers with a flattened JWE JSON (`kbs_types::Response`) whose
//! content is A256GCM with AAD = base64url(protected header JSON).

use std::fmt;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use aes_kw::KekAes256;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kbs_types::{ProtectedHeader, Response, TeePubKey};
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use rand::RngCore;
use rand::rngs::OsRng;
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, Pkcs1v15Encrypt, RsaPrivateKey};
use sha2::Sha256;
use zeroize::Zeroizing;

/// JWA name of ECDH-ES with Concat KDF and an A256KW-wrapped CEK.
pub const ECDH_ES_A256KW: &str = "ECDH-ES+A256KW";
/// JWA name of RSAES-OAEP with SHA-256 and MGF1-SHA-256.
pub const RSA_OAEP_256: &str = "RSA-OAEP-256";
/// JWA name of RSAES-PKCS1-v1_5 (deprecated; accepted for old servers).
pub const RSA1_5: &str = "RSA1_5";
/// JWA name of direct use of a shared symmetric key (a tunnel's push key) as the CEK.
pub const DIR: &str = "dir";
/// JWA name of the only content encryption the KBS uses.
pub const A256GCM: &str = "A256GCM";
/// JWK curve name of P-256.
pub const P256_CURVE: &str = "P-256";

/// RSA modulus size for fresh keys, as upstream (`RSA_PUBKEY_LENGTH`).
const RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted from a PEM file.
const RSA_MAX_BITS: usize = 4096;
/// AES-256 key length in bytes (CEK and key-wrapping key).
const AES256_KEY_LEN: usize = 32;
/// AES-GCM nonce length in bytes.
const GCM_IV_LEN: usize = 12;
/// AES-GCM tag length in bytes.
const GCM_TAG_LEN: usize = 16;
/// AES-KW adds one 8-byte semiblock to the wrapped key.
const KW_OVERHEAD: usize = 8;

/// Which kind of TEE key to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyAlgorithm {
    /// EC P-256, sealed to with ECDH-ES+A256KW (upstream's default).
    #[default]
    EcP256,
    /// RSA 2048, sealed to with RSA-OAEP-256.
    Rsa2048,
}

/// Errors creating, loading or saving a TEE key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// RSA key generation failed.
    #[error("generate RSA key: {0}")]
    Generate(rsa::Error),
    /// The PEM is none of the supported private key encodings.
    #[error("private key PEM is not a P-256 or RSA key (tried PKCS#8, PKCS#1 and SEC1 encodings)")]
    UnrecognisedPem,
    /// The RSA key in the PEM has an unsupported modulus size.
    #[error("RSA key has {bits} bits; supported sizes are 2048 to 4096")]
    RsaSize {
        /// Modulus size of the rejected key.
        bits: usize,
    },
    /// Encoding the key to PKCS#8 PEM failed.
    #[error("encode private key as PKCS#8 PEM: {0}")]
    Encode(String),
}

/// Errors opening a JWE sealed to this key. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum UnsealError {
    /// The JWE bytes are not a flattened JWE JSON object.
    #[error("JWE is not valid JSON of the expected shape: {0}")]
    Json(serde_json::Error),
    /// A `dir` JWE (sealed to a tunnel's push key) arrived where no push key is held.
    #[error("JWE is sealed to a tunnel push key (`dir`), but this tunnel has none")]
    NoPushKey,
    /// The key management algorithm is not one this client supports.
    #[error("unsupported JWE key management algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The content encryption algorithm is not A256GCM.
    #[error("unsupported JWE content encryption {0:?} (only A256GCM is supported)")]
    UnsupportedEncryption(String),
    /// The JWE was sealed for another kind of key.
    #[error("JWE algorithm {alg} needs an {needs} key, but this TEE key is {have}")]
    KeyMismatch {
        /// The `alg` of the protected header.
        alg: String,
        /// Key kind the algorithm needs.
        needs: &'static str,
        /// Key kind of this TEE key.
        have: &'static str,
    },
    /// A protected header field is missing or is not a string.
    #[error("JWE protected header: `{0}` is missing or not a string")]
    HeaderField(&'static str),
    /// The ephemeral key names a curve other than P-256.
    #[error("JWE ephemeral key: unsupported curve {0:?}")]
    Curve(String),
    /// A base64url field failed to decode.
    #[error("JWE field `{0}` is not valid base64url")]
    Base64(&'static str),
    /// A field has the wrong length.
    #[error("JWE field `{field}` has {got} bytes, expected {expected}")]
    Length {
        /// Name of the field.
        field: &'static str,
        /// Length it should have.
        expected: usize,
        /// Length it has.
        got: usize,
    },
    /// The ephemeral public key is not a valid P-256 point.
    #[error("JWE ephemeral key is not a valid P-256 point")]
    EphemeralKey,
    /// AES key unwrap failed (wrong key or tampered `encrypted_key`).
    #[error("AES key unwrap of `encrypted_key` failed (wrong key or tampered JWE)")]
    KeyUnwrap,
    /// RSA decryption of the CEK failed.
    #[error("RSA decryption of `encrypted_key` failed (wrong key or tampered JWE)")]
    RsaDecrypt,
    /// The protected header could not be re-serialised into the AAD.
    #[error("JWE protected header cannot be serialised for the AAD")]
    Aad,
    /// AES-GCM authentication failed.
    #[error("JWE content failed authentication (wrong key or tampered JWE)")]
    Decrypt,
}

#[derive(Clone)]
enum Key {
    Ec(p256::SecretKey),
    Rsa(Box<RsaPrivateKey>),
}

/// The guest's TEE key pair (EC P-256 or RSA). `Debug` never prints the private key.
#[derive(Clone)]
pub struct TeeKeyPair {
    key: Key,
    /// The public JWK, derived once: on P-256 that is a scalar multiplication
    /// (~140 us), and it is sent with every attestation.
    public: TeePubKey,
}

impl fmt::Debug for TeeKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TeeKeyPair")
            .field("kind", &self.kind())
            .field("private", &"[redacted]")
            .finish()
    }
}

impl TeeKeyPair {
    /// A fresh key of the given algorithm.
    pub fn generate(alg: KeyAlgorithm) -> Result<Self, KeyError> {
        match alg {
            KeyAlgorithm::EcP256 => Ok(Self::new_ec()),
            KeyAlgorithm::Rsa2048 => Self::new_rsa(),
        }
    }

    /// A fresh EC P-256 key (the default, as upstream).
    pub fn new_ec() -> Self {
        Self::from_key(Key::Ec(p256::SecretKey::random(&mut OsRng)))
    }

    fn from_key(key: Key) -> Self {
        let public = public_jwk(&key);
        Self { key, public }
    }

    /// A fresh 2048-bit RSA key, advertised as RSA-OAEP-256.
    pub fn new_rsa() -> Result<Self, KeyError> {
        let key = RsaPrivateKey::new(&mut OsRng, RSA_BITS).map_err(KeyError::Generate)?;
        Ok(Self::from_key(Key::Rsa(Box::new(key))))
    }

    /// The algorithm of this key.
    pub fn algorithm(&self) -> KeyAlgorithm {
        match self.key {
            Key::Ec(_) => KeyAlgorithm::EcP256,
            Key::Rsa(_) => KeyAlgorithm::Rsa2048,
        }
    }

    fn kind(&self) -> &'static str {
        match self.key {
            Key::Ec(_) => "EC P-256",
            Key::Rsa(_) => "RSA",
        }
    }

    /// The public key as the JWK sent in `runtime-data.tee-pubkey`.
    pub fn export_pubkey(&self) -> TeePubKey {
        self.public.clone()
    }

    /// The private key as PKCS#8 PEM ("PRIVATE KEY"), for the daemon's state dir.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        use p256::pkcs8::{EncodePrivateKey as _, LineEnding};
        match &self.key {
            Key::Ec(secret) => secret
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| KeyError::Encode(e.to_string())),
            Key::Rsa(key) => {
                rsa::pkcs8::EncodePrivateKey::to_pkcs8_pem(key.as_ref(), LineEnding::LF)
                    .map_err(|e| KeyError::Encode(e.to_string()))
            }
        }
    }

    /// Load a private key from PEM: PKCS#8 (EC or RSA), PKCS#1 RSA (upstream's
    /// format for RSA keys) or SEC1 EC.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        use p256::pkcs8::DecodePrivateKey as _;
        use rsa::pkcs1::DecodeRsaPrivateKey as _;

        if let Ok(secret) = p256::SecretKey::from_pkcs8_pem(pem) {
            return Ok(Self::from_key(Key::Ec(secret)));
        }
        if let Ok(secret) = p256::SecretKey::from_sec1_pem(pem) {
            return Ok(Self::from_key(Key::Ec(secret)));
        }
        let rsa_key = RsaPrivateKey::from_pkcs8_pem(pem)
            .or_else(|_| RsaPrivateKey::from_pkcs1_pem(pem))
            .map_err(|_| KeyError::UnrecognisedPem)?;
        let bits = rsa_key.size() * 8;
        if !(RSA_BITS..=RSA_MAX_BITS).contains(&bits) {
            return Err(KeyError::RsaSize { bits });
        }
        Ok(Self::from_key(Key::Rsa(Box::new(rsa_key))))
    }

    /// Parse a flattened JWE JSON from bytes and open it.
    pub fn open_json(&self, jwe: &[u8]) -> Result<Zeroizing<Vec<u8>>, UnsealError> {
        self.open_json_with(jwe, None)
    }

    /// Like [`Self::open_json`], also opening JWEs sealed with `alg: dir` to `push_key` (the
    /// key a `tether.v2` tunnel challenge carried: only this TEE key could open it).
    pub fn open_json_with(
        &self,
        jwe: &[u8],
        push_key: Option<&[u8; AES256_KEY_LEN]>,
    ) -> Result<Zeroizing<Vec<u8>>, UnsealError> {
        self.open_json_parsed(jwe, push_key)
            .map(|(plaintext, _)| plaintext)
    }

    /// [`Self::open_json_with`], also returning the parsed JWE, whose protected header is
    /// authenticated once it opened (for the metadata a push binds in it).
    pub fn open_json_parsed(
        &self,
        jwe: &[u8],
        push_key: Option<&[u8; AES256_KEY_LEN]>,
    ) -> Result<(Zeroizing<Vec<u8>>, Response), UnsealError> {
        let (response, aad) = parse_flattened(jwe)?;
        if response.protected.alg == DIR {
            let key = push_key.ok_or(UnsealError::NoPushKey)?;
            if !response.encrypted_key.is_empty() {
                return Err(UnsealError::Length {
                    field: "encrypted_key",
                    expected: 0,
                    got: response.encrypted_key.len(),
                });
            }
            return Ok((decrypt_content(key, &response, &aad)?, response));
        }
        let plaintext = self.open_with_aad(&response, &aad)?;
        Ok((plaintext, response))
    }

    /// Open a JWE sealed to this key and return the plaintext. A parsed `Response` no longer
    /// holds the protected header as sent, so the AAD is its re-serialisation (kbs-types' way,
    /// right for what kbs-types writes); [`Self::open_json`] uses the header as sent.
    pub fn open(&self, response: &Response) -> Result<Zeroizing<Vec<u8>>, UnsealError> {
        let aad = response
            .protected
            .generate_aad()
            .map_err(|_| UnsealError::Aad)?;
        self.open_with_aad(response, &aad)
    }

    fn open_with_aad(
        &self,
        response: &Response,
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, UnsealError> {
        if response.protected.enc != A256GCM {
            return Err(UnsealError::UnsupportedEncryption(
                response.protected.enc.clone(),
            ));
        }
        // Check the cheap shape constraints before any private-key operation.
        fixed::<GCM_IV_LEN>("iv", &response.iv)?;
        fixed::<GCM_TAG_LEN>("tag", &response.tag)?;
        let cek = self.unwrap_cek(&response.protected, &response.encrypted_key)?;
        decrypt_content(&cek, response, aad)
    }

    /// Recover the content encryption key from `encrypted_key`.
    fn unwrap_cek(
        &self,
        header: &ProtectedHeader,
        encrypted_key: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, UnsealError> {
        match (header.alg.as_str(), &self.key) {
            (ECDH_ES_A256KW, Key::Ec(secret)) => ecdh_es_unwrap(secret, header, encrypted_key),
            (RSA_OAEP_256, Key::Rsa(key)) => {
                let cek = key
                    .decrypt(Oaep::new::<Sha256>(), encrypted_key)
                    .map_err(|_| UnsealError::RsaDecrypt)?;
                let cek = Zeroizing::new(cek);
                check_len("cek", &cek, AES256_KEY_LEN)?;
                Ok(cek)
            }
            (RSA1_5, Key::Rsa(key)) => {
                tracing::warn!("KBS sealed with deprecated RSA1_5 key transport");
                // RFC 7516 section 11.5: on a padding failure carry on with a
                // random CEK, so a bad padding and a bad tag look the same and
                // the error is no padding oracle.
                let mut cek = Zeroizing::new(vec![0u8; AES256_KEY_LEN]);
                OsRng.fill_bytes(&mut cek);
                if let Ok(plain) = key.decrypt(Pkcs1v15Encrypt, encrypted_key) {
                    let plain = Zeroizing::new(plain);
                    if plain.len() == AES256_KEY_LEN {
                        cek.copy_from_slice(&plain);
                    }
                }
                Ok(cek)
            }
            (ECDH_ES_A256KW, Key::Rsa(_)) => Err(self.mismatch(&header.alg, "EC")),
            (RSA_OAEP_256 | RSA1_5, Key::Ec(_)) => Err(self.mismatch(&header.alg, "RSA")),
            (other, _) => Err(UnsealError::UnsupportedAlgorithm(other.to_owned())),
        }
    }

    fn mismatch(&self, alg: &str, needs: &'static str) -> UnsealError {
        UnsealError::KeyMismatch {
            alg: alg.to_owned(),
            needs,
            have: self.kind(),
        }
    }
}

/// `bytes` as an array of exactly `N` bytes.
/// A flattened JWE JSON and its AAD: the `protected` member exactly as sent (RFC 7516 section
/// 5.2 step 14), not a re-serialisation of the parsed header, which another JOSE library's
/// member order would not survive. `encrypted_key` may be absent, as RFC 7516 section 7.2.1
/// wants it for `dir`.
fn parse_flattened(jwe: &[u8]) -> Result<(Response, Vec<u8>), UnsealError> {
    let mut value: serde_json::Value = serde_json::from_slice(jwe).map_err(UnsealError::Json)?;
    let aad = match value.get("protected") {
        Some(serde_json::Value::String(protected)) => protected.clone().into_bytes(),
        _ => return Err(UnsealError::HeaderField("protected")),
    };
    if let Some(members) = value.as_object_mut() {
        members
            .entry("encrypted_key")
            .or_insert_with(|| serde_json::Value::String(String::new()));
    }
    let response = serde_json::from_value(value).map_err(UnsealError::Json)?;
    Ok((response, aad))
}

/// A256GCM content decryption under `cek`, `aad` being the protected header.
fn decrypt_content(
    cek: &[u8],
    response: &Response,
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, UnsealError> {
    let header = &response.protected;
    if header.enc != A256GCM {
        return Err(UnsealError::UnsupportedEncryption(header.enc.clone()));
    }
    let iv: [u8; GCM_IV_LEN] = fixed("iv", &response.iv)?;
    let tag: [u8; GCM_TAG_LEN] = fixed("tag", &response.tag)?;
    let cipher = Aes256Gcm::new_from_slice(cek).map_err(|_| UnsealError::Length {
        field: "cek",
        expected: AES256_KEY_LEN,
        got: cek.len(),
    })?;
    let mut plaintext = Zeroizing::new(response.ciphertext.clone());
    cipher
        .decrypt_in_place_detached(
            &Nonce::from(iv),
            aad,
            plaintext.as_mut_slice(),
            &Tag::from(tag),
        )
        .map_err(|_| UnsealError::Decrypt)?;
    Ok(plaintext)
}

fn fixed<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N], UnsealError> {
    bytes.try_into().map_err(|_| UnsealError::Length {
        field,
        expected: N,
        got: bytes.len(),
    })
}

fn check_len(field: &'static str, bytes: &[u8], expected: usize) -> Result<(), UnsealError> {
    if bytes.len() == expected {
        Ok(())
    } else {
        Err(UnsealError::Length {
            field,
            expected,
            got: bytes.len(),
        })
    }
}

/// ECDH-ES+A256KW: agree with the header's `epk`, derive the key-wrapping key
/// with Concat KDF, then AES-KW unwrap the CEK.
/// The public JWK of a key.
fn public_jwk(key: &Key) -> TeePubKey {
    match key {
        Key::Ec(secret) => {
            let point = secret.public_key().to_encoded_point(false);
            // An uncompressed point of a valid public key always has both
            // coordinates; empty strings would only make the KBS reject it.
            let coord = |c: Option<&p256::FieldBytes>| {
                c.map(|b| URL_SAFE_NO_PAD.encode(b)).unwrap_or_default()
            };
            TeePubKey::EC {
                crv: P256_CURVE.to_owned(),
                alg: ECDH_ES_A256KW.to_owned(),
                x: coord(point.x()),
                y: coord(point.y()),
            }
        }
        Key::Rsa(key) => TeePubKey::RSA {
            alg: RSA_OAEP_256.to_owned(),
            k_mod: URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
            k_exp: URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
        },
    }
}

fn ecdh_es_unwrap(
    secret: &p256::SecretKey,
    header: &ProtectedHeader,
    encrypted_key: &[u8],
) -> Result<Zeroizing<Vec<u8>>, UnsealError> {
    let epk = header
        .other_fields
        .get("epk")
        .ok_or(UnsealError::HeaderField("epk"))?;
    let field = |name: &'static str| -> Result<&str, UnsealError> {
        epk.get(name)
            .and_then(|v| v.as_str())
            .ok_or(UnsealError::HeaderField(name))
    };
    let crv = field("crv")?;
    if crv != P256_CURVE {
        return Err(UnsealError::Curve(crv.to_owned()));
    }
    if epk.get("kty").is_some_and(|kty| kty.as_str() != Some("EC")) {
        return Err(UnsealError::HeaderField("kty"));
    }
    let x = decode_coordinate("epk.x", field("x")?)?;
    let y = decode_coordinate("epk.y", field("y")?)?;

    let point = p256::EncodedPoint::from_affine_coordinates(&x, &y, false);
    let epk: p256::PublicKey = Option::from(p256::PublicKey::from_encoded_point(&point))
        .ok_or(UnsealError::EphemeralKey)?;
    let shared = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), epk.as_affine());

    let kek = concat_kdf_a256kw(shared.raw_secret_bytes())?;

    // AES-KW needs at least two semiblocks of output; a 32-byte CEK is 40 bytes wrapped.
    let expected = AES256_KEY_LEN + KW_OVERHEAD;
    check_len("encrypted_key", encrypted_key, expected)?;
    let mut cek = Zeroizing::new(vec![0u8; AES256_KEY_LEN]);
    KekAes256::from(*kek)
        .unwrap(encrypted_key, &mut cek)
        .map_err(|_| UnsealError::KeyUnwrap)?;
    Ok(cek)
}

fn decode_coordinate(field: &'static str, b64: &str) -> Result<p256::FieldBytes, UnsealError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|_| UnsealError::Base64(field))?;
    Ok(p256::FieldBytes::from(fixed::<32>(field, &bytes)?))
}

/// The ECDH-ES+A256KW key-wrapping key: Concat KDF with alg id, empty apu and apv, and a
/// 256-bit key (RFC 7518 section 4.6.2; what guest-components' `ec.rs` derives).
fn concat_kdf_a256kw(z: &[u8]) -> Result<Zeroizing<[u8; 32]>, UnsealError> {
    let mut kek = Zeroizing::new([0u8; AES256_KEY_LEN]);
    concat_kdf(z, ECDH_ES_A256KW, b"", b"", kek.as_mut())?;
    Ok(kek)
}

/// Concat KDF (NIST SP 800-56A, SHA-256) filling `key`, OtherInfo as RFC 7518 section 4.6.2
/// builds it: AlgorithmID, PartyUInfo, PartyVInfo (each length-prefixed), key length in bits.
fn concat_kdf(
    z: &[u8],
    alg: &str,
    apu: &[u8],
    apv: &[u8],
    key: &mut [u8],
) -> Result<(), UnsealError> {
    let too_long = || UnsealError::HeaderField("apu/apv");
    let bits = u32::try_from(key.len() * 8).map_err(|_| too_long())?;
    let mut other_info = Vec::new();
    for part in [alg.as_bytes(), apu, apv] {
        let len = u32::try_from(part.len()).map_err(|_| too_long())?;
        other_info.extend_from_slice(&len.to_be_bytes());
        other_info.extend_from_slice(part);
    }
    other_info.extend_from_slice(&bits.to_be_bytes());
    ::concat_kdf::derive_key_into::<Sha256>(z, &other_info, key).map_err(|_| UnsealError::KeyUnwrap)
}

/// The sealing side, written after trustee's `kbs/src/jwe`, so tests here and
/// in the client tests can build JWEs the way the KBS does.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod seal {
    use super::*;
    use rsa::{BigUint, RsaPublicKey};
    use serde_json::{Map, json};

    fn content(
        protected: ProtectedHeader,
        encrypted_key: Vec<u8>,
        cek: &[u8],
        plain: &[u8],
    ) -> Response {
        let cipher = Aes256Gcm::new_from_slice(cek).unwrap();
        let mut iv = [0u8; GCM_IV_LEN];
        OsRng.fill_bytes(&mut iv);
        let aad = protected.generate_aad().unwrap();
        let mut ciphertext = plain.to_vec();
        let tag = cipher
            .encrypt_in_place_detached(&Nonce::from(iv), &aad, &mut ciphertext)
            .unwrap();
        Response {
            protected,
            encrypted_key,
            aad: None,
            iv: iv.to_vec(),
            ciphertext,
            tag: tag.to_vec(),
        }
    }

    fn random_cek() -> [u8; 32] {
        let mut cek = [0u8; 32];
        OsRng.fill_bytes(&mut cek);
        cek
    }

    /// Seal `plain` to `pubkey`, choosing the algorithm the key asks for.
    pub(crate) fn seal(pubkey: &TeePubKey, plain: &[u8]) -> Response {
        seal_bound(pubkey, plain, &Map::new())
    }

    /// [`seal`] with `bound` added to the protected header, as the KBS binds push metadata.
    pub(crate) fn seal_bound(
        pubkey: &TeePubKey,
        plain: &[u8],
        bound: &Map<String, serde_json::Value>,
    ) -> Response {
        match pubkey {
            TeePubKey::EC { crv, alg, x, y } => {
                assert_eq!((crv.as_str(), alg.as_str()), (P256_CURVE, ECDH_ES_A256KW));
                let x: [u8; 32] = URL_SAFE_NO_PAD.decode(x).unwrap().try_into().unwrap();
                let y: [u8; 32] = URL_SAFE_NO_PAD.decode(y).unwrap().try_into().unwrap();
                let point =
                    p256::EncodedPoint::from_affine_coordinates(&x.into(), &y.into(), false);
                let tee_pk = p256::PublicKey::from_encoded_point(&point).unwrap();
                let eph = p256::ecdh::EphemeralSecret::random(&mut OsRng);
                let z = eph.diffie_hellman(&tee_pk);
                // The library's KDF with the OtherInfo spelled out, not the opener's code.
                let other_info = b"\0\0\0\x0eECDH-ES+A256KW\0\0\0\0\0\0\0\0\0\0\x01\0";
                let mut kek = Zeroizing::new([0u8; 32]);
                ::concat_kdf::derive_key_into::<Sha256>(
                    z.raw_secret_bytes(),
                    other_info,
                    &mut *kek,
                )
                .unwrap();
                let cek = random_cek();
                let mut wrapped = vec![0u8; 40];
                KekAes256::from(*kek).wrap(&cek, &mut wrapped).unwrap();
                let epk = eph.public_key().to_encoded_point(false);
                let mut other_fields = json!({"epk": {
                    "crv": P256_CURVE,
                    "kty": "EC",
                    "x": URL_SAFE_NO_PAD.encode(epk.x().unwrap()),
                    "y": URL_SAFE_NO_PAD.encode(epk.y().unwrap()),
                }})
                .as_object()
                .unwrap()
                .clone();
                other_fields.extend(bound.clone());
                let protected = ProtectedHeader {
                    alg: ECDH_ES_A256KW.into(),
                    enc: A256GCM.into(),
                    other_fields,
                };
                content(protected, wrapped, &cek, plain)
            }
            TeePubKey::RSA { alg, k_mod, k_exp } => seal_rsa_bound(alg, k_mod, k_exp, plain, bound),
            TeePubKey::AKP { .. } => panic!("AKP keys are not used here"),
        }
    }

    /// Seal with an explicit RSA padding (`RSA-OAEP-256` or `RSA1_5`).
    pub(crate) fn seal_rsa(alg: &str, k_mod: &str, k_exp: &str, plain: &[u8]) -> Response {
        seal_rsa_bound(alg, k_mod, k_exp, plain, &Map::new())
    }

    fn seal_rsa_bound(
        alg: &str,
        k_mod: &str,
        k_exp: &str,
        plain: &[u8],
        bound: &Map<String, serde_json::Value>,
    ) -> Response {
        let n = BigUint::from_bytes_be(&URL_SAFE_NO_PAD.decode(k_mod).unwrap());
        let e = BigUint::from_bytes_be(&URL_SAFE_NO_PAD.decode(k_exp).unwrap());
        let pk = RsaPublicKey::new(n, e).unwrap();
        let cek = random_cek();
        let wrapped = match alg {
            RSA_OAEP_256 => pk.encrypt(&mut OsRng, Oaep::new::<Sha256>(), &cek).unwrap(),
            RSA1_5 => pk.encrypt(&mut OsRng, Pkcs1v15Encrypt, &cek).unwrap(),
            other => panic!("unexpected alg {other}"),
        };
        let protected = ProtectedHeader {
            alg: alg.into(),
            enc: A256GCM.into(),
            other_fields: bound.clone(),
        };
        content(protected, wrapped, &cek, plain)
    }

    /// Seal with `key` used directly as the CEK (`alg: dir`, a tunnel's push key).
    pub(crate) fn seal_dir(key: &[u8; 32], plain: &[u8]) -> Response {
        let protected = ProtectedHeader {
            alg: DIR.into(),
            enc: A256GCM.into(),
            other_fields: Map::new(),
        };
        content(protected, Vec::new(), key, plain)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::seal::{seal, seal_rsa};
    use super::*;
    use std::sync::OnceLock;

    const SECRET: &[u8] = b"the resource plaintext \x00\xff";

    /// RSA key generation is slow in debug builds: share one key.
    fn rsa_key() -> &'static TeeKeyPair {
        static KEY: OnceLock<TeeKeyPair> = OnceLock::new();
        KEY.get_or_init(|| TeeKeyPair::new_rsa().unwrap())
    }

    fn rsa_parts(key: &TeeKeyPair) -> (String, String) {
        match key.export_pubkey() {
            TeePubKey::RSA { k_mod, k_exp, .. } => (k_mod, k_exp),
            other => panic!("not RSA: {other:?}"),
        }
    }

    #[test]
    fn ec_pubkey_is_p256_jwk() {
        let key = TeeKeyPair::new_ec();
        let TeePubKey::EC { crv, alg, x, y } = key.export_pubkey() else {
            panic!("not EC");
        };
        assert_eq!(crv, "P-256");
        assert_eq!(alg, "ECDH-ES+A256KW");
        assert_eq!(URL_SAFE_NO_PAD.decode(&x).unwrap().len(), 32);
        assert_eq!(URL_SAFE_NO_PAD.decode(&y).unwrap().len(), 32);
        let json = serde_json::to_value(key.export_pubkey()).unwrap();
        assert_eq!(json["kty"], "EC");
    }

    #[test]
    fn rsa_pubkey_is_oaep_jwk() {
        let TeePubKey::RSA { alg, k_mod, k_exp } = rsa_key().export_pubkey() else {
            panic!("not RSA");
        };
        assert_eq!(alg, "RSA-OAEP-256");
        assert_eq!(URL_SAFE_NO_PAD.decode(&k_mod).unwrap().len(), 256);
        assert_eq!(URL_SAFE_NO_PAD.decode(&k_exp).unwrap(), vec![1, 0, 1]);
        assert!(!k_mod.contains('='));
    }

    #[test]
    fn ec_round_trip() {
        let key = TeeKeyPair::new_ec();
        let jwe = seal(&key.export_pubkey(), SECRET);
        assert_eq!(key.open(&jwe).unwrap().as_slice(), SECRET);
    }

    #[test]
    fn ec_round_trip_through_json() {
        let key = TeeKeyPair::new_ec();
        let json = serde_json::to_vec(&seal(&key.export_pubkey(), SECRET)).unwrap();
        assert_eq!(key.open_json(&json).unwrap().as_slice(), SECRET);
    }

    #[test]
    fn empty_plaintext_round_trip() {
        let key = TeeKeyPair::new_ec();
        let jwe = seal(&key.export_pubkey(), b"");
        assert!(key.open(&jwe).unwrap().is_empty());
    }

    #[test]
    fn rsa_oaep_round_trip() {
        let key = rsa_key();
        let jwe = seal(&key.export_pubkey(), SECRET);
        assert_eq!(jwe.protected.alg, RSA_OAEP_256);
        assert_eq!(key.open(&jwe).unwrap().as_slice(), SECRET);
    }

    #[test]
    fn rsa1_5_round_trip() {
        let key = rsa_key();
        let (n, e) = rsa_parts(key);
        let jwe = seal_rsa(RSA1_5, &n, &e, SECRET);
        assert_eq!(key.open(&jwe).unwrap().as_slice(), SECRET);
    }

    #[test]
    fn rsa1_5_bad_padding_is_an_authentication_failure() {
        let key = rsa_key();
        let (n, e) = rsa_parts(key);
        let mut jwe = seal_rsa(RSA1_5, &n, &e, SECRET);
        jwe.encrypted_key[10] ^= 0x40;
        assert!(matches!(key.open(&jwe), Err(UnsealError::Decrypt)));
    }

    #[test]
    fn tampered_ciphertext_tag_iv_header_are_rejected() {
        let key = TeeKeyPair::new_ec();
        let good = seal(&key.export_pubkey(), SECRET);

        let mut jwe = good.clone();
        jwe.ciphertext[0] ^= 1;
        assert!(matches!(key.open(&jwe), Err(UnsealError::Decrypt)));

        let mut jwe = good.clone();
        jwe.tag[15] ^= 1;
        assert!(matches!(key.open(&jwe), Err(UnsealError::Decrypt)));

        let mut jwe = good.clone();
        jwe.iv[0] ^= 1;
        assert!(matches!(key.open(&jwe), Err(UnsealError::Decrypt)));

        // The AAD covers the protected header: an added field breaks the tag.
        let mut jwe = good.clone();
        jwe.protected
            .other_fields
            .insert("kid".into(), serde_json::json!("x"));
        assert!(matches!(key.open(&jwe), Err(UnsealError::Decrypt)));

        let mut jwe = good.clone();
        jwe.encrypted_key[0] ^= 1;
        assert!(matches!(key.open(&jwe), Err(UnsealError::KeyUnwrap)));
    }

    #[test]
    fn tampered_rsa_oaep_key_is_rejected() {
        let key = rsa_key();
        let mut jwe = seal(&key.export_pubkey(), SECRET);
        jwe.encrypted_key[3] ^= 1;
        assert!(matches!(key.open(&jwe), Err(UnsealError::RsaDecrypt)));
    }

    #[test]
    fn other_keys_cannot_open() {
        let key = TeeKeyPair::new_ec();
        let other = TeeKeyPair::new_ec();
        let jwe = seal(&key.export_pubkey(), SECRET);
        assert!(matches!(other.open(&jwe), Err(UnsealError::KeyUnwrap)));
        assert!(matches!(
            rsa_key().open(&jwe),
            Err(UnsealError::KeyMismatch { needs: "EC", .. })
        ));
        let jwe = seal(&rsa_key().export_pubkey(), SECRET);
        assert!(matches!(
            key.open(&jwe),
            Err(UnsealError::KeyMismatch { needs: "RSA", .. })
        ));
    }

    #[test]
    fn hostile_shapes_are_errors_not_panics() {
        let key = TeeKeyPair::new_ec();
        let good = seal(&key.export_pubkey(), SECRET);

        let mut jwe = good.clone();
        jwe.iv.push(0);
        assert!(matches!(
            key.open(&jwe),
            Err(UnsealError::Length { field: "iv", .. })
        ));

        let mut jwe = good.clone();
        jwe.tag.truncate(3);
        assert!(matches!(
            key.open(&jwe),
            Err(UnsealError::Length { field: "tag", .. })
        ));

        for len in [0, 7, 8, 16, 39, 41, 48] {
            let mut jwe = good.clone();
            jwe.encrypted_key.resize(len, 0);
            assert!(key.open(&jwe).is_err(), "encrypted_key of {len} bytes");
        }

        let mut jwe = good.clone();
        jwe.protected.enc = "A128CBC-HS256".into();
        assert!(matches!(
            key.open(&jwe),
            Err(UnsealError::UnsupportedEncryption(_))
        ));

        let mut jwe = good.clone();
        jwe.protected.alg = "dir".into();
        assert!(matches!(
            key.open(&jwe),
            Err(UnsealError::UnsupportedAlgorithm(_))
        ));

        fn epk(jwe: &mut Response) -> &mut serde_json::Map<String, serde_json::Value> {
            jwe.protected
                .other_fields
                .get_mut("epk")
                .unwrap()
                .as_object_mut()
                .unwrap()
        }

        let mut jwe = good.clone();
        jwe.protected.other_fields.remove("epk");
        assert!(matches!(
            key.open(&jwe),
            Err(UnsealError::HeaderField("epk"))
        ));

        let mut jwe = good.clone();
        epk(&mut jwe).insert("crv".into(), "P-521".into());
        assert!(matches!(key.open(&jwe), Err(UnsealError::Curve(_))));

        let mut jwe = good.clone();
        epk(&mut jwe).insert("x".into(), "!!not base64!!".into());
        assert!(matches!(key.open(&jwe), Err(UnsealError::Base64("epk.x"))));

        let mut jwe = good.clone();
        epk(&mut jwe).insert("y".into(), serde_json::json!(42));
        assert!(matches!(key.open(&jwe), Err(UnsealError::HeaderField("y"))));

        let mut jwe = good.clone();
        epk(&mut jwe).insert("x".into(), URL_SAFE_NO_PAD.encode([7u8; 31]).into());
        assert!(matches!(
            key.open(&jwe),
            Err(UnsealError::Length { field: "epk.x", .. })
        ));

        // A point that is not on the curve.
        let mut jwe = good.clone();
        epk(&mut jwe).insert("y".into(), URL_SAFE_NO_PAD.encode([1u8; 32]).into());
        assert!(matches!(key.open(&jwe), Err(UnsealError::EphemeralKey)));

        // Coordinates of the field modulus are out of range.
        let p = [0xffu8; 32];
        let mut jwe = good.clone();
        epk(&mut jwe).insert("x".into(), URL_SAFE_NO_PAD.encode(p).into());
        assert!(matches!(key.open(&jwe), Err(UnsealError::EphemeralKey)));

        let rsa = rsa_key();
        for len in [0, 1, 255, 257, 1024] {
            let mut jwe = seal(&rsa.export_pubkey(), SECRET);
            jwe.encrypted_key.resize(len, 0);
            assert!(rsa.open(&jwe).is_err(), "RSA encrypted_key of {len} bytes");
        }
    }

    #[test]
    fn open_json_rejects_malformed_input() {
        let key = TeeKeyPair::new_ec();
        for bad in [
            &b""[..],
            b"{}",
            b"[1,2]",
            b"\xff\xfe",
            br#"{"protected":"!!","encrypted_key":"","iv":"","ciphertext":"","tag":""}"#,
            br#"{"protected":"e30","encrypted_key":"","iv":"","ciphertext":"","tag":""}"#,
        ] {
            assert!(key.open_json(bad).is_err());
        }
    }

    #[test]
    fn pem_round_trip_ec() {
        let key = TeeKeyPair::new_ec();
        let pem = key.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let back = TeeKeyPair::from_pem(&pem).unwrap();
        assert_eq!(
            serde_json::to_value(back.export_pubkey()).unwrap(),
            serde_json::to_value(key.export_pubkey()).unwrap()
        );
        let jwe = seal(&key.export_pubkey(), SECRET);
        assert_eq!(back.open(&jwe).unwrap().as_slice(), SECRET);
    }

    #[test]
    fn pem_round_trip_rsa_and_pkcs1() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        let key = rsa_key();
        let pem = key.to_pkcs8_pem().unwrap();
        let back = TeeKeyPair::from_pem(&pem).unwrap();
        assert_eq!(back.algorithm(), KeyAlgorithm::Rsa2048);
        let jwe = seal(&key.export_pubkey(), SECRET);
        assert_eq!(back.open(&jwe).unwrap().as_slice(), SECRET);

        // Upstream stores RSA keys as PKCS#1.
        let Key::Rsa(inner) = &key.key else { panic!() };
        let pkcs1 = inner.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        let back = TeeKeyPair::from_pem(&pkcs1).unwrap();
        assert_eq!(back.open(&jwe).unwrap().as_slice(), SECRET);
    }

    #[test]
    fn pem_rejects_garbage_and_small_rsa() {
        assert!(matches!(
            TeeKeyPair::from_pem("not a pem"),
            Err(KeyError::UnrecognisedPem)
        ));
        let small = RsaPrivateKey::new(&mut OsRng, 1024).unwrap();
        let pem =
            rsa::pkcs8::EncodePrivateKey::to_pkcs8_pem(&small, rsa::pkcs8::LineEnding::LF).unwrap();
        assert!(matches!(
            TeeKeyPair::from_pem(&pem),
            Err(KeyError::RsaSize { bits: 1024 })
        ));
    }

    #[test]
    fn debug_redacts_private_key() {
        let key = TeeKeyPair::new_ec();
        let dbg = format!("{key:?}");
        assert!(dbg.contains("[redacted]"));
        let pem = key.to_pkcs8_pem().unwrap();
        let body: String = pem.lines().nth(1).unwrap().chars().take(20).collect();
        assert!(!dbg.contains(&body));
    }

    #[test]
    fn concat_kdf_matches_rfc7518_appendix_c() {
        // Z of Alice's ephemeral key and Bob's key; an A128GCM key with apu "Alice", apv "Bob".
        let z = [
            158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49,
            110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196,
        ];
        let mut key = [0u8; 16];
        concat_kdf(&z, "A128GCM", b"Alice", b"Bob", &mut key).unwrap();
        assert_eq!(URL_SAFE_NO_PAD.encode(key), "VqqN6vgjbSBcIijNcacQGg");
        // The A256KW key of the same Z (computed apart: Python's hashlib over the OtherInfo).
        assert_eq!(
            hex::encode(*concat_kdf_a256kw(&z).unwrap()),
            "89ab838633757805bd678cb164f2427776824e8f784152f23747096449921f46"
        );
    }

    /// RFC 7518 Appendix C's Bob, as a TEE key.
    fn bob() -> TeeKeyPair {
        let d = URL_SAFE_NO_PAD
            .decode("VEmDZpDXXK8p8N0Cndsxs924q6nS1RXFASRl6BfUqdw")
            .unwrap();
        let secret = p256::SecretKey::from_slice(&d).unwrap();
        let pem = p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&secret, Default::default()).unwrap();
        TeeKeyPair::from_pem(&pem).unwrap()
    }

    /// A JWE panva/jose sealed to Bob with Appendix C's Alice as the ephemeral key, CEK
    /// 00..1f, IV 00..0b (tests/jose/interop.mjs `golden`). Its `epk` members are in jose's
    /// order (x, crv, kty, y), so only an opener that takes the header as sent opens it.
    const JOSE_GOLDEN: &str = concat!(
        r#"{"ciphertext":"E2eic6CX4nziLfPu38kyOsY","iv":"AAECAwQFBgcICQoL","tag":"kDV6ZbaC8QWkBC6pKtBfFA","#,
        r#""encrypted_key":"T0NVWKoWucQiDmmVc2dmvQ8xVyt-7o5H1C0MnaCf5KFFpsfACs-0RQ","#,
        r#""protected":"eyJhbGciOiJFQ0RILUVTK0EyNTZLVyIsImVuYyI6IkEyNTZHQ00iLCJlcGsiOnsieCI6ImdJMEdBSUxCZHU3VDUzYWtyRm1NeUdjc0YzbjVkTzdNbXdOQkhLVzVTVjAiLCJjcnYiOiJQLTI1NiIsImt0eSI6IkVDIiwieSI6IlNMV194U2ZmemxQV3JIRVZJMzBESE1fNGVnVnd0M05RcWVVRDduTUZwcHMifX0"}"#,
    );

    #[test]
    fn a_jwe_sealed_by_jose_with_a_fixed_ephemeral_key_opens() {
        let bob = bob();
        assert_eq!(
            bob.open_json(JOSE_GOLDEN.as_bytes()).unwrap().as_slice(),
            b"Tether golden JWE"
        );
        // The same JWE parsed (its header re-serialised in sorted order) no longer
        // authenticates: the AAD is the header as sent.
        let parsed: Response = serde_json::from_str(JOSE_GOLDEN).unwrap();
        assert!(matches!(bob.open(&parsed), Err(UnsealError::Decrypt)));
        // One flipped bit of the header as sent is refused.
        let tampered = JOSE_GOLDEN.replace("eyJhbGciOiJFQ0RILUVTK0", "eyJhbGciOiJFQ0RILUVTK1");
        assert!(bob.open_json(tampered.as_bytes()).is_err());
    }

    #[test]
    fn a_dir_jwe_without_encrypted_key_opens_with_the_push_key() {
        // RFC 7516 section 7.2.1: `encrypted_key` is absent when empty, as jose writes `dir`.
        let key = [7u8; 32];
        let sealed = seal::seal_dir(&key, b"pushed");
        let mut json: serde_json::Value = serde_json::to_value(&sealed).unwrap();
        json.as_object_mut().unwrap().remove("encrypted_key");
        let wire = serde_json::to_vec(&json).unwrap();
        let opened = bob().open_json_with(&wire, Some(&key)).unwrap();
        assert_eq!(opened.as_slice(), b"pushed");
        assert!(matches!(
            bob().open_json_with(&wire, Some(&[8u8; 32])),
            Err(UnsealError::Decrypt)
        ));
    }
}
