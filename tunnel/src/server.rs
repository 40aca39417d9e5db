//! The KBS end of a tunnel: after the HTTP layer verified the Bearer token and upgraded,
//! [`serve_guest_tunnel`] runs the handshake, registers the tunnel in the [`Hub`], serves
//! calls until the tunnel ends, and cleans up.
//!
//! ```ignore
//! async fn tunnel(ws: WebSocketUpgrade, State(app): State<App>, headers: HeaderMap) -> Response {
//!     let claims = match app.verify_bearer(&headers) { Ok(c) => c, Err(e) => return e.into_response() };
//!     let (challenge_jwe, nonce) = app.seal_challenge(&claims.tee_pubkey)?;
//!     let accept = AcceptParams { guest_id: claims.guest_id, labels: claims.labels,
//!         challenge_jwe, expected_nonce: nonce, push_key: None, reauth_before: claims.exp - 60,
//!         reauth: app.reauth_fn(claims.tee_pubkey), on_proven: Some(app.record_fn(claims)),
//!         limits: app.tunnel_limits.clone() /* Arc */ };
//!     let (hub, observer, drain) = (app.hub.clone(), app.tunnel_metrics.clone(), app.drain.clone());
//!     configure_upgrade(ws, &accept.limits)
//!         .on_upgrade(move |socket| serve_guest_tunnel(socket, accept, hub, observer, drain))
//! }
//! ```

use std::{
    fmt,
    future::{Future, poll_fn},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use bytes::Bytes;
use futures::future::BoxFuture;
use rand::Rng;
use rpc_defs::{CloseCode, Frame, GuestServiceResponse, SUBPROTOCOL, SUBPROTOCOL_V2};
use tarpc::Response;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    calls::{CallQueue, CallTable, Outgoing},
    frame::{self, DEFAULT_MAX_FRAME, DEFAULT_MAX_GUEST_FRAME, FrameRef},
    handle::{TunnelHandle, TunnelInfo},
    handshake::{ServerHandshake, ServerHandshakeParams, ServerOutcome, frame_name},
    hub::Hub,
    link::{ABNORMAL, CloseInfo, IoEvent, Link, NO_STATUS, NORMAL, RpcSide},
    liveness::{Beat, Heartbeat, instant_at_unix},
    observer::TunnelObserver,
    push_key::PushKey,
    rpc,
    ws::{AxumWs, WsIo, WsMsg, WsReadError},
};

/// Checks a guest's fresh token sent in `Frame::Reauth` (same TEE key and guest as the
/// tunnel's) and returns the new `reauth_before` (Unix seconds), or why it is refused.
pub type ReauthFn = Arc<dyn Fn(String) -> BoxFuture<'static, Result<u64, String>> + Send + Sync>;

/// Called once the guest proved possession of the token's TEE key, with the new tunnel's
/// epoch, just before the tunnel is registered in the [`Hub`]: the place to record what the
/// token says about the guest, since nothing about it may change before the proof.
///
/// It runs in the handshake phase and is dropped with it, so it costs an idle tunnel nothing
/// (unlike recording on `TunnelEvent::Connected`, which would need the token kept with the
/// handle or in a side table for the tunnel's lifetime).
pub type ProvenFn = Box<dyn FnOnce(u64) + Send>;

