#![allow(clippy::unwrap_used)]
//! The reverse tunnel end to end: a real KBS, guests that attest with the sample TEE and
//! dial `/kbs/v0/tunnel` with the tunnel crate's guest side, and the admin API that lists,
//! pings and probes them. Waits are on events or short bounded polls, never long sleeps.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use guest_daemon::tee_key::TeeKeyPair;
use reqwest::StatusCode;
use rpc_defs::{GuestError, GuestInfo, HeldResource, ProbeKind, ProbeReport};
use serde_json::Value;
use tests::{
    StubGuest, TestKbs, TunnelGuest, WAIT, api_err_detail, error_name, eventually, healthy,
    http_and_tls, metric_value,
};
use tunnel::handshake::HandshakeError;
use tunnel::{ConnectError, ReauthError};

const G1: &str = "[tether]\nguest_id = \"g1\"\n\n[tether.labels]\napp = \"db\"\n";

/// Reports a healthy guest holding one resource, refuses runtime probes and pushes, and never
/// answers a resources-only probe (for deadlines).
fn test_guest() -> StubGuest {
    StubGuest::new()
        .refusing_bundles()
        .refusing_pushes()
        .on_probe(|kind| async move {
            match kind {
                ProbeKind::Health => Ok(ProbeReport {
                    health: Some(healthy()),
                    ..ProbeReport::default()
                }),
                ProbeKind::All => Ok(ProbeReport {
                    health: Some(healthy()),
                    resources: Some(vec![HeldResource {
                        uri: "default/key/one".into(),
                        version: 3,
                        sha256: "ab".repeat(32),
                        applied_at: 1_700_000_000,
                    }]),
                    runtime: None,
                }),
                ProbeKind::Runtime => Err(GuestError::Unsupported("runtime figures".into())),
                ProbeKind::Resources => std::future::pending().await,
            }
        })
}

fn guest_info() -> GuestInfo {
    tests::guest_info("instance-1", "test-0.1", &["resources"])
}

/// Opens a tunnel with `token`, answering the challenge with `key`.
async fn dial(kbs: &TestKbs, token: &str, key: &TeeKeyPair) -> Result<TunnelGuest, ConnectError> {
    TunnelGuest::dial(&kbs.tunnel_config(), token, guest_info(), key, test_guest()).await
}

/// Attests with `init_data` and a fresh key, and connects.
async fn connect(kbs: &TestKbs, init_data: Option<&str>) -> (TunnelGuest, TeeKeyPair, String) {
    TunnelGuest::attest_and_dial(kbs, init_data, guest_info(), test_guest()).await
}

/// The same claims as `token`, signed by a key this KBS does not know.
fn forge(token: &str) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let claims: serde_json::Map<String, Value> =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    kbs_core::token::TokenSigner::ephemeral()
        .unwrap()
        .issue(claims, Duration::from_secs(300))
        .unwrap()
}

#[tokio::test]
async fn tokens_are_checked_before_the_upgrade() {
    let kbs = TestKbs::start_dev().await;
    let http = kbs.http();
    let url = format!("{}/kbs/v0/tunnel", kbs.url);

    // No token at all: a JSON 401, no upgrade.
    let resp = http.get(&url).send().await.unwrap();
    let (status, name) = error_name(resp).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::UNAUTHORIZED, "Unauthenticated")
    );

    // The guest side sees the 401 as an HTTP error that calls for a fresh attestation.
    let key = TeeKeyPair::new_ec();
    let token = kbs.attest(&key, Some(G1)).await;
    let forged = forge(&token);
    let err = dial(&kbs, &forged, &key)
        .await
        .err()
        .expect("forged token refused");
    assert!(matches!(err, ConnectError::Http { status: 401 }), "{err}");
    assert!(err.needs_reattest());
    let err = dial(&kbs, "not-a-token", &key)
        .await
        .err()
        .expect("garbage refused");
    assert!(matches!(err, ConnectError::Http { status: 401 }), "{err}");

    // A valid token but no WebSocket upgrade, or no `tether.v1` subprotocol: 4xx, no upgrade.
    let resp = http.get(&url).bearer_auth(&token).send().await.unwrap();
    let (status, name) = error_name(resp).await;
    assert!(status.is_client_error(), "{status}");
    assert_eq!(name, "WebSocketUpgradeRequired");
    let resp = http
        .get(&url)
        .bearer_auth(&token)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    let (status, name) = error_name(resp).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::BAD_REQUEST, "SubprotocolRequired")
    );

    assert!(kbs.state.hub.is_empty());
    let m = kbs.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "kbs_tunnel_handshakes_total",
            &[("outcome", "unauthorized")]
        ),
        3.0
    );
    assert_eq!(
        metric_value(&m, "kbs_tunnel_handshakes_total", &[("outcome", "ok")]),
        0.0
    );
}

