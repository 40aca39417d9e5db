//! The socket side of one tunnel: a single task owns the WebSocket and moves frames between
//! it and tarpc's queues, reading and writing at once, with backpressure both ways.
//!
//! [`Link::poll_io`] is the heart: it writes control frames first, then tarpc's frames, while
//! the socket takes them; reads only while tarpc can take one more message; and reports a
//! write side that makes no progress, so the caller can drop a peer that stopped reading.

use std::{
    collections::VecDeque,
    future::poll_fn,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
use rpc_defs::{CloseCode, Frame};
use tokio::time::Instant;

use crate::{
    frame,
    ws::{WsIo, WsMsg, WsReadError, WsWriteError},
};

/// Something that happened on the socket.
#[derive(Debug)]
pub(crate) enum IoEvent {
    /// A message from the peer.
    Msg(WsMsg),
    /// Reading failed; the socket is unusable for reads.
    ReadError(WsReadError),
    /// The peer went away without a close frame.
    ReadEnd,
    /// Writing failed; the connection is gone.
    WriteError(WsWriteError),
    /// The write side just stopped making progress: recompute timers.
    WriteBlocked,
    /// tarpc's side of the queues is gone.
    RpcClosed,
}

/// The RPC layer as the socket task sees it: frames to write, and room for frames read.
pub(crate) trait RpcSide {
    /// The next encoded frame to write; `Ready(None)` once the RPC side closed for good.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>>;
    /// Ready when one more message read from the peer can be taken; `Err` when the RPC side
    /// is gone.
    fn poll_in_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ()>>;
}

/// No RPC traffic (handshake and closing phases).
pub(crate) struct NoRpc;

impl RpcSide for NoRpc {
    fn poll_out(&mut self, _: &mut Context<'_>) -> Poll<Option<Bytes>> {
        Poll::Pending
    }

    fn poll_in_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
        Poll::Ready(Ok(()))
    }
}

/// How a tunnel ended, as both ends report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseInfo {
    /// WebSocket close code (ours when we closed, the peer's otherwise; 1006 if none).
    pub code: u16,
    /// Reason text.
    pub reason: String,
    /// True when the peer closed (or vanished), false when this end decided.
    pub by_peer: bool,
}

impl CloseInfo {
    /// This end closes with `code`.
    pub fn local(code: CloseCode, reason: impl Into<String>) -> Self {
        Self {
            code: code.code(),
            reason: reason.into(),
            by_peer: false,
        }
    }

    /// This end closes with a plain WebSocket code (1000, 1011...).
    pub(crate) fn local_code(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            by_peer: false,
        }
    }

    /// The peer closed or vanished.
    pub(crate) fn peer(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            by_peer: true,
        }
    }
}

/// WebSocket "abnormal closure": the connection ended without a close frame.
pub(crate) const ABNORMAL: u16 = 1006;
/// WebSocket "no status received".
pub(crate) const NO_STATUS: u16 = 1005;
/// WebSocket "normal closure".
pub(crate) const NORMAL: u16 = 1000;

/// One WebSocket and its pending writes.
pub(crate) struct Link<W> {
    ws: W,
    control: VecDeque<WsMsg>,
    pending: Option<WsMsg>,
    needs_flush: bool,
    blocked_since: Option<Instant>,
    read_done: bool,
    /// Messages read since the last flush while written frames wait for it.
    reads_since_flush: u32,
}

/// Most messages read while written frames wait for their flush.
const FLUSH_EVERY: u32 = 32;

impl<W: WsIo> Link<W> {
    pub fn new(ws: W) -> Self {
        Self {
            ws,
            control: VecDeque::new(),
            pending: None,
            needs_flush: false,
            blocked_since: None,
            read_done: false,
            reads_since_flush: 0,
        }
    }

    /// Queues a message ahead of tarpc's frames.
    pub fn queue(&mut self, msg: WsMsg) {
        self.control.push_back(msg);
    }

    /// Queues a control frame ahead of tarpc's frames.
    pub fn queue_frame(&mut self, frame: &Frame) {
        match frame::encode(frame) {
            Ok(bytes) => self.queue(WsMsg::Binary(Bytes::from(bytes))),
            // Control frames are small and well-formed; failing here is a bug, not the peer's.
            Err(e) => tracing::error!(error = %e, "cannot encode control frame"),
        }
    }

