//! One view of a WebSocket over the two libraries the tunnel runs on: axum's server-side
//! `WebSocket` and tokio-tungstenite's client-side `WebSocketStream`.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::{Sink, Stream};

/// A WebSocket message, reduced to what the tunnel needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum WsMsg {
    /// A binary message: one tunnel frame.
    Binary(Bytes),
    /// A text message (always a protocol error here; the contents are not kept).
    Text,
    /// A ping (the library answers it by itself).
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// A close, with its code and reason when the peer gave one.
    Close(Option<(u16, String)>),
}

/// Why reading from the WebSocket failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WsReadError {
    /// The peer sent a message over the size limit.
    #[error("message over the size limit")]
    TooLarge,
    /// Anything else: broken framing, reset connection, bad UTF-8 in a text frame...
    #[error("{0}")]
    Other(String),
}

/// Why writing to the WebSocket failed (the connection is gone).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("websocket write failed: {0}")]
pub(crate) struct WsWriteError(pub String);

/// A WebSocket the tunnel can drive: a stream of [`WsMsg`] and a sink for them.
pub(crate) trait WsIo:
    Stream<Item = Result<WsMsg, WsReadError>> + Sink<WsMsg, Error = WsWriteError> + Unpin + Send
{
}

impl<T> WsIo for T where
    T: Stream<Item = Result<WsMsg, WsReadError>> + Sink<WsMsg, Error = WsWriteError> + Unpin + Send
{
}

/// Largest close reason the protocol allows (125-byte control payload minus the code).
const MAX_CLOSE_REASON: usize = 123;

/// Cuts `reason` to what fits in a close frame, on a character boundary.
pub(crate) fn close_reason(reason: &str) -> String {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason.to_owned();
    }
    let mut end = MAX_CLOSE_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// True when an error (or one of its sources) is a message-size limit error.
///
/// tungstenite reports it as `Error::Capacity`; axum wraps a different tungstenite version
/// than ours, so past the typed check this falls back to tungstenite's stable message text.
/// The loopback oversize test guards the fallback.
fn is_capacity_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(t) = e.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            return matches!(t, tokio_tungstenite::tungstenite::Error::Capacity(_));
        }
        if e.to_string().starts_with("Space limit exceeded") {
            return true;
        }
        current = e.source();
    }
    false
}

fn read_error(err: &(dyn std::error::Error + 'static)) -> WsReadError {
    if is_capacity_error(err) {
        WsReadError::TooLarge
    } else {
        WsReadError::Other(err.to_string())
    }
}

/// The server side: axum's WebSocket.
pub(crate) struct AxumWs(pub axum::extract::ws::WebSocket);

impl Stream for AxumWs {
    type Item = Result<WsMsg, WsReadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        use axum::extract::ws::Message;
        Pin::new(&mut self.0).poll_next(cx).map(|item| {
            item.map(|res| match res {
                Ok(Message::Binary(b)) => Ok(WsMsg::Binary(b)),
                Ok(Message::Text(_)) => Ok(WsMsg::Text),
                Ok(Message::Ping(b)) => Ok(WsMsg::Ping(b)),
                Ok(Message::Pong(b)) => Ok(WsMsg::Pong(b)),
                Ok(Message::Close(c)) => Ok(WsMsg::Close(
                    c.map(|c| (c.code, c.reason.as_str().to_owned())),
                )),
                Err(e) => Err(read_error(&e)),
            })
        })
    }
}

