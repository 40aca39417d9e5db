//! Durable fleet records (every guest the KBS has known): [`FleetStore`] and its SQLite
//! implementation. The fleet index (`crate::fleet`) keeps them in memory for queries and
//! writes changed ones back in batches.

use async_trait::async_trait;
use sqlx::Row;

use super::{SqliteStore, StoreError, now_ms};

/// Durable fleet storage; a supertrait of [`super::Store`]. Records are opaque JSON here.
#[async_trait]
pub trait FleetStore: Send + Sync + 'static {
    /// Insert or replace records `(guest_id, record JSON)` in one transaction.
    async fn upsert_fleet(&self, records: &[(String, String)]) -> Result<(), StoreError>;
    /// Every stored record.
    async fn load_fleet(&self) -> Result<Vec<(String, String)>, StoreError>;
}

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
}
