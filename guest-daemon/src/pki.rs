//! `guest-daemon pki-sign`: a key generated in the guest (Ed25519 or P-256, rcgen), a CSR
//! naming the guest's attested identity (CN = guest id; SANs: the guest id when it is a DNS
//! name, `[tether] name`, `[tether] ip`), certified by the KBS's `pki` plugin
//! (`POST /kbs/v0/pki/sign`) in this client's attested session. The answer comes sealed to
//! the TEE key (a JWE, opened here): a certificate is only usable by the TEE that asked. The
//! key never leaves the guest; it is written 0600, atomically, next to the certificate and
//! the CA.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::rcar::{KbsClient, RcarError};

/// Path of the sign endpoint under `/kbs/v0/`.
pub const SIGN_PATH: &str = "pki/sign";
/// File names written by [`write_out`].
pub const KEY_FILE: &str = "key.pem";
/// Certificate file name.
pub const CERT_FILE: &str = "cert.pem";
/// CA certificate file name.
pub const CA_FILE: &str = "ca.pem";

/// Key type of the guest-generated key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PkiKeyType {
    /// Ed25519.
    Ed25519,
    /// ECDSA P-256 with SHA-256.
    P256,
}

/// Why a sign failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiSignError {
    /// Attestation or the request failed (status and KBS detail included).
    #[error(transparent)]
    Kbs(#[from] RcarError),
    /// The token names no identity usable in a CSR.
    #[error("the attestation token: {0}")]
    Token(String),
    /// Key or CSR generation failed.
    #[error("generate the key or CSR: {0}")]
    Generate(#[from] rcgen::Error),
    /// The KBS answered 200 with something else than the documented body.
    #[error("POST /kbs/v0/{SIGN_PATH}: malformed reply: {0}")]
    BadReply(String),
    /// The answer did not open with this client's TEE key.
    #[error("POST /kbs/v0/{SIGN_PATH}: the answer does not open with the TEE key: {0}")]
    Unseal(#[from] crate::tee_key::UnsealError),
    /// Writing the files failed.
    #[error("write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// The attested identity as the token states it (`tether` claims).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct AttestedIdentity {
    /// Guest id.
    pub guest_id: String,
    /// `[tether] name`.
    #[serde(default)]
    pub name: Option<String>,
    /// `[tether] ip`.
    #[serde(default)]
    pub ip: Option<IpAddr>,
}

impl AttestedIdentity {
    /// The identity in a token's claims (payload not verified: the KBS checks the CSR
    /// against the verified token anyway; this only chooses what to ask for).
    pub fn from_token(token: &str) -> Result<Self, PkiSignError> {
        let payload = token
            .split('.')
            .nth(1)
            .ok_or_else(|| PkiSignError::Token("not a JWT".into()))?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|e| PkiSignError::Token(format!("payload: {e}")))?;
        let claims: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| PkiSignError::Token(format!("payload: {e}")))?;
        let tether = claims
            .get("tether")
            .ok_or_else(|| PkiSignError::Token("no tether claims".into()))?;
        serde_json::from_value(tether.clone())
            .map_err(|e| PkiSignError::Token(format!("tether claims: {e}")))
    }
}

/// A hostname usable as a DNS SAN (RFC 1123 labels), as the KBS decides it.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A new key and a CSR for `identity`: CN = guest id, SANs = guest id (if a DNS name),
/// name, IP.
pub fn build_csr(
    key_type: PkiKeyType,
    identity: &AttestedIdentity,
) -> Result<(KeyPair, String), PkiSignError> {
    let alg = match key_type {
        PkiKeyType::Ed25519 => &rcgen::PKCS_ED25519,
        PkiKeyType::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    let key = KeyPair::generate_for(alg)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.guest_id.as_str());
    params.distinguished_name = dn;
    let mut dns: Vec<String> = Vec::new();
    if is_dns_name(&identity.guest_id) {
        dns.push(identity.guest_id.to_ascii_lowercase());
    }
    if let Some(n) = &identity.name {
        let n = n.to_ascii_lowercase();
        if !dns.contains(&n) {
            dns.push(n);
        }
    }
    for d in dns {
        params
            .subject_alt_names
            .push(SanType::DnsName(d.try_into()?));
    }
    if let Some(ip) = identity.ip {
        params.subject_alt_names.push(SanType::IpAddress(ip));
    }
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// The private key as PKCS#8 PEM; Ed25519 as PKCS#8 v1 (seed only), which OpenSSL 3.0 also
/// reads (rcgen/ring write v2).
pub fn key_pem(key: &KeyPair) -> Zeroizing<String> {
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    const V2_BODY_PREFIX: [u8; 14] = [
        0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];
    let der = Zeroizing::new(key.serialize_der());
    if der.len() >= 48 && der[0] == 0x30 && der[2..16] == V2_BODY_PREFIX {
        let mut v1 = Zeroizing::new(Vec::with_capacity(48));
        v1.extend_from_slice(&V1_PREFIX);
        v1.extend_from_slice(&der[16..48]);
        let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(v1.as_slice()));
        return Zeroizing::new(format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            b64.as_str()
        ));
    }
    Zeroizing::new(key.serialize_pem())
}

