//! The daemon's state as callers follow it: [`DaemonState`], published on a watch channel
//! and logged at every change.

use std::time::Duration;

use rpc_defs::CloseCode;
use tokio::sync::watch;
use tunnel::{Closed, TunnelSession};

use super::millis;

/// WebSocket close code of a normal close.
const NORMAL_CLOSE: u16 = 1000;

/// Where the run loop is; every change is logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DaemonState {
    /// Opening the state directory and loading the TEE key.
    Starting,
    /// Running RCAR.
    Attesting,
    /// Holding a fresh token.
    Attested {
        /// `tether.guest_id` of the token, if it has one.
        guest_id: Option<String>,
        /// `exp` of the token (Unix seconds).
        exp: Option<u64>,
    },
    /// Dialling the tunnel.
    Connecting {
        /// The tunnel URL.
        url: String,
    },
    /// The tunnel is up and served.
    Connected {
        /// Server-chosen session id.
        session_id: String,
        /// Attested guest id.
        guest_id: String,
        /// Unix time by which the next re-attestation must be in.
        reauth_before: u64,
        /// In-band re-attestations done on this tunnel.
        reauths: u32,
    },
    /// The tunnel ended.
    Disconnected {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
        /// True when the server closed (or vanished).
        by_peer: bool,
    },
    /// Waiting before the next attempt.
    BackingOff {
        /// How long.
        delay: Duration,
        /// Failed attempts since the last reset.
        attempt: u32,
    },
    /// The loop ended (shutdown).
    Stopped,
}

impl DaemonState {
    /// True while a tunnel is up.
    pub fn is_connected(&self) -> bool {
        matches!(self, Self::Connected { .. })
    }
}

/// Publishes and logs a state change.
pub(super) fn set_state(sender: &watch::Sender<DaemonState>, state: DaemonState) {
    match &state {
        DaemonState::Starting => tracing::debug!("starting"),
        DaemonState::Attesting => tracing::info!("attesting"),
        DaemonState::Attested { guest_id, exp } => {
            let guest_id = guest_id.as_deref().unwrap_or("(not in the token)");
            match exp {
                Some(exp) => tracing::info!(guest_id, exp, "attested"),
                None => tracing::info!(guest_id, "attested (the token does not expire)"),
            }
        }
        DaemonState::Connecting { url } => tracing::info!(%url, "connecting"),
        DaemonState::Connected {
            session_id,
            guest_id,
            reauth_before,
            reauths,
        } => {
            if *reauths == 0 {
                tracing::info!(%session_id, %guest_id, reauth_before, "connected");
            } else {
                tracing::info!(%session_id, reauth_before, reauths, "reauth ok");
            }
        }
        DaemonState::Disconnected {
            code,
            reason,
            by_peer,
        } => {
            let name = CloseCode::from_code(*code).map(|c| format!("{c:?}"));
            if *code == NORMAL_CLOSE || *code == CloseCode::GoingAway.code() {
                tracing::info!(code, name = ?name, %reason, by_peer, "disconnected");
            } else if *code == CloseCode::Superseded.code() {
                tracing::warn!(
                    code,
                    %reason,
                    "disconnected: superseded by another tunnel of the same guest_id (a second daemon with this identity?)"
                );
            } else {
                tracing::warn!(code, name = ?name, %reason, by_peer, "disconnected");
            }
        }
        DaemonState::BackingOff { delay, attempt } => {
            tracing::info!(delay_ms = millis(*delay), attempt, "backing off");
        }
        DaemonState::Stopped => tracing::info!("stopped"),
    }
    sender.send_replace(state);
}

pub(super) fn connected_state(session: &TunnelSession, reauths: u32) -> DaemonState {
    DaemonState::Connected {
        session_id: session.session_id().to_owned(),
        guest_id: session.guest_id().to_owned(),
        reauth_before: session.reauth_before(),
        reauths,
    }
}

pub(super) fn disconnected_state(closed: &Closed) -> DaemonState {
    DaemonState::Disconnected {
        code: closed.close.code,
        reason: closed.close.reason.clone(),
        by_peer: closed.close.by_peer,
    }
}
