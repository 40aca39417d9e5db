//! The plugin framework (upstream's three kinds, see DESIGN.md):
//!
//! - client-request plugins answer attested guests under `/kbs/v0/<name>/...`;
//! - admin plugins answer admins (the core [`AdminCaller`](crate::http::AdminCaller) extractor);
//! - server-request plugins receive tunnel events and call guests through the [`tunnel::Hub`].
//!
//! A plugin may be several kinds at once (splitapi is all three). Every plugin gets a
//! [`PluginContext`]: its own storage namespace and the core services, never another plugin's
//! state. The [`PluginRegistry`] enables and disables plugins at runtime: a disabled plugin's
//! routes answer 404, it gets no events and its background task is stopped; the decision is
//! stored and restored at start.

mod context;
pub mod http;
pub mod pki;
mod registry;
pub mod resource;
pub mod splitapi;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub use crate::guest_directory::GuestAttestation;
pub(crate) use context::original_path;
pub use context::{PluginContext, PluginKv};
pub use registry::{PluginInfo, PluginRegistry, RegistryError};

use crate::app::AppState;
use crate::claims::Claims;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::resource_path::ResourcePath;

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
    /// URL segment and storage namespace: `/kbs/v0/<name>/...`. `[a-z0-9-]+`.
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

    /// Events may have been missed (on enable, at start, after the event stream lagged):
    /// reconcile with the hub's current tunnels (`ctx.hub().list()`).
    async fn resync(&self, ctx: &PluginContext) {
        let _ = ctx;
    }
}

/// Evaluate the resource policy for `plugin` with the caller's `claims`; 403 when it refuses.
/// The policy sees `data.plugin`, `data["resource-path"]` (segments, empty for other
/// plugins) and `data.query` (the request's query parameters).
pub fn check_policy(
    state: &AppState,
    claims: &Claims,
    plugin: &str,
    path: Option<&ResourcePath>,
    query: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let data = json!({
        "plugin": plugin,
        "resource-path": path.map(|p| p.segments().to_vec()).unwrap_or_default(),
        "query": query,
    });
    let allowed = state.policy.evaluate_json(claims.json(), &data)?;
    Metrics::inc(
        &state.metrics.policy_decisions,
        &[
            ("plugin", plugin),
            ("decision", if allowed { "allow" } else { "deny" }),
        ],
    );
    if allowed {
        Ok(())
    } else {
        let what = path.map(|p| p.to_string()).unwrap_or_default();
        Err(ApiError::forbidden(
            "PolicyDeny",
            format!("the resource policy denies {plugin} {what} to this guest"),
        ))
    }
}

/// Names of the built-in plugins (what `[plugins] disabled` may list).
pub const BUILTIN_NAMES: &[&str] = &["resource", "splitapi", "probes", "rotation", "pki"];

/// The built-in plugins, in listing order.
pub fn builtin(config: &crate::config::Config) -> Vec<std::sync::Arc<dyn Plugin>> {
    vec![
        std::sync::Arc::new(resource::ResourcePlugin),
        std::sync::Arc::new(splitapi::SplitApiPlugin::new(
            config.plugins.splitapi.clone(),
        )),
        std::sync::Arc::new(crate::probes::plugin::ProbesPlugin::new(
            config.plugins.probes.clone(),
        )),
        std::sync::Arc::new(crate::rotation::RotationPlugin::new()),
        std::sync::Arc::new(pki::PkiPlugin::new(config.plugins.pki.clone())),
    ]
}
