//! KBS configuration: a TOML file, `KBS_*` environment overrides and command-line flags,
//! validated once at start with messages that name the offending key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors found while loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema (unknown key, wrong type).
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A value is out of range or inconsistent; the string names the key.
    #[error("invalid configuration key `{key}`: {reason}")]
    Invalid {
        /// Dotted key path.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// The whole KBS configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// HTTP listener settings.
    pub http: HttpConfig,
    /// Storage settings.
    pub storage: StorageConfig,
    /// RCAR and token settings.
    pub attestation: AttestationConfig,
    /// Admin authentication and roles.
    pub admin: AdminConfig,
    /// Resource policy settings.
    pub policy: PolicyConfig,
    /// Reverse tunnel settings.
    pub tunnel: TunnelConfig,
    /// The fleet view: how long guests that are gone are kept.
    pub fleet: FleetConfig,
    /// Several replicas: where the others reach this one (`[cluster]`).
    pub cluster: ClusterConfig,
    /// Logging settings.
    pub log: LogConfig,
    /// Plugin defaults and per-plugin settings.
    pub plugins: PluginsConfig,
}

pub use crate::attestation::{
    AppraisalConfig, CollateralConfig, ExternalConfig, SnpConfig, TdxConfig,
};
pub use kbs_web::admin_auth::{AdminConfig, AdminKeyConfig};

/// HTTP listener settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest accepted request body, bytes.
    pub max_body_bytes: usize,
    /// TLS; plain HTTP when absent.
    pub tls: Option<TlsConfig>,
    /// Time allowed for in-flight requests to finish on shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Time a client has to finish its TLS handshake.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// Time a connection (after TLS) has to send the first bytes of its first request.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Time an HTTP/1 client has to send a request's headers (also the longest wait for the
    /// next request on a kept-alive HTTP/1 connection).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time a request body has to arrive whole, from the request's start (408 past it).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/1 and HTTP/2).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most sockets the KBS holds, guest tunnels included. Unset: as many as the open-file
    /// limit allows (its soft limit, raised to the hard limit at start, minus a reserve of
    /// 256); set: that number, lowered to the same bound if it is above it.
    pub max_connections: Option<usize>,
    /// Most sockets not upgraded to a tunnel (TLS handshakes, requests, idle keep-alive).
    /// The rest of `max_connections` is kept for tunnels; at this cap a new connection
    /// closes the oldest idle one.
    pub max_http_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1024 * 1024,
            tls: None,
            shutdown_grace: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: None,
            max_http_connections: 1024,
        }
    }
}

/// TLS settings: either certificate and key files, or a generated self-signed pair (dev only).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// Generate (once) a self-signed pair under the data dir; for development.
    pub self_signed: bool,
    /// Extra DNS names / IPs for the self-signed certificate (localhost and 127.0.0.1 are always in).
    pub self_signed_names: Vec<String>,
}

/// Storage settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory for the database and generated keys.
    pub data_dir: PathBuf,
    /// Database URL; its scheme picks the engine: `sqlite://<path>` (default
    /// `sqlite://<data_dir>/tether.db`) or `postgres://` / `postgresql://` (several replicas
    /// share one database). A password in it is never logged.
    pub database_url: Option<String>,
    /// File holding the 32-byte key-encryption key (hex); generated when missing.
    pub kek_file: Option<PathBuf>,
    /// PostgreSQL: how long `kbs` waits at start for a database it cannot reach (with
    /// backoff; `/healthz` answers, `/readyz` is 503) before it exits; 0 tries once.
    pub connect_wait_secs: u64,
    /// PostgreSQL: connections this replica holds at most.
    pub max_connections: u32,
    /// PostgreSQL: how long a request waits for a connection before a 503.
    pub acquire_timeout_ms: u64,
    /// PostgreSQL: server-side bound on one statement.
    pub statement_timeout_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        let pool = kbs_core::storage::PoolSettings::default();
        Self {
            data_dir: PathBuf::from("./data"),
            database_url: None,
            kek_file: None,
            connect_wait_secs: 60,
            max_connections: pool.max_connections,
            acquire_timeout_ms: pool.acquire_timeout.as_millis() as u64,
            statement_timeout_ms: pool.statement_timeout.as_millis() as u64,
        }
    }
}

