//! Building a KBS from its configuration: keys, storage, policy, router, and serving it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::auth::{AdminAuth, AdminIdentity};
use crate::admin::token::AdminKeyPair;
use crate::attest::{RcarConfig, RcarService};
use crate::config::Config;
use crate::error::ApiError;
use crate::http;
use crate::metrics::{self, Metrics};
use crate::policy::PolicyEngine;
use crate::storage::{AuditEntry, KeyEncryptionKey, SqliteStore, Store};
use crate::token::TokenSigner;

/// Errors while starting a KBS.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Storage could not be opened.
    #[error("storage: {0}")]
    Store(#[from] crate::storage::StoreError),
    /// Something else (keys, policy, TLS, files), with context.
    #[error("{0}")]
    Other(String),
}

fn other(context: &str) -> impl Fn(String) -> StartError + '_ {
    move |e| StartError::Other(format!("{context}: {e}"))
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// Configuration in force.
    pub config: Arc<Config>,
    /// Storage.
    pub store: Arc<dyn Store>,
    /// RCAR sessions and token issue.
    pub rcar: Arc<RcarService>,
    /// Resource policy.
    pub policy: Arc<PolicyEngine>,
    /// Serialises policy updates so storage order and swap order agree.
    pub policy_write: Arc<tokio::sync::Mutex<()>>,
    /// Admin authentication.
    pub admin: Arc<AdminAuth>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Live guest tunnels, one per guest id.
    pub hub: tunnel::Hub,
    /// Limits and observer every tunnel shares (one copy, not one per tunnel).
    pub tunnel_endpoint: Arc<crate::http::tunnel::TunnelEndpoint>,
    /// Claims and TEE key of each connected guest (from its token).
    pub guest_directory: Arc<crate::guest_directory::GuestDirectory>,
    /// Cancelled when the KBS begins to shut down.
    pub shutdown: CancellationToken,
    /// The event log's write side (never blocks).
    pub events: crate::events::EventSink,
    /// Every guest known, connected or not (the fleet view).
    pub fleet: Arc<crate::fleet::Fleet>,
    /// Dashboard login sessions.
    pub dashboard: Arc<crate::dashboard::Sessions>,
    /// Plugins and whether each is enabled.
    pub plugins: Arc<crate::plugins::PluginRegistry>,
}

impl AppState {
    /// Write an audit record and count the admin action; a failed write is logged loudly
    /// (the action itself already happened).
    pub async fn audit(
        &self,
        admin: &AdminIdentity,
        action: &str,
        target: &str,
        outcome: &str,
        detail: String,
    ) {
        Metrics::inc(
            &self.metrics.admin_actions,
            &[("action", action), ("outcome", outcome)],
        );
        tracing::info!(actor = %admin.actor(), role = %admin.role, action, target, outcome, "admin action");
        let entry = AuditEntry {
            actor: admin.actor(),
            role: admin.role.clone(),
            action: action.to_string(),
            target: target.to_string(),
            outcome: outcome.to_string(),
            detail,
        };
        self.events.record(
            crate::events::kind_of_action(&entry.action),
            &entry.action,
            entry
                .action
                .starts_with("guest.")
                .then_some(entry.target.as_str()),
            Some(&entry.actor),
            &entry.target,
            &entry.outcome,
            entry.detail.clone(),
        );
        if let Err(e) = self.store.audit(entry).await {
            tracing::error!(error = %e, action, target, "AUDIT WRITE FAILED");
        }
    }
}

