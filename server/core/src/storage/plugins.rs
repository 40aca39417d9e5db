//! Plugin enable/disable state (table `plugin_state`, migration 0002). Plugin data itself
//! lives in the namespaced, encrypted `plugin_kv` table of the core [`Store`](super::Store).

use async_trait::async_trait;
use serde::Serialize;
use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{SqliteStore, StoreError, now_ms};

/// A stored enable/disable decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PluginStateRow {
    /// Plugin name.
    pub name: String,
    /// Whether it is enabled.
    pub enabled: bool,
    /// Unix ms of the last change.
    pub updated_at: u64,
    /// Admin identity that made it.
    pub updated_by: String,
}

/// Persistence of plugin enable/disable decisions.
#[async_trait]
pub trait PluginStateStore: Send + Sync + 'static {
    /// Every stored decision.
    async fn plugin_states(&self) -> Result<Vec<PluginStateRow>, StoreError>;
    /// Record that `name` is now enabled or disabled.
    async fn set_plugin_enabled(
        &self,
        name: &str,
        enabled: bool,
        actor: &str,
    ) -> Result<(), StoreError>;
}

#[async_trait]
impl PluginStateStore for SqliteStore {
    async fn plugin_states(&self) -> Result<Vec<PluginStateRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, enabled, updated_at, updated_by FROM plugin_state ORDER BY name",
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(|r| plugin_state_row(&r)).collect()
    }

    async fn set_plugin_enabled(
        &self,
        name: &str,
        enabled: bool,
        actor: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO plugin_state (name, enabled, updated_at, updated_by) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET enabled = excluded.enabled,
                 updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(name)
        .bind(i64::from(enabled))
        .bind(now_ms() as i64)
        .bind(actor)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

/// A `plugin_state` row (`name, enabled, updated_at, updated_by`) of either engine.
pub(super) fn plugin_state_row<R>(r: &R) -> Result<PluginStateRow, StoreError>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'a> i64: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> String: Decode<'a, R::Database> + Type<R::Database>,
{
    Ok(PluginStateRow {
        name: r.try_get(0)?,
        enabled: r.try_get::<i64, _>(1)? != 0,
        updated_at: r.try_get::<i64, _>(2)? as u64,
        updated_by: r.try_get(3)?,
    })
}
