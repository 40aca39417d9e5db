#![allow(clippy::unwrap_used)]
//! The guest daemon's `run` loop against a real KBS: it attests, holds the tunnel, serves
//! the KBS's calls into the state directory, rides out KBS restarts and outages, refreshes
//! its token in band, and closes cleanly on shutdown. Waits are on the daemon's state
//! channel or short bounded polls; the one long wait (token expiry) is the event under test.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use guest_daemon::run::{DaemonState, RunConfig};
use guest_daemon::tee_key::TeeKeyPair;
use rpc_defs::ProbeKind;
use sha2::{Digest, Sha256};
use tests::{DaemonRun, TestKbs, sealed_resource};
use tokio::time::Instant;
use tunnel::TunnelEvent;

/// How long any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(15);

fn init_data(guest_id: &str) -> String {
    format!(
        "[tether]\nguest_id = \"{guest_id}\"\n\n[tether.labels]\nrole = \"web\"\nzone = \"eu-1\"\n"
    )
}

fn spawn(kbs: &TestKbs, state_dir: &Path, init_data: Option<String>) -> DaemonRun {
    DaemonRun::spawn(kbs.daemon_config(state_dir, init_data))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn the_daemon_connects_is_probed_and_applies_a_pushed_resource() {
    let kbs = TestKbs::start_dev().await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let mut daemon = spawn(&kbs, &state_dir, Some(init_data("gd-apply")));
    let (session_id, guest_id) = daemon.connected().await;
    assert_eq!(guest_id, "gd-apply", "identity from the attested init-data");

    // In the hub with the attested labels and what the daemon says of itself.
    let handle = kbs.tunnel("gd-apply").await;
    assert_eq!(handle.session_id, session_id);
    assert_eq!(handle.labels["role"], "web");
    assert_eq!(handle.labels["zone"], "eu-1");
    assert_eq!(handle.daemon_version, env!("CARGO_PKG_VERSION"));
    assert!(handle.services.iter().any(|s| s == "resources"));

    // Probes reach the daemon's service, which counts the open tunnel.
    assert_eq!(
        handle.ping(b"hello".to_vec(), None).await.unwrap(),
        b"hello"
    );
    let report = handle.probe(ProbeKind::All, None).await.unwrap();
    assert!(report.health.unwrap().healthy);
    assert!(report.resources.unwrap().is_empty());
    let runtime = report.runtime.unwrap();
    assert_eq!(runtime.open_tunnels, 1);
    assert_eq!(runtime.daemon_version, env!("CARGO_PKG_VERSION"));

    // A resource sealed to the daemon's persisted TEE key lands in the state dir, 0600.
    let key = daemon.tee_key();
    assert_eq!(mode(&state_dir.join("tee_key.pem")), 0o600);
    let plaintext = b"listen = 8443\n";
    let applied = handle
        .apply_resource(
            sealed_resource(&key, "default/app/config", 1, plaintext),
            None,
        )
        .await
        .unwrap();
    assert_eq!(applied.uri, "default/app/config");
    assert_eq!(applied.version, 1);
    assert!(!applied.already_held);
    assert_eq!(applied.sha256, format!("{:x}", Sha256::digest(plaintext)));
    let file = state_dir.join("resources/default/app/config");
    assert_eq!(std::fs::read(&file).unwrap(), plaintext);
    assert_eq!(mode(&file), 0o600, "resource plaintext is 0600");
    let held = handle
        .probe(ProbeKind::Resources, None)
        .await
        .unwrap()
        .resources
        .unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].uri.as_str(), held[0].version),
        ("default/app/config", 1)
    );

    // Sealed to another key: refused, nothing changes.
    let other = TeeKeyPair::new_ec();
    let refused = handle
        .apply_resource(
            sealed_resource(&other, "default/app/config", 2, b"evil"),
            None,
        )
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(std::fs::read(&file).unwrap(), plaintext);

    assert_eq!(daemon.stop().await, DaemonState::Stopped);
}

