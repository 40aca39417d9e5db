//! The appraisal of evidence, administered: reference values
//! (`GET /kbs/v0/admin/reference-values`, `PUT|DELETE /kbs/v0/admin/reference-values/{name}`)
//! and the appraisal policy (`GET|POST /kbs/v0/admin/appraisal-policy`, Rego in base64url like
//! the resource policy). Each change is stored, then put in force, then audited.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kbs_core::appraisal::{Appraiser, KNOWN_REFERENCE_VALUES, normalize};
use kbs_core::audit::Audit;
use kbs_core::storage::{PolicyStore, ReferenceValueStore};
use kbs_web::error::ApiError;
use kbs_web::extract::{AdminCaller, ApiJson};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::attestation::{APPRAISAL_POLICY, reference_map};
use crate::http::policy::SetPolicy;

/// What the appraisal endpoints use.
#[derive(Clone)]
pub struct AppraisalAdmin {
    /// The appraiser the RCAR service uses.
    pub appraiser: Arc<Appraiser>,
    /// Stored reference values.
    pub reference: Arc<dyn ReferenceValueStore>,
    /// Stored policy versions.
    pub policies: Arc<dyn PolicyStore>,
    /// Serialises changes so the stored order and the order put in force agree.
    pub write: Arc<tokio::sync::Mutex<()>>,
}

/// Body of `PUT /kbs/v0/admin/reference-values/{name}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetReferenceValue {
    /// Accepted values (replacing the ones set before).
    values: Vec<String>,
}

/// `GET /kbs/v0/admin/reference-values`: `{"reference_values": [...], "known": {...}}`.
pub async fn list(
    State(admin): State<AppraisalAdmin>,
    AdminCaller(_caller): AdminCaller,
) -> Result<Json<Value>, ApiError> {
    let values = admin.reference.reference_values().await?;
    let known: serde_json::Map<String, Value> = KNOWN_REFERENCE_VALUES
        .iter()
        .map(|(name, what)| ((*name).to_owned(), json!(what)))
        .collect();
    Ok(Json(json!({"reference_values": values, "known": known})))
}

/// `PUT /kbs/v0/admin/reference-values/{name}`: checked and normalized (a malformed
/// measurement is a 400 naming it), stored, in force for the next attestation.
pub async fn set(
    State(admin): State<AppraisalAdmin>,
    State(audit): State<Audit>,
    AdminCaller(caller): AdminCaller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<SetReferenceValue>,
) -> Result<Json<Value>, ApiError> {
    let values = normalize(&name, &req.values)
        .map_err(|e| ApiError::bad_request("InvalidReferenceValue", e.to_string()))?;
    let _guard = admin.write.lock().await;
    let stored = admin
        .reference
        .set_reference_value(&name, &values, &caller.actor())
        .await?;
    admin
        .appraiser
        .set_reference_values(reference_map(admin.reference.as_ref()).await?)?;
    caller
        .audit(
            &audit,
            "reference_value.set",
            &name,
            "ok",
            values.join(", "),
        )
        .await;
    Ok(Json(json!(stored)))
}

/// `DELETE /kbs/v0/admin/reference-values/{name}`.
pub async fn delete(
    State(admin): State<AppraisalAdmin>,
    State(audit): State<Audit>,
    AdminCaller(caller): AdminCaller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let _guard = admin.write.lock().await;
    if !admin.reference.delete_reference_value(&name).await? {
        return Err(ApiError::not_found(
            "NotFound",
            format!("no reference value named {name:?}"),
        ));
    }
    admin
        .appraiser
        .set_reference_values(reference_map(admin.reference.as_ref()).await?)?;
    caller
        .audit(&audit, "reference_value.delete", &name, "ok", String::new())
        .await;
    Ok(Json(json!({"deleted": name})))
}

/// `POST /kbs/v0/admin/appraisal-policy`: compile (a bad policy is a 400 and the old one
/// stays), store, put in force.
pub async fn set_policy(
    State(admin): State<AppraisalAdmin>,
    State(audit): State<Audit>,
    AdminCaller(caller): AdminCaller,
    ApiJson(req): ApiJson<SetPolicy>,
) -> Result<Json<Value>, ApiError> {
    let text = req.text()?;
    let _guard = admin.write.lock().await;
    Appraiser::check(&text)?;
    let version = admin
        .policies
        .set_policy(APPRAISAL_POLICY, &text, &caller.actor())
        .await?;
    admin.appraiser.set_policy(&text)?;
    caller
        .audit(
            &audit,
            "appraisal_policy.set",
            APPRAISAL_POLICY,
            "ok",
            format!("version {version}"),
        )
        .await;
    Ok(Json(json!({"version": version})))
}

/// `GET /kbs/v0/admin/appraisal-policy`: `{"policy": base64url(rego), "version": n}`
/// (version 0: the built-in or initial policy, never stored).
pub async fn get_policy(
    State(admin): State<AppraisalAdmin>,
    AdminCaller(_caller): AdminCaller,
) -> Result<Json<Value>, ApiError> {
    let (version, text) = match admin.policies.get_policy(APPRAISAL_POLICY).await? {
        Some(p) => (p.version, p.body),
        None => (0, admin.appraiser.source().1),
    };
    Ok(Json(
        json!({"policy": URL_SAFE_NO_PAD.encode(text.as_bytes()), "version": version}),
    ))
}
