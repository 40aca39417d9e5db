//! The daemon's handle on an open tunnel ([`TunnelSession`]), the state it shares with the
//! serving task, and how a tunnel ended ([`Closed`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rpc_defs::CloseCode;
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::timeout,
};
use tokio_util::sync::CancellationToken;

use crate::{
    frame::CodecError,
    handshake::Welcome,
    link::{ABNORMAL, CloseInfo},
};

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

/// A request from a [`TunnelSession`] to the serving task, which alone writes the socket.
pub(super) enum Control {
    Reauth {
        token: String,
        reply: oneshot::Sender<Result<u64, ReauthError>>,
    },
}

/// What the serving task and every [`TunnelSession`] of one tunnel share.
pub(super) struct Shared {
    pub(super) welcome: Welcome,
    pub(super) reauth_before: AtomicU64,
    pub(super) close: CancellationToken,
    closed: watch::Receiver<Option<Closed>>,
    reauth_timeout: Duration,
}

impl Shared {
    /// The state of a just-welcomed tunnel, and the sender that later publishes how it ended.
    pub(super) fn new(
        welcome: Welcome,
        reauth_timeout: Duration,
    ) -> (Arc<Self>, watch::Sender<Option<Closed>>) {
        let (closed_tx, closed) = watch::channel(None);
        let shared = Arc::new(Self {
            reauth_before: AtomicU64::new(welcome.reauth_before),
            welcome,
            close: CancellationToken::new(),
            closed,
            reauth_timeout,
        });
        (shared, closed_tx)
    }
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
    pub(super) fn new(shared: Arc<Shared>, control: mpsc::Sender<Control>) -> Self {
        Self { shared, control }
    }

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

/// How a tunnel ended whose serving future was dropped before it returned.
fn dropped() -> Closed {
    Closed {
        close: CloseInfo::local_code(ABNORMAL, "tunnel dropped before it was served to the end"),
        reconnect_after: None,
        connected_for: Duration::ZERO,
    }
}
