//! Real TEE evidence verification for the Tether KBS: Intel TDX quotes (v4, v5) against
//! Intel's DCAP collateral, AMD SEV-SNP reports against the VCEK/VLEK and AMD's roots.
//!
//! The core is sans-IO: [`verify`] takes the evidence, the expected report data and
//! init-data digest, the [`Collateral`] and a `now`, and returns upstream Trustee's claims or
//! a typed [`VerifyError`]. [`collateral_request`] says which collateral a piece of evidence
//! needs; [`Verifier`] is the async shell that gets it from a [`CollateralStore`] (memory
//! cache, persistent cache, PCCS/KDS or files) and calls [`verify`].

pub mod anchors;
pub mod binding;
pub mod collateral;
mod der;
mod error;
pub mod request;
pub mod snp;
pub mod tdx;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub use anchors::TrustAnchors;
pub use collateral::{Collateral, CollateralRequest, CollateralStore};
pub use error::{ErrorKind, VerifyError};

/// The TEEs this crate verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TeeKind {
    /// Intel TDX (`tdx`).
    Tdx,
    /// AMD SEV-SNP (`snp`).
    Snp,
}

impl TryFrom<kbs_types::Tee> for TeeKind {
    type Error = VerifyError;

    fn try_from(tee: kbs_types::Tee) -> Result<Self, VerifyError> {
        match tee {
            kbs_types::Tee::Tdx => Ok(TeeKind::Tdx),
            kbs_types::Tee::Snp => Ok(TeeKind::Snp),
            other => Err(VerifyError::UnsupportedTee(format!("{other:?}"))),
        }
    }
}

/// Verified claims, placed by the KBS under the TEE's name (`tdx`, `snp`) in the policy input.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims(pub Value);

impl Claims {
    /// The claims as JSON.
    pub fn into_value(self) -> Value {
        self.0
    }
}

fn unix(now: SystemTime) -> i64 {
    match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Evidence decoded from its wire JSON, ready for [`Decoded::collateral_request`] and
/// [`Decoded::verify`] (decoding once serves both).
#[derive(Debug, Clone)]
pub enum Decoded {
    /// TDX quote and event log.
    Tdx(tdx::DecodedEvidence),
    /// SNP report and the key it carries.
    Snp(snp::DecodedEvidence),
}

impl Decoded {
    /// Decodes `evidence` for `tee`.
    pub fn new(tee: TeeKind, evidence: &Value) -> Result<Self, VerifyError> {
        Ok(match tee {
            TeeKind::Tdx => Decoded::Tdx(tdx::DecodedEvidence::from_json(evidence)?),
            TeeKind::Snp => Decoded::Snp(snp::DecodedEvidence::from_json(evidence)?),
        })
    }

    /// The collateral this evidence needs (no I/O).
    pub fn collateral_request(&self) -> Result<CollateralRequest, VerifyError> {
        match self {
            Decoded::Tdx(ev) => tdx::collateral_request(ev),
            Decoded::Snp(ev) => snp::collateral_request(ev),
        }
    }

    /// Verifies the evidence up to the vendors' roots; see [`verify`].
    pub fn verify(
        &self,
        expected_report_data: &[u8],
        expected_init_data_digest: Option<&[u8]>,
        collateral: &Collateral,
        now: SystemTime,
    ) -> Result<Claims, VerifyError> {
        self.verify_with(
            &TrustAnchors::vendor(),
            expected_report_data,
            expected_init_data_digest,
            collateral,
            now,
        )
    }

    /// Verifies the evidence up to the roots in `anchors`; see [`verify`].
    pub fn verify_with(
        &self,
        anchors: &TrustAnchors,
        expected_report_data: &[u8],
        expected_init_data_digest: Option<&[u8]>,
        collateral: &Collateral,
        now: SystemTime,
    ) -> Result<Claims, VerifyError> {
        let now = unix(now);
        let claims = match (self, collateral) {
            (Decoded::Tdx(ev), Collateral::Tdx(c)) => tdx::verify(
                anchors.intel_root_ca(),
                ev,
                expected_report_data,
                expected_init_data_digest,
                c,
                now,
            )?,
            (Decoded::Tdx(_), _) => {
                return Err(VerifyError::CollateralUnavailable(
                    "TDX verification needs DCAP collateral".into(),
                ));
            }
            (Decoded::Snp(ev), c) => {
                let (fetched, crl) = match c {
                    Collateral::Snp(s) => (s.vcek.as_deref(), s.crl.as_deref()),
                    _ => (None, None),
                };
                snp::verify(
                    anchors,
                    ev,
                    expected_report_data,
                    expected_init_data_digest,
                    fetched.map(Vec::as_slice),
                    crl.map(Vec::as_slice),
                    now,
                )?
            }
        };
        Ok(Claims(Value::Object(claims)))
    }
}

/// The collateral `evidence` needs (parses the evidence; no I/O).
pub fn collateral_request(
    tee: TeeKind,
    evidence: &Value,
) -> Result<CollateralRequest, VerifyError> {
    Decoded::new(tee, evidence)?.collateral_request()
}

/// Verifies `evidence` (the `tee-evidence.primary_evidence` JSON a `kbs_protocol` client
/// sends) at `now`: signatures and certificate chains to the vendor roots, collateral
/// validity, TCB, then the binding of `expected_report_data` (REPORT_DATA) and
/// `expected_init_data_digest` (MRCONFIGID / HOST_DATA; see [`binding`]).
pub fn verify(
    tee: TeeKind,
    evidence: &Value,
    expected_report_data: &[u8],
    expected_init_data_digest: Option<&[u8]>,
    collateral: &Collateral,
    now: SystemTime,
) -> Result<Claims, VerifyError> {
    Decoded::new(tee, evidence)?.verify(
        expected_report_data,
        expected_init_data_digest,
        collateral,
        now,
    )
}

/// The async shell: collateral from a [`CollateralStore`], then [`verify`].
#[derive(Debug, Clone)]
pub struct Verifier {
    store: Arc<CollateralStore>,
    anchors: Arc<TrustAnchors>,
}

impl Verifier {
    /// A verifier getting collateral from `store`, trusting the vendors' roots.
    pub fn new(store: Arc<CollateralStore>) -> Self {
        Verifier {
            store,
            anchors: TrustAnchors::vendor(),
        }
    }

    /// The same verifier trusting `anchors` instead.
    pub fn with_trust_anchors(mut self, anchors: Arc<TrustAnchors>) -> Self {
        self.anchors = anchors;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<CollateralStore> {
        &self.store
    }

    /// Gets the collateral `evidence` needs, then verifies it at `now`.
    pub async fn verify(
        &self,
        tee: TeeKind,
        evidence: &Value,
        expected_report_data: &[u8],
        expected_init_data_digest: Option<&[u8]>,
        now: SystemTime,
    ) -> Result<Claims, VerifyError> {
        let decoded = Decoded::new(tee, evidence)?;
        let request = decoded.collateral_request()?;
        let collateral = self.store.collateral(&request, unix(now)).await?;
        decoded.verify_with(
            &self.anchors,
            expected_report_data,
            expected_init_data_digest,
            &collateral,
            now,
        )
    }
}

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
