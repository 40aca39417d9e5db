//! The resource plugin (client-request): `GET /kbs/v0/resource/<repo>/<type>/<tag>` for
//! attested guests, and the admin `POST` / `DELETE` on the same path. The handlers live in
//! [`crate::http::resource`]; this plugin mounts them.

use axum::Router;
use axum::routing::get;

use super::{Plugin, PluginContext, PluginKind};
use crate::http::resource;

/// The built-in resource plugin.
#[derive(Debug, Default)]
pub struct ResourcePlugin;

impl Plugin for ResourcePlugin {
    fn name(&self) -> &'static str {
        "resource"
    }

    fn kind(&self) -> PluginKind {
        PluginKind::ClientRequest
    }

    fn kinds(&self) -> Vec<PluginKind> {
        vec![PluginKind::ClientRequest, PluginKind::Admin]
    }

    fn routes(&self, ctx: PluginContext) -> Router {
        Router::new()
            .route(
                "/{repo}/{kind}/{tag}",
                get(resource::get)
                    .post(resource::put)
                    .delete(resource::delete),
            )
            .with_state(ctx.core().clone())
    }
}
