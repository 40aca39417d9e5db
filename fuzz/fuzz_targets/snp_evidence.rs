//! SNP evidence as the verifier reads it: the raw report (1184 bytes) with a VCEK, and the wire
//! JSON (`{"attestation_report": ..., "cert_chain": [...]}`), decoded and verified at a time
//! inside the test VCEK's validity. The anchors skip the CRL check when no CRL is given
//! (`if-published`), so the fuzzer reaches the signature and TCB checks behind it.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use tee_verifiers::collateral::SnpCollateral;
use tee_verifiers::snp::crl::CrlPolicy;
use tee_verifiers::snp::report::Report;
use tee_verifiers::{Collateral, Decoded, TeeKind, TrustAnchors};

const VCEK: &[u8] = include_bytes!("../../server/tee-verifiers/testdata/snp/test-vcek.der");
const REPORT_LEN: usize = 1184;

fuzz_target!(|data: &[u8]| {
    // 2025-06-01: inside the test VCEK's validity.
    let now = UNIX_EPOCH + Duration::from_secs(1_748_736_000);
    if data.len() >= REPORT_LEN {
        let (report, cert) = data.split_at(REPORT_LEN);
        if let Ok(r) = Report::new(report) {
            let _ = (r.version(), r.guest_svn(), r.policy(), r.vmpl(), r.signed());
        }
        let cert = if cert.is_empty() { VCEK } else { cert };
        let evidence = serde_json::json!({
            "attestation_report": report,
            "cert_chain": [{"cert_type": "VCEK", "data": cert}],
        });
        verify(&evidence, &Collateral::None, now);
        let bare = serde_json::json!({"attestation_report": report});
        let fetched = SnpCollateral {
            vcek: Some(Arc::new(cert.to_vec())),
            crl: None,
        };
        verify(&bare, &Collateral::Snp(fetched), now);
    } else if let Ok(evidence) = serde_json::from_slice::<serde_json::Value>(data) {
        verify(&evidence, &Collateral::None, now);
    }
});

fn verify(evidence: &serde_json::Value, collateral: &Collateral, now: std::time::SystemTime) {
    let Ok(decoded) = Decoded::new(TeeKind::Snp, evidence) else {
        return;
    };
    let _ = decoded.collateral_request();
    let anchors =
        TrustAnchors::clone(&TrustAnchors::vendor()).with_snp_crl_policy(CrlPolicy::IfPublished);
    let _ = decoded.verify_with(&anchors, &[0u8; 64], None, collateral, now);
}
