//! Loopback test rig: a tiny axum KBS with the tunnel route, a test `GuestService`, raw
//! WebSocket clients, and a recording observer. The "crypto" is a fake: the challenge is
//! the nonce XOR 0x5a, and `unseal` undoes it.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    extract::{State, WebSocketUpgrade},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::any,
};
use futures::{SinkExt, Stream, StreamExt, future::BoxFuture};
use rpc_defs::{
    Applied, CredentialBundle, Frame, GuestError, GuestInfo, GuestService, Installed, ProbeKind,
    ProbeReport, SUBPROTOCOL, SealedResource,
};
use serde_bytes::ByteBuf;
use tarpc::context::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest, http::HeaderValue},
};
use tokio_util::sync::CancellationToken;
use tunnel::{
    AcceptParams, Closed, GuestTunnelConfig, Hub, ReauthFn, TunnelHandle, TunnelLimits,
    TunnelObserver, TunnelSession, configure_upgrade, serve_guest_tunnel,
};

pub const XOR: u8 = 0x5a;

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Everything an observer was told.
#[derive(Default)]
pub struct Recorder {
    pub handshakes: Mutex<Vec<&'static str>>,
    pub connected: Mutex<Vec<String>>,
    pub disconnected: Mutex<Vec<(String, u16, String)>>,
    pub rpcs: Mutex<Vec<(&'static str, &'static str)>>,
}

impl TunnelObserver for Recorder {
    fn handshake(&self, outcome: &'static str) {
        self.handshakes.lock().expect("lock").push(outcome);
    }
    fn connected(&self, guest_id: &str) {
        self.connected
            .lock()
            .expect("lock")
            .push(guest_id.to_owned());
    }
    fn disconnected(&self, guest_id: &str, close_code: u16, reason: &str) {
        self.disconnected.lock().expect("lock").push((
            guest_id.to_owned(),
            close_code,
            reason.to_owned(),
        ));
    }
    fn rpc(&self, method: &'static str, outcome: &'static str, _elapsed: Duration) {
        self.rpcs.lock().expect("lock").push((method, outcome));
    }
}

impl Recorder {
    pub fn disconnect_codes(&self) -> Vec<u16> {
        self.disconnected
            .lock()
            .expect("lock")
            .iter()
            .map(|d| d.1)
            .collect()
    }
    pub fn handshake_outcomes(&self) -> Vec<&'static str> {
        self.handshakes.lock().expect("lock").clone()
    }
    pub fn rpc_outcomes(&self) -> Vec<(&'static str, &'static str)> {
        self.rpcs.lock().expect("lock").clone()
    }
}

#[derive(Clone)]
struct AppState {
    hub: Hub,
    observer: Arc<Recorder>,
    drain: CancellationToken,
    limits: Arc<TunnelLimits>,
    reauth_before: Arc<dyn Fn() -> u64 + Send + Sync>,
    reauth: ReauthFn,
    proven: Proven,
}

/// What each tunnel's proof hook saw: the guest id, the epoch, and whether the hub already
/// held that epoch when it ran (it must not: the hook runs before registration).
pub type Proven = Arc<std::sync::Mutex<Vec<(String, u64, bool)>>>;

/// A KBS on loopback serving only the tunnel route.
pub struct TestKbs {
    pub addr: SocketAddr,
    pub hub: Hub,
    pub observer: Arc<Recorder>,
    pub drain: CancellationToken,
    pub reauth_calls: Arc<AtomicUsize>,
    pub proven: Proven,
}

/// Knobs for [`TestKbs::start`].
pub struct KbsOptions {
    pub limits: TunnelLimits,
    /// `reauth_before` handed to each new tunnel.
    pub reauth_before: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// What a reauth with a token starting with `good` extends the deadline to.
    pub reauth_extends_to: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl Default for KbsOptions {
    fn default() -> Self {
        Self {
            limits: TunnelLimits::default(),
            reauth_before: Arc::new(|| unix_now() + 3600),
            reauth_extends_to: Arc::new(|| unix_now() + 7200),
        }
    }
}

impl TestKbs {
    pub async fn start(options: KbsOptions) -> Self {
        let hub = Hub::new();
        let observer = Arc::new(Recorder::default());
        let drain = CancellationToken::new();
        let reauth_calls = Arc::new(AtomicUsize::new(0));
        let calls = reauth_calls.clone();
        let extends_to = options.reauth_extends_to.clone();
        let reauth: ReauthFn = Arc::new(move |token: String| {
            calls.fetch_add(1, Ordering::SeqCst);
            let extends_to = extends_to.clone();
            Box::pin(async move {
                if token.starts_with("good") {
                    Ok(extends_to())
                } else {
                    Err("token refused".to_owned())
                }
            }) as BoxFuture<'static, Result<u64, String>>
        });
        let state = AppState {
            hub: hub.clone(),
            observer: observer.clone(),
            drain: drain.clone(),
            limits: Arc::new(options.limits),
            reauth_before: options.reauth_before,
            reauth,
            proven: Proven::default(),
        };
        let proven = state.proven.clone();
        let app = Router::new()
            .route("/kbs/v0/tunnel", any(tunnel_route))
            .with_state(state);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            hub,
            observer,
            drain,
            reauth_calls,
            proven,
        }
    }

