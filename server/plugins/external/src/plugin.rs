//! [`ExternalPlugin`]: one `[[plugins.external]]` entry as a plugin of the registry, named
//! `external/<name>`: listed, enabled and disabled like any other (`kbsctl plugin`), its
//! routes mounted at `/kbs/v0/external/<name>`, and its endpoint replaceable at run time
//! (`POST /kbs/v0/plugin/configure/external/<name>`, `kbsctl plugin configure`).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use axum::routing::any;
use kbs_web::error::ApiError;
use kbs_web::plugin::{Plugin, PluginContext, PluginKind, PluginSetup, PluginSetupError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::config::{Target, TlsMode, check_target};
use crate::guests::Caller;
use crate::handler::{ExternalApi, forward};

/// The stored run-time endpoint (in the plugin's own namespace).
const STORED_TARGET: &str = "target";

/// `POST /kbs/v0/plugin/configure/external/<name>`: what may change at run time.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    endpoint: Option<String>,
    tls_mode: Option<TlsMode>,
    ca_cert_path: Option<PathBuf>,
    timeout_ms: Option<u64>,
    /// Replace the plugin's Guests API token with a fresh one in its `token_file`.
    #[serde(default)]
    rotate_token: bool,
}

/// A run-time target as stored: applied at start unless the config's endpoint changed
/// since (then the operator's newer decision, the config, wins).
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    endpoint: String,
    ca_cert_path: Option<PathBuf>,
    timeout_ms: u64,
    /// The config's endpoint when the change was made.
    over: String,
}

/// One external plugin.
pub struct ExternalPlugin {
    name: &'static str,
    configured: Target,
    backend: Arc<Backend>,
    caller: Option<Arc<Caller>>,
}

impl std::fmt::Debug for ExternalPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalPlugin")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ExternalPlugin {
    /// The plugin for a `[[plugins.external]]` table already validated into `target` and
    /// `max_concurrent`; `setup` is named `external/<name>`.
    pub fn build(
        setup: &mut PluginSetup<'_>,
        target: Target,
        max_concurrent: usize,
        caller: Option<Arc<Caller>>,
    ) -> Result<Self, PluginSetupError> {
        let name = setup.name();
        let member: &'static str = name.split_once('/').map_or(name, |(_, m)| m);
        if target.tls_mode == TlsMode::Insecure {
            tracing::warn!(
                plugin = name,
                endpoint = %target.endpoint,
                "external plugin reached in plaintext (http://): development only"
            );
        }
        let backend = Backend::new(member, target.clone(), max_concurrent, setup.metrics())
            .map_err(|e| setup.invalid("endpoint", e))?;
        Ok(Self {
            name,
            configured: target,
            backend: Arc::new(backend),
            caller,
        })
    }

    /// The plugin process as the KBS sees it.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

