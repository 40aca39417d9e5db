#![allow(clippy::unwrap_used)]
//! The generic PKI plugin (`POST /kbs/v0/pki/sign`) over real HTTPS on loopback: a guest key
//! certified for the guest's attested identity (what `guest-daemon pki-sign` does), subjects
//! that name someone else refused with 403, malformed / RSA / forged / oversize requests
//! refused with clear errors and nothing stored, the policy and disable gates.

use std::os::unix::fs::PermissionsExt;

use guest_daemon::pki::{self, PkiKeyType};
use guest_daemon::rcar::KbsClient;
use guest_daemon::tee_key::TeeKeyPair;
use rcgen::{CertificateParams, DnType, KeyPair, SanType};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::{ALLOW_SAMPLE, TestKbs, der, error_detail, metric_value, sans};
use x509_parser::pem::parse_x509_pem;
use x509_parser::prelude::*;

/// An RSA-2048 CSR (`openssl req -new -newkey rsa:2048 -subj /CN=pki-rsa`): rcgen/ring
/// cannot generate RSA keys.
const RSA_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIICVzCCAT8CAQAwEjEQMA4GA1UEAwwHcGtpLXJzYTCCASIwDQYJKoZIhvcNAQEB
BQADggEPADCCAQoCggEBALEodEB0CmohmxyGNwsraaqnQS52nhYSuwr3jnJ1N2hn
SYrUMjb2LI4Z/AABP/4t3/s5pho2sJ3+m9mtCP/eYWOftF3Lkvx130ZeM0daammM
aM8yLUSKVkUXjNMUbRB+3KAyybSW8eJYOMzJSqcVVs+OeyOZsIrbs2dMmcTevsmG
Y4rxxhwZGREDPnMygEFO/YUV8hdaDnU2fYZMZr6YXEqHvAGJ7OQR0z5L0fZhh+44
0tv2CxGhV9ZcV4YJ4UnnSK1aT9avqgrpZ4C8c4W0uMophseB3dirq4zxbZNV/2ad
8n+mwhFzyJYt38FACuAM6/80KaEnxNZy+G73Kt0+KD8CAwEAAaAAMA0GCSqGSIb3
DQEBCwUAA4IBAQAAdmvp6PZ1oq0SPc8tyuvEGWV6Uq4ytdVwm31tJM9GYz9byLac
nzG/dSNG7Gg4gKQM1Vqm7qSZlN3BnK1/7jjHH/74AV3WEDfi5qqNQUgMQdxT/2PE
abwzjWtjCDvRa5ZARm7/pF40fg9/k4rbeeDNJ1EvGpDhjjNUBwIS6ezIuCmJM96a
/XCypq13JcEZqFY/YaFiOiocb5j8OyB5TjlTtot+erRYmb0peagDcXDnGR/opaBg
EMkAYFt9S8qcpM8KTSzovVn+/IUwKWBexPJEQ5XhTHEvM+4XnFP5dCY91axpvJeb
2/IZ4hBv048jSdacxfp4GZgr3u7eE5t6yMh+
-----END CERTIFICATE REQUEST-----
";

fn init(guest_id: &str) -> String {
    format!(
        "[tether]\nguest_id = \"{guest_id}\"\nname = \"{guest_id}.pods.example\"\nip = \"10.0.0.7\"\n"
    )
}

fn client(kbs: &TestKbs, guest_id: &str) -> KbsClient {
    kbs.rcar_client(&TeeKeyPair::new_ec(), Some(&init(guest_id)))
}

async fn token(kbs: &TestKbs, guest_id: &str) -> String {
    client(kbs, guest_id).attest().await.unwrap()
}

