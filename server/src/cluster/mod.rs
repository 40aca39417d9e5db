//! Several replicas on one PostgreSQL database: each records which guests' tunnels it holds
//! (the replica registry, `ClusterStore`), and an admin call for one guest that lands on a
//! replica not holding that guest is forwarded to the one that does ([`forward`]) over an
//! authenticated internal hop ([`hop`]). See docs/architecture.md, "Tunnels across replicas".
//!
//! On SQLite nothing of this runs: one process owns the file and holds every tunnel.

pub mod forward;
pub mod hop;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use kbs_core::storage::{ClusterStore, StoreError, TunnelOwner};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tunnel::{Hub, TunnelEvent};

use hop::{HopKey, ReplayGuard};

/// What the hop key is derived for (from the KEK, which every replica shares).
pub const HOP_KEY_PURPOSE: &str = "cluster-replica-hop";
/// How often a replica writes its heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// A replica silent for this long is dead: its tunnel records route nowhere.
pub const REPLICA_STALE_AFTER: Duration = Duration::from_secs(15);
/// A replica silent for this long is forgotten, with its tunnel records.
pub const REPLICA_FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Deadline on one registry statement (a slow database never holds a tunnel or a call).
pub const REGISTRY_TIMEOUT: Duration = Duration::from_secs(5);

/// This replica's tunnel of one guest: the hub's epoch (per process) and the registry's
/// (grows across replicas).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    hub_epoch: u64,
    epoch: u64,
}

/// How the composition root configures the cluster part.
pub struct ClusterParts {
    /// The registry (the store).
    pub store: Arc<dyn ClusterStore>,
    /// Live tunnels of this replica.
    pub hub: Hub,
    /// Whether replicas share the store (PostgreSQL); off, nothing is recorded or forwarded.
    pub shared: bool,
    /// `[cluster] advertise_url`, if set.
    pub advertise_url: Option<String>,
    /// Deadline on one forwarded call.
    pub forward_timeout: Duration,
    /// Largest request body forwarded (`http.max_body_bytes`).
    pub max_body: usize,
    /// Derived from the KEK for [`HOP_KEY_PURPOSE`].
    pub hop_key: HopKey,
    /// Certificates the hop trusts besides the system's (this replica's own, with TLS).
    pub trust: Vec<reqwest::Certificate>,
}

/// One replica's view of the cluster.
pub struct Cluster {
    replica_id: String,
    advertise_url: OnceLock<String>,
    store: Arc<dyn ClusterStore>,
    hub: Hub,
    shared: bool,
    held: DashMap<String, Held>,
    key: HopKey,
    replay: ReplayGuard,
    client: reqwest::Client,
    max_body: usize,
}

/// Errors building the cluster part.
#[derive(Debug, thiserror::Error)]
#[error("cluster: {0}")]
pub struct ClusterError(String);

