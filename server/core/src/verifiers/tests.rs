//! The KBS's TDX and SNP verifiers on the shared test vectors: at a fixed time inside the
//! collateral's validity, with collateral from files, from a real local PCCS/KDS-shaped HTTP
//! server, and from the KBS's store after a restart.

#[path = "../../../tee-verifiers/tests/common/pccs_server.rs"]
mod pccs_server;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tee_verifiers::collateral::{HttpFetcherConfig, TdxCollateral};

use super::*;
use crate::attest::{RcarError, VerifyError};
use crate::storage::{KeyEncryptionKey, KvStore, SqliteStore};

const TDX_QUOTE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tee-verifiers/testdata/tdx/tdx_quote"
));
const TDX_COLLATERAL: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tee-verifiers/testdata/tdx/tdx_quote_collateral.json"
));
const SNP_REPORT: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tee-verifiers/testdata/snp/test-report.bin"
));
const SNP_VCEK: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tee-verifiers/testdata/snp/test-vcek.der"
));
const VCEK_QUERY: &str = "blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115";

fn tdx_evidence(quote: &[u8]) -> Value {
    json!({"cc_eventlog": null, "quote": STANDARD.encode(quote)})
}

/// REPORTDATA of the quote (offset 568 of a v4 quote: header 48 + body 520).
fn tdx_report_data(quote: &[u8]) -> Vec<u8> {
    tee_verifiers::tdx::quote::Quote::parse(quote)
        .unwrap()
        .body
        .report_data()
        .to_vec()
}

/// The SNP report with no certificate table: the VCEK comes from KDS.
fn snp_evidence() -> Value {
    use sev::parser::ByteParser;
    let report = sev::firmware::guest::AttestationReport::from_bytes(SNP_REPORT).unwrap();
    json!({"attestation_report": serde_json::to_value(report).unwrap(), "cert_chain": null})
}

/// The midpoint of the test collateral's validity window (also inside the VCEK's).
fn inside() -> SystemTime {
    let c = TdxCollateral::from_json(TDX_COLLATERAL).unwrap();
    UNIX_EPOCH + Duration::from_secs((c.not_before + (c.not_after - c.not_before) / 2) as u64)
}

fn offline_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tdx")).unwrap();
    std::fs::create_dir_all(dir.path().join("snp")).unwrap();
    std::fs::write(dir.path().join("tdx/platform.json"), TDX_COLLATERAL).unwrap();
    std::fs::write(dir.path().join("snp/vcek.der"), SNP_VCEK).unwrap();
    dir
}

fn offline_tdx(dir: &std::path::Path, clock: Clock) -> TeeVerifier {
    let settings = CollateralSettings {
        source: CollateralSource::Offline(dir.to_path_buf()),
        ..Default::default()
    };
    TeeVerifier::tdx(Arc::new(collateral_store(&settings, None).unwrap()), clock)
}

fn http_settings(url: &str) -> CollateralSettings {
    CollateralSettings {
        source: CollateralSource::Http(HttpFetcherConfig {
            pccs_url: url.into(),
            root_ca_crl_url: None,
            kds_url: url.into(),
            timeout: Duration::from_secs(5),
        }),
        ..Default::default()
    }
}

async fn pccs() -> (String, Arc<pccs_server::Pccs>) {
    let c = TdxCollateral::from_json(TDX_COLLATERAL).unwrap().collateral;
    let hwid = hex::encode(&SNP_REPORT[0x1A0..0x1E0]);
    let (addr, state) = pccs_server::start(
        c,
        vec![("Milan".into(), hwid, VCEK_QUERY.into(), SNP_VCEK.to_vec())],
    )
    .await;
    (format!("http://{addr}"), state)
}

