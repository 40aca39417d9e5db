//! PKCS#10 requests: decode (PEM or base64 DER), check the key type, verify the
//! self-signature (x509-parser, `verify` feature) and check the requested subject and SANs
//! against the caller's attested identity.

use std::net::IpAddr;

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519, OID_X509_COMMON_NAME,
};
use x509_parser::prelude::FromDer;

use kbs_core::identity::GuestIdentity;
use kbs_core::init_data::is_dns_name;

/// The P-256 curve (`prime256v1`, `secp256r1`).
const OID_CURVE_P256: &str = "1.2.840.10045.3.1.7";
/// `ecdsa-with-SHA256`.
const OID_SIG_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";

/// Key types a guest may have certified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CsrKeyType {
    /// Ed25519.
    Ed25519,
    /// ECDSA over P-256 (signed with SHA-256).
    P256,
}

impl CsrKeyType {
    /// The name used in logs, metrics and the policy input.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::P256 => "p256",
        }
    }

    fn algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::Ed25519 => &rcgen::PKCS_ED25519,
            Self::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

/// A subject alternative name the guest asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestedSan {
    /// DNS name (lower-cased).
    Dns(String),
    /// IP address.
    Ip(IpAddr),
}

/// A verified CSR whose names all belong to the caller.
#[derive(Clone, Debug)]
pub struct CheckedCsr {
    /// Key type.
    pub key_type: CsrKeyType,
    /// The subject's common name.
    pub common_name: String,
    /// The SANs asked for, in order, each matching the attested identity.
    pub sans: Vec<RequestedSan>,
    /// Raw subject public key (the BIT STRING contents).
    public_key: Vec<u8>,
}

impl rcgen::PublicKeyData for CheckedCsr {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.key_type.algorithm()
    }
}

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not PEM, not base64 DER, or not a PKCS#10 structure (400 `MalformedCsr`).
    #[error("{0}")]
    Malformed(String),
    /// A key other than Ed25519 or P-256 (400 `UnsupportedKeyType`).
    #[error("{0}")]
    UnsupportedKey(String),
    /// The self-signature does not verify (400 `InvalidCsrSignature`).
    #[error("the CSR's self-signature does not verify: {0}")]
    BadSignature(String),
    /// A requested name is not the caller's (403 `IdentityMismatch`).
    #[error("{0}")]
    Mismatch(String),
}

impl CsrError {
    /// Error name in the API error body (and the metric label).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "MalformedCsr",
            Self::UnsupportedKey(_) => "UnsupportedKeyType",
            Self::BadSignature(_) => "InvalidCsrSignature",
            Self::Mismatch(_) => "IdentityMismatch",
        }
    }
}

fn malformed(msg: impl Into<String>) -> CsrError {
    CsrError::Malformed(msg.into())
}

/// The DER of a CSR given as PEM (`CERTIFICATE REQUEST` or `NEW CERTIFICATE REQUEST`) or as
/// base64 DER (whitespace ignored).
pub fn decode(text: &str) -> Result<Vec<u8>, CsrError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(malformed("empty CSR"));
    }
    if text.starts_with("-----BEGIN") {
        let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes())
            .map_err(|e| malformed(format!("not a PEM block: {e}")))?;
        if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
            return Err(malformed(format!(
                "PEM label is {:?}, expected \"CERTIFICATE REQUEST\"",
                pem.label
            )));
        }
        return Ok(pem.contents);
    }
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        compact.as_bytes(),
    )
    .map_err(|e| malformed(format!("neither PEM nor base64 DER: {e}")))
}

