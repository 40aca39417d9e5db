//! The guest end of a tunnel: dial the KBS, prove possession of the TEE key, then serve
//! `GuestService` on the connection until it ends.
//!
//! The pieces compose into the daemon's run loop (attest, connect, serve, back off, re-attest
//! when the token nears expiry):
//!
//! ```ignore
//! let config = GuestTunnelConfig::new("wss://kbs.example/kbs/v0/tunnel").with_tls(tls);
//! let mut backoff = Backoff::new(ReconnectPolicy::default());
//! loop {
//!     let token = attester.token().await?;                       // RCAR, cached until near expiry
//!     let unseal = |jwe: &[u8]| tee_key.unseal(jwe).map_err(|e| e.to_string());
//!     match connect(&config, &token, info.clone(), unseal).await {
//!         Ok(tunnel) => {
//!             let session = tunnel.session();
//!             tokio::spawn(refresh_token(session.clone(), attester.clone())); // session.reauth(new_token)
//!             let closed = tunnel.serve(service.clone()).await;
//!             tokio::time::sleep(backoff.after_close(&closed, &mut rand::thread_rng())).await;
//!         }
//!         Err(e) => {
//!             if e.needs_reattest() { attester.invalidate(); }
//!             tokio::time::sleep(backoff.next_delay(&mut rand::thread_rng())).await;
//!         }
//!     }
//! }
//! ```

use std::{
    future::{Future, poll_fn},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rpc_defs::{CloseCode, Frame, GuestInfo, GuestService, SUBPROTOCOL, SUBPROTOCOL_V2};

/// `Sec-WebSocket-Protocol` offering both subprotocols, the push-key one first.
const OFFER_V2: &str = "tether.v2, tether.v1";
use tarpc::server::Serve;
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot, watch},
    time::{Instant, sleep_until, timeout},
};
use tokio_tungstenite::{
    Connector, MaybeTlsStream,
    tungstenite::{
        self,
        client::IntoClientRequest,
        http::{HeaderValue, header},
        protocol::WebSocketConfig,
    },
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    dispatch::Dispatcher,
    frame::{self, CodecError, DEFAULT_MAX_FRAME, FrameRef},
    handshake::{GuestHandshake, GuestStep, HandshakeError, Welcome, frame_name},
    link::{ABNORMAL, CloseInfo, IoEvent, Link, NO_STATUS, NORMAL},
    liveness::{Beat, Heartbeat},
    rpc::{self, GuestEncoder},
    ws::{TungsteniteWs, WsMsg, WsReadError},
};

type GuestWs = TungsteniteWs<MaybeTlsStream<TcpStream>>;

/// How the guest reaches the KBS tunnel; the same for every connection attempt.
#[derive(Clone)]
pub struct GuestTunnelConfig {
    /// `ws://host:port/kbs/v0/tunnel` or `wss://...`.
    pub url: String,
    /// TLS client configuration for `wss://` (ring provider); `None` uses the webpki roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Largest frame this guest reads, bytes (1 MiB); it sends no more than the server's Hello allows.
    pub max_frame: usize,
    /// Requests served at once; more are answered "throttled" (64).
    pub max_concurrent_requests: usize,
    /// Time allowed for TCP, TLS and the WebSocket upgrade (10 s).
    pub connect_timeout: Duration,
    /// Time allowed from upgrade to Welcome (10 s).
    pub handshake_timeout: Duration,
    /// Answers and control frames queued for the socket (64); while this many wait, the
    /// tunnel stops reading requests.
    pub write_queue: usize,
    /// A write side with data waiting and no progress for this long means the server stopped
    /// reading: the tunnel is dropped (30 s).
    pub write_stall_timeout: Duration,
    /// Time allowed for the closing handshake (2 s).
    pub close_timeout: Duration,
    /// Time allowed for the server to answer a `Reauth` (15 s).
    pub reauth_timeout: Duration,
    /// Heartbeat intervals (as announced by the server) of silence before giving up (3).
    pub missed_heartbeats: u32,
    /// WebSocket read buffer, bytes (4 KiB: a guest holds one tunnel, a simulator thousands).
    pub read_buffer_size: usize,
    /// WebSocket write buffer, bytes (8 KiB).
    pub write_buffer_size: usize,
    /// Local address to dial from (`None`: the system's choice). Simulators spread thousands
    /// of guests over several loopback addresses with it.
    pub local_addr: Option<std::net::IpAddr>,
    /// Offer `tether.v2` (a push key in the challenge, so pushes need no asymmetric
    /// operation) before `tether.v1` (true).
    pub offer_push_key: bool,
}

