//! The supervisor: start-up (state directory, TEE key, clients, local endpoints), then the
//! reconnect loop: attest, connect, serve, back off; until shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use rpc_defs::GuestInfo;
use tokio::sync::watch;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tunnel::{Backoff, GuestTunnelConfig};

use super::attester::Attester;
use super::config::{RunConfig, SERVICES};
use super::connected::Connected;
use super::endpoints::LocalEndpoints;
use super::error::RunError;
use super::state::{DaemonState, set_state};
use super::tunnel_config::tunnel_config;
use crate::evidence::EvidenceProvider;
use crate::rcar::KbsClientBuilder;
use crate::service::GuestDaemonService;
use crate::splitapi::GuestIdentity;
use crate::store::StateStore;
use crate::tee_key::{KeyAlgorithm, TeeKeyPair};
use crate::tls::CaBundle;

pub(super) struct Supervisor {
    attester: Attester,
    /// The tunnel settings of each KBS, in the attester's order.
    tunnels: Vec<GuestTunnelConfig>,
    service: GuestDaemonService,
    key: TeeKeyPair,
    info: GuestInfo,
    backoff: Backoff,
    state: watch::Sender<DaemonState>,
    shutdown: CancellationToken,
    endpoints: LocalEndpoints,
}

impl Supervisor {
    /// Opens the state directory, loads or creates the TEE key, builds the clients, starts
    /// the local endpoints.
    pub async fn start(config: RunConfig, shutdown: CancellationToken) -> Result<Self, RunError> {
        let RunConfig {
            kbs_url,
            failover_urls,
            init_data,
            state_dir,
            ca_file,
            key_alg,
            hook,
            evidence,
            reconnect,
            splitapi,
            cdh_listen,
            extra_services,
            push_key,
            state,
            splitapi_status,
            cdh_addr,
        } = config;
        set_state(&state, DaemonState::Starting);
        let (store, key, ca) = open_state(state_dir, key_alg, ca_file.clone()).await?;
        if key.algorithm() != key_alg {
            tracing::warn!(
                held = ?key.algorithm(),
                asked = ?key_alg,
                "the state directory holds a TEE key of another algorithm; keeping it"
            );
        }
        let tee = evidence.tee();
        let evidence: Arc<dyn EvidenceProvider> = Arc::from(evidence);
        let mut clients = Vec::new();
        let mut tunnels = Vec::new();
        for url in std::iter::once(kbs_url).chain(failover_urls) {
            let mut builder =
                KbsClientBuilder::new(url, Box::new(Arc::clone(&evidence))).key(key.clone());
            if let Some(toml) = &init_data {
                builder = builder.init_data(toml.clone());
            }
            if let Some(path) = &ca_file {
                builder = builder.ca_file(path);
            }
            let client = builder.build()?;
            tunnels.push(tunnel_config(client.kbs_url(), push_key, ca.as_ref())?);
            clients.push(client);
        }
        let info = guest_info(splitapi.is_some(), &extra_services);
        tracing::info!(
            kbs_url = clients[0].kbs_url(),
            failover_urls = clients.len() - 1,
            tunnel_url = %tunnels[0].url,
            state_dir = %store.root().display(),
            %tee,
            key = ?key.algorithm(),
            instance_id = %info.instance_id,
            "guest daemon starting"
        );
        let service = GuestDaemonService::new(Arc::new(store), key.clone(), hook);
        let (identity, identity_rx) = watch::channel(GuestIdentity {
            guest_id: None,
            instance_id: info.instance_id.clone(),
            daemon_version: info.daemon_version.clone(),
            tee: tee.to_string(),
        });
        let mut endpoints = LocalEndpoints::new(shutdown.clone());
        if let Some(listen) = cdh_listen {
            endpoints.start_cdh(listen, &service, cdh_addr);
        }
        if let Some(config) = splitapi {
            endpoints.start_splitapi(config, &service, identity_rx, splitapi_status);
        }
        Ok(Self {
            attester: Attester::new(clients, identity),
            tunnels,
            service,
            key,
            info,
            backoff: Backoff::new(reconnect),
            state,
            shutdown,
            endpoints,
        })
    }

