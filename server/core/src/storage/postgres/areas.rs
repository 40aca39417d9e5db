//! The PostgreSQL side of the smaller storage areas: plugin state, reference values, the event
//! log and fleet records (their SQLite twins are in `storage/{plugins,reference_values,events,fleet}.rs`).

use async_trait::async_trait;
use sqlx::{QueryBuilder, Row};

use super::{PostgresStore, fold_by_key, notify};
use crate::storage::plugins::plugin_state_row;
use crate::storage::reference_values::reference_value_row;
use crate::storage::{
    Change, EventQuery, EventRecord, EventStore, FleetStore, NewEvent, PluginStateRow,
    PluginStateStore, ReferenceValue, ReferenceValueStore, RolloutState, StoreError, TargetState,
    now_ms,
};

/// Rows per multi-row statement (PostgreSQL allows 65,535 bound parameters).
const CHUNK: usize = 500;

#[async_trait]
impl PluginStateStore for PostgresStore {
    async fn plugin_states(&self) -> Result<Vec<PluginStateRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, enabled, updated_at, updated_by FROM plugin_state ORDER BY name",
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(|r| plugin_state_row(&r)).collect()
    }

    async fn set_plugin_enabled(
        &self,
        name: &str,
        enabled: bool,
        actor: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO plugin_state (name, enabled, updated_at, updated_by) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET enabled = excluded.enabled,
                 updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(name)
        .bind(i64::from(enabled))
        .bind(now_ms() as i64)
        .bind(actor)
        .execute(self.pool())
        .await?;
        notify(self.pool(), &Change::PluginState(name.to_owned())).await
    }
}

