//! TDX: claims against upstream's expected output, verification with real DCAP collateral,
//! and refusals, each for its own reason.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use serde_json::{Value, json};
use tee_verifiers::tdx::eventlog::{Event, EventLog, encode, type_code};
use tee_verifiers::tdx::quote::Quote;
use tee_verifiers::tdx::{claims, pck_info};
use tee_verifiers::{TeeKind, VerifyError, verify};

/// Rebuilds the CCEL bytes behind upstream's expected `uefi_event_logs` (upstream's
/// `CCEL_data` is not among the shared vectors): index, type, digests and raw event data
/// come from the expected file; `details` and `digest_matches_event` are then recomputed
/// by the parser and compared.
fn ccel_from_expected(expected: &Value) -> Vec<u8> {
    let events: Vec<Event> = expected["uefi_event_logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Event {
            index: e["index"].as_u64().unwrap() as u32,
            event_type: type_code(e["type_name"].as_str().unwrap()).unwrap(),
            digests: e["digests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    assert_eq!(d["alg"], "SHA-384");
                    (0xC, hex::decode(d["digest"].as_str().unwrap()).unwrap())
                })
                .collect(),
            data: STANDARD.decode(e["event"].as_str().unwrap()).unwrap(),
        })
        .collect();
    encode(&events)
}

#[test]
fn claims_match_upstream_expected_for_quote_v4() {
    // Upstream's parse_tdx_claims test builds this file from tdx_quote_4.dat + CCEL_data.
    let expected: Value = serde_json::from_slice(TDX_CLAIMS_EXPECTED).unwrap();
    let quote = Quote::parse(TDX_QUOTE_4).unwrap();
    let log = EventLog::parse(&ccel_from_expected(&expected)).unwrap();
    let pck = pck_info(TDX_QUOTE_4).unwrap();
    let got = claims::parsed_claims(&quote, Some(&log), pck.platform_instance_id.as_deref());
    assert_eq!(Value::Object(got), expected);
}

#[test]
fn quote_v5_claims_carry_type_and_size() {
    let quote = Quote::parse(TDX_QUOTE_5).unwrap();
    let c = claims::parsed_claims(&quote, None, None);
    assert_eq!(c["quote"]["header"]["version"], "0500");
    // TD report 1.5 body (type 3), 648 bytes, with TEE_TCB_SVN2 and MRSERVICETD.
    assert_eq!(c["quote"]["type"], "0300");
    assert_eq!(c["quote"]["size"], "88020000");
    assert_eq!(
        c["quote"]["body"]["tee_tcb_svn2"].as_str().unwrap().len(),
        32
    );
    assert_eq!(
        c["quote"]["body"]["mr_servicetd"].as_str().unwrap().len(),
        96
    );
    assert!(c.get("uefi_event_logs").is_none());
}

#[test]
fn quote_verifies_against_collateral_up_to_date() {
    let c = tdx_collateral(TDX_COLLATERAL);
    let rd = tdx_report_data(TDX_QUOTE);
    let claims = verify(
        TeeKind::Tdx,
        &tdx_evidence(TDX_QUOTE),
        &rd,
        None,
        &tdx(&c),
        inside(&c),
    )
    .unwrap()
    .into_value();
    assert_eq!(claims["tcb_status"], "UpToDate", "{claims:#}");
    assert!(claims["advisory_ids"].is_array());
    assert_eq!(claims["quote"]["header"]["tee_type"], "81000000");
    assert_eq!(claims["report_data"], hex::encode(&rd));
    assert!(claims["td_attributes"]["debug"].is_boolean());
}

#[test]
fn outdated_quote_v5_is_below_every_tcb_level() {
    // The platform's CPUSVN component 8 is 3 where every level of its TCB info asks for 5:
    // Intel's QVL answers "TCB not supported" for such a platform, and so does dcap-qvl 0.7
    // ("No matching TCB level found"). It is refused, never reported UpToDate.
    let c = tdx_collateral(TDX_OUTDATED_COLLATERAL);
    let rd = tdx_report_data(TDX_OUTDATED);
    let err = verify(
        TeeKind::Tdx,
        &tdx_evidence(TDX_OUTDATED),
        &rd,
        None,
        &tdx(&c),
        inside(&c),
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::TcbNotSupported(_)), "{err:?}");
}

fn verify_tdx(quote: &[u8]) -> Result<Value, VerifyError> {
    let c = tdx_collateral(TDX_COLLATERAL);
    let rd = tdx_report_data(TDX_QUOTE);
    verify(
        TeeKind::Tdx,
        &tdx_evidence(quote),
        &rd,
        None,
        &tdx(&c),
        inside(&c),
    )
    .map(|c| c.0)
}

#[test]
fn flipped_bit_in_quote_body_is_a_bad_signature() {
    let mut q = TDX_QUOTE.to_vec();
    q[48 + 136] ^= 0x01; // MRTD
    assert!(matches!(
        verify_tdx(&q),
        Err(VerifyError::SignatureInvalid(_))
    ));
}

