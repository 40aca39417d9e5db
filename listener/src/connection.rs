//! One accepted connection: the TLS handshake under a timeout, its first bytes under a
//! deadline, the router its admission picks for the peer, and HTTP served until the peer
//! leaves, goes idle, or the connection is told to close (shutdown, its own retirement, or
//! the pool needing its place).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::{Builder, Connection, UpgradeableConnection};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::Level;

use crate::admission::{Admission, Peer};
use crate::io::{Counted, FirstBytes, first_bytes};
use crate::limits::Limits;
use crate::pool::{ConnectionStats, Member, Slot};
use crate::service::Tracked;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a connection closed for idleness or to make room may take to finish what it
/// was writing before its socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What every connection of one server shares.
pub(crate) struct ConnectionSettings {
    pub name: &'static str,
    pub http: Builder<TokioExecutor>,
    pub limits: Limits,
    pub upgrades: bool,
    pub handshake_failures: Level,
    pub stats: ConnectionStats,
}

impl ConnectionSettings {
    pub(crate) fn new(
        name: &'static str,
        limits: &Limits,
        upgrades: bool,
        handshake_failures: Level,
        stats: ConnectionStats,
    ) -> Self {
        let mut http = Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes)
            .keep_alive(true);
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(limits.http2_keep_alive)
            .keep_alive_timeout(limits.http2_keep_alive);
        Self {
            name,
            http,
            limits: limits.clone(),
            upgrades,
            handshake_failures,
            stats,
        }
    }
}

/// Serve one connection to its end; `member` is its place among the connections not
/// upgraded, given back when this returns.
pub(crate) async fn serve(
    tcp: Counted<TcpStream>,
    addr: SocketAddr,
    admission: Admission,
    settings: &ConnectionSettings,
    shutdown: &CancellationToken,
    member: Member,
) {
    let Admission { tls, retire, route } = admission;
    let retire = retire.unwrap_or_default();
    let slot = member.slot();
    let result = match tls {
        None => {
            let Some(router) = route(&Peer {
                addr,
                certificates: None,
            }) else {
                tracing::debug!("connection refused by its admission");
                return;
            };
            let Some(io) = start(tcp, settings, stopping(shutdown, slot)).await else {
                return;
            };
            drive(io, router, settings, slot, shutdown, &retire).await
        }
        Some(acceptor) => {
            let handshake = handshake(acceptor, tcp, addr, settings, stopping(shutdown, slot));
            let Some(stream) = handshake.await else {
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
            let Some(io) = start(stream, settings, stopping(shutdown, slot)).await else {
                return;
            };
            drive(io, router, settings, slot, shutdown, &retire).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Shutdown, or the pool needing this connection's place: what ends a connection that has
/// no request yet.
fn stopping(shutdown: &CancellationToken, slot: &Slot) -> impl Future<Output = ()> + 'static {
    let (shutdown, evicted) = (shutdown.clone(), slot.evicted().clone());
    async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = evicted.cancelled() => {}
        }
    }
}

/// The first bytes of the first request, within the first-byte timeout; `None` when the
/// peer sent none in time, closed, or `stopping` came first.
async fn start<S: AsyncRead + Unpin>(
    stream: S,
    settings: &ConnectionSettings,
    stopping: impl Future<Output = ()>,
) -> Option<crate::io::Rewind<S>> {
    let deadline = Instant::now() + settings.limits.first_byte_timeout;
    let outcome = tokio::select! {
        outcome = first_bytes(stream, deadline) => outcome,
        () = stopping => return None,
    };
    match outcome {
        Ok(io) => Some(io),
        Err(FirstBytes::TimedOut) => {
            settings.stats.count_timeout();
            tracing::debug!("no request within the first-byte timeout: closed");
            None
        }
        Err(FirstBytes::Closed) => None,
    }
}

/// The TLS handshake, bounded by the handshake timeout; `None` when it failed, timed out,
/// or `stopping` came first (a connection still in its handshake has no request to finish).
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    acceptor: TlsAcceptor,
    tcp: S,
    peer: SocketAddr,
    settings: &ConnectionSettings,
    stopping: impl Future<Output = ()>,
) -> Option<TlsStream<S>> {
    let bounded = tokio::time::timeout(settings.limits.handshake_timeout, acceptor.accept(tcp));
    let outcome = tokio::select! {
        outcome = bounded => outcome,
        () = stopping => return None,
    };
    let failure = match outcome {
        Ok(Ok(stream)) => return Some(stream),
        Ok(Err(e)) => ("TLS handshake refused", Some(e.to_string())),
        Err(_) => {
            settings.stats.count_timeout();
            ("TLS handshake timed out", None)
        }
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
/// finishes its in-flight requests and closes; when it has been idle too long, or the pool
/// needs its place, it closes within a short grace.
async fn drive<I>(
    io: I,
    router: Router,
    settings: &ConnectionSettings,
    slot: &Arc<Slot>,
    shutdown: &CancellationToken,
    retire: &CancellationToken,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let service = Tracked::new(router, Arc::clone(slot), settings.limits.body_timeout);
    let ends = Ends {
        shutdown,
        retire,
        slot,
        idle: settings.limits.idle_timeout,
        stats: &settings.stats,
    };
    if settings.upgrades {
        let conn = settings.http.serve_connection_with_upgrades(io, service);
        until_closed(conn, ends).await
    } else {
        let conn = settings.http.serve_connection(io, service);
        until_closed(conn, ends).await
    }
}

/// What ends a connection besides its peer.
struct Ends<'a> {
    shutdown: &'a CancellationToken,
    retire: &'a CancellationToken,
    slot: &'a Slot,
    idle: Duration,
    stats: &'a ConnectionStats,
}

async fn until_closed<C: GracefulConnection>(conn: C, ends: Ends<'_>) -> Result<(), BoxError> {
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = ends.shutdown.cancelled() => {
            conn.as_mut().begin_graceful_shutdown();
            conn.await
        }
        () = ends.retire.cancelled() => {
            conn.as_mut().begin_graceful_shutdown();
            conn.await
        }
        () = ends.slot.evicted().cancelled() => {
            tracing::debug!("idle connection closed to make room for a new one");
            close_within(conn, CLOSE_GRACE).await
        }
        () = ends.slot.idle_for(ends.idle) => {
            ends.stats.count_timeout();
            tracing::debug!("connection idle past the idle timeout: closed");
            close_within(conn, CLOSE_GRACE).await
        }
    }
}

/// Ask the connection to close, and drop it (closing the socket) if it has not within `grace`.
async fn close_within<C: GracefulConnection>(
    mut conn: Pin<&mut C>,
    grace: Duration,
) -> Result<(), BoxError> {
    conn.as_mut().begin_graceful_shutdown();
    tokio::time::timeout(grace, conn).await.unwrap_or(Ok(()))
}

/// A hyper connection that can be asked to finish its requests and close: hyper-util has
/// one type with upgrades and one without, with the same method but no common trait.
trait GracefulConnection: Future<Output = Result<(), BoxError>> {
    fn begin_graceful_shutdown(self: Pin<&mut Self>);
}

impl<I> GracefulConnection for Connection<'_, TokioIo<I>, Tracked, TokioExecutor>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn begin_graceful_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I> GracefulConnection for UpgradeableConnection<'_, TokioIo<I>, Tracked, TokioExecutor>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn begin_graceful_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}
