//! PostgreSQL implementation of [`Store`], for several KBS replicas sharing one database.
//!
//! Same tables, columns and encryption at rest as the SQLite store (the KEK stays outside the
//! database, identical on every replica). What differs is that other processes write the same
//! rows, so:
//! - version numbers (resources, policies) are taken under a transaction-scoped advisory lock
//!   on the path, so two replicas never compute the same next version;
//! - creating a rollout takes the same kind of lock on its path, so two rollouts of one
//!   resource started at once on two replicas still supersede one another;
//! - batch writes sort their rows by key (one lock order everywhere: no deadlocks between
//!   replicas) and fold duplicates (PostgreSQL refuses an upsert that touches a row twice);
//! - an acked rollout target is never overwritten by a non-acked write (`TARGET_UPSERT`);
//! - the latest versions this replica read are kept only as a fallback for the attested GET
//!   while the database is out of reach (`outage.rs`), not as a cache in front of it;
//! - transactions that can lose a conflict with another replica's run again (`outage.rs`).

mod areas;
mod cluster;
mod listen;
mod outage;
mod rotation;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::latest_cache::SealedLatest;
use super::{
    AuditEntry, AuditQuery, AuditRecord, AuditStore, CHANNEL, Change, ChangeFeed, KeyEncryptionKey,
    KvStore, PolicyStore, ResourceStore, ResourceVersion, Store, StoreError, StoredPolicy,
    VersionInfo, audit_row, kv_context, now_ms, open_kv, resource_context,
};
use crate::resource_path::ResourcePath;

/// Server-side bound on waiting for a row or advisory lock another replica holds.
const LOCK_TIMEOUT: &str = "10s";

/// The connection pool of one replica (`[storage]` in the KBS configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    /// Connections this replica holds at most.
    pub max_connections: u32,
    /// How long a caller waits for a connection before the store answers an error (a 503
    /// `StorageUnavailable`, and `/readyz` turns 503).
    pub acquire_timeout: Duration,
    /// Server-side bound on one statement, so a stuck query frees its connection.
    pub statement_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
        }
    }
}

/// Advisory lock classes (first key of `pg_advisory_xact_lock(int, int)`); the second key
/// is `hashtext` of the name. A hash collision only serialises two unrelated writers.
const LOCK_RESOURCE: i32 = 0x7465_0001;
const LOCK_POLICY: i32 = 0x7465_0002;
const LOCK_ROLLOUT_PATH: i32 = 0x7465_0003;

/// PostgreSQL-backed store. Resource plaintext and plugin values are sealed under the KEK.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    kek: Arc<KeyEncryptionKey>,
    /// What other replicas (and this one) change, from `LISTEN` (see `listen.rs`).
    changes: ChangeFeed,
    /// Whether the database answered last time, and the GET's fallback copies.
    reach: outage::SharedReachability,
    _listener: Arc<listen::ListenerGuard>,
}

impl PostgresStore {
    /// Connect to `url` (`postgres://` or `postgresql://`) and run the migrations (several
    /// replicas starting at once are fine: sqlx migrates under an advisory lock).
    pub async fn open(url: &str, kek: Arc<KeyEncryptionKey>) -> Result<Self, StoreError> {
        Self::open_with(url, kek, &PoolSettings::default()).await
    }

