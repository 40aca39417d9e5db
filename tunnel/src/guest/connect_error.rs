//! Why a tunnel could not be opened.

use rpc_defs::{CloseCode, SUBPROTOCOL};

use crate::handshake::HandshakeError;

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
