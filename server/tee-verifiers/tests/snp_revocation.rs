//! AMD's CRL: the shared SNP test report re-signed under a test PKI shaped like AMD's (real
//! AMD keys cannot sign a test CRL), verified with that PKI's ARK as Milan's root. The same
//! report and key with and without a CRL entry shows that the revocation, and nothing else,
//! is what refuses; the CRL reaches the verifier from KDS (a real local HTTP server) and from
//! offline files, and is fetched once, not per verification. Without a CRL the `required`
//! policy (the default) refuses and `if-published` verifies unchecked.
#![allow(clippy::unwrap_used)]

#[path = "common/amd_pki.rs"]
mod amd_pki;
mod common;
#[path = "common/pccs_server.rs"]
mod pccs_server;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use amd_pki::{ASK_SERIAL, AmdPki, VCEK_SERIAL};
use common::*;
use serde_json::Value;
use tee_verifiers::collateral::{
    CollateralStore, HttpFetcher, HttpFetcherConfig, OfflineFetcher, SnpCollateral, StoreConfig,
    TdxCollateral,
};
use tee_verifiers::snp::crl::CrlPolicy;
use tee_verifiers::{Collateral, Decoded, TeeKind, TrustAnchors, Verifier, VerifyError};

struct Snp {
    pki: AmdPki,
    report: Vec<u8>,
    anchors: TrustAnchors,
}

/// A day after the fixtures were made: inside every validity window they carry.
fn inside() -> SystemTime {
    SystemTime::now() + Duration::from_secs(24 * 3600)
}

fn setup() -> Snp {
    let pki = AmdPki::new(SNP_REPORT);
    let report = pki.resign(SNP_REPORT);
    let anchors = pki.anchors();
    Snp {
        pki,
        report,
        anchors,
    }
}

impl Snp {
    /// Evidence carrying the test VCEK.
    fn evidence(&self) -> Value {
        snp_evidence(&self.report, "VCEK", &self.pki.vcek())
    }

    fn verify(&self, anchors: &TrustAnchors, crl: Option<&str>) -> Result<Value, VerifyError> {
        let collateral = Collateral::Snp(SnpCollateral {
            vcek: None,
            crl: crl.map(|name| Arc::new(self.pki.crl(name))),
        });
        Decoded::new(TeeKind::Snp, &self.evidence())?
            .verify_with(
                anchors,
                &snp_report_data(&self.report),
                None,
                &collateral,
                inside(),
            )
            .map(|c| c.0)
    }
}

fn revoked(err: VerifyError) -> String {
    assert_eq!(err.name(), "CertificateRevoked", "{err:?}");
    let VerifyError::CertificateRevoked(detail) = err else {
        unreachable!()
    };
    detail
}

fn if_published(anchors: &TrustAnchors) -> TrustAnchors {
    anchors.clone().with_snp_crl_policy(CrlPolicy::IfPublished)
}

/// The refusal of a report for want of a CRL, under the `required` policy.
fn crl_missing(err: VerifyError) -> String {
    assert_eq!(err.name(), "CollateralUnavailable", "{err:?}");
    let detail = err.to_string();
    assert!(
        detail.contains("no AMD Milan CRL (KDS /vcek/v1/Milan/crl) to check the VCEK and its ASK")
            && detail.contains("revocation checking is required"),
        "{detail}"
    );
    detail
}

#[test]
fn the_test_report_verifies_with_a_crl_that_lists_neither_key() {
    let t = setup();
    let claims = t.verify(&t.anchors, Some("crl-none")).unwrap();
    assert_eq!(claims["reported_tcb_microcode"], "115");
    t.verify(&if_published(&t.anchors), Some("crl-none"))
        .unwrap();
    // The production anchors never trust the test ARK.
    let err = t.verify(&TrustAnchors::vendor(), None).unwrap_err();
    assert_eq!(err.name(), "CertificateChainInvalid", "{err:?}");
}

