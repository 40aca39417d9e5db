//! Durable rollouts: [`RolloutStore`] (a supertrait of [`super::Store`]) and its SQLite
//! implementation. A rollout row says what goes where; one target row per guest records
//! where its delivery stands, written before the engine moves on (so an ack is never lost).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, ColumnIndex, Database, Decode, QueryBuilder, Row, Sqlite, Type};

use super::{SqliteStore, StoreError, now_ms};

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vmeta])* $variant),* }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),*];

            /// The stored and wire spelling.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),* }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = StoreError;
            fn from_str(s: &str) -> Result<Self, StoreError> {
                match s {
                    $($text => Ok(Self::$variant),)*
                    other => Err(StoreError::Crypto(format!(
                        "corrupt row: unknown {} {other:?}", stringify!($name)
                    ))),
                }
            }
        }
    };
}

string_enum! {
    /// Where a rollout stands.
    RolloutState {
        /// Deliveries outstanding.
        Running = "running",
        /// Every known target is acked, failed or denied; still in force: matching guests
        /// that connect later get the version (and the rollout runs again meanwhile).
        Completed = "completed",
        /// No new deliveries until resumed (in-flight ones finish).
        Paused = "paused",
        /// Stopped by an admin.
        Cancelled = "cancelled",
        /// A newer rollout of the same resource replaced it.
        Superseded = "superseded",
        /// Its overall deadline passed; undelivered targets failed.
        Expired = "expired",
    }
}

impl RolloutState {
    /// Whether the rollout still delivers (now or to guests that connect later).
    pub fn in_force(self) -> bool {
        matches!(self, Self::Running | Self::Completed | Self::Paused)
    }
}

string_enum! {
    /// Where one guest's delivery stands.
    TargetState {
        /// Not delivered yet (offline, waiting for a slot, or backing off after a failure).
        Pending = "pending",
        /// A push is in flight.
        Delivering = "delivering",
        /// The guest holds the version (digest and hook status recorded).
        Acked = "acked",
        /// Gave up: attempts exhausted, a permanent guest error, or the rollout deadline.
        Failed = "failed",
        /// The resource policy refuses the resource to this guest; nothing was sent.
        Denied = "denied",
    }
}

impl TargetState {
    /// Acked, failed or denied.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Acked | Self::Failed | Self::Denied)
    }
}

/// A rollout to create.
#[derive(Clone, Debug)]
pub struct NewRollout {
    /// Resource path `repo/type/tag`.
    pub path: String,
    /// Version to deliver.
    pub version: u64,
    /// Hex SHA-256 of that version.
    pub sha256: String,
    /// Canonical selector text.
    pub selector: String,
    /// Pushes in flight at once.
    pub max_concurrent: u32,
    /// Pushes per guest before it is failed.
    pub max_attempts: u32,
    /// Deadline of one push, ms.
    pub guest_deadline_ms: u64,
    /// Overall deadline, Unix ms.
    pub deadline_at: Option<u64>,
    /// Admin identity.
    pub created_by: String,
}

impl NewRollout {
    /// A rollout of `path` at `version` to `app=db`, for tests.
    #[doc(hidden)]
    pub fn for_test(path: &str, version: u64) -> Self {
        Self {
            path: path.into(),
            version,
            sha256: "ab".into(),
            selector: "app=db".into(),
            max_concurrent: 4,
            max_attempts: 3,
            guest_deadline_ms: 10_000,
            deadline_at: None,
            created_by: "ops@dev".into(),
        }
    }
}

/// A stored rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// Id.
    pub id: i64,
    /// Resource path.
    pub path: String,
    /// Version delivered.
    pub version: u64,
    /// Hex SHA-256 of that version.
    pub sha256: String,
    /// Selector (canonical text).
    pub selector: String,
    /// Pushes in flight at once.
    pub max_concurrent: u32,
    /// Pushes per guest before it is failed.
    pub max_attempts: u32,
    /// Deadline of one push, ms.
    pub guest_deadline_ms: u64,
    /// Overall deadline, Unix ms.
    pub deadline_at: Option<u64>,
    /// State.
    pub state: RolloutState,
    /// Why it is in that state (cancel reason, superseding rollout...).
    pub detail: String,
    /// The rollout that replaced it.
    pub superseded_by: Option<i64>,
    /// Unix ms.
    pub created_at: u64,
    /// Admin identity that started it.
    pub created_by: String,
    /// Unix ms of the last state change.
    pub updated_at: u64,
    /// Unix ms when it left force (cancelled, superseded, expired).
    pub finished_at: Option<u64>,
}