impl std::fmt::Debug for GuestTunnelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestTunnelConfig")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .field("max_frame", &self.max_frame)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .finish_non_exhaustive()
    }
}

impl GuestTunnelConfig {
    /// Defaults from PROTOCOL.md for the tunnel at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls: None,
            max_frame: DEFAULT_MAX_FRAME,
            max_concurrent_requests: 64,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            write_queue: 64,
            write_stall_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(2),
            reauth_timeout: Duration::from_secs(15),
            missed_heartbeats: 3,
            read_buffer_size: 4 * 1024,
            write_buffer_size: 8 * 1024,
            local_addr: None,
            offer_push_key: true,
        }
    }

    /// The same, over TLS with `tls`.
    pub fn with_tls(mut self, tls: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    fn websocket_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .write_buffer_size(self.write_buffer_size)
            .max_message_size(Some(self.max_frame))
            .max_frame_size(Some(self.max_frame))
    }
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL or the token cannot form a request.
    #[error("invalid tunnel request: {0}")]
    Request(String),
    /// TCP, TLS or the upgrade took longer than `connect_timeout`.
    #[error("connecting timed out")]
    ConnectTimeout,
    /// The server answered the upgrade with an HTTP error (401: the token was refused).
    #[error("tunnel endpoint answered HTTP {status}")]
    Http {
        /// HTTP status code.
        status: u16,
    },
    /// TCP, TLS or WebSocket failure.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The server did not select the `tether.v1` subprotocol.
    #[error("server did not select subprotocol {SUBPROTOCOL}")]
    Subprotocol,
    /// The handshake failed (bad Hello, unseal failure, Reject).
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// No Welcome within `handshake_timeout`.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The connection ended during the handshake.
    #[error("closed during the handshake ({code}): {reason}")]
    Closed {
        /// Close code.
        code: u16,
        /// Reason.
        reason: String,
    },
}

impl ConnectError {
    /// True when a fresh attestation token is needed before retrying (401, or 4401).
    pub fn needs_reattest(&self) -> bool {
        match self {
            Self::Http { status } => *status == 401,
            Self::Handshake(e) => e.needs_reattest(),
            Self::Closed { code, .. } => *code == CloseCode::Auth.code(),
            _ => false,
        }
    }
}

/// How a served tunnel ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    /// Close code and reason, and who closed.
    pub close: CloseInfo,
    /// Delay the server asked for in a GoAway before reconnecting.
    pub reconnect_after: Option<Duration>,
    /// How long the tunnel was up (a long one resets the backoff).
    pub connected_for: Duration,
}

impl Closed {
    /// True when a fresh attestation token is needed before reconnecting (4401).
    pub fn needs_reattest(&self) -> bool {
        self.close.code == CloseCode::Auth.code()
    }
}

/// Why an in-band re-authentication failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReauthError {
    /// Another `reauth` is waiting for its answer.
    #[error("a re-authentication is already in progress")]
    Busy,
    /// The server did not answer within `reauth_timeout`.
    #[error("re-authentication timed out")]
    Timeout,
    /// The Reauth frame was not sent: over the server's frame limit
    /// ([`CodecError::TooLarge`]), or not encodable.
    #[error("cannot send the token: {0}")]
    Frame(#[from] CodecError),
    /// The tunnel ended (a refused token closes it with 4401).
    #[error("tunnel closed ({}): {}", .0.close.code, .0.close.reason)]
    Closed(Closed),
}

enum Control {
    Reauth {
        token: String,
        reply: oneshot::Sender<Result<u64, ReauthError>>,
    },
}

struct Shared {
    welcome: Welcome,
    reauth_before: AtomicU64,
    close: CancellationToken,
    closed: watch::Receiver<Option<Closed>>,
    reauth_timeout: Duration,
}

/// The daemon's handle on an open tunnel: refresh its token, learn how it ended, close it.
#[derive(Clone)]
pub struct TunnelSession {
    shared: Arc<Shared>,
    control: mpsc::Sender<Control>,
}

impl std::fmt::Debug for TunnelSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelSession")
            .field("session_id", &self.shared.welcome.session_id)
            .field("guest_id", &self.shared.welcome.guest_id)
            .field("reauth_before", &self.reauth_before())
            .finish()
    }
}

