//! The endpoint's life: wait for a `splitapi` bundle, bind, accept mutual-TLS connections
//! through the shared `listener` crate, and serve each under the credentials current when
//! it was accepted.

use std::sync::Arc;
use std::time::Duration;

use axum::{Extension, Router};
use listener::{Admission, Admit, Limits, Server};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::api::{self, ApiState, Peer};
use super::credentials::{self, Generation};
use super::{BUNDLE_ID, GuestIdentity, SplitApiConfig, SplitApiStatus};
use crate::service::GuestDaemonService;

/// How long open connections may finish their requests at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Delay before retrying a failed bind.
const BIND_RETRY: Duration = Duration::from_secs(5);
/// Concurrent requests one owner connection may have in flight over HTTP/2.
const MAX_CONCURRENT_STREAMS: u32 = 32;
/// Most connections the endpoint holds (it listens on 0.0.0.0: any network peer can
/// connect). An owner's workloads need a handful; past the cap the oldest idle connection
/// makes room, so a flood cannot take the descriptors the daemon's own work needs (state
/// writes, the CDH endpoint, the tunnel).
pub(super) const MAX_CONNECTIONS: usize = 32;
/// Largest request head an owner sends (no tokens travel here: the client is its
/// certificate).
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Serve the endpoint for the `splitapi` bundles `service` installs, until `shutdown`.
/// Binds when the first usable bundle is held (at once if one is held already).
pub async fn run(
    config: SplitApiConfig,
    service: GuestDaemonService,
    identity: watch::Receiver<GuestIdentity>,
    status: watch::Sender<SplitApiStatus>,
    shutdown: CancellationToken,
) {
    let mut credentials = service.subscribe_credentials();
    let (current, generations) = watch::channel::<Option<Arc<Generation>>>(None);
    let app = api::router(ApiState {
        store: Arc::clone(service.store()),
        identity,
        status: status.subscribe(),
        max_secret_bytes: config.max_secret_bytes,
    });
    let mut accept: Option<tokio::task::JoinHandle<()>> = None;
    let mut tried: Option<u64> = None;
    let mut retry_bind: Option<Instant> = None;
    loop {
        let wanted = credentials.borrow_and_update().get(BUNDLE_ID).copied();
        if let Some(version) = wanted.filter(|v| tried != Some(*v)) {
            tried = Some(version);
            credentials::reload(&service, &current, &status, version).await;
        }
        if accept.is_none() && current.borrow().is_some() && retry_bind.is_none() {
            match TcpListener::bind(config.listen).await {
                Ok(listener) => {
                    let addr = listener.local_addr().unwrap_or(config.listen);
                    tracing::info!(%addr, "splitapi endpoint listening (mutual TLS)");
                    status.send_modify(|s| {
                        s.addr = Some(addr);
                        s.error = None;
                    });
                    let server = server(generations.clone(), app.clone());
                    accept = Some(tokio::spawn(server.serve(listener, shutdown.clone())));
                }
                Err(e) => {
                    let reason = format!("bind {}: {e}", config.listen);
                    tracing::error!(%reason, retry_in_s = BIND_RETRY.as_secs(), "splitapi endpoint cannot listen");
                    status.send_modify(|s| s.error = Some(reason));
                    retry_bind = Some(Instant::now() + BIND_RETRY);
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = credentials.changed() => {
                if changed.is_err() {
                    // The service is gone; nothing new can arrive.
                    shutdown.cancelled().await;
                    break;
                }
            }
            () = sleep_until_opt(retry_bind) => retry_bind = None,
        }
    }
    if let Some(task) = accept {
        let _ = task.await;
    }
    status.send_modify(|s| s.addr = None);
}

/// The accept loop's settings: at most [`MAX_CONNECTIONS`], the listener's timeouts (10 s
/// for the TLS handshake, the first bytes and headers, 30 s for a body, 60 s idle), and
/// refused handshakes logged at info level (an owner, or someone else, presented a
/// certificate the sandbox CA did not issue).
fn server(
    generations: watch::Receiver<Option<Arc<Generation>>>,
    app: Router,
) -> Server<impl Admit> {
    let mut limits = Limits::default();
    limits.max_concurrent_streams = MAX_CONCURRENT_STREAMS;
    // No upgrades here: every connection is an HTTP one.
    limits.max_connections = MAX_CONNECTIONS;
    limits.max_http_connections = MAX_CONNECTIONS;
    limits.max_header_bytes = MAX_HEADER_BYTES;
    Server::new(admit(generations, app))
        .name("splitapi")
        .limits(limits)
        .log_handshake_failures(tracing::Level::INFO)
        .drain_grace(SHUTDOWN_GRACE)
}

/// Each connection is served under the generation current when it is accepted (none yet:
/// refused): its handshake uses that generation's credentials, its retirement closes it,
/// and its requests carry the client's certificate fingerprint.
fn admit(generations: watch::Receiver<Option<Arc<Generation>>>, app: Router) -> impl Admit {
    move |_addr| {
        let generation = generations.borrow().clone()?;
        let app = app.clone();
        let version = generation.version;
        let admission = Admission::route_with(move |peer: &listener::Peer<'_>| {
            let client = peer
                .certificates
                .and_then(|chain| chain.first())
                .map(|leaf| hex::encode(&Sha256::digest(leaf)[..8]))
                .unwrap_or_default();
            tracing::debug!(peer = %peer.addr, %client, version, "splitapi client authenticated");
            Some(app.layer(Extension(Peer {
                addr: peer.addr,
                client,
                credentials_version: version,
            })))
        });
        Some(
            admission
                .over_tls(generation.acceptor.clone())
                .retire_on(generation.retired.clone()),
        )
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}