    /// A KBS with `limits` and the default reauth deadlines.
    pub async fn with_limits(limits: TunnelLimits) -> Self {
        Self::start(KbsOptions {
            limits,
            ..KbsOptions::default()
        })
        .await
    }

    pub fn url(&self) -> String {
        format!("ws://{}/kbs/v0/tunnel", self.addr)
    }

    pub fn guest_config(&self) -> GuestTunnelConfig {
        GuestTunnelConfig::new(self.url())
    }

    /// Waits until the hub holds `n` tunnels.
    pub async fn wait_for_tunnels(&self, n: usize) {
        wait_until(|| self.hub.len() == n).await;
    }

    /// The hub's handle on the tunnel of `guest_id`, once it is registered.
    pub async fn registered(&self, guest_id: &str) -> Arc<TunnelHandle> {
        wait_until(|| self.hub.get(guest_id).is_some()).await;
        self.hub.get(guest_id).expect("registered")
    }

    /// Connects a guest `guest_id` serving `service`; returns its session and the task
    /// serving it.
    pub async fn guest(
        &self,
        guest_id: &str,
        service: TestService,
    ) -> (TunnelSession, JoinHandle<Closed>) {
        self.guest_with(self.guest_config(), guest_id, service)
            .await
    }

    /// [`guest`](Self::guest) with the guest's own tunnel configuration.
    pub async fn guest_with(
        &self,
        config: GuestTunnelConfig,
        guest_id: &str,
        service: TestService,
    ) -> (TunnelSession, JoinHandle<Closed>) {
        let (session, serving) = tunnel::connect_and_serve(
            &config,
            &format!("good:{guest_id}"),
            info(guest_id),
            unseal,
            service,
        )
        .await
        .expect("connect");
        (session, tokio::spawn(serving))
    }

    /// A raw client (guest id `raw`) past the handshake, its tunnel registered.
    pub async fn raw_tunnel(&self) -> RawWs {
        let mut ws = raw_connect(&self.url(), "good:raw").await;
        let welcome = raw_handshake(&mut ws, true).await;
        assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
        self.registered("raw").await;
        ws
    }
}

/// Test token format: `good:<guest_id>`; anything else is refused with 401.
async fn tunnel_route(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let Some(guest_id) = token.strip_prefix("good:") else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let nonce: [u8; 32] = rand::random();
    let accept = AcceptParams {
        guest_id: guest_id.to_owned(),
        labels: BTreeMap::from([("app".to_owned(), "test".to_owned())]).into(),
        challenge_jwe: nonce.iter().map(|b| b ^ XOR).collect(),
        expected_nonce: nonce,
        push_key: None,
        reauth_before: (state.reauth_before)(),
        reauth: state.reauth.clone(),
        on_proven: Some(record_proven(&state, guest_id)),
        limits: state.limits.clone(),
    };
    let (hub, observer, drain) = (
        state.hub.clone(),
        state.observer.clone(),
        state.drain.clone(),
    );
    configure_upgrade(ws, &state.limits)
        .on_upgrade(move |socket| serve_guest_tunnel(socket, accept, hub, observer, drain))
}

fn record_proven(state: &AppState, guest_id: &str) -> tunnel::ProvenFn {
    let (proven, hub, guest_id) = (state.proven.clone(), state.hub.clone(), guest_id.to_owned());
    Box::new(move |epoch| {
        let registered = hub.get(&guest_id).is_some_and(|h| h.epoch == epoch);
        proven
            .lock()
            .expect("lock")
            .push((guest_id, epoch, registered));
    })
}

