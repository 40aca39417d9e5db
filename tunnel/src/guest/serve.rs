//! Serving `GuestService` on an open tunnel until it ends: calls in and answers out, the
//! heartbeat, in-band re-authentication, GoAway, and the close.

use std::{
    future::poll_fn,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use rpc_defs::{CloseCode, Frame, GuestService};
use tarpc::server::Serve;
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::{Instant, sleep_until},
};
use tracing::Instrument;

use super::{
    GuestWs,
    config::GuestTunnelConfig,
    session::{Closed, Control, ReauthError, Shared, TunnelSession},
};
use crate::{
    dispatch::Dispatcher,
    frame::{self, FrameRef},
    handshake::{Welcome, frame_name},
    link::{ABNORMAL, CloseInfo, IoEvent, Link, NO_STATUS, NORMAL},
    liveness::{Beat, Heartbeat},
    rpc::{self, GuestEncoder, Incoming},
    ws::{WsMsg, WsReadError},
};

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

impl GuestTunnel {
    /// The tunnel on `link`, which the server just welcomed.
    pub(super) fn new(link: Link<GuestWs>, config: &GuestTunnelConfig, welcome: Welcome) -> Self {
        let (control, control_rx) = mpsc::channel(4);
        let (shared, closed_tx) = Shared::new(welcome, config.reauth_timeout);
        Self {
            link,
            config: config.clone(),
            shared,
            control,
            control_rx,
            closed_tx,
        }
    }

    /// What the server granted.
    pub fn welcome(&self) -> &Welcome {
        &self.shared.welcome
    }

    /// A handle for re-authenticating, watching and closing this tunnel.
    pub fn session(&self) -> TunnelSession {
        TunnelSession::new(self.shared.clone(), self.control.clone())
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
        let mut state = ServeState::new(shared, &config);
        let serve = move |ctx, request| Serve::serve(service.clone().serve(), ctx, request);
        let mut dispatcher = Dispatcher::new(
            serve,
            config.max_concurrent_requests,
            config.write_queue,
            GuestEncoder {
                max_frame: state.send_limit,
            },
        );
        let mut control_open = true;
        tracing::info!("tunnel up");
        // One timer and one close listener for the tunnel's life, not one per loop turn.
        let timer = sleep_until(state.heartbeat.next_wake());
        let close_requested = state.shared.close.clone();
        let closing = close_requested.cancelled();
        tokio::pin!(timer, closing);

        let ending = loop {
            let mut wake = state.heartbeat.next_wake();
            if let Some(stall) = link.stall_deadline(config.write_stall_timeout) {
                wake = wake.min(stall);
            }
            if timer.deadline() != wake {
                timer.as_mut().reset(wake);
            }
            tokio::select! {
                () = &mut closing => {
                    break Ending::sending(CloseInfo::local_code(NORMAL, "guest closing"));
                }
                ev = poll_fn(|cx| {
                    dispatcher.poll_calls(cx);
                    link.poll_io(cx, &mut dispatcher)
                }) => {
                    let msg = match message(ev) {
                        Ok(Some(msg)) => msg,
                        Ok(None) => continue,
                        Err(ending) => break ending,
                    };
                    state.heartbeat.heard(Instant::now());
                    match msg {
                        WsMsg::Binary(bytes) => match state.on_frame(&bytes) {
                            Ok(Some(call)) => dispatcher.receive(call),
                            Ok(None) => {}
                            Err(close) => break Ending::sending(close),
                        },
                        WsMsg::Text => break Ending::sending(CloseInfo::local(
                            CloseCode::Protocol,
                            "text frames are not allowed",
                        )),
                        WsMsg::Ping(_) | WsMsg::Pong(_) => {}
                        WsMsg::Close(c) => {
                            let (code, reason) = c.unwrap_or((NO_STATUS, String::new()));
                            link.finish_peer_close(config.close_timeout).await;
                            break Ending::silent(CloseInfo::peer(code, reason));
                        }
                    }
                }
                cmd = control_rx.recv(), if control_open => match cmd {
                    Some(Control::Reauth { token, reply }) => {
                        if let Some(bytes) = state.reauth_frame(token, reply) {
                            link.queue(WsMsg::Binary(bytes.into()));
                        }
                    }
                    None => control_open = false,
                },
                () = &mut timer => {
                    let now = Instant::now();
                    let stall = link.stall_deadline(config.write_stall_timeout);
                    if let Some(ending) = state.on_timer(now, stall) {
                        break ending;
                    }
                }
            }
        };
        let close = ending.close;
        if ending.send {
            link.close(close.code, &close.reason, config.close_timeout)
                .await;
        }
        tracing::info!(code = close.code, reason = %close.reason, by_peer = close.by_peer, "tunnel closed");
        state.finish(close, started.elapsed())
    }
}

