//! The RCAR session table: a bounded concurrent map from session id to the
//! challenge issued and, once attested, the token. No guard is ever held
//! across an await: callers take what they need and release.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use kbs_types::{HashAlgorithm, Tee};
use uuid::Uuid;

use crate::token::VerifiedToken;

/// Where a session is in the handshake.
#[derive(Debug)]
pub(crate) enum State {
    /// Challenge issued, waiting for evidence.
    Challenged,
    /// Evidence received; the nonce is spent whatever the outcome.
    Verifying,
    /// Evidence verification failed; the session can only expire.
    Failed,
    /// Attested: the cookie now stands for this token.
    Attested(Arc<VerifiedToken>),
}

/// One RCAR session.
#[derive(Debug)]
pub(crate) struct Session {
    pub tee: Tee,
    pub nonce: String,
    pub hash: HashAlgorithm,
    pub expires: Instant,
    pub state: State,
}

/// What `attest` needs from a challenged session.
pub(crate) struct Challenge {
    pub tee: Tee,
    pub nonce: String,
    pub hash: HashAlgorithm,
}

/// Why a session lookup failed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    NotFound,
    Expired,
    /// The nonce was already presented (attested, failed or in flight).
    Spent,
    /// Not attested yet (resource request with a fresh session).
    NotAttested,
    Full,
}

/// Bounded map of live sessions.
pub(crate) struct SessionTable {
    sessions: DashMap<Uuid, Session>,
    capacity: usize,
    /// Count kept beside the map so the capacity check is O(1) (DashMap::len locks every shard).
    len: AtomicUsize,
}

impl SessionTable {
    pub fn new(capacity: usize) -> Self {
        Self {
            sessions: DashMap::new(),
            capacity,
            len: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Inserts a new session, purging expired ones first when full.
    pub fn insert(&self, id: Uuid, session: Session, now: Instant) -> Result<(), Lookup> {
        if self.len.load(Ordering::Relaxed) >= self.capacity {
            self.purge_expired(now);
            if self.len.load(Ordering::Relaxed) >= self.capacity {
                return Err(Lookup::Full);
            }
        }
        match self.sessions.entry(id) {
            // A v4 collision is practically impossible; refuse rather than overwrite.
            Entry::Occupied(_) => Err(Lookup::Full),
            Entry::Vacant(slot) => {
                slot.insert(session);
                self.len.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Removes expired sessions; returns how many went.
    pub fn purge_expired(&self, now: Instant) -> usize {
        let mut removed = 0;
        self.sessions.retain(|_, session| {
            let keep = session.expires > now;
            if !keep {
                removed += 1;
            }
            keep
        });
        // Every removed session was counted once at insert, so this cannot underflow.
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    fn remove_if_expired(&self, id: &Uuid, now: Instant) {
        if self
            .sessions
            .remove_if(id, |_, session| session.expires <= now)
            .is_some()
        {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The challenge of a session still waiting for evidence.
    pub fn challenge(&self, id: &Uuid, now: Instant) -> Result<Challenge, Lookup> {
        let result = match self.sessions.get(id) {
            None => return Err(Lookup::NotFound),
            Some(s) if s.expires <= now => Err(Lookup::Expired),
            Some(s) => match s.state {
                State::Challenged => Ok(Challenge {
                    tee: s.tee,
                    nonce: s.nonce.clone(),
                    hash: s.hash,
                }),
                _ => Err(Lookup::Spent),
            },
        };
        if matches!(result, Err(Lookup::Expired)) {
            self.remove_if_expired(id, now);
        }
        result
    }

    /// Spends the nonce: Challenged -> Verifying, exactly once.
    pub fn begin_verification(&self, id: &Uuid, now: Instant) -> Result<(), Lookup> {
        let mut session = self.sessions.get_mut(id).ok_or(Lookup::NotFound)?;
        if session.expires <= now {
            return Err(Lookup::Expired);
        }
        match session.state {
            State::Challenged => {
                session.state = State::Verifying;
                Ok(())
            }
            _ => Err(Lookup::Spent),
        }
    }

    /// Records the verification outcome.
    pub fn finish(&self, id: &Uuid, outcome: Option<(Arc<VerifiedToken>, Instant)>) {
        if let Some(mut session) = self.sessions.get_mut(id) {
            match outcome {
                Some((token, expires)) => {
                    session.state = State::Attested(token);
                    // The cookie stands for the token, so it lives as long.
                    session.expires = expires;
                }
                None => session.state = State::Failed,
            }
        }
    }

    /// The token of an attested, unexpired session.
    pub fn token(&self, id: &Uuid, now: Instant) -> Result<Arc<VerifiedToken>, Lookup> {
        let result = match self.sessions.get(id) {
            None => return Err(Lookup::NotFound),
            Some(s) if s.expires <= now => Err(Lookup::Expired),
            Some(s) => match &s.state {
                State::Attested(token) => Ok(token.clone()),
                _ => Err(Lookup::NotAttested),
            },
        };
        if matches!(result, Err(Lookup::Expired)) {
            self.remove_if_expired(id, now);
        }
        result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn session(expires: Instant) -> Session {
        Session {
            tee: Tee::Sample,
            nonce: "n".into(),
            hash: HashAlgorithm::Sha384,
            expires,
            state: State::Challenged,
        }
    }

    #[test]
    fn capacity_purges_expired_first() {
        let table = SessionTable::new(2);
        let now = Instant::now();
        let past = now - Duration::from_secs(1);
        let later = now + Duration::from_secs(60);
        table.insert(Uuid::new_v4(), session(past), past).unwrap();
        table.insert(Uuid::new_v4(), session(later), now).unwrap();
        // Full, but one is expired: it makes room.
        table.insert(Uuid::new_v4(), session(later), now).unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(
            table.insert(Uuid::new_v4(), session(later), now),
            Err(Lookup::Full)
        );
    }

    #[test]
    fn nonce_is_spent_once() {
        let table = SessionTable::new(10);
        let now = Instant::now();
        let id = Uuid::new_v4();
        table
            .insert(id, session(now + Duration::from_secs(5)), now)
            .unwrap();
        assert!(table.challenge(&id, now).is_ok());
        table.begin_verification(&id, now).unwrap();
        assert_eq!(table.begin_verification(&id, now), Err(Lookup::Spent));
        assert!(matches!(table.challenge(&id, now), Err(Lookup::Spent)));
        assert!(matches!(table.token(&id, now), Err(Lookup::NotAttested)));
        table.finish(&id, None);
        assert_eq!(table.begin_verification(&id, now), Err(Lookup::Spent));
    }

    #[test]
    fn expired_sessions_are_dropped_on_lookup() {
        let table = SessionTable::new(10);
        let now = Instant::now();
        let id = Uuid::new_v4();
        table
            .insert(id, session(now + Duration::from_millis(1)), now)
            .unwrap();
        let later = now + Duration::from_secs(1);
        assert!(matches!(table.challenge(&id, later), Err(Lookup::Expired)));
        assert!(matches!(table.challenge(&id, later), Err(Lookup::NotFound)));
        assert_eq!(table.len(), 0);
    }
}
