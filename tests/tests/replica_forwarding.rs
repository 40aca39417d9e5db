//! Tunnels across replicas (issue 19, part 3): three real `kbs` processes on one PostgreSQL
//! database, real guest daemons connected to one of them, admin calls through another. The
//! call is forwarded to the replica holding the tunnel over the authenticated internal hop;
//! a guest that moves is found at its new place; a dead owner gives a clear error at once;
//! a forged hop is refused.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use guest_daemon::run::RunConfig;
use guest_daemon::splitapi::{SplitApiConfig, SplitApiStatus};
use rpc_defs::ProbeKind;
use server::admin_client::ClientError;
use tests::{DaemonRun, Replicas, init_data};

const WAIT: Duration = Duration::from_secs(20);

async fn three(test: &str) -> Option<Replicas> {
    let db = tests::pg_database(test).await?;
    Some(Replicas::start(3, &db.url).await)
}

/// A guest daemon connected to replica `i` only.
fn daemon_on(replicas: &Replicas, i: usize, guest: &str, state: &std::path::Path) -> DaemonRun {
    let mut config = RunConfig::new(replicas.url(i), state);
    config.init_data = Some(init_data(guest, &[("app", "fwd")]));
    DaemonRun::spawn(config)
}

/// Waits until replica `i` lists `guest` as connected (its own tunnel).
async fn held_by(replicas: &Replicas, i: usize, guest: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(guests) = replicas.admin(i).list_guests().await
            && guests.iter().any(|g| g.guest_id == guest && g.connected)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{guest} never connected to replica {i}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first ping through replica `via` that succeeds (the registry write follows the
/// tunnel by a moment), or the last error after `WAIT`.
async fn ping_through(replicas: &Replicas, via: usize, guest: &str) -> Result<u64, ClientError> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match replicas.admin(via).ping_guest(guest).await {
            Ok(rtt) => return Ok(rtt),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn status_of(e: &ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, name, .. } => (status.as_u16(), name.clone()),
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn a_guest_on_one_replica_is_pinged_and_probed_through_another_and_found_after_it_moves() {
    let Some(mut replicas) = three(
        "a_guest_on_one_replica_is_pinged_and_probed_through_another_and_found_after_it_moves",
    )
    .await
    else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut daemon = daemon_on(&replicas, 1, "fwd-guest", state.path());
    daemon.connected().await;
    held_by(&replicas, 1, "fwd-guest").await;

    // Through replica 0 (A), which holds no tunnel of it.
    let rtt = ping_through(&replicas, 0, "fwd-guest").await.unwrap();
    assert!(rtt < 5_000_000, "{rtt}");
    let report = replicas
        .admin(0)
        .probe_guest("fwd-guest", ProbeKind::Health)
        .await
        .unwrap();
    assert!(report.health.is_some(), "{report:?}");
    let probes = replicas
        .admin(0)
        .send(reqwest::Method::POST, "/kbs/v0/probes/fwd-guest", None)
        .await
        .unwrap();
    assert_eq!(probes["outcome"], "ok", "{probes}");

    // The audit trail names the admin and the replica that forwarded.
    let audit = replicas
        .admin(0)
        .send(reqwest::Method::GET, "/kbs/v0/admin/audit?limit=50", None)
        .await
        .unwrap();
    let text = audit.to_string();
    assert!(
        text.contains("guest.ping") && text.contains("via replica"),
        "{text}"
    );

    // The guest moves to replica 2 (C); B is killed so that only C can answer.
    daemon.stop().await;
    let mut moved = daemon_on(&replicas, 2, "fwd-guest", state.path());
    moved.connected().await;
    held_by(&replicas, 2, "fwd-guest").await;
    replicas.kill_9(1).await;
    let rtt = ping_through(&replicas, 0, "fwd-guest").await.unwrap();
    assert!(rtt < 5_000_000, "{rtt}");
    moved.stop().await;
}

#[tokio::test]
async fn a_killed_owner_replica_gives_a_clear_error_at_once() {
    let Some(mut replicas) = three("a_killed_owner_replica_gives_a_clear_error_at_once").await
    else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut daemon = daemon_on(&replicas, 1, "fwd-dead", state.path());
    daemon.connected().await;
    held_by(&replicas, 1, "fwd-dead").await;
    ping_through(&replicas, 0, "fwd-dead").await.unwrap();

    replicas.kill_9(1).await;
    let started = std::time::Instant::now();
    let err = replicas.admin(0).ping_guest("fwd-dead").await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(6), "took {elapsed:?}");
    let (status, name) = status_of(&err);
    assert_eq!(
        (status, name.as_str()),
        (502, "GuestOwnerUnreachable"),
        "{err}"
    );
    let err = replicas
        .admin(2)
        .probe_guest("fwd-dead", ProbeKind::All)
        .await
        .unwrap_err();
    assert_eq!(status_of(&err).0, 502, "{err}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_forged_or_misplaced_hop_is_refused() {
    let Some(replicas) = three("a_forged_or_misplaced_hop_is_refused").await else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut daemon = daemon_on(&replicas, 1, "fwd-forged", state.path());
    daemon.connected().await;
    held_by(&replicas, 1, "fwd-forged").await;
    ping_through(&replicas, 0, "fwd-forged").await.unwrap();

    let http = reqwest::Client::new();
    let token = replicas.admin(1).token().unwrap();
    let at = kbs_core::storage::now_ms();
    let forged = format!(
        "v1;from=evil;guest=fwd-forged;epoch=1;at={at};nonce=00ff;mac=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    );
    for (path, hop) in [
        ("/kbs/v0/admin/guests/fwd-forged/ping", forged.as_str()),
        ("/kbs/v0/admin/guests/fwd-forged/ping", "v1;nonsense"),
        // A hop on a route that is never forwarded.
        ("/kbs/v0/admin/guests", forged.as_str()),
    ] {
        let method = if path.ends_with("ping") {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let resp = http
            .request(method, format!("{}{path}", replicas.url(1)))
            .bearer_auth(&token)
            .header("x-tether-replica-hop", hop)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(matches!(status, 401 | 403), "{path} {hop}: {status} {body}");
        assert!(
            body["type"]
                .as_str()
                .unwrap()
                .ends_with("ReplicaHopRefused"),
            "{body}"
        );
    }
    daemon.stop().await;
}

#[tokio::test]
async fn the_splitapi_owner_fetches_credentials_through_any_replica() {
    let Some(replicas) = three("the_splitapi_owner_fetches_credentials_through_any_replica").await
    else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut config = RunConfig::new(replicas.url(1), state.path());
    config.init_data = Some(init_data("fwd-sa", &[]));
    config.splitapi = Some(SplitApiConfig::new(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        0,
    ))));
    let mut status = config.subscribe_splitapi();
    let mut daemon = DaemonRun::spawn(config);
    daemon.connected().await;
    let served: SplitApiStatus = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| s.addr.is_some() && s.bundle.is_some()),
    )
    .await
    .expect("the owner replica pushes a bundle")
    .unwrap()
    .clone();
    let version = served.bundle.unwrap().version;
    for via in [0, 2] {
        let bundle = replicas
            .admin(via)
            .splitapi_client_creds("fwd-sa")
            .await
            .unwrap();
        assert_eq!(bundle.version, version, "through replica {via}");
    }
    daemon.stop().await;
}
