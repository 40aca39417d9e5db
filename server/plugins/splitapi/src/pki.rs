//! The per-sandbox PKI: a CA, a server certificate naming the sandbox (SANs from its attested
//! identity only) and a client certificate for the workload owner, generated with rcgen.

use std::collections::BTreeMap;
use std::net::IpAddr;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::{Zeroize, Zeroizing};

use kbs_core::identity::GuestIdentity;
use kbs_core::init_data::is_dns_name;
use kbs_core::key_algorithm::KeyAlgorithm;

use crate::config::SplitApiConfig;

/// Bundle id of the server credentials (`CredentialBundle.id`, pull-path `id`).
pub const BUNDLE_ID: &str = "splitapi";
/// CA certificate file name (upstream splitapi's).
pub const CA_CRT: &str = "ca.crt";
/// Server certificate file name.
pub const SERVER_CRT: &str = "server.crt";
/// Server key file name.
pub const SERVER_KEY: &str = "server.key";
/// Owner client certificate file name.
pub const CLIENT_CRT: &str = "client.crt";
/// Owner client key file name.
pub const CLIENT_KEY: &str = "client.key";
/// Files of the server bundle and their modes, in order.
pub const SERVER_FILES: [(&str, u32); 3] =
    [(CA_CRT, 0o644), (SERVER_CRT, 0o644), (SERVER_KEY, 0o600)];
/// Certificates start this long before issue, for clock skew between KBS, guest and owner.
const BACKDATE_SECS: u64 = 300;

/// Certificate generation failed.
#[derive(Debug, thiserror::Error)]
#[error("splitapi certificate generation: {0}")]
pub struct PkiError(String);

impl PkiError {
    pub(crate) fn new(msg: String) -> Self {
        Self(msg)
    }
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        Self(e.to_string())
    }
}

/// What a sandbox's certificates say about it: attested facts only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxIdentity {
    /// Attested guest id.
    pub guest_id: String,
    /// Attested DNS name (`[tether] name`).
    pub name: Option<String>,
    /// Attested IP address (`[tether] ip`).
    pub ip: Option<IpAddr>,
}

impl From<&GuestIdentity> for SandboxIdentity {
    fn from(g: &GuestIdentity) -> Self {
        Self {
            guest_id: g.guest_id.clone(),
            name: g.name.clone(),
            ip: g.ip,
        }
    }
}

impl SandboxIdentity {
    /// SANs of the server certificate: the guest id (when it is a DNS name), the name, the IP.
    pub fn sans(&self) -> Vec<SanType> {
        let mut dns: Vec<String> = Vec::new();
        if is_dns_name(&self.guest_id) {
            dns.push(self.guest_id.to_ascii_lowercase());
        }
        if let Some(n) = &self.name
            && !dns.contains(n)
        {
            dns.push(n.clone());
        }
        let mut sans: Vec<SanType> = dns
            .into_iter()
            .filter_map(|d| d.try_into().ok().map(SanType::DnsName))
            .collect();
        if let Some(ip) = self.ip {
            sans.push(SanType::IpAddress(ip));
        }
        sans
    }
}

/// A private key, PKCS#8 PEM; wiped from memory on drop, never printed.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyPem(String);

impl KeyPem {
    /// The PEM text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Drop for KeyPem {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for KeyPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyPem([redacted])")
    }
}

/// One sandbox's credentials as stored (the whole record is sealed with the KEK at rest).
#[derive(Clone, Serialize, Deserialize)]
pub struct CredentialRecord {
    /// Who they are for.
    pub identity: SandboxIdentity,
    /// Monotonic version (server and client certificates are reissued together).
    pub version: u64,
    /// Key algorithm.
    pub algorithm: KeyAlgorithm,
    /// CA certificate, PEM.
    pub ca_cert: String,
    /// CA private key, PKCS#8 PEM.
    pub ca_key: KeyPem,
    /// CA expiry, Unix seconds.
    pub ca_not_after: u64,
    /// Server certificate, PEM.
    pub server_cert: String,
    /// Server private key, PKCS#8 PEM.
    pub server_key: KeyPem,
    /// Owner client certificate, PEM.
    pub client_cert: String,
    /// Owner client private key, PKCS#8 PEM.
    pub client_key: KeyPem,
    /// Server and client certificates' start, Unix seconds.
    pub not_before: u64,
    /// Server and client certificates' expiry, Unix seconds.
    pub not_after: u64,
    /// When issued, Unix seconds.
    pub issued_at: u64,
}

