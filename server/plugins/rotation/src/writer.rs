//! [`TargetWriter`]: group commit of target rows. Every delivery hands its row here; rows
//! queued together are written in one transaction, and a caller that waits is answered only
//! once its row is stored (an ack is durable before the engine moves on). Rows nobody waits
//! for (intermediate states) wait up to [`BEHIND_DELAY`] and are dropped when a newer row of
//! the same target comes first; what a restart reads back is the same either way (a
//! `delivering` row is resumed as `pending`).
//!
//! While the database is out of reach, nothing is dropped: the batch in hand is kept and
//! written again with backoff until the database answers, its waiters still waiting (an ack
//! is answered only once stored). Meanwhile nothing more is taken from the queue, so memory
//! stays bounded ([`QUEUE`] rows queued, one batch in hand) and, once the queue is full,
//! whoever queues a row waits too. Any other failure is retried once, then answered as an
//! error.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use kbs_core::storage::{RolloutStore, TargetRecord};

/// Rows written per transaction at most.
const BATCH: usize = 2048;
/// Rows waiting to be written before writers wait.
const QUEUE: usize = 16 * 1024;

struct Write {
    row: TargetRecord,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct TargetWriter {
    tx: mpsc::Sender<Write>,
}

impl TargetWriter {
    /// Starts the writer task over `store`; it ends when every sender is dropped.
    pub fn spawn(store: Arc<dyn RolloutStore>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx));
        Self { tx }
    }

    /// Queues `row` and waits until it is stored.
    pub async fn write(&self, row: TargetRecord) -> Result<(), String> {
        let (done, stored) = oneshot::channel();
        self.tx
            .send(Write {
                row,
                done: Some(done),
            })
            .await
            .map_err(|_| "target writer stopped".to_string())?;
        stored
            .await
            .map_err(|_| "target writer stopped".to_string())?
    }

    /// Queues `row` without waiting for it to be stored (intermediate states).
    pub async fn write_behind(&self, row: TargetRecord) {
        let _ = self.tx.send(Write { row, done: None }).await;
    }
}

/// Rows queued without a waiter whose key has had no newer write for this long are written;
/// a newer write of the same target within it replaces them (a push that is acked quickly
/// never stores its `delivering` state: that state is only of interest while it lasts).
const BEHIND_DELAY: Duration = Duration::from_millis(250);

/// How long a write waits for more rows to join its transaction.
const GATHER: Duration = Duration::from_millis(2);

type Key = (i64, String);

/// Rows waiting for [`BEHIND_DELAY`]: the newest row per key, and keys in first-queued order.
#[derive(Default)]
struct Behind {
    rows: HashMap<Key, TargetRecord>,
    order: VecDeque<(Instant, Key)>,
}

impl Behind {
    fn put(&mut self, row: TargetRecord, now: Instant) {
        let key = (row.rollout_id, row.guest_id.clone());
        match self.rows.get_mut(&key) {
            Some(waiting) => *waiting = row,
            None => {
                self.order.push_back((now, key.clone()));
                self.rows.insert(key, row);
            }
        }
    }

    /// A durable write of the same target supersedes the waiting row.
    fn forget(&mut self, row: &TargetRecord) {
        self.rows.remove(&(row.rollout_id, row.guest_id.clone()));
    }