/// One guest's delivery state in a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// Rollout id.
    pub rollout_id: i64,
    /// Guest id.
    pub guest_id: String,
    /// State.
    pub state: TargetState,
    /// Pushes tried.
    pub attempts: u32,
    /// Last failure or denial reason (empty otherwise).
    pub reason: String,
    /// Hex SHA-256 the guest reported holding.
    pub digest: Option<String>,
    /// Version the guest reported holding (the pushed one or newer).
    pub held_version: Option<u64>,
    /// Exit status of the guest's post-rotation hook.
    pub hook_status: Option<i32>,
    /// The guest already held the version when it was pushed (a replay).
    pub already_held: bool,
    /// Unix ms before which no retry is made.
    pub next_attempt_at: u64,
    /// Unix ms of the last change.
    pub updated_at: u64,
    /// Unix ms of the ack.
    pub acked_at: Option<u64>,
}

impl TargetRecord {
    /// A fresh pending target.
    pub fn pending(rollout_id: i64, guest_id: &str) -> Self {
        Self {
            rollout_id,
            guest_id: guest_id.to_string(),
            state: TargetState::Pending,
            attempts: 0,
            reason: String::new(),
            digest: None,
            held_version: None,
            hook_status: None,
            already_held: false,
            next_attempt_at: 0,
            updated_at: now_ms(),
            acked_at: None,
        }
    }
}

/// Filter and page for listing rollouts.
#[derive(Clone, Debug, Default)]
pub struct RolloutQuery {
    /// Only this resource path.
    pub path: Option<String>,
    /// Only rollouts in force (running, completed or paused).
    pub in_force: bool,
    /// Only ids below (paging backwards).
    pub before: Option<i64>,
    /// Page size.
    pub limit: u32,
}

/// What creating a rollout did.
#[derive(Clone, Debug)]
pub struct CreatedRollout {
    /// The new rollout.
    pub rollout: RolloutRecord,
    /// Older rollouts of the same path it superseded.
    pub superseded: Vec<i64>,
}

/// Durable rollout storage.
#[async_trait]
pub trait RolloutStore: Send + Sync + 'static {
    /// Create a running rollout with `targets` pending, superseding the in-force rollouts of
    /// the same path, in one transaction.
    async fn create_rollout(
        &self,
        new: &NewRollout,
        targets: &[String],
    ) -> Result<CreatedRollout, StoreError>;
    /// One rollout.
    async fn get_rollout(&self, id: i64) -> Result<Option<RolloutRecord>, StoreError>;
    /// Rollouts, newest first.
    async fn list_rollouts(&self, q: &RolloutQuery) -> Result<Vec<RolloutRecord>, StoreError>;
    /// Change a rollout's state; `finished` stamps `finished_at`.
    async fn set_rollout_state(
        &self,
        id: i64,
        state: RolloutState,
        detail: &str,
    ) -> Result<(), StoreError>;
    /// Target counts by state.
    async fn target_counts(&self, id: i64) -> Result<BTreeMap<TargetState, u64>, StoreError>;
    /// Targets of a rollout ordered by guest id, optionally of one state, after a guest id.
    async fn list_targets(
        &self,
        id: i64,
        state: Option<TargetState>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<TargetRecord>, StoreError>;
    /// The targets of `guests` in one rollout (those it has), in no particular order.
    async fn targets_of(&self, id: i64, guests: &[String])
    -> Result<Vec<TargetRecord>, StoreError>;
    /// Insert or replace targets, in one transaction. An acked row is only ever replaced by
    /// an acked row. A shared store announces each rollout whose targets changed.
    async fn write_targets(&self, targets: &[TargetRecord]) -> Result<(), StoreError>;
    /// Whether other processes write this store's rollouts too (several replicas on one
    /// database): the reconciler then takes target counts and rollout states from the store,
    /// not from what it delivered itself. See `docs/architecture.md`, "Several replicas".
    fn shared(&self) -> bool {
        false
    }
    /// Record guests rotation has seen connected: `(guest_id, labels)`, stamped now.
    async fn note_rotation_guests(
        &self,
        guests: &[(String, tunnel::Labels)],
    ) -> Result<(), StoreError>;
    /// Guests seen since `since_ms`, with their last labels.
    async fn rotation_guests(
        &self,
        since_ms: u64,
    ) -> Result<Vec<(String, BTreeMap<String, String>)>, StoreError>;
}

pub(super) const ROLLOUT_COLUMNS: &str = "id, path, version, sha256, selector, max_concurrent, max_attempts, \
     guest_deadline_ms, deadline_at, state, detail, superseded_by, created_at, created_by, updated_at, finished_at";
pub(super) const TARGET_COLUMNS: &str = "rollout_id, guest_id, state, attempts, reason, digest, held_version, \
     hook_status, already_held, next_attempt_at, updated_at, acked_at";