impl std::fmt::Debug for CredentialRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialRecord")
            .field("identity", &self.identity)
            .field("version", &self.version)
            .field("algorithm", &self.algorithm)
            .field("not_after", &self.not_after)
            .field("ca_not_after", &self.ca_not_after)
            .finish_non_exhaustive()
    }
}

impl CredentialRecord {
    /// Whether a record must be (re)issued for `identity` at `now`: none yet, due for renewal,
    /// the attested identity changed, or the configured algorithm changed.
    pub fn needs_issue(
        rec: Option<&Self>,
        identity: &SandboxIdentity,
        cfg: &SplitApiConfig,
        now: u64,
    ) -> bool {
        match rec {
            None => true,
            Some(r) => r.identity != *identity || r.needs_renewal(cfg, now),
        }
    }

    /// Whether the whole record (CA when needed, server and owner certificates) is renewed:
    /// due by its expiry, or the configured algorithm changed. A changed identity alone is
    /// not a renewal: it re-issues the server certificate only.
    pub fn needs_renewal(&self, cfg: &SplitApiConfig, now: u64) -> bool {
        self.algorithm != cfg.key_algorithm
            || now.saturating_add(cfg.renew_before.as_secs()) >= self.not_after
    }

    /// The server bundle's JWE plaintext: a CBOR map file name -> bytes.
    pub fn server_plaintext(&self) -> Result<Zeroizing<Vec<u8>>, PkiError> {
        let files: BTreeMap<&str, &serde_bytes::Bytes> = BTreeMap::from([
            (CA_CRT, serde_bytes::Bytes::new(self.ca_cert.as_bytes())),
            (
                SERVER_CRT,
                serde_bytes::Bytes::new(self.server_cert.as_bytes()),
            ),
            (
                SERVER_KEY,
                serde_bytes::Bytes::new(self.server_key.as_str().as_bytes()),
            ),
        ]);
        let mut out = Zeroizing::new(Vec::with_capacity(4096));
        ciborium::into_writer(&files, &mut *out).map_err(|e| PkiError(e.to_string()))?;
        Ok(out)
    }
}

fn generate_key(alg: KeyAlgorithm) -> Result<KeyPair, PkiError> {
    let alg = match alg {
        KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
        KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    Ok(KeyPair::generate_for(alg)?)
}

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410), followed by the 32-byte seed.
const ED25519_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// PKCS#8 v2 (RFC 5958, the public key follows the seed) as ring writes it, after the
/// outer SEQUENCE header: version 1, the Ed25519 algorithm, the seed's OCTET STRING headers.
const ED25519_V2_BODY_PREFIX: [u8; 14] = [
    0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The private key as PKCS#8 PEM. Ed25519 keys are written as PKCS#8 v1 (RFC 8410, seed only):
/// ring and rustls read both versions, OpenSSL 3.0 (curl) only v1.
fn key_pem(key: &KeyPair) -> KeyPem {
    let der = Zeroizing::new(key.serialize_der());
    if der.len() >= 48 && der[0] == 0x30 && der[2..16] == ED25519_V2_BODY_PREFIX {
        let mut v1 = Zeroizing::new(Vec::with_capacity(48));
        v1.extend_from_slice(&ED25519_V1_PREFIX);
        v1.extend_from_slice(&der[16..48]);
        let b64 = Zeroizing::new(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            v1.as_slice(),
        ));
        return KeyPem(format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            b64.as_str()
        ));
    }
    KeyPem(key.serialize_pem())
}

fn time_of(unix: u64) -> Result<OffsetDateTime, PkiError> {
    OffsetDateTime::from_unix_timestamp(i64::try_from(unix).map_err(|_| PkiError("time".into()))?)
        .map_err(|e| PkiError(e.to_string()))
}

fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and 16 bytes long
    SerialNumber::from_slice(&bytes)
}

fn dn(cfg: &SplitApiConfig, cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, cfg.organization.as_str());
    dn.push(DnType::CommonName, cn);
    dn
}