/// Limits and timers of a tunnel (defaults: docs/protocol.md, "Limits and timers").
#[derive(Clone, Debug)]
pub struct TunnelLimits {
    /// Largest frame the KBS sends, bytes (1 MiB; a guest reads up to 1 MiB by default).
    pub max_frame: usize,
    /// Largest frame a guest may send, bytes (256 KiB, at most `max_frame`): announced in the
    /// Hello, enforced on every read (4413 beyond it). A guest sends answers and tokens, far
    /// smaller than the resources the KBS sends; and tungstenite keeps its read buffer at the
    /// size of the largest frame it read, so this bounds what one guest can make its tunnel
    /// hold for good.
    pub max_guest_frame: usize,
    /// Calls in flight per tunnel; more are refused with `CallError::TooManyInFlight` (64).
    pub max_in_flight: usize,
    /// Deadline of a call that names none (10 s).
    pub call_deadline: Duration,
    /// Ping interval (20 s); announced to the guest in whole seconds, at least 1.
    pub heartbeat: Duration,
    /// Silent intervals after which a peer is dropped with 4408 (3).
    pub missed_heartbeats: u32,
    /// Time allowed from upgrade to Welcome (10 s).
    pub handshake_timeout: Duration,
    /// Kept for configuration compatibility: the KBS end queues no frames beyond its calls,
    /// so its write queue is bounded by `max_in_flight` (plus one cancel per call).
    pub write_queue: usize,
    /// A write side with data waiting and no progress for this long means the guest stopped
    /// reading: the tunnel is dropped (10 s).
    pub write_stall_timeout: Duration,
    /// Time allowed for the closing handshake (2 s).
    pub close_timeout: Duration,
    /// Time allowed for the reauth callback (10 s); past it the tunnel closes with 4401.
    pub reauth_timeout: Duration,
    /// Base delay announced in GoAway when draining; each tunnel gets it plus a random share
    /// of it again, so guests do not all come back at once (1 s).
    pub drain_reconnect_after: Duration,
    /// WebSocket read buffer, bytes; every idle tunnel holds one (1 KiB: tunnel frames are
    /// small, larger ones grow it, and 1, 2 and 4 KiB give the same pipelined throughput).
    pub read_buffer_size: usize,
    /// WebSocket write buffer, bytes (8 KiB).
    pub write_buffer_size: usize,
}

impl Default for TunnelLimits {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            max_guest_frame: DEFAULT_MAX_GUEST_FRAME,
            max_in_flight: 64,
            call_deadline: Duration::from_secs(10),
            heartbeat: Duration::from_secs(20),
            missed_heartbeats: 3,
            handshake_timeout: Duration::from_secs(10),
            write_queue: 64,
            write_stall_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            reauth_timeout: Duration::from_secs(10),
            drain_reconnect_after: Duration::from_secs(1),
            read_buffer_size: 1024,
            write_buffer_size: 8 * 1024,
        }
    }
}

impl TunnelLimits {
    /// The largest frame a guest may send: `max_guest_frame`, never above `max_frame`.
    pub fn guest_frame_limit(&self) -> usize {
        self.max_guest_frame.min(self.max_frame)
    }

    /// Checks the limits once at start; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("call_deadline", self.call_deadline),
            ("heartbeat", self.heartbeat),
            ("handshake_timeout", self.handshake_timeout),
            ("write_stall_timeout", self.write_stall_timeout),
            ("close_timeout", self.close_timeout),
            ("reauth_timeout", self.reauth_timeout),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
            return Err(format!("tunnel limit `{name}` must be greater than zero"));
        }
        if self.max_frame < 4096 || self.max_frame > u32::MAX as usize {
            return Err("tunnel limit `max_frame` must be between 4096 and 2^32-1 bytes".into());
        }
        if self.max_guest_frame < 4096 {
            return Err("tunnel limit `max_guest_frame` must be at least 4096 bytes".into());
        }
        if self.max_in_flight == 0 || self.write_queue == 0 || self.missed_heartbeats == 0 {
            return Err(
                "tunnel limits `max_in_flight`, `write_queue` and `missed_heartbeats` must be at least 1"
                    .into(),
            );
        }
        if self.read_buffer_size == 0 {
            return Err("tunnel limit `read_buffer_size` must be at least 1".into());
        }
        Ok(())
    }

    fn heartbeat_s(&self) -> u32 {
        let secs = self.heartbeat.as_secs_f64().ceil();
        (secs as u32).max(1)
    }
}

/// What the HTTP layer knows about a guest when it upgrades: its attested identity, the
/// challenge sealed to its TEE key, and the token's lifetime.
pub struct AcceptParams {
    /// Attested guest id (token claims).
    pub guest_id: String,
    /// Attested labels (token claims).
    pub labels: crate::labels::Labels,
    /// JWE of `expected_nonce`, sealed to the token's TEE key.
    pub challenge_jwe: Vec<u8>,
    /// The 32 random bytes the guest must return.
    pub expected_nonce: [u8; 32],
    /// The push key `challenge_jwe` also seals (after the nonce), when the guest offered
    /// `tether.v2` ([`offers_push_key`]); the handle keeps it for sealing pushes.
    pub push_key: Option<PushKey>,
    /// Unix time (seconds) by which the guest must re-attest in band.
    pub reauth_before: u64,
    /// Checks fresh tokens sent with `Frame::Reauth`.
    pub reauth: ReauthFn,
    /// Called after a good proof, before registration (see [`ProvenFn`]).
    pub on_proven: Option<ProvenFn>,
    /// Limits and timers.
    /// Shared by the tunnels of one server: a copy per tunnel would cost ~160 bytes each.
    pub limits: Arc<TunnelLimits>,
}