/// Guest ids per `targets_of` query (SQLite binds at most 32,766 parameters).
pub(super) const TARGETS_OF_CHUNK: usize = 1000;

pub(super) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A `rollouts` row (columns [`ROLLOUT_COLUMNS`]) of either engine: both schemas store
/// integers as 64-bit and text as text, so one decoder serves both.
pub(super) fn rollout_row<R>(r: &R) -> Result<RolloutRecord, StoreError>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'a> i64: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> String: Decode<'a, R::Database> + Type<R::Database>,
{
    Ok(RolloutRecord {
        id: r.try_get(0)?,
        path: r.try_get(1)?,
        version: u(r.try_get(2)?),
        sha256: r.try_get(3)?,
        selector: r.try_get(4)?,
        max_concurrent: u32::try_from(r.try_get::<i64, _>(5)?).unwrap_or(1),
        max_attempts: u32::try_from(r.try_get::<i64, _>(6)?).unwrap_or(1),
        guest_deadline_ms: u(r.try_get(7)?),
        deadline_at: r.try_get::<Option<i64>, _>(8)?.map(u),
        state: r.try_get::<String, _>(9)?.parse()?,
        detail: r.try_get(10)?,
        superseded_by: r.try_get(11)?,
        created_at: u(r.try_get(12)?),
        created_by: r.try_get(13)?,
        updated_at: u(r.try_get(14)?),
        finished_at: r.try_get::<Option<i64>, _>(15)?.map(u),
    })
}

/// A `rollout_targets` row (columns [`TARGET_COLUMNS`]) of either engine.
pub(super) fn target_row<R>(r: &R) -> Result<TargetRecord, StoreError>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'a> i64: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> String: Decode<'a, R::Database> + Type<R::Database>,
{
    Ok(TargetRecord {
        rollout_id: r.try_get(0)?,
        guest_id: r.try_get(1)?,
        state: r.try_get::<String, _>(2)?.parse()?,
        attempts: u32::try_from(r.try_get::<i64, _>(3)?).unwrap_or(0),
        reason: r.try_get(4)?,
        digest: r.try_get(5)?,
        held_version: r.try_get::<Option<i64>, _>(6)?.map(u),
        hook_status: r
            .try_get::<Option<i64>, _>(7)?
            .and_then(|v| i32::try_from(v).ok()),
        already_held: r.try_get::<i64, _>(8)? != 0,
        next_attempt_at: u(r.try_get(9)?),
        updated_at: u(r.try_get(10)?),
        acked_at: r.try_get::<Option<i64>, _>(11)?.map(u),
    })
}

/// Rows per multi-row INSERT (12 columns each, well under SQLite's variable limit).
const TARGET_CHUNK: usize = 256;
/// Conflict clause of a target write: every column but the key takes the new value, except
/// that an acked target stays acked: with several writers (replicas on one PostgreSQL, a
/// delivery that raced a retry) a late pending or failed write never erases an ack.
pub(super) const TARGET_UPSERT: &str = " ON CONFLICT (rollout_id, guest_id) DO UPDATE SET \
     state = excluded.state, attempts = excluded.attempts, reason = excluded.reason, \
     digest = excluded.digest, held_version = excluded.held_version, \
     hook_status = excluded.hook_status, already_held = excluded.already_held, \
     next_attempt_at = excluded.next_attempt_at, updated_at = excluded.updated_at, \
     acked_at = excluded.acked_at \
     WHERE rollout_targets.state <> 'acked' OR excluded.state = 'acked'";

pub(super) fn push_targets<DB: Database>(
    tx_builder: &mut QueryBuilder<DB>,
    targets: &[TargetRecord],
) where
    for<'a> i64: sqlx::Encode<'a, DB> + Type<DB>,
    for<'a> String: sqlx::Encode<'a, DB> + Type<DB>,
    for<'a> &'a str: sqlx::Encode<'a, DB> + Type<DB>,
    for<'a> Option<i64>: sqlx::Encode<'a, DB> + Type<DB>,
    for<'a> Option<String>: sqlx::Encode<'a, DB> + Type<DB>,
{
    tx_builder.push_values(targets, |mut b, t| {
        b.push_bind(t.rollout_id)
            .push_bind(t.guest_id.clone())
            .push_bind(t.state.as_str())
            .push_bind(i64::from(t.attempts))
            .push_bind(t.reason.clone())
            .push_bind(t.digest.clone())
            .push_bind(t.held_version.map(i))
            .push_bind(t.hook_status.map(i64::from))
            .push_bind(i64::from(t.already_held))
            .push_bind(i(t.next_attempt_at))
            .push_bind(i(t.updated_at))
            .push_bind(t.acked_at.map(i));
    });
}

