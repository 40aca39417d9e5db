//! [`GuestDirectory`]: what the KBS knows of each guest with a tunnel beyond what the tunnel
//! handle carries: the claims of the token it connected (or last re-attested) with, and the
//! TEE key that token names. Server-request features need both: the resource policy runs on
//! the guest's own claims, and anything pushed is sealed to its TEE key.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
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
}

impl GuestAttestation {
    /// The facts a verified token states.
    pub fn of(token: &VerifiedToken) -> Self {
        Self {
            claims: token.claims.clone(),
            tee_pubkey: token.tee_pubkey.clone(),
            identity: token.identity.clone(),
            tee: token.tee.clone(),
            iat: token.iat,
            exp: token.exp,
        }
    }
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

    /// Records the token a guest connects or re-attests with (replacing an older one).
    pub fn record(&self, token: &VerifiedToken) {
        let entry = Arc::new(GuestAttestation::of(token));
        self.guests.insert(entry.identity.guest_id.clone(), entry);
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
        let signer = TokenSigner::ephemeral().unwrap();
        let key = TeePubKey::EC {
            crv: "P-256".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis".into(),
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
        dir.record(&t);
        let got = dir.get("g1").unwrap();
        assert_eq!(got.exp, t.exp);
        assert_eq!(got.claims, t.claims);
        let hub = tunnel::Hub::new();
        assert_eq!(dir.prune(&hub, t.exp), 0, "not expired yet");
        assert_eq!(dir.prune(&hub, t.exp + 1), 1);
        assert!(dir.get("g1").is_none());
    }

    #[tokio::test]
    async fn the_pruner_runs_on_its_own_schedule() {
        let dir = Arc::new(GuestDirectory::new());
        dir.record(&token("gone", Duration::ZERO));
        dir.record(&token("kept", Duration::from_secs(300)));
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