/// The guest's side of the fake crypto.
pub fn unseal(jwe: &[u8]) -> Result<Vec<u8>, String> {
    Ok(jwe.iter().map(|b| b ^ XOR).collect())
}

pub fn info(instance: &str) -> GuestInfo {
    GuestInfo {
        instance_id: instance.to_owned(),
        daemon_version: "test".to_owned(),
        services: vec!["resources".to_owned()],
    }
}

/// A `GuestService` for tests: `ping(b"hang")` never answers, `ping(b"slow")` answers after
/// 300 ms, anything else is echoed. `active` counts handlers running right now.
#[derive(Clone, Default)]
pub struct TestService {
    pub active: Arc<AtomicUsize>,
    pub started: Arc<AtomicUsize>,
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TestService {
    fn enter(&self) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(self.active.clone())
    }
}

impl GuestService for TestService {
    async fn ping(self, _: Context, payload: ByteBuf) -> ByteBuf {
        let _guard = self.enter();
        match payload.as_slice() {
            b"hang" => std::future::pending().await,
            b"slow" => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                payload
            }
            _ => payload,
        }
    }

    async fn install_credentials(
        self,
        _: Context,
        bundle: CredentialBundle,
    ) -> Result<Installed, GuestError> {
        let _guard = self.enter();
        Ok(Installed {
            id: bundle.id,
            version: bundle.version,
            already_held: false,
        })
    }

    async fn apply_resource(
        self,
        _: Context,
        resource: SealedResource,
    ) -> Result<Applied, GuestError> {
        let _guard = self.enter();
        if resource.version == 0 {
            return Err(GuestError::Invalid("version 0".into()));
        }
        Ok(Applied {
            uri: resource.uri,
            version: resource.version,
            sha256: resource.sha256,
            already_held: false,
            hook_status: None,
        })
    }

    async fn probe(self, _: Context, kind: ProbeKind) -> Result<ProbeReport, GuestError> {
        let _guard = self.enter();
        let mut report = ProbeReport::default();
        if matches!(kind, ProbeKind::Health | ProbeKind::All) {
            report.health = Some(rpc_defs::HealthReport {
                healthy: true,
                problems: vec![],
            });
        }
        Ok(report)
    }
}

/// Asserts that a ping with `payload` through `handle` comes back unchanged.
pub async fn assert_echoes(handle: &TunnelHandle, payload: &[u8]) {
    let echoed = handle.ping(payload.to_vec(), None).await.expect("ping");
    assert_eq!(echoed, payload);
}

/// Polls `cond` every 10 ms for up to 10 s.
pub async fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fails the test if `fut` takes more than 20 s.
pub async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("test step took more than 20 s")
}

pub type RawWs = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A bare WebSocket client with the right headers and no tunnel logic.
pub async fn raw_connect(url: &str, token: &str) -> RawWs {
    raw_connect_with(url, token, None).await
}

/// [`raw_connect`] with a WebSocket configuration (buffer sizes).
pub async fn raw_connect_with(
    url: &str,
    token: &str,
    config: Option<tokio_tungstenite::tungstenite::protocol::WebSocketConfig>,
) -> RawWs {
    let mut request = url.into_client_request().expect("request");
    request.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, config, true)
        .await
        .expect("raw connect");
    ws
}

pub fn encode(frame: &Frame) -> Message {
    Message::Binary(tunnel::frame::encode(frame).expect("encode").into())
}

/// Reads the next tunnel frame from either end of a WebSocket, skipping pings and pongs.
pub async fn read_frame<S>(ws: &mut S) -> Frame
where
    S: Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await.expect("stream ended").expect("read") {
            Message::Binary(b) => return tunnel::frame::decode(&b, usize::MAX).expect("frame"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected message {other:?}"),
        }
    }
}

/// Runs the guest's half of the handshake by hand; returns the Welcome (or Reject) frame.
pub async fn raw_handshake(ws: &mut RawWs, good_proof: bool) -> Frame {
    let Frame::Hello { challenge, .. } = read_frame(ws).await else {
        panic!("expected Hello");
    };
    let nonce = if good_proof {
        unseal(&challenge).expect("unseal")
    } else {
        vec![0; 32]
    };
    ws.send(encode(&Frame::Proof {
        nonce,
        info: info("raw"),
    }))
    .await
    .expect("send proof");
    read_frame(ws).await
}

/// Reads until the peer's close frame and returns its code (None if the stream ended
/// without one).
pub async fn read_close_code<S>(ws: &mut S) -> Option<u16>
where
    S: Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}
