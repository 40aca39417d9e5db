//! Storage: one [`Store`] trait for everything the KBS keeps, with SQLite as the embedded
//! default and PostgreSQL for several replicas sharing one database. Callers only see the
//! trait; [`open`] picks the engine from the database URL's scheme.

mod changes;
mod cluster;
mod events;
mod fleet;
mod kek;
pub mod latest_cache;
mod plugins;
mod postgres;
mod reference_values;
mod rotation;
mod sqlite;
// Compiled always (a feature would build every crate above kbs-core twice: once for the
// binaries, once for the test kit); hidden from the docs, called only by tests.
#[doc(hidden)]
pub mod suite;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Serialize;
use sqlx::{ColumnIndex, Decode, Row, Type};
use zeroize::Zeroizing;

pub use changes::{CHANNEL, Change, ChangeFeed};
pub use cluster::{ClusterStore, TunnelOwner};
pub use events::{EventQuery, EventRecord, EventStore, NewEvent};
pub use fleet::FleetStore;
pub use kek::KeyEncryptionKey;
pub use plugins::{PluginStateRow, PluginStateStore};
pub use postgres::{PoolSettings, PostgresStore};
pub use reference_values::{ReferenceValue, ReferenceValueStore};
pub use rotation::{
    CreatedRollout, NewRollout, RolloutQuery, RolloutRecord, RolloutState, RolloutStore,
    TargetRecord, TargetState,
};
pub use sqlite::SqliteStore;

use crate::resource_path::ResourcePath;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Encryption at rest failed (wrong key-encryption key, corrupt row).
    #[error("encryption at rest: {0}")]
    Crypto(String),
    /// File system trouble (key-encryption key file).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A stored row does not decode.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The database URL names no engine Tether has.
    #[error("{0}")]
    UnsupportedUrl(String),
}

impl StoreError {
    /// Whether the database could not be reached (connection refused or cut, no connection
    /// within the pool's timeout): the operation may succeed later, unchanged.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Database(
                sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::WorkerCrashed
            )
        )
    }
}

/// One stored version of a resource, decrypted.
pub struct ResourceVersion {
    /// Version number (1, 2, ...).
    pub version: u64,
    /// Plaintext (zeroized on drop).
    pub data: Zeroizing<Vec<u8>>,
    /// Hex SHA-256 of the plaintext.
    pub sha256: String,
}

/// Metadata of one version (no plaintext).
#[derive(Clone, Debug, Serialize)]
pub struct VersionInfo {
    /// Version number.
    pub version: u64,
    /// Hex SHA-256 of the plaintext.
    pub sha256: String,
    /// Plaintext size, bytes.
    pub size: u64,
    /// Unix ms of the upload.
    pub created_at: u64,
    /// Admin identity that uploaded it.
    pub created_by: String,
    /// Whether the resource was deleted (the plaintext is gone).
    pub deleted: bool,
}

/// A stored policy version.
#[derive(Clone, Debug, Serialize)]
pub struct StoredPolicy {
    /// Version number.
    pub version: u64,
    /// Rego text.
    pub body: String,
    /// Unix ms.
    pub created_at: u64,
    /// Admin identity.
    pub created_by: String,
}

/// An audit entry to write.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    /// Who (admin `sub` @ key name).
    pub actor: String,
    /// Their role.
    pub role: String,
    /// What (e.g. `resource.put`).
    pub action: String,
    /// On what (e.g. the resource path).
    pub target: String,
    /// `ok`, `denied`, `error`.
    pub outcome: String,
    /// Free text (never secret material).
    pub detail: String,
}

/// A stored audit record.
#[derive(Clone, Debug, Serialize)]
pub struct AuditRecord {
    /// Monotonic id.
    pub id: i64,
    /// Unix ms.
    pub at: u64,
    /// Who.
    pub actor: String,
    /// Their role.
    pub role: String,
    /// What.
    pub action: String,
    /// On what.
    pub target: String,
    /// Outcome.
    pub outcome: String,
    /// Detail.
    pub detail: String,
}

/// Filter and page for audit queries.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    /// Only this action (exact) or prefix when it ends with `*`.
    pub action: Option<String>,
    /// Only this actor.
    pub actor: Option<String>,
    /// Only records with id < before (paging backwards).
    pub before: Option<i64>,
    /// Page size.
    pub limit: u32,
}