    /// [`open`](Self::open) with the pool `settings`.
    pub async fn open_with(
        url: &str,
        kek: Arc<KeyEncryptionKey>,
        settings: &PoolSettings,
    ) -> Result<Self, StoreError> {
        let statement_timeout = settings.statement_timeout.as_millis().to_string();
        let opts = PgConnectOptions::from_str(url)?
            .application_name("tether-kbs")
            .options([
                ("statement_timeout", statement_timeout.as_str()),
                ("lock_timeout", LOCK_TIMEOUT),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let changes = ChangeFeed::default();
        let reach = outage::SharedReachability::default();
        let listener = listen::spawn(pool.clone(), changes.clone(), reach.clone());
        Ok(Self {
            pool,
            kek,
            changes,
            reach,
            _listener: Arc::new(listener),
        })
    }

    /// The connection pool, for the per-area impls.
    fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A transaction holding the advisory lock `(class, hashtext(name))` until it ends.
    async fn begin_locked(
        &self,
        class: i32,
        name: &str,
    ) -> Result<Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(class)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }
}

impl PostgresStore {
    /// The latest version of `path` as this replica last read it, opened; logged, since it
    /// may be older than what the database holds now.
    fn fallback(
        &self,
        path: &ResourcePath,
        key: &str,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        let Some(copy) = self.reach.fallback.get(key) else {
            return Ok(None);
        };
        let data = self
            .kek
            .open(&resource_context(path), &copy.nonce, &copy.ciphertext)?;
        tracing::debug!(
            path = key,
            version = copy.version,
            "storage out of reach: serving the latest version this replica last read"
        );
        Ok(Some(ResourceVersion {
            version: copy.version,
            data,
            sha256: copy.sha256.clone(),
        }))
    }
}

/// Rows of a batch sorted by `key`, the last of duplicates kept (what a row-by-row upsert
/// would leave), so a multi-row upsert touches each row once and in one lock order.
fn fold_by_key<T: Clone, K: Ord>(rows: &[T], key: impl Fn(&T) -> K) -> Vec<T> {
    let mut keyed: std::collections::BTreeMap<K, &T> = std::collections::BTreeMap::new();
    for row in rows {
        keyed.insert(key(row), row);
    }
    keyed.into_values().cloned().collect()
}

/// Announces `change` to every replica (this one too) on [`CHANNEL`]: when `exec`'s
/// transaction commits, or at once outside one. A failed announcement fails the write's
/// caller, who retries; the write itself stands, and a replica that misses a change reloads
/// everything when its listener reconnects (`Change::Lost`).
async fn notify<'e, E>(exec: E, change: &Change) -> Result<(), StoreError>
where
    E: sqlx::PgExecutor<'e>,
{
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(change.encode())
        .execute(exec)
        .await?;
    Ok(())
}

#[async_trait]
impl ResourceStore for PostgresStore {
    async fn put_resource(
        &self,
        path: &ResourcePath,
        data: &[u8],
        actor: &str,
    ) -> Result<u64, StoreError> {
        let (nonce, ct) = self.kek.seal(&resource_context(path), data)?;
        let sha = hex::encode(Sha256::digest(data));
        let key = path.to_string();
        let mut tx = self.begin_locked(LOCK_RESOURCE, &key).await?;
        // Under the lock, this statement's snapshot sees every version committed before.
        let row = sqlx::query(
            "INSERT INTO resources (path, version, nonce, ciphertext, sha256, size, created_at, created_by)
             SELECT $1, COALESCE(MAX(version), 0) + 1, $2, $3, $4, $5, $6, $7 FROM resources WHERE path = $1
             RETURNING version",
        )
        .bind(&key)
        .bind(nonce)
        .bind(ct)
        .bind(sha)
        .bind(data.len() as i64)
        .bind(now_ms() as i64)
        .bind(actor)
        .fetch_one(&mut *tx)
        .await?;
        notify(&mut *tx, &Change::Resource(key.clone())).await?;
        let committed = tx.commit().await;
        // Even a commit whose answer was lost may have stored the version: no copy of an
        // older one may be served after it.
        self.reach.fallback.invalidate(&key);
        committed?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }

