//! One accepted connection: the TLS handshake under a timeout, the router its admission
//! picks for the peer, and HTTP served until the peer leaves or the connection is told to
//! close (shutdown, or its own retirement).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::{Builder, Connection, UpgradeableConnection};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::Level;

use crate::admission::{Admission, Peer};
use crate::limits::Limits;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Service = TowerToHyperService<Router>;

/// What every connection of one server shares.
pub(crate) struct ConnectionSettings {
    pub name: &'static str,
    pub http: Builder<TokioExecutor>,
    pub handshake_timeout: Duration,
    pub upgrades: bool,
    pub handshake_failures: Level,
}

impl ConnectionSettings {
    pub(crate) fn new(
        name: &'static str,
        limits: &Limits,
        upgrades: bool,
        handshake_failures: Level,
    ) -> Self {
        let mut http = Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .keep_alive(true);
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams);
        Self {
            name,
            http,
            handshake_timeout: limits.handshake_timeout,
            upgrades,
            handshake_failures,
        }
    }
}

/// Serve one connection to its end.
pub(crate) async fn serve(
    tcp: TcpStream,
    addr: SocketAddr,
    admission: Admission,
    settings: &ConnectionSettings,
    shutdown: &CancellationToken,
) {
    let Admission { tls, retire, route } = admission;
    let retire = retire.unwrap_or_default();
    let result = match tls {
        None => {
            let Some(router) = route(&Peer {
                addr,
                certificates: None,
            }) else {
                tracing::debug!("connection refused by its admission");
                return;
            };
            drive(tcp, router, settings, shutdown, &retire).await
        }
        Some(acceptor) => {
            let Some(stream) = handshake(acceptor, tcp, addr, settings, shutdown).await else {
                return;
            };
            let routed = route(&Peer {
                addr,
                certificates: stream.get_ref().1.peer_certificates(),
            });
            let Some(router) = routed else {
                tracing::debug!("connection refused by its admission after the handshake");
                return;
            };
            drive(stream, router, settings, shutdown, &retire).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// The TLS handshake, bounded by the handshake timeout; `None` when it failed, timed out,
/// or shutdown came first (a connection still in its handshake has no request to finish).
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    settings: &ConnectionSettings,
    shutdown: &CancellationToken,
) -> Option<TlsStream<TcpStream>> {
    let bounded = tokio::time::timeout(settings.handshake_timeout, acceptor.accept(tcp));
    let outcome = shutdown.run_until_cancelled(bounded).await?;
    let failure = match outcome {
        Ok(Ok(stream)) => return Some(stream),
        Ok(Err(e)) => ("TLS handshake refused", Some(e.to_string())),
        Err(_) => ("TLS handshake timed out", None),
    };
    log_handshake_failure(settings, peer, failure);
    None
}

/// Handshake failures are noise on a public endpoint and an audit trail on a private one:
/// each server picks the level.
fn log_handshake_failure(
    settings: &ConnectionSettings,
    peer: SocketAddr,
    (what, error): (&str, Option<String>),
) {
    let (listener, level, error) = (settings.name, settings.handshake_failures, error.as_deref());
    if level <= Level::WARN {
        tracing::warn!(listener, %peer, error, "{what}");
    } else if level == Level::INFO {
        tracing::info!(listener, %peer, error, "{what}");
    } else {
        tracing::debug!(listener, %peer, error, "{what}");
    }
}

/// HTTP on an established stream, until it ends; on shutdown or retirement the connection
/// finishes its in-flight requests and closes.
async fn drive<I>(
    io: I,
    router: Router,
    settings: &ConnectionSettings,
    shutdown: &CancellationToken,
    retire: &CancellationToken,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let service = TowerToHyperService::new(router);
    if settings.upgrades {
        let conn = settings.http.serve_connection_with_upgrades(io, service);
        until_closed(conn, shutdown, retire).await
    } else {
        let conn = settings.http.serve_connection(io, service);
        until_closed(conn, shutdown, retire).await
    }
}

async fn until_closed<C: GracefulConnection>(
    conn: C,
    shutdown: &CancellationToken,
    retire: &CancellationToken,
) -> Result<(), BoxError> {
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => {
            conn.as_mut().begin_graceful_shutdown();
            conn.await
        }
        () = retire.cancelled() => {
            conn.as_mut().begin_graceful_shutdown();
            conn.await
        }
    }
}

/// A hyper connection that can be asked to finish its requests and close: hyper-util has
/// one type with upgrades and one without, with the same method but no common trait.
trait GracefulConnection: Future<Output = Result<(), BoxError>> {
    fn begin_graceful_shutdown(self: Pin<&mut Self>);
}

impl<I> GracefulConnection for Connection<'_, TokioIo<I>, Service, TokioExecutor>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn begin_graceful_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I> GracefulConnection for UpgradeableConnection<'_, TokioIo<I>, Service, TokioExecutor>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn begin_graceful_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}
