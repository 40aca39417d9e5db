//! Custom trust anchors from the configuration (`[attestation.tdx] root_ca_file`,
//! `[attestation.snp.roots]`): evidence chained to a test root verifies only when that root
//! is configured, and the `kbs` binary refuses to start on a file that is not a CA
//! certificate, naming the key. `[attestation.snp] crl`: without AMD's CRL a report is
//! refused unless it is `if-published`.

#![allow(clippy::unwrap_used)]

#[path = "../tee-verifiers/tests/common/intel_pki.rs"]
mod intel_pki;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use intel_pki::IntelPki;
use kbs_core::attest::Verifier;
use kbs_core::verifiers::{
    Clock, CollateralSettings, CollateralSource, VerifierSetup, build, collateral_store,
};
use serde_json::{Value, json};
use server::config::Config;
use tee_verifiers::TrustAnchors;
use tee_verifiers::collateral::TdxCollateral;

const TDX_QUOTE: &[u8] = include_bytes!("../tee-verifiers/testdata/tdx/tdx_quote");
const TDX_COLLATERAL: &[u8] =
    include_bytes!("../tee-verifiers/testdata/tdx/tdx_quote_collateral.json");
const SNP_REPORT: &[u8] = include_bytes!("../tee-verifiers/testdata/snp/test-report.bin");
const SNP_VCEK: &[u8] = include_bytes!("../tee-verifiers/testdata/snp/test-vcek.der");

fn roots_pem(generation: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "tee-verifiers/src/snp/roots/{generation}_ask_ark_asvk.pem"
    ))
}

fn pem(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// The configuration `toml` (its `[attestation.tdx]` and `[attestation.snp]` sections) as
/// the `kbs` binary loads it.
fn config(dir: &Path, toml: &str) -> Config {
    let file = dir.join("kbs.toml");
    std::fs::write(&file, toml).unwrap();
    Config::load(Some(&file), std::iter::empty()).unwrap()
}

fn anchors(config: &Config) -> Arc<TrustAnchors> {
    server::attestation::trust_anchors(&config.attestation.tdx, &config.attestation.snp).unwrap()
}

/// The KBS's `tdx` and `snp` verifiers over collateral files in `collateral`, at `now`.
fn verifiers(
    anchors: Arc<TrustAnchors>,
    collateral: &Path,
    now: SystemTime,
) -> Vec<Arc<dyn Verifier>> {
    let settings = CollateralSettings {
        source: CollateralSource::Offline(collateral.to_path_buf()),
        ..Default::default()
    };
    let setup = VerifierSetup {
        collateral: Arc::new(collateral_store(&settings, None).unwrap()),
        anchors,
        clock: Clock::Fixed(now),
    };
    build(&["tdx".into(), "snp".into()], &setup)
}

fn tdx_report_data(quote: &[u8]) -> Vec<u8> {
    tee_verifiers::tdx::quote::Quote::parse(quote)
        .unwrap()
        .body
        .report_data()
        .to_vec()
}

#[tokio::test]
async fn a_quote_chained_to_a_test_root_verifies_only_when_that_root_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let pki = IntelPki::new(TDX_QUOTE);
    let quote = pki.resign_quote(TDX_QUOTE);
    let real = TdxCollateral::from_json(TDX_COLLATERAL).unwrap();
    let collateral = dir.path().join("collateral");
    std::fs::create_dir_all(collateral.join("tdx")).unwrap();
    std::fs::write(
        collateral.join("tdx/test-pki.json"),
        serde_json::to_vec(&pki.collateral(&real.collateral, &[], &[])).unwrap(),
    )
    .unwrap();
    let now = UNIX_EPOCH
        + Duration::from_secs((real.not_before + (real.not_after - real.not_before) / 2) as u64);
    let evidence = json!({"cc_eventlog": null, "quote": STANDARD.encode(&quote)});

    // Intel's root (the default): the test chain is refused.
    let vendor = anchors(&config(dir.path(), ""));
    let err = verifiers(vendor, &collateral, now)[0]
        .verify(&evidence, &tdx_report_data(&quote), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("CertificateChainInvalid") || err.contains("CollateralInvalid"),
        "{err}"
    );

    // The test root configured (PEM here; DER works as well): verified.
    std::fs::write(dir.path().join("root.pem"), pem(&pki.root_der())).unwrap();
    std::fs::write(dir.path().join("root.der"), pki.root_der()).unwrap();
    for file in ["root.pem", "root.der"] {
        let configured = anchors(&config(
            dir.path(),
            &format!(
                "[attestation.tdx]\nroot_ca_file = \"{}\"\n",
                dir.path().join(file).display()
            ),
        ));
        let claims: Value = verifiers(configured, &collateral, now)[0]
            .verify(&evidence, &tdx_report_data(&quote), None)
            .await
            .unwrap();
        assert_eq!(claims["tcb_status"], "UpToDate", "{file}");
    }
}

