//! The composition root: builds every part of the KBS from its configuration, hands each
//! plugin what it is granted (the plugin list below is the only one), assembles the router
//! and serves it. Nothing else in the crate imports this module; handlers name only the part
//! of the state they use, which [`AppState`] hands out through `FromRef`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::routing::{get, post, put};
use kbs_core::admin_key::AdminKeyPair;
use kbs_core::attest::external::ExternalIssuer;
use kbs_core::attest::{RcarConfig, RcarService};
use kbs_core::audit::Audit;
use kbs_core::events::{EVENT_QUEUE, EventSink};
use kbs_core::fleet::{Fleet, Observability, ObservabilityParts};
use kbs_core::guest_directory::GuestDirectory;
use kbs_core::metrics::{Exposition, Metrics};
use kbs_core::policy::{DEFAULT_POLICY, PolicyEngine};
use kbs_core::policy_gate::PolicyGate;
use kbs_core::probe::Prober;
use kbs_core::storage::{AuditStore, KeyEncryptionKey, ResourceStore, Store, StoreError};
use kbs_core::token::TokenSigner;
use kbs_web::admin_auth::AdminAuth;
use kbs_web::admin_gate::AdminGate;
use kbs_web::error::ApiError;
use kbs_web::http_metrics;
use kbs_web::plugin::{PluginRegistry, PluginServices, PluginSpec, RegistryError};
use plugin_nebula::NebulaPlugin;
use plugin_pki::PkiPlugin;
use plugin_probes::ProbesPlugin;
use plugin_provisioner::ProvisionerPlugin;
use plugin_resource::ResourcePlugin;
use plugin_rotation::{Grants, RotationPlugin};
use plugin_splitapi::SplitApiPlugin;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::attestation;
use crate::cluster::hop::HopKey;
use crate::cluster::{Cluster, ClusterParts};
use crate::config::{Config, ConfigError};
use crate::dashboard::{self, Dashboard};
use crate::http;
use crate::http::appraisal::AppraisalAdmin;
use crate::http::events::EventLog;
use crate::http::guests::GuestsApi;
use crate::http::health::Readiness;
use crate::http::policy::{PolicyAdmin, RESOURCE_POLICY};
use crate::http::tunnel::{TunnelEndpoint, TunnelServices};

/// What the plugins may be given beyond their context, built before them.
struct Grantable {
    resources: Arc<dyn ResourceStore>,
    rotation: Grants,
    prober: Prober,
}

/// The built-in plugins, in listing order. This is the only list: a new plugin is its own
/// crate (or module) and one line here (see `docs/architecture.md`).
fn builtin_plugins(g: &Grantable) -> Vec<PluginSpec> {
    let (resources, rotation, prober) = (g.resources.clone(), g.rotation.clone(), g.prober.clone());
    vec![
        PluginSpec::new(plugin_resource::NAME, |_| {
            Ok(ResourcePlugin::new(resources))
        }),
        PluginSpec::new(plugin_splitapi::NAME, SplitApiPlugin::build),
        PluginSpec::new(plugin_probes::NAME, |s| ProbesPlugin::build(s, prober)),
        PluginSpec::new(plugin_rotation::NAME, |s| {
            RotationPlugin::build(s, rotation)
        }),
        PluginSpec::new(plugin_pki::NAME, PkiPlugin::build),
        PluginSpec::new(plugin_provisioner::NAME, ProvisionerPlugin::build),
        PluginSpec::new(plugin_nebula::NAME, NebulaPlugin::build),
    ]
}

/// Errors while starting a KBS.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Storage could not be opened.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// Something else (keys, policy, TLS, files), with context.
    #[error("{0}")]
    Other(String),
}

impl From<RegistryError> for StartError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Config(e) => StartError::Config(ConfigError::Invalid {
                key: e.key,
                reason: e.reason,
            }),
            RegistryError::Store(e) => StartError::Store(e),
            other => StartError::Other(format!("plugins: {other}")),
        }
    }
}

fn other(context: &str) -> impl Fn(String) -> StartError + '_ {
    move |e| StartError::Other(format!("{context}: {e}"))
}

