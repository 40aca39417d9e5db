//! Where attestation evidence comes from: one provider per TEE kind.
//!
//! [`select_provider`] picks the TEE's configfs-tsm provider (TDX, SNP) when the guest has
//! one; the sample attester is used only when asked for.

pub mod tsm;
#[cfg(test)]
mod tsm_tests;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kbs_types::Tee;

/// Errors collecting evidence from the TEE.
#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    /// The TEE device or driver could not produce a report.
    #[error("collect {tee} evidence: {reason}")]
    Collect {
        /// Which TEE was asked.
        tee: Tee,
        /// What went wrong.
        reason: String,
    },
    /// No TEE evidence source was found.
    #[error("no TEE found: {0}")]
    NoTee(String),
    /// The report data does not fit the TEE's report.
    #[error("report data is {got} bytes, the {tee} report holds at most {max}")]
    ReportDataTooLong {
        /// Which TEE was asked.
        tee: Tee,
        /// Length given.
        got: usize,
        /// Most the TEE accepts.
        max: usize,
    },
}

/// A source of TEE evidence binding caller-chosen report data (the runtime-data digest).
#[async_trait]
pub trait EvidenceProvider: Send + Sync {
    /// The TEE kind named in the RCAR `Request`.
    fn tee(&self) -> Tee;

    /// Evidence whose report data is `report_data`, as the JSON value sent in
    /// `tee-evidence.primary_evidence`.
    async fn primary_evidence(
        &self,
        report_data: Vec<u8>,
    ) -> Result<serde_json::Value, EvidenceError>;
}

/// One evidence source shared by several clients (one per KBS URL of the daemon's run loop).
#[async_trait]
impl EvidenceProvider for std::sync::Arc<dyn EvidenceProvider> {
    fn tee(&self) -> Tee {
        (**self).tee()
    }

    async fn primary_evidence(
        &self,
        report_data: Vec<u8>,
    ) -> Result<serde_json::Value, EvidenceError> {
        (**self).primary_evidence(report_data).await
    }
}

/// Which evidence source to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvidenceSource {
    /// The TEE found through configfs-tsm (TDX or SNP); an error when there is none.
    #[default]
    Auto,
    /// The sample attester (development and tests only).
    Sample,
}

/// The evidence provider for `source`, probing configfs-tsm at `tsm_root` for `Auto`.
pub fn select_provider(
    source: EvidenceSource,
    tsm_root: &Path,
) -> Result<Box<dyn EvidenceProvider>, EvidenceError> {
    select_provider_on(source, Arc::new(tsm::RealFs), tsm_root)
}

/// [`select_provider`] over a given filesystem (tests use a configfs fixture).
pub fn select_provider_on(
    source: EvidenceSource,
    fs: Arc<dyn tsm::ConfigFs>,
    tsm_root: &Path,
) -> Result<Box<dyn EvidenceProvider>, EvidenceError> {
    match source {
        EvidenceSource::Sample => Ok(Box::new(SampleAttester)),
        EvidenceSource::Auto => match tsm::detect_tsm_provider(fs.as_ref(), tsm_root) {
            Some(provider) => Ok(Box::new(tsm::TsmEvidenceProvider::with_fs(
                fs, tsm_root, provider,
            ))),
            None => Err(EvidenceError::NoTee(format!(
                "no TDX or SNP provider under {} (configfs-tsm); use the sample attester \
                 explicitly for development",
                tsm_root.display()
            ))),
        },
    }
}

/// Largest report data the sample attester takes (that of real TEEs, 64 bytes).
const SAMPLE_MAX_REPORT_DATA: usize = 64;

/// The sample TEE: unsigned evidence for development and tests, never trusted
/// by a production policy. Same shape as upstream's sample attester.
#[derive(Debug, Default, Clone, Copy)]
pub struct SampleAttester;

#[async_trait]
impl EvidenceProvider for SampleAttester {
    fn tee(&self) -> Tee {
        Tee::Sample
    }

    async fn primary_evidence(
        &self,
        report_data: Vec<u8>,
    ) -> Result<serde_json::Value, EvidenceError> {
        if report_data.len() > SAMPLE_MAX_REPORT_DATA {
            return Err(EvidenceError::ReportDataTooLong {
                tee: Tee::Sample,
                got: report_data.len(),
                max: SAMPLE_MAX_REPORT_DATA,
            });
        }
        // Standard alphabet with '=' padding, the raw digest unpadded to any
        // report size: what upstream's sample attester sends and trustee's
        // sample verifier decodes and compares byte for byte.
        Ok(serde_json::json!({
            "svn": "1",
            "report_data": STANDARD.encode(&report_data),
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sample_evidence_shape() {
        let provider: Box<dyn EvidenceProvider> = Box::new(SampleAttester);
        assert_eq!(provider.tee(), Tee::Sample);
        assert_eq!(serde_json::to_value(provider.tee()).unwrap(), "sample");

        let digest: Vec<u8> = (0u8..48).collect();
        let ev = provider.primary_evidence(digest.clone()).await.unwrap();
        let obj = ev.as_object().unwrap();
        assert_eq!(obj.len(), 2);
        assert_eq!(ev["svn"], "1");
        let rd = ev["report_data"].as_str().unwrap();
        assert_eq!(STANDARD.decode(rd).unwrap(), digest);
        assert_eq!(rd.len(), 64);
    }

    #[tokio::test]
    async fn sample_evidence_uses_padded_standard_base64() {
        // A SHA-256 digest (32 bytes) needs one '=' of padding; the standard
        // alphabet uses '+' and '/', not '-' and '_'.
        let ev = SampleAttester
            .primary_evidence(vec![0xfb; 32])
            .await
            .unwrap();
        let rd = ev["report_data"].as_str().unwrap();
        assert!(rd.ends_with('='), "{rd}");
        assert!(rd.contains('+') || rd.contains('/'), "{rd}");
        assert_eq!(rd, "+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/v7+/s=");
    }

    #[tokio::test]
    async fn sample_evidence_rejects_oversized_report_data() {
        let err = SampleAttester
            .primary_evidence(vec![0; 65])
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            EvidenceError::ReportDataTooLong { got: 65, .. }
        ));
    }
}
