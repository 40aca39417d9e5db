//! SNP: reports verified against the VCEK (Milan ASK/ARK) and the VLEK (Milan ASVK/ARK),
//! upstream's claims, and refusals, each for its own reason.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use serde_json::{Value, json};
use tee_verifiers::snp::report::Report;
use tee_verifiers::snp::vek::{self, VekKind};
use tee_verifiers::snp::{self, Generation};
use tee_verifiers::{Claims, Collateral, Decoded, TeeKind, TrustAnchors, VerifyError};

/// `tee_verifiers::verify` under AMD's roots with the `if-published` CRL policy: these real
/// reports come without AMD's CRL (see `vendor_if_published`).
fn verify(
    tee: TeeKind,
    evidence: &Value,
    report_data: &[u8],
    init_data_digest: Option<&[u8]>,
    collateral: &Collateral,
    now: std::time::SystemTime,
) -> Result<Claims, VerifyError> {
    Decoded::new(tee, evidence)?.verify_with(
        &vendor_if_published(),
        report_data,
        init_data_digest,
        collateral,
        now,
    )
}

fn verify_snp(evidence: &Value, report: &[u8]) -> Result<Value, VerifyError> {
    verify(
        TeeKind::Snp,
        evidence,
        &snp_report_data(report),
        None,
        &Collateral::None,
        snp_now(),
    )
    .map(|c| c.0)
}

#[test]
fn vcek_report_verifies_with_upstream_claims() {
    let claims = verify_snp(&snp_evidence(SNP_REPORT, "VCEK", SNP_VCEK), SNP_REPORT).unwrap();
    // Upstream's names, string values (parse_tee_evidence).
    for name in [
        "policy_abi_major",
        "policy_abi_minor",
        "policy_smt_allowed",
        "policy_migrate_ma",
        "policy_debug_allowed",
        "policy_single_socket",
        "reported_tcb_bootloader",
        "reported_tcb_tee",
        "reported_tcb_snp",
        "reported_tcb_microcode",
        "platform_tsme_enabled",
        "platform_smt_enabled",
        "measurement",
        "report_data",
        "init_data",
    ] {
        assert!(claims[name].is_string(), "{name}: {claims:#}");
    }
    assert_eq!(claims["reported_tcb_bootloader"], "3");
    assert_eq!(claims["reported_tcb_snp"], "8");
    assert_eq!(claims["reported_tcb_microcode"], "115");
    assert_eq!(claims["policy_debug_allowed"], "false");
    assert_eq!(claims["policy_smt_allowed"], "true");
    assert_eq!(
        claims["measurement"],
        STANDARD.encode(&SNP_REPORT[0x90..0xC0])
    );
    assert_eq!(claims["generation"], "milan");
    assert_eq!(claims["signing_key"], "VCEK");
    assert_eq!(claims["tcb_status"], "ReportedTcbVerified");
}

#[test]
fn vlek_report_verifies_against_the_asvk() {
    // Chain (ASVK, ARK of the report's CPUID generation), signature and TCB verify.
    let r = Report::new(SNP_VLEK_REPORT).unwrap();
    assert_eq!(r.version(), 3);
    assert_eq!(r.signing_key(), 1);
    let key = vek::verify_vek(
        SNP_VLEK,
        VekKind::Vlek,
        Generation::Milan,
        TrustAnchors::vendor().amd_roots(Generation::Milan).unwrap(),
        1_748_736_000,
    )
    .unwrap();
    snp::verify_report_signature(&r, &key).unwrap();
    snp::check_tcb(&r, &key).unwrap();
    // The whole path then refuses it for its VMPL (1), as upstream does (VMPL 0 only).
    let err = verify_snp(
        &snp_evidence(SNP_VLEK_REPORT, "VLEK", SNP_VLEK),
        SNP_VLEK_REPORT,
    )
    .unwrap_err();
    assert_eq!(
        err,
        VerifyError::Rejected("SNP report VMPL is 1, expected 0".into())
    );
    // The VLEK is issued by the ASVK, not the ASK.
    let err = vek::verify_vek(
        SNP_VLEK,
        VekKind::Vcek,
        Generation::Milan,
        TrustAnchors::vendor().amd_roots(Generation::Milan).unwrap(),
        1_748_736_000,
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::CertificateChain(_)), "{err:?}");
}

#[test]
fn raw_report_and_pem_key_shapes_are_accepted() {
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        STANDARD.encode(SNP_VCEK)
    );
    let ev = json!({
        "attestation_report": STANDARD.encode(SNP_REPORT),
        "cert_chain": [{"cert_type": "ARK", "data": []},
                       {"cert_type": "VCEK", "data": STANDARD.encode(pem.as_bytes())}],
    });
    verify_snp(&ev, SNP_REPORT).unwrap();
}