#[tokio::test]
async fn tdx_quote_verifies_with_offline_collateral_and_upstream_claim_names() {
    let dir = offline_dir();
    let v = offline_tdx(dir.path(), Clock::Fixed(inside()));
    let claims = v
        .verify(&tdx_evidence(TDX_QUOTE), &tdx_report_data(TDX_QUOTE), None)
        .await
        .unwrap();
    assert_eq!(claims["tcb_status"], "UpToDate");
    assert_eq!(claims["quote"]["header"]["tee_type"], "81000000");
    for field in ["mr_td", "rtmr_0", "rtmr_3", "mr_config_id", "report_data"] {
        assert!(claims["quote"]["body"][field].is_string(), "{field}");
    }
    assert_eq!(claims["td_attributes"]["debug"], false);
    // Some clients send the evidence object as a JSON string.
    let as_text = Value::String(tdx_evidence(TDX_QUOTE).to_string());
    assert!(
        v.verify(&as_text, &tdx_report_data(TDX_QUOTE), None)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn tdx_refusals_name_what_failed() {
    let dir = offline_dir();
    let v = offline_tdx(dir.path(), Clock::Fixed(inside()));
    let rd = tdx_report_data(TDX_QUOTE);
    let refused = |r: Result<Value, VerifyError>| r.unwrap_err();

    // A flipped bit in the TD report body (MRTD) no longer matches the QE's signature.
    let mut body = TDX_QUOTE.to_vec();
    body[48 + 136] ^= 1;
    let e = refused(v.verify(&tdx_evidence(&body), &rd, None).await);
    assert!(
        matches!(&e, VerifyError::Rejected(d) if d.starts_with("SignatureInvalid")),
        "{e}"
    );
    assert_eq!(e.status(), 401);

    // A flipped bit in the quote's ECDSA signature (right after the signature data length).
    let mut sig = TDX_QUOTE.to_vec();
    sig[48 + 584 + 4 + 10] ^= 1;
    let e = refused(v.verify(&tdx_evidence(&sig), &rd, None).await);
    assert!(matches!(e, VerifyError::Rejected(_)), "{e}");

    let mut other_rd = rd.clone();
    other_rd[0] ^= 1;
    let e = refused(v.verify(&tdx_evidence(TDX_QUOTE), &other_rd, None).await);
    assert!(matches!(e, VerifyError::ReportDataMismatch), "{e}");

    let e = refused(
        v.verify(&tdx_evidence(TDX_QUOTE), &rd, Some(&[7u8; 48]))
            .await,
    );
    assert!(matches!(e, VerifyError::InitDataMismatch), "{e}");

    // After the collateral's nextUpdate the same quote is refused: an operator must refresh.
    let late = offline_tdx(
        dir.path(),
        Clock::Fixed(UNIX_EPOCH + Duration::from_secs(4_000_000_000)),
    );
    let e = refused(late.verify(&tdx_evidence(TDX_QUOTE), &rd, None).await);
    assert!(matches!(e, VerifyError::Rejected(_)), "{e}");
}

#[tokio::test]
async fn no_collateral_and_no_service_is_evidence_verification_failed_with_a_clear_detail() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let store = Arc::new(collateral_store(&http_settings(&url), None).unwrap());
    let v = TeeVerifier::tdx(store, Clock::Fixed(inside()));
    let e = v
        .verify(&tdx_evidence(TDX_QUOTE), &tdx_report_data(TDX_QUOTE), None)
        .await
        .unwrap_err();
    assert!(matches!(e, VerifyError::CollateralUnavailable(_)), "{e}");
    let rcar = RcarError::EvidenceVerificationFailed(e);
    assert_eq!(rcar.name(), "EvidenceVerificationFailed");
    assert_eq!(rcar.status(), 503);
    let text = rcar.to_string();
    assert!(text.contains("no valid cached copy"), "{text}");
}

/// AMD's roots with `[attestation.snp] crl = "if-published"`: this KDS publishes no CRL
/// (the real test report has none under AMD's ARK; tee-verifiers' snp_revocation.rs tests
/// the CRL and the `required` default).
fn vendor_if_published() -> Arc<tee_verifiers::TrustAnchors> {
    Arc::new(
        (*tee_verifiers::TrustAnchors::vendor())
            .clone()
            .with_snp_crl_policy(tee_verifiers::snp::crl::CrlPolicy::IfPublished),
    )
}

#[tokio::test]
async fn cold_start_fetches_each_item_once_and_the_store_serves_a_restart_during_an_outage() {
    let (url, pccs) = pccs().await;
    let kek = Arc::new(KeyEncryptionKey::from_bytes(&[9; 32]));
    let db: Arc<dyn KvStore> = Arc::new(SqliteStore::open_in_memory(kek).await.unwrap());
    let store = Arc::new(collateral_store(&http_settings(&url), Some(db.clone())).unwrap());
    let setup = VerifierSetup {
        collateral: store,
        anchors: vendor_if_published(),
        clock: Clock::Fixed(inside()),
    };
    let built = build(&["tdx".into(), "snp".into()], &setup);
    let (tdx, snp) = (&built[0], &built[1]);
    let (tdx_ev, tdx_rd) = (tdx_evidence(TDX_QUOTE), tdx_report_data(TDX_QUOTE));
    let (snp_ev, snp_rd) = (snp_evidence(), SNP_REPORT[0x50..0x90].to_vec());
    for _ in 0..200 {
        tdx.verify(&tdx_ev, &tdx_rd, None).await.unwrap();
        let claims = snp.verify(&snp_ev, &snp_rd, None).await.unwrap();
        assert!(claims["measurement"].is_string());
    }
    let hits = pccs.all_hits();
    assert!(hits.values().all(|n| *n == 1), "{hits:?}");
    // PCK CRL, TCB info, QE identity, root CA CRL, the VCEK and AMD's CRL (this KDS
    // publishes none: the 404 is remembered like an item).
    assert_eq!(hits.values().sum::<usize>(), 6, "{hits:?}");
    assert!(
        !db.kv_list(COLLATERAL_NAMESPACE, "", 100)
            .await
            .unwrap()
            .is_empty(),
        "fetched items are kept in the store"
    );

    // Restarted while the PCCS and KDS are down: the store's copies verify.
    pccs.set_down(true);
    let restarted = Arc::new(collateral_store(&http_settings(&url), Some(db)).unwrap());
    let setup = VerifierSetup {
        collateral: restarted,
        anchors: vendor_if_published(),
        clock: Clock::Fixed(inside()),
    };
    let built = build(&["tdx".into(), "snp".into()], &setup);
    built[0].verify(&tdx_ev, &tdx_rd, None).await.unwrap();
    built[1].verify(&snp_ev, &snp_rd, None).await.unwrap();
}

/// trustee `kbs/sample_policies/affirming.rego`, byte for byte.
const TRUSTEE_AFFIRMING_POLICY: &str = r#"package policy
import rego.v1

default allow = false

allow if {
    not any_not_affirming
    count(input.submods) > 0

}

any_not_affirming if {
    some _, submod in input.submods
    submod["ear.status"] != "affirming"
}
"#;

/// A resource policy in the shape Trustee's documentation gives for TDX: claims read under
/// the EAR annotated evidence by upstream's names.
const TRUSTEE_TDX_POLICY: &str = r#"package policy
import rego.v1

default allow = false

allow if {
    input["submods"]["cpu0"]["ear.status"] == "affirming"
    input["submods"]["cpu0"]["ear.trustworthiness-vector"]["hardware"] == 2
    evidence := input["submods"]["cpu0"]["ear.veraison.annotated-evidence"]
    evidence["tdx"]["quote"]["header"]["tee_type"] == "81000000"
    evidence["tdx"]["tcb_status"] == "UpToDate"
    evidence["tdx"]["td_attributes"]["debug"] == false
    evidence["tdx"]["quote"]["body"]["mr_td"] == data["resource-path"][2]
}
"#;

#[tokio::test]
async fn a_resource_policy_written_for_trustee_runs_unchanged_on_tdx_claims() {
    use crate::appraisal::Appraiser;
    use crate::policy::PolicyEngine;
    use crate::token::{EarAppraisal, annotated_evidence, ear_claims};

    let dir = offline_dir();
    let v = offline_tdx(dir.path(), Clock::Fixed(inside()));
    let claims = v
        .verify(&tdx_evidence(TDX_QUOTE), &tdx_report_data(TDX_QUOTE), None)
        .await
        .unwrap();
    let mr_td = claims["quote"]["body"]["mr_td"]
        .as_str()
        .unwrap()
        .to_owned();
    let key: kbs_types::TeePubKey = serde_json::from_value(json!({
        "kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
        "x": "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis",
        "y": "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE",
    }))
    .unwrap();
    let token_input = |appraiser: &Appraiser| {
        let evidence = annotated_evidence("tdx", claims.clone(), &key, "nonce", None);
        let a = appraiser.appraise(&evidence).unwrap();
        let ear = EarAppraisal {
            status: a.status.as_str(),
            trust_vector: Some(a.trust_vector_json()),
            policy_id: a.policy_id,
        };
        Value::Object(ear_claims("tdx", evidence, &ear, &Default::default()))
    };
    let data = |tag: &str| json!({"plugin": "resource", "resource-path": ["repo", "key", tag]});

    // Without reference values the boot chain is not recognized: a warning, which
    // Trustee's affirming policy refuses.
    let appraiser = Appraiser::default();
    let affirming = PolicyEngine::new(TRUSTEE_AFFIRMING_POLICY).unwrap();
    assert!(
        !affirming
            .evaluate(&token_input(&appraiser), &data("x"))
            .unwrap()
    );

    appraiser
        .set_reference_values(
            [("mr_td".to_owned(), vec![mr_td.clone()])]
                .into_iter()
                .collect(),
        )
        .unwrap();
    let input = token_input(&appraiser);
    assert!(affirming.evaluate(&input, &data("x")).unwrap());
    let tdx_policy = PolicyEngine::new(TRUSTEE_TDX_POLICY).unwrap();
    assert!(tdx_policy.evaluate(&input, &data(&mr_td)).unwrap());
    assert!(!tdx_policy.evaluate(&input, &data("other")).unwrap());
}
