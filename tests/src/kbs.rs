//! A real KBS in process, on a loopback port (optionally with TLS) with its own data
//! directory, plus the clients that talk to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use guest_daemon::rcar::KbsClient;
use guest_daemon::run::RunConfig;
use guest_daemon::tee_key::TeeKeyPair;
use kbs_core::admin_key::AdminKeyPair;
use kbs_web::plugin::PluginSpec;
use server::admin_client::AdminClient;
use server::app::{Kbs, KbsHandles};
use server::config::{Config, TlsConfig};
use tokio::task::JoinHandle;
use tunnel::TunnelHandle;

use crate::wait::{WAIT, tunnel_of};

/// Development policy that lets the sample TEE through.
pub const ALLOW_SAMPLE: &str = include_str!("../../examples/policies/allow-sample.rego");

/// A config tweak for a development KBS: [`ALLOW_SAMPLE`] is its initial policy (written
/// beside the data directory), so sample-TEE guests may hold tunnels and fetch resources from
/// the first request on, as `policy.initial_policy_file` does for an operator.
pub fn allow_sample(config: &mut Config) {
    let file = config.storage.data_dir.with_file_name("allow-sample.rego");
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).expect("policy file directory");
    }
    std::fs::write(&file, ALLOW_SAMPLE).expect("write the development policy");
    config.policy.initial_policy_file = Some(file);
}

/// A running KBS.
pub struct TestKbs {
    /// Base URL (`http://127.0.0.1:port` or `https://localhost:port`).
    pub url: String,
    /// Listen address.
    pub addr: SocketAddr,
    /// Data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// CA certificate when TLS is on.
    pub ca_file: Option<PathBuf>,
    /// Handler state (for assertions on internals such as metrics).
    pub state: KbsHandles,
    config: Config,
    plugins: Option<PluginFactory>,
    task: JoinHandle<std::io::Result<()>>,
    /// The KBS's own runtime when it may crash ([`TestKbs::start_crashable`]).
    runtime: Option<OwnRuntime>,
    _dir: Option<tempfile::TempDir>,
}