/// The router's state: one field per part a handler may ask for (`FromRef`).
#[derive(Clone, FromRef)]
struct AppState {
    admin: Arc<AdminGate>,
    rcar: Arc<RcarService>,
    metrics: Arc<Metrics>,
    exposition: Arc<Exposition>,
    audit: Audit,
    plugins: Arc<PluginRegistry>,
    policy: PolicyAdmin,
    appraisal: AppraisalAdmin,
    audit_log: Arc<dyn AuditStore>,
    event_log: EventLog,
    resources: Arc<dyn ResourceStore>,
    guests: GuestsApi,
    tunnel: Arc<TunnelEndpoint>,
    readiness: Readiness,
    dashboard: Dashboard,
    cluster: Arc<Cluster>,
}

/// Handles on the running parts of a KBS, for the binary, embedding and tests.
#[derive(Clone)]
pub struct KbsHandles {
    /// Live guest tunnels.
    pub hub: tunnel::Hub,
    /// Plugins and whether each is enabled.
    pub plugins: Arc<PluginRegistry>,
    /// Storage.
    pub store: Arc<dyn Store>,
    /// Every guest known (the fleet view).
    pub fleet: Arc<Fleet>,
    /// Core metrics.
    pub metrics: Arc<Metrics>,
    /// Claims and TEE keys of guests with tunnels.
    pub directory: Arc<GuestDirectory>,
    /// Admin authentication and dashboard sessions.
    pub admin: Arc<AdminGate>,
    /// RCAR sessions and tokens.
    pub rcar: Arc<RcarService>,
    /// The event log's write side.
    pub events: EventSink,
    /// Cancel to shut the KBS down (it drains, then `serve` returns).
    pub shutdown: CancellationToken,
    /// The listener's connection counters (open, evicted, timed out).
    pub connections: listener::ConnectionStats,
}

/// A built KBS, ready to serve.
pub struct Kbs {
    /// Handles on its parts.
    pub state: KbsHandles,
    /// Where the development admin key was written, if one is in use.
    pub dev_admin_key: Option<PathBuf>,
    /// Whether the development admin key was generated just now.
    pub dev_admin_key_created: bool,
    app: AppState,
    /// External issuers whose JWK sets are fetched from a URL, with how often.
    jwks_urls: Vec<(Arc<ExternalIssuer>, String, std::time::Duration)>,
    /// TDX/SNP collateral, kept fresh in the background while serving.
    collateral: Arc<tee_verifiers::CollateralStore>,
    /// Held while this KBS lives: its SQLite database is nobody else's.
    _sqlite_owner: Option<kbs_core::fsutil::FileLock>,
    config: Arc<Config>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Kbs {
    /// Validate the config and build everything: data dir, keys, storage, policy, plugins.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        Self::build_with(config, Vec::new()).await
    }

