//! Forgetting guests: a guest without a tunnel that has not been seen for
//! [`Retention::forget_after`] leaves the fleet index and storage (its fleet record and its
//! rotation sighting), on a periodic sweep with bounded work. A connected guest is never
//! forgotten, nor one that a rollout in force still waits for (until that rollout ends: its
//! deadline bounds the wait). The guest directory forgets on its own, sooner (token expiry).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tunnel::Hub;

use super::index::Fleet;
use crate::metrics::ObservabilityMetrics;
use crate::storage::{FleetStore, StoreError, now_ms};

/// Records looked at per sweep.
pub const SCAN_PER_SWEEP: usize = 10_000;
/// Guests forgotten per sweep at most.
pub const FORGET_PER_SWEEP: usize = 1_000;

/// How long the fleet view keeps guests that are gone, and how often it checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// A guest without a tunnel, not seen for this long, is forgotten.
    pub forget_after: Duration,
    /// Time between sweeps.
    pub sweep_every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            forget_after: Duration::from_secs(30 * 24 * 3600),
            sweep_every: Duration::from_secs(60),
        }
    }
}

impl Retention {
    /// The last-seen time (Unix ms) before which a guest is forgotten, at `now_ms`.
    pub fn cutoff(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(u64::try_from(self.forget_after.as_millis()).unwrap_or(u64::MAX))
    }
}

/// One sweep at `now_ms` (injectable, so tests need not wait 30 days): up to
/// [`FORGET_PER_SWEEP`] guests among the next [`SCAN_PER_SWEEP`] records that have no live
/// tunnel in `hub` and were not seen since the cut-off are forgotten in storage, then in
/// memory. Returns how many went.
pub async fn sweep(
    fleet: &Fleet,
    store: &dyn FleetStore,
    hub: &Hub,
    retention: Retention,
    now_ms: u64,
    metrics: &ObservabilityMetrics,
) -> Result<usize, StoreError> {
    let cutoff = retention.cutoff(now_ms);
    let is_live = |id: &str| hub.get(id).is_some();
    let candidates = fleet.stale_candidates(cutoff, SCAN_PER_SWEEP, FORGET_PER_SWEEP, is_live);
    if candidates.is_empty() {
        return Ok(0);
    }
    // Storage first: a guest storage keeps (a rollout waits for it, or it was written since)
    // stays in memory too; one that comes back meanwhile is written again.
    let started = Instant::now();
    let forgotten = store.forget_fleet(&candidates, cutoff).await;
    metrics.storage("forget_fleet", started);
    let gone = fleet.forget(&forgotten?, cutoff, is_live);
    if gone > 0 {
        metrics.fleet_forgotten.inc_by(gone as u64);
        metrics
            .fleet_guests
            .set(i64::try_from(fleet.len()).unwrap_or(i64::MAX));
        tracing::info!(
            forgotten = gone,
            kept = candidates.len().saturating_sub(gone),
            forget_after_s = retention.forget_after.as_secs(),
            "guests gone for longer than fleet.forget_after forgotten"
        );
    }
    Ok(gone)
}

