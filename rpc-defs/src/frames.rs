//! Tunnel control frames: every WebSocket binary message carries exactly one CBOR-encoded [`Frame`].

use serde::{Deserialize, Serialize};

/// Tunnel protocol version spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;
/// WebSocket subprotocol name.
pub const SUBPROTOCOL: &str = "tether.v1";
/// WebSocket subprotocol of the same frames with a push key in the challenge: the Hello's
/// challenge then seals 64 bytes, the 32-byte proof nonce the guest returns followed by a
/// 32-byte key the guest keeps for the tunnel's lifetime. The KBS seals pushes on that
/// tunnel to it (JWE `dir` + A256GCM): still end-to-end, since only the holder of the TEE key
/// could open the challenge, but with no asymmetric operation per push on either side.
pub const SUBPROTOCOL_V2: &str = "tether.v2";
/// Length of the push key carried by a `tether.v2` challenge.
pub const PUSH_KEY_LEN: usize = 32;

/// What the guest tells about itself in its proof (informational: identity comes from the token).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Random id of this daemon process instance.
    pub instance_id: String,
    /// Daemon version string.
    pub daemon_version: String,
    /// Services the daemon offers (e.g. `resources`, `splitapi`).
    pub services: Vec<String>,
}

/// One tunnel frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// server -> guest: challenge sealed to the token's TEE key, and the limits in force.
    Hello {
        /// Protocol version.
        version: u32,
        /// JWE (JSON serialization, UTF-8 bytes) of 32 random bytes.
        #[serde(with = "serde_bytes")]
        challenge: Vec<u8>,
        /// Server heartbeat interval, seconds.
        heartbeat_s: u32,
        /// Largest frame the guest may send, bytes. (The KBS sends frames up to its own
        /// configured limit, 1 MiB by default, which is also a guest's default read limit.)
        max_frame: u32,
    },
    /// guest -> server: the unsealed challenge, proving possession of the TEE key.
    Proof {
        /// The 32 bytes from the challenge.
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        /// Self-description (not trusted for identity).
        info: GuestInfo,
    },
    /// server -> guest: the tunnel is up.
    Welcome {
        /// Server-chosen session id.
        session_id: String,
        /// Attested guest id (from the token claims).
        guest_id: String,
        /// Unix time (seconds) by which the guest must send `Reauth`.
        reauth_before: u64,
    },
    /// server -> guest: handshake refused; a close follows.
    Reject {
        /// Close code that follows.
        code: u16,
        /// Why.
        reason: String,
    },
    /// Either way: one tarpc message, CBOR-encoded.
    Rpc(#[serde(with = "serde_bytes")] Vec<u8>),
    /// guest -> server: a fresh attestation token (same TEE key, same guest).
    Reauth {
        /// The new token.
        token: String,
    },
    /// server -> guest: the fresh token was accepted.
    ReauthOk {
        /// New deadline for the next `Reauth`.
        reauth_before: u64,
    },
    /// server -> guest: the server is draining; reconnect after the given delay.
    GoAway {
        /// Suggested delay before reconnecting, milliseconds.
        reconnect_after_ms: u64,
    },
}

/// WebSocket close codes used by the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// Authentication failed or the token expired without re-attestation.
    Auth = 4401,
    /// Heartbeat timeout.
    Heartbeat = 4408,
    /// A newer tunnel for the same guest replaced this one.
    Superseded = 4409,
    /// Frame over the size limit.
    FrameTooLarge = 4413,
    /// Too many calls in flight.
    TooManyCalls = 4429,
    /// Protocol violation (text frame, garbage CBOR, unexpected frame).
    Protocol = 4400,
    /// Server going away (draining).
    GoingAway = 4503,
}

impl CloseCode {
    /// Numeric WebSocket close code.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// Code from its number, if it is one of ours.
    pub fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            4401 => Self::Auth,
            4408 => Self::Heartbeat,
            4409 => Self::Superseded,
            4413 => Self::FrameTooLarge,
            4429 => Self::TooManyCalls,
            4400 => Self::Protocol,
            4503 => Self::GoingAway,
            _ => return None,
        })
    }
}
