//! SQLite implementation of [`Store`] (the embedded default), through sqlx.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::latest_cache::{LatestCache, SealedLatest};
use super::{
    AuditEntry, AuditQuery, AuditRecord, AuditStore, ChangeFeed, KeyEncryptionKey, KvStore,
    PolicyStore, ResourceStore, ResourceVersion, Store, StoreError, StoredPolicy, VersionInfo,
    audit_row, kv_context, now_ms, open_kv, resource_context,
};
use crate::resource_path::ResourcePath;

/// SQLite-backed store. Resource plaintext is sealed under the key-encryption key.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    kek: Arc<KeyEncryptionKey>,
    /// Latest version per path, still sealed; every resource write below invalidates it.
    latest: Arc<LatestCache>,
    /// Taken by the batch writers (rollout targets, fleet records, events) around their
    /// transactions, so they queue here in order instead of colliding on SQLite's write
    /// lock, where the loser sleeps in the busy handler's steps (up to 100 ms each).
    batch_writes: Arc<tokio::sync::Mutex<()>>,
    /// Never announces anything (see [`Store::changes`]).
    changes: ChangeFeed,
}

impl SqliteStore {
    /// Open (creating if needed) the database at `url` and run the migrations.
    pub async fn open(url: &str, kek: Arc<KeyEncryptionKey>) -> Result<Self, StoreError> {
        let parsed = SqliteConnectOptions::from_str(url)?;
        if !(url.contains(":memory:") || url.contains("mode=memory")) {
            private_database_files(parsed.get_filename())?;
        }
        let opts = parsed
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // A put or delete that answered 200 survives a power cut: the WAL is fsynced at
            // every commit (NORMAL syncs only at checkpoints, and may lose the last commits).
            .synchronous(SqliteSynchronous::Full)
            // Erased content is overwritten with zeros, in its page and in freed pages; the
            // WAL's older frames go with the checkpoint after each erase (`expunge`).
            .pragma("secure_delete", "ON")
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(8);
        Self::with_pool(pool, opts, kek).await
    }

    /// A private database in memory (no file; gone when the store is dropped): the same
    /// store, schema and encryption at rest, for tests of the parts built on it.
    pub async fn open_in_memory(kek: Arc<KeyEncryptionKey>) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")?.foreign_keys(true);
        // One connection, never closed: each connection to `:memory:` is a database of its own.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None);
        Self::with_pool(pool, opts, kek).await
    }

    async fn with_pool(
        pool: SqlitePoolOptions,
        opts: SqliteConnectOptions,
        kek: Arc<KeyEncryptionKey>,
    ) -> Result<Self, StoreError> {
        let pool = pool
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self {
            pool,
            kek,
            latest: Arc::default(),
            batch_writes: Arc::default(),
            changes: ChangeFeed::default(),
        })
    }

    /// Opens a sealed resource version under the KEK.
    fn open_sealed(
        &self,
        path: &ResourcePath,
        sealed: &SealedLatest,
    ) -> Result<ResourceVersion, StoreError> {
        let data = self
            .kek
            .open(&resource_context(path), &sealed.nonce, &sealed.ciphertext)?;
        Ok(ResourceVersion {
            version: sealed.version,
            data,
            sha256: sealed.sha256.clone(),
        })
    }

    /// A store in a fresh temporary directory (dropped with the directory), for tests.
    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    pub(crate) async fn open_temp() -> (tempfile::TempDir, Self) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let kek = Arc::new(KeyEncryptionKey::from_bytes(&[1u8; 32]));
        (dir, Self::open(&url, kek).await.unwrap())
    }

    /// A write transaction for a batch writer, with the batch-write turn it must hold until
    /// it commits (drop the guard after the transaction).
    pub(crate) async fn begin_batch(
        &self,
    ) -> Result<
        (
            tokio::sync::OwnedMutexGuard<()>,
            sqlx::Transaction<'static, sqlx::Sqlite>,
        ),
        StoreError,
    > {
        let turn = Arc::clone(&self.batch_writes).lock_owned().await;
        let tx = self.pool.begin().await?;
        Ok((turn, tx))
    }

    /// After an erase: copy the WAL into the database and truncate it to nothing, so the
    /// frames that still held the erased value (written before it was erased) are gone from
    /// the files; `secure_delete` zeroed it in the pages themselves. Readers can hold the
    /// checkpoint off (busy handler, then a warning): the frames then go at a later one.
    async fn expunge(&self) {
        let outcome: Result<(i64, i64, i64), _> = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.pool)
            .await;
        match outcome {
            Ok((0, _, _)) => {}
            Ok((_, wal_frames, copied)) => tracing::warn!(
                wal_frames,
                copied,
                "WAL checkpoint after an erase was blocked by readers: erased data stays in the WAL until a later checkpoint"
            ),
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint after an erase failed"),
        }
    }

    /// The connection pool, for the per-area store impls in sibling modules.
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The key-encryption key, for encryption at rest in sibling modules.
    #[allow(dead_code)] // for per-area stores that seal their own columns
    pub(crate) fn kek(&self) -> &KeyEncryptionKey {
        &self.kek
    }
}