#[test]
fn flipped_byte_in_report_is_a_bad_signature() {
    let mut r = SNP_REPORT.to_vec();
    r[42] ^= 1; // IMAGE_ID
    let err = verify_snp(&snp_evidence(&r, "VCEK", SNP_VCEK), &r).unwrap_err();
    assert!(matches!(err, VerifyError::SignatureInvalid(_)), "{err:?}");
}

#[test]
fn flipped_byte_in_vcek_breaks_the_chain() {
    let mut v = SNP_VCEK.to_vec();
    v[42] = v[42].wrapping_add(1); // still a parsable certificate (upstream's test)
    let err = verify_snp(&snp_evidence(SNP_REPORT, "VCEK", &v), SNP_REPORT).unwrap_err();
    assert!(matches!(err, VerifyError::CertificateChain(_)), "{err:?}");
}

#[test]
fn milan_vcek_does_not_chain_to_other_generations() {
    for g in [Generation::Genoa, Generation::Turin] {
        let err = vek::verify_vek(
            SNP_VCEK,
            VekKind::Vcek,
            g,
            TrustAnchors::vendor().amd_roots(g).unwrap(),
            1_748_736_000,
        )
        .unwrap_err();
        assert!(
            matches!(err, VerifyError::CertificateChain(_)),
            "{g:?}: {err:?}"
        );
    }
    vek::verify_vek(
        SNP_VCEK,
        VekKind::Vcek,
        Generation::Milan,
        TrustAnchors::vendor().amd_roots(Generation::Milan).unwrap(),
        1_748_736_000,
    )
    .unwrap();
    // A v3 report whose CPUID says Genoa, with the Milan VCEK: refused for the generation.
    let mut r = SNP_VLEK_REPORT.to_vec();
    r[0x188] = 0x19;
    r[0x189] = 0x11; // Genoa model
    let err = verify_snp(&snp_evidence(&r, "VLEK", SNP_VLEK), &r).unwrap_err();
    assert!(matches!(err, VerifyError::CertificateChain(_)), "{err:?}");
}

#[test]
fn invalid_test_vceks_are_refused() {
    // Upstream's test-vcek-invalid-{legacy,new}.der: same subject and AMD extensions layout
    // as the real VCEK (hwID raw in the legacy one, DER OCTET STRING in the new one), but
    // with edited extension values (hwID 00 01 02 .., other TCB SPLs) and so a signature
    // the ASK never made. Their extensions parse; the key is refused.
    for cert in [SNP_VCEK_INVALID_LEGACY, SNP_VCEK_INVALID_NEW] {
        let info = vek::read_extensions(cert, VekKind::Vcek, Generation::Milan).unwrap();
        assert_eq!(info.hw_id.as_ref().unwrap()[..4], [0, 1, 2, 3]);
        let err = verify_snp(&snp_evidence(SNP_REPORT, "VCEK", cert), SNP_REPORT).unwrap_err();
        assert!(matches!(err, VerifyError::CertificateChain(_)), "{err:?}");
    }
}

#[test]
fn reported_tcb_must_match_the_key() {
    // Upstream's check_report_tcb_failure: bump REPORTED_TCB.bootloader (byte 384).
    let mut r = SNP_REPORT.to_vec();
    r[0x180] += 1;
    let report = Report::new(&r).unwrap();
    let key = vek::verify_vek(
        SNP_VCEK,
        VekKind::Vcek,
        Generation::Milan,
        TrustAnchors::vendor().amd_roots(Generation::Milan).unwrap(),
        1_748_736_000,
    )
    .unwrap();
    let err = snp::check_tcb(&report, &key).unwrap_err();
    assert!(matches!(err, VerifyError::TcbMismatch(_)), "{err:?}");
    // Through the whole path the signature fails first (the TCB is signed).
    assert!(verify_snp(&snp_evidence(&r, "VCEK", SNP_VCEK), &r).is_err());

    let mut r = SNP_VLEK_REPORT.to_vec();
    r[0x187] ^= 1; // microcode
    let report = Report::new(&r).unwrap();
    let key = vek::verify_vek(
        SNP_VLEK,
        VekKind::Vlek,
        Generation::Milan,
        TrustAnchors::vendor().amd_roots(Generation::Milan).unwrap(),
        1_748_736_000,
    )
    .unwrap();
    assert!(matches!(
        snp::check_tcb(&report, &key),
        Err(VerifyError::TcbMismatch(_))
    ));
}