    fn set(&self, state: DaemonState) {
        set_state(&self.state, state);
    }

    /// Attest, connect, serve, back off; until shutdown.
    pub async fn run(mut self) {
        let shutdown = self.shutdown.clone();
        while !shutdown.is_cancelled() {
            if self.attester.must_attest(Instant::now()) {
                self.set(DaemonState::Attesting);
                match shutdown.run_until_cancelled(self.attester.attest()).await {
                    None => break,
                    Some(Ok(token)) => {
                        self.set(DaemonState::Attested {
                            guest_id: token.guest_id.clone(),
                            exp: token.exp,
                        });
                        self.attester.hold(token);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, kbs_url = self.attester.kbs_url(), "attestation failed");
                        self.fail_over();
                        let delay = self.backoff.next_delay(&mut rand::thread_rng());
                        if !self.back_off(delay).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            let Some(token) = self.attester.token() else {
                continue;
            };
            let tunnel = &self.tunnels[self.attester.current()];
            self.set(DaemonState::Connecting {
                url: tunnel.url.clone(),
            });
            let key = self.key.clone();
            let unseal = move |jwe: &[u8]| {
                key.open_json(jwe)
                    .map(|nonce| nonce.to_vec())
                    .map_err(|e| e.to_string())
            };
            let connect = tunnel::connect(tunnel, &token.jwt, self.info.clone(), unseal);
            let closed = match shutdown.run_until_cancelled(connect).await {
                None => break,
                Some(Err(e)) => {
                    let reattest = e.needs_reattest();
                    tracing::warn!(error = %e, reattest, "cannot open the tunnel");
                    if reattest {
                        self.attester.forget();
                    }
                    self.fail_over();
                    let delay = self.backoff.next_delay(&mut rand::thread_rng());
                    if !self.back_off(delay).await {
                        break;
                    }
                    continue;
                }
                Some(Ok(tunnel)) => {
                    let connected = Connected {
                        attester: &mut self.attester,
                        service: &self.service,
                        state: &self.state,
                        shutdown: &self.shutdown,
                    };
                    match connected.serve(tunnel).await {
                        Some(closed) => closed,
                        None => break,
                    }
                }
            };
            if closed.needs_reattest() {
                self.attester.forget();
            }
            // The tunnel is gone (the KBS died, drained, or dropped us): the next attempt
            // goes to the next KBS, if there is one. Backoff as always: a ring of dead KBSes
            // is never a hot loop.
            self.fail_over();
            let delay = self.backoff.after_close(&closed, &mut rand::thread_rng());
            if !self.back_off(delay).await {
                break;
            }
        }
        // The endpoints follow the same shutdown token; let them drain.
        self.endpoints.stopped().await;
    }

    /// Move to the next KBS, if more than one was given.
    fn fail_over(&mut self) {
        let from = self.attester.kbs_url().to_owned();
        if self.attester.fail_over() {
            tracing::info!(from = %from, to = self.attester.kbs_url(), "moving to the next KBS");
        }
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
}

/// Open the state directory, load or create the TEE key, read the CA file: blocking I/O,
/// off the runtime's worker threads.
async fn open_state(
    state_dir: PathBuf,
    key_alg: KeyAlgorithm,
    ca_file: Option<PathBuf>,
) -> Result<(StateStore, TeeKeyPair, Option<CaBundle>), RunError> {
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
    })?
}

/// What the daemon announces in the tunnel handshake; `splitapi` is among its services
/// when that endpoint is on.
fn guest_info(splitapi: bool, extra: &[String]) -> GuestInfo {
    let mut services: Vec<String> = SERVICES.iter().map(|s| (*s).to_owned()).collect();
    if splitapi {
        services.push(crate::splitapi::SERVICE.to_owned());
    }
    for s in extra {
        if !services.contains(s) {
            services.push(s.clone());
        }
    }
    GuestInfo {
        instance_id: instance_id(),
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        services,
    }
}

fn instance_id() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}
