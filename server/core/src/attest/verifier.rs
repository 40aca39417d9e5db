//! The evidence verifier interface: one implementation per TEE type.

use async_trait::async_trait;
use kbs_types::Tee;
use serde_json::Value;

/// Why a verifier refused evidence.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The evidence does not have the shape this TEE's evidence has.
    #[error("malformed evidence: {0}")]
    Malformed(String),
    /// The evidence's report data does not bind this session's nonce and TEE key.
    #[error("report data in the evidence does not match the runtime data")]
    ReportDataMismatch,
    /// The init-data digest bound in the evidence differs from the init-data sent.
    #[error("init-data digest in the evidence does not match the init-data sent")]
    InitDataMismatch,
    /// The evidence is well formed but not acceptable (signature, TCB, debug mode...).
    #[error("evidence rejected: {0}")]
    Rejected(String),
    /// The verifier could not reach what it depends on (collateral service...).
    #[error("verifier unavailable: {0}")]
    Unavailable(String),
    /// The collateral the evidence needs (Intel DCAP collateral, an AMD VCEK) could not be
    /// fetched and no still-valid copy is cached: nothing is wrong with the evidence, the
    /// KBS cannot check it now.
    #[error(
        "collateral unavailable: {0} (the PCCS/KDS fetch failed and no valid cached copy exists; retry later)"
    )]
    CollateralUnavailable(String),
}

impl VerifyError {
    /// HTTP status this error maps to.
    pub fn status(&self) -> u16 {
        match self {
            VerifyError::Unavailable(_) => 500,
            VerifyError::CollateralUnavailable(_) => 503,
            _ => 401,
        }
    }

    /// CamelCase error name for the JSON error type URL.
    pub fn name(&self) -> &'static str {
        match self {
            VerifyError::Malformed(_) => "MalformedEvidence",
            VerifyError::ReportDataMismatch => "ReportDataMismatch",
            VerifyError::InitDataMismatch => "InitDataMismatch",
            VerifyError::Rejected(_) => "EvidenceRejected",
            VerifyError::Unavailable(_) => "VerifierUnavailable",
            VerifyError::CollateralUnavailable(_) => "EvidenceVerificationFailed",
        }
    }
}

/// Checks one TEE type's evidence and returns the claims it vouches for.
///
/// New TEEs (TDX, SNP, ...) are added by implementing this trait and passing
/// the verifier to [`super::RcarService::new`]; the RCAR core does not change.
#[async_trait]
pub trait Verifier: Send + Sync + 'static {
    /// The TEE type this verifier handles.
    fn tee(&self) -> Tee;

    /// Verifies `evidence`, which must bind `report_data` (the digest of the
    /// session's runtime data) and, when init-data was sent, `init_data_digest`.
    /// Returns the verified TEE claims, placed in the token under the TEE's name.
    async fn verify(
        &self,
        evidence: &Value,
        report_data: &[u8],
        init_data_digest: Option<&[u8]>,
    ) -> Result<Value, VerifyError>;
}
