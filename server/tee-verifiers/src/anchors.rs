//! The roots evidence must chain to: Intel's SGX root CA (TDX: PCK chains, the TCB info and
//! QE identity signers, both CRLs) and, per AMD processor generation, the ARK with the ASK
//! and ASVK it signed (SNP: VCEK and VLEK chains, AMD's CRL).
//!
//! [`TrustAnchors::vendor`] holds the vendors' public roots (Intel's as shipped in
//! `dcap-qvl`, AMD's embedded in `snp/roots/`); that is what production uses unless an
//! operator configures other roots (a lab with its own PKI, a test). Replacing a root
//! replaces trust in everything it signs: such a root is checked to parse (and AMD's to
//! chain) when it is set, never later relaxed.
//!
//! They also carry the revocation rule for SNP ([`CrlPolicy`]): with no AMD CRL at hand a
//! report is refused unless the operator chose `if-published`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::VerifyError;
use crate::request::Generation;
use crate::snp::crl::CrlPolicy;
use crate::snp::vek::{self, Roots};

/// The roots TDX and SNP evidence is verified against.
#[derive(Debug, Clone)]
pub struct TrustAnchors {
    /// DER of the root CA of Intel's SGX/TDX PKI; `None` is Intel's own (dcap-qvl's).
    intel_root_ca: Option<Arc<Vec<u8>>>,
    amd: HashMap<Generation, Arc<Roots>>,
    /// Why the embedded AMD roots could not be loaded (never expected; reported per use).
    amd_error: Option<String>,
    /// Whether an SNP report may be verified without AMD's CRL of its generation.
    snp_crl: CrlPolicy,
}

impl TrustAnchors {
    /// Intel's SGX root CA and AMD's ARK/ASK/ASVK of Milan, Genoa and Turin: production.
    pub fn vendor() -> Arc<TrustAnchors> {
        static VENDOR: OnceLock<Arc<TrustAnchors>> = OnceLock::new();
        VENDOR
            .get_or_init(|| {
                let (amd, amd_error) = match vek::load_embedded_roots() {
                    Ok(map) => (map, None),
                    Err(e) => (HashMap::new(), Some(e)),
                };
                Arc::new(TrustAnchors {
                    intel_root_ca: None,
                    amd: amd.into_iter().map(|(g, r)| (g, Arc::new(r))).collect(),
                    amd_error,
                    snp_crl: CrlPolicy::Required,
                })
            })
            .clone()
    }

    /// These anchors with `der` (a self-signed CA certificate) as the root of Intel's PKI.
    pub fn with_intel_root_ca(mut self, der: Vec<u8>) -> Result<Self, VerifyError> {
        let cert = ca_certificate(&der, "Intel root CA")?;
        if cert.subject() != cert.issuer() {
            return Err(VerifyError::CertificateChain(
                "Intel root CA must be self-signed (its issuer is not its subject)".into(),
            ));
        }
        self.intel_root_ca = Some(Arc::new(der));
        Ok(self)
    }

    /// These anchors with `ark` (self-signed) and the `ask` and `asvk` it signed (DER CA
    /// certificates, all RSASSA-PSS SHA-384 as AMD's) as the roots of `generation`.
    pub fn with_amd_roots(
        mut self,
        generation: Generation,
        ark: Vec<u8>,
        ask: Vec<u8>,
        asvk: Vec<u8>,
    ) -> Result<Self, VerifyError> {
        for (name, der) in [("ARK", &ark), ("ASK", &ask), ("ASVK", &asvk)] {
            ca_certificate(der, &format!("{generation:?} {name}"))?;
        }
        let roots = Roots::new(ark, ask, asvk)
            .map_err(|e| VerifyError::CertificateChain(format!("{generation:?} roots: {e}")))?;
        self.amd.insert(generation, Arc::new(roots));
        Ok(self)
    }

    /// These anchors with the ARK, ASK and ASVK in `pem` (the shape of AMD's
    /// `ask_ark_asvk.pem`, any order: the self-signed one is the ARK, the one whose common
    /// name says VLEK the ASVK) as the roots of `generation`.
    pub fn with_amd_roots_pem(
        self,
        generation: Generation,
        pem: &[u8],
    ) -> Result<Self, VerifyError> {
        let (ark, ask, asvk) = amd_roots_from_pem(pem)?;
        self.with_amd_roots(generation, ark, ask, asvk)
    }

