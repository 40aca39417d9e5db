//! The Guests API (`tether.plugin.v1.Guests`): a gRPC service the KBS offers external
//! plugins on a listener of its own (`[plugins.guests-api] listen`, off by default,
//! loopback or a Unix socket), through which a plugin granted it
//! (`[plugins.external.guests]`, with a bearer token per plugin) lists guests by selector
//! and calls the typed guest RPCs through their tunnels: `ping`, `probe`, `apply_resource`
//! (a version the KBS stores), `install_credentials` (files the plugin supplies). Each call
//! has a deadline, each plugin a bound on its calls at once, the listener a bound on its
//! connections and message sizes. Wire and policy details: `docs/protocol.md` section 9.5.
//!
//! The listener is itself a plugin of the registry, `guests-api`: disabling it closes the
//! API for every plugin; disabling `external/<name>` closes it for that plugin.

mod callers;
pub mod client;
mod grants;
mod listen;
mod service;
mod token;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kbs_core::metrics::Labels;
use kbs_web::plugin::{Plugin, PluginContext, PluginKind, PluginSetup, PluginSetupError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub use callers::{Caller, Callers};
pub use grants::{Call, Grants, GrantsConfig};
pub use listen::{Bound, Listen};
pub use service::{AUDIT_ROLE, GuestsGrants, GuestsService, MAX_BUNDLE_FILES, MAX_LISTED_GUESTS};
pub use token::Token;

use crate::proto::tether_plugin_v1::guests_server::GuestsServer;

/// The listener plugin's name and config section (`[plugins.guests-api]`).
pub const NAME: &str = "guests-api";
/// Deadline of one call when `call_timeout` is not set.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request or answer when `max_message_bytes` is not set.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;
/// Connections open at once when `max_connections` is not set.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Calls at once per connection (HTTP/2 streams).
const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// `[plugins.guests-api]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `127.0.0.1:<port>`, `[::1]:<port>` or `unix:/abs/path`; absent: no listener.
    #[serde(default)]
    pub listen: Option<String>,
    /// Deadline of one call (humantime, default 30s, at most 10m).
    #[serde(default, with = "humantime_serde")]
    pub call_timeout: Option<Duration>,
    /// Largest request or answer, bytes (default 1 MiB, at most 16 MiB).
    #[serde(default)]
    pub max_message_bytes: Option<usize>,
    /// Connections open at once (default 64, at most 4096).
    #[serde(default)]
    pub max_connections: Option<usize>,
}

/// The `guests-api` plugin: serves [`GuestsService`] while enabled.
pub struct GuestsApiPlugin {
    bound: Option<Arc<Bound>>,
    service: GuestsService,
    max_message: usize,
    max_connections: usize,
    address: Mutex<Option<String>>,
}

impl std::fmt::Debug for GuestsApiPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestsApiPlugin").finish_non_exhaustive()
    }
}

impl GuestsApiPlugin {
    /// Build from `[plugins.guests-api]`, binding the listener now (a taken address fails
    /// the start, naming the key); `callers` are the plugins granted the API.
    pub fn build(
        setup: &mut PluginSetup<'_>,
        callers: Callers,
        grants: GuestsGrants,
    ) -> Result<Self, PluginSetupError> {
        let config: ApiConfig = setup.config()?;
        let call_timeout = config.call_timeout.unwrap_or(DEFAULT_CALL_TIMEOUT);
        if call_timeout.is_zero() || call_timeout > Duration::from_secs(600) {
            return Err(setup.invalid("call_timeout", "must be within 1ms..=10m"));
        }
        let max_message = config.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE);
        if !(1024..=16 << 20).contains(&max_message) {
            return Err(setup.invalid("max_message_bytes", "must be 1024..=16777216"));
        }
        let max_connections = config.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if !(1..=4096).contains(&max_connections) {
            return Err(setup.invalid("max_connections", "must be 1..=4096"));
        }
        let bound = match &config.listen {
            None => None,
            Some(text) => {
                let listen = Listen::parse(text).map_err(|e| setup.invalid("listen", e))?;
                let bound = listen
                    .bind()
                    .map_err(|e| setup.invalid("listen", format!("cannot bind {text}: {e}")))?;
                if callers.is_empty() {
                    tracing::warn!(listen = %text, "Guests API listening but no [plugins.external.guests] grant names a plugin");
                }
                Some(Arc::new(bound))
            }
        };
        let calls = Family::<Labels, Counter>::default();
        setup.metrics().register(
            "calls",
            "Guests API calls by plugin, call and outcome",
            calls.clone(),
        );
        Ok(Self {
            address: Mutex::new(bound.as_ref().map(|b| b.describe())),
            bound,
            service: GuestsService {
                callers,
                grants,
                call_timeout,
                calls,
            },
            max_message,
            max_connections,
        })
    }
}

#[async_trait]
impl Plugin for GuestsApiPlugin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn kind(&self) -> PluginKind {
        PluginKind::ServerRequest
    }

    async fn start(&self, _ctx: PluginContext, stop: CancellationToken) {
        let Some(bound) = self.bound.clone() else {
            return;
        };
        let service = GuestsServer::new(self.service.clone())
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message);
        let address = self.address.lock().ok().and_then(|a| a.clone());
        tracing::info!(listen = ?address, "Guests API for external plugins listening");
        let served = tonic::transport::Server::builder()
            .timeout(self.service.call_timeout)
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(service)
            .serve_with_incoming_shutdown(
                listen::incoming(bound, self.max_connections),
                stop.cancelled(),
            )
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "Guests API stopped");
        }
    }

    fn settings(&self) -> Option<Value> {
        Some(json!({
            "listen": self.address.lock().ok().and_then(|a| a.clone()),
            "call_timeout_ms": self.service.call_timeout.as_millis() as u64,
            "max_message_bytes": self.max_message,
            "max_connections": self.max_connections,
            "plugins": self.service.callers.len(),
        }))
    }
}