#[test]
fn flipped_bit_in_quote_signature_is_a_bad_signature() {
    let quote = Quote::parse(TDX_QUOTE).unwrap();
    let mut q = TDX_QUOTE.to_vec();
    // signed part, then u32 signature-data length, then the 64-byte ECDSA signature.
    q[quote.signed_len() + 4 + 10] ^= 0x80;
    assert!(matches!(
        verify_tdx(&q),
        Err(VerifyError::SignatureInvalid(_))
    ));
}

#[test]
fn flipped_bit_in_pck_certificate_breaks_the_chain() {
    let mut q = TDX_QUOTE.to_vec();
    let begin = q
        .windows(27)
        .position(|w| w == b"-----BEGIN CERTIFICATE-----")
        .unwrap();
    // A base64 character well inside the PCK leaf (its signed part): flip to another letter.
    let at = begin + 27 + 400;
    q[at] = if q[at] == b'A' { b'B' } else { b'A' };
    let err = verify_tdx(&q).unwrap_err();
    assert!(matches!(err, VerifyError::CertificateChain(_)), "{err:?}");
}

#[test]
fn collateral_past_next_update_is_expired() {
    let c = tdx_collateral(TDX_COLLATERAL);
    let rd = tdx_report_data(TDX_QUOTE);
    let after = std::time::UNIX_EPOCH + Duration::from_secs(c.not_after as u64 + 86_400);
    let err = verify(
        TeeKind::Tdx,
        &tdx_evidence(TDX_QUOTE),
        &rd,
        None,
        &tdx(&c),
        after,
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::CollateralExpired(_)), "{err:?}");
    let before = std::time::UNIX_EPOCH + Duration::from_secs(c.not_before as u64 - 86_400);
    let err = verify(
        TeeKind::Tdx,
        &tdx_evidence(TDX_QUOTE),
        &rd,
        None,
        &tdx(&c),
        before,
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::CollateralExpired(_)), "{err:?}");
}

#[test]
fn other_report_data_is_a_report_data_mismatch() {
    let c = tdx_collateral(TDX_COLLATERAL);
    let mut rd = tdx_report_data(TDX_QUOTE);
    rd[0] ^= 1;
    let err = verify(
        TeeKind::Tdx,
        &tdx_evidence(TDX_QUOTE),
        &rd,
        None,
        &tdx(&c),
        inside(&c),
    )
    .unwrap_err();
    assert_eq!(err, VerifyError::ReportDataMismatch);
}

#[test]
fn init_data_digest_must_equal_mrconfigid() {
    let c = tdx_collateral(TDX_COLLATERAL);
    let rd = tdx_report_data(TDX_QUOTE);
    let mrconfigid = Quote::parse(TDX_QUOTE)
        .unwrap()
        .body
        .mr_config_id()
        .to_vec();
    // The quote's own MRCONFIGID binds; any other digest does not.
    verify(
        TeeKind::Tdx,
        &tdx_evidence(TDX_QUOTE),
        &rd,
        Some(&mrconfigid),
        &tdx(&c),
        inside(&c),
    )
    .unwrap();
    let err = verify(
        TeeKind::Tdx,
        &tdx_evidence(TDX_QUOTE),
        &rd,
        Some(&[0xAB; 32]),
        &tdx(&c),
        inside(&c),
    )
    .unwrap_err();
    assert_eq!(err, VerifyError::InitDataMismatch);
}

#[test]
fn collateral_of_another_platform_is_refused() {
    // The outdated quote's collateral (another FMSPC) does not fit this quote.
    let c = tdx_collateral(TDX_OUTDATED_COLLATERAL);
    let rd = tdx_report_data(TDX_QUOTE);
    let res = verify(
        TeeKind::Tdx,
        &tdx_evidence(TDX_QUOTE),
        &rd,
        None,
        &tdx(&c),
        inside(&c),
    );
    assert!(res.is_err(), "{res:?}");
}

#[test]
fn event_log_must_replay_to_the_rtmrs() {
    let c = tdx_collateral(TDX_COLLATERAL);
    let rd = tdx_report_data(TDX_QUOTE);
    let expected: Value = serde_json::from_slice(TDX_CLAIMS_EXPECTED).unwrap();
    // That log belongs to another TD: its replay differs from this quote's RTMRs.
    let ev = json!({"quote": STANDARD.encode(TDX_QUOTE),
                    "cc_eventlog": STANDARD.encode(ccel_from_expected(&expected))});
    let err = verify(TeeKind::Tdx, &ev, &rd, None, &tdx(&c), inside(&c)).unwrap_err();
    assert!(matches!(err, VerifyError::EventLogMismatch(_)), "{err:?}");
}

#[test]
fn malformed_evidence_is_malformed() {
    let c = tdx_collateral(TDX_COLLATERAL);
    for ev in [
        json!({}),
        json!({"quote": "not base64!"}),
        json!({"quote": STANDARD.encode(&TDX_QUOTE[..40])}),
    ] {
        let err = verify(TeeKind::Tdx, &ev, &[], None, &tdx(&c), inside(&c)).unwrap_err();
        assert!(matches!(err, VerifyError::Malformed(_)), "{err:?}");
    }
}
