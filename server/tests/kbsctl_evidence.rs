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
            // These real reports come without AMD's CRL.
            "--crl-policy",
            "if-published",
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

#[path = "../tee-verifiers/tests/common/amd_pki.rs"]
mod amd_pki;

/// AMD's CRL offline: the shared SNP report re-signed under an AMD-shaped test PKI (made with
/// openssl at test time), its roots given with `--roots`, and a CRL of that PKI's ARK with
/// `--crl`: the VCEK listed is refused naming it, a CRL that lists another serial verifies,
/// and no CRL at all is refused unless `--crl-policy if-published`.
#[test]
fn snp_reports_are_checked_against_a_crl_given_offline() {
    let report = std::fs::read(testdata("snp/test-report.bin")).unwrap();
    let pki = amd_pki::AmdPki::new(&report);
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let report = file("report.bin", &pki.resign(&report));
    let vcek = file("vcek.der", &pki.vcek());
    let roots = file("roots.pem", &pki.roots_pem());
    let revoked = file("revoked.crl", &pki.crl("crl-vcek"));
    let clean = file("clean.crl", &pki.crl("crl-none"));
    let pem = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(pki.crl("crl-none"));
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n",
            lines.join("\n")
        )
    };
    let clean_pem = file("clean.pem.crl", pem.as_bytes());
    // The fixtures are valid from when they were made: a day later is inside every window.
    let at = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 24 * 3600)
        .to_string();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "evidence",
            "verify",
            "--tee",
            "snp",
            report.as_str(),
            "--collateral",
            vcek.as_str(),
            "--roots",
            roots.as_str(),
            "--at",
            at.as_str(),
        ];
        args.extend_from_slice(extra);
        let out = kbsctl(&args);
        (
            out.status.success(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Not on the CRL (DER or PEM): verified, the claims printed.
    for crl in [&clean, &clean_pem] {
        let (ok, stdout, stderr) = run(&["--crl", crl]);
        assert!(ok, "{crl}: {stderr}");
        let claims: serde_json::Value = serde_json::from_slice(&stdout).expect("claims JSON");
        assert_eq!(claims["reported_tcb_microcode"], "115", "{claims}");
    }
    // On the CRL: refused naming the VCEK, with a failing exit, under either policy.
    for policy in ["required", "if-published"] {
        let (ok, stdout, stderr) = run(&["--crl", &revoked, "--crl-policy", policy]);
        assert!(!ok, "a revoked VCEK passed: {stderr}");
        assert!(stdout.is_empty(), "claims printed for a revoked VCEK");
        assert!(
            stderr.contains("refused: CertificateRevoked")
                && stderr.contains(&format!("the VCEK (serial {})", amd_pki::VCEK_SERIAL))
                && stderr.contains("AMD Milan CRL"),
            "{stderr}"
        );
    }
    // No CRL: refused by default naming the missing CRL; verified when asked for.
    let (ok, _, stderr) = run(&[]);
    assert!(!ok, "verified without a CRL: {stderr}");
    assert!(
        stderr.contains("refused: CollateralUnavailable") && stderr.contains("no AMD Milan CRL"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(&["--crl-policy", "if-published"]);
    assert!(ok, "{stderr}");
    // Without --roots the test PKI is not AMD's: the chain is refused before any CRL.
    let out = kbsctl(&[
        "evidence",
        "verify",
        "--tee",
        "snp",
        &report,
        "--collateral",
        &vcek,
        "--crl",
        &clean,
        "--at",
        &at,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("CertificateChainInvalid"),
        "{stderr}"
    );
}