    /// These anchors with `policy` for SNP reports whose generation has no AMD CRL at hand
    /// ([`CrlPolicy::Required`] unless set).
    pub fn with_snp_crl_policy(mut self, policy: CrlPolicy) -> Self {
        self.snp_crl = policy;
        self
    }

    /// What SNP verification does without AMD's CRL.
    pub fn snp_crl_policy(&self) -> CrlPolicy {
        self.snp_crl
    }

    /// The configured Intel root CA (DER); `None` means Intel's own.
    pub fn intel_root_ca(&self) -> Option<&[u8]> {
        self.intel_root_ca.as_deref().map(Vec::as_slice)
    }

    /// The ARK, ASK and ASVK of `generation`.
    pub fn amd_roots(&self, generation: Generation) -> Result<&Roots, VerifyError> {
        if let Some(r) = self.amd.get(&generation) {
            return Ok(r);
        }
        Err(VerifyError::CertificateChain(match &self.amd_error {
            Some(e) => format!("embedded AMD roots: {e}"),
            None => format!("no roots for {generation:?}"),
        }))
    }
}

/// Certificates in `bytes`: every `CERTIFICATE` block of a PEM text, or `bytes` itself as
/// one DER certificate.
pub fn certificates(bytes: &[u8]) -> Vec<Vec<u8>> {
    if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        crate::tdx::embedded_certs(bytes)
    } else {
        vec![bytes.to_vec()]
    }
}

/// DER ARK, ASK and ASVK.
type AmdRootCerts = (Vec<u8>, Vec<u8>, Vec<u8>);

/// An AMD root set as AMD's KDS and upstream Trustee ship it (`ask_ark_asvk.pem`: PEM or
/// concatenated certificates): the self-signed one is the ARK, the one whose common name
/// names VLEK is the ASVK, the other the ASK.
fn amd_roots_from_pem(bytes: &[u8]) -> Result<AmdRootCerts, VerifyError> {
    let certs = certificates(bytes);
    if certs.len() != 3 {
        return Err(VerifyError::CertificateChain(format!(
            "expected 3 certificates (ARK, ASK, ASVK), found {}",
            certs.len()
        )));
    }
    let (mut ark, mut ask, mut asvk) = (None, None, None);
    for der in certs {
        let (self_signed, vlek) = {
            let cert = ca_certificate(&der, "AMD root")?;
            let cn = cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|c| c.as_str().ok())
                .unwrap_or_default()
                .to_ascii_uppercase();
            (cert.subject() == cert.issuer(), cn.contains("VLEK"))
        };
        let slot = match (self_signed, vlek) {
            (true, _) => &mut ark,
            (false, true) => &mut asvk,
            (false, false) => &mut ask,
        };
        if slot.replace(der).is_some() {
            return Err(VerifyError::CertificateChain(
                "expected one ARK (self-signed), one ASK and one ASVK (common name with VLEK)"
                    .into(),
            ));
        }
    }
    match (ark, ask, asvk) {
        (Some(ark), Some(ask), Some(asvk)) => Ok((ark, ask, asvk)),
        _ => Err(VerifyError::CertificateChain(
            "expected one ARK (self-signed), one ASK and one ASVK (common name with VLEK)".into(),
        )),
    }
}

/// `der` parsed, refused unless it is exactly one certificate of a CA (basicConstraints
/// cA=TRUE): a leaf configured as a root would make every key it ever signed a root.
fn ca_certificate<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, VerifyError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| {
        VerifyError::CertificateChain(format!("{what}: not an X.509 certificate ({e})"))
    })?;
    if !rest.is_empty() {
        return Err(VerifyError::CertificateChain(format!(
            "{what}: trailing bytes after the certificate"
        )));
    }
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    if !is_ca {
        return Err(VerifyError::CertificateChain(format!(
            "{what}: not a CA certificate (no basicConstraints cA=TRUE)"
        )));
    }
    Ok(cert)
}