#[tokio::test]
async fn shutdown_closes_the_tunnel_normally() {
    let kbs = TestKbs::start_dev().await;
    let mut events = kbs.state.hub.subscribe();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = spawn(&kbs, dir.path(), Some(init_data("gd-stop")));
    daemon.connected().await;
    kbs.tunnel("gd-stop").await;

    let started = Instant::now();
    assert_eq!(daemon.stop().await, DaemonState::Stopped);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "prompt shutdown"
    );
    // The KBS saw a normal close (1000) and dropped the guest from the hub.
    let code = tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await.unwrap() {
                TunnelEvent::Disconnected { guest_id, code, .. } if guest_id == "gd-stop" => {
                    break code;
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the KBS sees the tunnel end");
    assert_eq!(code, 1000);
    assert!(kbs.state.hub.get("gd-stop").is_none());
}

#[tokio::test]
async fn the_daemon_is_back_within_seconds_after_a_kbs_restart() {
    let kbs = TestKbs::start_dev().await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = spawn(&kbs, dir.path(), Some(init_data("gd-restart")));
    let (first, _) = daemon.connected().await;
    kbs.tunnel("gd-restart").await;

    let kbs = kbs.restart().await;
    let restarted = Instant::now();
    let (second, _) = daemon.connected_where(|s| s != first).await;
    let handle = kbs.tunnel("gd-restart").await;
    let back_after = restarted.elapsed();
    assert_eq!(handle.session_id, second);
    assert!(
        back_after < Duration::from_secs(10),
        "daemon back after {back_after:?}"
    );
    // The new tunnel serves calls.
    assert_eq!(
        handle.ping(b"again".to_vec(), None).await.unwrap(),
        b"again"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn the_daemon_rides_out_a_kbs_that_is_down_at_start() {
    // A port nothing listens on yet; the KBS comes up there later.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = RunConfig::new(format!("http://{addr}"), dir.path());
    config.init_data = Some(init_data("gd-late"));
    let mut daemon = DaemonRun::spawn(config);
    // Failed attestations are backoff steps, not fatal.
    tokio::time::timeout(
        WAIT,
        daemon
            .state
            .wait_for(|s| matches!(s, DaemonState::BackingOff { attempt, .. } if *attempt >= 2)),
    )
    .await
    .expect("daemon backs off")
    .unwrap();
    assert!(daemon.is_running());

    let kbs = TestKbs::start_with(false, |c| {
        tests::allow_sample(c);
        c.http.listen = addr;
    })
    .await;
    daemon.connected().await;
    kbs.tunnel("gd-late").await;
    daemon.stop().await;
}

#[tokio::test]
async fn an_expiring_token_is_refreshed_in_band() {
    // Tokens live 10 s (the shortest the KBS allows); the daemon re-attests at half of that
    // and sends the fresh token in band, so the same tunnel outlives its first token.
    let kbs = TestKbs::start_with(false, |c| {
        tests::allow_sample(c);
        c.attestation.token_ttl = Duration::from_secs(10);
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = spawn(&kbs, dir.path(), Some(init_data("gd-reauth")));
    let (session_id, _) = daemon.connected().await;
    // The first token was issued before the tunnel was up, so it expires by then.
    let first_expired_by = tests::unix_secs() + 10;
    kbs.tunnel("gd-reauth").await;

    // The token's clock is the wall clock (the KBS checks `exp` against it), so no paused
    // time here: wait for the second in-band re-attestation (at about 10 s), then, if needed,
    // until the first token is certainly expired.
    tokio::time::timeout(
        Duration::from_secs(20),
        daemon.state.wait_for(|s| {
            matches!(s, DaemonState::Connected { reauths, .. } if *reauths >= 2)
                || !s.is_connected()
        }),
    )
    .await
    .expect("two re-attestations in time")
    .unwrap();
    let left = first_expired_by.saturating_sub(tests::unix_secs());
    tokio::time::sleep(Duration::from_secs(left + 1)).await;

    match daemon.current() {
        DaemonState::Connected {
            session_id: now,
            reauths,
            ..
        } => {
            assert_eq!(now, session_id, "the same tunnel is still up");
            assert!(reauths >= 2, "re-attested in band {reauths} times");
        }
        other => panic!("daemon is {other:?}"),
    }
    let handle = kbs.state.hub.get("gd-reauth").expect("still in the hub");
    assert_eq!(handle.session_id, session_id);
    assert_eq!(
        handle.ping(b"alive".to_vec(), None).await.unwrap(),
        b"alive"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_restarted_daemon_keeps_its_tee_key_identity_and_resources() {
    let kbs = TestKbs::start_dev().await;
    let dir = tempfile::tempdir().unwrap();
    // No init-data: the guest id is derived from the TEE key.
    let mut daemon = spawn(&kbs, dir.path(), None);
    let (_, guest_id) = daemon.connected().await;
    assert!(guest_id.starts_with("tee-"), "{guest_id}");
    let handle = kbs.tunnel(&guest_id).await;
    let key_pem = std::fs::read(dir.path().join("tee_key.pem")).unwrap();
    let key = daemon.tee_key();
    handle
        .apply_resource(
            sealed_resource(&key, "default/app/token", 3, b"secret"),
            None,
        )
        .await
        .unwrap();
    daemon.stop().await;

    let mut daemon = spawn(&kbs, dir.path(), None);
    let (_, again) = daemon.connected().await;
    assert_eq!(again, guest_id, "same key, same derived identity");
    assert_eq!(
        std::fs::read(dir.path().join("tee_key.pem")).unwrap(),
        key_pem
    );
    let handle = kbs.tunnel(&guest_id).await;
    let held = handle
        .probe(ProbeKind::Resources, None)
        .await
        .unwrap()
        .resources
        .unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].uri.as_str(), held[0].version),
        ("default/app/token", 3)
    );
    daemon.stop().await;
}

#[tokio::test]
async fn the_daemon_connects_over_tls_with_its_ca_file() {
    let kbs = TestKbs::start_dev_tls().await;
    assert!(kbs.url.starts_with("https://"));
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = spawn(&kbs, dir.path(), Some(init_data("gd-tls")));
    daemon.connected().await;
    let handle = kbs.tunnel("gd-tls").await;
    assert_eq!(handle.ping(b"tls".to_vec(), None).await.unwrap(), b"tls");
    daemon.stop().await;
}
