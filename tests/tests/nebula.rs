#![allow(clippy::unwrap_used)]
//! The `nebula-ca` plugin: a guest whose attested init-data names its Nebula identity gets a
//! node certificate and key sealed to its TEE key, which the real `nebula-cert verify`
//! accepts under the KBS's CA; names, addresses and groups the attestation does not allow
//! are refused (unless the operator lets the policy decide, and it does); bad requests get
//! clear errors; a guest daemon announcing `nebula` is pushed its credential over the tunnel
//! and pushed a renewed one before it expires.

use std::path::Path;
use std::time::Duration;

use guest_daemon::tee_key::TeeKeyPair;
use reqwest::StatusCode;
use serde_json::Value;
use tests::{DaemonRun, TestKbs, error_detail};

const NEBULA_CERT: &str = "nebula-cert";

fn init(guest_id: &str, nebula: &str) -> String {
    format!("[tether]\nguest_id = \"{guest_id}\"\n\n[nebula]\n{nebula}\n")
}

/// `nebula-cert` (Debian package `nebula`), or a visible skip.
fn nebula_cert(test: &str) -> bool {
    let found = std::process::Command::new(NEBULA_CERT)
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        tests::skip(
            test,
            "nebula-cert is not installed (apt-get install nebula)",
        );
    }
    found
}

/// `nebula-cert verify -ca ca.crt -crt node.crt` on the files in `dir`.
fn verify(dir: &Path) -> std::process::Output {
    std::process::Command::new(NEBULA_CERT)
        .arg("verify")
        .arg("-ca")
        .arg(dir.join("ca.crt"))
        .arg("-crt")
        .arg(dir.join("node.crt"))
        .output()
        .unwrap()
}