impl fmt::Debug for AcceptParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcceptParams")
            .field("guest_id", &self.guest_id)
            .field("labels", &self.labels)
            .field("expected_nonce", &"[redacted]")
            .field("reauth_before", &self.reauth_before)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Applies the tunnel's buffer and size limits to an upgrade and selects `tether.v2` when
/// offered, else `tether.v1`.
pub fn configure_upgrade<F>(ws: WebSocketUpgrade<F>, limits: &TunnelLimits) -> WebSocketUpgrade<F> {
    ws.read_buffer_size(limits.read_buffer_size)
        .write_buffer_size(limits.write_buffer_size)
        .max_message_size(limits.guest_frame_limit())
        .max_frame_size(limits.guest_frame_limit())
        .protocols([SUBPROTOCOL_V2, SUBPROTOCOL])
}

fn is_tether(protocol: &[u8]) -> bool {
    protocol == SUBPROTOCOL.as_bytes() || protocol == SUBPROTOCOL_V2.as_bytes()
}

/// True when the client offered `tether.v1` or `tether.v2` (answer 400 before upgrading
/// otherwise; `serve_guest_tunnel` closes such a socket with 4400).
pub fn offers_subprotocol<F>(ws: &WebSocketUpgrade<F>) -> bool {
    ws.requested_protocols().any(|p| is_tether(p.as_bytes()))
}

/// True when the client offered `tether.v2`: its challenge may carry a push key.
pub fn offers_push_key<F>(ws: &WebSocketUpgrade<F>) -> bool {
    ws.requested_protocols()
        .any(|p| p.as_bytes() == SUBPROTOCOL_V2.as_bytes())
}

/// Runs one guest tunnel to its end: handshake (within `limits.handshake_timeout`),
/// registration in `hub` (closing a superseded tunnel with 4409), serving, unregistration
/// by epoch. Outcomes go to `observer`; cancelling `drain` sends GoAway then closes 4503.
pub fn serve_guest_tunnel(
    socket: WebSocket,
    accept: AcceptParams,
    hub: Hub,
    observer: Arc<dyn TunnelObserver>,
    drain: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let session_id = new_session_id();
    let span = tracing::info_span!("tunnel", guest_id = %accept.guest_id, session_id = %session_id);
    // Two phases in one task. The handshake phase is boxed and freed when it ends; `then`
    // keeps either it or the serving phase, never both, so an idle tunnel's task holds only
    // the serving state (the upgrade's arguments are not kept alongside it).
    let handshake = Box::pin(serve(socket, accept, session_id, hub, observer, drain));
    futures::FutureExt::then(handshake, |established| match established {
        Some(established) => futures::future::Either::Left(established.run()),
        None => futures::future::Either::Right(std::future::ready(())),
    })
    .instrument(span)
}

/// A tunnel past its handshake: everything its serving phase needs, held once.
struct Established {
    link: Link<AxumWs>,
    handle: Arc<TunnelHandle>,
    reauth: ReauthFn,
    reauth_before: u64,
    limits: Arc<TunnelLimits>,
    hub: Hub,
    observer: Arc<dyn TunnelObserver>,
    drain: CancellationToken,
}

impl Established {
    /// Not an `async fn`: its `self` would be stored twice in the future (the argument and
    /// the binding it moves into), ~0.7 KiB more per idle tunnel; the block uses it in place.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would keep `self` twice in the future"
    )]
    fn run(mut self) -> impl Future<Output = ()> + Send {
        async move {
            let serving = Serving {
                link: &mut self.link,
                table: CallTable::default(),
                handle: &self.handle,
                reauth: self.reauth.clone(),
                reauth_before: self.reauth_before,
                limits: &self.limits,
                drain: &self.drain,
            };
            let close = serving.run().await;
            // Calls made through clones of the handle fail fast from now on, queued ones
            // included; calls waiting for an answer failed as the call table was dropped.
            self.handle.shut();
            self.hub
                .unregister(&self.handle.guest_id, self.handle.epoch, close.code);
            self.observer
                .disconnected(&self.handle.guest_id, close.code, &close.reason);
            tracing::info!(code = close.code, reason = %close.reason, by_peer = close.by_peer, "tunnel closed");
        }
    }
}

