//! The sample TEE verifier (development and tests only: nothing is signed).
//!
//! Evidence is what guest-components' sample attester produces:
//! `{"svn": "1", "report_data": <standard base64>, ...}`.

use std::borrow::Cow;

use async_trait::async_trait;
use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use kbs_types::Tee;
use serde_json::{Map, Value};

use super::verifier::{Verifier, VerifyError};

/// Report data fields are at most this long on real TEEs (TDX, SNP); attesters
/// may zero-pad the digest to it.
const PADDED_REPORT_DATA_LEN: usize = 64;
/// Longest `svn` accepted (upstream's attester writes a short number).
const MAX_SVN_BYTES: usize = 64;

const B64_STD_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Verifies sample evidence: checks only the report-data binding.
#[derive(Clone, Copy, Debug, Default)]
pub struct SampleVerifier;

#[async_trait]
impl Verifier for SampleVerifier {
    fn tee(&self) -> Tee {
        Tee::Sample
    }

    async fn verify(
        &self,
        evidence: &Value,
        report_data: &[u8],
        _init_data_digest: Option<&[u8]>,
    ) -> Result<Value, VerifyError> {
        // The sample evidence carries no init-data digest: for this TEE the
        // init-data is taken as sent (docs/protocol.md, "The sample TEE").
        verify_sample(evidence, report_data)
    }
}

fn verify_sample(evidence: &Value, expected: &[u8]) -> Result<Value, VerifyError> {
    // Older clients sent the evidence as a JSON string rather than an object.
    let evidence: Cow<'_, Value> = match evidence {
        Value::String(text) => Cow::Owned(
            serde_json::from_str(text)
                .map_err(|_| VerifyError::Malformed("sample evidence string is not JSON".into()))?,
        ),
        other => Cow::Borrowed(other),
    };
    let fields = evidence
        .as_object()
        .ok_or_else(|| VerifyError::Malformed("sample evidence is not a JSON object".into()))?;
    let svn = fields
        .get("svn")
        .and_then(Value::as_str)
        .ok_or_else(|| VerifyError::Malformed("sample evidence has no string \"svn\"".into()))?;
    if svn.len() > MAX_SVN_BYTES {
        return Err(VerifyError::Malformed(format!(
            "sample evidence \"svn\" is {} bytes, at most {MAX_SVN_BYTES} are allowed",
            svn.len()
        )));
    }
    let encoded = fields
        .get("report_data")
        .and_then(Value::as_str)
        .ok_or_else(|| VerifyError::Malformed("sample evidence has no \"report_data\"".into()))?;
    let actual = B64_STD_LENIENT
        .decode(encoded)
        .map_err(|_| VerifyError::Malformed("sample report_data is not base64".into()))?;
    if !report_data_matches(&actual, expected) {
        return Err(VerifyError::ReportDataMismatch);
    }

    Ok(claims(svn, &actual))
}

/// The claims upstream's sample verifier yields (trustee `deps/verifier/src/sample/mod.rs`,
/// `parse_tee_evidence`), and nothing else the evidence carries: whatever a client adds
/// (up to the request body limit) never reaches a token. `report_data` is hex here (upstream
/// echoes the base64 as sent); the other three are upstream's fixed values, so policies
/// written for upstream's sample TEE evaluate the same.
fn claims(svn: &str, report_data: &[u8]) -> Value {
    let mut claims = Map::with_capacity(5);
    claims.insert("svn".into(), Value::String(svn.to_owned()));
    claims.insert(
        "report_data".into(),
        Value::String(hex::encode(report_data)),
    );
    claims.insert("launch_digest".into(), Value::String("abcde".into()));
    claims.insert(
        "platform_version".into(),
        serde_json::json!({"major": 1, "minor": 4}),
    );
    claims.insert("debug".into(), Value::Bool(false));
    Value::Object(claims)
}