    /// Rows first queued at or before `cutoff` (all of them with `None`).
    fn take_due(&mut self, cutoff: Option<Instant>, out: &mut Vec<TargetRecord>) {
        while let Some((at, _)) = self.order.front() {
            if cutoff.is_some_and(|c| *at > c) {
                break;
            }
            if let Some((_, key)) = self.order.pop_front()
                && let Some(row) = self.rows.remove(&key)
            {
                out.push(row);
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.order.front().map(|(at, _)| *at + BEHIND_DELAY)
    }
}

async fn run(store: Arc<dyn RolloutStore>, mut rx: mpsc::Receiver<Write>) {
    let mut incoming = Vec::with_capacity(BATCH);
    let mut behind = Behind::default();
    loop {
        let due = behind.next_due();
        let received = tokio::select! {
            n = rx.recv_many(&mut incoming, BATCH) => Some(n),
            () = sleep_until_opt(due) => None,
        };
        let mut closed = received == Some(0);
        if received.is_some_and(|n| n > 0) {
            // Group commit: a transaction per handful of rows costs more than the rows, so
            // let a burst gather (bounded in time and size) before writing it.
            let gather_until = Instant::now() + GATHER;
            while !closed && incoming.len() < BATCH {
                let room = BATCH - incoming.len();
                match tokio::time::timeout_at(gather_until, rx.recv_many(&mut incoming, room)).await
                {
                    Ok(0) => closed = true,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        let now = Instant::now();
        let mut rows = Vec::new();
        let mut waiters = Vec::new();
        for w in incoming.drain(..) {
            match w.done {
                Some(done) => {
                    behind.forget(&w.row);
                    rows.push(w.row);
                    waiters.push(done);
                }
                None => behind.put(w.row, now),
            }
        }
        behind.take_due(
            (!closed).then(|| now.checked_sub(BEHIND_DELAY).unwrap_or(now)),
            &mut rows,
        );
        if !rows.is_empty() {
            let result = write(&store, &rows).await;
            for done in waiters {
                let _ = done.send(result.clone());
            }
        }
        if closed {
            break;
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// First wait before writing a batch again while the database is out of reach; doubled up
/// to [`OUTAGE_MAX_BACKOFF`].
const OUTAGE_FIRST_BACKOFF: Duration = Duration::from_millis(100);
const OUTAGE_MAX_BACKOFF: Duration = Duration::from_secs(2);

async fn write(store: &Arc<dyn RolloutStore>, rows: &[TargetRecord]) -> Result<(), String> {
    let mut backoff = OUTAGE_FIRST_BACKOFF;
    let mut outage_since: Option<Instant> = None;
    let mut retried = false;
    loop {
        let e = match store.write_targets(rows).await {
            Ok(()) => {
                if let Some(since) = outage_since {
                    tracing::info!(
                        rows = rows.len(),
                        waited_ms = since.elapsed().as_millis() as u64,
                        "rollout targets kept during the storage outage are written"
                    );
                }
                return Ok(());
            }
            Err(e) => e,
        };
        if e.is_unavailable() {
            if outage_since.is_none() {
                outage_since = Some(Instant::now());
                tracing::warn!(error = %e, rows = rows.len(), "storage out of reach: keeping rollout target rows until it is back (acks wait)");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(OUTAGE_MAX_BACKOFF);
            continue;
        }
        if !retried {
            tracing::warn!(error = %e, rows = rows.len(), "writing rollout targets failed; retrying once");
            retried = true;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        tracing::error!(error = %e, rows = rows.len(), "ROLLOUT TARGET WRITE FAILED");
        return Err(e.to_string());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kbs_core::storage::{KeyEncryptionKey, NewRollout, SqliteStore, StoreError, TargetState};

    async fn setup() -> (Arc<SqliteStore>, i64) {
        let kek = Arc::new(KeyEncryptionKey::from_bytes(&[1u8; 32]));
        let store = SqliteStore::open_in_memory(kek).await.unwrap();
        let new = NewRollout {
            path: "default/key/a".into(),
            version: 1,
            sha256: "ab".into(),
            selector: "app=db".into(),
            max_concurrent: 4,
            max_attempts: 3,
            guest_deadline_ms: 10_000,
            deadline_at: None,
            created_by: "ops@dev".into(),
        };
        let created = store
            .create_rollout(&new, &["g1".into(), "g2".into()])
            .await
            .unwrap();
        (Arc::new(store), created.rollout.id)
    }

    async fn state_of(store: &SqliteStore, id: i64, guest: &str) -> TargetState {
        let rows = store.list_targets(id, None, None, 10).await.unwrap();
        rows.iter().find(|t| t.guest_id == guest).unwrap().state
    }

    /// Waits until `guest`'s stored state is `want`; fails after `within`.
    async fn stored_within(
        store: &SqliteStore,
        id: i64,
        guest: &str,
        want: TargetState,
        within: Duration,
    ) {
        let deadline = Instant::now() + within;
        while state_of(store, id, guest).await != want {
            assert!(
                Instant::now() < deadline,
                "{guest} never stored as {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn row(id: i64, guest: &str, state: TargetState) -> TargetRecord {
        let mut t = TargetRecord::pending(id, guest);
        t.state = state;
        t
    }

    #[tokio::test]
    async fn a_durable_write_supersedes_a_waiting_one_and_waiting_rows_land_later() {
        let (store, id) = setup().await;
        let writer = TargetWriter::spawn(store.clone());
        writer
            .write_behind(row(id, "g1", TargetState::Delivering))
            .await;
        writer
            .write(row(id, "g1", TargetState::Acked))
            .await
            .unwrap();
        assert_eq!(state_of(&store, id, "g1").await, TargetState::Acked);

        writer
            .write_behind(row(id, "g2", TargetState::Delivering))
            .await;
        // Nobody waits for it, but it is stored soon after the delay all the same.
        stored_within(&store, id, "g2", TargetState::Delivering, BEHIND_DELAY * 20).await;
        // The superseded `delivering` row of g1 never overwrote its ack.
        tokio::time::sleep(BEHIND_DELAY * 2).await;
        assert_eq!(state_of(&store, id, "g1").await, TargetState::Acked);
    }

    #[tokio::test]
    async fn rows_waiting_when_the_writer_stops_are_stored() {
        let (store, id) = setup().await;
        let writer = TargetWriter::spawn(store.clone());
        writer
            .write_behind(row(id, "g1", TargetState::Failed))
            .await;
        // The last sender goes: the writer flushes what waits, then ends.
        drop(writer);
        stored_within(
            &store,
            id,
            "g1",
            TargetState::Failed,
            Duration::from_secs(5),
        )
        .await;
    }

    /// The SQLite store behind a switch that makes `write_targets` fail as a database out
    /// of reach does (the error PostgreSQL's pool answers then), the rest passing through.
    struct Unreachable {
        store: Arc<SqliteStore>,
        down: std::sync::atomic::AtomicBool,
        attempts: std::sync::atomic::AtomicU32,
    }

    #[async_trait::async_trait]
    impl RolloutStore for Unreachable {
        async fn create_rollout(
            &self,
            new: &NewRollout,
            targets: &[String],
        ) -> Result<kbs_core::storage::CreatedRollout, StoreError> {
            self.store.create_rollout(new, targets).await
        }
        async fn get_rollout(
            &self,
            id: i64,
        ) -> Result<Option<kbs_core::storage::RolloutRecord>, StoreError> {
            self.store.get_rollout(id).await
        }
        async fn list_rollouts(
            &self,
            q: &kbs_core::storage::RolloutQuery,
        ) -> Result<Vec<kbs_core::storage::RolloutRecord>, StoreError> {
            self.store.list_rollouts(q).await
        }
        async fn set_rollout_state(
            &self,
            id: i64,
            state: kbs_core::storage::RolloutState,
            detail: &str,
        ) -> Result<(), StoreError> {
            self.store.set_rollout_state(id, state, detail).await
        }
        async fn target_counts(
            &self,
            id: i64,
        ) -> Result<std::collections::BTreeMap<TargetState, u64>, StoreError> {
            self.store.target_counts(id).await
        }
        async fn list_targets(
            &self,
            id: i64,
            state: Option<TargetState>,
            after: Option<&str>,
            limit: u32,
        ) -> Result<Vec<TargetRecord>, StoreError> {
            self.store.list_targets(id, state, after, limit).await
        }
        async fn targets_of(
            &self,
            id: i64,
            guests: &[String],
        ) -> Result<Vec<TargetRecord>, StoreError> {
            self.store.targets_of(id, guests).await
        }
        async fn write_targets(&self, targets: &[TargetRecord]) -> Result<(), StoreError> {
            self.attempts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::Database(sqlx::Error::PoolTimedOut));
            }
            self.store.write_targets(targets).await
        }
        async fn note_rotation_guests(
            &self,
            guests: &[(String, tunnel::Labels)],
        ) -> Result<(), StoreError> {
            self.store.note_rotation_guests(guests).await
        }
        async fn rotation_guests(
            &self,
            since_ms: u64,
        ) -> Result<Vec<(String, std::collections::BTreeMap<String, String>)>, StoreError> {
            self.store.rotation_guests(since_ms).await
        }
    }

    #[tokio::test]
    async fn an_ack_written_while_the_database_is_away_waits_and_is_stored_when_it_is_back() {
        use std::sync::atomic::Ordering;
        let (store, id) = setup().await;
        let flaky = Arc::new(Unreachable {
            store: store.clone(),
            down: true.into(),
            attempts: 0.into(),
        });
        let writer = TargetWriter::spawn(flaky.clone());
        let acking = {
            let writer = writer.clone();
            tokio::spawn(async move { writer.write(row(id, "g1", TargetState::Acked)).await })
        };
        writer
            .write_behind(row(id, "g2", TargetState::Delivering))
            .await;
        // Several attempts fail; the waiter is not answered (neither Ok nor an error).
        let deadline = Instant::now() + Duration::from_secs(10);
        while flaky.attempts.load(Ordering::Relaxed) < 4 {
            assert!(Instant::now() < deadline, "the writer stopped trying");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !acking.is_finished(),
            "the ack's caller was answered while nothing was stored"
        );
        assert_eq!(state_of(&store, id, "g1").await, TargetState::Pending);

        flaky.down.store(false, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(10), acking)
            .await
            .expect("answered once the database is back")
            .unwrap()
            .unwrap();
        assert_eq!(state_of(&store, id, "g1").await, TargetState::Acked);
        // The row nobody waited for was kept too.
        stored_within(
            &store,
            id,
            "g2",
            TargetState::Delivering,
            Duration::from_secs(10),
        )
        .await;
    }
}