/// Issue credentials for `identity`, a new version. When `prev` is for the same guest and not
/// due for renewal (`needs_renewal`), only the server certificate is re-issued (its SANs
/// follow the identity), with the same expiry: the CA and the owner's client certificate and
/// key stay as they are, so the owner's credentials never change but on renewal. Otherwise
/// server and client certificates are both new, under the previous record's CA when it is
/// still usable (same algorithm, outlives the new certificates), under a new CA otherwise.
pub fn issue(
    prev: Option<&CredentialRecord>,
    identity: &SandboxIdentity,
    cfg: &SplitApiConfig,
    now: u64,
) -> Result<CredentialRecord, PkiError> {
    let not_before = now.saturating_sub(BACKDATE_SECS);
    if let Some(p) = prev
        && p.identity.guest_id == identity.guest_id
        && !p.needs_renewal(cfg, now)
    {
        return reissue_server(p, identity, cfg, now);
    }
    let wanted_not_after = now.saturating_add(cfg.validity.as_secs());
    let reuse = prev.filter(|p| {
        p.algorithm == cfg.key_algorithm
            && p.identity.guest_id == identity.guest_id
            && p.ca_not_after >= wanted_not_after
    });

    let (ca_cert, ca_key_pem, ca_not_after) = match reuse {
        Some(p) => (p.ca_cert.clone(), p.ca_key.clone(), p.ca_not_after),
        None => {
            let key = generate_key(cfg.key_algorithm)?;
            let ca_not_after = now.saturating_add(cfg.ca_validity.as_secs());
            let mut params = CertificateParams::default();
            params.distinguished_name = dn(cfg, &format!("splitapi CA for {}", identity.guest_id));
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.serial_number = Some(serial());
            params.not_before = time_of(not_before)?;
            params.not_after = time_of(ca_not_after)?;
            let cert = params.self_signed(&key)?;
            (cert.pem(), key_pem(&key), ca_not_after)
        }
    };
    let ca_key = KeyPair::from_pem(ca_key_pem.as_str())?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key)?;
    let not_after = wanted_not_after.min(ca_not_after);

    let (server_cert, server_key) = server_leaf(identity, cfg, &issuer, not_before, not_after)?;
    let (client_cert, client_key) = leaf(
        cfg,
        &issuer,
        format!("splitapi owner of {}", identity.guest_id),
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
        (not_before, not_after),
    )?;
    Ok(CredentialRecord {
        identity: identity.clone(),
        version: prev.map_or(1, |p| p.version.saturating_add(1)),
        algorithm: cfg.key_algorithm,
        ca_cert,
        ca_key: ca_key_pem,
        ca_not_after,
        server_cert,
        server_key,
        client_cert,
        client_key,
        not_before,
        not_after,
        issued_at: now,
    })
}

/// A leaf certificate and its new key, signed by `issuer`, valid over `window` (Unix s).
fn leaf(
    cfg: &SplitApiConfig,
    issuer: &Issuer<'_, KeyPair>,
    cn: String,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
    (not_before, not_after): (u64, u64),
) -> Result<(String, KeyPem), PkiError> {
    let key = generate_key(cfg.key_algorithm)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cfg, &cn);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial());
    params.not_before = time_of(not_before)?;
    params.not_after = time_of(not_after)?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key_pem(&key)))
}

/// The server certificate naming `identity`.
fn server_leaf(
    identity: &SandboxIdentity,
    cfg: &SplitApiConfig,
    issuer: &Issuer<'_, KeyPair>,
    not_before: u64,
    not_after: u64,
) -> Result<(String, KeyPem), PkiError> {
    leaf(
        cfg,
        issuer,
        identity.guest_id.clone(),
        identity.sans(),
        ExtendedKeyUsagePurpose::ServerAuth,
        (not_before, not_after),
    )
}

