//! What a replica does while PostgreSQL is out of reach (docs/operations.md, "When the
//! database goes away"):
//! - [`Reachability`]: whether the database answered last time; the change feed's listener
//!   clears it when it listens again, any successful statement of the store too;
//! - the attested resource GET falls back to the latest version this replica last read
//!   ([`LatestCache`], sealed under the KEK), never to anything the database did not hold;
//! - [`retry_conflicts`]: a transaction that lost a serialization or deadlock conflict
//!   against another replica (SQLSTATE 40001, 40P01) runs again, a bounded number of times.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::super::latest_cache::LatestCache;
use crate::storage::StoreError;

/// Attempts of a transaction that keeps losing conflicts (the first one included).
pub(super) const CONFLICT_ATTEMPTS: u32 = 5;
/// The first wait before running a conflicting transaction again; doubled each time, and a
/// random part of it added so two replicas that collided do not collide again in step.
const CONFLICT_BACKOFF: Duration = Duration::from_millis(10);

/// Whether the database was reachable last time anything tried, and the copies of the
/// latest resource versions a GET may fall back to meanwhile.
#[derive(Default)]
pub(super) struct Reachability {
    down: AtomicBool,
    /// Latest versions as last read (sealed); invalidated by this replica's writes and by
    /// the change feed, cleared when the feed listens again (it may have missed changes).
    pub(super) fallback: LatestCache,
}

impl Reachability {
    /// Notes the outcome of a database operation.
    pub(super) fn note<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => self.up(),
            Err(e) if e.is_unavailable() => self.down(),
            Err(_) => {}
        }
    }

    pub(super) fn up(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("storage: the database answers again");
        }
    }

    pub(super) fn down(&self) {
        if !self.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                "storage: the database is out of reach; serving what this replica holds (tunnels, cached resource versions), refusing writes with 503"
            );
        }
    }

    /// Whether the last attempt found the database out of reach.
    pub(super) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// The feed listens again: changes may have been missed, so no copy is trusted.
    pub(super) fn relistened(&self) {
        self.fallback.clear();
        self.up();
    }
}

/// Shared between the store and its listener.
pub(super) type SharedReachability = Arc<Reachability>;

/// Runs `op` (one whole transaction) again while it fails with a conflict `is_conflict`
/// recognises, at most [`CONFLICT_ATTEMPTS`] times, with a jittered, doubling wait between.
pub(super) async fn retry_conflicts<T, E, F, Fut>(
    what: &str,
    is_conflict: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if is_conflict(&e) && attempt < CONFLICT_ATTEMPTS => {
                let base = CONFLICT_BACKOFF * 2u32.pow(attempt - 1);
                let wait = base + base.mul_f64(rand::random::<f64>());
                tracing::debug!(what, attempt, error = %e, wait_ms = wait.as_millis() as u64, "storage: transaction conflict; running it again");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

impl StoreError {
    /// Whether the database refused a transaction for a conflict with a concurrent one
    /// (serialization failure 40001, deadlock 40P01): running it again may succeed.
    pub fn is_conflict(&self) -> bool {
        match self {
            Self::Database(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("40001" | "40P01"))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[tokio::test(start_paused = true)]
    async fn a_conflict_runs_again_a_bounded_number_of_times() {
        let runs = AtomicU32::new(0);
        let r: Result<(), String> = retry_conflicts(
            "t",
            |e: &String| e == "conflict",
            || async {
                runs.fetch_add(1, Ordering::Relaxed);
                Err("conflict".to_string())
            },
        )
        .await;
        assert_eq!(r.unwrap_err(), "conflict");
        assert_eq!(runs.load(Ordering::Relaxed), CONFLICT_ATTEMPTS);

        let runs = AtomicU32::new(0);
        let r: Result<u32, String> = retry_conflicts(
            "t",
            |e: &String| e == "conflict",
            || async {
                let n = runs.fetch_add(1, Ordering::Relaxed);
                if n < 2 {
                    Err("conflict".to_string())
                } else {
                    Ok(n)
                }
            },
        )
        .await;
        assert_eq!(
            r.unwrap(),
            2,
            "the third run succeeded and its result came back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn another_error_is_not_retried() {
        let runs = AtomicU32::new(0);
        let r: Result<(), String> = retry_conflicts(
            "t",
            |e: &String| e == "conflict",
            || async {
                runs.fetch_add(1, Ordering::Relaxed);
                Err("constraint".to_string())
            },
        )
        .await;
        assert_eq!(r.unwrap_err(), "constraint");
        assert_eq!(runs.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn reachability_follows_outcomes_and_a_relisten_drops_the_copies() {
        let r = Reachability::default();
        r.note::<()>(&Err(StoreError::Database(sqlx::Error::PoolTimedOut)));
        assert!(r.is_down());
        r.note::<()>(&Err(StoreError::NotFound("x".into())));
        assert!(
            r.is_down(),
            "an answer that is an error still is not reachability"
        );
        r.note(&Ok(()));
        assert!(!r.is_down());
        r.fallback.fill(
            r.fallback.ticket(),
            "a/b/c",
            crate::storage::latest_cache::SealedLatest {
                version: 1,
                nonce: vec![0; 12],
                ciphertext: vec![1; 8],
                sha256: String::new(),
            },
        );
        r.down();
        r.relistened();
        assert!(!r.is_down());
        assert!(r.fallback.is_empty());
    }
}
