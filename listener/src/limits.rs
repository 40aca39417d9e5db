//! The bounds a server puts on what a peer's connection may cost it.

use std::time::Duration;

/// What bounds one peer's connection, in time and in number. Every endpoint gets them from
/// here; the struct is `non_exhaustive`: start from [`Limits::default`] and set fields.
///
/// A connection goes through: the TLS handshake ([`handshake_timeout`](Self::handshake_timeout)),
/// its first bytes, which tell HTTP/1 from HTTP/2 ([`first_byte_timeout`](Self::first_byte_timeout)),
/// request headers ([`header_read_timeout`](Self::header_read_timeout), HTTP/1), each request
/// body ([`body_timeout`](Self::body_timeout)), and the waits between requests
/// ([`idle_timeout`](Self::idle_timeout), both protocols; HTTP/2 also pings). An upgraded
/// connection (a WebSocket) leaves these to its handler.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Time a client has to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a connection (after TLS) has to send the first bytes of its first request,
    /// enough to tell HTTP/1 from HTTP/2 (at most the 24 bytes of the HTTP/2 preface).
    pub first_byte_timeout: Duration,
    /// Time an HTTP/1 client has to send a request's headers; hyper also applies it while
    /// it waits for the next request on a kept-alive connection.
    pub header_read_timeout: Duration,
    /// Time a request's body has to arrive whole, from the request's start. A handler that
    /// reads the body past it gets an `io::Error` of kind `TimedOut`.
    pub body_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/1 keep-alive,
    /// HTTP/2 between streams).
    pub idle_timeout: Duration,
    /// HTTP/2 keep-alive: a ping after this long without frames, and the connection closed
    /// when it is not answered within the same time.
    pub http2_keep_alive: Duration,
    /// Most concurrent streams on one HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// Largest request head: HTTP/1 read buffer, HTTP/2 header list, bytes.
    pub max_header_bytes: usize,
    /// Most sockets the server holds open, upgraded ones (tunnels) included. At the cap a
    /// newly accepted socket closes the oldest connection not upgraded that has no request
    /// in flight; when there is none, the server holds that one socket and accepts nothing
    /// more (new clients wait in the kernel's backlog) until a socket closes or a request
    /// ends.
    pub max_connections: usize,
    /// Most sockets not upgraded: in their TLS handshake, serving HTTP, or idle between
    /// requests. At this cap a new connection closes the oldest one that has no request in
    /// flight (or waits for a request to end). The rest of
    /// [`max_connections`](Self::max_connections) is kept for upgraded connections, which an
    /// unauthenticated flood cannot take.
    pub max_http_connections: usize,
}

impl Default for Limits {
    /// 10 s for the handshake, the first bytes and request headers, 30 s for a body, 60 s
    /// idle, 20 s HTTP/2 pings, 256 HTTP/2 streams, 64 KiB request heads, 1024 connections
    /// of which 256 not upgraded.
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            http2_keep_alive: Duration::from_secs(20),
            max_concurrent_streams: 256,
            max_header_bytes: 64 * 1024,
            max_connections: 1024,
            max_http_connections: 256,
        }
    }
}

impl Limits {
    /// The same limits with the connection caps made consistent: at least one connection,
    /// and no more HTTP connections than connections.
    pub(crate) fn normalized(&self) -> Self {
        let max_connections = self.max_connections.max(1);
        Self {
            max_connections,
            max_http_connections: self.max_http_connections.clamp(1, max_connections),
            // hyper refuses an HTTP/1 read buffer under 8 KiB.
            max_header_bytes: self.max_header_bytes.max(8192),
            ..self.clone()
        }
    }
}
