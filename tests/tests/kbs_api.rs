#![allow(clippy::unwrap_used)]
//! The Trustee-compatible API over real HTTP and HTTPS on loopback: the happy path with the
//! guest client, and every kind of bad input, each with its status, JSON error body, metric
//! and no state change.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use guest_daemon::evidence::{EvidenceProvider, SampleAttester};
use guest_daemon::rcar::runtime_data_digest;
use guest_daemon::resource_path::ResourcePath;
use guest_daemon::tee_key::TeeKeyPair;
use kbs_core::admin_key::AdminKeyPair;
use kbs_types::{HashAlgorithm, RuntimeData};
use reqwest::StatusCode;
use serde_json::{Value, json};
use server::admin_client::AdminClient;
use tests::{ALLOW_SAMPLE, TestKbs, api_err, http_and_tls, http_client, metric_value, unix_secs};

async fn expect_error(resp: reqwest::Response, status: StatusCode, name: &str) -> Value {
    assert_eq!(resp.status(), status, "wrong status for {name}");
    let body: Value = resp.json().await.expect("error body is JSON");
    let ty = body["type"].as_str().expect("type field");
    assert_eq!(
        ty,
        format!("https://github.com/confidential-containers/kbs/errors/{name}"),
        "body: {body}"
    );
    assert!(
        !body["detail"].as_str().unwrap_or("").is_empty(),
        "detail names the problem: {body}"
    );
    body
}

async fn seed(kbs: &TestKbs, allow_sample: bool) {
    let admin = kbs.admin();
    admin
        .put_resource("default/key/one", b"secret-1".to_vec())
        .await
        .unwrap();
    if allow_sample {
        admin.set_policy(ALLOW_SAMPLE).await.unwrap();
    }
}