/// A new server certificate for `identity` under `prev`'s CA, ending when `prev` ends;
/// everything else of `prev` (CA, owner certificate and key) carried over.
fn reissue_server(
    prev: &CredentialRecord,
    identity: &SandboxIdentity,
    cfg: &SplitApiConfig,
    now: u64,
) -> Result<CredentialRecord, PkiError> {
    let not_before = now.saturating_sub(BACKDATE_SECS);
    let ca_key = KeyPair::from_pem(prev.ca_key.as_str())?;
    let issuer = Issuer::from_ca_cert_pem(&prev.ca_cert, ca_key)?;
    let (server_cert, server_key) =
        server_leaf(identity, cfg, &issuer, not_before, prev.not_after)?;
    Ok(CredentialRecord {
        identity: identity.clone(),
        version: prev.version.saturating_add(1),
        server_cert,
        server_key,
        not_before,
        issued_at: now,
        ..prev.clone()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use x509_parser::extensions::GeneralName;
    use x509_parser::pem::parse_x509_pem;
    use x509_parser::prelude::*;

    use super::*;

    fn ident() -> SandboxIdentity {
        SandboxIdentity {
            guest_id: "web-1".into(),
            name: Some("web-1.pods.example".into()),
            ip: Some("10.1.2.3".parse().unwrap()),
        }
    }

    fn der(pem: &str) -> Vec<u8> {
        parse_x509_pem(pem.as_bytes()).unwrap().1.contents
    }

    fn check(alg: KeyAlgorithm) {
        let cfg = SplitApiConfig {
            key_algorithm: alg,
            ..Default::default()
        };
        let now = 1_800_000_000;
        let rec = issue(None, &ident(), &cfg, now).unwrap();
        assert_eq!(rec.version, 1);
        let ca_der = der(&rec.ca_cert);
        let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
        assert!(ca.is_ca());
        let server_der = der(&rec.server_cert);
        let (_, server) = X509Certificate::from_der(&server_der).unwrap();
        assert!(!server.is_ca());
        assert_eq!(server.issuer(), ca.subject());
        server.verify_signature(Some(ca.public_key())).unwrap();
        let sans = server.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|g| match g {
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            vec!["dns:web-1", "dns:web-1.pods.example", "ip:[10, 1, 2, 3]"]
        );
        assert!(
            server
                .extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .server_auth
        );
        let client_der = der(&rec.client_cert);
        let (_, client) = X509Certificate::from_der(&client_der).unwrap();
        client.verify_signature(Some(ca.public_key())).unwrap();
        assert!(
            client
                .extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .client_auth
        );
        assert_eq!(
            server.validity().not_after.timestamp() as u64,
            now + cfg.validity.as_secs()
        );
        assert!(rec.server_key.as_str().contains("BEGIN PRIVATE KEY"));
        for pem in [&rec.ca_key, &rec.server_key, &rec.client_key] {
            let der = parse_x509_pem(pem.as_str().as_bytes()).unwrap().1.contents;
            if alg == KeyAlgorithm::Ed25519 {
                assert_eq!(der.len(), 48, "PKCS#8 v1 for OpenSSL 3.0");
                assert_eq!(der[..16], ED25519_V1_PREFIX);
            }
            // ring (rcgen, rustls) reads it back, and it matches the certificate's key.
            KeyPair::from_pem(pem.as_str()).unwrap();
        }
        let server_key = KeyPair::from_pem(rec.server_key.as_str()).unwrap();
        assert_eq!(
            server_key.public_key_raw(),
            &server.public_key().subject_public_key.data[..]
        );
        let oid = server.public_key().algorithm.algorithm.to_id_string();
        match alg {
            KeyAlgorithm::Ed25519 => assert_eq!(oid, "1.3.101.112"),
            KeyAlgorithm::EcdsaP256 => assert_eq!(oid, "1.2.840.10045.2.1"),
        }

        // Renewal keeps the CA and bumps the version; a changed identity is reissued.
        assert!(!CredentialRecord::needs_issue(
            Some(&rec),
            &ident(),
            &cfg,
            now
        ));
        let later = rec.not_after - cfg.renew_before.as_secs();
        assert!(CredentialRecord::needs_issue(
            Some(&rec),
            &ident(),
            &cfg,
            later
        ));
        let renewed = issue(Some(&rec), &ident(), &cfg, later).unwrap();
        assert_eq!(renewed.version, 2);
        assert_eq!(renewed.ca_cert, rec.ca_cert);
        assert_ne!(renewed.server_cert, rec.server_cert);
        let mut moved = ident();
        moved.ip = Some("10.9.9.9".parse().unwrap());
        assert!(CredentialRecord::needs_issue(Some(&rec), &moved, &cfg, now));
        // A move re-issues the server certificate only: the owner's credentials and the CA
        // stay, the expiry too.
        let re = issue(Some(&rec), &moved, &cfg, now + 60).unwrap();
        assert_eq!(re.version, 2);
        assert_eq!(re.identity, moved);
        assert_ne!(re.server_cert, rec.server_cert);
        assert_eq!(re.ca_cert, rec.ca_cert);
        assert_eq!(re.client_cert, rec.client_cert);
        assert_eq!(re.client_key.as_str(), rec.client_key.as_str());
        assert_eq!(re.not_after, rec.not_after);
        let re_der = der(&re.server_cert);
        let (_, re_server) = X509Certificate::from_der(&re_der).unwrap();
        re_server.verify_signature(Some(ca.public_key())).unwrap();

        // The plaintext is a CBOR map of the three server files.
        let plain = rec.server_plaintext().unwrap();
        let map: BTreeMap<String, serde_bytes::ByteBuf> =
            ciborium::from_reader(plain.as_slice()).unwrap();
        assert_eq!(
            map.keys().collect::<Vec<_>>(),
            vec!["ca.crt", "server.crt", "server.key"]
        );
        assert_eq!(
            map["server.key"].as_slice(),
            rec.server_key.as_str().as_bytes()
        );
    }

    #[test]
    fn ed25519_chain_sans_and_renewal() {
        check(KeyAlgorithm::Ed25519);
    }

    #[test]
    fn p256_chain_sans_and_renewal() {
        check(KeyAlgorithm::EcdsaP256);
    }

    #[test]
    fn new_ca_when_the_old_one_would_expire_first_or_algorithm_changed() {
        let cfg = SplitApiConfig {
            validity: Duration::from_secs(3600),
            ca_validity: Duration::from_secs(7200),
            renew_before: Duration::from_secs(600),
            ..Default::default()
        };
        let rec = issue(None, &ident(), &cfg, 1_800_000_000).unwrap();
        let again = issue(Some(&rec), &ident(), &cfg, 1_800_000_000 + 6000).unwrap();
        assert_ne!(
            again.ca_cert, rec.ca_cert,
            "the old CA ends before the new leaf"
        );
        assert_eq!(again.version, 2);
        let p256 = SplitApiConfig {
            key_algorithm: KeyAlgorithm::EcdsaP256,
            ..cfg
        };
        assert!(CredentialRecord::needs_issue(
            Some(&rec),
            &ident(),
            &p256,
            1_800_000_000
        ));
        let switched = issue(Some(&rec), &ident(), &p256, 1_800_000_000).unwrap();
        assert_ne!(switched.ca_cert, rec.ca_cert);
    }

    /// `cargo test -p server --lib issue_time -- --ignored --nocapture` (add `--release` for
    /// the figure in the README).
    #[test]
    #[ignore = "timing, run by hand"]
    fn issue_time() {
        for alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::EcdsaP256] {
            let cfg = SplitApiConfig {
                key_algorithm: alg,
                ..Default::default()
            };
            let n = 200;
            let t = std::time::Instant::now();
            let mut prev = None;
            for _ in 0..n {
                // Fresh CA each time: the first bundle of a new sandbox (3 keys, 3 certificates).
                prev = Some(issue(None, &ident(), &cfg, 1_800_000_000).unwrap());
            }
            let fresh = t.elapsed() / n;
            let t = std::time::Instant::now();
            for i in 0..n {
                // Renewal under the stored CA (2 keys, 2 certificates, CA parsed from PEM).
                issue(prev.as_ref(), &ident(), &cfg, 1_800_000_000 + u64::from(i)).unwrap();
            }
            let renew = t.elapsed() / n;
            println!("{alg:?}: new sandbox bundle {fresh:?}, renewal {renew:?}");
        }
    }

    #[test]
    fn guest_id_that_is_no_dns_name_is_left_out() {
        let id = SandboxIdentity {
            guest_id: "under_score".into(),
            name: None,
            ip: Some("fd00::7".parse().unwrap()),
        };
        assert_eq!(id.sans().len(), 1);
    }
}
