//! `POST` and `GET /kbs/v0/resource-policy`: the resource policy (Rego, base64url).

use axum::Json;
use axum::extract::State;
use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use serde::Deserialize;
use serde_json::{Value, json};

use std::sync::Arc;

use kbs_core::audit::Audit;
use kbs_core::policy::PolicyEngine;
use kbs_core::policy_gate::PolicyGate;
use kbs_core::storage::PolicyStore;
use kbs_web::error::ApiError;
use kbs_web::extract::{AdminCaller, ApiJson};

/// What the policy endpoints (and the dashboard) use.
#[derive(Clone)]
pub struct PolicyAdmin {
    /// Stored policy versions.
    pub store: Arc<dyn PolicyStore>,
    /// The policy in force.
    pub gate: PolicyGate,
    /// Serialises policy updates so storage order and swap order agree.
    pub write: Arc<tokio::sync::Mutex<()>>,
}

impl PolicyAdmin {
    /// The stored version and text of the resource policy (version 0: the built-in or
    /// initial policy, never stored).
    pub async fn current(&self) -> Result<(u64, String), ApiError> {
        Ok(match self.store.get_policy(RESOURCE_POLICY).await? {
            Some(p) => (p.version, p.body),
            None => (0, self.gate.engine().source().1),
        })
    }
}

/// Upstream body of `POST /kbs/v0/resource-policy` (and of the appraisal policy's POST).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPolicy {
    /// base64url (no padding; padding tolerated) of the Rego text.
    policy: String,
}

impl SetPolicy {
    /// The Rego text: 400 `MalformedRequest` if it is not base64url of UTF-8.
    pub fn text(&self) -> Result<String, ApiError> {
        let raw = URL_SAFE_NO_PAD
            .decode(self.policy.trim())
            .or_else(|_| URL_SAFE.decode(self.policy.trim()))
            .map_err(|e| {
                ApiError::bad_request(
                    "MalformedRequest",
                    format!("`policy` is not base64url: {e}"),
                )
            })?;
        String::from_utf8(raw)
            .map_err(|_| ApiError::bad_request("MalformedRequest", "`policy` is not UTF-8 text"))
    }
}

/// Name under which the resource policy is stored.
pub const RESOURCE_POLICY: &str = "resource";

/// `POST /kbs/v0/resource-policy`: compile, then store and swap. A bad policy is a 400 and
/// the old one stays in force.
pub async fn set_policy(
    State(policy): State<PolicyAdmin>,
    State(audit): State<Audit>,
    AdminCaller(admin): AdminCaller,
    ApiJson(req): ApiJson<SetPolicy>,
) -> Result<Json<Value>, ApiError> {
    let text = req.text()?;
    // Compile first (a failure leaves everything as it was), then persist, then swap; the
    // lock keeps the stored order and the swap order the same under concurrent updates.
    let _guard = policy.write.lock().await;
    PolicyEngine::new(&text).inspect_err(|e| {
        tracing::warn!(admin = %admin.actor(), error = %e, "policy rejected");
    })?;
    let version = policy
        .store
        .set_policy(RESOURCE_POLICY, &text, &admin.actor())
        .await?;
    policy.gate.engine().set(&text)?;
    admin
        .audit(
            &audit,
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
    State(policy): State<PolicyAdmin>,
    AdminCaller(_admin): AdminCaller,
) -> Result<Json<Value>, ApiError> {
    let (version, text) = policy.current().await?;
    Ok(Json(
        json!({"policy": URL_SAFE_NO_PAD.encode(text.as_bytes()), "version": version}),
    ))
}