#[async_trait]
impl RolloutStore for SqliteStore {
    async fn create_rollout(
        &self,
        new: &NewRollout,
        targets: &[String],
    ) -> Result<CreatedRollout, StoreError> {
        let now = i(now_ms());
        let (_turn, mut tx) = self.begin_batch().await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO rollouts (path, version, sha256, selector, max_concurrent, max_attempts,
                 guest_deadline_ms, deadline_at, state, detail, created_at, created_by, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'running', '', ?9, ?10, ?9)
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
            "UPDATE rollouts SET state = 'superseded', superseded_by = ?1, detail = ?2,
                 updated_at = ?3, finished_at = ?3
             WHERE path = ?4 AND id <> ?1 AND state IN ('running', 'completed', 'paused')
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
            let mut b = QueryBuilder::<Sqlite>::new(format!(
                "INSERT INTO rollout_targets ({TARGET_COLUMNS}) "
            ));
            push_targets(&mut b, chunk);
            b.build()
                .persistent(super::keep_prepared(chunk.len(), TARGET_CHUNK))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(CreatedRollout {
            rollout,
            superseded,
        })
    }

    async fn get_rollout(&self, id: i64) -> Result<Option<RolloutRecord>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?1"
        )))
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(rollout_row).transpose()
    }

    async fn list_rollouts(&self, q: &RolloutQuery) -> Result<Vec<RolloutRecord>, StoreError> {
        let mut b = QueryBuilder::<Sqlite>::new(format!(
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
            "UPDATE rollouts SET state = ?2, detail = ?3, updated_at = ?4,
                 finished_at = COALESCE(?5, finished_at)
             WHERE id = ?1",
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
        Ok(())
    }

    async fn target_counts(&self, id: i64) -> Result<BTreeMap<TargetState, u64>, StoreError> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) FROM rollout_targets WHERE rollout_id = ?1 GROUP BY state",
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
        let mut b = QueryBuilder::<Sqlite>::new(format!(
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
        let mut out = Vec::with_capacity(guests.len());
        for chunk in guests.chunks(TARGETS_OF_CHUNK) {
            let mut b = QueryBuilder::<Sqlite>::new(format!(
                "SELECT {TARGET_COLUMNS} FROM rollout_targets WHERE rollout_id = "
            ));
            b.push_bind(id).push(" AND guest_id IN (");
            let mut list = b.separated(", ");
            for g in chunk {
                list.push_bind(g.clone());
            }
            b.push(")");
            let query = b
                .build()
                .persistent(super::keep_prepared(chunk.len(), TARGETS_OF_CHUNK));
            for row in query.fetch_all(self.pool()).await? {
                out.push(target_row(&row)?);
            }
        }
        Ok(out)
    }

    async fn write_targets(&self, targets: &[TargetRecord]) -> Result<(), StoreError> {
        if targets.is_empty() {
            return Ok(());
        }
        let (_turn, mut tx) = self.begin_batch().await?;
        for chunk in targets.chunks(TARGET_CHUNK) {
            let mut b = QueryBuilder::<Sqlite>::new(format!(
                "INSERT INTO rollout_targets ({TARGET_COLUMNS}) "
            ));
            push_targets(&mut b, chunk);
            // An upsert updates the row in place; `OR REPLACE` deleted and re-inserted it
            // (twice the b-tree work, measured as a third of the writer's time).
            b.push(TARGET_UPSERT);
            b.build()
                .persistent(super::keep_prepared(chunk.len(), TARGET_CHUNK))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn note_rotation_guests(
        &self,
        guests: &[(String, tunnel::Labels)],
    ) -> Result<(), StoreError> {
        if guests.is_empty() {
            return Ok(());
        }
        let now = i(now_ms());
        let (_turn, mut tx) = self.begin_batch().await?;
        for chunk in guests.chunks(TARGET_CHUNK) {
            let mut b = QueryBuilder::<Sqlite>::new(
                "INSERT OR REPLACE INTO rotation_guests (guest_id, labels, last_seen) ",
            );
            b.push_values(chunk, |mut b, (id, labels)| {
                b.push_bind(id.clone())
                    .push_bind(serde_json::to_string(labels).unwrap_or_else(|_| "{}".into()))
                    .push_bind(now);
            });
            b.build()
                .persistent(super::keep_prepared(chunk.len(), TARGET_CHUNK))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn rotation_guests(
        &self,
        since_ms: u64,
    ) -> Result<Vec<(String, BTreeMap<String, String>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT guest_id, labels FROM rotation_guests WHERE last_seen >= ?1 ORDER BY guest_id",
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