#[test]
fn key_of_the_wrong_kind_is_refused() {
    // The VCEK report presented with the VLEK.
    let err = verify_snp(&snp_evidence(SNP_REPORT, "VLEK", SNP_VLEK), SNP_REPORT).unwrap_err();
    assert!(matches!(err, VerifyError::CertificateChain(_)), "{err:?}");
}

#[test]
fn report_data_and_host_data_binding() {
    let ev = snp_evidence(SNP_REPORT, "VCEK", SNP_VCEK);
    let mut rd = snp_report_data(SNP_REPORT);
    rd[63] ^= 1;
    let err = verify(TeeKind::Snp, &ev, &rd, None, &Collateral::None, snp_now()).unwrap_err();
    assert_eq!(err, VerifyError::ReportDataMismatch);

    let rd = snp_report_data(SNP_REPORT);
    let host_data = SNP_REPORT[0xC0..0xE0].to_vec();
    verify(
        TeeKind::Snp,
        &ev,
        &rd,
        Some(&host_data),
        &Collateral::None,
        snp_now(),
    )
    .unwrap();
    let err = verify(
        TeeKind::Snp,
        &ev,
        &rd,
        Some(&[9; 48]),
        &Collateral::None,
        snp_now(),
    )
    .unwrap_err();
    assert_eq!(err, VerifyError::InitDataMismatch);
}

#[test]
fn vek_outside_its_validity_is_refused() {
    // The VLEK expires 2025-12-10.
    let later = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_780_000_000);
    let err = verify(
        TeeKind::Snp,
        &snp_evidence(SNP_VLEK_REPORT, "VLEK", SNP_VLEK),
        &snp_report_data(SNP_VLEK_REPORT),
        None,
        &Collateral::None,
        later,
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::CertificateChain(_)), "{err:?}");
}

#[test]
fn without_cert_chain_the_fetched_vcek_is_used() {
    let mut ev = snp_evidence(SNP_REPORT, "VCEK", SNP_VCEK);
    ev["cert_chain"] = Value::Null;
    let req = tee_verifiers::collateral_request(TeeKind::Snp, &ev).unwrap();
    let tee_verifiers::CollateralRequest::SnpVcek(id) = &req else {
        panic!("{req:?}")
    };
    // A version 2 report has no CPUID: KDS is asked under Milan, then Genoa.
    assert_eq!(id.generation, None);
    assert_eq!(id.hw_id, SNP_REPORT[0x1A0..0x1E0].to_vec());
    assert_eq!(
        id.tcb.url_query(),
        "blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115"
    );
    let rd = snp_report_data(SNP_REPORT);
    let err = verify(TeeKind::Snp, &ev, &rd, None, &Collateral::None, snp_now()).unwrap_err();
    assert!(
        matches!(err, VerifyError::CollateralUnavailable(_)),
        "{err:?}"
    );
    let fetched = Collateral::Snp(tee_verifiers::collateral::SnpCollateral {
        vcek: Some(Arc::new(SNP_VCEK.to_vec())),
        crl: None,
    });
    verify(TeeKind::Snp, &ev, &rd, None, &fetched, snp_now()).unwrap();
}

#[test]
fn malformed_snp_evidence() {
    for ev in [
        json!({}),
        json!({"attestation_report": "AAAA"}),
        json!({"attestation_report": {"version": 2}}),
        json!({"attestation_report": STANDARD.encode(SNP_REPORT),
               "cert_chain": [{"cert_type": "VCEK", "data": "%%%"}]}),
    ] {
        let err = verify(TeeKind::Snp, &ev, &[], None, &Collateral::None, snp_now()).unwrap_err();
        assert!(matches!(err, VerifyError::Malformed(_)), "{ev}: {err:?}");
    }
}

#[test]
fn amd_s_roots_by_default_refuse_a_report_without_amd_s_crl() {
    let ev = snp_evidence(SNP_REPORT, "VCEK", SNP_VCEK);
    let rd = snp_report_data(SNP_REPORT);
    let err = tee_verifiers::verify(TeeKind::Snp, &ev, &rd, None, &Collateral::None, snp_now())
        .unwrap_err();
    assert_eq!(err.name(), "CollateralUnavailable", "{err:?}");
    assert!(
        err.to_string().contains("no AMD Milan CRL"),
        "the refusal names the missing CRL: {err}"
    );
    // The VLEK path names the ASVK.
    let ev = snp_evidence(SNP_VLEK_REPORT, "VLEK", SNP_VLEK);
    let err = tee_verifiers::verify(
        TeeKind::Snp,
        &ev,
        &snp_report_data(SNP_VLEK_REPORT),
        None,
        &Collateral::None,
        snp_now(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("the VLEK and its ASVK"), "{err}");
}
