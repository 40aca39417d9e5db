//! The PostgreSQL side of [`RolloutStore`] (its SQLite twin and the row types are in
//! `storage/rotation.rs`; both decode rows with the same functions).

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, Postgres, QueryBuilder, Row};

use super::{LOCK_ROLLOUT_PATH, PostgresStore, fold_by_key, notify};
use crate::storage::rotation::{
    ROLLOUT_COLUMNS, TARGET_COLUMNS, TARGET_UPSERT, i, push_targets, rollout_row, target_row, u,
};
use crate::storage::{
    Change, CreatedRollout, NewRollout, RolloutQuery, RolloutRecord, RolloutState, RolloutStore,
    StoreError, TargetRecord, TargetState, now_ms,
};

/// Rows per multi-row INSERT (12 columns each; PostgreSQL allows 65,535 parameters).
const TARGET_CHUNK: usize = 1000;

#[async_trait]
impl RolloutStore for PostgresStore {
    async fn create_rollout(
        &self,
        new: &NewRollout,
        targets: &[String],
    ) -> Result<CreatedRollout, StoreError> {
        let now = i(now_ms());
        // Two rollouts of one path started at once on two replicas: the second waits here,
        // then supersedes the first (which it sees committed).
        let mut tx = self.begin_locked(LOCK_ROLLOUT_PATH, &new.path).await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO rollouts (path, version, sha256, selector, max_concurrent, max_attempts,
                 guest_deadline_ms, deadline_at, state, detail, created_at, created_by, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'running', '', $9, $10, $9)
             RETURNING {ROLLOUT_COLUMNS}"
        )))
        .bind(&new.path)
        .bind(i(new.version))
        .bind(&new.sha256)
        .bind(&new.selector)
        .bind(i64::from(new.max_concurrent))
        .bind(i64::from(new.max_attempts))
        .bind(i(new.guest_deadline_ms))
        .bind(new.deadline_at.map(i))
        .bind(now)
        .bind(&new.created_by)
        .fetch_one(&mut *tx)
        .await?;
        let rollout = rollout_row(&row)?;
        let superseded: Vec<i64> = sqlx::query(
            "UPDATE rollouts SET state = 'superseded', superseded_by = $1, detail = $2,
                 updated_at = $3, finished_at = $3
             WHERE path = $4 AND id <> $1 AND state IN ('running', 'completed', 'paused')
             RETURNING id",
        )
        .bind(rollout.id)
        .bind(format!("superseded by rollout {}", rollout.id))
        .bind(now)
        .bind(&new.path)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        let rows: Vec<TargetRecord> = targets
            .iter()
            .map(|g| TargetRecord::pending(rollout.id, g))
            .collect();
        for chunk in rows.chunks(TARGET_CHUNK) {
            let mut b = QueryBuilder::<Postgres>::new(format!(
                "INSERT INTO rollout_targets ({TARGET_COLUMNS}) "
            ));
            push_targets(&mut b, chunk);
            b.build()
                .persistent(crate::storage::keep_prepared(chunk.len(), TARGET_CHUNK))
                .execute(&mut *tx)
                .await?;
        }
        // The superseded ones change state too; a replica that follows the new rollout
        // learns of them from it (`superseded` in its `Created` handling).
        notify(&mut *tx, &Change::Rollout(rollout.id)).await?;
        tx.commit().await?;
        Ok(CreatedRollout {
            rollout,
            superseded,
        })
    }

    async fn get_rollout(&self, id: i64) -> Result<Option<RolloutRecord>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(rollout_row).transpose()
    }

    async fn list_rollouts(&self, q: &RolloutQuery) -> Result<Vec<RolloutRecord>, StoreError> {
        let mut b = QueryBuilder::<Postgres>::new(format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE 1 = 1"
        ));
        if let Some(path) = &q.path {
            b.push(" AND path = ").push_bind(path.clone());
        }
        if q.in_force {
            b.push(" AND state IN ('running', 'completed', 'paused')");
        }
        if let Some(before) = q.before {
            b.push(" AND id < ").push_bind(before);
        }
        b.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(q.limit.max(1)));
        let rows = b.build().fetch_all(self.pool()).await?;
        rows.iter().map(rollout_row).collect()
    }

    async fn set_rollout_state(
        &self,
        id: i64,
        state: RolloutState,
        detail: &str,
    ) -> Result<(), StoreError> {
        let now = i(now_ms());
        let finished = (!state.in_force()).then_some(now);
        let done = sqlx::query(
            "UPDATE rollouts SET state = $2, detail = $3, updated_at = $4,
                 finished_at = COALESCE($5, finished_at)
             WHERE id = $1",
        )
        .bind(id)
        .bind(state.as_str())
        .bind(detail)
        .bind(now)
        .bind(finished)
        .execute(self.pool())
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no rollout {id}")));
        }
        notify(self.pool(), &Change::Rollout(id)).await
    }

    async fn target_counts(&self, id: i64) -> Result<BTreeMap<TargetState, u64>, StoreError> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) FROM rollout_targets WHERE rollout_id = $1 GROUP BY state",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        let mut counts: BTreeMap<TargetState, u64> =
            TargetState::ALL.iter().map(|s| (*s, 0)).collect();
        for r in rows {
            let state: TargetState = r.try_get::<String, _>(0)?.parse()?;
            counts.insert(state, u(r.try_get(1)?));
        }
        Ok(counts)
    }

    async fn list_targets(
        &self,
        id: i64,
        state: Option<TargetState>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<TargetRecord>, StoreError> {
        let mut b = QueryBuilder::<Postgres>::new(format!(
            "SELECT {TARGET_COLUMNS} FROM rollout_targets WHERE rollout_id = "
        ));
        b.push_bind(id);
        if let Some(state) = state {
            b.push(" AND state = ").push_bind(state.as_str());
        }
        if let Some(after) = after {
            b.push(" AND guest_id > ").push_bind(after.to_string());
        }
        b.push(" ORDER BY guest_id LIMIT ")
            .push_bind(i64::from(limit.max(1)));
        let rows = b.build().fetch_all(self.pool()).await?;
        rows.iter().map(target_row).collect()
    }

    async fn targets_of(
        &self,
        id: i64,
        guests: &[String],
    ) -> Result<Vec<TargetRecord>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {TARGET_COLUMNS} FROM rollout_targets \
             WHERE rollout_id = $1 AND guest_id = ANY($2)"
        )))
        .bind(id)
        .bind(guests)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(target_row).collect()
    }

    async fn write_targets(&self, targets: &[TargetRecord]) -> Result<(), StoreError> {
        if targets.is_empty() {
            return Ok(());
        }
        let targets = fold_by_key(targets, |t| (t.rollout_id, t.guest_id.clone()));
        let rollouts: BTreeSet<i64> = targets.iter().map(|t| t.rollout_id).collect();
        let (targets, rollouts) = (&targets, &rollouts);
        super::outage::retry_conflicts("write_targets", StoreError::is_conflict, || async move {
            let mut tx = self.pool().begin().await?;
            for chunk in targets.chunks(TARGET_CHUNK) {
                let mut b = QueryBuilder::<Postgres>::new(format!(
                    "INSERT INTO rollout_targets ({TARGET_COLUMNS}) "
                ));
                push_targets(&mut b, chunk);
                b.push(TARGET_UPSERT);
                b.build()
                    .persistent(crate::storage::keep_prepared(chunk.len(), TARGET_CHUNK))
                    .execute(&mut *tx)
                    .await?;
            }
            // One notification per rollout and batch: the other replicas refresh its counts.
            for id in rollouts {
                notify(&mut *tx, &Change::Rollout(*id)).await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    fn shared(&self) -> bool {
        true
    }

    async fn note_rotation_guests(
        &self,
        guests: &[(String, tunnel::Labels)],
    ) -> Result<(), StoreError> {
        if guests.is_empty() {
            return Ok(());
        }
        let now = i(now_ms());
        let guests = fold_by_key(guests, |g| g.0.clone());
        let guests = &guests;
        super::outage::retry_conflicts(
            "note_rotation_guests",
            StoreError::is_conflict,
            || async move {
                let mut tx = self.pool().begin().await?;
                for chunk in guests.chunks(TARGET_CHUNK) {
                    let mut b = QueryBuilder::<Postgres>::new(
                        "INSERT INTO rotation_guests (guest_id, labels, last_seen) ",
                    );
                    b.push_values(chunk, |mut b, (id, labels)| {
                        b.push_bind(id.clone())
                            .push_bind(
                                serde_json::to_string(labels).unwrap_or_else(|_| "{}".into()),
                            )
                            .push_bind(now);
                    });
                    b.push(
                        " ON CONFLICT (guest_id) DO UPDATE SET labels = excluded.labels, \
                         last_seen = excluded.last_seen",
                    );
                    b.build()
                        .persistent(crate::storage::keep_prepared(chunk.len(), TARGET_CHUNK))
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(())
            },
        )
        .await
    }

    async fn rotation_guests(
        &self,
        since_ms: u64,
    ) -> Result<Vec<(String, BTreeMap<String, String>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT guest_id, labels FROM rotation_guests WHERE last_seen >= $1 ORDER BY guest_id",
        )
        .bind(i(since_ms))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let labels: String = r.try_get(1)?;
                Ok((
                    r.try_get(0)?,
                    serde_json::from_str(&labels).unwrap_or_default(),
                ))
            })
            .collect()
    }
}
