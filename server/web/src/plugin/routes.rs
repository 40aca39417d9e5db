//! Admin endpoints of the framework: `GET /kbs/v0/plugin`, `POST /kbs/v0/plugin/enable/<name>`,
//! `POST /kbs/v0/plugin/disable/<name>`, `POST /kbs/v0/plugin/configure/<name>` (run-time
//! settings, a JSON object). Admin-only and audited; effective at once. `<name>` may be
//! `<family>/<member>` (`external/echo`).

use std::sync::Arc;

use axum::extract::{FromRef, Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use kbs_core::audit::Audit;
use serde_json::{Value, json};

use super::{PluginInfo, PluginRegistry};
use crate::admin_auth::AdminIdentity;
use crate::admin_gate::AdminGate;
use crate::error::ApiError;
use crate::extract::{AdminCaller, ApiJson};

/// The three routes, for any state that hands out the registry, the admin gate and audit.
pub fn routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    Arc<PluginRegistry>: FromRef<S>,
    Arc<AdminGate>: FromRef<S>,
    Audit: FromRef<S>,
{
    Router::new()
        .route("/kbs/v0/plugin", get(list))
        .route("/kbs/v0/plugin/enable/{*name}", post(enable))
        .route("/kbs/v0/plugin/disable/{*name}", post(disable))
        .route("/kbs/v0/plugin/configure/{*name}", post(configure))
}

/// `GET /kbs/v0/plugin`: `{"plugins": [{name, kind, kinds, enabled, version}]}`.
async fn list(
    State(plugins): State<Arc<PluginRegistry>>,
    AdminCaller(_admin): AdminCaller,
) -> Json<Value> {
    let plugins: Vec<PluginInfo> = plugins.list();
    Json(json!({ "plugins": plugins }))
}

/// `POST /kbs/v0/plugin/enable/<name>`.
async fn enable(
    State(plugins): State<Arc<PluginRegistry>>,
    State(audit): State<Audit>,
    AdminCaller(admin): AdminCaller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set(&plugins, &audit, admin, name, true).await
}

/// `POST /kbs/v0/plugin/disable/<name>`.
async fn disable(
    State(plugins): State<Arc<PluginRegistry>>,
    State(audit): State<Audit>,
    AdminCaller(admin): AdminCaller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set(&plugins, &audit, admin, name, false).await
}

/// `POST /kbs/v0/plugin/configure/<name>`: `{"name", "settings"}` (as now in force).
async fn configure(
    State(plugins): State<Arc<PluginRegistry>>,
    State(audit): State<Audit>,
    AdminCaller(admin): AdminCaller,
    Path(name): Path<String>,
    ApiJson(settings): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    const ACTION: &str = "plugin.configure";
    match plugins.configure(&name, settings).await {
        Ok(now) => {
            admin
                .audit(&audit, ACTION, &name, "ok", now.to_string())
                .await;
            Ok(Json(json!({"name": name, "settings": now})))
        }
        Err(err) => {
            admin
                .audit(&audit, ACTION, &name, "error", err.detail.clone())
                .await;
            Err(err)
        }
    }
}

async fn set(
    plugins: &PluginRegistry,
    audit: &Audit,
    admin: AdminIdentity,
    name: String,
    enabled: bool,
) -> Result<Json<Value>, ApiError> {
    let action = if enabled {
        "plugin.enable"
    } else {
        "plugin.disable"
    };
    match plugins.set_enabled(&name, enabled, &admin.actor()).await {
        Ok(changed) => {
            let detail = if changed { "changed" } else { "unchanged" };
            admin
                .audit(audit, action, &name, "ok", detail.to_string())
                .await;
            Ok(Json(
                json!({"name": name, "enabled": enabled, "changed": changed}),
            ))
        }
        Err(e) => {
            let err = ApiError::from(e);
            admin
                .audit(audit, action, &name, "error", err.detail.clone())
                .await;
            Err(err)
        }
    }
}
