//! `guest-daemon run`: the supervisor that keeps one tunnel to the KBS open and serves the
//! KBS's calls on it (PROTOCOL.md section 4).
//!
//! The loop: attest (RCAR) -> open the tunnel (`/kbs/v0/tunnel`, the token as Bearer, proof of
//! possession of the TEE key) -> serve [`GuestDaemonService`], re-attesting before the token
//! expires and sending the fresh token in band (`Reauth`). When the tunnel ends, for any
//! reason, it reconnects after a [`Backoff`] delay (exponential with full jitter, the server's
//! GoAway delay honoured, reset after a stable connection), attesting again first when the
//! close asks for it (4401) or the token is near expiry. A KBS that is down is just another
//! failed attempt. Only start-up problems (state directory, TEE key, URL, CA file, init-data)
//! end [`run`] with an error; otherwise it runs until `shutdown` is cancelled, then closes the
//! tunnel normally (1000).
//!
//! Every state change is logged and published as a [`DaemonState`] on a watch channel
//! ([`RunConfig::subscribe`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use rpc_defs::{CloseCode, GuestInfo};
use tokio::sync::watch;
use tokio::task::JoinError;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tunnel::{
    Backoff, CloseInfo, Closed, GuestTunnel, GuestTunnelConfig, ReauthError, ReconnectPolicy,
    TunnelSession,
};
use zeroize::Zeroizing;

use crate::evidence::{EvidenceProvider, SampleAttester};
use crate::hook::PostApplyHook;
use crate::rcar::{KbsClient, KbsClientBuilder, RcarError};
use crate::service::GuestDaemonService;
use crate::splitapi::{GuestIdentity, SplitApiConfig, SplitApiStatus};
use crate::store::{StateStore, StoreError};
use crate::tee_key::{KeyAlgorithm, TeeKeyPair};
use crate::tls::{CaBundle, TlsError};

/// Default state directory. It is on tmpfs on a normal Linux guest, so the TEE key and the
/// plaintext resources never reach a (possibly unencrypted) disk; it survives daemon restarts
/// (same key, same held versions) but not a reboot, after which the guest attests afresh and
/// the KBS pushes again.
pub const DEFAULT_STATE_DIR: &str = "/run/tether";
/// Path of the tunnel endpoint under the KBS base URL.
pub const TUNNEL_PATH: &str = "/kbs/v0/tunnel";
/// Services announced in the tunnel handshake (informational); `splitapi` is added when
/// the splitapi endpoint is on ([`RunConfig::splitapi`]).
pub const SERVICES: &[&str] = &["resources", "credentials"];
/// A token is refreshed at least this long before it expires (when its lifetime allows).
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Shortest refresh delay, so a token with a tiny (or skewed) lifetime cannot spin RCAR.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Longest wait for the tunnel to finish its closing handshake on shutdown.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Bounds of the delay before retrying a failed in-band re-attestation.
const MIN_REFRESH_RETRY: Duration = Duration::from_secs(1);
const MAX_REFRESH_RETRY: Duration = Duration::from_secs(10);
/// WebSocket close code of a normal close.
const NORMAL_CLOSE: u16 = 1000;

/// Settings of the run loop. Build with [`RunConfig::new`] and adjust the public fields.
pub struct RunConfig {
    /// KBS base URL (`http://` or `https://`, without `/kbs/v0`).
    pub kbs_url: String,
    /// Init-data TOML sent with each attestation (`[tether] guest_id`, labels).
    pub init_data: Option<String>,
    /// State directory: TEE key, resources, credentials, secrets.
    pub state_dir: PathBuf,
    /// PEM file of extra roots trusted for an `https` KBS (on top of the webpki roots).
    pub ca_file: Option<PathBuf>,
    /// Algorithm of a newly created TEE key (an existing key file is kept as it is).
    pub key_alg: KeyAlgorithm,
    /// Command run after each newly applied resource version.
    pub hook: Option<PostApplyHook>,
    /// Where the evidence comes from; its TEE kind is the one attested.
    pub evidence: Box<dyn EvidenceProvider>,
    /// Reconnect backoff (0.5 s doubling to 30 s, reset after 30 s up).
    pub reconnect: ReconnectPolicy,
    /// The splitapi endpoint, started when a `splitapi` bundle is held; `None` turns it off
    /// and `splitapi` is then not announced to the KBS (which then pushes no bundle).
    pub splitapi: Option<SplitApiConfig>,
    /// Listen address of the CDH-compatible resource endpoint; `None` turns it off.
    pub cdh_listen: Option<SocketAddr>,
    /// Offer the `tether.v2` tunnel (a push key in the challenge, so rotation pushes open
    /// without an asymmetric operation); false offers only `tether.v1` (true).
    pub push_key: bool,
    state: watch::Sender<DaemonState>,
    splitapi_status: watch::Sender<SplitApiStatus>,
    cdh_addr: watch::Sender<Option<SocketAddr>>,
}