/// Resources and their versions (plaintext sealed under the KEK at rest).
#[async_trait]
pub trait ResourceStore: Send + Sync + 'static {
    /// Store a new version of a resource; returns its version number.
    async fn put_resource(
        &self,
        path: &ResourcePath,
        data: &[u8],
        actor: &str,
    ) -> Result<u64, StoreError>;
    /// The latest live version, or a given one; `None` when absent or deleted.
    async fn get_resource(
        &self,
        path: &ResourcePath,
        version: Option<u64>,
    ) -> Result<Option<ResourceVersion>, StoreError>;
    /// All versions of a path, oldest first.
    async fn list_versions(&self, path: &ResourcePath) -> Result<Vec<VersionInfo>, StoreError>;
    /// Delete a resource (all versions' plaintext is erased; numbering continues). False if absent.
    async fn delete_resource(&self, path: &ResourcePath, actor: &str) -> Result<bool, StoreError>;
}

/// Named, versioned policies (the resource policy).
#[async_trait]
pub trait PolicyStore: Send + Sync + 'static {
    /// The current version of a named policy.
    async fn get_policy(&self, name: &str) -> Result<Option<StoredPolicy>, StoreError>;
    /// Store a new version of a named policy; returns its version.
    async fn set_policy(&self, name: &str, body: &str, actor: &str) -> Result<u64, StoreError>;
}

/// The audit log.
#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Append to the audit log.
    async fn audit(&self, entry: AuditEntry) -> Result<(), StoreError>;
    /// Read the audit log, newest first.
    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;
}

/// Plugins' key-value namespaces (values sealed under the KEK at rest).
#[async_trait]
pub trait KvStore: Send + Sync + 'static {
    /// Read a plugin's key.
    async fn kv_get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Write a plugin's key.
    async fn kv_put(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Delete a plugin's key; false if absent.
    async fn kv_delete(&self, namespace: &str, key: &str) -> Result<bool, StoreError>;
    /// Keys of a namespace with a prefix, sorted, at most `limit`.
    async fn kv_list(
        &self,
        namespace: &str,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// Everything the KBS stores. Parts of the KBS get only the narrow trait they need
/// (`Arc<dyn Store>` coerces to `Arc<dyn ResourceStore>` and the others).
#[async_trait]
pub trait Store:
    ResourceStore
    + PolicyStore
    + AuditStore
    + KvStore
    + RolloutStore
    + PluginStateStore
    + ReferenceValueStore
    + EventStore
    + FleetStore
    + ClusterStore
    + Send
    + Sync
    + 'static
{
    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
    /// The engine's name (`sqlite`, `postgres`), for `/readyz` and logs.
    fn engine(&self) -> &'static str;
    /// Changes other processes made to the stored state this process keeps in memory
    /// (see [`Change`]); nothing for an engine only this process writes.
    fn changes(&self) -> ChangeFeed;
}

/// A storage engine, chosen by the database URL's scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// `sqlite:` (a file in the data directory by default).
    Sqlite,
    /// `postgres://` or `postgresql://`.
    Postgres,
}

impl Engine {
    /// The engine `url` names, or why none.
    pub fn of(url: &str) -> Result<Self, StoreError> {
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            _ => Err(StoreError::UnsupportedUrl(format!(
                "database URL {} names no supported engine: use sqlite:<path>, postgres://... or postgresql://...",
                redact_url(url)
            ))),
        }
    }
}

/// Opens the store `url` names (running its migrations); the KEK seals secrets at rest.
pub async fn open(url: &str, kek: Arc<KeyEncryptionKey>) -> Result<Arc<dyn Store>, StoreError> {
    open_with(url, kek, &PoolSettings::default()).await
}

/// [`open`] with the PostgreSQL pool's `settings` (SQLite has no pool to set).
pub async fn open_with(
    url: &str,
    kek: Arc<KeyEncryptionKey>,
    settings: &PoolSettings,
) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match Engine::of(url)? {
        Engine::Sqlite => Arc::new(SqliteStore::open(url, kek).await?),
        Engine::Postgres => Arc::new(PostgresStore::open_with(url, kek, settings).await?),
    })
}

/// The database file an `sqlite:` URL names (`None` for another engine or a database in
/// memory): one process's own, which the composition root locks for as long as it serves.
pub fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    if Engine::of(url).ok()? != Engine::Sqlite
        || url.contains(":memory:")
        || url.contains("mode=memory")
    {
        return None;
    }
    let opts = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(url).ok()?;
    Some(opts.get_filename().to_path_buf())
}

