//! A tunnel-only KBS with fake crypto, for load tools that measure the tunnel's own cost: the
//! tunnel route and `/readyz`, nothing else. A token `fake:<guest_id>` (see
//! [`fake_token`](crate::fake_token)) names the guest; the challenge is the nonce XOR a
//! constant (see [`fake_unseal`](crate::fake_unseal)); reauth is refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use futures::future::BoxFuture;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tunnel::{
    AcceptParams, GuestTunnelConfig, Hub, NoopObserver, ReauthFn, TunnelLimits, TunnelObserver,
    configure_upgrade, serve_guest_tunnel,
};

use crate::FAKE_TOKEN_PREFIX;
use crate::crypto::fake_xor;

/// How a [`FakeTunnelKbs`] serves.
pub struct FakeKbsOptions {
    /// Where it listens (port 0: any free port).
    pub listen: SocketAddr,
    /// TLS 1.3 with a self-signed certificate for `localhost` and `127.0.0.1`.
    pub tls: bool,
    /// The tunnels' limits (buffer sizes, frame size, in-flight calls).
    pub limits: TunnelLimits,
    /// More routes served beside the tunnel (a raw WebSocket echo, say).
    pub routes: Router,
    /// Print the size of the first tunnel's serving future on stderr (a memory diagnostic).
    pub print_future_size: bool,
}

impl Default for FakeKbsOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: false,
            limits: TunnelLimits::default(),
            routes: Router::new(),
            print_future_size: false,
        }
    }
}

/// A running tunnel-only KBS.
pub struct FakeTunnelKbs {
    /// Listen address.
    pub addr: SocketAddr,
    /// Its live tunnels.
    pub hub: Hub,
    /// The tunnels' limits.
    pub limits: Arc<TunnelLimits>,
    /// Its self-signed certificate (PEM), when serving TLS.
    pub cert_pem: Option<String>,
    /// A client configuration trusting that certificate, when serving TLS.
    pub client_tls: Option<Arc<rustls::ClientConfig>>,
    served: JoinHandle<std::io::Result<()>>,
}

#[derive(Clone)]
struct RouteState {
    hub: Hub,
    limits: Arc<TunnelLimits>,
    reauth: ReauthFn,
    drain: CancellationToken,
    print_future_size: bool,
}

impl FakeTunnelKbs {
    /// Binds and starts serving on a task.
    pub async fn start(options: FakeKbsOptions) -> anyhow::Result<Self> {
        let hub = Hub::new();
        let limits = Arc::new(options.limits);
        let reauth: ReauthFn = Arc::new(|_token: String| {
            Box::pin(async { Err("no reauth at a fake KBS".to_owned()) })
                as BoxFuture<'static, Result<u64, String>>
        });
        let state = RouteState {
            hub: hub.clone(),
            limits: limits.clone(),
            reauth,
            drain: CancellationToken::new(),
            print_future_size: options.print_future_size,
        };
        let app = Router::new()
            .route("/kbs/v0/tunnel", any(tunnel_route))
            .route("/readyz", get(|| async { "ok" }))
            .with_state(state)
            .merge(options.routes);
        let tcp = TcpListener::bind(options.listen).await?;
        let addr = tcp.local_addr()?;
        let (served, cert_pem, client_tls) = if options.tls {
            let (server, client, cert_pem) = self_signed_tls(&["localhost", "127.0.0.1"])?;
            let listener = TlsListener {
                tcp,
                acceptor: tokio_rustls::TlsAcceptor::from(server),
            };
            let served = tokio::spawn(async move { axum::serve(listener, app).await });
            (served, Some(cert_pem), Some(client))
        } else {
            let served = tokio::spawn(async move { axum::serve(tcp, app).await });
            (served, None, None)
        };
        Ok(Self {
            addr,
            hub,
            limits,
            cert_pem,
            client_tls,
            served,
        })
    }

    /// The WebSocket URL of `path` (`ws://127.0.0.1:port/...`, `wss://localhost:port/...`).
    pub fn ws_url(&self, path: &str) -> String {
        match self.client_tls {
            Some(_) => format!("wss://localhost:{}{path}", self.addr.port()),
            None => format!("ws://{}{path}", self.addr),
        }
    }

    /// How a guest reaches the tunnel route (trusting the certificate over TLS).
    pub fn guest_config(&self) -> GuestTunnelConfig {
        let config = GuestTunnelConfig::new(self.ws_url("/kbs/v0/tunnel"));
        match &self.client_tls {
            Some(tls) => config.with_tls(tls.clone()),
            None => config,
        }
    }

    /// Serves until the server fails (or the process is killed).
    pub async fn serve_forever(mut self) -> anyhow::Result<()> {
        Ok((&mut self.served).await??)
    }
}

impl Drop for FakeTunnelKbs {
    fn drop(&mut self) {
        self.served.abort();
    }
}

/// The tunnel route: token `fake:<guest_id>`, challenge = nonce XOR a constant.
async fn tunnel_route(
    State(state): State<RouteState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let guest_id = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|v| v.strip_prefix(FAKE_TOKEN_PREFIX))
        .map(str::to_owned);
    let Some(guest_id) = guest_id else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let nonce: [u8; 32] = rand::random();
    let accept = AcceptParams {
        guest_id,
        labels: Default::default(),
        challenge_jwe: fake_xor(&nonce),
        expected_nonce: nonce,
        push_key: None,
        reauth_before: u64::MAX / 2,
        reauth: state.reauth.clone(),
        on_proven: None,
        limits: state.limits.clone(),
    };
    let observer: Arc<dyn TunnelObserver> = Arc::new(NoopObserver);
    let RouteState {
        hub,
        limits,
        drain,
        print_future_size,
        ..
    } = state;
    configure_upgrade(ws, &limits).on_upgrade(move |socket| {
        let serving = serve_guest_tunnel(socket, accept, hub, observer, drain);
        if print_future_size {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                eprintln!(
                    "serve_guest_tunnel future: {} bytes",
                    std::mem::size_of_val(&serving)
                );
            });
        }
        serving
    })
}

/// A self-signed certificate for `names` (DNS names or IP addresses), TLS 1.3 only, ring
/// provider: (server config, client config trusting it, certificate PEM).
pub fn self_signed_tls(
    names: &[&str],
) -> anyhow::Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>, String)> {
    let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let certified = rcgen::generate_simple_self_signed(names)?;
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((Arc::new(server), Arc::new(client), certified.cert.pem()))
}

/// A TLS listener for `axum::serve`: the handshake happens in `accept`, bounded, so one
/// stuck client cannot stop the accept loop; a failed handshake is skipped.
struct TlsListener {
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let handshake = tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(tcp));
            if let Ok(Ok(tls)) = handshake.await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
