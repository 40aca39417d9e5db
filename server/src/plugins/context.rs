//! [`PluginContext`]: what a plugin may use. Its fields are private to this module, so a
//! plugin reaches storage only through its own namespace ([`PluginKv`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, OriginalUri};
use axum::http::request::Parts;
use tokio_util::sync::CancellationToken;

use crate::admin::auth::AdminIdentity;
use crate::app::AppState;
use crate::config::Config;
use crate::error::ApiError;
use crate::guest_directory::GuestAttestation;
use crate::http::{AdminCaller, Attested};
use crate::metrics::Metrics;
use crate::resource_path::ResourcePath;
use crate::storage::{ResourceVersion, Store, StoreError};

/// A plugin's view of the KBS. Cheap to clone.
#[derive(Clone)]
pub struct PluginContext {
    name: &'static str,
    core: AppState,
}

impl std::fmt::Debug for PluginContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginContext")
            .field("plugin", &self.name)
            .finish_non_exhaustive()
    }
}

impl PluginContext {
    pub(crate) fn new(name: &'static str, core: AppState) -> Self {
        Self { name, core }
    }

    /// The plugin's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The plugin's own key-value namespace (encrypted at rest; no way to name another).
    pub fn kv(&self) -> PluginKv {
        PluginKv {
            namespace: self.name,
            store: self.core.store.clone(),
        }
    }

    /// Whether the plugin is enabled right now.
    pub fn is_enabled(&self) -> bool {
        self.core.plugins.is_enabled(self.name)
    }

    /// Live guest tunnels (server-request plugins call guests through it).
    pub fn hub(&self) -> &tunnel::Hub {
        &self.core.hub
    }

    /// The claims and TEE key of `guest_id`'s latest token (recorded when its tunnel
    /// opened or re-attested), with the identity they state.
    pub fn attested_guest(&self, guest_id: &str) -> Option<Arc<GuestAttestation>> {
        self.core.guest_directory.get(guest_id)
    }

    /// The resource policy, for this plugin: `data.plugin` is this plugin's name.
    pub fn check_policy(
        &self,
        claims: &crate::claims::Claims,
        path: Option<&ResourcePath>,
        query: &BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        super::check_policy(&self.core, claims, self.name, path, query)
    }

    /// Read a resource (latest live version, or a given one).
    pub async fn read_resource(
        &self,
        path: &ResourcePath,
        version: Option<u64>,
    ) -> Result<Option<ResourceVersion>, StoreError> {
        self.core.store.get_resource(path, version).await
    }

    /// Metrics registry (shared).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.core.metrics
    }

    /// The configuration in force (read-only).
    pub fn config(&self) -> &Arc<Config> {
        &self.core.config
    }

    /// Write an audit record for an admin action (`action` is prefixed by nothing: use
    /// `<plugin>.<verb>`).
    pub async fn audit(
        &self,
        admin: &AdminIdentity,
        action: &str,
        target: &str,
        outcome: &str,
        detail: String,
    ) {
        self.core
            .audit(admin, action, target, outcome, detail)
            .await;
    }

    /// Cancelled when the KBS begins to shut down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.core.shutdown
    }

    /// The whole core state, for built-in plugins that need core tables or services beyond
    /// the methods above (resource, rotation, probes). Never for a plugin's own state: that
    /// goes through [`kv`](Self::kv).
    pub(crate) fn core(&self) -> &AppState {
        &self.core
    }
}

/// A plugin's storage namespace in the core key-value table (values sealed with the KEK).
#[derive(Clone)]
pub struct PluginKv {
    namespace: &'static str,
    store: Arc<dyn Store>,
}

impl PluginKv {
    /// Read a key.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.kv_get(self.namespace, key).await
    }

    /// Write a key.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.store.kv_put(self.namespace, key, value).await
    }

    /// Delete a key; false if absent.
    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.store.kv_delete(self.namespace, key).await
    }

    /// Keys with `prefix`, sorted, at most `limit`.
    pub async fn list(
        &self,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.store.kv_list(self.namespace, prefix, limit).await
    }
}

/// The request path as the client sent it (nested plugin routers see a stripped URI).
pub(crate) fn original_path(parts: &Parts) -> String {
    parts
        .extensions
        .get::<OriginalUri>()
        .map(|u| u.path().to_string())
        .unwrap_or_else(|| parts.uri.path().to_string())
}

impl FromRequestParts<PluginContext> for Attested {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &PluginContext,
    ) -> Result<Self, Self::Rejection> {
        <Attested as FromRequestParts<AppState>>::from_request_parts(parts, &ctx.core).await
    }
}

impl FromRequestParts<PluginContext> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &PluginContext,
    ) -> Result<Self, Self::Rejection> {
        <AdminCaller as FromRequestParts<AppState>>::from_request_parts(parts, &ctx.core).await
    }
}