/// The handshake phase: subprotocol check, proof of possession, registration. Returns the
/// serving phase's state, or `None` when the tunnel ended here.
async fn serve(
    socket: WebSocket,
    accept: AcceptParams,
    session_id: String,
    hub: Hub,
    observer: Arc<dyn TunnelObserver>,
    drain: CancellationToken,
) -> Option<Established> {
    let AcceptParams {
        guest_id,
        labels,
        challenge_jwe,
        expected_nonce,
        push_key,
        reauth_before,
        reauth,
        on_proven,
        limits,
    } = accept;
    let subprotocol_ok = socket.protocol().is_some_and(|p| is_tether(p.as_bytes()));
    let mut link = Link::new(AxumWs(socket));
    if !subprotocol_ok {
        observer.handshake("protocol_error");
        tracing::info!("tunnel refused: subprotocol {SUBPROTOCOL} not negotiated");
        let reason = format!("subprotocol {SUBPROTOCOL} required");
        Box::pin(link.close(CloseCode::Protocol.code(), &reason, limits.close_timeout)).await;
        return None;
    }

    let mut handshake = ServerHandshake::new(
        challenge_jwe,
        expected_nonce,
        ServerHandshakeParams {
            guest_id: guest_id.clone(),
            session_id: session_id.clone(),
            heartbeat_s: limits.heartbeat_s(),
            max_frame: u32::try_from(limits.guest_frame_limit()).unwrap_or(u32::MAX),
            reauth_before,
        },
    );
    // Boxed: the handshake's state is freed once it is over instead of widening this
    // future, which lives as long as the tunnel.
    let info = match Box::pin(run_handshake(&mut link, &mut handshake, &limits)).await {
        Ok(info) => {
            observer.handshake("ok");
            info
        }
        Err((outcome, close)) => {
            observer.handshake(outcome);
            tracing::info!(outcome, code = close.code, reason = %close.reason, "handshake failed");
            if !close.by_peer {
                Box::pin(link.close(close.code, &close.reason, limits.close_timeout)).await;
            }
            return None;
        }
    };
    // The challenge and its copies are not needed while serving: free them now rather than
    // keeping them in this future's state for the tunnel's lifetime.
    drop(handshake);

    let handle = Arc::new(
        TunnelHandle::new(
            TunnelInfo {
                guest_id,
                session_id,
                labels,
                instance_id: info.instance_id,
                daemon_version: info.daemon_version,
                services: info.services,
            },
            limits.max_in_flight,
            limits.call_deadline,
            observer.clone(),
        )
        .with_max_frame(limits.max_frame)
        .with_push_key(push_key),
    );
    if let Some(on_proven) = on_proven {
        on_proven(handle.epoch);
    }
    if let Some(loser) = hub.register(handle.clone()) {
        tracing::info!(epoch = loser.epoch, "tunnel superseded");
        loser.close(CloseCode::Superseded, "superseded by a newer tunnel");
    }
    observer.connected(&handle.guest_id);
    tracing::info!(epoch = handle.epoch, "tunnel up");

    Some(Established {
        link,
        handle,
        reauth,
        reauth_before,
        limits,
        hub,
        observer,
        drain,
    })
}

