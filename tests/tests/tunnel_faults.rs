#![allow(clippy::unwrap_used)]
//! Tunnel faults against a real KBS and the real guest daemon (`guest_daemon::run`) over
//! loopback: a KBS restart (a drain), a KBS crash (killed: no drain, no close frame), a cut
//! connection and a silent peer (the socket stays open, nothing arrives) in the middle of
//! calls: calls fail fast with `Disconnected`, and the daemon's own reconnect loop is back
//! within seconds. Also an expired token, and many connect/disconnect cycles that must leave
//! no tunnel, task or memory behind. Waits are on events or short bounded polls.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use guest_daemon::hook::PostApplyHook;
use guest_daemon::tee_key::TeeKeyPair;
use rpc_defs::{Applied, GuestInfo, ProbeKind, ProbeReport};
use serde_json::Value;
use tests::{
    DaemonRun, FaultProxy, StubGuest, TestKbs, WAIT, allow_sample, eventually, hub_until,
    metric_value, sealed_resource, unseal_with,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tunnel::{CallError, ConnectError, TunnelHandle};

const G1: &str = "[tether]\nguest_id = \"g1\"\n";

/// How long the daemon's hook runs: an apply stays in flight that long.
const HOOK_SECS: u64 = 8;

/// Echoes pings and refuses pushes; a resources probe never answers (a call that stays in
/// flight).
fn slow_guest() -> StubGuest {
    StubGuest::new()
        .refusing_bundles()
        .refusing_pushes()
        .on_probe(|kind| async move {
            match kind {
                ProbeKind::Resources => std::future::pending().await,
                _ => Ok(ProbeReport::default()),
            }
        })
}

fn guest_info() -> GuestInfo {
    tests::guest_info("faults", "test", &[])
}

/// The real guest daemon for `kbs_url` (the KBS, or a proxy in front of it), as guest `g1`,
/// with a post-apply hook that takes [`HOOK_SECS`].
fn daemon(kbs: &TestKbs, kbs_url: &str, dir: &tempfile::TempDir) -> DaemonRun {
    let mut config = kbs.daemon_config(dir.path(), Some(G1.into()));
    config.kbs_url = kbs_url.to_owned();
    config.hook = Some(PostApplyHook::new(format!("sleep {HOOK_SECS}")));
    DaemonRun::spawn(config)
}

/// Starts `n` applies of fresh resources on `daemon`: each stays in flight while its hook
/// runs, and has a long deadline.
fn stuck_calls(
    handle: &Arc<TunnelHandle>,
    daemon: &DaemonRun,
    n: usize,
) -> Vec<JoinHandle<Result<Applied, CallError>>> {
    let key = daemon.tee_key();
    (0..n)
        .map(|i| {
            let handle = handle.clone();
            let plaintext = format!("stuck {i}");
            let resource = sealed_resource(
                &key,
                &format!("default/stuck/r{i}"),
                1,
                plaintext.as_bytes(),
            );
            tokio::spawn(async move {
                handle
                    .apply_resource(resource, Some(Duration::from_secs(60)))
                    .await
            })
        })
        .collect()
}

/// Starts the stuck calls and waits until all are in flight.
async fn calls_in_flight(
    handle: &Arc<TunnelHandle>,
    daemon: &DaemonRun,
) -> Vec<JoinHandle<Result<Applied, CallError>>> {
    let calls = stuck_calls(handle, daemon, 3);
    eventually("calls in flight", || {
        std::future::ready(handle.in_flight() == 3)
    })
    .await;
    calls
}

/// Waits for every stuck call to end and checks they failed with `Disconnected` within
/// `within` (well before their hook ends or their 60 s deadline).
async fn assert_failed_within(
    calls: Vec<JoinHandle<Result<Applied, CallError>>>,
    within: Duration,
) {
    assert!(within < Duration::from_secs(HOOK_SECS));
    let start = Instant::now();
    for call in calls {
        let result = tokio::time::timeout(within, call)
            .await
            .expect("an in-flight call fails fast, not when the hook or its deadline ends")
            .unwrap();
        assert_eq!(result.unwrap_err(), CallError::Disconnected);
    }
    assert!(start.elapsed() < within);
}

/// The daemon is back on `kbs` with a new tunnel within `within` of `since`, and it serves.
async fn assert_back(
    kbs: &TestKbs,
    daemon: &mut DaemonRun,
    old: &TunnelHandle,
    since: Instant,
    within: Duration,
) {
    let (session, _) = daemon.connected_where(|s| s != old.session_id).await;
    let back = tests::tunnel_of(&kbs.state.hub, WAIT, "g1", |h| h.session_id == session).await;
    assert!(since.elapsed() < within, "back after {:?}", since.elapsed());
    assert_eq!(back.ping(vec![7; 256], None).await.unwrap(), vec![7; 256]);
}

/// The old handle refuses new calls at once (where its KBS lives on to say so: after a
/// crash nothing is left to hold it).
async fn assert_refuses_calls(old: &TunnelHandle) {
    assert_eq!(
        old.ping(vec![1], Some(Duration::from_secs(5))).await,
        Err(CallError::Disconnected),
        "the old handle refuses new calls"
    );
}

#[tokio::test]
async fn a_kbs_restart_fails_in_flight_calls_fast_and_the_daemon_comes_back() {
    let kbs = TestKbs::start_dev().await;
    let dir = tempfile::tempdir().unwrap();
    let url = kbs.url.clone();
    let mut daemon = daemon(&kbs, &url, &dir);
    daemon.connected().await;
    let handle = kbs.tunnel("g1").await;
    let calls = calls_in_flight(&handle, &daemon).await;

    let restarted = Instant::now();
    let kbs = kbs.restart().await;
    assert_failed_within(calls, Duration::from_secs(5)).await;
    assert_back(
        &kbs,
        &mut daemon,
        &handle,
        restarted,
        Duration::from_secs(10),
    )
    .await;
    assert_refuses_calls(&handle).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_kbs_crash_fails_in_flight_calls_fast_and_the_daemon_comes_back() {
    let kbs = TestKbs::start_crashable(false, allow_sample).await;
    let dir = tempfile::tempdir().unwrap();
    let url = kbs.url.clone();
    let mut daemon = daemon(&kbs, &url, &dir);
    daemon.connected().await;
    let handle = kbs.tunnel("g1").await;
    let calls = calls_in_flight(&handle, &daemon).await;

    let crashed = Instant::now();
    let kbs = kbs.crash_and_restart().await;
    assert_failed_within(calls, Duration::from_secs(5)).await;
    assert_back(&kbs, &mut daemon, &handle, crashed, Duration::from_secs(10)).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_cut_connection_fails_in_flight_calls_fast_and_the_daemon_comes_back() {
    let kbs = TestKbs::start_dev().await;
    let proxy = FaultProxy::start(kbs.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = daemon(&kbs, &proxy.url(), &dir);
    daemon.connected().await;
    let handle = kbs.tunnel("g1").await;
    let calls = calls_in_flight(&handle, &daemon).await;

    let cut = Instant::now();
    proxy.cut();
    assert_failed_within(calls, Duration::from_secs(5)).await;
    assert_back(&kbs, &mut daemon, &handle, cut, Duration::from_secs(10)).await;
    assert_refuses_calls(&handle).await;
    // The vanished tunnel is counted as such (no close frame: 1006).
    let m = kbs.metrics().await;
    assert_eq!(
        metric_value(&m, "kbs_tunnel_disconnects_total", &[("code", "1006")]),
        1.0
    );
    assert_eq!(metric_value(&m, "kbs_tunnels_connected", &[]), 1.0);
    daemon.stop().await;
}

#[tokio::test]
async fn a_silent_peer_is_given_up_on_both_ends_and_the_daemon_comes_back() {
    // Heartbeats every second: each end gives the other up after three missed beats.
    let kbs = TestKbs::start_with(false, |c| {
        allow_sample(c);
        c.tunnel.heartbeat = Duration::from_secs(1);
    })
    .await;
    let proxy = FaultProxy::start(kbs.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = daemon(&kbs, &proxy.url(), &dir);
    daemon.connected().await;
    let handle = kbs.tunnel("g1").await;
    let calls = calls_in_flight(&handle, &daemon).await;

    let silenced = Instant::now();
    assert!(proxy.silence() >= 1, "the tunnel's connection fell silent");
    // Nothing closes the socket: the KBS gives the guest up on its own, after ~3 s.
    assert_failed_within(calls, Duration::from_secs(6)).await;
    assert_back(
        &kbs,
        &mut daemon,
        &handle,
        silenced,
        Duration::from_secs(12),
    )
    .await;
    assert_refuses_calls(&handle).await;
    let m = kbs.metrics().await;
    assert_eq!(
        metric_value(&m, "kbs_tunnel_disconnects_total", &[("code", "4408")]),
        1.0,
        "the KBS closed it for missed heartbeats"
    );
    daemon.stop().await;
}

/// `token` with its expiry moved into the past, signed with this KBS's own token key.
fn expired(kbs: &TestKbs, token: &str) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let mut claims: serde_json::Map<String, Value> =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    let now = tests::unix_secs();
    claims.insert("iat".into(), Value::from(now - 900));
    claims.insert("exp".into(), Value::from(now - 600));
    let pem = std::fs::read(kbs.data_dir.join("token.key")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &key,
    )
    .unwrap()
}

#[tokio::test]
async fn an_expired_token_is_refused_before_the_upgrade() {
    let kbs = TestKbs::start_dev().await;
    let key = TeeKeyPair::new_ec();
    let token = kbs.attest(&key, Some(G1)).await;
    let stale = expired(&kbs, &token);
    let Err(err) = tunnel::connect(
        &kbs.tunnel_config(),
        &stale,
        guest_info(),
        unseal_with(&key),
    )
    .await
    else {
        panic!("expired token accepted");
    };
    assert!(matches!(err, ConnectError::Http { status: 401 }), "{err}");
    assert!(err.needs_reattest());
    // The same claims unexpired go through: the refusal was the expiry, not the signature.
    let tunnel = tunnel::connect(
        &kbs.tunnel_config(),
        &token,
        guest_info(),
        unseal_with(&key),
    )
    .await
    .unwrap();
    let session = tunnel.session();
    let served = tokio::spawn(tunnel.serve(slow_guest()));
    session.close();
    served.await.unwrap();
    assert_eq!(
        metric_value(
            &kbs.metrics().await,
            "kbs_tunnel_handshakes_total",
            &[("outcome", "unauthorized")]
        ),
        1.0
    );
}

/// Resident set size in KiB: resident pages from /proc/self/statm times the system's page
/// size. A figure that cannot be read fails the test rather than reading as 0.
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no resident page count in /proc/self/statm: {statm:?}"));
    let page_size = rustix::param::page_size() as u64;
    pages * page_size / 1024
}

/// Opens a tunnel, makes one call through the hub, closes it from the guest side, and waits
/// until the KBS forgot it.
async fn cycle(kbs: &TestKbs, token: &str, key: &TeeKeyPair) {
    let tunnel = tunnel::connect(&kbs.tunnel_config(), token, guest_info(), unseal_with(key))
        .await
        .unwrap();
    let session = tunnel.session();
    let served = tokio::spawn(tunnel.serve(slow_guest()));
    let handle = kbs.tunnel("g1").await;
    assert_eq!(handle.ping(vec![3; 64], None).await.unwrap(), vec![3; 64]);
    session.close();
    served.await.unwrap();
    handle.closed().await;
    hub_until(&kbs.state.hub, WAIT, "the hub forgets the tunnel", |hub| {
        hub.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_disconnect_cycles_leak_no_tunnel_task_or_memory() {
    let kbs = TestKbs::start_dev().await;
    let key = TeeKeyPair::new_ec();
    let token = kbs.attest(&key, Some(G1)).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    // Warm up lazily initialised state, pools and allocator arenas.
    for _ in 0..30 {
        cycle(&kbs, &token, &key).await;
    }
    let tasks_before = metrics.num_alive_tasks();
    let rss_before = rss_kib();
    const CYCLES: usize = 300;
    for _ in 0..CYCLES {
        cycle(&kbs, &token, &key).await;
    }
    // Every tunnel task ends; give the last one's closing handshake a moment.
    eventually("tasks back to the baseline", || {
        std::future::ready(metrics.num_alive_tasks() <= tasks_before)
    })
    .await;
    let grown = rss_kib().saturating_sub(rss_before);
    let m = kbs.metrics().await;
    assert_eq!(metric_value(&m, "kbs_tunnels_connected", &[]), 0.0);
    assert_eq!(
        metric_value(&m, "kbs_tunnel_handshakes_total", &[("outcome", "ok")]),
        (CYCLES + 30) as f64
    );
    // A leak of even 4 KiB per tunnel would show as > 1 MiB here; allow noise below that.
    assert!(
        grown < 1024,
        "RSS grew by {grown} KiB over {CYCLES} connect/disconnect cycles"
    );
}