async fn post_sign(
    kbs: &TestKbs,
    token: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    kbs.http()
        .post(format!("{}/kbs/v0/pki/sign", kbs.url))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// A CSR PEM for a new key of `alg` with subject CN `cn` and `sans`.
fn csr(alg: &'static rcgen::SignatureAlgorithm, cn: &str, sans: Vec<SanType>) -> String {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn csr_json(pem: &str) -> String {
    json!({ "csr": pem }).to_string()
}

/// Status, error name and detail of an error reply (which must be the JSON error body).
async fn kbs_with_policy() -> TestKbs {
    let kbs = TestKbs::start_tls().await;
    kbs.admin().set_policy(ALLOW_SAMPLE).await.unwrap();
    kbs
}

async fn stored_keys(kbs: &TestKbs) -> Vec<String> {
    kbs.state
        .store
        .kv_list("pki", "", 100)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

#[tokio::test]
async fn guest_keys_are_certified_for_the_attested_identity_under_one_ca() {
    let kbs = kbs_with_policy().await;
    let out = tempfile::tempdir().unwrap();
    let mut cas = Vec::new();
    for (i, key_type) in [PkiKeyType::Ed25519, PkiKeyType::P256]
        .into_iter()
        .enumerate()
    {
        // What `guest-daemon pki-sign` does: key and CSR in the guest, attested POST.
        let mut guest = client(&kbs, "pki-1");
        let signed = pki::sign(&mut guest, key_type).await.unwrap();
        let dir = out.path().join(format!("run-{i}"));
        pki::write_out(&dir, &signed).unwrap();
        let mode = |n: &str| std::fs::metadata(dir.join(n)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(pki::KEY_FILE), 0o600);
        assert_eq!(mode(pki::CERT_FILE), 0o644);

        let ca_der = der(&signed.ca);
        let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
        assert!(ca.is_ca());
        ca.verify_signature(None).expect("self-signed CA");
        let leaf_der = der(&std::fs::read_to_string(dir.join(pki::CERT_FILE)).unwrap());
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        assert_eq!(leaf.issuer(), ca.subject());
        leaf.verify_signature(Some(ca.public_key()))
            .expect("chains to the returned CA");
        assert!(!leaf.is_ca());
        assert!(leaf.validity().is_valid());
        assert_eq!(
            leaf.validity().not_after.timestamp() as u64,
            signed.not_after
        );
        assert_eq!(
            sans(&leaf),
            vec!["dns:pki-1", "dns:pki-1.pods.example", "ip:10.0.0.7"]
        );
        let cn: Vec<&str> = leaf
            .subject()
            .iter_common_name()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(cn, vec!["pki-1"]);
        // The certified key is the one written (and generated) in the guest.
        let key =
            KeyPair::from_pem(&std::fs::read_to_string(dir.join(pki::KEY_FILE)).unwrap()).unwrap();
        assert_eq!(
            leaf.public_key().subject_public_key.data,
            key.public_key_raw()
        );
        let expected_oid = match key_type {
            PkiKeyType::Ed25519 => "1.3.101.112",
            PkiKeyType::P256 => "1.2.840.10045.2.1",
        };
        assert_eq!(
            leaf.public_key().algorithm.algorithm.to_id_string(),
            expected_oid
        );
        cas.push(signed.ca);
    }
    assert_eq!(cas[0], cas[1], "one CA per KBS");
    assert_eq!(stored_keys(&kbs).await, vec!["ca"], "only the CA is stored");

    // Base64 DER as the raw body works too; the CA survives a restart.
    let kbs = kbs.restart().await;
    let tee_key = TeeKeyPair::new_ec();
    let t = kbs.attest(&tee_key, Some(&init("pki-1"))).await;
    let pem = csr(&rcgen::PKCS_ED25519, "pki-1.pods.example", vec![]);
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der_csr(&pem));
    let resp = post_sign(&kbs, &t, b64).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let sealed = resp.bytes().await.unwrap();
    let body: Value = serde_json::from_slice(&tee_key.open_json(&sealed).unwrap()).unwrap();
    assert_eq!(body["ca"], cas[0].as_str(), "same CA after a restart");
    let m = kbs.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "kbs_pki_sign_total",
            &[("outcome", "issued"), ("key_type", "ed25519")]
        ),
        1.0
    );
}

fn der_csr(pem: &str) -> Vec<u8> {
    parse_x509_pem(pem.as_bytes()).unwrap().1.contents
}