impl StorageConfig {
    /// The database URL in force.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("tether.db").display()))
    }

    /// The PostgreSQL pool's settings.
    pub fn pool(&self) -> kbs_core::storage::PoolSettings {
        kbs_core::storage::PoolSettings {
            max_connections: self.max_connections,
            acquire_timeout: Duration::from_millis(self.acquire_timeout_ms),
            statement_timeout: Duration::from_millis(self.statement_timeout_ms),
        }
    }

    /// Path of the key-encryption key file.
    pub fn kek_path(&self) -> PathBuf {
        self.kek_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("kek.key"))
    }
}

/// RCAR and attestation token settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttestationConfig {
    /// Lifetime of an RCAR challenge (auth -> attest); the session then lives as long as
    /// its token.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Lifetime of an attestation token (`exp`).
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Largest init-data body accepted, bytes.
    pub max_init_data_bytes: usize,
    /// Enabled verifiers by TEE name.
    pub verifiers: Vec<String>,
    /// Token signing key (PKCS#8 PEM, P-256); generated when missing. Default `<data_dir>/token.key`.
    pub signing_key_file: Option<PathBuf>,
    /// Where TDX and SNP collateral comes from.
    pub collateral: CollateralConfig,
    /// The appraisal policy.
    pub appraisal: AppraisalConfig,
    /// The TDX verifier's root CA (Intel's unless set).
    pub tdx: TdxConfig,
    /// The SNP verifier's roots per processor generation (AMD's unless set).
    pub snp: SnpConfig,
    /// External attestation services whose tokens are trusted (passport mode).
    pub external: Vec<ExternalConfig>,
}

impl Default for AttestationConfig {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(300),
            token_ttl: Duration::from_secs(300),
            max_init_data_bytes: 64 * 1024,
            verifiers: vec!["sample".to_string()],
            signing_key_file: None,
            collateral: CollateralConfig::default(),
            appraisal: AppraisalConfig::default(),
            tdx: TdxConfig::default(),
            snp: SnpConfig::default(),
            external: Vec::new(),
        }
    }
}

/// Resource policy settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Rego file installed at first start when storage holds no policy yet.
    pub initial_policy_file: Option<PathBuf>,
}

/// Reverse tunnel settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    /// Heartbeat (WebSocket ping) interval.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Largest tunnel frame the KBS sends, bytes (a pushed resource must fit in one).
    pub max_frame_bytes: usize,
    /// Largest tunnel frame a guest may send, bytes (answers and tokens). A value above
    /// `max_frame_bytes` is clamped to it, so lowering `max_frame_bytes` alone stays valid.
    /// It also bounds the read buffer a guest can make its tunnel keep.
    pub max_guest_frame_bytes: usize,
    /// Most RPC calls in flight per tunnel.
    pub max_in_flight: usize,
    /// Default deadline of one RPC call.
    #[serde(with = "humantime_serde")]
    pub call_deadline: Duration,
    /// Most frames queued for writing to one guest.
    pub write_queue: usize,
    /// WebSocket read buffer per tunnel, bytes. Every idle tunnel holds one; a frame larger
    /// than it is still read whole (the buffer grows for it), so this trades idle memory
    /// against read calls under heavy pipelining (no measurable difference between 1 and
    /// 4 KiB with 64 calls in flight, see the README's benchmarks).
    pub read_buffer_bytes: usize,
    /// How often the claims and TEE keys of guests whose tunnel is gone and whose token has
    /// expired are forgotten (whatever plugins are enabled).
    #[serde(with = "humantime_serde")]
    pub directory_prune_interval: Duration,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(20),
            max_frame_bytes: 1024 * 1024,
            max_guest_frame_bytes: 256 * 1024,
            max_in_flight: 64,
            call_deadline: Duration::from_secs(10),
            write_queue: 128,
            read_buffer_bytes: 1024,
            directory_prune_interval: Duration::from_secs(30),
        }
    }
}