/// auth -> (client with cookie, nonce)
async fn auth(http: &reqwest::Client, url: &str) -> String {
    let r = http
        .post(format!("{url}/kbs/v0/auth"))
        .json(&json!({"version": "0.4.0", "tee": "sample", "extra-params": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let challenge: Value = r.json().await.unwrap();
    assert_eq!(
        challenge["extra-params"]["selected-hash-algorithm"],
        "sha384"
    );
    challenge["nonce"].as_str().unwrap().to_string()
}

async fn attestation(key: &TeeKeyPair, nonce: &str, evidence_nonce: Option<&str>) -> Value {
    let rd = RuntimeData {
        nonce: nonce.to_string(),
        tee_pubkey: key.export_pubkey(),
    };
    let mut bound = rd.clone();
    if let Some(n) = evidence_nonce {
        bound.nonce = n.to_string();
    }
    let digest = runtime_data_digest(&bound, "", HashAlgorithm::Sha384).unwrap();
    let evidence = SampleAttester.primary_evidence(digest).await.unwrap();
    json!({
        "init-data": null,
        "runtime-data": rd,
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""}
    })
}

http_and_tls!(
    guest_fetches_a_resource_in_both_modes,
    |kbs: TestKbs| async move {
        seed(&kbs, true).await;
        let path: ResourcePath = "default/key/one".parse().unwrap();
        for key in [TeeKeyPair::new_ec(), TeeKeyPair::new_rsa().unwrap()] {
            let mut g = kbs.rcar_client(&key, None);
            // Background-check mode: the session cookie.
            let data = g.get_resource(&path).await.unwrap();
            assert_eq!(data.as_slice(), b"secret-1");
            // Passport mode: the token as Bearer, no cookie.
            let token = g.attest().await.unwrap();
            let data = g.get_resource_with_token(&token, &path).await.unwrap();
            assert_eq!(data.as_slice(), b"secret-1");
        }
        // Each upload is a new version; the latest is served.
        kbs.admin()
            .put_resource("default/key/one", b"secret-2".to_vec())
            .await
            .unwrap();
        let mut g = kbs.rcar_client(&TeeKeyPair::new_ec(), None);
        assert_eq!(g.get_resource(&path).await.unwrap().as_slice(), b"secret-2");
        let versions = kbs
            .admin()
            .resource_versions("default/key/one")
            .await
            .unwrap();
        assert_eq!(versions["versions"].as_array().unwrap().len(), 2);
        let m = kbs.metrics().await;
        assert!(
            metric_value(
                &m,
                "kbs_attestations_total",
                &[("tee", "sample"), ("outcome", "ok")]
            ) >= 5.0
        );
        assert!(
            metric_value(
                &m,
                "kbs_http_requests_total",
                &[("route", "/kbs/v0/resource/{repo}/{kind}/{tag}")]
            ) >= 5.0
        );
    }
);

http_and_tls!(
    default_policy_refuses_the_sample_tee,
    |kbs: TestKbs| async move {
        seed(&kbs, false).await;
        let mut g = kbs.rcar_client(&TeeKeyPair::new_ec(), None);
        let token = g.attest().await.unwrap();
        let r = kbs
            .http()
            .get(format!("{}/kbs/v0/resource/default/key/one", kbs.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        expect_error(r, StatusCode::FORBIDDEN, "PolicyDeny").await;
        assert_eq!(
            metric_value(
                &kbs.metrics().await,
                "kbs_api_errors_total",
                &[("name", "PolicyDeny")]
            ),
            1.0
        );
    }
);

http_and_tls!(malformed_requests_are_400, |kbs: TestKbs| async move {
    let http = kbs.http();
    let url = &kbs.url;
    let post = |path: &str, body: &'static str| {
        http.post(format!("{url}{path}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    expect_error(
        post("/kbs/v0/auth", "{not json").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "MalformedRequest",
    )
    .await;
    expect_error(
        post(
            "/kbs/v0/auth",
            r#"{"version":"0.1.0","tee":"sample","extra-params":""}"#,
        )
        .await
        .unwrap(),
        StatusCode::BAD_REQUEST,
        "InvalidRequestVersion",
    )
    .await;
    expect_error(
        post(
            "/kbs/v0/auth",
            r#"{"version":"0.4.0","tee":"tdx","extra-params":""}"#,
        )
        .await
        .unwrap(),
        StatusCode::BAD_REQUEST,
        "UnknownTee",
    )
    .await;
    expect_error(
        post(
            "/kbs/v0/auth",
            r#"{"version":"0.4.0","tee":"no-such-tee","extra-params":""}"#,
        )
        .await
        .unwrap(),
        StatusCode::BAD_REQUEST,
        "MalformedRequest",
    )
    .await;
    // Newer clients send the hash list; an object is accepted.
    let ok = post(
        "/kbs/v0/auth",
        r#"{"version":"0.4.0","tee":"sample","extra-params":{"supported-hash-algorithms":["sha256"]}}"#,
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let c: Value = ok.json().await.unwrap();
    assert_eq!(c["extra-params"]["selected-hash-algorithm"], "sha256");
    let m = kbs.metrics().await;
    assert_eq!(
        metric_value(&m, "kbs_api_errors_total", &[("name", "MalformedRequest")]),
        2.0
    );
    assert_eq!(
        metric_value(&m, "kbs_api_errors_total", &[("name", "UnknownTee")]),
        1.0
    );
});

// issue 17 defect 1: a `supported-hash-algorithms` entry of 199 ASCII characters then `é`
// once killed the connection (the echoed names were cut inside the `é`). Now a 400 with the
// JSON error body, and the KBS keeps answering.
http_and_tls!(
    a_multibyte_character_at_the_echo_cut_is_a_400,
    |kbs: TestKbs| async move {
        let http = kbs.http();
        let name = format!("{}é", "a".repeat(199));
        let resp = http
            .post(format!("{}/kbs/v0/auth", kbs.url))
            .json(&json!({"version": "0.4.0", "tee": "sample",
                      "extra-params": {"supported-hash-algorithms": [name, "md5"]}}))
            .send()
            .await
            .expect("an answer, not a dropped connection");
        let body = expect_error(resp, StatusCode::BAD_REQUEST, "UnsupportedHashAlgorithm").await;
        assert!(body["detail"].as_str().unwrap().contains("aaaa"), "{body}");
        auth(&http, &kbs.url).await;
    }
);

http_and_tls!(session_and_nonce_misuse_is_401, |kbs: TestKbs| async move {
    let url = kbs.url.clone();
    let key = TeeKeyPair::new_ec();
    // No session at all.
    let fresh = http_client(kbs.ca_file.as_deref());
    let att = attestation(&key, "bm9uY2U=", None).await;
    let r = fresh
        .post(format!("{url}/kbs/v0/attest"))
        .json(&att)
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::UNAUTHORIZED, "SessionNotFound").await;
    let r = fresh
        .post(format!("{url}/kbs/v0/attest"))
        .header(
            "cookie",
            "kbs-session-id=00000000-0000-4000-8000-000000000000",
        )
        .json(&att)
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::UNAUTHORIZED, "SessionNotFound").await;

    // Wrong nonce in the runtime data.
    let http = kbs.http();
    let _nonce = auth(&http, &url).await;
    let att = attestation(&key, "d3Jvbmc=", None).await;
    let r = http
        .post(format!("{url}/kbs/v0/attest"))
        .json(&att)
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::UNAUTHORIZED, "NonceMismatch").await;

    // Evidence bound to something else: report_data mismatch.
    let http = kbs.http();
    let nonce = auth(&http, &url).await;
    let att = attestation(&key, &nonce, Some("c29tZXRoaW5nIGVsc2U=")).await;
    let r = http
        .post(format!("{url}/kbs/v0/attest"))
        .json(&att)
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::UNAUTHORIZED, "EvidenceVerificationFailed").await;

    // A good attestation: the reply's cookie is the token itself, so attesting again with
    // it is no challenge (401 SessionNotFound), while resources are released through it.
    let http = kbs.http();
    let nonce = auth(&http, &url).await;
    let att = attestation(&key, &nonce, None).await;
    let r = http
        .post(format!("{url}/kbs/v0/attest"))
        .json(&att)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let token = r.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        cookie.starts_with(&format!("kbs-session-id={token};")),
        "{cookie}"
    );
    let before = metric_value(
        &kbs.metrics().await,
        "kbs_attestations_total",
        &[("outcome", "SessionNotFound")],
    );
    let r = http
        .post(format!("{url}/kbs/v0/attest"))
        .json(&att)
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::UNAUTHORIZED, "SessionNotFound").await;
    assert_eq!(
        metric_value(
            &kbs.metrics().await,
            "kbs_attestations_total",
            &[("outcome", "SessionNotFound")]
        ),
        before + 1.0
    );
});