impl TunnelSession {
    /// Server-chosen session id.
    pub fn session_id(&self) -> &str {
        &self.shared.welcome.session_id
    }

    /// The guest id the server attested.
    pub fn guest_id(&self) -> &str {
        &self.shared.welcome.guest_id
    }

    /// Unix time (seconds) by which [`TunnelSession::reauth`] must have succeeded.
    pub fn reauth_before(&self) -> u64 {
        self.shared.reauth_before.load(Ordering::Relaxed)
    }

    /// The server's heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(u64::from(self.shared.welcome.heartbeat_s))
    }

    /// Sends a fresh attestation token in band; returns the new `reauth_before`.
    pub async fn reauth(&self, token: String) -> Result<u64, ReauthError> {
        let (reply, answer) = oneshot::channel();
        let wait = self.shared.reauth_timeout;
        let sent = timeout(wait, self.control.send(Control::Reauth { token, reply })).await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(ReauthError::Closed(self.closed().await)),
            Err(_) => return Err(ReauthError::Timeout),
        }
        match timeout(wait, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ReauthError::Closed(self.closed().await)),
            Err(_) => Err(ReauthError::Timeout),
        }
    }

    /// Asks the tunnel to close normally (1000).
    pub fn close(&self) {
        self.shared.close.cancel();
    }

    /// True once the tunnel ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.borrow().is_some()
    }

    /// Resolves with how the tunnel ended.
    pub async fn closed(&self) -> Closed {
        let mut rx = self.shared.closed.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(closed) => closed.clone().unwrap_or_else(dropped),
            Err(_) => dropped(),
        }
    }
}

fn dropped() -> Closed {
    Closed {
        close: CloseInfo::local_code(ABNORMAL, "tunnel dropped before it was served to the end"),
        reconnect_after: None,
        connected_for: Duration::ZERO,
    }
}

/// An open tunnel past its handshake, ready to [`serve`](GuestTunnel::serve).
pub struct GuestTunnel {
    link: Link<GuestWs>,
    config: GuestTunnelConfig,
    shared: Arc<Shared>,
    control: mpsc::Sender<Control>,
    control_rx: mpsc::Receiver<Control>,
    closed_tx: watch::Sender<Option<Closed>>,
}

impl std::fmt::Debug for GuestTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestTunnel")
            .field("welcome", &self.shared.welcome)
            .finish_non_exhaustive()
    }
}

/// Dials the tunnel with `token` as Bearer, answers the challenge with `unseal`, and returns
/// the tunnel once the server welcomed it.
pub async fn connect<U>(
    config: &GuestTunnelConfig,
    token: &str,
    info: GuestInfo,
    unseal: U,
) -> Result<GuestTunnel, ConnectError>
where
    U: FnOnce(&[u8]) -> Result<Vec<u8>, String>,
{
    let mut request = config
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError::Request(e.to_string()))?;
    let mut bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ConnectError::Request("token is not a valid header value".into()))?;
    bearer.set_sensitive(true);
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    let offered = if config.offer_push_key {
        OFFER_V2
    } else {
        SUBPROTOCOL
    };
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(offered),
    );
    let connector = config.tls.clone().map(Connector::Rustls);
    let dial = async {
        match config.local_addr {
            None => {
                tokio_tungstenite::connect_async_tls_with_config(
                    request,
                    Some(config.websocket_config()),
                    true,
                    connector,
                )
                .await
            }
            Some(local) => {
                let stream = dial_from(local, request.uri())
                    .await
                    .map_err(tungstenite::Error::Io)?;
                tokio_tungstenite::client_async_tls_with_config(
                    request,
                    stream,
                    Some(config.websocket_config()),
                    connector,
                )
                .await
            }
        }
    };
    let (ws, response) = match timeout(config.connect_timeout, dial).await {
        Err(_) => return Err(ConnectError::ConnectTimeout),
        Ok(Err(tungstenite::Error::Http(resp))) => {
            return Err(ConnectError::Http {
                status: resp.status().as_u16(),
            });
        }
        Ok(Err(e)) => return Err(ConnectError::Connect(e.to_string())),
        Ok(Ok(pair)) => pair,
    };
    let selected = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .is_some_and(|p| {
            p.as_bytes() == SUBPROTOCOL.as_bytes()
                || (config.offer_push_key && p.as_bytes() == SUBPROTOCOL_V2.as_bytes())
        });
    let mut link = Link::new(TungsteniteWs(ws));
    if !selected {
        link.close(
            CloseCode::Protocol.code(),
            "subprotocol not selected",
            config.close_timeout,
        )
        .await;
        return Err(ConnectError::Subprotocol);
    }

    let mut handshake = GuestHandshake::new(info, unseal);
    let welcome = match timeout(
        config.handshake_timeout,
        run_handshake(&mut link, &mut handshake, config.max_frame),
    )
    .await
    {
        Ok(Ok(welcome)) => welcome,
        Ok(Err((err, close))) => {
            if let Some((code, reason)) = close {
                link.close(code, &reason, config.close_timeout).await;
            }
            return Err(err);
        }
        Err(_) => {
            link.close(
                CloseCode::Heartbeat.code(),
                "handshake timed out",
                config.close_timeout,
            )
            .await;
            return Err(ConnectError::HandshakeTimeout);
        }
    };

    let (control, control_rx) = mpsc::channel(4);
    let (closed_tx, closed_rx) = watch::channel(None);
    let shared = Arc::new(Shared {
        reauth_before: AtomicU64::new(welcome.reauth_before),
        welcome,
        close: CancellationToken::new(),
        closed: closed_rx,
        reauth_timeout: config.reauth_timeout,
    });
    Ok(GuestTunnel {
        link,
        config: config.clone(),
        shared,
        control,
        control_rx,
        closed_tx,
    })
}

