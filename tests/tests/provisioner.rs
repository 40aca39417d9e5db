#![allow(clippy::unwrap_used)]
//! The provisioner plugin (per-VM disk keys, upstream's API): the real `kbs` binary, the real
//! `kbsctl` with a role limited to provisioning, the real `guest-daemon disk-key` with the
//! sample TEE whose init-data matches (key released, sealed to its TEE key) or does not
//! (403); re-provisioning keeps the key; delete erases it; bad input refused with clear
//! errors and nothing stored; the init-data digest the token carries (what TDX compares with
//! MRCONFIGID) is the `mrconfigid` handed to the host.

use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::{ALLOW_SAMPLE, TestKbs, error_detail};

const WAIT: std::time::Duration = std::time::Duration::from_secs(60);
const KBS_URL_IN_INITDATA: &str = "https://kbs.example:8080";

/// The real binary `name` of this checkout.
fn binary(name: &str) -> PathBuf {
    let package = if name == "guest-daemon" {
        "guest-daemon"
    } else {
        "server"
    };
    tests::built_binary(package, name)
}

/// A `kbs` process with `config` (TOML), on a free port; returns it and its base URL.
async fn spawn_kbs(root: &Path, config: &str) -> (tokio::process::Child, String) {
    let file = root.join("kbs.toml");
    std::fs::write(&file, config).unwrap();
    let kbs = tests::spawn_kbs(&root.join("data"), Some(&file)).await;
    (kbs.child, kbs.announced)
}