    async fn get_resource(
        &self,
        path: &ResourcePath,
        version: Option<u64>,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        let key = path.to_string();
        let latest = version.is_none();
        // Known to be out of reach: the copy at once, rather than after the pool's timeout.
        if latest
            && self.reach.is_down()
            && let Some(copy) = self.fallback(path, &key)?
        {
            return Ok(Some(copy));
        }
        let ticket = self.reach.fallback.ticket();
        let read = sqlx::query(
            "SELECT version, nonce, ciphertext, sha256 FROM resources
             WHERE path = $1 AND deleted = 0 AND ($2::BIGINT IS NULL OR version = $2)
             ORDER BY version DESC LIMIT 1",
        )
        .bind(&key)
        .bind(version.map(|v| v as i64))
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from);
        self.reach.note(&read);
        let row = match read {
            Ok(row) => row,
            Err(e) if latest && e.is_unavailable() => {
                return match self.fallback(path, &key)? {
                    Some(copy) => Ok(Some(copy)),
                    None => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        let Some(row) = row else { return Ok(None) };
        let nonce: Vec<u8> = row.try_get(1)?;
        let ciphertext: Vec<u8> = row.try_get(2)?;
        let data = self
            .kek
            .open(&resource_context(path), &nonce, &ciphertext)?;
        let found = ResourceVersion {
            version: row.try_get::<i64, _>(0)? as u64,
            data,
            sha256: row.try_get(3)?,
        };
        if latest {
            self.reach.fallback.fill(
                ticket,
                &key,
                SealedLatest {
                    version: found.version,
                    nonce,
                    ciphertext,
                    sha256: found.sha256.clone(),
                },
            );
        }
        Ok(Some(found))
    }

    async fn list_versions(&self, path: &ResourcePath) -> Result<Vec<VersionInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT version, sha256, size, created_at, created_by, deleted FROM resources
             WHERE path = $1 ORDER BY version",
        )
        .bind(path.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(VersionInfo {
                    version: r.try_get::<i64, _>(0)? as u64,
                    sha256: r.try_get(1)?,
                    size: r.try_get::<i64, _>(2)? as u64,
                    created_at: r.try_get::<i64, _>(3)? as u64,
                    created_by: r.try_get(4)?,
                    deleted: r.try_get::<i64, _>(5)? != 0,
                })
            })
            .collect()
    }

    async fn delete_resource(&self, path: &ResourcePath, _actor: &str) -> Result<bool, StoreError> {
        // Crypto-shred as in SQLite: the row stays so numbering never restarts. The old
        // tuple versions stay in the table until VACUUM reclaims them (docs/operations.md,
        // "PostgreSQL"): ciphertext under the KEK, which the database never holds.
        let done = sqlx::query(
            "UPDATE resources SET deleted = 1, ciphertext = ''::BYTEA, nonce = ''::BYTEA
             WHERE path = $1 AND deleted = 0",
        )
        .bind(path.to_string())
        .execute(&self.pool)
        .await;
        // Whatever the answer, no copy of a version that may be deleted is served again.
        self.reach.fallback.invalidate(&path.to_string());
        let done = done?;
        if done.rows_affected() > 0 {
            notify(&self.pool, &Change::Resource(path.to_string())).await?;
        }
        Ok(done.rows_affected() > 0)
    }
}

#[async_trait]
impl PolicyStore for PostgresStore {
    async fn get_policy(&self, name: &str) -> Result<Option<StoredPolicy>, StoreError> {
        let row = sqlx::query(
            "SELECT version, body, created_at, created_by FROM policies
             WHERE name = $1 ORDER BY version DESC LIMIT 1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(StoredPolicy {
                version: r.try_get::<i64, _>(0)? as u64,
                body: r.try_get(1)?,
                created_at: r.try_get::<i64, _>(2)? as u64,
                created_by: r.try_get(3)?,
            })
        })
        .transpose()
    }

    async fn set_policy(&self, name: &str, body: &str, actor: &str) -> Result<u64, StoreError> {
        let mut tx = self.begin_locked(LOCK_POLICY, name).await?;
        let row = sqlx::query(
            "INSERT INTO policies (name, version, body, created_at, created_by)
             SELECT $1, COALESCE(MAX(version), 0) + 1, $2, $3, $4 FROM policies WHERE name = $1
             RETURNING version",
        )
        .bind(name)
        .bind(body)
        .bind(now_ms() as i64)
        .bind(actor)
        .fetch_one(&mut *tx)
        .await?;
        notify(&mut *tx, &Change::Policy(name.to_owned())).await?;
        tx.commit().await?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }
}

