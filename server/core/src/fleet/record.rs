//! What the fleet view records per guest, and what a query of it asks and answers.

use std::collections::BTreeMap;
use std::sync::Arc;

use rpc_defs::{CloseCode, HealthReport, RuntimeReport};
use serde::{Deserialize, Serialize};

use crate::selector::Selector;

/// Connections remembered per guest.
pub const HISTORY_LEN: usize = 10;
/// Largest page of the fleet view.
pub const MAX_PAGE: usize = 1000;

/// One tunnel connection of a guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// Tunnel epoch (unique per connection).
    pub epoch: u64,
    /// Tunnel session id.
    pub session_id: String,
    /// Unix ms.
    pub connected_at: u64,
    /// Unix ms; `None` while connected.
    pub disconnected_at: Option<u64>,
    /// Close code it ended with.
    pub close_code: Option<u16>,
    /// Close reason (from the code).
    pub reason: Option<String>,
}

/// A resource version a guest reported holding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldVersion {
    /// Version number.
    pub version: u64,
    /// Hex SHA-256 of the plaintext.
    pub sha256: String,
    /// Unix seconds when the guest wrote it.
    pub applied_at: u64,
}

/// The outcome of the last probe of a guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastProbe {
    /// Unix ms.
    pub at: u64,
    /// `health`, `resources`, `runtime`, `all`.
    pub kind: String,
    /// `ok`, `timeout`, `disconnected`, `not_connected`, `busy`, `guest_error`, `transport_error`.
    pub outcome: String,
    /// Error detail when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Round trip, microseconds.
    pub rtt_us: u64,
    /// Health, when probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthReport>,
    /// Runtime figures, when probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeReport>,
}

/// Everything known about one guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestRecord {
    /// Attested guest id.
    pub guest_id: String,
    /// Attested labels (one shared copy per distinct label set).
    pub labels: Arc<BTreeMap<String, String>>,
    /// TEE type of its latest token.
    pub tee: Option<String>,
    /// When its latest token was issued (attestation time), Unix ms.
    pub attested_at: Option<u64>,
    /// When its latest token expires, Unix ms.
    pub token_expires_at: Option<u64>,
    /// First connection, Unix ms.
    pub first_seen: u64,
    /// Last connect, disconnect or probe answer, Unix ms.
    pub last_seen: u64,
    /// Whether a tunnel is live (answers fill this from the hub).
    pub connected: bool,
    /// Daemon instance id (the guest's own words).
    pub instance: String,
    /// Daemon version (the guest's own words).
    pub daemon_version: String,
    /// Services the daemon offers (the guest's own words).
    pub services: Vec<String>,
    /// Last connections, newest first.
    pub history: Vec<ConnectionRecord>,
    /// Last probe.
    pub last_probe: Option<Box<LastProbe>>,
    /// Resource versions held, from the last probe that listed resources.
    pub held: BTreeMap<String, HeldVersion>,
    /// When `held` was last reported, Unix ms (`None`: never probed for resources).
    pub held_at: Option<u64>,
}

impl GuestRecord {
    /// Whether the guest holds a version of `path` older than `latest` (guests that never
    /// reported holding it, or were never probed for resources, are not drifting).
    pub fn is_stale(&self, path: &str, latest: u64) -> bool {
        self.held.get(path).is_some_and(|h| h.version < latest)
    }
}

/// What a fleet query asks for.
#[derive(Clone, Debug, Default)]
pub struct FleetQuery {
    /// Label selector.
    pub selector: Selector,
    /// Only connected (`Some(true)`) or disconnected (`Some(false)`) guests.
    pub connected: Option<bool>,
    /// Only guests holding a version of this path older than this latest version.
    pub stale: Option<(String, u64)>,
    /// Only guests with an id after this one (the cursor).
    pub after: Option<String>,
    /// Page size (1..=[`MAX_PAGE`]).
    pub limit: usize,
}

/// A page of the fleet view.
#[derive(Clone, Debug, Default)]
pub struct FleetPage {
    /// Matching guests, by id.
    pub guests: Vec<GuestRecord>,
    /// The id to pass as cursor for the next page, when there may be more.
    pub next: Option<String>,
}

/// A close code's name in events and history.
pub fn close_reason(code: u16) -> String {
    match CloseCode::from_code(code) {
        Some(c) => {
            // CamelCase variant name to snake_case: `FrameTooLarge` -> `frame_too_large`.
            let mut out = String::new();
            for (i, ch) in format!("{c:?}").chars().enumerate() {
                if ch.is_ascii_uppercase() && i > 0 {
                    out.push('_');
                }
                out.push(ch.to_ascii_lowercase());
            }
            out
        }
        None => match code {
            1000 => "normal".into(),
            1001 => "going_away".into(),
            1006 => "abnormal".into(),
            1011 => "internal_error".into(),
            _ => format!("code_{code}"),
        },
    }
}