/// Reads the guest's Proof and answers it; on failure returns the metrics label and how to
/// close.
async fn run_handshake<W: WsIo>(
    link: &mut Link<W>,
    handshake: &mut ServerHandshake,
    limits: &TunnelLimits,
) -> Result<rpc_defs::GuestInfo, (&'static str, CloseInfo)> {
    if let Some(hello) = handshake.hello() {
        link.queue_frame(&hello);
    }
    let read_proof = async {
        loop {
            match link.next_event().await {
                IoEvent::Msg(WsMsg::Binary(bytes)) => {
                    return match frame::decode(&bytes, limits.guest_frame_limit()) {
                        Ok(frame) => Ok(frame),
                        Err(e) => Err((
                            if e.close_code() == CloseCode::FrameTooLarge {
                                "too_large"
                            } else {
                                "protocol_error"
                            },
                            CloseInfo::local(e.close_code(), e.to_string()),
                        )),
                    };
                }
                IoEvent::Msg(WsMsg::Text) => {
                    return Err((
                        "protocol_error",
                        CloseInfo::local(CloseCode::Protocol, "text frames are not allowed"),
                    ));
                }
                IoEvent::Msg(WsMsg::Close(c)) => {
                    let (code, reason) = c.unwrap_or((NO_STATUS, String::new()));
                    return Err(("disconnected", CloseInfo::peer(code, reason)));
                }
                IoEvent::ReadError(WsReadError::TooLarge) => {
                    return Err((
                        "too_large",
                        CloseInfo::local(CloseCode::FrameTooLarge, "frame too large"),
                    ));
                }
                IoEvent::ReadError(WsReadError::Other(e)) => {
                    return Err(("disconnected", CloseInfo::peer(ABNORMAL, e)));
                }
                IoEvent::WriteError(e) => {
                    return Err(("disconnected", CloseInfo::peer(ABNORMAL, e.to_string())));
                }
                IoEvent::ReadEnd => {
                    return Err(("disconnected", CloseInfo::peer(ABNORMAL, "connection lost")));
                }
                IoEvent::Msg(WsMsg::Ping(_) | WsMsg::Pong(_))
                | IoEvent::WriteBlocked
                | IoEvent::RpcClosed => {}
            }
        }
    };
    let frame = match timeout(limits.handshake_timeout, read_proof).await {
        Ok(Ok(frame)) => frame,
        Ok(Err(failure)) => return Err(failure),
        Err(_) => {
            return Err((
                "timeout",
                CloseInfo::local(CloseCode::Heartbeat, "handshake timed out"),
            ));
        }
    };
    match handshake.receive(frame) {
        ServerOutcome::Accepted { reply, info } => {
            link.queue_frame(&reply);
            Ok(info)
        }
        ServerOutcome::Rejected {
            reply,
            code,
            reason,
            outcome,
        } => {
            link.queue_frame(&reply);
            Err((outcome, CloseInfo::local(code, reason)))
        }
    }
}

/// A tunnel past its handshake.
struct Serving<'a, W> {
    link: &'a mut Link<W>,
    table: CallTable,
    handle: &'a TunnelHandle,
    reauth: ReauthFn,
    reauth_before: u64,
    limits: &'a TunnelLimits,
    drain: &'a CancellationToken,
}

/// What the serving loop decided.
enum Step {
    Continue,
    /// Close with this code and reason (a GoAway or other frame may be queued before).
    Close(CloseInfo),
    /// The connection is already gone or unusable: just drop it.
    Gone(CloseInfo),
}

/// The KBS's RPC side as the socket sees it: the handle's call queue feeds the writes, the
/// call table remembers what awaits an answer; answers never wait for room.
struct KbsSide<'a> {
    queue: &'a CallQueue,
    table: &'a mut CallTable,
    max_frame: usize,
}

impl RpcSide for KbsSide<'_> {
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            let cmd = std::task::ready!(self.queue.poll_pop(cx));
            let max_frame = self.max_frame;
            let encode_cancel = |id| rpc::encode_cancel(id, max_frame).ok();
            match self.table.on_command(cmd, Instant::now(), encode_cancel) {
                Outgoing::Write(bytes) => return Poll::Ready(Some(bytes)),
                Outgoing::Skip => {}
            }
        }
    }

    fn poll_in_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
        Poll::Ready(Ok(()))
    }
}

type ReauthCall = BoxFuture<'static, Result<Result<u64, String>, tokio::time::error::Elapsed>>;

