//! `GET /kbs/v0/admin/resources/<repo>/<type>/<tag>/versions`: the versions of a resource
//! (metadata only; the resource plugin serves and stores the versions themselves).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use kbs_core::resource_path::ResourcePath;
use kbs_core::storage::ResourceStore;
use kbs_web::error::ApiError;
use kbs_web::extract::AdminCaller;
use serde_json::{Value, json};

/// Admin GET: the versions of a resource, oldest first.
pub async fn versions(
    State(resources): State<Arc<dyn ResourceStore>>,
    AdminCaller(_admin): AdminCaller,
    Path((repo, kind, tag)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let path = ResourcePath::new(&repo, &kind, &tag)
        .map_err(|e| ApiError::bad_request("InvalidResourcePath", e))?;
    let versions = resources.list_versions(&path).await?;
    if versions.is_empty() {
        return Err(ApiError::not_found(
            "ResourceNotFound",
            format!("no resource at {path}"),
        ));
    }
    Ok(Json(
        json!({"path": path.to_string(), "versions": versions}),
    ))
}
