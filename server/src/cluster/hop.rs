//! The internal hop between replicas, without I/O: the header a forwarding replica adds to
//! an admin call it passes to the replica holding the guest's tunnel, and its check there.
//!
//! The header carries who forwards (replica id), for which guest and owner epoch, when, and a
//! fresh nonce; an HMAC-SHA256 under a key every replica derives from the shared KEK binds
//! those to the method, the path and query and the body's SHA-256. The owner refuses a hop
//! whose MAC is wrong (forged, or changed on the way), whose time is outside
//! [`HOP_WINDOW`] of its own clock, or whose nonce it has already seen within that window
//! (replayed). The admin's own `Authorization` travels unchanged and is checked as usual.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// The header a forwarded request carries.
pub const HOP_HEADER: &str = "x-tether-replica-hop";
/// Accepted clock difference between the forwarding replica and the owner, either way.
pub const HOP_WINDOW: Duration = Duration::from_secs(30);
/// Nonces remembered at most (a flood past this is refused, not remembered less).
pub const MAX_REMEMBERED_NONCES: usize = 100_000;

/// Why a hop is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HopError {
    /// The header does not parse.
    #[error("malformed replica hop header: {0}")]
    Malformed(&'static str),
    /// The MAC does not match (forged, or the request changed on the way).
    #[error("replica hop MAC does not verify")]
    BadMac,
    /// Its time is too far from ours.
    #[error("replica hop is {0} ms away from this replica's clock (at most 30 s accepted)")]
    Stale(u64),
    /// Its nonce was already used.
    #[error("replica hop was already used (replayed)")]
    Replayed,
    /// Too many hops in the window to remember them all.
    #[error("too many replica hops at once")]
    Busy,
}

/// What a hop says, once its MAC verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    /// The forwarding replica.
    pub from: String,
    /// The guest the call addresses.
    pub guest_id: String,
    /// The owner epoch the forwarding replica read from the registry.
    pub epoch: u64,
    /// When it was forwarded, ms since the Unix epoch.
    pub at_ms: u64,
    /// Random, once per hop.
    pub nonce: String,
}

/// The HMAC key (derived from the KEK; identical on every replica).
pub struct HopKey(ring::hmac::Key);

impl HopKey {
    /// A key from 32 bytes of derived secret.
    pub fn new(secret: &[u8; 32]) -> Self {
        Self(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }
}

impl std::fmt::Debug for HopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HopKey([redacted])")
    }
}

/// A value may go in the header as is (no separators, bounded).
fn plain(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Hop {
    /// A new hop from `from` for `guest_id` at owner `epoch`, now.
    pub fn new(from: &str, guest_id: &str, epoch: u64, at_ms: u64) -> Self {
        let mut nonce = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
        Self {
            from: from.to_owned(),
            guest_id: guest_id.to_owned(),
            epoch,
            at_ms,
            nonce: hex::encode(nonce),
        }
    }

    /// The bytes the MAC covers: every field length-prefixed, so none can bleed into another.
    fn message(&self, method: &str, path_and_query: &str, body: &[u8]) -> Vec<u8> {
        let body_hash = Sha256::digest(body);
        let epoch = self.epoch.to_string();
        let at = self.at_ms.to_string();
        let mut m = b"tether-replica-hop/v1".to_vec();
        for field in [
            self.from.as_bytes(),
            self.guest_id.as_bytes(),
            epoch.as_bytes(),
            at.as_bytes(),
            self.nonce.as_bytes(),
            method.as_bytes(),
            path_and_query.as_bytes(),
            &body_hash[..],
        ] {
            m.extend_from_slice(&(field.len() as u64).to_be_bytes());
            m.extend_from_slice(field);
        }
        m
    }

    /// The header value for this hop on `method path_and_query` with `body`.
    pub fn header(&self, key: &HopKey, method: &str, path_and_query: &str, body: &[u8]) -> String {
        let tag = ring::hmac::sign(&key.0, &self.message(method, path_and_query, body));
        format!(
            "v1;from={};guest={};epoch={};at={};nonce={};mac={}",
            self.from,
            self.guest_id,
            self.epoch,
            self.at_ms,
            self.nonce,
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    }

    fn parse(header: &str) -> Result<(Self, Vec<u8>), HopError> {
        let mut parts = header.split(';');
        if parts.next() != Some("v1") {
            return Err(HopError::Malformed("not version v1"));
        }
        let mut fields: HashMap<&str, &str> = HashMap::new();
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or(HopError::Malformed("field without ="))?;
            if fields.insert(k, v).is_some() {
                return Err(HopError::Malformed("field given twice"));
            }
        }
        let get = |k: &'static str| fields.get(k).copied().ok_or(HopError::Malformed(k));
        let text = |k: &'static str| {
            let v = get(k)?;
            if plain(v) {
                Ok(v.to_owned())
            } else {
                Err(HopError::Malformed(k))
            }
        };
        let number = |k: &'static str| get(k)?.parse::<u64>().map_err(|_| HopError::Malformed(k));
        let mac = URL_SAFE_NO_PAD
            .decode(get("mac")?)
            .map_err(|_| HopError::Malformed("mac"))?;
        if fields.len() != 6 {
            return Err(HopError::Malformed("unknown field"));
        }
        Ok((
            Self {
                from: text("from")?,
                guest_id: text("guest")?,
                epoch: number("epoch")?,
                at_ms: number("at")?,
                nonce: text("nonce")?,
            },
            mac,
        ))
    }
}

