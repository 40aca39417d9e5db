//! [`ClusterStore`] on PostgreSQL: the replica registry every replica reads (see
//! `storage/cluster.rs`). Claiming a tunnel is one upsert, so two replicas accepting the same
//! guest at once get two different epochs (the row lock orders them) and the later one wins.

use async_trait::async_trait;
use sqlx::Row;

use super::PostgresStore;
use crate::storage::cluster::{ClusterStore, TunnelOwner, ms, owner_of};
use crate::storage::{StoreError, now_ms};

#[async_trait]
impl ClusterStore for PostgresStore {
    async fn replica_heartbeat(
        &self,
        replica_id: &str,
        advertise_url: &str,
        forget_before_ms: u64,
    ) -> Result<(), StoreError> {
        let now = ms(now_ms());
        sqlx::query(
            "INSERT INTO cluster_replicas (replica_id, advertise_url, started_at, heartbeat_at)
             VALUES ($1, $2, $3, $3)
             ON CONFLICT (replica_id) DO UPDATE SET advertise_url = excluded.advertise_url,
                 heartbeat_at = excluded.heartbeat_at",
        )
        .bind(replica_id)
        .bind(advertise_url)
        .bind(now)
        .execute(self.pool())
        .await?;
        let before = ms(forget_before_ms);
        sqlx::query(
            "UPDATE cluster_tunnels SET replica_id = '' WHERE replica_id IN
                 (SELECT replica_id FROM cluster_replicas WHERE heartbeat_at < $1)",
        )
        .bind(before)
        .execute(self.pool())
        .await?;
        sqlx::query("DELETE FROM cluster_replicas WHERE heartbeat_at < $1")
            .bind(before)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn replica_retire(&self, replica_id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE cluster_tunnels SET replica_id = '' WHERE replica_id = $1")
            .bind(replica_id)
            .execute(self.pool())
            .await?;
        sqlx::query("DELETE FROM cluster_replicas WHERE replica_id = $1")
            .bind(replica_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn tunnel_claim(&self, guest_id: &str, replica_id: &str) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO cluster_tunnels (guest_id, replica_id, epoch, since) VALUES ($1, $2, 1, $3)
             ON CONFLICT (guest_id) DO UPDATE SET replica_id = excluded.replica_id,
                 epoch = cluster_tunnels.epoch + 1, since = excluded.since
             RETURNING epoch",
        )
        .bind(guest_id)
        .bind(replica_id)
        .bind(ms(now_ms()))
        .fetch_one(self.pool())
        .await?;
        let epoch: i64 = row.try_get(0)?;
        Ok(u64::try_from(epoch).unwrap_or(0))
    }

    async fn tunnel_release(
        &self,
        guest_id: &str,
        replica_id: &str,
        epoch: u64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE cluster_tunnels SET replica_id = ''
             WHERE guest_id = $1 AND replica_id = $2 AND epoch = $3",
        )
        .bind(guest_id)
        .bind(replica_id)
        .bind(ms(epoch))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn tunnel_owner(&self, guest_id: &str) -> Result<Option<TunnelOwner>, StoreError> {
        let row = sqlx::query(
            "SELECT t.replica_id, t.epoch, r.advertise_url, r.heartbeat_at
             FROM cluster_tunnels t LEFT JOIN cluster_replicas r ON r.replica_id = t.replica_id
             WHERE t.guest_id = $1 AND t.replica_id <> ''",
        )
        .bind(guest_id)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok(owner_of(
                r.try_get(0)?,
                r.try_get(1)?,
                r.try_get(2)?,
                r.try_get(3)?,
            ))
        })
        .transpose()
    }
}
