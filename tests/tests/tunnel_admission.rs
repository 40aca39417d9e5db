#![allow(clippy::unwrap_used)]
//! Who may hold a tunnel, and what a tunnel may change before it is proven (issue 17,
//! defect 5): the resource policy is asked (`data.plugin == "tunnel"`) before the upgrade;
//! nothing about a guest (its directory record, its fleet record, its live tunnel) changes
//! until the dialler proved possession of the token's TEE key; and two TEE keys taking turns
//! on one guest id show up in the event log and a metric.

use guest_daemon::tee_key::TeeKeyPair;
use kbs_core::storage::EventQuery;
use reqwest::StatusCode;
use rpc_defs::GuestInfo;
use tests::{
    ALLOW_SAMPLE, StubGuest, TestKbs, TunnelGuest, WAIT, error_detail, eventually, healthy,
};
use tunnel::ConnectError;

const G1: &str = "[tether]\nguest_id = \"g1\"\n\n[tether.labels]\napp = \"db\"\n";

fn info() -> GuestInfo {
    tests::guest_info("instance-1", "test-0.1", &["resources"])
}

fn stub() -> StubGuest {
    StubGuest::new()
        .refusing_bundles()
        .refusing_pushes()
        .on_probe(|_| async {
            Ok(rpc_defs::ProbeReport {
                health: Some(healthy()),
                ..Default::default()
            })
        })
}

async fn start() -> TestKbs {
    let kbs = TestKbs::start().await;
    kbs.admin().set_policy(ALLOW_SAMPLE).await.unwrap();
    kbs
}

async fn dial(kbs: &TestKbs, token: &str, key: &TeeKeyPair) -> Result<TunnelGuest, ConnectError> {
    TunnelGuest::dial(&kbs.tunnel_config(), token, info(), key, stub()).await
}

fn jwk_x(key: &kbs_types::TeePubKey) -> String {
    match key {
        kbs_types::TeePubKey::EC { x, .. } => x.clone(),
        other => panic!("not an EC key: {other:?}"),
    }
}

#[tokio::test]
async fn a_token_naming_another_guest_changes_nothing_before_its_proof() {
    let kbs = start().await;
    let owner_key = TeeKeyPair::new_ec();
    let owner_token = kbs.attest(&owner_key, Some(G1)).await;
    let owner = dial(&kbs, &owner_token, &owner_key).await.unwrap();
    let owner_epoch = kbs.tunnel("g1").await.epoch;
    let recorded = kbs.state.directory.get("g1").expect("g1 recorded");
    assert_eq!(
        jwk_x(&recorded.tee_pubkey),
        jwk_x(&owner_key.export_pubkey())
    );
    eventually("g1 in the fleet view", || async {
        kbs.state.fleet.get("g1").is_some_and(|r| r.connected)
    })
    .await;
    let fleet_before = kbs.state.fleet.get("g1").unwrap();

    // Someone else attests a key of its own with init-data claiming g1, and dials with that
    // token; the challenge is sealed to its key, but it never answers (here: it holds a key
    // other than the token's, so it cannot open the challenge; the same as sending nothing).
    let intruder_key = TeeKeyPair::new_ec();
    let intruder_token = kbs.attest(&intruder_key, Some(G1)).await;
    let err = dial(&kbs, &intruder_token, &TeeKeyPair::new_ec())
        .await
        .err()
        .expect("no proof, no tunnel");
    assert!(matches!(err, ConnectError::Handshake(_)), "{err}");

    // g1's record still holds the owner's key and claims; its tunnel and fleet record are
    // untouched.
    let after = kbs.state.directory.get("g1").expect("g1 still recorded");
    assert_eq!(
        jwk_x(&after.tee_pubkey),
        jwk_x(&owner_key.export_pubkey()),
        "an unproven upgrade replaced the guest's TEE key"
    );
    assert_eq!(after.iat, recorded.iat);
    assert_eq!(kbs.state.hub.get("g1").map(|h| h.epoch), Some(owner_epoch));
    let fleet_after = kbs.state.fleet.get("g1").unwrap();
    assert_eq!(fleet_after.attested_at, fleet_before.attested_at);
    assert_eq!(fleet_after.history.len(), fleet_before.history.len());
    assert!(!owner.session.is_closed());
}

