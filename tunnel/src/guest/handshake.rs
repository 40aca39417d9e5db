//! The handshake phase of opening a tunnel: drives the sans-IO [`GuestHandshake`] over the
//! upgraded link (Hello in, Proof out, Welcome in).

use std::time::Duration;

use rpc_defs::CloseCode;
use tokio::time::timeout;

use super::{GuestWs, connect_error::ConnectError};
use crate::{
    frame,
    handshake::{GuestHandshake, GuestStep, HandshakeError, Welcome},
    link::{ABNORMAL, IoEvent, Link, NO_STATUS},
    ws::{WsMsg, WsReadError},
};

/// Reads Hello, sends Proof, reads Welcome. On failure: the error and, when this end should
/// send one, the close to send.
pub(super) async fn run_handshake<U>(
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
