//! AMD's certificate revocation list for SEV-SNP: one per processor generation, published by
//! KDS at `/vcek/v1/{Milan|Genoa|Turin}/crl` and signed by that generation's ARK with
//! RSASSA-PSS SHA-384. It lists revoked ASKs, ASVKs and endorsement keys; a report whose
//! VCEK/VLEK or intermediate is on it is refused with [`VerifyError::CertificateRevoked`].
//!
//! Whether a report may be verified with no CRL at hand (KDS answers 404, an offline
//! directory holds none) is the operator's [`CrlPolicy`]: [`CrlPolicy::Required`] by default,
//! since AMD's KDS publishes a CRL for every generation this crate verifies, so a missing one
//! is an outage or a misconfiguration, not a reason to skip the check.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use ring::signature::{RSA_PSS_2048_8192_SHA384, UnparsedPublicKey};
use serde::Deserialize;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use super::Generation;
use super::vek::{Roots, VekKind};
use crate::VerifyError;

const RSASSA_PSS: &str = "1.2.840.113549.1.1.10";

/// What SNP verification does when no AMD CRL of the report's generation is at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CrlPolicy {
    /// No CRL, no attestation: refused with [`VerifyError::CollateralUnavailable`] naming the
    /// missing CRL (fail-closed; the default).
    #[default]
    Required,
    /// Checked when the source publishes a CRL; without one the key is not checked for
    /// revocation (fail-open, logged when the source answers that it has none).
    IfPublished,
}

impl CrlPolicy {
    /// The name in configuration (`required`, `if-published`).
    pub fn as_str(&self) -> &'static str {
        match self {
            CrlPolicy::Required => "required",
            CrlPolicy::IfPublished => "if-published",
        }
    }
}

/// What `policy` makes of a report of `generation` signed by a `kind` key when no CRL is at
/// hand: the refusal naming the missing CRL, or nothing to check.
pub fn missing(
    policy: CrlPolicy,
    generation: Generation,
    kind: VekKind,
) -> Result<(), VerifyError> {
    match policy {
        CrlPolicy::IfPublished => Ok(()),
        CrlPolicy::Required => Err(VerifyError::CollateralUnavailable(format!(
            "no AMD {generation:?} CRL (KDS /vcek/v1/{}/crl) to check the {} and its {} against, \
             and revocation checking is required",
            generation.product_name(),
            kind.as_str(),
            match kind {
                VekKind::Vcek => "ASK",
                VekKind::Vlek => "ASVK",
            }
        ))),
    }
}

/// Checks that `crl_der` is the CRL of `generation` signed by its ARK and valid at
/// `now_unix`, then that neither the `kind` key `vek_der` nor the ASK (VCEK) or ASVK (VLEK)
/// that issued it is listed.
pub fn check(
    crl_der: &[u8],
    roots: &Roots,
    generation: Generation,
    kind: VekKind,
    vek_der: &[u8],
    now_unix: i64,
) -> Result<(), VerifyError> {
    let name = format!("AMD {generation:?} CRL");
    let crl = verified(crl_der, roots, &name)?;
    let this = crl.last_update().timestamp();
    let next = crl
        .next_update()
        .ok_or_else(|| VerifyError::CollateralInvalid(format!("{name} has no nextUpdate")))?
        .timestamp();
    if now_unix < this || now_unix > next {
        return Err(VerifyError::CollateralExpired(format!(
            "{name} is valid from {this} to {next}, not at {now_unix}"
        )));
    }
    let (issuer_name, issuer) = match kind {
        VekKind::Vcek => ("ASK", &roots.ask),
        VekKind::Vlek => ("ASVK", &roots.asvk),
    };
    for (what, der) in [(kind.as_str(), vek_der), (issuer_name, issuer.as_slice())] {
        let cert = match X509Certificate::from_der(der) {
            Ok((_, c)) => c,
            Err(e) => return Err(VerifyError::CertificateChain(format!("{what}: {e}"))),
        };
        if let Some(r) = crl
            .iter_revoked_certificates()
            .find(|r| r.raw_serial() == cert.raw_serial())
        {
            let reason = r
                .reason_code()
                .map(|(_, code)| format!(", reason {code}"))
                .unwrap_or_default();
            return Err(VerifyError::CertificateRevoked(format!(
                "the {what} (serial {}) is listed on the {name} as revoked since {}{reason}",
                hex::encode(cert.raw_serial()),
                r.revocation_date
            )));
        }
    }
    Ok(())
}

/// CRLs whose signature verified, by (roots id, SHA-256 of the CRL's DER): the same CRL comes
/// with every SNP report until its next refresh, and its RSA-4096 signature check is a pure
/// function of those bytes and the roots. Issuer and algorithm are still checked each time.
type SignedCache = Mutex<HashSet<([u8; 32], [u8; 32])>>;

/// Most CRLs remembered (one per generation and refresh).
const SIGNED_MAX: usize = 64;

fn signed_cache() -> &'static SignedCache {
    static CACHE: OnceLock<SignedCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashSet::new()))
}

/// `crl_der` parsed, its RSASSA-PSS SHA-384 signature verified with the ARK's key (or found
/// verified before, see [`signed_cache`]) and its issuer checked to be the ARK.
fn verified<'a>(
    crl_der: &'a [u8],
    roots: &Roots,
    name: &str,
) -> Result<CertificateRevocationList<'a>, VerifyError> {
    let ark_der = roots.ark.as_slice();
    let crl = match CertificateRevocationList::from_der(crl_der) {
        Ok(([], crl)) => crl,
        Ok(_) => {
            return Err(VerifyError::CollateralInvalid(format!(
                "{name}: trailing bytes after the CRL"
            )));
        }
        Err(e) => return Err(VerifyError::CollateralInvalid(format!("{name}: {e}"))),
    };
    let (_, ark) = X509Certificate::from_der(ark_der)
        .map_err(|e| VerifyError::CertificateChain(format!("ARK: {e}")))?;
    if crl.issuer() != ark.subject() {
        return Err(VerifyError::CollateralInvalid(format!(
            "{name} is issued by {}, not by the ARK ({})",
            crl.issuer(),
            ark.subject()
        )));
    }
    if crl.signature_algorithm.algorithm.to_id_string() != RSASSA_PSS {
        return Err(VerifyError::CollateralInvalid(format!(
            "{name} is not signed with RSASSA-PSS"
        )));
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, crl_der).as_ref());
    let key = (roots.id(), digest);
    if signed_cache().lock().is_ok_and(|c| c.contains(&key)) {
        return Ok(crl);
    }
    UnparsedPublicKey::new(
        &RSA_PSS_2048_8192_SHA384,
        &ark.public_key().subject_public_key.data,
    )
    .verify(crl.tbs_cert_list.as_ref(), &crl.signature_value.data)
    .map_err(|_| {
        VerifyError::CollateralInvalid(format!("{name}: signature does not verify with the ARK"))
    })?;
    if let Ok(mut c) = signed_cache().lock() {
        if c.len() >= SIGNED_MAX {
            c.clear();
        }
        c.insert(key);
    }
    Ok(crl)
}