/// A built KBS, ready to serve.
pub struct Kbs {
    /// Handler state.
    pub state: AppState,
    /// Where the development admin key was written, if one is in use.
    pub dev_admin_key: Option<PathBuf>,
    /// Whether the development admin key was generated just now.
    pub dev_admin_key_created: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Kbs {
    /// Validate the config and build everything: data dir, keys, storage, policy.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let data_dir = config.storage.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|e| {
            StartError::Other(format!("storage.data_dir {}: {e}", data_dir.display()))
        })?;

        let kek = Arc::new(KeyEncryptionKey::load_or_generate(
            &config.storage.kek_path(),
        )?);
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&config.storage.database_url(), kek).await?);

        let signing_path = config
            .attestation
            .signing_key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("token.key"));
        let signer = Arc::new(
            TokenSigner::load_or_generate(&signing_path)
                .map_err(|e| other("attestation.signing_key_file")(e.to_string()))?,
        );
        let verifiers = crate::verifiers::build(&config.attestation.verifiers);
        let rcar = Arc::new(RcarService::new(
            RcarConfig {
                session_ttl: config.attestation.session_ttl,
                max_sessions: config.attestation.max_sessions,
                token_ttl: config.attestation.token_ttl,
                max_init_data_bytes: config.attestation.max_init_data_bytes,
            },
            signer,
            verifiers,
        ));

        let policy_text = match store.get_policy(http::admin::RESOURCE_POLICY).await? {
            Some(p) => p.body,
            None => match &config.policy.initial_policy_file {
                Some(f) => std::fs::read_to_string(f).map_err(|e| {
                    StartError::Other(format!("policy.initial_policy_file {}: {e}", f.display()))
                })?,
                None => crate::policy::DEFAULT_POLICY.to_string(),
            },
        };
        let policy = Arc::new(
            PolicyEngine::new(&policy_text).map_err(|e| other("resource policy")(e.to_string()))?,
        );

        let (dev_pub, dev_admin_key, dev_admin_key_created) =
            if config.admin.dev_key && config.admin.keys.is_empty() {
                let path = data_dir.join("admin.key");
                let (kp, created) = AdminKeyPair::load_or_generate(&path)
                    .map_err(|e| other("development admin key")(e.to_string()))?;
                (Some(kp.public_pem()), Some(path), created)
            } else {
                (None, None, false)
            };
        let admin = Arc::new(
            AdminAuth::new(
                &config.admin,
                dev_pub.as_deref().map(|p| ("dev", p.as_bytes())),
            )
            .map_err(|e| other("admin")(e.to_string()))?,
        );

        let tunnel_limits = http::tunnel::limits(&config.tunnel);
        tunnel_limits.validate().map_err(other("tunnel"))?;

        let tls = match &config.http.tls {
            Some(t) => Some(crate::tls::server_config(t, &data_dir).map_err(other("http.tls"))?),
            None => None,
        };

        let plugins = Arc::new(
            crate::plugins::PluginRegistry::load(
                crate::plugins::builtin(&config),
                &config.plugins,
                store.as_ref(),
            )
            .await
            .map_err(|e| other("plugins")(e.to_string()))?,
        );

        let metrics = Arc::new(Metrics::new());
        let events = crate::events::EventSink::new(
            crate::events::EVENT_QUEUE,
            metrics.observability.events_dropped.clone(),
        );
        let fleet = Arc::new(crate::fleet::Fleet::load(store.as_ref()).await?);
        let tunnel_endpoint = Arc::new(crate::http::tunnel::TunnelEndpoint::new(
            tunnel_limits,
            metrics.clone(),
        ));
        let state = AppState {
            tunnel_endpoint,
            events,
            fleet,
            dashboard: Arc::new(crate::dashboard::Sessions::new()),
            config: Arc::new(config),
            store,
            rcar,
            policy,
            policy_write: Arc::new(tokio::sync::Mutex::new(())),
            admin,
            metrics,
            hub: tunnel::Hub::new(),
            guest_directory: Arc::new(crate::guest_directory::GuestDirectory::new()),
            shutdown: CancellationToken::new(),
            plugins,
        };
        Ok(Self {
            state,
            dev_admin_key,
            dev_admin_key_created,
            tls,
        })
    }

    /// The full router.
    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    /// Whether TLS is on.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serve on an already bound listener until `shutdown` is cancelled, then drain.
    pub async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        let state = self.state.clone();
        let sweeper = tokio::spawn(sweep_sessions(state.clone()));
        let observability = crate::fleet::spawn_all(&state);
        state.plugins.start_all(&state).await;
        let grace = state.config.http.shutdown_grace;
        let serving = crate::serve::serve(
            listener,
            self.router(),
            self.tls,
            state.shutdown.clone(),
            grace,
        );
        // Tunnels watch the same token: each sends GoAway, closes with 4503 and leaves the hub,
        // within the same grace period as HTTP requests (upgraded connections are not tracked there).
        let (result, ()) = tokio::join!(
            serving,
            http::tunnel::drain(&state.hub, &state.shutdown, grace)
        );
        sweeper.abort();
        observability.finish().await;
        state.plugins.stop_all().await;
        result
    }
}

async fn sweep_sessions(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    loop {
        tick.tick().await;
        let purged = state.rcar.purge_expired();
        if purged > 0 {
            tracing::debug!(purged, "expired RCAR sessions purged");
        }
        state
            .metrics
            .rcar_sessions
            .set(state.rcar.session_count() as i64);
    }
}

/// Assemble the router for a state.
pub fn router(state: AppState) -> Router {
    let max_body = state.config.http.max_body_bytes;
    let metrics = state.metrics.clone();
    Router::new()
        .route("/kbs/v0/auth", post(http::rcar::auth))
        .route("/kbs/v0/attest", post(http::rcar::attest))
        .route("/kbs/v0/plugin", get(crate::plugins::http::list))
        .route(
            "/kbs/v0/plugin/enable/{name}",
            post(crate::plugins::http::enable),
        )
        .route(
            "/kbs/v0/plugin/disable/{name}",
            post(crate::plugins::http::disable),
        )
        .merge(state.plugins.router(&state))
        .route(
            "/kbs/v0/admin/resources/{repo}/{kind}/{tag}/versions",
            get(http::resource::versions),
        )
        .route(
            "/kbs/v0/resource-policy",
            post(http::admin::set_policy).get(http::admin::get_policy),
        )
        .route("/kbs/v0/admin/audit", get(http::admin::audit))
        .route("/kbs/v0/admin/events", get(crate::events::list))
        .merge(crate::dashboard::routes())
        .route("/kbs/v0/tunnel", get(http::tunnel::upgrade))
        .route("/kbs/v0/admin/guests", get(http::guests::list))
        .route(
            "/kbs/v0/admin/guests/{guest_id}/ping",
            post(http::guests::ping),
        )
        .route(
            "/kbs/v0/admin/guests/{guest_id}/probe",
            post(http::guests::probe),
        )
        .route("/healthz", get(http::health::healthz))
        .route("/readyz", get(http::health::readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .route("/metrics", get(metrics::expose).with_state(metrics.clone()))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            metrics::track,
        ))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found("NotFound", format!("no endpoint at {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
