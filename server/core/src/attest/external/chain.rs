//! The certificate chain a token's header carries (`jwk.x5c` or `x5c`), checked up to one of
//! the certificates the operator trusts for the issuer (rustls-webpki: signatures, validity
//! at `now`, CA constraints, path building through the intermediates).

use std::time::Duration;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeIdIter};

use super::keys::PublicKey;

/// The trust anchors of one issuer.
#[derive(Debug, Default)]
pub struct Anchors {
    anchors: Vec<TrustAnchor<'static>>,
}

impl Anchors {
    /// Anchors from DER certificates; a certificate webpki cannot use as an anchor (a
    /// malformed one) is an error naming its position.
    pub fn new(certificates: &[Vec<u8>]) -> Result<Self, String> {
        let mut anchors = Vec::with_capacity(certificates.len());
        for (i, der) in certificates.iter().enumerate() {
            let cert = CertificateDer::from(der.as_slice());
            let anchor = webpki::anchor_from_trusted_cert(&cert)
                .map_err(|e| format!("certificate {i} cannot be a trust anchor: {e}"))?;
            anchors.push(anchor.to_owned());
        }
        Ok(Self { anchors })
    }

    /// Whether any anchor is configured.
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    /// Checks `chain` (leaf first, DER) up to an anchor at `now` (Unix seconds) and returns
    /// the leaf's key.
    pub fn verify(&self, chain: &[Vec<u8>], now: u64) -> Result<PublicKey, String> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| "the certificate chain is empty".to_string())?;
        let leaf_der = CertificateDer::from(leaf.as_slice());
        let intermediates: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let ee =
            EndEntityCert::try_from(&leaf_der).map_err(|e| format!("signing certificate: {e}"))?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            &intermediates,
            UnixTime::since_unix_epoch(Duration::from_secs(now)),
            AnyUsage,
            None,
            None,
        )
        .map_err(|e| {
            format!("the signing certificate does not chain to a trusted certificate: {e}")
        })?;
        PublicKey::from_certificate(leaf)
    }
}

/// Token signing has no standard extended key usage: any (or none) is accepted.
struct AnyUsage;

impl ExtendedKeyUsageValidator for AnyUsage {
    fn validate(&self, iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        // A malformed extension is still an error.
        for purpose in iter {
            purpose?;
        }
        Ok(())
    }
}