#[tokio::test]
async fn the_policy_decides_who_may_hold_a_tunnel_before_the_upgrade() {
    // The default policy refuses the sample TEE everything, tunnels included.
    let kbs = TestKbs::start().await;
    let key = TeeKeyPair::new_ec();
    let token = kbs.attest(&key, Some(G1)).await;
    let err = dial(&kbs, &token, &key).await.err().expect("refused");
    assert!(
        matches!(err, ConnectError::Http { status: 403 }),
        "refused before the upgrade with 403: {err}"
    );
    // The HTTP answer is the JSON error body, before any WebSocket upgrade.
    let resp = kbs
        .http()
        .get(format!("{}/kbs/v0/tunnel", kbs.url))
        .bearer_auth(&token)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-protocol", "tether.v2, tether.v1")
        .send()
        .await
        .unwrap();
    let (status, name, detail) = error_detail(resp).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::FORBIDDEN, "PolicyDeny")
    );
    assert!(detail.contains("tunnel"), "{detail}");
    assert!(kbs.state.hub.is_empty());
    assert!(kbs.state.directory.get("g1").is_none());
    assert_eq!(
        kbs.metric(
            "kbs_policy_decisions_total",
            &[("plugin", "tunnel"), ("decision", "deny")]
        )
        .await,
        2.0
    );
    assert_eq!(
        kbs.metric("kbs_tunnel_handshakes_total", &[("outcome", "policy_deny")])
            .await,
        2.0
    );

    // A policy that names the tunnel lets it through; one that allows only resources does not.
    let admin = kbs.admin();
    admin
        .set_policy(
            "package policy\nimport rego.v1\ndefault allow := false\n\
             allow if { data.plugin == \"tunnel\"; input.tether.guest_id == \"g1\" }\n",
        )
        .await
        .unwrap();
    let guest = dial(&kbs, &token, &key).await.expect("allowed");
    assert_eq!(guest.session.guest_id(), "g1");
    let other = TeeKeyPair::new_ec();
    let other_token = kbs
        .attest(&other, Some("[tether]\nguest_id = \"g2\"\n"))
        .await;
    let err = dial(&kbs, &other_token, &other).await.err().expect("g2");
    assert!(matches!(err, ConnectError::Http { status: 403 }), "{err}");
}

#[tokio::test]
async fn two_tee_keys_taking_turns_on_one_guest_id_are_an_event_and_a_metric() {
    let kbs = start().await;
    let first_key = TeeKeyPair::new_ec();
    let first_token = kbs.attest(&first_key, Some(G1)).await;
    let first = dial(&kbs, &first_token, &first_key).await.unwrap();
    let second_key = TeeKeyPair::new_ec();
    let second_token = kbs.attest(&second_key, Some(G1)).await;
    let second = dial(&kbs, &second_token, &second_key).await.unwrap();
    assert_eq!(first.closed().await.close.code, 4409);
    let recorded = kbs.state.directory.get("g1").unwrap();
    assert_eq!(
        jwk_x(&recorded.tee_pubkey),
        jwk_x(&second_key.export_pubkey())
    );
    // The same key again (a reconnect) is no change.
    second.leave().await;
    let again = dial(&kbs, &second_token, &second_key).await.unwrap();

    eventually("the key change counted", || async {
        kbs.metric(
            "kbs_tunnel_tee_key_changes_total",
            &[("previous", "connected")],
        )
        .await
            == 1.0
    })
    .await;
    assert_eq!(
        kbs.metric("kbs_tunnel_tee_key_changes_total", &[]).await,
        1.0
    );
    assert!(kbs.state.events.flush(WAIT).await);
    let events = kbs
        .state
        .store
        .list_events(&EventQuery {
            guest_id: Some("g1".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let changes: Vec<_> = events
        .iter()
        .filter(|e| e.event.action == "tunnel.tee_key_changed")
        .collect();
    assert_eq!(changes.len(), 1, "{events:?}");
    assert_eq!(changes[0].event.outcome, "conflict");
    assert!(
        changes[0].event.detail.contains("while its tunnel was up"),
        "{}",
        changes[0].event.detail
    );
    again.leave().await;
}