    /// When the write side will have made no progress for `timeout`, if it is blocked now.
    pub fn stall_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.blocked_since.map(|t| t + timeout)
    }

    /// Drives writes and reads; returns when something needs the caller's attention.
    pub fn poll_io<R: RpcSide>(&mut self, cx: &mut Context<'_>, rpc: &mut R) -> Poll<IoEvent> {
        // Write side.
        let mut blocked = false;
        loop {
            if self.pending.is_none() {
                if let Some(msg) = self.control.pop_front() {
                    self.pending = Some(msg);
                } else {
                    match rpc.poll_out(cx) {
                        Poll::Ready(Some(bytes)) => self.pending = Some(WsMsg::Binary(bytes)),
                        Poll::Ready(None) => return Poll::Ready(IoEvent::RpcClosed),
                        Poll::Pending => {}
                    }
                }
            }
            let Some(msg) = self.pending.take() else {
                if self.control.capacity() > 0 && self.control.is_empty() {
                    // An idle tunnel keeps no buffer from its handshake or last heartbeat.
                    self.control = VecDeque::new();
                }
                break;
            };
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    if let Err(e) = Pin::new(&mut self.ws).start_send(msg) {
                        return Poll::Ready(IoEvent::WriteError(e));
                    }
                    self.needs_flush = true;
                    self.blocked_since = None;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(IoEvent::WriteError(e)),
                Poll::Pending => {
                    self.pending = Some(msg);
                    blocked = true;
                    break;
                }
            }
        }
        // A flush is one system call: it waits while messages are still coming in, so the
        // frames a burst of them causes leave together (at most FLUSH_EVERY reads late).
        if self.needs_flush && !blocked && self.reads_since_flush >= FLUSH_EVERY {
            match Pin::new(&mut self.ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flushed(),
                Poll::Ready(Err(e)) => return Poll::Ready(IoEvent::WriteError(e)),
                Poll::Pending => blocked = true,
            }
        }
        if blocked {
            if self.blocked_since.is_none() {
                self.blocked_since = Some(Instant::now());
                return Poll::Ready(IoEvent::WriteBlocked);
            }
        } else if !self.needs_flush {
            self.blocked_since = None;
        }

        // Read side (also while the write side is blocked: a peer waiting for us to read
        // before it reads must not deadlock us both).
        if let Some(event) = self.poll_read(cx, rpc) {
            if self.needs_flush {
                self.reads_since_flush += 1;
            }
            return Poll::Ready(event);
        }

        // Nothing more to read for now: flush what was written.
        if self.needs_flush && !blocked {
            match Pin::new(&mut self.ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flushed(),
                Poll::Ready(Err(e)) => return Poll::Ready(IoEvent::WriteError(e)),
                Poll::Pending => {
                    if self.blocked_since.is_none() {
                        self.blocked_since = Some(Instant::now());
                        return Poll::Ready(IoEvent::WriteBlocked);
                    }
                }
            }
        }
        Poll::Pending
    }

    fn flushed(&mut self) {
        self.needs_flush = false;
        self.reads_since_flush = 0;
        self.blocked_since = None;
    }

    /// One message from the peer, if one is ready and the RPC side can take it.
    fn poll_read<R: RpcSide>(&mut self, cx: &mut Context<'_>, rpc: &mut R) -> Option<IoEvent> {
        if self.read_done {
            return None;
        }
        match rpc.poll_in_ready(cx) {
            Poll::Ready(Ok(())) => {}
            // The receiving end is gone.
            Poll::Ready(Err(())) => return Some(IoEvent::RpcClosed),
            Poll::Pending => return None,
        }
        match self.ws.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(msg))) => Some(IoEvent::Msg(msg)),
            Poll::Ready(Some(Err(e))) => {
                self.read_done = true;
                Some(IoEvent::ReadError(e))
            }
            Poll::Ready(None) => {
                self.read_done = true;
                Some(IoEvent::ReadEnd)
            }
            Poll::Pending => None,
        }
    }

    /// Waits for the next event without any tarpc traffic (handshake phase).
    pub async fn next_event(&mut self) -> IoEvent {
        loop {
            let ev = poll_fn(|cx| self.poll_io(cx, &mut NoRpc)).await;
            if !matches!(ev, IoEvent::WriteBlocked) {
                return ev;
            }
        }
    }

    /// Writes and flushes everything queued ahead of tarpc's frames.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsWriteError>> {
        loop {
            let Some(msg) = self.pending.take().or_else(|| self.control.pop_front()) else {
                break;
            };
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    Pin::new(&mut self.ws).start_send(msg)?;
                    self.needs_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.pending = Some(msg);
                    return Poll::Pending;
                }
            }
        }
        if self.needs_flush {
            std::task::ready!(Pin::new(&mut self.ws).poll_flush(cx))?;
            self.needs_flush = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Sends everything queued, then a close frame, and waits (up to `timeout` in all) for
    /// the peer's close; frames still in tarpc's queue are dropped.
    pub async fn close(&mut self, code: u16, reason: &str, timeout: Duration) {
        self.queue(WsMsg::Close(Some((code, reason.to_owned()))));
        let _ = tokio::time::timeout(timeout, async {
            if poll_fn(|cx| self.poll_drain(cx)).await.is_err() {
                return;
            }
            if !self.read_done {
                loop {
                    match poll_fn(|cx| self.poll_io(cx, &mut NoRpc)).await {
                        IoEvent::Msg(WsMsg::Close(_))
                        | IoEvent::ReadEnd
                        | IoEvent::ReadError(_)
                        | IoEvent::WriteError(_) => break,
                        _ => {}
                    }
                }
            }
            // Drive the library's own close handshake to the end.
            let _ = poll_fn(|cx| Pin::new(&mut self.ws).poll_close(cx)).await;
        })
        .await;
    }

    /// Answers a peer's close: the library replies by itself; flush it out briefly.
    pub async fn finish_peer_close(&mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, async {
            let _ = poll_fn(|cx| Pin::new(&mut self.ws).poll_flush(cx)).await;
            let _ = poll_fn(|cx| Pin::new(&mut self.ws).poll_close(cx)).await;
        })
        .await;
    }
}