#[async_trait]
impl ReferenceValueStore for PostgresStore {
    async fn reference_values(&self) -> Result<Vec<ReferenceValue>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, vals, updated_at, updated_by FROM reference_values ORDER BY name",
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(|r| reference_value_row(&r)).collect()
    }

    async fn set_reference_value(
        &self,
        name: &str,
        values: &[String],
        actor: &str,
    ) -> Result<ReferenceValue, StoreError> {
        let text = serde_json::to_string(values)
            .map_err(|e| StoreError::Corrupt(format!("reference value {name}: {e}")))?;
        let at = now_ms();
        sqlx::query(
            "INSERT INTO reference_values (name, vals, updated_at, updated_by) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET vals = excluded.vals,
                 updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(name)
        .bind(text)
        .bind(at as i64)
        .bind(actor)
        .execute(self.pool())
        .await?;
        notify(self.pool(), &Change::ReferenceValues).await?;
        Ok(ReferenceValue {
            name: name.to_owned(),
            values: values.to_vec(),
            updated_at: at,
            updated_by: actor.to_owned(),
        })
    }

    async fn delete_reference_value(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM reference_values WHERE name = $1")
            .bind(name)
            .execute(self.pool())
            .await?;
        if done.rows_affected() > 0 {
            notify(self.pool(), &Change::ReferenceValues).await?;
        }
        Ok(done.rows_affected() > 0)
    }
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn append_events(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool().begin().await?;
        for chunk in events.chunks(CHUNK) {
            let mut q = QueryBuilder::<sqlx::Postgres>::new(
                "INSERT INTO events (at, kind, action, guest_id, actor, target, outcome, detail) ",
            );
            q.push_values(chunk, |mut row, e| {
                row.push_bind(i64::try_from(e.at).unwrap_or(i64::MAX))
                    .push_bind(e.kind.clone())
                    .push_bind(e.action.clone())
                    .push_bind(e.guest_id.clone())
                    .push_bind(e.actor.clone())
                    .push_bind(e.target.clone())
                    .push_bind(e.outcome.clone())
                    .push_bind(e.detail.clone());
            });
            q.build()
                .persistent(crate::storage::keep_prepared(chunk.len(), CHUNK))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_events(&self, q: &EventQuery) -> Result<Vec<EventRecord>, StoreError> {
        let kinds = (!q.kinds.is_empty()).then(|| q.kinds.clone());
        let rows = sqlx::query(
            "SELECT id, at, kind, action, guest_id, actor, target, outcome, detail FROM events
             WHERE ($1::TEXT[] IS NULL OR kind = ANY($1))
               AND ($2::TEXT IS NULL OR guest_id = $2)
               AND ($3::TEXT IS NULL OR actor = $3)
               AND ($4::BIGINT IS NULL OR at >= $4)
               AND ($5::BIGINT IS NULL OR id < $5)
             ORDER BY id DESC LIMIT $6",
        )
        .bind(kinds)
        .bind(&q.guest_id)
        .bind(&q.actor)
        .bind(q.since.map(|s| i64::try_from(s).unwrap_or(i64::MAX)))
        .bind(q.before)
        .bind(i64::from(q.limit.clamp(1, 1000)))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRecord {
                    id: r.try_get(0)?,
                    event: NewEvent {
                        at: u64::try_from(r.try_get::<i64, _>(1)?).unwrap_or(0),
                        kind: r.try_get(2)?,
                        action: r.try_get(3)?,
                        guest_id: r.try_get(4)?,
                        actor: r.try_get(5)?,
                        target: r.try_get(6)?,
                        outcome: r.try_get(7)?,
                        detail: r.try_get(8)?,
                    },
                })
            })
            .collect()
    }

    async fn prune_events(&self, keep: u64) -> Result<u64, StoreError> {
        // By position, not by id arithmetic: identity values have gaps (rolled-back
        // inserts of other replicas), so `MAX(id) - keep` would keep fewer.
        let done = sqlx::query(
            "DELETE FROM events WHERE id <= (SELECT id FROM events ORDER BY id DESC OFFSET $1 LIMIT 1)",
        )
        .bind(i64::try_from(keep).unwrap_or(i64::MAX))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl FleetStore for PostgresStore {
    async fn upsert_fleet(&self, records: &[(String, String)]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        let records = fold_by_key(records, |r| r.0.clone());
        let records = &records;
        super::outage::retry_conflicts("upsert_fleet", StoreError::is_conflict, || async move {
            let mut tx = self.pool().begin().await?;
            for chunk in records.chunks(CHUNK) {
                let mut q = QueryBuilder::<sqlx::Postgres>::new(
                    "INSERT INTO fleet_guests (guest_id, record, updated_at) ",
                );
                q.push_values(chunk, |mut row, (id, record)| {
                    row.push_bind(id.clone())
                        .push_bind(record.clone())
                        .push_bind(now);
                });
                q.push(
                    " ON CONFLICT (guest_id) DO UPDATE SET record = excluded.record, \
                     updated_at = excluded.updated_at",
                );
                q.build()
                    .persistent(crate::storage::keep_prepared(chunk.len(), CHUNK))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
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
        let in_force: Vec<&str> = RolloutState::ALL
            .iter()
            .filter(|s| s.in_force())
            .map(|s| s.as_str())
            .collect();
        let waiting: Vec<&str> = TargetState::ALL
            .iter()
            .filter(|s| !s.is_terminal())
            .map(|s| s.as_str())
            .collect();
        let mut ids = guest_ids.to_vec();
        ids.sort();
        ids.dedup();
        let (ids, in_force, waiting) = (&ids, &in_force, &waiting);
        super::outage::retry_conflicts("forget_fleet", StoreError::is_conflict, || async move {
            let mut forgotten = Vec::new();
            let mut tx = self.pool().begin().await?;
            for chunk in ids.chunks(CHUNK) {
                // A target still pending in a rollout in force keeps its guest (as in SQLite).
                let rows = sqlx::query(
                    "WITH gone AS (
                         DELETE FROM fleet_guests WHERE updated_at < $1 AND guest_id = ANY($2)
                           AND NOT EXISTS (SELECT 1 FROM rollout_targets t JOIN rollouts r
                               ON r.id = t.rollout_id WHERE t.guest_id = fleet_guests.guest_id
                               AND r.state = ANY($3) AND t.state = ANY($4))
                         RETURNING guest_id),
                     sighting AS (
                         DELETE FROM rotation_guests WHERE guest_id IN (SELECT guest_id FROM gone))
                     SELECT guest_id FROM gone",
                )
                .bind(before)
                .bind(chunk)
                .bind(in_force)
                .bind(waiting)
                .fetch_all(&mut *tx)
                .await?;
                for r in rows {
                    forgotten.push(r.try_get(0)?);
                }
            }
            tx.commit().await?;
            Ok(forgotten)
        })
        .await
    }
}
