//! The default appraisal policy on real TDX and SNP claims (verified from the shared test
//! vectors at a time inside their validity), reference values, switches and replacement.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};
use tee_verifiers::collateral::TdxCollateral;
use tee_verifiers::{Collateral, TeeKind};

use super::*;

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

/// The verified claims of the test TDX quote.
fn tdx_claims() -> Value {
    let c = Arc::new(TdxCollateral::from_json(TDX_COLLATERAL).unwrap());
    let now =
        UNIX_EPOCH + Duration::from_secs((c.not_before + (c.not_after - c.not_before) / 2) as u64);
    let quote = tee_verifiers::tdx::quote::Quote::parse(TDX_QUOTE).unwrap();
    let rd = quote.body.report_data().to_vec();
    let evidence = json!({"cc_eventlog": null, "quote": STANDARD.encode(TDX_QUOTE)});
    tee_verifiers::verify(TeeKind::Tdx, &evidence, &rd, None, &Collateral::Tdx(c), now)
        .unwrap()
        .into_value()
}

/// The verified claims of the test SNP report (VCEK in the certificate table).
fn snp_claims() -> Value {
    use sev::parser::ByteParser;
    let report = sev::firmware::guest::AttestationReport::from_bytes(SNP_REPORT).unwrap();
    let evidence = json!({
        "attestation_report": serde_json::to_value(report).unwrap(),
        "cert_chain": [{"cert_type": "VCEK", "data": SNP_VCEK}],
    });
    // 2025-06-01, inside the VCEK's validity.
    let now = UNIX_EPOCH + Duration::from_secs(1_748_736_000);
    // The shared vectors carry no AMD CRL; revocation is not what these tests are about.
    let anchors = tee_verifiers::TrustAnchors::clone(&tee_verifiers::TrustAnchors::vendor())
        .with_snp_crl_policy(tee_verifiers::snp::crl::CrlPolicy::IfPublished);
    tee_verifiers::Decoded::new(TeeKind::Snp, &evidence)
        .unwrap()
        .verify_with(
            &anchors,
            &SNP_REPORT[0x50..0x90],
            None,
            &Collateral::None,
            now,
        )
        .unwrap()
        .into_value()
}

fn input(tee: &str, claims: Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(tee.into(), claims);
    m.insert("runtime_data_claims".into(), json!({"nonce": "n"}));
    m
}

fn refs(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.iter().map(|s| (*s).to_owned()).collect()))
        .collect()
}

fn body(claims: &Value, field: &str) -> String {
    claims["quote"]["body"][field].as_str().unwrap().to_owned()
}

#[test]
fn default_policy_compiles_and_sample_is_affirming() {
    Appraiser::check(DEFAULT_APPRAISAL_POLICY).unwrap();
    let a = Appraiser::default()
        .appraise(&input("sample", json!({"svn": "1"})))
        .unwrap();
    assert_eq!(a.status, TrustTier::Affirming);
    assert_eq!(a.trust_vector["hardware"], 2);
    assert_eq!(a.policy_id, "default");
}

#[test]
fn tdx_up_to_date_is_a_warning_until_reference_values_recognize_the_boot_chain() {
    let claims = tdx_claims();
    let appraiser = Appraiser::default();
    let a = appraiser.appraise(&input("tdx", claims.clone())).unwrap();
    assert_eq!(a.status, TrustTier::Warning, "{}", a.summary());
    assert_eq!(a.trust_vector["hardware"], 2);
    assert_eq!(a.trust_vector["executables"], 33);
    assert_eq!(a.trust_vector["configuration"], 2);
    assert!(
        a.summary().contains("boot chain is not recognized"),
        "{}",
        a.summary()
    );

    let mr_td = body(&claims, "mr_td");
    let rtmr_1 = body(&claims, "rtmr_1");
    appraiser
        .set_reference_values(refs(&[("mr_td", &[&mr_td]), ("rtmr_1", &[&rtmr_1])]))
        .unwrap();
    let a = appraiser.appraise(&input("tdx", claims.clone())).unwrap();
    assert_eq!(a.status, TrustTier::Affirming, "{}", a.summary());
    assert_eq!(
        a.trust_vector_json(),
        json!({"configuration": 2, "executables": 3, "hardware": 2})
    );

    // A firmware the operator did not list is refused.
    appraiser
        .set_reference_values(refs(&[("mr_td", &[&"00".repeat(48)])]))
        .unwrap();
    let a = appraiser.appraise(&input("tdx", claims)).unwrap();
    assert!(a.is_refused(), "{}", a.summary());
    assert!(
        a.reasons.iter().any(|r| r.contains("mr_td")),
        "{:?}",
        a.reasons
    );
}

#[test]
fn out_of_date_tdx_tcb_is_refused_unless_the_operator_allows_it() {
    // No shared vector verifies as OutOfDate (the outdated quote matches no TCB level and
    // is refused by the verifier); the status is set on real claims.
    let mut claims = tdx_claims();
    claims["tcb_status"] = json!("OutOfDate");
    let appraiser = Appraiser::default();
    let a = appraiser.appraise(&input("tdx", claims.clone())).unwrap();
    assert!(a.is_refused(), "{}", a.summary());
    assert_eq!(a.trust_vector["hardware"], 96);
    assert!(a.summary().contains("out of date"), "{}", a.summary());

    appraiser
        .set_reference_values(refs(&[("allow_outdated_tcb", &["true"])]))
        .unwrap();
    let a = appraiser.appraise(&input("tdx", claims)).unwrap();
    assert_eq!(a.status, TrustTier::Warning, "{}", a.summary());
    assert_eq!(a.trust_vector["hardware"], 32);
}