#[tokio::test]
async fn expired_session_is_401() {
    let kbs = TestKbs::start_with(false, |c| {
        c.attestation.session_ttl = Duration::from_secs(1)
    })
    .await;
    // No cookie store: a real client drops the expired cookie; send it anyway, as an attacker would.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/kbs/v0/auth", kbs.url))
        .json(&json!({"version": "0.4.0", "tee": "sample", "extra-params": ""}))
        .send()
        .await
        .unwrap();
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let nonce = r.json::<Value>().await.unwrap()["nonce"]
        .as_str()
        .unwrap()
        .to_string();
    // The session lifetime is the event under test: wait it out.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let att = attestation(&TeeKeyPair::new_ec(), &nonce, None).await;
    let r = http
        .post(format!("{}/kbs/v0/attest", kbs.url))
        .header("cookie", cookie)
        .json(&att)
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::UNAUTHORIZED, "SessionExpired").await;
}

/// GET a path byte for byte (URL libraries normalise `..` and `%2E%2E` away before sending).
async fn raw_get(addr: std::net::SocketAddr, path: &str, token: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    let status = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn raw_traversal_paths_are_refused() {
    let kbs = TestKbs::start().await;
    seed(&kbs, true).await;
    let token = kbs
        .rcar_client(&TeeKeyPair::new_ec(), None)
        .attest()
        .await
        .unwrap();
    for bad in [
        "../key/one",
        "%2E%2E/key/one",
        "default/%2e%2e/one",
        "default/./one",
    ] {
        let (status, body) = raw_get(kbs.addr, &format!("/kbs/v0/resource/{bad}"), &token).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["type"]
                .as_str()
                .unwrap()
                .ends_with("/InvalidResourcePath"),
            "{body}"
        );
    }
}

