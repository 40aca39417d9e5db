#![allow(clippy::unwrap_used)]
//! Tunnel faults against a real KBS over loopback: a KBS restart and a cut connection in the
//! middle of calls (calls fail fast with `Disconnected`, the guest is back within seconds),
//! an expired token, and many connect/disconnect cycles that must leave no tunnel, task or
//! memory behind. Waits are on events or short bounded polls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use guest_daemon::tee_key::TeeKeyPair;
use rpc_defs::{GuestInfo, ProbeKind, ProbeReport};
use serde_json::Value;
use tests::{StubGuest, TestKbs, WAIT, eventually, hub_until, metric_value, unseal_with};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnel::{Backoff, CallError, ConnectError, GuestTunnelConfig, ReconnectPolicy, TunnelHandle};

const G1: &str = "[tether]\nguest_id = \"g1\"\n";

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

/// A guest that holds its tunnel and reconnects after any failure with the daemon's backoff
/// (full jitter), as `guest-daemon run` does; counts the tunnels it opened.
struct LoopingGuest {
    opens: Arc<AtomicUsize>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl LoopingGuest {
    fn spawn(config: GuestTunnelConfig, token: String, key: TeeKeyPair) -> Self {
        let opens = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let task = {
            let (opens, stop) = (opens.clone(), stop.clone());
            tokio::spawn(async move {
                let mut backoff = Backoff::new(ReconnectPolicy::default());
                while !stop.is_cancelled() {
                    let connect = tunnel::connect(&config, &token, guest_info(), unseal_with(&key));
                    let delay = match connect.await {
                        Ok(tunnel) => {
                            opens.fetch_add(1, Ordering::SeqCst);
                            let session = tunnel.session();
                            let served = tunnel.serve(slow_guest());
                            tokio::pin!(served);
                            let closed = tokio::select! {
                                closed = &mut served => closed,
                                () = stop.cancelled() => {
                                    session.close();
                                    served.await
                                }
                            };
                            backoff.after_close(&closed, &mut rand::thread_rng())
                        }
                        Err(_) => backoff.next_delay(&mut rand::thread_rng()),
                    };
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => {}
                    }
                }
            })
        };
        Self { opens, stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("guest stops")
            .unwrap();
    }
}

/// Starts `n` resources probes (they never get an answer) with a long deadline.
fn stuck_calls(
    handle: &Arc<TunnelHandle>,
    n: usize,
) -> Vec<JoinHandle<Result<ProbeReport, CallError>>> {
    (0..n)
        .map(|_| {
            let handle = handle.clone();
            tokio::spawn(async move {
                handle
                    .probe(ProbeKind::Resources, Some(Duration::from_secs(60)))
                    .await
            })
        })
        .collect()
}

/// Waits for every stuck call to end and checks they failed with `Disconnected`, fast.
async fn assert_failed_fast(calls: Vec<JoinHandle<Result<ProbeReport, CallError>>>) {
    let start = Instant::now();
    for call in calls {
        let result = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("an in-flight call fails fast, not at its 60 s deadline")
            .unwrap();
        assert_eq!(result.unwrap_err(), CallError::Disconnected);
    }
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_kbs_restart_fails_in_flight_calls_fast_and_the_guest_comes_back() {
    let kbs = TestKbs::start_dev().await;
    let key = TeeKeyPair::new_ec();
    let token = kbs.attest(&key, Some(G1)).await;
    let guest = LoopingGuest::spawn(kbs.tunnel_config(), token, key);
    let handle = kbs.tunnel("g1").await;
    let calls = stuck_calls(&handle, 3);
    eventually("calls in flight", || {
        std::future::ready(handle.in_flight() == 3)
    })
    .await;

    let restarted = Instant::now();
    let kbs = kbs.restart().await;
    assert_failed_fast(calls).await;
    assert_eq!(
        handle.ping(vec![1], None).await,
        Err(CallError::Disconnected),
        "the old handle refuses new calls"
    );

    // The guest is back on the restarted KBS with the same token, within seconds.
    let back = kbs.tunnel("g1").await;
    assert!(restarted.elapsed() < Duration::from_secs(10));
    assert_ne!(back.session_id, handle.session_id);
    assert_eq!(back.ping(vec![7; 256], None).await.unwrap(), vec![7; 256]);
    assert_eq!(guest.opens.load(Ordering::SeqCst), 2);
    guest.stop().await;
}

/// A TCP relay whose connections can be cut at once (no close frame, no TLS close: what the
/// guest sees when a KBS process is killed, and what the KBS sees when a guest's VM dies).
struct CutProxy {
    addr: SocketAddr,
    conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl CutProxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let conns = conns.clone();
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    conns.lock().unwrap().push(relay);
                }
            })
        };
        Self {
            addr,
            conns,
            accept,
        }
    }

    /// Drops every relayed connection at once.
    fn cut(&self) {
        for relay in self.conns.lock().unwrap().drain(..) {
            relay.abort();
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test]
async fn a_cut_connection_fails_in_flight_calls_fast_and_the_guest_comes_back() {
    let kbs = TestKbs::start_dev().await;
    let proxy = CutProxy::start(kbs.addr).await;
    let key = TeeKeyPair::new_ec();
    let token = kbs.attest(&key, Some(G1)).await;
    let config = GuestTunnelConfig::new(format!("ws://{}/kbs/v0/tunnel", proxy.addr));
    let guest = LoopingGuest::spawn(config, token, key);
    let handle = kbs.tunnel("g1").await;
    let calls = stuck_calls(&handle, 3);
    eventually("calls in flight", || {
        std::future::ready(handle.in_flight() == 3)
    })
    .await;

    let cut = Instant::now();
    proxy.cut();
    assert_failed_fast(calls).await;
    let back = tests::tunnel_of(&kbs.state.hub, WAIT, "g1", |h| {
        h.session_id != handle.session_id
    })
    .await;
    assert!(cut.elapsed() < Duration::from_secs(10));
    assert_eq!(back.ping(vec![1], None).await.unwrap(), vec![1]);
    // The vanished tunnel is counted as such (no close frame: 1006).
    let m = kbs.metrics().await;
    assert_eq!(
        metric_value(&m, "kbs_tunnel_disconnects_total", &[("code", "1006")]),
        1.0
    );
    assert_eq!(metric_value(&m, "kbs_tunnels_connected", &[]), 1.0);
    guest.stop().await;
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

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4
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
