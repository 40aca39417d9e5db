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

#[async_trait]
impl FleetStore for SqliteStore {
    async fn upsert_fleet(&self, records: &[(String, String)]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        let (_turn, mut tx) = self.begin_batch().await?;
        // Multi-row statements: far fewer round trips through the driver than one per row.
        for chunk in records.chunks(200) {
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
            q.build().execute(&mut *tx).await?;
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
            let rows = q.build().fetch_all(&mut *tx).await?;
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
                q.build().execute(&mut *tx).await?;
            }
            forgotten.extend(gone);
        }
        tx.commit().await?;
        Ok(forgotten)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use super::*;
    use crate::storage::KeyEncryptionKey;

    #[tokio::test]
    async fn fleet_records_upsert_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let s = SqliteStore::open(&url, Arc::new(KeyEncryptionKey::from_bytes(&[1u8; 32])))
            .await
            .unwrap();
        s.upsert_fleet(&[
            ("g1".into(), "{}".into()),
            ("g2".into(), "{\"a\":1}".into()),
        ])
        .await
        .unwrap();
        s.upsert_fleet(&[("g1".into(), "{\"b\":2}".into())])
            .await
            .unwrap();
        let mut all = s.load_fleet().await.unwrap();
        all.sort();
        assert_eq!(
            all,
            [
                ("g1".to_string(), "{\"b\":2}".to_string()),
                ("g2".to_string(), "{\"a\":1}".to_string())
            ]
        );
    }

    #[tokio::test]
    async fn forgetting_spares_recent_records_and_targets_of_rollouts_in_force() {
        use crate::storage::{NewRollout, RolloutStore, TargetRecord};
        let (_d, s) = SqliteStore::open_temp().await;
        let ids: Vec<String> = ["old", "waited-for", "acked", "of-cancelled"]
            .map(String::from)
            .to_vec();
        let records: Vec<(String, String)> = ids
            .iter()
            .map(|id| (id.clone(), "{}".to_string()))
            .collect();
        s.upsert_fleet(&records).await.unwrap();
        let labels: tunnel::Labels = std::collections::BTreeMap::new().into();
        let sightings: Vec<(String, tunnel::Labels)> =
            ids.iter().map(|id| (id.clone(), labels.clone())).collect();
        s.note_rotation_guests(&sightings).await.unwrap();
        let running = s
            .create_rollout(
                &NewRollout::for_test("default/key/a", 1),
                &["waited-for".into(), "acked".into()],
            )
            .await
            .unwrap();
        let mut acked = TargetRecord::pending(running.rollout.id, "acked");
        acked.state = TargetState::Acked;
        s.write_targets(&[acked]).await.unwrap();
        let cancelled = s
            .create_rollout(
                &NewRollout::for_test("default/key/b", 1),
                &["of-cancelled".into()],
            )
            .await
            .unwrap();
        s.set_rollout_state(cancelled.rollout.id, RolloutState::Cancelled, "")
            .await
            .unwrap();

        // Written after the cut-off: nothing goes.
        let cut = now_ms().saturating_sub(60_000);
        assert!(s.forget_fleet(&ids, cut).await.unwrap().is_empty());
        let mut gone = s.forget_fleet(&ids, now_ms() + 1).await.unwrap();
        gone.sort();
        assert_eq!(gone, ["acked", "of-cancelled", "old"]);
        let left: Vec<String> = s
            .load_fleet()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(left, ["waited-for"]);
        let sighted: Vec<String> = s
            .rotation_guests(0)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(sighted, ["waited-for"], "rotation forgets them too");
        // Once its rollout ends, the guest it waited for goes as well.
        s.set_rollout_state(running.rollout.id, RolloutState::Expired, "")
            .await
            .unwrap();
        assert_eq!(
            s.forget_fleet(&ids, now_ms() + 1).await.unwrap(),
            ["waited-for"]
        );
        assert!(s.load_fleet().await.unwrap().is_empty());
    }
}
