//! [`GuestDirectory`]: what the KBS knows of each guest with a tunnel beyond what the tunnel
//! handle carries: the claims of the token it connected (or last re-attested) with, and the
//! TEE key that token names. Server-request features need both: the resource policy runs on
//! the guest's own claims, and anything pushed is sealed to its TEE key.
//!
//! Only a proven tunnel writes here ([`GuestDirectory::record_proven`], called after the
//! guest proved possession of the token's TEE key and before its tunnel is registered), so a
//! token that merely names a guest changes nothing about it. Entries carry the epoch of the
//! tunnel that proved them: when two tunnels of one guest race, the directory keeps the one
//! the hub keeps (the newer epoch).

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use kbs_types::TeePubKey;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::claims::Claims;
use crate::identity::GuestIdentity;
use crate::token::VerifiedToken;

/// The attested facts of one guest, from its latest verified token.
#[derive(Clone, Debug)]
pub struct GuestAttestation {
    /// Token claims, as the resource policy sees them (`input`); shared with the token cache
    /// and sessions holding the same token.
    pub claims: Claims,
    /// The TEE key the guest proved possession of.
    pub tee_pubkey: TeePubKey,
    /// The identity the claims state (`[tether]` of the init-data), guest id included.
    pub identity: GuestIdentity,
    /// TEE name (`sample`, `tdx`, ...).
    pub tee: String,
    /// Token issued-at, seconds since the Unix epoch.
    pub iat: u64,
    /// Token expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Epoch of the tunnel that proved possession of `tee_pubkey`.
    pub epoch: u64,
    /// SHA-256 of the canonical JSON (RFC 8785) of `tee_pubkey` (`None` if it would not
    /// serialise, which then compares unequal to every key).
    pub key_digest: Option<[u8; 32]>,
}

impl GuestAttestation {
    /// The facts a verified token states, proven by the tunnel of `epoch`.
    pub fn of(token: &VerifiedToken, epoch: u64) -> Self {
        Self {
            claims: token.claims.clone(),
            tee_pubkey: token.tee_pubkey.clone(),
            identity: token.identity.clone(),
            tee: token.tee.clone(),
            iat: token.iat,
            exp: token.exp,
            epoch,
            key_digest: tee_key_digest(&token.tee_pubkey).ok(),
        }
    }

    /// Whether this entry's TEE key is the one whose digest is `digest`.
    pub fn same_key(&self, digest: Option<[u8; 32]>) -> bool {
        self.key_digest.is_some() && self.key_digest == digest
    }

    /// The first 16 hex digits of the key digest: names a key in logs and events (a public
    /// key's hash, nothing secret).
    pub fn key_fingerprint(&self) -> String {
        fingerprint(self.key_digest)
    }
}

/// SHA-256 of the canonical JSON (RFC 8785) of a TEE public key: how the KBS tells two keys
/// apart whatever the spelling of their JWK.
pub fn tee_key_digest(key: &TeePubKey) -> Result<[u8; 32], serde_json::Error> {
    use sha2::Digest as _;
    Ok(sha2::Sha256::digest(serde_json_canonicalizer::to_vec(key)?).into())
}

fn fingerprint(digest: Option<[u8; 32]>) -> String {
    match digest {
        Some(d) => hex::encode(&d[..8]),
        None => "unknown".into(),
    }
}

/// What [`GuestDirectory::record_proven`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The guest had no entry.
    First,
    /// Replaced an entry with the same TEE key (a reconnect, a new token).
    SameKey,
    /// Replaced an entry with another TEE key.
    KeyChanged {
        /// Fingerprint of the key replaced.
        previous: String,
        /// Fingerprint of the key now recorded.
        current: String,
        /// Epoch of the tunnel that had proved the previous key.
        previous_epoch: u64,
    },
    /// Not recorded: a tunnel with a newer epoch already proved this guest (a race the hub
    /// settles the same way).
    Stale,
}

/// Latest attestation per guest id; entries outlive their tunnel until [`Self::prune`].
#[derive(Debug, Default)]
pub struct GuestDirectory {
    guests: DashMap<String, Arc<GuestAttestation>>,
}

