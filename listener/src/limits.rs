//! The bounds a server puts on what a peer's connection may cost it.

use std::time::Duration;

/// What bounds one peer's connection. New bounds (a cap on open connections, idle and body
/// timeouts) belong here, so that every endpoint gets them from one place; the struct is
/// `non_exhaustive` for that reason: start from [`Limits::default`] and set fields.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Time a client has to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// Time an HTTP/1 client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// Most concurrent streams on one HTTP/2 connection.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    /// 10 s for the handshake and for request headers, 256 HTTP/2 streams.
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_concurrent_streams: 256,
        }
    }
}