#[tokio::test]
async fn a_guest_that_cannot_prove_its_tee_key_is_refused_with_4401() {
    let kbs = TestKbs::start_dev().await;
    let key = TeeKeyPair::new_ec();
    let token = kbs.attest(&key, Some(G1)).await;

    // Holding the token but not its TEE key: the challenge does not open, the guest gives up
    // with 4401 itself.
    let err = dial(&kbs, &token, &TeeKeyPair::new_ec())
        .await
        .err()
        .expect("wrong key cannot unseal");
    assert!(
        matches!(&err, ConnectError::Handshake(HandshakeError::Unseal(_))),
        "{err}"
    );

    // Answering with made-up bytes instead: the KBS rejects the proof and closes with 4401.
    let err = tunnel::connect_and_serve(
        &kbs.tunnel_config(),
        &token,
        guest_info(),
        |_: &[u8]| Ok(vec![7u8; 32]),
        test_guest(),
    )
    .await
    .err()
    .expect("a wrong proof is not welcomed");
    assert!(err.needs_reattest(), "{err}");
    let code = match &err {
        ConnectError::Handshake(HandshakeError::Rejected { code, .. })
        | ConnectError::Closed { code, .. } => *code,
        other => panic!("unexpected error {other}"),
    };
    assert_eq!(code, 4401);

    assert!(kbs.state.hub.is_empty());
    let admin = kbs.admin();
    assert!(admin.list_guests().await.unwrap().is_empty());
    eventually("bad_proof counted", || async {
        kbs.metric("kbs_tunnel_handshakes_total", &[("outcome", "bad_proof")])
            .await
            == 1.0
    })
    .await;
    assert_eq!(kbs.metric("kbs_tunnels_connected", &[]).await, 0.0);
}