    /// [`build`](Self::build) with plugins of the embedder's own after the built-in ones.
    pub async fn build_with(config: Config, extra: Vec<PluginSpec>) -> Result<Self, StartError> {
        config.validate()?;
        let data_dir = config.storage.data_dir.clone();
        kbs_core::fsutil::create_private_dir(&data_dir).map_err(|e| {
            StartError::Other(format!("storage.data_dir {}: {e}", data_dir.display()))
        })?;
        warn_if_shared(&data_dir);
        let kek = Arc::new(KeyEncryptionKey::load_or_generate(
            &config.storage.kek_path(),
        )?);
        let database_url = config.storage.database_url();
        let store = open_store(&config, &database_url, &kek).await?;
        // An SQLite database is this process's own: what it keeps in memory (the latest
        // resource versions, the policies) is right only while nobody else writes. Several
        // replicas share PostgreSQL instead (docs/operations.md, "Several replicas").
        let sqlite_owner = match kbs_core::storage::sqlite_file(&database_url) {
            Some(file) => Some(sqlite_owner_lock(&file).await?),
            None => None,
        };
        tracing::info!(
            engine = store.engine(),
            database = %kbs_core::storage::redact_url(&database_url),
            "storage open"
        );

        let a = &config.attestation;
        let config_error = |(key, reason): (String, String)| ConfigError::Invalid { key, reason };
        let collateral =
            attestation::collateral_store(&a.collateral, store.clone()).map_err(config_error)?;
        let appraiser = Arc::new(
            attestation::load_appraiser(&a.appraisal, store.as_ref())
                .await
                .map_err(config_error)?,
        );
        let mut issuers = Vec::new();
        let mut jwks_urls = Vec::new();
        for (i, external) in a.external.iter().enumerate() {
            let issuer = external.build(i).map_err(config_error)?;
            if let Some(url) = &external.jwks_url {
                jwks_urls.push((issuer.clone(), url.clone(), external.jwks_refresh));
            }
            issuers.push(issuer);
        }
        let collateral = Arc::new(collateral);
        let verifier_setup = kbs_core::verifiers::VerifierSetup {
            collateral: collateral.clone(),
            anchors: attestation::trust_anchors(&a.tdx, &a.snp).map_err(config_error)?,
            clock: Default::default(),
        };
        let rcar = Arc::new(
            build_rcar(&config, &kek.derive(RCAR_COOKIE_KEY), &verifier_setup)?
                .with_appraiser(appraiser.clone())
                .with_external_issuers(issuers),
        );
        let policy_engine = Arc::new(load_policy(&config, store.as_ref()).await?);
        let (admin_auth, dev_admin_key, dev_admin_key_created) = build_admin(&config)?;

        let tunnel_limits = http::tunnel::limits(&config.tunnel);
        tunnel_limits.validate().map_err(other("tunnel"))?;
        let tls = match &config.http.tls {
            Some(t) => {
                // A generated self-signed pair is two files: one replica at a time may
                // write them, so that all end up serving the same pair.
                let _turn = startup_lock(&data_dir).await?;
                Some(crate::tls::server_config(t, &data_dir).map_err(other("http.tls"))?)
            }
            None => None,
        };

        let mut registry = Registry::with_prefix("kbs");
        let metrics = Arc::new(Metrics::register(&mut registry));
        let connections = listener::ConnectionStats::default();
        crate::serve::register_metrics(&mut registry, connections.clone());
        let events = EventSink::new(EVENT_QUEUE, metrics.observability.events_dropped.clone());
        let fleet = Arc::new(Fleet::load(store.as_ref()).await?);
        let hub = tunnel::Hub::new();
        let directory = Arc::new(GuestDirectory::new());
        let shutdown = CancellationToken::new();
        let audit = Audit::new(store.clone(), events.clone(), metrics.admin_actions.clone())
            .counting_lost(metrics.observability.audit_lost.clone());
        let policy = PolicyGate::new(policy_engine, metrics.policy_decisions.clone());
        let admin = Arc::new(AdminGate::new(admin_auth, metrics.admin_actions.clone()));
        let prober = Prober {
            hub: hub.clone(),
            fleet: fleet.clone(),
            directory: directory.clone(),
            metrics: metrics.observability.clone(),
        };

        let grantable = Grantable {
            resources: store.clone(),
            rotation: Grants {
                rollouts: store.clone(),
                resources: store.clone(),
                fleet: fleet.clone(),
                policy: policy.clone(),
                changes: store.changes(),
            },
            prober: prober.clone(),
        };
        let mut specs = builtin_plugins(&grantable);
        // `[[plugins.external]]`: one plugin `external/<name>` per table.
        let mut sections = config.plugins.sections.clone();
        let external = sections.remove(plugin_external::FAMILY);
        let guests_api = plugin_external::guests::GuestsGrants {
            resources: store.clone(),
            policy: policy.clone(),
            prober: prober.clone(),
        };
        specs.extend(plugin_external::specs(external, guests_api).map_err(RegistryError::Config)?);
        specs.extend(extra);
        let services = PluginServices {
            kv: store.clone(),
            hub: hub.clone(),
            directory: directory.clone(),
            policy: policy.clone(),
            audit: audit.clone(),
            resource_notices: Default::default(),
            admin: admin.clone(),
            rcar: rcar.clone(),
            shutdown: shutdown.clone(),
        };
        let plugins = Arc::new(
            PluginRegistry::build(
                specs,
                sections,
                &config.plugins.disabled,
                &mut registry,
                services,
                store.clone(),
            )
            .await?,
        );
        let exposition = Arc::new(Exposition::new(registry));
        let cluster = Cluster::new(ClusterParts {
            store: store.clone(),
            hub: hub.clone(),
            shared: store.engine() == "postgres",
            advertise_url: config.cluster.advertise_url.clone(),
            forward_timeout: config.cluster.forward_timeout,
            max_body: config.http.max_body_bytes,
            hop_key: HopKey::new(&kek.derive(crate::cluster::HOP_KEY_PURPOSE)),
            trust: own_certificate(&config)?,
        })
        .map_err(|e| StartError::Other(e.to_string()))?;

        let tunnel = Arc::new(TunnelEndpoint::new(
            tunnel_limits,
            TunnelServices {
                rcar: rcar.clone(),
                directory: directory.clone(),
                hub: hub.clone(),
                policy: policy.clone(),
                events: events.clone(),
                shutdown: shutdown.clone(),
                metrics: metrics.clone(),
            },
        ));
        let policy_admin = PolicyAdmin {
            store: store.clone(),
            gate: policy,
            write: Arc::default(),
        };
        let appraisal = AppraisalAdmin {
            appraiser,
            reference: store.clone(),
            policies: store.clone(),
            write: Arc::default(),
        };
        let app = AppState {
            admin: admin.clone(),
            rcar: rcar.clone(),
            metrics: metrics.clone(),
            exposition,
            audit: audit.clone(),
            plugins: plugins.clone(),
            policy: policy_admin.clone(),
            appraisal,
            audit_log: store.clone(),
            event_log: EventLog {
                sink: events.clone(),
                store: store.clone(),
                metrics: metrics.observability.clone(),
            },
            resources: store.clone(),
            guests: GuestsApi {
                prober,
                resources: store.clone(),
                audit: audit.clone(),
                retention: config.fleet.retention(),
            },
            tunnel,
            readiness: Readiness {
                store: store.clone(),
                shutdown: shutdown.clone(),
            },
            dashboard: Dashboard {
                admin: admin.clone(),
                policy: policy_admin,
                plugins: plugins.clone(),
                hub: hub.clone(),
                fleet: fleet.clone(),
                forget_after: config.fleet.forget_after,
                audit,
                secure_cookie: tls.is_some(),
            },
            cluster,
        };
        Ok(Self {
            collateral,
            _sqlite_owner: sqlite_owner,
            state: KbsHandles {
                hub,
                plugins,
                store,
                fleet,
                metrics,
                directory,
                admin,
                rcar,
                events,
                shutdown,
                connections,
            },
            dev_admin_key,
            dev_admin_key_created,
            app,
            jwks_urls,
            config: Arc::new(config),
            tls,
        })
    }