http_and_tls!(
    forged_expired_and_unsigned_tokens_are_401,
    |kbs: TestKbs| async move {
        seed(&kbs, true).await;
        let mut g = kbs.rcar_client(&TeeKeyPair::new_ec(), None);
        let good = g.attest().await.unwrap();
        let payload: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(good.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        let get = |token: String| {
            kbs.http()
                .get(format!("{}/kbs/v0/resource/default/key/one", kbs.url))
                .bearer_auth(token)
                .send()
        };
        // Same claims signed by a key the KBS never issued with.
        let other = p256_pem();
        let forged = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &payload,
            &jsonwebtoken::EncodingKey::from_ec_pem(other.as_bytes()).unwrap(),
        )
        .unwrap();
        let body = expect_error(
            get(forged).await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "InvalidToken",
        )
        .await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("signature does not verify"),
            "{body}"
        );
        // Signed by the KBS's own key but expired.
        let mut expired = payload.clone();
        expired["exp"] = json!(unix_secs() - 120);
        expired["iat"] = json!(unix_secs() - 420);
        let kbs_key = std::fs::read(kbs.data_dir.join("token.key")).unwrap();
        let expired = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &expired,
            &jsonwebtoken::EncodingKey::from_ec_pem(&kbs_key).unwrap(),
        )
        .unwrap();
        expect_error(
            get(expired).await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "TokenExpired",
        )
        .await;
        // alg none.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let body = expect_error(
            get(none).await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "InvalidToken",
        )
        .await;
        assert!(
            body["detail"].as_str().unwrap().contains("not ES256"),
            "{body}"
        );
        // Garbage.
        let body = expect_error(
            get("x.y.z".into()).await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "InvalidToken",
        )
        .await;
        assert!(
            body["detail"].as_str().unwrap().contains("malformed"),
            "{body}"
        );
        // No credentials at all.
        let r = kbs
            .http()
            .get(format!("{}/kbs/v0/resource/default/key/one", kbs.url))
            .send()
            .await
            .unwrap();
        expect_error(r, StatusCode::UNAUTHORIZED, "Unauthenticated").await;
        // The good token still works.
        assert_eq!(get(good).await.unwrap().status(), StatusCode::OK);
    }
);

fn p256_pem() -> String {
    use p256_reexport::*;
    pem()
}

mod p256_reexport {
    pub fn pem() -> String {
        // A throwaway ES256 key: the KBS's signer type generates a fresh one.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        kbs_core::token::TokenSigner::load_or_generate(&path).unwrap();
        std::fs::read_to_string(path).unwrap()
    }
}