/// `nebula-cert print -json -path <file>`.
fn print(file: &Path) -> Value {
    let out = std::process::Command::new(NEBULA_CERT)
        .args(["print", "-json", "-path"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn get(kbs: &TestKbs, token: &str, query: &str) -> reqwest::Response {
    kbs.http()
        .get(format!("{}/kbs/v0/nebula-ca/credential?{query}", kbs.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// Upstream's plaintext: each file's bytes as a JSON array of numbers.
fn file(v: &Value, key: &str) -> Vec<u8> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is an array of bytes: {v}"))
        .iter()
        .map(|b| b.as_u64().unwrap() as u8)
        .collect()
}

#[tokio::test]
async fn an_attested_guest_gets_a_credential_nebula_cert_verifies() {
    if !nebula_cert("an_attested_guest_gets_a_credential_nebula_cert_verifies") {
        return;
    }
    let kbs = TestKbs::start_dev().await;
    let key = TeeKeyPair::new_ec();
    let token = kbs
        .attest(
            &key,
            Some(&init(
                "neb-1",
                "name = \"web-1\"\nip = \"10.42.0.7/16\"\ngroups = [\"web\", \"eu\"]",
            )),
        )
        .await;
    let resp = get(&kbs, &token, "name=web-1&ip=10.42.0.7/16&groups=web,eu").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.bytes().await.unwrap();
    assert!(
        TeeKeyPair::new_ec().open_json(&body).is_err(),
        "sealed to the caller's TEE key"
    );
    let plain: Value = serde_json::from_slice(&key.open_json(&body).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (k, name) in [
        ("ca_crt", "ca.crt"),
        ("node_crt", "node.crt"),
        ("node_key", "node.key"),
    ] {
        std::fs::write(dir.path().join(name), file(&plain, k)).unwrap();
    }
    let out = verify(dir.path());
    assert!(
        out.status.success(),
        "nebula-cert verify: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let node = print(&dir.path().join("node.crt"));
    let details = &node["details"];
    assert_eq!(details["name"], "web-1");
    assert_eq!(details["ips"][0], "10.42.0.7/16");
    assert_eq!(details["groups"], serde_json::json!(["eu", "web"]));
    assert_eq!(details["isCa"], false);
    let ca = print(&dir.path().join("ca.crt"));
    assert_eq!(ca["details"]["isCa"], true);
    assert_eq!(details["issuer"], ca["fingerprint"]);
    assert!(
        String::from_utf8(file(&plain, "node_key"))
            .unwrap()
            .starts_with("-----BEGIN NEBULA X25519 PRIVATE KEY-----\n")
    );

    // Another guest later: the same CA (generated once, kept in the plugin's namespace).
    let other = kbs
        .attest(&key, Some(&init("neb-2", "ip = \"10.42.0.8/16\"")))
        .await;
    let resp = get(&kbs, &other, "name=neb-2&ip=10.42.0.8/16").await;
    let plain2: Value =
        serde_json::from_slice(&key.open_json(&resp.bytes().await.unwrap()).unwrap()).unwrap();
    assert_eq!(file(&plain2, "ca_crt"), file(&plain, "ca_crt"));
    let stored = kbs.state.store.kv_list("nebula-ca", "", 10).await.unwrap();
    assert_eq!(
        stored.len(),
        1,
        "only the CA is stored; node keys never are"
    );
    let raw_ca_key = String::from_utf8_lossy(&stored[0].1).into_owned();
    assert!(
        raw_ca_key.contains("\"key\""),
        "the CA record (sealed at rest by the store)"
    );
}

#[tokio::test]
async fn names_addresses_and_groups_come_from_the_attestation_not_the_request() {
    let kbs = TestKbs::start_dev().await;
    let key = TeeKeyPair::new_ec();
    let token = kbs
        .attest(
            &key,
            Some(&init(
                "neb-3",
                "name = \"db-1\"\nip = \"10.42.1.3/16\"\ngroups = [\"db\"]",
            )),
        )
        .await;
    for (query, status, name, what) in [
        (
            "name=web-1&ip=10.42.1.3/16",
            StatusCode::FORBIDDEN,
            "IdentityMismatch",
            "name",
        ),
        (
            "name=db-1&ip=10.42.1.4/16",
            StatusCode::FORBIDDEN,
            "IdentityMismatch",
            "ip",
        ),
        (
            "name=db-1&ip=10.42.1.3/24",
            StatusCode::FORBIDDEN,
            "IdentityMismatch",
            "ip",
        ),
        (
            "name=db-1&ip=10.42.1.3/16&groups=db,admin",
            StatusCode::FORBIDDEN,
            "IdentityMismatch",
            "admin",
        ),
        (
            "ip=10.42.1.3/16",
            StatusCode::BAD_REQUEST,
            "InvalidCredentialRequest",
            "name",
        ),
        (
            "name=db-1",
            StatusCode::BAD_REQUEST,
            "InvalidCredentialRequest",
            "ip",
        ),
        (
            "name=db-1&ip=10.42.1.3",
            StatusCode::BAD_REQUEST,
            "InvalidCredentialRequest",
            "prefix",
        ),
        (
            "name=db-1&ip=10.42.1.3/16&subnets=10.0.0.0/8",
            StatusCode::BAD_REQUEST,
            "InvalidCredentialRequest",
            "subnets",
        ),
        (
            "name=db%201&ip=10.42.1.3/16",
            StatusCode::BAD_REQUEST,
            "InvalidCredentialRequest",
            "name",
        ),
        (
            "name=db-1&ip=10.42.1.3/16&duration=tomorrow",
            StatusCode::BAD_REQUEST,
            "InvalidCredentialRequest",
            "duration",
        ),
    ] {
        let (s, n, d) = error_detail(get(&kbs, &token, query).await).await;
        assert_eq!((s, n.as_str()), (status, name), "{query}: {d}");
        assert!(d.contains(what), "{query}: {d}");
    }
    // No token: 401, nothing issued.
    let resp = kbs
        .http()
        .get(format!(
            "{}/kbs/v0/nebula-ca/credential?name=db-1&ip=10.42.1.3/16",
            kbs.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // The attested identity itself: issued.
    let resp = get(
        &kbs,
        &token,
        "name=db-1&ip=10.42.1.3/16&groups=db&duration=1h",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        kbs.metric(
            "kbs_nebula_ca_credentials_total",
            &[("via", "pull"), ("outcome", "identity_mismatch")]
        )
        .await,
        4.0
    );

    // A policy that refuses the plugin refuses even the attested identity.
    kbs.admin()
        .set_policy(
            "package policy\ndefault allow := false\nallow if { data.plugin != \"nebula-ca\" }\n",
        )
        .await
        .unwrap();
    let (s, n, _) = error_detail(get(&kbs, &token, "name=db-1&ip=10.42.1.3/16").await).await;
    assert_eq!((s, n.as_str()), (StatusCode::FORBIDDEN, "PolicyDeny"));
}

#[tokio::test]
async fn with_names_from_policy_the_policy_may_grant_what_the_attestation_does_not() {
    let kbs = TestKbs::start_with(false, |c| {
        tests::allow_sample(c);
        c.plugins
            .set("nebula-ca", "names_from_policy = true")
            .unwrap();
    })
    .await;
    // The policy grants 10.99.0.0/16 addresses to guests of app=edge, by label.
    kbs.admin()
        .set_policy(
            "package policy\ndefault allow := false\n\
             allow if { data.plugin != \"nebula-ca\" }\n\
             allow if { data.plugin == \"nebula-ca\"; data.query.attested == \"true\" }\n\
             allow if {\n  data.plugin == \"nebula-ca\"\n  input.tether.labels.app == \"edge\"\n  startswith(data.query.ip, \"10.99.\")\n  endswith(data.query.ip, \"/16\")\n}\n",
        )
        .await
        .unwrap();
    let key = TeeKeyPair::new_ec();
    let edge = kbs
        .attest(
            &key,
            Some("[tether]\nguest_id = \"edge-1\"\n[tether.labels]\napp = \"edge\"\n"),
        )
        .await;
    let resp = get(&kbs, &edge, "name=edge-1&ip=10.99.0.5/16").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (s, n, _) = error_detail(get(&kbs, &edge, "name=edge-1&ip=10.42.0.5/16").await).await;
    assert_eq!((s, n.as_str()), (StatusCode::FORBIDDEN, "PolicyDeny"));
    let other = kbs
        .attest(
            &key,
            Some("[tether]\nguest_id = \"web-9\"\n[tether.labels]\napp = \"web\"\n"),
        )
        .await;
    let (s, n, _) = error_detail(get(&kbs, &other, "name=web-9&ip=10.99.0.6/16").await).await;
    assert_eq!((s, n.as_str()), (StatusCode::FORBIDDEN, "PolicyDeny"));
}

fn held(dir: &Path, name: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join("credentials/nebula").join(name)).ok()
}

#[tokio::test]
async fn a_guest_announcing_nebula_is_pushed_its_credential_and_a_renewal() {
    let can_verify =
        nebula_cert("a_guest_announcing_nebula_is_pushed_its_credential_and_a_renewal");
    // Certificates of one minute, renewed 55 s before they expire: a renewal within seconds.
    let kbs = TestKbs::start_with(false, |c| {
        tests::allow_sample(c);
        c.plugins
            .set(
                "nebula-ca",
                "validity = \"1m\"\nrenew_before = \"55s\"\nrenew_check_interval = \"1s\"",
            )
            .unwrap();
    })
    .await;
    let state = tempfile::tempdir().unwrap();
    let mut config = kbs.daemon_config(
        state.path(),
        Some(init(
            "neb-push",
            "name = \"lh-1\"\nip = \"10.42.9.1/16\"\ngroups = [\"lighthouse\"]",
        )),
    );
    config.extra_services.push("nebula".into());
    let mut daemon = DaemonRun::spawn(config);
    daemon.connected().await;
    let dir = state.path().join("credentials/nebula");
    tests::eventually_within(
        Duration::from_secs(30),
        "the pushed nebula bundle",
        || async { held(state.path(), "node.crt").is_some() },
    )
    .await;
    let first = held(state.path(), "node.crt").unwrap();
    let mode = |n: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir.join(n)).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode("node.key"), 0o600);
    assert_eq!(mode("node.crt"), 0o644);
    if can_verify {
        let out = verify(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(print(&dir.join("node.crt"))["details"]["name"], "lh-1");
    }
    // The renewal: a new certificate and key, pushed while the first is still valid.
    tests::eventually_within(
        Duration::from_secs(30),
        "the renewed nebula bundle",
        || async { held(state.path(), "node.crt").is_some_and(|c| c != first) },
    )
    .await;
    let renewed = held(state.path(), "node.crt").unwrap();
    assert_ne!(renewed, first);
    if can_verify {
        let out = verify(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Counted once each acknowledgement is back (just after the guest wrote the files).
    tests::eventually("two pushes counted", || async {
        kbs.metric(
            "kbs_nebula_ca_credentials_total",
            &[("via", "push"), ("outcome", "issued")],
        )
        .await
            >= 2.0
    })
    .await;
    daemon.stop().await;
}