fn snp_evidence() -> Value {
    use sev::parser::ByteParser;
    let r = sev::firmware::guest::AttestationReport::from_bytes(SNP_REPORT).unwrap();
    json!({
        "attestation_report": serde_json::to_value(r).unwrap(),
        "cert_chain": [{"cert_type": "VCEK", "data": SNP_VCEK}],
    })
}

#[tokio::test]
async fn configured_amd_roots_replace_amd_s_for_their_generation_only() {
    let dir = tempfile::tempdir().unwrap();
    let collateral = dir.path().join("collateral");
    std::fs::create_dir_all(&collateral).unwrap();
    // 2025-06-01: inside the test VCEK's validity.
    let now = UNIX_EPOCH + Duration::from_secs(1_748_736_000);
    let report_data = SNP_REPORT[0x50..0x90].to_vec();
    let with_roots = |generation: &str, file: &str| {
        anchors(&config(
            dir.path(),
            // No AMD CRL in these files (the real report's chain has no test CRL).
            &format!(
                "[attestation.snp]\ncrl = \"if-published\"\n\
                 [attestation.snp.roots]\n{generation} = \"{}\"\n",
                roots_pem(file).display()
            ),
        ))
    };

    // The test report is a Milan one: Milan's roots given from a file verify it, and so do
    // AMD's embedded ones when another generation is replaced.
    for anchors in [with_roots("milan", "milan"), with_roots("genoa", "turin")] {
        verifiers(anchors, &collateral, now)[1]
            .verify(&snp_evidence(), &report_data, None)
            .await
            .unwrap();
    }
    // Genoa's roots configured as Milan's: its VCEK no longer chains.
    let err = verifiers(with_roots("milan", "genoa"), &collateral, now)[1]
        .verify(&snp_evidence(), &report_data, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("CertificateChainInvalid"), "{err}");
}

#[tokio::test]
async fn without_amd_s_crl_snp_is_refused_unless_crl_is_if_published() {
    let dir = tempfile::tempdir().unwrap();
    let collateral = dir.path().join("collateral");
    std::fs::create_dir_all(&collateral).unwrap();
    let now = UNIX_EPOCH + Duration::from_secs(1_748_736_000);
    let report_data = SNP_REPORT[0x50..0x90].to_vec();
    let verify = |toml: &str| {
        let anchors = anchors(&config(dir.path(), toml));
        let v = verifiers(anchors, &collateral, now).remove(1);
        let rd = report_data.clone();
        async move { v.verify(&snp_evidence(), &rd, None).await }
    };
    // The default, and said explicitly: no CRL for Milan in the files, refused naming it.
    for toml in ["", "[attestation.snp]\ncrl = \"required\"\n"] {
        let err = verify(toml).await.unwrap_err().to_string();
        assert!(
            err.contains("collateral unavailable") && err.contains("no AMD Milan CRL"),
            "{toml:?}: {err}"
        );
    }
    let claims = verify("[attestation.snp]\ncrl = \"if-published\"\n")
        .await
        .unwrap();
    assert_eq!(claims["generation"], "milan");
    // Anything else is a configuration error naming the value.
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[attestation.snp]\ncrl = \"never\"\n").unwrap();
    let err = Config::load(Some(&file), std::iter::empty())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("never") && err.contains("if-published"),
        "{err}"
    );
}