#[async_trait]
impl AuditStore for PostgresStore {
    async fn audit(&self, e: AuditEntry) -> Result<(), StoreError> {
        // An audit write is never why a request waits out the pool's timeout (the caller
        // counts the entry as lost: `kbs_audit_write_failures_total`).
        if self.reach.is_down() {
            return Err(StoreError::Database(sqlx::Error::PoolTimedOut));
        }
        sqlx::query(
            "INSERT INTO audit_log (at, actor, role, action, target, outcome, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(now_ms() as i64)
        .bind(e.actor)
        .bind(e.role)
        .bind(e.action)
        .bind(e.target)
        .bind(e.outcome)
        .bind(e.detail)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let (action_exact, action_prefix) = match q.action.as_deref() {
            Some(a) if a.ends_with('*') => (
                None,
                Some(format!(
                    "{}%",
                    a.trim_end_matches('*')
                        .replace('\\', "\\\\")
                        .replace('%', "\\%")
                        .replace('_', "\\_")
                )),
            ),
            Some(a) => (Some(a.to_string()), None),
            None => (None, None),
        };
        let rows = sqlx::query(
            "SELECT id, at, actor, role, action, target, outcome, detail FROM audit_log
             WHERE ($1::TEXT IS NULL OR action = $1)
               AND ($2::TEXT IS NULL OR action LIKE $2 ESCAPE '\\')
               AND ($3::TEXT IS NULL OR actor = $3)
               AND ($4::BIGINT IS NULL OR id < $4)
             ORDER BY id DESC LIMIT $5",
        )
        .bind(action_exact)
        .bind(action_prefix)
        .bind(q.actor.clone())
        .bind(q.before)
        .bind(q.limit.clamp(1, 1000) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_row).collect()
    }
}

#[async_trait]
impl KvStore for PostgresStore {
    async fn kv_get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT value FROM plugin_kv WHERE namespace = $1 AND key = $2")
            .bind(namespace)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let sealed: Vec<u8> = r.try_get(0)?;
            open_kv(&self.kek, namespace, key, &sealed)
        })
        .transpose()
    }

    async fn kv_put(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let (nonce, ct) = self.kek.seal(&kv_context(namespace, key), value)?;
        let mut sealed = nonce;
        sealed.extend_from_slice(&ct);
        sqlx::query(
            "INSERT INTO plugin_kv (namespace, key, value, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        )
        .bind(namespace)
        .bind(key)
        .bind(sealed)
        .bind(now_ms() as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn kv_delete(&self, namespace: &str, key: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM plugin_kv WHERE namespace = $1 AND key = $2")
            .bind(namespace)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn kv_list(
        &self,
        namespace: &str,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT key, value FROM plugin_kv WHERE namespace = $1 AND starts_with(key, $2)
             ORDER BY key LIMIT $3",
        )
        .bind(namespace)
        .bind(prefix)
        .bind(limit.max(1) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let key: String = r.try_get(0)?;
                let sealed: Vec<u8> = r.try_get(1)?;
                let value = open_kv(&self.kek, namespace, &key, &sealed)?;
                Ok((key, value))
            })
            .collect()
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let r = sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(StoreError::from);
        self.reach.note(&r);
        r
    }

    fn engine(&self) -> &'static str {
        "postgres"
    }

    fn changes(&self) -> ChangeFeed {
        self.changes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fold_duplicates_keeping_the_last_and_sort_by_key() {
        let rows = [("b", 1), ("a", 2), ("b", 3), ("c", 4), ("a", 5)];
        assert_eq!(fold_by_key(&rows, |r| r.0), [("a", 5), ("b", 3), ("c", 4)]);
    }
}
