//! What a server does with each connection it accepts: refuse it, or secure it (or not) and
//! serve a router that may depend on who the peer turned out to be.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use rustls::pki_types::CertificateDer;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// The client end of a connection, as far as the handshake has revealed it.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Peer<'a> {
    /// The client's address.
    pub addr: SocketAddr,
    /// The client's certificate chain, leaf first: present only over TLS with a server
    /// configuration that asked for (and verified) one.
    pub certificates: Option<&'a [CertificateDer<'static>]>,
}

type RouteHook = Box<dyn FnOnce(&Peer<'_>) -> Option<Router> + Send>;

/// How one accepted connection is handled: with or without TLS, which router serves it,
/// and what besides the server's shutdown closes it.
pub struct Admission {
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) retire: Option<CancellationToken>,
    pub(crate) route: RouteHook,
}

impl Admission {
    /// Serve `router` as it is, whoever the peer is.
    pub fn serve(router: Router) -> Self {
        Self::route_with(move |_| Some(router))
    }

    /// Build the router once the peer is known (after the TLS handshake, if any), e.g. to
    /// add an `Extension` naming the client; `None` closes the connection unserved.
    pub fn route_with(hook: impl FnOnce(&Peer<'_>) -> Option<Router> + Send + 'static) -> Self {
        Self {
            tls: None,
            retire: None,
            route: Box::new(hook),
        }
    }

    /// Run this TLS handshake (within [`Limits::handshake_timeout`](crate::Limits)) first.
    #[must_use]
    pub fn over_tls(mut self, acceptor: TlsAcceptor) -> Self {
        self.tls = Some(acceptor);
        self
    }

    /// Also close this connection gracefully when `token` is cancelled (e.g. when the
    /// credentials it was authenticated under are replaced), not only at shutdown.
    #[must_use]
    pub fn retire_on(mut self, token: CancellationToken) -> Self {
        self.retire = Some(token);
        self
    }
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("tls", &self.tls.is_some())
            .field("retire", &self.retire)
            .finish_non_exhaustive()
    }
}

/// Decides, for each accepted connection, whether and how it is served.
pub trait Admit: Send + Sync + 'static {
    /// Called once per accepted connection from `peer`, before any byte is read; `None`
    /// closes it at once.
    fn admit(&self, peer: SocketAddr) -> Option<Admission>;
}

impl<F> Admit for F
where
    F: Fn(SocketAddr) -> Option<Admission> + Send + Sync + 'static,
{
    fn admit(&self, peer: SocketAddr) -> Option<Admission> {
        self(peer)
    }
}

/// The same router, behind the same TLS configuration if any, for every connection.
#[derive(Clone)]
pub struct FixedApp {
    router: Router,
    tls: Option<TlsAcceptor>,
}

impl FixedApp {
    /// Serve `router`, over TLS with `tls` when it is given, plain HTTP otherwise.
    pub fn new(router: Router, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        Self {
            router,
            tls: tls.map(TlsAcceptor::from),
        }
    }
}

impl fmt::Debug for FixedApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedApp")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Admit for FixedApp {
    fn admit(&self, _peer: SocketAddr) -> Option<Admission> {
        let admission = Admission::serve(self.router.clone());
        Some(match &self.tls {
            Some(acceptor) => admission.over_tls(acceptor.clone()),
            None => admission,
        })
    }
}
