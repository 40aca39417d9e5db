//! `GET /kbs/v0/admin/audit`: the audit log, newest first, paged backwards.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use kbs_core::storage::{AuditQuery, AuditStore};
use kbs_web::error::ApiError;
use kbs_web::extract::AdminCaller;
use serde::Deserialize;
use serde_json::{Value, json};

/// Query of `GET /kbs/v0/admin/audit`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    action: Option<String>,
    actor: Option<String>,
    before: Option<i64>,
    limit: Option<u32>,
}

/// `GET /kbs/v0/admin/audit?action=resource.*&limit=50&before=<id>`: newest first.
pub async fn audit(
    State(log): State<Arc<dyn AuditStore>>,
    AdminCaller(_admin): AdminCaller,
    Query(p): Query<AuditParams>,
) -> Result<Json<Value>, ApiError> {
    let q = AuditQuery {
        action: p.action,
        actor: p.actor,
        before: p.before,
        limit: p.limit.unwrap_or(100).clamp(1, 1000),
    };
    let records = log.list_audit(&q).await?;
    let next = records
        .last()
        .map(|r| r.id)
        .filter(|_| records.len() as u32 == q.limit);
    Ok(Json(json!({"records": records, "next_before": next})))
}