/// Several replicas on PostgreSQL (`[cluster]`): an admin call for one guest that lands on
/// a replica not holding its tunnel is forwarded to the one that does (docs/operations.md,
/// "Several replicas").
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The URL the other replicas reach this one at (`http://10.0.0.5:8080`); default: the
    /// listen address (`127.0.0.1` for an unspecified one), with `https` when TLS is on.
    pub advertise_url: Option<String>,
    /// Deadline on one forwarded call, the owner's answer included.
    #[serde(with = "humantime_serde")]
    pub forward_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            advertise_url: None,
            forward_timeout: Duration::from_secs(30),
        }
    }
}

/// The fleet view's retention (`[fleet]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// A guest without a tunnel that has not been seen for this long is forgotten: its fleet
    /// record and its rotation sighting leave memory and the database (a rollout in force that
    /// still waits for it keeps it until that rollout ends).
    #[serde(with = "humantime_serde")]
    pub forget_after: Duration,
    /// How often the KBS looks for guests to forget (bounded work per look).
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        let r = kbs_core::fleet::Retention::default();
        Self {
            forget_after: r.forget_after,
            sweep_interval: r.sweep_every,
        }
    }
}

impl FleetConfig {
    /// As the fleet's retention.
    pub fn retention(&self) -> kbs_core::fleet::Retention {
        kbs_core::fleet::Retention {
            forget_after: self.forget_after,
            sweep_every: self.sweep_interval,
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// Filter directive (overridden by `RUST_LOG`).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".to_string(),
        }
    }
}

/// Plugin defaults and per-plugin settings (`[plugins]`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PluginsConfig {
    /// Plugins disabled until an admin enables them (a stored enable/disable decision wins).
    pub disabled: Vec<String>,
    /// Each plugin's own section (`[plugins.<name>]`), parsed and validated by that plugin
    /// when the KBS is built; a section naming no plugin is refused then.
    #[serde(flatten)]
    pub sections: BTreeMap<String, toml::Value>,
}

impl PluginsConfig {
    /// Sets keys of `[plugins.<plugin>]` from TOML text, as a config file would (later keys
    /// win); checked when the KBS is built, like the file.
    pub fn set(&mut self, plugin: &str, toml_text: &str) -> Result<(), ConfigError> {
        let table: toml::Table = toml_text
            .parse()
            .map_err(|e| ConfigError::Parse(format!("plugins.{plugin}: {e}")))?;
        let entry = self
            .sections
            .entry(plugin.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section) = entry else {
            return Err(invalid(&format!("plugins.{plugin}"), "is not a table"));
        };
        section.extend(table);
        Ok(())
    }
}

/// Largest `attestation.max_init_data_bytes`: the token carries the whole init-data as JSON,
/// base64url-encoded (4/3), and is at most `MAX_TOKEN_BYTES` (128 KiB); beyond 96 KiB of
/// init-data no token could fit.
const MAX_INIT_DATA_BYTES: usize = 96 * 1024;

/// Prefix of environment variables that override config keys:
/// `KBS_HTTP__LISTEN=0.0.0.0:8080` sets `http.listen`. Only names with a `__` (section and
/// key) are config keys: `KBS_URL`, `KBS_CA_FILE` and the other variables `kbsctl` and the
/// binaries read for themselves are not, so exporting them never stops `kbs` from starting.
pub const ENV_PREFIX: &str = "KBS_";