/// Why serving stopped, and whether this end still sends the close frame (not when the peer
/// closed, the connection is gone, or the server stopped reading).
struct Ending {
    close: CloseInfo,
    send: bool,
}

impl Ending {
    fn sending(close: CloseInfo) -> Self {
        Self { close, send: true }
    }

    fn silent(close: CloseInfo) -> Self {
        Self { close, send: false }
    }
}

/// The message in a socket event; `None` when the event needs nothing, or how it ends the
/// tunnel.
fn message(ev: IoEvent) -> Result<Option<WsMsg>, Ending> {
    match ev {
        IoEvent::Msg(msg) => Ok(Some(msg)),
        IoEvent::WriteBlocked => Ok(None),
        IoEvent::ReadError(WsReadError::TooLarge) => Err(Ending::sending(CloseInfo::local(
            CloseCode::FrameTooLarge,
            "frame too large",
        ))),
        IoEvent::ReadError(WsReadError::Other(e)) => {
            Err(Ending::silent(CloseInfo::peer(ABNORMAL, e)))
        }
        IoEvent::ReadEnd => Err(Ending::silent(CloseInfo::peer(ABNORMAL, "connection lost"))),
        IoEvent::WriteError(e) => Err(Ending::silent(CloseInfo::peer(ABNORMAL, e.to_string()))),
        IoEvent::RpcClosed => Err(Ending::sending(CloseInfo::local_code(
            1011,
            "rpc server stopped",
        ))),
    }
}

/// What the serving loop keeps between events, apart from the socket and the running calls.
/// It does no I/O, so tests drive it with frames and instants.
struct ServeState {
    shared: Arc<Shared>,
    /// Largest frame read (ours).
    max_frame: usize,
    /// Largest frame sent: the server's limit, within ours.
    send_limit: usize,
    heartbeat: Heartbeat,
    /// The answer a [`TunnelSession::reauth`] awaits.
    pending_reauth: Option<oneshot::Sender<Result<u64, ReauthError>>>,
    /// The reconnect delay of the server's GoAway.
    go_away: Option<Duration>,
}

impl ServeState {
    fn new(shared: Arc<Shared>, config: &GuestTunnelConfig) -> Self {
        let send_limit = usize::try_from(shared.welcome.max_frame)
            .unwrap_or(usize::MAX)
            .min(config.max_frame);
        let heartbeat = Heartbeat::new(
            Instant::now(),
            Duration::from_secs(u64::from(shared.welcome.heartbeat_s)),
            config.missed_heartbeats,
            false,
        );
        Self {
            shared,
            max_frame: config.max_frame,
            send_limit,
            heartbeat,
            pending_reauth: None,
            go_away: None,
        }
    }