impl<W: WsIo> Serving<'_, W> {
    /// Not an `async fn`, so `self` is kept once in the future (see `Established::run`).
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would keep `self` twice in the future"
    )]
    fn run(mut self) -> impl Future<Output = CloseInfo> {
        async move {
            let mut heartbeat = Heartbeat::new(
                Instant::now(),
                self.limits.heartbeat,
                self.limits.missed_heartbeats,
                true,
            );
            let mut reauth_at = instant_at_unix(self.reauth_before);
            let mut reauth_call: Option<ReauthCall> = None;
            let handle = self.handle;
            let drain = self.drain;
            let shutdown = handle.shutdown_token().cancelled();
            let draining = drain.cancelled();
            let timer = sleep_until(heartbeat.next_wake());
            tokio::pin!(shutdown, draining, timer);

            let step = loop {
                let mut wake = heartbeat.next_wake();
                if reauth_call.is_none() {
                    wake = wake.min(reauth_at);
                }
                if let Some(stall) = self.link.stall_deadline(self.limits.write_stall_timeout) {
                    wake = wake.min(stall);
                }
                if timer.deadline() != wake {
                    timer.as_mut().reset(wake);
                }
                let step = tokio::select! {
                    ev = poll_fn(|cx| {
                        let mut side = KbsSide {
                            queue: handle.call_queue(),
                            table: &mut self.table,
                            max_frame: self.limits.max_frame,
                        };
                        self.link.poll_io(cx, &mut side)
                    }) => {
                        self.on_io(ev, &mut heartbeat, &mut reauth_call)
                    }
                    _ = &mut shutdown => Step::Close(
                        handle
                            .requested_close()
                            .unwrap_or_else(|| CloseInfo::local_code(NORMAL, "closed by the server")),
                    ),
                    _ = &mut draining => {
                        let base = self.limits.drain_reconnect_after;
                        let jitter = rand::thread_rng().gen_range(Duration::ZERO..=base);
                        let after = u64::try_from((base + jitter).as_millis()).unwrap_or(u64::MAX);
                        self.link.queue_frame(&Frame::GoAway { reconnect_after_ms: after });
                        Step::Close(CloseInfo::local(CloseCode::GoingAway, "server draining"))
                    }
                    res = poll_option(&mut reauth_call) => {
                        reauth_call = None;
                        match res {
                            Ok(Ok(new_deadline)) => {
                                reauth_at = instant_at_unix(new_deadline);
                                self.link.queue_frame(&Frame::ReauthOk { reauth_before: new_deadline });
                                tracing::info!(reauth_before = new_deadline, "re-attested in band");
                                Step::Continue
                            }
                            Ok(Err(why)) => Step::Close(CloseInfo::local(
                                CloseCode::Auth,
                                format!("re-attestation refused: {why}"),
                            )),
                            Err(_) => Step::Close(CloseInfo::local(
                                CloseCode::Auth,
                                "re-attestation timed out",
                            )),
                        }
                    }
                    () = &mut timer => self.on_timer(&mut heartbeat, reauth_at, reauth_call.is_some()),
                };
                match step {
                    Step::Continue => {}
                    other => break other,
                }
            };
            // Callers learn at once, not after the closing handshake: queued calls and calls
            // waiting for an answer fail with `Disconnected`.
            handle.shut();
            self.table = CallTable::default();
            match step {
                Step::Close(close) => {
                    // Boxed, like the handshake: only the serving loop's state stays inline.
                    let closing =
                        self.link
                            .close(close.code, &close.reason, self.limits.close_timeout);
                    Box::pin(closing).await;
                    close
                }
                Step::Gone(close) => close,
                Step::Continue => CloseInfo::peer(ABNORMAL, "unreachable"),
            }
        }
    }

    fn on_io(
        &mut self,
        ev: IoEvent,
        heartbeat: &mut Heartbeat,
        reauth_call: &mut Option<ReauthCall>,
    ) -> Step {
        let msg = match ev {
            IoEvent::Msg(msg) => msg,
            IoEvent::ReadError(WsReadError::TooLarge) => {
                return Step::Close(CloseInfo::local(
                    CloseCode::FrameTooLarge,
                    "frame too large",
                ));
            }
            IoEvent::ReadError(WsReadError::Other(e)) => {
                return Step::Gone(CloseInfo::peer(ABNORMAL, e));
            }
            IoEvent::ReadEnd => return Step::Gone(CloseInfo::peer(ABNORMAL, "connection lost")),
            IoEvent::WriteError(e) => return Step::Gone(CloseInfo::peer(ABNORMAL, e.to_string())),
            IoEvent::WriteBlocked => return Step::Continue,
            IoEvent::RpcClosed => {
                return Step::Close(CloseInfo {
                    code: 1011,
                    reason: "rpc client stopped".into(),
                    by_peer: false,
                });
            }
        };
        heartbeat.heard(Instant::now());
        self.handle.touch();
        match msg {
            WsMsg::Binary(bytes) => {
                match frame::decode_ref(&bytes, self.limits.guest_frame_limit()) {
                    Ok(FrameRef::Rpc(payload)) => {
                        match frame::decode_payload::<Response<GuestServiceResponse>>(&payload) {
                            Ok(resp) => match self.table.on_response(resp) {
                                Ok(()) => Step::Continue,
                                Err(why) => Step::Close(CloseInfo::local(CloseCode::Protocol, why)),
                            },
                            Err(e) => Step::Close(CloseInfo::local(
                                CloseCode::Protocol,
                                format!("bad rpc message: {e}"),
                            )),
                        }
                    }
                    Ok(FrameRef::Other(Frame::Reauth { token })) => {
                        if reauth_call.is_some() {
                            return Step::Close(CloseInfo::local(
                                CloseCode::Protocol,
                                "re-attestation already in progress",
                            ));
                        }
                        let call = (self.reauth)(token);
                        *reauth_call = Some(Box::pin(timeout(self.limits.reauth_timeout, call)));
                        Step::Continue
                    }
                    Ok(FrameRef::Other(other)) => Step::Close(CloseInfo::local(
                        CloseCode::Protocol,
                        format!("unexpected {} frame", frame_name(&other)),
                    )),
                    Err(e) => Step::Close(CloseInfo::local(e.close_code(), e.to_string())),
                }
            }
            WsMsg::Text => Step::Close(CloseInfo::local(
                CloseCode::Protocol,
                "text frames are not allowed",
            )),
            WsMsg::Ping(_) | WsMsg::Pong(_) => Step::Continue,
            WsMsg::Close(c) => {
                let (code, reason) = c.unwrap_or((NO_STATUS, String::new()));
                Step::Gone(CloseInfo::peer(code, reason))
            }
        }
    }

    fn on_timer(
        &mut self,
        heartbeat: &mut Heartbeat,
        reauth_at: Instant,
        reauth_pending: bool,
    ) -> Step {
        let now = Instant::now();
        if self
            .link
            .stall_deadline(self.limits.write_stall_timeout)
            .is_some_and(|at| now >= at)
        {
            // Nothing more can be written, a close frame included.
            return Step::Gone(CloseInfo::local(
                CloseCode::Heartbeat,
                "guest stopped reading",
            ));
        }
        if !reauth_pending && now >= reauth_at {
            return Step::Close(CloseInfo::local(
                CloseCode::Auth,
                "token expired without re-attestation",
            ));
        }
        self.table.prune(now);
        self.handle.call_queue().shrink();
        match heartbeat.poll(now) {
            Beat::Ping => {
                self.link.queue(WsMsg::Ping(bytes::Bytes::new()));
                Step::Continue
            }
            Beat::Silent => Step::Close(CloseInfo::local(
                CloseCode::Heartbeat,
                "no answer to heartbeats",
            )),
            Beat::Idle => Step::Continue,
        }
    }
}