/// A certified key.
pub struct Signed {
    /// Private key, PKCS#8 PEM.
    pub key_pem: Zeroizing<String>,
    /// Certificate, PEM.
    pub certificate: String,
    /// The KBS PKI CA, PEM.
    pub ca: String,
    /// Certificate expiry, Unix seconds.
    pub not_after: u64,
    /// The identity the CSR named.
    pub identity: AttestedIdentity,
}

impl std::fmt::Debug for Signed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct SignReply {
    certificate: String,
    ca: String,
    not_after: u64,
}

/// Attest with `client`, generate a key and a CSR naming the attested identity, and have
/// the KBS certify it.
pub async fn sign(client: &mut KbsClient, key_type: PkiKeyType) -> Result<Signed, PkiSignError> {
    let token = client.attest().await?;
    let identity = AttestedIdentity::from_token(&token)?;
    let (key, csr) = build_csr(key_type, &identity)?;
    let body = serde_json::to_vec(&serde_json::json!({ "csr": csr }))
        .map_err(|e| PkiSignError::BadReply(e.to_string()))?;
    let sealed = client
        .post_attested(SIGN_PATH, "application/json", body)
        .await?;
    let reply = client.tee_key().open_json(&sealed)?;
    let reply: SignReply =
        serde_json::from_slice(&reply).map_err(|e| PkiSignError::BadReply(e.to_string()))?;
    if !reply.certificate.contains("BEGIN CERTIFICATE") || !reply.ca.contains("BEGIN CERTIFICATE") {
        return Err(PkiSignError::BadReply(
            "certificate or ca is not PEM".into(),
        ));
    }
    Ok(Signed {
        key_pem: key_pem(&key),
        certificate: reply.certificate,
        ca: reply.ca,
        not_after: reply.not_after,
        identity,
    })
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiSignError + '_ {
    move |source| PkiSignError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `contents` to `dir/name` atomically: a new temp file with `mode`, fsync, rename,
/// fsync of the directory.
fn write_atomic(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<(), PkiSignError> {
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(write_err(&target))
}

/// Write `key.pem` (0600), `cert.pem` and `ca.pem` (0644) into `dir` (created 0700), each
/// atomically; the key last but one so a reader never pairs a new certificate with an
/// old key for longer than a rename.
pub fn write_out(dir: &Path, signed: &Signed) -> Result<(), PkiSignError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(write_err(dir))?;
    write_atomic(dir, CA_FILE, signed.ca.as_bytes(), 0o644)?;
    write_atomic(dir, KEY_FILE, signed.key_pem.as_bytes(), 0o600)?;
    write_atomic(dir, CERT_FILE, signed.certificate.as_bytes(), 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_csr_names_the_attested_identity() {
        let id = AttestedIdentity {
            guest_id: "Web-1".into(),
            name: Some("web-1.pods.example".into()),
            ip: Some("10.0.0.7".parse().unwrap()),
        };
        for kt in [PkiKeyType::Ed25519, PkiKeyType::P256] {
            let (key, csr) = build_csr(kt, &id).unwrap();
            let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
            assert_eq!(
                parsed.params.subject_alt_names,
                vec![
                    SanType::DnsName("web-1".try_into().unwrap()),
                    SanType::DnsName("web-1.pods.example".try_into().unwrap()),
                    SanType::IpAddress("10.0.0.7".parse().unwrap()),
                ]
            );
            let pem = key_pem(&key);
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
            // Still a key rcgen reads (v1 for Ed25519).
            KeyPair::from_pem(&pem).unwrap();
        }
    }

    #[test]
    fn identity_from_a_token_payload() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            br#"{"tether":{"guest_id":"g1","name":"g1.example","ip":"10.1.2.3","tee":"sample"}}"#,
        );
        let id = AttestedIdentity::from_token(&format!("h.{payload}.s")).unwrap();
        assert_eq!(id.guest_id, "g1");
        assert_eq!(id.ip, Some("10.1.2.3".parse().unwrap()));
        assert!(AttestedIdentity::from_token("nonsense").is_err());
    }

    #[test]
    fn files_are_written_with_their_modes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pki");
        let signed = Signed {
            key_pem: Zeroizing::new("KEY".into()),
            certificate: "CERT".into(),
            ca: "CA".into(),
            not_after: 1,
            identity: AttestedIdentity::default(),
        };
        write_out(&out, &signed).unwrap();
        let mode = |n: &str| std::fs::metadata(out.join(n)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(KEY_FILE), 0o600);
        assert_eq!(mode(CERT_FILE), 0o644);
        assert_eq!(std::fs::read_to_string(out.join(KEY_FILE)).unwrap(), "KEY");
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Rewriting replaces.
        write_out(&out, &signed).unwrap();
    }
}