    /// A binary message from the server: a call for the dispatcher, `None` when handled here,
    /// or the close it forces.
    fn on_frame(&mut self, bytes: &[u8]) -> Result<Option<Incoming>, CloseInfo> {
        match frame::decode_ref(bytes, self.max_frame) {
            Ok(FrameRef::Rpc(payload)) => rpc::decode_incoming(&payload).map(Some).map_err(|e| {
                CloseInfo::local(CloseCode::Protocol, format!("bad rpc message: {e}"))
            }),
            Ok(FrameRef::Other(Frame::ReauthOk { reauth_before })) => {
                let Some(reply) = self.pending_reauth.take() else {
                    return Err(CloseInfo::local(CloseCode::Protocol, "unexpected ReauthOk"));
                };
                self.shared
                    .reauth_before
                    .store(reauth_before, Ordering::Relaxed);
                tracing::info!(reauth_before, "re-attested in band");
                let _ = reply.send(Ok(reauth_before));
                Ok(None)
            }
            Ok(FrameRef::Other(Frame::GoAway { reconnect_after_ms })) => {
                tracing::info!(reconnect_after_ms, "server draining");
                self.go_away = Some(Duration::from_millis(reconnect_after_ms));
                Ok(None)
            }
            Ok(FrameRef::Other(other)) => Err(CloseInfo::local(
                CloseCode::Protocol,
                format!("unexpected {} frame", frame_name(&other)),
            )),
            Err(e) => Err(CloseInfo::local(e.close_code(), e.to_string())),
        }
    }

    /// The Reauth frame to send for a session's `reauth`, which then awaits the ReauthOk; or
    /// `None` when `reply` was answered at once (one is pending, or the frame cannot be sent).
    fn reauth_frame(
        &mut self,
        token: String,
        reply: oneshot::Sender<Result<u64, ReauthError>>,
    ) -> Option<Vec<u8>> {
        if self.pending_reauth.is_some() {
            let _ = reply.send(Err(ReauthError::Busy));
            return None;
        }
        // Over the limit it would only make the server close with 4413.
        match frame::encode_within(&Frame::Reauth { token }, self.send_limit) {
            Ok(bytes) => {
                self.pending_reauth = Some(reply);
                Some(bytes)
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                None
            }
        }
    }

    /// The timer fired at `now`: past `stall_at` the server stopped reading our writes (a
    /// close could not get through either); after missed heartbeats it went silent.
    fn on_timer(&mut self, now: Instant, stall_at: Option<Instant>) -> Option<Ending> {
        if stall_at.is_some_and(|at| now >= at) {
            return Some(Ending::silent(CloseInfo::local(
                CloseCode::Heartbeat,
                "server stopped reading",
            )));
        }
        if self.heartbeat.poll(now) == Beat::Silent {
            return Some(Ending::sending(CloseInfo::local(
                CloseCode::Heartbeat,
                "server silent",
            )));
        }
        None
    }

