//! Why verification refused evidence: one variant per reason a caller treats differently.

/// A refusal, distinguishable by variant so the KBS can map it to an HTTP error name
/// (`EvidenceVerificationFailed`, `VerifierUnavailable`, ...) with a clear detail.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    /// The TEE named in the request has no verifier in this crate.
    #[error("no verifier for TEE {0}")]
    UnsupportedTee(String),
    /// The evidence does not have the shape (JSON, base64, binary layout) of its TEE.
    #[error("malformed evidence: {0}")]
    Malformed(String),
    /// The report data in the evidence is not the expected runtime-data digest.
    #[error("report data in the evidence does not match the expected runtime-data digest")]
    ReportDataMismatch,
    /// MRCONFIGID (TDX) or HOST_DATA (SNP) is not the init-data digest.
    #[error("init-data digest in the evidence (MRCONFIGID/HOST_DATA) does not match the init-data")]
    InitDataMismatch,
    /// A signature over the report/quote body does not verify (TDX quote or QE report
    /// signature, SNP report signature).
    #[error("evidence signature is invalid: {0}")]
    SignatureInvalid(String),
    /// A certificate on the path to the vendor root does not verify (PCK chain, VCEK/VLEK
    /// chain, wrong processor generation, unparsable certificate).
    #[error("certificate chain is invalid: {0}")]
    CertificateChain(String),
    /// A certificate on the path is on its issuer's CRL.
    #[error("certificate revoked: {0}")]
    CertificateRevoked(String),
    /// The collateral is outside its validity window at `now` (past nextUpdate, or not yet
    /// issued).
    #[error("collateral is expired or not yet valid: {0}")]
    CollateralExpired(String),
    /// The collateral is malformed or its signature does not verify.
    #[error("collateral is invalid: {0}")]
    CollateralInvalid(String),
    /// No usable collateral: the fetch failed and no still-valid copy is cached.
    #[error("collateral unavailable: {0}")]
    CollateralUnavailable(String),
    /// Intel's TCB info marks the platform (or its QE) as Revoked: never acceptable.
    #[error("platform TCB status is Revoked")]
    TcbRevoked,
    /// The platform's TCB is below every level of Intel's TCB info (Intel QVL's "TCB not
    /// supported"): there is no status to report, the platform is older than Intel lists.
    #[error("platform TCB is below every level of the TCB info: {0}")]
    TcbNotSupported(String),
    /// The SNP report's REPORTED_TCB (or chip id) differs from the VCEK/VLEK extensions.
    #[error("reported TCB does not match the endorsement key certificate: {0}")]
    TcbMismatch(String),
    /// An AMD TCB/hwID extension of the VCEK/VLEK is missing or malformed.
    #[error("malformed TCB extension in the endorsement key certificate: {0}")]
    MalformedTcbExtension(String),
    /// The TDX event log does not replay to the quote's RTMRs.
    #[error("event log does not match the quote: {0}")]
    EventLogMismatch(String),
    /// Well formed and signed, but not acceptable (report version, VMPL, QE identity...).
    #[error("evidence rejected: {0}")]
    Rejected(String),
}

/// Coarse classes of [`VerifyError`], matching what the KBS's verifier interface reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The evidence could not be parsed.
    Malformed,
    /// Report data binding failed.
    ReportDataMismatch,
    /// Init-data binding failed.
    InitDataMismatch,
    /// The evidence was refused (signature, chain, TCB, collateral validity...).
    Rejected,
    /// The verifier lacks what it depends on (collateral service down, nothing cached).
    Unavailable,
}

impl VerifyError {
    /// The coarse class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            VerifyError::Malformed(_) | VerifyError::UnsupportedTee(_) => ErrorKind::Malformed,
            VerifyError::ReportDataMismatch => ErrorKind::ReportDataMismatch,
            VerifyError::InitDataMismatch => ErrorKind::InitDataMismatch,
            VerifyError::CollateralUnavailable(_) => ErrorKind::Unavailable,
            _ => ErrorKind::Rejected,
        }
    }

    /// CamelCase name of the variant, for logs and the error detail.
    pub fn name(&self) -> &'static str {
        match self {
            VerifyError::UnsupportedTee(_) => "UnsupportedTee",
            VerifyError::Malformed(_) => "MalformedEvidence",
            VerifyError::ReportDataMismatch => "ReportDataMismatch",
            VerifyError::InitDataMismatch => "InitDataMismatch",
            VerifyError::SignatureInvalid(_) => "SignatureInvalid",
            VerifyError::CertificateChain(_) => "CertificateChainInvalid",
            VerifyError::CertificateRevoked(_) => "CertificateRevoked",
            VerifyError::CollateralExpired(_) => "CollateralExpired",
            VerifyError::CollateralInvalid(_) => "CollateralInvalid",
            VerifyError::CollateralUnavailable(_) => "CollateralUnavailable",
            VerifyError::TcbRevoked => "TcbRevoked",
            VerifyError::TcbNotSupported(_) => "TcbNotSupported",
            VerifyError::TcbMismatch(_) => "TcbMismatch",
            VerifyError::MalformedTcbExtension(_) => "MalformedTcbExtension",
            VerifyError::EventLogMismatch(_) => "EventLogMismatch",
            VerifyError::Rejected(_) => "EvidenceRejected",
        }
    }
}
