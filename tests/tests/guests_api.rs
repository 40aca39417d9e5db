#![allow(clippy::unwrap_used)]
//! The Guests API (`tether.plugin.v1.Guests`) through the real `kbs` binary, real guest
//! daemons holding tunnels, and the `credpush` example plugin in its own process: a
//! credential posted to the plugin through the KBS, or written to the file it watches,
//! reaches every guest with the label and no other; then, with a raw client: a bad or missing token, calls and guests outside the
//! grant, the policy refusing a bundle, a stored resource pushed, a plugin flooding the API
//! (bounded, the KBS unharmed), an oversized message, a disabled plugin, a rotated token, a
//! guest that never answers (the caller's deadline, nothing more).

use std::path::Path;
use std::time::Duration;

use plugin_external::guests::client;
use plugin_external::proto::tether_plugin_v1::{
    ApplyResourceRequest, CredentialFile, InstallCredentialsRequest, ListGuestsRequest,
    PingRequest, ProbeRequest,
};
use serde_json::{Value, json};
use server::admin_client::{AdminClient, RequestBody};
use tests::{DaemonRun, Spawned, init_data, spawn_credpush, spawn_kbs};
use tonic::Code;

/// Sample guests are affirming; nothing named `forbidden` is released to anyone.
const POLICY: &str = r#"package policy
import rego.v1
default allow := false
allow if {
    input["submods"]["cpu0"]["ear.status"] == "affirming"
    not "forbidden" in data["resource-path"]
}
"#;

/// A token the operator wrote (the configured way; the other plugin's is generated).
const CREDPUSH_TOKEN: &str = "c0ffee0123456789abcdef0123456789abcdef0123456789";

struct Setup {
    kbs: Spawned,
    admin: AdminClient,
    socket: String,
    _plugin: Spawned,
    guests: Vec<DaemonRun>,
    dir: tempfile::TempDir,
}