/// Sweeps every `retention.sweep_every` until `stop`.
pub fn spawn_forgetter(
    fleet: Arc<Fleet>,
    store: Arc<dyn FleetStore>,
    hub: Hub,
    retention: Retention,
    metrics: ObservabilityMetrics,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(retention.sweep_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            if let Err(e) = sweep(&fleet, store.as_ref(), &hub, retention, now_ms(), &metrics).await
            {
                tracing::warn!(error = %e, "forgetting gone guests failed; will retry");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeSet;

    use super::*;
    use crate::fleet::GuestRecord;
    use crate::storage::{NewRollout, RolloutStore, SqliteStore};

    const DAY: u64 = 24 * 3600 * 1000;

    fn gone_since(id: &str, last_seen: u64) -> GuestRecord {
        GuestRecord {
            guest_id: id.into(),
            first_seen: last_seen,
            last_seen,
            ..GuestRecord::default()
        }
    }

    fn metrics() -> ObservabilityMetrics {
        ObservabilityMetrics::register(&mut prometheus_client::registry::Registry::default())
    }

    async fn stored(store: &SqliteStore) -> BTreeSet<String> {
        store
            .load_fleet()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect()
    }

    #[tokio::test]
    async fn guests_gone_longer_than_the_retention_leave_memory_and_storage() {
        let (_d, store) = SqliteStore::open_temp().await;
        let metrics = metrics();
        // The sweep runs 31 days from now (injected); records are written now.
        let now = now_ms() + 31 * DAY;
        let fleet = Fleet::new();
        fleet.insert(gone_since("gone", now - 31 * DAY));
        fleet.insert(gone_since("recent", now - DAY));
        fleet.insert(GuestRecord {
            connected: true,
            ..gone_since("connected", now - 40 * DAY)
        });
        fleet.insert(gone_since("waited-for", now - 31 * DAY));
        fleet.flush(&store, &metrics).await;
        store
            .create_rollout(
                &NewRollout::for_test("default/key/a", 1),
                &["waited-for".into()],
            )
            .await
            .unwrap();
        let retention = Retention::default();
        let hub = Hub::new();

        // Before the retention has passed, nothing goes.
        let early = now - 2 * DAY;
        assert_eq!(
            sweep(&fleet, &store, &hub, retention, early, &metrics)
                .await
                .unwrap(),
            0
        );
        assert_eq!(fleet.len(), 4);

        assert_eq!(
            sweep(&fleet, &store, &hub, retention, now, &metrics)
                .await
                .unwrap(),
            1
        );
        assert!(fleet.get("gone").is_none());
        for kept in ["recent", "connected", "waited-for"] {
            assert!(fleet.get(kept).is_some(), "{kept} is kept");
        }
        assert_eq!(
            stored(&store).await,
            BTreeSet::from(["recent", "connected", "waited-for"].map(String::from))
        );
        assert_eq!(metrics.fleet_forgotten.get(), 1);
        assert_eq!(metrics.fleet_guests.get(), 3);
        // A forgotten guest is not written back by the flusher.
        fleet.flush(&store, &metrics).await;
        assert!(!stored(&store).await.contains("gone"));
    }

    #[tokio::test]
    async fn a_guest_back_while_storage_forgets_it_is_kept_and_written_again() {
        let (_d, store) = SqliteStore::open_temp().await;
        let metrics = metrics();
        let now = now_ms() + 31 * DAY;
        let fleet = Fleet::new();
        fleet.insert(gone_since("back", now - 31 * DAY));
        fleet.flush(&store, &metrics).await;
        let cutoff = Retention::default().cutoff(now);
        let candidates = fleet.stale_candidates(cutoff, 10, 10, |_| false);
        assert_eq!(candidates, ["back"]);
        assert_eq!(
            store.forget_fleet(&candidates, cutoff).await.unwrap(),
            ["back"]
        );
        // It connects again before the index forgets it.
        assert_eq!(fleet.forget(&candidates, cutoff, |_| true), 0);
        assert!(fleet.get("back").is_some());
        fleet.flush(&store, &metrics).await;
        assert!(stored(&store).await.contains("back"), "written again");
    }

    #[test]
    fn each_sweep_looks_at_a_bounded_slice_and_all_are_seen_in_turn() {
        let fleet = Fleet::new();
        for i in 0..25 {
            fleet.insert(gone_since(&format!("g{i:02}"), 1));
        }
        let mut seen = BTreeSet::new();
        for _ in 0..3 {
            let slice = fleet.stale_candidates(2, 10, 100, |_| false);
            assert_eq!(slice.len(), 10, "{slice:?}");
            seen.extend(slice);
        }
        assert_eq!(seen.len(), 25, "the third slice wraps around");
        assert_eq!(
            fleet.stale_candidates(2, 10, 3, |_| false).len(),
            3,
            "at most max"
        );
        assert!(
            fleet.stale_candidates(1, 100, 100, |_| false).is_empty(),
            "seen at the cut-off"
        );
        assert!(
            fleet.stale_candidates(2, 100, 100, |_| true).is_empty(),
            "all live"
        );
    }
}