async fn run(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("finishes in time")
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const CONFIG: &str = r#"
[plugins.provisioner]
kbs_url = "https://kbs.example:8080"

[admin.roles]
admin = ["* ^/kbs/.+$"]
provisioner = ["GET,POST,DELETE ^/kbs/v0/provisioner/provision(/[0-9a-f-]+)?$"]
"#;

#[tokio::test]
async fn a_vm_is_provisioned_gets_its_key_only_with_its_init_data_and_is_erased() {
    let root = tempfile::tempdir().unwrap();
    let (mut kbs, url) = spawn_kbs(root.path(), CONFIG).await;
    let admin_key = root.path().join("data/admin.key");
    let kbsctl = binary("kbsctl");
    let daemon = binary("guest-daemon");
    let key_env = admin_key.to_str().unwrap();
    let ctl = |args: Vec<String>| {
        let kbsctl = kbsctl.clone();
        let url = url.clone();
        async move {
            let mut all = vec![
                "--url".to_string(),
                url,
                "--role".into(),
                "provisioner".into(),
            ];
            all.extend(args);
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            run(&kbsctl, &all, &[("KBS_ADMIN_KEY", key_env)]).await
        }
    };
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();

    // The host's operator provisions the VM, with a role that may do nothing else.
    let initdata = root.path().join("vm-1.toml");
    let out = ctl(s(&[
        "-o",
        "json",
        "provisioner",
        "provision",
        "vm-1",
        "--namespace",
        "team-a",
        "--initdata-out",
        initdata.to_str().unwrap(),
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let uuid = answer["uuid"].as_str().unwrap().to_string();
    assert_eq!(answer["resource_path"], format!("default/{uuid}/root"));
    let oem = B64.decode(answer["oemstring"].as_str().unwrap()).unwrap();
    assert_eq!(std::fs::read(&initdata).unwrap(), oem);
    assert_eq!(
        text(&oem),
        format!(
            "algorithm = \"sha384\"\nversion = \"0.1.0\"\n\n[data]\n\"trustee.kbs.url\" = \"{KBS_URL_IN_INITDATA}\"\n\"trustee.kbs.resource\" = \"kbs+provisioner:///default/{uuid}/root\"\n"
        )
    );
    let mrconfigid = B64.decode(answer["mrconfigid"].as_str().unwrap()).unwrap();
    assert_eq!(mrconfigid.len(), 48);

    // Provisioning the same VM again: the same answer, and (below) the same key.
    let again = ctl(s(&[
        "-o",
        "json",
        "provisioner",
        "provision",
        "vm-1",
        "--namespace",
        "team-a",
    ]))
    .await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(
        serde_json::from_slice::<Value>(&again.stdout).unwrap(),
        answer
    );
    // Another VM gets another UUID.
    let other = ctl(s(&[
        "-o",
        "json",
        "provisioner",
        "provision",
        "vm-1",
        "--namespace",
        "team-b",
    ]))
    .await;
    let other: Value = serde_json::from_slice(&other.stdout).unwrap();
    assert_ne!(other["uuid"], answer["uuid"]);

    // The role is limited to provisioning.
    let denied = ctl(s(&["resource", "versions", "default/key/x"])).await;
    assert!(!denied.status.success());
    assert!(
        text(&denied.stderr).contains("AdminRoleDenied"),
        "{}",
        text(&denied.stderr)
    );
    let listed = ctl(s(&["-o", "json", "provisioner", "list"])).await;
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let uuids: Vec<&str> = listed["provisioned"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["uuid"].as_str().unwrap())
        .collect();
    assert_eq!(uuids.len(), 2);
    assert!(uuids.contains(&uuid.as_str()));
    assert!(
        !listed.to_string().contains("cryptsetup"),
        "no key in a listing"
    );

    // The guest: the sample TEE, attesting the injected init-data.
    let admin = server::admin_client::AdminClient::new(
        &url,
        kbs_core::admin_key::AdminKeyPair::load(&admin_key).unwrap(),
        None,
    )
    .unwrap();
    admin.set_policy(ALLOW_SAMPLE).await.unwrap();
    let disk_key = |init: PathBuf, extra: &'static [&'static str]| {
        let daemon = daemon.clone();
        let url = url.clone();
        async move {
            let mut args = vec![
                "disk-key".to_string(),
                "--kbs-url".into(),
                url,
                "--init-data".into(),
                init.display().to_string(),
            ];
            args.extend(extra.iter().map(|a| a.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&daemon, &args, &[("TETHER_TEE", "sample")]).await
        }
    };
    let got = disk_key(initdata.clone(), &[]).await;
    assert!(got.status.success(), "{}", text(&got.stderr));
    let key = text(&got.stdout);
    assert_eq!(key.len(), 32);
    assert!(key.bytes().all(|b| b.is_ascii_alphanumeric()), "{key:?}");
    let confdata = disk_key(initdata.clone(), &["--confdata"]).await;
    assert_eq!(
        text(&confdata.stdout),
        format!("version = \"0.1.0\"\n\n[data]\n\"io.cryptsetup.key.text.root\" = \"{key}\"\n")
    );

    // Init-data naming the same resource but not the one issued: no key.
    let forged = root.path().join("forged.toml");
    let mut forged_text = text(&oem);
    forged_text.push_str("# same resource, other bytes\n");
    std::fs::write(&forged, forged_text).unwrap();
    let refused = disk_key(forged, &[]).await;
    assert!(!refused.status.success());
    assert!(refused.stdout.is_empty());
    let err = text(&refused.stderr);
    assert!(
        err.contains("403") && err.contains("InitDataMismatch"),
        "{err}"
    );

    // Re-provisioning after the guest used its key changed nothing.
    ctl(s(&[
        "provisioner",
        "provision",
        "vm-1",
        "--namespace",
        "team-a",
    ]))
    .await;
    let still = disk_key(initdata.clone(), &[]).await;
    assert_eq!(
        text(&still.stdout),
        key,
        "the key survives a second provision"
    );

    // Delete: erased, gone from the listing, the guest gets 404, a second delete is 404.
    let del = ctl(s(&["provisioner", "delete", &uuid])).await;
    assert!(del.status.success(), "{}", text(&del.stderr));
    let gone = disk_key(initdata.clone(), &[]).await;
    assert!(!gone.status.success());
    assert!(text(&gone.stderr).contains("404"), "{}", text(&gone.stderr));
    let del2 = ctl(s(&["provisioner", "delete", &uuid])).await;
    assert!(!del2.status.success());
    assert!(
        text(&del2.stderr).contains("ProvisionNotFound"),
        "{}",
        text(&del2.stderr)
    );
    let listed = ctl(s(&["-o", "json", "provisioner", "list"])).await;
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["provisioned"].as_array().unwrap().len(), 1);

    // Provisioning it anew after the delete: same UUID, a new key.
    ctl(s(&[
        "provisioner",
        "provision",
        "vm-1",
        "--namespace",
        "team-a",
    ]))
    .await;
    let fresh = disk_key(initdata, &[]).await;
    assert!(fresh.status.success(), "{}", text(&fresh.stderr));
    assert_ne!(text(&fresh.stdout), key);

    // Audited under the provisioner's role.
    let audit = admin
        .send(
            reqwest::Method::GET,
            "/kbs/v0/admin/audit?action=provisioner.*",
            None,
        )
        .await
        .unwrap();
    let actions: Vec<(String, String)> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_string(),
                r["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        actions.contains(&("provisioner.delete".into(), "ok".into())),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("provisioner.delete".into(), "not-found".into())),
        "{actions:?}"
    );
    kbs.kill().await.unwrap();
}

async fn kbs() -> TestKbs {
    TestKbs::start_with(false, |c| {
        tests::allow_sample(c);
        c.plugins
            .set(
                "provisioner",
                &format!("kbs_url = \"{KBS_URL_IN_INITDATA}\""),
            )
            .unwrap();
    })
    .await
}

async fn post_raw(kbs: &TestKbs, body: impl Into<reqwest::Body>) -> reqwest::Response {
    kbs.http()
        .post(format!("{}/kbs/v0/provisioner/provision", kbs.url))
        .bearer_auth(kbs.admin().token().unwrap())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn stored(kbs: &TestKbs) -> usize {
    kbs.state
        .store
        .kv_list("provisioner", "", 100)
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn bad_provision_requests_get_clear_errors_and_store_nothing() {
    let kbs = kbs().await;
    let huge = format!("{{\"vm_name\": \"{}\"}}", "v".repeat(300));
    let larger = format!("{{\"vm_name\": \"{}\"}}", "v".repeat(5000));
    let cases: Vec<(Vec<u8>, StatusCode, &str, &str)> = vec![
        (
            b"{}".to_vec(),
            StatusCode::BAD_REQUEST,
            "InvalidProvisionRequest",
            "vm_name",
        ),
        (
            br#"{"namespace": "a"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "InvalidProvisionRequest",
            "vm_name",
        ),
        (
            b"not json".to_vec(),
            StatusCode::BAD_REQUEST,
            "InvalidProvisionRequest",
            "expected",
        ),
        (
            b"{\"vm_name\": \"a\xff\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "InvalidProvisionRequest",
            "UTF-8",
        ),
        (
            huge.into_bytes(),
            StatusCode::BAD_REQUEST,
            "InvalidProvisionRequest",
            "1..=253",
        ),
        (
            larger.into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
            "4096",
        ),
        (
            br#"{"vm_name": ""}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "InvalidProvisionRequest",
            "1..=253",
        ),
        (
            br#"{"vm_name": "a", "namespace": "x/y"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "InvalidProvisionRequest",
            "'/'",
        ),
        (
            br#"{"vm_name": "a", "nmespace": "b"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "InvalidProvisionRequest",
            "nmespace",
        ),
        (
            br#"{"vm_name": ["a"]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "InvalidProvisionRequest",
            "invalid type",
        ),
    ];
    for (body, status, name, detail) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
        let (s, n, d) = error_detail(post_raw(&kbs, body).await).await;
        assert_eq!((s, n.as_str()), (status, name), "{shown}: {d}");
        assert!(d.contains(detail), "{shown}: {d}");
    }
    assert_eq!(stored(&kbs).await, 0, "refused requests store nothing");

    // Without an admin token: 401; a guest's attestation token is no admin token.
    let resp = kbs
        .http()
        .post(format!("{}/kbs/v0/provisioner/provision", kbs.url))
        .json(&json!({"vm_name": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // DELETE: a UUID never provisioned, and something that is no UUID.
    let admin = kbs.admin();
    let err = admin
        .deprovision("00000000-0000-5000-8000-000000000000")
        .await
        .unwrap_err();
    assert_eq!(
        tests::api_err(err),
        (StatusCode::NOT_FOUND, "ProvisionNotFound".into())
    );
    let err = admin.deprovision("not-a-uuid").await.unwrap_err();
    assert_eq!(
        tests::api_err(err),
        (StatusCode::BAD_REQUEST, "InvalidUuid".into())
    );
    assert_eq!(stored(&kbs).await, 0);

    // A guest asking for a UUID never provisioned, or a path the plugin does not serve.
    let token = kbs
        .attest(&guest_daemon::tee_key::TeeKeyPair::new_ec(), None)
        .await;
    for (path, status, name) in [
        (
            "default/00000000-0000-5000-8000-000000000000/root",
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
        ),
        (
            "default/00000000-0000-5000-8000-000000000000/swap",
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
        ),
        (
            "other/00000000-0000-5000-8000-000000000000/root",
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
        ),
        (
            "default/NOT-A-UUID/root",
            StatusCode::BAD_REQUEST,
            "InvalidUuid",
        ),
    ] {
        let resp = kbs
            .http()
            .get(format!("{}/kbs/v0/provisioner/{path}", kbs.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let (s, n, d) = error_detail(resp).await;
        assert_eq!((s, n.as_str()), (status, name), "{path}: {d}");
    }
}

#[tokio::test]
async fn without_a_kbs_url_provisioning_is_refused_with_the_key_to_set() {
    let kbs = TestKbs::start_with(false, |_| {}).await;
    let (s, n, d) = error_detail(post_raw(&kbs, r#"{"vm_name": "a"}"#).await).await;
    assert_eq!(
        (s, n.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "ProvisionerNotConfigured")
    );
    assert!(d.contains("plugins.provisioner.kbs_url"), "{d}");
    assert_eq!(stored(&kbs).await, 0);
}

#[tokio::test]
async fn the_attested_init_data_digest_is_the_mrconfigid_given_to_the_host() {
    let kbs = kbs().await;
    let answer = kbs.admin().provision("vm-d", "default").await.unwrap();
    let initdata =
        String::from_utf8(B64.decode(answer["oemstring"].as_str().unwrap()).unwrap()).unwrap();
    let key = guest_daemon::tee_key::TeeKeyPair::new_ec();
    let token = kbs.attest(&key, Some(&initdata)).await;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    // What a TDX verifier compares with MRCONFIGID (and the plugin with its record).
    let attested = claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["init_data"]
        .as_str()
        .unwrap()
        .to_string();
    let mrconfigid = B64.decode(answer["mrconfigid"].as_str().unwrap()).unwrap();
    assert_eq!(attested, hex_lower(&mrconfigid));

    // The answer is a JWE that only this TEE key opens; the plaintext is the confdata.
    let path = format!("provisioner/{}", answer["resource_path"].as_str().unwrap());
    let resp = kbs
        .http()
        .get(format!("{}/kbs/v0/{path}", kbs.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.bytes().await.unwrap();
    let plain = key.open_json(&body).unwrap();
    let confdata =
        guest_daemon::disk_key::parse_confdata(String::from_utf8(plain.to_vec()).unwrap()).unwrap();
    assert_eq!(confdata.root_key.len(), 32);
    let other = guest_daemon::tee_key::TeeKeyPair::new_ec();
    assert!(
        other.open_json(&body).is_err(),
        "sealed to the caller's TEE key"
    );

    // A policy that refuses the path refuses the key, whatever the init-data.
    kbs.admin()
        .set_policy("package policy\ndefault allow := false\n")
        .await
        .unwrap();
    let resp = kbs
        .http()
        .get(format!("{}/kbs/v0/{path}", kbs.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let (s, n, _) = error_detail(resp).await;
    assert_eq!((s, n.as_str()), (StatusCode::FORBIDDEN, "PolicyDeny"));
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
