//! Several replicas on one database: which replica process is alive and where the others
//! reach it (`cluster_replicas`), and which replica holds which guest's tunnel
//! (`cluster_tunnels`, migration 0007). [`ClusterStore`] and its SQLite implementation: one
//! process owns an SQLite file, so there it is bookkeeping nobody reads, kept for the
//! trait's sake and for the engines' schemas to stay the same.

use async_trait::async_trait;
use sqlx::Row;

use super::{SqliteStore, StoreError, now_ms};

/// Where a guest's tunnel is, as the registry records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelOwner {
    /// The replica process holding the tunnel.
    pub replica_id: String,
    /// Grows with every new tunnel of this guest, whichever replica accepted it.
    pub epoch: u64,
    /// Where that replica is reached (`None`: the replica has no row, it retired).
    pub advertise_url: Option<String>,
    /// Its last heartbeat, ms since the Unix epoch (0 when it has no row).
    pub heartbeat_at_ms: u64,
}

/// The replica registry; a supertrait of [`super::Store`].
#[async_trait]
pub trait ClusterStore: Send + Sync + 'static {
    /// Records that replica `replica_id` is alive now and reached at `advertise_url`; also
    /// forgets replicas silent since before `forget_before_ms`, releasing their records.
    async fn replica_heartbeat(
        &self,
        replica_id: &str,
        advertise_url: &str,
        forget_before_ms: u64,
    ) -> Result<(), StoreError>;
    /// A replica shutting down: its row goes and its tunnel records are released.
    async fn replica_retire(&self, replica_id: &str) -> Result<(), StoreError>;
    /// Records that `replica_id` now holds `guest_id`'s tunnel; returns the new epoch (one
    /// more than the previous record's, whichever replica wrote that).
    async fn tunnel_claim(&self, guest_id: &str, replica_id: &str) -> Result<u64, StoreError>;
    /// Releases the record only if it is still `replica_id`'s at `epoch`; returns whether it
    /// was. A released record names no replica but keeps its epoch, so the guest's next
    /// tunnel gets a larger one (epochs of a guest never repeat).
    async fn tunnel_release(
        &self,
        guest_id: &str,
        replica_id: &str,
        epoch: u64,
    ) -> Result<bool, StoreError>;
    /// The record of `guest_id`'s tunnel, with its replica's address and heartbeat.
    async fn tunnel_owner(&self, guest_id: &str) -> Result<Option<TunnelOwner>, StoreError>;
}

/// Epochs are BIGINT columns; a stored negative one (never written) reads as 0.
pub(crate) fn owner_of(
    replica_id: String,
    epoch: i64,
    url: Option<String>,
    heartbeat: Option<i64>,
) -> TunnelOwner {
    TunnelOwner {
        replica_id,
        epoch: u64::try_from(epoch).unwrap_or(0),
        advertise_url: url,
        heartbeat_at_ms: heartbeat.and_then(|h| u64::try_from(h).ok()).unwrap_or(0),
    }
}

pub(crate) fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[async_trait]
impl ClusterStore for SqliteStore {
    async fn replica_heartbeat(
        &self,
        replica_id: &str,
        advertise_url: &str,
        forget_before_ms: u64,
    ) -> Result<(), StoreError> {
        let now = ms(now_ms());
        sqlx::query(
            "INSERT INTO cluster_replicas (replica_id, advertise_url, started_at, heartbeat_at)
             VALUES (?1, ?2, ?3, ?3)
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
                 (SELECT replica_id FROM cluster_replicas WHERE heartbeat_at < ?1)",
        )
        .bind(before)
        .execute(self.pool())
        .await?;
        sqlx::query("DELETE FROM cluster_replicas WHERE heartbeat_at < ?1")
            .bind(before)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn replica_retire(&self, replica_id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE cluster_tunnels SET replica_id = '' WHERE replica_id = ?1")
            .bind(replica_id)
            .execute(self.pool())
            .await?;
        sqlx::query("DELETE FROM cluster_replicas WHERE replica_id = ?1")
            .bind(replica_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn tunnel_claim(&self, guest_id: &str, replica_id: &str) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO cluster_tunnels (guest_id, replica_id, epoch, since) VALUES (?1, ?2, 1, ?3)
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
             WHERE guest_id = ?1 AND replica_id = ?2 AND epoch = ?3",
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
             WHERE t.guest_id = ?1 AND t.replica_id <> ''",
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
