//! `GET /kbs/v0/resource/<repo>/<type>/<tag>` for attested guests (policy-gated, JWE-sealed),
//! and the admin side: upload a new version (`POST`), delete (`DELETE`), list versions.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use serde_json::{Value, json};

use super::{AdminCaller, ApiBytes, Attested};
use crate::app::AppState;
use crate::error::ApiError;
use crate::resource_path::ResourcePath;

fn parse_path(repo: &str, kind: &str, tag: &str) -> Result<ResourcePath, ApiError> {
    ResourcePath::new(repo, kind, tag).map_err(|e| ApiError::bad_request("InvalidResourcePath", e))
}

/// The policy check is the plugin framework's (every plugin is gated the same way).
pub use crate::plugins::check_policy;

/// Attested GET: the latest version, sealed to the caller's TEE key.
pub async fn get(
    State(state): State<AppState>,
    Attested(token): Attested,
    Path((repo, kind, tag)): Path<(String, String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<kbs_types::Response>, ApiError> {
    let path = parse_path(&repo, &kind, &tag)?;
    check_policy(&state, &token.claims, "resource", Some(&path), &query)?;
    let resource = state
        .store
        .get_resource(&path, None)
        .await?
        .ok_or_else(|| ApiError::not_found("ResourceNotFound", format!("no resource at {path}")))?;
    let sealed = crate::jwe::seal(&token.tee_pubkey, &resource.data)?;
    tracing::info!(guest_id = %token.identity.guest_id, %path, version = resource.version, "resource released");
    Ok(Json(sealed))
}

/// Admin POST: store the raw body as a new version.
pub async fn put(
    State(state): State<AppState>,
    AdminCaller(admin): AdminCaller,
    Path((repo, kind, tag)): Path<(String, String, String)>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Value>, ApiError> {
    let path = parse_path(&repo, &kind, &tag)?;
    let version = state
        .store
        .put_resource(&path, &body, &admin.actor())
        .await?;
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body));
    state
        .audit(
            &admin,
            "resource.put",
            &path.to_string(),
            "ok",
            format!("version {version}, {} bytes", body.len()),
        )
        .await;
    Ok(Json(
        json!({"path": path.to_string(), "version": version, "sha256": sha}),
    ))
}

/// Admin DELETE: erase the resource; later GETs answer 404.
pub async fn delete(
    State(state): State<AppState>,
    AdminCaller(admin): AdminCaller,
    Path((repo, kind, tag)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let path = parse_path(&repo, &kind, &tag)?;
    if !state.store.delete_resource(&path, &admin.actor()).await? {
        return Err(ApiError::not_found(
            "ResourceNotFound",
            format!("no resource at {path}"),
        ));
    }
    state
        .audit(
            &admin,
            "resource.delete",
            &path.to_string(),
            "ok",
            String::new(),
        )
        .await;
    Ok(Json(json!({"path": path.to_string(), "deleted": true})))
}

/// Admin GET: the versions of a resource (metadata only).
pub async fn versions(
    State(state): State<AppState>,
    AdminCaller(_admin): AdminCaller,
    Path((repo, kind, tag)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let path = parse_path(&repo, &kind, &tag)?;
    let versions = state.store.list_versions(&path).await?;
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