http_and_tls!(
    dev a_connected_guest_is_listed_pinged_and_probed,
    |kbs: TestKbs| async move {
        let admin = kbs.admin();
        let (guest, _key, _token) = connect(&kbs, Some(G1)).await;
        assert_eq!(guest.session.guest_id(), "g1");

        // Listed with the identity and labels from its attested init-data.
        let admin_ref = &admin;
        eventually("g1 listed", || async move {
            admin_ref.list_guests().await.unwrap().len() == 1
        })
        .await;
        let listed = admin.list_guests().await.unwrap();
        let g = &listed[0];
        assert_eq!(g.guest_id, "g1");
        assert_eq!(g.labels.get("app").map(String::as_str), Some("db"));
        assert_eq!(g.labels.len(), 1);
        assert_eq!(g.instance, "instance-1");
        assert_eq!(g.daemon_version, "test-0.1");
        assert_eq!(g.services, ["resources"]);
        assert_eq!(g.session_id, guest.session.session_id());
        assert!(!g.replica.is_empty());
        let now_ms = tests::unix_ms();
        assert!(g.connected_since <= now_ms && g.connected_since + 60_000 > now_ms);
        assert!(g.last_seen >= g.connected_since);
        let kbs_ref = &kbs;
        eventually("gauge at 1", || async move {
            kbs_ref.metric("kbs_tunnels_connected", &[]).await == 1.0
        })
        .await;
        assert_eq!(
            kbs.metric("kbs_tunnel_handshakes_total", &[("outcome", "ok")])
                .await,
            1.0
        );

        // The raw listing is the documented JSON shape.
        let raw = admin
            .send(reqwest::Method::GET, "/kbs/v0/admin/guests", None)
            .await
            .unwrap();
        for field in [
            "guest_id",
            "labels",
            "instance",
            "daemon_version",
            "services",
            "session_id",
            "connected_since",
            "replica",
            "last_seen",
        ] {
            assert!(!raw["guests"][0][field].is_null(), "{field} in {raw}");
        }

        // Ping and probe through the tunnel.
        let rtt = admin.ping_guest("g1").await.unwrap();
        assert!(rtt > 0 && rtt < 10_000_000, "rtt {rtt} us");
        let all = admin.probe_guest("g1", ProbeKind::All).await.unwrap();
        assert_eq!(all.health.map(|h| h.healthy), Some(true));
        assert_eq!(all.resources.unwrap()[0].version, 3);
        let raw = admin
            .send(reqwest::Method::POST, "/kbs/v0/admin/guests/g1/probe", None)
            .await
            .unwrap();
        assert_eq!(raw["health"]["healthy"], true, "no body means all: {raw}");
        let health = admin.probe_guest("g1", ProbeKind::Health).await.unwrap();
        assert!(health.health.is_some() && health.resources.is_none());

        // Guest errors, unknown guests and bad bodies.
        let (status, name, detail) = api_err_detail(
            admin
                .probe_guest("g1", ProbeKind::Runtime)
                .await
                .unwrap_err(),
        );
        assert_eq!(
            (status, name.as_str()),
            (StatusCode::BAD_GATEWAY, "GuestError")
        );
        assert!(detail.contains("runtime figures"), "{detail}");
        let (status, name, _) = api_err_detail(admin.ping_guest("nobody").await.unwrap_err());
        assert_eq!(
            (status, name.as_str()),
            (StatusCode::NOT_FOUND, "GuestNotConnected")
        );
        let (status, name, _) = api_err_detail(
            admin
                .send(
                    reqwest::Method::POST,
                    "/kbs/v0/admin/guests/g1/probe",
                    Some(server::admin_client::RequestBody::Json(
                        serde_json::json!({"kind": "everything"}),
                    )),
                )
                .await
                .unwrap_err(),
        );
        assert_eq!(
            (status, name.as_str()),
            (StatusCode::BAD_REQUEST, "MalformedRequest")
        );

        // The admin endpoints need an admin token.
        let resp = kbs
            .http()
            .get(format!("{}/kbs/v0/admin/guests", kbs.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

        // Counted and audited.
        let m = kbs.metrics().await;
        assert_eq!(
            metric_value(
                &m,
                "kbs_rpc_calls_total",
                &[("method", "ping"), ("outcome", "ok")]
            ),
            1.0
        );
        assert_eq!(
            metric_value(
                &m,
                "kbs_rpc_calls_total",
                &[("method", "probe"), ("outcome", "guest_error")]
            ),
            1.0
        );
        assert_eq!(
            metric_value(&m, "kbs_rpc_duration_seconds_count", &[("method", "probe")]),
            4.0
        );
        let audit = admin
            .send(
                reqwest::Method::GET,
                "/kbs/v0/admin/audit?action=guest.*",
                None,
            )
            .await
            .unwrap();
        let records = audit["records"].as_array().unwrap();
        let outcomes: Vec<(&str, &str)> = records
            .iter()
            .map(|r| {
                (
                    r["action"].as_str().unwrap(),
                    r["outcome"].as_str().unwrap(),
                )
            })
            .collect();
        assert!(outcomes.contains(&("guest.ping", "ok")), "{outcomes:?}");
        assert!(
            outcomes.contains(&("guest.ping", "GuestNotConnected")),
            "{outcomes:?}"
        );
        assert!(
            outcomes.contains(&("guest.probe", "GuestError")),
            "{outcomes:?}"
        );

        // The guest leaves: gone from the list, gauge back to 0, close code counted.
        guest.session.close();
        let closed = guest.closed().await;
        assert_eq!(closed.close.code, 1000);
        eventually("g1 gone", || async move {
            admin_ref.list_guests().await.unwrap().is_empty()
        })
        .await;
        eventually("gauge at 0", || async move {
            kbs_ref.metric("kbs_tunnels_connected", &[]).await == 0.0
        })
        .await;
        assert_eq!(
            kbs.metric("kbs_tunnel_disconnects_total", &[("code", "1000")])
                .await,
            1.0
        );
        let (status, name, _) = api_err_detail(admin.ping_guest("g1").await.unwrap_err());
        assert_eq!(
            (status, name.as_str()),
            (StatusCode::NOT_FOUND, "GuestNotConnected")
        );
    }
);

#[tokio::test]
async fn a_guest_that_does_not_answer_in_time_is_a_504() {
    let kbs = TestKbs::start_with(false, |c| {
        tests::allow_sample(c);
        c.tunnel.call_deadline = Duration::from_millis(300);
    })
    .await;
    let admin = kbs.admin();
    let (guest, _key, _token) = connect(&kbs, Some(G1)).await;
    let (status, name, _) = api_err_detail(
        admin
            .probe_guest("g1", ProbeKind::Resources)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "GuestTimeout")
    );
    assert_eq!(
        kbs.metric(
            "kbs_rpc_calls_total",
            &[("method", "probe"), ("outcome", "deadline_exceeded")]
        )
        .await,
        1.0
    );
    // The tunnel survives a slow call.
    assert!(admin.ping_guest("g1").await.is_ok());
    assert!(!guest.session.is_closed());
}

#[tokio::test]
async fn without_init_data_the_guest_id_comes_from_the_tee_key() {
    let kbs = TestKbs::start_dev().await;
    let (guest, _key, _token) = connect(&kbs, None).await;
    let id = guest.session.guest_id().to_string();
    assert!(id.starts_with("tee-"), "{id}");
    let listed = kbs.admin().list_guests().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].guest_id, id);
    assert!(listed[0].labels.is_empty());
    assert!(kbs.admin().ping_guest(&id).await.is_ok());
}