/// A TCP connection to the URL's host from the local address `local`, Nagle off.
async fn dial_from(
    local: std::net::IpAddr,
    uri: &tungstenite::http::Uri,
) -> std::io::Result<TcpStream> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
    let host = uri.host().ok_or_else(|| invalid("URL without a host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    let mut last = invalid("host resolves to no address of the local address's family");
    for remote in tokio::net::lookup_host((host, port)).await? {
        if remote.is_ipv4() != local.is_ipv4() {
            continue;
        }
        let socket = if local.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(std::net::SocketAddr::new(local, 0))?;
        match socket.connect(remote).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Reads Hello, sends Proof, reads Welcome. On failure: the error and, when this end should
/// send one, the close to send.
async fn run_handshake<U>(
    link: &mut Link<GuestWs>,
    handshake: &mut GuestHandshake<U>,
    max_frame: usize,
) -> Result<Welcome, (ConnectError, Option<(u16, String)>)>
where
    U: FnOnce(&[u8]) -> Result<Vec<u8>, String>,
{
    loop {
        let frame = match link.next_event().await {
            IoEvent::Msg(WsMsg::Binary(bytes)) => match frame::decode(&bytes, max_frame) {
                Ok(frame) => frame,
                Err(e) => {
                    let code = e.close_code().code();
                    return Err((
                        ConnectError::Handshake(HandshakeError::Protocol(e.to_string())),
                        Some((code, e.to_string())),
                    ));
                }
            },
            IoEvent::Msg(WsMsg::Text) => {
                return Err((
                    ConnectError::Handshake(HandshakeError::Protocol("text frame".into())),
                    Some((
                        CloseCode::Protocol.code(),
                        "text frames are not allowed".into(),
                    )),
                ));
            }
            IoEvent::Msg(WsMsg::Close(c)) => {
                let (code, reason) = c.unwrap_or((NO_STATUS, String::new()));
                return Err((ConnectError::Closed { code, reason }, None));
            }
            IoEvent::ReadError(WsReadError::TooLarge) => {
                return Err((
                    ConnectError::Handshake(HandshakeError::Protocol("frame too large".into())),
                    Some((CloseCode::FrameTooLarge.code(), "frame too large".into())),
                ));
            }
            IoEvent::ReadError(WsReadError::Other(reason)) => {
                return Err((
                    ConnectError::Closed {
                        code: ABNORMAL,
                        reason,
                    },
                    None,
                ));
            }
            IoEvent::WriteError(e) => {
                return Err((
                    ConnectError::Closed {
                        code: ABNORMAL,
                        reason: e.to_string(),
                    },
                    None,
                ));
            }
            IoEvent::ReadEnd => {
                return Err((
                    ConnectError::Closed {
                        code: ABNORMAL,
                        reason: "connection lost".into(),
                    },
                    None,
                ));
            }
            IoEvent::Msg(WsMsg::Ping(_) | WsMsg::Pong(_))
            | IoEvent::WriteBlocked
            | IoEvent::RpcClosed => continue,
        };
        match handshake.receive(frame) {
            Ok(GuestStep::Send(proof)) => link.queue_frame(&proof),
            Ok(GuestStep::Established(welcome)) => return Ok(welcome),
            Err(e) => {
                let close = match &e {
                    // The server closes after its Reject; wait for that close.
                    HandshakeError::Rejected { .. } => {
                        let _ = timeout(Duration::from_secs(2), link.next_event()).await;
                        None
                    }
                    HandshakeError::Unseal(_) => Some((
                        CloseCode::Auth.code(),
                        "cannot unseal the challenge".to_owned(),
                    )),
                    HandshakeError::Protocol(_) | HandshakeError::Version(_) => {
                        Some((CloseCode::Protocol.code(), e.to_string()))
                    }
                };
                return Err((ConnectError::Handshake(e), close));
            }
        }
    }
}

/// Connects, and returns the session with the future that serves `service` until the tunnel
/// ends (drive it, e.g. `tokio::spawn` it when `S`'s futures are `Send`).
pub async fn connect_and_serve<S, U>(
    config: &GuestTunnelConfig,
    token: &str,
    info: GuestInfo,
    unseal: U,
    service: S,
) -> Result<(TunnelSession, impl Future<Output = Closed> + use<S, U>), ConnectError>
where
    S: GuestService + Clone + Send + 'static,
    U: FnOnce(&[u8]) -> Result<Vec<u8>, String>,
{
    let tunnel = connect(config, token, info, unseal).await?;
    let session = tunnel.session();
    Ok((session, tunnel.serve(service)))
}

impl GuestTunnel {
    /// What the server granted.
    pub fn welcome(&self) -> &Welcome {
        &self.shared.welcome
    }

    /// A handle for re-authenticating, watching and closing this tunnel.
    pub fn session(&self) -> TunnelSession {
        TunnelSession {
            shared: self.shared.clone(),
            control: self.control.clone(),
        }
    }

    /// Serves `service` until the tunnel ends. Requests run concurrently on this task (up to
    /// `max_concurrent_requests`); implementations should move blocking work off it.
    pub async fn serve<S>(self, service: S) -> Closed
    where
        S: GuestService + Clone + Send + 'static,
    {
        let span = tracing::info_span!(
            "tunnel",
            guest_id = %self.shared.welcome.guest_id,
            session_id = %self.shared.welcome.session_id,
        );
        let closed_tx = self.closed_tx.clone();
        let closed = self.run(service).instrument(span).await;
        let _ = closed_tx.send(Some(closed.clone()));
        closed
    }

    async fn run<S>(self, service: S) -> Closed
    where
        S: GuestService + Clone + Send + 'static,
    {
        let Self {
            mut link,
            config,
            shared,
            control: _,
            mut control_rx,
            closed_tx: _,
        } = self;
        let started = Instant::now();
        let max_frame = config.max_frame;
        let send_limit = usize::try_from(shared.welcome.max_frame)
            .unwrap_or(usize::MAX)
            .min(max_frame);
        let serve = move |ctx, request| Serve::serve(service.clone().serve(), ctx, request);
        let mut dispatcher = Dispatcher::new(
            serve,
            config.max_concurrent_requests,
            config.write_queue,
            GuestEncoder {
                max_frame: send_limit,
            },
        );
        let mut heartbeat = Heartbeat::new(
            Instant::now(),
            Duration::from_secs(u64::from(shared.welcome.heartbeat_s)),
            config.missed_heartbeats,
            false,
        );
        let mut pending_reauth: Option<oneshot::Sender<Result<u64, ReauthError>>> = None;
        let mut control_open = true;
        let mut go_away: Option<Duration> = None;
        tracing::info!("tunnel up");
        // One timer and one close listener for the tunnel's life, not one per loop turn.
        let timer = sleep_until(heartbeat.next_wake());
        let closing = shared.close.cancelled();
        tokio::pin!(timer, closing);

        let (close, send_close) = loop {
            let mut wake = heartbeat.next_wake();
            if let Some(stall) = link.stall_deadline(config.write_stall_timeout) {
                wake = wake.min(stall);
            }
            if timer.deadline() != wake {
                timer.as_mut().reset(wake);
            }
            tokio::select! {
                () = &mut closing => {
                    break (CloseInfo::local_code(NORMAL, "guest closing"), true);
                }
                ev = poll_fn(|cx| {
                    dispatcher.poll_calls(cx);
                    link.poll_io(cx, &mut dispatcher)
                }) => {
                    let msg = match ev {
                        IoEvent::Msg(msg) => msg,
                        IoEvent::ReadError(WsReadError::TooLarge) => {
                            break (CloseInfo::local(CloseCode::FrameTooLarge, "frame too large"), true);
                        }
                        IoEvent::ReadError(WsReadError::Other(e)) => break (CloseInfo::peer(ABNORMAL, e), false),
                        IoEvent::ReadEnd => break (CloseInfo::peer(ABNORMAL, "connection lost"), false),
                        IoEvent::WriteError(e) => break (CloseInfo::peer(ABNORMAL, e.to_string()), false),
                        IoEvent::WriteBlocked => continue,
                        IoEvent::RpcClosed => break (CloseInfo::local_code(1011, "rpc server stopped"), true),
                    };
                    heartbeat.heard(Instant::now());
                    match msg {
                        WsMsg::Binary(bytes) => match frame::decode_ref(&bytes, max_frame) {
                            Ok(FrameRef::Rpc(payload)) => match rpc::decode_incoming(&payload) {
                                Ok(msg) => dispatcher.receive(msg),
                                Err(e) => break (CloseInfo::local(CloseCode::Protocol, format!("bad rpc message: {e}")), true),
                            },
                            Ok(FrameRef::Other(Frame::ReauthOk { reauth_before })) => match pending_reauth.take() {
                                Some(reply) => {
                                    shared.reauth_before.store(reauth_before, Ordering::Relaxed);
                                    tracing::info!(reauth_before, "re-attested in band");
                                    let _ = reply.send(Ok(reauth_before));
                                }
                                None => break (CloseInfo::local(CloseCode::Protocol, "unexpected ReauthOk"), true),
                            },
                            Ok(FrameRef::Other(Frame::GoAway { reconnect_after_ms })) => {
                                tracing::info!(reconnect_after_ms, "server draining");
                                go_away = Some(Duration::from_millis(reconnect_after_ms));
                            }
                            Ok(FrameRef::Other(other)) => break (CloseInfo::local(
                                CloseCode::Protocol,
                                format!("unexpected {} frame", frame_name(&other)),
                            ), true),
                            Err(e) => break (CloseInfo::local(e.close_code(), e.to_string()), true),
                        },
                        WsMsg::Text => break (CloseInfo::local(CloseCode::Protocol, "text frames are not allowed"), true),
                        WsMsg::Ping(_) | WsMsg::Pong(_) => {}
                        WsMsg::Close(c) => {
                            let (code, reason) = c.unwrap_or((NO_STATUS, String::new()));
                            link.finish_peer_close(config.close_timeout).await;
                            break (CloseInfo::peer(code, reason), false);
                        }
                    }
                }
                cmd = control_rx.recv(), if control_open => match cmd {
                    Some(Control::Reauth { token, reply }) => {
                        if pending_reauth.is_some() {
                            let _ = reply.send(Err(ReauthError::Busy));
                        } else {
                            // Over the limit it would only make the server close with 4413.
                            match frame::encode_within(&Frame::Reauth { token }, send_limit) {
                                Ok(bytes) => {
                                    link.queue(WsMsg::Binary(bytes.into()));
                                    pending_reauth = Some(reply);
                                }
                                Err(e) => {
                                    let _ = reply.send(Err(e.into()));
                                }
                            }
                        }
                    }
                    None => control_open = false,
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if link.stall_deadline(config.write_stall_timeout).is_some_and(|at| now >= at) {
                        break (CloseInfo::local(CloseCode::Heartbeat, "server stopped reading"), false);
                    }
                    if heartbeat.poll(now) == Beat::Silent {
                        break (CloseInfo::local(CloseCode::Heartbeat, "server silent"), true);
                    }
                }
            }
        };
        if send_close {
            link.close(close.code, &close.reason, config.close_timeout)
                .await;
        }
        tracing::info!(code = close.code, reason = %close.reason, by_peer = close.by_peer, "tunnel closed");
        let closed = Closed {
            close,
            reconnect_after: go_away,
            connected_for: started.elapsed(),
        };
        if let Some(reply) = pending_reauth {
            let _ = reply.send(Err(ReauthError::Closed(closed.clone())));
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offer_names_both_subprotocols_push_key_first() {
        assert_eq!(OFFER_V2, format!("{SUBPROTOCOL_V2}, {SUBPROTOCOL}"));
    }
}