    /// Answers on `listener` while [`build`](Self::build) waits for a PostgreSQL database
    /// it cannot reach yet (`http::health::starting_router`: `/healthz` 200, `/readyz` 503),
    /// with the configured TLS, until `stop` is cancelled.
    pub async fn serve_while_starting(
        config: &Config,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> Result<(), StartError> {
        let data_dir = &config.storage.data_dir;
        let tls = match &config.http.tls {
            Some(t) => {
                kbs_core::fsutil::create_private_dir(data_dir).map_err(|e| {
                    StartError::Other(format!("storage.data_dir {}: {e}", data_dir.display()))
                })?;
                let _turn = startup_lock(data_dir).await?;
                Some(crate::tls::server_config(t, data_dir).map_err(other("http.tls"))?)
            }
            None => None,
        };
        let engine = match kbs_core::storage::Engine::of(&config.storage.database_url())? {
            kbs_core::storage::Engine::Postgres => "postgres",
            kbs_core::storage::Engine::Sqlite => "sqlite",
        };
        crate::serve::serve(
            listener,
            http::health::starting_router(engine),
            tls,
            stop,
            &config.http,
            Default::default(),
        )
        .await
        .map_err(|e| StartError::Other(format!("serving while starting: {e}")))
    }

    /// The full router.
    pub fn router(&self) -> Router {
        router(&self.app, self.config.http.max_body_bytes)
    }

    /// Whether TLS is on.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serve on an already bound listener until `shutdown` is cancelled, then drain.
    pub async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        let s = self.state.clone();
        let observability = Observability::spawn(ObservabilityParts {
            fleet: s.fleet.clone(),
            hub: s.hub.clone(),
            directory: s.directory.clone(),
            events: s.events.clone(),
            event_store: s.store.clone(),
            fleet_store: s.store.clone(),
            metrics: s.metrics.observability.clone(),
            retention: self.config.fleet.retention(),
        });
        let pruner = s.directory.clone().spawn_pruner(
            s.hub.clone(),
            self.config.tunnel.directory_prune_interval,
            s.shutdown.clone(),
        );
        let jwks = tokio::spawn(attestation::refresh_jwks(
            self.jwks_urls.clone(),
            s.shutdown.clone(),
        ));
        // Collateral enters the cache with the first attestation that needs it (or from the
        // store); from then on it is refreshed ahead of its nextUpdate, not on demand.
        let refresher = tokio::spawn(self.collateral.clone().run_refresher(
            Arc::new(tee_verifiers::collateral::SystemClock),
            s.shutdown.clone().cancelled_owned(),
        ));
        s.plugins.start_all().await;
        // Replicas sharing a database: what another one changes is put in force here.
        let follower = crate::follow::spawn(
            &s.store.changes(),
            crate::follow::Followers {
                policy: self.app.policy.clone(),
                appraisal: self.app.appraisal.clone(),
                plugins: s.plugins.clone(),
            },
            s.shutdown.clone(),
        );
        // Replicas sharing a database: record the tunnels held here, heartbeat.
        let advertise =
            crate::cluster::default_advertise_url(listener.local_addr()?, self.tls.is_some());
        let cluster = self.app.cluster.spawn(advertise, s.shutdown.clone());
        let http = &self.config.http;
        let grace = http.shutdown_grace;
        let serving = crate::serve::serve(
            listener,
            self.router(),
            self.tls,
            s.shutdown.clone(),
            http,
            s.connections.clone(),
        );
        // Tunnels watch the same token: each sends GoAway, closes with 4503 and leaves the hub,
        // within the same grace period as HTTP requests (upgraded connections are not tracked there).
        let (result, ()) = tokio::join!(serving, http::tunnel::drain(&s.hub, &s.shutdown, grace));
        let _ = pruner.await;
        let _ = jwks.await;
        let _ = refresher.await;
        let _ = follower.await;
        let _ = cluster.await;
        observability.finish().await;
        s.plugins.stop_all().await;
        result
    }
}