#[test]
fn without_a_crl_the_default_policy_refuses_naming_the_missing_crl() {
    let t = setup();
    assert_eq!(TrustAnchors::vendor().snp_crl_policy(), CrlPolicy::Required);
    assert_eq!(t.anchors.snp_crl_policy(), CrlPolicy::Required);
    crl_missing(t.verify(&t.anchors, None).unwrap_err());
    // `if-published`: the same report verifies, unchecked for revocation.
    let claims = t.verify(&if_published(&t.anchors), None).unwrap();
    assert_eq!(claims["reported_tcb_microcode"], "115");
    // A CRL at hand is checked under either policy.
    revoked(
        t.verify(&if_published(&t.anchors), Some("crl-vcek"))
            .unwrap_err(),
    );
}

#[test]
fn the_crl_policy_is_read_from_configuration_names() {
    for (text, policy) in [
        ("\"required\"", CrlPolicy::Required),
        ("\"if-published\"", CrlPolicy::IfPublished),
    ] {
        assert_eq!(serde_json::from_str::<CrlPolicy>(text).unwrap(), policy);
        assert_eq!(format!("\"{}\"", policy.as_str()), text);
    }
    assert!(serde_json::from_str::<CrlPolicy>("\"never\"").is_err());
    assert_eq!(CrlPolicy::default(), CrlPolicy::Required);
}

#[test]
fn a_vcek_on_amd_s_crl_is_refused_naming_it() {
    let t = setup();
    let detail = revoked(t.verify(&t.anchors, Some("crl-vcek")).unwrap_err());
    assert!(
        detail.contains(&format!("the VCEK (serial {VCEK_SERIAL})"))
            && detail.contains("AMD Milan CRL as revoked since")
            && detail.contains("reason KeyCompromise"),
        "{detail}"
    );
}

#[test]
fn an_ask_on_amd_s_crl_is_refused_naming_it() {
    let t = setup();
    let detail = revoked(t.verify(&t.anchors, Some("crl-ask")).unwrap_err());
    assert!(
        detail.contains(&format!("the ASK (serial {ASK_SERIAL})")),
        "{detail}"
    );
}

#[test]
fn a_crl_not_signed_by_the_ark_is_refused() {
    let t = setup();
    let err = t.verify(&t.anchors, Some("crl-forged")).unwrap_err();
    assert_eq!(err.name(), "CollateralInvalid", "{err:?}");
    assert!(
        err.to_string()
            .contains("signature does not verify with the ARK"),
        "{err}"
    );
    // A real AMD report with the test ARK's CRL: not AMD's ARK's, refused as well.
    let real = Decoded::new(TeeKind::Snp, &snp_evidence(SNP_REPORT, "VCEK", SNP_VCEK))
        .unwrap()
        .verify_with(
            &TrustAnchors::vendor(),
            &snp_report_data(SNP_REPORT),
            None,
            &Collateral::Snp(SnpCollateral {
                vcek: None,
                crl: Some(Arc::new(t.pki.crl("crl-none"))),
            }),
            snp_now(),
        )
        .unwrap_err();
    assert_eq!(real.name(), "CollateralInvalid", "{real:?}");
}

#[tokio::test]
async fn amd_s_crl_from_kds_is_fetched_once_and_checked() {
    let t = setup();
    let tdx = TdxCollateral::from_json(TDX_COLLATERAL).unwrap().collateral;
    let (addr, kds) = pccs_server::start(tdx, Vec::new()).await;
    let url = format!("http://{addr}");
    let verifier = |kds_url: &str| {
        let fetcher = HttpFetcher::new(HttpFetcherConfig {
            pccs_url: kds_url.into(),
            root_ca_crl_url: None,
            kds_url: kds_url.into(),
            timeout: Duration::from_secs(5),
        })
        .unwrap();
        Verifier::new(Arc::new(CollateralStore::new(
            Arc::new(fetcher),
            StoreConfig::default(),
        )))
        .with_trust_anchors(Arc::new(t.anchors.clone()))
    };
    let rd = snp_report_data(&t.report);

    // KDS publishes a CRL listing the VCEK: refused, however often asked; one fetch.
    kds.set_crl("Milan", t.pki.crl("crl-vcek"));
    let v = verifier(&url);
    for _ in 0..100 {
        let err = v
            .verify(TeeKind::Snp, &t.evidence(), &rd, None, inside())
            .await
            .unwrap_err();
        revoked(err);
    }
    assert_eq!(kds.hits("crl/Milan"), 1);

    // A CRL that lists neither key: verified (a fresh verifier, so a fresh cache).
    kds.set_crl("Milan", t.pki.crl("crl-none"));
    let v = verifier(&url);
    v.verify(TeeKind::Snp, &t.evidence(), &rd, None, inside())
        .await
        .unwrap();

    // KDS down and nothing cached: no verification without the revocation check.
    kds.set_down(true);
    let err = verifier(&url)
        .verify(TeeKind::Snp, &t.evidence(), &rd, None, inside())
        .await
        .unwrap_err();
    assert_eq!(err.name(), "CollateralUnavailable", "{err:?}");
    assert!(err.to_string().contains("snp-crl-Milan"), "{err}");
}

