//! [`TeeVerifier`]: the KBS's [`Verifier`] for Intel TDX and AMD SEV-SNP, over the
//! `tee-verifiers` crate (signatures and chains to the vendor roots, collateral, TCB,
//! report-data and init-data binding), with its refusals mapped to the RCAR errors.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use kbs_types::Tee;
use serde_json::Value;
use tee_verifiers::{CollateralStore, TeeKind};

use crate::attest::{Verifier, VerifyError};

/// The time collateral and certificate validity are checked at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Clock {
    /// The system clock (production).
    #[default]
    System,
    /// A fixed instant: tests verify real evidence inside its collateral's validity window,
    /// never at the wall clock.
    Fixed(SystemTime),
}

impl Clock {
    /// The current time by this clock.
    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Fixed(at) => *at,
        }
    }
}

/// Verifies TDX quotes or SNP reports with collateral from a shared [`CollateralStore`].
#[derive(Debug, Clone)]
pub struct TeeVerifier {
    tee: Tee,
    kind: TeeKind,
    verifier: tee_verifiers::Verifier,
    clock: Clock,
}

impl TeeVerifier {
    /// The `tdx` verifier.
    pub fn tdx(collateral: Arc<CollateralStore>, clock: Clock) -> Self {
        Self::new(Tee::Tdx, TeeKind::Tdx, collateral, clock)
    }

    /// The `snp` verifier.
    pub fn snp(collateral: Arc<CollateralStore>, clock: Clock) -> Self {
        Self::new(Tee::Snp, TeeKind::Snp, collateral, clock)
    }

    fn new(tee: Tee, kind: TeeKind, collateral: Arc<CollateralStore>, clock: Clock) -> Self {
        Self {
            tee,
            kind,
            verifier: tee_verifiers::Verifier::new(collateral),
            clock,
        }
    }

    /// The same verifier trusting `anchors` instead of the vendors' roots.
    pub fn with_trust_anchors(mut self, anchors: Arc<tee_verifiers::TrustAnchors>) -> Self {
        self.verifier = self.verifier.with_trust_anchors(anchors);
        self
    }
}

#[async_trait]
impl Verifier for TeeVerifier {
    fn tee(&self) -> Tee {
        self.tee
    }

    async fn verify(
        &self,
        evidence: &Value,
        report_data: &[u8],
        init_data_digest: Option<&[u8]>,
    ) -> Result<Value, VerifyError> {
        // Some clients send the evidence as a JSON string holding the object.
        let evidence: Cow<'_, Value> = match evidence {
            Value::String(text) => match serde_json::from_str::<Value>(text) {
                Ok(parsed @ Value::Object(_)) => Cow::Owned(parsed),
                _ => Cow::Borrowed(evidence),
            },
            other => Cow::Borrowed(other),
        };
        let claims = self
            .verifier
            .verify(
                self.kind,
                &evidence,
                report_data,
                init_data_digest,
                self.clock.now(),
            )
            .await
            .map_err(map_error)?;
        Ok(claims.into_value())
    }
}

/// The RCAR error for a `tee-verifiers` refusal; the detail keeps the refusal's name
/// (`SignatureInvalid`, `CertificateChainInvalid`, `TcbNotSupported`, ...) and reason.
pub fn map_error(e: tee_verifiers::VerifyError) -> VerifyError {
    use tee_verifiers::VerifyError as V;
    match e {
        V::Malformed(detail) => VerifyError::Malformed(detail),
        V::UnsupportedTee(tee) => VerifyError::Malformed(format!("no verifier for TEE {tee}")),
        V::ReportDataMismatch => VerifyError::ReportDataMismatch,
        V::InitDataMismatch => VerifyError::InitDataMismatch,
        V::CollateralUnavailable(detail) => VerifyError::CollateralUnavailable(detail),
        other => VerifyError::Rejected(format!("{}: {other}", other.name())),
    }
}