impl std::fmt::Debug for RunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunConfig")
            .field("kbs_url", &self.kbs_url)
            .field("init_data", &self.init_data.is_some())
            .field("state_dir", &self.state_dir)
            .field("ca_file", &self.ca_file)
            .field("key_alg", &self.key_alg)
            .field("hook", &self.hook.as_ref().map(PostApplyHook::command))
            .field("tee", &self.evidence.tee())
            .field("reconnect", &self.reconnect)
            .field("splitapi", &self.splitapi)
            .field("cdh_listen", &self.cdh_listen)
            .field("push_key", &self.push_key)
            .finish_non_exhaustive()
    }
}

impl RunConfig {
    /// Defaults: no init-data, no CA file, an EC key, no hook, the sample attester,
    /// [`default_reconnect_policy`], no splitapi and no CDH endpoint (the command line turns
    /// both on by default).
    pub fn new(kbs_url: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        let (state, _) = watch::channel(DaemonState::Starting);
        Self {
            kbs_url: kbs_url.into(),
            init_data: None,
            state_dir: state_dir.into(),
            ca_file: None,
            key_alg: KeyAlgorithm::EcP256,
            hook: None,
            evidence: Box::new(SampleAttester),
            reconnect: default_reconnect_policy(),
            splitapi: None,
            cdh_listen: None,
            push_key: true,
            state,
            splitapi_status: watch::channel(SplitApiStatus::default()).0,
            cdh_addr: watch::channel(None).0,
        }
    }

    /// Follow the splitapi endpoint (bound address, credentials in use, last error).
    pub fn subscribe_splitapi(&self) -> watch::Receiver<SplitApiStatus> {
        self.splitapi_status.subscribe()
    }

    /// The CDH endpoint's bound address, once it listens.
    pub fn subscribe_cdh(&self) -> watch::Receiver<Option<SocketAddr>> {
        self.cdh_addr.subscribe()
    }

    /// Follow the daemon's state (starts at [`DaemonState::Starting`]).
    pub fn subscribe(&self) -> watch::Receiver<DaemonState> {
        self.state.subscribe()
    }
}

/// The protocol's backoff (0.5 s doubling to 30 s) with a connection counted as stable, and
/// the backoff reset, after 30 s.
pub fn default_reconnect_policy() -> ReconnectPolicy {
    ReconnectPolicy {
        stable_after: Duration::from_secs(30),
        ..ReconnectPolicy::default()
    }
}

/// Where the run loop is; every change is logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DaemonState {
    /// Opening the state directory and loading the TEE key.
    Starting,
    /// Running RCAR.
    Attesting,
    /// Holding a fresh token.
    Attested {
        /// `tether.guest_id` of the token, if it has one.
        guest_id: Option<String>,
        /// `exp` of the token (Unix seconds).
        exp: Option<u64>,
    },
    /// Dialling the tunnel.
    Connecting {
        /// The tunnel URL.
        url: String,
    },
    /// The tunnel is up and served.
    Connected {
        /// Server-chosen session id.
        session_id: String,
        /// Attested guest id.
        guest_id: String,
        /// Unix time by which the next re-attestation must be in.
        reauth_before: u64,
        /// In-band re-attestations done on this tunnel.
        reauths: u32,
    },
    /// The tunnel ended.
    Disconnected {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
        /// True when the server closed (or vanished).
        by_peer: bool,
    },
    /// Waiting before the next attempt.
    BackingOff {
        /// How long.
        delay: Duration,
        /// Failed attempts since the last reset.
        attempt: u32,
    },
    /// The loop ended (shutdown).
    Stopped,
}

