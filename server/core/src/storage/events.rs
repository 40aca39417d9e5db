//! The event log (tunnel connects and disconnects, admin actions, policy and rollout
//! changes): [`EventStore`] and its SQLite implementation. Writes come in batches from the
//! event writer task (`crate::events`), never from the tunnel path directly.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::{SqliteStore, StoreError};

/// One event to append.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Unix ms when it happened.
    pub at: u64,
    /// `connect`, `disconnect`, `admin`, `policy`, `rollout`, `probe`.
    pub kind: String,
    /// What happened, e.g. `tunnel.connect`, `resource.put`, `policy.set`.
    pub action: String,
    /// The guest concerned, if any.
    pub guest_id: Option<String>,
    /// The admin who acted, if any.
    pub actor: Option<String>,
    /// On what.
    pub target: String,
    /// `ok`, an error name, or a close code name for disconnects.
    pub outcome: String,
    /// Free text (never secret material).
    pub detail: String,
}

/// A stored event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Monotonic id (page backwards with `before`).
    pub id: i64,
    /// The event.
    #[serde(flatten)]
    pub event: NewEvent,
}

/// Filters and page of an event query; every filter is optional.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    /// Only these kinds.
    pub kinds: Vec<String>,
    /// Only this guest.
    pub guest_id: Option<String>,
    /// Only this actor.
    pub actor: Option<String>,
    /// Only events at or after this Unix ms.
    pub since: Option<u64>,
    /// Only events with id < before (paging backwards).
    pub before: Option<i64>,
    /// Page size (clamped to 1..=1000).
    pub limit: u32,
}

/// Event log storage; a supertrait of [`super::Store`].
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Append events in one transaction.
    async fn append_events(&self, events: &[NewEvent]) -> Result<(), StoreError>;
    /// Events matching `query`, newest first.
    async fn list_events(&self, query: &EventQuery) -> Result<Vec<EventRecord>, StoreError>;
    /// Delete all but the newest `keep` events; returns how many went.
    async fn prune_events(&self, keep: u64) -> Result<u64, StoreError>;
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn append_events(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let (_turn, mut tx) = self.begin_batch().await?;
        for e in events {
            sqlx::query(
                "INSERT INTO events (at, kind, action, guest_id, actor, target, outcome, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .bind(i64::try_from(e.at).unwrap_or(i64::MAX))
            .bind(&e.kind)
            .bind(&e.action)
            .bind(&e.guest_id)
            .bind(&e.actor)
            .bind(&e.target)
            .bind(&e.outcome)
            .bind(&e.detail)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn prune_events(&self, keep: u64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM events WHERE id <= (SELECT COALESCE(MAX(id), 0) FROM events) - ?1",
        )
        .bind(i64::try_from(keep).unwrap_or(i64::MAX))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    async fn list_events(&self, q: &EventQuery) -> Result<Vec<EventRecord>, StoreError> {
        // Kinds are few and known; a JSON array keeps the statement static.
        let kinds = (!q.kinds.is_empty())
            .then(|| serde_json::to_string(&q.kinds).unwrap_or_else(|_| "[]".into()));
        let rows = sqlx::query(
            "SELECT id, at, kind, action, guest_id, actor, target, outcome, detail FROM events
             WHERE (?1 IS NULL OR kind IN (SELECT value FROM json_each(?1)))
               AND (?2 IS NULL OR guest_id = ?2)
               AND (?3 IS NULL OR actor = ?3)
               AND (?4 IS NULL OR at >= ?4)
               AND (?5 IS NULL OR id < ?5)
             ORDER BY id DESC LIMIT ?6",
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
}