impl GuestDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the token of a tunnel of `epoch` whose guest just proved possession of the
    /// token's TEE key, unless a newer tunnel of the guest already did.
    pub fn record_proven(&self, token: &VerifiedToken, epoch: u64) -> Recorded {
        let entry = Arc::new(GuestAttestation::of(token, epoch));
        match self.guests.entry(entry.identity.guest_id.clone()) {
            Entry::Vacant(slot) => {
                slot.insert(entry);
                Recorded::First
            }
            Entry::Occupied(slot) if slot.get().epoch > epoch => Recorded::Stale,
            Entry::Occupied(mut slot) => {
                let previous = slot.insert(entry.clone());
                if previous.same_key(entry.key_digest) {
                    Recorded::SameKey
                } else {
                    Recorded::KeyChanged {
                        previous: previous.key_fingerprint(),
                        current: entry.key_fingerprint(),
                        previous_epoch: previous.epoch,
                    }
                }
            }
        }
    }

    /// Records a fresh token a live tunnel accepted in band (same guest, same TEE key as the
    /// tunnel's: the caller checked). Only replaces the entry that tunnel proved: if another
    /// tunnel (another key) took over the guest meanwhile, nothing changes. True if recorded.
    pub fn refresh(&self, token: &VerifiedToken) -> bool {
        let digest = tee_key_digest(&token.tee_pubkey).ok();
        match self.guests.get_mut(&token.identity.guest_id) {
            Some(mut slot) if slot.same_key(digest) => {
                let epoch = slot.epoch;
                *slot = Arc::new(GuestAttestation::of(token, epoch));
                true
            }
            _ => false,
        }
    }

    /// The latest attestation of `guest_id`.
    pub fn get(&self, guest_id: &str) -> Option<Arc<GuestAttestation>> {
        self.guests.get(guest_id).map(|e| Arc::clone(&e))
    }

    /// Drops entries of guests without a live tunnel in `hub` whose token expired before
    /// `now_s`; returns how many went.
    pub fn prune(&self, hub: &tunnel::Hub, now_s: u64) -> usize {
        let before = self.guests.len();
        self.guests
            .retain(|id, e| e.exp >= now_s || hub.get(id).is_some());
        before.saturating_sub(self.guests.len())
    }

    /// Prunes every `every` until `stop` (on its own schedule: whatever plugins are enabled).
    pub fn spawn_pruner(
        self: Arc<Self>,
        hub: tunnel::Hub,
        every: Duration,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => return,
                }
                let pruned = self.prune(&hub, crate::storage::now_ms() / 1000);
                if pruned > 0 {
                    tracing::debug!(pruned, "guest directory pruned");
                }
            }
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.guests.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.guests.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::token::{TokenSigner, build_claims};

    fn token(guest_id: &str, ttl: Duration) -> VerifiedToken {
        token_for(guest_id, ttl, "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis")
    }

    fn token_for(guest_id: &str, ttl: Duration, x: &str) -> VerifiedToken {
        let signer = TokenSigner::ephemeral().unwrap();
        let key = TeePubKey::EC {
            crv: "P-256".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: x.into(),
            y: "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE".into(),
        };
        let identity = GuestIdentity {
            guest_id: guest_id.into(),
            labels: Default::default(),
            ..Default::default()
        };
        let claims = build_claims("sample", json!({}), &key, "bm9uY2U=", None, &identity);
        signer.issue_verified(claims, ttl).unwrap().1
    }

    #[test]
    fn records_the_latest_and_prunes_expired_offline_guests() {
        let dir = GuestDirectory::new();
        let t = token("g1", Duration::from_secs(300));
        assert_eq!(dir.record_proven(&t, 1), Recorded::First);
        let got = dir.get("g1").unwrap();
        assert_eq!(got.exp, t.exp);
        assert_eq!(got.claims, t.claims);
        let hub = tunnel::Hub::new();
        assert_eq!(dir.prune(&hub, t.exp), 0, "not expired yet");
        assert_eq!(dir.prune(&hub, t.exp + 1), 1);
        assert!(dir.get("g1").is_none());
    }

    #[test]
    fn the_newest_proven_tunnel_wins_and_key_changes_are_reported() {
        let dir = GuestDirectory::new();
        let hour = Duration::from_secs(3600);
        let a = token_for("g1", hour, "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis");
        let b = token_for("g1", hour, "AAn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis");
        assert_eq!(dir.record_proven(&a, 10), Recorded::First);
        assert_eq!(dir.record_proven(&a, 11), Recorded::SameKey);
        let Recorded::KeyChanged {
            previous,
            current,
            previous_epoch,
        } = dir.record_proven(&b, 12)
        else {
            panic!("a key change");
        };
        assert_eq!(previous_epoch, 11);
        assert_ne!(previous, current);
        assert_eq!(current.len(), 16);
        // A slower tunnel of an older epoch loses, as it does in the hub.
        assert_eq!(dir.record_proven(&a, 9), Recorded::Stale);
        assert_eq!(dir.get("g1").unwrap().epoch, 12);
        // An in-band refresh only touches the entry its own key proved.
        assert!(!dir.refresh(&a), "key a no longer holds g1");
        let fresh_b = token_for(
            "g1",
            hour * 2,
            "AAn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis",
        );
        assert!(dir.refresh(&fresh_b));
        let got = dir.get("g1").unwrap();
        assert_eq!((got.epoch, got.exp), (12, fresh_b.exp));
        assert!(
            !dir.refresh(&token("g2", hour)),
            "no entry, nothing to refresh"
        );
        assert!(dir.get("g2").is_none());
    }

    #[tokio::test]
    async fn the_pruner_runs_on_its_own_schedule() {
        let dir = Arc::new(GuestDirectory::new());
        dir.record_proven(&token("gone", Duration::ZERO), 1);
        dir.record_proven(&token("kept", Duration::from_secs(300)), 2);
        let stop = CancellationToken::new();
        let task =
            dir.clone()
                .spawn_pruner(tunnel::Hub::new(), Duration::from_millis(20), stop.clone());
        // The expired entry goes once the clock passes its expiry second (at most ~1 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while dir.get("gone").is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "expired guest never pruned"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(dir.get("kept").is_some(), "a live token is kept");
        stop.cancel();
        task.await.unwrap();
    }
}