impl Sink<WsMsg> for AxumWs {
    type Error = WsWriteError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.0)
            .poll_ready(cx)
            .map_err(|e| WsWriteError(e.to_string()))
    }

    fn start_send(mut self: Pin<&mut Self>, item: WsMsg) -> Result<(), Self::Error> {
        use axum::extract::ws::{CloseFrame, Message};
        let msg = match item {
            WsMsg::Binary(b) => Message::Binary(b),
            WsMsg::Text => Message::Text("".into()),
            WsMsg::Ping(b) => Message::Ping(b),
            WsMsg::Pong(b) => Message::Pong(b),
            WsMsg::Close(c) => Message::Close(c.map(|(code, reason)| CloseFrame {
                code,
                reason: close_reason(&reason).into(),
            })),
        };
        Pin::new(&mut self.0)
            .start_send(msg)
            .map_err(|e| WsWriteError(e.to_string()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.0)
            .poll_flush(cx)
            .map_err(|e| WsWriteError(e.to_string()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.0)
            .poll_close(cx)
            .map_err(|e| WsWriteError(e.to_string()))
    }
}

/// The guest side (and test clients): a tokio-tungstenite stream.
pub(crate) struct TungsteniteWs<S>(pub tokio_tungstenite::WebSocketStream<S>);

impl<S> Stream for TungsteniteWs<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    type Item = Result<WsMsg, WsReadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let item = match Pin::new(&mut self.0).poll_next(cx) {
                Poll::Ready(item) => item,
                Poll::Pending => return Poll::Pending,
            };
            let mapped = match item {
                None => return Poll::Ready(None),
                Some(Ok(Message::Binary(b))) => Ok(WsMsg::Binary(b)),
                Some(Ok(Message::Text(_))) => Ok(WsMsg::Text),
                Some(Ok(Message::Ping(b))) => Ok(WsMsg::Ping(b)),
                Some(Ok(Message::Pong(b))) => Ok(WsMsg::Pong(b)),
                Some(Ok(Message::Close(c))) => {
                    Ok(WsMsg::Close(c.map(|c| {
                        (u16::from(c.code), c.reason.as_str().to_owned())
                    })))
                }
                // Raw frames only appear when reading with a frame-level API; skip them.
                Some(Ok(Message::Frame(_))) => continue,
                Some(Err(e)) => Err(read_error(&e)),
            };
            return Poll::Ready(Some(mapped));
        }
    }
}

impl<S> Sink<WsMsg> for TungsteniteWs<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    type Error = WsWriteError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.0)
            .poll_ready(cx)
            .map_err(|e| WsWriteError(e.to_string()))
    }

    fn start_send(mut self: Pin<&mut Self>, item: WsMsg) -> Result<(), Self::Error> {
        use tokio_tungstenite::tungstenite::{
            Message,
            protocol::{CloseFrame, frame::coding::CloseCode},
        };
        let msg = match item {
            WsMsg::Binary(b) => Message::Binary(b),
            WsMsg::Text => Message::Text("".into()),
            WsMsg::Ping(b) => Message::Ping(b),
            WsMsg::Pong(b) => Message::Pong(b),
            WsMsg::Close(c) => Message::Close(c.map(|(code, reason)| CloseFrame {
                code: CloseCode::from(code),
                reason: close_reason(&reason).into(),
            })),
        };
        Pin::new(&mut self.0)
            .start_send(msg)
            .map_err(|e| WsWriteError(e.to_string()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.0)
            .poll_flush(cx)
            .map_err(|e| WsWriteError(e.to_string()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.0)
            .poll_close(cx)
            .map_err(|e| WsWriteError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_are_cut_on_char_boundaries() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100); // 200 bytes
        let cut = close_reason(&long);
        assert!(cut.len() <= MAX_CLOSE_REASON);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn capacity_errors_are_recognised() {
        use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
        let ours = Error::Capacity(CapacityError::MessageTooLong {
            size: 10,
            max_size: 5,
        });
        assert_eq!(read_error(&ours), WsReadError::TooLarge);
        let wrapped = axum::Error::new(Error::Capacity(CapacityError::MessageTooLong {
            size: 10,
            max_size: 5,
        }));
        assert_eq!(read_error(&wrapped), WsReadError::TooLarge);
        assert!(matches!(
            read_error(&Error::ConnectionClosed),
            WsReadError::Other(_)
        ));
    }
}