#[async_trait]
impl ResourceStore for SqliteStore {
    async fn put_resource(
        &self,
        path: &ResourcePath,
        data: &[u8],
        actor: &str,
    ) -> Result<u64, StoreError> {
        let (nonce, ct) = self.kek.seal(&resource_context(path), data)?;
        let sha = hex::encode(Sha256::digest(data));
        let key = path.to_string();
        // One statement: SQLite serialises writers, so the version numbering cannot race.
        let row = sqlx::query(
            "INSERT INTO resources (path, version, nonce, ciphertext, sha256, size, created_at, created_by)
             SELECT ?1, COALESCE(MAX(version), 0) + 1, ?2, ?3, ?4, ?5, ?6, ?7 FROM resources WHERE path = ?1
             RETURNING version",
        )
        .bind(&key)
        .bind(nonce)
        .bind(ct)
        .bind(sha)
        .bind(data.len() as i64)
        .bind(now_ms() as i64)
        .bind(actor)
        .fetch_one(&self.pool)
        .await;
        self.latest.invalidate(&key);
        Ok(row?.try_get::<i64, _>(0)? as u64)
    }

    async fn get_resource(
        &self,
        path: &ResourcePath,
        version: Option<u64>,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        let key = path.to_string();
        if let Some(hit) = self.latest.get(&key)
            && version.is_none_or(|v| v == hit.version)
        {
            return self.open_sealed(path, &hit).map(Some);
        }
        let ticket = self.latest.ticket();
        let row = match version {
            Some(v) => {
                sqlx::query(
                    "SELECT version, nonce, ciphertext, sha256 FROM resources
                     WHERE path = ?1 AND version = ?2 AND deleted = 0",
                )
                .bind(&key)
                .bind(v as i64)
                .fetch_optional(&self.pool)
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT version, nonce, ciphertext, sha256 FROM resources
                     WHERE path = ?1 AND deleted = 0 ORDER BY version DESC LIMIT 1",
                )
                .bind(&key)
                .fetch_optional(&self.pool)
                .await?
            }
        };
        let Some(row) = row else { return Ok(None) };
        let sealed = SealedLatest {
            version: row.try_get::<i64, _>(0)? as u64,
            nonce: row.try_get(1)?,
            ciphertext: row.try_get(2)?,
            sha256: row.try_get(3)?,
        };
        let plain = self.open_sealed(path, &sealed)?;
        if version.is_none() {
            self.latest.fill(ticket, &key, sealed);
        }
        Ok(Some(plain))
    }

    async fn list_versions(&self, path: &ResourcePath) -> Result<Vec<VersionInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT version, sha256, size, created_at, created_by, deleted FROM resources
             WHERE path = ?1 ORDER BY version",
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
        // Crypto-shred: drop the ciphertext, keep the row so numbering never restarts
        // (guests refuse downgrades, so a re-upload must get a higher version).
        let done = sqlx::query(
            "UPDATE resources SET deleted = 1, ciphertext = x'', nonce = x''
             WHERE path = ?1 AND deleted = 0",
        )
        .bind(path.to_string())
        .execute(&self.pool)
        .await;
        self.latest.invalidate(&path.to_string());
        let erased = done?.rows_affected() > 0;
        if erased {
            self.expunge().await;
        }
        Ok(erased)
    }
}