/// Nonces seen within the window, each with when it may be forgotten.
#[derive(Default)]
pub struct ReplayGuard {
    seen: Mutex<HashMap<String, u64>>,
}

impl ReplayGuard {
    /// Remembers `nonce` until `until_ms`; false if it was already there.
    fn first_use(&self, nonce: &str, now_ms: u64, until_ms: u64) -> Result<(), HopError> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= MAX_REMEMBERED_NONCES {
            seen.retain(|_, until| *until > now_ms);
            if seen.len() >= MAX_REMEMBERED_NONCES {
                return Err(HopError::Busy);
            }
        }
        if seen.contains_key(nonce) {
            return Err(HopError::Replayed);
        }
        seen.insert(nonce.to_owned(), until_ms);
        Ok(())
    }
}

/// Checks `header` on `method path_and_query` with `body` at `now_ms`: the hop it names, or
/// why it is refused. A hop that verifies is remembered, so it verifies once.
pub fn verify(
    key: &HopKey,
    replay: &ReplayGuard,
    header: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    now_ms: u64,
) -> Result<Hop, HopError> {
    let (hop, mac) = Hop::parse(header)?;
    ring::hmac::verify(&key.0, &hop.message(method, path_and_query, body), &mac)
        .map_err(|_| HopError::BadMac)?;
    let window = HOP_WINDOW.as_millis() as u64;
    let skew = now_ms.abs_diff(hop.at_ms);
    if skew > window {
        return Err(HopError::Stale(skew));
    }
    // Remembered until the hop's own time leaves the window: after that it is Stale anyway.
    replay.first_use(&hop.nonce, now_ms, hop.at_ms.saturating_add(window))?;
    Ok(hop)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn key(b: u8) -> HopKey {
        HopKey::new(&[b; 32])
    }

    fn signed() -> (Hop, String) {
        let hop = Hop::new("r1", "guest-a", 7, NOW);
        let header = hop.header(&key(1), "POST", "/kbs/v0/admin/guests/guest-a/ping", b"{}");
        (hop, header)
    }

    #[test]
    fn a_hop_verifies_once_under_the_shared_key() {
        let (hop, header) = signed();
        let guard = ReplayGuard::default();
        let path = "/kbs/v0/admin/guests/guest-a/ping";
        let got = verify(&key(1), &guard, &header, "POST", path, b"{}", NOW + 5).unwrap();
        assert_eq!(got, hop);
        assert_eq!(
            verify(&key(1), &guard, &header, "POST", path, b"{}", NOW + 6),
            Err(HopError::Replayed)
        );
    }

    #[test]
    fn a_changed_request_another_key_or_an_old_hop_is_refused() {
        let (_, header) = signed();
        let guard = ReplayGuard::default();
        let path = "/kbs/v0/admin/guests/guest-a/ping";
        let body: &[u8] = b"{}";
        for (k, method, p, body) in [
            (key(2), "POST", path, body),
            (key(1), "GET", path, body),
            (key(1), "POST", "/kbs/v0/admin/guests/guest-b/ping", body),
            (key(1), "POST", path, &b"{\"kind\":\"all\"}"[..]),
        ] {
            assert_eq!(
                verify(&k, &guard, &header, method, p, body, NOW),
                Err(HopError::BadMac)
            );
        }
        let other_guest = header.replace("guest=guest-a", "guest=guest-b");
        assert_eq!(
            verify(&key(1), &guard, &other_guest, "POST", path, b"{}", NOW),
            Err(HopError::BadMac)
        );
        let late = NOW + HOP_WINDOW.as_millis() as u64 + 1;
        assert!(matches!(
            verify(&key(1), &guard, &header, "POST", path, b"{}", late),
            Err(HopError::Stale(_))
        ));
        for bad in ["", "v2;from=a", "v1;from=a;from=b", "v1;from=a b"] {
            assert!(matches!(
                verify(&key(1), &guard, bad, "POST", path, b"", NOW),
                Err(HopError::Malformed(_))
            ));
        }
    }
}
