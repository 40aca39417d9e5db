//! The resource plugin (client-request and admin): `GET /kbs/v0/resource/<repo>/<type>/<tag>`
//! for attested guests (policy-gated, JWE-sealed to the caller's TEE key), and the admin
//! `POST` (new version) and `DELETE` on the same path.

mod handlers;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use kbs_core::storage::ResourceStore;
use kbs_web::plugin::{Plugin, PluginContext, PluginKind};

/// The plugin's name (URL segment).
pub const NAME: &str = "resource";

/// The built-in resource plugin.
pub struct ResourcePlugin {
    resources: Arc<dyn ResourceStore>,
}

impl std::fmt::Debug for ResourcePlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourcePlugin").finish_non_exhaustive()
    }
}

impl ResourcePlugin {
    /// Serves and stores resources in `resources`.
    pub fn new(resources: Arc<dyn ResourceStore>) -> Self {
        Self { resources }
    }
}

impl Plugin for ResourcePlugin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn kind(&self) -> PluginKind {
        PluginKind::ClientRequest
    }

    fn kinds(&self) -> Vec<PluginKind> {
        vec![PluginKind::ClientRequest, PluginKind::Admin]
    }

    fn routes(&self, ctx: PluginContext) -> Router {
        let state = handlers::ResourceApi {
            ctx,
            resources: self.resources.clone(),
        };
        Router::new()
            .route(
                "/{repo}/{kind}/{tag}",
                get(handlers::get)
                    .post(handlers::put)
                    .delete(handlers::delete),
            )
            .with_state(state)
    }
}

#[cfg(test)]
mod layering_tests {
    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        layering::assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