#[async_trait]
impl PolicyStore for SqliteStore {
    async fn get_policy(&self, name: &str) -> Result<Option<StoredPolicy>, StoreError> {
        let row = sqlx::query(
            "SELECT version, body, created_at, created_by FROM policies
             WHERE name = ?1 ORDER BY version DESC LIMIT 1",
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
        let row = sqlx::query(
            "INSERT INTO policies (name, version, body, created_at, created_by)
             SELECT ?1, COALESCE(MAX(version), 0) + 1, ?2, ?3, ?4 FROM policies WHERE name = ?1
             RETURNING version",
        )
        .bind(name)
        .bind(body)
        .bind(now_ms() as i64)
        .bind(actor)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }
}

#[async_trait]
impl AuditStore for SqliteStore {
    async fn audit(&self, e: AuditEntry) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_log (at, actor, role, action, target, outcome, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
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
                        .replace('%', "\\%")
                        .replace('_', "\\_")
                )),
            ),
            Some(a) => (Some(a.to_string()), None),
            None => (None, None),
        };
        let rows = sqlx::query(
            "SELECT id, at, actor, role, action, target, outcome, detail FROM audit_log
             WHERE (?1 IS NULL OR action = ?1)
               AND (?2 IS NULL OR action LIKE ?2 ESCAPE '\\')
               AND (?3 IS NULL OR actor = ?3)
               AND (?4 IS NULL OR id < ?4)
             ORDER BY id DESC LIMIT ?5",
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
impl KvStore for SqliteStore {
    async fn kv_get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT value FROM plugin_kv WHERE namespace = ?1 AND key = ?2")
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
            "INSERT INTO plugin_kv (namespace, key, value, updated_at) VALUES (?1, ?2, ?3, ?4)
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
        let done = sqlx::query("DELETE FROM plugin_kv WHERE namespace = ?1 AND key = ?2")
            .bind(namespace)
            .bind(key)
            .execute(&self.pool)
            .await?;
        let erased = done.rows_affected() > 0;
        if erased {
            self.expunge().await;
        }
        Ok(erased)
    }

    async fn kv_list(
        &self,
        namespace: &str,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT key, value FROM plugin_kv WHERE namespace = ?1 AND substr(key, 1, length(?2)) = ?2
             ORDER BY key LIMIT ?3",
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
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn engine(&self) -> &'static str {
        "sqlite"
    }

    fn changes(&self) -> ChangeFeed {
        // This process is the only writer (the data directory's lock keeps a second KBS
        // out), so nothing changes behind its back.
        self.changes.clone()
    }
}

/// The database file and SQLite's companions (`-wal`, `-shm`, `-journal`) are the owner's
/// only: the database file is created 0600 before SQLite opens it (SQLite gives its
/// companions the database file's mode), and wider modes left by older versions are
/// tightened.
fn private_database_files(db: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::fsutil::PRIVATE_FILE_MODE)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(db);
    match created {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        // A missing directory is SQLite's error to report, with its path.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let path = std::path::PathBuf::from(name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(
                &path,
                std::fs::Permissions::from_mode(crate::fsutil::PRIVATE_FILE_MODE),
            )?;
            tracing::warn!(path = %path.display(), "database file was readable by others: now 0600");
        }
    }
    Ok(())
}

/// Checks of what SQLite keeps on disk; the behaviour every engine shares is `storage::suite`.
#[cfg(test)]
mod tests {
    use super::*;

    /// Prepared statements kept on the one connection of `s` (an in-memory store).
    async fn cached_statements(s: &SqliteStore) -> usize {
        use sqlx::Connection;
        s.pool.acquire().await.unwrap().cached_statements_size()
    }

    /// A rollout of `n` targets written, acked and read back by guest: every batch statement
    /// the rotation engine's writes make, at batch size `n`.
    async fn rollout_of(s: &SqliteStore, n: usize) {
        use crate::storage::{NewRollout, RolloutStore, TargetRecord, TargetState};
        let ids: Vec<String> = (0..n).map(|g| format!("g{g}")).collect();
        let r = s
            .create_rollout(&NewRollout::for_test("default/key/a", n as u64), &ids)
            .await
            .unwrap();
        let acked: Vec<TargetRecord> = ids
            .iter()
            .map(|g| TargetRecord {
                state: TargetState::Acked,
                ..TargetRecord::pending(r.rollout.id, g)
            })
            .collect();
        s.write_targets(&acked).await.unwrap();
        assert_eq!(s.targets_of(r.rollout.id, &ids).await.unwrap().len(), n);
    }

