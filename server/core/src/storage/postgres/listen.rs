//! This replica's end of the change feed: one connection LISTENing on [`CHANNEL`], each
//! notification handed to the process's [`ChangeFeed`]. When the connection drops, sqlx
//! reconnects and listens again; whatever was announced in between is lost, so the feed
//! announces [`Change::Lost`] and subscribers reload everything they follow.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::storage::{CHANNEL, Change, ChangeFeed};

/// First wait after a failed connect; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Stops the listener when the last clone of the store that owns it is dropped.
pub(super) struct ListenerGuard(CancellationToken);

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Starts listening on `pool` for `feed` (needs a Tokio runtime).
pub(super) fn spawn(pool: PgPool, feed: ChangeFeed) -> ListenerGuard {
    let stop = CancellationToken::new();
    tokio::spawn(run(pool, feed, stop.clone()));
    ListenerGuard(stop)
}

async fn run(pool: PgPool, feed: ChangeFeed, stop: CancellationToken) {
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
        feed.publish(Change::Lost);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => match Change::decode(n.payload()) {
                    Some(change) => feed.publish(change),
                    None => {
                        tracing::warn!(
                            payload_len = n.payload().len(),
                            "change feed: a notification this version does not know; reloading everything"
                        );
                        feed.publish(Change::Lost);
                    }
                },
                // The connection dropped; the next call reconnects and listens again.
                Ok(None) => {
                    tracing::warn!("change feed: connection lost; reconnecting");
                    feed.publish(Change::Lost);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "change feed: listening failed; starting over");
                    break;
                }
            }
        }
    }
}
