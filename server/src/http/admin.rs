//! Admin endpoints beyond resources: the resource policy and the audit log.

use axum::Json;
use axum::extract::{Query, State};
use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AdminCaller, ApiJson};
use crate::app::AppState;
use crate::error::ApiError;
use crate::storage::AuditQuery;

/// Upstream body of `POST /kbs/v0/resource-policy`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPolicy {
    /// base64url (no padding; padding tolerated) of the Rego text.
    policy: String,
}

/// Name under which the resource policy is stored.
pub const RESOURCE_POLICY: &str = "resource";

/// `POST /kbs/v0/resource-policy`: compile, then store and swap. A bad policy is a 400 and
/// the old one stays in force.
pub async fn set_policy(
    State(state): State<AppState>,
    AdminCaller(admin): AdminCaller,
    ApiJson(req): ApiJson<SetPolicy>,
) -> Result<Json<Value>, ApiError> {
    let raw = URL_SAFE_NO_PAD
        .decode(req.policy.trim())
        .or_else(|_| URL_SAFE.decode(req.policy.trim()))
        .map_err(|e| {
            ApiError::bad_request(
                "MalformedRequest",
                format!("`policy` is not base64url: {e}"),
            )
        })?;
    let text = String::from_utf8(raw)
        .map_err(|_| ApiError::bad_request("MalformedRequest", "`policy` is not UTF-8 text"))?;
    // Compile first (a failure leaves everything as it was), then persist, then swap; the
    // lock keeps the stored order and the swap order the same under concurrent updates.
    let _guard = state.policy_write.lock().await;
    crate::policy::PolicyEngine::new(&text).inspect_err(|e| {
        tracing::warn!(admin = %admin.actor(), error = %e, "policy rejected");
    })?;
    let version = state
        .store
        .set_policy(RESOURCE_POLICY, &text, &admin.actor())
        .await?;
    state.policy.set(&text)?;
    state
        .audit(
            &admin,
            "policy.set",
            RESOURCE_POLICY,
            "ok",
            format!("version {version}"),
        )
        .await;
    Ok(Json(json!({"version": version})))
}

/// `GET /kbs/v0/resource-policy`: `{"policy": base64url(rego), "version": n}`.
pub async fn get_policy(
    State(state): State<AppState>,
    AdminCaller(_admin): AdminCaller,
) -> Result<Json<Value>, ApiError> {
    let stored = state.store.get_policy(RESOURCE_POLICY).await?;
    let (version, text) = match stored {
        Some(p) => (p.version, p.body),
        None => (0, state.policy.source().1),
    };
    Ok(Json(
        json!({"policy": URL_SAFE_NO_PAD.encode(text.as_bytes()), "version": version}),
    ))
}

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
    State(state): State<AppState>,
    AdminCaller(_admin): AdminCaller,
    Query(p): Query<AuditParams>,
) -> Result<Json<Value>, ApiError> {
    let q = AuditQuery {
        action: p.action,
        actor: p.actor,
        before: p.before,
        limit: p.limit.unwrap_or(100).clamp(1, 1000),
    };
    let records = state.store.list_audit(&q).await?;
    let next = records
        .last()
        .map(|r| r.id)
        .filter(|_| records.len() as u32 == q.limit);
    Ok(Json(json!({"records": records, "next_before": next})))
}