    /// Batches of every size leave one prepared statement per shape, not one per size: each
    /// remainder's multi-row statement is large, and keeping one per size grew the KBS by
    /// about 500 bytes per rollout target in the soak benchmark.
    #[tokio::test]
    async fn batches_of_any_size_do_not_pile_up_prepared_statements() {
        let kek = Arc::new(KeyEncryptionKey::from_bytes(&[1u8; 32]));
        let s = SqliteStore::open_in_memory(kek).await.unwrap();
        for n in 1..10 {
            rollout_of(&s, n).await;
        }
        let settled = cached_statements(&s).await;
        for n in 10..60 {
            rollout_of(&s, n).await;
        }
        assert_eq!(
            cached_statements(&s).await,
            settled,
            "prepared statements kept after 50 more batch sizes"
        );
    }

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let kek = Arc::new(KeyEncryptionKey::from_bytes(&[1u8; 32]));
        (dir, SqliteStore::open(&url, kek).await.unwrap())
    }

    /// Whether any 32-byte piece of `secret` (at 32-byte steps) is in the database file or
    /// its WAL, read raw; the names of the files that hold one.
    fn files_holding(dir: &std::path::Path, secret: &[u8]) -> Vec<String> {
        let mut found = Vec::new();
        for name in ["t.db", "t.db-wal"] {
            let Ok(bytes) = std::fs::read(dir.join(name)) else {
                continue;
            };
            let pieces: std::collections::HashSet<&[u8]> = secret.chunks_exact(32).collect();
            let hit = bytes.windows(32).any(|w| pieces.contains(w));
            if hit {
                found.push(name.to_string());
            }
        }
        found
    }

    /// The stored ciphertext of every version of `path`.
    async fn ciphertexts(s: &SqliteStore, path: &str) -> Vec<Vec<u8>> {
        sqlx::query_scalar("SELECT ciphertext FROM resources WHERE path = ?1")
            .bind(path)
            .fetch_all(&s.pool)
            .await
            .unwrap()
    }

    /// issue 17 defect 12: with `secure_delete` off, an erased ciphertext stayed in free space
    /// and in the WAL. After DELETE no piece of it is anywhere in the files, for a value that
    /// fits in its page and for one that spills into overflow pages; the same for a plugin's
    /// sealed value.
    #[tokio::test]
    async fn erased_ciphertext_is_gone_from_the_database_and_its_wal() {
        let (dir, s) = store().await;
        let mut secrets = Vec::new();
        for (path, size) in [("r/t/small", 300), ("r/t/large", 20_000)] {
            let p: ResourcePath = path.parse().unwrap();
            for _ in 0..2 {
                let data: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
                s.put_resource(&p, &data, "t").await.unwrap();
            }
            s.get_resource(&p, None).await.unwrap().unwrap();
            secrets.extend(ciphertexts(&s, path).await);
        }
        let kv: Vec<u8> = (0..5000).map(|_| rand::random::<u8>()).collect();
        s.kv_put("pki", "ca-key", &kv).await.unwrap();
        let sealed: Vec<u8> = sqlx::query_scalar("SELECT value FROM plugin_kv")
            .fetch_one(&s.pool)
            .await
            .unwrap();
        secrets.push(sealed);
        for secret in &secrets {
            assert!(
                !files_holding(dir.path(), secret).is_empty(),
                "the check finds a live ciphertext"
            );
        }

        for path in ["r/t/small", "r/t/large"] {
            assert!(
                s.delete_resource(&path.parse().unwrap(), "t")
                    .await
                    .unwrap()
            );
        }
        assert!(s.kv_delete("pki", "ca-key").await.unwrap());
        for (i, secret) in secrets.iter().enumerate() {
            let holding = files_holding(dir.path(), secret);
            assert!(holding.is_empty(), "secret {i} is still in {holding:?}");
        }
    }

    #[tokio::test]
    async fn a_committed_write_is_synced() {
        let (_d, s) = store().await;
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&s.pool)
            .await
            .unwrap();
        assert_eq!(synchronous, 2, "FULL: the WAL is fsynced at every commit");
        let secure_delete: i64 = sqlx::query_scalar("PRAGMA secure_delete")
            .fetch_one(&s.pool)
            .await
            .unwrap();
        assert_eq!(secure_delete, 1);
    }
}
