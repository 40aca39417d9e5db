//! The endpoint's life: wait for a `splitapi` bundle, bind, accept mutual-TLS connections,
//! and swap credentials in place when a newer bundle is installed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::api::{self, ApiState, Peer};
use super::{BUNDLE_ID, GuestIdentity, SplitApiConfig, SplitApiStatus, tls};
use crate::service::GuestDaemonService;
use crate::store::BundleInfo;

/// Time a client has for its TLS handshake and for sending request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may finish their requests at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Delay before retrying a failed bind.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// The credentials of one bundle version, and the signal that retires its connections.
struct Generation {
    acceptor: TlsAcceptor,
    version: u64,
    /// SHA-256 of `ca.crt`: connections survive a reload that keeps the CA (a renewal).
    ca_digest: [u8; 32],
    retired: CancellationToken,
}

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
            match load(&service).await {
                Ok(Loaded {
                    config,
                    info,
                    ca_digest,
                }) => {
                    if info.not_after <= unix_now() {
                        tracing::warn!(
                            version = info.version,
                            not_after = info.not_after,
                            "the splitapi credentials have expired; owners will refuse the server certificate"
                        );
                    }
                    // A renewal under the same CA keeps the open connections (their client
                    // certificates are still trusted) by handing them the same retire signal.
                    let previous = current.borrow().clone();
                    let retired = match &previous {
                        Some(old) if old.ca_digest == ca_digest => old.retired.clone(),
                        _ => CancellationToken::new(),
                    };
                    let generation = Arc::new(Generation {
                        acceptor: TlsAcceptor::from(config),
                        version: info.version,
                        ca_digest,
                        retired,
                    });
                    current.send_replace(Some(generation));
                    if let Some(old) = previous {
                        let same_ca = old.ca_digest == ca_digest;
                        tracing::info!(
                            from = old.version,
                            to = info.version,
                            not_after = info.not_after,
                            same_ca,
                            "splitapi credentials reloaded"
                        );
                        if !same_ca {
                            // New CA: close the connections made under the old one.
                            old.retired.cancel();
                        }
                    } else {
                        tracing::info!(
                            version = info.version,
                            not_after = info.not_after,
                            "splitapi credentials loaded"
                        );
                    }
                    status.send_modify(|s| {
                        s.bundle = Some(info);
                        s.error = None;
                    });
                }
                Err(reason) => {
                    tracing::error!(version, %reason, "cannot use the splitapi bundle; keeping the previous credentials");
                    status.send_modify(|s| s.error = Some(reason));
                }
            }
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
                    accept = Some(tokio::spawn(accept_loop(
                        listener,
                        generations.clone(),
                        app.clone(),
                        shutdown.clone(),
                    )));
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

/// A bundle turned into a TLS configuration.
struct Loaded {
    config: Arc<rustls::ServerConfig>,
    info: BundleInfo,
    ca_digest: [u8; 32],
}

/// Read the held `splitapi` bundle and build its TLS configuration.
async fn load(service: &GuestDaemonService) -> Result<Loaded, String> {
    let store = Arc::clone(service.store());
    tokio::task::spawn_blocking(move || {
        let bundle = store
            .read_bundle(BUNDLE_ID)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the splitapi bundle is no longer held".to_owned())?;
        let config = tls::server_config(&bundle.files).map_err(|e| e.to_string())?;
        let ca_digest: [u8; 32] = bundle
            .files
            .iter()
            .find(|f| f.name == tls::CA_FILE)
            .map(|f| Sha256::digest(&f.contents[..]).into())
            .unwrap_or_default();
        let info = store
            .bundle_info(BUNDLE_ID)
            .filter(|i| i.version == bundle.version)
            .unwrap_or(BundleInfo {
                id: bundle.id.clone(),
                version: bundle.version,
                not_after: bundle.not_after,
                applied_at: 0,
            });
        Ok(Loaded {
            config,
            info,
            ca_digest,
        })
    })
    .await
    .map_err(|e| format!("bundle load task failed: {e}"))?
}

async fn accept_loop(
    listener: TcpListener,
    generations: watch::Receiver<Option<Arc<Generation>>>,
    app: Router,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "splitapi accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(generation) = generations.borrow().clone() else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tracker.spawn(connection(
            tcp,
            peer,
            generation,
            app.clone(),
            shutdown.clone(),
        ));
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "splitapi connections still open after the shutdown grace"
        );
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    generation: Arc<Generation>,
    app: Router,
    shutdown: CancellationToken,
) {
    let stream =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, generation.acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "splitapi TLS handshake refused");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "splitapi TLS handshake timed out");
                return;
            }
        };
    let client = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| hex::encode(&Sha256::digest(leaf)[..8]))
        .unwrap_or_default();
    tracing::debug!(%peer, %client, version = generation.version, "splitapi client authenticated");
    let app = app.layer(Extension(Peer {
        addr: peer,
        client,
        credentials_version: generation.version,
    }));
    let service = TowerToHyperService::new(app);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(32);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = generation.retired.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "splitapi connection ended with an error");
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