#[async_trait]
impl Plugin for ExternalPlugin {
    fn name(&self) -> &'static str {
        self.name
    }

    fn kind(&self) -> PluginKind {
        PluginKind::ClientRequest
    }

    fn kinds(&self) -> Vec<PluginKind> {
        vec![PluginKind::ClientRequest, PluginKind::Admin]
    }

    fn routes(&self, ctx: PluginContext) -> Router {
        // The Guests API checks, audits and gates this plugin's calls through its context.
        if let Some(caller) = &self.caller {
            caller.set_ctx(ctx.clone());
        }
        let api = ExternalApi {
            ctx,
            backend: self.backend.clone(),
        };
        Router::new()
            .route("/", any(forward))
            .route("/{*rest}", any(forward))
            .with_state(api)
    }

    async fn start(&self, ctx: PluginContext, stop: CancellationToken) {
        self.restore(&ctx).await;
        stop.cancelled().await;
    }

    fn settings(&self) -> Option<Value> {
        let mut v = self.backend.connection().target.describe();
        v["max_concurrent"] = json!(self.backend.max_concurrent());
        if let Some(caller) = &self.caller {
            let mut guests = caller.grants.describe();
            guests["token_file"] = json!(caller.token_file());
            v["guests"] = guests;
        }
        Some(v)
    }

    async fn configure(&self, ctx: &PluginContext, settings: Value) -> Result<Value, ApiError> {
        let change: Change = serde_json::from_value(settings).map_err(|e| {
            ApiError::bad_request("InvalidPluginSettings", format!("{}: {e}", self.name))
        })?;
        if change.rotate_token {
            let Some(caller) = &self.caller else {
                return Err(ApiError::bad_request(
                    "InvalidPluginSettings",
                    format!("{} has no Guests API grant, hence no token", self.name),
                ));
            };
            caller
                .rotate_token()
                .map_err(|e| ApiError::internal("token", e))?;
            tracing::info!(plugin = self.name, file = %caller.token_file().display(), "Guests API token rotated");
            if change.endpoint.is_none()
                && change.tls_mode.is_none()
                && change.ca_cert_path.is_none()
                && change.timeout_ms.is_none()
            {
                return Ok(self.settings().unwrap_or_default());
            }
        }
        let now = self.backend.connection().target.clone();
        let endpoint = change.endpoint.unwrap_or(now.endpoint.clone());
        // A new scheme drops a CA that no longer applies unless one is given.
        let ca = match change.ca_cert_path {
            Some(p) => Some(p),
            None if endpoint.starts_with("https://") => now.ca_cert_path.clone(),
            None => None,
        };
        let timeout_ms = change.timeout_ms.unwrap_or(now.timeout.as_millis() as u64);
        let target = check_target(&endpoint, change.tls_mode, ca, Some(timeout_ms)).map_err(
            |(key, reason)| {
                ApiError::bad_request("InvalidPluginSettings", format!("{key}: {reason}"))
            },
        )?;
        let stored = Stored {
            endpoint: target.endpoint.clone(),
            ca_cert_path: target.ca_cert_path.clone(),
            timeout_ms,
            over: self.configured.endpoint.clone(),
        };
        self.backend
            .swap(target)
            .map_err(|e| ApiError::bad_request("InvalidPluginSettings", e))?;
        let bytes = serde_json::to_vec(&stored).map_err(|e| ApiError::internal("settings", e))?;
        ctx.kv().put(STORED_TARGET, &bytes).await?;
        Ok(self.settings().unwrap_or_default())
    }
}

impl ExternalPlugin {
    /// Apply the endpoint an admin set at run time, unless the config moved on since.
    async fn restore(&self, ctx: &PluginContext) {
        let stored = match ctx.kv().get(STORED_TARGET).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(plugin = self.name, error = %e, "cannot read the stored endpoint; the configured one stays");
                return;
            }
        };
        let Ok(stored) = serde_json::from_slice::<Stored>(&stored) else {
            tracing::warn!(
                plugin = self.name,
                "stored endpoint unreadable; the configured one stays"
            );
            return;
        };
        if stored.over != self.configured.endpoint {
            tracing::info!(plugin = self.name, stored = %stored.endpoint, configured = %self.configured.endpoint,
                "the config names a new endpoint since the run-time change: the config wins");
            let _ = ctx.kv().delete(STORED_TARGET).await;
            return;
        }
        if self.backend.connection().target.endpoint == stored.endpoint {
            return;
        }
        match check_target(
            &stored.endpoint,
            None,
            stored.ca_cert_path,
            Some(stored.timeout_ms),
        )
        .map_err(|(k, r)| format!("{k}: {r}"))
        .and_then(|t| self.backend.swap(t))
        {
            Ok(()) => {
                tracing::info!(plugin = self.name, endpoint = %stored.endpoint, "run-time endpoint restored")
            }
            Err(e) => {
                tracing::warn!(plugin = self.name, error = %e, "stored endpoint no longer valid; the configured one stays")
            }
        }
    }
}
