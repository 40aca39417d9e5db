//! The roots evidence must chain to: Intel's SGX root CA (TDX: PCK chains, the TCB info and
//! QE identity signers, both CRLs) and, per AMD processor generation, the ARK with the ASK
//! and ASVK it signed (SNP: VCEK and VLEK chains, AMD's CRL).
//!
//! [`TrustAnchors::vendor`] holds the vendors' public roots (Intel's as shipped in
//! `dcap-qvl`, AMD's embedded in `snp/roots/`); that is what production uses unless an
//! operator configures other roots (a lab with its own PKI, a test). Replacing a root
//! replaces trust in everything it signs: such a root is checked to parse (and AMD's to
//! chain) when it is set, never later relaxed.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::VerifyError;
use crate::request::Generation;
use crate::snp::vek::{self, Roots};

/// The roots TDX and SNP evidence is verified against.
#[derive(Debug, Clone)]
pub struct TrustAnchors {
    /// DER of the root CA of Intel's SGX/TDX PKI; `None` is Intel's own (dcap-qvl's).
    intel_root_ca: Option<Arc<Vec<u8>>>,
    amd: HashMap<Generation, Arc<Roots>>,
    /// Why the embedded AMD roots could not be loaded (never expected; reported per use).
    amd_error: Option<String>,
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
                })
            })
            .clone()
    }

    /// These anchors with `der` (a self-signed certificate) as the root of Intel's PKI.
    pub fn with_intel_root_ca(mut self, der: Vec<u8>) -> Result<Self, VerifyError> {
        let (rest, cert) = X509Certificate::from_der(&der)
            .map_err(|e| VerifyError::CertificateChain(format!("Intel root CA: {e}")))?;
        if !rest.is_empty() || cert.subject() != cert.issuer() {
            return Err(VerifyError::CertificateChain(
                "Intel root CA must be one self-signed certificate".into(),
            ));
        }
        self.intel_root_ca = Some(Arc::new(der));
        Ok(self)
    }

    /// These anchors with `ark` (self-signed) and the `ask` and `asvk` it signed (DER, all
    /// RSASSA-PSS SHA-384 as AMD's) as the roots of `generation`.
    pub fn with_amd_roots(
        mut self,
        generation: Generation,
        ark: Vec<u8>,
        ask: Vec<u8>,
        asvk: Vec<u8>,
    ) -> Result<Self, VerifyError> {
        let roots = Roots::new(ark, ask, asvk)
            .map_err(|e| VerifyError::CertificateChain(format!("{generation:?} roots: {e}")))?;
        self.amd.insert(generation, Arc::new(roots));
        Ok(self)
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