/// A runtime only the KBS's tasks run on, so that a crash can drop them all at once: every
/// socket it holds closes with nothing more written, nothing is flushed, nothing drains (what
/// a killed process leaves), while the test's own tasks carry on.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-kbs")
            .enable_all()
            .build()
            .expect("KBS runtime");
        Self(Some(runtime))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().expect("runtime").handle().clone()
    }

    /// Drops every task of the KBS without running any of them again; returns once the
    /// worker threads have dropped them (so their sockets are closed).
    async fn crash(mut self) {
        let runtime = self.0.take().expect("runtime");
        tokio::task::spawn_blocking(move || runtime.shutdown_timeout(Duration::from_secs(5)))
            .await
            .expect("runtime shut down");
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async test may not do.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Plugins of a test's own, built anew at each (re)start.
pub type PluginFactory = Arc<dyn Fn() -> Vec<PluginSpec> + Send + Sync>;

/// Log to the test output once (RUST_LOG controls the level).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

impl TestKbs {
    /// Plain HTTP, default config.
    pub async fn start() -> Self {
        Self::start_with(false, |_| {}).await
    }

    /// TLS with a generated self-signed certificate.
    pub async fn start_tls() -> Self {
        Self::start_with(true, |_| {}).await
    }

    /// Plain HTTP, [`allow_sample`] as the initial policy.
    pub async fn start_dev() -> Self {
        Self::start_with(false, allow_sample).await
    }

    /// TLS, [`allow_sample`] as the initial policy.
    pub async fn start_dev_tls() -> Self {
        Self::start_with(true, allow_sample).await
    }

    /// Start with a config tweak.
    pub async fn start_with(tls: bool, tweak: impl FnOnce(&mut Config)) -> Self {
        let (config, dir) = Self::config(tls, tweak);
        Self::launch(config, None, Some(dir), false).await
    }

    /// Like [`start_with`](Self::start_with), on a runtime of its own, so that
    /// [`crash_and_restart`](Self::crash_and_restart) can kill it.
    pub async fn start_crashable(tls: bool, tweak: impl FnOnce(&mut Config)) -> Self {
        let (config, dir) = Self::config(tls, tweak);
        Self::launch(config, None, Some(dir), true).await
    }

    /// The test configuration: a fresh data directory, port 0, a self-signed certificate
    /// when `tls`, then `tweak`.
    fn config(tls: bool, tweak: impl FnOnce(&mut Config)) -> (Config, tempfile::TempDir) {
        init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.storage.data_dir = dir.path().join("data");
        config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        if tls {
            config.http.tls = Some(TlsConfig {
                self_signed: true,
                ..Default::default()
            });
        }
        tweak(&mut config);
        (config, dir)
    }

    /// Plain HTTP with plugins of the test's own after the built-in ones, and a config tweak.
    pub async fn start_with_plugins(
        plugins: PluginFactory,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.storage.data_dir = dir.path().join("data");
        config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        tweak(&mut config);
        Self::launch(config, Some(plugins), Some(dir), false).await
    }

    async fn launch(
        config: Config,
        plugins: Option<PluginFactory>,
        dir: Option<tempfile::TempDir>,
        own_runtime: bool,
    ) -> Self {
        let data_dir = config.storage.data_dir.clone();
        let runtime = own_runtime.then(OwnRuntime::new);
        let host = runtime
            .as_ref()
            .map_or_else(tokio::runtime::Handle::current, OwnRuntime::handle);
        // Bound here, registered with the KBS's runtime there. Right after a crash the old
        // socket may still be closing: retry briefly.
        let listener = bind(config.http.listen).await;
        let addr = listener.local_addr().expect("addr");
        let kbs = if own_runtime {
            // Built on its runtime too (whatever the build spawns dies with it). The plugin
            // specs are not Send: the factory makes them there.
            let (config, factory, host) = (config.clone(), plugins.clone(), host.clone());
            tokio::task::spawn_blocking(move || {
                host.block_on(async move {
                    let extra = factory.map(|f| f()).unwrap_or_default();
                    Kbs::build_with(config, extra).await
                })
            })
            .await
            .expect("KBS build task")
        } else {
            let extra = plugins.as_ref().map(|f| f()).unwrap_or_default();
            Kbs::build_with(config.clone(), extra).await
        }
        .expect("KBS builds");
        let tls = kbs.is_tls();
        let url = if tls {
            format!("https://localhost:{}", addr.port())
        } else {
            format!("http://{addr}")
        };
        let state = kbs.state.clone();
        let task = host.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            kbs.serve(listener).await
        });
        let mut config = config;
        config.http.listen = addr;
        Self {
            url,
            addr,
            ca_file: tls.then(|| data_dir.join("tls/cert.pem")),
            data_dir,
            state,
            config,
            plugins,
            task,
            runtime,
            _dir: dir,
        }
    }

    /// Stop serving (graceful), keeping the data directory.
    pub async fn stop(self) -> (Config, Option<tempfile::TempDir>) {
        let (config, _, dir) = self.stop_all().await;
        (config, dir)
    }

    async fn stop_all(mut self) -> (Config, Option<PluginFactory>, Option<tempfile::TempDir>) {
        self.state.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.task).await;
        (self.config, self.plugins.take(), self._dir.take())
    }

    /// Stop and start again on the same port and data directory (and the same plugins).
    pub async fn restart(self) -> Self {
        let own = self.runtime.is_some();
        let (config, plugins, dir) = self.stop_all().await;
        Self::launch(config, plugins, dir, own).await
    }

    /// Kill the KBS (no drain, no GoAway, no close frame, no flush: every task it had is
    /// dropped at once and its sockets close), then start it again on the same port and data
    /// directory, as a supervisor restarts a killed process. Only for a KBS started with
    /// [`start_crashable`](Self::start_crashable).
    pub async fn crash_and_restart(mut self) -> Self {
        let runtime = self
            .runtime
            .take()
            .expect("crash_and_restart needs TestKbs::start_crashable");
        runtime.crash().await;
        let config = self.config.clone();
        let plugins = self.plugins.take();
        let dir = self._dir.take();
        Self::launch(config, plugins, dir, true).await
    }

    /// The development admin key pair.
    pub fn admin_key(&self) -> AdminKeyPair {
        AdminKeyPair::load(&self.data_dir.join("admin.key")).expect("dev admin key")
    }

    /// An admin client with role `admin`.
    pub fn admin(&self) -> AdminClient {
        AdminClient::new(&self.url, self.admin_key(), self.ca_file.as_deref())
            .expect("admin client")
    }

    /// A raw HTTP client trusting this KBS's certificate, with a cookie store.
    pub fn http(&self) -> reqwest::Client {
        http_client(self.ca_file.as_deref())
    }

    /// Prometheus exposition text.
    pub async fn metrics(&self) -> String {
        self.http()
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// The value of `metric` (summed over samples whose labels contain `labels`).
    pub async fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        crate::metric_value(&self.metrics().await, metric, labels)
    }

    /// A guest's RCAR client for this KBS holding `key`, attesting `init_data` when given.
    pub fn rcar_client(&self, key: &TeeKeyPair, init_data: Option<&str>) -> KbsClient {
        crate::rcar_client(&self.url, self.ca_file.as_deref(), key, init_data)
            .expect("guest client")
    }

    /// An attestation token for `key` (sample TEE), with `init_data` when given.
    pub async fn attest(&self, key: &TeeKeyPair, init_data: Option<&str>) -> String {
        crate::attest(&self.url, self.ca_file.as_deref(), key, init_data)
            .await
            .expect("attestation")
    }

    /// A guest daemon's configuration for this KBS (URL, CA), keeping its state in
    /// `state_dir` and attesting `init_data`.
    pub fn daemon_config(&self, state_dir: &Path, init_data: Option<String>) -> RunConfig {
        let mut config = RunConfig::new(&self.url, state_dir);
        config.ca_file = self.ca_file.clone();
        config.init_data = init_data;
        config
    }

    /// The live tunnel of `guest_id`, once the hub has it (awaited on the hub's events).
    pub async fn tunnel(&self, guest_id: &str) -> Arc<TunnelHandle> {
        tunnel_of(&self.state.hub, WAIT, guest_id, |_| true).await
    }
}