/// The kbs with the Guests API on a Unix socket, `credpush` granted `app=db` guests and
/// `db-creds`, `narrow` (a generated token) granted only listing and pinging `app=web`
/// guests, two calls at once; guests `db-1`, `db-2` (`app=db`) and `web-1` (`app=web`).
async fn setup() -> Setup {
    tests::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let socket = format!("unix:{}", dir.path().join("guests.sock").display());
    let token_file = dir.path().join("credpush.token");
    std::fs::write(&token_file, format!("{CREDPUSH_TOKEN}\n")).unwrap();
    let plugin = spawn_credpush(&[
        "--kbs",
        &socket,
        "--token-file",
        token_file.to_str().unwrap(),
        "--selector",
        "app=db",
        "--bundle",
        "db-creds",
        "--watch",
        dir.path().join("watched").to_str().unwrap(),
    ])
    .await;
    let policy = dir.path().join("policy.rego");
    std::fs::write(&policy, POLICY).unwrap();
    let config = dir.path().join("kbs.toml");
    std::fs::write(
        &config,
        format!(
            r#"[policy]
initial_policy_file = "{policy}"

[plugins.guests-api]
listen = "{socket}"
call_timeout = "10s"
max_message_bytes = 65536

[[plugins.external]]
name = "credpush"
endpoint = "http://{plugin}"
timeout_ms = 30000
token_file = "{token_file}"
[plugins.external.guests]
calls = ["list_guests", "install_credentials", "apply_resource", "probe"]
selector = "app=db"
bundles = ["db-creds", "forbidden"]
resources = ["default/db/*"]

[[plugins.external]]
name = "narrow"
endpoint = "http://127.0.0.1:9"
token_file = "{narrow}"
[plugins.external.guests]
calls = ["list_guests", "ping"]
selector = "app=web"
max_concurrent = 2
"#,
            policy = policy.display(),
            plugin = plugin.announced,
            token_file = token_file.display(),
            narrow = dir.path().join("narrow.token").display(),
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let kbs = spawn_kbs(&data, Some(&config)).await;
    let key = kbs_core::admin_key::AdminKeyPair::load(&data.join("admin.key")).unwrap();
    let admin = AdminClient::new(&kbs.announced, key, None).unwrap();
    let mut guests = Vec::new();
    for (id, app) in [("db-1", "db"), ("db-2", "db"), ("web-1", "web")] {
        let mut config = guest_daemon::run::RunConfig::new(&kbs.announced, dir.path().join(id));
        config.init_data = Some(init_data(id, &[("app", app)]));
        let mut daemon = DaemonRun::spawn(config);
        daemon.connected().await;
        guests.push(daemon);
    }
    Setup {
        kbs,
        admin,
        socket,
        _plugin: plugin,
        guests,
        dir,
    }
}

fn credential(state: &Path, bundle: &str) -> Option<Vec<u8>> {
    std::fs::read(state.join("credentials").join(bundle).join("credential")).ok()
}

async fn push(s: &Setup, body: &[u8]) -> Value {
    s.admin
        .send(
            reqwest::Method::POST,
            "/kbs/v0/external/credpush/push",
            Some(RequestBody::Bytes(body.to_vec())),
        )
        .await
        .unwrap()
}

async fn audit(s: &Setup, action: &str) -> Vec<Value> {
    let v = s
        .admin
        .send(
            reqwest::Method::GET,
            &format!("/kbs/v0/admin/audit?action={action}&limit=500"),
            None,
        )
        .await
        .unwrap();
    v["records"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn the_example_plugin_pushes_a_credential_to_every_guest_with_the_label() {
    let s = setup().await;
    let report = push(&s, b"s3cret-v1").await;
    assert_eq!(report["installed"], 2, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    let ids: Vec<&str> = report["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["guest_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["db-1", "db-2"]);
    for g in &s.guests[..2] {
        assert_eq!(
            credential(&g.state_dir, "db-creds").as_deref(),
            Some(&b"s3cret-v1"[..])
        );
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(g.state_dir.join("credentials/db-creds/credential")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    assert_eq!(
        credential(&s.guests[2].state_dir, "db-creds"),
        None,
        "web-1 is not app=db"
    );

    // A rotated credential replaces it; the report says which version each guest holds.
    let report = push(&s, b"s3cret-v2").await;
    assert_eq!(report["installed"], 2, "{report}");
    let version = report["version"].as_u64().unwrap();
    assert!(
        report["guests"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["version"] == version)
    );
    for g in &s.guests[..2] {
        assert_eq!(
            credential(&g.state_dir, "db-creds").as_deref(),
            Some(&b"s3cret-v2"[..])
        );
    }
    // The last report, from the plugin.
    let status = s
        .admin
        .send(
            reqwest::Method::GET,
            "/kbs/v0/external/credpush/status",
            None,
        )
        .await
        .unwrap();
    assert_eq!(status["version"], version);

    // The other source: a file the plugin watches.
    std::fs::write(s.dir.path().join("watched"), b"s3cret-v3").unwrap();
    tests::eventually("the watched credential on both db guests", || async {
        s.guests[..2]
            .iter()
            .all(|g| credential(&g.state_dir, "db-creds").as_deref() == Some(&b"s3cret-v3"[..]))
    })
    .await;

    // Each install is audited with the plugin as actor; the secret is nowhere in the log.
    // (A guest writes the file before the KBS has its answer: wait for the last records.)
    tests::eventually("six install records", || async {
        audit(&s, "external.guests.install_credentials").await.len() == 6
    })
    .await;
    let records = audit(&s, "external.guests.install_credentials").await;
    for r in &records {
        assert_eq!(r["actor"], "external/credpush", "{r}");
        assert_eq!(r["role"], "external-plugin", "{r}");
        assert_eq!(r["outcome"], "ok", "{r}");
        assert!(!r.to_string().contains("s3cret"), "{r}");
    }
    drop(s.kbs);
}

#[tokio::test]
async fn grants_tokens_policy_and_bounds_are_enforced() {
    let s = setup().await;
    let narrow_token = std::fs::read_to_string(s.dir.path().join("narrow.token")).unwrap();
    assert!(narrow_token.trim().len() >= 32, "generated");
    let full = client::connect(&s.socket, CREDPUSH_TOKEN).unwrap();
    let narrow = client::connect(&s.socket, &narrow_token).unwrap();

    // No token, a wrong one: UNAUTHENTICATED.
    let wrong = client::connect(&s.socket, &"x".repeat(48)).unwrap();
    let e = wrong
        .clone()
        .list_guests(ListGuestsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let anonymous = plugin_external::proto::tether_plugin_v1::guests_client::GuestsClient::new(
        client::channel(&s.socket).unwrap(),
    );
    let e = anonymous
        .clone()
        .list_guests(ListGuestsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // Each plugin sees the guests of its grant only, narrowed further by its selector.
    let names = |r: Vec<plugin_external::proto::tether_plugin_v1::Guest>| {
        r.into_iter().map(|g| g.guest_id).collect::<Vec<_>>()
    };
    let listed = full
        .clone()
        .list_guests(ListGuestsRequest::default())
        .await
        .unwrap();
    assert_eq!(names(listed.into_inner().guests), ["db-1", "db-2"]);
    let listed = narrow
        .clone()
        .list_guests(ListGuestsRequest::default())
        .await
        .unwrap();
    assert_eq!(names(listed.into_inner().guests), ["web-1"]);
    let listed = full
        .clone()
        .list_guests(ListGuestsRequest {
            selector: "app=web".into(),
        })
        .await
        .unwrap();
    assert!(
        listed.into_inner().guests.is_empty(),
        "never beyond the grant"
    );
    let e = full
        .clone()
        .list_guests(ListGuestsRequest {
            selector: "app in (".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Outside the grant: a guest beyond the selector, a call not granted, a bundle not granted.
    let ping = |guest: &str| PingRequest {
        guest_id: guest.into(),
        payload: b"hello".to_vec(),
        deadline_ms: 0,
    };
    let pong = narrow
        .clone()
        .ping(ping("web-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pong.payload, b"hello");
    let e = narrow.clone().ping(ping("db-1")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = full.clone().ping(ping("db-1")).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "ping is not granted to credpush"
    );
    let e = narrow.clone().ping(ping("nobody")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let install = |guest: &str, bundle: &str, contents: Vec<u8>| InstallCredentialsRequest {
        guest_id: guest.into(),
        bundle_id: bundle.into(),
        version: 1,
        files: vec![CredentialFile {
            name: "credential".into(),
            mode: 0o600,
            contents,
        }],
        not_after: 0,
        deadline_ms: 5000,
    };
    let e = full
        .clone()
        .install_credentials(install("db-1", "other", b"x".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = narrow
        .clone()
        .install_credentials(install("web-1", "db-creds", b"x".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Granted, but the policy refuses it to the guest (asked with the guest's claims).
    let e = full
        .clone()
        .install_credentials(install("db-1", "forbidden", b"x".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("policy"), "{e:?}");
    assert_eq!(credential(&s.guests[0].state_dir, "forbidden"), None);
    // Denials are audited under the plugin's name.
    let denied: Vec<Value> = audit(&s, "external.guests.*")
        .await
        .into_iter()
        .filter(|r| r["outcome"] == "denied")
        .collect();
    assert!(
        denied.iter().any(|r| r["actor"] == "external/narrow"
            && r["action"] == "external.guests.install_credentials"),
        "{denied:?}"
    );
    assert!(
        denied
            .iter()
            .any(|r| r["actor"] == "external/credpush" && r["target"] == "db-1"),
        "{denied:?}"
    );

    // A stored resource version, pushed as the resource policy allows; not one outside the grant.
    s.admin
        .put_resource("default/db/password", b"pw-1".to_vec())
        .await
        .unwrap();
    let applied = full
        .clone()
        .apply_resource(ApplyResourceRequest {
            guest_id: "db-2".into(),
            path: "default/db/password".into(),
            version: 0,
            deadline_ms: 5000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((applied.version, applied.already_held), (1, false));
    assert_eq!(
        s.guests[1].held("default/db/password").as_deref(),
        Some(&b"pw-1"[..])
    );
    let e = full
        .clone()
        .apply_resource(ApplyResourceRequest {
            guest_id: "db-2".into(),
            path: "default/web/password".into(),
            version: 0,
            deadline_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let report = full
        .clone()
        .probe(ProbeRequest {
            guest_id: "db-2".into(),
            kind: "resources".into(),
            deadline_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let report: Value = serde_json::from_str(&report.report_json).unwrap();
    assert_eq!(
        report["resources"][0]["uri"], "default/db/password",
        "{report}"
    );

    // More than the listener's message size: refused, nothing installed.
    let e = full
        .clone()
        .install_credentials(install("db-1", "db-creds", vec![7u8; 100_000]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("65536"), "{e:?}");
    assert_eq!(credential(&s.guests[0].state_dir, "db-creds"), None);

    // A flood from `narrow` (two calls at once granted): the excess is refused at once, the
    // rest served, and the other plugin and the KBS's own API do not notice.
    let flood: Vec<_> = (0..200)
        .map(|_| {
            let mut c = narrow.clone();
            tokio::spawn(async move { c.ping(ping("web-1")).await.map(|_| ()) })
        })
        .collect();
    let during = full.clone().list_guests(ListGuestsRequest::default()).await;
    let mut ok = 0;
    let mut busy = 0;
    for f in flood {
        match f.await.unwrap() {
            Ok(()) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => busy += 1,
            Err(e) => panic!("flood call: {e:?}"),
        }
    }
    assert!(ok > 0 && busy > 0, "ok {ok}, busy {busy}");
    assert_eq!(ok + busy, 200);
    assert!(during.is_ok(), "{during:?}");
    let health = reqwest::get(format!("{}/readyz", s.kbs.announced))
        .await
        .unwrap();
    assert!(health.status().is_success());
    // Refused calls are counted, not audited one by one.
    let metrics = reqwest::get(format!("{}/metrics", s.kbs.announced))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kbs_guests_api_calls_total")
                && l.contains("plugin=\"external/narrow\"")
                && l.contains("outcome=\"busy\"")),
        "{metrics}"
    );

    // Disabled: its calls stop; enabled again: they work.
    s.admin
        .set_plugin_enabled("external/narrow", false)
        .await
        .unwrap();
    let e = narrow.clone().ping(ping("web-1")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    s.admin
        .set_plugin_enabled("external/narrow", true)
        .await
        .unwrap();
    narrow.clone().ping(ping("web-1")).await.unwrap();

    // A rotated token: the old one is refused from now on, the new one is in the file.
    s.admin
        .configure_plugin("external/narrow", json!({"rotate_token": true}))
        .await
        .unwrap();
    let e = narrow.clone().ping(ping("web-1")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let rotated = std::fs::read_to_string(s.dir.path().join("narrow.token")).unwrap();
    assert_ne!(rotated, narrow_token);
    let narrow = client::connect(&s.socket, &rotated).unwrap();
    narrow.clone().ping(ping("web-1")).await.unwrap();

    // A guest that never answers costs the caller the deadline it asked for, nothing more.
    let key = guest_daemon::tee_key::TeeKeyPair::new_ec();
    let token = tests::attest(
        &s.kbs.announced,
        None,
        &key,
        Some(&init_data("db-hung", &[("app", "db")])),
    )
    .await
    .unwrap();
    let hung = tests::StubGuest::new().on_install(|_| std::future::pending());
    let _guest = tests::TunnelGuest::dial(
        &tunnel::GuestTunnelConfig::new(tests::tunnel_url(&s.kbs.announced)),
        &token,
        tests::guest_info("hung", "test", &[]),
        &key,
        hung,
    )
    .await
    .unwrap();
    tests::eventually("db-hung listed", || async {
        let listed = full.clone().list_guests(ListGuestsRequest::default()).await;
        listed.is_ok_and(|r| {
            r.into_inner()
                .guests
                .iter()
                .any(|g| g.guest_id == "db-hung")
        })
    })
    .await;
    let started = std::time::Instant::now();
    let mut request = install("db-hung", "db-creds", b"x".to_vec());
    request.deadline_ms = 300;
    let e = full.clone().install_credentials(request).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Meanwhile and after, the others are served.
    full.clone()
        .list_guests(ListGuestsRequest::default())
        .await
        .unwrap();

    // The listing shows the grants, never a token.
    let plugins = s.admin.list_plugins().await.unwrap();
    let text = plugins.to_string();
    assert!(!text.contains(rotated.trim()) && !text.contains(CREDPUSH_TOKEN));
    let me = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "external/narrow")
        .unwrap();
    assert_eq!(me["settings"]["guests"]["selector"], "app=web", "{me}");
    let api = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "guests-api")
        .unwrap();
    assert_eq!(api["settings"]["listen"], s.socket.as_str(), "{api}");
}