/// Awaits the future in `slot`, or never if there is none.
async fn poll_option<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// A random 128-bit session id, hex.
fn new_session_id() -> String {
    let bytes: [u8; 16] = rand::thread_rng().r#gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limits_are_valid_and_match_the_protocol() {
        let limits = TunnelLimits::default();
        assert_eq!(limits.validate(), Ok(()));
        assert_eq!(limits.max_frame, 1 << 20);
        assert_eq!(limits.max_in_flight, 64);
        assert_eq!(limits.heartbeat_s(), 20);
        let zero = TunnelLimits {
            heartbeat: Duration::ZERO,
            ..TunnelLimits::default()
        };
        assert!(
            zero.validate()
                .expect_err("zero heartbeat")
                .contains("heartbeat")
        );
        let sub_second = TunnelLimits {
            heartbeat: Duration::from_millis(100),
            ..TunnelLimits::default()
        };
        assert_eq!(sub_second.heartbeat_s(), 1);
    }

    #[test]
    fn session_ids_are_random_hex() {
        let a = new_session_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, new_session_id());
    }
}
#[cfg(test)]
mod footprint {
    /// Every idle tunnel keeps an `Established` inside its task: a field that copies what the
    /// handle or a shared `Arc` already holds shows up here (it was 712 bytes before the
    /// limits were shared and the guest id copy went).
    #[test]
    fn an_established_tunnel_keeps_its_state_small() {
        let size = std::mem::size_of::<super::Established>();
        assert!(size <= 600, "Established is {size} bytes");
    }
}