#[test]
fn debug_td_and_init_data_mismatch_are_refused() {
    let mut claims = tdx_claims();
    claims["td_attributes"]["debug"] = json!(true);
    let appraiser = Appraiser::default();
    assert!(
        appraiser
            .appraise(&input("tdx", claims.clone()))
            .unwrap()
            .is_refused()
    );
    appraiser
        .set_reference_values(refs(&[("allow_debug", &["true"])]))
        .unwrap();
    let a = appraiser.appraise(&input("tdx", claims)).unwrap();
    assert_eq!(a.trust_vector["configuration"], 32);

    let appraiser = Appraiser::default();
    appraiser
        .set_reference_values(refs(&[("init_data", &[&"ab".repeat(32)])]))
        .unwrap();
    let mut evidence = input("tdx", tdx_claims());
    evidence.insert("init_data".into(), json!("cd".repeat(32)));
    assert!(appraiser.appraise(&evidence).unwrap().is_refused());
    evidence.insert("init_data".into(), json!("ab".repeat(32)));
    assert!(!appraiser.appraise(&evidence).unwrap().is_refused());
}

#[test]
fn snp_measurement_and_minimum_tcb() {
    let claims = snp_claims();
    let appraiser = Appraiser::default();
    let a = appraiser.appraise(&input("snp", claims.clone())).unwrap();
    assert_eq!(a.trust_vector["hardware"], 2, "{}", a.summary());
    assert_eq!(a.trust_vector["executables"], 33);

    let measurement = claims["measurement"].as_str().unwrap().to_owned();
    let snp_now: u8 = claims["reported_tcb_snp"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let above = (snp_now + 1).to_string();
    appraiser
        .set_reference_values(refs(&[("measurement", &[&measurement])]))
        .unwrap();
    let a = appraiser.appraise(&input("snp", claims.clone())).unwrap();
    assert_eq!(a.trust_vector["executables"], 3, "{}", a.summary());

    appraiser
        .set_reference_values(refs(&[("snp_min_snp", &[&above])]))
        .unwrap();
    let a = appraiser.appraise(&input("snp", claims.clone())).unwrap();
    assert!(a.is_refused(), "{}", a.summary());
    assert!(
        a.summary().contains("snp is below its minimum"),
        "{}",
        a.summary()
    );
    appraiser
        .set_reference_values(refs(&[
            ("snp_min_snp", &[&above]),
            ("allow_outdated_tcb", &["true"]),
        ]))
        .unwrap();
    let a = appraiser.appraise(&input("snp", claims)).unwrap();
    assert_eq!(a.trust_vector["hardware"], 32);
}

#[test]
fn the_policy_is_replaceable_and_a_bad_one_leaves_the_old_in_force() {
    let appraiser = Appraiser::default();
    let custom = "package policy\nimport rego.v1\nhardware := 2\nexecutables := 3 if input.tdx.quote.body.mr_td\nconfiguration := 32 if input.tdx.td_attributes.debug\nreasons contains \"custom\"\n";
    assert_eq!(appraiser.set_policy(custom).unwrap(), 2);
    let a = appraiser.appraise(&input("tdx", tdx_claims())).unwrap();
    assert_eq!(a.status, TrustTier::Affirming);
    // An affirming verdict is not explained: its reasons are not evaluated.
    assert!(a.reasons.is_empty(), "{:?}", a.reasons);
    let mut debug = tdx_claims();
    debug["td_attributes"]["debug"] = json!(true);
    let a = appraiser.appraise(&input("tdx", debug)).unwrap();
    assert_eq!(a.status, TrustTier::Warning);
    assert_eq!(a.reasons, ["custom"]);

    for bad in [
        "package policy\nhardware := ",
        "package other\nhardware := 2\n",
        "package policy\nallow := true\n",
    ] {
        assert!(
            matches!(appraiser.set_policy(bad), Err(AppraisalError::Compile(_))),
            "{bad}"
        );
    }
    assert_eq!(appraiser.source().0, 2);

    appraiser
        .set_policy("package policy\nimport rego.v1\nhardware := 500\n")
        .unwrap();
    assert!(matches!(
        appraiser.appraise(&input("tdx", tdx_claims())),
        Err(AppraisalError::Evaluation(_))
    ));
}

#[test]
fn tiers_follow_ar4si() {
    for (v, tier) in [
        (0, TrustTier::None),
        (1, TrustTier::None),
        (2, TrustTier::Affirming),
        (31, TrustTier::Affirming),
        (32, TrustTier::Warning),
        (95, TrustTier::Warning),
        (96, TrustTier::Contraindicated),
        (127, TrustTier::Contraindicated),
        (-2, TrustTier::Affirming),
        (-96, TrustTier::Warning),
        (-97, TrustTier::Contraindicated),
    ] {
        assert_eq!(TrustTier::of(v), tier, "{v}");
    }
}
