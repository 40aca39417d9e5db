//! `kbsctl evidence verify` as an operator runs it: the real binary, its output and its exit
//! status (issue 18: "prints the verified claims as JSON, or the reason it refused with a
//! non-zero exit").

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tee_verifiers::collateral::TdxCollateral;

fn testdata(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tee-verifiers/testdata")
        .join(rel)
}

fn kbsctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kbsctl"))
        .args(args)
        // Nothing here needs a KBS or an admin key.
        .env_remove("KBS_URL")
        .output()
        .expect("running kbsctl")
}

/// A time inside the TDX collateral's validity window, in Unix seconds.
fn tdx_at() -> String {
    let json = std::fs::read(testdata("tdx/tdx_quote_collateral.json")).unwrap();
    let c = TdxCollateral::from_json(&json).unwrap();
    (c.not_before + (c.not_after - c.not_before) / 2).to_string()
}

#[test]
fn a_tdx_quote_is_verified_offline_and_its_claims_printed() {
    let quote = testdata("tdx/tdx_quote");
    let collateral = testdata("tdx/tdx_quote_collateral.json");
    let at = tdx_at();
    let out = kbsctl(&[
        "evidence",
        "verify",
        "--tee",
        "tdx",
        quote.to_str().unwrap(),
        "--collateral",
        collateral.to_str().unwrap(),
        "--at",
        &at,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).expect("claims JSON");
    // Upstream's claim names (its expected-claims file is for another quote: compare names).
    let expected: serde_json::Value = serde_json::from_slice(
        &std::fs::read(testdata("tdx/parse_tdx_claims_expected.json")).unwrap(),
    )
    .unwrap();
    let names = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        names(&claims["quote"]["body"]),
        names(&expected["quote"]["body"])
    );
    let mr_td = claims["quote"]["body"]["mr_td"].as_str().unwrap();
    assert_eq!(mr_td.len(), 96, "a SHA-384 in hex: {mr_td}");
    assert_eq!(claims["tcb_status"], "UpToDate", "{claims}");
}

#[test]
fn a_damaged_quote_is_refused_with_a_reason_and_a_failing_exit() {
    let mut quote = std::fs::read(testdata("tdx/tdx_quote")).unwrap();
    quote[200] ^= 1; // inside the TD report body the signature covers
    let dir = tempfile::tempdir().unwrap();
    let damaged = dir.path().join("quote");
    std::fs::write(&damaged, &quote).unwrap();
    let collateral = testdata("tdx/tdx_quote_collateral.json");
    let at = tdx_at();
    let out = kbsctl(&[
        "evidence",
        "verify",
        "--tee",
        "tdx",
        damaged.to_str().unwrap(),
        "--collateral",
        collateral.to_str().unwrap(),
        "--at",
        &at,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a damaged quote passed: {stderr}");
    assert!(out.stdout.is_empty(), "claims printed for a refused quote");
    assert!(stderr.contains("refused:"), "{stderr}");
}

#[test]
fn snp_reports_are_verified_against_their_certificate_or_refused() {
    let run = |report: &str, cert: &str| {
        let report = testdata(report);
        let cert = testdata(cert);
        kbsctl(&[
            "evidence",
            "verify",
            "--tee",
            "snp",
            report.to_str().unwrap(),
            "--collateral",
            cert.to_str().unwrap(),
            "--at",
            "1748736000",
        ])
    };
    let ok = run("snp/test-report.bin", "snp/test-vcek.der");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let claims: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("claims JSON");
    assert!(claims["measurement"].is_string(), "{claims}");
    // The VLEK-signed report against a VCEK: the chain does not hold.
    let refused = run("snp/test-vlek-report.bin", "snp/test-vcek.der");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(refused.stdout.is_empty());
    assert!(
        stderr.contains("refused: CertificateChainInvalid"),
        "{stderr}"
    );
}
