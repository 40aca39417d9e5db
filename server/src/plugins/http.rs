//! Admin endpoints of the framework: `GET /kbs/v0/plugin`, `POST /kbs/v0/plugin/enable/<name>`,
//! `POST /kbs/v0/plugin/disable/<name>`. Admin-only and audited; effective at once.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::PluginInfo;
use crate::app::AppState;
use crate::error::ApiError;
use crate::http::AdminCaller;

/// `GET /kbs/v0/plugin`: `{"plugins": [{name, kind, kinds, enabled, version}]}`.
pub async fn list(State(state): State<AppState>, AdminCaller(_admin): AdminCaller) -> Json<Value> {
    let plugins: Vec<PluginInfo> = state.plugins.list();
    Json(json!({ "plugins": plugins }))
}

/// `POST /kbs/v0/plugin/enable/<name>`.
pub async fn enable(
    State(state): State<AppState>,
    AdminCaller(admin): AdminCaller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set(state, admin, name, true).await
}

/// `POST /kbs/v0/plugin/disable/<name>`.
pub async fn disable(
    State(state): State<AppState>,
    AdminCaller(admin): AdminCaller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set(state, admin, name, false).await
}

async fn set(
    state: AppState,
    admin: crate::admin::auth::AdminIdentity,
    name: String,
    enabled: bool,
) -> Result<Json<Value>, ApiError> {
    let action = if enabled {
        "plugin.enable"
    } else {
        "plugin.disable"
    };
    match state
        .plugins
        .set_enabled(&state, &name, enabled, &admin.actor())
        .await
    {
        Ok(changed) => {
            let detail = if changed { "changed" } else { "unchanged" };
            state
                .audit(&admin, action, &name, "ok", detail.to_string())
                .await;
            Ok(Json(
                json!({"name": name, "enabled": enabled, "changed": changed}),
            ))
        }
        Err(e) => {
            let err = ApiError::from(e);
            state
                .audit(&admin, action, &name, "error", err.detail.clone())
                .await;
            Err(err)
        }
    }
}