/// A non-blocking std listener on `addr`, retried for a while when the port is still taken
/// (a crashed KBS's socket closing).
async fn bind(addr: SocketAddr) -> std::net::TcpListener {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => {
                listener.set_nonblocking(true).expect("non-blocking");
                return listener;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{addr} stays in use"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
}

/// A reqwest client (cookie store on) trusting `ca_file` if given.
pub fn http_client(ca_file: Option<&Path>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .cookie_store(true)
        .use_rustls_tls()
        .timeout(Duration::from_secs(30));
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).expect("ca file");
        b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("ca pem"));
    }
    b.build().expect("client")
}

impl TestKbs {
    /// The tunnel endpoint: `ws://127.0.0.1:port/kbs/v0/tunnel` or `wss://localhost:port/...`.
    pub fn tunnel_url(&self) -> String {
        tunnel_url(&self.url)
    }

    /// How a guest reaches this KBS's tunnel, trusting its CA (ring provider) over TLS.
    pub fn tunnel_config(&self) -> tunnel::GuestTunnelConfig {
        let config = tunnel::GuestTunnelConfig::new(self.tunnel_url());
        match &self.ca_file {
            Some(ca) => config.with_tls(tls_client_config(ca)),
            None => config,
        }
    }
}

/// The tunnel endpoint of the KBS at `base_url` (`http://...` -> `ws://.../kbs/v0/tunnel`).
pub fn tunnel_url(base_url: &str) -> String {
    let rest = base_url.strip_prefix("http").unwrap_or(base_url);
    format!("ws{rest}/kbs/v0/tunnel")
}

/// A rustls client configuration (ring provider) trusting only the certificates in `ca_file`.
pub fn tls_client_config(ca_file: &Path) -> Arc<rustls::ClientConfig> {
    let bundle = guest_daemon::tls::CaBundle::from_pem_file(ca_file).expect("CA file");
    let mut roots = rustls::RootCertStore::empty();
    bundle
        .add_to_root_store(&mut roots)
        .expect("CA certificates");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}
