//! Durable fleet records (every guest the KBS has known): [`FleetStore`] and its SQLite
//! implementation. The fleet index (`crate::fleet`) keeps them in memory for queries and
//! writes changed ones back in batches.

use async_trait::async_trait;
use sqlx::Row;

use super::{RolloutState, SqliteStore, StoreError, TargetState, now_ms};

/// Durable fleet storage; a supertrait of [`super::Store`]. Records are opaque JSON here.
#[async_trait]
pub trait FleetStore: Send + Sync + 'static {
    /// Insert or replace records `(guest_id, record JSON)` in one transaction.
    async fn upsert_fleet(&self, records: &[(String, String)]) -> Result<(), StoreError>;
    /// Every stored record.
    async fn load_fleet(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// Forgets those of `guest_ids` whose record was last written before `written_before_ms`
    /// and that no rollout in force still waits for (a pending or delivering target): their
    /// fleet record and their rotation sighting go, in one transaction. Returns the ids
    /// forgotten; the others stay (written since, or still a rollout's target).
    async fn forget_fleet(
        &self,
        guest_ids: &[String],
        written_before_ms: u64,
    ) -> Result<Vec<String>, StoreError>;
}

/// Ids forgotten per statement (SQLite allows 32,766 bound parameters; stay far below).
const FORGET_CHUNK: usize = 500;
/// Guest records per upsert statement.
const UPSERT_CHUNK: usize = 200;

#[async_trait]
impl FleetStore for SqliteStore {
    async fn upsert_fleet(&self, records: &[(String, String)]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        let (_turn, mut tx) = self.begin_batch().await?;
        // Multi-row statements: far fewer round trips through the driver than one per row.
        for chunk in records.chunks(UPSERT_CHUNK) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO fleet_guests (guest_id, record, updated_at) ",
            );
            q.push_values(chunk, |mut row, (id, record)| {
                row.push_bind(id).push_bind(record).push_bind(now);
            });
            q.push(
                " ON CONFLICT (guest_id) DO UPDATE SET record = excluded.record, \
                 updated_at = excluded.updated_at",
            );
            q.build()
                .persistent(super::keep_prepared(chunk.len(), UPSERT_CHUNK))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn load_fleet(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT guest_id, record FROM fleet_guests")
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    async fn forget_fleet(
        &self,
        guest_ids: &[String],
        written_before_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        if guest_ids.is_empty() {
            return Ok(Vec::new());
        }
        let before = i64::try_from(written_before_ms).unwrap_or(i64::MAX);
        let mut forgotten = Vec::new();
        let (_turn, mut tx) = self.begin_batch().await?;
        for chunk in guest_ids.chunks(FORGET_CHUNK) {
            // A target still pending in a rollout in force keeps its guest: the rollout's
            // own deadline bounds how long (docs/operations.md, "Retention").
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "DELETE FROM fleet_guests WHERE updated_at < ",
            );
            q.push_bind(before);
            q.push(
                " AND NOT EXISTS (SELECT 1 FROM rollout_targets t JOIN rollouts r \
                 ON r.id = t.rollout_id WHERE t.guest_id = fleet_guests.guest_id AND r.state IN (",
            );
            let mut states = q.separated(", ");
            for s in RolloutState::ALL.iter().filter(|s| s.in_force()) {
                states.push_bind(s.as_str());
            }
            q.push(") AND t.state IN (");
            let mut states = q.separated(", ");
            for s in TargetState::ALL.iter().filter(|s| !s.is_terminal()) {
                states.push_bind(s.as_str());
            }
            q.push(")) AND guest_id IN (");
            let mut ids = q.separated(", ");
            for id in chunk {
                ids.push_bind(id);
            }
            q.push(") RETURNING guest_id");
            let rows = q
                .build()
                .persistent(super::keep_prepared(chunk.len(), FORGET_CHUNK))
                .fetch_all(&mut *tx)
                .await?;
            let gone: Vec<String> = rows
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            if !gone.is_empty() {
                let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                    "DELETE FROM rotation_guests WHERE guest_id IN (",
                );
                let mut ids = q.separated(", ");
                for id in &gone {
                    ids.push_bind(id);
                }
                q.push(")");
                // As many ids as were forgotten: a shape that rarely comes back.
                q.build().persistent(false).execute(&mut *tx).await?;
            }
            forgotten.extend(gone);
        }
        tx.commit().await?;
        Ok(forgotten)
    }
}
