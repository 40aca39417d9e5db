//! The plugin framework (upstream's three kinds, see `docs/architecture.md`):
//!
//! - client-request plugins answer attested guests under `/kbs/v0/<name>/...`;
//! - admin plugins answer admins (the [`AdminCaller`](crate::extract::AdminCaller) extractor);
//! - server-request plugins receive tunnel events and call guests through the [`tunnel::Hub`].
//!
//! A plugin may be several kinds at once (splitapi is all three). A plugin is built from a
//! [`PluginSpec`] (its name and a constructor that reads its own config section and
//! registers its own metrics), and gets a [`PluginContext`] of capabilities: its own storage
//! namespace, the hub, the guest directory, the policy as itself, audit and shutdown, never
//! another plugin's state nor the KBS's configuration. The [`PluginRegistry`] enables and
//! disables plugins at runtime: a disabled plugin's routes answer 404, it gets no events and
//! its background task is stopped; the decision is stored and restored at start.

mod context;
mod pusher;
mod registry;
pub mod routes;
mod spec;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use context::{PluginContext, PluginKv, PluginServices};
pub use pusher::CredentialPusher;
pub use registry::{PluginInfo, PluginRegistry, RegistryError};
pub use spec::{PluginSetup, PluginSetupError, PluginSpec};

/// What a plugin does (upstream's three kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    /// Answers attested guests under `/kbs/v0/<name>/...`.
    ClientRequest,
    /// Answers admins (admin JWT and role rules).
    Admin,
    /// Receives tunnel events and calls guests through the hub.
    ServerRequest,
}

/// Names that are core endpoints under `/kbs/v0/` and can never be plugin names.
pub const RESERVED_NAMES: &[&str] = &[
    "auth",
    "attest",
    "admin",
    "plugin",
    "resource-policy",
    "tunnel",
];

/// A KBS plugin. Implementations are built once at start and live for the whole process;
/// enabling and disabling only gates them.
#[async_trait]
pub trait Plugin: Send + Sync + 'static {
    /// URL segment and storage namespace: `/kbs/v0/<name>/...`. `[a-z0-9-]+`, or
    /// `<family>/<member>` of two such segments (external plugins: `external/<name>`).
    fn name(&self) -> &'static str;

    /// The primary kind (listed by `GET /kbs/v0/plugin`).
    fn kind(&self) -> PluginKind;

    /// Every kind the plugin implements; events are delivered only when this contains
    /// [`PluginKind::ServerRequest`].
    fn kinds(&self) -> Vec<PluginKind> {
        vec![self.kind()]
    }

    /// Version string shown in the listing.
    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    /// Routes relative to `/kbs/v0/<name>`, with their state applied (usually `ctx`:
    /// handlers then take `State<PluginContext>` and the core extractors `Attested` /
    /// `AdminCaller`, which work with it). While the plugin is disabled they answer 404.
    fn routes(&self, ctx: PluginContext) -> axum::Router {
        let _ = ctx;
        axum::Router::new()
    }

    /// Background work while enabled: spawned on enable (and at start when enabled);
    /// `stop` is cancelled on disable and on shutdown, and the task is awaited then.
    async fn start(&self, ctx: PluginContext, stop: CancellationToken) {
        let _ = (ctx, stop);
    }

    /// One tunnel event (guest connected or left), delivered in order, only while enabled
    /// and only to server-request plugins. Keep it short: spawn long work.
    async fn on_event(&self, ctx: &PluginContext, event: &tunnel::TunnelEvent) {
        let _ = (ctx, event);
    }

    /// Settings an admin may change at run time, as they are now (listed by
    /// `GET /kbs/v0/plugin`); `None` when the plugin has none.
    fn settings(&self) -> Option<serde_json::Value> {
        None
    }

    /// Change run-time settings (`POST /kbs/v0/plugin/configure/<name>` with a JSON
    /// object, admin-only and audited); returns the settings now in force. A bad value is
    /// a 400 naming the key, and changes nothing.
    async fn configure(
        &self,
        ctx: &PluginContext,
        settings: serde_json::Value,
    ) -> Result<serde_json::Value, crate::error::ApiError> {
        let _ = (ctx, settings);
        Err(crate::error::ApiError::bad_request(
            "PluginNotConfigurable",
            format!("plugin `{}` has no run-time settings", self.name()),
        ))
    }

    /// Events may have been missed (on enable, at start, after the event stream lagged):
    /// reconcile with the hub's current tunnels (`ctx.hub().list()`).
    async fn resync(&self, ctx: &PluginContext) {
        let _ = ctx;
    }
}

/// Services over an in-memory store, for the framework's own tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) async fn test_services() -> (
    PluginServices,
    std::sync::Arc<kbs_core::storage::SqliteStore>,
) {
    use std::sync::Arc;

    use kbs_core::attest::{RcarConfig, RcarService};
    use kbs_core::audit::Audit;
    use kbs_core::events::EventSink;
    use kbs_core::policy::{DEFAULT_POLICY, PolicyEngine};
    use kbs_core::policy_gate::PolicyGate;
    use kbs_core::storage::{KeyEncryptionKey, SqliteStore};
    use kbs_core::token::TokenSigner;

    use crate::admin_auth::{AdminAuth, AdminConfig};
    use crate::admin_gate::AdminGate;

    let kek = Arc::new(KeyEncryptionKey::from_bytes(&[7u8; 32]));
    let store = Arc::new(SqliteStore::open_in_memory(kek).await.unwrap());
    let events = EventSink::new(64, Default::default());
    let services = PluginServices {
        kv: store.clone(),
        hub: tunnel::Hub::new(),
        directory: Arc::default(),
        policy: PolicyGate::new(
            Arc::new(PolicyEngine::new(DEFAULT_POLICY).unwrap()),
            Default::default(),
        ),
        audit: Audit::new(store.clone(), events, Default::default()),
        resource_notices: Default::default(),
        admin: Arc::new(AdminGate::new(
            AdminAuth::new(&AdminConfig::default(), None).unwrap(),
            Default::default(),
        )),
        rcar: Arc::new(RcarService::new(
            RcarConfig::default(),
            Arc::new(TokenSigner::ephemeral().unwrap()),
            Vec::new(),
            &[0u8; 32],
        )),
        shutdown: tokio_util::sync::CancellationToken::new(),
    };
    (services, store)
}
