//! This replica's end of the change feed: one connection LISTENing on [`CHANNEL`], each
//! notification handed to the process's [`ChangeFeed`]. When the connection drops, it
//! connects and listens again (with backoff, for as long as the database is away); whatever
//! was announced in between is lost, so once it listens again the feed announces
//! [`Change::Lost`] and subscribers reload everything they follow. Announcing it only then
//! (not when the connection drops) matters: a reload while the database is still away fails,
//! and nothing would ask for another. The listener also keeps the store's view of
//! reachability and its fallback copies of resources in step (see `outage.rs`).

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::outage::SharedReachability;
use crate::storage::{CHANNEL, Change, ChangeFeed, StoreError};

/// First wait after a failed connect; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Also how long after the database is back this replica may still take to notice (and
/// to reload what it follows).
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Stops the listener when the last clone of the store that owns it is dropped.
pub(super) struct ListenerGuard(CancellationToken);

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Starts listening on `pool` for `feed` (needs a Tokio runtime).
pub(super) fn spawn(pool: PgPool, feed: ChangeFeed, reach: SharedReachability) -> ListenerGuard {
    let stop = CancellationToken::new();
    tokio::spawn(run(pool, feed, reach, stop.clone()));
    ListenerGuard(stop)
}

async fn run(pool: PgPool, feed: ChangeFeed, reach: SharedReachability, stop: CancellationToken) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let connected = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = stop.cancelled() => return,
            r = connected => match r {
                Ok(l) => l,
                Err(e) => {
                    let e = StoreError::from(e);
                    if e.is_unavailable() {
                        reach.down();
                    }
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "change feed: cannot listen; other replicas' changes are not followed until it can");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        backoff = FIRST_BACKOFF;
        // Anything may have changed while nobody listened (or before the first listen).
        reach.relistened();
        feed.publish(Change::Lost);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => match Change::decode(n.payload()) {
                    Some(change) => {
                        if let Change::Resource(path) = &change {
                            reach.fallback.invalidate(path);
                        }
                        feed.publish(change)
                    }
                    None => {
                        tracing::warn!(
                            payload_len = n.payload().len(),
                            "change feed: a notification this version does not know; reloading everything"
                        );
                        reach.fallback.clear();
                        feed.publish(Change::Lost);
                    }
                },
                // The connection dropped: listen again from the top (Lost once it does).
                Ok(None) => {
                    tracing::warn!("change feed: connection lost; reconnecting");
                    reach.down();
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "change feed: listening failed; starting over");
                    break;
                }
            }
        }
    }
}