/// `url` fit for a log line or an error message: a password in it (userinfo, or a
/// `password=` query parameter) is replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let authority_end = out[rest..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@') {
            let userinfo = &out[rest..rest + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest + colon + 1..rest + at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

/// An `audit` row (`id, at, actor, role, action, target, outcome, detail`) of either engine.
fn audit_row<R>(r: &R) -> Result<AuditRecord, StoreError>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'a> i64: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> String: Decode<'a, R::Database> + Type<R::Database>,
{
    Ok(AuditRecord {
        id: r.try_get(0)?,
        at: r.try_get::<i64, _>(1)? as u64,
        actor: r.try_get(2)?,
        role: r.try_get(3)?,
        action: r.try_get(4)?,
        target: r.try_get(5)?,
        outcome: r.try_get(6)?,
        detail: r.try_get(7)?,
    })
}

/// Unix time in milliseconds.
/// Whether a statement built for `len` rows (or list items) of a batch cut into `chunk`-sized
/// pieces is worth keeping prepared on its connection. A full chunk has one shape and comes
/// back all the time; every shorter remainder is a statement of its own, and a multi-row
/// statement compiles to a large program (a 256-row insert, a few hundred KiB in SQLite).
/// Keeping one per remainder size grew the KBS by about 500 bytes per rollout target
/// (`examples/soak.rs`), up to the driver's cache of 100 statements per connection.
fn keep_prepared(len: usize, chunk: usize) -> bool {
    len == chunk
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a resource version's seal is bound to (the same under every engine, so a database
/// moved between engines still opens).
fn resource_context(path: &ResourcePath) -> Vec<u8> {
    format!("tether/resource/{path}").into_bytes()
}

/// What a plugin value's seal is bound to.
fn kv_context(namespace: &str, key: &str) -> Vec<u8> {
    format!("tether/kv/{namespace}/{key}").into_bytes()
}

/// Opens a stored plugin value (12-byte nonce, then the ciphertext).
fn open_kv(
    kek: &KeyEncryptionKey,
    namespace: &str,
    key: &str,
    sealed: &[u8],
) -> Result<Vec<u8>, StoreError> {
    if sealed.len() < 12 {
        return Err(StoreError::Crypto("truncated plugin value".into()));
    }
    let (nonce, ct) = sealed.split_at(12);
    Ok(kek.open(&kv_context(namespace, key), nonce, ct)?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_sqlite_file_is_an_sqlite_file() {
        assert_eq!(
            sqlite_file("sqlite:///var/lib/tether/tether.db"),
            Some(std::path::PathBuf::from("/var/lib/tether/tether.db"))
        );
        assert_eq!(
            sqlite_file("sqlite://data/t.db?mode=rwc"),
            Some(std::path::PathBuf::from("data/t.db"))
        );
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("postgres://u@h/db"), None);
        assert_eq!(sqlite_file("mysql://h/db"), None);
    }

    #[test]
    fn the_scheme_picks_the_engine() {
        assert_eq!(Engine::of("sqlite:///var/t.db").unwrap(), Engine::Sqlite);
        assert_eq!(Engine::of("sqlite::memory:").unwrap(), Engine::Sqlite);
        assert_eq!(Engine::of("postgres://h/db").unwrap(), Engine::Postgres);
        assert_eq!(Engine::of("PostgreSQL://h/db").unwrap(), Engine::Postgres);
        let e = Engine::of("mysql://u:hunter2@h/db")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mysql://u:***@h/db"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        assert!(Engine::of("/var/t.db").is_err());
    }

    #[test]
    fn passwords_never_leave_a_url() {
        for (url, shown) in [
            (
                "postgres://tether:s3cr%40t@db:5432/tether",
                "postgres://tether:***@db:5432/tether",
            ),
            ("postgres://tether@db/tether", "postgres://tether@db/tether"),
            (
                "postgresql://db/tether?user=t&password=s3cr3t&sslmode=require",
                "postgresql://db/tether?user=t&password=***&sslmode=require",
            ),
            ("postgres://u:p@ss@db/x", "postgres://u:***@db/x"),
            ("sqlite:///data/tether.db", "sqlite:///data/tether.db"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
    }
}
