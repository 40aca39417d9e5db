//! Reference values (table `reference_values`, migration 0006): what the appraisal policy
//! expects of evidence, by name. Not secret (measurements, minimum SVNs, switches).

use async_trait::async_trait;
use serde::Serialize;
use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{SqliteStore, StoreError, now_ms};

/// One name and its accepted values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReferenceValue {
    /// Name (`mr_td`, `snp_min_snp`, ...).
    pub name: String,
    /// Accepted values.
    pub values: Vec<String>,
    /// Unix ms of the last change.
    pub updated_at: u64,
    /// Admin identity that made it.
    pub updated_by: String,
}

/// Persistence of reference values.
#[async_trait]
pub trait ReferenceValueStore: Send + Sync + 'static {
    /// Every reference value, by name.
    async fn reference_values(&self) -> Result<Vec<ReferenceValue>, StoreError>;
    /// Sets (replaces) the values of `name`.
    async fn set_reference_value(
        &self,
        name: &str,
        values: &[String],
        actor: &str,
    ) -> Result<ReferenceValue, StoreError>;
    /// Removes `name`; false if it was not set.
    async fn delete_reference_value(&self, name: &str) -> Result<bool, StoreError>;
}

#[async_trait]
impl ReferenceValueStore for SqliteStore {
    async fn reference_values(&self) -> Result<Vec<ReferenceValue>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, vals, updated_at, updated_by FROM reference_values ORDER BY name",
        )
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(|r| reference_value_row(&r)).collect()
    }

    async fn set_reference_value(
        &self,
        name: &str,
        values: &[String],
        actor: &str,
    ) -> Result<ReferenceValue, StoreError> {
        let text = serde_json::to_string(values)
            .map_err(|e| StoreError::Corrupt(format!("reference value {name}: {e}")))?;
        let at = now_ms();
        sqlx::query(
            "INSERT INTO reference_values (name, vals, updated_at, updated_by) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET vals = excluded.vals,
                 updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(name)
        .bind(text)
        .bind(at as i64)
        .bind(actor)
        .execute(self.pool())
        .await?;
        Ok(ReferenceValue {
            name: name.to_owned(),
            values: values.to_vec(),
            updated_at: at,
            updated_by: actor.to_owned(),
        })
    }

    async fn delete_reference_value(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM reference_values WHERE name = ?1")
            .bind(name)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// A `reference_values` row (`name, vals, updated_at, updated_by`) of either engine.
pub(super) fn reference_value_row<R>(r: &R) -> Result<ReferenceValue, StoreError>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'a> i64: Decode<'a, R::Database> + Type<R::Database>,
    for<'a> String: Decode<'a, R::Database> + Type<R::Database>,
{
    let name: String = r.try_get(0)?;
    let text: String = r.try_get(1)?;
    let values: Vec<String> = serde_json::from_str(&text)
        .map_err(|e| StoreError::Corrupt(format!("reference value {name}: {e}")))?;
    Ok(ReferenceValue {
        name,
        values,
        updated_at: r.try_get::<i64, _>(2)? as u64,
        updated_by: r.try_get(3)?,
    })
}