#[tokio::test]
async fn a_second_tunnel_for_the_same_guest_supersedes_the_first() {
    let kbs = TestKbs::start_dev().await;
    let admin = kbs.admin();
    let (first, _, _) = connect(&kbs, Some(G1)).await;
    // Another daemon (another TEE key) attested with the same init-data identity.
    let (second, _, _) = connect(&kbs, Some(G1)).await;
    assert_ne!(first.session.session_id(), second.session.session_id());

    let closed = first.closed().await;
    assert_eq!(closed.close.code, 4409, "{closed:?}");

    let listed = admin.list_guests().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].session_id, second.session.session_id());
    let kbs_ref = &kbs;
    eventually("gauge back at 1", || async move {
        kbs_ref.metric("kbs_tunnels_connected", &[]).await == 1.0
    })
    .await;
    assert_eq!(
        kbs.metric("kbs_tunnel_disconnects_total", &[("code", "4409")])
            .await,
        1.0
    );
    // Calls go to the new tunnel.
    assert!(admin.ping_guest("g1").await.is_ok());
    assert!(!second.session.is_closed());
}

#[tokio::test]
async fn reauth_in_band_needs_the_same_tee_key_and_guest() {
    let kbs = TestKbs::start_dev().await;
    let (guest, key, token) = connect(&kbs, Some(G1)).await;
    let exp = guest.session.reauth_before();
    assert_eq!(Some(exp), guest_daemon::rcar::jwt_expiry(&token));

    // A fresh token for the same key and guest: accepted, the tunnel stays up.
    let fresh = kbs.attest(&key, Some(G1)).await;
    let new_exp = tokio::time::timeout(WAIT, guest.session.reauth(fresh))
        .await
        .unwrap()
        .unwrap();
    assert!(new_exp >= exp);
    assert_eq!(guest.session.reauth_before(), new_exp);
    assert!(kbs.admin().ping_guest("g1").await.is_ok());

    // A valid token for the same guest id but another TEE key: closed with 4401.
    let other = kbs.attest(&TeeKeyPair::new_ec(), Some(G1)).await;
    let err = tokio::time::timeout(WAIT, guest.session.reauth(other))
        .await
        .unwrap()
        .unwrap_err();
    match err {
        ReauthError::Closed(closed) => assert_eq!(closed.close.code, 4401, "{closed:?}"),
        other => panic!("expected a 4401 close, got {other}"),
    }
    assert_eq!(guest.closed().await.close.code, 4401);

    // The same key but another guest id (other init-data): closed with 4401 too.
    let (guest, key, _) = connect(&kbs, Some(G1)).await;
    let renamed = kbs
        .attest(&key, Some("[tether]\nguest_id = \"g2\"\n"))
        .await;
    let err = tokio::time::timeout(WAIT, guest.session.reauth(renamed))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, ReauthError::Closed(c) if c.close.code == 4401),
        "{err}"
    );
    let kbs_ref = &kbs;
    eventually("two 4401 disconnects", || async move {
        kbs_ref
            .metric("kbs_tunnel_disconnects_total", &[("code", "4401")])
            .await
            == 2.0
    })
    .await;
}

http_and_tls!(
    dev kbs_shutdown_sends_goaway_then_4503,
    |kbs: TestKbs| async move {
        let hub = kbs.state.hub.clone();
        let (a, _, _) = connect(&kbs, Some(G1)).await;
        let (b, _, _) = connect(&kbs, None).await;
        assert_eq!(hub.len(), 2);

        let started = std::time::Instant::now();
        kbs.stop().await;
        // Stopping waited for the tunnels to drain, well inside the grace period.
        assert!(hub.is_empty(), "hub still holds {hub:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        for guest in [a, b] {
            let closed = guest.closed().await;
            assert_eq!(closed.close.code, 4503, "{closed:?}");
            assert!(closed.close.by_peer);
            let after = closed.reconnect_after.expect("GoAway before the close");
            assert!(after >= Duration::from_secs(1) && after <= Duration::from_secs(2));
        }
    }
);