http_and_tls!(path_traversal_is_refused, |kbs: TestKbs| async move {
    seed(&kbs, true).await;
    let mut g = kbs.rcar_client(&TeeKeyPair::new_ec(), None);
    let token = g.attest().await.unwrap();
    for bad in [
        "default/key/a%2Fb",
        "default/key/a%5Cb",
        "default/key/a%00b",
        "default/k%20y/one",
    ] {
        let r = kbs
            .http()
            .get(format!("{}/kbs/v0/resource/{bad}", kbs.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        expect_error(r, StatusCode::BAD_REQUEST, "InvalidResourcePath").await;
    }
    // Extra segments are no route at all.
    let r = kbs
        .http()
        .get(format!("{}/kbs/v0/resource/default/key/one/extra", kbs.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "NotFound").await;
    // The admin side refuses the same paths and stores nothing.
    let (status, name) = api_err(
        kbs.admin()
            .put_resource("default/a%2Fb/x", b"x".to_vec())
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::BAD_REQUEST, "InvalidResourcePath")
    );
    let audit = kbs
        .admin()
        .send(reqwest::Method::GET, "/kbs/v0/admin/audit", None)
        .await
        .unwrap();
    assert_eq!(
        audit["records"].as_array().unwrap().len(),
        2,
        "only the seed actions: {audit}"
    );
});

#[tokio::test]
async fn oversized_bodies_are_413_and_store_nothing() {
    let kbs = TestKbs::start_with(true, |c| c.http.max_body_bytes = 4096).await;
    let (status, name) = api_err(
        kbs.admin()
            .put_resource("default/key/big", vec![0u8; 8192])
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge")
    );
    let (status, _) = api_err(
        kbs.admin()
            .resource_versions("default/key/big")
            .await
            .unwrap_err(),
    );
    assert_eq!(status, StatusCode::NOT_FOUND);
    let r = kbs
        .http()
        .post(format!("{}/kbs/v0/auth", kbs.url))
        .body(vec![b' '; 8192])
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge").await;
    assert_eq!(
        metric_value(
            &kbs.metrics().await,
            "kbs_api_errors_total",
            &[("name", "PayloadTooLarge")]
        ),
        2.0
    );
}

http_and_tls!(
    bad_policy_is_rejected_and_the_old_one_stays,
    |kbs: TestKbs| async move {
        seed(&kbs, true).await;
        let admin = kbs.admin();
        let (before, v) = admin.get_policy().await.unwrap();
        assert_eq!(v, 1);
        let (status, name) = api_err(
            admin
                .set_policy("package policy\nallow if {")
                .await
                .unwrap_err(),
        );
        assert_eq!(
            (status, name.as_str()),
            (StatusCode::BAD_REQUEST, "PolicyCompile")
        );
        let (after, v) = admin.get_policy().await.unwrap();
        assert_eq!((after, v), (before, 1));
        // The old policy still decides.
        let mut g = kbs.rcar_client(&TeeKeyPair::new_ec(), None);
        assert!(
            g.get_resource(&"default/key/one".parse().unwrap())
                .await
                .is_ok()
        );
        // Not base64url at all.
        let r = kbs
            .http()
            .post(format!("{}/kbs/v0/resource-policy", kbs.url))
            .bearer_auth(admin.token().unwrap())
            .json(&json!({"policy": "***"}))
            .send()
            .await
            .unwrap();
        expect_error(r, StatusCode::BAD_REQUEST, "MalformedRequest").await;
    }
);

#[tokio::test]
async fn unknown_admin_keys_and_role_violations() {
    let kbs = TestKbs::start_with(false, |c| {
        c.admin.roles.insert(
            "reader".into(),
            vec!["GET ^/kbs/v0/(resource-policy|admin/.*)$".into()],
        );
    })
    .await;
    // A key the KBS does not trust.
    let stranger = AdminClient::new(&kbs.url, AdminKeyPair::generate(), None).unwrap();
    let (status, name) = api_err(
        stranger
            .put_resource("default/key/x", b"x".to_vec())
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::UNAUTHORIZED, "AdminTokenInvalid")
    );
    // A trusted key with a role that may only read.
    let reader = kbs.admin().with_identity("rita", "reader");
    assert!(reader.get_policy().await.is_ok());
    let (status, name) = api_err(
        reader
            .put_resource("default/key/x", b"x".to_vec())
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::FORBIDDEN, "AdminRoleDenied")
    );
    let (status, _) = api_err(reader.set_policy(ALLOW_SAMPLE).await.unwrap_err());
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A role nobody configured.
    let ghost = kbs.admin().with_identity("gus", "ghost");
    let (status, _) = api_err(ghost.get_policy().await.unwrap_err());
    assert_eq!(status, StatusCode::FORBIDDEN);
    // No token at all.
    let r = kbs
        .http()
        .get(format!("{}/kbs/v0/resource-policy", kbs.url))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::UNAUTHORIZED, "AdminAuthRequired").await;
    // Nothing changed, nothing audited.
    let (status, _) = api_err(
        kbs.admin()
            .resource_versions("default/key/x")
            .await
            .unwrap_err(),
    );
    assert_eq!(status, StatusCode::NOT_FOUND);
    let audit = kbs
        .admin()
        .send(reqwest::Method::GET, "/kbs/v0/admin/audit", None)
        .await
        .unwrap();
    assert!(audit["records"].as_array().unwrap().is_empty(), "{audit}");
    let m = kbs.metrics().await;
    assert_eq!(
        metric_value(&m, "kbs_api_errors_total", &[("name", "AdminRoleDenied")]),
        3.0
    );
}

#[tokio::test]
async fn restart_keeps_resources_keys_and_policy() {
    let kbs = TestKbs::start_tls().await;
    seed(&kbs, true).await;
    let mut g = kbs.rcar_client(&TeeKeyPair::new_ec(), None);
    let token = g.attest().await.unwrap();
    let kbs = kbs.restart().await;
    // The same signing key: a token issued before the restart still verifies.
    let data = g
        .get_resource_with_token(&token, &"default/key/one".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(data.as_slice(), b"secret-1");
    assert_eq!(kbs.admin().get_policy().await.unwrap().1, 1);
    let r = kbs
        .http()
        .get(format!("{}/readyz", kbs.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}