impl DaemonState {
    /// True while a tunnel is up.
    pub fn is_connected(&self) -> bool {
        matches!(self, Self::Connected { .. })
    }
}

/// Why the daemon could not start; once running, every failure is retried instead.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The state directory or the TEE key in it is unusable.
    #[error("state directory: {0}")]
    Store(#[from] StoreError),
    /// The KBS client cannot be built (URL, CA file, init-data).
    #[error(transparent)]
    Client(#[from] RcarError),
    /// The CA file cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The TLS client configuration cannot be built.
    #[error("TLS client configuration: {0}")]
    TlsConfig(String),
    /// No tunnel URL follows from the KBS URL.
    #[error("cannot derive the tunnel URL from {url:?}: {reason}")]
    TunnelUrl {
        /// The KBS URL.
        url: String,
        /// Why.
        reason: &'static str,
    },
    /// A start-up task panicked or was cancelled.
    #[error("{what} task failed: {reason}")]
    Task {
        /// Which task.
        what: &'static str,
        /// The join error.
        reason: String,
    },
}

/// `ws://` or `wss://` URL of the tunnel for a KBS base URL (`http://` or `https://`).
pub fn tunnel_url(kbs_url: &str) -> Result<String, RunError> {
    let invalid = |reason| RunError::TunnelUrl {
        url: kbs_url.to_owned(),
        reason,
    };
    let (scheme, rest) = if let Some(rest) = strip_prefix_ignore_case(kbs_url, "https://") {
        ("wss", rest)
    } else if let Some(rest) = strip_prefix_ignore_case(kbs_url, "http://") {
        ("ws", rest)
    } else {
        return Err(invalid("scheme must be http or https"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains(['?', '#']) {
        return Err(invalid("no host, or a query or fragment"));
    }
    Ok(format!("{scheme}://{rest}{TUNNEL_PATH}"))
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// When to refresh a token valid for `lifetime` (exp - iat), counted from when it was
/// issued: at 80 % of its lifetime or 60 s before it expires, whichever is earlier, but never
/// before half of its lifetime (so a short-lived token is not refreshed in a tight loop) nor
/// sooner than 1 s.
pub fn refresh_after(lifetime: Duration) -> Duration {
    let at_80_percent = lifetime / 5 * 4;
    let before_expiry = lifetime.saturating_sub(REFRESH_MARGIN);
    at_80_percent
        .min(before_expiry)
        .max(lifetime / 2)
        .max(MIN_REFRESH)
}

/// Runs the daemon until `shutdown` is cancelled: load or create the TEE key in the state
/// directory, attest, keep the tunnel open and serve [`GuestDaemonService`] on it.
pub async fn run(config: RunConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let state = config.state.clone();
    let result = match Supervisor::start(config, shutdown).await {
        Ok(supervisor) => {
            supervisor.run().await;
            Ok(())
        }
        Err(e) => Err(e),
    };
    set_state(&state, DaemonState::Stopped);
    result
}

/// What the loop knows of its current token. `Debug` hides the token.
struct Token {
    jwt: Zeroizing<String>,
    guest_id: Option<String>,
    exp: Option<u64>,
    /// When to re-attest (None: the token does not expire).
    refresh_at: Option<Instant>,
    /// When it expires, on the local monotonic clock.
    expires_at: Option<Instant>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("jwt", &"[redacted]")
            .field("guest_id", &self.guest_id)
            .field("exp", &self.exp)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// A token received at `now` (`now_unix` on the wall clock). Its lifetime is `exp - iat`
    /// as the KBS wrote them, so a guest clock that is off does not shift the schedule.
    fn new(jwt: String, now: Instant, now_unix: u64) -> Self {
        let facts = TokenFacts::of(&jwt);
        let lifetime = facts
            .exp
            .map(|exp| Duration::from_secs(exp.saturating_sub(facts.iat.unwrap_or(now_unix))));
        Self {
            jwt: Zeroizing::new(jwt),
            guest_id: facts.guest_id,
            exp: facts.exp,
            refresh_at: lifetime.map(|l| now + refresh_after(l)),
            expires_at: lifetime.map(|l| now + l),
        }
    }

    /// True once it is time to re-attest.
    fn is_due(&self, now: Instant) -> bool {
        self.refresh_at.is_some_and(|at| now >= at)
    }

    /// Delay before retrying a failed in-band refresh: a quarter of the time left, 1..=10 s.
    fn retry_delay(&self, now: Instant) -> Duration {
        let left = self
            .expires_at
            .map_or(MAX_REFRESH_RETRY, |at| at.saturating_duration_since(now));
        (left / 4).clamp(MIN_REFRESH_RETRY, MAX_REFRESH_RETRY)
    }
}

/// Claims of a token read without verifying it (the KBS verifies; this only schedules).
#[derive(Debug, Default, PartialEq, Eq)]
struct TokenFacts {
    iat: Option<u64>,
    exp: Option<u64>,
    guest_id: Option<String>,
}

impl TokenFacts {
    fn of(jwt: &str) -> Self {
        let Some(payload) = jwt.split('.').nth(1) else {
            return Self::default();
        };
        let Ok(bytes) = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')) else {
            return Self::default();
        };
        let Ok(claims) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return Self::default();
        };
        Self {
            iat: claims.get("iat").and_then(serde_json::Value::as_u64),
            exp: claims.get("exp").and_then(serde_json::Value::as_u64),
            guest_id: claims
                .pointer("/tether/guest_id")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
        }
    }
}

/// Counts one open tunnel in the service's `open_tunnels` while it lives.
struct OpenTunnel(Arc<AtomicU32>);

impl OpenTunnel {
    fn count(counter: Arc<AtomicU32>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Supervisor {
    client: KbsClient,
    tunnel: GuestTunnelConfig,
    service: GuestDaemonService,
    key: TeeKeyPair,
    info: GuestInfo,
    backoff: Backoff,
    state: watch::Sender<DaemonState>,
    shutdown: CancellationToken,
    token: Option<Token>,
    identity: watch::Sender<GuestIdentity>,
    endpoints: Vec<AbortOnDropHandle<()>>,
}

impl Supervisor {
    /// Opens the state directory, loads or creates the TEE key, builds the clients.
    async fn start(config: RunConfig, shutdown: CancellationToken) -> Result<Self, RunError> {
        let RunConfig {
            kbs_url,
            init_data,
            state_dir,
            ca_file,
            key_alg,
            hook,
            evidence,
            reconnect,
            splitapi,
            cdh_listen,
            push_key,
            state,
            splitapi_status,
            cdh_addr,
        } = config;
        set_state(&state, DaemonState::Starting);
        let (store, key, ca) = {
            let ca_file = ca_file.clone();
            tokio::task::spawn_blocking(move || -> Result<_, RunError> {
                let store = StateStore::open(state_dir)?;
                let key = store.try_load_or_create_tee_key(|| TeeKeyPair::generate(key_alg))?;
                let ca = ca_file
                    .as_deref()
                    .map(CaBundle::from_pem_file)
                    .transpose()?;
                Ok((store, key, ca))
            })
            .await
            .map_err(|e| RunError::Task {
                what: "state directory",
                reason: e.to_string(),
            })??
        };
        if key.algorithm() != key_alg {
            tracing::warn!(
                held = ?key.algorithm(),
                asked = ?key_alg,
                "the state directory holds a TEE key of another algorithm; keeping it"
            );
        }
        let tee = evidence.tee();
        let mut builder = KbsClientBuilder::new(kbs_url, evidence).key(key.clone());
        if let Some(toml) = init_data {
            builder = builder.init_data(toml);
        }
        if let Some(path) = ca_file {
            builder = builder.ca_file(path);
        }
        let client = builder.build()?;
        let url = tunnel_url(client.kbs_url())?;
        let mut tunnel = GuestTunnelConfig::new(url);
        tunnel.offer_push_key = push_key;
        if tunnel.url.starts_with("wss://") {
            tunnel = tunnel.with_tls(tls_config(ca.as_ref())?);
        }
        let store = Arc::new(store);
        let mut services: Vec<String> = SERVICES.iter().map(|s| (*s).to_owned()).collect();
        if splitapi.is_some() {
            services.push(crate::splitapi::SERVICE.to_owned());
        }
        let info = GuestInfo {
            instance_id: instance_id(),
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            services,
        };
        tracing::info!(
            kbs_url = client.kbs_url(),
            tunnel_url = %tunnel.url,
            state_dir = %store.root().display(),
            %tee,
            key = ?key.algorithm(),
            instance_id = %info.instance_id,
            "guest daemon starting"
        );
        let service = GuestDaemonService::new(store, key.clone(), hook);
        let (identity, identity_rx) = watch::channel(GuestIdentity {
            guest_id: None,
            instance_id: info.instance_id.clone(),
            daemon_version: info.daemon_version.clone(),
            tee: tee.to_string(),
        });
        let mut endpoints = Vec::new();
        if let Some(listen) = cdh_listen {
            endpoints.push(AbortOnDropHandle::new(tokio::spawn(crate::cdh::run(
                listen,
                Arc::clone(service.store()),
                cdh_addr,
                shutdown.clone(),
            ))));
        }
        if let Some(config) = splitapi {
            endpoints.push(AbortOnDropHandle::new(tokio::spawn(crate::splitapi::run(
                config,
                service.clone(),
                identity_rx,
                splitapi_status,
                shutdown.clone(),
            ))));
        }
        Ok(Self {
            client,
            tunnel,
            service,
            key,
            info,
            backoff: Backoff::new(reconnect),
            state,
            shutdown,
            token: None,
            identity,
            endpoints,
        })
    }

    fn set(&self, state: DaemonState) {
        set_state(&self.state, state);
    }

    /// Attest, connect, serve, back off; until shutdown.
    async fn run(mut self) {
        let shutdown = self.shutdown.clone();
        while !shutdown.is_cancelled() {
            if self.token.as_ref().is_none_or(|t| t.is_due(Instant::now())) {
                self.set(DaemonState::Attesting);
                match shutdown.run_until_cancelled(self.attest()).await {
                    None => break,
                    Some(Ok(token)) => {
                        self.set(DaemonState::Attested {
                            guest_id: token.guest_id.clone(),
                            exp: token.exp,
                        });
                        self.token = Some(token);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "attestation failed");
                        let delay = self.backoff.next_delay(&mut rand::thread_rng());
                        if !self.back_off(delay).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            let Some(token) = &self.token else {
                continue;
            };
            self.set(DaemonState::Connecting {
                url: self.tunnel.url.clone(),
            });
            let key = self.key.clone();
            let unseal = move |jwe: &[u8]| {
                key.open_json(jwe)
                    .map(|nonce| nonce.to_vec())
                    .map_err(|e| e.to_string())
            };
            let connect = tunnel::connect(&self.tunnel, &token.jwt, self.info.clone(), unseal);
            let closed = match shutdown.run_until_cancelled(connect).await {
                None => break,
                Some(Err(e)) => {
                    let reattest = e.needs_reattest();
                    tracing::warn!(error = %e, reattest, "cannot open the tunnel");
                    if reattest {
                        self.token = None;
                    }
                    let delay = self.backoff.next_delay(&mut rand::thread_rng());
                    if !self.back_off(delay).await {
                        break;
                    }
                    continue;
                }
                Some(Ok(tunnel)) => match self.serve(tunnel).await {
                    Some(closed) => closed,
                    None => break,
                },
            };
            if closed.needs_reattest() {
                self.token = None;
            }
            let delay = self.backoff.after_close(&closed, &mut rand::thread_rng());
            if !self.back_off(delay).await {
                break;
            }
        }
        // The endpoints follow the same shutdown token; let them drain.
        for task in self.endpoints.drain(..) {
            if timeout(CLOSE_WAIT * 2, task).await.is_err() {
                tracing::warn!("a local endpoint did not stop in time");
            }
        }
    }

    /// One RCAR handshake; the token's guest_id becomes the identity splitapi reports.
    async fn attest(&mut self) -> Result<Token, RcarError> {
        let jwt = self.client.attest().await?;
        let token = Token::new(jwt, Instant::now(), unix_now());
        self.identity.send_if_modified(|identity| {
            let changed = identity.guest_id != token.guest_id;
            identity.guest_id.clone_from(&token.guest_id);
            changed
        });
        Ok(token)
    }

    /// Waits `delay`; false when shutdown came first.
    async fn back_off(&self, delay: Duration) -> bool {
        self.set(DaemonState::BackingOff {
            delay,
            attempt: self.backoff.attempt(),
        });
        self.shutdown
            .run_until_cancelled(sleep(delay))
            .await
            .is_some()
    }

    /// Serves an open tunnel until it ends (`Some`) or shutdown closed it (`None`), refreshing
    /// its token in band on schedule.
    async fn serve(&mut self, tunnel: GuestTunnel) -> Option<Closed> {
        let session = tunnel.session();
        let _open = OpenTunnel::count(self.service.open_tunnels());
        let mut reauths = 0;
        self.set(connected_state(&session, reauths));
        let service = self.service.for_tunnel(tunnel.welcome().push_key.clone());
        let mut task = AbortOnDropHandle::new(tokio::spawn(tunnel.serve(service)));
        let mut next_refresh = self.token.as_ref().and_then(|t| t.refresh_at);
        let shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    session.close();
                    let closed = match timeout(CLOSE_WAIT, &mut task).await {
                        Ok(joined) => closed_from(joined),
                        Err(_) => local_close(1006, "the tunnel did not close in time"),
                    };
                    self.set(disconnected_state(&closed));
                    return None;
                }
                joined = &mut task => {
                    let closed = closed_from(joined);
                    self.set(disconnected_state(&closed));
                    return Some(closed);
                }
                () = sleep_until_opt(next_refresh) => {
                    next_refresh = self.refresh_in_band(&session, &mut reauths).await;
                }
            }
        }
    }

    /// Re-attests and sends the fresh token in band; returns when to try again (the new
    /// token's refresh time, or a retry after a failure; `None` when the tunnel is closing).
    async fn refresh_in_band(
        &mut self,
        session: &TunnelSession,
        reauths: &mut u32,
    ) -> Option<Instant> {
        let shutdown = self.shutdown.clone();
        tracing::info!(
            session_id = session.session_id(),
            "re-attesting for the open tunnel"
        );
        let token = match shutdown.run_until_cancelled(self.attest()).await? {
            Ok(token) => token,
            Err(e) => {
                let retry = self.retry_delay();
                tracing::warn!(
                    error = %e,
                    retry_in_ms = millis(retry),
                    "re-attestation failed; the tunnel stays up until its token expires"
                );
                return Some(Instant::now() + retry);
            }
        };
        tracing::info!(
            guest_id = token.guest_id.as_deref().unwrap_or("(not in the token)"),
            exp = token.exp.unwrap_or(0),
            "attested"
        );
        let sent = shutdown
            .run_until_cancelled(session.reauth(token.jwt.to_string()))
            .await?;
        match sent {
            Ok(_) => {
                *reauths = reauths.saturating_add(1);
                let next = token.refresh_at;
                self.token = Some(token);
                self.set(connected_state(session, *reauths));
                next
            }
            Err(ReauthError::Closed(closed)) => {
                tracing::warn!(
                    code = closed.close.code,
                    reason = %closed.close.reason,
                    "reauth failed: the tunnel closed"
                );
                if !closed.needs_reattest() {
                    self.token = Some(token);
                }
                None
            }
            Err(e) => {
                self.token = Some(token);
                let retry = self.retry_delay();
                tracing::warn!(error = %e, retry_in_ms = millis(retry), "reauth failed");
                Some(Instant::now() + retry)
            }
        }
    }

    fn retry_delay(&self) -> Duration {
        self.token
            .as_ref()
            .map_or(MIN_REFRESH_RETRY, |t| t.retry_delay(Instant::now()))
    }
}

/// Publishes and logs a state change.
fn set_state(sender: &watch::Sender<DaemonState>, state: DaemonState) {
    match &state {
        DaemonState::Starting => tracing::debug!("starting"),
        DaemonState::Attesting => tracing::info!("attesting"),
        DaemonState::Attested { guest_id, exp } => {
            let guest_id = guest_id.as_deref().unwrap_or("(not in the token)");
            match exp {
                Some(exp) => tracing::info!(guest_id, exp, "attested"),
                None => tracing::info!(guest_id, "attested (the token does not expire)"),
            }
        }
        DaemonState::Connecting { url } => tracing::info!(%url, "connecting"),
        DaemonState::Connected {
            session_id,
            guest_id,
            reauth_before,
            reauths,
        } => {
            if *reauths == 0 {
                tracing::info!(%session_id, %guest_id, reauth_before, "connected");
            } else {
                tracing::info!(%session_id, reauth_before, reauths, "reauth ok");
            }
        }
        DaemonState::Disconnected {
            code,
            reason,
            by_peer,
        } => {
            let name = CloseCode::from_code(*code).map(|c| format!("{c:?}"));
            if *code == NORMAL_CLOSE || *code == CloseCode::GoingAway.code() {
                tracing::info!(code, name = ?name, %reason, by_peer, "disconnected");
            } else if *code == CloseCode::Superseded.code() {
                tracing::warn!(
                    code,
                    %reason,
                    "disconnected: superseded by another tunnel of the same guest_id (a second daemon with this identity?)"
                );
            } else {
                tracing::warn!(code, name = ?name, %reason, by_peer, "disconnected");
            }
        }
        DaemonState::BackingOff { delay, attempt } => {
            tracing::info!(delay_ms = millis(*delay), attempt, "backing off");
        }
        DaemonState::Stopped => tracing::info!("stopped"),
    }
    sender.send_replace(state);
}

fn connected_state(session: &TunnelSession, reauths: u32) -> DaemonState {
    DaemonState::Connected {
        session_id: session.session_id().to_owned(),
        guest_id: session.guest_id().to_owned(),
        reauth_before: session.reauth_before(),
        reauths,
    }
}

fn disconnected_state(closed: &Closed) -> DaemonState {
    DaemonState::Disconnected {
        code: closed.close.code,
        reason: closed.close.reason.clone(),
        by_peer: closed.close.by_peer,
    }
}

fn closed_from(joined: Result<Closed, JoinError>) -> Closed {
    joined.unwrap_or_else(|e| local_close(1011, &format!("the tunnel task failed: {e}")))
}

fn local_close(code: u16, reason: &str) -> Closed {
    Closed {
        close: CloseInfo {
            code,
            reason: reason.to_owned(),
            by_peer: false,
        },
        reconnect_after: None,
        connected_for: Duration::ZERO,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// rustls (ring) trusting the webpki roots and the CA file's.
fn tls_config(ca: Option<&CaBundle>) -> Result<Arc<rustls::ClientConfig>, RunError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = ca {
        ca.add_to_root_store(&mut roots)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RunError::TlsConfig(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn instance_id() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_at_80_percent_or_a_minute_before_expiry_never_before_half() {
        let s = Duration::from_secs;
        // 5 minutes: both rules agree on 240 s.
        assert_eq!(refresh_after(s(300)), s(240));
        // An hour: 80 % (2880 s) is earlier than a minute before expiry (3540 s).
        assert_eq!(refresh_after(s(3600)), s(2880));
        // 2 minutes: a minute before expiry (60 s) is earlier than 80 % (96 s).
        assert_eq!(refresh_after(s(120)), s(60));
        // 100 s: a minute before (40 s) would be under half the lifetime: 50 s.
        assert_eq!(refresh_after(s(100)), s(50));
        // The KBS's shortest ttl (10 s): half of it.
        assert_eq!(refresh_after(s(10)), s(5));
        // Degenerate lifetimes never spin.
        assert_eq!(refresh_after(Duration::ZERO), MIN_REFRESH);
        assert_eq!(refresh_after(Duration::from_millis(1500)), MIN_REFRESH);
    }

    fn jwt(claims: serde_json::Value) -> String {
        let part = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.sig",
            part(&serde_json::json!({"alg": "ES256"})),
            part(&claims)
        )
    }

    #[test]
    fn token_schedule_uses_the_kbs_clock_for_the_lifetime() {
        let now = Instant::now();
        // The guest's clock is an hour behind the KBS: exp - iat still says 300 s.
        let t = Token::new(
            jwt(serde_json::json!({"iat": 10_000, "exp": 10_300, "tether": {"guest_id": "g1"}})),
            now,
            6_400,
        );
        assert_eq!(t.guest_id.as_deref(), Some("g1"));
        assert_eq!(t.exp, Some(10_300));
        assert_eq!(t.refresh_at, Some(now + Duration::from_secs(240)));
        assert_eq!(t.expires_at, Some(now + Duration::from_secs(300)));
        assert!(!t.is_due(now + Duration::from_secs(239)));
        assert!(t.is_due(now + Duration::from_secs(240)));
        // Retry a failed refresh at a quarter of the time left, within 1..=10 s.
        assert_eq!(
            t.retry_delay(now + Duration::from_secs(280)),
            Duration::from_secs(5)
        );
        assert_eq!(
            t.retry_delay(now + Duration::from_secs(299)),
            MIN_REFRESH_RETRY
        );
        assert_eq!(t.retry_delay(now), MAX_REFRESH_RETRY);

        // Without iat the local clock is all there is.
        let t = Token::new(jwt(serde_json::json!({"exp": 1_100})), now, 1_000);
        assert_eq!(t.refresh_at, Some(now + Duration::from_secs(50)));
        // No exp: never due. Not a JWT: nothing known, never due.
        let t = Token::new(jwt(serde_json::json!({})), now, 1_000);
        assert!(!t.is_due(now + Duration::from_secs(1_000_000)));
        let t = Token::new("not-a-jwt".into(), now, 1_000);
        assert_eq!(t.exp, None);
        assert!(!format!("{t:?}").contains("not-a-jwt"));
    }

    #[test]
    fn tunnel_url_follows_the_kbs_url() {
        assert_eq!(
            tunnel_url("http://127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/kbs/v0/tunnel"
        );
        assert_eq!(
            tunnel_url("HTTPS://kbs.example/prefix/").unwrap(),
            "wss://kbs.example/prefix/kbs/v0/tunnel"
        );
        assert!(tunnel_url("ftp://kbs.example").is_err());
        assert!(tunnel_url("http://").is_err());
        assert!(tunnel_url("http://h/?q").is_err());
    }

    #[test]
    fn open_tunnel_guard_counts_while_alive() {
        let counter = Arc::new(AtomicU32::new(0));
        let a = OpenTunnel::count(counter.clone());
        let b = OpenTunnel::count(counter.clone());
        assert_eq!(counter.load(Ordering::Relaxed), 2);
        drop(a);
        drop(b);
        assert_eq!(counter.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_bad_kbs_url_fails_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let config = RunConfig::new("ftp://kbs.example", dir.path().join("state"));
        let mut states = config.subscribe();
        let err = run(config, CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, RunError::Client(_)), "{err}");
        assert_eq!(*states.borrow_and_update(), DaemonState::Stopped);
    }

    #[tokio::test]
    async fn an_unreachable_kbs_is_retried_with_backoff_until_shutdown() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let mut config = RunConfig::new(format!("http://127.0.0.1:{port}"), dir.path());
        config.reconnect.initial = Duration::from_millis(20);
        config.reconnect.max = Duration::from_millis(40);
        let mut states = config.subscribe();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(config, shutdown.clone()));
        // Several failed attempts, each followed by a backoff step.
        let mut attempts = 0;
        while attempts < 3 {
            states.changed().await.unwrap();
            if let DaemonState::BackingOff { attempt, .. } = *states.borrow_and_update() {
                attempts = attempt;
            }
        }
        assert!(
            dir.path().join("tee_key.pem").exists(),
            "key created at start"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(*states.borrow(), DaemonState::Stopped);
    }
}