impl Config {
    /// Load from an optional TOML file, then apply `KBS_*` environment overrides.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse(format!("{}: {e}", path.display())))?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if !rest.contains("__") {
                continue;
            }
            let keys: Vec<String> = rest.split("__").map(|k| k.to_ascii_lowercase()).collect();
            set_path(&mut table, &keys, parse_env_value(&value))
                .map_err(|reason| invalid(&format!("{name} ({})", keys.join(".")), reason))?;
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.message().to_string()))?;
        Ok(config)
    }

    /// Check values that serde cannot: ranges, file presence, regexes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.storage.database_url {
            kbs_core::storage::Engine::of(url)
                .map_err(|e| invalid("storage.database_url", e.to_string()))?;
        }
        let st = &self.storage;
        if !(1..=1000).contains(&st.max_connections) {
            return Err(invalid(
                "storage.max_connections",
                "must be within 1..=1000",
            ));
        }
        if !(100..=600_000).contains(&st.acquire_timeout_ms) {
            return Err(invalid(
                "storage.acquire_timeout_ms",
                "must be within 100..=600000 (100 ms to 10 minutes)",
            ));
        }
        if !(100..=86_400_000).contains(&st.statement_timeout_ms) {
            return Err(invalid(
                "storage.statement_timeout_ms",
                "must be within 100..=86400000 (100 ms to a day)",
            ));
        }
        if st.connect_wait_secs > 86_400 {
            return Err(invalid(
                "storage.connect_wait_secs",
                "must be at most 86400 (a day)",
            ));
        }
        if self.http.max_body_bytes < 1024 {
            return Err(invalid("http.max_body_bytes", "must be at least 1024"));
        }
        let h = &self.http;
        for (key, value) in [
            ("http.tls_handshake_timeout", h.tls_handshake_timeout),
            ("http.first_byte_timeout", h.first_byte_timeout),
            ("http.header_timeout", h.header_timeout),
            ("http.body_timeout", h.body_timeout),
            ("http.idle_timeout", h.idle_timeout),
        ] {
            if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&value) {
                return Err(invalid(key, "must be within 100ms..=1h"));
            }
        }
        if h.max_connections.is_some_and(|n| n < 2) {
            return Err(invalid("http.max_connections", "must be at least 2"));
        }
        if h.max_http_connections == 0
            || h.max_connections
                .is_some_and(|n| h.max_http_connections >= n)
        {
            return Err(invalid(
                "http.max_http_connections",
                format!(
                    "must be at least 1 and below http.max_connections ({}): the difference is kept for guest tunnels",
                    h.max_connections.unwrap_or_default()
                ),
            ));
        }
        if let Some(tls) = &self.http.tls {
            match (&tls.cert_file, &tls.key_file, tls.self_signed) {
                (Some(_), Some(_), false) | (None, None, true) => {}
                (_, _, true) => {
                    return Err(invalid(
                        "http.tls.self_signed",
                        "cannot be combined with cert_file/key_file",
                    ));
                }
                _ => {
                    return Err(invalid(
                        "http.tls",
                        "set both cert_file and key_file, or self_signed = true",
                    ));
                }
            }
            for (key, file) in [
                ("http.tls.cert_file", &tls.cert_file),
                ("http.tls.key_file", &tls.key_file),
            ] {
                if let Some(file) = file
                    && !file.is_file()
                {
                    return Err(invalid(
                        key,
                        format!("{} is not a readable file", file.display()),
                    ));
                }
            }
        }
        let a = &self.attestation;
        if a.session_ttl < Duration::from_secs(1) {
            return Err(invalid("attestation.session_ttl", "must be at least 1s"));
        }
        if a.token_ttl < Duration::from_secs(10) {
            return Err(invalid("attestation.token_ttl", "must be at least 10s"));
        }
        if a.max_init_data_bytes > MAX_INIT_DATA_BYTES {
            return Err(invalid(
                "attestation.max_init_data_bytes",
                format!(
                    "must be at most {MAX_INIT_DATA_BYTES}: the token carries the whole init-data \
                     and is at most {} bytes",
                    kbs_core::token::MAX_TOKEN_BYTES
                ),
            ));
        }
        for (i, v) in a.verifiers.iter().enumerate() {
            if !kbs_core::verifiers::KNOWN.contains(&v.as_str()) {
                return Err(invalid(
                    &format!("attestation.verifiers[{i}]"),
                    format!(
                        "unknown verifier `{v}` (known: {})",
                        kbs_core::verifiers::KNOWN.join(", ")
                    ),
                ));
            }
        }
        a.collateral
            .validate()
            .map_err(|(key, reason)| invalid(&key, reason))?;
        let mut names = std::collections::BTreeSet::new();
        for (i, external) in a.external.iter().enumerate() {
            external
                .validate(i)
                .map_err(|(key, reason)| invalid(&key, reason))?;
            if !names.insert(external.name.as_str()) {
                return Err(invalid(
                    &format!("attestation.external[{i}].name"),
                    format!("`{}` is configured twice", external.name),
                ));
            }
        }
        if let Some(f) = &a.appraisal.initial_policy_file
            && !f.is_file()
        {
            return Err(invalid(
                "attestation.appraisal.initial_policy_file",
                format!("{} is not a readable file", f.display()),
            ));
        }
        if self.admin.keys.is_empty() && !self.admin.dev_key {
            return Err(invalid(
                "admin.keys",
                "no admin key configured and admin.dev_key = false: nobody could administer this KBS",
            ));
        }
        for (i, key) in self.admin.keys.iter().enumerate() {
            if !key.public_key_file.is_file() {
                return Err(invalid(
                    &format!("admin.keys[{i}].public_key_file"),
                    format!("{} is not a readable file", key.public_key_file.display()),
                ));
            }
        }
        for (role, rules) in &self.admin.roles {
            for (i, rule) in rules.iter().enumerate() {
                kbs_web::admin_auth::RoleRule::parse(rule)
                    .map_err(|reason| invalid(&format!("admin.roles.{role}[{i}]"), reason))?;
            }
        }
        let t = &self.tunnel;
        if t.heartbeat < Duration::from_secs(1) {
            return Err(invalid("tunnel.heartbeat", "must be at least 1s"));
        }
        if !(4096..=64 * 1024 * 1024).contains(&t.max_frame_bytes) {
            return Err(invalid(
                "tunnel.max_frame_bytes",
                "must be within 4 KiB..64 MiB",
            ));
        }
        if t.max_guest_frame_bytes < 4096 {
            return Err(invalid(
                "tunnel.max_guest_frame_bytes",
                "must be at least 4 KiB",
            ));
        }
        if t.max_in_flight == 0 || t.write_queue == 0 {
            return Err(invalid("tunnel.max_in_flight", "limits must be positive"));
        }
        if t.directory_prune_interval < Duration::from_secs(1) {
            return Err(invalid(
                "tunnel.directory_prune_interval",
                "must be at least 1s",
            ));
        }
        if !(256..=1024 * 1024).contains(&t.read_buffer_bytes) {
            return Err(invalid(
                "tunnel.read_buffer_bytes",
                "must be within 256 B..1 MiB",
            ));
        }
        let f = &self.fleet;
        if f.forget_after < Duration::from_secs(1)
            || f.forget_after > Duration::from_secs(100 * 365 * 24 * 3600)
        {
            return Err(invalid("fleet.forget_after", "must be within 1s..=100y"));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(24 * 3600)).contains(&f.sweep_interval) {
            return Err(invalid("fleet.sweep_interval", "must be within 1s..=1d"));
        }
        if let Some(url) = &self.cluster.advertise_url {
            let ok = reqwest::Url::parse(url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !ok {
                return Err(invalid(
                    "cluster.advertise_url",
                    "must be an http:// or https:// URL with a host",
                ));
            }
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600))
            .contains(&self.cluster.forward_timeout)
        {
            return Err(invalid(
                "cluster.forward_timeout",
                "must be within 1s..=10m",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(())
    }
}

/// Environment values are TOML scalars when they parse as such (numbers, booleans,
/// arrays), strings otherwise.
fn parse_env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = keys.split_last() else {
        return Err("empty key".to_string());
    };
    let mut cur = table;
    for k in parents {
        let entry = cur
            .entry(k.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{k}` is not a table"))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kbs.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn cluster_settings_load_from_the_file_and_the_environment_and_are_checked() {
        let c = load(
            "[cluster]\nforward_timeout = \"5s\"\n",
            &[("KBS_CLUSTER__ADVERTISE_URL", "http://10.0.0.5:8081")],
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.cluster.advertise_url.as_deref(),
            Some("http://10.0.0.5:8081")
        );
        assert_eq!(c.cluster.forward_timeout, Duration::from_secs(5));
        assert_eq!(Config::default().cluster.advertise_url, None);
        for (text, key) in [
            (
                "[cluster]\nadvertise_url = \"10.0.0.5:8081\"\n",
                "cluster.advertise_url",
            ),
            (
                "[cluster]\nadvertise_url = \"ftp://x\"\n",
                "cluster.advertise_url",
            ),
            (
                "[cluster]\nforward_timeout = \"0s\"\n",
                "cluster.forward_timeout",
            ),
        ] {
            let err = load(text, &[]).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        assert!(load("[cluster]\nadvertise = \"x\"\n", &[]).is_err());
    }

    #[test]
    fn empty_config_is_the_dev_default() {
        let c = Config::load(None, Vec::new()).unwrap();
        c.validate().unwrap();
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:8080");
        assert!(c.admin.dev_key);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load("[http]\nlisten = \"127.0.0.1:1\"\nlisn = 3\n", &[]).unwrap_err();
        assert!(err.to_string().contains("lisn"), "{err}");
    }

    #[test]
    fn env_overrides_file_and_parses_scalars() {
        let c = load(
            "[http]\nmax_body_bytes = 5000\n",
            &[
                ("KBS_HTTP__MAX_BODY_BYTES", "9000"),
                ("KBS_ATTESTATION__TOKEN_TTL", "2m"),
                ("KBS_URL", "x"),
                // kbsctl's own variables, exported in the same shell (README walk-through).
                ("KBS_CA_FILE", "./data-tls/tls/cert.pem"),
                ("KBS_ROLE", "admin"),
                ("KBS_SUBJECT", "ops"),
            ],
        )
        .unwrap();
        assert_eq!(c.http.max_body_bytes, 9000);
        assert_eq!(c.attestation.token_ttl, Duration::from_secs(120));
    }

    #[test]
    fn the_database_url_comes_from_the_environment_and_names_an_engine() {
        let url = "postgres://tether:s3cret@db.example:5432/tether?sslmode=require";
        let c = load("", &[("KBS_STORAGE__DATABASE_URL", url)]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.storage.database_url(), url);
        let c = load("[storage]\ndatabase_url = \"mysql://u:s3cret@db/t\"\n", &[]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("storage.database_url"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn pool_settings_come_from_the_environment_and_are_checked() {
        let c = load(
            "[storage]\nmax_connections = 4\n",
            &[
                ("KBS_STORAGE__ACQUIRE_TIMEOUT_MS", "750"),
                ("KBS_STORAGE__STATEMENT_TIMEOUT_MS", "5000"),
                ("KBS_STORAGE__CONNECT_WAIT_SECS", "0"),
            ],
        )
        .unwrap();
        c.validate().unwrap();
        let pool = c.storage.pool();
        assert_eq!(pool.max_connections, 4);
        assert_eq!(pool.acquire_timeout, Duration::from_millis(750));
        assert_eq!(pool.statement_timeout, Duration::from_secs(5));
        assert_eq!(c.storage.connect_wait_secs, 0);
        let d = Config::load(None, Vec::new()).unwrap();
        assert_eq!(d.storage.connect_wait_secs, 60, "the documented default");
        assert_eq!(d.storage.pool(), kbs_core::storage::PoolSettings::default());
        for (env, key) in [
            ("KBS_STORAGE__MAX_CONNECTIONS", "storage.max_connections"),
            (
                "KBS_STORAGE__ACQUIRE_TIMEOUT_MS",
                "storage.acquire_timeout_ms",
            ),
            (
                "KBS_STORAGE__STATEMENT_TIMEOUT_MS",
                "storage.statement_timeout_ms",
            ),
        ] {
            let c = load("", &[(env, "0")]).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        let c = load("", &[("KBS_STORAGE__CONNECT_WAIT_SECS", "100000")]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("storage.connect_wait_secs"), "{err}");
    }

    #[test]
    fn unknown_env_key_is_named() {
        let err = load("", &[("KBS_HTTP__NOPE", "1")]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let c = load("[tunnel]\nheartbeat = \"0s\"\n", &[]).unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("tunnel.heartbeat"), "{err}");
        let c = load("[tunnel]\nread_buffer_bytes = 16\n", &[]).unwrap();
        let err = c.validate().unwrap_err();
        assert!(
            err.to_string().contains("tunnel.read_buffer_bytes"),
            "{err}"
        );
        // Lowering only the KBS's own limit stays valid: the guest limit is clamped to it.
        let c = load("[tunnel]\nmax_frame_bytes = 65536\n", &[]).unwrap();
        c.validate().unwrap();
        let c = load("[tunnel]\nmax_guest_frame_bytes = 1024\n", &[]).unwrap();
        let err = c.validate().unwrap_err();
        assert!(
            err.to_string().contains("tunnel.max_guest_frame_bytes"),
            "{err}"
        );
        let c = load("[admin.roles]\nops = [\"GET ([\"]\n", &[]).unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("admin.roles.ops[0]"), "{err}");
        // Plugin sections are kept as tables here; each plugin checks its own when the KBS
        // is built (see the app's tests).
        let c = load(
            "[plugins]\ndisabled = [\"probes\"]\n[plugins.splitapi]\nvalidity = \"2d\"\n",
            &[("KBS_PLUGINS__PKI__VALIDITY", "3d")],
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.plugins.disabled, ["probes"]);
        assert_eq!(
            c.plugins.sections["splitapi"]["validity"].as_str(),
            Some("2d")
        );
        assert_eq!(c.plugins.sections["pki"]["validity"].as_str(), Some("3d"));
        for (text, key) in [
            ("[http]\nidle_timeout = \"0s\"\n", "http.idle_timeout"),
            (
                "[http]\nfirst_byte_timeout = \"2h\"\n",
                "http.first_byte_timeout",
            ),
            ("[http]\nmax_connections = 1\n", "http.max_connections"),
            (
                "[http]\nmax_http_connections = 0\n",
                "http.max_http_connections",
            ),
            (
                "[http]\nmax_connections = 100\nmax_http_connections = 100\n",
                "http.max_http_connections",
            ),
        ] {
            let err = load(text, &[]).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let c = load(
            "[http]\nbody_timeout = \"5s\"\nmax_connections = 100\nmax_http_connections = 10\n",
            &[],
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.http.body_timeout, Duration::from_secs(5));
        let c = load(
            "[fleet]\nforget_after = \"7d\"\n",
            &[("KBS_FLEET__SWEEP_INTERVAL", "5m")],
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.fleet.retention().forget_after,
            Duration::from_secs(7 * 24 * 3600)
        );
        assert_eq!(c.fleet.retention().sweep_every, Duration::from_secs(300));
        assert_eq!(
            Config::default().fleet.forget_after,
            Duration::from_secs(30 * 24 * 3600),
            "30 days by default"
        );
        for (text, key) in [
            ("[fleet]\nforget_after = \"0s\"\n", "fleet.forget_after"),
            ("[fleet]\nsweep_interval = \"2d\"\n", "fleet.sweep_interval"),
        ] {
            let err = load(text, &[]).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let c = load("[attestation]\nmax_init_data_bytes = 200000\n", &[]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("attestation.max_init_data_bytes"), "{err}");
        let c = load("[attestation]\nverifiers = [\"sgx-magic\"]\n", &[]).unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("attestation.verifiers[0]")
        );
    }

    #[test]
    fn attestation_sections_are_checked_naming_the_key() {
        let c = load(
            "[attestation]\nverifiers = [\"tdx\", \"snp\"]\n[attestation.collateral]\npccs_url = \"https://pccs.example:8081\"\nrefresh_before = \"2h\"\n",
            &[],
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.attestation.collateral.refresh_before,
            Duration::from_secs(7200)
        );
        let err_of = |text: &str| load(text, &[]).unwrap().validate().unwrap_err().to_string();
        let err = err_of("[attestation.collateral]\nkds_url = \"ftp://x\"\n");
        assert!(err.contains("attestation.collateral.kds_url"), "{err}");
        let err = err_of("[attestation.collateral]\noffline_dir = \"/nonexistent/tether\"\n");
        assert!(err.contains("attestation.collateral.offline_dir"), "{err}");
        let err = err_of("[[attestation.external]]\nname = \"as\"\n");
        assert!(err.contains("attestation.external[0].jwks_file"), "{err}");
        let err = err_of(
            "[[attestation.external]]\nname = \"as\"\njwks_url = \"https://as/jwks\"\n[[attestation.external]]\nname = \"as\"\njwks_url = \"https://as/jwks\"\n",
        );
        assert!(err.contains("attestation.external[1].name"), "{err}");
        assert!(load("[attestation.collateral]\npccs = \"x\"\n", &[]).is_err());
    }
}