/// The data directory holds the database and the keys: a mode that lets group or others in
/// is worth an operator's eye (the KBS creates it 0700, and leaves an existing one alone).
fn warn_if_shared(data_dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(data_dir)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %data_dir.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "storage.data_dir is open to group or others: chmod 700 it"
        );
    }
}

/// The certificate this replica serves (with TLS): the others serve the same one when they
/// share the data directory or the files, so the internal hop trusts it.
fn own_certificate(config: &Config) -> Result<Vec<reqwest::Certificate>, StartError> {
    let Some(tls) = &config.http.tls else {
        return Ok(Vec::new());
    };
    let path = match &tls.cert_file {
        Some(p) if !tls.self_signed => p.clone(),
        _ => config.storage.data_dir.join("tls").join("cert.pem"),
    };
    let pem = std::fs::read(&path)
        .map_err(|e| StartError::Other(format!("http.tls: {}: {e}", path.display())))?;
    reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| StartError::Other(format!("http.tls: {}: {e}", path.display())))
}

/// What the RCAR cookie key is derived for (from the KEK, which every replica shares).
const RCAR_COOKIE_KEY: &str = "rcar-session-cookie";

fn build_rcar(
    config: &Config,
    cookie_key: &[u8; 32],
    verifier_setup: &kbs_core::verifiers::VerifierSetup,
) -> Result<RcarService, StartError> {
    let signing_path = config
        .attestation
        .signing_key_file
        .clone()
        .unwrap_or_else(|| config.storage.data_dir.join("token.key"));
    let signer = Arc::new(
        TokenSigner::load_or_generate(&signing_path)
            .map_err(|e| other("attestation.signing_key_file")(e.to_string()))?,
    );
    let a = &config.attestation;
    Ok(RcarService::new(
        RcarConfig {
            session_ttl: a.session_ttl,
            token_ttl: a.token_ttl,
            max_init_data_bytes: a.max_init_data_bytes,
        },
        signer,
        kbs_core::verifiers::build(&a.verifiers, verifier_setup),
        cookie_key,
    ))
}