impl Cluster {
    /// The cluster part of a new replica process (a fresh random replica id).
    pub fn new(parts: ClusterParts) -> Result<Arc<Self>, ClusterError> {
        let mut id = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
        let mut client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5).min(parts.forward_timeout))
            .timeout(parts.forward_timeout);
        for cert in parts.trust {
            client = client.add_root_certificate(cert);
        }
        let client = client
            .build()
            .map_err(|e| ClusterError(format!("HTTP client: {e}")))?;
        let advertise_url = OnceLock::new();
        if let Some(url) = parts.advertise_url {
            let _ = advertise_url.set(url.trim_end_matches('/').to_owned());
        }
        Ok(Arc::new(Self {
            replica_id: hex::encode(id),
            advertise_url,
            store: parts.store,
            hub: parts.hub,
            shared: parts.shared,
            held: DashMap::new(),
            key: parts.hop_key,
            replay: ReplayGuard::default(),
            client,
            max_body: parts.max_body,
        }))
    }

    /// This replica process's id (random at each start).
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// Whether replicas share the registry (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Where the other replicas reach this one (set once serving).
    pub fn advertise_url(&self) -> Option<&str> {
        self.advertise_url.get().map(String::as_str)
    }

    /// The registry epoch of this replica's tunnel of `guest_id`, if it holds one.
    pub fn held_epoch(&self, guest_id: &str) -> Option<u64> {
        let held = *self.held.get(guest_id)?;
        // Still the live tunnel (the hub's word, not the bookkeeping's).
        let live = self.hub.get(guest_id)?;
        (live.epoch == held.hub_epoch).then_some(held.epoch)
    }

    /// The registry's record of `guest_id`, within [`REGISTRY_TIMEOUT`].
    pub async fn owner(&self, guest_id: &str) -> Result<Option<TunnelOwner>, String> {
        match tokio::time::timeout(REGISTRY_TIMEOUT, self.store.tunnel_owner(guest_id)).await {
            Ok(Ok(owner)) => Ok(owner),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer from the database within {REGISTRY_TIMEOUT:?}"
            )),
        }
    }

    /// Keeps the registry in step with the hub and writes the heartbeat, until `shutdown`;
    /// then this replica's records go (its guests reconnect elsewhere and claim anew).
    /// `default_url` is the advertise URL when `[cluster] advertise_url` is not set.
    pub fn spawn(
        self: &Arc<Self>,
        default_url: String,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let _ = self.advertise_url.set(default_url);
        let this = self.clone();
        tokio::spawn(async move {
            if !this.shared {
                return;
            }
            tracing::info!(
                replica = %this.replica_id,
                advertise_url = this.advertise_url().unwrap_or_default(),
                "replica registered in the cluster"
            );
            this.heartbeat().await;
            let mut events = this.hub.subscribe();
            // Tunnels registered before we subscribed.
            this.reconcile().await;
            let mut beat = tokio::time::interval(HEARTBEAT_INTERVAL);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = beat.tick() => this.heartbeat().await,
                    event = events.recv() => match event {
                        Ok(TunnelEvent::Connected(h)) => this.claim(&h.guest_id, h.epoch).await,
                        Ok(TunnelEvent::Disconnected { guest_id, epoch, .. }) => {
                            this.release(&guest_id, epoch).await;
                        }
                        Err(RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "cluster registry fell behind the hub; reconciling");
                            this.reconcile().await;
                        }
                        Err(RecvError::Closed) => break,
                    },
                }
            }
            match tokio::time::timeout(
                REGISTRY_TIMEOUT,
                this.store.replica_retire(&this.replica_id),
            )
            .await
            {
                Ok(Ok(())) => {
                    tracing::info!(replica = %this.replica_id, "replica left the cluster")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "leaving the cluster registry"),
                Err(_) => tracing::warn!("leaving the cluster registry: database timed out"),
            }
        })
    }

    async fn heartbeat(&self) {
        let forget_before =
            kbs_core::storage::now_ms().saturating_sub(REPLICA_FORGET_AFTER.as_millis() as u64);
        let url = self.advertise_url().unwrap_or_default().to_owned();
        let result = bounded(
            self.store
                .replica_heartbeat(&self.replica_id, &url, forget_before),
        )
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "cluster heartbeat not written");
        }
    }

    /// Records this replica's new tunnel of `guest_id` (hub epoch `hub_epoch`).
    async fn claim(&self, guest_id: &str, hub_epoch: u64) {
        match bounded(self.store.tunnel_claim(guest_id, &self.replica_id)).await {
            Ok(epoch) => {
                // Only if that tunnel is still the live one: a quick reconnect may have
                // replaced it while the claim ran (its own event follows and claims again).
                if self.hub.get(guest_id).is_some_and(|h| h.epoch == hub_epoch) {
                    self.held
                        .insert(guest_id.to_owned(), Held { hub_epoch, epoch });
                    tracing::debug!(guest_id, epoch, "tunnel recorded in the cluster registry");
                }
            }
            Err(e) => {
                tracing::warn!(guest_id, error = %e, "tunnel not recorded in the cluster registry: calls through other replicas will not find it")
            }
        }
    }

    /// This replica's tunnel `hub_epoch` of `guest_id` ended: its record goes, if it is
    /// still ours at that epoch (another replica's newer claim stays).
    async fn release(&self, guest_id: &str, hub_epoch: u64) {
        let Some((_, held)) = self
            .held
            .remove_if(guest_id, |_, h| h.hub_epoch == hub_epoch)
        else {
            return;
        };
        if let Err(e) = bounded(
            self.store
                .tunnel_release(guest_id, &self.replica_id, held.epoch),
        )
        .await
        {
            tracing::warn!(guest_id, error = %e, "tunnel record not removed from the cluster registry");
        }
    }

    /// Brings the records in step with the hub after missed events.
    async fn reconcile(&self) {
        let live = self.hub.list();
        for h in &live {
            if self.held.get(&h.guest_id).map(|x| x.hub_epoch) != Some(h.epoch) {
                self.claim(&h.guest_id, h.epoch).await;
            }
        }
        let gone: Vec<(String, u64)> = self
            .held
            .iter()
            .filter(|e| {
                self.hub
                    .get(e.key())
                    .is_none_or(|h| h.epoch != e.value().hub_epoch)
            })
            .map(|e| (e.key().clone(), e.value().hub_epoch))
            .collect();
        for (guest_id, hub_epoch) in gone {
            self.release(&guest_id, hub_epoch).await;
        }
    }
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, String> {
    match tokio::time::timeout(REGISTRY_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "no answer from the database within {REGISTRY_TIMEOUT:?}"
        )),
    }
}

/// The advertise URL when none is configured: the bound address, loopback for an
/// unspecified one (set `[cluster] advertise_url` when replicas run on several hosts).
pub fn default_advertise_url(bound: std::net::SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let ip = match bound.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("{scheme}://{}", std::net::SocketAddr::new(ip, bound.port()))
}
