//! What `guest-daemon run` is told: [`RunConfig`], and the defaults it starts from.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tunnel::ReconnectPolicy;

use super::DaemonState;
use crate::evidence::{EvidenceProvider, SampleAttester};
use crate::hook::PostApplyHook;
use crate::splitapi::{SplitApiConfig, SplitApiStatus};
use crate::tee_key::KeyAlgorithm;

/// Default state directory. It is on tmpfs on a normal Linux guest, so the TEE key and the
/// plaintext resources never reach a (possibly unencrypted) disk; it survives daemon restarts
/// (same key, same held versions) but not a reboot, after which the guest attests afresh and
/// the KBS pushes again.
pub const DEFAULT_STATE_DIR: &str = "/run/tether";
/// Services announced in the tunnel handshake (informational); `splitapi` is added when
/// the splitapi endpoint is on ([`RunConfig::splitapi`]).
pub const SERVICES: &[&str] = &["resources", "credentials"];

/// Settings of the run loop. Build with [`RunConfig::new`] and adjust the public fields.
pub struct RunConfig {
    /// KBS base URL (`http://` or `https://`, without `/kbs/v0`): the first one tried.
    pub kbs_url: String,
    /// More KBS base URLs, tried in this order after `kbs_url` when attesting or connecting
    /// there fails or the tunnel is lost (after the last, `kbs_url` again), each after the
    /// usual backoff delay: failover for sites without a load balancer (empty).
    pub failover_urls: Vec<String>,
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
    /// More services to announce, e.g. `nebula`: the KBS's `nebula-ca` plugin then pushes
    /// this guest its overlay credential (bundle `nebula`) and renews it (empty).
    pub extra_services: Vec<String>,
    /// Offer the `tether.v2` tunnel (a push key in the challenge, so rotation pushes open
    /// without an asymmetric operation); false offers only `tether.v1` (true).
    pub push_key: bool,
    pub(super) state: watch::Sender<DaemonState>,
    pub(super) splitapi_status: watch::Sender<SplitApiStatus>,
    pub(super) cdh_addr: watch::Sender<Option<SocketAddr>>,
}

impl std::fmt::Debug for RunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunConfig")
            .field("kbs_url", &self.kbs_url)
            .field("failover_urls", &self.failover_urls)
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
            failover_urls: Vec::new(),
            init_data: None,
            state_dir: state_dir.into(),
            ca_file: None,
            key_alg: KeyAlgorithm::EcP256,
            hook: None,
            evidence: Box::new(SampleAttester),
            reconnect: default_reconnect_policy(),
            splitapi: None,
            cdh_listen: None,
            extra_services: Vec::new(),
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