/// The exact digest, or the digest zero-padded to 64 bytes.
fn report_data_matches(actual: &[u8], expected: &[u8]) -> bool {
    if actual == expected {
        return true;
    }
    actual.len() == PADDED_REPORT_DATA_LEN
        && expected.len() < PADDED_REPORT_DATA_LEN
        && actual.starts_with(expected)
        && actual[expected.len()..].iter().all(|b| *b == 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use serde_json::json;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn accepts_exact_and_padded_digest() {
        let digest = [7u8; 48];
        let exact = json!({"svn": "1", "report_data": STANDARD.encode(digest)});
        let claims = block_on(SampleVerifier.verify(&exact, &digest, None)).unwrap();
        assert_eq!(claims["svn"], "1");
        assert_eq!(claims["report_data"], hex::encode(digest));

        let mut padded = digest.to_vec();
        padded.resize(64, 0);
        let ev = json!({"svn": "1", "report_data": STANDARD.encode(&padded)});
        let claims = block_on(SampleVerifier.verify(&ev, &digest, None)).unwrap();
        assert_eq!(claims["report_data"], hex::encode(&padded));
    }

    /// issue 17 defect 3: every evidence member (up to the 1 MiB request body) went into
    /// the claims, and so into the token. Only upstream's sample claims are kept.
    #[test]
    fn only_upstreams_sample_claims_are_kept() {
        let digest = [7u8; 48];
        let ev = json!({
            "svn": "3",
            "report_data": STANDARD.encode(digest),
            "junk": "x".repeat(512 * 1024),
            "nested": {"a": [1, 2, 3]},
            "cc_eventlog": "AAAA",
        });
        let claims = block_on(SampleVerifier.verify(&ev, &digest, None)).unwrap();
        assert_eq!(
            claims,
            json!({
                "svn": "3",
                "report_data": hex::encode(digest),
                "launch_digest": "abcde",
                "platform_version": {"major": 1, "minor": 4},
                "debug": false,
            })
        );
        assert!(claims.to_string().len() < 512);
    }

    #[test]
    fn a_long_svn_is_refused() {
        let digest = [7u8; 48];
        let ev = json!({"svn": "1".repeat(65), "report_data": STANDARD.encode(digest)});
        let err = block_on(SampleVerifier.verify(&ev, &digest, None)).unwrap_err();
        assert!(matches!(err, VerifyError::Malformed(m) if m.contains("svn")));
    }

    #[test]
    fn accepts_evidence_sent_as_a_string() {
        let digest = [1u8; 32];
        let ev =
            Value::String(json!({"svn": "1", "report_data": STANDARD.encode(digest)}).to_string());
        assert!(block_on(SampleVerifier.verify(&ev, &digest, None)).is_ok());
    }

    #[test]
    fn mismatch_is_reported() {
        let digest = [7u8; 48];
        let mut other = digest;
        other[0] = 8;
        let ev = json!({"svn": "1", "report_data": STANDARD.encode(other)});
        let err = block_on(SampleVerifier.verify(&ev, &digest, None)).unwrap_err();
        assert!(matches!(err, VerifyError::ReportDataMismatch));

        // Padding must be zeros.
        let mut padded = digest.to_vec();
        padded.resize(64, 1);
        let ev = json!({"svn": "1", "report_data": STANDARD.encode(&padded)});
        assert!(block_on(SampleVerifier.verify(&ev, &digest, None)).is_err());

        // A truncated digest is not a match.
        let ev = json!({"svn": "1", "report_data": STANDARD.encode(&digest[..32])});
        assert!(block_on(SampleVerifier.verify(&ev, &digest, None)).is_err());
    }

    #[test]
    fn malformed_evidence_is_rejected() {
        for ev in [
            json!(null),
            json!("not json"),
            json!([1, 2]),
            json!({"report_data": "AAAA"}),
            json!({"svn": 1, "report_data": "AAAA"}),
            json!({"svn": "1"}),
            json!({"svn": "1", "report_data": "***"}),
        ] {
            let err = block_on(SampleVerifier.verify(&ev, &[0u8; 48], None)).unwrap_err();
            assert!(matches!(err, VerifyError::Malformed(_)), "{ev}: {err}");
        }
    }
}