#[test]
fn anchors_that_are_not_ca_certificates_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = rcgen::generate_simple_self_signed(vec!["leaf.example".into()]).unwrap();
    std::fs::write(dir.path().join("leaf.pem"), leaf.cert.pem()).unwrap();
    std::fs::write(dir.path().join("junk.pem"), b"not a certificate").unwrap();
    let err = |toml: &str| {
        server::attestation::trust_anchors(
            &config(dir.path(), toml).attestation.tdx,
            &config(dir.path(), toml).attestation.snp,
        )
        .unwrap_err()
    };
    let p = |f: &str| dir.path().join(f).display().to_string();

    let (key, reason) = err(&format!(
        "[attestation.tdx]\nroot_ca_file = \"{}\"\n",
        p("leaf.pem")
    ));
    assert_eq!(key, "attestation.tdx.root_ca_file");
    assert!(reason.contains("not a CA certificate"), "{reason}");
    let (key, reason) = err(&format!(
        "[attestation.tdx]\nroot_ca_file = \"{}\"\n",
        p("junk.pem")
    ));
    assert_eq!(key, "attestation.tdx.root_ca_file");
    assert!(reason.contains("not an X.509 certificate"), "{reason}");
    let (key, reason) = err(&format!(
        "[attestation.tdx]\nroot_ca_file = \"{}\"\n",
        p("missing.pem")
    ));
    assert_eq!(key, "attestation.tdx.root_ca_file");
    assert!(reason.contains("missing.pem"), "{reason}");
    // AMD: three certificates (ARK, ASK, ASVK) of a CA, the ASK and ASVK signed by the ARK.
    let (key, reason) = err(&format!(
        "[attestation.snp.roots]\nmilan = \"{}\"\n",
        p("leaf.pem")
    ));
    assert_eq!(key, "attestation.snp.roots.milan");
    assert!(reason.contains("expected 3 certificates"), "{reason}");
    let (key, reason) = err(&format!(
        "[attestation.snp.roots]\nsiena = \"{}\"\n",
        roots_pem("milan").display()
    ));
    assert_eq!(key, "attestation.snp.roots.siena");
    assert!(reason.contains("unknown processor generation"), "{reason}");
    let mixed = dir.path().join("mixed.pem");
    let milan = std::fs::read_to_string(roots_pem("milan")).unwrap();
    let genoa = std::fs::read_to_string(roots_pem("genoa")).unwrap();
    let certs = |text: &str| -> Vec<String> {
        text.split_inclusive("-----END CERTIFICATE-----\n")
            .map(str::to_owned)
            .collect()
    };
    // Milan's ASK and ARK with Genoa's ASVK: the ARK did not sign it.
    let (m, g) = (certs(&milan), certs(&genoa));
    std::fs::write(&mixed, format!("{}{}{}", m[0], m[1], g[2])).unwrap();
    let (key, reason) = err(&format!(
        "[attestation.snp.roots]\nmilan = \"{}\"\n",
        mixed.display()
    ));
    assert_eq!(key, "attestation.snp.roots.milan");
    assert!(reason.contains("ASVK"), "{reason}");
}

/// The real binary: a leaf certificate as the TDX root is a startup error naming the key.
#[test]
fn the_kbs_refuses_to_start_with_a_root_that_is_not_a_ca_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = rcgen::generate_simple_self_signed(vec!["leaf.example".into()]).unwrap();
    let leaf_file = dir.path().join("leaf.pem");
    std::fs::write(&leaf_file, leaf.cert.pem()).unwrap();
    let config = dir.path().join("kbs.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[storage]\ndata_dir = \"{}\"\n\
             [attestation]\nverifiers = [\"tdx\"]\n[attestation.tdx]\nroot_ca_file = \"{}\"\n",
            dir.path().join("data").display(),
            leaf_file.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kbs"))
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the kbs started with a leaf certificate as its TDX root");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("attestation.tdx.root_ca_file") && stderr.contains("not a CA certificate"),
        "{stderr}"
    );
}
