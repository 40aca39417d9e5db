#![allow(clippy::unwrap_used)]
//! Real attestation's administration and passport tokens against a running KBS: reference
//! values and the appraisal policy over the admin API (kept across a restart, in force for
//! the next attestation), and tokens of a configured external attestation service accepted
//! for resources while tokens of any other key are refused.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use guest_daemon::tee_key::TeeKeyPair;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use server::config::ExternalConfig;
use tests::{ALLOW_SAMPLE, TestKbs, api_err, unix_secs};

/// Rates the sample TEE affirming unless the reference value `sample_gate` says `closed`.
const GATED_APPRAISAL: &str = r#"package policy
import rego.v1

hardware := 2 if {
    input.sample
    not "closed" in object.get(data.reference, "sample_gate", [])
}

hardware := 96 if {
    input.sample
    "closed" in object.get(data.reference, "sample_gate", [])
}

reasons contains "the sample gate is closed" if "closed" in object.get(data.reference, "sample_gate", [])
"#;

#[tokio::test]
async fn reference_values_and_the_appraisal_policy_are_administered_and_in_force() {
    let kbs = TestKbs::start().await;
    let admin = kbs.admin();

    // Values are checked and normalized; a malformed measurement is refused by name.
    let v = admin
        .set_reference_value("mr_td", &["AB".repeat(48)])
        .await
        .unwrap();
    assert_eq!(v["values"], json!(["ab".repeat(48)]));
    let (status, name) = api_err(
        admin
            .set_reference_value("mr_td", &["ab".repeat(47)])
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::BAD_REQUEST, "InvalidReferenceValue")
    );
    let listed = admin.reference_values().await.unwrap();
    assert_eq!(listed["reference_values"][0]["name"], "mr_td");
    assert!(listed["known"]["allow_outdated_tcb"].is_string());

    // A policy that does not compile leaves the built-in one in force.
    let (status, _) = api_err(
        admin
            .set_appraisal_policy("package policy\nallow := true\n")
            .await
            .unwrap_err(),
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (text, version) = admin.get_appraisal_policy().await.unwrap();
    assert_eq!(version, 0);
    assert!(text.contains("allow_outdated_tcb"));

    assert_eq!(
        admin.set_appraisal_policy(GATED_APPRAISAL).await.unwrap()["version"],
        1
    );
    admin.set_policy(ALLOW_SAMPLE).await.unwrap();
    let key = TeeKeyPair::new_ec();
    kbs.attest(&key, None).await;

    admin
        .set_reference_value("sample_gate", &["closed".into()])
        .await
        .unwrap();
    let refused = kbs.rcar_client(&key, None).attest().await.unwrap_err();
    assert!(
        refused.to_string().contains("sample gate is closed"),
        "{refused}"
    );

    // Both the policy and the values are stored: still in force after a restart.
    let kbs = kbs.restart().await;
    let refused = kbs.rcar_client(&key, None).attest().await.unwrap_err();
    assert!(
        refused.to_string().contains("EvidenceVerificationFailed"),
        "{refused}"
    );
    let admin = kbs.admin();
    admin.delete_reference_value("sample_gate").await.unwrap();
    let (status, _) = api_err(
        admin
            .delete_reference_value("sample_gate")
            .await
            .unwrap_err(),
    );
    assert_eq!(status, StatusCode::NOT_FOUND);
    kbs.attest(&key, None).await;
}

/// A P-256 key of an "external attestation service": its JWK and its PKCS#8 PEM.
fn service_key() -> (Value, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let point = key.public_key_raw();
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "kid": "as-1", "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    });
    (jwk, key.serialize_pem())
}

/// An EAR token as upstream's attestation service issues it, for `tee_key`.
fn passport(pem: &str, kid: &str, tee_key: &TeeKeyPair) -> String {
    let claims = json!({
        "eat_profile": "tag:github.com,2023:veraison/ear",
        "iss": "trustee-as",
        "iat": unix_secs(), "exp": unix_secs() + 300,
        "submods": {"cpu0": {
            "ear.status": "affirming",
            "ear.veraison.annotated-evidence": {
                "tdx": {"quote": {"body": {"mr_td": "ab"}}},
                "runtime_data_claims": {"tee-pubkey": tee_key.export_pubkey()},
            },
        }},
    });
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn passports_of_a_configured_attestation_service_fetch_resources_others_do_not() {
    let (jwk, pem) = service_key();
    let (_, stranger_pem) = service_key();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("as.jwks");
    std::fs::write(&jwks, json!({"keys": [jwk]}).to_string()).unwrap();
    let kbs = TestKbs::start_with(false, |c| {
        c.attestation.external = vec![ExternalConfig {
            name: "trustee-as".into(),
            issuer: Some("trustee-as".into()),
            jwks_file: Some(jwks),
            jwks_url: None,
            jwks_refresh: std::time::Duration::from_secs(3600),
            pem_files: Vec::new(),
            tee_pubkey_paths: Vec::new(),
        }];
    })
    .await;
    let admin = kbs.admin();
    admin
        .put_resource("default/key/one", b"secret-1".to_vec())
        .await
        .unwrap();
    // Written for Trustee: the TDX claims under the EAR path; plus the issuer Tether notes.
    admin
        .set_policy(
            r#"package policy
import rego.v1
default allow := false
allow if {
    input["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["tdx"]["quote"]["body"]["mr_td"] == "ab"
    input.tether.issuer == "trustee-as"
}"#,
        )
        .await
        .unwrap();
    let tee_key = TeeKeyPair::new_ec();
    let get = |token: String| {
        kbs.http()
            .get(format!("{}/kbs/v0/resource/default/key/one", kbs.url))
            .bearer_auth(token)
            .send()
    };
    let ok = get(passport(&pem, "as-1", &tee_key)).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let jwe = ok.bytes().await.unwrap();
    assert_eq!(&tee_key.open_json(&jwe).unwrap()[..], b"secret-1");

    for token in [
        passport(&stranger_pem, "as-1", &tee_key),
        passport(&stranger_pem, "other", &tee_key),
    ] {
        let refused = get(token).await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        let body: Value = refused.json().await.unwrap();
        assert!(
            body["type"].as_str().unwrap().ends_with("InvalidToken"),
            "{body}"
        );
    }
}
