//! How a guest reaches the KBS tunnel: URL, TLS, limits and timeouts.

use std::{sync::Arc, time::Duration};

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::frame::DEFAULT_MAX_FRAME;

/// How the guest reaches the KBS tunnel; the same for every connection attempt.
#[derive(Clone)]
pub struct GuestTunnelConfig {
    /// `ws://host:port/kbs/v0/tunnel` or `wss://...`.
    pub url: String,
    /// TLS client configuration for `wss://` (ring provider); `None` uses the webpki roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Largest frame this guest reads, bytes (1 MiB); it sends no more than the server's Hello allows.
    pub max_frame: usize,
    /// Requests served at once; more are answered "throttled" (64).
    pub max_concurrent_requests: usize,
    /// Time allowed for TCP, TLS and the WebSocket upgrade (10 s).
    pub connect_timeout: Duration,
    /// Time allowed from upgrade to Welcome (10 s).
    pub handshake_timeout: Duration,
    /// Answers and control frames queued for the socket (64); while this many wait, the
    /// tunnel stops reading requests.
    pub write_queue: usize,
    /// A write side with data waiting and no progress for this long means the server stopped
    /// reading: the tunnel is dropped (30 s).
    pub write_stall_timeout: Duration,
    /// Time allowed for the closing handshake (2 s).
    pub close_timeout: Duration,
    /// Time allowed for the server to answer a `Reauth` (15 s).
    pub reauth_timeout: Duration,
    /// Heartbeat intervals (as announced by the server) of silence before giving up (3).
    pub missed_heartbeats: u32,
    /// WebSocket read buffer, bytes (4 KiB: a guest holds one tunnel, a simulator thousands).
    pub read_buffer_size: usize,
    /// WebSocket write buffer, bytes (8 KiB).
    pub write_buffer_size: usize,
    /// Local address to dial from (`None`: the system's choice). Simulators spread thousands
    /// of guests over several loopback addresses with it.
    pub local_addr: Option<std::net::IpAddr>,
    /// Offer `tether.v2` (a push key in the challenge, so pushes need no asymmetric
    /// operation) before `tether.v1` (true).
    pub offer_push_key: bool,
}

impl std::fmt::Debug for GuestTunnelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestTunnelConfig")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .field("max_frame", &self.max_frame)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .finish_non_exhaustive()
    }
}

impl GuestTunnelConfig {
    /// The protocol defaults (docs/protocol.md, "Limits and timers") for the tunnel at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls: None,
            max_frame: DEFAULT_MAX_FRAME,
            max_concurrent_requests: 64,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            write_queue: 64,
            write_stall_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(2),
            reauth_timeout: Duration::from_secs(15),
            missed_heartbeats: 3,
            read_buffer_size: 4 * 1024,
            write_buffer_size: 8 * 1024,
            local_addr: None,
            offer_push_key: true,
        }
    }

    /// The same, over TLS with `tls`.
    pub fn with_tls(mut self, tls: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The WebSocket's buffers and size limits.
    pub(super) fn websocket_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .write_buffer_size(self.write_buffer_size)
            .max_message_size(Some(self.max_frame))
            .max_frame_size(Some(self.max_frame))
    }
}
