//! Storage: one [`Store`] trait for everything the KBS keeps, with SQLite as the embedded
//! default. Callers only see the trait, so a PostgreSQL implementation can follow unchanged.

mod events;
mod fleet;
mod kek;
pub mod latest_cache;
mod plugins;
mod reference_values;
mod rotation;
mod sqlite;

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Serialize;
use zeroize::Zeroizing;

pub use events::{EventQuery, EventRecord, EventStore, NewEvent};
pub use fleet::FleetStore;
pub use kek::KeyEncryptionKey;
pub use plugins::{PluginStateRow, PluginStateStore};
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
    + Send
    + Sync
    + 'static
{
    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