#[tokio::test]
async fn a_kds_that_publishes_no_crl_refuses_unless_the_policy_is_if_published() {
    let t = setup();
    let tdx = TdxCollateral::from_json(TDX_COLLATERAL).unwrap().collateral;
    let (addr, kds) = pccs_server::start(tdx, Vec::new()).await;
    let url = format!("http://{addr}");
    let verifier = |anchors: TrustAnchors| {
        let fetcher = HttpFetcher::new(HttpFetcherConfig {
            pccs_url: url.clone(),
            root_ca_crl_url: None,
            kds_url: url.clone(),
            timeout: Duration::from_secs(5),
        })
        .unwrap();
        Verifier::new(Arc::new(CollateralStore::new(
            Arc::new(fetcher),
            StoreConfig::default(),
        )))
        .with_trust_anchors(Arc::new(anchors))
    };
    let rd = snp_report_data(&t.report);
    // KDS answers 404 for the CRL: `required` (the default) refuses, every time, and the
    // 404 is remembered (one fetch), not asked per attestation.
    let v = verifier(t.anchors.clone());
    for _ in 0..20 {
        let err = v
            .verify(TeeKind::Snp, &t.evidence(), &rd, None, inside())
            .await
            .unwrap_err();
        crl_missing(err);
    }
    assert_eq!(kds.hits("crl/Milan"), 1);
    // `if-published`: verified, unchecked.
    verifier(if_published(&t.anchors))
        .verify(TeeKind::Snp, &t.evidence(), &rd, None, inside())
        .await
        .unwrap();
}

#[tokio::test]
async fn amd_s_crl_from_offline_files_is_checked() {
    let t = setup();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("snp")).unwrap();
    std::fs::write(dir.path().join("snp/vcek.der"), t.pki.vcek()).unwrap();
    let verifier = || {
        let fetcher = OfflineFetcher::from_dir(dir.path()).unwrap();
        Verifier::new(Arc::new(CollateralStore::new(
            Arc::new(fetcher),
            StoreConfig::default(),
        )))
        .with_trust_anchors(Arc::new(t.anchors.clone()))
    };
    // The report without its VCEK: the VCEK comes from the directory too.
    let mut bare = t.evidence();
    bare["cert_chain"] = Value::Null;
    let rd = snp_report_data(&t.report);

    // No CRL file: refused under `required` (the default), verified under `if-published`.
    for ev in [t.evidence(), bare.clone()] {
        let err = verifier()
            .verify(TeeKind::Snp, &ev, &rd, None, inside())
            .await
            .unwrap_err();
        crl_missing(err);
        verifier()
            .with_trust_anchors(Arc::new(if_published(&t.anchors)))
            .verify(TeeKind::Snp, &ev, &rd, None, inside())
            .await
            .unwrap();
    }
    std::fs::write(dir.path().join("snp/milan.crl"), t.pki.crl("crl-vcek")).unwrap();
    for ev in [t.evidence(), bare] {
        let err = verifier()
            .verify(TeeKind::Snp, &ev, &rd, None, inside())
            .await
            .unwrap_err();
        revoked(err);
    }
    // A file that is not a CRL stops the directory from loading, naming it.
    std::fs::write(dir.path().join("snp/broken.crl"), b"not a CRL").unwrap();
    let err = OfflineFetcher::from_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("broken.crl"), "{err}");
}