/// Name of the lock file in the data directory that replicas take in turn at start.
const STARTUP_LOCK: &str = "startup.lock";
/// Longest wait for another replica's start (database creation and migrations).
const STARTUP_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The data directory's start-up lock (see [`STARTUP_LOCK`]).
async fn startup_lock(data_dir: &Path) -> Result<kbs_core::fsutil::FileLock, StartError> {
    let path = data_dir.join(STARTUP_LOCK);
    tokio::task::spawn_blocking(move || {
        kbs_core::fsutil::lock_exclusive(&path, STARTUP_LOCK_WAIT)
            .map_err(|e| StartError::Other(format!("start-up lock {}: {e}", path.display())))
    })
    .await
    .map_err(|e| StartError::Other(format!("start-up lock: {e}")))?
}

/// Opens the store. A PostgreSQL database out of reach is waited for, with backoff, up to
/// `[storage] connect_wait_secs` (a database and its replicas started together, or the
/// database restarting); then the error names the key. SQLite is opened once.
async fn open_store(
    config: &Config,
    url: &str,
    kek: &Arc<KeyEncryptionKey>,
) -> Result<Arc<dyn Store>, StartError> {
    let postgres = kbs_core::storage::Engine::of(url)? == kbs_core::storage::Engine::Postgres;
    let wait = std::time::Duration::from_secs(config.storage.connect_wait_secs);
    let pool = config.storage.pool();
    let started = std::time::Instant::now();
    let mut backoff = std::time::Duration::from_millis(250);
    loop {
        let opened = {
            // Replicas sharing this data directory may start at the same moment: one at a
            // time creates the keys and (SQLite) creates and migrates the database, or the
            // others fail on tables it is creating (docs/operations.md, "Several replicas").
            let _turn = startup_lock(&config.storage.data_dir).await?;
            kbs_core::storage::open_with(url, kek.clone(), &pool).await
        };
        let e = match opened {
            Ok(store) => return Ok(store),
            Err(e) if postgres && e.is_unavailable() => e,
            Err(e) => return Err(e.into()),
        };
        if started.elapsed() + backoff >= wait {
            return Err(StartError::Other(format!(
                "storage: the database at {} could not be reached within storage.connect_wait_secs = {} ({e})",
                kbs_core::storage::redact_url(url),
                config.storage.connect_wait_secs
            )));
        }
        tracing::warn!(
            database = %kbs_core::storage::redact_url(url),
            error = %e,
            waited_secs = started.elapsed().as_secs(),
            gives_up_after_secs = config.storage.connect_wait_secs,
            "storage: waiting for the database"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}

/// How long a KBS waits for the SQLite database's owner lock: long enough for an
/// in-process restart to let go of it, short enough to tell an operator at once.
const SQLITE_OWNER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The owner lock of the SQLite database `file` (`<file>.owner.lock` beside it).
async fn sqlite_owner_lock(file: &Path) -> Result<kbs_core::fsutil::FileLock, StartError> {
    let mut name = file.as_os_str().to_owned();
    name.push(".owner.lock");
    let path = PathBuf::from(name);
    tokio::task::spawn_blocking(move || {
        kbs_core::fsutil::lock_exclusive(&path, SQLITE_OWNER_WAIT).map_err(|e| {
            StartError::Other(format!(
                "storage.database_url: the SQLite database is in use by another kbs ({e}); \
                 several replicas need PostgreSQL (database_url = \"postgres://...\")"
            ))
        })
    })
    .await
    .map_err(|e| StartError::Other(format!("SQLite owner lock: {e}")))?
}

/// The stored resource policy, else the initial policy file, else the built-in default.
async fn load_policy(config: &Config, store: &dyn Store) -> Result<PolicyEngine, StartError> {
    let text = match store.get_policy(RESOURCE_POLICY).await? {
        Some(p) => p.body,
        None => match &config.policy.initial_policy_file {
            Some(f) => std::fs::read_to_string(f).map_err(|e| {
                StartError::Other(format!("policy.initial_policy_file {}: {e}", f.display()))
            })?,
            None => DEFAULT_POLICY.to_string(),
        },
    };
    PolicyEngine::new(&text).map_err(|e| other("resource policy")(e.to_string()))
}

/// Admin authentication, with the development key (generated once) when no key is set.
fn build_admin(config: &Config) -> Result<(AdminAuth, Option<PathBuf>, bool), StartError> {
    let (dev_pub, dev_path, created) = if config.admin.dev_key && config.admin.keys.is_empty() {
        let path = config.storage.data_dir.join("admin.key");
        let (kp, created) = AdminKeyPair::load_or_generate(&path)
            .map_err(|e| other("development admin key")(e.to_string()))?;
        (Some(kp.public_pem()), Some(path), created)
    } else {
        (None, None, false)
    };
    let auth = AdminAuth::new(
        &config.admin,
        dev_pub.as_deref().map(|p| ("dev", p.as_bytes())),
    )
    .map_err(|e| other("admin")(e.to_string()))?;
    Ok((auth, dev_path, created))
}

/// Assemble the router for a state.
fn router(state: &AppState, max_body: usize) -> Router {
    let metrics = state.metrics.clone();
    let cluster = state.cluster.clone();
    Router::new()
        .route("/kbs/v0/auth", post(http::rcar::auth))
        .route("/kbs/v0/attest", post(http::rcar::attest))
        .merge(kbs_web::plugin::routes::routes())
        .merge(state.plugins.router())
        .route(
            "/kbs/v0/admin/resources/{repo}/{kind}/{tag}/versions",
            get(http::resources::versions),
        )
        .route(
            "/kbs/v0/resource-policy",
            post(http::policy::set_policy).get(http::policy::get_policy),
        )
        .route(
            "/kbs/v0/admin/appraisal-policy",
            post(http::appraisal::set_policy).get(http::appraisal::get_policy),
        )
        .route("/kbs/v0/admin/reference-values", get(http::appraisal::list))
        .route(
            "/kbs/v0/admin/reference-values/{name}",
            put(http::appraisal::set).delete(http::appraisal::delete),
        )
        .route("/kbs/v0/admin/audit", get(http::audit::audit))
        .route("/kbs/v0/admin/events", get(http::events::list))
        .merge(dashboard::routes())
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
        .route("/metrics", get(http_metrics::expose))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone())
        .layer(axum::middleware::from_fn_with_state(
            cluster,
            crate::cluster::forward::route,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(kbs_web::error::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            http_metrics::track,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use kbs_core::identity::GuestIdentity;
    use kbs_core::token::build_claims;
    use serde_json::json;

    use std::time::Duration;

    use super::*;

    fn config(dir: &std::path::Path) -> Config {
        let mut config = Config::default();
        config.storage.data_dir = dir.to_path_buf();
        config
    }

    #[tokio::test]
    async fn expired_guests_leave_the_directory_with_rotation_disabled() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        config.plugins.disabled = vec!["rotation".into()];
        config.tunnel.directory_prune_interval = Duration::from_secs(1);
        let kbs = Kbs::build(config).await.unwrap();
        assert!(!kbs.state.plugins.is_enabled("rotation"));
        let identity = GuestIdentity {
            guest_id: "gone".into(),
            ..Default::default()
        };
        let key = kbs_types::TeePubKey::EC {
            crv: "P-256".into(),
            alg: "ECDH-ES+A256KW".into(),
            x: "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis".into(),
            y: "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE".into(),
        };
        let claims = build_claims("sample", json!({}), &key, "bm9uY2U=", None, &identity);
        let (_, token) = kbs
            .state
            .rcar
            .signer()
            .issue_verified(claims, Duration::ZERO)
            .unwrap();
        let directory = kbs.state.directory.clone();
        directory.record_proven(&token, 1);
        let shutdown = kbs.state.shutdown.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let serving = tokio::spawn(kbs.serve(listener));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while directory.get("gone").is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the expired guest was never pruned"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        serving.await.unwrap().unwrap();
    }

    /// issue 17 defect 14: the data directory was 0755 and the database 0644, and the admin
    /// key PKCS#8 v2, which OpenSSL 3.0 refuses. Every secret is the owner's only now, and
    /// `openssl pkey` reads the admin key.
    #[tokio::test]
    async fn the_data_directory_and_its_secrets_are_the_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut config = config(&data);
        config.http.tls = Some(crate::config::TlsConfig {
            self_signed: true,
            ..Default::default()
        });
        let kbs = Kbs::build(config).await.unwrap();
        let path = "default/key/x".parse().unwrap();
        kbs.state
            .store
            .put_resource(&path, b"secret", "test")
            .await
            .unwrap();
        let mode = |name: &str| {
            let meta = std::fs::symlink_metadata(data.join(name))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            meta.permissions().mode() & 0o777
        };
        let mut modes = Vec::new();
        for name in ["", "tls"] {
            modes.push((name, mode(name), 0o700));
        }
        for name in [
            "tether.db",
            "tether.db-wal",
            "tether.db-shm",
            "kek.key",
            "token.key",
            "admin.key",
            "tls/key.pem",
            STARTUP_LOCK,
        ] {
            modes.push((name, mode(name), 0o600));
        }
        modes.push(("admin.pub", mode("admin.pub"), 0o644));
        modes.push(("tls/cert.pem", mode("tls/cert.pem"), 0o644));
        let wrong: Vec<String> = modes
            .iter()
            .filter(|(_, got, want)| got != want)
            .map(|(name, got, want)| format!("{name}: {got:o}, expected {want:o}"))
            .collect();
        assert!(wrong.is_empty(), "{wrong:?}");

        match std::process::Command::new("openssl")
            .args(["pkey", "-noout", "-in"])
            .arg(data.join("admin.key"))
            .output()
        {
            Ok(out) => assert!(
                out.status.success(),
                "openssl pkey refuses the admin key: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("SKIPPED: openssl is not installed, the admin key was not read with it");
            }
            Err(e) => panic!("running openssl: {e}"),
        }
        drop(kbs);
    }

    #[tokio::test]
    async fn plugin_sections_are_checked_by_their_plugin_and_unknown_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let build = |section: &'static str, text: &'static str| {
            let mut config = config(dir.path());
            config.plugins.set(section, text).unwrap();
            Kbs::build(config)
        };
        let key_of = |e: StartError| match e {
            StartError::Config(ConfigError::Invalid { key, .. }) => key,
            other => panic!("not a config error naming a key: {other}"),
        };
        let err = build("splitapi", "validity = \"1h\"\nrenew_before = \"2h\"")
            .await
            .err()
            .unwrap();
        assert_eq!(key_of(err), "plugins.splitapi.renew_before");
        let err = build("splitapi", "validty = \"1h\"").await.err().unwrap();
        assert_eq!(key_of(err), "plugins.splitapi");
        let err = build("nope", "x = 1").await.err().unwrap();
        assert_eq!(key_of(err), "plugins.nope");
        let mut disabled = config(dir.path());
        disabled.plugins.disabled = vec!["nope".into()];
        let err = Kbs::build(disabled).await.err().unwrap();
        assert_eq!(key_of(err), "plugins.disabled[0]");
        let ok = build(
            "splitapi",
            "key_algorithm = \"ecdsa-p256\"\nvalidity = \"2d\"\nrenew_before = \"1d\"",
        )
        .await
        .unwrap();
        assert!(ok.state.plugins.is_enabled("splitapi"));
    }
}
