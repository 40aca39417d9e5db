//! The resource plugin's handlers: the attested GET and the admin POST and DELETE.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRef, Path, Query, State};
use kbs_core::attest::RcarService;
use kbs_core::resource_path::ResourcePath;
use kbs_core::storage::ResourceStore;
use kbs_web::admin_gate::AdminGate;
use kbs_web::error::ApiError;
use kbs_web::extract::{AdminCaller, ApiBytes, Attested};
use kbs_web::plugin::PluginContext;
use serde_json::{Value, json};

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct ResourceApi {
    pub(crate) ctx: PluginContext,
    pub(crate) resources: Arc<dyn ResourceStore>,
}

impl FromRef<ResourceApi> for Arc<AdminGate> {
    fn from_ref(api: &ResourceApi) -> Self {
        Self::from_ref(&api.ctx)
    }
}

impl FromRef<ResourceApi> for Arc<RcarService> {
    fn from_ref(api: &ResourceApi) -> Self {
        Self::from_ref(&api.ctx)
    }
}

/// A resource path from URL segments (400 `InvalidResourcePath`).
pub fn parse_path(repo: &str, kind: &str, tag: &str) -> Result<ResourcePath, ApiError> {
    ResourcePath::new(repo, kind, tag).map_err(|e| ApiError::bad_request("InvalidResourcePath", e))
}

/// Attested GET: the latest version, sealed to the caller's TEE key.
pub(crate) async fn get(
    State(api): State<ResourceApi>,
    Attested(token): Attested,
    Path((repo, kind, tag)): Path<(String, String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<kbs_types::Response>, ApiError> {
    let path = parse_path(&repo, &kind, &tag)?;
    api.ctx.require_policy(&token.claims, Some(&path), &query)?;
    let resource = api
        .resources
        .get_resource(&path, None)
        .await?
        .ok_or_else(|| ApiError::not_found("ResourceNotFound", format!("no resource at {path}")))?;
    let sealed = kbs_core::jwe::seal(&token.tee_pubkey, &resource.data)?;
    tracing::info!(guest_id = %token.identity.guest_id, %path, version = resource.version, "resource released");
    Ok(Json(sealed))
}

/// Admin POST: store the raw body as a new version.
pub(crate) async fn put(
    State(api): State<ResourceApi>,
    AdminCaller(admin): AdminCaller,
    Path((repo, kind, tag)): Path<(String, String, String)>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Value>, ApiError> {
    let path = parse_path(&repo, &kind, &tag)?;
    let version = api
        .resources
        .put_resource(&path, &body, &admin.actor())
        .await?;
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body));
    api.ctx
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
pub(crate) async fn delete(
    State(api): State<ResourceApi>,
    AdminCaller(admin): AdminCaller,
    Path((repo, kind, tag)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let path = parse_path(&repo, &kind, &tag)?;
    if !api.resources.delete_resource(&path, &admin.actor()).await? {
        return Err(ApiError::not_found(
            "ResourceNotFound",
            format!("no resource at {path}"),
        ));
    }
    api.ctx
        .audit(
            &admin,
            "resource.delete",
            &path.to_string(),
            "ok",
            String::new(),
        )
        .await;
    // Whoever delivers versions of this path (rollouts) stops: they subscribe to the notice.
    api.ctx.notify_resource_deleted(&path, &admin);
    Ok(Json(json!({"path": path.to_string(), "deleted": true})))
}
