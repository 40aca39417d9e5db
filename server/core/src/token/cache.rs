//! A bounded cache of tokens already verified, keyed by the SHA-256 of the token's bytes.
//!
//! In passport mode every resource request carries the token; re-checking the signature each
//! time is the dominant cost of such a request. A hit needs the very same bytes, which this
//! signer verified before, so only `exp` has to be looked at again (the caller does). Entries
//! leave when their token expires; when the cache is full the expired ones are dropped and,
//! if that is not enough, everything is (the next requests simply verify again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::VerifiedToken;

/// Most tokens kept (a few KiB each).
const CAPACITY: usize = 1024;

struct Entry {
    token: Arc<VerifiedToken>,
    /// Unix seconds after which the entry is useless (token expiry plus leeway).
    until: u64,
}

/// Verified tokens by digest.
#[derive(Default)]
pub(crate) struct VerifiedCache {
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

impl VerifiedCache {
    pub fn get(&self, digest: &[u8; 32]) -> Option<Arc<VerifiedToken>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(digest).map(|e| e.token.clone())
    }

    pub fn insert(&self, digest: [u8; 32], token: Arc<VerifiedToken>, until: u64, now: u64) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CAPACITY {
            entries.retain(|_, e| e.until >= now);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(digest, Entry { token, until });
    }

    /// Forgets every entry (the keys that verified them changed).
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn token(exp: u64) -> Arc<VerifiedToken> {
        Arc::new(VerifiedToken {
            claims: crate::claims::Claims::from_value(&json!({})),
            tee_pubkey: kbs_types::TeePubKey::EC {
                crv: "P-256".into(),
                alg: "ECDH-ES+A256KW".into(),
                x: String::new(),
                y: String::new(),
            },
            identity: Default::default(),
            tee: "sample".into(),
            iat: 0,
            exp,
        })
    }

    #[test]
    fn bounded_and_expired_entries_go_first() {
        let cache = VerifiedCache::default();
        // Half expired (until 10), half live (until 1000).
        for i in 0..CAPACITY {
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let until = if i % 2 == 0 { 10 } else { 1000 };
            cache.insert(d, token(until), until, 5);
        }
        assert_eq!(cache.len(), CAPACITY);
        cache.insert([0xff; 32], token(1000), 1000, 100);
        assert_eq!(cache.len(), CAPACITY / 2 + 1);
        assert!(cache.get(&[0xff; 32]).is_some());
        let mut odd = [0u8; 32];
        odd[0] = 1;
        assert!(cache.get(&odd).is_some());
        assert!(cache.get(&[0u8; 32]).is_none());

        // All live and full: cleared, never over capacity.
        let full = VerifiedCache::default();
        for i in 0..=CAPACITY {
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&(i as u64).to_le_bytes());
            full.insert(d, token(1000), 1000, 5);
            assert!(full.len() <= CAPACITY);
        }
        assert_eq!(full.len(), 1);
    }
}
