//! Revoked certificates: the shared TDX quote and collateral re-signed under a test PKI
//! shaped like Intel's (real Intel keys cannot sign a test CRL), verified with that PKI's
//! root as the verifier's trust anchor. The same chain with and without a CRL entry shows
//! that the revocation, and nothing else, is what refuses.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/intel_pki.rs"]
mod intel_pki;

use std::sync::Arc;

use common::*;
use intel_pki::{IntelPki, PCK_CA_SERIAL, PCK_SERIAL, TCB_SIGNER_SERIAL};
use tee_verifiers::collateral::TdxCollateral;
use tee_verifiers::{Collateral, Decoded, TeeKind, TrustAnchors, VerifyError};

struct Tdx {
    pki: IntelPki,
    quote: Vec<u8>,
    anchors: TrustAnchors,
}

fn tdx_setup() -> Tdx {
    let pki = IntelPki::new(TDX_QUOTE);
    let quote = pki.resign_quote(TDX_QUOTE);
    let anchors = (*TrustAnchors::vendor())
        .clone()
        .with_intel_root_ca(pki.root_der())
        .unwrap();
    Tdx {
        pki,
        quote,
        anchors,
    }
}

impl Tdx {
    fn verify(
        &self,
        anchors: &TrustAnchors,
        root_revokes: &[u64],
        pck_revokes: &[u64],
    ) -> Result<serde_json::Value, VerifyError> {
        let real = TdxCollateral::from_json(TDX_COLLATERAL).unwrap();
        let c = TdxCollateral::new(self.pki.collateral(
            &real.collateral,
            root_revokes,
            pck_revokes,
        ))
        .unwrap();
        let now = inside(&real);
        Decoded::new(TeeKind::Tdx, &tdx_evidence(&self.quote))?
            .verify_with(
                anchors,
                &tdx_report_data(&self.quote),
                None,
                &Collateral::Tdx(Arc::new(c)),
                now,
            )
            .map(|c| c.0)
    }
}

#[test]
fn tdx_quote_under_the_test_root_verifies_when_nothing_is_revoked() {
    let t = tdx_setup();
    let claims = t.verify(&t.anchors, &[], &[]).unwrap();
    assert_eq!(claims["tcb_status"], "UpToDate");
    // A CRL listing some other serial changes nothing.
    t.verify(&t.anchors, &[0x77], &[0x78]).unwrap();
}

#[test]
fn tdx_test_chain_is_refused_under_intel_s_root() {
    // The production anchors never trust the test root.
    let t = tdx_setup();
    let err = t.verify(&TrustAnchors::vendor(), &[], &[]).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::CertificateChain(_) | VerifyError::CollateralInvalid(_)
        ),
        "{err:?}"
    );
}

#[test]
fn tdx_revoked_pck_certificate_is_refused_naming_the_revocation() {
    let t = tdx_setup();
    let err = t.verify(&t.anchors, &[], &[PCK_SERIAL]).unwrap_err();
    let VerifyError::CertificateRevoked(detail) = &err else {
        panic!("expected CertificateRevoked, got {err:?}");
    };
    assert!(
        detail.contains(&format!("the PCK certificate (serial {PCK_SERIAL:x})"))
            && detail.contains("on the PCK CRL as revoked since"),
        "{detail}"
    );
    assert_eq!(err.name(), "CertificateRevoked");
    assert!(err.to_string().contains("revoked"), "{err}");
}

#[test]
fn tdx_revoked_pck_ca_is_refused_naming_the_revocation() {
    let t = tdx_setup();
    let err = t.verify(&t.anchors, &[PCK_CA_SERIAL], &[]).unwrap_err();
    let VerifyError::CertificateRevoked(detail) = &err else {
        panic!("expected CertificateRevoked, got {err:?}");
    };
    assert!(
        detail.contains(&format!(
            "the PCK CA certificate (serial {PCK_CA_SERIAL:x})"
        )) && detail.contains("on the root CA CRL"),
        "{detail}"
    );
}

#[test]
fn tdx_revoked_tcb_info_signer_is_refused_naming_the_revocation() {
    let t = tdx_setup();
    let err = t.verify(&t.anchors, &[TCB_SIGNER_SERIAL], &[]).unwrap_err();
    let VerifyError::CertificateRevoked(detail) = &err else {
        panic!("expected CertificateRevoked, got {err:?}");
    };
    assert!(detail.contains("TCB info signing certificate"), "{detail}");
}