/// Parse, check the key type, verify the self-signature and check every requested name
/// against `identity`. The request's other extensions (key usage, basic constraints, ...)
/// are ignored: the KBS decides what the certificate may do.
pub fn check(der: &[u8], identity: &GuestIdentity) -> Result<CheckedCsr, CsrError> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| malformed(format!("not a PKCS#10 certification request: {e}")))?;
    if !rest.is_empty() {
        return Err(malformed(format!(
            "{} trailing bytes after the CSR",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let key_oid = &spki.algorithm.algorithm;
    let sig_oid = csr.signature_algorithm.algorithm.to_id_string();
    let key_type = if *key_oid == OID_SIG_ED25519 {
        CsrKeyType::Ed25519
    } else if *key_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string());
        if curve.as_deref() != Some(OID_CURVE_P256) {
            return Err(CsrError::UnsupportedKey(format!(
                "EC key on curve {}: only P-256 ({OID_CURVE_P256}) and Ed25519 keys are certified",
                curve.as_deref().unwrap_or("(none)")
            )));
        }
        CsrKeyType::P256
    } else {
        return Err(CsrError::UnsupportedKey(format!(
            "key algorithm {}: only Ed25519 and ECDSA P-256 keys are certified",
            key_oid.to_id_string()
        )));
    };
    let sig_ok = match key_type {
        CsrKeyType::Ed25519 => csr.signature_algorithm.algorithm == OID_SIG_ED25519,
        CsrKeyType::P256 => sig_oid == OID_SIG_ECDSA_SHA256,
    };
    if !sig_ok {
        return Err(CsrError::UnsupportedKey(format!(
            "signature algorithm {sig_oid} with a {} key: use Ed25519 or ecdsa-with-SHA256",
            key_type.as_str()
        )));
    }
    csr.verify_signature()
        .map_err(|e| CsrError::BadSignature(e.to_string()))?;

    // Subject: exactly one CN, nothing else.
    let mut common_name = None;
    for attr in info.subject.iter_attributes() {
        if *attr.attr_type() != OID_X509_COMMON_NAME {
            return Err(CsrError::Mismatch(format!(
                "subject attribute {} is not part of the attested identity: the subject may hold only CN",
                attr.attr_type().to_id_string()
            )));
        }
        let cn = attr
            .as_str()
            .map_err(|e| malformed(format!("subject CN is not a string: {e}")))?;
        if common_name.replace(cn.to_string()).is_some() {
            return Err(CsrError::Mismatch(
                "the subject holds more than one CN".to_string(),
            ));
        }
    }
    let common_name = common_name.ok_or_else(|| {
        CsrError::Mismatch("the subject has no CN (expected the attested guest id or name)".into())
    })?;
    let name_matches = identity
        .name
        .as_deref()
        .is_some_and(|n| n.eq_ignore_ascii_case(&common_name));
    if common_name != identity.guest_id && !name_matches {
        return Err(CsrError::Mismatch(format!(
            "subject CN {common_name:?} is neither the attested guest id {:?} nor its attested name {:?}",
            identity.guest_id,
            identity.name.as_deref().unwrap_or("(none)")
        )));
    }

    let mut sans = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for g in &san.general_names {
                        sans.push(check_san(g, identity)?);
                    }
                }
                ParsedExtension::ParseError { error } => {
                    return Err(malformed(format!("a requested extension: {error}")));
                }
                _ => {}
            }
        }
    }
    sans.dedup();
    Ok(CheckedCsr {
        key_type,
        common_name,
        sans,
        public_key: spki.subject_public_key.data.to_vec(),
    })
}

