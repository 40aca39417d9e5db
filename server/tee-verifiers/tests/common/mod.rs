//! Test data and helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tee_verifiers::collateral::TdxCollateral;
use tee_verifiers::{Collateral, tdx};

pub const TDX_QUOTE: &[u8] = include_bytes!("../../testdata/tdx/tdx_quote");
pub const TDX_COLLATERAL: &[u8] = include_bytes!("../../testdata/tdx/tdx_quote_collateral.json");
pub const TDX_OUTDATED: &[u8] = include_bytes!("../../testdata/tdx/tdx_quote_outdated");
pub const TDX_OUTDATED_COLLATERAL: &[u8] =
    include_bytes!("../../testdata/tdx/tdx_quote_outdated_collateral.json");
pub const TDX_QUOTE_4: &[u8] = include_bytes!("../../testdata/tdx/tdx_quote_4.dat");
pub const TDX_QUOTE_5: &[u8] = include_bytes!("../../testdata/tdx/tdx_quote_5.dat");
pub const TDX_CLAIMS_EXPECTED: &[u8] =
    include_bytes!("../../testdata/tdx/parse_tdx_claims_expected.json");

pub const SNP_REPORT: &[u8] = include_bytes!("../../testdata/snp/test-report.bin");
pub const SNP_VCEK: &[u8] = include_bytes!("../../testdata/snp/test-vcek.der");
pub const SNP_VLEK_REPORT: &[u8] = include_bytes!("../../testdata/snp/test-vlek-report.bin");
pub const SNP_VLEK: &[u8] = include_bytes!("../../testdata/snp/test-vlek.der");
pub const SNP_VCEK_INVALID_LEGACY: &[u8] =
    include_bytes!("../../testdata/snp/test-vcek-invalid-legacy.der");
pub const SNP_VCEK_INVALID_NEW: &[u8] =
    include_bytes!("../../testdata/snp/test-vcek-invalid-new.der");

/// TDX evidence as a `kbs_protocol` client sends it.
pub fn tdx_evidence(quote: &[u8]) -> Value {
    json!({"cc_eventlog": null, "quote": STANDARD.encode(quote)})
}

pub fn tdx_collateral(json: &[u8]) -> Arc<TdxCollateral> {
    Arc::new(TdxCollateral::from_json(json).unwrap())
}

/// A time inside the collateral's validity window (its midpoint), never the wall clock.
pub fn inside(c: &TdxCollateral) -> SystemTime {
    let mid = c.not_before + (c.not_after - c.not_before) / 2;
    UNIX_EPOCH + Duration::from_secs(mid as u64)
}

pub fn tdx_report_data(quote: &[u8]) -> Vec<u8> {
    tdx::quote::Quote::parse(quote)
        .unwrap()
        .body
        .report_data()
        .to_vec()
}

pub fn tdx(c: &Arc<TdxCollateral>) -> Collateral {
    Collateral::Tdx(c.clone())
}

/// SNP evidence in upstream's wire shape: the `sev` serde form of the report and the
/// certificate table with the VEK.
pub fn snp_evidence(report: &[u8], vek_type: &str, vek: &[u8]) -> Value {
    use sev::parser::ByteParser;
    let r = sev::firmware::guest::AttestationReport::from_bytes(report).unwrap();
    json!({
        "attestation_report": serde_json::to_value(r).unwrap(),
        "cert_chain": [{"cert_type": vek_type, "data": vek}],
    })
}

/// 2025-06-01T00:00:00Z: inside both test keys' validity (VCEK 2023-2030, VLEK 2024-12 to
/// 2025-12).
pub fn snp_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_748_736_000)
}

pub fn snp_report_data(report: &[u8]) -> Vec<u8> {
    report[0x50..0x90].to_vec()
}

/// AMD's roots with the `if-published` CRL policy: the shared real SNP reports come without
/// AMD's CRL (a real one is valid for its own weeks, not at [`snp_now`], and no test key
/// can sign one under AMD's ARK), so tests of everything but revocation verify them this
/// way; revocation itself is tested under a test PKI (`snp_revocation.rs`).
pub fn vendor_if_published() -> Arc<tee_verifiers::TrustAnchors> {
    Arc::new(
        (*tee_verifiers::TrustAnchors::vendor())
            .clone()
            .with_snp_crl_policy(tee_verifiers::snp::crl::CrlPolicy::IfPublished),
    )
}