#[tokio::test]
async fn subjects_that_are_not_the_callers_are_refused_with_403() {
    let kbs = kbs_with_policy().await;
    let t = token(&kbs, "pki-2").await;
    let cases = [
        (csr(&rcgen::PKCS_ED25519, "pki-other", vec![]), "pki-other"),
        (
            csr(
                &rcgen::PKCS_ECDSA_P256_SHA256,
                "pki-2",
                vec![SanType::DnsName("bank.example".try_into().unwrap())],
            ),
            "bank.example",
        ),
        (
            csr(
                &rcgen::PKCS_ED25519,
                "pki-2",
                vec![SanType::IpAddress("10.0.0.8".parse().unwrap())],
            ),
            "10.0.0.8",
        ),
    ];
    for (pem, named) in cases {
        let (status, name, detail) = error_detail(post_sign(&kbs, &t, csr_json(&pem)).await).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{detail}");
        assert_eq!(name, "IdentityMismatch");
        assert!(detail.contains(named), "{detail} names the mismatch");
    }
    // Another guest's identity is not this one's, though its own CSR would pass.
    let other = token(&kbs, "pki-3").await;
    let pem = csr(&rcgen::PKCS_ED25519, "pki-2", vec![]);
    assert_eq!(
        post_sign(&kbs, &other, csr_json(&pem)).await.status(),
        StatusCode::FORBIDDEN
    );
    assert!(stored_keys(&kbs).await.is_empty(), "nothing stored");
    let m = kbs.metrics().await;
    assert_eq!(
        metric_value(&m, "kbs_pki_sign_total", &[("outcome", "IdentityMismatch")]),
        4.0
    );
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_nothing_is_stored() {
    let kbs = kbs_with_policy().await;
    let t = token(&kbs, "pki-4").await;
    let good = csr(&rcgen::PKCS_ED25519, "pki-4", vec![]);
    let mut forged = der_csr(&good);
    let last = forged.len() - 1;
    forged[last] ^= 0x01;
    let forged_b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &forged);
    let cases: Vec<(String, StatusCode, &str)> = vec![
        (
            "not a csr at all".into(),
            StatusCode::BAD_REQUEST,
            "MalformedCsr",
        ),
        (
            csr_json(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            ),
            StatusCode::BAD_REQUEST,
            "MalformedCsr",
        ),
        (
            "{\"csr\": 5}".into(),
            StatusCode::BAD_REQUEST,
            "MalformedCsr",
        ),
        (
            csr_json(RSA_CSR),
            StatusCode::BAD_REQUEST,
            "UnsupportedKeyType",
        ),
        (
            csr_json(&csr(&rcgen::PKCS_ECDSA_P384_SHA384, "pki-4", vec![])),
            StatusCode::BAD_REQUEST,
            "UnsupportedKeyType",
        ),
        (
            csr_json(&forged_b64),
            StatusCode::BAD_REQUEST,
            "InvalidCsrSignature",
        ),
        (
            csr_json(&format!("{good}{}", " ".repeat(20 * 1024))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
        ),
    ];
    for (body, status, name) in cases {
        let (s, n, detail) = error_detail(post_sign(&kbs, &t, body).await).await;
        assert_eq!((s, n.as_str()), (status, name), "{detail}");
    }
    // Unknown key type names the algorithm (rsaEncryption).
    let (_, _, detail) = error_detail(post_sign(&kbs, &t, csr_json(RSA_CSR)).await).await;
    assert!(detail.contains("1.2.840.113549.1.1.1"), "{detail}");
    // Without a token: 401, before the body is looked at.
    let resp = kbs
        .http()
        .post(format!("{}/kbs/v0/pki/sign", kbs.url))
        .body(csr_json(&good))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    assert!(
        stored_keys(&kbs).await.is_empty(),
        "nothing stored, not even a CA"
    );
    let m = kbs.metrics().await;
    assert_eq!(
        metric_value(&m, "kbs_pki_sign_total", &[("outcome", "issued")]),
        0.0
    );
    assert_eq!(
        metric_value(&m, "kbs_pki_sign_total", &[("outcome", "too_large")]),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "kbs_pki_sign_total",
            &[("outcome", "UnsupportedKeyType")]
        ),
        3.0
    );

    // And the same guest's good CSR still works.
    assert_eq!(
        post_sign(&kbs, &t, csr_json(&good)).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_policy_and_the_plugin_switch_gate_signing() {
    let kbs = TestKbs::start_tls().await;
    // A policy that lets the guest fetch resources but refuses the pki plugin.
    kbs.admin()
        .set_policy(
            "package policy\nimport rego.v1\ndefault allow := false\n\
             allow if {\n  input[\"submods\"][\"cpu0\"][\"ear.status\"] == \"affirming\"\n  data.plugin != \"pki\"\n}\n",
        )
        .await
        .unwrap();
    let t = token(&kbs, "pki-5").await;
    let pem = csr(&rcgen::PKCS_ED25519, "pki-5", vec![]);
    let (status, name, _) = error_detail(post_sign(&kbs, &t, csr_json(&pem)).await).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::FORBIDDEN, "PolicyDeny")
    );
    assert!(stored_keys(&kbs).await.is_empty());

    kbs.admin().set_policy(ALLOW_SAMPLE).await.unwrap();
    assert_eq!(
        post_sign(&kbs, &t, csr_json(&pem)).await.status(),
        StatusCode::OK
    );

    kbs.admin().set_plugin_enabled("pki", false).await.unwrap();
    let resp = post_sign(&kbs, &t, csr_json(&pem)).await;
    let (status, _, _) = error_detail(resp).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let resp = kbs
        .http()
        .get(format!("{}/kbs/v0/pki/ca", kbs.url))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    kbs.admin().set_plugin_enabled("pki", true).await.unwrap();
    assert_eq!(
        post_sign(&kbs, &t, csr_json(&pem)).await.status(),
        StatusCode::OK
    );
}

/// Issue 17, defect 7: a token alone buys nothing. Whoever sees a guest's token can send a CSR
/// for a key of their own; the answer is sealed to the token's TEE key, so the certificate
/// for the thief's key never leaves the KBS in a form the thief can read.
#[tokio::test]
async fn a_token_thief_gets_no_certificate_it_can_read() {
    let kbs = kbs_with_policy().await;
    let guest_key = TeeKeyPair::new_ec();
    let token = kbs.attest(&guest_key, Some(&init("pki-7"))).await;
    let thief_csr = csr(&rcgen::PKCS_ED25519, "pki-7", vec![]);
    let resp = post_sign(&kbs, &token, csr_json(&thief_csr)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.bytes().await.unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(
        !text.contains("BEGIN CERTIFICATE"),
        "a certificate travels in the clear: {text}"
    );
    // Only the TEE key of the token opens the answer.
    assert!(TeeKeyPair::new_ec().open_json(&body).is_err());
    let plain = guest_key
        .open_json(&body)
        .expect("sealed to the token's TEE key");
    let reply: Value = serde_json::from_slice(&plain).unwrap();
    let cert = reply["certificate"].as_str().unwrap();
    assert!(cert.contains("BEGIN CERTIFICATE"), "{reply}");
    assert!(reply["ca"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
    assert!(reply["not_after"].as_u64().is_some());
}