fn check_san(g: &GeneralName<'_>, identity: &GuestIdentity) -> Result<RequestedSan, CsrError> {
    match g {
        GeneralName::DNSName(d) => {
            let d = d.to_ascii_lowercase();
            let is_id =
                is_dns_name(&identity.guest_id) && identity.guest_id.eq_ignore_ascii_case(&d);
            let is_name = identity
                .name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(&d));
            if is_id || is_name {
                Ok(RequestedSan::Dns(d))
            } else {
                Err(CsrError::Mismatch(format!(
                    "SAN DNS:{d} is neither the attested guest id {:?} nor its attested name {:?}",
                    identity.guest_id,
                    identity.name.as_deref().unwrap_or("(none)")
                )))
            }
        }
        GeneralName::IPAddress(bytes) => {
            let ip = match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes).map(IpAddr::from).ok(),
                16 => <[u8; 16]>::try_from(*bytes).map(IpAddr::from).ok(),
                _ => None,
            }
            .ok_or_else(|| malformed(format!("SAN IP address of {} bytes", bytes.len())))?;
            if identity.ip == Some(ip) {
                Ok(RequestedSan::Ip(ip))
            } else {
                Err(CsrError::Mismatch(format!(
                    "SAN IP:{ip} is not the attested IP {}",
                    identity
                        .ip
                        .map_or_else(|| "(none)".to_string(), |i| i.to_string())
                )))
            }
        }
        other => Err(CsrError::Mismatch(format!(
            "SAN {other} is not part of the attested identity (only DNS and IP SANs are certified)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    use super::*;

    fn identity() -> GuestIdentity {
        GuestIdentity {
            guest_id: "web-1".into(),
            name: Some("web-1.pods.example".into()),
            ip: Some("10.0.0.7".parse().unwrap()),
            ..Default::default()
        }
    }

    fn csr(alg: &'static rcgen::SignatureAlgorithm, cn: &str, sans: Vec<SanType>) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn matching_requests_pass_for_both_key_types() {
        for (alg, kt) in [
            (&rcgen::PKCS_ED25519, CsrKeyType::Ed25519),
            (&rcgen::PKCS_ECDSA_P256_SHA256, CsrKeyType::P256),
        ] {
            let pem = csr(
                alg,
                "web-1",
                vec![
                    SanType::DnsName("WEB-1.pods.example".try_into().unwrap()),
                    SanType::DnsName("web-1".try_into().unwrap()),
                    SanType::IpAddress("10.0.0.7".parse().unwrap()),
                ],
            );
            let checked = check(&decode(&pem).unwrap(), &identity()).unwrap();
            assert_eq!(checked.key_type, kt);
            assert_eq!(checked.common_name, "web-1");
            assert_eq!(
                checked.sans,
                vec![
                    RequestedSan::Dns("web-1.pods.example".into()),
                    RequestedSan::Dns("web-1".into()),
                    RequestedSan::Ip("10.0.0.7".parse().unwrap())
                ]
            );
            // base64 DER works too.
            let der = decode(&pem).unwrap();
            let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der);
            assert_eq!(decode(&b64).unwrap(), der);
        }
    }

    #[test]
    fn names_outside_the_identity_are_refused() {
        let id = identity();
        for (cn, sans) in [
            ("web-2", vec![]),
            (
                "web-1",
                vec![SanType::DnsName("evil.example".try_into().unwrap())],
            ),
            (
                "web-1",
                vec![SanType::IpAddress("10.0.0.8".parse().unwrap())],
            ),
            (
                "web-1",
                vec![SanType::Rfc822Name("a@b.example".try_into().unwrap())],
            ),
        ] {
            let pem = csr(&rcgen::PKCS_ED25519, cn, sans);
            let err = check(&decode(&pem).unwrap(), &id).unwrap_err();
            assert_eq!(err.name(), "IdentityMismatch", "{err}");
        }
        // Another subject attribute.
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "web-1");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Someone else");
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let err = check(&decode(&pem).unwrap(), &id).unwrap_err();
        assert!(err.to_string().contains("2.5.4.10"), "{err}");
    }

    #[test]
    fn malformed_unsupported_and_forged_requests_are_refused() {
        assert_eq!(decode("").unwrap_err().name(), "MalformedCsr");
        assert_eq!(decode("!!not base64!!").unwrap_err().name(), "MalformedCsr");
        assert_eq!(
            check(b"\x30\x03\x02\x01\x00", &identity())
                .unwrap_err()
                .name(),
            "MalformedCsr"
        );
        let pem = csr(&rcgen::PKCS_ECDSA_P384_SHA384, "web-1", vec![]);
        assert_eq!(
            check(&decode(&pem).unwrap(), &identity())
                .unwrap_err()
                .name(),
            "UnsupportedKeyType"
        );
        // Flip a bit of the signature (the last byte of the DER).
        let mut der = decode(&csr(&rcgen::PKCS_ED25519, "web-1", vec![])).unwrap();
        let last = der.len() - 1;
        der[last] ^= 1;
        assert_eq!(
            check(&der, &identity()).unwrap_err().name(),
            "InvalidCsrSignature"
        );
    }
}