    /// How the tunnel ended; a `reauth` still waiting for its answer learns it too.
    fn finish(self, close: CloseInfo, connected_for: Duration) -> Closed {
        let closed = Closed {
            close,
            reconnect_after: self.go_away,
            connected_for,
        };
        if let Some(reply) = self.pending_reauth {
            let _ = reply.send(Err(ReauthError::Closed(closed.clone())));
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::CodecError;

    const HEARTBEAT_S: u32 = 10;

    fn state(server_max_frame: u32) -> ServeState {
        let welcome = Welcome {
            session_id: "s1".into(),
            guest_id: "g1".into(),
            reauth_before: 100,
            heartbeat_s: HEARTBEAT_S,
            max_frame: server_max_frame,
            push_key: None,
        };
        let config = GuestTunnelConfig::new("ws://kbs.invalid/kbs/v0/tunnel");
        let (shared, _closed_tx) = Shared::new(welcome, config.reauth_timeout);
        ServeState::new(shared, &config)
    }

    fn encoded(frame: &Frame) -> Vec<u8> {
        frame::encode(frame).unwrap()
    }

    #[tokio::test]
    async fn a_reauth_is_sent_once_and_its_answer_moves_the_deadline() {
        let mut state = state(64 * 1024);
        let (reply, answer) = oneshot::channel();
        let bytes = state.reauth_frame("fresh".into(), reply).unwrap();
        assert_eq!(
            frame::decode(&bytes, usize::MAX).unwrap(),
            Frame::Reauth {
                token: "fresh".into()
            }
        );

        let (second, busy) = oneshot::channel();
        assert!(state.reauth_frame("again".into(), second).is_none());
        assert_eq!(busy.await.unwrap(), Err(ReauthError::Busy));

        let ok = encoded(&Frame::ReauthOk { reauth_before: 500 });
        assert!(state.on_frame(&ok).unwrap().is_none());
        assert_eq!(answer.await.unwrap(), Ok(500));
        assert_eq!(state.shared.reauth_before.load(Ordering::Relaxed), 500);
    }

    #[tokio::test]
    async fn a_token_over_the_servers_frame_limit_is_refused_without_sending() {
        let mut state = state(64);
        let (reply, answer) = oneshot::channel();
        assert!(state.reauth_frame("x".repeat(100), reply).is_none());
        assert!(matches!(
            answer.await.unwrap(),
            Err(ReauthError::Frame(CodecError::TooLarge { .. }))
        ));
        assert!(state.pending_reauth.is_none());
    }

    #[test]
    fn frames_the_guest_never_asked_for_close_the_tunnel_as_protocol_errors() {
        let mut state = state(64 * 1024);
        let protocol = CloseCode::Protocol.code();
        let unasked = encoded(&Frame::ReauthOk { reauth_before: 1 });
        assert_eq!(state.on_frame(&unasked).unwrap_err().code, protocol);
        let reauth = encoded(&Frame::Reauth { token: "t".into() });
        let close = state.on_frame(&reauth).unwrap_err();
        assert_eq!(
            (close.code, close.reason.as_str()),
            (protocol, "unexpected Reauth frame")
        );
        let garbage = encoded(&Frame::Rpc(vec![0xff]));
        let close = state.on_frame(&garbage).unwrap_err();
        assert_eq!(close.code, protocol);
        assert!(close.reason.starts_with("bad rpc message"), "{close:?}");
        assert!(!close.by_peer);
    }

    #[tokio::test]
    async fn go_away_and_a_pending_reauth_are_reported_in_how_the_tunnel_ended() {
        let mut state = state(64 * 1024);
        let drain = encoded(&Frame::GoAway {
            reconnect_after_ms: 1500,
        });
        assert!(state.on_frame(&drain).unwrap().is_none());
        let (reply, answer) = oneshot::channel();
        assert!(state.reauth_frame("fresh".into(), reply).is_some());

        let close = CloseInfo::peer(1001, "going away");
        let closed = state.finish(close.clone(), Duration::from_secs(7));
        assert_eq!(closed.reconnect_after, Some(Duration::from_millis(1500)));
        assert_eq!(closed.connected_for, Duration::from_secs(7));
        assert_eq!(
            answer.await.unwrap(),
            Err(ReauthError::Closed(closed.clone()))
        );
        assert_eq!(closed.close, close);
    }

    #[test]
    fn a_stalled_writer_ends_silently_and_a_silent_server_with_a_close() {
        let mut state = state(64 * 1024);
        let start = Instant::now();
        assert!(state.on_timer(start, None).is_none());

        let stalled = state.on_timer(start, Some(start)).unwrap();
        assert!(
            !stalled.send,
            "the server is not reading: no close can get through"
        );
        assert_eq!(stalled.close.reason, "server stopped reading");

        let missed = GuestTunnelConfig::new("ws://x").missed_heartbeats;
        let later = start + Duration::from_secs(u64::from(HEARTBEAT_S) * u64::from(missed) + 1);
        let silent = state.on_timer(later, None).unwrap();
        assert!(silent.send);
        assert_eq!(
            (silent.close.code, silent.close.reason.as_str()),
            (CloseCode::Heartbeat.code(), "server silent")
        );
    }

    #[test]
    fn dead_sockets_end_without_a_close_and_local_failures_with_one() {
        let lost = message(IoEvent::ReadEnd).err().unwrap();
        assert!(!lost.send && lost.close.by_peer);
        let too_large = message(IoEvent::ReadError(WsReadError::TooLarge))
            .err()
            .unwrap();
        assert!(too_large.send);
        assert_eq!(too_large.close.code, CloseCode::FrameTooLarge.code());
        assert!(matches!(message(IoEvent::WriteBlocked), Ok(None)));
    }
}
