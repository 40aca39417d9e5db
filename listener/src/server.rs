//! The accept loop: admit each connection, serve it on its own task, and drain them all
//! (within a grace) at shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Level};

use crate::admission::Admit;
use crate::connection::{self, ConnectionSettings};
use crate::io::Counted;
use crate::limits::Limits;
use crate::pool::{ConnectionStats, Pool};

/// Pause after a failed accept (EMFILE and friends), so a full file table is not a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Default time open connections get to finish their requests at shutdown.
const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(5);

/// An HTTP(S) server for one already bound listener. Build it, then [`serve`](Self::serve).
#[derive(Debug)]
pub struct Server<A> {
    admit: A,
    name: &'static str,
    limits: Limits,
    upgrades: bool,
    drain_grace: Duration,
    handshake_failures: Level,
    stats: ConnectionStats,
}

impl<A: Admit> Server<A> {
    /// A server whose connections `admit` decides on; [`Limits::default`], no upgrades, a
    /// 5 s drain grace, handshake failures logged at debug level.
    pub fn new(admit: A) -> Self {
        Self {
            admit,
            name: "http",
            limits: Limits::default(),
            upgrades: false,
            drain_grace: DEFAULT_DRAIN_GRACE,
            handshake_failures: Level::DEBUG,
            stats: ConnectionStats::default(),
        }
    }

    /// Live counters of this server's connections (open, evicted, timed out), for metrics
    /// and tests; valid before and after [`serve`](Self::serve).
    pub fn stats(&self) -> ConnectionStats {
        self.stats.clone()
    }

    /// Count into `stats` (made beforehand, e.g. to register it as metrics) rather than
    /// into counters of the server's own.
    #[must_use]
    pub fn count_into(mut self, stats: ConnectionStats) -> Self {
        self.stats = stats;
        self
    }

    /// The name logs give this server (`listener` field).
    #[must_use]
    pub fn name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// Bound each connection by `limits`.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Let requests upgrade their connection (WebSocket); an upgraded connection leaves the
    /// server's care: the drain does not wait for it.
    #[must_use]
    pub fn with_upgrades(mut self) -> Self {
        self.upgrades = true;
        self
    }

    /// How long open connections may finish their requests at shutdown.
    #[must_use]
    pub fn drain_grace(mut self, grace: Duration) -> Self {
        self.drain_grace = grace;
        self
    }

    /// Log refused and timed-out TLS handshakes at `level` (debug by default; info suits
    /// an endpoint where a refused client certificate is worth an operator's eye).
    #[must_use]
    pub fn log_handshake_failures(mut self, level: Level) -> Self {
        self.handshake_failures = level;
        self
    }

    /// Serve `listener` until `shutdown` is cancelled; then stop accepting (the listener is
    /// closed), ask every connection to finish its in-flight requests and close, and return
    /// once they have, or once the drain grace has passed.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let Self {
            admit,
            name,
            limits,
            upgrades,
            drain_grace,
            handshake_failures,
            stats,
        } = self;
        let limits = limits.normalized();
        let pool = Pool::new(&limits, stats.clone());
        let settings = Arc::new(ConnectionSettings::new(
            name,
            &limits,
            upgrades,
            handshake_failures,
            stats,
        ));
        let tracker = TaskTracker::new();
        loop {
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        let pause = tokio::time::sleep(ACCEPT_BACKOFF);
                        if shutdown.run_until_cancelled(pause).await.is_none() {
                            break;
                        }
                        continue;
                    }
                },
            };
            let Some(admission) = admit.admit(peer) else {
                tracing::debug!(listener = name, %peer, "connection refused at accept");
                continue;
            };
            // At a cap the oldest idle connection makes room; when every one has a request
            // in flight the loop waits here, holding this one socket beyond the cap, while
            // later clients wait in the kernel's backlog.
            let Some(permit) = shutdown.run_until_cancelled(pool.room()).await else {
                break;
            };
            let Some(member) = shutdown.run_until_cancelled(pool.join()).await else {
                break;
            };
            let _ = tcp.set_nodelay(true);
            let tcp = Counted::new(tcp, permit);
            let settings = Arc::clone(&settings);
            let shutdown = shutdown.clone();
            let span = tracing::debug_span!("connection", listener = name, %peer);
            tracker.spawn(
                async move {
                    connection::serve(tcp, peer, admission, &settings, &shutdown, member).await;
                }
                .instrument(span),
            );
        }
        // Refuse new clients at once rather than leave them in the backlog during the drain.
        drop(listener);
        tracker.close();
        if tokio::time::timeout(drain_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                listener = name,
                open = tracker.len(),
                "connections still open after the drain grace"
            );
        }
    }
}
